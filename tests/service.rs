//! Under systemd: READY=1 only once devices can connect, watchdog pings while every part
//! responds and none while the SQLite writer is wedged (simulated), STATUS lines, and
//! STOPPING=1 on SIGTERM. The test owns the notify socket, as systemd would.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;

/// Every datagram received within `limit`, with its arrival time.
fn receive_for(sock: &UnixDatagram, limit: Duration) -> Vec<(Instant, String)> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => got.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            )),
            Err(_) => break,
        }
    }
    got
}

fn pings(msgs: &[(Instant, String)]) -> usize {
    msgs.iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

fn statuses(msgs: &[(Instant, String)]) -> Vec<String> {
    msgs.iter()
        .flat_map(|(_, m)| m.lines())
        .filter_map(|l| l.strip_prefix("STATUS="))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_watchdog_status_and_a_wedged_writer() {
    let kiosk = device("kiosk-01", "test-sensor");
    let branch = Branch::new(std::slice::from_ref(&kiosk));
    let socket_path = branch.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    let wedge = branch.dir.path().join("wedge-writer");
    let gw = branch.start_with_env(&[
        ("NOTIFY_SOCKET", socket_path.display().to_string()),
        ("WATCHDOG_USEC", "1000000".into()),
        (
            "BRANCH_GATEWAY_TEST_WEDGE_FILE",
            wedge.display().to_string(),
        ),
    ]);

    // READY=1 is the first thing said, and by then a device can log in.
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = sock.recv(&mut buf).expect("a notification within 10 s");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    let c = connect(branch.port, &kiosk.id, &kiosk.password).await;

    // Pings every half period (0.5 s), each with a status line. (What was sent while the
    // device connected is read first and not counted.)
    let _ = receive_for(&sock, Duration::from_millis(1));
    let msgs = receive_for(&sock, Duration::from_millis(2600));
    let n = pings(&msgs);
    assert!((3..=7).contains(&n), "{n} pings in 2.6 s: {msgs:?}");
    let status = statuses(&msgs);
    assert_eq!(
        status.last().map(String::as_str),
        Some("1/1 devices online, no upstream, storage ok")
    );

    // The writer stops (as if stuck in a system call): pings stop within the stall
    // allowance (2 s) plus a check, and the status says why.
    std::fs::write(&wedge, b"").unwrap();
    let _ = receive_for(&sock, Duration::from_millis(3500));
    let msgs = receive_for(&sock, Duration::from_secs(2));
    assert_eq!(pings(&msgs), 0, "{msgs:?}");
    assert!(
        statuses(&msgs)
            .iter()
            .all(|s| s.starts_with("not responding: SQLite writer: no progress for")),
        "{msgs:?}"
    );
    assert!(gw.log().contains("watchdog pings withheld"), "{}", gw.log());

    // It moves again: pings resume.
    std::fs::remove_file(&wedge).unwrap();
    let msgs = receive_for(&sock, Duration::from_secs(3));
    assert!(pings(&msgs) >= 2, "{msgs:?}");
    assert!(gw.log().contains("watchdog pings resumed"), "{}", gw.log());

    // SIGTERM: STOPPING=1, then a clean exit.
    drop(c);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    let msgs = receive_for(&sock, Duration::from_millis(200));
    assert!(
        msgs.iter()
            .any(|(_, m)| m.lines().any(|l| l == "STOPPING=1")),
        "{msgs:?}"
    );
}

/// With stderr connected to the journal (`JOURNAL_STREAM` naming stderr's device and
/// inode), lines carry a `<N>` priority and no timestamp of their own.
#[test]
fn journal_lines_carry_priorities_and_no_timestamps() {
    use std::os::unix::fs::MetadataExt;
    let branch = Branch::new(&[device("kiosk-01", "test-sensor")]);
    let log_path = branch.dir.path().join("journal.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let meta = log.metadata().unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(branch.config())
        .env("RUST_LOG", "info,rumqttd=off")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    while !read().contains("gateway ready") {
        assert!(Instant::now() < deadline, "{}", read());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let text = read();
    let ready = text.lines().find(|l| l.contains("gateway ready")).unwrap();
    assert!(
        ready.starts_with("<6> INFO branch_gateway::app: gateway ready"),
        "{ready}"
    );
    for line in text.lines() {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| line.starts_with(p)),
            "{line}"
        );
        // The level comes right after the priority: no timestamp, no colour codes.
        let level = line[3..].split_whitespace().next().unwrap_or("");
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
            "{line}"
        );
        assert!(!line.contains('\u{1b}'), "{line}");
    }
}
