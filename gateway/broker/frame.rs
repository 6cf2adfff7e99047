//! The first look at every packet a device sends, before rumqttd's codec sees it.
//!
//! rumqttd 0.20's codecs are written for well-behaved peers: its MQTT 5 reader hits
//! `unreachable!()` on packet types only a server sends (CONNACK, SUBACK, UNSUBACK,
//! PINGRESP), which aborts the whole process. This module decides from the fixed header,
//! as soon as its bytes arrive, whether a packet may be handed to the codec at all:
//! - only the ten packet types a client sends (AUTH is not supported: there is no
//!   enhanced authentication);
//! - the fixed-header flags MQTT prescribes (PUBREL, SUBSCRIBE and UNSUBSCRIBE `0010`,
//!   others `0000`; PUBLISH: QoS 0-2, DUP only with QoS > 0);
//! - a remaining length in at most four bytes and under the broker's packet limit, known
//!   before the body is read (so an oversized packet costs nothing to refuse);
//! - for CONNECT, the protocol name and level, a zero reserved flag and consistent will
//!   and login flags ([`connect_meta`]);
//! - for PUBLISH, the QoS, DUP, RETAIN and packet id, which rumqttd keeps private
//!   ([`publish_meta`]).
//!
//! Pure functions over byte slices, no I/O: unit-tested, property-tested and fuzzed.

/// Packet types a client may send (MQTT 3.1.1 §2.2.1, MQTT 5 §2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Connect,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    Unsubscribe,
    PingReq,
    Disconnect,
}

/// A complete fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    /// The low four bits of the first byte.
    pub flags: u8,
    /// Bytes of the fixed header (2-5).
    pub header_len: usize,
    /// Bytes after the fixed header.
    pub remaining: usize,
}

impl Header {
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// What [`peek`] found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peek {
    /// Nothing wrong so far, but the fixed header or the body is not complete; `started`
    /// says whether any byte of a packet has arrived (the packet timeout then runs).
    Incomplete { started: bool },
    /// A whole packet of `header.frame_len()` bytes is at the front of the buffer.
    Ready(Header),
}

/// Why a packet is refused before the codec sees it. Each closes the connection
/// (MQTT 5: after a DISCONNECT with [`FrameError::reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("packet type {0} is sent only by servers")]
    ServerOnly(u8),
    #[error("packet type {0} is reserved or not supported")]
    Unsupported(u8),
    #[error("fixed-header flags {flags:#06b} are invalid for packet type {kind}")]
    Flags { kind: u8, flags: u8 },
    #[error("remaining length is not a valid variable byte integer")]
    Length,
    #[error("packet of {0} bytes is over the broker's limit")]
    TooLarge(usize),
}

impl FrameError {
    /// The MQTT 5 DISCONNECT reason: 0x95 packet too large, 0x81 malformed (bad length
    /// encoding), 0x82 protocol error otherwise.
    pub fn reason(self) -> u8 {
        match self {
            FrameError::TooLarge(_) => 0x95,
            FrameError::Length => 0x81,
            _ => 0x82,
        }
    }
}

/// The packet kind for a type nibble, if a client may send it.
fn kind_of(nibble: u8) -> Result<Kind, FrameError> {
    Ok(match nibble {
        1 => Kind::Connect,
        3 => Kind::Publish,
        4 => Kind::PubAck,
        5 => Kind::PubRec,
        6 => Kind::PubRel,
        7 => Kind::PubComp,
        8 => Kind::Subscribe,
        10 => Kind::Unsubscribe,
        12 => Kind::PingReq,
        14 => Kind::Disconnect,
        2 | 9 | 11 | 13 => return Err(FrameError::ServerOnly(nibble)),
        other => return Err(FrameError::Unsupported(other)),
    })
}

fn check_flags(kind: Kind, nibble: u8, flags: u8) -> Result<(), FrameError> {
    let ok = match kind {
        // QoS 3 is malformed; DUP must be 0 at QoS 0.
        Kind::Publish => {
            let qos = (flags >> 1) & 0b11;
            qos != 3 && !(qos == 0 && flags & 0b1000 != 0)
        }
        Kind::PubRel | Kind::Subscribe | Kind::Unsubscribe => flags == 0b0010,
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(FrameError::Flags {
            kind: nibble,
            flags,
        })
    }
}

/// Look at the front of `buf`: refuse what no client may send, else say whether a whole
/// packet is there. `max_frame` bounds the whole packet, fixed header included.
pub(crate) fn peek(buf: &[u8], max_frame: usize) -> Result<Peek, FrameError> {
    let Some(&first) = buf.first() else {
        return Ok(Peek::Incomplete { started: false });
    };
    let (nibble, flags) = (first >> 4, first & 0x0f);
    let kind = kind_of(nibble)?;
    check_flags(kind, nibble, flags)?;
    let mut remaining: usize = 0;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(Peek::Incomplete { started: true });
        };
        remaining |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if i > 4 {
            // A fifth length byte: more than 268,435,455 bytes or a broken encoding.
            return Err(FrameError::Length);
        }
    }
    let header = Header {
        kind,
        flags,
        header_len: i,
        remaining,
    };
    if header.frame_len() > max_frame {
        return Err(FrameError::TooLarge(header.frame_len()));
    }
    if buf.len() < header.frame_len() {
        return Ok(Peek::Incomplete { started: true });
    }
    Ok(Peek::Ready(header))
}

/// Read a two-byte length and that many bytes at `*at`, moving `*at` past them.
fn field<'a>(body: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let len = u16::from_be_bytes([*body.get(*at)?, *body.get(*at + 1)?]) as usize;
    let start = *at + 2;
    let value = body.get(start..start + len)?;
    *at = start + len;
    Some(value)
}

/// What the gateway needs from a CONNECT before the codec parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectMeta {
    /// 4 (MQTT 3.1.1) or 5.
    pub level: u8,
}

/// Why a CONNECT is refused before the codec parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("CONNECT is truncated")]
    Truncated,
    #[error("protocol name is not MQTT")]
    Protocol,
    /// A level the gateway does not speak (3 is MQTT 3.1, "MQIsdp"): CONNACK 0x01 / 0x84.
    #[error("protocol level {0} is not supported (only 4, MQTT 3.1.1, and 5)")]
    Level(u8),
    #[error("reserved connect flag is set")]
    Reserved,
    #[error("will flags are inconsistent")]
    Will,
    #[error("password flag without user name flag")]
    Login,
}

/// Check a CONNECT's variable header. `frame` is the whole packet.
pub(crate) fn connect_meta(header: &Header, frame: &[u8]) -> Result<ConnectMeta, ConnectError> {
    let body = frame
        .get(header.header_len..)
        .ok_or(ConnectError::Truncated)?;
    let mut at = 0;
    let name = field(body, &mut at).ok_or(ConnectError::Truncated)?;
    let level = *body.get(at).ok_or(ConnectError::Truncated)?;
    let flags = *body.get(at + 1).ok_or(ConnectError::Truncated)?;
    match name {
        b"MQTT" => {}
        b"MQIsdp" => return Err(ConnectError::Level(level)),
        _ => return Err(ConnectError::Protocol),
    }
    if level != 4 && level != 5 {
        return Err(ConnectError::Level(level));
    }
    if flags & 0b0000_0001 != 0 {
        return Err(ConnectError::Reserved);
    }
    let will = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    if will_qos == 3 || (!will && (will_qos != 0 || will_retain)) {
        return Err(ConnectError::Will);
    }
    // MQTT 3.1.1 §3.1.2.9: no password without a user name (MQTT 5 allows it).
    if level == 4 && flags & 0b0100_0000 != 0 && flags & 0b1000_0000 == 0 {
        return Err(ConnectError::Login);
    }
    Ok(ConnectMeta { level })
}

/// The parts of a PUBLISH rumqttd keeps crate-private.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PublishMeta {
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    /// 0 at QoS 0.
    pub pkid: u16,
}

/// QoS, DUP, RETAIN and packet id of a PUBLISH whose header [`peek`] accepted. `None`
/// when the body is too short for them or a QoS > 0 packet id is 0 (a protocol error).
pub(crate) fn publish_meta(header: &Header, frame: &[u8]) -> Option<PublishMeta> {
    let qos = (header.flags >> 1) & 0b11;
    let body = frame.get(header.header_len..header.frame_len())?;
    let mut at = 0;
    field(body, &mut at)?;
    let pkid = if qos > 0 {
        let id = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        if id == 0 {
            return None;
        }
        id
    } else {
        0
    };
    Some(PublishMeta {
        qos,
        dup: header.flags & 0b1000 != 0,
        retain: header.flags & 0b0001 != 0,
        pkid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn server_only_and_reserved_types_are_refused_at_the_first_byte() {
        for (byte, nibble) in [(0x20, 2), (0x90, 9), (0xb0, 11), (0xd0, 13)] {
            assert_eq!(peek(&[byte], MAX), Err(FrameError::ServerOnly(nibble)));
        }
        assert_eq!(peek(&[0x00], MAX), Err(FrameError::Unsupported(0)));
        assert_eq!(peek(&[0xf0, 0], MAX), Err(FrameError::Unsupported(15)));
        // The probe's CONNACK and UNSUBACK.
        assert!(peek(&[0x20, 0x02, 0, 0], MAX).is_err());
        assert!(peek(&[0xb0, 0x03, 0, 1, 0], MAX).is_err());
    }

    #[test]
    fn flags_follow_the_specification() {
        assert!(peek(&[0x62, 2, 0, 1], MAX).is_ok()); // PUBREL 0010
        assert!(peek(&[0x60, 2, 0, 1], MAX).is_err());
        assert!(peek(&[0x80, 0], MAX).is_err()); // SUBSCRIBE 0000
        assert!(peek(&[0xa3, 0], MAX).is_err());
        assert!(peek(&[0xc1, 0], MAX).is_err()); // PINGREQ 0001
        assert!(peek(&[0x36, 0], MAX).is_err()); // PUBLISH QoS 3
        assert!(peek(&[0x38, 0], MAX).is_err()); // PUBLISH DUP at QoS 0
        assert!(peek(&[0x3a, 0], MAX).is_ok()); // DUP at QoS 1
        assert!(peek(&[0x31, 0], MAX).is_ok()); // RETAIN
    }

    #[test]
    fn lengths() {
        assert_eq!(peek(&[], MAX), Ok(Peek::Incomplete { started: false }));
        assert_eq!(peek(&[0xc0], MAX), Ok(Peek::Incomplete { started: true }));
        let ping = Header {
            kind: Kind::PingReq,
            flags: 0,
            header_len: 2,
            remaining: 0,
        };
        assert_eq!(peek(&[0xc0, 0], MAX), Ok(Peek::Ready(ping)));
        assert_eq!(
            peek(&[0x30, 0xff, 0xff, 0xff, 0xff], usize::MAX),
            Err(FrameError::Length)
        );
        assert_eq!(
            peek(&[0x30, 0xff, 0xff, 0xff, 0x7f], MAX),
            Err(FrameError::TooLarge(268_435_455 + 5))
        );
        // Too large is known from the length alone.
        assert_eq!(
            peek(&[0x30, 0x80, 0x80, 0x01], 1000),
            Err(FrameError::TooLarge(16388))
        );
        assert_eq!(
            peek(&[0x30, 0x05, 0, 1], MAX),
            Ok(Peek::Incomplete { started: true })
        );
    }

    fn connect(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
        let mut body = vec![0, name.len() as u8];
        body.extend_from_slice(name);
        body.extend_from_slice(&[level, flags, 0, 60, 0, 1, b'c']);
        let mut out = vec![0x10, body.len() as u8];
        out.extend(body);
        out
    }

    fn meta(bytes: &[u8]) -> Result<ConnectMeta, ConnectError> {
        let Ok(Peek::Ready(h)) = peek(bytes, MAX) else {
            panic!("not a whole packet")
        };
        connect_meta(&h, bytes)
    }

    #[test]
    fn connect_variable_header() {
        assert_eq!(
            meta(&connect(b"MQTT", 4, 0x02)),
            Ok(ConnectMeta { level: 4 })
        );
        assert_eq!(
            meta(&connect(b"MQTT", 5, 0x02)),
            Ok(ConnectMeta { level: 5 })
        );
        assert_eq!(
            meta(&connect(b"MQTT", 4, 0x03)),
            Err(ConnectError::Reserved)
        );
        assert_eq!(
            meta(&connect(b"MQTT", 3, 0x02)),
            Err(ConnectError::Level(3))
        );
        assert_eq!(
            meta(&connect(b"MQIsdp", 3, 0x02)),
            Err(ConnectError::Level(3))
        );
        assert_eq!(
            meta(&connect(b"HTTP", 4, 0x02)),
            Err(ConnectError::Protocol)
        );
        assert_eq!(meta(&connect(b"MQTT", 4, 0x1e)), Err(ConnectError::Will)); // will QoS 3
        assert_eq!(meta(&connect(b"MQTT", 4, 0x22)), Err(ConnectError::Will)); // retain, no will
        assert_eq!(meta(&connect(b"MQTT", 4, 0x42)), Err(ConnectError::Login));
        assert_eq!(
            meta(&connect(b"MQTT", 5, 0x42)),
            Ok(ConnectMeta { level: 5 })
        );
        assert_eq!(meta(&[0x10, 1, 0]), Err(ConnectError::Truncated));
    }

    #[test]
    fn publish_fields() {
        // QoS 1, DUP, topic "a/b", pkid 7.
        let p = [0x3a, 7, 0, 3, b'a', b'/', b'b', 0, 7];
        let Ok(Peek::Ready(h)) = peek(&p, MAX) else {
            panic!()
        };
        assert_eq!(
            publish_meta(&h, &p),
            Some(PublishMeta {
                qos: 1,
                dup: true,
                retain: false,
                pkid: 7
            })
        );
        let zero = [0x32, 7, 0, 3, b'a', b'/', b'b', 0, 0];
        let Ok(Peek::Ready(h)) = peek(&zero, MAX) else {
            panic!()
        };
        assert_eq!(publish_meta(&h, &zero), None);
        let short = [0x32, 3, 0, 3, b'a'];
        let Ok(Peek::Ready(h)) = peek(&short, MAX) else {
            panic!()
        };
        assert_eq!(publish_meta(&h, &short), None);
    }

    proptest! {
        /// Whatever the bytes: no panic, and a Ready header lies within the buffer and
        /// under the limit, with a type a client may send.
        #[test]
        fn any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..200) {
            if let Ok(Peek::Ready(h)) = peek(&bytes, max) {
                prop_assert!(h.frame_len() <= bytes.len());
                prop_assert!(h.frame_len() <= max);
                prop_assert!(!matches!(bytes[0] >> 4, 0 | 2 | 9 | 11 | 13 | 15));
                let _ = publish_meta(&h, &bytes);
                let _ = connect_meta(&h, &bytes);
            }
        }

        /// Every length MQTT can encode is decoded back exactly.
        #[test]
        fn lengths_round_trip(len in 0usize..268_435_456) {
            let mut bytes = vec![0x30];
            let mut n = len;
            loop {
                let mut b = (n % 128) as u8;
                n /= 128;
                if n > 0 { b |= 0x80; }
                bytes.push(b);
                if n == 0 { break; }
            }
            let header_len = bytes.len();
            match peek(&bytes, usize::MAX) {
                Ok(Peek::Incomplete { started: true }) => prop_assert!(len > 0),
                Ok(Peek::Ready(h)) => {
                    prop_assert_eq!(len, 0);
                    prop_assert_eq!(h.header_len, header_len);
                }
                other => prop_assert!(false, "{:?}", other),
            }
            bytes.resize(header_len + len.min(4), 0);
            if len <= 4 {
                let Ok(Peek::Ready(h)) = peek(&bytes, usize::MAX) else { panic!() };
                prop_assert_eq!(h.remaining, len);
            }
        }
    }
}
