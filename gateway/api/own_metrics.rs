//! The API's own series in `/metrics`: its connections, its SQLite readers, and every
//! refusal and timeout of [`super::server`].

use std::sync::atomic::Ordering;

use super::server::{ApiStats, Event};

/// The API's own figures: its connections, readers and everything it refused.
pub(super) fn render(
    metric: &mut impl FnMut(&str, &str, &str, &[(String, f64)]),
    s: &ApiStats,
    readers_open: usize,
    live_streams_open: usize,
) {
    let n = |e: Event| s.count(e) as f64;
    metric(
        "branch_gateway_api_connections_open",
        "HTTP API connections open now.",
        "gauge",
        &[(
            String::new(),
            s.connections_open.load(Ordering::Relaxed) as f64,
        )],
    );
    metric(
        "branch_gateway_api_connections_refused_total",
        "HTTP API connections accepted and closed at once, by the limit they were over.",
        "counter",
        &[
            (
                "{limit=\"max_connections\"}".into(),
                n(Event::MaxConnections),
            ),
            (
                "{limit=\"max_connections_per_address\"}".into(),
                n(Event::MaxConnectionsPerAddress),
            ),
        ],
    );
    metric(
        "branch_gateway_api_accept_errors_total",
        "Failed accepts on the HTTP API listener (e.g. out of file descriptors).",
        "counter",
        &[(String::new(), n(Event::AcceptError))],
    );
    metric(
        "branch_gateway_api_connections_timed_out_total",
        "HTTP API connections closed by a time bound: header, write, body, or idle keep-alive.",
        "counter",
        &[
            ("{timeout=\"header\"}".into(), n(Event::HeaderTimeout)),
            ("{timeout=\"write\"}".into(), n(Event::WriteTimeout)),
            ("{timeout=\"body\"}".into(), n(Event::BodyTimeout)),
            ("{timeout=\"idle\"}".into(), n(Event::IdleClosed)),
        ],
    );
    metric(
        "branch_gateway_api_requests_refused_total",
        "HTTP API requests refused by a limit: 503 max_requests or readers, 413 body.",
        "counter",
        &[
            ("{limit=\"max_requests\"}".into(), n(Event::MaxRequests)),
            ("{limit=\"readers\"}".into(), n(Event::ReadersBusy)),
            ("{limit=\"max_body_bytes\"}".into(), n(Event::BodyTooLarge)),
            (
                "{limit=\"max_live_streams\"}".into(),
                n(Event::MaxLiveStreams),
            ),
            (
                "{limit=\"wrong_tokens\"}".into(),
                n(Event::TokenGuessesBlocked),
            ),
        ],
    );
    metric(
        "branch_gateway_page_logins_refused_total",
        "Wrong API tokens given at the pages' login form.",
        "counter",
        &[(String::new(), n(Event::LoginFailed))],
    );
    metric(
        "branch_gateway_api_read_errors_total",
        "HTTP API reads of the buffer that failed (answered 503).",
        "counter",
        &[(String::new(), n(Event::ReadFailed))],
    );
    metric(
        "branch_gateway_lobby_streams_open",
        "Lobby pages following the live figures now (at most api.max_live_streams).",
        "gauge",
        &[(String::new(), live_streams_open as f64)],
    );
    metric(
        "branch_gateway_api_readers_open",
        "Read-only SQLite connections the HTTP API holds (at most api.readers).",
        "gauge",
        &[(String::new(), readers_open as f64)],
    );
}
