//! The per-connection protocol wrapper that gives rumqttd per-device auth, topic ACLs and
//! connect/disconnect reports without forking it.
//!
//! rumqttd's `Server` clones its `Protocol` for every accepted connection and calls
//! `read_mut` for each incoming packet and `write` for each outgoing one. Wrapping the real
//! v4/v5 codecs lets us:
//! - pick MQTT 3.1.1 or 5 per connection from the CONNECT's protocol level (one port);
//! - accept `keep_alive = 0` (legal in MQTT; rumqttd drops such a CONNECT) by raising it to
//!   the maximum, 65 535 s;
//! - authenticate the CONNECT ourselves; a refused one is turned into a CONNECT rumqttd
//!   answers with a CONNACK error, whose code we rewrite to "bad user name or password";
//! - hand every allowed PUBLISH to intake ([`PublishSink`]) before rumqttd sees it, so a
//!   full intake queue holds the device's connection instead of overflowing the router's
//!   in-memory ring (which rumqttd would skip silently);
//! - send a denied PUBLISH to a sink topic nobody subscribes to (rumqttd acks it and drops
//!   it, as MQTT 3.1.1 §3.3.5 allows) and answer with reason "not authorized" on MQTT 5;
//! - replace a denied SUBSCRIBE filter with a sink filter and rewrite its SUBACK code to
//!   failure (0x80) / not authorized (0x87);
//! - report a connection when its CONNACK succeeds and a disconnection when rumqttd drops it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    self, v4::V4, v5::V5, ConnectReturnCode, Packet, PubAckReason, SubscribeReasonCode,
};
use tokio::sync::mpsc;

use super::acl;
use crate::burst::BurstLimiter;
use crate::config::SharedDevices;
use crate::model::{now_ms, Capture, DeviceId, Presence, PublishSink};

/// Denied publishes are rewritten to this topic, which matches no subscription.
pub const SINK_TOPIC: &str = "gateway-internal/denied";
/// Publishes intake has taken are rewritten to this topic, which matches no subscription.
pub const CAPTURED_TOPIC: &str = "gateway-internal/captured";

/// Denied subscriptions are rewritten to this filter, which no allowed publish matches.
pub const SINK_FILTER: &str = "gateway-internal/denied-subscription";
/// Topic aliases remembered per connection (rumqttd's own limit).
const MAX_TOPIC_ALIASES: usize = 4096;
/// What `keep_alive = 0` becomes: the largest value MQTT can express.
pub const ZERO_KEEPALIVE_REPLACEMENT: u16 = u16::MAX;

/// Something the broker refused, reported to the app (and counted there per device).
/// `device` is `None` when the client had not authenticated as a configured device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    Denied {
        device: Option<DeviceId>,
        what: Denial,
    },
}

/// Which devices are connected: the authoritative count per device, kept here so that no
/// connect or disconnect can be lost; the app records changes with [`PresenceBoard::take_changes`].
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
    fn update(&self, device: &str, connected: bool) {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// CONNECT without username/password.
    NoCredentials,
    /// CONNECT with a username that is no configured device.
    UnknownDevice,
    /// CONNECT with a wrong password.
    BadPassword,
    /// CONNECT whose last will targets another device's topic.
    Will,
    Publish,
    Subscribe,
    /// A packet over the broker's size limit: rumqttd closes the connection.
    Oversized,
    /// Bytes that are not MQTT: the connection is closed.
    Malformed,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::NoCredentials => "connect_no_credentials",
            Denial::UnknownDevice => "connect_unknown_device",
            Denial::BadPassword => "connect_bad_password",
            Denial::Will => "connect_will_denied",
            Denial::Publish => "publish_denied",
            Denial::Subscribe => "subscribe_denied",
            Denial::Oversized => "packet_too_large",
            Denial::Malformed => "malformed_packet",
        }
    }
}

/// Process-wide counters of the broker wrapper (the per-device ones are kept by the app).
#[derive(Debug, Default)]
pub struct BrokerStats {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub denied_publish: AtomicU64,
    pub denied_subscribe: AtomicU64,
    pub malformed: AtomicU64,
    pub oversized: AtomicU64,
    pub zero_keepalive: AtomicU64,
    /// Events lost because the app's event channel was full.
    pub events_dropped: AtomicU64,
}

/// State shared by every connection's wrapper.
pub struct Shared {
    pub devices: SharedDevices,
    pub sink: Arc<dyn PublishSink>,
    pub presence: PresenceBoard,
    pub events: mpsc::Sender<BrokerEvent>,
    pub stats: BrokerStats,
    /// Set at shutdown: every connection is closed at its next packet, so nothing more
    /// is acknowledged to a device after the gateway decided to stop.
    pub closing: AtomicBool,
    /// Argon2 is slow by design: remember secrets already verified this run, per device.
    /// Keyed by device, holding (configured Argon2 hash, secret): a reload that changes the
    /// hash makes the entry stale.
    verified: Mutex<HashMap<DeviceId, (String, String)>>,
    /// Bumped by every reload that revokes devices; a connection compares it with what it
    /// last saw, so the common case costs one atomic load per packet.
    revocations: AtomicU64,
    /// Device -> the revocation (value of `revocations`) that removed or changed it.
    revoked_at: Mutex<HashMap<DeviceId, u64>>,
    log: Mutex<BurstLimiter<(Option<DeviceId>, Denial)>>,
}

impl Shared {
    pub fn new(
        devices: SharedDevices,
        sink: Arc<dyn PublishSink>,
        events: mpsc::Sender<BrokerEvent>,
    ) -> Self {
        Shared {
            devices,
            sink,
            presence: PresenceBoard::default(),
            events,
            stats: BrokerStats::default(),
            closing: AtomicBool::new(false),
            verified: Mutex::new(HashMap::new()),
            revocations: AtomicU64::new(0),
            revoked_at: Mutex::new(HashMap::new()),
            log: Mutex::new(BurstLimiter::new(10_000, 4096)),
        }
    }

    /// A reload removed these devices or changed their settings: their open connections
    /// are closed at their next packet (a PINGREQ at the latest) and must log in again
    /// against the new table.
    pub fn revoke(&self, devices: &[DeviceId]) {
        if devices.is_empty() {
            return;
        }
        let generation = self.revocations.load(Ordering::SeqCst) + 1;
        if let Ok(mut map) = self.revoked_at.lock() {
            for d in devices {
                map.insert(d.clone(), generation);
            }
            if let Ok(mut v) = self.verified.lock() {
                for d in devices {
                    v.remove(d);
                }
            }
        }
        self.revocations.store(generation, Ordering::SeqCst);
    }

    /// Whether a connection authenticated at revocation `since` has been revoked.
    fn revoked_since(&self, device: &str, since: u64) -> bool {
        self.revoked_at
            .lock()
            .map(|m| m.get(device).is_some_and(|&g| g > since))
            .unwrap_or(false)
    }

    fn emit(&self, event: BrokerEvent) {
        if self.events.try_send(event).is_err() {
            self.stats.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn deny(&self, device: Option<&str>, what: Denial, detail: &str) {
        let counter = match what {
            Denial::Publish | Denial::Will => &self.stats.denied_publish,
            Denial::Subscribe => &self.stats.denied_subscribe,
            Denial::Oversized => &self.stats.oversized,
            Denial::Malformed => &self.stats.malformed,
            _ => &self.stats.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let key = (device.map(str::to_owned), what);
        let report = self.log.lock().ok().and_then(|mut l| l.hit(&key, now_ms()));
        if let Some(suppressed) = report {
            tracing::warn!(
                device = device.unwrap_or("-"),
                reason = what.as_str(),
                detail,
                suppressed_since_last_report = suppressed,
                "device refused"
            );
        }
        self.emit(BrokerEvent::Denied {
            device: device.map(str::to_owned),
            what,
        });
    }

    fn authenticate(&self, username: &str, password: &str) -> Result<DeviceId, Denial> {
        let table = self.devices.load();
        let Some(device) = table.get(username) else {
            return Err(Denial::UnknownDevice);
        };
        let cached = self
            .verified
            .lock()
            .ok()
            .and_then(|v| v.get(username).cloned());
        if let (Some((hash, known)), crate::config::Password::Argon2(current)) =
            (cached, &device.password)
        {
            use subtle::ConstantTimeEq;
            if hash == *current && bool::from(known.as_bytes().ct_eq(password.as_bytes())) {
                return Ok(device.id.clone());
            }
        }
        // Argon2 takes tens of milliseconds of CPU: keep it off the runtime's workers.
        let verify = || device.password.verify(password.as_bytes());
        let ok = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread)
                if matches!(device.password, crate::config::Password::Argon2(_)) =>
            {
                tokio::task::block_in_place(verify)
            }
            _ => verify(),
        };
        if ok {
            if let crate::config::Password::Argon2(hash) = &device.password {
                if let Ok(mut v) = self.verified.lock() {
                    v.insert(device.id.clone(), (hash.clone(), password.to_owned()));
                }
            }
            Ok(device.id.clone())
        } else {
            Err(Denial::BadPassword)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    V4,
    V5,
}

/// One connection's view; see the module doc.
pub struct DeviceProtocol {
    shared: Arc<Shared>,
    codec: Option<Codec>,
    device: Option<DeviceId>,
    /// The revocation count when this connection logged in, and the last one checked.
    logged_in_at: u64,
    checked: u64,
    refused: Option<Denial>,
    /// MQTT 5 topic aliases this connection set, with their topic when it is allowed.
    aliases: HashMap<u16, Option<Bytes>>,
    /// What `write` (which rumqttd calls with `&self`) updates.
    out: Mutex<Outgoing>,
}

#[derive(Default)]
struct Outgoing {
    connected: bool,
    /// Packet ids of denied QoS>0 publishes, whose PUBACK says "not authorized" on MQTT 5.
    denied_pubacks: VecDeque<u16>,
    /// SUBSCRIBE packet ids with the positions of their denied filters.
    denied_subscriptions: VecDeque<(u16, Vec<usize>)>,
}

impl DeviceProtocol {
    pub fn new(shared: Arc<Shared>) -> Self {
        DeviceProtocol {
            shared,
            codec: None,
            device: None,
            logged_in_at: 0,
            checked: 0,
            refused: None,
            aliases: HashMap::new(),
            out: Mutex::new(Outgoing::default()),
        }
    }

    fn inner_read(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, protocol::Error> {
        use protocol::Protocol;
        let codec = match self.codec {
            Some(c) => c,
            None => {
                let c = sniff_codec(stream)?;
                self.codec = Some(c);
                c
            }
        };
        match codec {
            Codec::V4 => V4.read_mut(stream, max_size),
            Codec::V5 => V5.read_mut(stream, max_size),
        }
    }

    fn on_connect(&mut self, packet: Packet) -> Packet {
        let Packet::Connect(mut connect, props, will, will_props, login) = packet else {
            return packet;
        };
        if connect.keep_alive == 0 {
            connect.keep_alive = ZERO_KEEPALIVE_REPLACEMENT;
            self.shared
                .stats
                .zero_keepalive
                .fetch_add(1, Ordering::Relaxed);
        }
        // Read before authenticating: a reload in between then counts as after the login.
        let revocations = self.shared.revocations.load(Ordering::SeqCst);
        (self.logged_in_at, self.checked) = (revocations, revocations);
        let result = match &login {
            None => Err((None, Denial::NoCredentials)),
            Some(l) => match self.shared.authenticate(&l.username, &l.password) {
                Ok(id) => match &will {
                    Some(w)
                        if !acl::may_publish(&id, std::str::from_utf8(&w.topic).unwrap_or("")) =>
                    {
                        Err((Some(id), Denial::Will))
                    }
                    _ => Ok(id),
                },
                Err(Denial::UnknownDevice) => Err((None, Denial::UnknownDevice)),
                Err(d) => Err((Some(l.username.clone()), d)),
            },
        };
        match result {
            Ok(id) => {
                // rumqttd keys sessions, takeovers and wills by client id alone: scope the
                // id to the device so one device can never take over another's session
                // (or the gateway's own links), and drop characters rumqttd refuses.
                connect.client_id = scoped_client_id(&id, &connect.client_id);
                self.device = Some(id);
                Packet::Connect(connect, props, will, will_props, None)
            }
            Err((device, denial)) => {
                let detail = match (&login, denial) {
                    (Some(l), Denial::UnknownDevice) => {
                        format!(
                            "username {:?}",
                            crate::config::profile::truncate(&l.username, 32)
                        )
                    }
                    _ => String::new(),
                };
                self.shared.deny(device.as_deref(), denial, &detail);
                self.refused = Some(denial);
                // rumqttd answers an empty client id without clean session with a CONNACK
                // error and closes; `write` turns that code into the one we mean.
                connect.client_id.clear();
                connect.clean_session = false;
                Packet::Connect(connect, props, None, None, None)
            }
        }
    }

    /// An error closes the connection without acknowledging the publish.
    fn on_publish(&mut self, packet: Packet) -> Result<Packet, protocol::Error> {
        let Packet::Publish(mut publish, props) = packet else {
            return Ok(packet);
        };
        let device = self.device.clone().unwrap_or_default();
        let alias = props.as_ref().and_then(|p| p.topic_alias);
        let topic: Option<Bytes> = if publish.topic.is_empty() {
            alias.and_then(|a| self.aliases.get(&a).cloned().flatten())
        } else {
            let ok = std::str::from_utf8(&publish.topic)
                .map(|t| acl::may_publish(&device, t))
                .unwrap_or(false);
            let topic = ok.then(|| publish.topic.clone());
            if let Some(a) = alias {
                if self.aliases.len() < MAX_TOPIC_ALIASES || self.aliases.contains_key(&a) {
                    self.aliases.insert(a, topic.clone());
                }
            }
            topic
        };
        match topic {
            Some(topic) => {
                // The message is handed to intake here, before rumqttd acknowledges it;
                // the router then only sees a topic nobody subscribes to and drops it.
                if self.shared.sink.capture(&topic, &publish.payload) == Capture::Closing {
                    // Intake closed while this connection waited for room: stopping.
                    return Err(protocol::Error::IncorrectPacketFormat);
                }
                publish.topic = CAPTURED_TOPIC.into();
                publish.retain = false;
                // Only the acknowledgement is left to rumqttd: without the payload the
                // router holds no reference into this connection's read buffer.
                publish.payload = Bytes::new();
            }
            None => {
                let shown = String::from_utf8_lossy(&publish.topic);
                let detail = format!("topic {:?}", crate::config::profile::truncate(&shown, 80));
                self.shared.deny(Some(&device), Denial::Publish, &detail);
                // Also gives an unknown alias a topic, so the router cannot misroute it.
                publish.topic = SINK_TOPIC.into();
                publish.retain = false;
                let (qos, pkid) = publish_qos_pkid(&publish);
                if self.codec == Some(Codec::V5) && qos == 1 {
                    let out = self.out.get_mut().unwrap_or_else(|p| p.into_inner());
                    if out.denied_pubacks.len() >= 1024 {
                        out.denied_pubacks.pop_front();
                    }
                    out.denied_pubacks.push_back(pkid);
                }
            }
        }
        Ok(Packet::Publish(publish, props))
    }

    fn on_subscribe(&mut self, packet: Packet) -> Packet {
        let Packet::Subscribe(mut subscribe, props) = packet else {
            return packet;
        };
        let device = self.device.clone().unwrap_or_default();
        let mut denied = Vec::new();
        for (i, filter) in subscribe.filters.iter_mut().enumerate() {
            if !acl::may_subscribe(&device, &filter.path) {
                let detail = format!(
                    "filter {:?}",
                    crate::config::profile::truncate(&filter.path, 80)
                );
                self.shared.deny(Some(&device), Denial::Subscribe, &detail);
                filter.path = SINK_FILTER.to_owned();
                denied.push(i);
            }
        }
        if !denied.is_empty() {
            let out = self.out.get_mut().unwrap_or_else(|p| p.into_inner());
            if out.denied_subscriptions.len() >= 64 {
                out.denied_subscriptions.pop_front();
            }
            out.denied_subscriptions.push_back((subscribe.pkid, denied));
        }
        Packet::Subscribe(subscribe, props)
    }

    fn rewrite_outgoing(&self, packet: Packet) -> Packet {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        match packet {
            Packet::ConnAck(mut ack, props) => {
                if let Some(denial) = self.refused {
                    ack.code = match denial {
                        Denial::NoCredentials | Denial::Will => ConnectReturnCode::NotAuthorized,
                        _ => ConnectReturnCode::BadUserNamePassword,
                    };
                    ack.session_present = false;
                } else if ack.code == ConnectReturnCode::Success && !out.connected {
                    if let Some(device) = &self.device {
                        out.connected = true;
                        self.shared
                            .stats
                            .connections
                            .fetch_add(1, Ordering::Relaxed);
                        self.shared.presence.update(device, true);
                    }
                }
                Packet::ConnAck(ack, props)
            }
            Packet::PubAck(mut ack, props) => {
                if let Some(pos) = out.denied_pubacks.iter().position(|p| *p == ack.pkid) {
                    out.denied_pubacks.remove(pos);
                    ack.reason = PubAckReason::NotAuthorized;
                }
                Packet::PubAck(ack, props)
            }
            Packet::SubAck(mut ack, props) => {
                if let Some(pos) = out
                    .denied_subscriptions
                    .iter()
                    .position(|(pkid, _)| *pkid == ack.pkid)
                {
                    let (_, denied) = out.denied_subscriptions.remove(pos).unwrap_or_default();
                    let code = match self.codec {
                        Some(Codec::V5) => SubscribeReasonCode::NotAuthorized,
                        _ => SubscribeReasonCode::Failure,
                    };
                    for i in denied {
                        if let Some(c) = ack.return_codes.get_mut(i) {
                            *c = code;
                        }
                    }
                }
                Packet::SubAck(ack, props)
            }
            other => other,
        }
    }
}

/// `dev.<device>.<client id>`, with characters rumqttd refuses in client ids replaced.
pub fn scoped_client_id(device: &str, client_id: &str) -> String {
    let cleaned: String = client_id
        .chars()
        .take(128)
        .map(|c| {
            if matches!(c, '+' | '#' | '/' | '$') {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("dev.{device}.{cleaned}")
}

/// QoS and packet id of a publish (both crate-private in rumqttd; its serialized form
/// carries them in the header byte and the two bytes after it). Called only on denial.
fn publish_qos_pkid(p: &protocol::Publish) -> (u8, u16) {
    let bytes = p.serialize();
    (
        (bytes[0] >> 1) & 0b11,
        u16::from_be_bytes([bytes[1], bytes[2]]),
    )
}

/// Decide the codec from the first packet: MQTT 5 when it is a CONNECT with protocol
/// level 5, otherwise 3.1.1 (whose parser then accepts or refuses it).
fn sniff_codec(stream: &BytesMut) -> Result<Codec, protocol::Error> {
    let Some(&first) = stream.first() else {
        return Err(protocol::Error::InsufficientBytes(2));
    };
    if first >> 4 != 1 {
        return Ok(Codec::V4);
    }
    // Fixed header: type byte, then 1-4 bytes of remaining length.
    let mut i = 1;
    loop {
        let Some(&b) = stream.get(i) else {
            return Err(protocol::Error::InsufficientBytes(1));
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(protocol::Error::MalformedRemainingLength);
        }
    }
    // Variable header: protocol name (u16 length + bytes), then the level byte.
    let (Some(&hi), Some(&lo)) = (stream.get(i), stream.get(i + 1)) else {
        return Err(protocol::Error::InsufficientBytes(2));
    };
    let name_len = u16::from_be_bytes([hi, lo]) as usize;
    if name_len > 6 {
        return Ok(Codec::V4);
    }
    match stream.get(i + 2 + name_len) {
        Some(5) => Ok(Codec::V5),
        Some(_) => Ok(Codec::V4),
        None => Err(protocol::Error::InsufficientBytes(1)),
    }
}

impl Clone for DeviceProtocol {
    /// rumqttd clones the protocol for each new connection: give it fresh state.
    fn clone(&self) -> Self {
        DeviceProtocol::new(self.shared.clone())
    }
}

impl protocol::Protocol for DeviceProtocol {
    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, protocol::Error> {
        if self.shared.closing.load(Ordering::Relaxed) && !stream.is_empty() {
            // Shutting down: acknowledge nothing more; the device retries after restart.
            return Err(protocol::Error::IncorrectPacketFormat);
        }
        let packet = match self.inner_read(stream, max_size) {
            Ok(p) => p,
            Err(protocol::Error::InsufficientBytes(n)) => {
                return Err(protocol::Error::InsufficientBytes(n))
            }
            Err(e) => {
                let what = match e {
                    protocol::Error::PayloadSizeLimitExceeded(_) => Denial::Oversized,
                    _ => Denial::Malformed,
                };
                self.shared
                    .deny(self.device.as_deref(), what, &e.to_string());
                return Err(e);
            }
        };
        if let Some(device) = &self.device {
            let now = self.shared.revocations.load(Ordering::Relaxed);
            if now != self.checked {
                if self.shared.revoked_since(device, self.logged_in_at) {
                    tracing::info!(
                        device = %device,
                        "device removed or changed by a reload: connection closed"
                    );
                    return Err(protocol::Error::IncorrectPacketFormat);
                }
                self.checked = now;
            }
        }
        let authenticated = self.device.is_some() || self.refused.is_some();
        match &packet {
            // A second CONNECT, or anything but CONNECT before it, is a protocol error.
            Packet::Connect(..) if authenticated => {}
            Packet::Connect(..) => return Ok(self.on_connect(packet)),
            _ if self.device.is_none() => {}
            Packet::Publish(_, Some(props)) if props.topic_alias == Some(0) => {}
            Packet::Publish(..) => return self.on_publish(packet),
            Packet::Subscribe(..) => return Ok(self.on_subscribe(packet)),
            _ => return Ok(packet),
        }
        self.shared.deny(
            self.device.as_deref(),
            Denial::Malformed,
            "packet out of order or invalid",
        );
        Err(protocol::Error::IncorrectPacketFormat)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, protocol::Error> {
        let packet = match packet {
            p @ (Packet::ConnAck(..) | Packet::PubAck(..) | Packet::SubAck(..)) => {
                self.rewrite_outgoing(p)
            }
            other => other,
        };
        match self.codec {
            Some(Codec::V5) => V5.write(packet, write),
            _ => V4.write(packet, write),
        }
    }
}

impl Drop for DeviceProtocol {
    fn drop(&mut self) {
        let connected = self.out.get_mut().map(|o| o.connected).unwrap_or(false);
        if connected {
            if let Some(device) = self.device.take() {
                self.shared.presence.update(&device, false);
            }
        }
    }
}
