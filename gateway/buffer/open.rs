//! Opening the database: set-up, integrity check and migration, a corrupt file moved
//! aside for a fresh one, and the sessions a crash left open.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};

use super::report::open_read_only;
use super::schema;
use super::BufferError;
use super::BufferOptions;
use super::Write;
use crate::model::Presence;

pub(super) enum OpenFailure {
    /// The file is not a usable database (not SQLite, damaged pages, failed check).
    Corrupt(String),
    Other(BufferError),
}

/// Open, set up and migrate the database, then `PRAGMA quick_check` it. Corruption is told
/// apart from other failures (permissions, a full disk), which must never cost the data.
pub(super) fn open_checked(
    path: &Path,
    options: &BufferOptions,
) -> Result<Connection, OpenFailure> {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    let classify = |source: rusqlite::Error| match source.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => OpenFailure::Corrupt(source.to_string()),
        _ => OpenFailure::Other(BufferError::Sqlite {
            path: path.to_path_buf(),
            source,
        }),
    };
    let mut conn = Connection::open(path).map_err(classify)?;
    schema::prepare(&conn, options.synchronous, options.max_bytes).map_err(classify)?;
    let problems: Vec<String> = {
        let mut st = conn.prepare("PRAGMA quick_check").map_err(classify)?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(classify)?;
        rows.collect::<rusqlite::Result<_>>().map_err(classify)?
    };
    if problems != ["ok"] {
        let mut why = problems.into_iter().take(3).collect::<Vec<_>>().join("; ");
        why.truncate(300);
        return Err(OpenFailure::Corrupt(format!("quick_check: {why}")));
    }
    match schema::migrate(&mut conn, path) {
        Ok(()) => Ok(conn),
        Err(BufferError::Sqlite { source, .. }) => Err(classify(source)),
        Err(e) => Err(OpenFailure::Other(e)),
    }
}

pub(super) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

/// Replace a corrupt database, never deleting it: build a fresh one beside it (schema,
/// the `seq` floor and the incident, committed together), move the corrupt files aside,
/// then rename the fresh one into place. A crash at any step leaves either the corrupt
/// file (found again at the next start) or the finished replacement.
pub(super) fn replace_corrupt(
    path: &Path,
    fresh: &Path,
    options: &BufferOptions,
    why: &str,
) -> Result<(), BufferError> {
    let io_err = |source| BufferError::Dir {
        path: path.to_path_buf(),
        source,
    };
    let sql_err = |source| BufferError::Sqlite {
        path: fresh.to_path_buf(),
        source,
    };
    // `seq` must never repeat (central drops repeats as duplicates): continue above the
    // old database's last one when it can still be read, and in any case above Unix
    // milliseconds x 1000, which no earlier `seq` can have reached.
    let old_last: i64 = open_read_only(path)
        .ok()
        .and_then(|c| {
            c.query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
                [],
                |r| r.get(0),
            )
            .ok()
        })
        .unwrap_or(0);
    let start = old_last.max(crate::model::now_ms().saturating_mul(1000));
    let stamp = crate::model::format_ms(crate::model::now_ms()).replace(':', "");
    let aside = sibling(path, &format!(".corrupt-{stamp}"));
    for leftover in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(sibling(fresh, leftover));
    }
    {
        let mut conn = match open_checked(fresh, options) {
            Ok(c) => c,
            Err(OpenFailure::Other(e)) => return Err(e),
            Err(OpenFailure::Corrupt(w)) => {
                return Err(sql_err(rusqlite::Error::InvalidParameterName(w)))
            }
        };
        let tx = conn.transaction().map_err(sql_err)?;
        tx.execute(
            "INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?1)",
            params![start],
        )
        .map_err(sql_err)?;
        tx.execute(
            "INSERT INTO incidents (at_ms, kind, detail) VALUES (?1, 'database-moved-aside', ?2)",
            params![
                crate::model::now_ms(),
                format!("corrupt database moved to {} ({why})", aside.display())
            ],
        )
        .map_err(sql_err)?;
        tx.commit().map_err(sql_err)?;
        // Everything into the main file before it is renamed (a WAL keeps its old name).
        conn.query_row("PRAGMA journal_mode=DELETE", [], |_| Ok(()))
            .map_err(sql_err)?;
        conn.close().map_err(|(_, e)| sql_err(e))?;
    }
    // The WAL and shared memory first: a WAL left beside the new file would be replayed
    // into it.
    for suffix in ["-wal", "-shm", "-journal", ""] {
        let from = sibling(path, suffix);
        if from.exists() {
            std::fs::rename(&from, sibling(&aside, suffix)).map_err(io_err)?;
        }
    }
    std::fs::rename(fresh, path).map_err(io_err)?;
    tracing::error!(
        path = %path.display(),
        moved_to = %aside.display(),
        problem = %why,
        "BUFFER DATABASE CORRUPT: moved aside (kept for inspection, never deleted); started a fresh one"
    );
    tracing::warn!(
        next_seq = start + 1,
        "seq continues above every earlier one; central sees a gap"
    );
    Ok(())
}

/// Devices still marked online when the database is opened: the gateway ended without
/// closing them (SIGKILL, crash, power loss). Each is closed at the last moment the
/// gateway was known alive (its last recorded time online, message or rejection), with
/// its time online up to then.
pub(super) fn crashed_sessions(conn: &Connection) -> rusqlite::Result<Vec<Write>> {
    let alive: i64 = conn.query_row(
        "SELECT MAX(COALESCE((SELECT at_ms FROM alive WHERE id = 1), 0),
                    COALESCE((SELECT received_ms FROM messages ORDER BY seq DESC LIMIT 1), 0),
                    COALESCE((SELECT received_ms FROM rejected ORDER BY id DESC LIMIT 1), 0))",
        [],
        |r| r.get(0),
    )?;
    let mut st = conn.prepare("SELECT id, online_recorded_ms FROM devices WHERE online = 1")?;
    let open: Vec<(String, Option<i64>)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    if !open.is_empty() {
        tracing::info!(
            devices = open.len(),
            closed_at = %crate::model::format_ms(alive),
            "devices were online when the gateway ended without a stop: closed at the last moment it was known alive"
        );
    }
    Ok(open
        .into_iter()
        .map(|(device, recorded)| {
            let end = alive.max(recorded.unwrap_or(0));
            Write::Presence(Presence {
                device,
                online: false,
                at_ms: end,
                connects: 0,
                disconnects: 1,
                online_pieces: recorded.map(|r| vec![(r, end)]).unwrap_or_default(),
                online_recorded_to: None,
            })
        })
        .collect())
}
