//! The writer thread: its loop (take a batch, make room, commit, settle receipts, hand
//! the rows to the forwarder), retries on failed commits and the stop.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use super::cap;
use super::checkpoint::Checkpointer;
use super::rollups::BucketCache;
use super::rollups::KnownDistinct;
use super::BufferStats;
use super::LiveRows;
use super::Write;
use super::MAX_BATCH;
use crate::config::Synchronous;
use crate::model::Stored;
use tokio::sync::mpsc;

/// How long a stopping gateway keeps retrying failed commits (systemd's default stop
/// timeout is 90 s).
pub(super) const STOP_RETRY_FOR: Duration = Duration::from_secs(20);

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
    pub(super) stats: Arc<BufferStats>,
    pub(super) rejected_keep: u64,
    pub(super) max_bytes: u64,
    pub(super) keep_delivered_ms: i64,
    pub(super) maintain_due: bool,
    /// Held by the background checkpoint while it runs and by maintenance while it needs
    /// `wal_checkpoint(TRUNCATE)` (which fails at once, as a busy result row rather than an
    /// error, while another connection checkpoints).
    pub(super) checkpoint_lock: Arc<std::sync::Mutex<()>>,
    /// Commits failed past [`STOP_RETRY_FOR`] during the stop: later batches get one try.
    pub(super) given_up_at_stop: bool,
    /// Where the next retention walk starts (see `prune_delivered`).
    pub(super) prune_cursor: i64,
    /// See [`Writer::wedged_for_test`].
    pub(super) wedge_file: Option<PathBuf>,
    pub(super) synchronous: Synchronous,
    /// `synchronous = normal` is set for the current transaction (delivery marks only).
    pub(super) relaxed_sync: bool,
    pub(super) live: Option<mpsc::Sender<LiveRows>>,
    pub(super) rollup_tz: jiff::tz::TimeZone,
    pub(super) rollups_enabled: bool,
    /// Newest version given to a changed rollup row (the pull API's cursor).
    pub(super) rollup_version: i64,
    /// Stored rows and bytes per device and kind, for the disk cap (see `cap`): `None`
    /// until the cap first has to drop undelivered messages.
    pub(super) tally: Option<cap::Tally>,
    /// `PRAGMA data_version` when the tally was last checked: it changes when another
    /// connection commits (a quarantine retry or drop), which makes the tally stale.
    pub(super) data_version: Option<i64>,
    pub(super) cap_log: cap::CapLog,
    /// Distinct values known to be stored (committed) per rollup key, so a value seen
    /// again costs a hash lookup instead of an `INSERT OR IGNORE`.
    pub(super) known_distinct: KnownDistinct,
    /// Recently written rollup buckets, so a batch need not read them back.
    pub(super) bucket_cache: BucketCache,
    /// Sessions a crash left open, closed before anything else ([`crashed_sessions`]).
    pub(super) recovered: Vec<Write>,
    /// Newest `seq` handed (or offered) to the forwarder.
    pub(super) last_handed: i64,
    /// `seq`s of the messages in the batch being committed, in order.
    pub(super) seqs: Vec<i64>,
    /// Where committed command changes go (the dispatcher).
    pub(super) commands_tx: Option<mpsc::Sender<Vec<super::commands::CommandRow>>>,
    /// Command changes of the batch being committed.
    pub(super) command_changes: Vec<super::commands::CommandRow>,
    /// Answers owed to the batch's command ops, in their order.
    pub(super) answers: Vec<super::commands::Answer>,
    /// Rows of the batch that are not device messages (command changes), with their `seq`.
    pub(super) extra_rows: Vec<Stored>,
}

/// What a batch may add to database plus WAL: each row is written to the WAL and later to
/// the file, with its index entries (a generous estimate on purpose).
pub(super) fn incoming_bytes(batch: &[Write]) -> u64 {
    batch
        .iter()
        .map(|w| match w {
            Write::Accepted(m, _) => 3 * (m.payload.len() + m.device.len() + 64) as u64,
            Write::Rejected(r, _) => 3 * (r.excerpt.len() + r.rejection.detail.len() + 96) as u64,
            _ => 64,
        })
        .sum()
}

/// Tell the watchdog the writer is alive ([`BufferStats::heartbeat_ms`]).
pub(super) fn beat(stats: &BufferStats) {
    stats
        .heartbeat_ms
        .store(crate::model::now_ms(), Ordering::Relaxed);
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Write>, mut marks: mpsc::Receiver<Write>) {
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
        let mut closed = false;
        loop {
            // Delivery marks first: they never wait behind device messages.
            while batch.len() < MAX_BATCH {
                match marks.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                if closed {
                    break;
                }
                match rx.blocking_recv() {
                    Some(first) => batch.push(first),
                    // Devices' queue closed: one more look at the marks, then stop.
                    None => {
                        closed = true;
                        continue;
                    }
                }
            }
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

    pub(super) fn beat(&self) {
        beat(&self.stats);
    }

    /// For the watchdog test only: with `BRANCH_GATEWAY_TEST_WEDGE_FILE` set in the
    /// environment, the writer stands still (as if stuck in a system call) while that file
    /// exists.
    pub(super) fn wedged_for_test(&self) {
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
    pub(super) fn commit_with_retry(&mut self, batch: &mut Vec<Write>) {
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
                    self.hand_commands(batch);
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
    pub(super) fn relax_sync(&mut self, batch: &[Write]) {
        if self.synchronous != Synchronous::Full {
            return;
        }
        let relax = batch.iter().all(|w| {
            matches!(
                w,
                Write::Delivered { .. }
                    | Write::Quarantined { .. }
                    | Write::Maintain
                    | Write::Probe
            )
        });
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
    /// Answer the batch's command ops and tell the dispatcher what changed; when its
    /// channel is full, flag a resync instead (it reads the open commands back).
    pub(super) fn hand_commands(&mut self, batch: &mut [Write]) {
        use super::commands::{Answer, CommandOp};
        let mut answers = std::mem::take(&mut self.answers).into_iter();
        for w in batch.iter_mut() {
            match w {
                Write::Command(CommandOp::New(_, reply)) => {
                    if let Some(Answer::Row(r)) = answers.next() {
                        if let Some(reply) = reply.take() {
                            let _ = reply.send(r);
                        }
                    }
                }
                Write::Command(CommandOp::Open(_)) => {
                    if let (
                        Some(Answer::Rows(rows, newest)),
                        Write::Command(CommandOp::Open(reply)),
                    ) = (answers.next(), std::mem::replace(w, Write::Probe))
                    {
                        let _ = reply.send((rows, newest));
                    }
                }
                Write::Command(CommandOp::Notice(_, done)) => {
                    answers.next();
                    if let Some(done) = done.take() {
                        let _ = done.send(());
                    }
                }
                _ => {}
            }
        }
        let changes = std::mem::take(&mut self.command_changes);
        if changes.is_empty() {
            return;
        }
        if let Some(tx) = &self.commands_tx {
            if tx.try_send(changes).is_err() {
                self.stats.commands_resync.store(true, Ordering::Release);
            }
        }
    }

    pub(super) fn hand_live(&mut self, batch: &mut Vec<Write>) {
        let extra = std::mem::take(&mut self.extra_rows);
        let Some(last) = self.seqs.last().copied().max(extra.last().map(|r| r.seq)) else {
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
        let mut rows: Vec<Stored> = batch
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
        if !extra.is_empty() {
            rows.extend(extra);
            rows.sort_unstable_by_key(|r| r.seq);
        }
        if live.try_send(LiveRows { after, rows }).is_err() {
            self.stats.committed.notify_one();
        }
    }
}
