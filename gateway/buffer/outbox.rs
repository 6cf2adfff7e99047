//! The forwarder's read side of the buffer.

use std::path::Path;

use rusqlite::{params, Connection};

use super::report::broker_refusals;
use super::report::incidents;
use super::report::open_read_only;
use super::report::rate_limited;
use super::report::sip2_counters;
use super::BufferError;
use crate::model::{Kind, StoredRef};

/// The forwarder's read side: undelivered messages in `seq` order, on its own connection
/// (WAL lets it read while the writer commits). Blocking: use from `spawn_blocking`.
pub struct Outbox {
    pub(super) conn: Connection,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, BufferError> {
        Ok(Outbox {
            conn: open_read_only(path)?,
        })
    }

    /// Up to `limit` undelivered messages with `after < seq <= upto`, oldest first, each
    /// turned into `T` by `f` while borrowed from the row.
    pub fn next_between<T>(
        &mut self,
        after: i64,
        upto: i64,
        limit: usize,
        mut f: impl FnMut(StoredRef<'_>) -> T,
    ) -> rusqlite::Result<Vec<T>> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, device, profile, kind, received_ms, payload FROM messages
             WHERE delivered_ms IS NULL AND seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2",
        )?;
        let mut rows = st.query(params![after, limit as i64, upto])?;
        let mut out = Vec::with_capacity(limit.min(4096));
        fn text<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> rusqlite::Result<&'r str> {
            Ok(r.get_ref(i)?.as_str()?)
        }
        // Borrowed columns are only valid until the next `next()`, so `f` runs here.
        while let Some(r) = rows.next()? {
            let row = StoredRef {
                seq: r.get(0)?,
                device: text(r, 1)?,
                profile: text(r, 2)?,
                kind: Kind::parse_stored(text(r, 3)?).unwrap_or(Kind::Events),
                received_ms: r.get(4)?,
                payload: text(r, 5)?,
            };
            out.push(f(row));
        }
        Ok(out)
    }

    /// Recent incidents, newest first (see [`incidents`]).
    pub fn incidents(&mut self) -> rusqlite::Result<Vec<(i64, String, String)>> {
        incidents(&self.conn, 10)
    }

    /// Messages dropped by the disk cap, per device and kind: (device, kind, count).
    pub fn drops(&mut self) -> rusqlite::Result<Vec<(String, String, i64)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT device, kind, count FROM drops ORDER BY device, kind")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect()
    }

    /// Messages refused for a profile's rate limit, per device (see [`rate_limited`]).
    pub fn rate_limited(&mut self) -> rusqlite::Result<Vec<(String, i64)>> {
        rate_limited(&self.conn)
    }

    /// The SIP2 taps' counters (see [`sip2_counters`]).
    pub fn sip2_counters(&mut self) -> rusqlite::Result<Vec<(String, String, i64)>> {
        sip2_counters(&self.conn)
    }

    /// The broker's refusals (see [`broker_refusals`]).
    pub fn broker_refusals(&mut self) -> rusqlite::Result<Vec<(String, String, i64)>> {
        broker_refusals(&self.conn)
    }

    /// Undelivered messages, the receive time of the oldest and its `seq`.
    pub fn backlog(&mut self) -> rusqlite::Result<Backlog> {
        self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM messages WHERE delivered_ms IS NULL),
                    (SELECT received_ms FROM messages WHERE delivered_ms IS NULL ORDER BY seq LIMIT 1),
                    (SELECT seq FROM messages WHERE delivered_ms IS NULL ORDER BY seq LIMIT 1)",
            [],
            |r| {
                Ok(Backlog {
                    rows: r.get(0)?,
                    oldest_received_ms: r.get(1)?,
                    oldest_seq: r.get(2)?,
                })
            },
        )
    }

    /// Quarantined rows per (device, kind, reason).
    pub fn quarantined(&mut self) -> rusqlite::Result<Vec<(String, String, String, i64)>> {
        super::quarantine::quarantine_counts(&self.conn)
    }

    /// Commands per state (all states).
    pub fn commands(&mut self) -> rusqlite::Result<Vec<(super::commands::CommandState, i64)>> {
        super::commands::counts(&self.conn)
    }
}

/// What is waiting to be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub rows: i64,
    pub oldest_received_ms: Option<i64>,
    pub oldest_seq: Option<i64>,
}
