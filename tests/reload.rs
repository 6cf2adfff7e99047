//! `systemctl reload` (SIGHUP): device changes take effect without touching other
//! connections or the buffer; an invalid config is refused and the running one stays;
//! changes that need a restart are named; the live figures follow the profiles' rollups.

mod common;

use std::time::{Duration, Instant};

use common::*;

async fn send(c: &mut Client, id: &str, from: usize, n: usize) {
    for i in from..from + n {
        c.telemetry(id, i).await;
    }
    assert_eq!(c.pubacks(n, Duration::from_secs(10)).await, n, "{id}");
}

async fn refused(port: u16, id: &str, password: &str) -> bool {
    let mut c = spawn_client(options(port, id, password));
    !matches!(c.connack().await, Ok(rumqttc::ConnectReturnCode::Success))
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_change_on_sighup_and_an_invalid_config_is_refused() {
    let a = device("kiosk-a", "test-sensor");
    let b = device("kiosk-b", "test-sensor");
    let c = device("kiosk-c", "test-sensor");
    let d = device("kiosk-d", "test-sensor");
    let branch = Branch::new(&[a.clone(), b.clone(), c.clone()]);
    let mut gw = branch.start();
    let mut ca = connect(branch.port, &a.id, &a.password).await;
    send(&mut ca, &a.id, 0, 5).await;
    // B (password about to change) and C (about to be removed) are connected.
    let mut cb_old = connect(branch.port, &b.id, &b.password).await;
    let mut cc = connect(branch.port, &c.id, &c.password).await;
    assert!(refused(branch.port, &d.id, &d.password).await);

    // B gets a new password, C goes, D comes; the log level changes too (restart needed).
    let b2 = Device {
        password: "kiosk-b-new-secret".into(),
        ..b.clone()
    };
    branch.write_config(&[a.clone(), b2.clone(), d.clone()], "");
    let text = std::fs::read_to_string(branch.config())
        .unwrap()
        .replace("log_level = \"info\"", "log_level = \"debug\"");
    std::fs::write(branch.config(), text).unwrap();
    gw.hangup();
    gw.wait_log("configuration reloaded", 1);
    let log = gw.log();
    assert!(
        log.contains(r#"added=["kiosk-d"] removed=["kiosk-c"] changed=["kiosk-b"]"#),
        "{log}"
    );
    assert!(log.contains("changes=[gateway]"), "{log}");

    // B's and C's open connections are closed at once: nothing of theirs is acknowledged
    // or stored any more.
    for (client, id) in [(&mut cb_old, &b.id), (&mut cc, &c.id)] {
        let mut closed = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, client.events.recv()).await {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    panic!("{id}: acknowledged after its revocation")
                }
                Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
            }
        }
        assert!(closed, "{id} still connected");
    }
    assert!(
        gw.log()
            .contains("device removed or changed by a reload: connection closed"),
        "{}",
        gw.log()
    );
    let mut cd = connect(branch.port, &d.id, &d.password).await;
    send(&mut cd, &d.id, 0, 3).await;
    assert!(refused(branch.port, &c.id, &c.password).await, "removed");
    assert!(
        refused(branch.port, &b.id, &b.password).await,
        "old password"
    );
    let _cb = connect(branch.port, &b2.id, &b2.password).await;
    // A's connection was never touched: the same client goes on publishing.
    send(&mut ca, &a.id, 5, 5).await;
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages WHERE kind = 'telemetry'",
            13,
            Duration::from_secs(10)
        ),
        13
    );
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM devices WHERE configured = 1 AND id IN ('kiosk-a', 'kiosk-b', 'kiosk-d')"),
        3
    );
    assert_eq!(
        branch.count("SELECT configured FROM devices WHERE id = 'kiosk-c'"),
        0
    );

    // An invalid file is refused; the running config (with D) stays.
    std::fs::write(branch.config(), "[gateway\nbranch_id = ").unwrap();
    gw.hangup();
    gw.wait_log("reload refused", 1);
    assert!(gw.is_running());
    send(&mut ca, &a.id, 10, 2).await;
    let _cd2 = connect(branch.port, &d.id, &d.password).await;
    assert!(refused(branch.port, &c.id, &c.password).await);
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages WHERE kind = 'telemetry'",
            15,
            Duration::from_secs(10)
        ),
        15
    );
    drop((ca, cd, cb_old, cc));
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// A reload that changes a profile's rollups changes the live figures at once: the lobby
/// page shows occupancy as soon as the gate's profile declares `visitors_out` too.
#[test]
fn the_live_figures_follow_the_profiles_rollups_on_sighup() {
    const TOKEN: &str = "reload-test-token-0123456789";
    let api = free_port();
    let branch = Branch::with_extra(
        &[device("gate-1", "test-gate")],
        &format!("[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n"),
    );
    branch.write_test_gate(false);
    let gw = branch.start();
    let lobby = || http_get(api, "/lobby", None).1;
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        let page = lobby();
        if page.contains(r#"data-metric="visitors_in""#) {
            break page; // the first snapshot is computed
        }
        assert!(Instant::now() < deadline, "no visitors figure:\n{page}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!first.contains(r#"data-metric="occupancy""#), "{first}");
    assert!(
        first.contains(r#"data-layout="visitors_in+hourly""#),
        "{first}"
    );
    // A lobby screen already open follows the stream: its updates name the layout.
    use std::io::{BufRead, Write};
    let mut screen = std::net::TcpStream::connect(("127.0.0.1", api)).unwrap();
    screen
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(screen, "GET /lobby/events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut screen = std::io::BufReader::new(screen);
    let mut layout_seen = || loop {
        let mut line = String::new();
        assert!(screen.read_line(&mut line).unwrap() > 0, "the stream ended");
        if let Some(data) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            return v["layout"].as_str().unwrap().to_owned();
        }
    };
    assert_eq!(layout_seen(), "visitors_in+hourly");

    branch.write_test_gate(true);
    gw.hangup();
    gw.wait_log("configuration reloaded", 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let page = lobby();
        if page.contains(r#"data-metric="occupancy""#) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no occupancy after the reload:\n{page}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The open screen is told at once (its script then loads the page again).
    // (An update of the old layout may come first: the clock ticks each minute.)
    let mut after = layout_seen();
    while after == "visitors_in+hourly" {
        after = layout_seen();
    }
    assert_eq!(after, "visitors_in,occupancy+hourly");
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}
