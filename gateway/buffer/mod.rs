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
//!   The forwarder's delivery marks (delivered, quarantined) have a channel of their own
//!   ([`Marks`], [`MARKS_CAPACITY`] commands), which the writer empties before it takes
//!   anything from the devices' queue: marking deliveries never waits behind device
//!   messages, so the forwarder keeps reading and pinging central under backpressure.
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
//!
//! # Files
//! One job each; `writer` drives, the others are the steps it takes:
//! - `mod.rs`: the commands ([`Write`]), options, counters, [`Room`], [`Buffer::open`].
//! - `open.rs`: set-up, integrity check and migration (`schema.rs`), a corrupt file moved
//!   aside, the sessions a crash left open.
//! - `writer.rs`: the writer thread's loop, retries, receipts settled, rows handed over.
//! - `commit.rs`: one batch in one transaction (rows, device counters, presence).
//! - `rollups.rs`: rollup buckets and the caches that spare reads.
//! - `retention.rs`: retention, the disk cap's schedule and shrinking; `cap.rs`: which rows
//!   the cap takes.
//! - `checkpoint.rs`: the background WAL checkpoint.
//! - `quarantine.rs`: rows central refused, listed, retried and dropped.
//! - `outbox.rs` and `report.rs`: the read side (forwarder; status, API, metrics), on
//!   read-only connections of their own.

mod cap;
mod checkpoint;
pub mod commands;
mod commit;
mod open;
mod outbox;
mod quarantine;
mod report;
mod retention;
mod rollups;
pub mod schema;
#[cfg(test)]
mod tests;
mod writer;

pub use outbox::{Backlog, Outbox};
pub use quarantine::*;
pub use report::*;

use open::{crashed_sessions, open_checked, replace_corrupt, sibling, OpenFailure};
use rollups::{BucketCache, KnownDistinct};
use writer::Writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::params;
use tokio::sync::mpsc;

use crate::config::Synchronous;
use crate::model::{Accepted, DeviceId, Presence, Rejected, Stored};
use crate::receipt::Receipt;

/// Most commands applied in one transaction.
pub const MAX_BATCH: usize = 2048;

/// Committed batches waiting for the forwarder (each at most [`MAX_BATCH`] rows).
pub const LIVE_BATCHES: usize = 4;

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
    /// Central refused these messages (by `seq`, with the reason's stable name): moved to
    /// the `quarantine` table, counted per device as `quarantined`.
    Quarantined {
        rows: Vec<(i64, &'static str)>,
        at_ms: i64,
    },
    /// Prune delivered messages past retention and enforce the disk cap (sent periodically).
    Maintain,
    /// The configured devices after a reload: (id, profile).
    Configured(Vec<(DeviceId, String)>),
    /// A command stored, moved on or answered by its device ([`commands::CommandOp`]).
    Command(commands::CommandOp),
    /// Liveness probe for the service watchdog: it only makes the writer go round its loop
    /// (and so refresh [`BufferStats::heartbeat_ms`]).
    Probe,
}

impl Write {
    /// The receipt a device connection waits on, taken out once its commit is done.
    fn take_receipt(&mut self) -> Option<Receipt> {
        match self {
            Write::Accepted(_, r)
            | Write::Rejected(_, r)
            | Write::Denied { receipt: r, .. }
            | Write::Command(commands::CommandOp::Reply { receipt: r, .. }) => r.take(),
            _ => None,
        }
    }
}

/// Delivery-mark commands the writer holds ahead of the devices' queue.
pub const MARKS_CAPACITY: usize = 64;

/// Where the forwarder sends [`Write::Delivered`] and [`Write::Quarantined`]: a channel
/// the writer empties first. `send` waits only while [`MARKS_CAPACITY`] marks are queued
/// (at most one commit), never behind device messages.
#[derive(Clone)]
pub struct Marks {
    marks: mpsc::Sender<Write>,
    /// Wakes a writer idle on the devices' queue (a full queue means it is busy anyway).
    wake: mpsc::Sender<Write>,
}

impl Marks {
    pub async fn send(&self, mark: Write) {
        if self.marks.send(mark).await.is_ok() {
            let _ = self.wake.try_send(Write::Probe);
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
    /// Cap on database plus WAL, in bytes (see the disk cap in the design note).
    pub max_bytes: u64,
    /// Delivered messages older than this are pruned.
    pub keep_delivered: Duration,
    /// Where committed rows go for forwarding (none without an upstream).
    pub live: Option<mpsc::Sender<LiveRows>>,
    /// The branch's time zone: rollups cut local hours and days.
    pub rollup_tz: jiff::tz::TimeZone,
    /// `false`: no rollups at all (not even the built-in per-device figures).
    pub rollups: bool,
    /// Where the writer reports every committed command change (see
    /// [`BufferStats::commands_resync`] for when it is full).
    pub commands: Option<mpsc::Sender<Vec<commands::CommandRow>>>,
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
    /// Set when committed command changes could not be handed over (their channel was
    /// full): the dispatcher reads the open commands back from the database.
    pub commands_resync: std::sync::atomic::AtomicBool,
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
    marks: mpsc::Sender<Write>,
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
        let (marks, marks_rx) = mpsc::channel(MARKS_CAPACITY);
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
            data_version: None,
            cap_log: cap::CapLog::default(),
            known_distinct: KnownDistinct::default(),
            bucket_cache: BucketCache::default(),
            recovered,
            last_handed: last_seq,
            seqs: Vec::new(),
            commands_tx: options.commands,
            command_changes: Vec::new(),
            answers: Vec::new(),
            extra_rows: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer.run(rx, marks_rx))
            .map_err(|source| BufferError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Buffer {
            tx,
            marks,
            thread,
            stats,
        })
    }

    pub fn sender(&self) -> mpsc::Sender<Write> {
        self.tx.clone()
    }

    /// The forwarder's way in: delivery marks, ahead of the devices' queue.
    pub fn marks(&self) -> Marks {
        Marks {
            marks: self.marks.clone(),
            wake: self.tx.clone(),
        }
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
