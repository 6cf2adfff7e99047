//! The disk cap's share-out: which undelivered messages go when the cap must drop some.
//!
//! # Rule
//! When delivered messages alone cannot bring the database under its cap, undelivered ones
//! are taken **from the device holding the most bytes first**: the biggest holders are cut
//! down to a common level (water-filling), so nobody loses anything while another device
//! holds more than they do. Within a device its oldest messages go first, telemetry before
//! events before status. The gateway's own hourly summaries are never dropped.
//!
//! Bytes rather than rows: the cap is about disk space, and a device sending 1 KB messages
//! costs the disk twenty times what one sending 50 B does. A row is charged its payload
//! plus [`ROW_OVERHEAD`] (the rest of the row and its index entry), so a flood of tiny
//! messages still weighs what it costs.
//!
//! # Cost
//! The writer keeps a [`Tally`] of stored rows and bytes per device and kind. It is built
//! once, by one walk over the table, the first time the cap has to drop undelivered
//! messages, and from then on kept up to date by every insert and delete (deletes report
//! what they removed through `RETURNING`). Until then nothing is tracked: a gateway that
//! never reaches its cap pays nothing. When the cap drops undelivered messages every
//! delivered one is already gone, so the stored tally is the undelivered one.
//!
//! One round plans the bytes to take from each device and kind ([`plan`]) and then walks
//! the undelivered rows once in `seq` order, deleting the planned ones in chunks: no scan
//! per deleted chunk. A round that leaves the database over its target (freed pages lag
//! behind deleted bytes) is followed by another, planned from the new figures.

use std::collections::HashMap;

use rusqlite::{params, Connection};

use super::writer::Writer;
use crate::model::Kind;

/// What the cap charges a stored row besides its payload: `seq`, device, profile, kind,
/// times, the record header and its entry in the undelivered index (an estimate).
pub(super) const ROW_OVERHEAD: u64 = 64;

/// The kinds the cap may drop, in the order it drops them within one device.
const DROP_ORDER: [Kind; 3] = [Kind::Telemetry, Kind::Events, Kind::Status];

/// Rows read per query while building the tally or walking a plan.
const WALK_WINDOW: i64 = 5_000;

/// The least a round plans to free (tally bytes): no round of a handful of rows.
const MIN_ROUND_BYTES: u64 = 64 * 1024;

pub(super) fn slot(kind: Kind) -> Option<usize> {
    DROP_ORDER.iter().position(|k| *k == kind)
}

/// What a row costs in the tally.
pub(super) fn row_bytes(payload_bytes: u64) -> u64 {
    payload_bytes + ROW_OVERHEAD
}

/// Rows and bytes (payload plus [`ROW_OVERHEAD`] each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Share {
    pub rows: u64,
    pub bytes: u64,
}

impl Share {
    pub fn add(&mut self, payload_bytes: u64) {
        self.rows += 1;
        self.bytes += row_bytes(payload_bytes);
    }
}

/// Stored rows and bytes per device and droppable kind (telemetry, events, status).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Tally {
    devices: foldhash::HashMap<String, [Share; 3]>,
}

impl Tally {
    /// Count every stored row, [`WALK_WINDOW`] rows per query (`beat` runs between them:
    /// a long walk is progress, not a hang).
    pub fn scan(conn: &Connection, mut beat: impl FnMut()) -> rusqlite::Result<Tally> {
        let mut tally = Tally::default();
        let mut st = conn.prepare_cached(
            "SELECT seq, device, kind, octet_length(payload) FROM messages
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut cursor = 0i64;
        loop {
            beat();
            let mut rows = st.query(params![cursor, WALK_WINDOW])?;
            let mut seen = 0;
            while let Some(r) = rows.next()? {
                seen += 1;
                cursor = r.get(0)?;
                let kind = Kind::parse_stored(r.get_ref(2)?.as_str()?);
                if let Some(kind) = kind {
                    tally.add(r.get_ref(1)?.as_str()?, kind, r.get::<_, i64>(3)? as u64);
                }
            }
            if seen < WALK_WINDOW {
                return Ok(tally);
            }
        }
    }

    /// One stored row of `payload_bytes`.
    pub fn add(&mut self, device: &str, kind: Kind, payload_bytes: u64) {
        let Some(i) = slot(kind) else { return };
        self.entry(device)[i].add(payload_bytes);
    }

    /// Rows a batch stored, per kind in [`DROP_ORDER`].
    pub fn add_shares(&mut self, device: &str, shares: &[Share; 3]) {
        if shares.iter().all(|s| s.rows == 0) {
            return;
        }
        let e = self.entry(device);
        for (mine, more) in e.iter_mut().zip(shares) {
            mine.rows += more.rows;
            mine.bytes += more.bytes;
        }
    }

    /// Rows deleted (a device whose rows are all gone is forgotten).
    pub fn remove(&mut self, device: &str, kind: Kind, gone: Share) {
        let Some(i) = slot(kind) else { return };
        let Some(e) = self.devices.get_mut(device) else {
            return;
        };
        e[i].rows = e[i].rows.saturating_sub(gone.rows);
        e[i].bytes = e[i].bytes.saturating_sub(gone.bytes);
        if e.iter().all(|s| s.rows == 0) {
            self.devices.remove(device);
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.devices
            .values()
            .flat_map(|s| s.iter())
            .map(|s| s.bytes)
            .sum()
    }

    #[cfg(test)]
    pub fn of(&self, device: &str) -> [Share; 3] {
        self.devices.get(device).copied().unwrap_or_default()
    }

    fn entry(&mut self, device: &str) -> &mut [Share; 3] {
        if !self.devices.contains_key(device) {
            self.devices.insert(device.to_owned(), Default::default());
        }
        self.devices.get_mut(device).expect("just inserted")
    }
}

/// What one delete removed, per (device, kind), to take off the tally after it commits.
#[derive(Debug, Default)]
pub(super) struct Removed(HashMap<(String, Kind), Share>);

impl Removed {
    fn add(&mut self, device: &str, kind: Kind, payload_bytes: u64) {
        match self.0.get_mut(&(device.to_owned(), kind)) {
            Some(s) => s.add(payload_bytes),
            None => {
                let mut s = Share::default();
                s.add(payload_bytes);
                self.0.insert((device.to_owned(), kind), s);
            }
        }
    }

    pub fn apply(self, tally: &mut Tally) {
        for ((device, kind), share) in self.0 {
            tally.remove(&device, kind, share);
        }
    }
}

/// Run a `DELETE FROM messages ...` statement. With the tally built, it runs with
/// `RETURNING` and the tally loses what it removed (after the statement completed; on an
/// error the tally is dropped, to be built afresh when next needed).
pub(super) fn delete_tracked(
    conn: &Connection,
    tally: &mut Option<Tally>,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<usize> {
    let Some(t) = tally.as_mut() else {
        return conn.prepare_cached(sql)?.execute(params);
    };
    let result = (|| {
        let mut st = conn.prepare_cached(&format!(
            "{sql} RETURNING device, kind, octet_length(payload)"
        ))?;
        let mut rows = st.query(params)?;
        let mut removed = Removed::default();
        let mut n = 0;
        while let Some(r) = rows.next()? {
            n += 1;
            if let Some(kind) = Kind::parse_stored(r.get_ref(1)?.as_str()?) {
                removed.add(r.get_ref(0)?.as_str()?, kind, r.get::<_, i64>(2)? as u64);
            }
        }
        Ok((n, removed))
    })();
    match result {
        Ok((n, removed)) => {
            removed.apply(t);
            Ok(n)
        }
        Err(e) => {
            *tally = None;
            Err(e)
        }
    }
}

/// Bytes (tally units) to take from each device and kind, and how many quotas are open.
#[derive(Debug, Default)]
pub(super) struct Plan {
    quotas: foldhash::HashMap<String, [u64; 3]>,
    open: usize,
}

impl Plan {
    /// Whether the walk takes this row (and counts it against the quota).
    pub fn take(&mut self, device: &str, kind: Kind, payload_bytes: u64) -> bool {
        let (Some(i), Some(q)) = (slot(kind), self.quotas.get_mut(device)) else {
            return false;
        };
        if q[i] == 0 {
            return false;
        }
        q[i] = q[i].saturating_sub(row_bytes(payload_bytes));
        if q[i] == 0 {
            self.open -= 1;
        }
        true
    }

    pub fn done(&self) -> bool {
        self.open == 0
    }

    #[cfg(test)]
    fn quota(&self, device: &str) -> [u64; 3] {
        self.quotas.get(device).copied().unwrap_or_default()
    }
}

/// Plan to free `free` tally bytes: the devices holding most are brought down to the level
/// `L` at which what they hold above it adds up to `free` (everyone at or below `L` keeps
/// everything); each device's share comes from its telemetry first, then events, then
/// status (oldest first: the walk goes in `seq` order). When `free` is at least everything,
/// everything goes.
pub(super) fn plan(tally: &Tally, free: u64) -> Plan {
    let mut totals: Vec<(&str, u64)> = tally
        .devices
        .iter()
        .map(|(d, s)| (d.as_str(), s.iter().map(|s| s.bytes).sum::<u64>()))
        .filter(|(_, t)| *t > 0)
        .collect();
    totals.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let all: u128 = totals.iter().map(|(_, t)| *t as u128).sum();
    let free = free as u128;
    let mut level: u128 = 0;
    if free < all {
        let mut sum: u128 = 0;
        for k in 1..=totals.len() {
            sum += totals[k - 1].1 as u128;
            let next = totals.get(k).map_or(0, |(_, t)| *t as u128);
            // Cutting the top k to (sum - free) / k takes `free` and leaves them no lower
            // than the next device.
            if sum >= free + next * k as u128 {
                level = (sum - free) / k as u128;
                break;
            }
        }
    }
    let mut out = Plan::default();
    for (device, total) in totals {
        let mut quota = (total as u128).saturating_sub(level) as u64;
        if quota == 0 {
            continue;
        }
        let shares = &tally.devices[device];
        let mut q = [0u64; 3];
        for (i, s) in shares.iter().enumerate() {
            q[i] = quota.min(s.bytes);
            quota -= q[i];
        }
        out.open += q.iter().filter(|b| **b > 0).count();
        out.quotas.insert(device.to_owned(), q);
    }
    out
}

/// A row the walk chose.
struct Chosen {
    seq: i64,
    device: String,
    kind: Kind,
    payload_bytes: u64,
}

/// Undelivered rows dropped in one maintenance pass, per (device, kind name).
pub(super) type Dropped = HashMap<(String, String), i64>;

impl Writer {
    /// Drop undelivered messages by the rule above until the pages in use are at most
    /// `target` bytes (or nothing droppable is left). Every row dropped is counted per
    /// device and kind (`drops`, `dropped_<kind>`) in the transaction that deletes it.
    pub(super) fn drop_fairly(
        &mut self,
        target: u64,
        dropped: &mut Dropped,
    ) -> rusqlite::Result<()> {
        // Another connection (`branch-gateway quarantine retry|drop`) changed the tables
        // since the tally was built: build it afresh.
        let version: i64 = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))?;
        if self.data_version != Some(version) {
            self.data_version = Some(version);
            self.tally = None;
        }
        if self.tally.is_none() {
            let stats = self.stats.clone();
            let started = std::time::Instant::now();
            let tally = Tally::scan(&self.conn, || super::writer::beat(&stats))?;
            tracing::info!(
                devices = tally.devices.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "disk cap: counted the stored messages per device (kept up to date from now on)"
            );
            self.tally = Some(tally);
        }
        loop {
            self.beat();
            let logical = self.logical_size()?;
            let held = self.tally.as_ref().map_or(0, Tally::total_bytes);
            if logical <= target {
                return Ok(());
            }
            if held == 0 {
                // Only the quarantine is left: its oldest rows go last of all.
                return self.drop_quarantined(logical - target, dropped);
            }
            // The share of the excess that is messages (the rest is rollups, devices...).
            let free = ((logical - target) as u128 * held as u128 / logical as u128) as u64;
            let mut plan = plan(
                self.tally.as_ref().expect("built above"),
                free.max(MIN_ROUND_BYTES),
            );
            if self.walk(&mut plan, dropped)? == 0 {
                return self.drop_quarantined(logical - target, dropped);
            }
        }
    }

    /// Walk the undelivered rows in `seq` order once, deleting those `plan` takes, at most
    /// `CAP_CHUNK` per transaction (then the freed pages go back to the file system).
    fn walk(&mut self, plan: &mut Plan, dropped: &mut Dropped) -> rusqlite::Result<u64> {
        let mut cursor = 0i64;
        let mut total = 0u64;
        while !plan.done() {
            self.beat();
            let mut chosen: Vec<Chosen> = Vec::new();
            let mut end = false;
            {
                let mut st = self.conn.prepare_cached(
                    "SELECT seq, device, kind, octet_length(payload) FROM messages
                     WHERE seq > ?1 AND delivered_ms IS NULL ORDER BY seq LIMIT ?2",
                )?;
                let mut rows = st.query(params![cursor, WALK_WINDOW])?;
                let mut seen = 0;
                loop {
                    let Some(r) = rows.next()? else {
                        end = seen < WALK_WINDOW;
                        break;
                    };
                    seen += 1;
                    cursor = r.get(0)?;
                    let Some(kind) = Kind::parse_stored(r.get_ref(2)?.as_str()?) else {
                        continue;
                    };
                    let device = r.get_ref(1)?.as_str()?;
                    let payload_bytes = r.get::<_, i64>(3)? as u64;
                    if plan.take(device, kind, payload_bytes) {
                        chosen.push(Chosen {
                            seq: cursor,
                            device: device.to_owned(),
                            kind,
                            payload_bytes,
                        });
                        if chosen.len() >= super::retention::CAP_CHUNK as usize || plan.done() {
                            break;
                        }
                    }
                }
            }
            if !chosen.is_empty() {
                total += self.delete_chosen(&chosen, dropped)?;
                self.shrink()?;
            }
            if end {
                break;
            }
        }
        Ok(total)
    }

    /// The last resort of the cap: quarantined rows, oldest first, until about `excess`
    /// bytes are freed; counted per device in `drops` (kind `quarantined`) and as
    /// `dropped_quarantined`, like every other drop.
    fn drop_quarantined(&mut self, excess: u64, dropped: &mut Dropped) -> rusqlite::Result<()> {
        let mut freed = 0u64;
        while freed < excess.max(MIN_ROUND_BYTES) {
            self.beat();
            let now = crate::model::now_ms();
            let tx = self.conn.transaction()?;
            let gone: Vec<(String, u64)> = {
                let mut st = tx.prepare_cached(
                    "DELETE FROM quarantine WHERE seq IN
                       (SELECT seq FROM quarantine ORDER BY seq LIMIT ?1)
                     RETURNING device, octet_length(payload)",
                )?;
                let rows = st.query_map(params![super::retention::CAP_CHUNK], |r| {
                    Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            if gone.is_empty() {
                return Ok(());
            }
            let mut per_device: HashMap<String, i64> = HashMap::new();
            for (device, bytes) in &gone {
                freed += row_bytes(*bytes);
                *per_device.entry(device.clone()).or_default() += 1;
            }
            for (device, n) in &per_device {
                tx.execute(
                    "INSERT INTO drops (device, kind, count, first_ms, last_ms) VALUES (?1, 'quarantined', ?2, ?3, ?3)
                     ON CONFLICT(device, kind) DO UPDATE SET count = count + excluded.count, last_ms = excluded.last_ms",
                    params![device, n, now],
                )?;
                tx.execute(
                    "INSERT INTO device_counters (device, counter, value, last_ms) VALUES (?1, 'dropped_quarantined', ?2, ?3)
                     ON CONFLICT(device, counter) DO UPDATE SET value = value + excluded.value, last_ms = excluded.last_ms",
                    params![device, n, now],
                )?;
            }
            tx.commit()?;
            for (device, n) in per_device {
                *dropped.entry((device, "quarantined".into())).or_default() += n;
            }
            self.stats
                .dropped
                .fetch_add(gone.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.shrink()?;
        }
        Ok(())
    }

    /// Delete the chosen rows and count them, in one transaction.
    fn delete_chosen(&mut self, chosen: &[Chosen], dropped: &mut Dropped) -> rusqlite::Result<u64> {
        let now = crate::model::now_ms();
        let mut removed = Removed::default();
        for c in chosen {
            removed.add(&c.device, c.kind, c.payload_bytes);
        }
        let seqs: Vec<i64> = chosen.iter().map(|c| c.seq).collect();
        let tx = self.conn.transaction()?;
        let mut n = 0u64;
        {
            // Consecutive chosen `seq`s are one range (nothing else lies between them).
            let mut del = tx.prepare_cached("DELETE FROM messages WHERE seq BETWEEN ?1 AND ?2")?;
            for (first, last) in super::commit::seq_runs(&seqs) {
                n += del.execute(params![first, last])? as u64;
            }
            let mut drops = tx.prepare_cached(
                "INSERT INTO drops (device, kind, count, first_ms, last_ms) VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT(device, kind) DO UPDATE SET count = count + excluded.count, last_ms = excluded.last_ms",
            )?;
            let mut counter = tx.prepare_cached(
                "INSERT INTO device_counters (device, counter, value, last_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(device, counter) DO UPDATE SET value = value + excluded.value, last_ms = excluded.last_ms",
            )?;
            for ((device, kind), share) in &removed.0 {
                let count = share.rows as i64;
                drops.execute(params![device, kind.as_str(), count, now])?;
                counter.execute(params![device, format!("dropped_{kind}"), count, now])?;
            }
        }
        tx.commit()?;
        for ((device, kind), share) in &removed.0 {
            *dropped
                .entry((device.clone(), kind.as_str().to_owned()))
                .or_default() += share.rows as i64;
        }
        if let Some(t) = self.tally.as_mut() {
            removed.apply(t);
        }
        self.stats
            .dropped
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// "Once per burst" for the cap's error log: the first pass that drops undelivered
/// messages is logged at once; later ones within [`CapLog::WINDOW_MS`] are added up and
/// logged together when the window has passed (at the next pass or maintenance tick).
#[derive(Debug, Default)]
pub(super) struct CapLog {
    last_report_ms: Option<i64>,
    pending: Dropped,
    passes: u64,
}

/// One report: passes and rows dropped per (device, kind) since the last.
pub(super) struct CapReport {
    pub passes: u64,
    pub dropped: Dropped,
}

impl CapLog {
    pub const WINDOW_MS: i64 = 10_000;

    /// Add one pass's drops (possibly none); returns what to log now, if anything.
    pub fn pass(&mut self, dropped: &Dropped, now_ms: i64) -> Option<CapReport> {
        if !dropped.is_empty() {
            self.passes += 1;
            for (k, n) in dropped {
                *self.pending.entry(k.clone()).or_default() += n;
            }
        }
        if self.pending.is_empty() {
            return None;
        }
        let due = self
            .last_report_ms
            .is_none_or(|last| now_ms - last >= Self::WINDOW_MS);
        if !due {
            return None;
        }
        self.last_report_ms = Some(now_ms);
        Some(CapReport {
            passes: std::mem::take(&mut self.passes),
            dropped: std::mem::take(&mut self.pending),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn tally(rows: &[(&str, Kind, u64, u64)]) -> Tally {
        let mut t = Tally::default();
        for (device, kind, n, payload) in rows {
            for _ in 0..*n {
                t.add(device, *kind, *payload);
            }
        }
        t
    }

    #[test]
    fn the_biggest_holder_goes_first_and_only_down_to_the_next() {
        // flood: 1000 rows of 936 B (1000 B each in the tally), canary: 10 rows of 936 B.
        let t = tally(&[
            ("flood", Kind::Telemetry, 1000, 936),
            ("canary", Kind::Telemetry, 10, 936),
        ]);
        let p = plan(&t, 500_000);
        assert_eq!(p.quota("flood"), [500_000, 0, 0]);
        assert_eq!(p.quota("canary"), [0, 0, 0]);
        // Everything but the canary's share: both end at the same level.
        let p = plan(&t, 1_000_000);
        assert_eq!(p.quota("flood"), [995_000, 0, 0]);
        assert_eq!(p.quota("canary"), [5_000, 0, 0]);
        // More than everything: everything.
        let p = plan(&t, u64::MAX);
        assert_eq!(p.quota("flood"), [1_000_000, 0, 0]);
        assert_eq!(p.quota("canary"), [10_000, 0, 0]);
    }

    #[test]
    fn within_a_device_telemetry_goes_before_events_before_status() {
        let t = tally(&[
            ("a", Kind::Status, 10, 36),
            ("a", Kind::Events, 10, 936),
            ("a", Kind::Telemetry, 5, 936),
            ("b", Kind::Telemetry, 1, 36),
        ]);
        // a holds 1000 + 10000 + 5000; b 100.
        let p = plan(&t, 7_000);
        assert_eq!(p.quota("a"), [5_000, 2_000, 0]);
        // Down to b's level exactly: b keeps everything.
        let p = plan(&t, 15_900);
        assert_eq!(p.quota("a"), [5_000, 10_000, 900]);
        assert_eq!(p.quota("b"), [0, 0, 0]);
        // Past it: both come down to the same level, 75.
        let p = plan(&t, 15_950);
        assert_eq!(p.quota("a"), [5_000, 10_000, 925]);
        assert_eq!(p.quota("b"), [25, 0, 0]);
    }

    #[test]
    fn the_walk_takes_rows_until_each_quota_is_met() {
        let t = tally(&[("a", Kind::Telemetry, 4, 36), ("b", Kind::Telemetry, 1, 36)]);
        let mut p = plan(&t, 250); // a: 400 -> level 150: quota 250, three rows of 100
        assert_eq!(p.quota("a"), [250, 0, 0]);
        assert!(!p.take("b", Kind::Telemetry, 36));
        assert!(!p.take("a", Kind::Events, 36));
        assert!(p.take("a", Kind::Telemetry, 36));
        assert!(p.take("a", Kind::Telemetry, 36));
        assert!(!p.done());
        assert!(p.take("a", Kind::Telemetry, 36));
        assert!(p.done());
        assert!(!p.take("a", Kind::Telemetry, 36));
        assert!(!p.take("nobody", Kind::Telemetry, 36));
    }

    /// Random tallies: a plan takes at least what was asked (or everything held) and less
    /// than a byte per device more; every device it cuts is left with the same amount,
    /// and every device it spares holds no more than that; within a device telemetry goes
    /// before events before status.
    #[test]
    fn plans_level_the_biggest_holders_down() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for _ in 0..2_000 {
            let devices = rng.gen_range(1..8);
            let names: Vec<String> = (0..devices).map(|d| format!("d{d}")).collect();
            let mut t = Tally::default();
            for d in &names {
                for kind in DROP_ORDER {
                    if rng.gen_bool(0.6) {
                        for _ in 0..rng.gen_range(1..50) {
                            t.add(d, kind, rng.gen_range(0..2_000));
                        }
                    }
                }
            }
            let all = t.total_bytes();
            let free = rng.gen_range(0..=all + all / 4);
            let p = plan(&t, free);
            let held = |d: &str| t.of(d).iter().map(|s| s.bytes).sum::<u64>();
            let taken: u64 = names.iter().map(|d| p.quota(d).iter().sum::<u64>()).sum();
            assert!(
                taken >= free.min(all),
                "took {taken} of {free} ({all} held)"
            );
            assert!(taken <= free.min(all) + names.len() as u64);
            let mut cut_left = Vec::new();
            let mut spared_left = Vec::new();
            for d in &names {
                let (q, s) = (p.quota(d), t.of(d));
                assert!(q[1] == 0 || q[0] == s[0].bytes, "telemetry first");
                assert!(q[2] == 0 || q[1] == s[1].bytes, "then events");
                let lost: u64 = q.iter().sum();
                let left = held(d) - lost;
                if lost > 0 {
                    cut_left.push(left);
                } else {
                    spared_left.push(left);
                }
            }
            if let Some(&level) = cut_left.first() {
                assert!(cut_left.iter().all(|l| *l == level), "{cut_left:?}");
                assert!(
                    spared_left.iter().all(|l| *l <= level),
                    "{spared_left:?} > {level}"
                );
            }
            assert_eq!(
                p.open,
                names
                    .iter()
                    .map(|d| p.quota(d).iter().filter(|q| **q > 0).count())
                    .sum::<usize>()
            );
        }
    }

    #[test]
    fn cap_errors_are_logged_once_per_burst() {
        let mut log = CapLog::default();
        let one = |d: &str, n| -> Dropped { [((d.to_owned(), "telemetry".to_owned()), n)].into() };
        let first = log.pass(&one("a", 5), 0).unwrap();
        assert_eq!(
            (
                first.passes,
                first.dropped[&("a".into(), "telemetry".into())]
            ),
            (1, 5)
        );
        assert!(log.pass(&one("a", 7), 1_000).is_none());
        assert!(log.pass(&one("b", 1), 2_000).is_none());
        assert!(log.pass(&Dropped::new(), 9_999).is_none());
        let later = log.pass(&Dropped::new(), 10_000).unwrap();
        assert_eq!(later.passes, 2);
        assert_eq!(later.dropped.len(), 2);
        assert_eq!(later.dropped[&("a".into(), "telemetry".into())], 7);
        assert!(
            log.pass(&Dropped::new(), 30_000).is_none(),
            "nothing pending"
        );
        assert!(log.pass(&one("a", 1), 30_001).is_some(), "a new burst");
    }
}
