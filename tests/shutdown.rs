//! Stopping the gateway: SIGTERM under load loses nothing it acknowledged and exits 0
//! promptly; SIGKILL leaves a consistent database that the next run continues.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{Event, Packet, QoS};

const DEVICES: usize = 10;

/// Publish `{"n":0..}` as fast as acknowledgements allow until the connection breaks or
/// `stop` is set; return how many were acknowledged (PUBACKs come in publish order).
async fn publish_until_closed(port: u16, id: String, stop: Arc<AtomicBool>) -> usize {
    let mut c = connect(port, &id, &format!("{id}-pw")).await;
    let topic = format!("devices/{id}/telemetry");
    let mut sent = 0usize;
    let mut acked = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        while sent < acked + 50 && !stop.load(Ordering::Relaxed) {
            let body = format!(r#"{{"n":{sent},"device":"{id}"}}"#);
            if c.client
                .try_publish(&topic, QoS::AtLeastOnce, false, body)
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        match tokio::time::timeout_at(deadline, c.events.recv()).await {
            Ok(Some(Ok(Event::Incoming(Packet::PubAck(_))))) => acked += 1,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) | Err(_) => return acked,
        }
        if stop.load(Ordering::Relaxed) && acked == sent {
            return acked;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_keeps_every_acknowledged_message() {
    let devices: Vec<Device> = (0..DEVICES)
        .map(|i| device(&format!("d{i}"), "test-sensor"))
        .collect();
    let branch = Branch::new(&devices);
    let gw = branch.start();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = devices
        .iter()
        .map(|d| {
            tokio::spawn(publish_until_closed(
                branch.port,
                d.id.clone(),
                stop.clone(),
            ))
        })
        .collect();
    // Let traffic flow, then stop the gateway in the middle of it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    let (status, log) = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    assert!(status.success(), "exit 0 on SIGTERM:\n{log}");
    assert!(took < Duration::from_secs(8), "stopped in {took:?}");
    assert!(log.contains("buffer flushed; stopped"), "{log}");

    let mut total_acked = 0;
    for (d, t) in devices.iter().zip(tasks) {
        let acked = t.await.unwrap() as i64;
        total_acked += acked;
        // Every acknowledged message (n = 0..acked) is stored, each exactly once.
        let stored = branch.count(&format!(
            "SELECT COUNT(DISTINCT json_extract(payload, '$.n')) FROM messages
             WHERE device = '{}' AND json_extract(payload, '$.n') < {acked}",
            d.id
        ));
        assert_eq!(
            stored, acked,
            "{}: acknowledged {acked}, stored {stored}",
            d.id
        );
        let dupes = branch.count(&format!(
            "SELECT COUNT(*) - COUNT(DISTINCT json_extract(payload, '$.n')) FROM messages WHERE device = '{}'",
            d.id
        ));
        assert_eq!(dupes, 0);
    }
    assert!(
        total_acked > 1000,
        "the test must stop the gateway under real load ({total_acked})"
    );
    eprintln!("SIGTERM after {total_acked} acknowledged messages; stopped in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leaves_a_consistent_database_and_seq_continues() {
    let branch = Branch::new(&[device("d1", "test-sensor")]);
    let gw = branch.start();
    let mut c = connect(branch.port, "d1", "d1-pw").await;
    for n in 0..500 {
        c.client
            .publish(
                "devices/d1/telemetry",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"n":{n},"device":"d1"}}"#),
            )
            .await
            .unwrap();
    }
    assert_eq!(c.pubacks(500, Duration::from_secs(20)).await, 500);
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages",
            500,
            Duration::from_secs(10)
        ),
        500
    );
    let max_before = branch.count("SELECT MAX(seq) FROM messages");
    drop(c);
    let log = tokio::task::spawn_blocking(move || gw.kill9())
        .await
        .unwrap();
    assert!(
        !log.contains("buffer flushed"),
        "SIGKILL gives no chance to flush"
    );

    // The database opens, is intact, and the next message continues the sequence.
    let gw = branch.start();
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM pragma_integrity_check WHERE integrity_check = 'ok'"),
        1
    );
    assert_eq!(branch.count("SELECT COUNT(*) FROM messages"), 500);
    let mut c = connect(branch.port, "d1", "d1-pw").await;
    c.client
        .publish(
            "devices/d1/telemetry",
            QoS::AtLeastOnce,
            false,
            r#"{"n":500,"device":"d1"}"#,
        )
        .await
        .unwrap();
    assert_eq!(c.pubacks(1, Duration::from_secs(10)).await, 1);
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages",
            501,
            Duration::from_secs(10)
        ),
        501
    );
    assert_eq!(
        branch.count("SELECT MAX(seq) FROM messages"),
        max_before + 1
    );
    let (status, _) = gw.terminate();
    assert!(status.success());
}

/// With a tiny writer queue, a burst from many devices fills it: intake holds the devices'
/// acknowledgements instead of dropping anything, and every message is stored once. The
/// held connections wait on a bounded set of threads (they would take one each otherwise),
/// and the gateway's own tasks keep answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_writer_queue_holds_devices_and_loses_nothing() {
    const DEVICES: usize = 48;
    let devices: Vec<Device> = (0..DEVICES)
        .map(|i| device(&format!("q{i}"), "test-sensor"))
        .collect();
    let api = free_port();
    let branch = Branch::with_extra(
        &devices,
        &format!(
            "queue_capacity = 16\n[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"test-token-0123456789\"\n"
        ),
    );
    let gw = branch.start();
    let threads = move |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .map(|n| n.trim().parse::<usize>().unwrap())
            .unwrap()
    };
    assert_eq!(http_get(api, "/healthz", None).0, 200);
    let idle_threads = threads(gw.pid());
    // Sample the gateway's threads and its health endpoint's answer time through the burst.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, pid) = (done.clone(), gw.pid());
        std::thread::spawn(move || {
            let (mut most_threads, mut slowest) = (0usize, Duration::ZERO);
            while !done.load(Ordering::Relaxed) {
                most_threads = most_threads.max(threads(pid));
                let asked = Instant::now();
                let (code, body) = http_get(api, "/healthz", None);
                assert_eq!(code, 200, "{body}");
                slowest = slowest.max(asked.elapsed());
                std::thread::sleep(Duration::from_millis(20));
            }
            (most_threads, slowest)
        })
    };
    let per_device = 250usize;
    let tasks: Vec<_> = devices
        .iter()
        .map(|d| {
            let (id, port) = (d.id.clone(), branch.port);
            tokio::spawn(async move {
                let mut c = connect(port, &id, &format!("{id}-pw")).await;
                let topic = format!("devices/{id}/telemetry");
                for n in 0..per_device {
                    let body =
                        format!(r#"{{"n":{n},"device":"{id}","pad":"{}"}}"#, "z".repeat(300));
                    c.client
                        .publish(&topic, QoS::AtLeastOnce, false, body)
                        .await
                        .unwrap();
                }
                c.pubacks(per_device, Duration::from_secs(60)).await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), per_device);
    }
    done.store(true, Ordering::Relaxed);
    let (most_threads, slowest) = watcher.join().unwrap();
    let want = (DEVICES * per_device) as i64;
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages",
            want,
            Duration::from_secs(20)
        ),
        want
    );
    assert_eq!(
        branch.count(
            "SELECT COUNT(DISTINCT device || ':' || json_extract(payload, '$.n')) FROM messages"
        ),
        want
    );
    let (status, log) = gw.terminate();
    assert!(status.success());
    assert!(
        log.contains("writer queue full"),
        "the burst must have filled the queue:\n{log}"
    );
    // Held connections share the broker's waiting threads (one each would be 48), plus a
    // few short-lived helpers of the gateway's own runtime.
    let bound = idle_threads + branch_gateway::broker::CONNECTION_WAIT_THREADS + 4;
    assert!(
        most_threads <= bound,
        "{most_threads} threads with {DEVICES} devices held ({idle_threads} idle, bound {bound})"
    );
    assert!(
        slowest < Duration::from_secs(5),
        "/healthz took {slowest:?} while devices were held"
    );
}
