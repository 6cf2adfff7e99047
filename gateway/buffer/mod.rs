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
//!   memory (the channel, the current batch), already acknowledged to the device.
//! - **When full.** The channel holds `storage.queue_capacity` commands. When it is full,
//!   the device connection whose message does not fit waits (intake blocks in
//!   `block_in_place`), so the device's acknowledgements stop until the writer catches up.
//!   Nothing is dropped.
//! - **Sequence numbers.** `messages.seq` is `INTEGER PRIMARY KEY AUTOINCREMENT`: strictly
//!   increasing and never reused, even after rows are pruned or the gateway restarts.
//! - **Bounded tables.** `rejected` keeps the newest `storage.rejected_keep` rows (pruned
//!   in the same transaction that adds rows).
//! - **Delivery.** The forwarder reads undelivered rows on its own connection ([`Outbox`])
//!   and reports acknowledged `seq`s back as [`Write::Delivered`].

pub mod schema;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags};
use tokio::sync::mpsc;

use crate::config::Synchronous;
use crate::model::{Accepted, DeviceId, Kind, Presence, Rejected, Stored};

/// Most commands applied in one transaction.
pub const MAX_BATCH: usize = 2048;

/// A change for the writer thread.
#[derive(Debug)]
pub enum Write {
    Accepted(Accepted),
    Rejected(Rejected),
    Presence(Presence),
    /// The broker refused something of this device (`what` is a stable counter name).
    Denied {
        device: DeviceId,
        what: &'static str,
        at_ms: i64,
    },
    /// The central broker acknowledged these messages (by `seq`).
    Delivered {
        seqs: Vec<i64>,
        at_ms: i64,
    },
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
    /// Woken after every commit that added messages (the forwarder waits on it).
    pub committed: tokio::sync::Notify,
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
        let mut conn = Connection::open(path).map_err(sql_err)?;
        schema::prepare(&conn, options.synchronous).map_err(sql_err)?;
        schema::migrate(&mut conn, path)?;
        let last_seq: i64 = conn
            .query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(sql_err)?;
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
        let (tx, rx) = mpsc::channel(options.queue_capacity);
        let writer = Writer {
            conn,
            path: path.to_path_buf(),
            stats: stats.clone(),
            rejected_keep: options.rejected_keep,
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

struct Writer {
    conn: Connection,
    path: PathBuf,
    stats: Arc<BufferStats>,
    rejected_keep: u64,
}

/// Per-device changes gathered over one batch, applied with one statement per device.
#[derive(Default)]
struct DeviceDelta {
    last_seen_ms: Option<i64>,
    presence: Option<(bool, i64)>,
    status: Option<(String, i64)>,
    last_rejection: Option<(String, String, i64)>,
    counters: HashMap<&'static str, (i64, i64)>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Write>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            self.commit_with_retry(&mut batch);
        }
        // Nobody is connected to a gateway that stops.
        let now = crate::model::now_ms();
        if let Err(e) = self.conn.execute(
            "UPDATE devices SET online = 0, last_disconnect_ms = ?1 WHERE online = 1",
            params![now],
        ) {
            tracing::error!(error = %e, "cannot mark devices offline at shutdown");
        }
        tracing::debug!(path = %self.path.display(), "writer stopped: channel closed");
    }

    /// Commit the batch; on failure (e.g. disk full) keep it and retry with backoff, so
    /// nothing already accepted is dropped. Meanwhile the queue in front fills up.
    fn commit_with_retry(&mut self, batch: &mut Vec<Write>) {
        let mut delay = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.commit(batch) {
                Ok(()) => {
                    self.stats
                        .last_commit_us
                        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                    batch.clear();
                    return;
                }
                Err(e) => {
                    self.stats.commit_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        queued = batch.len(),
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot commit to the buffer; intake is held until it succeeds"
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn commit(&mut self, batch: &[Write]) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        let mut devices: HashMap<&str, DeviceDelta> = HashMap::new();
        let (mut messages, mut rejected, mut delivered, mut last_seq) = (0u64, 0u64, 0u64, 0i64);
        {
            let mut insert_msg = tx.prepare_cached(
                "INSERT INTO messages (device, profile, kind, received_ms, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut mark_delivered = tx.prepare_cached(
                "UPDATE messages SET delivered_ms = ?2 WHERE seq = ?1 AND delivered_ms IS NULL",
            )?;
            let mut insert_rej = tx.prepare_cached(
                "INSERT INTO rejected (device, kind, received_ms, reason, detail, excerpt)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for w in batch {
                match w {
                    Write::Accepted(m) => {
                        insert_msg.execute(params![
                            m.device,
                            m.profile,
                            m.kind.as_str(),
                            m.received_ms,
                            m.payload
                        ])?;
                        last_seq = tx.last_insert_rowid();
                        messages += 1;
                        let d = devices.entry(&m.device).or_default();
                        d.last_seen_ms = d.last_seen_ms.max(Some(m.received_ms));
                        bump(d, "accepted", m.received_ms);
                        if m.kind == crate::model::Kind::Status {
                            d.status = Some((m.payload.clone(), m.received_ms));
                        }
                    }
                    Write::Rejected(r) => {
                        insert_rej.execute(params![
                            r.device,
                            r.kind,
                            r.received_ms,
                            r.rejection.reason.as_str(),
                            r.rejection.detail,
                            r.excerpt
                        ])?;
                        rejected += 1;
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
                        let d = devices.entry(&p.device).or_default();
                        d.presence = Some((p.online, p.at_ms));
                        d.last_seen_ms = d.last_seen_ms.max(Some(p.at_ms));
                        bump_by(d, "connects", p.connects.into(), p.at_ms);
                        bump_by(d, "disconnects", p.disconnects.into(), p.at_ms);
                    }
                    Write::Denied {
                        device,
                        what,
                        at_ms,
                    } => bump(devices.entry(device).or_default(), what, *at_ms),
                    Write::Delivered { seqs, at_ms } => {
                        for seq in seqs {
                            mark_delivered.execute(params![seq, at_ms])?;
                        }
                        delivered += seqs.len() as u64;
                    }
                }
            }
        }
        apply_devices(&tx, &devices)?;
        if rejected > 0 {
            // Keep the newest `rejected_keep` (a range delete on the primary key: cheap).
            tx.execute(
                "DELETE FROM rejected WHERE id <= (SELECT MAX(id) FROM rejected) - ?1",
                params![self.rejected_keep as i64],
            )?;
        }
        tx.commit()?;
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
            self.stats.committed.notify_one();
        }
        Ok(())
    }
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

fn apply_devices(
    tx: &rusqlite::Transaction<'_>,
    devices: &HashMap<&str, DeviceDelta>,
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
             last_disconnect_ms = CASE WHEN ?2 THEN last_disconnect_ms ELSE ?3 END
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
        ensure.execute(params![id])?;
        if let Some(ms) = d.last_seen_ms {
            seen.execute(params![id, ms])?;
        }
        if let Some((online, at)) = d.presence {
            presence.execute(params![id, online, at])?;
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

    /// Up to `limit` undelivered messages with `seq > after`, oldest first.
    pub fn next_after(&mut self, after: i64, limit: usize) -> rusqlite::Result<Vec<Stored>> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, device, profile, kind, received_ms, payload FROM messages
             WHERE delivered_ms IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = st.query_map(params![after, limit as i64], |r| {
            let kind: String = r.get(3)?;
            Ok(Stored {
                seq: r.get(0)?,
                device: r.get(1)?,
                profile: r.get(2)?,
                kind: Kind::parse(&kind).unwrap_or(Kind::Events),
                received_ms: r.get(4)?,
                payload: r.get(5)?,
            })
        })?;
        rows.collect()
    }

    /// Undelivered messages and the receive time of the oldest.
    pub fn backlog(&mut self) -> rusqlite::Result<(i64, Option<i64>)> {
        self.conn.query_row(
            "SELECT COUNT(*), MIN(received_ms) FROM messages WHERE delivered_ms IS NULL",
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
    pub last_reject_reason: Option<String>,
    pub last_reject_detail: Option<String>,
}

/// Every device known to the database, configured ones first, by id.
pub fn device_report(conn: &Connection) -> rusqlite::Result<Vec<DeviceRow>> {
    let mut st = conn.prepare(
        "SELECT d.id, d.profile, d.configured, d.online, d.last_seen_ms, d.reported_status,
                COALESCE((SELECT value FROM device_counters WHERE device = d.id AND counter = 'accepted'), 0),
                COALESCE((SELECT value FROM device_counters WHERE device = d.id AND counter = 'rejected'), 0),
                COALESCE((SELECT SUM(value) FROM device_counters WHERE device = d.id
                          AND (counter LIKE 'connect\\_%' ESCAPE '\\' OR counter LIKE '%\\_denied' ESCAPE '\\'
                               OR counter IN ('packet_too_large', 'malformed_packet'))), 0),
                d.last_reject_reason, d.last_reject_detail
         FROM devices d ORDER BY d.configured DESC, d.id",
    )?;
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
            last_reject_reason: r.get(9)?,
            last_reject_detail: r.get(10)?,
        })
    })?;
    rows.collect()
}
