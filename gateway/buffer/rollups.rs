//! Rollup persistence: a batch's aggregates folded into `rollup_buckets`, with the caches
//! that spare the writer reads (recent buckets, distinct values already stored).

use rusqlite::{params, OptionalExtension};

/// Fold a batch's rollup aggregates into `rollup_buckets`: one row per (device or
/// branch, period, bucket), read once (or taken from `cache`), merged here and written
/// back with a new `version`, so the pull API's cursor sees re-opened past buckets too.
pub(super) fn apply_rollups(
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
pub(super) type CachedBucket = (i64, crate::summary::BucketMetrics);

/// The writer's copy of recently written rollup buckets (the current hour and day of every
/// busy device), so a batch does not read back the rows it is about to rewrite. It may
/// hold what an uncommitted transaction wrote: a failed commit clears it. Bounded: past
/// [`BucketCache::MAX_BUCKETS`] it starts over empty.
#[derive(Default)]
pub(super) struct BucketCache {
    /// By device (`""`: the branch), then period and bucket start: looked up by `&str`.
    pub(super) rows:
        foldhash::HashMap<String, foldhash::HashMap<(crate::summary::Period, i64), CachedBucket>>,
    pub(super) len: usize,
}

impl BucketCache {
    const MAX_BUCKETS: usize = 2048;

    pub(super) fn take(
        &mut self,
        scope: &str,
        period: crate::summary::Period,
        bucket_ms: i64,
    ) -> Option<CachedBucket> {
        let found = self.rows.get_mut(scope)?.remove(&(period, bucket_ms));
        self.len -= usize::from(found.is_some());
        found
    }

    pub(super) fn put(
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

    pub(super) fn clear(&mut self) {
        self.rows.clear();
        self.len = 0;
    }
}

/// Distinct keys the writer knows are in `rollup_distinct_keys`. Keys become known only
/// once their transaction committed (a failed one is rolled back); one that maintenance
/// prunes later belongs to a bucket no message reaches any more. Bounded: past [`KnownDistinct::MAX_VALUES`] it starts over empty, which only
/// costs the statements it saves.
#[derive(Default)]
pub(super) struct KnownDistinct {
    /// By (period, bucket start, metric), then device (`""`: the branch), so a lookup
    /// borrows the device's name instead of building a key.
    pub(super) known:
        foldhash::HashMap<DistinctSlot, foldhash::HashMap<String, foldhash::HashSet<u64>>>,
    pub(super) values: usize,
    pub(super) staged: Vec<(String, DistinctSlot, u64)>,
}

/// One `distinct` metric of one bucket, less its device.
pub(super) type DistinctSlot = (crate::summary::Period, i64, crate::model::Metric);

impl KnownDistinct {
    pub(super) const MAX_VALUES: usize = 20_000;

    /// The committed keys of one device's (or the branch's) bucket and metric.
    pub(super) fn keys_in(
        &self,
        scope: &str,
        slot: DistinctSlot,
    ) -> Option<&foldhash::HashSet<u64>> {
        self.known.get(&slot)?.get(scope)
    }

    #[cfg(test)]
    pub(super) fn contains(&self, scope: &str, slot: DistinctSlot, key: u64) -> bool {
        self.keys_in(scope, slot).is_some_and(|s| s.contains(&key))
    }

    pub(super) fn stage(&mut self, scope: &str, slot: DistinctSlot, key: u64) {
        self.staged.push((scope.to_owned(), slot, key));
    }

    /// The transaction that inserted the staged keys committed.
    pub(super) fn committed(&mut self) {
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
    pub(super) fn rolled_back(&mut self) {
        self.staged.clear();
    }
}
