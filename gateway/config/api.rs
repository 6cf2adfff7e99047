//! `[api]`: where the HTTP API listens, its token, and the limits that keep one client
//! (or a thousand slow ones) from holding its connections, file descriptors or SQLite
//! readers. Every limit has a default; [`ApiSection::check`] bounds them.

use std::fmt;
use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    pub listen: SocketAddr,
    /// Clients send `Authorization: Bearer <token>` (except for `/healthz`).
    pub token: String,
    /// Connections open at once; one more is accepted and closed at once (counted).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections open at once from one source address (at most `max_connections`).
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// Requests being handled at once; one more is answered 503 with `Retry-After`.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// A request head must be complete this long after its first byte (or, for a new
    /// connection, after the connection opened).
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// A keep-alive connection with no request started for this long is closed.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// A response must be written (taken by the client's TCP window) within this.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Largest request body (the API has none); larger is a 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Read-only SQLite connections the API keeps and shares.
    #[serde(default = "default_readers")]
    pub readers: usize,
    /// How long a request waits for a free SQLite reader before a 503.
    #[serde(default = "default_reader_wait_ms")]
    pub reader_wait_ms: u64,
    /// Who may see `/lobby` (aggregate figures only): `public` (anyone on the LAN, the
    /// default) or `token` (the API token, as a bearer or the dashboard's login cookie).
    #[serde(default)]
    pub lobby: LobbyAccess,
    /// Lobby pages receiving live updates at once; one more is answered 503. Each holds a
    /// connection, so at most half of `max_connections` is used (the rest stays for
    /// central and branch IT): see [`ApiSection::live_streams`].
    #[serde(default = "default_max_live_streams")]
    pub max_live_streams: usize,
}

/// Who may see the lobby page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LobbyAccess {
    #[default]
    Public,
    Token,
}

impl ApiSection {
    /// Lobby live streams allowed at once: `max_live_streams`, at most half of
    /// `max_connections`.
    pub fn live_streams(&self) -> usize {
        self.max_live_streams.min(self.max_connections / 2)
    }
}

impl fmt::Debug for ApiSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiSection")
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_address",
                &self.max_connections_per_address,
            )
            .field("max_requests", &self.max_requests)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("write_timeout_ms", &self.write_timeout_ms)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("readers", &self.readers)
            .field("reader_wait_ms", &self.reader_wait_ms)
            .field("lobby", &self.lobby)
            .field("max_live_streams", &self.max_live_streams)
            .finish()
    }
}

fn default_max_connections() -> usize {
    64
}
fn default_max_connections_per_address() -> usize {
    16
}
fn default_max_requests() -> usize {
    16
}
fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    30_000
}
fn default_write_timeout_ms() -> u64 {
    30_000
}
fn default_max_body_bytes() -> u64 {
    16 * 1024
}
fn default_readers() -> usize {
    4
}
fn default_max_live_streams() -> usize {
    32
}
fn default_reader_wait_ms() -> u64 {
    2_000
}

/// File descriptors one SQLite reader holds: the database, its WAL and its shared memory.
const FDS_PER_READER: usize = 3;

impl ApiSection {
    /// The most file descriptors the API holds at once: the listener, every connection
    /// (one more for the moment a refused one is open) and the readers' files.
    pub fn max_fds(&self) -> usize {
        2 + self.max_connections + self.readers * FDS_PER_READER
    }

    pub(crate) fn check(&self, push: &mut impl FnMut(String, String)) {
        if self.token.len() < 16 {
            push(
                "api.token".into(),
                "must be at least 16 characters (a random secret shared with the central server)"
                    .into(),
            );
        }
        let mut range = |key: &str, value: u64, min: u64, max: u64| {
            if !(min..=max).contains(&value) {
                push(
                    format!("api.{key}"),
                    format!("must be between {min} and {max}"),
                );
            }
        };
        range("max_connections", self.max_connections as u64, 1, 4096);
        range(
            "max_connections_per_address",
            self.max_connections_per_address as u64,
            1,
            4096,
        );
        range("max_requests", self.max_requests as u64, 1, 1024);
        range("header_timeout_ms", self.header_timeout_ms, 100, 300_000);
        range("idle_timeout_ms", self.idle_timeout_ms, 100, 3_600_000);
        range("write_timeout_ms", self.write_timeout_ms, 100, 600_000);
        range("max_body_bytes", self.max_body_bytes, 0, 16 * 1024 * 1024);
        range("readers", self.readers as u64, 1, 64);
        range("reader_wait_ms", self.reader_wait_ms, 1, 60_000);
        range("max_live_streams", self.max_live_streams as u64, 0, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Problem;

    fn problems(text: &str) -> Vec<Problem> {
        let section: ApiSection = toml::from_str(text).unwrap();
        let mut out = Vec::new();
        section.check(&mut |key, message| out.push(Problem { key, message }));
        out
    }

    const BASE: &str = "listen = \"127.0.0.1:8080\"\ntoken = \"0123456789abcdef\"\n";

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let a: ApiSection = toml::from_str(BASE).unwrap();
        assert!(problems(BASE).is_empty());
        assert_eq!(
            (
                a.max_connections,
                a.max_connections_per_address,
                a.max_requests,
                a.header_timeout_ms,
                a.idle_timeout_ms,
                a.write_timeout_ms,
                a.max_body_bytes,
                a.readers,
                a.reader_wait_ms,
            ),
            (64, 16, 16, 10_000, 30_000, 30_000, 16_384, 4, 2_000)
        );
        assert_eq!(a.max_fds(), 2 + 64 + 12);
    }

    #[test]
    fn bounds_name_their_key() {
        let keys = |extra: &str| -> Vec<String> {
            problems(&format!("{BASE}{extra}"))
                .into_iter()
                .map(|p| p.key)
                .collect()
        };
        assert_eq!(keys("max_connections = 0"), ["api.max_connections"]);
        assert_eq!(keys("readers = 0"), ["api.readers"]);
        assert_eq!(keys("readers = 65"), ["api.readers"]);
        assert_eq!(keys("header_timeout_ms = 99"), ["api.header_timeout_ms"]);
        assert_eq!(keys("reader_wait_ms = 0"), ["api.reader_wait_ms"]);
        assert_eq!(
            keys("max_connections_per_address = 0"),
            ["api.max_connections_per_address"]
        );
        assert!(keys("max_connections = 8").is_empty());
        assert!(toml::from_str::<ApiSection>(&format!("{BASE}max_conections = 5")).is_err());
    }
}
