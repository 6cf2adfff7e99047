//! One device connection's protocol state once it is logged in: what each packet from
//! the device or the router becomes. No I/O: replies are appended to a write buffer,
//! packets for the router are returned, and everything the gateway decides (capture,
//! refusals, the router's filters) goes through [`Env`].
//!
//! The device's own publishes never reach rumqttd's router: they go to intake
//! ([`Env::capture`]) and are acknowledged here, in the order they arrived (PUBACK;
//! PUBREC, then PUBCOMP on PUBREL, storing a QoS 2 message once however often it is resent
//! before its PUBREL), and only once durable: each acknowledgement waits for the commit
//! receipt of its message (or, for one refused without storage, of the message before it)
//! and is written by [`Session::release`] when the connection learns of that commit
//! ([`crate::receipt`]). The router sees only SUBSCRIBE and UNSUBSCRIBE (each filter checked
//! first, every UNSUBACK written here), and every subscription is granted at QoS 0: what
//! the router delivers (the branch's live figures, published again every few seconds)
//! needs no acknowledgement, so no device acknowledgement ever reaches the router. That
//! matters: rumqttd 0.20 drops a connection over an acknowledgement it does not expect,
//! and a link it has dropped must never be woken again (it panics on that).

use std::collections::{HashMap, HashSet, VecDeque};

use rumqttd::protocol::Filter;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    self, v4::V4, v5::V5, DisconnectReasonCode, Packet, Protocol, SubscribeReasonCode,
};

use super::acl;
use super::encode::{self, code, AckKind};
use super::frame::PublishMeta;
use super::shared::Denial;
use crate::model::Capture;

/// Denied subscriptions are rewritten to this filter, which no publish matches.
pub(crate) const SINK_FILTER: &str = "gateway-internal/denied-subscription";

/// Longest topic name a device may publish to (the device contract's topics are short;
/// a longer one is refused, and never kept as a topic alias).
pub(crate) const MAX_TOPIC_BYTES: usize = 256;

/// SUBSCRIBEs passed to the router and not yet answered, per connection.
const MAX_PENDING_SUBACKS: usize = 64;
/// The packet id of the SUBSCRIBE that restores a persistent session's filters (a
/// device's packet ids are never 0); its SUBACK is not sent to the device.
const RESTORE_PKID: u16 = 0;

/// QoS 1 messages a session remembers for recognising resends ([`Recent`]).
pub(crate) const RECENT_QOS1: usize = 256;

/// What a persistent session keeps between its connections, in memory while the gateway
/// runs (a restart forgets it: a resend after one is stored again).
#[derive(Debug, Clone, Default)]
pub(crate) struct Kept {
    pub filters: Vec<Filter>,
    /// QoS 2 packet ids stored and awaiting PUBREL.
    pub awaiting_release: HashSet<u16>,
    pub recent: Recent,
    /// When it ends unless resumed (MQTT 5 Session Expiry Interval after the connection
    /// closed); `None` while a connection has it, or never (MQTT 3.1.1, 0xFFFFFFFF).
    pub expires: Option<std::time::Instant>,
}

/// The last [`RECENT_QOS1`] QoS 1 messages taken from a session: packet id -> a hash of
/// topic and payload. A PUBLISH with DUP=1 that matches one is a resend of a message
/// already stored (its PUBACK was lost with the connection): acknowledged, not stored
/// again, counted as `duplicate_resend`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recent {
    /// Packet id -> (hash, the receipt its message waits for on this connection).
    by_pkid: foldhash::HashMap<u16, (u64, u64)>,
    order: VecDeque<u16>,
}

impl Recent {
    fn hash(topic: &[u8], payload: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        foldhash::quality::FixedState::with_seed(0x6272_616e_6368).hash_one((topic, payload))
    }

    fn contains(&self, pkid: u16, hash: u64) -> bool {
        self.by_pkid.get(&pkid).is_some_and(|(h, _)| *h == hash)
    }

    fn insert(&mut self, pkid: u16, hash: u64, receipt: u64) {
        if self.by_pkid.insert(pkid, (hash, receipt)).is_none() {
            self.order.push_back(pkid);
        }
        while self.order.len() > RECENT_QOS1 {
            if let Some(old) = self.order.pop_front() {
                self.by_pkid.remove(&old);
            }
        }
    }
}

/// What [`next_packet`] found in a connection's read buffer.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per packet, on the stack, never stored
pub(crate) enum Next {
    /// No whole packet yet; `started`: part of one has arrived.
    Incomplete { started: bool },
    /// A packet taken off the buffer, with its PUBLISH fields.
    Packet(Packet, Option<PublishMeta>),
}

/// Take the next packet of a logged-in connection off `buf`: the frame checks first, then
/// rumqttd's codec; a DISCONNECT is read here (rumqttd's MQTT 5 reader takes one with only
/// a reason code for an incomplete packet) and ends the connection (0x04: with its will).
pub(crate) fn next_packet(buf: &mut BytesMut, v5: bool, max: usize) -> Result<Next, Closing> {
    use super::frame::{self, Kind, Peek};
    let header = match frame::peek(buf, max) {
        Err(e) => {
            let denial = match e {
                frame::FrameError::TooLarge(_) => Denial::Oversized,
                frame::FrameError::Length => Denial::Malformed,
                _ => Denial::ProtocolError,
            };
            return Err(Closing::violation(
                e.reason(),
                denial,
                "packet refused before decoding",
            ));
        }
        Ok(Peek::Incomplete { started }) => return Ok(Next::Incomplete { started }),
        Ok(Peek::Ready(h)) => h,
    };
    if header.kind == Kind::Disconnect {
        let reason = buf.get(header.header_len).copied();
        let _ = buf.split_to(header.frame_len());
        if !v5 && header.remaining > 0 {
            return Err(Closing::violation(
                code::MALFORMED,
                Denial::Malformed,
                "DISCONNECT with a body",
            ));
        }
        return Err(Closing {
            reason: None,
            denial: None,
            will: reason == Some(0x04),
        });
    }
    let meta = match header.kind {
        Kind::Publish => Some(frame::publish_meta(&header, buf).ok_or(Closing::violation(
            code::MALFORMED,
            Denial::Malformed,
            "PUBLISH is truncated",
        ))?),
        _ => None,
    };
    let decoded = if v5 {
        V5.read_mut(buf, max)
    } else {
        V4.read_mut(buf, max)
    };
    match decoded {
        Ok(packet) => Ok(Next::Packet(packet, meta)),
        Err(_) => Err(Closing::violation(
            code::MALFORMED,
            Denial::Malformed,
            "packet does not parse",
        )),
    }
}

/// For fuzzers and property tests: `bytes` from a device through what a connection does
/// with them (a CONNECT's checks and decoding, then every packet's frame checks, decoding
/// and session), with nothing behind (intake takes everything, the router answers
/// nothing). Must never panic, whatever the bytes.
#[doc(hidden)]
pub fn fuzz_device_bytes(bytes: &[u8]) {
    struct Nothing;
    impl Env for Nothing {
        fn capture(&self, _: &[u8], _: &[u8]) -> Capture {
            Capture::Taken(0)
        }
        fn deny(&self, _: &str, _: Denial, _: &str) {}
        fn admit_filter(&self, _: &str, _: &str) -> bool {
            true
        }
    }
    use super::frame::{self, Kind, Peek};
    let mut buf = BytesMut::from(bytes);
    const MAX: usize = 1 << 16;
    // A CONNECT first, as the connection reads it; its level picks the codec.
    let v5 = match frame::peek(&buf, MAX) {
        Ok(Peek::Ready(h)) if h.kind == Kind::Connect => {
            let Ok(meta) = frame::connect_meta(&h, &buf) else {
                return;
            };
            let v5 = meta.level == 5;
            let decoded = if v5 {
                V5.read_mut(&mut buf, MAX)
            } else {
                V4.read_mut(&mut buf, MAX)
            };
            if !matches!(decoded, Ok(Packet::Connect(..))) {
                return;
            }
            v5
        }
        _ => bytes.first().is_some_and(|b| b & 1 == 1),
    };
    let limits = SessionLimits {
        max_subscriptions: 8,
        max_filter_bytes: 256,
        receive_maximum: 4,
        topic_alias_maximum: 4,
        peer_max_packet: usize::MAX,
    };
    let mut session = Session::new("fz", v5, limits);
    let mut out = BytesMut::new();
    while let Ok(Next::Packet(packet, meta)) = next_packet(&mut buf, v5, MAX) {
        if session.on_device(&Nothing, packet, meta, &mut out).is_err() {
            return;
        }
        session.release(u64::MAX, &mut out);
        out.clear();
    }
}

/// The limits of one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionLimits {
    pub max_subscriptions: usize,
    pub max_filter_bytes: usize,
    /// QoS 2 messages awaiting PUBREL (MQTT 5: the Receive Maximum announced).
    pub receive_maximum: u16,
    pub topic_alias_maximum: u16,
    /// The largest packet the device takes (MQTT 5 CONNECT's Maximum Packet Size;
    /// otherwise unlimited): a larger one is not sent.
    pub peer_max_packet: usize,
}

/// What the session needs from the gateway.
pub(crate) trait Env {
    /// Hand a device message to intake; its acknowledgement waits for the receipt returned.
    fn capture(&self, topic: &[u8], payload: &[u8]) -> Capture;
    fn deny(&self, device: &str, what: Denial, detail: &str);
    /// May `device` give the router `filter` (new filters count against its budget)?
    fn admit_filter(&self, device: &str, filter: &str) -> bool;
}

/// The connection must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Closing {
    /// The MQTT 5 DISCONNECT reason to send first; `None` for none.
    pub reason: Option<u8>,
    /// The refusal to count, if the device broke a rule.
    pub denial: Option<(Denial, &'static str)>,
    /// Whether the device's last will is published.
    pub will: bool,
}

impl Closing {
    pub fn violation(reason: u8, denial: Denial, detail: &'static str) -> Closing {
        Closing {
            reason: Some(reason),
            denial: Some((denial, detail)),
            will: true,
        }
    }

    /// The gateway is stopping: no acknowledgement, no will.
    pub fn shutdown() -> Closing {
        Closing {
            reason: Some(code::SHUTTING_DOWN),
            denial: None,
            will: false,
        }
    }
}

pub(crate) struct Session {
    device: String,
    v5: bool,
    limits: SessionLimits,
    /// Topic aliases the device set (MQTT 5): the topic, or `None` when it is refused.
    aliases: HashMap<u16, Option<Bytes>>,
    subscriptions: HashMap<String, Filter>,
    /// SUBSCRIBE packet id -> the codes decided here (`None`: the router's).
    pending_subacks: VecDeque<(u16, Vec<Option<u8>>)>,
    /// QoS 2 packet ids stored and awaiting PUBREL.
    /// Packet id -> the receipt its message waits for on this connection.
    awaiting_release: HashMap<u16, u64>,
    recent: Recent,
    /// Acknowledgements waiting for a commit, in the order their publishes arrived.
    unacked: VecDeque<Unacked>,
    /// The highest receipt any publish of this connection waits for.
    last_receipt: u64,
    /// The command written to the device and not yet acknowledged: (packet id, command id).
    command_out: Option<(u16, String)>,
    /// The packet id of the last command written (the router's deliveries are all QoS 0,
    /// so these ids are the connection's only ones).
    command_pkid: u16,
    /// Commands the device acknowledged: (command id, reason code), for the dispatcher.
    acked: Vec<(String, u8)>,
}

/// A PUBACK or PUBREC to write once the connection's messages up to `receipt` are committed.
#[derive(Debug, Clone, Copy)]
struct Unacked {
    receipt: u64,
    kind: AckKind,
    pkid: u16,
    reason: u8,
}

impl Session {
    pub fn new(device: &str, v5: bool, limits: SessionLimits) -> Session {
        Session {
            device: device.to_owned(),
            v5,
            limits,
            aliases: HashMap::new(),
            subscriptions: HashMap::new(),
            pending_subacks: VecDeque::new(),
            awaiting_release: HashMap::new(),
            recent: Recent::default(),
            unacked: VecDeque::new(),
            last_receipt: 0,
            command_out: None,
            command_pkid: 0,
            acked: Vec::new(),
        }
    }

    /// Whether the device subscribes to any of its command topics.
    pub fn commands_subscribed(&self) -> bool {
        let prefix = format!("devices/{}/commands", self.device);
        self.subscriptions.keys().any(|f| {
            f.strip_prefix(&prefix)
                .is_some_and(|r| r.is_empty() || r.starts_with('/'))
        })
    }

    /// Write `command` as a QoS 1 PUBLISH; `Err` (nothing written) when no subscription of
    /// the device matches its topic (`not_subscribed`), it is larger than the device's
    /// Maximum Packet Size (`too_large`) or it expired on its way (`expired`).
    pub fn deliver(
        &mut self,
        command: &crate::model::DeviceCommand,
        out: &mut BytesMut,
    ) -> Result<(), &'static str> {
        let subscribed = self
            .subscriptions
            .keys()
            .any(|f| acl::matches(f, &command.topic));
        let size = 5 + 2 + command.topic.len() + 2 + 1 + command.payload.len();
        if !subscribed {
            return Err("not_subscribed");
        }
        if size > self.limits.peer_max_packet || command.topic.len() > 1024 {
            return Err("too_large");
        }
        if crate::model::now_ms() >= command.expires_ms {
            return Err("expired");
        }
        self.command_pkid = self.command_pkid.checked_add(1).unwrap_or(1);
        encode::publish_qos1(
            out,
            self.v5,
            &command.topic,
            self.command_pkid,
            &command.payload,
        );
        self.command_out = Some((self.command_pkid, command.command_id.clone()));
        Ok(())
    }

    /// The commands acknowledged since the last call: (command id, reason code).
    pub fn take_acked(&mut self) -> Vec<(String, u8)> {
        std::mem::take(&mut self.acked)
    }

    /// Write the acknowledgements whose messages are committed (every receipt up to
    /// `committed`), in order.
    pub fn release(&mut self, committed: u64, out: &mut BytesMut) {
        while let Some(a) = self.unacked.front() {
            if a.receipt > committed {
                break;
            }
            encode::ack(out, self.v5, a.kind, a.pkid, a.reason);
            self.unacked.pop_front();
        }
    }

    /// Acknowledgements waiting for a commit.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Queue an acknowledgement behind everything before it; with `receipt`, also behind
    /// that message's commit.
    fn acknowledge(&mut self, kind: AckKind, pkid: u16, reason: u8, receipt: u64) {
        self.last_receipt = self.last_receipt.max(receipt);
        self.unacked.push_back(Unacked {
            receipt: self.last_receipt,
            kind,
            pkid,
            reason,
        });
    }

    /// Resume a persistent session: its QoS 2 messages awaiting release, its recent QoS 1
    /// messages, and its filters, as a SUBSCRIBE for the router (its SUBACK is kept from
    /// the device).
    pub fn restore(&mut self, kept: Kept) -> Option<Packet> {
        let Kept {
            mut filters,
            awaiting_release,
            recent,
            ..
        } = kept;
        // Committed before this connection: nothing here waits for them.
        self.awaiting_release = awaiting_release.into_iter().map(|p| (p, 0)).collect();
        self.recent = recent;
        if filters.is_empty() {
            return None;
        }
        for f in &mut filters {
            f.qos = protocol::QoS::AtMostOnce;
        }
        for f in &filters {
            self.subscriptions.insert(f.path.clone(), f.clone());
        }
        self.pending_subacks
            .push_back((RESTORE_PKID, vec![None; filters.len()]));
        Some(Packet::Subscribe(
            protocol::Subscribe {
                pkid: RESTORE_PKID,
                filters,
            },
            None,
        ))
    }

    /// What a persistent session keeps for its next connection: only what is committed
    /// (receipts up to `committed`), so a resend on the next connection is never
    /// acknowledged for a message that may still be lost; an uncommitted one is stored
    /// again instead.
    pub fn kept(&self, committed: u64) -> Kept {
        let mut recent = self.recent.clone();
        recent.by_pkid.retain(|_, (_, r)| *r <= committed);
        recent.order.retain(|p| recent.by_pkid.contains_key(p));
        for (_, r) in recent.by_pkid.values_mut() {
            *r = 0;
        }
        Kept {
            filters: self.subscriptions.values().cloned().collect(),
            awaiting_release: self
                .awaiting_release
                .iter()
                .filter(|(_, r)| **r <= committed)
                .map(|(p, _)| *p)
                .collect(),
            recent,
            expires: None,
        }
    }

    /// A packet from the device. Replies go to `out`; a packet for the router is returned.
    pub fn on_device(
        &mut self,
        env: &dyn Env,
        packet: Packet,
        meta: Option<PublishMeta>,
        out: &mut BytesMut,
    ) -> Result<Option<Packet>, Closing> {
        match packet {
            Packet::Publish(publish, props) => {
                let meta = meta.ok_or(Closing::violation(
                    code::PROTOCOL_ERROR,
                    Denial::ProtocolError,
                    "publish without a packet id",
                ))?;
                self.publish(env, publish, props, meta)?;
                Ok(None)
            }
            Packet::PubRel(rel, _) => {
                let reason = if self.awaiting_release.remove(&rel.pkid).is_some() {
                    code::SUCCESS
                } else {
                    code::PACKET_ID_NOT_FOUND
                };
                encode::ack(out, self.v5, AckKind::PubComp, rel.pkid, reason);
                Ok(None)
            }
            Packet::Subscribe(subscribe, props) => {
                if subscribe.pkid == 0 || props.as_ref().and_then(|p| p.id) == Some(0) {
                    return Err(Closing::violation(
                        code::PROTOCOL_ERROR,
                        Denial::ProtocolError,
                        "subscription identifier 0",
                    ));
                }
                Ok(self.subscribe(env, subscribe, props, out))
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                if unsubscribe.pkid == 0 || unsubscribe.filters.is_empty() {
                    return Err(Closing::violation(
                        code::PROTOCOL_ERROR,
                        Denial::ProtocolError,
                        "UNSUBSCRIBE without packet id or filters",
                    ));
                }
                Ok(self.unsubscribe(unsubscribe, out))
            }
            Packet::PingReq(_) => {
                encode::pingresp(out);
                Ok(None)
            }
            Packet::Disconnect(d, _) => Err(Closing {
                reason: None,
                denial: None,
                will: d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
            }),
            // The only QoS 1 message a device is sent is a command.
            Packet::PubAck(ack, _)
                if self
                    .command_out
                    .as_ref()
                    .is_some_and(|(pkid, _)| *pkid == ack.pkid) =>
            {
                if let Some((_, id)) = self.command_out.take() {
                    self.acked.push((id, puback_reason(&ack)));
                }
                Ok(None)
            }
            // Nothing else is delivered above QoS 0: an acknowledgement answers nothing.
            Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..) => {
                env.deny(
                    &self.device,
                    Denial::ProtocolError,
                    "acknowledgement of nothing delivered: ignored",
                );
                Ok(None)
            }
            Packet::Connect(..) => Err(Closing::violation(
                code::PROTOCOL_ERROR,
                Denial::ProtocolError,
                "second CONNECT",
            )),
            _ => Err(Closing::violation(
                code::PROTOCOL_ERROR,
                Denial::ProtocolError,
                "packet type a client never sends",
            )),
        }
    }

    /// The topic a PUBLISH goes to, after its alias; `Ok(None)` when it is refused.
    fn topic(
        &mut self,
        publish: &protocol::Publish,
        props: Option<&protocol::PublishProperties>,
    ) -> Result<Option<Bytes>, Closing> {
        let alias = props.and_then(|p| p.topic_alias);
        if let Some(a) = alias {
            if !self.v5 || a == 0 || a > self.limits.topic_alias_maximum {
                return Err(Closing::violation(
                    code::TOPIC_ALIAS_INVALID,
                    Denial::ProtocolError,
                    "topic alias out of range",
                ));
            }
        }
        if publish.topic.is_empty() {
            return match alias.and_then(|a| self.aliases.get(&a)) {
                Some(topic) => Ok(topic.clone()),
                None => Err(Closing::violation(
                    code::PROTOCOL_ERROR,
                    Denial::ProtocolError,
                    "empty topic without a known alias",
                )),
            };
        }
        let allowed = publish.topic.len() <= MAX_TOPIC_BYTES
            && std::str::from_utf8(&publish.topic)
                .is_ok_and(|t| !t.contains('\0') && acl::may_publish(&self.device, t));
        // A copy: the packet's bytes are a slice of the connection's read buffer.
        let topic = allowed.then(|| Bytes::copy_from_slice(&publish.topic));
        if let Some(a) = alias {
            self.aliases.insert(a, topic.clone());
        }
        Ok(topic)
    }

    fn publish(
        &mut self,
        env: &dyn Env,
        publish: protocol::Publish,
        props: Option<protocol::PublishProperties>,
        meta: PublishMeta,
    ) -> Result<(), Closing> {
        let topic = self.topic(&publish, props.as_ref())?;
        if meta.qos == 2 && self.awaiting_release.contains_key(&meta.pkid) {
            // Sent again before its PUBREL: stored already (or about to be, in order).
            self.acknowledge(AckKind::PubRec, meta.pkid, code::SUCCESS, 0);
            return Ok(());
        }
        let hash = (meta.qos == 1).then(|| Recent::hash(&publish.topic, &publish.payload));
        if let (Some(h), true) = (hash, meta.dup) {
            if topic.is_some() && self.recent.contains(meta.pkid, h) {
                env.deny(
                    &self.device,
                    Denial::DuplicateResend,
                    "acknowledged again, not stored again",
                );
                self.acknowledge(AckKind::PubAck, meta.pkid, code::SUCCESS, 0);
                return Ok(());
            }
        }
        let (reason, receipt) = match topic {
            Some(topic) => match env.capture(&topic, &publish.payload) {
                Capture::Taken(n) => {
                    if let Some(h) = hash {
                        self.recent.insert(meta.pkid, h, n);
                    }
                    (code::SUCCESS, n)
                }
                Capture::RateLimited(n) => (code::RATE_TOO_HIGH, n),
                Capture::Closing => return Err(Closing::shutdown()),
            },
            None => {
                let shown = String::from_utf8_lossy(&publish.topic);
                let detail = format!("topic {:?}", crate::config::profile::truncate(&shown, 80));
                env.deny(&self.device, Denial::Publish, &detail);
                (code::NOT_AUTHORIZED, 0)
            }
        };
        match meta.qos {
            0 => self.last_receipt = self.last_receipt.max(receipt),
            1 => self.acknowledge(AckKind::PubAck, meta.pkid, reason, receipt),
            _ => {
                // MQTT 5: a PUBREC reason of 0x80 or more ends the exchange.
                if !self.v5 || reason < 0x80 {
                    if self.awaiting_release.len() >= usize::from(self.limits.receive_maximum) {
                        return Err(Closing::violation(
                            code::RECEIVE_MAX_EXCEEDED,
                            Denial::ProtocolError,
                            "more QoS 2 messages awaiting release than the receive maximum",
                        ));
                    }
                    self.awaiting_release.insert(meta.pkid, receipt);
                }
                self.acknowledge(AckKind::PubRec, meta.pkid, reason, receipt);
            }
        }
        Ok(())
    }

    fn refusal(&self, v5_code: u8) -> u8 {
        if self.v5 {
            v5_code
        } else {
            code::FAILURE_V4
        }
    }

    fn subscribe(
        &mut self,
        env: &dyn Env,
        mut subscribe: protocol::Subscribe,
        props: Option<protocol::SubscribeProperties>,
        out: &mut BytesMut,
    ) -> Option<Packet> {
        if self.pending_subacks.len() >= MAX_PENDING_SUBACKS {
            // SUBSCRIBEs pile up unanswered: refuse this one rather than forget one.
            env.deny(
                &self.device,
                Denial::SubscribeQuota,
                "too many SUBSCRIBEs unanswered",
            );
            let codes = vec![self.refusal(code::QUOTA_EXCEEDED); subscribe.filters.len()];
            encode::suback(out, self.v5, subscribe.pkid, &codes);
            return None;
        }
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let commands = format!("devices/{}/commands", self.device);
        for f in &mut subscribe.filters {
            // A command filter is granted the QoS asked, at most 1: commands are written at
            // QoS 1 by the gateway itself (never through the router).
            let asked = !matches!(f.qos, protocol::QoS::AtMostOnce);
            // Everything else at QoS 0 (see the module note).
            f.qos = protocol::QoS::AtMostOnce;
            let refused =
                if f.path.len() > self.limits.max_filter_bytes || !acl::valid_filter(&f.path) {
                    Some((Denial::SubscribeInvalid, code::FILTER_INVALID))
                } else if !acl::may_subscribe(&self.device, &f.path) {
                    Some((Denial::Subscribe, code::NOT_AUTHORIZED))
                } else if (!self.subscriptions.contains_key(&f.path)
                    && self.subscriptions.len() >= self.limits.max_subscriptions)
                    || !env.admit_filter(&self.device, &f.path)
                {
                    Some((Denial::SubscribeQuota, code::QUOTA_EXCEEDED))
                } else {
                    None
                };
            match refused {
                Some((denial, reason)) => {
                    let detail =
                        format!("filter {:?}", crate::config::profile::truncate(&f.path, 80));
                    env.deny(&self.device, denial, &detail);
                    f.path = SINK_FILTER.to_owned();
                    codes.push(Some(self.refusal(reason)));
                }
                None => {
                    self.subscriptions.insert(f.path.clone(), f.clone());
                    let is_commands = f
                        .path
                        .strip_prefix(&commands)
                        .is_some_and(|r| r.is_empty() || r.starts_with('/'));
                    codes.push(is_commands.then_some(u8::from(asked)));
                }
            }
        }
        if codes.iter().all(Option::is_some) {
            let codes: Vec<u8> = codes.into_iter().flatten().collect();
            encode::suback(out, self.v5, subscribe.pkid, &codes);
            return None;
        }
        self.pending_subacks.push_back((subscribe.pkid, codes));
        Some(Packet::Subscribe(subscribe, props))
    }

    fn unsubscribe(
        &mut self,
        unsubscribe: protocol::Unsubscribe,
        out: &mut BytesMut,
    ) -> Option<Packet> {
        // rumqttd answers an UNSUBSCRIBE with one UNSUBACK per filter it held, and none
        // for a filter it did not: the device gets exactly one, from here.
        let mut held = Vec::new();
        let reasons: Vec<u8> = unsubscribe
            .filters
            .into_iter()
            .map(|f| {
                if self.subscriptions.remove(&f).is_some() {
                    held.push(f);
                    code::SUCCESS
                } else {
                    code::NO_SUBSCRIPTION_EXISTED
                }
            })
            .collect();
        encode::unsuback(out, self.v5, unsubscribe.pkid, &reasons);
        // Only what the router holds goes to it.
        (!held.is_empty()).then(|| {
            Packet::Unsubscribe(
                protocol::Unsubscribe {
                    pkid: unsubscribe.pkid,
                    filters: held,
                },
                None,
            )
        })
    }

    /// A packet the router sends toward the device: written to `out`, rewritten first
    /// (SUBACK), or dropped (the router's UNSUBACKs; a message larger than the device's
    /// Maximum Packet Size, which MQTT 5 says to discard as if sent: counted).
    pub fn on_router(
        &mut self,
        env: &impl Env,
        packet: Packet,
        out: &mut BytesMut,
    ) -> Result<(), Closing> {
        match packet {
            Packet::SubAck(ack, _) => {
                let decided = self
                    .pending_subacks
                    .iter()
                    .position(|(pkid, _)| *pkid == ack.pkid)
                    .and_then(|i| self.pending_subacks.remove(i))
                    .map(|(_, codes)| codes)
                    .unwrap_or_default();
                if ack.pkid == RESTORE_PKID {
                    return Ok(());
                }
                let mut router = ack.return_codes.iter();
                let mut codes = Vec::with_capacity(ack.return_codes.len());
                for decision in decided.iter().copied().chain(std::iter::repeat(None)) {
                    let Some(from_router) = router.next() else {
                        break;
                    };
                    codes.push(decision.unwrap_or_else(|| self.suback_code(*from_router)));
                }
                encode::suback(out, self.v5, ack.pkid, &codes);
                Ok(())
            }
            Packet::UnsubAck(..) | Packet::ConnAck(..) | Packet::PingResp(..) => Ok(()),
            Packet::Disconnect(d, _) => Err(Closing {
                reason: Some(match d.reason_code {
                    DisconnectReasonCode::TopicAliasInvalid => code::TOPIC_ALIAS_INVALID,
                    DisconnectReasonCode::ProtocolError => code::PROTOCOL_ERROR,
                    _ => 0x83,
                }),
                denial: Some((Denial::ProtocolError, "closed by the router")),
                will: true,
            }),
            other => {
                let start = out.len();
                let written = if self.v5 {
                    V5.write(other, out)
                } else {
                    // rumqttd's 3.1.1 writer panics on any packet with MQTT 5 properties.
                    V4.write(without_properties(other), out)
                };
                if written.is_err() {
                    out.truncate(start);
                    return Err(Closing {
                        reason: Some(0x83),
                        denial: None,
                        will: true,
                    });
                }
                if out.len() - start > self.limits.peer_max_packet {
                    out.truncate(start);
                    env.deny(
                        &self.device,
                        Denial::DeliveryTooLarge,
                        "larger than the device's Maximum Packet Size: not sent",
                    );
                }
                Ok(())
            }
        }
    }

    fn suback_code(&self, c: SubscribeReasonCode) -> u8 {
        match c {
            SubscribeReasonCode::QoS0 => 0,
            SubscribeReasonCode::QoS1 => 1,
            SubscribeReasonCode::QoS2 => 2,
            SubscribeReasonCode::Success(q) => q as u8,
            SubscribeReasonCode::NotAuthorized => self.refusal(code::NOT_AUTHORIZED),
            SubscribeReasonCode::QuotaExceeded => self.refusal(code::QUOTA_EXCEEDED),
            SubscribeReasonCode::TopicFilterInvalid => self.refusal(code::FILTER_INVALID),
            _ => self.refusal(code::FAILURE_V4),
        }
    }
}

/// A device's PUBACK reason code byte (0 on 3.1.1).
fn puback_reason(ack: &protocol::PubAck) -> u8 {
    use protocol::PubAckReason::*;
    match ack.reason {
        Success => 0x00,
        NoMatchingSubscribers => 0x10,
        UnspecifiedError => 0x80,
        ImplementationSpecificError => 0x83,
        NotAuthorized => 0x87,
        TopicNameInvalid => 0x90,
        PacketIdentifierInUse => 0x91,
        QuotaExceeded => 0x97,
        PayloadFormatInvalid => 0x99,
    }
}

/// The same packet without MQTT 5 properties.
fn without_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{Filter, QoS, RetainForwardRule, SubAck, Subscribe, Unsubscribe};
    use std::cell::RefCell;

    #[derive(Default)]
    struct TestEnv {
        captured: RefCell<Vec<(Vec<u8>, Vec<u8>)>>,
        denied: RefCell<Vec<Denial>>,
        filters: RefCell<HashSet<String>>,
        max_filters: usize,
        rate_limited: bool,
    }

    impl Env for TestEnv {
        fn capture(&self, topic: &[u8], payload: &[u8]) -> Capture {
            let mut captured = self.captured.borrow_mut();
            if self.rate_limited {
                return Capture::RateLimited(0);
            }
            captured.push((topic.to_vec(), payload.to_vec()));
            // Receipts numbered as a connection's are: 1, 2, 3...
            Capture::Taken(captured.len() as u64)
        }
        fn deny(&self, _device: &str, what: Denial, _detail: &str) {
            self.denied.borrow_mut().push(what);
        }
        fn admit_filter(&self, _device: &str, filter: &str) -> bool {
            let mut f = self.filters.borrow_mut();
            f.contains(filter) || (f.len() < self.max_filters && f.insert(filter.to_owned()))
        }
    }

    const LIMITS: SessionLimits = SessionLimits {
        max_subscriptions: 3,
        max_filter_bytes: 64,
        receive_maximum: 2,
        topic_alias_maximum: 4,
        peer_max_packet: usize::MAX,
    };

    fn env() -> TestEnv {
        TestEnv {
            max_filters: 100,
            ..Default::default()
        }
    }

    /// A PUBLISH as the connection sees it: the codec's packet and the frame's meta.
    fn publish(topic: &str, qos: u8, pkid: u16, alias: Option<u16>) -> (Packet, PublishMeta) {
        let p = protocol::Publish::new(topic.as_bytes().to_vec(), b"{}".to_vec(), false);
        let props = alias.map(|a| protocol::PublishProperties {
            topic_alias: Some(a),
            ..Default::default()
        });
        let meta = PublishMeta {
            qos,
            dup: false,
            retain: false,
            pkid,
        };
        (Packet::Publish(p, props), meta)
    }

    /// One packet, and everything it waits for committed at once.
    fn run(s: &mut Session, e: &TestEnv, (p, m): (Packet, PublishMeta)) -> Vec<u8> {
        let mut out = BytesMut::new();
        assert_eq!(s.on_device(e, p, Some(m), &mut out), Ok(None));
        s.release(u64::MAX, &mut out);
        out.to_vec()
    }

    /// A session keeps for its next connection only what is committed: a resend of a
    /// message still waiting for its commit is stored again, never acknowledged unstored.
    #[test]
    fn only_committed_messages_are_kept_for_resends() {
        let e = env();
        let mut s = Session::new("k1", true, LIMITS);
        let mut out = BytesMut::new();
        for (qos, pkid) in [(1, 1), (2, 2), (1, 3), (2, 4)] {
            let (p, m) = publish("devices/k1/events", qos, pkid, None);
            assert_eq!(s.on_device(&e, p, Some(m), &mut out), Ok(None));
        }
        let kept = s.kept(2);
        assert_eq!(kept.awaiting_release, HashSet::from([2]));
        assert!(kept
            .recent
            .contains(1, Recent::hash(b"devices/k1/events", b"{}")));
        assert!(!kept
            .recent
            .contains(3, Recent::hash(b"devices/k1/events", b"{}")));
        let mut next = Session::new("k1", true, LIMITS);
        next.restore(kept);
        for (qos, pkid) in [(1, 1), (2, 2), (1, 3), (2, 4)] {
            let (p, mut m) = publish("devices/k1/events", qos, pkid, None);
            m.dup = true;
            assert_eq!(next.on_device(&e, p, Some(m), &mut out), Ok(None));
        }
        assert_eq!(e.captured.borrow().len(), 6, "3 and 4 stored again");
    }

    /// Acknowledgements wait for their messages' commits and leave in publish order, a
    /// refused publish's behind the messages before it; QoS 0 messages are waited for by
    /// what follows them; a PINGREQ is answered at once.
    #[test]
    fn acknowledgements_wait_for_the_commit_in_order() {
        let e = env();
        let mut s = Session::new("k1", true, LIMITS);
        let mut out = BytesMut::new();
        for (topic, qos, pkid) in [
            ("devices/k1/events", 1, 1), // receipt 1
            ("devices/k1/events", 0, 0), // receipt 2
            ("devices/k2/events", 1, 2), // refused: waits for 2
            ("devices/k1/events", 2, 3), // receipt 3
            ("devices/k1/events", 1, 4), // receipt 4
        ] {
            let (p, m) = publish(topic, qos, pkid, None);
            assert_eq!(s.on_device(&e, p, Some(m), &mut out), Ok(None));
        }
        let ping = Packet::PingReq(protocol::PingReq);
        assert_eq!(s.on_device(&e, ping, None, &mut out), Ok(None));
        assert_eq!(out.to_vec(), [0xD0, 0], "only the PINGRESP so far");
        out.clear();
        assert_eq!(s.unacked(), 4);
        s.release(0, &mut out);
        assert!(out.is_empty());
        s.release(1, &mut out);
        assert_eq!(out.to_vec(), [0x40, 2, 0, 1]);
        out.clear();
        s.release(3, &mut out);
        assert_eq!(out.to_vec(), [0x40, 3, 0, 2, 0x87, 0x50, 2, 0, 3]);
        out.clear();
        // A resend of the unreleased QoS 2 message waits behind message 4.
        let (p, mut m) = publish("devices/k1/events", 2, 3, None);
        m.dup = true;
        assert_eq!(s.on_device(&e, p, Some(m), &mut out), Ok(None));
        assert!(out.is_empty());
        s.release(4, &mut out);
        assert_eq!(out.to_vec(), [0x40, 2, 0, 4, 0x50, 2, 0, 3]);
        assert_eq!((s.unacked(), e.captured.borrow().len()), (0, 4));
    }

    #[test]
    fn qos1_is_acknowledged_and_denied_topics_say_so_on_mqtt5() {
        let e = env();
        let mut s = Session::new("k1", true, LIMITS);
        assert_eq!(
            run(&mut s, &e, publish("devices/k1/events", 1, 7, None)),
            [0x40, 2, 0, 7]
        );
        assert_eq!(
            run(&mut s, &e, publish("devices/k2/events", 1, 8, None)),
            [0x40, 3, 0, 8, 0x87]
        );
        assert_eq!(e.captured.borrow().len(), 1);
        assert_eq!(*e.denied.borrow(), [Denial::Publish]);
        // 3.1.1 has no negative PUBACK.
        let mut s = Session::new("k1", false, LIMITS);
        assert_eq!(
            run(&mut s, &e, publish("devices/k2/events", 1, 9, None)),
            [0x40, 2, 0, 9]
        );
    }

    #[test]
    fn rate_limited_messages_get_reason_0x96() {
        let e = TestEnv {
            rate_limited: true,
            ..env()
        };
        let mut s = Session::new("k1", true, LIMITS);
        assert_eq!(
            run(&mut s, &e, publish("devices/k1/events", 1, 1, None)),
            [0x40, 3, 0, 1, 0x96]
        );
    }

    #[test]
    fn qos2_is_stored_once_until_released() {
        let e = env();
        let mut s = Session::new("k1", false, LIMITS);
        let rec = [0x50, 2, 0, 5];
        assert_eq!(
            run(&mut s, &e, publish("devices/k1/events", 2, 5, None)),
            rec
        );
        // Resent before PUBREL (DUP or not): acknowledged, not stored again.
        assert_eq!(
            run(&mut s, &e, publish("devices/k1/events", 2, 5, None)),
            rec
        );
        assert_eq!(e.captured.borrow().len(), 1);
        let mut out = BytesMut::new();
        let rel = Packet::PubRel(
            protocol::PubRel {
                pkid: 5,
                reason: protocol::PubRelReason::Success,
            },
            None,
        );
        assert_eq!(s.on_device(&e, rel.clone(), None, &mut out), Ok(None));
        assert_eq!(&out[..], [0x70, 2, 0, 5]);
        // An unknown PUBREL is completed (MQTT 5: 0x92), never a reason to close.
        let mut s5 = Session::new("k1", true, LIMITS);
        out.clear();
        assert_eq!(s5.on_device(&e, rel, None, &mut out), Ok(None));
        assert_eq!(&out[..], [0x70, 3, 0, 5, 0x92]);
        // The receive maximum bounds what waits for PUBREL.
        run(&mut s, &e, publish("devices/k1/events", 2, 1, None));
        run(&mut s, &e, publish("devices/k1/events", 2, 2, None));
        let (p, m) = publish("devices/k1/events", 2, 3, None);
        let err = s.on_device(&e, p, Some(m), &mut out).unwrap_err();
        assert_eq!(err.reason, Some(code::RECEIVE_MAX_EXCEEDED));
    }

    #[test]
    fn topic_aliases() {
        let e = env();
        let mut s = Session::new("k1", true, LIMITS);
        run(&mut s, &e, publish("devices/k1/telemetry", 1, 1, Some(2)));
        run(&mut s, &e, publish("", 1, 2, Some(2)));
        assert_eq!(e.captured.borrow()[1].0, b"devices/k1/telemetry");
        // A refused topic stays refused through its alias.
        run(&mut s, &e, publish("devices/k2/telemetry", 1, 3, Some(3)));
        assert_eq!(
            run(&mut s, &e, publish("", 1, 4, Some(3))),
            [0x40, 3, 0, 4, 0x87]
        );
        let mut out = BytesMut::new();
        for (topic, alias) in [
            ("", Some(1)),
            ("devices/k1/x", Some(0)),
            ("devices/k1/x", Some(5)),
        ] {
            let (p, m) = publish(topic, 1, 9, alias);
            assert!(
                s.on_device(&e, p, Some(m), &mut out).is_err(),
                "{topic} {alias:?}"
            );
        }
        assert_eq!(e.captured.borrow().len(), 2);
    }

    fn filter(path: &str) -> Filter {
        Filter {
            path: path.into(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        }
    }

    fn subscribe(pkid: u16, paths: &[&str]) -> Packet {
        Packet::Subscribe(
            Subscribe {
                pkid,
                filters: paths.iter().map(|p| filter(p)).collect(),
            },
            None,
        )
    }

    /// A command goes out as a QoS 1 PUBLISH only to a connection subscribed to it; its
    /// PUBACK (and only its) reports it acknowledged, with the reason code.
    #[test]
    fn commands_are_delivered_once_subscribed_and_acknowledged_by_their_puback() {
        let e = env();
        for v5 in [true, false] {
            let mut s = Session::new("k1", v5, LIMITS);
            let mut out = BytesMut::new();
            let command = crate::model::DeviceCommand {
                command_id: "c1".into(),
                expires_ms: i64::MAX,
                topic: "devices/k1/commands/notice".into(),
                payload: br#"{"command_id":"c1","args":{}}"#.to_vec(),
            };
            assert!(!s.commands_subscribed());
            assert_eq!(s.deliver(&command, &mut out), Err("not_subscribed"));
            assert!(out.is_empty());
            s.on_device(&e, subscribe(1, &["devices/k1/commands/+"]), None, &mut out)
                .unwrap();
            // Answered here (commands never go through the router), granted as asked.
            assert_eq!(out[0], 0x90, "a SUBACK");
            out.clear();
            assert!(s.commands_subscribed());
            assert_eq!(s.deliver(&command, &mut out), Ok(()));
            let (packet, meta) = match next_packet(&mut out, v5, 1 << 16).unwrap() {
                Next::Packet(p, m) => (p, m.unwrap()),
                Next::Incomplete { .. } => panic!("not a whole packet"),
            };
            let Packet::Publish(p, _) = packet else {
                panic!("{packet:?}")
            };
            assert_eq!(&p.topic[..], b"devices/k1/commands/notice");
            assert_eq!(&p.payload[..], command.payload.as_slice());
            assert_eq!((meta.qos, meta.pkid), (1, 1));
            // Another packet id's PUBACK acknowledges nothing.
            let ack = |pkid| {
                Packet::PubAck(
                    protocol::PubAck {
                        pkid,
                        reason: protocol::PubAckReason::Success,
                    },
                    None,
                )
            };
            s.on_device(&e, ack(9), None, &mut out).unwrap();
            assert!(s.take_acked().is_empty());
            s.on_device(&e, ack(1), None, &mut out).unwrap();
            assert_eq!(s.take_acked(), vec![("c1".to_owned(), 0)]);
            s.on_device(&e, ack(1), None, &mut out).unwrap();
            assert!(s.take_acked().is_empty(), "acknowledged once");
        }
    }

    #[test]
    fn subscriptions_are_checked_capped_and_answered_once() {
        let e = env();
        let mut s = Session::new("k1", true, LIMITS);
        let mut out = BytesMut::new();
        let to_router = s
            .on_device(
                &e,
                subscribe(1, &["branch/#", "#", "branch/a#", "devices/k1/commands/#"]),
                None,
                &mut out,
            )
            .unwrap()
            .expect("allowed filters go to the router");
        assert!(out.is_empty());
        let Packet::Subscribe(sub, _) = to_router else {
            panic!()
        };
        let paths: Vec<&str> = sub.filters.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "branch/#",
                SINK_FILTER,
                SINK_FILTER,
                "devices/k1/commands/#"
            ]
        );
        let router_ack = Packet::SubAck(
            SubAck {
                pkid: 1,
                return_codes: vec![SubscribeReasonCode::QoS1; 4],
            },
            None,
        );
        s.on_router(&env(), router_ack, &mut out).unwrap();
        assert_eq!(&out[..], [0x90, 7, 0, 1, 0, 1, 0x87, 0x8f, 1]);
        assert_eq!(
            *e.denied.borrow(),
            [Denial::Subscribe, Denial::SubscribeInvalid]
        );
        // Third allowed filter fits, the fourth is over the cap: answered here.
        out.clear();
        assert!(s
            .on_device(&e, subscribe(2, &["branch/b"]), None, &mut out)
            .unwrap()
            .is_some());
        out.clear();
        assert_eq!(
            s.on_device(&e, subscribe(3, &["branch/c"]), None, &mut out),
            Ok(None)
        );
        assert_eq!(&out[..], [0x90, 4, 0, 3, 0, 0x97]);
        // Unsubscribing frees a place; one UNSUBACK with a reason per filter.
        out.clear();
        let unsub = Packet::Unsubscribe(
            Unsubscribe {
                pkid: 4,
                filters: vec!["branch/b".into(), "branch/zz".into()],
            },
            None,
        );
        assert!(s.on_device(&e, unsub, None, &mut out).unwrap().is_some());
        assert_eq!(&out[..], [0xb0, 5, 0, 4, 0, 0, 0x11]);
        // The router's own UNSUBACKs are dropped.
        out.clear();
        let router_unsuback = Packet::UnsubAck(
            protocol::UnsubAck {
                pkid: 4,
                reasons: vec![protocol::UnsubAckReason::Success],
            },
            None,
        );
        s.on_router(&env(), router_unsuback, &mut out).unwrap();
        assert!(out.is_empty());
        assert!(s
            .on_device(&e, subscribe(5, &["branch/c"]), None, &mut out)
            .unwrap()
            .is_some());
    }

    #[test]
    fn the_routers_filter_table_is_bounded() {
        let e = TestEnv {
            max_filters: 1,
            ..Default::default()
        };
        let mut s = Session::new("k1", false, LIMITS);
        let mut out = BytesMut::new();
        assert!(s
            .on_device(&e, subscribe(1, &["branch/a"]), None, &mut out)
            .unwrap()
            .is_some());
        let mut s2 = Session::new("k1", false, LIMITS);
        assert_eq!(
            s2.on_device(&e, subscribe(2, &["branch/b"]), None, &mut out),
            Ok(None)
        );
        assert_eq!(&out[..], [0x90, 3, 0, 2, 0x80]);
        // A filter already known is always admitted.
        assert!(s2
            .on_device(&e, subscribe(3, &["branch/a"]), None, &mut out)
            .unwrap()
            .is_some());
    }

    proptest::proptest! {
        /// Random bytes, and valid packets with a byte changed, never panic the path a
        /// connection's bytes take (the fuzz target runs the same function longer).
        #[test]
        fn device_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            at in 0usize..64,
            byte in proptest::prelude::any::<u8>(),
        ) {
            fuzz_device_bytes(&bytes);
            // A v5 CONNECT, then a SUBSCRIBE and a PUBLISH, one byte replaced.
            let mut stream = vec![
                0x10, 0x11, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0, 0, 2, b'i', b'd',
                0, 0, 0x82, 0x0b, 0, 1, 0, 0, 6, b'b', b'/', b'a', b'/', b'#', 1,
                0x32, 0x0a, 0, 3, b'a', b'/', b'b', 0, 7, 0, b'{', b'}',
            ];
            let i = at % stream.len();
            stream[i] = byte;
            fuzz_device_bytes(&stream);
        }
    }

    #[test]
    fn control_packets() {
        let e = env();
        let mut s = Session::new("k1", true, LIMITS);
        let mut out = BytesMut::new();
        assert_eq!(
            s.on_device(&e, Packet::PingReq(protocol::PingReq), None, &mut out),
            Ok(None)
        );
        assert_eq!(&out[..], [0xd0, 0]);
        let with_will = Packet::Disconnect(
            protocol::Disconnect {
                reason_code: DisconnectReasonCode::DisconnectWithWillMessage,
            },
            None,
        );
        assert!(s.on_device(&e, with_will, None, &mut out).unwrap_err().will);
        let normal = Packet::Disconnect(
            protocol::Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        assert!(!s.on_device(&e, normal, None, &mut out).unwrap_err().will);
    }

    /// MQTT 5: a message larger than the device's Maximum Packet Size is not sent (and
    /// counted); one that fits is sent whole.
    #[test]
    fn router_messages_respect_the_peer_maximum_packet_size() {
        let e = env();
        let limits = SessionLimits {
            peer_max_packet: 40,
            ..LIMITS
        };
        let mut s = Session::new("k1", true, limits);
        let mut out = BytesMut::new();
        let small = protocol::Publish::new(b"branch/x".to_vec(), b"{}".to_vec(), false);
        s.on_router(&e, Packet::Publish(small, None), &mut out)
            .unwrap();
        let sent = out.len();
        assert!(sent > 0 && sent <= 40, "{sent}");
        let big = protocol::Publish::new(b"branch/x".to_vec(), vec![b'a'; 64], false);
        s.on_router(&e, Packet::Publish(big, None), &mut out)
            .unwrap();
        assert_eq!(out.len(), sent, "the large one is not written");
        assert_eq!(*e.denied.borrow(), [Denial::DeliveryTooLarge]);
    }
}
