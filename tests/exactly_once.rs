//! A device's acknowledgement is a promise (issue 14): a PUBACK or PUBREC leaves only once
//! the message is committed; a QoS 1 resend of a stored message and a QoS 2 message sent
//! again before its release are stored once, across reconnects of a persistent session;
//! a PUBREL whose PUBCOMP was lost completes. Raw sockets against the real binary, on
//! MQTT 3.1.1 and 5.

mod common;
use common::mqtt::{self, Connect};
use common::*;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);
const ROWS: &str = "SELECT COUNT(*) FROM messages WHERE device = 'k1' AND kind = 'telemetry'";

/// Log in as k1 with `client_id`; a persistent session unless `clean` (MQTT 5: with a
/// Session Expiry Interval of an hour). Returns the stream and "session present".
fn connect(port: u16, v5: bool, client_id: &str, clean: bool) -> (TcpStream, bool) {
    connect_expiring(port, v5, client_id, clean, (!clean).then_some(3600))
}

/// [`connect`] with an MQTT 5 Session Expiry Interval (seconds) or none.
fn connect_expiring(
    port: u16,
    v5: bool,
    client_id: &str,
    clean: bool,
    expiry_s: Option<u32>,
) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    // Property 0x11: Session Expiry Interval, four bytes (MQTT 5 only).
    let mut props = Vec::new();
    if let (true, Some(e)) = (v5, expiry_s) {
        props.push(0x11);
        props.extend_from_slice(&e.to_be_bytes());
    }
    let expiry = &props[..];
    s.write_all(&mqtt::connect(&Connect {
        v5,
        client_id,
        login: Some(("k1", "k1-pw")),
        keep_alive: 30,
        clean,
        will: None,
        properties: expiry,
    }))
    .unwrap();
    let (first, body) = mqtt::read_packet(&mut s, WAIT).expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0), "a successful CONNACK");
    (s, body[0] & 1 == 1)
}

fn publish(v5: bool, qos: u8, pkid: u16, n: u32, dup: bool) -> Vec<u8> {
    let payload = format!(r#"{{"n":{n},"device":"k1"}}"#);
    let mut p = mqtt::publish(
        b"devices/k1/telemetry",
        payload.as_bytes(),
        qos,
        pkid,
        v5.then_some(&[][..]),
    );
    if dup {
        p[0] |= 0x08;
    }
    p
}

fn ack(s: &mut TcpStream) -> (u8, Vec<u8>) {
    mqtt::read_packet(s, WAIT).expect("an acknowledgement")
}

fn stored_ns(branch: &Branch) -> Vec<i64> {
    let db = branch.db();
    let mut st = db
        .prepare("SELECT json_extract(payload, '$.n') FROM messages WHERE device = 'k1' AND kind = 'telemetry' ORDER BY seq")
        .unwrap();
    let rows = st.query_map([], |r| r.get(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

/// QoS 1: the PUBACK comes after the commit (the row is there the moment it arrives); a
/// resend with DUP=1 after the connection dropped is acknowledged and not stored again
/// (`duplicate_resend`); a DUP=1 message with the same packet id but other content is a
/// new message; a clean session forgets.
fn qos1_resend(v5: bool) {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let (mut s, present) = connect(branch.port, v5, "r1", false);
    assert!(!present);
    for (pkid, n) in [(7, 1), (8, 2)] {
        s.write_all(&publish(v5, 1, pkid, n, false)).unwrap();
        assert_eq!(ack(&mut s), (0x40, vec![0, pkid as u8]));
        assert_eq!(
            branch.count(ROWS),
            i64::from(n),
            "committed before its PUBACK"
        );
    }
    // The PUBACK of 8 "lost": the device resends 8 on its next connection.
    mqtt::reset(s);
    let (mut s, present) = connect(branch.port, v5, "r1", false);
    assert!(present, "the persistent session is resumed");
    s.write_all(&publish(v5, 1, 8, 2, true)).unwrap();
    assert_eq!(ack(&mut s), (0x40, vec![0, 8]));
    // Same packet id, DUP=1, other content: not a resend of what was stored.
    s.write_all(&publish(v5, 1, 7, 3, true)).unwrap();
    assert_eq!(ack(&mut s), (0x40, vec![0, 7]));
    assert_eq!(stored_ns(&branch), [1, 2, 3]);
    // A clean session remembers nothing of r1's: the same resend is stored.
    drop(s);
    let (mut s, present) = connect(branch.port, v5, "r1", true);
    assert!(!present);
    s.write_all(&publish(v5, 1, 8, 2, true)).unwrap();
    assert_eq!(ack(&mut s), (0x40, vec![0, 8]));
    assert_eq!(stored_ns(&branch), [1, 2, 3, 2]);
    assert_eq!(branch.wait_counter("k1", "duplicate_resend", 1), 1);
    let (status, _) = gw.terminate();
    assert!(status.success());
}

#[test]
fn qos1_resend_after_a_lost_puback_is_stored_once_mqtt311() {
    qos1_resend(false);
}

#[test]
fn qos1_resend_after_a_lost_puback_is_stored_once_mqtt5() {
    qos1_resend(true);
}

/// QoS 2: PUBREC after the commit; the message sent again (DUP=1) after a reconnect,
/// before its PUBREL, is not stored again; PUBREL completes it; a PUBREL sent again after
/// its PUBCOMP was lost gets a PUBCOMP (MQTT 5: reason 0x92), so the client completes.
fn qos2_across_reconnects(v5: bool) {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let (mut s, _) = connect(branch.port, v5, "q1", false);
    s.write_all(&publish(v5, 2, 9, 1, false)).unwrap();
    assert_eq!(ack(&mut s), (0x50, vec![0, 9]));
    assert_eq!(branch.count(ROWS), 1, "committed before its PUBREC");
    mqtt::reset(s);
    let (mut s, present) = connect(branch.port, v5, "q1", false);
    assert!(present);
    s.write_all(&publish(v5, 2, 9, 1, true)).unwrap();
    assert_eq!(ack(&mut s), (0x50, vec![0, 9]));
    s.write_all(&[0x62, 0x02, 0, 9]).unwrap();
    assert_eq!(ack(&mut s), (0x70, vec![0, 9]));
    // The PUBCOMP "lost": the client sends its PUBREL again on the next connection.
    mqtt::reset(s);
    let (mut s, present) = connect(branch.port, v5, "q1", false);
    assert!(present);
    s.write_all(&[0x62, 0x02, 0, 9]).unwrap();
    let unknown = if v5 { vec![0, 9, 0x92] } else { vec![0, 9] };
    assert_eq!(ack(&mut s), (0x70, unknown));
    // Released: the same packet id now starts a new message.
    s.write_all(&publish(v5, 2, 9, 2, false)).unwrap();
    assert_eq!(ack(&mut s), (0x50, vec![0, 9]));
    s.write_all(&[0x62, 0x02, 0, 9]).unwrap();
    assert_eq!(ack(&mut s), (0x70, vec![0, 9]));
    assert_eq!(stored_ns(&branch), [1, 2]);
    let (status, _) = gw.terminate();
    assert!(status.success());
}

#[test]
fn qos2_is_stored_once_across_reconnects_mqtt311() {
    qos2_across_reconnects(false);
}

#[test]
fn qos2_is_stored_once_across_reconnects_mqtt5() {
    qos2_across_reconnects(true);
}

/// MQTT 5: clean start 0 without a Session Expiry Interval keeps no session (it expires
/// when the connection closes); with one, the session is there on the next connection
/// until the interval has passed since the connection closed.
#[test]
fn mqtt5_session_expiry_decides_persistence() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let port = branch.port;
    // (A connection still open when the next one comes is taken over: the same answer.)
    let (s, _) = connect_expiring(port, true, "e1", false, None);
    drop(s);
    let (s, present) = connect_expiring(port, true, "e1", false, None);
    assert!(!present, "expiry 0: nothing kept");
    drop(s);
    let (s, _) = connect(port, true, "e1", false);
    drop(s);
    let (s, present) = connect(port, true, "e1", false);
    assert!(present, "an expiry of an hour: the session is kept");
    drop(s);
    // One second: kept across a quick reconnect, gone once the second has passed.
    let (s, _) = connect_expiring(port, true, "e2", false, Some(1));
    drop(s);
    let (s, present) = connect_expiring(port, true, "e2", false, Some(1));
    assert!(present, "reconnected within the interval");
    mqtt::reset(s);
    // The interval is the condition waited for: it runs from the close, so 1.5 s after it.
    std::thread::sleep(Duration::from_millis(1500));
    let (_s, present) = connect_expiring(port, true, "e2", false, Some(1));
    assert!(!present, "expired a second after the connection closed");
    let (status, _) = gw.terminate();
    assert!(status.success());
}
