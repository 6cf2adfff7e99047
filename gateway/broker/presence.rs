//! Which devices are connected: the authoritative count per device, kept here so that no
//! connect or disconnect can be lost; the app records changes with
//! [`PresenceBoard::take_changes`].
//!
//! Time online is kept here too, exactly: a device is online from its first connection
//! to the close of its last, and each such period becomes pieces (from, to) handed over
//! with the changes, the open period's part up to now on every take that asks for it
//! (once a minute, and at the stop). However long the recording waits (a writer under
//! backpressure), connects and disconnects folded into one change keep their own times.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::{now_ms, DeviceId, Presence};

#[derive(Debug, Default)]
pub struct PresenceBoard {
    slots: Mutex<HashMap<DeviceId, Slot>>,
    /// Woken on every connect and disconnect.
    pub changed: tokio::sync::Notify,
}

/// Pieces of time online one device may hold between two takes; past it the two oldest
/// are folded into one with their summed length, ending where the second ended (the
/// total stays exact; only which hour a folded part counts in may move).
const MAX_PIECES: usize = 64;

#[derive(Debug, Default)]
struct Slot {
    connections: u32,
    recorded_online: bool,
    at_ms: i64,
    connects: u32,
    disconnects: u32,
    /// While online: since when its time online is not yet in `pieces`.
    open_from: Option<i64>,
    pieces: Vec<(i64, i64)>,
}

impl Slot {
    fn piece(&mut self, from: i64, to: i64) {
        if to <= from {
            return;
        }
        self.pieces.push((from, to));
        if self.pieces.len() > MAX_PIECES {
            let (a, b) = (self.pieces[0], self.pieces[1]);
            let length = (a.1 - a.0) + (b.1 - b.0);
            self.pieces.splice(0..2, [(b.1 - length, b.1)]);
        }
    }
}

impl PresenceBoard {
    pub(crate) fn update(&self, device: &str, connected: bool) {
        self.update_at(device, connected, now_ms());
    }

    pub(crate) fn update_at(&self, device: &str, connected: bool, now: i64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(device.to_owned()).or_default();
        if connected {
            if slot.connections == 0 {
                slot.open_from = Some(now);
            }
            slot.connections += 1;
            slot.connects += 1;
        } else {
            if slot.connections == 1 {
                if let Some(from) = slot.open_from.take() {
                    slot.piece(from, now);
                }
            }
            slot.connections = slot.connections.saturating_sub(1);
            slot.disconnects += 1;
        }
        slot.at_ms = now;
        drop(slots);
        self.changed.notify_one();
    }

    /// Devices whose state, counts or time online changed since the last call; with
    /// `accrue`, every open period's time up to now too.
    pub fn take_changes(&self, accrue: bool) -> Vec<Presence> {
        self.take_changes_at(accrue, now_ms())
    }

    pub fn take_changes_at(&self, accrue: bool, now: i64) -> Vec<Presence> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (device, slot) in slots.iter_mut() {
            if let (true, Some(from)) = (accrue, slot.open_from) {
                if from < now {
                    slot.piece(from, now);
                    slot.open_from = Some(now);
                }
            }
            let online = slot.connections > 0;
            if online != slot.recorded_online
                || slot.connects > 0
                || slot.disconnects > 0
                || !slot.pieces.is_empty()
            {
                out.push(Presence {
                    device: device.clone(),
                    online,
                    at_ms: slot.at_ms,
                    connects: std::mem::take(&mut slot.connects),
                    disconnects: std::mem::take(&mut slot.disconnects),
                    online_pieces: std::mem::take(&mut slot.pieces),
                    online_recorded_to: slot.open_from,
                });
                slot.recorded_online = online;
            }
        }
        out
    }

    pub fn online_count(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.values().filter(|s| s.connections > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000;

    /// Folded changes keep each connection's own times; overlapping connections of one
    /// device count once; an open period is handed over up to now on an accruing take.
    #[test]
    fn time_online_is_exact_however_changes_are_folded() {
        let b = PresenceBoard::default();
        b.update_at("k1", true, 10 * S);
        b.update_at("k1", false, 70 * S);
        b.update_at("k1", true, 100 * S);
        b.update_at("k1", true, 110 * S); // a second connection
        b.update_at("k1", false, 130 * S);
        b.update_at("k1", false, 160 * S);
        b.update_at("k1", true, 200 * S);
        let changes = b.take_changes_at(false, 250 * S);
        assert_eq!(changes.len(), 1);
        let c = &changes[0];
        assert_eq!((c.online, c.connects, c.disconnects), (true, 4, 3));
        assert_eq!(c.online_pieces, [(10 * S, 70 * S), (100 * S, 160 * S)]);
        assert_eq!(c.online_recorded_to, Some(200 * S));
        let changes = b.take_changes_at(true, 260 * S);
        assert_eq!(changes[0].online_pieces, [(200 * S, 260 * S)]);
        assert_eq!(changes[0].online_recorded_to, Some(260 * S));
        assert!(b.take_changes_at(false, 270 * S).is_empty());
        b.update_at("k1", false, 290 * S);
        let changes = b.take_changes_at(true, 300 * S);
        assert_eq!(changes[0].online_pieces, [(260 * S, 290 * S)]);
        assert_eq!(
            (changes[0].online, changes[0].online_recorded_to),
            (false, None)
        );
    }

    /// A device reconnecting in a storm between two takes: its pieces are bounded, and
    /// their total stays exact.
    #[test]
    fn pieces_are_bounded_and_keep_their_total() {
        let b = PresenceBoard::default();
        for i in 0..1000 {
            b.update_at("k1", true, i * 10 * S);
            b.update_at("k1", false, i * 10 * S + 3 * S);
        }
        let c = &b.take_changes_at(true, 20_000 * S)[0];
        assert!(c.online_pieces.len() <= MAX_PIECES);
        let total: i64 = c.online_pieces.iter().map(|(a, b)| b - a).sum();
        assert_eq!(total, 1000 * 3 * S);
        assert!(c.online_pieces.windows(2).all(|w| w[0].1 <= w[1].0));
    }
}
