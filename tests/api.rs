//! The HTTP API end to end with the real binary: a scripted day of a device with event
//! times, hourly and daily summaries with exact values, the change cursor (re-opened past
//! buckets after late data, nothing twice when nothing changed), devices, health, metrics,
//! and the errors: 401 without the token, a JSON 400 for bad parameters, 404.

mod common;

use std::time::Duration;

use common::http_get as get;
use common::*;
use rumqttc::QoS;
use serde_json::{json, Value};

const TOKEN: &str = "central-test-token-0123456789";

const PROFILE: &str = r#"{
  "name": "test-kiosk", "description": "a kiosk with event times",
  "time_field": "at",
  "events": { "max_bytes": 512, "type_field": "event", "types": {
    "loan": {"fields": {"ok": {"type": "boolean"}, "at": {"type": "string"}}},
    "session_end": {"fields": {"minutes": {"type": "integer"}, "at": {"type": "string"},
      "card": {"type": "string", "privacy": "hash"}}}
  }},
  "rollups": [
    {"metric": "loans", "kind": "events", "type": "loan", "op": "count", "where": {"ok": true}},
    {"metric": "loan_failures", "kind": "events", "type": "loan", "op": "count", "where": {"ok": false}},
    {"metric": "session_minutes", "kind": "events", "type": "session_end", "op": "sum", "field": "minutes"},
    {"metric": "longest_session", "kind": "events", "type": "session_end", "op": "max", "field": "minutes"},
    {"metric": "patrons", "kind": "events", "type": "session_end", "op": "distinct", "field": "card"}
  ]
}"#;

fn get_json(port: u16, path: &str) -> Value {
    let (status, body) = get(port, path, Some(TOKEN));
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_devices_health_and_errors() {
    let api_port = free_port();
    let branch = Branch::with_extra(
        &[device("k1", "test-kiosk")],
        &format!(
            "[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n[privacy]\nhmac_secret = \"branch-secret-0123456789\"\n"
        ),
    );
    std::fs::write(branch.dir.path().join("profiles/test-kiosk.json"), PROFILE).unwrap();
    // The branch is in Shanghai (UTC+8).
    let cfg = std::fs::read_to_string(branch.config()).unwrap();
    std::fs::write(
        branch.config(),
        cfg.replacen(
            "[gateway]\n",
            "[gateway]\ntimezone = \"Asia/Shanghai\"\n",
            1,
        ),
    )
    .unwrap();
    let gw = branch.start();
    let mut c = connect(branch.port, "k1", "k1-pw").await;
    // A scripted day, 2026-11-20 local time: (local time, payload).
    let day = [
        ("09:05", json!({"event": "loan", "ok": true})),
        ("09:40", json!({"event": "loan", "ok": true})),
        ("09:50", json!({"event": "loan", "ok": false})),
        (
            "10:15",
            json!({"event": "session_end", "minutes": 12, "card": "card-a"}),
        ),
        (
            "10:20",
            json!({"event": "session_end", "minutes": 30, "card": "card-b"}),
        ),
        (
            "10:59",
            json!({"event": "session_end", "minutes": 5, "card": "card-a"}),
        ),
        ("11:00", json!({"event": "loan", "ok": true})),
    ];
    let publish = |time: &str, mut payload: Value| {
        payload["at"] = json!(format!("2026-11-20T{time}:00+08:00"));
        payload.to_string()
    };
    for (time, payload) in day.iter().cloned() {
        c.client
            .publish(
                "devices/k1/events",
                QoS::AtLeastOnce,
                false,
                publish(time, payload),
            )
            .await
            .unwrap();
    }
    assert_eq!(c.pubacks(7, Duration::from_secs(10)).await, 7);
    let stored = "SELECT COUNT(*) FROM messages WHERE kind = 'events'";
    assert_eq!(
        branch.wait_count(stored, 7, Duration::from_secs(10)),
        7,
        "{}",
        gw.log()
    );

    let hours = get_json(
        api_port,
        "/api/v1/summaries?period=hour&from=2026-11-20&to=2026-11-21",
    );
    assert_eq!(hours["timezone"], "Asia/Shanghai");
    let buckets: Vec<(&str, &Value)> = hours["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["bucket"].as_str().unwrap(), &i["metrics"]))
        .collect();
    assert_eq!(
        buckets,
        vec![
            (
                "2026-11-20T09:00",
                &json!({"loan_failures": 1, "loans": 2, "messages": 3})
            ),
            (
                "2026-11-20T10:00",
                &json!({"longest_session": 30, "messages": 3, "patrons": 2, "session_minutes": 47})
            ),
            ("2026-11-20T11:00", &json!({"loans": 1, "messages": 1})),
        ]
    );
    assert_eq!(hours["items"][0]["start"], "2026-11-20T09:00:00+08:00");
    let days = get_json(
        api_port,
        "/api/v1/summaries?period=day&from=2026-11-20&to=2026-11-21&device=k1",
    );
    assert_eq!(days["items"].as_array().unwrap().len(), 1);
    assert_eq!(days["items"][0]["device"], "k1");
    assert_eq!(
        days["items"][0]["metrics"],
        json!({"loan_failures": 1, "loans": 3, "longest_session": 30, "messages": 7, "patrons": 2, "session_minutes": 47})
    );

    // The cursor: everything once, then nothing while nothing changes.
    let all = get_json(api_port, "/api/v1/summaries?after=0&limit=10000");
    let next = all["next"].as_i64().unwrap();
    assert!(next > 0);
    // 3 hours x 2 scopes + 1 day x 2 scopes; metrics per bucket as above.
    assert_eq!(
        all["items"].as_array().unwrap().len(),
        2 * (3 + 4 + 2) + 2 * 6
    );
    // Small pages end at bucket boundaries: the same items, no bucket split across pages
    // (the day buckets have 6 metrics, more than a page of 5: such a bucket comes alone).
    let bucket_of =
        |i: &serde_json::Value| format!("{}/{}/{}", i["device"], i["period"], i["bucket"]);
    let (mut paged, mut seen_buckets, mut cursor) = (Vec::new(), Vec::<String>::new(), 0);
    loop {
        let page = get_json(
            api_port,
            &format!("/api/v1/summaries?after={cursor}&limit=5"),
        );
        let items = page["items"].as_array().unwrap().clone();
        if items.is_empty() {
            break;
        }
        let mut buckets: Vec<String> = items.iter().map(bucket_of).collect();
        buckets.dedup();
        assert!(items.len() <= 5 || buckets.len() == 1, "{page}");
        for b in buckets {
            assert!(!seen_buckets.contains(&b), "bucket {b} split across pages");
            seen_buckets.push(b);
        }
        paged.extend(items);
        cursor = page["next"].as_i64().unwrap();
    }
    assert_eq!(cursor, next);
    assert_eq!(&paged, all["items"].as_array().unwrap());
    let again = get_json(api_port, &format!("/api/v1/summaries?after={next}"));
    assert_eq!(again["items"], json!([]));
    assert_eq!(again["next"], next);

    // Late data for 09:00: the cursor returns exactly the re-opened buckets (device and
    // branch, hour and day), each whole.
    c.client
        .publish(
            "devices/k1/events",
            QoS::AtLeastOnce,
            false,
            publish("09:30", json!({"event": "loan", "ok": true})),
        )
        .await
        .unwrap();
    assert_eq!(branch.wait_count(stored, 8, Duration::from_secs(10)), 8);
    let late = get_json(api_port, &format!("/api/v1/summaries?after={next}"));
    let mut changed: Vec<String> = late["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{}/{}/{}/{}={}",
                i["device"], i["period"], i["bucket"], i["metric"], i["value"]
            )
        })
        .collect();
    changed.sort();
    assert_eq!(
        changed,
        [
            "\"k1\"/\"day\"/\"2026-11-20\"/\"loan_failures\"=1",
            "\"k1\"/\"day\"/\"2026-11-20\"/\"loans\"=4",
            "\"k1\"/\"day\"/\"2026-11-20\"/\"longest_session\"=30",
            "\"k1\"/\"day\"/\"2026-11-20\"/\"messages\"=8",
            "\"k1\"/\"day\"/\"2026-11-20\"/\"patrons\"=2",
            "\"k1\"/\"day\"/\"2026-11-20\"/\"session_minutes\"=47",
            "\"k1\"/\"hour\"/\"2026-11-20T09:00\"/\"loan_failures\"=1",
            "\"k1\"/\"hour\"/\"2026-11-20T09:00\"/\"loans\"=3",
            "\"k1\"/\"hour\"/\"2026-11-20T09:00\"/\"messages\"=4",
            "null/\"day\"/\"2026-11-20\"/\"loan_failures\"=1",
            "null/\"day\"/\"2026-11-20\"/\"loans\"=4",
            "null/\"day\"/\"2026-11-20\"/\"longest_session\"=30",
            "null/\"day\"/\"2026-11-20\"/\"messages\"=8",
            "null/\"day\"/\"2026-11-20\"/\"patrons\"=2",
            "null/\"day\"/\"2026-11-20\"/\"session_minutes\"=47",
            "null/\"hour\"/\"2026-11-20T09:00\"/\"loan_failures\"=1",
            "null/\"hour\"/\"2026-11-20T09:00\"/\"loans\"=3",
            "null/\"hour\"/\"2026-11-20T09:00\"/\"messages\"=4",
        ]
    );
    assert!(late["next"].as_i64().unwrap() > next);

    // Devices, health, metrics.
    let devices = get_json(api_port, "/api/v1/devices");
    assert_eq!(devices["devices"][0]["id"], "k1");
    assert_eq!(devices["devices"][0]["online"], true);
    assert_eq!(devices["devices"][0]["accepted"], 8);
    let (status, body) = get(api_port, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (health["status"].as_str(), health["upstream"].as_str()),
        (Some("ok"), Some("not configured"))
    );
    let (status, metrics) = get(api_port, "/metrics", Some(TOKEN));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("branch_gateway_messages_total{outcome=\"accepted\"} 8"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE branch_gateway_buffer_bytes gauge"));

    // Errors: JSON, with the right status.
    for (path, token, want) in [
        ("/api/v1/devices", None, 401),
        (
            "/api/v1/summaries?after=0",
            Some("wrong-token-wrong-token"),
            401,
        ),
        ("/metrics", None, 401),
        (
            "/api/v1/summaries?period=week&from=2026-11-20&to=2026-11-21",
            Some(TOKEN),
            400,
        ),
        (
            "/api/v1/summaries?period=hour&from=yesterday&to=2026-11-21",
            Some(TOKEN),
            400,
        ),
        (
            "/api/v1/summaries?period=hour&from=2026-11-21&to=2026-11-20",
            Some(TOKEN),
            400,
        ),
        ("/api/v1/summaries?period=hour", Some(TOKEN), 400),
        ("/api/v1/summaries?after=-1", Some(TOKEN), 400),
        ("/api/v1/summaries?after=0&limit=0", Some(TOKEN), 400),
        ("/api/v1/summaries?after=abc", Some(TOKEN), 400),
        ("/api/v1/summaries?colour=red", Some(TOKEN), 400),
        ("/api/v2/anything", Some(TOKEN), 404),
    ] {
        let (status, body) = get(api_port, path, token);
        assert_eq!(status, want, "{path}: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}"));
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {body}"
        );
    }
    let (ok, _) = gw.terminate();
    assert!(ok.success());
}
