//! Schema and migrations, versioned with `PRAGMA user_version`.

use std::path::Path;

use rusqlite::Connection;

use super::BufferError;
use crate::config::Synchronous;

/// Migrations in order; entry `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    device       TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    received_ms  INTEGER NOT NULL,
    payload      TEXT    NOT NULL,
    delivered_ms INTEGER
);
CREATE INDEX messages_undelivered ON messages(seq) WHERE delivered_ms IS NULL;
CREATE TABLE rejected (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device      TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    reason      TEXT    NOT NULL,
    detail      TEXT    NOT NULL,
    excerpt     TEXT    NOT NULL
);
CREATE TABLE devices (
    id                 TEXT PRIMARY KEY,
    profile            TEXT    NOT NULL,
    configured         INTEGER NOT NULL DEFAULT 1,
    online             INTEGER NOT NULL DEFAULT 0,
    last_seen_ms       INTEGER,
    last_connect_ms    INTEGER,
    last_disconnect_ms INTEGER,
    reported_status    TEXT,
    reported_status_ms INTEGER,
    last_reject_reason TEXT,
    last_reject_detail TEXT,
    last_reject_ms     INTEGER
);
CREATE TABLE device_counters (
    device  TEXT    NOT NULL,
    counter TEXT    NOT NULL,
    value   INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (device, counter)
) WITHOUT ROWID;
"#,
    r#"
ALTER TABLE messages ADD COLUMN profile TEXT NOT NULL DEFAULT '';
"#,
    r#"
CREATE INDEX messages_kind_undelivered ON messages(kind, seq) WHERE delivered_ms IS NULL;
CREATE INDEX messages_delivered ON messages(delivered_ms) WHERE delivered_ms IS NOT NULL;
CREATE TABLE drops (
    device   TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    count    INTEGER NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms  INTEGER NOT NULL,
    PRIMARY KEY (device, kind)
) WITHOUT ROWID;
"#,
    r#"
CREATE TABLE rollups (
    scope     TEXT    NOT NULL,
    period    TEXT    NOT NULL,
    bucket_ms INTEGER NOT NULL,
    metric    TEXT    NOT NULL,
    bucket    TEXT    NOT NULL,
    op        TEXT    NOT NULL,
    value     REAL    NOT NULL,
    samples   INTEGER NOT NULL,
    last_ms   INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    PRIMARY KEY (scope, period, bucket_ms, metric)
) WITHOUT ROWID;
CREATE INDEX rollups_version ON rollups(version);
CREATE INDEX rollups_by_period ON rollups(period, bucket_ms);
CREATE TABLE rollup_distinct (
    scope     TEXT    NOT NULL,
    period    TEXT    NOT NULL,
    bucket_ms INTEGER NOT NULL,
    metric    TEXT    NOT NULL,
    value     TEXT    NOT NULL,
    PRIMARY KEY (scope, period, bucket_ms, metric, value)
) WITHOUT ROWID;
"#,
    // v5: two indexes cost a B-tree insert per message and two updates per delivery
    // (a sixth of the gateway's CPU under load); retention and the disk cap walk `seq`
    // ranges instead, and delivery figures for `status` come from `deliveries`.
    r#"
DROP INDEX messages_kind_undelivered;
DROP INDEX messages_delivered;
CREATE TABLE deliveries (
    bucket_ms INTEGER PRIMARY KEY,
    count     INTEGER NOT NULL,
    last_ms   INTEGER NOT NULL
);
"#,
    // v6: what happened to the gateway itself (a corrupt database moved aside), for
    // `status` and the upstream health message.
    r#"
CREATE TABLE incidents (
    id     INTEGER PRIMARY KEY,
    at_ms  INTEGER NOT NULL,
    kind   TEXT    NOT NULL,
    detail TEXT    NOT NULL
);
"#,
];

/// Connection settings, in the order SQLite needs them (auto_vacuum before WAL).
pub fn prepare(conn: &Connection, sync: Synchronous, max_bytes: u64) -> rusqlite::Result<()> {
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = mode, "SQLite refused WAL mode");
    }
    let sync = match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    // The WAL counts against the disk cap: checkpoint and truncate it well below the cap.
    let wal_limit = (max_bytes / 8).clamp(256 * 1024, 64 * 1024 * 1024);
    conn.pragma_update(None, "journal_size_limit", wal_limit as i64)?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        (wal_limit / 4096).max(64) as i64,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(())
}

pub fn migrate(conn: &mut Connection, path: &Path) -> Result<(), BufferError> {
    let sql_err = |source| BufferError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_err)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(BufferError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(sql_err)?;
        tx.execute_batch(sql).map_err(sql_err)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
        tracing::info!(path = %path.display(), version = i + 1, "database schema migrated");
    }
    Ok(())
}
