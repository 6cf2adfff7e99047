//! `GET /api/v1/quarantine`: the rows central refused, counted and listed (without their
//! payloads: they may hold patron data), one page after a `seq` cursor.

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{authorized, error, read, Api};

/// Rows one page lists at most.
const PAGE: usize = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuarantineQuery {
    #[serde(default)]
    after: i64,
    limit: Option<usize>,
}

pub(super) async fn quarantine(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<QuarantineQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = authorized(&api.state, &headers) {
        return r.into_response();
    }
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let limit = q.limit.unwrap_or(PAGE).clamp(1, PAGE);
    let after = q.after;
    let result = read(&api, move |conn| {
        Ok((
            crate::buffer::quarantine_counts(conn)?,
            crate::buffer::quarantine_list(conn, after, limit + 1)?,
        ))
    })
    .await;
    let (counts, mut rows) = match result {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let more = rows.len() > limit;
    rows.truncate(limit);
    let counts: Vec<_> = counts
        .into_iter()
        .map(|(device, kind, reason, n)| {
            json!({"device": device, "kind": kind, "reason": reason, "count": n})
        })
        .collect();
    let items: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "seq": r.seq,
                "device": r.device,
                "kind": r.kind,
                "received": crate::model::format_ms(r.received_ms),
                "reason": r.reason,
                "quarantined": crate::model::format_ms(r.at_ms),
                "payload_bytes": r.bytes,
            })
        })
        .collect();
    Json(json!({
        "branch": api.state.branch,
        "counts": counts,
        "items": items,
        "next_after": if more { rows.last().map(|r| r.seq) } else { None },
    }))
    .into_response()
}
