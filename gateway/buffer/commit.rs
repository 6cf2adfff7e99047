//! One batch, one transaction: rows, per-device counters and presence, rollups.

use std::sync::atomic::Ordering;

use rusqlite::{params, OptionalExtension};

use super::cap;
use super::retention::DELIVERIES_BUCKET_MS;
use super::rollups::apply_rollups;
use super::writer::Writer;
use super::Write;
use std::collections::HashMap;

/// Per-device changes gathered over one batch, applied with one statement per device.
#[derive(Default)]
pub(super) struct DeviceDelta {
    pub(super) last_seen_ms: Option<i64>,
    /// Online, since when, and up to when its time online is recorded.
    pub(super) presence: Option<(bool, i64, Option<i64>)>,
    pub(super) status: Option<(String, i64)>,
    pub(super) last_rejection: Option<(String, String, i64)>,
    pub(super) counters: HashMap<&'static str, (i64, i64)>,
    /// Rows stored, per kind the cap may drop (for its tally).
    pub(super) stored: [cap::Share; 3],
}

impl Writer {
    pub(super) fn commit(&mut self, batch: &[Write]) -> rusqlite::Result<()> {
        self.seqs.clear();
        self.command_changes.clear();
        self.answers.clear();
        self.extra_rows.clear();
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
        let mut quarantined: Vec<(String, i64)> = Vec::new();
        // Per-device command counters: (device, counter, at).
        let mut command_counts: Vec<(String, &'static str, i64)> = Vec::new();
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
                    Write::Command(op) => {
                        let applied = super::commands::apply(&tx, op)?;
                        let changes = applied.changed.len();
                        for (i, r) in applied.changed.iter().chain(&applied.reported).enumerate() {
                            let payload = super::commands::outbox_payload(r);
                            insert_msg.execute(params![
                                r.device,
                                r.profile,
                                crate::model::Kind::Command.as_str(),
                                r.updated_ms,
                                payload
                            ])?;
                            let seq = tx.last_insert_rowid();
                            last_seq = last_seq.max(seq);
                            self.extra_rows.push(crate::model::Stored {
                                seq,
                                device: r.device.clone(),
                                profile: r.profile.clone(),
                                kind: crate::model::Kind::Command,
                                received_ms: r.updated_ms,
                                payload,
                            });
                            // A device nobody configured gets no row (central may name any).
                            if !r.profile.is_empty() && i < changes {
                                command_counts.push((
                                    r.device.clone(),
                                    command_counter(r.state),
                                    r.updated_ms,
                                ));
                            }
                        }
                        if let Some((device, what)) = applied.counter {
                            command_counts.push((device, what, crate::model::now_ms()));
                        }
                        self.command_changes.extend(applied.changed);
                        self.command_changes.extend(applied.touched);
                        if let Some(a) = applied.answer {
                            self.answers.push(a);
                        }
                    }
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
                    Write::Quarantined { rows, at_ms } => {
                        for &(seq, reason) in rows {
                            let device: Option<String> = tx
                                .query_row(
                                    "INSERT INTO quarantine
                                       (seq, device, profile, kind, received_ms, payload, reason, at_ms)
                                     SELECT seq, device, profile, kind, received_ms, payload, ?2, ?3
                                     FROM messages WHERE seq = ?1 AND delivered_ms IS NULL
                                     RETURNING device",
                                    params![seq, reason, at_ms],
                                    |r| r.get(0),
                                )
                                .optional()?;
                            let Some(device) = device else {
                                continue; // delivered meanwhile, or dropped by the cap
                            };
                            cap::delete_tracked(
                                &tx,
                                &mut self.tally,
                                "DELETE FROM messages WHERE seq = ?1",
                                params![seq],
                            )?;
                            quarantined.push((device, *at_ms));
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
        for (device, what, at_ms) in &command_counts {
            tx.prepare_cached(
                "INSERT INTO device_counters (device, counter, value, last_ms)
                 SELECT ?1, ?2, 1, ?3 WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)
                 ON CONFLICT(device, counter) DO UPDATE SET
                     value = value + 1, last_ms = MAX(last_ms, excluded.last_ms)",
            )?
            .execute(params![device, what, at_ms])?;
        }
        for (device, at_ms) in &quarantined {
            tx.prepare_cached(
                "INSERT INTO device_counters (device, counter, value, last_ms)
                 VALUES (?1, 'quarantined', 1, ?2)
                 ON CONFLICT(device, counter) DO UPDATE SET
                     value = value + 1, last_ms = MAX(last_ms, excluded.last_ms)",
            )?
            .execute(params![device, at_ms])?;
        }
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

/// The per-device counter of a command state (`devices`, `status`).
fn command_counter(state: super::commands::CommandState) -> &'static str {
    use super::commands::CommandState::*;
    match state {
        Queued => "command_queued",
        Sent => "command_sent",
        Delivered => "command_delivered",
        Succeeded => "command_succeeded",
        Failed => "command_failed",
        TimedOut => "command_timed_out",
        Expired => "command_expired",
        Rejected => "command_rejected",
    }
}

/// Runs of consecutive integers in `seqs` (any order, duplicates allowed), ascending.
pub(super) fn seq_runs(seqs: &[i64]) -> Vec<(i64, i64)> {
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

pub(super) fn bump(d: &mut DeviceDelta, counter: &'static str, at_ms: i64) {
    bump_by(d, counter, 1, at_ms);
}

pub(super) fn bump_by(d: &mut DeviceDelta, counter: &'static str, n: i64, at_ms: i64) {
    if n == 0 {
        return;
    }
    let e = d.counters.entry(counter).or_insert((0, at_ms));
    e.0 += n;
    e.1 = e.1.max(at_ms);
}

pub(super) fn apply_devices(
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
