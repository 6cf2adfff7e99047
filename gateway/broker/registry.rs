//! The device connections that are open now: per-device limits, session takeover,
//! persistent sessions, and the client ids the router sees.
//!
//! rumqttd's router keeps state per client id for the life of the process (metrics for
//! every clean session, the whole session for a persistent one), and its persistent
//! sessions mishandle shared subscriptions and unsubscribes. So the router only ever sees
//! clean sessions under ids from a bounded set: a device's connection is `dev:ID:cN`, N
//! its slot among the device's open connections (fewer than twice `max_per_device`:
//! connections taken over keep their slot until they have left the router). Device ids
//! contain no `:`, so no id can reach another device's (or the gateway's own links').
//!
//! A persistent session (clean session 0) is kept here: its subscriptions, restored when
//! the same client id connects again (MQTT's "session present"), for as long as the
//! process runs; messages published while the device is away are not queued for it. A
//! device may have at most `max_sessions` of them.
//!
//! MQTT's takeover rule (a CONNECT with the client id of an open connection closes that
//! connection) is applied here per device: the new connection waits for the old one to
//! finish, so the router sees the old disconnect before the new connect; if the old one
//! does not finish in time, the new one is refused ("server unavailable") and retries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::session::Kept;
use crate::model::DeviceId;

/// Why the gateway closes a connection from outside its own loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CloseReason {
    /// The gateway is stopping (MQTT 5 DISCONNECT 0x8B).
    Shutdown = 1,
    /// A new connection took over this client id (0x8E).
    TakenOver = 2,
    /// A reload removed or changed the device (0x87 not authorized).
    Revoked = 3,
}

/// How a connection is told to close, and how it says it has finished.
#[derive(Debug, Default)]
pub(crate) struct Control {
    close: CancellationToken,
    reason: AtomicU8,
    finished: CancellationToken,
}

impl Control {
    pub fn close(&self, reason: CloseReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        self.close.cancel();
    }

    /// Resolves when [`Control::close`] was called; returns the first reason given.
    pub async fn closed(&self) -> CloseReason {
        self.close.cancelled().await;
        match self.reason.load(Ordering::SeqCst) {
            2 => CloseReason::TakenOver,
            3 => CloseReason::Revoked,
            _ => CloseReason::Shutdown,
        }
    }
}

/// Why a connection may not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The device has `max_per_device` connections open (or twice as many still
    /// closing).
    TooManyConnections,
    /// A new persistent client id past `max_sessions` for the device.
    TooManySessions,
    /// Empty client id with a persistent session, or one too long or with characters
    /// the router refuses.
    ClientId,
    /// A reload removed or changed the device while this login was being checked.
    Revoked,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_per_device: usize,
    pub max_sessions: usize,
}

struct Open {
    id: u64,
    client_id: String,
    slot: usize,
    control: Arc<Control>,
    /// Taken over and closing: its slot stays taken until its ticket drops (the router
    /// still knows it), but it no longer counts against the limit.
    leaving: bool,
}

#[derive(Default)]
struct DeviceConnections {
    open: Vec<Open>,
    /// Persistent sessions, least recently used first: client id and what the session
    /// keeps (subscriptions, QoS 2 ids awaiting release, the last QoS 1 ids stored).
    sessions: Vec<(String, Kept)>,
    /// Last wills waiting out their MQTT 5 delay: client id, and how to cancel one.
    wills: Vec<(String, CancellationToken)>,
    /// Bumped by every reload that revokes the device.
    revision: u64,
}

/// Longest client id accepted (MQTT requires servers to accept 23 characters).
pub(crate) const MAX_CLIENT_ID: usize = 128;

/// A new connection's place.
pub(crate) struct Opened {
    pub ticket: Ticket,
    /// The connection it takes over, told to close.
    pub previous: Option<Arc<Control>>,
    /// It resumes a persistent session that existed (its subscriptions:
    /// [`Ticket::session_kept`], once the connection taken over has saved them).
    pub session_present: bool,
}

pub(crate) struct Registry {
    limits: Limits,
    next: AtomicU64,
    devices: Mutex<HashMap<DeviceId, DeviceConnections>>,
}

/// An open connection's place in the registry; dropping it frees the place and tells a
/// waiting takeover that this connection has finished.
pub(crate) struct Ticket {
    registry: Arc<Registry>,
    device: DeviceId,
    id: u64,
    /// The client id, when the session is persistent.
    persistent: Option<String>,
    pub router_id: String,
    pub control: Arc<Control>,
}

impl Ticket {
    /// What the persistent session this connection resumes kept.
    pub fn session_kept(&self) -> Kept {
        let Some(client_id) = &self.persistent else {
            return Kept::default();
        };
        let devices = self.registry.lock();
        devices
            .get(&self.device)
            .and_then(|d| d.sessions.iter().find(|(c, _)| c == client_id))
            .map(|(_, f)| f.clone())
            .unwrap_or_default()
    }

    /// Keep a persistent session's state for its next connection.
    pub fn save_session(&self, kept: Kept) {
        let Some(client_id) = &self.persistent else {
            return;
        };
        let mut devices = self.registry.lock();
        if let Some(d) = devices.get_mut(&self.device) {
            if let Some(s) = d.sessions.iter_mut().find(|(c, _)| c == client_id) {
                s.1 = kept;
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut devices = self.registry.lock();
        if let Some(d) = devices.get_mut(&self.device) {
            d.open.retain(|o| o.id != self.id);
        }
        drop(devices);
        self.control.finished.cancel();
    }
}

impl Registry {
    pub fn new(limits: Limits) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            next: AtomicU64::new(1),
            devices: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, DeviceConnections>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's revision: [`Registry::open`] refuses a login checked before a reload
    /// revoked the device.
    pub fn revision(&self, device: &str) -> u64 {
        self.lock().get(device).map_or(0, |d| d.revision)
    }

    /// Take a place for a new connection of `device`, whose login was checked at
    /// `revision`. A connection open with the same client id is told to close, and its
    /// [`Control`] returned so the caller can wait for it to finish. `clean`: no session
    /// is kept (a stored one is discarded); otherwise the client id's session is resumed
    /// or created, the least recently used one not open making room at `max_sessions`.
    /// A last will of this client waiting out its delay is cancelled.
    pub fn open(
        self: &Arc<Self>,
        device: &str,
        client_id: &str,
        clean: bool,
        revision: u64,
    ) -> Result<Opened, Refused> {
        if client_id.len() > MAX_CLIENT_ID
            || client_id.contains(['+', '#', '/', '$', '\0'])
            || (!clean && client_id.is_empty())
        {
            return Err(Refused::ClientId);
        }
        let mut devices = self.lock();
        let d = devices.entry(device.to_owned()).or_default();
        if d.revision != revision {
            return Err(Refused::Revoked);
        }
        let previous = if client_id.is_empty() {
            None
        } else {
            d.open
                .iter()
                .position(|o| !o.leaving && o.client_id == client_id)
        };
        let staying = d.open.iter().filter(|o| !o.leaving).count();
        if previous.is_none() && staying >= self.limits.max_per_device {
            return Err(Refused::TooManyConnections);
        }
        // Slots of connections still leaving stay taken; beyond twice the limit (a device
        // reconnecting in a storm) new ones wait until some have left.
        let Some(slot) =
            (0..self.limits.max_per_device * 2).find(|s| !d.open.iter().any(|o| o.slot == *s))
        else {
            return Err(Refused::TooManyConnections);
        };
        let mut stored = d.sessions.iter().position(|(c, _)| c == client_id);
        if let Some(i) = stored {
            // A session past its expiry is gone (MQTT 5 Session Expiry Interval).
            if d.sessions[i]
                .1
                .expires
                .is_some_and(|e| e <= std::time::Instant::now())
            {
                d.sessions.remove(i);
                stored = None;
            }
        }
        let session_present = match (clean, stored) {
            (true, Some(i)) => {
                d.sessions.remove(i);
                false
            }
            (true, None) => false,
            (false, Some(i)) => {
                let mut s = d.sessions.remove(i);
                s.1.expires = None;
                d.sessions.push(s);
                true
            }
            (false, None) => {
                if d.sessions.len() >= self.limits.max_sessions {
                    let open = &d.open;
                    let idle = d
                        .sessions
                        .iter()
                        .position(|(c, _)| !open.iter().any(|o| &o.client_id == c));
                    match idle {
                        Some(i) => {
                            d.sessions.remove(i);
                        }
                        None => return Err(Refused::TooManySessions),
                    }
                }
                d.sessions.push((client_id.to_owned(), Kept::default()));
                false
            }
        };
        d.wills.retain(|(c, cancel)| {
            let same = c == client_id;
            if same {
                cancel.cancel();
            }
            !same
        });
        let previous = previous.map(|i| {
            d.open[i].leaving = true;
            d.open[i].control.clone()
        });
        let control = Arc::new(Control::default());
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        d.open.push(Open {
            id,
            client_id: client_id.to_owned(),
            slot,
            control: control.clone(),
            leaving: false,
        });
        drop(devices);
        if let Some(p) = &previous {
            p.close(CloseReason::TakenOver);
        }
        Ok(Opened {
            ticket: Ticket {
                registry: self.clone(),
                device: device.to_owned(),
                id,
                persistent: (!clean).then(|| client_id.to_owned()),
                router_id: format!("dev:{device}:c{slot}"),
                control,
            },
            previous,
            session_present,
        })
    }

    /// A last will waits out its delay: the token to wait on (cancelled if the client
    /// connects again), or `None` when the device has `max_sessions` waiting already
    /// (then it is published at once).
    pub fn delay_will(&self, device: &str, client_id: &str) -> Option<CancellationToken> {
        let mut devices = self.lock();
        let d = devices.get_mut(device)?;
        d.wills.retain(|(c, cancel)| {
            let same = c == client_id;
            if same {
                cancel.cancel();
            }
            !same && !cancel.is_cancelled()
        });
        if d.wills.len() >= self.limits.max_sessions {
            return None;
        }
        let token = CancellationToken::new();
        d.wills.push((client_id.to_owned(), token.clone()));
        Some(token)
    }

    /// A delayed will has been handled (published or cancelled).
    pub fn will_done(&self, device: &str, token: &CancellationToken) {
        token.cancel();
        if let Some(d) = self.lock().get_mut(device) {
            d.wills.retain(|(_, t)| !t.is_cancelled());
        }
    }

    /// Close every open connection of these devices (a reload revoked them); logins
    /// checked before this are refused.
    pub fn close_devices(&self, devices: &[DeviceId], reason: CloseReason) {
        let mut all = self.lock();
        for d in devices {
            let c = all.entry(d.clone()).or_default();
            c.revision += 1;
            for o in &c.open {
                o.control.close(reason);
            }
        }
    }

    /// Close every open connection.
    pub fn close_all(&self, reason: CloseReason) {
        for c in self.lock().values() {
            for o in &c.open {
                o.control.close(reason);
            }
        }
    }

    /// Whether `device` has a connection open with `client_id`.
    #[cfg(test)]
    pub fn is_open(&self, device: &str, client_id: &str) -> bool {
        self.lock().get(device).is_some_and(|d| {
            d.open
                .iter()
                .any(|o| !o.leaving && o.client_id == client_id)
        })
    }

    /// Open connections of `device`.
    #[cfg(test)]
    pub fn count(&self, device: &str) -> usize {
        self.lock().get(device).map_or(0, |d| d.open.len())
    }
}

/// Wait until a taken-over connection has finished, at most `limit`.
pub(crate) async fn finished(control: &Control, limit: std::time::Duration) -> bool {
    tokio::time::timeout(limit, control.finished.cancelled())
        .await
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{QoS, RetainForwardRule};

    fn registry() -> Arc<Registry> {
        Registry::new(Limits {
            max_per_device: 2,
            max_sessions: 2,
        })
    }

    fn open(r: &Arc<Registry>, device: &str, client: &str, clean: bool) -> Result<Opened, Refused> {
        r.open(device, client, clean, r.revision(device))
    }

    #[test]
    fn connections_get_the_lowest_free_slot_and_a_bounded_count() {
        let r = registry();
        let a = open(&r, "k1", "a", true).unwrap().ticket;
        let b = open(&r, "k1", "b", false).unwrap().ticket;
        assert_eq!(
            (a.router_id.as_str(), b.router_id.as_str()),
            ("dev:k1:c0", "dev:k1:c1")
        );
        assert_eq!(
            open(&r, "k1", "c", true).err(),
            Some(Refused::TooManyConnections)
        );
        // Another device has its own count.
        assert!(open(&r, "k2", "c", true).is_ok());
        drop(a);
        let c = open(&r, "k1", "c", true).unwrap().ticket;
        assert_eq!(c.router_id, "dev:k1:c0");
        drop((b, c));
        assert_eq!(r.count("k1"), 0);
    }

    #[tokio::test]
    async fn the_same_client_id_takes_over_and_its_slot_waits_for_the_old_one() {
        let r = registry();
        let a = open(&r, "k1", "x", true).unwrap().ticket;
        let _b = open(&r, "k1", "y", true).unwrap().ticket;
        // At the limit, a takeover still gets in: it replaces the old connection.
        let c = open(&r, "k1", "x", true).unwrap();
        let previous = c.previous.expect("takeover");
        assert_eq!(a.control.closed().await, CloseReason::TakenOver);
        assert!(!finished(&previous, std::time::Duration::from_millis(10)).await);
        // The old connection's slot is still the router's: the new one has another.
        assert_eq!(c.ticket.router_id, "dev:k1:c2");
        assert!(!r.is_open("k1", "z"));
        assert!(r.is_open("k1", "x"));
        drop(a);
        assert!(finished(&previous, std::time::Duration::from_millis(10)).await);
        assert_eq!(r.count("k1"), 2);
    }

    fn filter(path: &str) -> rumqttd::protocol::Filter {
        rumqttd::protocol::Filter {
            path: path.into(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        }
    }

    #[test]
    fn persistent_sessions_keep_subscriptions_and_are_bounded_per_device() {
        let r = Registry::new(Limits {
            max_per_device: 4,
            max_sessions: 2,
        });
        let a = open(&r, "k1", "s1", false).unwrap();
        assert!(!a.session_present, "a new session");
        a.ticket.save_session(Kept {
            filters: vec![filter("branch/#")],
            ..Kept::default()
        });
        drop(a);
        let again = open(&r, "k1", "s1", false).unwrap();
        assert!(again.session_present);
        assert_eq!(
            again.ticket.session_kept().filters,
            vec![filter("branch/#")]
        );
        // Two sessions in use: a third is refused; once one is idle, it makes room.
        let b = open(&r, "k1", "s2", false).unwrap();
        assert_eq!(
            open(&r, "k1", "s3", false).err(),
            Some(Refused::TooManySessions)
        );
        drop(b);
        let c = open(&r, "k1", "s3", false).unwrap();
        assert!(!c.session_present);
        drop((again, c));
        assert!(
            !open(&r, "k1", "s2", false).unwrap().session_present,
            "s2 made room"
        );
        // A clean session with the same client id discards the stored one.
        drop(open(&r, "k1", "s1", true).unwrap());
        assert!(!open(&r, "k1", "s1", false).unwrap().session_present);
        assert_eq!(open(&r, "k1", "", false).err(), Some(Refused::ClientId));
        assert_eq!(open(&r, "k1", "a/b", true).err(), Some(Refused::ClientId));
        assert_eq!(
            open(&r, "k1", &"x".repeat(129), true).err(),
            Some(Refused::ClientId)
        );
    }

    #[test]
    fn a_login_checked_before_a_revocation_is_refused() {
        let r = registry();
        let before = r.revision("k1");
        r.close_devices(&["k1".to_owned()], CloseReason::Revoked);
        assert_eq!(
            r.open("k1", "a", true, before).err(),
            Some(Refused::Revoked)
        );
        assert!(r.open("k1", "a", true, r.revision("k1")).is_ok());
    }

    #[test]
    fn delayed_wills_are_bounded_and_cancelled_by_a_reconnect() {
        let r = registry();
        drop(open(&r, "k1", "a", true).unwrap());
        let wa = r.delay_will("k1", "a").unwrap();
        let wb = r.delay_will("k1", "b").unwrap();
        assert!(r.delay_will("k1", "c").is_none(), "two waiting at most");
        // The same client again replaces its own.
        let wa2 = r.delay_will("k1", "a").unwrap();
        assert!(wa.is_cancelled() && !wa2.is_cancelled());
        drop(open(&r, "k1", "b", true).unwrap());
        assert!(wb.is_cancelled(), "b connected again");
        r.will_done("k1", &wa2);
        assert!(r.delay_will("k1", "c").is_some());
    }

    #[tokio::test]
    async fn close_devices_and_close_all() {
        let r = registry();
        let a = open(&r, "k1", "a", true).unwrap().ticket;
        let b = open(&r, "k2", "b", true).unwrap().ticket;
        r.close_devices(&["k1".to_owned()], CloseReason::Revoked);
        assert_eq!(a.control.closed().await, CloseReason::Revoked);
        r.close_all(CloseReason::Shutdown);
        assert_eq!(b.control.closed().await, CloseReason::Shutdown);
        // The first reason stays.
        assert_eq!(a.control.closed().await, CloseReason::Revoked);
    }
}
