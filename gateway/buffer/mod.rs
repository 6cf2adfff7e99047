//! The durable buffer: one SQLite database in WAL mode, written by one dedicated thread.
//!
//! # Design note
//! - **One writer.** Everything that changes the database goes through [`Write`] commands
//!   on a bounded channel to the writer thread, which owns the only read-write connection.
//!   rusqlite never runs on the async runtime.
//! - **Group commit.** The writer takes the first waiting command, then everything else
//!   already queued (up to [`MAX_BATCH`]), and applies them in one transaction. It never
//!   waits for a batch to fill: a message waits at most for the transaction in progress
//!   plus its own, so a lone message is committed within one fsync.
//! - **What is durable when.** With `synchronous = full` (the default) a message is on
//!   disk when its transaction commits; with `normal` it survives a crash of the process
//!   but the last commits can roll back on power loss. Before the commit it exists only in
//!   memory (the channel, the current batch), and the device has not been acknowledged:
//!   each message carries its connection's [`Receipt`], settled after the commit
//!   ([`crate::receipt`]), and only then is its PUBACK or PUBREC written.
//! - **When full.** The channel holds `storage.queue_capacity` commands. When it is full,
//!   the device connection whose message does not fit waits (intake blocks in
//!   `block_in_place`, on the broker's runtime, whose waiting threads are bounded), so the
//!   device's acknowledgements stop until the writer catches up. Nothing is dropped.
//! - **Sequence numbers.** `messages.seq` is `INTEGER PRIMARY KEY AUTOINCREMENT`: strictly
//!   increasing and never reused, even after rows are pruned or the gateway restarts.
//! - **Bounded tables.** `rejected` keeps the newest `storage.rejected_keep` rows (pruned
//!   in the same transaction that adds rows).
//! - **Disk cap.** Database plus WAL stay under `storage.max_bytes`: past 75% of it the
//!   writer makes room down to 60%, first from delivered messages (oldest first), then from
//!   undelivered ones **from the device holding the most bytes first**, down to the
//!   others' level (oldest first, telemetry before events before status within a device;
//!   the gateway's summaries never). One flooding device thus loses its own oldest
//!   messages, not everyone's backlog. Each drop is counted per device and kind in the
//!   transaction that deletes it and logged once per burst. The rule, why bytes, and how
//!   the per-device figures are kept without a scan per deleted chunk: `buffer/cap.rs`.
//! - **Delivery.** After each commit the writer hands the rows it just added to the
//!   forwarder ([`LiveRows`], a channel of [`LIVE_BATCHES`]), so live traffic is not read
//!   back from SQLite. **When full** the batch is not sent and the forwarder is woken to
//!   read those rows from the database instead. Backlog is always read on the forwarder's
//!   own connection ([`Outbox`]). Acknowledged `seq`s come back as [`Write::Delivered`],
//!   committed without waiting for fsync: a delivery mark lost to a power cut only means
//!   the message is sent again (the central side drops duplicates by `seq`).

mod cap;
pub mod schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::mpsc;

use crate::config::Synchronous;
use crate::model::{Accepted, DeviceId, Kind, Presence, Rejected, Stored, StoredRef};
use crate::receipt::Receipt;

/// Most commands applied in one transaction.
pub const MAX_BATCH: usize = 2048;

/// Committed batches waiting for the forwarder (each at most [`MAX_BATCH`] rows).
pub const LIVE_BATCHES: usize = 4;
/// How long a stopping gateway keeps retrying failed commits (systemd's default stop
/// timeout is 90 s).
const STOP_RETRY_FOR: Duration = Duration::from_secs(20);

/// Rows just committed, in `seq` order. `after` is the newest `seq` committed before them:
/// a forwarder whose cursor is behind `after` missed a batch and reads the database.
#[derive(Debug)]
pub struct LiveRows {
    pub after: i64,
    pub rows: Vec<Stored>,
}

/// A change for the writer thread.
#[derive(Debug)]
pub enum Write {
    /// With the receipt of the device connection that waits for its commit to acknowledge it.
    Accepted(Accepted, Option<Receipt>),
    Rejected(Rejected, Option<Receipt>),
    Presence(Presence),
    /// The broker or intake refused something of this device `count` times (`what` is a
    /// stable counter name, e.g. `publish_denied`, `rate_limited`; the empty device id
    /// counts what concerns no configured device).
    Denied {
        device: DeviceId,
        what: &'static str,
        count: u64,
        at_ms: i64,
        receipt: Option<Receipt>,
    },
    /// The central broker acknowledged these messages (by `seq`).
    Delivered {
        seqs: Vec<i64>,
        at_ms: i64,
    },
    /// Prune delivered messages past retention and enforce the disk cap (sent periodically).
    Maintain,
    /// The configured devices after a reload: (id, profile).
    Configured(Vec<(DeviceId, String)>),
    /// Liveness probe for the service watchdog: it only makes the writer go round its loop
    /// (and so refresh [`BufferStats::heartbeat_ms`]).
    Probe,
}

impl Write {
    /// The receipt a device connection waits on, taken out once its commit is done.
    fn take_receipt(&mut self) -> Option<Receipt> {
        match self {
            Write::Accepted(_, r) | Write::Rejected(_, r) | Write::Denied { receipt: r, .. } => {
                r.take()
            }
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("data directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database {path}: schema version {found} is newer than this gateway knows ({known})")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("the writer thread is gone")]
    WriterGone,
}

#[derive(Debug, Clone)]
pub struct BufferOptions {
    pub synchronous: Synchronous,
    pub rejected_keep: u64,
    pub queue_capacity: usize,
    /// Cap on database plus WAL, in bytes; see [`Writer::enforce_cap`].
    pub max_bytes: u64,
    /// Delivered messages older than this are pruned.
    pub keep_delivered: Duration,
    /// Where committed rows go for forwarding (none without an upstream).
    pub live: Option<mpsc::Sender<LiveRows>>,
    /// The branch's time zone: rollups cut local hours and days.
    pub rollup_tz: jiff::tz::TimeZone,
    /// `false`: no rollups at all (not even the built-in per-device figures).
    pub rollups: bool,
}

/// Counters the writer updates; read by status logs and (later) metrics.
#[derive(Debug, Default)]
pub struct BufferStats {
    pub messages_committed: AtomicU64,
    pub rejected_committed: AtomicU64,
    pub transactions: AtomicU64,
    pub commit_errors: AtomicU64,
    /// Microseconds the last transaction took (begin to commit).
    pub last_commit_us: AtomicU64,
    pub last_seq: AtomicU64,
    pub delivered_committed: AtomicU64,
    /// Undelivered messages dropped by the disk cap.
    pub dropped: AtomicU64,
    /// Woken after a commit whose rows could not be handed over as [`LiveRows`].
    pub committed: tokio::sync::Notify,
    /// The last commit attempt failed (disk full, I/O error): health reports it.
    pub last_commit_failed: std::sync::atomic::AtomicBool,
    /// Where intake waits while the writer queue is full.
    pub room: Room,
    /// When the writer last took a batch or finished a commit attempt (failed ones too: a
    /// writer retrying on a full disk is alive, one blocked for good is not).
    pub heartbeat_ms: AtomicI64,
    /// Set when the gateway starts to stop: failing commits are retried only so long.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Accepted messages given up because commits still failed while the gateway stopped.
    pub lost_at_stop: AtomicU64,
}

/// Intake waits here while the writer queue is full, until half of it is free again.
/// The writer wakes waiters once per batch it takes, not once per message: a tokio
/// `blocking_send` waiter is woken (a thread switch) for every message received, which
/// cost the writer thread ~40% of its time under a full queue.
#[derive(Debug, Default)]
pub struct Room {
    waiting: std::sync::atomic::AtomicUsize,
    lock: std::sync::Mutex<()>,
    freed: std::sync::Condvar,
}

impl Room {
    /// Block the calling thread until `queue` is at least half empty (or closed), or
    /// `give_up` says to stop waiting. A missed wake-up costs at most one 20 ms re-check.
    pub fn wait_for_room<T>(&self, queue: &mpsc::Sender<T>, give_up: impl Fn() -> bool) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while !queue.is_closed() && queue.capacity() < queue.max_capacity() / 2 && !give_up() {
            guard = self
                .freed
                .wait_timeout(guard, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(guard);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Called by the writer after it took a batch off the queue.
    fn taken(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.freed.notify_all();
        }
    }
}

/// The running writer. Dropping every [`mpsc::Sender`] and calling [`Buffer::close`]
/// commits what is queued and stops the thread.
pub struct Buffer {
    tx: mpsc::Sender<Write>,
    thread: std::thread::JoinHandle<()>,
    stats: Arc<BufferStats>,
}

impl Buffer {
    /// Open (or create) the database, migrate it, mark every device offline (nobody is
    /// connected to a broker that just started) and start the writer thread.
    pub fn open(
        path: &Path,
        options: BufferOptions,
        configured: &[(DeviceId, String)],
    ) -> Result<Buffer, BufferError> {
        let sql_err = |source| BufferError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| BufferError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        // A replacement built for a corrupt database but not yet renamed into place.
        let fresh = sibling(path, ".new");
        if !path.exists() && fresh.exists() {
            std::fs::rename(&fresh, path).map_err(|source| BufferError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let mut conn = match open_checked(path, &options) {
            Ok(conn) => conn,
            Err(OpenFailure::Corrupt(why)) => {
                replace_corrupt(path, &fresh, &options, &why)?;
                open_checked(path, &options).map_err(|e| match e {
                    OpenFailure::Corrupt(why) => BufferError::Sqlite {
                        path: path.to_path_buf(),
                        source: rusqlite::Error::InvalidParameterName(why),
                    },
                    OpenFailure::Other(e) => e,
                })?
            }
            Err(OpenFailure::Other(e)) => return Err(e),
        };
        let last_seq: i64 = conn
            .query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
        let recovered = crashed_sessions(&conn).map_err(sql_err)?;
        {
            let tx = conn.transaction().map_err(sql_err)?;
            tx.execute("UPDATE devices SET online = 0, configured = 0", [])
                .map_err(sql_err)?;
            {
                let mut st = tx
                    .prepare(
                        "INSERT INTO devices (id, profile, online, configured) VALUES (?1, ?2, 0, 1)
                         ON CONFLICT(id) DO UPDATE SET profile = excluded.profile, configured = 1",
                    )
                    .map_err(sql_err)?;
                for (id, profile) in configured {
                    st.execute(params![id, profile]).map_err(sql_err)?;
                }
            }
            tx.commit().map_err(sql_err)?;
        }
        let stats = Arc::new(BufferStats::default());
        stats.last_seq.store(last_seq as u64, Ordering::Relaxed);
        stats
            .heartbeat_ms
            .store(crate::model::now_ms(), Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(options.queue_capacity);
        let writer = Writer {
            conn,
            path: path.to_path_buf(),
            stats: stats.clone(),
            rejected_keep: options.rejected_keep,
            max_bytes: options.max_bytes,
            keep_delivered_ms: options.keep_delivered.as_millis() as i64,
            maintain_due: false,
            checkpoint_lock: Arc::default(),
            given_up_at_stop: false,
            prune_cursor: 0,
            wedge_file: std::env::var_os("BRANCH_GATEWAY_TEST_WEDGE_FILE").map(PathBuf::from),
            synchronous: options.synchronous,
            relaxed_sync: false,
            live: options.live,
            rollup_tz: options.rollup_tz,
            rollups_enabled: options.rollups,
            rollup_version: 0,
            tally: None,
            cap_log: cap::CapLog::default(),
            known_distinct: KnownDistinct::default(),
            bucket_cache: BucketCache::default(),
            recovered,
            last_handed: last_seq,
            seqs: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| BufferError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Buffer { tx, thread, stats })
    }

    pub fn sender(&self) -> mpsc::Sender<Write> {
        self.tx.clone()
    }

    pub fn stats(&self) -> Arc<BufferStats> {
        self.stats.clone()
    }

    /// Commit everything queued and stop the writer. Blocks: call from a blocking context.
    /// Other clones of the sender must be dropped first, or this waits for them.
    pub fn close(self) -> Result<(), BufferError> {
        drop(self.tx);
        self.thread.join().map_err(|_| BufferError::WriterGone)
    }
}

enum OpenFailure {
    /// The file is not a usable database (not SQLite, damaged pages, failed check).
    Corrupt(String),
    Other(BufferError),
}

/// Open, set up and migrate the database, then `PRAGMA quick_check` it. Corruption is told
/// apart from other failures (permissions, a full disk), which must never cost the data.
fn open_checked(path: &Path, options: &BufferOptions) -> Result<Connection, OpenFailure> {
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

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

/// Replace a corrupt database, never deleting it: build a fresh one beside it (schema,
/// the `seq` floor and the incident, committed together), move the corrupt files aside,
/// then rename the fresh one into place. A crash at any step leaves either the corrupt
/// file (found again at the next start) or the finished replacement.
fn replace_corrupt(
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

/// Delete the messages delivered before `cutoff`, walking `seq` order from `cursor`, at
/// most `scan` rows per call. A message is received before it is delivered and `seq`
/// follows reception, so the walk ends at the first row received after the cutoff; the
/// next walk then starts again from the oldest row (rows undelivered when an earlier walk
/// passed them may have been delivered since).
fn prune_delivered(
    conn: &Connection,
    tally: &mut Option<cap::Tally>,
    cursor: &mut i64,
    cutoff: i64,
    scan: i64,
) -> rusqlite::Result<usize> {
    let from = *cursor;
    let first: Option<i64> = conn
        .query_row(
            "SELECT received_ms FROM messages WHERE seq > ?1 ORDER BY seq LIMIT 1",
            params![from],
            |r| r.get(0),
        )
        .optional()?;
    if first.is_none_or(|received| received >= cutoff) {
        *cursor = 0;
        return Ok(0);
    }
    let end: Option<(i64, i64)> = conn
        .query_row(
            "SELECT seq, received_ms FROM messages WHERE seq > ?1 ORDER BY seq LIMIT 1 OFFSET ?2",
            params![from, scan - 1],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let upto = end.map(|(seq, _)| seq).unwrap_or(i64::MAX);
    let pruned = cap::delete_tracked(
        conn,
        tally,
        "DELETE FROM messages WHERE seq > ?1 AND seq <= ?2
           AND delivered_ms IS NOT NULL AND delivered_ms < ?3",
        params![from, upto, cutoff],
    )?;
    *cursor = match end {
        Some((seq, received)) if received < cutoff => seq,
        _ => 0,
    };
    Ok(pruned)
}

/// Recent incidents (e.g. a corrupt database moved aside): (at_ms, kind, detail), newest first.
pub fn incidents(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<(i64, String, String)>> {
    let mut st =
        conn.prepare("SELECT at_ms, kind, detail FROM incidents ORDER BY id DESC LIMIT ?1")?;
    let rows = st.query_map(params![limit as i64], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    rows.collect()
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    stats: Arc<BufferStats>,
    rejected_keep: u64,
    max_bytes: u64,
    keep_delivered_ms: i64,
    maintain_due: bool,
    /// Held by the background checkpoint while it runs and by maintenance while it needs
    /// `wal_checkpoint(TRUNCATE)` (which fails at once, as a busy result row rather than an
    /// error, while another connection checkpoints).
    checkpoint_lock: Arc<std::sync::Mutex<()>>,
    /// Commits failed past [`STOP_RETRY_FOR`] during the stop: later batches get one try.
    given_up_at_stop: bool,
    /// Where the next retention walk starts (see `prune_delivered`).
    prune_cursor: i64,
    /// See [`Writer::wedged_for_test`].
    wedge_file: Option<PathBuf>,
    synchronous: Synchronous,
    /// `synchronous = normal` is set for the current transaction (delivery marks only).
    relaxed_sync: bool,
    live: Option<mpsc::Sender<LiveRows>>,
    rollup_tz: jiff::tz::TimeZone,
    rollups_enabled: bool,
    /// Newest version given to a changed rollup row (the pull API's cursor).
    rollup_version: i64,
    /// Stored rows and bytes per device and kind, for the disk cap (see `cap`): `None`
    /// until the cap first has to drop undelivered messages.
    tally: Option<cap::Tally>,
    cap_log: cap::CapLog,
    /// Distinct values known to be stored (committed) per rollup key, so a value seen
    /// again costs a hash lookup instead of an `INSERT OR IGNORE`.
    known_distinct: KnownDistinct,
    /// Recently written rollup buckets, so a batch need not read them back.
    bucket_cache: BucketCache,
    /// Sessions a crash left open, closed before anything else ([`crashed_sessions`]).
    recovered: Vec<Write>,
    /// Newest `seq` handed (or offered) to the forwarder.
    last_handed: i64,
    /// `seq`s of the messages in the batch being committed, in order.
    seqs: Vec<i64>,
}

/// What a batch may add to database plus WAL: each row is written to the WAL and later to
/// the file, with its index entries (a generous estimate on purpose).
fn incoming_bytes(batch: &[Write]) -> u64 {
    batch
        .iter()
        .map(|w| match w {
            Write::Accepted(m, _) => 3 * (m.payload.len() + m.device.len() + 64) as u64,
            Write::Rejected(r, _) => 3 * (r.excerpt.len() + r.rejection.detail.len() + 96) as u64,
            _ => 64,
        })
        .sum()
}

/// Start freeing space above this share of `max_bytes` (the rest is headroom for the WAL
/// while rows are deleted)...
const CAP_HIGH: f64 = 0.75;
/// ... down to this share.
const CAP_LOW: f64 = 0.60;
/// Room for a batch about to be committed is never made below this share: a batch that
/// needs more does not fit under the cap in any case, and emptying the buffer for it would
/// only cost every device its backlog.
const CAP_FLOOR: f64 = 0.25;
/// Rows deleted per step while making room: small steps keep the WAL small and drop no
/// more than needed.
const CAP_CHUNK: i64 = 500;
/// Rows retention looks at per maintenance pass (every 10 s).
const PRUNE_SCAN: i64 = 50_000;
/// How long per-10-second delivery counts are kept (for `status`).
const DELIVERIES_KEPT_MS: i64 = 3_600_000;
/// The most distinct keys one maintenance pass forgets: a day of buckets.
const DAY_MS: i64 = 86_400_000;
const DELIVERIES_BUCKET_MS: i64 = 10_000;

impl Writer {
    fn size_on_disk(&self) -> u64 {
        size_on_disk(&self.path)
    }

    fn high_water(&self) -> u64 {
        (self.max_bytes as f64 * CAP_HIGH) as u64
    }

    fn over_cap(&self) -> bool {
        self.size_on_disk() > self.high_water()
    }

    /// Forget the distinct keys of buckets no message can reach any more, at most one day
    /// of buckets per pass (a database from before the pruning may hold a year of them):
    /// each pass stays short and its WAL small. A failure is logged, not returned, so it
    /// never stands in the way of the disk cap below.
    fn prune_distinct_keys(&mut self, now: i64) {
        let result = self.conn.execute(
            "DELETE FROM rollup_distinct_keys WHERE bucket_ms < MIN(?1,
               (SELECT MIN(bucket_ms) FROM rollup_distinct_keys) + ?2)",
            params![now - crate::summary::DISTINCT_KEPT_MS, DAY_MS],
        );
        match result {
            Ok(0) => {}
            Ok(forgotten) => tracing::debug!(forgotten, "distinct keys of closed buckets pruned"),
            Err(e) => tracing::warn!(error = %e, "cannot prune distinct keys; will retry"),
        }
    }

    /// Retention, then the disk cap. Policy when the cap is reached: delivered messages
    /// go first (oldest first); then undelivered ones by the rule in [`cap`]: from the
    /// device holding the most bytes first, down to the others' level, oldest first and
    /// telemetry before events before status within a device. Every undelivered message
    /// dropped is counted per device and kind and logged (once per burst).
    /// `reserve`: room to leave for a batch about to be committed.
    fn maintain(&mut self, reserve: u64) -> rusqlite::Result<()> {
        // The background checkpoint waits while maintenance truncates the WAL.
        let lock = self.checkpoint_lock.clone();
        let _paused = lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::model::now_ms();
        let pruned = self.prune_delivered(now - self.keep_delivered_ms)?;
        self.conn.execute(
            "DELETE FROM deliveries WHERE bucket_ms < ?1
               AND bucket_ms < (SELECT MAX(bucket_ms) FROM deliveries)",
            params![now - DELIVERIES_KEPT_MS],
        )?;
        self.prune_distinct_keys(now);
        if pruned > 0 {
            tracing::debug!(pruned, "delivered messages past retention pruned");
        }
        if self.size_on_disk() + reserve <= self.high_water() {
            self.report_cap(&cap::Dropped::new(), now, None);
            if pruned > 0 {
                self.shrink()?;
            }
            return Ok(());
        }
        let target = ((self.max_bytes as f64 * CAP_LOW) as u64)
            .min(self.high_water().saturating_sub(reserve))
            .max((self.max_bytes as f64 * CAP_FLOOR) as u64);
        let before = self.size_on_disk();
        // Start with an empty WAL: deleting rows writes pages to it.
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        let mut freed_delivered = 0usize;
        loop {
            // Long work, but progress: the watchdog must not take it for a hang.
            self.beat();
            if self.logical_size()? <= target {
                break;
            }
            let n = cap::delete_tracked(
                &self.conn,
                &mut self.tally,
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages
                   WHERE delivered_ms IS NOT NULL ORDER BY seq LIMIT ?1)",
                params![CAP_CHUNK],
            )?;
            freed_delivered += n;
            if n == 0 {
                break;
            }
            // Give the pages back and empty the WAL after every step, so neither the
            // file nor the WAL grows while making room.
            self.shrink()?;
        }
        let mut dropped = cap::Dropped::new();
        // Whatever is dropped is counted in its own transaction, even if a later step fails.
        let result = self.drop_fairly(target, &mut dropped);
        self.shrink()?;
        let after = self.size_on_disk();
        self.report_cap(&dropped, now, Some((before, after, freed_delivered)));
        #[cfg(test)]
        if let Some(t) = &self.tally {
            assert_eq!(
                *t,
                cap::Tally::scan(&self.conn, || {})?,
                "the tally drifted"
            );
        }
        result
    }

    /// Log the cap's work: pruning delivered messages early as a warning each time; drops
    /// of undelivered ones as an error, once per burst ([`cap::CapLog`]) with the totals
    /// per device and kind since the last report. `sizes`: (before, after, freed delivered)
    /// of this pass, if it made room.
    fn report_cap(&mut self, dropped: &cap::Dropped, now: i64, sizes: Option<(u64, u64, usize)>) {
        if let Some(report) = self.cap_log.pass(dropped, now) {
            let lost: i64 = report.dropped.values().sum();
            let mut by_device_kind: Vec<_> = report.dropped.into_iter().collect();
            by_device_kind.sort();
            tracing::error!(
                max_bytes = self.max_bytes,
                before_bytes = sizes.map(|s| s.0),
                after_bytes = sizes.map(|s| s.1),
                passes = report.passes,
                dropped_undelivered = lost,
                by_device_kind = ?by_device_kind,
                "buffer disk cap reached: undelivered messages dropped, from the devices holding most first (oldest first, telemetry first)"
            );
        } else if let Some((before, after, freed_delivered)) =
            sizes.filter(|s| dropped.is_empty() && s.2 > 0)
        {
            tracing::warn!(
                max_bytes = self.max_bytes,
                before_bytes = before,
                after_bytes = after,
                freed_delivered,
                "buffer disk cap reached: delivered messages pruned early"
            );
        }
    }

    /// Retention (see [`prune_delivered`]), one walk step per maintenance pass.
    fn prune_delivered(&mut self, cutoff: i64) -> rusqlite::Result<usize> {
        self.beat();
        prune_delivered(
            &self.conn,
            &mut self.tally,
            &mut self.prune_cursor,
            cutoff,
            PRUNE_SCAN,
        )
    }

    /// Pages in use (the file shrinks only after `shrink`).
    fn logical_size(&self) -> rusqlite::Result<u64> {
        let (count, free, size): (i64, i64, i64) = self.conn.query_row(
            "SELECT (SELECT page_count FROM pragma_page_count()),
                    (SELECT freelist_count FROM pragma_freelist_count()),
                    (SELECT page_size FROM pragma_page_size())",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok(((count - free).max(0) * size) as u64)
    }

    /// Give freed pages back to the file system and truncate the WAL.
    fn shrink(&mut self) -> rusqlite::Result<()> {
        {
            let mut st = self.conn.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
        }
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

/// Copies committed WAL frames into the database file on a thread of its own (a PASSIVE
/// checkpoint every [`Checkpointer::EVERY`]), so commits are not held up by it: SQLite's
/// automatic checkpoint runs inside the committing transaction and, with a WAL of tens
/// of MB after a burst, stalled intake for tens of ms. The automatic one stays as a
/// backstop at the WAL limit. Stops (and is joined) when dropped.
struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    const EVERY: Duration = Duration::from_millis(200);

    fn start(
        path: &Path,
        synchronous: Synchronous,
        lock: Arc<std::sync::Mutex<()>>,
    ) -> Checkpointer {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || Self::run(&path, synchronous, &lock, stopped))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the checkpoint thread; commits checkpoint instead"))
            .ok();
        Checkpointer {
            stop: Some(stop),
            thread,
        }
    }

    fn run(
        path: &Path,
        synchronous: Synchronous,
        lock: &std::sync::Mutex<()>,
        stopped: std::sync::mpsc::Receiver<()>,
    ) {
        let conn = match Connection::open(path) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint connection failed; commits checkpoint instead");
                return;
            }
        };
        let sync = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        if let Err(e) = conn.pragma_update(None, "synchronous", sync) {
            tracing::warn!(error = %e, "checkpoint connection: cannot set synchronous");
        }
        // A checkpoint copies pages through its own buffer: no page cache worth keeping.
        let _ = conn.pragma_update(None, "cache_size", 16);
        let mut last_error_ms = i64::MIN / 2;
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(Self::EVERY)
        {
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                let now = crate::model::now_ms();
                if now - last_error_ms >= 60_000 {
                    last_error_ms = now;
                    tracing::warn!(error = %e, "background checkpoint failed; will retry");
                }
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Tell the watchdog the writer is alive ([`BufferStats::heartbeat_ms`]).
fn beat(stats: &BufferStats) {
    stats
        .heartbeat_ms
        .store(crate::model::now_ms(), Ordering::Relaxed);
}

/// Per-device changes gathered over one batch, applied with one statement per device.
#[derive(Default)]
struct DeviceDelta {
    last_seen_ms: Option<i64>,
    /// Online, since when, and up to when its time online is recorded.
    presence: Option<(bool, i64, Option<i64>)>,
    status: Option<(String, i64)>,
    last_rejection: Option<(String, String, i64)>,
    counters: HashMap<&'static str, (i64, i64)>,
    /// Rows stored, per kind the cap may drop (for its tally).
    stored: [cap::Share; 3],
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Write>) {
        let checkpointer =
            Checkpointer::start(&self.path, self.synchronous, self.checkpoint_lock.clone());
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Sessions a crash left open are closed first.
        let mut recovered = std::mem::take(&mut self.recovered);
        while !recovered.is_empty() {
            let rest = recovered.split_off(recovered.len().min(MAX_BATCH));
            batch.extend(recovered);
            recovered = rest;
            self.commit_with_retry(&mut batch);
        }
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            self.stats.room.taken();
            self.wedged_for_test();
            self.beat();
            // Make room first if this batch could carry the database past its cap.
            let incoming = incoming_bytes(&batch);
            if self.size_on_disk() + incoming > self.high_water() {
                if let Err(e) = self.maintain(incoming) {
                    tracing::error!(error = %e, "buffer maintenance failed; will retry");
                }
            }
            self.commit_with_retry(&mut batch);
            if self.maintain_due || self.over_cap() {
                self.maintain_due = false;
                if let Err(e) = self.maintain(0) {
                    self.stats.commit_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, "buffer maintenance failed; will retry");
                }
            }
        }
        drop(checkpointer);
        // Nobody is connected to a gateway that stops.
        let now = crate::model::now_ms();
        if let Err(e) = self.conn.execute(
            "UPDATE devices SET online = 0, last_disconnect_ms = ?1, online_recorded_ms = NULL
             WHERE online = 1",
            params![now],
        ) {
            tracing::error!(error = %e, "cannot mark devices offline at shutdown");
        }
        tracing::debug!(path = %self.path.display(), "writer stopped: channel closed");
    }

    fn beat(&self) {
        beat(&self.stats);
    }

    /// For the watchdog test only: with `BRANCH_GATEWAY_TEST_WEDGE_FILE` set in the
    /// environment, the writer stands still (as if stuck in a system call) while that file
    /// exists.
    fn wedged_for_test(&self) {
        if let Some(path) = &self.wedge_file {
            while path.exists() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Commit the batch; on failure (e.g. disk full) keep it and retry with backoff, so
    /// nothing already accepted is dropped. Meanwhile the queue in front fills up.
    /// Once the gateway is stopping ([`BufferStats::stopping`]), it retries for
    /// [`STOP_RETRY_FOR`] and then gives the batch up, counted and logged: a stop must end
    /// before systemd's SIGKILL, which would lose the same messages without a word.
    fn commit_with_retry(&mut self, batch: &mut Vec<Write>) {
        let mut delay = Duration::from_millis(100);
        let mut stopping_since: Option<Instant> = None;
        loop {
            let started = Instant::now();
            self.relax_sync(batch);
            let result = self.commit(batch);
            self.beat();
            match result {
                Ok(()) => {
                    self.stats
                        .last_commit_us
                        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .last_commit_failed
                        .store(false, Ordering::Relaxed);
                    // Durable now: the devices waiting for these may be acknowledged.
                    crate::receipt::settle(batch.iter_mut().filter_map(Write::take_receipt));
                    self.hand_live(batch);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    self.known_distinct.rolled_back();
                    self.bucket_cache.clear();
                    self.stats.commit_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats.last_commit_failed.store(true, Ordering::Relaxed);
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        queued = batch.len(),
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot commit to the buffer; intake is held until it succeeds"
                    );
                    if self.stats.stopping.load(Ordering::Relaxed) {
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if self.given_up_at_stop || since.elapsed() >= STOP_RETRY_FOR {
                            self.given_up_at_stop = true;
                            let lost = batch
                                .iter()
                                .filter(|w| matches!(w, Write::Accepted(..)))
                                .count() as u64;
                            self.stats.lost_at_stop.fetch_add(lost, Ordering::Relaxed);
                            tracing::error!(
                                path = %self.path.display(),
                                lost,
                                "stopping without committing accepted messages: the buffer still cannot be written"
                            );
                            batch.clear();
                            return;
                        }
                        delay = delay.min(Duration::from_secs(1));
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// A batch of delivery marks alone is committed without fsync (see the design note);
    /// anything else uses the configured `synchronous`.
    fn relax_sync(&mut self, batch: &[Write]) {
        if self.synchronous != Synchronous::Full {
            return;
        }
        let relax = batch
            .iter()
            .all(|w| matches!(w, Write::Delivered { .. } | Write::Maintain | Write::Probe));
        if relax != self.relaxed_sync {
            let mode = if relax { "NORMAL" } else { "FULL" };
            match self.conn.pragma_update(None, "synchronous", mode) {
                Ok(()) => self.relaxed_sync = relax,
                Err(e) => tracing::warn!(error = %e, mode, "cannot set synchronous"),
            }
        }
    }

    /// Hand the rows just committed to the forwarder; when its channel is full (or gone)
    /// wake it to read them from the database.
    fn hand_live(&mut self, batch: &mut Vec<Write>) {
        let Some(&last) = self.seqs.last() else {
            return;
        };
        let after = std::mem::replace(&mut self.last_handed, last);
        let Some(live) = &self.live else {
            return;
        };
        if live.capacity() == 0 {
            self.stats.committed.notify_one();
            return;
        }
        let rows: Vec<Stored> = batch
            .drain(..)
            .filter_map(|w| match w {
                Write::Accepted(m, _) => Some(m),
                _ => None,
            })
            .zip(self.seqs.iter())
            .map(|(m, &seq)| Stored {
                seq,
                device: m.device,
                profile: m.profile,
                kind: m.kind,
                received_ms: m.received_ms,
                payload: m.payload,
            })
            .collect();
        if live.try_send(LiveRows { after, rows }).is_err() {
            self.stats.committed.notify_one();
        }
    }

    fn commit(&mut self, batch: &[Write]) -> rusqlite::Result<()> {
        self.seqs.clear();
        if self.rollup_version == 0 {
            self.rollup_version = self.conn.query_row(
                "SELECT COALESCE(MAX(version), 0) FROM rollup_buckets",
                [],
                |r| r.get(0),
            )?;
        }
        let tz = self.rollup_tz.clone();
        let mut rollups = crate::summary::Pending::default();
        // The last moment this batch shows the gateway alive with devices online.
        let mut alive = 0i64;
        let tx = self.conn.transaction()?;
        let mut devices: foldhash::HashMap<&str, DeviceDelta> = Default::default();
        let (mut messages, mut rejected, mut delivered, mut last_seq) = (0u64, 0u64, 0u64, 0i64);
        {
            let mut insert_msg = tx.prepare_cached(
                "INSERT INTO messages (device, profile, kind, received_ms, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut mark_delivered = tx.prepare_cached(
                "UPDATE messages SET delivered_ms = ?3
                 WHERE seq BETWEEN ?1 AND ?2 AND delivered_ms IS NULL",
            )?;
            let mut insert_rej = tx.prepare_cached(
                "INSERT INTO rejected (device, kind, received_ms, reason, detail, excerpt)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for w in batch {
                match w {
                    Write::Accepted(m, _) => {
                        insert_msg.execute(params![
                            m.device,
                            m.profile,
                            m.kind.as_str(),
                            m.received_ms,
                            m.payload
                        ])?;
                        last_seq = tx.last_insert_rowid();
                        self.seqs.push(last_seq);
                        messages += 1;
                        if let Some(at_ms) = m.rollup_ms {
                            rollups.add_message(&tz, &m.device, at_ms, &m.contributions);
                        }
                        if m.kind == crate::model::Kind::Summary {
                            continue; // the gateway's own: no device to update
                        }
                        let d = devices.entry(&m.device).or_default();
                        d.last_seen_ms = d.last_seen_ms.max(Some(m.received_ms));
                        bump(d, "accepted", m.received_ms);
                        if let Some(i) = cap::slot(m.kind) {
                            d.stored[i].add(m.payload.len() as u64);
                        }
                        if m.kind == crate::model::Kind::Status {
                            d.status = Some((m.payload.clone(), m.received_ms));
                        }
                    }
                    Write::Rejected(r, _) => {
                        insert_rej.execute(params![
                            r.device,
                            r.kind,
                            r.received_ms,
                            r.rejection.reason.as_str(),
                            r.rejection.detail,
                            r.excerpt
                        ])?;
                        rejected += 1;
                        rollups.add(
                            &tz,
                            &r.device,
                            &crate::summary::count(&crate::summary::REJECTED, r.received_ms),
                        );
                        let d = devices.entry(&r.device).or_default();
                        d.last_seen_ms = d.last_seen_ms.max(Some(r.received_ms));
                        bump(d, "rejected", r.received_ms);
                        bump(d, r.rejection.reason.as_str(), r.received_ms);
                        d.last_rejection = Some((
                            r.rejection.reason.as_str().to_owned(),
                            r.rejection.detail.clone(),
                            r.received_ms,
                        ));
                    }
                    Write::Presence(p) => {
                        // Time online comes in exact pieces from the broker's board.
                        for &(from, to) in &p.online_pieces {
                            for c in crate::summary::online_minutes(&tz, Some(from), to) {
                                rollups.add(&tz, &p.device, &c);
                            }
                        }
                        if !p.online && p.disconnects > 0 {
                            rollups.add(
                                &tz,
                                &p.device,
                                &crate::summary::count(&crate::summary::OFFLINE_EPISODES, p.at_ms),
                            );
                        }
                        alive = alive.max(p.online_pieces.last().map_or(0, |piece| piece.1));
                        let d = devices.entry(&p.device).or_default();
                        d.presence = Some((p.online, p.at_ms, p.online_recorded_to));
                        d.last_seen_ms = d.last_seen_ms.max(Some(p.at_ms));
                        bump_by(d, "connects", p.connects.into(), p.at_ms);
                        bump_by(d, "disconnects", p.disconnects.into(), p.at_ms);
                    }
                    Write::Denied {
                        device,
                        what,
                        count,
                        at_ms,
                        ..
                    } => bump_by(
                        devices.entry(device).or_default(),
                        what,
                        (*count).try_into().unwrap_or(i64::MAX),
                        *at_ms,
                    ),
                    Write::Maintain => self.maintain_due = true,
                    Write::Probe => {}
                    Write::Configured(list) => {
                        tx.execute("UPDATE devices SET configured = 0", [])?;
                        let mut st = tx.prepare_cached(
                            "INSERT INTO devices (id, profile, online, configured) VALUES (?1, ?2, 0, 1)
                             ON CONFLICT(id) DO UPDATE SET profile = excluded.profile, configured = 1",
                        )?;
                        for (id, profile) in list {
                            st.execute(params![id, profile])?;
                        }
                    }
                    Write::Delivered { seqs, at_ms } => {
                        // Acknowledgements come mostly in order: one statement per run
                        // of consecutive `seq`s.
                        for (first, last) in seq_runs(seqs) {
                            mark_delivered.execute(params![first, last, at_ms])?;
                        }
                        delivered += seqs.len() as u64;
                        if !seqs.is_empty() {
                            tx.execute(
                                "INSERT INTO deliveries (bucket_ms, count, last_ms) VALUES (?1, ?2, ?3)
                                 ON CONFLICT(bucket_ms) DO UPDATE SET count = count + excluded.count,
                                   last_ms = MAX(last_ms, excluded.last_ms)",
                                params![at_ms - at_ms.rem_euclid(DELIVERIES_BUCKET_MS), seqs.len() as i64, at_ms],
                            )?;
                        }
                    }
                }
            }
        }
        apply_devices(&tx, &devices)?;
        if alive > 0 {
            tx.prepare_cached(
                "INSERT INTO alive (id, at_ms) VALUES (1, ?1)
                 ON CONFLICT(id) DO UPDATE SET at_ms = MAX(at_ms, excluded.at_ms)",
            )?
            .execute(params![alive])?;
        }
        if self.rollups_enabled && !rollups.is_empty() {
            apply_rollups(
                &tx,
                &tz,
                rollups.expand_buckets(&tz),
                &mut self.rollup_version,
                &mut self.known_distinct,
                &mut self.bucket_cache,
            )?;
        }
        if rejected > 0 {
            // Keep the newest `rejected_keep` (a range delete on the primary key: cheap).
            tx.execute(
                "DELETE FROM rejected WHERE id <= (SELECT MAX(id) FROM rejected) - ?1",
                params![self.rejected_keep as i64],
            )?;
        }
        tx.commit()?;
        self.known_distinct.committed();
        if let Some(tally) = self.tally.as_mut() {
            for (device, d) in &devices {
                tally.add_shares(device, &d.stored);
            }
        }
        self.stats
            .messages_committed
            .fetch_add(messages, Ordering::Relaxed);
        self.stats
            .rejected_committed
            .fetch_add(rejected, Ordering::Relaxed);
        self.stats
            .delivered_committed
            .fetch_add(delivered, Ordering::Relaxed);
        if last_seq > 0 {
            self.stats
                .last_seq
                .store(last_seq as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Runs of consecutive integers in `seqs` (any order, duplicates allowed), ascending.
fn seq_runs(seqs: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for s in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == s => *last = s,
            _ => runs.push((s, s)),
        }
    }
    runs
}

fn bump(d: &mut DeviceDelta, counter: &'static str, at_ms: i64) {
    bump_by(d, counter, 1, at_ms);
}

fn bump_by(d: &mut DeviceDelta, counter: &'static str, n: i64, at_ms: i64) {
    if n == 0 {
        return;
    }
    let e = d.counters.entry(counter).or_insert((0, at_ms));
    e.0 += n;
    e.1 = e.1.max(at_ms);
}

/// Fold a batch's rollup aggregates into `rollup_buckets`: one row per (device or
/// branch, period, bucket), read once (or taken from `cache`), merged here and written
/// back with a new `version`, so the pull API's cursor sees re-opened past buckets too.
fn apply_rollups(
    tx: &rusqlite::Transaction<'_>,
    tz: &jiff::tz::TimeZone,
    pending: foldhash::HashMap<crate::summary::BucketRef<'_>, crate::summary::PendingBucket>,
    version: &mut i64,
    known: &mut KnownDistinct,
    cache: &mut BucketCache,
) -> rusqlite::Result<()> {
    use crate::model::RollupOp;
    use crate::summary::fold_stored;
    let mut distinct = tx.prepare_cached(
        "INSERT OR IGNORE INTO rollup_distinct_keys (scope, period, bucket_ms, metric, key)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut load = tx.prepare_cached(
        "SELECT id, metrics FROM rollup_buckets
         WHERE scope = ?1 AND period = ?2 AND bucket_ms = ?3",
    )?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO rollup_buckets (scope, period, bucket_ms, bucket, metrics, version)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut update =
        tx.prepare_cached("UPDATE rollup_buckets SET metrics = ?2, version = ?3 WHERE id = ?1")?;
    for ((scope, period, bucket_ms), bucket) in pending {
        // The row's id, when the bucket is in the table (from the cache or read back).
        let (mut row_id, mut metrics) = match cache.take(scope, period, bucket_ms) {
            Some((id, m)) => (Some(id), m),
            None => {
                let row: Option<(i64, String)> = load
                    .query_row(params![scope, period.as_str(), bucket_ms], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                match row {
                    None => (None, Default::default()),
                    Some((id, t)) => {
                        let (metrics, skipped) = crate::summary::decode_metrics(&t);
                        if skipped > 0 {
                            tracing::warn!(
                                scope,
                                period = period.as_str(),
                                bucket_ms,
                                skipped,
                                "rollup bucket had unreadable metrics; they start again from this batch"
                            );
                        }
                        (Some(id), metrics)
                    }
                }
            }
        };
        for (metric, a) in &bucket.metrics {
            let mut new = 0;
            if a.op == RollupOp::Distinct {
                let slot = (period, bucket_ms, *metric);
                let seen = known.keys_in(scope, slot);
                let unseen: Vec<u64> = a
                    .distinct
                    .iter()
                    .copied()
                    .filter(|v| !seen.is_some_and(|s| s.contains(v)))
                    .collect();
                for v in unseen {
                    // Stored as SQLite's signed integer: the same 64 bits.
                    new += distinct.execute(params![
                        scope,
                        period.as_str(),
                        bucket_ms,
                        metric.as_str(),
                        v as i64
                    ])? as i64;
                    known.stage(scope, slot, v);
                }
            }
            match metrics.get_mut(metric.as_str()) {
                Some(stored) => {
                    if let Some(m) = fold_stored(Some(*stored), a, new) {
                        *stored = m;
                    }
                }
                None => {
                    if let Some(m) = fold_stored(None, a, new) {
                        metrics.insert(metric.as_str().to_owned(), m);
                    }
                }
            }
        }
        if metrics.is_empty() {
            continue; // nothing storable (a min or max without a numeric sample)
        }
        *version += 1;
        let text = crate::summary::encode_metrics(&metrics);
        match row_id {
            Some(id) => {
                update.execute(params![id, text, *version])?;
            }
            None => {
                // A new bucket: the only time its local label is needed.
                let (_, label) = crate::summary::bucket(tz, bucket_ms, period);
                insert.execute(params![
                    scope,
                    period.as_str(),
                    bucket_ms,
                    label,
                    text,
                    *version
                ])?;
                row_id = Some(tx.last_insert_rowid());
            }
        }
        if let Some(id) = row_id {
            cache.put(scope, period, bucket_ms, (id, metrics));
        }
    }
    Ok(())
}

/// A bucket's row id in `rollup_buckets` and its metrics as last written.
type CachedBucket = (i64, crate::summary::BucketMetrics);

/// The writer's copy of recently written rollup buckets (the current hour and day of every
/// busy device), so a batch does not read back the rows it is about to rewrite. It may
/// hold what an uncommitted transaction wrote: a failed commit clears it. Bounded: past
/// [`BucketCache::MAX_BUCKETS`] it starts over empty.
#[derive(Default)]
struct BucketCache {
    /// By device (`""`: the branch), then period and bucket start: looked up by `&str`.
    rows: foldhash::HashMap<String, foldhash::HashMap<(crate::summary::Period, i64), CachedBucket>>,
    len: usize,
}

impl BucketCache {
    const MAX_BUCKETS: usize = 2048;

    fn take(
        &mut self,
        scope: &str,
        period: crate::summary::Period,
        bucket_ms: i64,
    ) -> Option<CachedBucket> {
        let found = self.rows.get_mut(scope)?.remove(&(period, bucket_ms));
        self.len -= usize::from(found.is_some());
        found
    }

    fn put(
        &mut self,
        scope: &str,
        period: crate::summary::Period,
        bucket_ms: i64,
        bucket: CachedBucket,
    ) {
        if self.len >= Self::MAX_BUCKETS {
            self.clear();
        }
        let per_scope = match self.rows.get_mut(scope) {
            Some(m) => m,
            None => self.rows.entry(scope.to_owned()).or_default(),
        };
        if per_scope.insert((period, bucket_ms), bucket).is_none() {
            self.len += 1;
        }
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.len = 0;
    }
}

/// Distinct keys the writer knows are in `rollup_distinct_keys`. Keys become known only
/// once their transaction committed (a failed one is rolled back); one that maintenance
/// prunes later belongs to a bucket no message reaches any more. Bounded: past [`KnownDistinct::MAX_VALUES`] it starts over empty, which only
/// costs the statements it saves.
#[derive(Default)]
struct KnownDistinct {
    /// By (period, bucket start, metric), then device (`""`: the branch), so a lookup
    /// borrows the device's name instead of building a key.
    known: foldhash::HashMap<DistinctSlot, foldhash::HashMap<String, foldhash::HashSet<u64>>>,
    values: usize,
    staged: Vec<(String, DistinctSlot, u64)>,
}

/// One `distinct` metric of one bucket, less its device.
type DistinctSlot = (crate::summary::Period, i64, crate::model::Metric);

impl KnownDistinct {
    const MAX_VALUES: usize = 20_000;

    /// The committed keys of one device's (or the branch's) bucket and metric.
    fn keys_in(&self, scope: &str, slot: DistinctSlot) -> Option<&foldhash::HashSet<u64>> {
        self.known.get(&slot)?.get(scope)
    }

    #[cfg(test)]
    fn contains(&self, scope: &str, slot: DistinctSlot, key: u64) -> bool {
        self.keys_in(scope, slot).is_some_and(|s| s.contains(&key))
    }

    fn stage(&mut self, scope: &str, slot: DistinctSlot, key: u64) {
        self.staged.push((scope.to_owned(), slot, key));
    }

    /// The transaction that inserted the staged keys committed.
    fn committed(&mut self) {
        if self.values + self.staged.len() > Self::MAX_VALUES {
            self.known.clear();
            self.values = 0;
        }
        for (scope, slot, key) in self.staged.drain(..) {
            let inserted = self
                .known
                .entry(slot)
                .or_default()
                .entry(scope)
                .or_default()
                .insert(key);
            if inserted {
                self.values += 1;
            }
        }
    }

    /// The transaction failed: what it inserted is gone.
    fn rolled_back(&mut self) {
        self.staged.clear();
    }
}

fn apply_devices(
    tx: &rusqlite::Transaction<'_>,
    devices: &foldhash::HashMap<&str, DeviceDelta>,
) -> rusqlite::Result<()> {
    let mut ensure = tx.prepare_cached(
        "INSERT INTO devices (id, profile, online, configured) VALUES (?1, '', 0, 0)
         ON CONFLICT(id) DO NOTHING",
    )?;
    let mut seen = tx.prepare_cached(
        "UPDATE devices SET last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?2) WHERE id = ?1",
    )?;
    let mut presence = tx.prepare_cached(
        "UPDATE devices SET online = ?2,
             last_connect_ms = CASE WHEN ?2 THEN ?3 ELSE last_connect_ms END,
             last_disconnect_ms = CASE WHEN ?2 THEN last_disconnect_ms ELSE ?3 END,
             online_recorded_ms = ?4
         WHERE id = ?1",
    )?;
    let mut status = tx.prepare_cached(
        "UPDATE devices SET reported_status = ?2, reported_status_ms = ?3 WHERE id = ?1",
    )?;
    let mut rejection = tx.prepare_cached(
        "UPDATE devices SET last_reject_reason = ?2, last_reject_detail = ?3, last_reject_ms = ?4
         WHERE id = ?1",
    )?;
    let mut counter = tx.prepare_cached(
        "INSERT INTO device_counters (device, counter, value, last_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(device, counter) DO UPDATE SET
             value = value + excluded.value, last_ms = MAX(last_ms, excluded.last_ms)",
    )?;
    for (id, d) in devices {
        // The empty id holds refusals that concern no configured device (unknown user
        // names, connection limits): counters only, never a device row.
        if id.is_empty() {
            for (name, (n, at)) in &d.counters {
                counter.execute(params![id, name, n, at])?;
            }
            continue;
        }
        ensure.execute(params![id])?;
        if let Some(ms) = d.last_seen_ms {
            seen.execute(params![id, ms])?;
        }
        if let Some((online, at, recorded_to)) = d.presence {
            presence.execute(params![id, online, at, recorded_to])?;
        }
        if let Some((s, at)) = &d.status {
            status.execute(params![id, s, at])?;
        }
        if let Some((reason, detail, at)) = &d.last_rejection {
            rejection.execute(params![id, reason, detail, at])?;
        }
        for (name, (n, at)) in &d.counters {
            counter.execute(params![id, name, n, at])?;
        }
    }
    Ok(())
}

/// Devices still marked online when the database is opened: the gateway ended without
/// closing them (SIGKILL, crash, power loss). Each is closed at the last moment the
/// gateway was known alive (its last recorded time online, message or rejection), with
/// its time online up to then.
fn crashed_sessions(conn: &Connection) -> rusqlite::Result<Vec<Write>> {
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

/// The forwarder's read side: undelivered messages in `seq` order, on its own connection
/// (WAL lets it read while the writer commits). Blocking: use from `spawn_blocking`.
pub struct Outbox {
    conn: Connection,
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

    /// The broker's refusals (see [`broker_refusals`]).
    pub fn broker_refusals(&mut self) -> rusqlite::Result<Vec<(String, String, i64)>> {
        broker_refusals(&self.conn)
    }

    /// Undelivered messages and the receive time of the oldest.
    pub fn backlog(&mut self) -> rusqlite::Result<(i64, Option<i64>)> {
        self.conn.query_row(
            "SELECT (SELECT COUNT(*) FROM messages WHERE delivered_ms IS NULL),
                    (SELECT received_ms FROM messages WHERE delivered_ms IS NULL ORDER BY seq LIMIT 1)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }
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
    pub devices_online: i64,
    pub devices_configured: i64,
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

/// Messages refused because their device was over its profile's rate limit, per device
/// (totals since the database was created): (device, count), by device.
/// The device counters that are the broker's refusals (names from `broker::Denial`):
/// `connect_*` refuse a connection, `*_denied` a packet, the rest close a connection that
/// broke the protocol or a deadline. The empty device id holds those of no configured device.
const BROKER_REFUSALS: &str =
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

pub fn rate_limited(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT device, value FROM device_counters WHERE counter = 'rate_limited' AND value > 0
         ORDER BY device",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
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
}

/// Every device known to the database, configured ones first, by id.
pub fn device_report(conn: &Connection) -> rusqlite::Result<Vec<DeviceRow>> {
    let mut st = conn.prepare(&format!(
        "SELECT d.id, d.profile, d.configured, d.online, d.last_seen_ms, d.reported_status,
                COALESCE((SELECT value FROM device_counters WHERE device = d.id AND counter = 'accepted'), 0),
                COALESCE((SELECT value FROM device_counters WHERE device = d.id AND counter = 'rejected'), 0),
                COALESCE((SELECT SUM(value) FROM device_counters WHERE device = d.id
                          AND {BROKER_REFUSALS}), 0),
                d.last_reject_reason, d.last_reject_detail,
                COALESCE((SELECT value FROM device_counters WHERE device = d.id AND counter = 'rate_limited'), 0)
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
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn message(received_ms: i64) -> Write {
        Write::Accepted(
            Accepted {
                device: "gate-1".into(),
                profile: "gate-counter".into(),
                kind: crate::model::Kind::Telemetry,
                received_ms,
                payload: r#"{"in":1}"#.into(),
                rollup_ms: None,
                contributions: Default::default(),
            },
            None,
        )
    }

    /// A buffer with a small queue, a week's retention and one configured device, `gate-1`.
    fn open_test_buffer(path: &Path) -> Buffer {
        open_test_buffer_with(path, true)
    }

    fn open_test_buffer_with(path: &Path, rollups: bool) -> Buffer {
        let options = BufferOptions {
            synchronous: Synchronous::Normal,
            rejected_keep: 100,
            queue_capacity: 64,
            max_bytes: 1 << 30,
            keep_delivered: Duration::from_millis(7 * DAY as u64),
            live: None,
            rollup_tz: jiff::tz::TimeZone::UTC,
            rollups,
        };
        Buffer::open(path, options, &[("gate-1".into(), "gate-counter".into())]).unwrap()
    }

    fn seqs_left(path: &Path) -> Vec<i64> {
        let conn = open_read_only(path).unwrap();
        let mut st = conn
            .prepare("SELECT seq FROM messages ORDER BY seq")
            .unwrap();
        let rows = st.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    /// `[storage] rollups = false` stores messages and no rollup rows; switched back on,
    /// the next message fills its four buckets (device and branch, hour and day).
    #[test]
    fn rollups_can_be_switched_off() {
        let dir = std::env::temp_dir().join(format!("bgw-no-rollups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("buffer.sqlite");
        let counted = |at_ms: i64| {
            let Write::Accepted(mut m, _) = message(at_ms) else {
                unreachable!()
            };
            m.rollup_ms = Some(at_ms);
            Write::Accepted(m, None)
        };
        let count = |sql: &str| -> i64 {
            open_read_only(&path)
                .unwrap()
                .query_row(sql, [], |r| r.get(0))
                .unwrap()
        };
        let now = 1_795_575_600_000i64;
        let buffer = open_test_buffer_with(&path, false);
        buffer.sender().blocking_send(counted(now)).unwrap();
        buffer.close().unwrap();
        assert_eq!(count("SELECT COUNT(*) FROM messages"), 1);
        assert_eq!(count("SELECT COUNT(*) FROM rollup_buckets"), 0);
        let buffer = open_test_buffer_with(&path, true);
        buffer.sender().blocking_send(counted(now)).unwrap();
        buffer.close().unwrap();
        assert_eq!(count("SELECT COUNT(*) FROM rollup_buckets"), 4);
        assert_eq!(
            count("SELECT CAST(SUM(value) AS INTEGER) FROM rollups WHERE metric = 'messages'"),
            4
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Retention removes exactly the rows delivered longer ago than `keep_delivered`:
    /// never an undelivered one, and rows delivered late (after an older walk passed them)
    /// on a later pass.
    #[test]
    fn retention_prunes_only_rows_delivered_before_the_cutoff() {
        let dir = std::env::temp_dir().join(format!("bgw-retention-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("buffer.sqlite");
        let open = || open_test_buffer(&path);
        let now = crate::model::now_ms();
        let buffer = open();
        let tx = buffer.sender();
        // seq 1..=10 received ten days ago, 11..=15 now.
        for _ in 0..10 {
            tx.blocking_send(message(now - 10 * DAY)).unwrap();
        }
        for _ in 0..5 {
            tx.blocking_send(message(now)).unwrap();
        }
        let delivered = |seqs: Vec<i64>, at_ms| Write::Delivered { seqs, at_ms };
        tx.blocking_send(delivered(vec![1, 2, 3, 4, 5], now - 8 * DAY))
            .unwrap();
        tx.blocking_send(delivered(vec![6, 7], now - DAY)).unwrap();
        tx.blocking_send(delivered(vec![11, 12], now)).unwrap();
        tx.blocking_send(Write::Maintain).unwrap();
        drop(tx);
        buffer.close().unwrap();
        assert_eq!(seqs_left(&path), vec![6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);

        // seq 9 is delivered long ago after all (late mark): the next pass finds it.
        let buffer = open();
        let tx = buffer.sender();
        tx.blocking_send(delivered(vec![9], now - 9 * DAY)).unwrap();
        tx.blocking_send(Write::Maintain).unwrap();
        drop(tx);
        buffer.close().unwrap();
        assert_eq!(seqs_left(&path), vec![6, 7, 8, 10, 11, 12, 13, 14, 15]);
        // The walk itself, three rows at a time: 8 and 10 are undelivered, 6 and 7 were
        // delivered a day ago (kept); mark 8 and 10 delivered long ago and walk again.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute(
                "UPDATE messages SET delivered_ms = ?1 WHERE seq IN (8, 10)",
                params![now - 9 * DAY],
            )
            .unwrap();
            let cutoff = now - 7 * DAY;
            let mut cursor = 0;
            assert_eq!(
                prune_delivered(&conn, &mut None, &mut cursor, cutoff, 3).unwrap(),
                1
            );
            assert_eq!(cursor, 8, "the first window is 6, 7, 8");
            assert_eq!(
                prune_delivered(&conn, &mut None, &mut cursor, cutoff, 3).unwrap(),
                1
            );
            assert_eq!(
                cursor, 0,
                "10, 11, 12: reached rows received after the cutoff"
            );
            assert_eq!(
                prune_delivered(&conn, &mut None, &mut cursor, cutoff, 3).unwrap(),
                0
            );
        }
        assert_eq!(seqs_left(&path), vec![6, 7, 11, 12, 13, 14, 15]);
        let report = buffer_report(&open_read_only(&path).unwrap(), now).unwrap();
        assert_eq!(report.backlog, 3, "13..=15 undelivered");
        assert_eq!(report.oldest_undelivered_ms, Some(now));
        assert_eq!(report.last_delivered_ms, Some(now));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A distinct value is counted once per bucket however the batches fall, whether the
    /// writer remembers it (same run) or has to ask SQLite (after a reopen).
    #[test]
    fn distinct_values_count_once_across_batches_and_restarts() {
        let dir = std::env::temp_dir().join(format!("bgw-distinct-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("buffer.sqlite");
        let open = || open_test_buffer(&path);
        let hour = 1_795_575_600_000i64; // 2026-11-25T01:00Z
        let metric = crate::model::Metric::new("patrons");
        let patron = |value: &str| {
            let Write::Accepted(mut m, _) = message(hour + 60_000) else {
                unreachable!()
            };
            m.rollup_ms = Some(hour + 60_000);
            m.contributions = smallvec::smallvec![crate::model::Declared::distinct(
                crate::model::RuleRef::new(metric, crate::model::RollupOp::Distinct),
                crate::model::distinct_key(value),
            )];
            Write::Accepted(m, None)
        };
        // One transaction per group: wait for each to commit before sending the next.
        let send_batches = |buffer: &Buffer, groups: &[&[&str]]| {
            let tx = buffer.sender();
            for group in groups {
                let before = buffer.stats.messages_committed.load(Ordering::Relaxed);
                for v in *group {
                    tx.blocking_send(patron(v)).unwrap();
                }
                let want = before + group.len() as u64;
                while buffer.stats.messages_committed.load(Ordering::Relaxed) < want {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        let buffer = open();
        send_batches(&buffer, &[&["a", "b"], &["b", "c", "a"], &["c"]]);
        buffer.close().unwrap();
        let buffer = open();
        send_batches(&buffer, &[&["a", "d"], &["d"]]);
        buffer.close().unwrap();

        let conn = open_read_only(&path).unwrap();
        let mut st = conn
            .prepare(
                "SELECT scope, period, value, samples FROM rollups
                 WHERE metric = 'patrons' ORDER BY scope, period",
            )
            .unwrap();
        let rows: Vec<(String, String, f64, i64)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let expected: Vec<(String, String, f64, i64)> = [
            ("", "day"),
            ("", "hour"),
            ("gate-1", "day"),
            ("gate-1", "hour"),
        ]
        .iter()
        .map(|(s, p)| (s.to_string(), p.to_string(), 4.0, 9))
        .collect();
        assert_eq!(rows, expected, "a, b, c, d: four patrons in nine sessions");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Distinct keys of buckets no message can reach any more (started more than
    /// `DISTINCT_KEPT_MS` ago) are pruned by maintenance; newer ones stay, and so do the
    /// counts of every bucket.
    #[test]
    fn distinct_keys_of_closed_buckets_are_pruned() {
        let dir = std::env::temp_dir().join(format!("bgw-distinct-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("buffer.sqlite");
        let now = crate::model::now_ms();
        let metric = crate::model::Metric::new("patrons");
        let patron = |at_ms: i64, value: &str| {
            let Write::Accepted(mut m, _) = message(at_ms) else {
                unreachable!()
            };
            m.rollup_ms = Some(at_ms);
            m.contributions = smallvec::smallvec![crate::model::Declared::distinct(
                crate::model::RuleRef::new(metric, crate::model::RollupOp::Distinct),
                crate::model::distinct_key(value),
            )];
            Write::Accepted(m, None)
        };
        let old = now - crate::summary::DISTINCT_KEPT_MS - 2 * DAY;
        let buffer = open_test_buffer(&path);
        let older = old - 5 * DAY;
        let tx = buffer.sender();
        for (at, v) in [(older, "c"), (old, "a"), (old, "b"), (now, "a")] {
            tx.blocking_send(patron(at, v)).unwrap();
        }
        tx.blocking_send(Write::Maintain).unwrap();
        drop(tx);
        buffer.close().unwrap();
        let keys = |path: &Path| -> i64 {
            open_read_only(path)
                .unwrap()
                .query_row("SELECT COUNT(*) FROM rollup_distinct_keys", [], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        // One pass forgets at most a day of buckets: `older`'s four keys, not `old`'s eight.
        assert_eq!(keys(&path), 8 + 4);
        let buffer = open_test_buffer(&path);
        buffer.sender().blocking_send(Write::Maintain).unwrap();
        buffer.close().unwrap();
        assert_eq!(
            keys(&path),
            4,
            "the current hour and day of the device and the branch"
        );
        let conn = open_read_only(&path).unwrap();
        let counts: Vec<f64> = conn
            .prepare(
                "SELECT value FROM rollups WHERE metric = 'patrons' AND scope = 'gate-1'
                 AND period = 'hour' ORDER BY bucket_ms",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(counts, vec![1.0, 2.0, 1.0], "counts stay");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The writer's memory of stored distinct values: a value is known only once its
    /// transaction committed, a rolled-back one is forgotten, and the memory starts over
    /// empty (never keeps more) when it would pass its bound.
    #[test]
    fn known_distinct_values_follow_commits() {
        let key = |bucket_ms| -> DistinctSlot {
            (
                crate::summary::Period::Hour,
                bucket_ms,
                crate::model::Metric::new("patrons"),
            )
        };
        let mut known = KnownDistinct::default();
        known.stage("gate-1", key(0), 1);
        assert!(
            !known.contains("gate-1", key(0), 1),
            "not before the commit"
        );
        known.rolled_back();
        known.committed();
        assert!(
            !known.contains("gate-1", key(0), 1),
            "rolled back: forgotten"
        );
        known.stage("gate-1", key(0), 1);
        known.committed();
        assert!(known.contains("gate-1", key(0), 1));
        assert!(
            !known.contains("gate-1", key(3_600_000), 1),
            "another bucket"
        );
        for n in 1..KnownDistinct::MAX_VALUES {
            known.stage("gate-1", key(0), n as u64 + 1);
        }
        known.committed();
        assert_eq!(known.values, KnownDistinct::MAX_VALUES);
        known.stage("gate-1", key(0), u64::MAX);
        known.committed();
        assert_eq!(known.values, 1, "started over");
        assert!(known.contains("gate-1", key(0), u64::MAX));
        assert!(!known.contains("gate-1", key(0), 1));
    }

    /// The disk cap takes from the device holding the most bytes (oldest first), and
    /// the writer's tally stays equal to what is stored through inserts, retention and
    /// the cap itself (checked after every pass in test builds).
    #[test]
    fn disk_cap_takes_from_the_biggest_holder_first() {
        let dir = std::env::temp_dir().join(format!("bgw-fair-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("buffer.sqlite");
        let options = BufferOptions {
            synchronous: Synchronous::Normal,
            rejected_keep: 100,
            queue_capacity: 64,
            max_bytes: 2 << 20,
            keep_delivered: Duration::ZERO,
            live: None,
            rollup_tz: jiff::tz::TimeZone::UTC,
            rollups: false,
        };
        let configured = [
            ("flood".to_owned(), "p".to_owned()),
            ("canary".to_owned(), "p".to_owned()),
        ];
        let buffer = Buffer::open(&path, options, &configured).unwrap();
        let tx = buffer.sender();
        let now = crate::model::now_ms();
        let msg = |device: &str, kind: Kind, n: usize, pad: usize| {
            Write::Accepted(
                Accepted {
                    device: device.into(),
                    profile: "p".into(),
                    kind,
                    received_ms: now,
                    payload: format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(pad)),
                    rollup_ms: None,
                    contributions: Default::default(),
                },
                None,
            )
        };
        // The canary's backlog is older than all of the flood.
        for n in 0..200 {
            tx.blocking_send(msg("canary", Kind::Telemetry, n, 20))
                .unwrap();
        }
        for n in 0..20 {
            tx.blocking_send(msg("canary", Kind::Events, n, 20))
                .unwrap();
        }
        for n in 0..6_000 {
            tx.blocking_send(msg("flood", Kind::Telemetry, n, 1_000))
                .unwrap();
        }
        // Deliver everything so far: retention (keep 0) prunes it, tracked by the tally.
        let last = buffer.stats.last_seq.load(Ordering::Relaxed);
        let wait_last = |want: u64| {
            while buffer.stats.last_seq.load(Ordering::Relaxed) < want {
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        wait_last(6_220);
        tx.blocking_send(Write::Delivered {
            seqs: (1..=last.max(6_220) as i64).collect(),
            at_ms: now - 1,
        })
        .unwrap();
        tx.blocking_send(Write::Maintain).unwrap();
        // A second outage: the canary's modest backlog, then the flood again.
        for n in 0..100 {
            tx.blocking_send(msg("canary", Kind::Telemetry, n, 20))
                .unwrap();
        }
        for n in 0..6_000 {
            tx.blocking_send(msg("flood", Kind::Events, n, 1_000))
                .unwrap();
        }
        tx.blocking_send(Write::Maintain).unwrap();
        drop(tx);
        let stats = buffer.stats();
        buffer.close().unwrap();

        let conn = open_read_only(&path).unwrap();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            count("SELECT COUNT(*) FROM messages WHERE device = 'canary' AND delivered_ms IS NULL"),
            100,
            "the canary lost nothing"
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM drops WHERE device = 'canary'"),
            0
        );
        let dropped = count("SELECT count FROM drops WHERE device = 'flood' AND kind = 'events'");
        let kept =
            count("SELECT COUNT(*) FROM messages WHERE device = 'flood' AND kind = 'events'");
        assert!(dropped > 0);
        assert_eq!(dropped + kept, 6_000);
        // Oldest first: the flood's newest events are what is left.
        assert_eq!(
            count("SELECT MIN(json_extract(payload, '$.n')) FROM messages WHERE device = 'flood' AND kind = 'events'"),
            dropped
        );
        let dropped_telemetry = count(
            "SELECT COALESCE((SELECT count FROM drops WHERE device = 'flood' AND kind = 'telemetry'), 0)",
        );
        assert_eq!(
            stats.dropped.load(Ordering::Relaxed) as i64,
            dropped + dropped_telemetry
        );
        assert_eq!(
            count("SELECT value FROM device_counters WHERE device = 'flood' AND counter = 'dropped_events'"),
            dropped
        );
        assert!(size_on_disk(&path) <= 2 << 20);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn acknowledgements_become_runs() {
        assert_eq!(seq_runs(&[]), vec![]);
        assert_eq!(seq_runs(&[5]), vec![(5, 5)]);
        assert_eq!(
            seq_runs(&[3, 1, 2, 2, 7, 9, 8, 11]),
            vec![(1, 3), (7, 9), (11, 11)]
        );
    }
}
