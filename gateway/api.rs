//! The HTTP API for the central server and branch IT (axum): summaries (by period or by
//! change cursor), devices, health and Prometheus metrics. Reads share a few read-only
//! SQLite connections on the blocking pool ([`readers`]); nothing here writes. Served by
//! our own accept loop with bounded connections, time and requests ([`server`]).
//!
//! `/api/v1/*` and `/metrics` need `Authorization: Bearer <token>`; `/healthz` does not.
//! Every error is JSON: `{"error": "..."}` with 400, 401, 404, 413 or 503 (with
//! `Retry-After` when the API is at one of its limits).

mod chart;
mod commands;
mod conn;
mod dashboard;
mod guesses;
mod lobby;
mod own_metrics;
mod page;
mod quarantine;
mod readers;
mod server;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::buffer::BufferStats;
use crate::config::ApiSection;
use crate::summary::Period;
use crate::upstream::UpstreamStats;
use readers::{ReadError, Readers};
use server::{ApiStats, Event};

/// Most rows one cursor page returns.
pub const MAX_PAGE: i64 = 10_000;
/// Most buckets one range query may cover (a year of hours is 8,784).
const MAX_RANGE_BUCKETS: i64 = 9_000;

#[derive(Clone)]
pub struct ApiState {
    pub database: PathBuf,
    pub token: Arc<str>,
    pub tz: jiff::tz::TimeZone,
    pub branch: String,
    pub buffer: Arc<BufferStats>,
    /// `None` without an `[upstream]`.
    pub upstream: Option<Arc<UpstreamStats>>,
    pub intake: Arc<crate::intake::IntakeStats>,
    pub devices_online: Arc<std::sync::atomic::AtomicUsize>,
    /// Where posted commands go (the dispatcher).
    pub commands: tokio::sync::mpsc::Sender<crate::model::CommandRequest>,
    /// Today's live figures (the lobby page and its stream).
    pub live: tokio::sync::watch::Receiver<Arc<crate::live::Snapshot>>,
    /// The pages' language.
    pub language: crate::config::Language,
    /// `storage.max_bytes` (the dashboard shows the buffer against it).
    pub storage_cap_bytes: u64,
    /// The tapped SIP2 kiosks (the dashboard shows their health).
    pub kiosks: Vec<crate::model::DeviceId>,
}

/// What every handler sees: the gateway's figures plus the API's readers and counters.
#[derive(Clone)]
struct Api {
    state: ApiState,
    readers: Arc<Readers>,
    stats: Arc<ApiStats>,
    /// Who may see the lobby page.
    lobby_access: crate::config::LobbyAccess,
    /// Places for lobby pages' live streams (`api.max_live_streams`).
    streams: Arc<tokio::sync::Semaphore>,
    max_streams: usize,
    /// The lobby's stream updates, rendered once per snapshot.
    feed: Arc<lobby::Feed>,
}

/// Serve the API on `listener` with the limits of `config` until `shutdown`; returns once
/// every connection has closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: &ApiSection,
    state: ApiState,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let api = Api {
        readers: Arc::new(Readers::new(
            state.database.clone(),
            config.readers,
            Duration::from_millis(config.reader_wait_ms),
        )),
        stats: Arc::new(ApiStats::default()),
        lobby_access: config.lobby,
        streams: Arc::new(tokio::sync::Semaphore::new(config.live_streams())),
        max_streams: config.live_streams(),
        feed: Arc::new(lobby::Feed::start(
            state.live.clone(),
            state.language,
            state.tz.clone(),
        )),
        state,
    };
    let stats = api.stats.clone();
    let token = api.state.token.clone();
    server::serve(listener, router(api), config.into(), token, stats, shutdown).await;
}

fn router(api: Api) -> Router {
    Router::new()
        .route("/api/v1/summaries", get(summaries))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/quarantine", get(quarantine::quarantine))
        .route("/api/v1/commands", get(commands::list))
        .route(
            "/api/v1/devices/{device}/commands",
            axum::routing::post(commands::post),
        )
        .route("/metrics", get(metrics))
        .route("/", get(page::dashboard))
        .route("/lobby", get(page::lobby))
        .route("/lobby/events", get(page::lobby_events))
        .route("/login", get(page::login_form).post(page::login))
        .route("/healthz", get(healthz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(api)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError::Refused(status, message.into()).into_response()
}

/// 503 with `Retry-After`: the API is at one of its limits, not broken.
fn busy(message: &str) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// A refused request.
enum ApiError {
    /// Its status and the message of its JSON body.
    Refused(StatusCode, String),
    /// At a limit: 503 with `Retry-After`.
    Busy(&'static str),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Refused(status, message) => {
                (status, Json(json!({ "error": message }))).into_response()
            }
            ApiError::Busy(message) => busy(message),
        }
    }
}

fn authorized(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(state.token.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Refused(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

/// Run a read on one of the API's read-only connections, off the async workers.
async fn read<T: Send + 'static>(
    api: &Api,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match api.readers.read(f).await {
        Ok(v) => Ok(v),
        Err(ReadError::Busy) => {
            api.stats.note(Event::ReadersBusy);
            Err(ApiError::Busy(
                "every database reader is busy; retry shortly",
            ))
        }
        Err(ReadError::Failed(e)) => {
            api.stats.note_with(Event::ReadFailed, Some(&e));
            Err(ApiError::Refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "the buffer cannot be read".into(),
            ))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SummaryQuery {
    period: Option<String>,
    from: Option<String>,
    to: Option<String>,
    device: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
}

/// `2026-11-25` (local midnight), `2026-11-25T10:00` (local), or RFC 3339 with an offset.
fn parse_time(tz: &jiff::tz::TimeZone, s: &str) -> Option<i64> {
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Some(ts.as_millisecond());
    }
    let civil = s.parse::<jiff::civil::DateTime>().ok().or_else(|| {
        s.parse::<jiff::civil::Date>()
            .ok()
            .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
    })?;
    civil
        .to_zoned(tz.clone())
        .ok()
        .map(|z| z.timestamp().as_millisecond())
}

async fn summaries(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<SummaryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = authorized(&api.state, &headers) {
        return r.into_response();
    }
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match q.after {
        Some(after) => changes(api, q, after).await,
        None => range(api, q).await,
    }
}

/// Everything that changed since `after` (including re-opened past buckets), oldest
/// change first, with the cursor for the next call.
async fn changes(api: Api, q: SummaryQuery, after: i64) -> Response {
    let state = &api.state;
    if q.period.is_some() || q.from.is_some() || q.to.is_some() || q.device.is_some() {
        return error(StatusCode::BAD_REQUEST, "`after` takes only `limit`");
    }
    let limit = q.limit.unwrap_or(1000);
    if after < 0 || !(1..=MAX_PAGE).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`after` must be >= 0 and `limit` between 1 and {MAX_PAGE}"),
        );
    }
    let tz = state.tz.clone();
    // A page ends at a bucket boundary (the cursor is a bucket's version): up to `limit`
    // buckets are read, and whole buckets are kept while their metrics fit in `limit`.
    let rows = read(&api, move |c| {
        let mut st = c.prepare_cached(
            "SELECT scope, period, bucket, bucket_ms, metrics, version FROM rollup_buckets
             WHERE version > ?1 ORDER BY version LIMIT ?2",
        )?;
        let mut rows = st.query(rusqlite::params![after, limit])?;
        let mut page = Vec::new();
        let mut items = 0usize;
        while let Some(r) = rows.next()? {
            let (metrics, _) = crate::summary::decode_metrics(r.get_ref(4)?.as_str()?);
            if items > 0 && items + metrics.len() > limit as usize {
                break;
            }
            items += metrics.len();
            page.push((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                metrics,
                r.get::<_, i64>(5)?,
            ));
        }
        Ok(page)
    })
    .await;
    let rows = match rows {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let next = rows.last().map_or(after, |r| r.5);
    let mut items: Vec<Value> = Vec::new();
    for (scope, period, bucket, ms, metrics, version) in rows {
        let device = if scope.is_empty() {
            Value::Null
        } else {
            json!(scope)
        };
        let start = start_text(&tz, ms);
        for (metric, m) in metrics {
            items.push(json!({
                "device": device,
                "period": period,
                "bucket": bucket,
                "start": start,
                "metric": metric,
                "value": crate::summary::json_number(m.1),
                "samples": m.2,
                "version": version,
            }));
        }
    }
    Json(json!({ "branch": state.branch, "items": items, "next": next })).into_response()
}

fn start_text(tz: &jiff::tz::TimeZone, ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| {
            t.to_zoned(tz.clone())
                .strftime("%Y-%m-%dT%H:%M:%S%:z")
                .to_string()
        })
        .unwrap_or_default()
}

/// Buckets of one period between `from` (inclusive) and `to` (exclusive), for the branch
/// (no `device`), one device, or every device (`device=*`).
async fn range(api: Api, q: SummaryQuery) -> Response {
    let state = &api.state;
    if q.limit.is_some() {
        return error(StatusCode::BAD_REQUEST, "`limit` goes with `after`");
    }
    let Some(period) = q.period.as_deref().and_then(Period::parse) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`period` must be `hour` or `day` (or use `after`)",
        );
    };
    let (Some(from), Some(to)) = (q.from.as_deref(), q.to.as_deref()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "`from` and `to` are required with `period`",
        );
    };
    let (Some(from_ms), Some(to_ms)) = (parse_time(&state.tz, from), parse_time(&state.tz, to))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "`from`/`to`: a date (2026-11-25), a local time (2026-11-25T10:00) or RFC 3339",
        );
    };
    let span = match period {
        Period::Hour => 3_600_000,
        Period::Day => 86_400_000,
    };
    if to_ms <= from_ms || (to_ms - from_ms) / span > MAX_RANGE_BUCKETS {
        return error(
            StatusCode::BAD_REQUEST,
            format!("`to` must be after `from`, at most {MAX_RANGE_BUCKETS} buckets apart"),
        );
    }
    let device = q.device.clone();
    let tz = state.tz.clone();
    let branch = state.branch.clone();
    // Query, grouping and serialisation all run on the blocking pool: a year of hours is
    // a megabyte of JSON.
    let body = read(&api, move |c| {
        let (sql, scope): (&str, Option<String>) = match device.as_deref() {
            Some("*") => (
                "SELECT scope, bucket, bucket_ms, metrics FROM rollup_buckets
                 WHERE period = ?1 AND bucket_ms >= ?2 AND bucket_ms < ?3 AND scope <> ''
                 ORDER BY scope, bucket_ms",
                None,
            ),
            other => (
                "SELECT scope, bucket, bucket_ms, metrics FROM rollup_buckets
                 WHERE scope = ?4 AND period = ?1 AND bucket_ms >= ?2 AND bucket_ms < ?3
                 ORDER BY bucket_ms",
                Some(other.unwrap_or("").to_owned()),
            ),
        };
        let mut st = c.prepare_cached(sql)?;
        let period_name = period.as_str();
        let mut rows = match &scope {
            Some(s) => st.query(rusqlite::params![period_name, from_ms, to_ms, s])?,
            None => st.query(rusqlite::params![period_name, from_ms, to_ms])?,
        };
        let mut items: Vec<Bucket> = Vec::new();
        while let Some(r) = rows.next()? {
            let (scope, ms): (String, i64) = (r.get(0)?, r.get(2)?);
            let metrics = crate::summary::decode_metrics(r.get_ref(3)?.as_str()?)
                .0
                .into_iter()
                .map(|(name, m)| (name, crate::summary::json_number(m.1)))
                .collect();
            items.push(Bucket {
                device: (!scope.is_empty()).then_some(scope),
                bucket: r.get(1)?,
                start: start_text(&tz, ms),
                metrics,
            });
        }
        let page = RangePage {
            branch: &branch,
            period: period_name,
            timezone: tz.iana_name().unwrap_or("UTC"),
            items: &items,
        };
        Ok(serde_json::to_string(&page).unwrap_or_default())
    })
    .await;
    match body {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(serde::Serialize)]
struct Bucket {
    device: Option<String>,
    bucket: String,
    start: String,
    metrics: serde_json::Map<String, Value>,
}

#[derive(serde::Serialize)]
struct RangePage<'a> {
    branch: &'a str,
    period: &'a str,
    timezone: &'a str,
    items: &'a [Bucket],
}

async fn devices(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&api.state, &headers) {
        return r.into_response();
    }
    let rows = match read(&api, crate::buffer::device_report).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let items: Vec<Value> = rows
        .into_iter()
        .filter(|d| d.configured)
        .map(|d| {
            json!({
                "id": d.id,
                "profile": d.profile,
                "online": d.online,
                "last_seen": d.last_seen_ms.map(crate::model::format_ms),
                "reported_status": d.reported_status,
                "accepted": d.accepted,
                "rejected": d.rejected,
                "denied": d.denied,
                "rate_limited": d.rate_limited,
                "commands_open": d.commands_open,
                "commands_succeeded": d.commands_succeeded,
                "last_rejection": d.last_reject_reason,
            })
        })
        .collect();
    Json(json!({ "branch": api.state.branch, "devices": items })).into_response()
}

/// 200 when the gateway can do its job (the buffer is readable and its last commit did
/// not fail); 503 otherwise. The upstream link is reported, but being offline is normal
/// for a store-and-forward gateway and does not fail the check.
async fn healthz(State(api): State<Api>) -> Response {
    let state = &api.state;
    let storage = read(&api, |c| {
        c.query_row("SELECT COUNT(*) FROM devices", [], |r| r.get::<_, i64>(0))
    })
    .await;
    // Readers all busy says nothing about the storage: answer that, not "failing".
    if let Err(ApiError::Busy(message)) = storage {
        return busy(message);
    }
    let failing = state.buffer.last_commit_failed.load(Ordering::Relaxed);
    let storage_ok = storage.is_ok() && !failing;
    let upstream = match &state.upstream {
        None => "not configured",
        Some(u) if u.connected.load(Ordering::Relaxed) => "connected",
        Some(_) => "disconnected",
    };
    let body = json!({
        "status": if storage_ok { "ok" } else { "failing" },
        "broker": "listening",
        "storage": if storage_ok { "ok" } else { "failing" },
        "upstream": upstream,
        "backlog": state.upstream.as_ref().map(|u| u.backlog.load(Ordering::Relaxed)),
        "devices_online": state.devices_online.load(Ordering::Relaxed),
    });
    let status = if storage_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(api): State<Api>, headers: HeaderMap) -> Response {
    let state = &api.state;
    if let Err(r) = authorized(state, &headers) {
        return r.into_response();
    }
    let report = read(&api, |c| {
        crate::buffer::buffer_report(c, crate::model::now_ms())
    })
    .await;
    let size = crate::buffer::size_on_disk(&state.database);
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, samples: &[(String, f64)]| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in samples {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let i = &state.intake;
    metric(
        "branch_gateway_messages_total",
        "Device messages by outcome at intake.",
        "counter",
        &[
            (
                "{outcome=\"accepted\"}".into(),
                i.accepted.load(Ordering::Relaxed) as f64,
            ),
            (
                "{outcome=\"rejected\"}".into(),
                i.rejected.load(Ordering::Relaxed) as f64,
            ),
            (
                "{outcome=\"rate_limited\"}".into(),
                i.rate_limited.load(Ordering::Relaxed) as f64,
            ),
        ],
    );
    if let Some(u) = &state.upstream {
        metric(
            "branch_gateway_forwarded_total",
            "Messages acknowledged by the central broker.",
            "counter",
            &[(String::new(), u.acknowledged.load(Ordering::Relaxed) as f64)],
        );
        metric(
            "branch_gateway_upstream_connected",
            "1 while connected to the central broker.",
            "gauge",
            &[(
                String::new(),
                u.connected.load(Ordering::Relaxed) as u8 as f64,
            )],
        );
    }
    if let Ok(r) = &report {
        metric(
            "branch_gateway_backlog_messages",
            "Buffered messages not yet acknowledged upstream.",
            "gauge",
            &[(String::new(), r.backlog as f64)],
        );
        let quarantined: Vec<(String, f64)> = r
            .quarantined
            .iter()
            .map(|(d, k, why, n)| {
                (
                    format!("{{device=\"{d}\",kind=\"{k}\",reason=\"{why}\"}}"),
                    *n as f64,
                )
            })
            .collect();
        metric(
            "branch_gateway_quarantined_messages",
            "Messages central refused, kept in the quarantine (branch-gateway quarantine).",
            "gauge",
            &quarantined,
        );
        let commands: Vec<(String, f64)> = r
            .commands
            .iter()
            .map(|(s, n)| (format!("{{state=\"{}\"}}", s.as_str()), *n as f64))
            .collect();
        metric(
            "branch_gateway_commands",
            "Commands from central by their current state (README \"Commands\").",
            "gauge",
            &commands,
        );
        let age = r
            .oldest_undelivered_ms
            .map_or(0.0, |ms| (crate::model::now_ms() - ms) as f64 / 1000.0);
        metric(
            "branch_gateway_oldest_undelivered_age_seconds",
            "Age of the oldest undelivered message.",
            "gauge",
            &[(String::new(), age)],
        );
        let drops: Vec<(String, f64)> = r
            .drops
            .iter()
            .map(|(d, k, n)| (format!("{{device=\"{d}\",kind=\"{k}\"}}"), *n as f64))
            .collect();
        metric(
            "branch_gateway_dropped_total",
            "Undelivered messages removed by the disk cap.",
            "counter",
            &drops,
        );
        let limited: Vec<(String, f64)> = r
            .rate_limited
            .iter()
            .map(|(d, n)| (format!("{{device=\"{d}\"}}"), *n as f64))
            .collect();
        metric(
            "branch_gateway_rate_limited_total",
            "Device messages refused for their profile's rate limit, since the database was created.",
            "counter",
            &limited,
        );
        let refused: Vec<(String, f64)> = r
            .refused
            .iter()
            .map(|(d, reason, n)| (format!("{{device=\"{d}\",reason=\"{reason}\"}}"), *n as f64))
            .collect();
        let sip2: Vec<(String, f64)> = r
            .sip2
            .iter()
            .map(|(d, c, n)| (format!("{{device=\"{d}\",counter=\"{c}\"}}"), *n as f64))
            .collect();
        metric(
            "branch_gateway_sip2_total",
            "SIP2 tap counters per kiosk (connections, logins, unparsed, checksum errors, ILS unreachable, derived events dropped), since the database was created.",
            "counter",
            &sip2,
        );
        metric(
            "branch_gateway_broker_refused_total",
            "Connections and packets the device broker refused, by device (empty: no configured device) and reason, since the database was created.",
            "counter",
            &refused,
        );
    }
    metric(
        "branch_gateway_devices_online",
        "Devices connected now.",
        "gauge",
        &[(
            String::new(),
            state.devices_online.load(Ordering::Relaxed) as f64,
        )],
    );
    metric(
        "branch_gateway_buffer_bytes",
        "SQLite database plus WAL on disk.",
        "gauge",
        &[(String::new(), size as f64)],
    );
    own_metrics::render(
        &mut metric,
        &api.stats,
        api.readers.open(),
        api.max_streams
            .saturating_sub(api.streams.available_permits()),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
