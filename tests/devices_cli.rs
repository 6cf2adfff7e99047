//! `branch-gateway devices --config FILE`: the table branch IT reads. Before the first run
//! it explains there is no database yet; while the gateway runs and after it stops, each
//! device's row shows its state, last seen, counts and last rejection. The table is parsed
//! column by column, not matched as whole lines.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use rumqttc::QoS;

const LIMIT: Duration = Duration::from_secs(20);

/// One parsed row of the table.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    id: String,
    profile: String,
    state: String,
    last_seen: String,
    accepted: i64,
    rejected: i64,
    denied: i64,
    limited: i64,
    last_rejection: String,
}

fn run_devices(branch: &Branch) -> Output {
    run_bounded(
        Command::new(BIN)
            .arg("devices")
            .arg("--config")
            .arg(branch.config()),
        LIMIT,
    )
}

/// Whitespace-separated words of `line` with their byte offsets.
fn words(line: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                out.push((s, &line[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &line[s..]));
    }
    out
}

/// Run `devices` (must succeed) and parse its table: the header's columns, then each row.
/// LAST SEEN is `never` or `<n><unit> ago`; LAST REJECTION is the rest of the line.
fn devices_table(branch: &Branch) -> Vec<Row> {
    let out = run_devices(branch);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "devices failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .expect("a header line")
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "DEVICE",
            "PROFILE",
            "STATE",
            "LAST SEEN",
            "ACCEPTED",
            "REJECTED",
            "DENIED",
            "LIMITED",
            "COMMANDS",
            "LAST REJECTION"
        ],
        "{stdout}"
    );
    lines
        .map(|line| {
            let w = words(line);
            let word = |i: usize| {
                w.get(i)
                    .map(|(_, s)| *s)
                    .unwrap_or_else(|| panic!("{line}"))
            };
            let (last_seen, next) = if word(3) == "never" {
                ("never".to_owned(), 4)
            } else {
                assert_eq!(word(4), "ago", "{line}");
                (format!("{} ago", word(3)), 5)
            };
            let number = |i: usize| {
                word(i)
                    .parse::<i64>()
                    .unwrap_or_else(|e| panic!("column {i} of {line:?}: {e}"))
            };
            // COMMANDS: open/succeeded; none in these tests.
            assert_eq!(word(next + 4), "0/0", "{line}");
            let rest_at = w
                .get(next + 5)
                .map(|(at, _)| *at)
                .unwrap_or_else(|| panic!("no LAST REJECTION in {line:?}"));
            Row {
                id: word(0).into(),
                profile: word(1).into(),
                state: word(2).into(),
                last_seen,
                accepted: number(next),
                rejected: number(next + 1),
                denied: number(next + 2),
                limited: number(next + 3),
                last_rejection: line[rest_at..].trim_end().to_owned(),
            }
        })
        .collect()
}

/// A LAST SEEN within the last minute: `<n>s ago` with n < 60.
fn assert_recent(row: &Row) {
    let secs = row
        .last_seen
        .strip_suffix("s ago")
        .and_then(|n| n.parse::<u32>().ok());
    assert!(
        matches!(secs, Some(n) if n < 60),
        "{}: last seen {:?}",
        row.id,
        row.last_seen
    );
}

fn never_seen(id: &str, state: &str, denied: i64) -> Row {
    Row {
        id: id.into(),
        profile: "test-sensor".into(),
        state: state.into(),
        last_seen: "never".into(),
        accepted: 0,
        rejected: 0,
        denied,
        limited: 0,
        last_rejection: "-".into(),
    }
}

const REJECTION: &str = "wrong_type: field `n` must be integer, got string";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_table_before_during_and_after_a_run() {
    let devices = [
        device("k1", "test-sensor"),
        device("k2", "test-sensor"),
        device("k3", "test-sensor"),
    ];
    let branch = Branch::new(&devices);

    // Before any run: no database, a clear message, and no database created by asking.
    let out = run_devices(&branch);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "error: no buffer database at {} yet: run the gateway once first\n",
            branch.db_path().display()
        )
    );
    assert!(!branch.db_path().exists());

    let gw = branch.start();
    assert_eq!(
        devices_table(&branch),
        vec![
            never_seen("k1", "offline", 0),
            never_seen("k2", "offline", 0),
            never_seen("k3", "offline", 0),
        ],
        "freshly started: every configured device, none seen"
    );

    // k1: 3 valid messages and 1 invalid one (a string where an integer belongs).
    let mut k1 = connect(branch.port, "k1", "k1-pw").await;
    let payloads = [
        r#"{"n":1,"device":"k1"}"#,
        r#"{"n":2,"device":"k1"}"#,
        r#"{"n":"3","device":"k1"}"#,
        r#"{"n":4,"device":"k1"}"#,
    ];
    for p in payloads {
        k1.client
            .publish("devices/k1/telemetry", QoS::AtLeastOnce, false, p)
            .await
            .unwrap();
    }
    assert_eq!(k1.pubacks(4, Duration::from_secs(10)).await, 4);
    // k3 only tries a wrong password: refused, counted as denied, never seen.
    let mut k3 = spawn_client(options(branch.port, "k3", "not-k3-pw"));
    let refused = k3.connack().await;
    assert!(
        matches!(&refused, Err(e) if e.contains("BadUserNamePassword")),
        "{refused:?}"
    );
    let settle = Duration::from_secs(10);
    assert_eq!(
        branch.wait_count("SELECT COUNT(*) FROM messages", 3, settle),
        3
    );
    assert_eq!(
        branch.wait_count("SELECT COUNT(*) FROM rejected", 1, settle),
        1
    );
    assert_eq!(
        branch.wait_count(
            "SELECT COALESCE((SELECT value FROM device_counters \
             WHERE device = 'k3' AND counter = 'connect_bad_password'), 0)",
            1,
            settle
        ),
        1
    );

    let rows = devices_table(&branch);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let k1_online = Row {
        id: "k1".into(),
        profile: "test-sensor".into(),
        state: "online".into(),
        last_seen: rows[0].last_seen.clone(),
        accepted: 3,
        rejected: 1,
        denied: 0,
        limited: 0,
        last_rejection: REJECTION.into(),
    };
    assert_eq!(rows[0], k1_online);
    assert_recent(&rows[0]);
    assert_eq!(rows[1], never_seen("k2", "offline", 0));
    assert_eq!(rows[2], never_seen("k3", "offline", 1));

    // k1 disconnects: offline, everything else kept.
    k1.client.disconnect().await.unwrap();
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM devices WHERE id = 'k1' AND online = 0",
            1,
            settle
        ),
        1
    );
    let rows = devices_table(&branch);
    let k1_offline = Row {
        state: "offline".into(),
        last_seen: rows[0].last_seen.clone(),
        ..k1_online.clone()
    };
    assert_eq!(
        rows,
        vec![
            k1_offline.clone(),
            never_seen("k2", "offline", 0),
            never_seen("k3", "offline", 1),
        ]
    );
    assert_recent(&rows[0]);

    // The gateway stopped: the table reads the database alone and shows the same.
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    let rows = devices_table(&branch);
    assert_eq!(
        rows,
        vec![
            Row {
                last_seen: rows[0].last_seen.clone(),
                ..k1_offline.clone()
            },
            never_seen("k2", "offline", 0),
            never_seen("k3", "offline", 1),
        ]
    );
    assert_recent(&rows[0]);

    // k3 is taken out of the config: after the next run it is listed last, as removed.
    branch.write_config(&devices[..2], "");
    let (status, log) = branch.start().terminate();
    assert!(status.success(), "{log}");
    let rows = devices_table(&branch);
    assert_eq!(
        rows,
        vec![
            Row {
                last_seen: rows[0].last_seen.clone(),
                ..k1_offline
            },
            never_seen("k2", "offline", 0),
            never_seen("k3", "removed", 1),
        ]
    );
}

/// A device still connected when the gateway stops is shown offline afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_devices_are_offline_after_the_gateway_stops() {
    let branch = Branch::new(&[device("idle", "test-sensor")]);
    let gw = branch.start();
    let _c = connect(branch.port, "idle", "idle-pw").await;
    assert_eq!(
        branch.wait_count(
            "SELECT online FROM devices WHERE id = 'idle'",
            1,
            Duration::from_secs(5)
        ),
        1
    );
    let (status, _) = gw.terminate();
    assert!(status.success());
    assert_eq!(
        branch.count("SELECT online FROM devices WHERE id = 'idle'"),
        0
    );
}
