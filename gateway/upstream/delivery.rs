//! Delivery to central as a state machine without I/O: what to send next, what central's
//! answers mean, when a row is quarantined. The forwarder (`mod.rs`) is the glue: it feeds
//! this type the connection's events and the rows it reads, and carries out what it says.
//!
//! # Rules
//! - **In order, live first.** At each CONNACK the newest committed `seq` becomes the
//!   boundary: rows after it are live (sent first, on the live topics); rows up to it are
//!   the backlog, sent with the room left, from the oldest undelivered one, on the
//!   backfill topics. Per topic, rows first reach central in `seq` order.
//! - **Window.** At most `min(max_inflight, central's Receive Maximum)` rows are sent and
//!   not yet acknowledged.
//! - **Delivered** only on a PUBACK with reason 0x00 (success) or 0x10 (no matching
//!   subscribers: central took it, nobody listens yet). A PUBACK with a reason >= 0x80
//!   quarantines the row with that reason. Anything else (0x01-0x7f, never sent for a
//!   PUBACK) counts as a refusal too.
//! - **Too large.** A row whose packet is larger than central's Maximum Packet Size is
//!   quarantined as `too_large_for_central` without being sent.
//! - **Refused without a word.** A row that is the oldest unacknowledged one at
//!   [`LOSSES_TO_QUARANTINE`] consecutive connection losses (each after a CONNACK: a central
//!   that cannot be reached does not count) is quarantined as `refused_by_central`. After
//!   the first such loss the suspect row is sent alone, so the next losses are its own.
//! - **Nothing lost.** A connection loss forgets everything in flight; the next CONNACK
//!   rewinds to the oldest row neither delivered nor quarantined (the glue hands over the
//!   outcomes first, so the rewind reads them back as done).

use std::collections::{HashMap, VecDeque};

/// Consecutive connection losses with the same oldest unacknowledged row that make it
/// `refused_by_central`.
pub(crate) const LOSSES_TO_QUARANTINE: u32 = 3;

/// Why a row was quarantined (its stable name is stored and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Quarantine {
    /// Central dropped the connection while this row was the oldest unacknowledged, too
    /// many times in a row.
    RefusedByCentral,
    /// Larger than central's Maximum Packet Size: never sent.
    TooLargeForCentral,
    /// Central's PUBACK refused it with this MQTT 5 reason code.
    Refused(u8),
}

impl Quarantine {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Quarantine::RefusedByCentral => "refused_by_central",
            Quarantine::TooLargeForCentral => "too_large_for_central",
            Quarantine::Refused(code) => match code {
                0x80 => "unspecified_error",
                0x83 => "implementation_specific_error",
                0x87 => "not_authorized",
                0x90 => "topic_name_invalid",
                0x91 => "packet_identifier_in_use",
                0x97 => "quota_exceeded",
                0x99 => "payload_format_invalid",
                _ => "refused_other",
            },
        }
    }
}

/// The PUBACK reasons that mean central took the message.
fn accepted(reason: u8) -> bool {
    reason == 0x00 || reason == 0x10
}

/// Where a row handed to [`Delivery::offer`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Lane {
    Live,
    Backfill,
}

/// What to do with an offered row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Publish it now (it is counted in the window).
    Send,
    /// Do not send it: quarantined (recorded for [`Delivery::take_outcomes`]).
    Quarantined(Quarantine),
    /// No room, not connected, or the suspect must go first: offer it again later.
    Later,
    /// Already sent or settled on this connection (behind its lane's cursor): skip it.
    Passed,
}

/// A packet handed to the client whose packet id is not known yet, or in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Row(i64),
    /// The gateway's own status or health message (no row behind it).
    Own,
}

/// What central's limits are on this connection (from CONNACK; `None`: not said).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) receive_maximum: Option<u16>,
    pub(crate) maximum_packet_size: Option<u32>,
}

/// Final outcomes of rows, for the writer: delivered `seq`s and quarantined ones.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcomes {
    pub(crate) delivered: Vec<i64>,
    pub(crate) quarantined: Vec<(i64, Quarantine)>,
}

#[derive(Debug)]
pub(crate) struct Delivery {
    max_inflight: usize,
    window: usize,
    max_packet: Option<usize>,
    connected: bool,
    queued: VecDeque<Sent>,
    inflight: HashMap<u16, Sent>,
    /// Newest `seq` committed at the CONNACK: the live/backfill boundary.
    boundary: i64,
    live_cursor: i64,
    backfill_cursor: i64,
    backfill_done: bool,
    /// The row suspected of making central drop the connection, and how many losses in a
    /// row it was the oldest unacknowledged.
    suspect: Option<(i64, u32)>,
    /// The lane the suspect was sent on (its resend goes the same way).
    suspect_lane: Lane,
    /// The suspect has been sent on this connection (alone, until it is acknowledged).
    probing: bool,
    /// The suspect was settled on this connection: the backlog read skips it.
    probed: Option<i64>,
    /// Rows sent on this connection and not yet acknowledged, with their lane.
    unacked: std::collections::BTreeMap<i64, Lane>,
    outcomes: Outcomes,
}

impl Delivery {
    pub(crate) fn new(max_inflight: usize) -> Delivery {
        let max_inflight = max_inflight.max(1);
        Delivery {
            max_inflight,
            window: max_inflight,
            max_packet: None,
            connected: false,
            queued: VecDeque::new(),
            inflight: HashMap::new(),
            boundary: 0,
            live_cursor: 0,
            backfill_cursor: 0,
            backfill_done: true,
            suspect: None,
            suspect_lane: Lane::Backfill,
            probing: false,
            probed: None,
            unacked: Default::default(),
            outcomes: Outcomes::default(),
        }
    }

    /// A CONNACK: the window and packet limit of this connection; rows after `last_seq`
    /// are live. Call after the outcomes so far were handed to the writer and committed.
    pub(crate) fn on_connack(&mut self, limits: Limits, last_seq: i64) {
        self.connected = true;
        self.window = match limits.receive_maximum {
            Some(r) => self.max_inflight.min(r.max(1) as usize),
            None => self.max_inflight,
        };
        self.max_packet = limits.maximum_packet_size.map(|m| m as usize);
        self.queued.clear();
        self.inflight.clear();
        self.unacked.clear();
        self.boundary = last_seq;
        self.live_cursor = last_seq;
        self.backfill_cursor = 0;
        self.backfill_done = false;
        self.probing = false;
        self.probed = None;
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected
    }

    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// Packets that may be handed to the client now.
    pub(crate) fn room(&self) -> usize {
        if !self.connected {
            return 0;
        }
        if self.probing {
            return 0;
        }
        self.window
            .saturating_sub(self.queued.len() + self.inflight.len())
    }

    /// The row that must be sent alone before anything else (a suspect), if any and not
    /// sent yet on this connection.
    pub(crate) fn probe_due(&self) -> Option<(i64, Lane)> {
        match self.suspect {
            Some((seq, _)) if self.connected && !self.probing => Some((seq, self.suspect_lane)),
            _ => None,
        }
    }

    /// Where live rows continue (rows after this are wanted).
    pub(crate) fn live_cursor(&self) -> i64 {
        self.live_cursor
    }

    /// The backlog still to send: rows after `.0` up to `.1`; `None` when done.
    pub(crate) fn backfill_range(&self) -> Option<(i64, i64)> {
        (!self.backfill_done).then_some((self.backfill_cursor, self.boundary))
    }

    /// The backlog read found nothing more.
    pub(crate) fn backfill_finished(&mut self) {
        self.backfill_done = true;
    }

    /// A row read from the buffer (or handed over live): send it or not. `packet_bytes` is
    /// the size of its PUBLISH packet. Rows of a lane are offered in `seq` order.
    pub(crate) fn offer(&mut self, lane: Lane, seq: i64, packet_bytes: usize) -> Offer {
        if !self.connected {
            return Offer::Later;
        }
        let is_probe = self.probe_due().is_some_and(|(s, _)| s == seq);
        if !is_probe {
            let cursor = match lane {
                Lane::Live => self.live_cursor,
                Lane::Backfill => self.backfill_cursor,
            };
            let outside = lane == Lane::Backfill && seq > self.boundary;
            if seq <= cursor || outside || self.unacked.contains_key(&seq) {
                return Offer::Passed;
            }
            if self.probed == Some(seq) {
                self.advance(lane, seq);
                return Offer::Passed;
            }
            // The suspect goes first, alone; nothing else while it is in flight.
            if self.suspect.is_some() || self.room() == 0 {
                return Offer::Later;
            }
            self.advance(lane, seq);
        }
        if self.max_packet.is_some_and(|m| packet_bytes > m) {
            if is_probe {
                self.suspect = None;
                self.probed = Some(seq);
            }
            self.outcomes
                .quarantined
                .push((seq, Quarantine::TooLargeForCentral));
            return Offer::Quarantined(Quarantine::TooLargeForCentral);
        }
        if is_probe {
            self.probing = true;
        }
        self.queued.push_back(Sent::Row(seq));
        self.unacked.insert(seq, lane);
        Offer::Send
    }

    fn advance(&mut self, lane: Lane, seq: i64) {
        match lane {
            Lane::Live => self.live_cursor = seq,
            Lane::Backfill => self.backfill_cursor = seq,
        }
    }

    /// The gateway's own message was handed to the client.
    pub(crate) fn own_sent(&mut self) {
        self.queued.push_back(Sent::Own);
    }

    /// The client wrote the next queued packet with this packet id.
    pub(crate) fn on_publish_sent(&mut self, pkid: u16) {
        if let Some(sent) = self.queued.pop_front() {
            self.inflight.insert(pkid, sent);
        }
    }

    /// Central's PUBACK. Returns the row's outcome, if the packet id was one of ours.
    pub(crate) fn on_puback(&mut self, pkid: u16, reason: u8) -> Option<(i64, Option<Quarantine>)> {
        let Some(Sent::Row(seq)) = self.inflight.remove(&pkid) else {
            return None;
        };
        self.unacked.remove(&seq);
        if self.suspect.is_some_and(|(s, _)| s == seq) {
            self.suspect = None;
            self.probing = false;
            self.probed = Some(seq);
        }
        if accepted(reason) {
            self.outcomes.delivered.push(seq);
            Some((seq, None))
        } else {
            let q = Quarantine::Refused(reason);
            self.outcomes.quarantined.push((seq, q));
            Some((seq, Some(q)))
        }
    }

    /// The connection ended. `after_connack`: it had been accepted (a central that cannot
    /// be reached is not a refusal). The suspect is the oldest row written to central and
    /// not acknowledged. Returns a row quarantined as `refused_by_central`.
    pub(crate) fn on_connection_lost(&mut self, after_connack: bool) -> Option<i64> {
        let was_connected = self.connected && after_connack;
        self.connected = false;
        self.probing = false;
        // The oldest row central has been sent (not one still waiting in the client).
        let oldest = self
            .inflight
            .values()
            .filter_map(|s| match s {
                Sent::Row(seq) => Some(*seq),
                Sent::Own => None,
            })
            .min()
            .and_then(|seq| self.unacked.get(&seq).map(|&lane| (seq, lane)));
        self.queued.clear();
        self.inflight.clear();
        self.unacked.clear();
        if !was_connected {
            return None;
        }
        let Some((oldest, lane)) = oldest else {
            self.suspect = None;
            return None;
        };
        let losses = match self.suspect {
            Some((s, n)) if s == oldest => n + 1,
            _ => 1,
        };
        if losses >= LOSSES_TO_QUARANTINE {
            self.suspect = None;
            self.outcomes
                .quarantined
                .push((oldest, Quarantine::RefusedByCentral));
            return Some(oldest);
        }
        self.suspect = Some((oldest, losses));
        self.suspect_lane = lane;
        None
    }

    /// The suspect row is not in the buffer any more (delivered, dropped by the cap).
    pub(crate) fn forget_suspect(&mut self, seq: i64) {
        if self.suspect.is_some_and(|(s, _)| s == seq) {
            self.suspect = None;
            self.probing = false;
        }
    }

    /// An undelivered row behind the backlog's cursor that is not in flight (put back from
    /// the quarantine, say): the backlog is read again from just before it.
    pub(crate) fn rewind_backfill(&mut self, seq: i64) -> bool {
        if !self.connected || self.unacked.contains_key(&seq) {
            return false;
        }
        let behind = self.backfill_done || seq <= self.backfill_cursor;
        if !behind || seq > self.boundary.max(self.live_cursor) {
            return false;
        }
        self.backfill_cursor = self.backfill_cursor.min(seq - 1);
        self.boundary = self.boundary.max(seq);
        self.backfill_done = false;
        true
    }

    /// Outcomes since the last call, for the writer.
    pub(crate) fn take_outcomes(&mut self) -> Outcomes {
        std::mem::take(&mut self.outcomes)
    }

    pub(crate) fn pending_outcomes(&self) -> usize {
        self.outcomes.delivered.len() + self.outcomes.quarantined.len()
    }

    /// Rows and own messages sent and not yet acknowledged.
    pub(crate) fn in_flight(&self) -> usize {
        self.queued.len() + self.inflight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Row {
        Good,
        /// Central drops the connection when it reads this one.
        Poison,
        /// 2,000 bytes: over a 1,500-byte central limit.
        Big,
        /// Central answers 0x87 (not authorized).
        Refused,
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Commit,
        Connect,
        Fill,
        Transmit,
        /// Central handles the oldest packet it has (reason 0x00 or 0x10 when it takes it).
        Handle(bool),
        /// The connection is lost (not central's doing).
        Drop,
        Flush,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Db {
        Undelivered,
        Delivered,
        Quarantined(Quarantine),
    }

    struct Sim {
        rows: Vec<Row>,
        limits: Limits,
        committed: usize,
        db: Vec<Db>,
        sm: Delivery,
        /// Handed to the client, not yet written: (seq, lane).
        client: VecDeque<(i64, Lane)>,
        /// Written, not yet handled by central: (pkid, seq, lane).
        central: VecDeque<(u16, i64, Lane)>,
        next_pkid: u16,
        /// Rows central took, per lane, first arrivals in order.
        first: HashMap<Lane, Vec<i64>>,
        seen: std::collections::HashSet<(Lane, i64)>,
        drops: bool,
    }

    impl Sim {
        fn size(&self, seq: i64) -> usize {
            match self.rows[seq as usize - 1] {
                Row::Big => 2000,
                _ => 200,
            }
        }

        fn flush(&mut self) {
            let o = self.sm.take_outcomes();
            for seq in o.delivered {
                let at = &mut self.db[seq as usize - 1];
                assert_eq!(*at, Db::Undelivered, "row {seq} settled twice");
                *at = Db::Delivered;
            }
            for (seq, q) in o.quarantined {
                let at = &mut self.db[seq as usize - 1];
                assert_eq!(*at, Db::Undelivered, "row {seq} settled twice");
                *at = Db::Quarantined(q);
            }
        }

        fn lost(&mut self, after_connack: bool) {
            self.sm.on_connection_lost(after_connack);
            self.client.clear();
            self.central.clear();
        }

        fn step(&mut self, op: Op) {
            match op {
                Op::Commit => self.committed = (self.committed + 1).min(self.rows.len()),
                Op::Connect if !self.sm.connected() => {
                    self.flush();
                    self.sm.on_connack(self.limits, self.committed as i64);
                    self.next_pkid = 1;
                }
                Op::Connect => {}
                Op::Fill => self.fill(),
                Op::Transmit => {
                    while let Some((seq, lane)) = self.client.pop_front() {
                        let pkid = self.next_pkid;
                        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
                        self.sm.on_publish_sent(pkid);
                        self.central.push_back((pkid, seq, lane));
                    }
                }
                Op::Handle(no_subscribers) => {
                    let Some((pkid, seq, lane)) = self.central.pop_front() else {
                        return;
                    };
                    match self.rows[seq as usize - 1] {
                        Row::Poison | Row::Big => self.lost(true),
                        Row::Refused => {
                            self.sm.on_puback(pkid, 0x87);
                        }
                        Row::Good => {
                            if self.seen.insert((lane, seq)) {
                                self.first.entry(lane).or_default().push(seq);
                            }
                            self.sm
                                .on_puback(pkid, if no_subscribers { 0x10 } else { 0 });
                        }
                    }
                }
                Op::Drop => {
                    if self.sm.connected() {
                        self.drops = true;
                    }
                    self.lost(self.sm.connected());
                }
                Op::Flush => self.flush(),
            }
        }

        fn undelivered(&self, seq: i64) -> bool {
            self.db[seq as usize - 1] == Db::Undelivered
        }

        /// What the forwarder does with room: the suspect alone, else live rows, then the
        /// backlog, read from the "database" (rows not settled there).
        fn fill(&mut self) {
            if !self.sm.connected() {
                return;
            }
            if let Some((seq, lane)) = self.sm.probe_due() {
                if self.undelivered(seq) {
                    if self.sm.offer(lane, seq, self.size(seq)) == Offer::Send {
                        self.client.push_back((seq, lane));
                    }
                } else {
                    self.sm.forget_suspect(seq);
                }
                if self.sm.probe_due().is_none() && self.sm.room() == 0 {
                    return;
                }
            }
            let from = self.sm.live_cursor();
            for seq in from + 1..=self.committed as i64 {
                if !self.undelivered(seq) {
                    continue;
                }
                match self.sm.offer(Lane::Live, seq, self.size(seq)) {
                    Offer::Send => self.client.push_back((seq, Lane::Live)),
                    Offer::Later => return,
                    Offer::Passed | Offer::Quarantined(_) => {}
                }
            }
            if let Some((after, upto)) = self.sm.backfill_range() {
                let mut any = false;
                for seq in after + 1..=upto {
                    if !self.undelivered(seq) {
                        continue;
                    }
                    any = true;
                    match self.sm.offer(Lane::Backfill, seq, self.size(seq)) {
                        Offer::Send => self.client.push_back((seq, Lane::Backfill)),
                        Offer::Later => return,
                        Offer::Passed | Offer::Quarantined(_) => {}
                    }
                }
                if !any {
                    self.sm.backfill_finished();
                }
            }
        }
    }

    fn row() -> impl Strategy<Value = Row> {
        prop_oneof![
            6 => Just(Row::Good),
            1 => Just(Row::Poison),
            1 => Just(Row::Big),
            1 => Just(Row::Refused),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Commit),
            2 => Just(Op::Connect),
            3 => Just(Op::Fill),
            3 => Just(Op::Transmit),
            4 => any::<bool>().prop_map(Op::Handle),
            1 => Just(Op::Drop),
            2 => Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// For any interleaving of commits, sends, acknowledgements, reason codes and
        /// connection losses: every row ends delivered or quarantined exactly once, with
        /// the right reason, and per lane the first arrivals are in `seq` order.
        #[test]
        fn every_row_ends_delivered_or_quarantined_once(
            rows in proptest::collection::vec(row(), 1..24),
            ops in proptest::collection::vec(op(), 0..200),
            max_inflight in 1usize..6,
            receive_maximum in proptest::option::of(1u16..4),
            limit in any::<bool>(),
        ) {
            let n = rows.len();
            let limits = Limits {
                receive_maximum,
                maximum_packet_size: limit.then_some(1500),
            };
            let mut sim = Sim {
                rows,
                limits,
                committed: 0,
                db: vec![Db::Undelivered; n],
                sm: Delivery::new(max_inflight),
                client: VecDeque::new(),
                central: VecDeque::new(),
                next_pkid: 1,
                first: HashMap::new(),
                seen: Default::default(),
                drops: false,
            };
            for op in ops {
                sim.step(op);
                prop_assert!(sim.sm.in_flight() <= sim.sm.window().max(1));
            }
            // Then everything is committed and central stays up: all must settle.
            sim.committed = n;
            let mut rounds = 0;
            while sim.db.contains(&Db::Undelivered) {
                rounds += 1;
                prop_assert!(rounds < 10 * n + 50, "stuck: {:?}", sim.db);
                for op in [Op::Connect, Op::Fill, Op::Transmit] {
                    sim.step(op);
                }
                while !sim.central.is_empty() {
                    sim.step(Op::Handle(false));
                }
                sim.step(Op::Flush);
            }
            for (i, (row, db)) in sim.rows.iter().zip(&sim.db).enumerate() {
                let want = match row {
                    Row::Poison => Db::Quarantined(Quarantine::RefusedByCentral),
                    Row::Big if limit => Db::Quarantined(Quarantine::TooLargeForCentral),
                    Row::Big => Db::Quarantined(Quarantine::RefusedByCentral),
                    Row::Refused => Db::Quarantined(Quarantine::Refused(0x87)),
                    Row::Good => Db::Delivered,
                };
                // Losses that were not central's doing can make any row look guilty.
                let want = if sim.drops && *db == Db::Quarantined(Quarantine::RefusedByCentral) {
                    *db
                } else {
                    want
                };
                prop_assert_eq!(*db, want, "row {}", i + 1);
            }
            for (lane, seqs) in &sim.first {
                prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{:?}: {:?}", lane, seqs);
            }
        }
    }

    #[test]
    fn a_row_central_drops_the_connection_for_is_quarantined_after_three_losses() {
        let mut d = Delivery::new(4);
        d.on_connack(Limits::default(), 3);
        for seq in 1..=3 {
            assert_eq!(d.offer(Lane::Backfill, seq, 10), Offer::Send);
        }
        for pkid in 1..=3 {
            d.on_publish_sent(pkid);
        }
        assert_eq!(d.on_puback(1, 0), Some((1, None)));
        assert_eq!(d.on_connection_lost(true), None);
        // Next connection: row 2 alone first.
        d.on_connack(Limits::default(), 3);
        assert_eq!(d.probe_due(), Some((2, Lane::Backfill)));
        assert_eq!(d.offer(Lane::Backfill, 3, 10), Offer::Later);
        assert_eq!(d.offer(Lane::Backfill, 2, 10), Offer::Send);
        assert_eq!(d.room(), 0);
        d.on_publish_sent(1);
        assert_eq!(d.on_connection_lost(true), None);
        // A central that cannot be reached does not count.
        assert_eq!(d.on_connection_lost(false), None);
        d.on_connack(Limits::default(), 3);
        assert_eq!(d.offer(Lane::Backfill, 2, 10), Offer::Send);
        d.on_publish_sent(1);
        assert_eq!(d.on_connection_lost(true), Some(2));
        assert_eq!(
            d.take_outcomes(),
            Outcomes {
                delivered: vec![1],
                quarantined: vec![(2, Quarantine::RefusedByCentral)],
            }
        );
        d.on_connack(Limits::default(), 3);
        assert_eq!(d.probe_due(), None);
        assert_eq!(d.offer(Lane::Backfill, 3, 10), Offer::Send);
    }

    #[test]
    fn central_limits_shape_the_window_and_the_largest_row() {
        let mut d = Delivery::new(100);
        d.on_connack(
            Limits {
                receive_maximum: Some(2),
                maximum_packet_size: Some(1500),
            },
            0,
        );
        assert_eq!(d.window(), 2);
        assert_eq!(
            d.offer(Lane::Live, 1, 1501),
            Offer::Quarantined(Quarantine::TooLargeForCentral)
        );
        assert_eq!(d.offer(Lane::Live, 2, 1500), Offer::Send);
        assert_eq!(d.offer(Lane::Live, 3, 10), Offer::Send);
        assert_eq!(d.offer(Lane::Live, 4, 10), Offer::Later);
        d.on_publish_sent(7);
        d.on_publish_sent(8);
        assert_eq!(d.on_puback(8, 0x10), Some((3, None)));
        assert_eq!(
            d.on_puback(7, 0x97),
            Some((2, Some(Quarantine::Refused(0x97))))
        );
        assert_eq!(Quarantine::Refused(0x97).name(), "quota_exceeded");
    }
}
