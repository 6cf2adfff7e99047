//! Patron privacy end to end: a kiosk sends a card number and a name in `session_end`; the
//! card number is stored and forwarded only as its keyed hash, the name not at all, and
//! neither planted value appears in clear in the database files, the log, or anything the
//! central broker receives (also for a refused message carrying them).

mod common;

use std::time::Duration;

use common::*;
use rumqttc::QoS;

const CARD: &str = "21234000000777";
const NAME: &str = "Zhang Planted";
const SECRET: &str = "test-branch-secret-4f1c2a9b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patron_identifiers_never_leave_intake_in_clear() {
    let central = Central::start();
    let mut consumer = Consumer::start(central.port, "library/priv").await;
    let extra = format!(
        "{}\n[privacy]\nhmac_secret = \"{SECRET}\"\n",
        upstream_section(central.port, "library/priv")
    );
    let branch = Branch::with_extra(&[device("kiosk-1", "self-check-kiosk")], &extra);
    let gw = branch.start();
    let mut c = connect(branch.port, "kiosk-1", "kiosk-1-pw").await;
    let session = |card: &str| {
        format!(
            r#"{{"event":"session_end","session_ref":"5f0c9a1e-7b2d-4c1e-9f3a-2d8e6b4a7c10","duration_s":74,"checkouts_ok":2,"checkouts_failed":0,"end_reason":"end_session","patron_id":"{card}","patron_name":"{NAME}"}}"#
        )
    };
    // One valid, one refused (card number too long) but still carrying both values.
    for payload in [session(CARD), session(&format!("{CARD}{CARD}{CARD}"))] {
        c.client
            .publish("devices/kiosk-1/events", QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    assert_eq!(c.pubacks(2, Duration::from_secs(10)).await, 2);

    let mut forwarded = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while forwarded.is_empty() {
        match tokio::time::timeout_at(deadline, consumer.rx.recv()).await {
            Ok(Some((topic, payload))) if topic.ends_with("/devices/kiosk-1/events") => {
                forwarded.push(payload)
            }
            Ok(Some(_)) => {}
            _ => panic!("the session never reached central\n{}", gw.log()),
        }
    }
    let v: serde_json::Value = serde_json::from_str(&forwarded[0]).unwrap();
    let hashed = branch_gateway::config::profile::privacy_hash(SECRET.as_bytes(), CARD);
    assert_eq!(
        v["data"]["patron_id"],
        hashed.as_str(),
        "keyed hash, same on every branch restart"
    );
    assert!(v["data"].get("patron_name").is_none());
    // The refused message was published after the valid one: wait for its commit.
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM rejected WHERE device = 'kiosk-1'",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    let (ok, _) = gw.terminate();
    assert!(ok.success());

    // Search every place the values could have gone, byte for byte.
    let mut places: Vec<(String, Vec<u8>)> = vec![("log".into(), gw_log(&branch))];
    for entry in std::fs::read_dir(branch.dir.path().join("data")).unwrap() {
        let path = entry.unwrap().path();
        places.push((path.display().to_string(), std::fs::read(&path).unwrap()));
    }
    places.extend(
        forwarded
            .iter()
            .map(|p| ("upstream".to_owned(), p.clone().into_bytes())),
    );
    while let Ok(Some((_, p))) =
        tokio::time::timeout(Duration::from_millis(300), consumer.rx.recv()).await
    {
        places.push(("upstream".into(), p.into_bytes()));
    }
    for (place, bytes) in &places {
        for planted in [CARD, NAME] {
            assert!(
                !bytes
                    .windows(planted.len())
                    .any(|w| w == planted.as_bytes()),
                "{planted:?} found in clear in {place}"
            );
        }
    }
    assert!(
        places.len() >= 3,
        "database, log and upstream were searched"
    );
}

/// Every log file the gateway wrote in this branch's folder.
fn gw_log(branch: &Branch) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(branch.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            all.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(!all.is_empty(), "the gateway wrote a log");
    all
}
