//! `POST /api/v1/devices/ID/commands` (a command, as central would publish it; answered
//! with its state once stored) and `GET /api/v1/commands?device=&state=&after=&limit=`
//! (commands in the order they arrived, one page after an `id` cursor).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{authorized, busy, error, read, Api};
use crate::buffer::commands::CommandState;

/// Commands one page lists at most.
const PAGE: usize = 1_000;

pub(super) async fn post(
    State(api): State<Api>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    if let Err(r) = authorized(&api.state, &headers) {
        return r.into_response();
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let (answer, answered) = tokio::sync::oneshot::channel();
    let request = crate::model::CommandRequest {
        device,
        body: body.to_vec(),
        answer,
    };
    if api.state.commands.try_send(request).is_err() {
        return busy("too many commands waiting to be stored");
    }
    match answered.await {
        Ok(Ok(command)) => {
            let status = if command["state"] == "rejected" {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::OK
            };
            (status, Json(command)).into_response()
        }
        Ok(Err(why)) if why == "the gateway is stopping" => busy("the gateway is stopping"),
        Ok(Err(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(_) => busy("the gateway is stopping"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    device: Option<String>,
    state: Option<String>,
    #[serde(default)]
    after: i64,
    limit: Option<usize>,
}

pub(super) async fn list(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = authorized(&api.state, &headers) {
        return r.into_response();
    }
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let state = match q.state.as_deref() {
        None => None,
        Some(s) => match CommandState::parse(s) {
            Some(s) => Some(s),
            None => return error(StatusCode::BAD_REQUEST, "unknown state"),
        },
    };
    let limit = q.limit.unwrap_or(PAGE).clamp(1, PAGE);
    let (device, after) = (q.device, q.after);
    let result = read(&api, move |conn| {
        Ok((
            crate::buffer::commands::list(conn, device.as_deref(), state, Some(after), limit + 1)?,
            crate::buffer::commands::counts(conn)?,
        ))
    })
    .await;
    let (mut rows, counts) = match result {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let more = rows.len() > limit;
    rows.truncate(limit);
    let counts: serde_json::Map<String, serde_json::Value> = counts
        .into_iter()
        .map(|(s, n)| (s.as_str().to_owned(), json!(n)))
        .collect();
    Json(json!({
        "branch": api.state.branch,
        "counts": counts,
        "items": rows.iter().map(|r| {
            let mut v = r.to_json();
            v["id"] = json!(r.id);
            v
        }).collect::<Vec<_>>(),
        "next_after": if more { rows.last().map(|r| r.id) } else { None },
    }))
    .into_response()
}
