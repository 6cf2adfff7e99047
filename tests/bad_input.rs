//! Faults at the device edge: wrong credentials, foreign topics, forbidden subscriptions,
//! garbage bytes, invalid payloads, oversized packets and a flood. Each has its documented
//! outcome, nothing crashes, and nothing valid is lost.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use rumqttc::{QoS, SubscribeReasonCode};

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn str_field(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// An MQTT 3.1.1 CONNECT, built by hand so tests control every byte (e.g. keep-alive 0).
fn raw_connect(client_id: &str, login: Option<(&str, &str)>, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    str_field("MQTT", &mut body);
    body.push(4);
    body.push(0x02 | if login.is_some() { 0xC0 } else { 0 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    str_field(client_id, &mut body);
    if let Some((u, p)) = login {
        str_field(u, &mut body);
        str_field(p, &mut body);
    }
    let mut packet = vec![0x10];
    remaining_length(body.len(), &mut packet);
    packet.extend(body);
    packet
}

/// Send `bytes` on a new connection; return what the broker answers before closing or
/// going quiet for 2 s.
fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() >= 4 {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    out
}

/// True when the broker closed the connection (read returns 0 or an error before 5 s).
fn closed_by_broker(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[test]
fn connect_is_authenticated_and_keepalive_zero_is_accepted() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let _gw = branch.start();
    let port = branch.port;
    // CONNACK: 0x20 0x02 <session present> <return code>
    assert_eq!(
        exchange(port, &raw_connect("a", Some(("k1", "k1-pw")), 30)),
        [0x20, 2, 0, 0]
    );
    assert_eq!(
        exchange(port, &raw_connect("b", Some(("k1", "k1-pw")), 0)),
        [0x20, 2, 0, 0],
        "keep-alive 0 is legal MQTT and accepted"
    );
    assert_eq!(
        exchange(port, &raw_connect("c", Some(("k1", "wrong")), 30)),
        [0x20, 2, 0, 4]
    );
    assert_eq!(
        exchange(port, &raw_connect("d", Some(("nobody", "x")), 30)),
        [0x20, 2, 0, 4]
    );
    assert_eq!(exchange(port, &raw_connect("e", None, 30)), [0x20, 2, 0, 5]);
    assert_eq!(branch.wait_counter("k1", "connect_bad_password", 1), 1);
    assert_eq!(branch.wait_counter("k1", "connects", 2), 2);
    assert_eq!(
        branch.counter("nobody", "connect_unknown_device"),
        0,
        "unknown names are not stored"
    );
    let (status, log) = _gw.terminate();
    assert!(status.success());
    assert!(
        log.contains("reason=\"connect_unknown_device\"")
            || log.contains("reason=connect_unknown_device"),
        "{log}"
    );
    assert!(!log.contains("wrong"), "passwords never appear in the log");
}

#[test]
fn garbage_bytes_close_only_that_connection() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let mut gw = branch.start();
    let port = branch.port;
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xFF; 64][..],
        &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F][..],
        &[0x30, 0x05, 0, 1, b'x', 1, 2][..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(garbage).unwrap();
        assert!(
            closed_by_broker(s),
            "broker closes a connection after {garbage:?}"
        );
    }
    assert!(gw.is_running());
    assert_eq!(
        exchange(port, &raw_connect("ok", Some(("k1", "k1-pw")), 30)),
        [0x20, 2, 0, 0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_invalid_payloads_oversize_and_flood() {
    let branch = Branch::new(&[
        device("k1", "test-sensor"),
        device("k2", "test-sensor"),
        device("kiosk-01", "self-check-kiosk"),
    ]);
    let gw = branch.start();
    let port = branch.port;
    let mut k1 = connect(port, "k1", "k1-pw").await;
    let mut k2 = connect(port, "k2", "k2-pw").await;

    // Publishing as another device: acknowledged (MQTT 3.1.1 allows ack-and-drop), not stored.
    k1.client
        .publish(
            "devices/k2/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"n":1,"device":"k2"}"#,
        )
        .await
        .unwrap();
    k1.client
        .publish("branch/summary/live", QoS::AtLeastOnce, false, "{}")
        .await
        .unwrap();
    assert_eq!(k1.pubacks(2, Duration::from_secs(5)).await, 2);

    // Subscriptions: its own commands and branch/# are allowed; `#` and others' are not.
    k2.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("devices/k2/commands/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("devices/k1/commands/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("branch/#".into(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    let suback = k2.suback().await.expect("SUBACK");
    assert_eq!(
        suback.return_codes,
        // Granted at QoS 0 whatever is asked (the device contract), except its commands:
        // QoS 1 as asked (the gateway writes them at QoS 1).
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
        ]
    );

    // Invalid payloads: acknowledged, rejected with their reason, the connection stays.
    let bad: [(&str, &[u8], &str); 6] = [
        ("devices/k2/telemetry", b"not json", "not_json"),
        ("devices/k2/telemetry", b"[1,2,3]", "not_object"),
        (
            "devices/k2/telemetry",
            br#"{"n":"7","device":"k2"}"#,
            "wrong_type",
        ),
        (
            "devices/k2/telemetry",
            br#"{"device":"k2"}"#,
            "missing_field",
        ),
        (
            "devices/k2/events",
            br#"{"event":"explode","n":1}"#,
            "unknown_type",
        ),
        ("devices/k2/shouts", br#"{"n":1}"#, "unknown_kind"),
    ];
    for (topic, payload, _) in &bad {
        k2.client
            .publish(*topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
    }
    let over_limit = format!(r#"{{"n":1,"device":"k2","pad":"{}"}}"#, "x".repeat(600));
    k2.client
        .publish("devices/k2/telemetry", QoS::AtLeastOnce, false, over_limit)
        .await
        .unwrap();
    assert_eq!(k2.pubacks(7, Duration::from_secs(5)).await, 7);

    // A valid message after all that still goes through, on the same connection.
    k2.client
        .publish(
            "devices/k2/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"n":1,"device":"k2"}"#,
        )
        .await
        .unwrap();
    assert_eq!(k2.pubacks(1, Duration::from_secs(5)).await, 1);

    // A 1 MB payload is over the broker's packet limit: that connection is closed.
    let mut big = spawn_client(options(port, "kiosk-01", "kiosk-01-pw"));
    assert_eq!(
        big.connack().await.unwrap(),
        rumqttc::ConnectReturnCode::Success
    );
    big.client
        .publish(
            "devices/kiosk-01/events",
            QoS::AtLeastOnce,
            false,
            vec![b'x'; 1 << 20],
        )
        .await
        .unwrap();
    let mut closed = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(5), big.events.recv()).await {
        if ev.is_err() {
            closed = true;
            break;
        }
    }
    assert!(closed, "oversized packet closes the connection");

    // A flood: 10,000 messages in about a second from one device; all are stored.
    let flood = 10_000usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let started = std::time::Instant::now();
    for burst in 0..(flood / 100) {
        tick.tick().await;
        for i in 0..100 {
            let n = burst * 100 + i;
            k1.client
                .publish(
                    "devices/k1/telemetry",
                    QoS::AtLeastOnce,
                    false,
                    format!(r#"{{"n":{n},"device":"k1"}}"#),
                )
                .await
                .unwrap();
        }
    }
    assert_eq!(k1.pubacks(flood, Duration::from_secs(60)).await, flood);
    let took = started.elapsed();
    eprintln!("flood of {flood} acknowledged in {took:?}");
    assert!(
        took < Duration::from_secs(3),
        "10,000 messages offered in 1 s must be acknowledged within 3 s, took {took:?}"
    );

    let want = flood as i64 + 1;
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages WHERE kind = 'telemetry'",
            want,
            Duration::from_secs(20)
        ),
        want
    );
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM messages WHERE device = 'k1'"),
        flood as i64
    );
    assert_eq!(
        branch.count(
            "SELECT COUNT(DISTINCT json_extract(payload, '$.n')) FROM messages WHERE device = 'k1'"
        ),
        flood as i64
    );
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM messages WHERE device = 'k2'"),
        1
    );

    assert_eq!(branch.wait_counter("k2", "rejected", 7), 7);
    assert_eq!(branch.wait_counter("kiosk-01", "packet_too_large", 1), 1);
    assert_eq!(branch.wait_counter("k2", "subscribe_denied", 2), 2);
    let db = branch.db();
    let mut st = db
        .prepare("SELECT kind, reason FROM rejected WHERE device = 'k2' ORDER BY id")
        .unwrap();
    let rejected: Vec<(String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut want_rej: Vec<(String, String)> = bad
        .iter()
        .map(|(t, _, r)| (t.rsplit('/').next().unwrap().to_owned(), r.to_string()))
        .collect();
    want_rej.push(("telemetry".into(), "too_large".into()));
    assert_eq!(rejected, want_rej);
    for reason in [
        "not_json",
        "not_object",
        "wrong_type",
        "missing_field",
        "unknown_type",
        "unknown_kind",
        "too_large",
    ] {
        assert_eq!(branch.counter("k2", reason), 1, "{reason}");
    }
    assert_eq!(branch.counter("k2", "rejected"), 7);
    assert_eq!(branch.counter("k2", "accepted"), 1);
    assert_eq!(branch.counter("k1", "publish_denied"), 2);
    assert_eq!(branch.counter("k2", "subscribe_denied"), 2);
    assert_eq!(branch.counter("kiosk-01", "packet_too_large"), 1);
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM messages WHERE device IN ('kiosk-01')"),
        0
    );

    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    // Logged once per burst, not once per message.
    assert!(log.matches("message rejected").count() <= 8, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_foreign_publish_gets_not_authorized() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::{mqttbytes::QoS, AsyncClient, Event, MqttOptions};
    let branch = Branch::new(&[device("k1", "test-sensor"), device("k2", "test-sensor")]);
    let _gw = branch.start();
    let mut o = MqttOptions::new("v5-k1", "127.0.0.1", branch.port);
    o.set_credentials("k1", "k1-pw");
    let (client, mut el) = AsyncClient::new(o, 10);
    client
        .publish(
            "devices/k2/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"n":1,"device":"k2"}"#,
        )
        .await
        .unwrap();
    client
        .publish(
            "devices/k1/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"n":2,"device":"k1"}"#,
        )
        .await
        .unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => reasons.push(a.reason),
            Ok(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        reasons,
        vec![PubAckReason::NotAuthorized, PubAckReason::Success]
    );
    assert_eq!(
        branch.wait_count("SELECT COUNT(*) FROM messages", 1, Duration::from_secs(5)),
        1
    );
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM messages WHERE device = 'k1'"),
        1
    );
}

/// A password stored as an argon2 hash (made by the real `hash-password` command) is
/// accepted with the right secret and refused with a wrong one.
#[test]
fn argon2_hashed_password_from_hash_password_command() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret-kiosk\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("s3cret"));

    let mut dev = device("k9", "test-sensor");
    dev.password = hash;
    let branch = Branch::new(&[dev]);
    let _gw = branch.start();
    let port = branch.port;
    assert_eq!(
        exchange(port, &raw_connect("a", Some(("k9", "s3cret-kiosk")), 30)),
        [0x20, 2, 0, 0]
    );
    assert_eq!(
        exchange(port, &raw_connect("b", Some(("k9", "s3cret-kiosK")), 30)),
        [0x20, 2, 0, 4]
    );
    // The verified secret is remembered: a second connect with it succeeds too.
    assert_eq!(
        exchange(port, &raw_connect("c", Some(("k9", "s3cret-kiosk")), 30)),
        [0x20, 2, 0, 0]
    );
    assert_eq!(branch.wait_counter("k9", "connect_bad_password", 1), 1);
    assert_eq!(branch.wait_counter("k9", "connects", 2), 2);
}

/// Logged once per burst: 100 identical rejections give one log line, then the count of
/// those suppressed when the next report is due; every rejection is still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_logged_once_per_burst_and_all_counted() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let mut c = connect(branch.port, "k1", "k1-pw").await;
    for _ in 0..100 {
        c.client
            .publish("devices/k1/telemetry", QoS::AtLeastOnce, false, "garbage")
            .await
            .unwrap();
    }
    assert_eq!(c.pubacks(100, Duration::from_secs(10)).await, 100);
    assert_eq!(
        branch.wait_count(
            "SELECT COALESCE((SELECT value FROM device_counters WHERE device = 'k1' AND counter = 'not_json'), 0)",
            100,
            Duration::from_secs(5)
        ),
        100
    );
    let (status, log) = gw.terminate();
    assert!(status.success());
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("message rejected"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("not_json"));
    assert!(!log.contains("garbage"), "payloads never appear in the log");
    assert!(!log.contains("k1-pw"), "passwords never appear in the log");
}

/// Client ids are scoped to the device: a device cannot take over another device's
/// session or the gateway's own link by choosing its client id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_cannot_take_over_other_sessions() {
    let branch = Branch::new(&[device("a", "test-sensor"), device("b", "test-sensor")]);
    let gw = branch.start();
    // A is connected with client id "shared"; B connects with the same id, and with the
    // gateway's own link name.
    let mut a_opts = options(branch.port, "a", "a-pw");
    a_opts.set_client_id("shared".into());
    let mut a = spawn_client(a_opts);
    assert_eq!(
        a.connack().await.unwrap(),
        rumqttc::ConnectReturnCode::Success
    );
    for id in ["shared", "gateway-wills"] {
        let mut o = options(branch.port, "b", "b-pw");
        o.set_client_id(id.into());
        let mut b = spawn_client(o);
        assert_eq!(
            b.connack().await.unwrap(),
            rumqttc::ConnectReturnCode::Success
        );
    }
    // A still works on its connection, and last wills still reach the buffer.
    a.client
        .publish(
            "devices/a/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"n":1,"device":"a"}"#,
        )
        .await
        .unwrap();
    assert_eq!(a.pubacks(1, Duration::from_secs(5)).await, 1);
    let mut w = options(branch.port, "b", "b-pw");
    w.set_client_id("will-test".into());
    w.set_last_will(rumqttc::LastWill::new(
        "devices/b/status",
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let c = spawn_client(w);
    let mut c = c;
    assert_eq!(
        c.connack().await.unwrap(),
        rumqttc::ConnectReturnCode::Success
    );
    drop(c); // aborts the event loop: the socket closes without DISCONNECT
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages WHERE device = 'b' AND kind = 'status' AND payload = 'offline'",
            1,
            Duration::from_secs(10)
        ),
        1,
        "the will arrives: the gateway's will link survived"
    );
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM messages WHERE device = 'a'"),
        1
    );
    assert!(!gw.log().contains("broker link for last wills closed"));
}

/// A PUBLISH or SUBSCRIBE before CONNECT closes the connection and creates no device row.
#[test]
fn packets_before_connect_create_no_phantom_device() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let _gw = branch.start();
    for packet in [
        &[0x30, 0x05, 0, 1, b'x', 1, 2][..],
        &[0x82, 0x06, 0, 1, 0, 1, b'#', 0][..],
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
        s.write_all(packet).unwrap();
        assert!(closed_by_broker(s));
    }
    // A second CONNECT on an authenticated connection is a protocol error too.
    let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
    s.write_all(&raw_connect("x", Some(("k1", "k1-pw")), 30))
        .unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    s.write_all(&raw_connect("x", Some(("k1", "k1-pw")), 30))
        .unwrap();
    assert!(closed_by_broker(s));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM devices"),
        1,
        "only the configured device"
    );
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM devices WHERE id = ''"),
        0
    );
}
