//! Serving the API: our own accept loop over hyper's HTTP/1 connections, so that every
//! resource a client can hold is bounded and every refusal counted (see [`Event`]).
//!
//! - **Connections.** At most `api.max_connections` open at once, and
//!   `api.max_connections_per_address` from one source address. One more is accepted and
//!   closed at once, after a `503` the socket takes without waiting: the client learns
//!   immediately (instead of hanging in the kernel's backlog behind slow clients) and the
//!   refusal is counted and logged, which a connection left in the backlog never is. Its
//!   descriptor is held only for that moment ([`crate::config::ApiSection::max_fds`]).
//! - **Time.** A request head must be complete within `api.header_timeout_ms`, an idle
//!   keep-alive connection is closed after `api.idle_timeout_ms`, and a response must be
//!   written within `api.write_timeout_ms` (see [`super::conn`]).
//! - **Requests.** At most `api.max_requests` are handled at once; one more is answered
//!   `503` with `Retry-After` at once. A body over `api.max_body_bytes` is a `413`.
//! - **Accept errors** (out of file descriptors, of memory): the loop never spins; it
//!   waits 100 ms, doubling to 1 s while they last, and counts and logs them.
//! - **Stop.** The listener closes at once; each connection finishes its request in
//!   progress (at most [`STOP_GRACE`]) and closes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::conn::{ClockTimer, Guarded, HeadClock, Phase};
use crate::burst::BurstLimiter;
use crate::config::ApiSection;

/// How long a stopping gateway lets a connection finish its request.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(2);
/// Backoff after a failed accept: from the first to the second, doubling.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));
/// hyper's read buffer per connection (its minimum is 8 KiB): bounds a request head.
const MAX_BUF_BYTES: usize = 32 * 1024;
/// Refusals of one kind are logged at most once per this window.
const LOG_WINDOW_MS: i64 = 10_000;

/// What an over-limit connection is sent before it is closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 32\r\n\r\n{\"error\":\"too many connections\"}";

/// Everything the API refuses or ends early, each with its counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Event {
    /// A connection over `api.max_connections`.
    MaxConnections,
    /// A connection over `api.max_connections_per_address`.
    MaxConnectionsPerAddress,
    /// `accept` failed (e.g. out of file descriptors).
    AcceptError,
    /// A request head not complete within `api.header_timeout_ms`.
    HeaderTimeout,
    /// A response not written within `api.write_timeout_ms`.
    WriteTimeout,
    /// A request body not complete within `api.header_timeout_ms` of its head.
    BodyTimeout,
    /// A keep-alive connection idle for `api.idle_timeout_ms` (normal; not logged).
    IdleClosed,
    /// A request over `api.max_requests`.
    MaxRequests,
    /// No SQLite reader free within `api.reader_wait_ms`.
    ReadersBusy,
    /// A body over `api.max_body_bytes`.
    BodyTooLarge,
    /// A lobby page's live stream over `api.max_live_streams`.
    MaxLiveStreams,
    /// A wrong token at the pages' login form.
    LoginFailed,
    /// A request refused with 429: its address presented too many wrong tokens.
    TokenGuessesBlocked,
    /// A read of the buffer failed. (Keep it last: [`EVENTS`] counts up to it.)
    ReadFailed,
}

const EVENTS: usize = Event::ReadFailed as usize + 1;

impl Event {
    fn index(self) -> usize {
        self as usize
    }

    fn message(self) -> Option<&'static str> {
        Some(match self {
            Event::MaxConnections => "API connection refused: api.max_connections are open",
            Event::MaxConnectionsPerAddress => {
                "API connection refused: api.max_connections_per_address are open from its address"
            }
            Event::AcceptError => "API cannot accept connections; retrying after a pause",
            Event::HeaderTimeout => {
                "API connection closed: request head not complete within api.header_timeout_ms"
            }
            Event::WriteTimeout => {
                "API connection closed: response not taken by the client within api.write_timeout_ms"
            }
            Event::BodyTimeout => {
                "API connection closed: request body not complete within api.header_timeout_ms"
            }
            Event::IdleClosed => return None,
            Event::MaxRequests => "API request refused with 503: api.max_requests are being handled",
            Event::ReadersBusy => {
                "API request refused with 503: no SQLite reader came free within api.reader_wait_ms"
            }
            Event::BodyTooLarge => "API request refused with 413: body over api.max_body_bytes",
            Event::MaxLiveStreams => {
                "lobby live stream refused with 503: api.max_live_streams are open"
            }
            Event::LoginFailed => "page login refused: wrong API token",
            Event::TokenGuessesBlocked => {
                "API request refused with 429: its address presented too many wrong tokens (refused for a minute)"
            }
            Event::ReadFailed => "API cannot read the buffer",
        })
    }
}

/// The API's counters (in `/metrics`) and its once-per-burst log.
#[derive(Debug)]
pub(crate) struct ApiStats {
    counts: [AtomicU64; EVENTS],
    /// Connections open now.
    pub(crate) connections_open: AtomicUsize,
    log: Mutex<BurstLimiter<Event>>,
}

impl Default for ApiStats {
    fn default() -> Self {
        ApiStats {
            counts: Default::default(),
            connections_open: AtomicUsize::new(0),
            log: Mutex::new(BurstLimiter::new(LOG_WINDOW_MS, EVENTS)),
        }
    }
}

impl ApiStats {
    pub(crate) fn count(&self, event: Event) -> u64 {
        self.counts[event.index()].load(Ordering::Relaxed)
    }

    /// Count `event`; log it if it is the first of its burst.
    pub(crate) fn note(&self, event: Event) {
        self.note_with(event, None);
    }

    pub(crate) fn note_with(&self, event: Event, error: Option<&dyn std::fmt::Display>) {
        self.counts[event.index()].fetch_add(1, Ordering::Relaxed);
        let Some(message) = event.message() else {
            return;
        };
        let hit = self
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hit(&event, crate::model::now_ms());
        if let Some(suppressed) = hit {
            let total = self.count(event);
            match error {
                Some(e) => tracing::warn!(error = %e, total, suppressed, "{message}"),
                None => tracing::warn!(total, suppressed, "{message}"),
            }
        }
    }
}

/// The limits of `[api]`, as durations.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_address: usize,
    pub(crate) max_requests: usize,
    pub(crate) header_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) max_body_bytes: u64,
}

impl From<&ApiSection> for Limits {
    fn from(a: &ApiSection) -> Self {
        Limits {
            max_connections: a.max_connections,
            max_connections_per_address: a.max_connections_per_address.min(a.max_connections),
            max_requests: a.max_requests,
            header_timeout: Duration::from_millis(a.header_timeout_ms),
            idle_timeout: Duration::from_millis(a.idle_timeout_ms),
            write_timeout: Duration::from_millis(a.write_timeout_ms),
            max_body_bytes: a.max_body_bytes,
        }
    }
}

/// What every connection task shares.
struct Shared {
    router: Router,
    limits: Limits,
    stats: Arc<ApiStats>,
    requests: Arc<Semaphore>,
    /// The API token, to tell a wrong bearer token from none.
    token: Arc<str>,
    guesses: Mutex<super::guesses::Guesses>,
    /// The guesses' clock (monotonic: a step of the wall clock moves no block).
    started: std::time::Instant,
}

/// Accept and serve connections on `listener` until `shutdown`; returns once every
/// connection has closed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    token: Arc<str>,
    stats: Arc<ApiStats>,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let addresses = Arc::new(PerAddress {
        max: limits.max_connections_per_address,
        open: Mutex::new(HashMap::new()),
    });
    let shared = Arc::new(Shared {
        router,
        requests: Arc::new(Semaphore::new(limits.max_requests)),
        limits,
        stats,
        token,
        guesses: Mutex::default(),
        started: std::time::Instant::now(),
    });
    let tracker = tokio_util::task::TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF.0;
                accepted
            }
            // The client's own trouble (it reset before we accepted): nothing to wait for.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                shared.stats.note_with(Event::AcceptError, Some(&e));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            refuse(stream, &shared.stats, Event::MaxConnections);
            continue;
        };
        let Some(address) = addresses.take(peer.ip()) else {
            refuse(stream, &shared.stats, Event::MaxConnectionsPerAddress);
            continue;
        };
        let slot = Slot {
            _permit: permit,
            _address: address,
            stats: shared.stats.clone(),
        };
        shared
            .stats
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
        tracker.spawn(connection(
            stream,
            peer.ip(),
            shared.clone(),
            slot,
            shutdown.clone(),
        ));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Tell an over-limit client (if its socket takes it without waiting) and close. Counted
/// first, so a client that sees the close and asks `/metrics` finds itself counted.
fn refuse(stream: TcpStream, stats: &ApiStats, why: Event) {
    stats.note(why);
    let _ = stream.try_write(REFUSED);
    drop(stream);
}

/// A connection's place: released (and the open count lowered) when its task ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _address: AddressSlot,
    stats: Arc<ApiStats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Open connections per source address (only addresses with one open are kept).
struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: self.clone(),
            ip,
        })
    }
}

struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self
            .table
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: IpAddr,
    shared: Arc<Shared>,
    slot: Slot,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let limits = &shared.limits;
    let clock = HeadClock::new(limits.header_timeout, limits.idle_timeout);
    let io = TokioIo::new(Guarded::new(stream, clock.clone(), limits.write_timeout));
    let service = {
        let shared = shared.clone();
        let clock = clock.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            clock.head_received();
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, peer, req).await) }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(ClockTimer(clock.clone()))
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF_BYTES);
    let mut conn = Box::pin(http.serve_connection(io, service));
    let result = tokio::select! {
        done = conn.as_mut() => done,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(STOP_GRACE, conn.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    match clock.ended_by() {
        Some(Phase::Header) => shared.stats.note(Event::HeaderTimeout),
        Some(Phase::Write) => shared.stats.note(Event::WriteTimeout),
        Some(Phase::Idle) => shared.stats.note(Event::IdleClosed),
        None => {
            if let Err(e) = result {
                tracing::debug!(error = %e, requests = clock.served(), "API connection ended with an error");
            }
        }
    }
    // Counted and its slot given back before the socket closes: a client that sees the
    // close finds both in `/metrics`.
    drop(slot);
    drop(conn);
}

/// A response with `Connection: close`.
fn closing(status: StatusCode, message: impl Into<String>) -> Response {
    let mut r = super::error(status, message.into());
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// One request, in this order: its whole body (within `api.max_body_bytes` and
/// `header_timeout_ms` of its head, so a slow body holds its connection, never a request
/// slot); if it presents a token, the address's standing for wrong tokens (`guesses`:
/// 429 at once while blocked); a request slot (`api.max_requests`); the router. A
/// presented token that is wrong (a bearer token not the API's, or a 401 from
/// `/login`) counts against the address.
async fn handle(shared: &Shared, peer: IpAddr, req: Request<Incoming>) -> Response {
    let req = match read_body(shared, req).await {
        Ok(req) => req,
        Err(refused) => return refused,
    };
    let bearer = req.headers().get(header::AUTHORIZATION).map(|v| {
        use subtle::ConstantTimeEq;
        let given = v.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b"");
        bool::from(given.ct_eq(shared.token.as_bytes()))
    });
    let presents_token =
        bearer.is_some() || (req.method() == hyper::Method::POST && req.uri().path() == "/login");
    let now = || shared.started.elapsed().as_millis() as i64;
    if presents_token {
        let blocked = shared
            .guesses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .blocked(peer, now());
        if let Some(seconds) = blocked {
            shared.stats.note(Event::TokenGuessesBlocked);
            let mut r = super::error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many wrong tokens from this address; retry later",
            );
            if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
    }
    let Ok(_permit) = shared.requests.clone().try_acquire_owned() else {
        shared.stats.note(Event::MaxRequests);
        return super::busy("too many requests being handled; retry shortly");
    };
    let response = match shared.router.clone().oneshot(req).await {
        Ok(response) => response.into_response(),
        Err(never) => match never {},
    };
    let wrong =
        bearer == Some(false) || (presents_token && response.status() == StatusCode::UNAUTHORIZED);
    if wrong {
        shared
            .guesses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failed(peer, now());
    }
    response
}

/// The request with its whole body read, or the refusal (413 over `api.max_body_bytes`,
/// 408 when not complete within `header_timeout_ms`, 400 unreadable; each closes).
async fn read_body(shared: &Shared, req: Request<Incoming>) -> Result<Request<Body>, Response> {
    let max = shared.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        shared.stats.note(Event::BodyTooLarge);
        return Err(closing(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {max} bytes"),
        ));
    }
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, max as usize);
    match tokio::time::timeout(shared.limits.header_timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(Request::from_parts(parts, Body::from(collected.to_bytes()))),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            shared.stats.note(Event::BodyTooLarge);
            Err(closing(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {max} bytes"),
            ))
        }
        Ok(Err(_)) => Err(closing(
            StatusCode::BAD_REQUEST,
            "the request body could not be read",
        )),
        Err(_) => {
            shared.stats.note(Event::BodyTimeout);
            Err(closing(
                StatusCode::REQUEST_TIMEOUT,
                "request body not complete in time",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_response() {
        let text = std::str::from_utf8(REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "too many connections");
    }

    #[test]
    fn per_address_slots_are_given_back() {
        let table = Arc::new(PerAddress {
            max: 2,
            open: Mutex::new(HashMap::new()),
        });
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        let a = table.take(ip).unwrap();
        let _b = table.take(ip).unwrap();
        assert!(table.take(ip).is_none());
        let _c = table.take(other).unwrap();
        drop(a);
        let _d = table.take(ip).unwrap();
        drop((_b, _c, _d));
        assert!(table.open.lock().unwrap().is_empty());
    }

    #[test]
    fn counted_and_logged_once_per_burst() {
        let stats = ApiStats::default();
        for _ in 0..5 {
            stats.note(Event::MaxRequests);
        }
        stats.note(Event::IdleClosed);
        assert_eq!(stats.count(Event::MaxRequests), 5);
        assert_eq!(stats.count(Event::IdleClosed), 1);
        assert_eq!(stats.count(Event::ReadersBusy), 0);
    }
}
