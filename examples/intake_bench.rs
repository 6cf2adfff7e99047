//! Intake benchmark: N simulated MQTT devices (rumqttc, QoS 1) against the release binary.
//!
//! Reports messages per second committed to SQLite, publish-to-commit and publish-to-PUBACK
//! latency (p50/p99/max)
//! at a fixed rate, and the gateway's peak RSS (VmHWM). The load generator runs on the same
//! machine and competes for the same cores.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example intake_bench -- --devices 200 --messages 1000 \
//!     --sustained-rate 40000 --rate 5000 --rate-seconds 20
//! cargo run --release --example intake_bench -- --devices 200 --messages 1000 --rollups \
//!     --sustained-rate 40000 --rate 5000 --rate-seconds 5   # with four declared rollups
//! # --no-rollups: `[storage] rollups = false`, no rollups at all (the baseline for their cost)
//! cargo run --release --example intake_bench -- --devices 200 --messages 3000 --gate-counters \
//!     --sustained-rate 0 --rate 0   # [--no-rollups]
//! # --gate-counters: the shipped `device-profiles/gate-counter.json` and its telemetry
//! # (four declared rollups on every message); throughput only, as the profile admits
//! # no timestamp field for the latency phases
//! # --history-days N: the database already holds N days of hourly and daily rollups for
//! # every device (as after N days in service), written before the gateway starts
//! ```
//! Phases: (1) every device publishes `--messages` as fast as acknowledgements allow;
//! (2) `--sustained-rate` msg/s for `--rate-seconds`; (3) `--rate` msg/s for `--rate-seconds`.
//! Commit time is observed from outside: a reader polls the database every millisecond for
//! new rows and takes "now" as their commit time, so latencies are upper bounds.

mod support;
use support::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Args {
    devices: usize,
    messages: usize,
    rate: u64,
    sustained_rate: u64,
    rate_seconds: u64,
    binary: PathBuf,
    synchronous: String,
    /// Give the bench profile four rollups (count, sum, max, distinct) to measure their cost.
    rollups: bool,
    /// `[storage] rollups = false`: no rollups at all, not even the built-in figures.
    no_rollups: bool,
    /// Devices use the shipped gate-counter profile and send its telemetry.
    gate_counters: bool,
    /// Days of rollup history in the database before the run.
    history_days: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        devices: 200,
        messages: 1000,
        rate: 5000,
        sustained_rate: 40_000,
        rate_seconds: 20,
        binary: PathBuf::from("target/release/branch-gateway"),
        synchronous: "full".into(),
        rollups: false,
        no_rollups: false,
        gate_counters: false,
        history_days: 0,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        if argv[i] == "--no-rollups" {
            a.no_rollups = true;
            i += 1;
            continue;
        }
        if argv[i] == "--rollups" {
            a.rollups = true;
            i += 1;
            continue;
        }
        if argv[i] == "--gate-counters" {
            a.gate_counters = true;
            i += 1;
            continue;
        }
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--devices" => a.devices = v.parse().expect("--devices N"),
            "--messages" => a.messages = v.parse().expect("--messages N (per device)"),
            "--rate" => a.rate = v.parse().expect("--rate MSGS_PER_S (latency phase)"),
            "--sustained-rate" => {
                a.sustained_rate = v.parse().expect("--sustained-rate MSGS_PER_S")
            }
            "--rate-seconds" => a.rate_seconds = v.parse().expect("--rate-seconds S"),
            "--binary" => a.binary = PathBuf::from(v),
            "--synchronous" => a.synchronous = v,
            "--history-days" => a.history_days = v.parse().expect("--history-days N (<= 400)"),
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
        i += 2;
    }
    assert!(a.devices > 0 && a.devices <= 2000 && a.messages <= 100_000 && a.rate_seconds <= 300);
    assert!(a.history_days <= 400, "--history-days at most 400");
    assert!(
        !(a.gate_counters && a.rollups),
        "--gate-counters brings the profile's own rollups; leave out --rollups"
    );
    assert!(
        !a.gate_counters || (a.rate == 0 && a.sustained_rate == 0),
        "--gate-counters measures throughput only: add --sustained-rate 0 --rate 0"
    );
    a
}

const PROFILE: &str = r#"{
  "name": "bench-sensor",
  "description": "benchmark device: a timestamp, a counter and padding to ~200 bytes",
  "telemetry": { "max_bytes": 1024, "fields": {
      "ts_us": {"type": "integer", "min": 0},
      "n": {"type": "integer", "min": 0},
      "device": {"type": "string", "max_length": 32},
      "pad": {"type": "string", "max_length": 256}
  }}
}"#;

const ROLLUPS: &str = r#",
  "rollups": [
    {"metric": "readings", "kind": "telemetry", "op": "count"},
    {"metric": "n_total", "kind": "telemetry", "op": "sum", "field": "n"},
    {"metric": "n_max", "kind": "telemetry", "op": "max", "field": "n"},
    {"metric": "active_devices", "kind": "telemetry", "op": "distinct", "field": "device"}
  ]
}"#;

fn payload(device: &str, n: usize) -> String {
    let head = format!(
        r#"{{"ts_us":{},"n":{n},"device":"{device}","pad":""#,
        now_us()
    );
    let pad = 200usize.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// Gate-counter telemetry as the shipped profile declares it (~150 bytes).
fn gate_payload(n: usize) -> String {
    let (delta_in, delta_out) = (n % 7, n % 5);
    format!(
        r#"{{"raw_in":{},"raw_out":{},"bits":32,"delta_in":{delta_in},"delta_out":{delta_out},"interval_s":60,"occupancy_est":{},"link":"ok","crc_errors":0}}"#,
        1_000_000 + n * 3,
        999_000 + n * 2,
        n % 400
    )
}

fn write_setup(dir: &Path, port: u16, args: &Args) -> PathBuf {
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    let profile_name = if args.gate_counters {
        let shipped = Path::new("device-profiles/gate-counter.json");
        let text = std::fs::read_to_string(shipped)
            .unwrap_or_else(|e| panic!("{}: {e} (run from the repository)", shipped.display()));
        std::fs::write(dir.join("profiles/gate-counter.json"), text).unwrap();
        "gate-counter"
    } else {
        let profile = if args.rollups {
            format!("{}{ROLLUPS}", PROFILE.trim_end().trim_end_matches('}'))
        } else {
            PROFILE.to_owned()
        };
        std::fs::write(dir.join("profiles/bench-sensor.json"), profile).unwrap();
        "bench-sensor"
    };
    let mut cfg = format!(
        "[gateway]\nbranch_id = \"bench\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"warn\"\n\
         [broker]\nlisten = \"127.0.0.1:{port}\"\n[storage]\nsynchronous = \"{}\"\nrollups = {}\n",
        args.synchronous, !args.no_rollups
    );
    for d in 0..args.devices {
        cfg.push_str(&format!(
            "[[devices]]\nid = \"bench-{d:04}\"\nprofile = \"{profile_name}\"\npassword = \"pw-{d}\"\n"
        ));
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn start_gateway(binary: &Path, config: &Path, port: u16) -> Child {
    let child = Command::new(binary)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (cargo build --release first)",
                binary.display()
            )
        });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "gateway did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Publish-to-PUBACK latencies (µs), recorded while `on` is set: from the moment the
/// client's event loop wrote the PUBLISH to the moment it read its PUBACK.
#[derive(Default)]
struct AckTimes {
    on: AtomicBool,
    micros: std::sync::Mutex<Vec<u64>>,
}

async fn connect(
    port: u16,
    d: usize,
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    times: Arc<AckTimes>,
) -> AsyncClient {
    let id = format!("bench-{d:04}");
    let mut opts = MqttOptions::new(&id, "127.0.0.1", port);
    opts.set_credentials(&id, format!("pw-{d}"));
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    let (client, mut el) = AsyncClient::new(opts, 128);
    let (ok_tx, ok_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ok_tx = Some(ok_tx);
        let mut sent: std::collections::HashMap<u16, Instant> = Default::default();
        while !stop.load(Ordering::Relaxed) {
            match el.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                    if times.on.load(Ordering::Relaxed) {
                        sent.insert(pkid, Instant::now());
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = ok_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                    if let Some(at) = sent.remove(&ack.pkid) {
                        let us = at.elapsed().as_micros() as u64;
                        times.micros.lock().unwrap().push(us);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    eprintln!("{id}: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(20), ok_rx)
        .await
        .expect("CONNACK in time")
        .unwrap();
    client
}

fn wait_for_rows(db: &Path, want: i64, limit: Duration) -> (i64, Instant) {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        let n: i64 = conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM messages", [], |r| {
                r.get(0)
            })
            .unwrap_or(0);
        if n >= want || Instant::now() > deadline {
            return (n, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Polls for rows after `from_seq` every millisecond; latency = seen - ts_us in the payload.
fn tail_latencies(db: PathBuf, from_seq: i64, want: usize, stop: Arc<AtomicBool>) -> Vec<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut st = conn
        .prepare("SELECT seq, json_extract(payload, '$.ts_us') FROM messages WHERE seq > ?1 ORDER BY seq")
        .unwrap();
    let mut last = from_seq;
    let mut out = Vec::with_capacity(want);
    while out.len() < want && !stop.load(Ordering::Relaxed) {
        let seen = now_us();
        let rows: Vec<(i64, i64)> = st
            .query_map([last], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (seq, ts) in rows {
            last = seq;
            out.push(seen.saturating_sub(ts as u64));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

struct Paced {
    sent: usize,
    send_secs: f64,
    commit_secs: f64,
    latencies: Vec<u64>,
}

/// Publish `rate` messages per second, round-robin over the devices, for `seconds`; a reader
/// thread records each row's publish-to-commit latency.
async fn paced(
    clients: &[AsyncClient],
    db: &Path,
    from_seq: i64,
    rate: u64,
    seconds: u64,
) -> Paced {
    let want = (rate * seconds) as usize;
    let tail_stop = Arc::new(AtomicBool::new(false));
    let tailer = {
        let (db, stop) = (db.to_path_buf(), tail_stop.clone());
        tokio::task::spawn_blocking(move || tail_latencies(db, from_seq, want, stop))
    };
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut sent = 0usize;
    let mut ticks = 0u64;
    while sent < want {
        tick.tick().await;
        ticks += 1;
        let due = ((ticks * rate) / 1000) as usize;
        while sent < due.min(want) {
            let d = sent % clients.len();
            let id = format!("bench-{d:04}");
            clients[d]
                .publish(
                    format!("devices/{id}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    payload(&id, sent),
                )
                .await
                .unwrap();
            sent += 1;
        }
    }
    let send_secs = started.elapsed().as_secs_f64();
    let guard = {
        let stop = tail_stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut latencies = tailer.await.unwrap();
    let commit_secs = started.elapsed().as_secs_f64();
    guard.abort();
    latencies.sort_unstable();
    Paced {
        sent,
        send_secs,
        commit_secs,
        latencies,
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let dir = std::env::temp_dir().join(format!("branch-gateway-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = free_port();
    let config = write_setup(&dir, port, &args);
    let db = dir.join("data/branch-gateway.sqlite");
    if args.history_days > 0 {
        // The schema comes from the gateway itself: start it once and stop it.
        let mut first = start_gateway(&args.binary, &config, port);
        sigterm(first.id());
        first.wait().unwrap();
        write_history(&db, args.devices, args.history_days);
    }
    let mut child = start_gateway(&args.binary, &config, port);
    let pid = child.id();

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let times = Arc::new(AckTimes::default());
    let mut clients = Vec::new();
    for d in 0..args.devices {
        clients.push(connect(port, d, acked.clone(), stop.clone(), times.clone()).await);
    }
    println!(
        "{} devices connected; gateway pid {pid}, RSS so far {} KiB",
        args.devices,
        vm_hwm_kb(pid)
    );

    // Phase 1: every device publishes its messages as fast as the link takes them.
    let total = (args.devices * args.messages) as i64;
    let cpu_before = cpu_ms(pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (d, client) in clients.iter().enumerate() {
        let client = client.clone();
        let n = args.messages;
        let gate = args.gate_counters;
        tasks.push(tokio::spawn(async move {
            let id = format!("bench-{d:04}");
            let topic = format!("devices/{id}/telemetry");
            for i in 0..n {
                let body = if gate {
                    gate_payload(i)
                } else {
                    payload(&id, i)
                };
                client
                    .publish(&topic, QoS::AtLeastOnce, false, body)
                    .await
                    .unwrap();
            }
        }));
    }
    let db2 = db.clone();
    let (committed, done_at) =
        tokio::task::spawn_blocking(move || wait_for_rows(&db2, total, Duration::from_secs(300)))
            .await
            .unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = done_at.duration_since(started).as_secs_f64();
    // CPU per message is steadier than throughput here: the load generator shares the cores.
    let cpu = cpu_ms(pid) - cpu_before;
    println!(
        "throughput: {committed}/{total} messages committed in {secs:.2} s = {:.0} msg/s ({} devices x {} msgs, {}, QoS 1, synchronous={}); gateway CPU {:.2} ms per 1,000 messages",
        committed as f64 / secs,
        args.devices,
        args.messages,
        if args.gate_counters { "gate-counter telemetry ~150 B" } else { "~200 B" },
        args.synchronous,
        cpu as f64 * 1000.0 / committed as f64
    );
    assert_eq!(committed, total, "every message must be committed");

    // Phase 2: sustained load at a fixed rate; phase 3: latency at a moderate rate.
    let mut next_seq = total;
    for (label, rate) in [("sustained", args.sustained_rate), ("latency", args.rate)] {
        if rate == 0 {
            continue;
        }
        times.micros.lock().unwrap().clear();
        times.on.store(true, Ordering::Relaxed);
        let r = paced(&clients, &db, next_seq, rate, args.rate_seconds).await;
        times.on.store(false, Ordering::Relaxed);
        let mut acks = std::mem::take(&mut *times.micros.lock().unwrap());
        acks.sort_unstable();
        next_seq += r.sent as i64;
        println!(
            "{label}: {:.0} msg/s offered for {:.1} s ({} msgs), {}/{} committed, commit rate {:.0} msg/s; publish->commit p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            r.sent as f64 / r.send_secs,
            r.send_secs,
            r.sent,
            r.latencies.len(),
            r.sent,
            r.latencies.len() as f64 / r.commit_secs,
            pct(&r.latencies, 0.50),
            pct(&r.latencies, 0.99),
            pct(&r.latencies, 1.0),
        );
        println!(
            "{label}: publish->PUBACK ({} acks) p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            acks.len(),
            pct(&acks, 0.50),
            pct(&acks, 0.99),
            pct(&acks, 1.0),
        );
        assert_eq!(r.latencies.len(), r.sent, "every message committed");
    }
    println!(
        "gateway peak RSS (VmHWM): {:.1} MiB",
        vm_hwm_kb(pid) as f64 / 1024.0
    );
    stop.store(true, Ordering::Relaxed);
    sigterm(pid);
    let status = child.wait().unwrap();
    println!("gateway exited: {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `days` of hourly and daily buckets for every device and the branch, ending two days
/// before now (clear of the buckets the run writes), each with the five metrics the
/// `--rollups` profile gives, in the gateway's stored form.
fn write_history(db: &Path, devices: usize, days: u64) {
    const HOUR: i64 = 3_600_000;
    let started = Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let end = now - now.rem_euclid(24 * HOUR) - 2 * 24 * HOUR;
    let first = end - days as i64 * 24 * HOUR;
    let mut conn = rusqlite::Connection::open(db).unwrap();
    let tx = conn.transaction().unwrap();
    let mut version = 0i64;
    {
        let mut st = tx
            .prepare(
                "INSERT INTO rollup_buckets (scope, period, bucket_ms, bucket, metrics, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .unwrap();
        let scopes: Vec<String> = std::iter::once(String::new())
            .chain((0..devices).map(|d| format!("bench-{d:04}")))
            .collect();
        let metrics = |n: i64| {
            format!(
                r#"{{"active_devices":["distinct",1.0,{n},0],"messages":["count",{n}.0,{n},0],"n_max":["max",{n}.0,{n},0],"n_total":["sum",{}.0,{n},0],"readings":["count",{n}.0,{n},0]}}"#,
                n * 7
            )
        };
        let mut ms = first;
        while ms < end {
            let day = ms.rem_euclid(24 * HOUR) == 0;
            for scope in &scopes {
                let n = 60 + (ms / HOUR) % 17;
                for (period, label, x) in
                    [("hour", ms.to_string(), n), ("day", ms.to_string(), n * 24)]
                {
                    if period == "day" && !day {
                        continue;
                    }
                    version += 1;
                    st.execute(rusqlite::params![
                        scope,
                        period,
                        ms,
                        label,
                        metrics(x),
                        version
                    ])
                    .unwrap();
                }
            }
            ms += HOUR;
        }
    }
    tx.commit().unwrap();
    println!(
        "history: {version} bucket rows ({days} days x {} scopes) written in {:.1} s",
        devices + 1,
        started.elapsed().as_secs_f64()
    );
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
