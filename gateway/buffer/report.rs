//! Read-only queries for `status`, `devices`, the API and metrics, on a connection of
//! their own (never the writer's).

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::BufferError;
use crate::model::DeviceId;

/// Recent incidents (e.g. a corrupt database moved aside): (at_ms, kind, detail), newest first.
pub fn incidents(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<(i64, String, String)>> {
    let mut st =
        conn.prepare("SELECT at_ms, kind, detail FROM incidents ORDER BY id DESC LIMIT ?1")?;
    let rows = st.query_map(params![limit as i64], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    rows.collect()
}

/// A read-only view for commands (`devices`) and tests; safe while the gateway runs (WAL).
pub fn open_read_only(path: &Path) -> Result<Connection, BufferError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| BufferError::Sqlite {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|source| BufferError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(conn)
}

/// What `branch-gateway status` shows about the buffer and delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferReport {
    pub messages: i64,
    pub last_seq: i64,
    pub backlog: i64,
    pub oldest_undelivered_ms: Option<i64>,
    pub last_delivered_ms: Option<i64>,
    /// Messages acknowledged by the central broker in the last minute.
    pub delivered_last_minute: i64,
    pub rejected_kept: i64,
    /// (device, kind, count) dropped by the disk cap.
    pub drops: Vec<(String, String, i64)>,
    /// (device, count) refused for their profile's rate limit.
    pub rate_limited: Vec<(String, i64)>,
    /// (device, reason, count) refused by the broker (see [`broker_refusals`]).
    pub refused: Vec<(String, String, i64)>,
    /// (device, kind, reason, count) refused by central and quarantined.
    pub quarantined: Vec<(String, String, String, i64)>,
    /// Commands per state (every state, zeros included).
    pub commands: Vec<(super::commands::CommandState, i64)>,
    /// (device, counter, count) of the SIP2 taps (see [`sip2_counters`]).
    pub sip2: Vec<(String, String, i64)>,
    pub devices_online: i64,
    pub devices_configured: i64,
}

/// How the backlog drains, from the deliveries of the last minute.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Drain {
    /// Nothing to send.
    Empty,
    /// A backlog, but nothing delivered in the last minute: no estimate.
    Stalled,
    /// Draining at `per_s` messages a second, done in about `eta_s` seconds.
    Draining { per_s: f64, eta_s: i64 },
}

impl BufferReport {
    pub fn drain(&self) -> Drain {
        match (self.backlog, self.delivered_last_minute) {
            (0, _) => Drain::Empty,
            (_, 0) => Drain::Stalled,
            (b, d) => {
                let per_s = d as f64 / 60.0;
                Drain::Draining {
                    per_s,
                    eta_s: (b as f64 / per_s) as i64,
                }
            }
        }
    }
}

/// Device messages per hour and device profile since `since_ms` (the devices'
/// `messages` rollups): (hour bucket, profile, count), by hour then profile.
pub fn messages_by_hour_and_profile(
    conn: &Connection,
    since_ms: i64,
) -> rusqlite::Result<Vec<(i64, String, f64)>> {
    let mut st = conn.prepare_cached(
        "SELECT r.bucket_ms, d.profile, SUM(r.value) FROM rollups AS r JOIN devices AS d ON d.id = r.scope
         WHERE r.period = 'hour' AND r.metric = 'messages' AND r.bucket_ms >= ?1
         GROUP BY r.bucket_ms, d.profile ORDER BY r.bucket_ms, d.profile",
    )?;
    let rows = st.query_map([since_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// The branch's figures for one bucket (`period` `hour` or `day`): (metric, value).
pub fn bucket_figures(
    conn: &Connection,
    period: &str,
    bucket_ms: i64,
) -> rusqlite::Result<Vec<(String, f64)>> {
    let mut st = conn.prepare_cached(
        "SELECT metric, value FROM rollups WHERE scope = '' AND period = ?1 AND bucket_ms = ?2
         ORDER BY metric",
    )?;
    let rows = st.query_map(params![period, bucket_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// The newest stored telemetry payload of `device` (serial counters resume from it).
pub fn last_telemetry(conn: &Connection, device: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT payload FROM messages WHERE device = ?1 AND kind = 'telemetry'
         ORDER BY seq DESC LIMIT 1",
        params![device],
        |r| r.get(0),
    )
    .optional()
}

/// The device counters that are the broker's refusals (names from `broker::Denial`):
/// `connect_*` refuse a connection, `*_denied` a packet, the rest close a connection that
/// broke the protocol or a deadline. The empty device id holds those of no configured device.
pub(super) const BROKER_REFUSALS: &str =
    "(counter LIKE 'connect\\_%' ESCAPE '\\' OR counter LIKE '%\\_denied' ESCAPE '\\'
     OR counter IN ('packet_too_large', 'malformed_packet', 'protocol_error', 'packet_timeout',
                    'keepalive_timeout', 'write_timeout'))";

/// The broker's refusals: (device, reason, count), by reason then device.
pub fn broker_refusals(conn: &Connection) -> rusqlite::Result<Vec<(String, String, i64)>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT device, counter, value FROM device_counters WHERE {BROKER_REFUSALS} AND value > 0
         ORDER BY counter, device"
    ))?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// Messages refused because their device was over its profile's rate limit, per device
/// (totals since the database was created): (device, count), by device.
pub fn rate_limited(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT device, value FROM device_counters WHERE counter = 'rate_limited' AND value > 0
         ORDER BY device",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// The SIP2 taps' counters (`sip2_*`: connections, logins, unparsed messages, checksum
/// errors, ILS failures, derived events dropped, ...): (device, counter, count), by device
/// then counter, since the database was created.
pub fn sip2_counters(conn: &Connection) -> rusqlite::Result<Vec<(String, String, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT device, counter, value FROM device_counters
         WHERE counter LIKE 'sip2\\_%' ESCAPE '\\' AND value > 0 ORDER BY device, counter",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// A kiosk sending no SC status for this long is shown as such (kiosks send one every few
/// minutes).
pub const SC_STATUS_STALE_MS: i64 = 10 * 60 * 1000;

/// A tapped kiosk's health as `status`, `devices` and the dashboard show it.
#[derive(Debug, Clone, PartialEq)]
pub struct KioskHealth {
    /// When the kiosk last had an SC status answered (its `sip2_sc_status` counter).
    pub last_sc_status_ms: Option<i64>,
    /// (times, last time) the ILS could not be reached for a kiosk connection.
    pub ils_unreachable: Option<(i64, i64)>,
    /// The tap's other troubles: (counter without `sip2_`, count), when not zero.
    pub troubles: Vec<(String, i64)>,
}

impl KioskHealth {
    /// No SC status for [`SC_STATUS_STALE_MS`] (or never).
    pub fn stale(&self, now_ms: i64) -> bool {
        self.last_sc_status_ms
            .is_none_or(|ms| now_ms - ms > SC_STATUS_STALE_MS)
    }

    /// One line for people, e.g. `SC status 2m ago; ILS unreachable 3 times, last 1h ago`.
    pub fn describe(&self, now_ms: i64) -> String {
        use crate::model::ago;
        let mut out = match self.last_sc_status_ms {
            Some(ms) if now_ms - ms > SC_STATUS_STALE_MS => format!(
                "NO SC STATUS for {} (kiosks send one every few minutes)",
                ago(now_ms - ms).trim_end_matches(" ago")
            ),
            Some(ms) => format!("SC status {}", ago(now_ms - ms)),
            None => "no SC status yet".to_owned(),
        };
        if let Some((n, at)) = self.ils_unreachable {
            out.push_str(&format!(
                "; ILS unreachable {n} times, last {}",
                ago(now_ms - at)
            ));
        }
        if !self.troubles.is_empty() {
            let t: Vec<String> = self
                .troubles
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            out.push_str(&format!("; {}", t.join(", ")));
        }
        out
    }
}

/// The health of the tapped kiosk `device`.
pub fn kiosk_health(conn: &Connection, device: &str) -> rusqlite::Result<KioskHealth> {
    // One row per kiosk and counter: no scan of the messages, however many there are.
    let last_sc_status_ms = conn
        .query_row(
            "SELECT last_ms FROM device_counters
             WHERE device = ?1 AND counter = 'sip2_sc_status'",
            [device],
            |row| row.get(0),
        )
        .optional()?;
    let ils_unreachable = conn
        .query_row(
            "SELECT value, last_ms FROM device_counters
             WHERE device = ?1 AND counter = 'sip2_ils_unreachable'",
            [device],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let mut st = conn.prepare_cached(
        "SELECT substr(counter, 6), value FROM device_counters
         WHERE device = ?1 AND value > 0
           AND counter IN ('sip2_unparsed', 'sip2_checksum_errors', 'sip2_events_dropped')
         ORDER BY counter",
    )?;
    let troubles = st
        .query_map([device], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(KioskHealth {
        last_sc_status_ms,
        ils_unreachable,
        troubles,
    })
}

pub fn buffer_report(conn: &Connection, now_ms: i64) -> rusqlite::Result<BufferReport> {
    let one =
        |sql: &str| -> rusqlite::Result<Option<i64>> { conn.query_row(sql, [], |r| r.get(0)) };
    let (backlog, oldest): (i64, Option<i64>) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM messages WHERE delivered_ms IS NULL),
                (SELECT received_ms FROM messages WHERE delivered_ms IS NULL ORDER BY seq LIMIT 1)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut st = conn.prepare("SELECT device, kind, count FROM drops ORDER BY device, kind")?;
    let drops = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(BufferReport {
        messages: one("SELECT COUNT(*) FROM messages")?.unwrap_or(0),
        last_seq: one("SELECT seq FROM sqlite_sequence WHERE name = 'messages'")
            .ok()
            .flatten()
            .unwrap_or(0),
        backlog,
        oldest_undelivered_ms: oldest,
        last_delivered_ms: one("SELECT MAX(last_ms) FROM deliveries")?,
        delivered_last_minute: conn.query_row(
            "SELECT COALESCE(SUM(count), 0) FROM deliveries WHERE bucket_ms >= ?1",
            params![now_ms - 60_000],
            |r| r.get(0),
        )?,
        rejected_kept: one("SELECT COUNT(*) FROM rejected")?.unwrap_or(0),
        drops,
        rate_limited: rate_limited(conn)?,
        refused: broker_refusals(conn)?,
        quarantined: super::quarantine::quarantine_counts(conn)?,
        commands: super::commands::counts(conn)?,
        sip2: sip2_counters(conn)?,
        devices_online: one("SELECT COUNT(*) FROM devices WHERE online = 1 AND configured = 1")?
            .unwrap_or(0),
        devices_configured: one("SELECT COUNT(*) FROM devices WHERE configured = 1")?.unwrap_or(0),
    })
}

/// Database file plus WAL, in bytes.
pub fn size_on_disk(path: &Path) -> u64 {
    let file = |suffix: &str| {
        let mut p = path.to_path_buf().into_os_string();
        p.push(suffix);
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    };
    file("") + file("-wal")
}

/// One row of the `devices` report.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub id: DeviceId,
    pub profile: String,
    pub configured: bool,
    pub online: bool,
    pub last_seen_ms: Option<i64>,
    pub reported_status: Option<String>,
    pub accepted: i64,
    pub rejected: i64,
    pub denied: i64,
    /// Messages refused for the profile's rate limit.
    pub rate_limited: i64,
    pub last_reject_reason: Option<String>,
    pub last_reject_detail: Option<String>,
    /// Commands waiting for or at the device (queued, sent, delivered).
    pub commands_open: i64,
    /// Commands that ended `succeeded`.
    pub commands_succeeded: i64,
}

/// Every device known to the database, configured ones first, by id.
pub fn device_report(conn: &Connection) -> rusqlite::Result<Vec<DeviceRow>> {
    use super::commands::OPEN;
    let mut st = conn.prepare(&format!(
        "SELECT d.id, d.profile, d.configured, d.online, d.last_seen_ms, d.reported_status,
                COALESCE((SELECT value FROM device_counters WHERE device = d.id AND counter = 'accepted'), 0),
                COALESCE((SELECT value FROM device_counters WHERE device = d.id AND counter = 'rejected'), 0),
                COALESCE((SELECT SUM(value) FROM device_counters WHERE device = d.id
                          AND {BROKER_REFUSALS}), 0),
                d.last_reject_reason, d.last_reject_detail,
                COALESCE((SELECT value FROM device_counters WHERE device = d.id AND counter = 'rate_limited'), 0),
                (SELECT COUNT(*) FROM commands WHERE device = d.id AND {OPEN}),
                COALESCE((SELECT value FROM device_counters WHERE device = d.id
                   AND counter = 'command_succeeded'), 0)
         FROM devices d ORDER BY d.configured DESC, d.id"
    ))?;
    let rows = st.query_map([], |r| {
        Ok(DeviceRow {
            id: r.get(0)?,
            profile: r.get(1)?,
            configured: r.get(2)?,
            online: r.get(3)?,
            last_seen_ms: r.get(4)?,
            reported_status: r.get(5)?,
            accepted: r.get(6)?,
            rejected: r.get(7)?,
            denied: r.get(8)?,
            rate_limited: r.get(11)?,
            last_reject_reason: r.get(9)?,
            last_reject_detail: r.get(10)?,
            commands_open: r.get(12)?,
            commands_succeeded: r.get(13)?,
        })
    })?;
    rows.collect()
}
