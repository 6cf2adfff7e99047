//! One device must not be able to push the others out (issue 13, item 6): the disk cap
//! takes from the device holding the most first, and a profile's `rate_limit` refuses
//! what a device sends beyond it (counted, connection kept). Real binary, loopback.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rumqttc::QoS;

const TOKEN: &str = "test-token-0123456789";

/// 1 KB telemetry for the flooding device.
const FLOOD_PROFILE: &str = r#"{
  "name": "flood-sensor",
  "description": "a device that sends large telemetry as fast as it can",
  "telemetry": { "max_bytes": 2048, "fields": {
      "n": {"type": "integer", "min": 0},
      "pad": {"type": "string", "max_length": 1200}
  }}
}"#;

/// Two messages a second, bursts of up to 50.
const LIMITED_PROFILE: &str = r#"{
  "name": "limited-sensor",
  "description": "test device with a message rate limit",
  "telemetry": { "max_bytes": 512, "fields": {
      "n": {"type": "integer", "min": 0},
      "device": {"type": "string", "required": false, "max_length": 32},
      "pad": {"type": "string", "required": false, "max_length": 400}
  }},
  "rate_limit": { "messages_per_s": 2, "burst_messages": 50 }
}"#;

/// 200 payload bytes a second, bursts of up to 4,000 (forty 100-byte messages).
const BYTE_LIMITED_PROFILE: &str = r#"{
  "name": "byte-limited-sensor",
  "description": "test device with a byte rate limit",
  "telemetry": { "max_bytes": 512, "fields": {
      "n": {"type": "integer", "min": 0},
      "device": {"type": "string", "required": false, "max_length": 32},
      "pad": {"type": "string", "required": false, "max_length": 400}
  }},
  "rate_limit": { "bytes_per_s": 200, "burst_bytes": 4000 }
}"#;

fn size_on_disk(branch: &Branch) -> u64 {
    let db = branch.db_path();
    let wal = db.with_extension("sqlite-wal");
    std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0)
}

/// A telemetry payload of exactly `len` bytes: `{"n":N,"pad":"xxx..."}`.
fn sized(n: usize, len: usize) -> String {
    let bare = format!(r#"{{"n":{n},"pad":""}}"#);
    format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(len - bare.len()))
}

/// The samples of one metric in a Prometheus text page: (labels, value).
fn samples(page: &str, name: &str) -> Vec<(String, f64)> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = rest.rsplit_once(' ')?;
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A device floods 1 KB messages into a 4 MiB cap while central is down; a canary with a
/// modest backlog (some from before the flood, some sent during it) loses nothing. The
/// flood's oldest messages are dropped, every one counted, and `status`, `/metrics` and
/// the log report exactly what the database holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_disk_cap_takes_from_the_flooding_device_first() {
    const CAP: u64 = 4 * 1024 * 1024;
    const FLOOD: usize = 12_000;
    // The outage: the port is held but never answers MQTT.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let central_port = holder.local_addr().unwrap().port();
    let api_port = free_port();
    let devices = [
        device("flood", "flood-sensor"),
        device("canary", "test-sensor"),
    ];
    let extra = format!(
        "max_bytes = {CAP}\n[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n{}",
        upstream_section(central_port, "library/fair-cap")
    );
    let branch = Branch::with_extra(&devices, &extra);
    std::fs::write(
        branch.dir.path().join("profiles/flood-sensor.json"),
        FLOOD_PROFILE,
    )
    .unwrap();
    let gw = branch.start();
    let started = Instant::now();

    // The canary's backlog from before the flood: 300 telemetry, 30 events.
    let mut canary = connect(branch.port, "canary", "canary-pw").await;
    for n in 0..300 {
        canary.telemetry("canary", n).await;
    }
    for n in 0..30 {
        canary
            .client
            .publish(
                "devices/canary/events",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"event":"tick","n":{n}}}"#),
            )
            .await
            .unwrap();
    }
    assert_eq!(canary.pubacks(330, Duration::from_secs(30)).await, 330);
    let canary_rows = "SELECT COUNT(*) FROM messages WHERE device = 'canary'";
    assert_eq!(
        branch.wait_count(canary_rows, 330, Duration::from_secs(10)),
        330
    );

    // The flood, with one canary message every 100 flood messages.
    let mut flood = connect(branch.port, "flood", "flood-pw").await;
    for n in 0..FLOOD {
        flood
            .client
            .publish(
                "devices/flood/telemetry",
                QoS::AtLeastOnce,
                false,
                sized(n, 1000),
            )
            .await
            .unwrap();
        if n % 100 == 0 {
            canary.telemetry("canary", 300 + n / 100).await;
        }
    }
    assert_eq!(flood.pubacks(FLOOD, Duration::from_secs(120)).await, FLOOD);
    assert_eq!(canary.pubacks(120, Duration::from_secs(10)).await, 120);
    // Every flood message is either stored or counted as dropped.
    let flood_accounted = "SELECT (SELECT COUNT(*) FROM messages WHERE device = 'flood')
        + COALESCE((SELECT SUM(count) FROM drops WHERE device = 'flood'), 0)";
    assert_eq!(
        branch.wait_count(flood_accounted, FLOOD as i64, Duration::from_secs(30)),
        FLOOD as i64
    );
    // A last canary message, sent once the whole flood is committed: it is in a later
    // batch, so once it is stored the writer has also finished the cap pass that followed
    // the flood's last batch (this one is far too small to start another).
    canary.telemetry("canary", 1_000).await;
    assert_eq!(canary.pubacks(1, Duration::from_secs(10)).await, 1);
    let last = "SELECT COUNT(*) FROM messages WHERE device = 'canary'
        AND json_extract(payload, '$.n') = 1000";
    assert_eq!(branch.wait_count(last, 1, Duration::from_secs(30)), 1);
    assert_eq!(branch.count(flood_accounted), FLOOD as i64);

    // The canary lost nothing: all 451 rows are there, none counted as dropped.
    assert_eq!(branch.count(canary_rows), 451, "{}", gw.log());
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM drops WHERE device = 'canary'"),
        0
    );
    assert_eq!(branch.counter("canary", "dropped_telemetry"), 0);
    assert_eq!(branch.counter("canary", "dropped_events"), 0);
    // The flood's oldest went, counted per device and kind: what is left is its newest run.
    // One read, one snapshot: a maintenance tick (every 10 s) may still drop a few more
    // while the file is over its high-water mark, between two separate reads.
    let (dropped, kept, min_n, max_n, counted): (i64, i64, i64, i64, i64) = branch
        .db()
        .query_row(
            "SELECT COALESCE((SELECT count FROM drops WHERE device = 'flood' AND kind = 'telemetry'), 0),
                    (SELECT COUNT(*) FROM messages WHERE device = 'flood'),
                    (SELECT MIN(json_extract(payload, '$.n')) FROM messages WHERE device = 'flood'),
                    (SELECT MAX(json_extract(payload, '$.n')) FROM messages WHERE device = 'flood'),
                    COALESCE((SELECT value FROM device_counters WHERE device = 'flood' AND counter = 'dropped_telemetry'), 0)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert!(dropped > 0, "the cap must have been reached");
    assert_eq!(dropped + kept, FLOOD as i64);
    assert_eq!(min_n, dropped);
    assert_eq!(max_n, FLOOD as i64 - 1);
    assert_eq!(counted, dropped);
    assert!(size_on_disk(&branch) <= CAP);

    // `status` and `/metrics` say the same (asked again if a tick dropped more meanwhile).
    let dropped_now = || {
        branch.count(
            "SELECT COALESCE((SELECT count FROM drops WHERE device = 'flood' AND kind = 'telemetry'), 0)",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (dropped, out, page) = loop {
        let before = dropped_now();
        let (st, out, err) = branch.cli(&["status"]);
        assert!(st.success(), "{err}");
        let (code, page) = http_get(api_port, "/metrics", Some(TOKEN));
        assert_eq!(code, 200, "{page}");
        if dropped_now() == before || Instant::now() > deadline {
            break (before, out, page);
        }
    };
    let kept = FLOOD as i64 - dropped;
    assert!(
        out.contains(&format!(
            "drops       {dropped} undelivered messages removed by the disk cap: flood/telemetry {dropped}\n"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("backlog     {} undelivered", kept + 451)),
        "{out}"
    );
    assert_eq!(
        samples(&page, "branch_gateway_dropped_total"),
        [(
            r#"{device="flood",kind="telemetry"}"#.to_owned(),
            dropped as f64
        )]
    );

    // Logged once per burst: at most one error per 10 s window, and the reports add up to
    // exactly what was dropped (the last is written at a maintenance tick after the burst).
    let reported = |log: &str| -> (usize, i64) {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("buffer disk cap reached: undelivered messages dropped"))
            .collect();
        let total = lines
            .iter()
            .filter_map(|l| {
                let v = l.split("dropped_undelivered=").nth(1)?;
                v.split_whitespace().next()?.parse::<i64>().ok()
            })
            .sum();
        (lines.len(), total)
    };
    // A maintenance tick after the flood may still drop a few (the file was still over its
    // high-water mark): compare with the count once both agree.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reported(&gw.log()).1 != dropped_now() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (reports, total) = reported(&gw.log());
    let (dropped, counted): (i64, i64) = branch
        .db()
        .query_row(
            "SELECT COALESCE((SELECT count FROM drops WHERE device = 'flood' AND kind = 'telemetry'), 0),
                    COALESCE((SELECT value FROM device_counters WHERE device = 'flood' AND counter = 'dropped_telemetry'), 0)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(total, dropped, "{}", gw.log());
    assert_eq!(
        counted, dropped,
        "the counter and the drops agree in one read"
    );
    let windows = started.elapsed().as_secs() / 10 + 1;
    assert!(
        reports as u64 <= windows,
        "{reports} cap reports in {windows} windows"
    );
    assert!(!gw.log().contains("canary\", \"telemetry"), "{}", gw.log());
    eprintln!(
        "cap {CAP} B: flood kept {kept}, dropped {dropped} (in {reports} log reports); canary 451/451"
    );
    drop(holder);
    let (ok, _) = gw.terminate();
    assert!(ok.success());
}

/// A device over its profile's rate limit: of a burst far above the bucket, exactly the
/// bucket (plus what it refills while the burst lasts) is stored, the rest is counted as
/// `rate_limited`, every publish is acknowledged (MQTT 3.1.1 has no refusal) and the
/// connection stays: after a refill its next message is stored. A device without a limit
/// sends all of its own at the same time. The counts show in `devices`, `status`, the API,
/// `/metrics` and the health message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_over_its_rate_limit_is_refused_counted_and_kept_connected() {
    const N: usize = 500;
    const PREFIX: &str = "library/rate-limit";
    let mut central = Central::start();
    let mut consumer = Consumer::start(central.port, PREFIX).await;
    let api_port = free_port();
    let devices = [
        device("lim", "limited-sensor"),
        device("bytes", "byte-limited-sensor"),
        device("free", "test-sensor"),
    ];
    let extra = format!(
        "[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n{}",
        upstream_section(central.port, PREFIX).replace(
            "push_summaries = false\n",
            "push_summaries = false\nreconnect_max_ms = 200\n"
        )
    );
    let branch = Branch::with_extra(&devices, &extra);
    let profiles = branch.dir.path().join("profiles");
    std::fs::write(profiles.join("limited-sensor.json"), LIMITED_PROFILE).unwrap();
    std::fs::write(
        profiles.join("byte-limited-sensor.json"),
        BYTE_LIMITED_PROFILE,
    )
    .unwrap();
    let (ok, out, err) = branch.cli(&["check-config"]);
    assert!(ok.success(), "{out}{err}");
    let gw = branch.start();

    let mut lim = connect(branch.port, "lim", "lim-pw").await;
    let mut bytes = connect(branch.port, "bytes", "bytes-pw").await;
    let mut free = connect(branch.port, "free", "free-pw").await;
    let started = Instant::now();
    for n in 0..N {
        lim.telemetry("lim", n).await;
        bytes
            .client
            .publish(
                "devices/bytes/telemetry",
                QoS::AtLeastOnce,
                false,
                sized(n, 100),
            )
            .await
            .unwrap();
        free.telemetry("free", n).await;
    }
    assert_eq!(lim.pubacks(N, Duration::from_secs(60)).await, N);
    assert_eq!(bytes.pubacks(N, Duration::from_secs(60)).await, N);
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(free.pubacks(N, Duration::from_secs(60)).await, N);

    let stored = |id: &str| {
        branch.count(&format!(
            "SELECT COUNT(*) FROM messages WHERE device = '{id}'"
        ))
    };
    let accounted = |id: &str| {
        format!(
            "SELECT (SELECT COUNT(*) FROM messages WHERE device = '{id}')
               + COALESCE((SELECT value FROM device_counters WHERE device = '{id}' AND counter = 'rate_limited'), 0)"
        )
    };
    for id in ["lim", "bytes"] {
        assert_eq!(
            branch.wait_count(&accounted(id), N as i64, Duration::from_secs(10)),
            N as i64,
            "{id}: every message is either stored or counted as rate_limited"
        );
    }
    // The bucket starts full at the device's first message, no earlier than `started`,
    // and gains `rate` per second until its last message, before the last PUBACK: so at
    // least the burst and at most the burst plus rate x elapsed (whole messages) pass.
    let (lim_stored, lim_refused) = (stored("lim"), branch.counter("lim", "rate_limited"));
    let lim_most = 50 + (2.0 * elapsed).floor() as i64;
    assert!(
        (50..=lim_most).contains(&lim_stored),
        "lim stored {lim_stored}, bound 50..={lim_most} after {elapsed:.2} s"
    );
    let (bytes_stored, bytes_refused) = (stored("bytes"), branch.counter("bytes", "rate_limited"));
    let bytes_most = 40 + (200.0 * elapsed / 100.0).floor() as i64;
    assert!(
        (40..=bytes_most).contains(&bytes_stored),
        "bytes stored {bytes_stored}, bound 40..={bytes_most} after {elapsed:.2} s"
    );
    assert_eq!(lim_stored + lim_refused, N as i64);
    assert_eq!(bytes_stored + bytes_refused, N as i64);
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages WHERE device = 'free'",
            N as i64,
            Duration::from_secs(10)
        ),
        N as i64,
        "a device without a limit is not held back"
    );
    assert_eq!(branch.counter("free", "rate_limited"), 0);
    // What was refused is not in `rejected` either.
    assert_eq!(branch.count("SELECT COUNT(*) FROM rejected"), 0);

    // Same connection, after a refill (two tokens a second: 0.6 s gives more than one).
    tokio::time::sleep(Duration::from_millis(600)).await;
    lim.telemetry("lim", 10_000).await;
    assert_eq!(lim.pubacks(1, Duration::from_secs(10)).await, 1);
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages WHERE device = 'lim' AND json_extract(payload, '$.n') = 10000",
            1,
            Duration::from_secs(10)
        ),
        1,
        "the connection stayed and the bucket refilled"
    );
    assert_eq!(branch.counter("lim", "rate_limited"), lim_refused);
    assert!(gw.log().contains("device over its profile's rate limit"));
    let limit_lines = gw
        .log()
        .lines()
        .filter(|l| l.contains("device over its profile's rate limit") && l.contains("lim"))
        .count();
    assert!(
        limit_lines <= 2,
        "logged once per burst: {limit_lines} lines"
    );

    // `devices`, `status`, the API and `/metrics` show the counts.
    let (st, out, err) = branch.cli(&["devices"]);
    assert!(st.success(), "{err}");
    let row = |id: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{id} in {out}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert!(out.lines().next().unwrap().contains(" LIMITED "), "{out}");
    // DEVICE PROFILE STATE LAST SEEN(2 words) ACCEPTED REJECTED DENIED LIMITED
    assert_eq!(row("lim")[8], lim_refused.to_string(), "{out}");
    assert_eq!(row("bytes")[8], bytes_refused.to_string(), "{out}");
    assert_eq!(row("free")[8], "0", "{out}");
    let (st, out, err) = branch.cli(&["status"]);
    assert!(st.success(), "{err}");
    let total = lim_refused + bytes_refused;
    assert!(
        out.contains(&format!(
            "limited     {total} messages refused for their profile's rate limit (rate_limited): bytes {bytes_refused}, lim {lim_refused}\n"
        )),
        "{out}"
    );
    let (code, body) = http_get(api_port, "/api/v1/devices", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let api_count = |id: &str| {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap()["rate_limited"]
            .clone()
    };
    assert_eq!(api_count("lim"), lim_refused);
    assert_eq!(api_count("free"), 0);
    let (code, page) = http_get(api_port, "/metrics", Some(TOKEN));
    assert_eq!(code, 200, "{page}");
    assert_eq!(
        samples(&page, "branch_gateway_rate_limited_total"),
        [
            (r#"{device="bytes"}"#.to_owned(), bytes_refused as f64),
            (r#"{device="lim"}"#.to_owned(), lim_refused as f64),
        ]
    );
    assert!(
        samples(&page, "branch_gateway_messages_total")
            .contains(&(r#"{outcome="rate_limited"}"#.to_owned(), total as f64)),
        "{page}"
    );

    // The health message after a reconnect carries the same counts.
    while consumer.rx.try_recv().is_ok() {}
    central.stop();
    central.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = loop {
        match tokio::time::timeout(Duration::from_millis(200), consumer.rx.recv()).await {
            Ok(Some((topic, body))) if topic.ends_with("/gateway/health") => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                if v["rate_limited"]["lim"] == lim_refused {
                    break v;
                }
            }
            _ => assert!(
                Instant::now() < deadline,
                "no health message with the counts"
            ),
        }
    };
    assert_eq!(health["rate_limited"]["bytes"], bytes_refused);
    assert!(health["rate_limited"].get("free").is_none());
    eprintln!(
        "burst of {N} in {elapsed:.2} s: lim stored {lim_stored} (refused {lim_refused}), \
         bytes stored {bytes_stored} (refused {bytes_refused})"
    );
    let (ok, _) = gw.terminate();
    assert!(ok.success());
}
