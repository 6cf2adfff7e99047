//! The live summary for lobby screens: a screen (a device with the `lobby-screen` profile)
//! subscribes to the retained `branch/summary/live` and sees today's figures change as a
//! gate counts visitors; it cannot publish there.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{Event, Packet, QoS};

const GATE: &str = r#"{
  "name": "test-gate", "description": "a gate with visitor rollups",
  "telemetry": {"max_bytes": 256, "fields": {"delta_in": {"type": "integer"}, "delta_out": {"type": "integer"}}},
  "rollups": [
    {"metric": "visitors_in", "kind": "telemetry", "op": "sum", "field": "delta_in"},
    {"metric": "visitors_out", "kind": "telemetry", "op": "sum", "field": "delta_out"}
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screens_see_the_live_summary_read_only() {
    let branch = Branch::new(&[
        device("gate-1", "test-gate"),
        device("screen-1", "lobby-screen"),
    ]);
    std::fs::write(branch.dir.path().join("profiles/test-gate.json"), GATE).unwrap();
    let gw = branch.start();

    let mut gate = connect(branch.port, "gate-1", "gate-1-pw").await;
    for (i, o) in [(5, 2), (3, 1)] {
        gate.client
            .publish(
                "devices/gate-1/telemetry",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"delta_in":{i},"delta_out":{o}}}"#),
            )
            .await
            .unwrap();
    }
    assert_eq!(gate.pubacks(2, Duration::from_secs(10)).await, 2);

    let mut screen = connect(branch.port, "screen-1", "screen-1-pw").await;
    screen
        .client
        .subscribe("branch/summary/live", QoS::AtLeastOnce)
        .await
        .unwrap();
    // The screen tries to write its own figures: acknowledged, dropped, counted.
    screen
        .client
        .publish(
            "branch/summary/live",
            QoS::AtLeastOnce,
            true,
            r#"{"visitors_in":9999}"#,
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen = None;
    while seen.is_none() {
        let ev = tokio::time::timeout_at(deadline, screen.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no live summary with the gate's visitors\n{}", gw.log()));
        if let Some(Ok(Event::Incoming(Packet::Publish(p)))) = ev {
            assert_eq!(p.topic, "branch/summary/live");
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            assert_ne!(
                v["visitors_in"], 9999,
                "a screen's publish must never reach other screens"
            );
            if v["visitors_in"] == 8 {
                seen = Some(v);
            }
        }
    }
    let v = seen.unwrap();
    assert_eq!(v["branch"], "test-branch");
    assert_eq!(
        (v["visitors_out"].as_f64(), v["occupancy"].as_f64()),
        (Some(3.0), Some(5.0))
    );
    assert_eq!(v["devices_online"], 2);
    assert_eq!(branch.wait_counter("screen-1", "publish_denied", 1), 1);
    let (ok, _) = gw.terminate();
    assert!(ok.success());
}

/// Each closed hour's branch summary goes upstream through the outbox, on
/// `{prefix}/summaries/hour`, in the usual envelope. (At start the gateway queues the most
/// recent closed hour, which is how this test sees one without waiting for an hour.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_hours_are_pushed_upstream() {
    const TIMED_GATE: &str = r#"{
      "name": "timed-gate", "description": "a gate with visitor rollups and event times",
      "time_field": "at",
      "telemetry": {"max_bytes": 256, "fields": {"delta_in": {"type": "integer"}, "at": {"type": "string"}}},
      "rollups": [{"metric": "visitors_in", "kind": "telemetry", "op": "sum", "field": "delta_in"}]
    }"#;
    // Stay clear of an hour boundary: the hour just closed must not change mid-test.
    let ms_into_hour = branch_gateway::model::now_ms() % 3_600_000;
    if ms_into_hour > 3_600_000 - 30_000 {
        tokio::time::sleep(Duration::from_millis(
            (3_600_000 - ms_into_hour + 1_000) as u64,
        ))
        .await;
    }
    let now = branch_gateway::model::now_ms();
    let closed = now - now % 3_600_000 - 3_600_000;
    let label = jiff::Timestamp::from_millisecond(closed)
        .unwrap()
        .strftime("%Y-%m-%dT%H:00")
        .to_string();
    let at = jiff::Timestamp::from_millisecond(closed + 1_800_000)
        .unwrap()
        .to_string();

    let central = Central::start();
    let mut consumer = Consumer::start(central.port, "library/sum").await;
    let branch = Branch::with_extra(
        &[device("gate-1", "timed-gate")],
        &upstream_section(central.port, "library/sum")
            .replace("push_summaries = false", "push_summaries = true"),
    );
    std::fs::write(
        branch.dir.path().join("profiles/timed-gate.json"),
        TIMED_GATE,
    )
    .unwrap();
    let gw = branch.start();
    let mut gate = connect(branch.port, "gate-1", "gate-1-pw").await;
    for n in [2, 3] {
        gate.client
            .publish(
                "devices/gate-1/telemetry",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"delta_in":{n},"at":"{at}"}}"#),
            )
            .await
            .unwrap();
    }
    assert_eq!(gate.pubacks(2, Duration::from_secs(10)).await, 2);
    let stored = "SELECT COUNT(*) FROM messages WHERE device = 'gate-1' AND kind = 'telemetry'";
    assert_eq!(branch.wait_count(stored, 2, Duration::from_secs(10)), 2);
    drop(gate);
    let (ok, _) = gw.terminate();
    assert!(ok.success());
    // Restarted, the gateway queues the closed hour again, now with the late readings.
    let gw = branch.start();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut summaries = Vec::new();
    loop {
        let (topic, payload) = tokio::time::timeout_at(deadline, consumer.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no summary for {label}: {summaries:?}\n{}", gw.log()))
            .unwrap();
        if topic != "library/sum/summaries/hour" && topic != "library/sum/backfill/summaries/hour" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(
            (v["kind"].as_str(), v["branch"].as_str()),
            (Some("summary"), Some("test-branch"))
        );
        assert_eq!(v["data"]["hour"], label.as_str());
        summaries.push(v["data"].clone());
        if v["data"]["metrics"]["visitors_in"] == 5 {
            break;
        }
    }
    // The first start's push had no readings for that hour yet; the second has both.
    assert_eq!(summaries.last().unwrap()["metrics"]["messages"], 2);
    let (ok, _) = gw.terminate();
    assert!(ok.success());
}
