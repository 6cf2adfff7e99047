//! `[broker]`: the device port and the limits that keep one device (or one address) from
//! exhausting what all devices share. Every limit has a default; see the README's table.

use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// One listener for MQTT 3.1.1 and MQTT 5 (the protocol level of each CONNECT decides).
    pub listen: SocketAddr,
    /// Connections the kernel queues before they are accepted (capped by
    /// `net.core.somaxconn`).
    #[serde(default = "default_listen_backlog")]
    pub listen_backlog: u32,
    /// Device connections open at once; past it a new connection is closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one device may have open at once (a CONNECT with an open connection's
    /// client id replaces it instead).
    #[serde(default = "default_max_connections_per_device")]
    pub max_connections_per_device: usize,
    /// Connections from one address that have not logged in yet.
    #[serde(default = "default_max_pending_per_address")]
    pub max_pending_per_address: usize,
    /// Distinct persistent-session client ids one device may use in a run.
    #[serde(default = "default_max_sessions_per_device")]
    pub max_sessions_per_device: usize,
    /// How long a new TCP connection may take to send its CONNECT.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u16,
    /// How long the rest of a packet may take once its first byte has arrived
    /// (whatever the keep-alive, 0 included).
    #[serde(default = "default_packet_timeout_ms")]
    pub packet_timeout_ms: u64,
    /// How long a device may leave what the gateway writes to it unread.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Subscriptions one connection may hold.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions: usize,
    /// Longest topic filter accepted, in bytes.
    #[serde(default = "default_max_filter_bytes")]
    pub max_filter_bytes: usize,
    /// Distinct filters all devices together may subscribe to in a run (rumqttd keeps
    /// every filter it has seen until the process ends).
    #[serde(default = "default_max_filters")]
    pub max_filters: usize,
    /// Of those, how many new ones one device may bring.
    #[serde(default = "default_max_filters_per_device")]
    pub max_filters_per_device: usize,
    /// Argon2 password checks running at once (each takes the hash's `m` KiB of memory).
    #[serde(default = "default_max_login_verifications")]
    pub max_login_verifications: usize,
    /// After the n-th consecutive failed login of a device or an address, its next
    /// attempt that needs a password check waits this × 2^(n-1) ...
    #[serde(default = "default_login_failure_delay_ms")]
    pub login_failure_delay_ms: u64,
    /// ... at most this long.
    #[serde(default = "default_login_failure_delay_max_ms")]
    pub login_failure_delay_max_ms: u64,
}

fn default_listen_backlog() -> u32 {
    1024
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_device() -> usize {
    8
}
fn default_max_pending_per_address() -> usize {
    128
}
fn default_max_sessions_per_device() -> usize {
    16
}
fn default_connect_timeout_ms() -> u16 {
    5000
}
fn default_packet_timeout_ms() -> u64 {
    30_000
}
fn default_write_timeout_ms() -> u64 {
    30_000
}
fn default_max_subscriptions() -> usize {
    32
}
fn default_max_filter_bytes() -> usize {
    256
}
fn default_max_filters() -> usize {
    2048
}
fn default_max_filters_per_device() -> usize {
    32
}
fn default_max_login_verifications() -> usize {
    2
}
fn default_login_failure_delay_ms() -> u64 {
    200
}
fn default_login_failure_delay_max_ms() -> u64 {
    30_000
}

impl BrokerSection {
    /// Problems as (key within `[broker]`, message).
    pub(crate) fn check(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let mut range = |key: &'static str, value: u64, min: u64, max: u64| {
            if !(min..=max).contains(&value) {
                problems.push((key, format!("must be between {min} and {max}")));
            }
        };
        range("listen_backlog", self.listen_backlog.into(), 1, 65_535);
        range("max_connections", self.max_connections as u64, 1, 10_000);
        range(
            "max_connections_per_device",
            self.max_connections_per_device as u64,
            1,
            1024,
        );
        range(
            "max_pending_per_address",
            self.max_pending_per_address as u64,
            1,
            10_000,
        );
        range(
            "max_sessions_per_device",
            self.max_sessions_per_device as u64,
            1,
            1024,
        );
        range(
            "connect_timeout_ms",
            self.connect_timeout_ms.into(),
            100,
            65_535,
        );
        range("packet_timeout_ms", self.packet_timeout_ms, 100, 3_600_000);
        range("write_timeout_ms", self.write_timeout_ms, 100, 3_600_000);
        range(
            "max_subscriptions",
            self.max_subscriptions as u64,
            1,
            10_000,
        );
        range("max_filter_bytes", self.max_filter_bytes as u64, 16, 65_535);
        range("max_filters", self.max_filters as u64, 16, 1_000_000);
        range(
            "max_filters_per_device",
            self.max_filters_per_device as u64,
            1,
            100_000,
        );
        range(
            "max_login_verifications",
            self.max_login_verifications as u64,
            1,
            64,
        );
        range(
            "login_failure_delay_ms",
            self.login_failure_delay_ms,
            1,
            60_000,
        );
        range(
            "login_failure_delay_max_ms",
            self.login_failure_delay_max_ms,
            1,
            3_600_000,
        );
        if self.login_failure_delay_max_ms < self.login_failure_delay_ms {
            problems.push((
                "login_failure_delay_max_ms",
                "must not be below login_failure_delay_ms".to_owned(),
            ));
        }
        problems
    }
}
