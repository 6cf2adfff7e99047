//! No device can crash, starve or fool the gateway (issue 13): the real binary on loopback,
//! attacked as a hostile or buggy device would, while a canary device keeps publishing and
//! every message it was acknowledged must be stored.

mod common;
use common::mqtt::{self, Connect};
use common::*;

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(5);
/// Attackers connect from here (loopback too), so that the per-address login throttle
/// they earn is not the canary's.
const HOSTILE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

fn login<'a>(v5: bool, client_id: &'a str, user: &'a str, pass: &'a str) -> Vec<u8> {
    mqtt::connect(&Connect {
        v5,
        client_id,
        login: Some((user, pass)),
        keep_alive: 30,
        clean: true,
        will: None,
        properties: &[],
    })
}

/// Connect and log in; returns the stream after a successful CONNACK.
fn logged_in(port: u16, v5: bool, client_id: &str, user: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&login(v5, client_id, user, &format!("{user}-pw")))
        .unwrap();
    let (first, body) = mqtt::read_packet(&mut s, WAIT).expect("CONNACK");
    assert_eq!(first, 0x20);
    assert_eq!(body[1], 0, "CONNACK code");
    s
}

/// Everything the gateway writes until it closes the connection (at most `limit`);
/// `None` if it is still open then.
fn until_closed(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match std::io::Read::read(s, &mut buf) {
            Ok(0) => return Some(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(out),
            Err(_) => {
                if Instant::now() >= deadline {
                    return None;
                }
            }
        }
    }
}

/// Wait (at most 20 s) until the gateway's port has exactly `n` established connections.
fn wait_established(port: u16, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run_bounded(
            Command::new("ss").args([
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ]),
            Duration::from_secs(10),
        );
        let open = String::from_utf8_lossy(&out.stdout).lines().count();
        if open == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{open} connections still open, not {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Packets only a server sends (and AUTH) close that one connection: MQTT 5 with DISCONNECT
/// 0x82 first, 3.1.1 without a word; before CONNECT, at once. rumqttd's own MQTT 5 reader
/// aborts the process on CONNACK and UNSUBACK.
#[test]
fn server_only_packets_close_one_connection() {
    let k1 = device("k1", "test-sensor");
    let branch = Branch::new(&[k1, canary_device()]);
    let mut gw = branch.start();
    let canary = Canary::start(branch.port);
    let packets: [&[u8]; 6] = [
        &[0x20, 0x02, 0x00, 0x00],       // CONNACK
        &[0x20, 0x01, 0x00],             // CONNACK, short
        &[0xb0, 0x03, 0x00, 0x01, 0x00], // UNSUBACK
        &[0x90, 0x03, 0x00, 0x01, 0x00], // SUBACK
        &[0xd0, 0x00],                   // PINGRESP
        &[0xf0, 0x02, 0x00, 0x00],       // AUTH (no enhanced authentication here)
    ];
    for v5 in [true, false] {
        for p in packets {
            let mut s = logged_in(branch.port, v5, "x", "k1");
            s.write_all(p).unwrap();
            let said = until_closed(&mut s, WAIT).expect("closed");
            let want: &[u8] = if v5 { &[0xe0, 0x01, 0x82] } else { &[] };
            assert_eq!(said, want, "v5 {v5}, packet {p:02x?}");
        }
    }
    for p in packets {
        let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
        s.write_all(p).unwrap();
        assert_eq!(
            until_closed(&mut s, WAIT),
            Some(vec![]),
            "before CONNECT: {p:02x?}"
        );
    }
    assert!(gw.is_running());
    assert_eq!(branch.wait_counter("k1", "protocol_error", 12), 12);
    assert_eq!(branch.wait_counter("", "protocol_error", 6), 6);
    finish_canary(canary, &branch);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// 300 immediate reconnects with one client id, each dropped before its CONNACK (a reset
/// right after CONNECT), on 3.1.1 and 5, raw and with paho-mqtt: rumqttd's own listener
/// aborts within 0.2 s of this (a stale will sender, `try_send(..).unwrap()`). Then a
/// connection with that id works, and the presence log stays quiet.
#[test]
fn immediate_same_id_reconnects() {
    let k1 = device("k1", "test-sensor");
    let branch = Branch::new(&[k1, canary_device()]);
    let mut gw = branch.start();
    let canary = Canary::start(branch.port);
    for v5 in [false, true] {
        for i in 0..300 {
            let mut s = mqtt::tcp_from(LOCAL, branch.port).unwrap();
            s.write_all(&login(v5, "same", "k1", "k1-pw")).unwrap();
            if i % 2 == 0 {
                mqtt::reset(s);
            } else {
                drop(s);
            }
        }
        // The storm is over once the gateway holds only the canary's connection. A late
        // connection of it can still take the session over (MQTT: the later CONNECT
        // wins) or meet the device's limit: like a device, try again.
        wait_established(branch.port, 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
            s.write_all(&login(v5, "same", "k1", "k1-pw")).unwrap();
            if let Some((0x20, ack)) = mqtt::read_packet(&mut s, WAIT) {
                if ack[1] == 0 {
                    let p = mqtt::publish(
                        b"devices/k1/telemetry",
                        br#"{"n":1,"device":"k1"}"#,
                        1,
                        7,
                        v5.then_some(&[][..]),
                    );
                    s.write_all(&p).unwrap();
                    if mqtt::read_packet(&mut s, WAIT).map(|p| p.0) == Some(0x40) {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "v5 {v5}: no PUBACK after the storm\n{}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for version in ["311", "5"] {
        let out = run_bounded(
            Command::new("/usr/bin/python3").args([
                &format!(
                    "{}/tests/fixtures/paho_device.py",
                    env!("CARGO_MANIFEST_DIR")
                ),
                "reconnect",
                "127.0.0.1",
                &branch.port.to_string(),
                "k1",
                "k1-pw",
                "300",
                version,
            ]),
            Duration::from_secs(120),
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{said} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(said.trim(), "cycles 300");
    }
    assert!(gw.is_running());
    // Presence is logged at most once per device per 10 s, however much it churns.
    let presence_lines = gw
        .log()
        .lines()
        .filter(|l| l.contains("device presence") && l.contains("k1"))
        .count();
    assert!(
        presence_lines <= 4,
        "{presence_lines} presence lines for k1"
    );
    finish_canary(canary, &branch);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// Wrong passwords for an argon2 device from 16 connections for 4 s: the device and the
/// address wait ever longer between checks, so only a handful of argon2 verifications run;
/// the device's own (remembered) login stays fast and memory stays low.
#[test]
fn failed_logins_are_throttled() {
    let mut kiosk = device("kiosk", "test-sensor");
    kiosk.password = hash_password("kiosk-secret");
    let branch = Branch::new(&[kiosk, canary_device()]);
    let mut gw = branch.start();
    // The kiosk's first login verifies its hash; later ones are remembered.
    let good = || {
        let mut s = mqtt::tcp_from(LOCAL, branch.port).unwrap();
        let started = Instant::now();
        s.write_all(&login(false, "app", "kiosk", "kiosk-secret"))
            .unwrap();
        let ack = mqtt::read_packet(&mut s, WAIT);
        (ack, started.elapsed())
    };
    assert_eq!(good().0, Some((0x20, vec![0, 0])));
    let canary = Canary::start(branch.port);
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..16)
        .map(|i| {
            let (stop, attempts, port) = (stop.clone(), attempts.clone(), branch.port);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = mqtt::tcp_from(HOSTILE, port) else {
                        continue;
                    };
                    let pass = format!("guess-{i}-{}", attempts.fetch_add(1, Ordering::Relaxed));
                    let _ = s.write_all(&login(false, "evil", "kiosk", &pass));
                    let _ = mqtt::read_packet(&mut s, Duration::from_secs(6));
                }
            })
        })
        .collect();
    let attack = Instant::now();
    let mut slowest = Duration::ZERO;
    while attack.elapsed() < Duration::from_secs(4) {
        let (ack, took) = good();
        assert_eq!(ack, Some((0x20, vec![0, 0])), "the kiosk itself is let in");
        slowest = slowest.max(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    let peak_kb = rss_kb(gw.pid());
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    assert!(gw.is_running());
    assert!(
        slowest < Duration::from_millis(100),
        "a remembered login took {slowest:?}"
    );
    assert!(peak_kb < 128 * 1024, "RSS {peak_kb} KiB under the flood");
    // Consecutive failures wait 0.2, 0.4, 0.8, 1.6, 3.2 s: at most 6 checks in 4 s, one
    // more for a check still running when its wait began.
    let checked = branch.counter("kiosk", "connect_bad_password");
    let throttled = branch.counter("kiosk", "connect_throttled");
    assert!((1..=7).contains(&checked), "{checked} password checks ran");
    assert!(throttled >= 16, "{throttled} attempts throttled");
    finish_canary(canary, &branch);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("guess-"), "a password reached the log");
}

fn hash_password(secret: &str) -> String {
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{secret}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Subscribe to `filters` in one SUBSCRIBE; returns the SUBACK's codes.
fn suback(s: &mut TcpStream, pkid: u16, v5: bool, filters: &[String]) -> Vec<u8> {
    let f: Vec<(&[u8], u8)> = filters.iter().map(|f| (f.as_bytes(), 1)).collect();
    s.write_all(&mqtt::subscribe(pkid, &f, v5.then_some(&[][..])))
        .unwrap();
    let (first, body) = mqtt::read_packet(s, WAIT).expect("SUBACK");
    assert_eq!(first, 0x90);
    assert_eq!(body[..2], pkid.to_be_bytes());
    body[2 + usize::from(v5)..].to_vec()
}

/// 100,000 filters from one device: 32 per connection, 40 new ones per device (set here),
/// the router's table capped (here at 100), every refusal answered in the SUBACK (and
/// granted at QoS 0) and counted; one device's flood leaves room for the others; invalid
/// filters refused; memory stays bounded, also after the device has gone.
#[test]
fn subscription_floods_are_capped() {
    let devices = [
        device("k1", "test-sensor"),
        device("k2", "test-sensor"),
        device("k3", "test-sensor"),
        canary_device(),
    ];
    let branch = Branch::new(&devices);
    broker_extra("max_filters = 100\nmax_filters_per_device = 40\n")(&branch);
    let gw = branch.start();
    let canary = Canary::start(branch.port);
    let granted = |codes: &[u8]| codes.iter().filter(|c| **c < 0x80).count();
    let mut next = 0;
    let mut rss_during = 0;
    // (device, connection, granted): k1 and k2 flood, k3 subscribes last.
    let plan = [
        ("k1", 32),
        ("k1", 8),
        ("k1", 0),
        ("k2", 32),
        ("k2", 8),
        ("k3", 20),
    ];
    for (i, (id, want)) in plan.into_iter().enumerate() {
        let v5 = i % 2 == 1;
        let mut s = logged_in(branch.port, v5, "subs", id);
        let mut this = 0;
        // 100 to a SUBSCRIBE (a packet stays under the limit); k1's first two connections
        // ask for 50,000 filters each.
        let batches = if id == "k1" && i < 2 { 500 } else { 10 };
        for batch in 0..batches {
            let filters: Vec<String> = (0..100)
                .map(|_| {
                    next += 1;
                    format!("branch/x/{next}")
                })
                .collect();
            let codes = suback(&mut s, batch + 1, v5, &filters);
            assert_eq!(codes.len(), 100);
            assert!(
                codes.iter().all(|c| *c == 0 || *c >= 0x80),
                "QoS 0 granted: {codes:?}"
            );
            this += granted(&codes);
        }
        assert_eq!(this, want, "connection {i} of {id}");
        rss_during = rss_during.max(rss_kb(gw.pid()));
    }
    assert_eq!(next, 100_000 + 4_000);
    // Invalid and foreign filters: refused (3.1.1: 0x80; 5: filter invalid, not authorized).
    let mut s = logged_in(branch.port, true, "v5", "k1");
    let bad: Vec<String> = ["branch/a#", "branch/+x", "#", "$share/g/branch/#", ""]
        .iter()
        .map(|f| f.to_string())
        .collect();
    assert_eq!(
        suback(&mut s, 9, true, &bad),
        [0x8f, 0x8f, 0x87, 0x87, 0x8f]
    );
    // A filter the router already has is admitted again, whoever brought it.
    assert_eq!(suback(&mut s, 10, true, &["branch/x/1".to_string()]), [0]);
    assert_eq!(
        suback(&mut s, 11, true, &["branch/x/50001".to_string()]),
        [0]
    );
    drop(s);
    assert_eq!(branch.wait_counter("k1", "subscribe_invalid_denied", 3), 3);
    assert_eq!(branch.wait_counter("k1", "subscribe_denied", 2), 2);
    assert_eq!(
        branch.wait_counter("k1", "subscribe_quota_denied", 100_000 + 1_000 - 40),
        100_000 + 1_000 - 40
    );
    let after = rss_kb(gw.pid());
    assert!(
        rss_during < 96 * 1024,
        "RSS {rss_during} KiB during the flood"
    );
    assert!(after < 96 * 1024, "RSS {after} KiB after it");
    finish_canary(canary, &branch);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

fn broker_extra(lines: &str) -> impl Fn(&Branch) {
    let lines = lines.to_owned();
    move |branch: &Branch| {
        let text = std::fs::read_to_string(branch.config()).unwrap();
        let text = text.replacen("[broker]\n", &format!("[broker]\n{lines}"), 1);
        std::fs::write(branch.config(), text).unwrap();
    }
}

/// Per-device, per-address and total connection limits, each refusal counted; a takeover
/// still gets in at the device's limit.
#[test]
fn connection_limits() {
    let k1 = device("k1", "test-sensor");
    let branch = Branch::new(&[k1, canary_device()]);
    broker_extra("max_connections = 30\nmax_pending_per_address = 5\nconnect_timeout_ms = 1500\n")(
        &branch,
    );
    let mut gw = branch.start();
    let canary = Canary::start(branch.port);
    // Eight connections of one device, the ninth refused (3.1.1: 0x03; 5: 0x97).
    let mut open: Vec<TcpStream> = (0..8)
        .map(|i| logged_in(branch.port, false, &format!("c{i}"), "k1"))
        .collect();
    for (v5, code) in [(false, 0x03), (true, 0x97)] {
        let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
        s.write_all(&login(v5, "c9", "k1", "k1-pw")).unwrap();
        let (first, body) = mqtt::read_packet(&mut s, WAIT).unwrap();
        assert_eq!((first, body[1]), (0x20, code), "v5 {v5}");
    }
    assert_eq!(branch.wait_counter("k1", "connect_device_limit", 2), 2);
    // The same client id replaces its connection, limit or not.
    let mut replaced = open.remove(0);
    let _new = logged_in(branch.port, false, "c0", "k1");
    assert_eq!(until_closed(&mut replaced, WAIT), Some(vec![]));

    // Five connections of one address that have not logged in; the sixth is closed.
    let pending: Vec<TcpStream> = (0..5)
        .map(|_| mqtt::tcp_from(HOSTILE, branch.port).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut sixth = mqtt::tcp_from(HOSTILE, branch.port).unwrap();
    assert_eq!(until_closed(&mut sixth, WAIT), Some(vec![]));
    assert_eq!(branch.wait_counter("", "connect_address_limit", 1), 1);
    // ... and the five are closed at the connect timeout.
    for mut p in pending {
        assert_eq!(until_closed(&mut p, Duration::from_secs(4)), Some(vec![]));
    }
    assert_eq!(branch.wait_counter("", "connect_timeout", 5), 5);

    assert!(gw.is_running());
    finish_canary(canary, &branch);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// Connections that never log in cannot keep devices out: at most half of
/// `max_connections` wait for their CONNECT, the oldest closed (`connect_evicted`) for a
/// newer one, and one closed when all places are taken; only logged-in connections fill
/// the gateway (`connect_connections_full`).
#[test]
fn silent_connections_cannot_keep_devices_out() {
    let devices: Vec<_> = ["k1", "k2", "k3", "k4"]
        .iter()
        .map(|d| device(d, "test-sensor"))
        .chain([canary_device()])
        .collect();
    let branch = Branch::new(&devices);
    // A connect timeout far beyond the test: only eviction closes the silent ones.
    broker_extra("max_connections = 30\nconnect_timeout_ms = 60000\n")(&branch);
    let mut gw = branch.start();
    let canary = Canary::start(branch.port);
    // 21 silent connections from addresses of their own (not to meet the per-address
    // limit): 15 (half of 30) wait, each of the last 6 closes the oldest.
    let mut silent: Vec<TcpStream> = (0..21u8)
        .map(|i| {
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 10 + i));
            let s = mqtt::tcp_from(from, branch.port).unwrap();
            // In the order they are accepted.
            assert_eq!(
                branch.wait_counter("", "connect_evicted", i64::from(i.saturating_sub(14))),
                i64::from(i.saturating_sub(14))
            );
            s
        })
        .collect();
    for (i, s) in silent.iter_mut().enumerate() {
        let closed = until_closed(
            s,
            if i < 6 {
                WAIT
            } else {
                Duration::from_millis(50)
            },
        );
        assert_eq!(closed.is_some(), i < 6, "silent connection {i}");
    }
    // 29 logins (8 each of k1, k2 and k3, 5 of k4): the first meets the 15 waiting and
    // closes the oldest, the next 14 take the free places, and each of the last 14 finds
    // all places taken and closes the oldest still waiting. Then the canary and the 29
    // are logged in, all places taken, none waiting.
    let mut open = Vec::new();
    for (n, dev) in [(8, "k1"), (8, "k2"), (8, "k3"), (5, "k4")] {
        for i in 0..n {
            open.push(logged_in(
                branch.port,
                i % 2 == 1,
                &format!("{dev}-c{i}"),
                dev,
            ));
        }
    }
    assert_eq!(branch.wait_counter("", "connect_evicted", 21), 21);
    for (i, s) in silent.iter_mut().enumerate().skip(6) {
        assert_eq!(until_closed(s, WAIT), Some(vec![]), "silent connection {i}");
    }
    // Nothing left to make room: the next connection is closed at accept.
    let mut over = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
    assert_eq!(until_closed(&mut over, WAIT), Some(vec![]));
    assert_eq!(branch.wait_counter("", "connect_connections_full", 1), 1);
    // A logged-in connection closing gives its place back.
    drop(open.pop());
    let deadline = Instant::now() + WAIT;
    let _k4 = loop {
        let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
        s.write_all(&login(false, "k4-c9", "k4", "k4-pw")).unwrap();
        match mqtt::read_packet(&mut s, WAIT) {
            Some((0x20, body)) if body[1] == 0 => break s,
            other => assert!(Instant::now() < deadline, "k4 never got in: {other:?}"),
        }
    };
    assert_eq!(branch.counter("", "connect_timeout"), 0);
    assert!(gw.is_running());
    finish_canary(canary, &branch);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// A config whose connections would not fit the open-files limit is refused at start.
#[test]
fn max_connections_must_fit_the_open_files_limit() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let out = run_bounded(
        Command::new("prlimit")
            .args(["--nofile=512:512", BIN, "run", "--config"])
            .arg(branch.config()),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("broker.max_connections 1024") && said.contains("the limit is 512"),
        "{said}"
    );
}

/// A started packet must be completed within `packet_timeout_ms` even with keep-alive 0;
/// with a keep-alive, silence ends the connection at 1.5 times it. MQTT 5 hears 0x8D.
#[test]
fn stalled_packets_and_silence_time_out() {
    let k1 = device("k1", "test-sensor");
    let branch = Branch::new(&[k1, canary_device()]);
    broker_extra("packet_timeout_ms = 1000\n")(&branch);
    let gw = branch.start();
    let canary = Canary::start(branch.port);
    for v5 in [false, true] {
        let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
        s.write_all(&mqtt::connect(&Connect {
            v5,
            client_id: "slow",
            login: Some(("k1", "k1-pw")),
            keep_alive: 0,
            clean: true,
            will: None,
            properties: &[],
        }))
        .unwrap();
        assert_eq!(mqtt::read_packet(&mut s, WAIT).map(|p| p.0), Some(0x20));
        let started = Instant::now();
        s.write_all(&[0x32, 0x40, 0x00]).unwrap(); // the start of a PUBLISH
        let said = until_closed(&mut s, WAIT).expect("closed");
        assert!(started.elapsed() >= Duration::from_millis(900));
        let want: &[u8] = if v5 { &[0xe0, 0x01, 0x8d] } else { &[] };
        assert_eq!(said, want);
    }
    assert_eq!(branch.wait_counter("k1", "packet_timeout", 2), 2);
    // The timeout is per packet: a device that always has a packet under way, but
    // finishes each within the limit, stays (six PINGREQs over 2.4 s, each 0.4 s long).
    let mut s = logged_in(branch.port, true, "steady", "k1");
    s.write_all(&[0xc0]).unwrap();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(400));
        s.write_all(&[0x00, 0xc0]).unwrap();
        assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0xd0, vec![])));
    }
    assert_eq!(branch.counter("k1", "packet_timeout"), 2);
    let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
    s.write_all(&mqtt::connect(&Connect {
        v5: true,
        client_id: "quiet",
        login: Some(("k1", "k1-pw")),
        keep_alive: 1,
        clean: true,
        will: None,
        properties: &[],
    }))
    .unwrap();
    assert_eq!(mqtt::read_packet(&mut s, WAIT).map(|p| p.0), Some(0x20));
    let started = Instant::now();
    assert_eq!(until_closed(&mut s, WAIT), Some(vec![0xe0, 0x01, 0x8d]));
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(branch.wait_counter("k1", "keepalive_timeout", 1), 1);
    finish_canary(canary, &branch);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// An MQTT 5 CONNECT with a persistent session (expiry 1 h) and a QoS 1 will on
/// `devices/k1/telemetry` (`{"n":N,"device":"k1"}`) that waits `delay_s` seconds.
fn will_connect(client_id: &str, n: u32, delay_s: u32) -> Vec<u8> {
    let mut body = Vec::new();
    mqtt::string(b"MQTT", &mut body);
    body.extend_from_slice(&[5, 0x02 | 0x04 | 0x08 | 0xc0, 0, 30]);
    body.extend_from_slice(&[5, 0x11, 0, 0, 0x0e, 0x10]);
    mqtt::string(client_id.as_bytes(), &mut body);
    body.push(5);
    body.push(0x18);
    body.extend_from_slice(&delay_s.to_be_bytes());
    mqtt::string(b"devices/k1/telemetry", &mut body);
    mqtt::string(
        format!(r#"{{"n":{n},"device":"k1"}}"#).as_bytes(),
        &mut body,
    );
    mqtt::string(b"k1", &mut body);
    mqtt::string(b"k1-pw", &mut body);
    mqtt::packet(0x10, &body)
}

/// Delayed wills are bounded per device by `max_sessions_per_device`: ten connections
/// with a will that waits 3 s, each cut off: four wait (one cancelled by its client
/// coming back), the other six are published at once, none is lost or doubled.
#[test]
fn delayed_wills_are_bounded() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    broker_extra("max_sessions_per_device = 4\n")(&branch);
    let gw = branch.start();
    let wills = "SELECT COUNT(*) FROM messages WHERE device = 'k1'";
    let list = "SELECT group_concat(n, ',') FROM (SELECT json_extract(payload, '$.n') AS n \
        FROM messages WHERE device = 'k1' ORDER BY n)";
    let cut = Instant::now();
    for n in 0..10u32 {
        let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
        s.write_all(&will_connect(&format!("w{n}"), n, 3)).unwrap();
        let (first, body) = mqtt::read_packet(&mut s, WAIT).expect("CONNACK");
        assert_eq!((first, body[1]), (0x20, 0), "w{n}");
        mqtt::reset(s);
    }
    assert_eq!(branch.wait_count(wills, 6, WAIT), 6);
    let text = |sql: &str| -> String { branch.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    // Which four wait depends on when the broker sees each reset against the next
    // connection (under load, a later one may take a slot first); w0 always waits.
    let at_once: Vec<u32> = text(list).split(',').map(|n| n.parse().unwrap()).collect();
    assert_eq!(at_once.len(), 6, "{at_once:?}");
    assert!(!at_once.contains(&0), "{at_once:?}");
    // w0 comes back within its delay: its will is not published.
    let _w0 = logged_in(branch.port, true, "w0", "k1");
    assert!(cut.elapsed() < Duration::from_secs(3), "too slow to test");
    assert_eq!(branch.wait_count(wills, 9, Duration::from_secs(10)), 9);
    assert_eq!(text(list), "1,2,3,4,5,6,7,8,9");
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// The properties of an MQTT 5 CONNACK body (after its flags and reason code):
/// identifier -> value (integers as u32, strings as bytes).
fn connack_properties(body: &[u8]) -> HashMap<u8, Vec<u8>> {
    let mut len = 0usize;
    let mut i = 2;
    for shift in [0, 7, 14, 21] {
        len |= usize::from(body[i] & 0x7f) << shift;
        i += 1;
        if body[i - 1] & 0x80 == 0 {
            break;
        }
    }
    let end = i + len;
    let mut out = HashMap::new();
    while i < end {
        let id = body[i];
        i += 1;
        let n = match id {
            0x21 | 0x22 => 2,
            0x27 | 0x11 => 4,
            0x24 | 0x25 | 0x28 | 0x29 | 0x2a => 1,
            0x12 | 0x1f | 0x1a | 0x1c => {
                2 + usize::from(u16::from_be_bytes([body[i], body[i + 1]]))
            }
            other => panic!("unexpected CONNACK property {other:#x}"),
        };
        let v = if n > 2 && matches!(id, 0x12 | 0x1f | 0x1a | 0x1c) {
            body[i + 2..i + n].to_vec()
        } else {
            body[i..i + n].to_vec()
        };
        out.insert(id, v);
        i += n;
    }
    assert_eq!(i, end, "CONNACK properties end where their length says");
    out
}

/// MQTT 5's CONNACK states the real limits: Receive Maximum 128, Topic Alias Maximum
/// 16, no shared subscriptions, and a Maximum Packet Size the gateway enforces (one
/// byte more is DISCONNECT 0x95); an empty client id is assigned one. On 3.1.1 an
/// empty client id with a persistent session is refused with CONNACK 0x02.
#[test]
fn mqtt5_connack_states_the_real_limits() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
    s.write_all(&login(true, "", "k1", "k1-pw")).unwrap();
    let (first, body) = mqtt::read_packet(&mut s, WAIT).expect("CONNACK");
    assert_eq!((first, body[0], body[1]), (0x20, 0, 0));
    let props = connack_properties(&body);
    assert_eq!(props[&0x21], 128u16.to_be_bytes());
    assert_eq!(props[&0x22], 16u16.to_be_bytes());
    assert_eq!(props[&0x2a], [0]);
    let assigned = String::from_utf8(props[&0x12].clone()).unwrap();
    assert!(!assigned.is_empty(), "an assigned client identifier");
    let max = u32::from_be_bytes(props[&0x27].clone().try_into().unwrap()) as usize;
    assert!((1024..16 * 1024 * 1024).contains(&max), "{max}");
    // A PUBLISH of exactly `max` bytes is read (and refused by the profile, acked); one
    // byte more ends the connection with 0x95 at its fixed header.
    let sized = |total: usize| {
        let mut payload = vec![b'a'; total];
        loop {
            let p = mqtt::publish(b"devices/k1/telemetry", &payload, 1, 3, Some(&[]));
            match p.len().cmp(&total) {
                std::cmp::Ordering::Equal => return p,
                std::cmp::Ordering::Greater => payload.truncate(payload.len() - (p.len() - total)),
                std::cmp::Ordering::Less => payload.push(b'a'),
            }
        }
    };
    s.write_all(&sized(max)).unwrap();
    assert_eq!(mqtt::read_packet(&mut s, WAIT).map(|p| p.0), Some(0x40));
    s.write_all(&sized(max + 1)).unwrap();
    assert_eq!(until_closed(&mut s, WAIT), Some(vec![0xe0, 0x01, 0x95]));
    assert_eq!(branch.wait_counter("k1", "packet_too_large", 1), 1);
    // 3.1.1: an empty client id must come with a clean session.
    let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
    s.write_all(&mqtt::connect(&Connect {
        v5: false,
        client_id: "",
        login: Some(("k1", "k1-pw")),
        keep_alive: 30,
        clean: false,
        will: None,
        properties: &[],
    }))
    .unwrap();
    assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0x20, vec![0, 0x02])));
    assert_eq!(branch.wait_counter("k1", "connect_client_id_invalid", 1), 1);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// What MQTT forbids in a CONNECT is refused before any login: the reserved flag, MQTT
/// 3.1; an unknown user name is never logged.
#[test]
fn connect_rules() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let mut reserved = login(false, "r", "k1", "k1-pw");
    reserved[9] |= 0x01; // connect flags
    let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
    s.write_all(&reserved).unwrap();
    assert_eq!(until_closed(&mut s, WAIT), Some(vec![]));
    // MQTT 3.1 ("MQIsdp", level 3): refused with "unacceptable protocol version".
    let mut v31 = vec![0x10, 0x13, 0, 6];
    v31.extend_from_slice(b"MQIsdp");
    v31.extend_from_slice(&[3, 0x02, 0, 30, 0, 5]);
    v31.extend_from_slice(b"mqtt3");
    let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
    s.write_all(&v31).unwrap();
    assert_eq!(
        until_closed(&mut s, WAIT),
        Some(vec![0x20, 0x02, 0x00, 0x01])
    );
    assert_eq!(branch.wait_counter("", "connect_protocol_refused", 2), 2);
    let mut s = TcpStream::connect(("127.0.0.1", branch.port)).unwrap();
    s.write_all(&login(false, "u", "my-secret-typed-as-user", "x"))
        .unwrap();
    assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0x20, vec![0, 0x04])));
    assert_eq!(branch.wait_counter("", "connect_unknown_device", 1), 1);
    let (status, log) = gw.terminate();
    assert!(status.success());
    assert!(!log.contains("my-secret-typed-as-user"), "{log}");
}

/// Answers rumqttd got wrong: one UNSUBACK per UNSUBSCRIBE (none for an unknown filter
/// before); a QoS 2 message sent twice before its PUBREL is stored once; an unknown PUBREL
/// is completed (MQTT 5: 0x92) instead of closing the connection.
#[test]
fn unsubscribe_and_qos2_answers() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let mut s = logged_in(branch.port, true, "q", "k1");
    assert_eq!(suback(&mut s, 1, true, &["branch/q/#".to_string()]), [0]);
    let mut body = vec![0, 2, 0];
    mqtt::string(b"branch/q/#", &mut body);
    mqtt::string(b"branch/never", &mut body);
    s.write_all(&mqtt::packet(0xa2, &body)).unwrap();
    assert_eq!(
        mqtt::read_packet(&mut s, WAIT),
        Some((0xb0, vec![0, 2, 0, 0x00, 0x11]))
    );
    let p = mqtt::publish(
        b"devices/k1/telemetry",
        br#"{"n":5,"device":"k1"}"#,
        2,
        9,
        Some(&[]),
    );
    let mut dup = p.clone();
    dup[0] |= 0x08;
    for packet in [&p, &dup] {
        s.write_all(packet).unwrap();
        assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0x50, vec![0, 9])));
    }
    s.write_all(&[0x62, 0x02, 0, 9]).unwrap();
    assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0x70, vec![0, 9])));
    s.write_all(&[0x62, 0x02, 0, 77]).unwrap();
    assert_eq!(
        mqtt::read_packet(&mut s, WAIT),
        Some((0x70, vec![0, 77, 0x92]))
    );
    // Nothing is delivered to a device above QoS 0 (every subscription is granted QoS
    // 0): acknowledgements from it answer nothing, are ignored and counted, and the
    // connection stays.
    s.write_all(&[0x40, 0x02, 0, 5, 0x50, 0x02, 0, 6, 0x70, 0x02, 0, 7])
        .unwrap();
    s.write_all(&[0xc0, 0x00]).unwrap();
    assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0xd0, vec![])));
    assert_eq!(branch.wait_counter("k1", "protocol_error", 3), 3);
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages WHERE device = 'k1' AND kind = 'telemetry'",
            1,
            WAIT
        ),
        1
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM messages WHERE device = 'k1' AND kind = 'telemetry'"),
        1
    );
    let (status, _) = gw.terminate();
    assert!(status.success());
}

/// The device port queues 1,024 connections (rumqttd's listener used the default 128).
#[test]
fn listen_backlog() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let out = run_bounded(
        Command::new("ss").args(["-ltnH", &format!("sport = :{}", branch.port)]),
        Duration::from_secs(10),
    );
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let backlog: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(backlog, 1024.min(somaxconn), "{line}");
    let (status, _) = gw.terminate();
    assert!(status.success());
}

/// Every refusal is counted once, per device and reason, and shows in `status`, in
/// `/metrics` and in the health message sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_show_in_status_metrics_and_the_health_message() {
    const PREFIX: &str = "library/refusals";
    const TOKEN: &str = "refusals-test-token-0123456789";
    let mut central = Central::start();
    let mut consumer = Consumer::start(central.port, PREFIX).await;
    let api_port = free_port();
    let branch = Branch::with_extra(
        &[device("k1", "test-sensor")],
        &format!(
            "{}[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n",
            upstream_section(central.port, PREFIX)
        ),
    );
    let gw = branch.start();
    let port = branch.port;
    tokio::task::spawn_blocking(move || {
        // An unknown user name, a wrong password, a foreign subscription.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&login(false, "a", "nobody", "x")).unwrap();
        assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0x20, vec![0, 0x04])));
        let mut s = mqtt::tcp_from(HOSTILE, port).unwrap();
        s.write_all(&login(false, "b", "k1", "wrong")).unwrap();
        assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0x20, vec![0, 0x04])));
        let mut s = logged_in(port, false, "c", "k1");
        assert_eq!(suback(&mut s, 1, false, &["#".to_string()]), [0x80]);
    })
    .await
    .unwrap();
    assert_eq!(branch.wait_counter("", "connect_unknown_device", 1), 1);
    assert_eq!(branch.wait_counter("k1", "connect_bad_password", 1), 1);
    assert_eq!(branch.wait_counter("k1", "subscribe_denied", 1), 1);

    let (ok, out, err) = branch.cli(&["status"]);
    assert!(ok.success(), "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("refused"))
        .unwrap_or_default();
    assert_eq!(
        line,
        "refused     3 by the broker: connect_bad_password 1 (k1 1); connect_unknown_device 1 (- 1); subscribe_denied 1 (k1 1)"
    );
    let (status, metrics) = http_get(api_port, "/metrics", Some(TOKEN));
    assert_eq!(status, 200);
    for sample in [
        "branch_gateway_broker_refused_total{device=\"\",reason=\"connect_unknown_device\"} 1",
        "branch_gateway_broker_refused_total{device=\"k1\",reason=\"connect_bad_password\"} 1",
        "branch_gateway_broker_refused_total{device=\"k1\",reason=\"subscribe_denied\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == sample),
            "no {sample:?} in\n{metrics}"
        );
    }
    // A reconnect sends the health message at once. Health messages sent before the
    // counters were committed (at the first connection) may still be queued for the
    // consumer: wait for the one that holds all three.
    let expected = serde_json::json!({
        "connect_bad_password": {"k1": 1},
        "connect_unknown_device": {"-": 1},
        "subscribe_denied": {"k1": 1},
    });
    central.stop();
    central.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline, consumer.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no health message with {expected}; saw {seen:?}"));
        let Some((topic, body)) = next else {
            panic!("consumer ended")
        };
        if !topic.ends_with("/gateway/health") {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["refused"] == expected {
            break;
        }
        seen.push(v["refused"].clone());
    }
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}
