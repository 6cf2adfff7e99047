//! End to end: many devices over MQTT 3.1.1 and MQTT 5 against the real binary; every
//! message lands in SQLite exactly once, intact, in per-device order, and survives a restart.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use rumqttc::QoS;

const V4_DEVICES: usize = 50;
const V5_DEVICES: usize = 5;
const PER_DEVICE: usize = 200;

fn payload(id: &str, n: usize) -> String {
    format!(
        r#"{{"n":{n},"device":"{id}","pad":"{}"}}"#,
        "p".repeat(n % 97)
    )
}

async fn publish_v5(port: u16, id: String, password: String) -> usize {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{mqttbytes::QoS, AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new(format!("v5-{id}"), "127.0.0.1", port);
    o.set_credentials(id.clone(), password);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 500);
    let topic = format!("devices/{id}/telemetry");
    let publisher = tokio::spawn(async move {
        for n in 0..PER_DEVICE {
            client
                .publish(&topic, QoS::AtLeastOnce, false, payload(&id, n))
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked < PER_DEVICE {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => {
                assert_eq!(
                    a.code,
                    rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
                )
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("v5 client: {e}"),
            Err(_) => break,
        }
    }
    let _client = publisher.await.unwrap();
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_once_intact_in_order_and_survives_restart() {
    let mut devices: Vec<Device> = (0..V4_DEVICES)
        .map(|i| device(&format!("v4-{i:02}"), "test-sensor"))
        .collect();
    devices.extend((0..V5_DEVICES).map(|i| device(&format!("v5-{i:02}"), "test-sensor")));
    let branch = Branch::new(&devices);
    let gw = branch.start();
    let port = branch.port;

    let mut tasks = Vec::new();
    for d in devices.iter().filter(|d| d.id.starts_with("v4")) {
        let (id, pw) = (d.id.clone(), d.password.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(port, &id, &pw).await;
            let topic = format!("devices/{id}/telemetry");
            for n in 0..PER_DEVICE {
                c.client
                    .publish(&topic, QoS::AtLeastOnce, false, payload(&id, n))
                    .await
                    .unwrap();
            }
            c.pubacks(PER_DEVICE, Duration::from_secs(60)).await
        }));
    }
    for d in devices.iter().filter(|d| d.id.starts_with("v5")) {
        tasks.push(tokio::spawn(publish_v5(
            port,
            d.id.clone(),
            d.password.clone(),
        )));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), PER_DEVICE, "every publish acknowledged");
    }

    let total = ((V4_DEVICES + V5_DEVICES) * PER_DEVICE) as i64;
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages",
            total,
            Duration::from_secs(20)
        ),
        total
    );

    // Exactly once, intact, and in each device's publish order.
    let db = branch.db();
    let mut st = db
        .prepare("SELECT seq, device, kind, payload FROM messages ORDER BY seq")
        .unwrap();
    let rows: Vec<(i64, String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut next_n: HashMap<String, usize> = HashMap::new();
    let mut last_seq = 0;
    for (seq, dev, kind, body) in &rows {
        assert!(*seq > last_seq, "seq strictly increasing");
        last_seq = *seq;
        assert_eq!(kind, "telemetry");
        let n = next_n.entry(dev.clone()).or_insert(0);
        assert_eq!(body, &payload(dev, *n), "device {dev} message {n}");
        *n += 1;
    }
    assert_eq!(next_n.len(), V4_DEVICES + V5_DEVICES);
    assert!(next_n.values().all(|&n| n == PER_DEVICE));
    assert_eq!(branch.count("SELECT COUNT(*) FROM rejected"), 0);
    assert_eq!(branch.counter("v4-07", "accepted"), PER_DEVICE as i64);
    drop(st);
    drop(db);

    // Restart: the count survives and the sequence continues above the old maximum.
    let (status, log) = gw.terminate();
    assert!(status.success(), "clean exit on SIGTERM:\n{log}");
    let _gw = branch.start();
    assert_eq!(branch.count("SELECT COUNT(*) FROM messages"), total);
    let mut c = connect(port, "v4-00", "v4-00-pw").await;
    c.client
        .publish(
            "devices/v4-00/telemetry",
            QoS::AtLeastOnce,
            false,
            payload("v4-00", 9999),
        )
        .await
        .unwrap();
    assert_eq!(c.pubacks(1, Duration::from_secs(10)).await, 1);
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages",
            total + 1,
            Duration::from_secs(10)
        ),
        total + 1
    );
    let new_seq: i64 = branch.count("SELECT MAX(seq) FROM messages");
    assert_eq!(new_seq, last_seq + 1);
}

/// Committed data reaches the database file while the gateway runs, without a commit
/// doing it: the WAL is checkpointed by a thread of its own. SQLite's automatic checkpoint
/// would wait for the WAL to reach its limit (64 MiB by default), so without that thread
/// the database file stays at its first page or so for a burst this size.
#[tokio::test(flavor = "multi_thread")]
async fn the_wal_is_checkpointed_while_the_gateway_runs() {
    let dev = device("gate-1", "test-sensor");
    let branch = Branch::new(std::slice::from_ref(&dev));
    let gw = branch.start();
    let mut c = connect(branch.port, &dev.id, &dev.password).await;
    let topic = format!("devices/{}/telemetry", dev.id);
    const MESSAGES: usize = 3000;
    let publisher = {
        let client = c.client.clone();
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                let body = payload("gate-1", n);
                client
                    .publish(&topic, QoS::AtLeastOnce, false, body)
                    .await
                    .unwrap();
            }
        })
    };
    let mut acked = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked < MESSAGES {
        match tokio::time::timeout_at(deadline, c.events.recv()).await {
            Ok(Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))))) => acked += 1,
            Ok(Some(Ok(_))) => {}
            other => panic!("after {acked} acknowledgements: {other:?}"),
        }
    }
    publisher.await.unwrap();
    // A PUBACK comes before the commit (the documented SIGKILL window), so wait for the
    // writer to commit everything before measuring.
    let committed = "SELECT COUNT(*) FROM messages WHERE kind = 'telemetry'";
    let n = branch.wait_count(committed, MESSAGES as i64, Duration::from_secs(30));
    assert_eq!(n, MESSAGES as i64, "{}", gw.log());
    // The payloads must be in the database file within a second or two (one checkpoint
    // every 200 ms).
    let payload_bytes =
        branch.count("SELECT SUM(LENGTH(payload)) FROM messages WHERE kind = 'telemetry'") as u64;
    assert!(payload_bytes > 200_000, "{payload_bytes}");
    let file = branch.db_path();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let size = loop {
        let size = std::fs::metadata(&file).unwrap().len();
        if size >= payload_bytes || std::time::Instant::now() > deadline {
            break size;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        size >= payload_bytes,
        "database file {size} bytes for {payload_bytes} bytes of payloads:\n{}",
        gw.log()
    );
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}
