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
    // v7: one row per bucket with all its metrics (JSON), instead of one per metric: a
    // batch from 200 devices with five metrics each cost 2,000 upserts, now 400. The view
    // `rollups` keeps the one-row-per-metric shape for readers.
    r#"
CREATE TABLE rollup_buckets (
    scope     TEXT    NOT NULL,
    period    TEXT    NOT NULL,
    bucket_ms INTEGER NOT NULL,
    bucket    TEXT    NOT NULL,
    metrics   TEXT    NOT NULL,
    version   INTEGER NOT NULL,
    PRIMARY KEY (scope, period, bucket_ms)
) WITHOUT ROWID;
INSERT INTO rollup_buckets (scope, period, bucket_ms, bucket, metrics, version)
    SELECT scope, period, bucket_ms, MAX(bucket),
           json_group_object(metric, json_array(op, value, samples, last_ms)), MAX(version)
    FROM rollups
    -- an infinite min or max (no numeric sample) has no JSON form and no meaning
    WHERE value BETWEEN -1.7976931348623157e308 AND 1.7976931348623157e308
    GROUP BY scope, period, bucket_ms;
DROP TABLE rollups;
CREATE INDEX rollup_buckets_version ON rollup_buckets(version);
CREATE INDEX rollup_buckets_by_period ON rollup_buckets(period, bucket_ms);
CREATE VIEW rollups (scope, period, bucket_ms, metric, bucket, op, value, samples, last_ms, version) AS
    SELECT b.scope, b.period, b.bucket_ms, m.key, b.bucket,
           m.value ->> 0, m.value ->> 1, m.value ->> 2, m.value ->> 3, b.version
    FROM rollup_buckets AS b, json_each(b.metrics) AS m;
"#,
    // v8: a `distinct` rollup keeps each value's 64-bit key (`model::distinct_key`), not
    // its text: the writer compares and stores 8 bytes instead of a string per value, and
    // no patron's (hashed) id stays in the summary tables. Keys of the stored values are
    // the ones new messages bring, so counts of open buckets go on exactly. Ordered by
    // bucket first: keys of buckets no message can reach any more go in a range delete.
    r#"
CREATE TABLE rollup_distinct_keys (
    scope     TEXT    NOT NULL,
    period    TEXT    NOT NULL,
    bucket_ms INTEGER NOT NULL,
    metric    TEXT    NOT NULL,
    key       INTEGER NOT NULL,
    PRIMARY KEY (bucket_ms, scope, period, metric, key)
) WITHOUT ROWID;
INSERT OR IGNORE INTO rollup_distinct_keys (scope, period, bucket_ms, metric, key)
    SELECT scope, period, bucket_ms, metric, bgw_distinct_key(value) FROM rollup_distinct;
DROP TABLE rollup_distinct;
"#,
    // v9: bucket rows in the order they are created (a rowid table) instead of by device.
    // A batch rewrites the current hour and day of every busy device: kept by device,
    // each device's history lay between them, so a batch dirtied two pages per device (30
    // days of history: +24% bytes written per message); in creation order they share a
    // few pages. Reads by device go through `rollup_buckets_key`, whose entries never
    // change, and the writer updates a bucket by its `id`.
    r#"
CREATE TABLE rollup_buckets_v9 (
    id        INTEGER PRIMARY KEY,
    scope     TEXT    NOT NULL,
    period    TEXT    NOT NULL,
    bucket_ms INTEGER NOT NULL,
    bucket    TEXT    NOT NULL,
    metrics   TEXT    NOT NULL,
    version   INTEGER NOT NULL
);
INSERT INTO rollup_buckets_v9 (scope, period, bucket_ms, bucket, metrics, version)
    SELECT scope, period, bucket_ms, bucket, metrics, version FROM rollup_buckets
    ORDER BY bucket_ms, period, scope;
DROP VIEW rollups;
DROP TABLE rollup_buckets;
ALTER TABLE rollup_buckets_v9 RENAME TO rollup_buckets;
CREATE UNIQUE INDEX rollup_buckets_key ON rollup_buckets(scope, period, bucket_ms);
CREATE INDEX rollup_buckets_version ON rollup_buckets(version);
CREATE INDEX rollup_buckets_by_period ON rollup_buckets(period, bucket_ms);
CREATE VIEW rollups (scope, period, bucket_ms, metric, bucket, op, value, samples, last_ms, version) AS
    SELECT b.scope, b.period, b.bucket_ms, m.key, b.bucket,
           m.value ->> 0, m.value ->> 1, m.value ->> 2, m.value ->> 3, b.version
    FROM rollup_buckets AS b, json_each(b.metrics) AS m;
"#,
    // v10: time online recorded while a device stays connected. `online_recorded_ms`:
    // up to when an online device's time is in `online_minutes`; `alive`: the last
    // moment time online was recorded. After a crash (devices still marked online), the
    // next start adds each one's time up to the last moment the gateway was known alive.
    r#"
ALTER TABLE devices ADD COLUMN online_recorded_ms INTEGER;
CREATE TABLE alive (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    at_ms INTEGER NOT NULL
);
"#,
    // v11: rows central refused, moved out of `messages` with the reason (so the outbox
    // never reads them again) until branch IT retries (back into `messages`, same `seq`)
    // or drops them. Never pruned by retention.
    r#"
CREATE TABLE quarantine (
    seq         INTEGER PRIMARY KEY,
    device      TEXT    NOT NULL,
    profile     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    payload     TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    at_ms       INTEGER NOT NULL
);
"#,
    // v12: commands from central to devices, one row per `command_id` with its current
    // state (every change also goes to `messages` as a `command` row for central), and the
    // branch notice republished for screens.
    r#"
CREATE TABLE commands (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id       TEXT    NOT NULL UNIQUE,
    device           TEXT    NOT NULL,
    profile          TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    args             TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    detail           TEXT    NOT NULL DEFAULT '',
    created_ms       INTEGER NOT NULL,
    updated_ms       INTEGER NOT NULL,
    expires_ms       INTEGER NOT NULL,
    reply_timeout_ms INTEGER
);
CREATE INDEX commands_by_device_state ON commands (device, state);
CREATE INDEX commands_by_state ON commands (state, id);
CREATE TABLE notice (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    payload    TEXT    NOT NULL,
    expires_ms INTEGER NOT NULL
);
"#,
    // v13: a tapped kiosk's last SC status is its `sip2_sc_status` counter; seeded once
    // from the SC status telemetry already stored.
    r#"
INSERT OR IGNORE INTO device_counters (device, counter, value, last_ms)
SELECT device, 'sip2_sc_status', COUNT(*), MAX(received_ms) FROM messages
 WHERE kind = 'telemetry' AND payload LIKE '%"acs_online"%'
 GROUP BY device;
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
    if version < known {
        register_distinct_key(conn).map_err(sql_err)?;
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

/// `bgw_distinct_key(value)`: [`crate::model::distinct_key`] of a value's text, for v8.
fn register_distinct_key(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    use rusqlite::types::ValueRef;
    conn.create_scalar_function(
        "bgw_distinct_key",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let text = match ctx.get_raw(0) {
                ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
                ValueRef::Integer(i) => i.to_string(),
                ValueRef::Real(r) => r.to_string(),
                ValueRef::Null => String::new(),
            };
            Ok(crate::model::distinct_key(&text) as i64)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database written before v7 (one row per metric) keeps every value: the view
    /// shows the same rows, and the bucket rows decode for the writer. An infinite min
    /// (no sample) is left out.
    #[test]
    fn per_metric_rollups_become_bucket_rows() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..6] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 6).unwrap();
        let old = [
            ("", "hour", 0, "loans", "09:00", "sum", 3.0, 3, 0, 7),
            ("", "hour", 0, "messages", "09:00", "count", 4.0, 4, 0, 8),
            (
                "k1",
                "day",
                0,
                "patrons",
                "2026-11-20",
                "distinct",
                2.0,
                5,
                0,
                3,
            ),
            (
                "k1",
                "day",
                0,
                "temp",
                "2026-11-20",
                "last",
                21.5,
                2,
                1_700,
                4,
            ),
        ];
        conn.execute(
            "INSERT INTO rollups (scope, period, bucket_ms, metric, bucket, op, value, samples, last_ms, version)
             VALUES ('k1', 'day', 0, 'lowest', '2026-11-20', 'min', ?1, 0, 0, 1)",
            [f64::INFINITY],
        )
        .unwrap();
        for r in &old {
            conn.execute(
                "INSERT INTO rollups (scope, period, bucket_ms, metric, bucket, op, value, samples, last_ms, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                rusqlite::params![r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7, r.8, r.9],
            )
            .unwrap();
        }
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let mut st = conn
            .prepare(
                "SELECT scope, period, bucket_ms, metric, bucket, op, value, samples, last_ms, version
                 FROM rollups ORDER BY scope, period, metric",
            )
            .unwrap();
        type Row = (
            String,
            String,
            i64,
            String,
            String,
            String,
            f64,
            i64,
            i64,
            i64,
        );
        let rows: Vec<Row> = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let version_of_bucket = |scope: &str| if scope.is_empty() { 8 } else { 4 };
        let want: Vec<Row> = old
            .iter()
            .map(|r| {
                (
                    r.0.into(),
                    r.1.into(),
                    r.2,
                    r.3.into(),
                    r.4.into(),
                    r.5.into(),
                    r.6,
                    r.7,
                    r.8,
                    version_of_bucket(r.0),
                )
            })
            .collect();
        assert_eq!(rows, want);
        let text: String = conn
            .query_row(
                "SELECT metrics FROM rollup_buckets WHERE scope = 'k1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let (metrics, skipped) = crate::summary::decode_metrics(&text);
        assert_eq!(skipped, 0);
        assert_eq!(
            metrics["temp"],
            crate::summary::StoredMetric(crate::model::RollupOp::Last, 21.5, 2, 1_700)
        );
        assert_eq!(metrics.len(), 2);
    }

    /// v8 turns stored distinct values into their keys: the same keys new messages bring,
    /// so a bucket open across the upgrade goes on counting each value once.
    #[test]
    fn distinct_values_become_keys() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..7] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 7).unwrap();
        for value in ["p1", "p2", "7"] {
            conn.execute(
                "INSERT INTO rollup_distinct (scope, period, bucket_ms, metric, value)
                 VALUES ('k1', 'hour', 0, 'patrons', ?1)",
                [value],
            )
            .unwrap();
        }
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let mut st = conn
            .prepare("SELECT key FROM rollup_distinct_keys WHERE scope = 'k1' ORDER BY key")
            .unwrap();
        let keys: Vec<i64> = st
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut want: Vec<i64> = ["p1", "p2", "7"]
            .iter()
            .map(|v| crate::model::distinct_key(v) as i64)
            .collect();
        want.sort();
        assert_eq!(keys, want);
        let old: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'rollup_distinct'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0, "the text table is gone");
    }

    /// v13 seeds each tapped kiosk's `sip2_sc_status` from its stored SC status telemetry.
    #[test]
    fn the_last_sc_status_is_seeded_from_stored_telemetry() {
        let mut conn = Connection::open_in_memory().unwrap();
        register_distinct_key(&conn).unwrap();
        for sql in &MIGRATIONS[..12] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 12).unwrap();
        for (device, ms, payload) in [
            ("kiosk-1", 1_000, r#"{"acs_online":true,"sip_link":"up"}"#),
            ("kiosk-1", 5_000, r#"{"acs_online":false,"sip_link":"up"}"#),
            ("kiosk-1", 9_000, r#"{"uptime_s":3}"#),
            ("gate-1", 7_000, r#"{"delta_in":1}"#),
        ] {
            conn.execute(
                "INSERT INTO messages (device, kind, received_ms, payload) VALUES (?1, 'telemetry', ?2, ?3)",
                rusqlite::params![device, ms, payload],
            )
            .unwrap();
        }
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let rows: Vec<(String, i64, i64)> = conn
            .prepare("SELECT device, value, last_ms FROM device_counters WHERE counter = 'sip2_sc_status'")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [("kiosk-1".to_owned(), 2, 5_000)]);
    }

    /// v9 keeps every bucket row, now numbered in time order (what a batch rewrites shares
    /// pages), and a bucket stays unique by (scope, period, start).
    #[test]
    fn bucket_rows_are_renumbered_in_time_order() {
        let mut conn = Connection::open_in_memory().unwrap();
        register_distinct_key(&conn).unwrap();
        for sql in &MIGRATIONS[..8] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 8).unwrap();
        for (scope, period, ms) in [
            ("b", "hour", 7200),
            ("a", "day", 0),
            ("a", "hour", 0),
            ("", "hour", 3600),
        ] {
            conn.execute(
                "INSERT INTO rollup_buckets (scope, period, bucket_ms, bucket, metrics, version)
                 VALUES (?1, ?2, ?3, 'x', '{\"messages\":[\"count\",1.0,1,0]}', 1)",
                rusqlite::params![scope, period, ms],
            )
            .unwrap();
        }
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        let mut st = conn
            .prepare("SELECT scope, period, bucket_ms FROM rollup_buckets ORDER BY id")
            .unwrap();
        let rows: Vec<(String, String, i64)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let want = [
            ("a", "day", 0),
            ("a", "hour", 0),
            ("", "hour", 3600),
            ("b", "hour", 7200),
        ];
        let want: Vec<(String, String, i64)> = want
            .iter()
            .map(|(s, p, ms)| (s.to_string(), p.to_string(), *ms))
            .collect();
        assert_eq!(rows, want);
        let again = conn.execute(
            "INSERT INTO rollup_buckets (scope, period, bucket_ms, bucket, metrics, version)
             VALUES ('a', 'hour', 0, 'x', '{}', 2)",
            [],
        );
        assert!(again.is_err(), "a bucket is unique");
        let values: i64 = conn
            .query_row("SELECT COUNT(*) FROM rollups", [], |r| r.get(0))
            .unwrap();
        assert_eq!(values, 4, "the view reads the new table");
    }
}
