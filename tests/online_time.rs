//! Time online the central side can trust (issue 14): `online_minutes` grow while a
//! device stays connected, a connection open at a stop ends at the stop, one open at a
//! SIGKILL ends at the last moment the gateway was known alive, and reconnect churn adds
//! up to the connections' own lengths. Each figure is checked against bounds taken from
//! the test's own clock around the events (tens of milliseconds wide).

mod common;
use common::mqtt::{self, Connect};
use common::*;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const WAIT: Duration = Duration::from_secs(5);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Log in as k1; returns the stream and the times just before the CONNECT and just
/// after the CONNACK.
fn connect(port: u16) -> (TcpStream, i64, i64) {
    let before = now_ms();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&mqtt::connect(&Connect {
        v5: false,
        client_id: "t1",
        login: Some(("k1", "k1-pw")),
        keep_alive: 60,
        clean: true,
        will: None,
        properties: &[],
    }))
    .unwrap();
    let (first, body) = mqtt::read_packet(&mut s, WAIT).expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0));
    (s, before, now_ms())
}

/// k1's `online_minutes` over all hours, in milliseconds.
fn online_ms(branch: &Branch) -> f64 {
    let minutes: f64 = branch
        .db()
        .query_row(
            "SELECT COALESCE(SUM(value), 0) FROM rollups
             WHERE scope = 'k1' AND period = 'hour' AND metric = 'online_minutes'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    minutes * 60_000.0
}

fn assert_between(what: &str, got: f64, lo: i64, hi: i64) {
    assert!(
        got >= lo as f64 - 1.0 && got <= hi as f64 + 1.0,
        "{what}: {got:.0} ms online, expected {lo}..={hi} ms"
    );
}

/// Poll until k1's time online is at least `ms` (or 10 s pass).
fn wait_online_ms(branch: &Branch, ms: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = online_ms(branch);
        if got >= ms || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn accruing(ms: u64) -> [(&'static str, String); 1] {
    [("BRANCH_GATEWAY_TEST_ACCRUAL_MS", ms.to_string())]
}

/// Still connected: the time online grows (recorded every accrual period), and the
/// connection open at SIGTERM ends at the stop.
#[test]
fn a_connection_open_at_the_stop_counts_up_to_the_stop() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start_with_env(&accruing(200));
    let (_s, before, after) = connect(branch.port);
    // Recorded while the device stays connected.
    assert!(wait_online_ms(&branch, 500.0) >= 500.0);
    let stop_from = now_ms();
    let (status, _) = gw.terminate();
    let stop_to = now_ms();
    assert!(status.success());
    assert_between(
        "connected until the stop",
        online_ms(&branch),
        stop_from - after,
        stop_to - before,
    );
}

/// SIGKILL: the time online is recorded up to the last moment the gateway was known
/// alive (here its last record, every 200 ms; a message committed later moves it on),
/// added at the next start.
#[test]
fn a_connection_open_at_a_sigkill_counts_up_to_the_last_moment_known_alive() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start_with_env(&accruing(200));
    let (mut s, before, after) = connect(branch.port);
    assert!(wait_online_ms(&branch, 400.0) >= 400.0);
    // A message: committed (its PUBACK comes after the commit), the gateway alive then.
    let sent = now_ms();
    s.write_all(&mqtt::publish(
        b"devices/k1/telemetry",
        br#"{"n":1,"device":"k1"}"#,
        1,
        1,
        None,
    ))
    .unwrap();
    assert_eq!(mqtt::read_packet(&mut s, WAIT), Some((0x40, vec![0, 1])));
    let acked = now_ms();
    let killed_from = now_ms();
    gw.kill9();
    let killed_to = now_ms();
    drop(s);
    let recorded = online_ms(&branch);
    assert!(
        recorded as i64 >= sent - after - 200 - 50,
        "recorded every 200 ms until the kill: {recorded} ms"
    );
    let gw = branch.start();
    // Closed at the last moment known alive: at least the message's arrival, at most
    // the kill.
    let got = wait_online_ms(&branch, (sent - after) as f64);
    assert_between(
        "connected until the SIGKILL",
        got,
        sent - after,
        killed_to - before,
    );
    assert!(got <= (killed_from.max(acked) + 200 - before) as f64);
    assert_eq!(branch.counter("k1", "disconnects"), 1);
    let (status, _) = gw.terminate();
    assert!(status.success());
}

/// Twenty short connections with gaps between them: the time online is the sum of
/// their lengths, nothing of the gaps (and never an earlier session's start).
#[test]
fn reconnect_churn_adds_up_to_the_connections_own_lengths() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let gw = branch.start();
    let (mut lo, mut hi) = (0i64, 0i64);
    for _ in 0..20 {
        let (mut s, before, after) = connect(branch.port);
        std::thread::sleep(Duration::from_millis(40));
        // A DISCONNECT, then wait for the gateway to close: it has seen the end then.
        let closing = now_ms();
        s.write_all(&[0xe0, 0x00]).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 16];
        let _ = std::io::Read::read(&mut s, &mut buf);
        let closed = now_ms();
        lo += closing - after;
        hi += closed - before;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(branch.wait_counter("k1", "disconnects", 20), 20);
    let (status, _) = gw.terminate();
    assert!(status.success());
    assert_between("twenty connections", online_ms(&branch), lo, hi);
    assert_eq!(
        branch.count(
            "SELECT CAST(COALESCE(SUM(value), 0) AS INTEGER) FROM rollups
             WHERE scope = 'k1' AND period = 'hour' AND metric = 'offline_episodes'"
        ),
        20
    );
}
