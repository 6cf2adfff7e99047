//! Backlog drain benchmark: the central broker is down while devices fill the buffer, then
//! it comes back. Measures how soon the gateway is back on the central broker, how fast the
//! backlog drains (messages per second received by a central consumer), duplicates, and the
//! gateway's peak RSS while holding the backlog.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example drain_bench -- --devices 50 --messages 4000
//! ```
//! Needs `mosquitto` (Debian package) as the central broker. Loopback only.

mod support;
use support::*;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const PROFILE: &str = r#"{"name": "bench-sensor", "description": "benchmark device",
  "telemetry": {"max_bytes": 1024, "fields": {
    "n": {"type": "integer", "min": 0}, "device": {"type": "string"}, "pad": {"type": "string"}}}}"#;

fn committed(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row("SELECT COALESCE(MAX(seq), 0) FROM messages", [], |r| {
                r.get(0)
            })
        })
        .unwrap_or(0)
}

/// Central Mosquitto with persistence, so the consumer's subscription (made before the
/// outage) is in place the moment it restarts, before the gateway reconnects.
fn start_mosquitto(dir: &Path, port: u16) -> Child {
    let conf = dir.join("central.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\nuser root\n\
             persistence true\npersistence_location {}/\n",
            dir.display()
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto installed");
    wait_port(port);
    child
}

#[tokio::main]
async fn main() {
    let devices = arg("--devices", 50);
    let messages = arg("--messages", 4000);
    assert!(devices <= 1000 && messages <= 100_000);
    let total = devices * messages;
    let dir: PathBuf =
        std::env::temp_dir().join(format!("branch-gateway-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(dir.join("profiles/bench-sensor.json"), PROFILE).unwrap();
    let (gw_port, central_port) = (free_port(), free_port());
    // The consumer's durable subscription, made once; then the outage: central stops and its
    // port is held but never answers MQTT.
    let mut central = start_mosquitto(&dir, central_port);
    let consumer_opts = || {
        let mut o = MqttOptions::new("drain-consumer", "127.0.0.1", central_port);
        o.set_clean_session(false);
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_inflight(1000);
        o
    };
    {
        let (client, mut el) = AsyncClient::new(consumer_opts(), 10);
        client.subscribe("bench/#", QoS::AtLeastOnce).await.unwrap();
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = el.poll().await {
                break;
            }
        }
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while el.poll().await.is_ok() {}
        })
        .await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &central.id().to_string()])
        .status();
    let _ = central.wait();
    let holder = std::net::TcpListener::bind(("127.0.0.1", central_port)).unwrap();
    let mut cfg = format!(
        "[gateway]\nbranch_id = \"bench\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"warn\"\n\
         [broker]\nlisten = \"127.0.0.1:{gw_port}\"\n\
         [upstream]\nurl = \"mqtt://127.0.0.1:{central_port}\"\nclient_id = \"gw-bench\"\ntopic_prefix = \"bench\"\npush_summaries = false\n"
    );
    for d in 0..devices {
        cfg.push_str(&format!(
            "[[devices]]\nid = \"d{d}\"\nprofile = \"bench-sensor\"\npassword = \"pw\"\n"
        ));
    }
    std::fs::write(dir.join("gateway.toml"), cfg).unwrap();
    let mut gw = Command::new("target/release/branch-gateway")
        .args(["run", "--config"])
        .arg(dir.join("gateway.toml"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cargo build --release first");
    wait_port(gw_port);

    // Fill the backlog.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for d in 0..devices {
        tasks.push(tokio::spawn(async move {
            let id = format!("d{d}");
            let mut o = MqttOptions::new(&id, "127.0.0.1", gw_port);
            o.set_credentials(&id, "pw");
            o.set_inflight(100);
            let (c, mut el) = AsyncClient::new(o, 128);
            let pub_task = tokio::spawn(async move {
                for n in 0..messages {
                    let body =
                        format!(r#"{{"n":{n},"device":"d{d}","pad":"{}"}}"#, "x".repeat(150));
                    c.publish(
                        format!("devices/d{d}/telemetry"),
                        QoS::AtLeastOnce,
                        false,
                        body,
                    )
                    .await
                    .unwrap();
                }
                c
            });
            let mut acked = 0;
            while acked < messages {
                if let Ok(Event::Incoming(Packet::PubAck(_))) = el.poll().await {
                    acked += 1;
                }
            }
            let _c = pub_task.await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let db = dir.join("data/branch-gateway.sqlite");
    while committed(&db) < total as i64 {
        assert!(started.elapsed() < Duration::from_secs(300));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("backlog: {total} messages from {devices} devices buffered in {:.1} s; gateway RSS so far {:.1} MiB",
        started.elapsed().as_secs_f64(), vm_hwm_kb(gw.id()) as f64 / 1024.0);

    // Central comes back with the consumer's subscription already in place (its backlog goes
    // to bench/backfill/..., live messages to bench/devices/...).
    drop(holder);
    let back = Instant::now();
    central = start_mosquitto(&dir, central_port);
    let (_client, mut el) = AsyncClient::new(consumer_opts(), 100);
    let mut seqs = HashSet::new();
    let (mut first, mut dups) = (None, 0usize);
    let deadline = Instant::now() + Duration::from_secs(300);
    while seqs.len() < total && Instant::now() < deadline {
        if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
            tokio::time::timeout(Duration::from_secs(5), el.poll()).await
        {
            if !p.topic.contains("/devices/") {
                continue; // the gateway's own status and health
            }
            first.get_or_insert_with(Instant::now);
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            if !seqs.insert(v["seq"].as_i64().unwrap()) {
                dups += 1;
            }
        }
    }
    let first = first.expect("messages arrived");
    let drain = first.elapsed().as_secs_f64();
    println!(
        "central back: first forwarded message {:.0} ms after central started; {}/{} delivered in {:.2} s = {:.0} msg/s drain; {dups} duplicates",
        first.duration_since(back).as_secs_f64() * 1000.0,
        seqs.len(),
        total,
        drain,
        seqs.len() as f64 / drain
    );
    println!(
        "gateway peak RSS (VmHWM): {:.1} MiB",
        vm_hwm_kb(gw.id()) as f64 / 1024.0
    );
    let _ = Command::new("kill")
        .args(["-TERM", &gw.id().to_string()])
        .status();
    let _ = gw.wait();
    let _ = central.kill();
    let _ = central.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
