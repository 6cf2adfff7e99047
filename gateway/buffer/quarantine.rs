//! The quarantine: rows central refused (see `upstream/delivery.rs` for when), kept with
//! the reason until branch IT retries or drops them (`branch-gateway quarantine ...`).
//!
//! The writer moves a row here ([`super::Write::Quarantined`]); retry and drop are run by
//! the command line on a connection of its own, in one short transaction (the writer
//! waits for it through SQLite's busy timeout), whether the gateway runs or not. A retried
//! row goes back into `messages` with its `seq`: the forwarder finds rows behind its
//! cursor at its next backlog check (within 10 s) and sends them again.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use super::BufferError;

/// One quarantined row, without its payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuarantinedRow {
    pub seq: i64,
    pub device: String,
    pub kind: String,
    pub received_ms: i64,
    pub reason: String,
    pub at_ms: i64,
    pub bytes: i64,
}

/// Quarantined rows per (device, kind, reason).
pub fn quarantine_counts(
    conn: &Connection,
) -> rusqlite::Result<Vec<(String, String, String, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT device, kind, reason, COUNT(*) FROM quarantine
         GROUP BY device, kind, reason ORDER BY device, kind, reason",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    rows.collect()
}

/// The oldest `limit` quarantined rows after `after` (by `seq`).
pub fn quarantine_list(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<QuarantinedRow>> {
    let mut st = conn.prepare_cached(
        "SELECT seq, device, kind, received_ms, reason, at_ms, length(payload) FROM quarantine
         WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = st.query_map(params![after, limit as i64], |r| {
        Ok(QuarantinedRow {
            seq: r.get(0)?,
            device: r.get(1)?,
            kind: r.get(2)?,
            received_ms: r.get(3)?,
            reason: r.get(4)?,
            at_ms: r.get(5)?,
            bytes: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// Which quarantined rows a retry or drop takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    All,
    Seqs(Vec<i64>),
}

/// Open the database for a retry or drop (read-write, never created).
pub fn open_for_quarantine(path: &Path) -> Result<Connection, BufferError> {
    let err = |source| BufferError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
    Ok(conn)
}

fn selected(tx: &rusqlite::Transaction<'_>, which: &Select) -> rusqlite::Result<Vec<i64>> {
    match which {
        Select::All => {
            let mut st = tx.prepare("SELECT seq FROM quarantine ORDER BY seq")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect()
        }
        Select::Seqs(seqs) => {
            let mut st = tx.prepare_cached("SELECT seq FROM quarantine WHERE seq = ?1")?;
            let mut out = Vec::new();
            for s in seqs {
                if let Some(seq) = rusqlite::OptionalExtension::optional(
                    st.query_row(params![s], |r| r.get::<_, i64>(0)),
                )? {
                    out.push(seq);
                }
            }
            Ok(out)
        }
    }
}

/// Put rows back into the outbox with their `seq`; returns the `seq`s moved.
pub fn retry(conn: &mut Connection, which: &Select, now_ms: i64) -> rusqlite::Result<Vec<i64>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let seqs = selected(&tx, which)?;
    for seq in &seqs {
        tx.execute(
            "INSERT INTO messages (seq, device, profile, kind, received_ms, payload)
             SELECT seq, device, profile, kind, received_ms, payload FROM quarantine WHERE seq = ?1",
            params![seq],
        )?;
        tx.execute("DELETE FROM quarantine WHERE seq = ?1", params![seq])?;
    }
    if !seqs.is_empty() {
        tx.execute(
            "INSERT INTO incidents (at_ms, kind, detail) VALUES (?1, 'quarantine-retry', ?2)",
            params![
                now_ms,
                format!("{} quarantined rows put back for forwarding", seqs.len())
            ],
        )?;
    }
    tx.commit()?;
    Ok(seqs)
}

/// Delete quarantined rows for good (counted per device as `quarantine_dropped`); returns
/// the `seq`s deleted.
pub fn drop_rows(conn: &mut Connection, which: &Select, now_ms: i64) -> rusqlite::Result<Vec<i64>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let seqs = selected(&tx, which)?;
    for seq in &seqs {
        tx.execute(
            "INSERT INTO device_counters (device, counter, value, last_ms)
             SELECT device, 'quarantine_dropped', 1, ?2 FROM quarantine WHERE seq = ?1
             ON CONFLICT(device, counter) DO UPDATE SET
                 value = value + 1, last_ms = MAX(last_ms, excluded.last_ms)",
            params![seq, now_ms],
        )?;
        tx.execute("DELETE FROM quarantine WHERE seq = ?1", params![seq])?;
    }
    if !seqs.is_empty() {
        tx.execute(
            "INSERT INTO incidents (at_ms, kind, detail) VALUES (?1, 'quarantine-drop', ?2)",
            params![
                now_ms,
                format!("{} quarantined rows dropped by hand", seqs.len())
            ],
        )?;
    }
    tx.commit()?;
    Ok(seqs)
}
