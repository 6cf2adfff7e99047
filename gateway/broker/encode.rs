//! The packets the gateway itself answers devices with, written byte by byte: rumqttd
//! 0.20's writers hit `unreachable!()` for reason codes the other protocol version lacks
//! (a CONNACK "server busy" in 3.1.1, a SUBACK "not authorized"), and these packets are
//! a few bytes each. Packets the router originates (forwarded PUBLISHes, PUBREL) still go
//! through rumqttd's codec. Pure: no I/O.

use bytes::{BufMut, BytesMut};

/// MQTT 5 reason codes and 3.1.1 return codes used here.
pub(crate) mod code {
    pub const SUCCESS: u8 = 0x00;
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    pub const FAILURE_V4: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const UNSUPPORTED_VERSION: u8 = 0x84;
    pub const CLIENT_ID_INVALID: u8 = 0x85;
    pub const BAD_LOGIN: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const SHUTTING_DOWN: u8 = 0x8b;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8d;
    pub const SESSION_TAKEN_OVER: u8 = 0x8e;
    pub const FILTER_INVALID: u8 = 0x8f;
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    pub const RECEIVE_MAX_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const RATE_TOO_HIGH: u8 = 0x96;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9f;
}

/// Why a CONNECT is refused, written as the CONNACK code of each version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnackRefusal {
    Version,
    ClientId,
    BadLogin,
    NotAuthorized,
    Unavailable,
    Busy,
    Quota,
    RateExceeded,
    Malformed,
}

impl ConnackRefusal {
    /// 3.1.1 has six return codes: what has no code of its own is "server unavailable".
    pub fn code(self, v5: bool) -> u8 {
        use code::*;
        match (self, v5) {
            (ConnackRefusal::Version, false) => 0x01,
            (ConnackRefusal::ClientId, false) => 0x02,
            (ConnackRefusal::BadLogin, false) => 0x04,
            (ConnackRefusal::NotAuthorized, false) => 0x05,
            (_, false) => 0x03,
            (ConnackRefusal::Version, true) => UNSUPPORTED_VERSION,
            (ConnackRefusal::ClientId, true) => CLIENT_ID_INVALID,
            (ConnackRefusal::BadLogin, true) => BAD_LOGIN,
            (ConnackRefusal::NotAuthorized, true) => NOT_AUTHORIZED,
            (ConnackRefusal::Unavailable, true) => SERVER_UNAVAILABLE,
            (ConnackRefusal::Busy, true) => SERVER_BUSY,
            (ConnackRefusal::Quota, true) => QUOTA_EXCEEDED,
            (ConnackRefusal::RateExceeded, true) => CONNECTION_RATE_EXCEEDED,
            (ConnackRefusal::Malformed, true) => MALFORMED,
        }
    }
}

/// MQTT 5 CONNACK properties the gateway announces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ConnackProperties {
    pub receive_maximum: u16,
    pub maximum_packet_size: u32,
    pub topic_alias_maximum: u16,
    pub assigned_client_id: Option<String>,
}

fn remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if len == 0 {
            break;
        }
    }
}

/// A refusing CONNACK (no properties).
pub(crate) fn connack_refused(out: &mut BytesMut, v5: bool, refusal: ConnackRefusal) {
    if v5 {
        // Flags, reason, an empty property block.
        out.put_slice(&[0x20, 0x03, 0x00, refusal.code(true), 0x00]);
    } else {
        out.put_slice(&[0x20, 0x02, 0x00, refusal.code(false)]);
    }
}

/// A successful CONNACK.
pub(crate) fn connack_ok(
    out: &mut BytesMut,
    v5: bool,
    session_present: bool,
    props: &ConnackProperties,
) {
    if !v5 {
        out.put_slice(&[0x20, 0x02, u8::from(session_present), 0x00]);
        return;
    }
    let mut p = BytesMut::new();
    p.put_u8(0x21);
    p.put_u16(props.receive_maximum.max(1));
    p.put_u8(0x27);
    p.put_u32(props.maximum_packet_size.max(1));
    p.put_u8(0x22);
    p.put_u16(props.topic_alias_maximum);
    // No shared subscriptions here (devices may not use them).
    p.put_slice(&[0x2a, 0x00]);
    if let Some(id) = &props.assigned_client_id {
        let id = &id.as_bytes()[..id.len().min(u16::MAX as usize)];
        p.put_u8(0x12);
        p.put_u16(id.len() as u16);
        p.put_slice(id);
    }
    let mut props_len = BytesMut::new();
    remaining_length(&mut props_len, p.len());
    out.put_u8(0x20);
    remaining_length(out, 2 + props_len.len() + p.len());
    out.put_slice(&[u8::from(session_present), 0x00]);
    out.put_slice(&props_len);
    out.put_slice(&p);
}

/// PUBACK, PUBREC and PUBCOMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // the packets' own names
pub(crate) enum AckKind {
    PubAck,
    PubRec,
    PubComp,
}

/// An acknowledgement; a reason other than success is sent on MQTT 5 only.
pub(crate) fn ack(out: &mut BytesMut, v5: bool, kind: AckKind, pkid: u16, reason: u8) {
    let first = match kind {
        AckKind::PubAck => 0x40,
        AckKind::PubRec => 0x50,
        AckKind::PubComp => 0x70,
    };
    let [hi, lo] = pkid.to_be_bytes();
    if v5 && reason != code::SUCCESS {
        out.put_slice(&[first, 0x03, hi, lo, reason]);
    } else {
        out.put_slice(&[first, 0x02, hi, lo]);
    }
}

/// A SUBACK with one code per filter (3.1.1: granted QoS or 0x80; MQTT 5: reason codes).
pub(crate) fn suback(out: &mut BytesMut, v5: bool, pkid: u16, codes: &[u8]) {
    out.put_u8(0x90);
    remaining_length(out, 2 + usize::from(v5) + codes.len());
    out.put_u16(pkid);
    if v5 {
        out.put_u8(0);
    }
    out.put_slice(codes);
}

/// An UNSUBACK (MQTT 5 with one reason per filter).
pub(crate) fn unsuback(out: &mut BytesMut, v5: bool, pkid: u16, reasons: &[u8]) {
    if !v5 {
        out.put_slice(&[0xb0, 0x02]);
        out.put_u16(pkid);
        return;
    }
    out.put_u8(0xb0);
    remaining_length(out, 3 + reasons.len());
    out.put_u16(pkid);
    out.put_u8(0);
    out.put_slice(reasons);
}

/// A QoS 1 PUBLISH (a command for the device): topic, packet id, no properties.
pub(crate) fn publish_qos1(out: &mut BytesMut, v5: bool, topic: &str, pkid: u16, payload: &[u8]) {
    let len = 2 + topic.len() + 2 + usize::from(v5) + payload.len();
    out.put_u8(0x32);
    remaining_length(out, len);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    out.put_u16(pkid);
    if v5 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

pub(crate) fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xd0, 0x00]);
}

/// An MQTT 5 DISCONNECT with a reason (3.1.1 servers send none).
pub(crate) fn disconnect(out: &mut BytesMut, reason: u8) {
    out.put_slice(&[0xe0, 0x01, reason]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{v4::V4, v5::V5, Packet, Protocol};

    fn read_v5(bytes: &BytesMut) -> Packet {
        let mut b = bytes.clone();
        V5.read_mut(&mut b, 1 << 20).unwrap()
    }

    #[test]
    fn connack_bytes() {
        let mut out = BytesMut::new();
        connack_refused(&mut out, false, ConnackRefusal::Busy);
        assert_eq!(&out[..], [0x20, 2, 0, 3]);
        out.clear();
        connack_refused(&mut out, true, ConnackRefusal::Busy);
        assert_eq!(&out[..], [0x20, 3, 0, 0x89, 0]);
        out.clear();
        connack_ok(&mut out, false, true, &ConnackProperties::default());
        assert_eq!(&out[..], [0x20, 2, 1, 0]);
    }

    /// rumqttd's own reader (what a client library would parse) agrees with the bytes.
    #[test]
    fn v5_packets_read_back() {
        let mut out = BytesMut::new();
        let props = ConnackProperties {
            receive_maximum: 64,
            maximum_packet_size: 70_000,
            topic_alias_maximum: 16,
            assigned_client_id: Some("auto-1".into()),
        };
        connack_ok(&mut out, true, false, &props);
        // rumqttd's v5 reader reads CONNACK only as a client would; parse it by hand.
        assert_eq!(out[0], 0x20);
        assert_eq!(out[1] as usize, out.len() - 2);
        assert_eq!(&out[2..4], [0, 0]);
        out.clear();
        ack(&mut out, true, AckKind::PubAck, 7, code::NOT_AUTHORIZED);
        let Packet::PubAck(a, _) = read_v5(&out) else {
            panic!()
        };
        assert_eq!(a.pkid, 7);
        assert_eq!(a.reason, rumqttd::protocol::PubAckReason::NotAuthorized);
        out.clear();
        ack(&mut out, true, AckKind::PubRec, 9, code::SUCCESS);
        assert!(matches!(read_v5(&out), Packet::PubRec(r, _) if r.pkid == 9));
        out.clear();
        ack(
            &mut out,
            false,
            AckKind::PubComp,
            3,
            code::PACKET_ID_NOT_FOUND,
        );
        assert_eq!(&out[..], [0x70, 2, 0, 3]);
        let mut b = out.clone();
        assert!(matches!(V4.read_mut(&mut b, 100), Ok(Packet::PubComp(c, _)) if c.pkid == 3));
        out.clear();
        disconnect(&mut out, code::PROTOCOL_ERROR);
        assert_eq!(&out[..], [0xe0, 1, 0x82]);
    }

    #[test]
    fn suback_and_unsuback() {
        let mut out = BytesMut::new();
        suback(&mut out, false, 5, &[0, 1, 0x80]);
        assert_eq!(&out[..], [0x90, 5, 0, 5, 0, 1, 0x80]);
        out.clear();
        suback(&mut out, true, 5, &[1, 0x87]);
        assert_eq!(&out[..], [0x90, 5, 0, 5, 0, 1, 0x87]);
        out.clear();
        unsuback(&mut out, false, 6, &[0]);
        assert_eq!(&out[..], [0xb0, 2, 0, 6]);
        out.clear();
        unsuback(&mut out, true, 6, &[0, 0x11]);
        assert_eq!(&out[..], [0xb0, 5, 0, 6, 0, 0, 0x11]);
        out.clear();
        // A long SUBACK needs a two-byte remaining length.
        suback(&mut out, false, 1, &[0; 200]);
        assert_eq!(&out[..3], [0x90, 0xca, 0x01]);
        assert_eq!(out.len(), 3 + 202);
    }
}
