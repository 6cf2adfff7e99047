//! Side-by-side: the same device load through branch-gateway and through the setup a branch
//! would otherwise use, a Mosquitto broker on the branch box bridging `devices/#` to the
//! central broker (persistence on, `max_queued_messages 0`). Central is Mosquitto; a consumer
//! on it measures what arrives. Loopback only; every loop is bounded.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example bridge_compare -- --devices 100 --messages 2000 --rate 2000 --seconds 10 --outage 60
//! ```
//! Phases, for each target: (1) every device publishes `--messages` as fast as acknowledged:
//! end-to-end throughput; (2) `--rate` msg/s for `--seconds`: latency publish -> central
//! consumer; (3) `--rate` msg/s while central is stopped (cleanly: it keeps the consumer's
//! session) for `--outage` seconds and restarted: lost, duplicates, seconds to the first
//! message after central's return, drain.

mod support;
use support::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const PROFILE: &str = r#"{"name": "bench-sensor", "description": "benchmark device",
  "telemetry": {"max_bytes": 1024, "fields": {"ts_us": {"type": "integer"}, "n": {"type": "integer"},
    "device": {"type": "string"}, "run": {"type": "string"}, "pad": {"type": "string"}}}}"#;

fn mosquitto(dir: &Path, name: &str, conf: &str, port: u16) -> Child {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf).unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto installed");
    wait_port(port);
    child
}

/// Central keeps sessions across a clean restart (persistence), so the consumer's
/// subscription is in place when central returns: a message central acknowledged is one the
/// consumer receives, and "lost" means the branch side never delivered it. (Without it, a
/// branch that reconnects before the consumer re-subscribes has its messages acknowledged
/// and dropped by central for want of a subscriber.)
fn central_conf(dir: &Path, port: u16) -> String {
    let store = dir.join("central-store");
    std::fs::create_dir_all(&store).unwrap();
    format!(
        "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n\
         persistence true\npersistence_location {}/\n",
        store.display()
    )
}

/// What the central consumer saw: (run, device, n) -> (arrivals, first arrival time), and
/// latencies in microseconds.
#[derive(Default)]
struct Seen {
    first: HashMap<(String, String, u64), (u32, Instant)>,
    latencies: Vec<u64>,
}

async fn consumer(port: u16, seen: Arc<Mutex<Seen>>) -> AsyncClient {
    let mut o = MqttOptions::new(
        format!("compare-consumer-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    o.set_clean_session(false);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(1000);
    let (client, mut el) = AsyncClient::new(o, 100);
    let c2 = client.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c2.subscribe("#", QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let at = Instant::now();
                    let now = now_us();
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                        continue;
                    };
                    // The gateway wraps the payload in its envelope; the bridge passes it as is.
                    let data = if v.get("data").is_some() {
                        &v["data"]
                    } else {
                        &v
                    };
                    let (Some(run), Some(dev), Some(n), Some(ts)) = (
                        data["run"].as_str(),
                        data["device"].as_str(),
                        data["n"].as_u64(),
                        data["ts_us"].as_u64(),
                    ) else {
                        continue;
                    };
                    let mut s = seen.lock().unwrap();
                    let e = s
                        .first
                        .entry((run.to_owned(), dev.to_owned(), n))
                        .or_insert((0, at));
                    e.0 += 1;
                    if e.0 == 1 {
                        s.latencies.push(now.saturating_sub(ts));
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
}

struct Devices {
    clients: Vec<(String, AsyncClient)>,
    acked: Arc<AtomicU64>,
}

async fn connect_devices(port: u16, n: usize, creds: bool) -> Devices {
    let acked = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for d in 0..n {
        let id = format!("d{d}");
        let mut o = MqttOptions::new(format!("dev-{id}-{port}"), "127.0.0.1", port);
        if creds {
            o.set_credentials(&id, "pw");
        }
        o.set_inflight(100);
        o.set_keep_alive(Duration::from_secs(30));
        let (c, mut el) = AsyncClient::new(o, 256);
        let acked = acked.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        clients.push((id, c));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Devices { clients, acked }
}

fn payload(run: &str, dev: &str, n: u64) -> String {
    let head = format!(
        r#"{{"ts_us":{},"n":{n},"device":"{dev}","run":"{run}","pad":""#,
        now_us()
    );
    format!(
        "{head}{}\"}}",
        "x".repeat(200usize.saturating_sub(head.len() + 2))
    )
}

async fn publish(devs: &Devices, run: &str, i: usize, n: u64) {
    let (id, c) = &devs.clients[i];
    let _ = c
        .publish(
            format!("devices/{id}/telemetry"),
            QoS::AtLeastOnce,
            false,
            payload(run, id, n),
        )
        .await;
}

fn count(seen: &Arc<Mutex<Seen>>, run: &str) -> (usize, usize) {
    let s = seen.lock().unwrap();
    let mine = s.first.iter().filter(|((r, _, _), _)| r == run);
    let (mut unique, mut dups) = (0, 0);
    for (_, (k, _)) in mine {
        unique += 1;
        dups += (*k - 1) as usize;
    }
    (unique, dups)
}

async fn wait_for(
    seen: &Arc<Mutex<Seen>>,
    run: &str,
    want: usize,
    limit: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if count(seen, run).0 >= want {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Report {
    throughput: f64,
    /// CPU milliseconds per 1,000 messages in the steady phase: branch side, central, load.
    cpu_per_k: (f64, f64, f64),
    p50_ms: f64,
    p99_ms: f64,
    outage_lost: usize,
    outage_dups: usize,
    back_after_s: f64,
    drain_s: f64,
    rss_mib: f64,
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    label: &str,
    devs: &Devices,
    seen: &Arc<Mutex<Seen>>,
    central: &mut Child,
    central_port: u16,
    dir: &Path,
    pid: u32,
    messages: u64,
    rate: u64,
    seconds: u64,
    outage: u64,
) -> Report {
    let n = devs.clients.len();
    // (1) throughput
    let run = format!("{label}-steady");
    let me = std::process::id();
    let cpu_before = (cpu_ms(pid), cpu_ms(central.id()), cpu_ms(me));
    let acked_before = devs.acked.load(Ordering::Relaxed);
    let start = Instant::now();
    for k in 0..messages {
        for i in 0..n {
            publish(devs, &run, i, k).await;
        }
    }
    let total = n * messages as usize;
    // When the branch side has acknowledged everything (its intake rate).
    let deadline = Instant::now() + Duration::from_secs(300);
    while devs.acked.load(Ordering::Relaxed) - acked_before < total as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let accepted_s = start.elapsed().as_secs_f64();
    let done = wait_for(seen, &run, total, Duration::from_secs(300)).await;
    let throughput = match done {
        Some(t) => total as f64 / t.duration_since(start).as_secs_f64(),
        None => count(seen, &run).0 as f64 / 300.0,
    };
    let per_k = |after: u64, before: u64| (after - before) as f64 * 1000.0 / total as f64;
    let cpu_per_k = (
        per_k(cpu_ms(pid), cpu_before.0),
        per_k(cpu_ms(central.id()), cpu_before.1),
        per_k(cpu_ms(me), cpu_before.2),
    );
    println!(
        "[{label}] steady: {}/{total} arrived, {throughput:.0} msg/s end to end (all acknowledged to devices after {accepted_s:.2} s); CPU ms per 1,000 messages: branch side {:.1}, central {:.1}, load generator and consumer {:.1}",
        count(seen, &run).0, cpu_per_k.0, cpu_per_k.1, cpu_per_k.2
    );
    // (2) latency at a fixed rate
    let run = format!("{label}-rate");
    seen.lock().unwrap().latencies.clear();
    let want = (rate * seconds) as usize;
    paced(devs, &run, rate, want).await;
    wait_for(seen, &run, want, Duration::from_secs(60)).await;
    let mut lat = std::mem::take(&mut seen.lock().unwrap().latencies);
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let (p50_ms, p99_ms) = (pct(0.5), pct(0.99));
    println!(
        "[{label}] {rate} msg/s: p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms ({} samples)",
        lat.len()
    );
    // (3) outage
    let run = format!("{label}-outage");
    let acked_before = devs.acked.load(Ordering::Relaxed);
    let pre = (rate * 5) as usize;
    paced(devs, &run, rate, pre).await;
    // A clean stop: central saves its sessions (and what it queued for the consumer).
    let _ = Command::new("kill")
        .args(["-TERM", &central.id().to_string()])
        .status();
    let _ = central.wait();
    paced_from(devs, &run, rate, pre, pre + (rate * outage) as usize).await;
    let restarted = Instant::now();
    *central = mosquitto(
        dir,
        "central",
        &central_conf(dir, central_port),
        central_port,
    );
    let after = pre + (rate * outage) as usize;
    paced_from(devs, &run, rate, after, after + (rate * 5) as usize).await;
    let sent = after + (rate * 5) as usize;
    let acked = (devs.acked.load(Ordering::Relaxed) - acked_before) as usize;
    wait_for(seen, &run, sent, Duration::from_secs(120)).await;
    let (unique, dups) = count(seen, &run);
    let (back, last) = {
        let s = seen.lock().unwrap();
        let times: Vec<Instant> = s
            .first
            .iter()
            // Only messages sent once central was down: ones sent before may come back
            // from central's own store when it restarts, not from the branch.
            .filter(|((r, _, n), _)| r == &run && *n >= pre as u64)
            .map(|(_, (_, t))| *t)
            .filter(|t| *t > restarted)
            .collect();
        (times.iter().min().copied(), times.iter().max().copied())
    };
    let back_after_s = back
        .map(|b| b.duration_since(restarted).as_secs_f64())
        .unwrap_or(f64::NAN);
    let drain_s = match (back, last) {
        (Some(b), Some(l)) => l.duration_since(b).as_secs_f64(),
        _ => f64::NAN,
    };
    let lost = acked.min(sent).saturating_sub(unique);
    println!(
        "[{label}] outage {outage} s at {rate} msg/s: sent {sent}, acknowledged to devices {acked}, arrived {unique}, lost {lost}, duplicates {dups}; first message {back_after_s:.2} s after central returned; drained in {drain_s:.1} s"
    );
    let rss_mib = vm_hwm_kb(pid) as f64 / 1024.0;
    Report {
        throughput,
        cpu_per_k,
        p50_ms,
        p99_ms,
        outage_lost: lost,
        outage_dups: dups,
        back_after_s,
        drain_s,
        rss_mib,
    }
}

async fn paced(devs: &Devices, run: &str, rate: u64, count: usize) {
    paced_from(devs, run, rate, 0, count).await
}

async fn paced_from(devs: &Devices, run: &str, rate: u64, from: usize, to: usize) {
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut sent, mut ticks) = (from, 0u64);
    while sent < to {
        tick.tick().await;
        ticks += 1;
        let due = from + (ticks * rate / 1000) as usize;
        while sent < due.min(to) {
            publish(devs, run, sent % devs.clients.len(), sent as u64).await;
            sent += 1;
        }
    }
}

#[tokio::main]
async fn main() {
    let devices = arg("--devices", 100) as usize;
    let messages = arg("--messages", 2000);
    let rate = arg("--rate", 2000);
    let seconds = arg("--seconds", 10);
    let outage = arg("--outage", 60);
    // `--only gateway` or `--only bridge` runs one side (for profiling); the table needs both.
    let argv: Vec<String> = std::env::args().collect();
    let only = argv
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| argv.get(i + 1).cloned());
    let run_gateway = only.as_deref() != Some("bridge");
    let run_bridge = only.as_deref() != Some("gateway");
    assert!(devices <= 500 && messages <= 20_000 && seconds <= 120 && outage <= 600);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("branch-gateway-compare-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::create_dir_all(dir.join("bridge")).unwrap();
    std::fs::write(dir.join("profiles/bench-sensor.json"), PROFILE).unwrap();

    let central_port = free_port();
    let mut central = mosquitto(
        &dir,
        "central",
        &central_conf(&dir, central_port),
        central_port,
    );
    let seen = Arc::new(Mutex::new(Seen::default()));
    let _consumer = consumer(central_port, seen.clone()).await;

    // branch-gateway
    let gw_report = if run_gateway {
        let gw_port = free_port();
        let mut cfg = format!(
            "[gateway]\nbranch_id = \"bench\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"error\"\n\
             [broker]\nlisten = \"127.0.0.1:{gw_port}\"\n[upstream]\nurl = \"mqtt://127.0.0.1:{central_port}\"\nclient_id = \"gw-compare\"\ntopic_prefix = \"gw\"\npush_summaries = false\n"
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
        let devs = connect_devices(gw_port, devices, true).await;
        let report = measure(
            "branch-gateway",
            &devs,
            &seen,
            &mut central,
            central_port,
            &dir,
            gw.id(),
            messages,
            rate,
            seconds,
            outage,
        )
        .await;
        drop(devs);
        let _ = Command::new("kill")
            .args(["-TERM", &gw.id().to_string()])
            .status();
        let _ = gw.wait();
        Some(report)
    } else {
        None
    };

    // Mosquitto bridge
    let br_report = if run_bridge {
        let bridge_port = free_port();
        let bridge_conf = format!(
            "user root\nlistener {bridge_port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/bridge/\n\
             autosave_interval 10\nmax_queued_messages 0\nconnection central\naddress 127.0.0.1:{central_port}\ntopic devices/# out 1\ncleansession false\n",
            dir.display()
        );
        let mut bridge = mosquitto(&dir, "bridge", &bridge_conf, bridge_port);
        let devs = connect_devices(bridge_port, devices, false).await;
        let report = measure(
            "mosquitto-bridge",
            &devs,
            &seen,
            &mut central,
            central_port,
            &dir,
            bridge.id(),
            messages,
            rate,
            seconds,
            outage,
        )
        .await;
        let _ = bridge.kill();
        let _ = bridge.wait();
        Some(report)
    } else {
        None
    };
    let _ = central.kill();
    let _ = central.wait();
    let (Some(gw_report), Some(br_report)) = (gw_report, br_report) else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };

    println!("\n| measure | branch-gateway | mosquitto bridge | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| end-to-end throughput, {devices} devices (msg/s) | {:.0} | {:.0} | {:.2}x |",
        gw_report.throughput,
        br_report.throughput,
        gw_report.throughput / br_report.throughput
    );
    println!(
        "| CPU ms per 1,000 messages, branch side (steady) | {:.1} | {:.1} | |",
        gw_report.cpu_per_k.0, br_report.cpu_per_k.0
    );
    println!(
        "| CPU ms per 1,000 messages, central broker (steady) | {:.0} | {:.0} | |",
        gw_report.cpu_per_k.1, br_report.cpu_per_k.1
    );
    println!(
        "| p50 at {rate} msg/s (ms) | {:.2} | {:.2} | |",
        gw_report.p50_ms, br_report.p50_ms
    );
    println!(
        "| p99 at {rate} msg/s (ms) | {:.2} | {:.2} | |",
        gw_report.p99_ms, br_report.p99_ms
    );
    println!(
        "| lost in a {outage} s outage | {} | {} | |",
        gw_report.outage_lost, br_report.outage_lost
    );
    println!(
        "| duplicates in the outage | {} | {} | |",
        gw_report.outage_dups, br_report.outage_dups
    );
    println!(
        "| first message after central returns (s) | {:.2} | {:.2} | |",
        gw_report.back_after_s, br_report.back_after_s
    );
    println!(
        "| drain after central returns (s) | {:.1} | {:.1} | |",
        gw_report.drain_s, br_report.drain_s
    );
    println!(
        "| peak RSS (MiB) | {:.1} | {:.1} | |",
        gw_report.rss_mib, br_report.rss_mib
    );
    let _ = std::fs::remove_dir_all(&dir);
}
