//! Lobby page benchmark: lobby pages following the live stream (`/lobby/events`) while
//! devices publish at a steady total rate, against the real binary.
//!
//! Phase 1 (`--seconds`): the devices alone. Phase 2 (`--seconds`): the same devices plus
//! `--pages` lobby pages (raw SSE clients, as many as the screens of a big branch). The
//! gateway's CPU share in each phase (user + sys from /proc) and their difference (what
//! the pages cost), the update latency (a gate pass committed -> the new visitors figure
//! seen by each page, p50 / p99 / max over every page and pass), the updates each page
//! got, and the gateway's peak RSS.
//!
//! ```text
//! cargo build --release --locked
//! cargo run --release --locked --example lobby_bench -- --pages 100 --devices 200 --rate 5000 --seconds 60
//! ```
//! Loopback only, free ports, a temp dir; every loop is bounded in count and time.

mod support;
use support::mqtt::{self, Connect};
use support::*;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PROFILE: &str = r#"{"name": "bench-sensor", "description": "load",
  "telemetry": {"max_bytes": 256, "fields": {"n": {"type": "integer"}, "t": {"type": "number", "required": false}}},
  "rollups": [{"metric": "readings", "kind": "telemetry", "op": "count"}]}"#;
const GATE: &str = r#"{"name": "bench-gate", "description": "marker gate",
  "telemetry": {"max_bytes": 256, "fields": {"delta_in": {"type": "integer"}, "delta_out": {"type": "integer"}}},
  "rollups": [{"metric": "visitors_in", "kind": "telemetry", "op": "sum", "field": "delta_in"},
              {"metric": "visitors_out", "kind": "telemetry", "op": "sum", "field": "delta_out"}]}"#;
const TOKEN: &str = "lobby-bench-token-0123456789";

fn login(port: u16, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&mqtt::connect(&Connect {
        v5: false,
        client_id: id,
        login: Some((id, &format!("{id}-pw"))),
        keep_alive: 60,
        clean: true,
        will: None,
        properties: &[],
    }))
    .unwrap();
    let (first, body) = mqtt::read_packet(&mut s, Duration::from_secs(10)).expect("CONNACK");
    assert_eq!((first, body[1]), (0x20, 0), "{id} refused");
    s
}

/// One device: `rate` QoS 1 messages a second until `stop`, each PUBACK waited for.
fn device(port: u16, id: String, rate: f64, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let mut s = login(port, &id);
    let topic = format!("devices/{id}/telemetry");
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut next = Instant::now();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let pkid = (n % 65_535 + 1) as u16;
        let body = format!(r#"{{"n":{n}}}"#);
        if s.write_all(&mqtt::publish(
            topic.as_bytes(),
            body.as_bytes(),
            1,
            pkid,
            None,
        ))
        .is_err()
        {
            return;
        }
        if mqtt::read_packet(&mut s, Duration::from_secs(10)).is_none() {
            return;
        }
        sent.fetch_add(1, Ordering::Relaxed);
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// What one page saw: (visitors figure, when first seen).
type Seen = Arc<Mutex<Vec<(u64, Instant)>>>;

/// One lobby page following the stream until `stop`; counts its updates.
fn page(api: u16, stop: Arc<AtomicBool>, seen: Seen, updates: Arc<AtomicU64>) {
    let mut s = TcpStream::connect(("127.0.0.1", api)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    write!(
        s,
        "GET /lobby/events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut last = 0;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) => continue, // the read timeout: look at `stop`
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        updates.fetch_add(1, Ordering::Relaxed);
        let v: serde_json::Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let visitors: u64 = v["figures"]["visitors_in"]
            .as_str()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        if visitors > last {
            last = visitors;
            seen.lock().unwrap().push((visitors, Instant::now()));
        }
    }
}

fn percentile(sorted: &[Duration], p: usize) -> f64 {
    sorted
        .get(sorted.len().saturating_sub(1) * p / 100)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn main() {
    let pages: usize = arg("--pages", 100);
    let devices: usize = arg("--devices", 200);
    let rate: f64 = arg("--rate", 5000.0);
    let seconds: u64 = arg("--seconds", 60);
    let binary = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/branch-gateway");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
    std::fs::write(dir.path().join("profiles/bench-sensor.json"), PROFILE).unwrap();
    std::fs::write(dir.path().join("profiles/bench-gate.json"), GATE).unwrap();
    let (port, api) = (free_port(), free_port());
    let mut cfg = format!(
        "[gateway]\nbranch_id = \"bench\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"warn\"\n\
         [broker]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = {}\n\
         [storage]\nsynchronous = \"normal\"\n\
         [api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\nmax_connections = {}\n\
         max_connections_per_address = {c}\nmax_live_streams = {c}\n",
        devices + 16,
        2 * (pages + 16),
        c = pages + 16
    );
    cfg.push_str("[[devices]]\nid = \"gate\"\nprofile = \"bench-gate\"\npassword = \"gate-pw\"\n");
    for i in 0..devices {
        cfg.push_str(&format!(
            "[[devices]]\nid = \"d{i:03}\"\nprofile = \"bench-sensor\"\npassword = \"d{i:03}-pw\"\n"
        ));
    }
    std::fs::write(dir.path().join("gateway.toml"), cfg).unwrap();
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let mut gw = Command::new(&binary)
        .args(["run", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    wait_port(port);
    wait_port(api);
    println!(
        "{devices} devices at {rate} msg/s in all; phase 1: devices only, {seconds} s; phase 2: plus {pages} lobby pages, {seconds} s"
    );

    let stop_devices = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..devices)
        .map(|i| {
            let (stop, sent) = (stop_devices.clone(), sent.clone());
            std::thread::spawn(move || {
                device(port, format!("d{i:03}"), rate / devices as f64, stop, sent)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3)); // warm up
    let pid = gw.id();
    let (cpu0, t0, sent0) = (cpu_ms(pid), Instant::now(), sent.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu1, t1, sent1) = (cpu_ms(pid), Instant::now(), sent.load(Ordering::Relaxed));
    let share1 = (cpu1 - cpu0) as f64 / (t1 - t0).as_millis() as f64 * 100.0;
    let rate1 = (sent1 - sent0) as f64 / (t1 - t0).as_secs_f64();

    // Phase 2: the pages, and a gate pass every 2 s as the marker.
    let stop_pages = Arc::new(AtomicBool::new(false));
    let updates = Arc::new(AtomicU64::new(0));
    let seen: Vec<Seen> = (0..pages).map(|_| Seen::default()).collect();
    let readers: Vec<_> = seen
        .iter()
        .map(|s| {
            let (stop, s, u) = (stop_pages.clone(), s.clone(), updates.clone());
            std::thread::spawn(move || page(api, stop, s, u))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let mut gate = login(port, "gate");
    let mut marks: Vec<(u64, Instant)> = Vec::new();
    let (cpu2, t2, sent2) = (cpu_ms(pid), Instant::now(), sent.load(Ordering::Relaxed));
    let mut pass = 0u64;
    while t2.elapsed() < Duration::from_secs(seconds) {
        pass += 1;
        let pkid = (pass % 65_535 + 1) as u16;
        gate.write_all(&mqtt::publish(
            b"devices/gate/telemetry",
            br#"{"delta_in":1,"delta_out":0}"#,
            1,
            pkid,
            None,
        ))
        .unwrap();
        mqtt::read_packet(&mut gate, Duration::from_secs(10)).expect("gate PUBACK");
        marks.push((pass, Instant::now())); // committed: its PUBACK follows the commit
        std::thread::sleep(Duration::from_secs(2));
    }
    let (cpu3, t3, sent3) = (cpu_ms(pid), Instant::now(), sent.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(3)); // the last pass reaches the pages
    stop_pages.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    stop_devices.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let share2 = (cpu3 - cpu2) as f64 / (t3 - t2).as_millis() as f64 * 100.0;
    let rate2 = (sent3 - sent2) as f64 / (t3 - t2).as_secs_f64();
    let mut latencies = Vec::new();
    let mut missed = 0;
    for s in &seen {
        let s = s.lock().unwrap();
        for (v, at) in &marks {
            match s.iter().find(|(x, _)| x >= v) {
                Some((_, t)) => latencies.push(t.saturating_duration_since(*at)),
                None => missed += 1,
            }
        }
    }
    latencies.sort();
    let rss = vm_hwm_kb(pid) as f64 / 1024.0;
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let status = gw.wait().unwrap();
    println!("phase 1 (devices only): {rate1:.0} msg/s acknowledged, gateway CPU {share1:.1}% of one core");
    println!(
        "phase 2 (+ {pages} pages): {rate2:.0} msg/s acknowledged, gateway CPU {share2:.1}% of one core; the pages cost {:+.1}% of one core",
        share2 - share1
    );
    println!(
        "updates: {} in all, {:.1} per page per second; latency gate pass committed -> page: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} (page, pass) pairs, {missed} missed",
        updates.load(Ordering::Relaxed),
        updates.load(Ordering::Relaxed) as f64 / pages.max(1) as f64 / (t3 - t2).as_secs_f64(),
        percentile(&latencies, 50),
        percentile(&latencies, 99),
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        latencies.len(),
    );
    println!("gateway peak RSS {rss:.1} MiB; exit {status}");
    if missed > 0 || !status.success() {
        eprintln!("FAIL: {missed} passes never reached a page, or an unclean exit");
        std::process::exit(1);
    }
}
