//! Which devices are connected: the authoritative count per device, kept here so that no
//! connect or disconnect can be lost; the app records changes with
//! [`PresenceBoard::take_changes`].

use std::collections::HashMap;
use std::sync::Mutex;

use crate::model::{now_ms, DeviceId, Presence};

#[derive(Debug, Default)]
pub struct PresenceBoard {
    slots: Mutex<HashMap<DeviceId, Slot>>,
    /// Woken on every connect and disconnect.
    pub changed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Slot {
    connections: u32,
    recorded_online: bool,
    at_ms: i64,
    connects: u32,
    disconnects: u32,
}

impl PresenceBoard {
    pub(crate) fn update(&self, device: &str, connected: bool) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(device.to_owned()).or_default();
        if connected {
            slot.connections += 1;
            slot.connects += 1;
        } else {
            slot.connections = slot.connections.saturating_sub(1);
            slot.disconnects += 1;
        }
        slot.at_ms = now_ms();
        drop(slots);
        self.changed.notify_one();
    }

    /// Devices whose state or counts changed since the last call.
    pub fn take_changes(&self) -> Vec<Presence> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (device, slot) in slots.iter_mut() {
            let online = slot.connections > 0;
            if online != slot.recorded_online || slot.connects > 0 || slot.disconnects > 0 {
                out.push(Presence {
                    device: device.clone(),
                    online,
                    at_ms: slot.at_ms,
                    connects: std::mem::take(&mut slot.connects),
                    disconnects: std::mem::take(&mut slot.disconnects),
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
