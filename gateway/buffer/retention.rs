//! Retention and the disk cap: what the writer deletes, and when (the selection rule of
//! the cap itself is in `cap.rs`); shrinking the file after a large delete.

use rusqlite::{params, Connection, OptionalExtension};

use super::cap;
use super::report::size_on_disk;
use super::writer::Writer;

/// Delete the messages delivered before `cutoff`, walking `seq` order from `cursor`, at
/// most `scan` rows per call. A message is received before it is delivered and `seq`
/// follows reception, so the walk ends at the first row received after the cutoff; the
/// next walk then starts again from the oldest row (rows undelivered when an earlier walk
/// passed them may have been delivered since).
pub(super) fn prune_delivered(
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

/// Start freeing space above this share of `max_bytes` (the rest is headroom for the WAL
/// while rows are deleted)...
pub(super) const CAP_HIGH: f64 = 0.75;
/// ... down to this share.
pub(super) const CAP_LOW: f64 = 0.60;
/// Room for a batch about to be committed is never made below this share: a batch that
/// needs more does not fit under the cap in any case, and emptying the buffer for it would
/// only cost every device its backlog.
pub(super) const CAP_FLOOR: f64 = 0.25;
/// Rows deleted per step while making room: small steps keep the WAL small and drop no
/// more than needed.
pub(super) const CAP_CHUNK: i64 = 500;
/// Rows retention looks at per maintenance pass (every 10 s).
pub(super) const PRUNE_SCAN: i64 = 50_000;
/// How long per-10-second delivery counts are kept (for `status`).
pub(super) const DELIVERIES_KEPT_MS: i64 = 3_600_000;
/// The most distinct keys one maintenance pass forgets: a day of buckets.
pub(super) const DAY_MS: i64 = 86_400_000;
pub(super) const DELIVERIES_BUCKET_MS: i64 = 10_000;

impl Writer {
    pub(super) fn size_on_disk(&self) -> u64 {
        size_on_disk(&self.path)
    }

    pub(super) fn high_water(&self) -> u64 {
        (self.max_bytes as f64 * CAP_HIGH) as u64
    }

    pub(super) fn over_cap(&self) -> bool {
        self.size_on_disk() > self.high_water()
    }

    /// Forget the distinct keys of buckets no message can reach any more, at most one day
    /// of buckets per pass (a database from before the pruning may hold a year of them):
    /// each pass stays short and its WAL small. A failure is logged, not returned, so it
    /// never stands in the way of the disk cap below.
    pub(super) fn prune_distinct_keys(&mut self, now: i64) {
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
    pub(super) fn maintain(&mut self, reserve: u64) -> rusqlite::Result<()> {
        // The background checkpoint waits while maintenance truncates the WAL.
        let lock = self.checkpoint_lock.clone();
        let _paused = lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::model::now_ms();
        let pruned = self.prune_delivered(now - self.keep_delivered_ms)?;
        let forgotten = super::commands::prune(&self.conn, now)?;
        if forgotten > 0 {
            tracing::debug!(forgotten, "finished commands past their keeping pruned");
        }
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
    pub(super) fn report_cap(
        &mut self,
        dropped: &cap::Dropped,
        now: i64,
        sizes: Option<(u64, u64, usize)>,
    ) {
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
    pub(super) fn prune_delivered(&mut self, cutoff: i64) -> rusqlite::Result<usize> {
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
    pub(super) fn logical_size(&self) -> rusqlite::Result<u64> {
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
    pub(super) fn shrink(&mut self) -> rusqlite::Result<()> {
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
