//! Lobby page benchmark: lobby pages following the live stream (`/lobby/events`) while
//! devices publish at a steady total rate, against the real binary.
//!
//! `--rounds` rounds (default 6), each of two halves of `--seconds / --rounds`: (a) the
//! devices alone, (b) the same devices plus `--pages` lobby pages (raw SSE clients, as
//! many as the screens of a big branch), connected for that half only. A gate pass every
//! `--pass-ms` (default 2 s) in both halves is the marker. Interleaving the halves keeps
//! slow drifts of the machine out of the difference. Reported: the gateway's CPU share in
//! each half (user + sys from /proc), the mean difference (what the pages cost) with its
//! round-by-round spread, the same for the `gateway` runtime's threads alone (where the
//! API and the live figures run, away from the devices' runtime and the writer), the update latency (a gate pass committed -> the new visitors figure seen by
//! each page, p50 / p99 / max over every page and pass), the updates each page got, and
//! the gateway's peak RSS.
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

/// The marker: a gate pass (one visitor in) every `--pass-ms` (default 2,000), each
/// committed before the next.
struct Gate {
    stream: TcpStream,
    pass: u64,
    every: Duration,
}

impl Gate {
    /// One pass; returns its visitors total once committed (its PUBACK follows the commit).
    fn pass(&mut self) -> (u64, Instant) {
        self.pass += 1;
        let pkid = (self.pass % 65_535 + 1) as u16;
        self.stream
            .write_all(&mqtt::publish(
                b"devices/gate/telemetry",
                br#"{"delta_in":1,"delta_out":0}"#,
                1,
                pkid,
                None,
            ))
            .unwrap();
        mqtt::read_packet(&mut self.stream, Duration::from_secs(10)).expect("gate PUBACK");
        (self.pass, Instant::now())
    }
}

struct Measured {
    share: f64,
    /// The share of the `gateway` runtime's threads alone (the API, the live figures,
    /// forwarding; the devices' runtime and the writer are elsewhere).
    runtime: f64,
    rate: f64,
    marks: Vec<(u64, Instant)>,
}

/// The gateway's CPU share and the devices' acknowledged rate over `len`, with a gate
/// pass every `gate.every`.
fn measure(pid: u32, sent: &AtomicU64, len: Duration, gate: &mut Gate) -> Measured {
    let rt0 = threads_cpu_ms(pid, "gateway");
    let (cpu0, t0, sent0) = (cpu_ms(pid), Instant::now(), sent.load(Ordering::Relaxed));
    let mut marks = Vec::new();
    while t0.elapsed() < len {
        marks.push(gate.pass());
        let left = len.saturating_sub(t0.elapsed());
        std::thread::sleep(left.min(gate.every));
    }
    let (cpu1, t1, sent1) = (cpu_ms(pid), Instant::now(), sent.load(Ordering::Relaxed));
    let rt1 = threads_cpu_ms(pid, "gateway");
    let ms = (t1 - t0).as_millis() as f64;
    Measured {
        share: (cpu1 - cpu0) as f64 / ms * 100.0,
        runtime: rt1.saturating_sub(rt0) as f64 / ms * 100.0,
        rate: (sent1 - sent0) as f64 / (t1 - t0).as_secs_f64(),
        marks,
    }
}

struct PagesRound {
    measured: Measured,
    latencies: Vec<Duration>,
    missed: usize,
    updates: u64,
}

/// A round with `pages` lobby pages open: they connect, settle for 2 s, are measured for
/// `len`, get 3 s more for the last pass, and hang up.
fn with_pages(
    api: u16,
    pages: usize,
    pid: u32,
    sent: &AtomicU64,
    len: Duration,
    gate: &mut Gate,
) -> PagesRound {
    let stop = Arc::new(AtomicBool::new(false));
    let updates = Arc::new(AtomicU64::new(0));
    let seen: Vec<Seen> = (0..pages).map(|_| Seen::default()).collect();
    let readers: Vec<_> = seen
        .iter()
        .map(|s| {
            let (stop, s, u) = (stop.clone(), s.clone(), updates.clone());
            std::thread::spawn(move || page(api, stop, s, u))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let before = updates.load(Ordering::Relaxed);
    let measured = measure(pid, sent, len, gate);
    let counted = updates.load(Ordering::Relaxed) - before;
    std::thread::sleep(Duration::from_secs(3)); // the last pass reaches the pages
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.join();
    }
    let mut latencies = Vec::new();
    let mut missed = 0;
    for s in &seen {
        let s = s.lock().unwrap();
        for (v, at) in &measured.marks {
            match s.iter().find(|(x, _)| x >= v) {
                Some((_, t)) => latencies.push(t.saturating_duration_since(*at)),
                None => missed += 1,
            }
        }
    }
    PagesRound {
        measured,
        latencies,
        missed,
        updates: counted,
    }
}

fn main() {
    let pages: usize = arg("--pages", 100);
    let devices: usize = arg("--devices", 200);
    let rate: f64 = arg("--rate", 5000.0);
    let seconds: u64 = arg("--seconds", 60);
    let rounds: u64 = arg::<u64>("--rounds", 6).max(1);
    let pass_ms: u64 = arg::<u64>("--pass-ms", 2000).max(100);
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
        "{devices} devices at {rate} msg/s in all; {rounds} rounds of {} s devices only, then {} s with {pages} lobby pages as well; a gate pass every {pass_ms} ms",
        seconds.div_ceil(rounds),
        seconds.div_ceil(rounds)
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
    let mut gate = Gate {
        stream: login(port, "gate"),
        pass: 0,
        every: Duration::from_millis(pass_ms),
    };
    let round_len = Duration::from_secs(seconds.div_ceil(rounds));
    let mut without = Vec::new();
    let mut with = Vec::new();
    let (mut without_rt, mut with_rt) = (Vec::new(), Vec::new());
    let mut latencies = Vec::new();
    let (mut missed, mut updates_total, mut page_seconds) = (0, 0u64, 0.0);
    for r in 0..rounds {
        let m = measure(pid, &sent, round_len, &mut gate);
        println!(
            "round {}a (devices only): {:.0} msg/s, gateway CPU {:.1}% (its gateway runtime {:.2}%)",
            r + 1,
            m.rate,
            m.share,
            m.runtime
        );
        without.push(m.share);
        without_rt.push(m.runtime);
        let b = with_pages(api, pages, pid, &sent, round_len, &mut gate);
        println!(
            "round {}b (+ {pages} pages): {:.0} msg/s, gateway CPU {:.1}% (its gateway runtime {:.2}%)",
            r + 1,
            b.measured.rate,
            b.measured.share,
            b.measured.runtime
        );
        with.push(b.measured.share);
        with_rt.push(b.measured.runtime);
        latencies.extend(b.latencies);
        missed += b.missed;
        updates_total += b.updates;
        page_seconds += pages as f64 * round_len.as_secs_f64();
    }
    stop_devices.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    latencies.sort();
    let rss = vm_hwm_kb(pid) as f64 / 1024.0;
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let status = gw.wait().unwrap();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let diffs: Vec<f64> = with.iter().zip(&without).map(|(b, a)| b - a).collect();
    let (lo, hi) = diffs
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), d| (l.min(*d), h.max(*d)));
    println!(
        "gateway CPU over {rounds} interleaved rounds of {} s: {:.1}% of one core with the devices only, {:.1}% with {pages} pages as well; the pages cost {:+.2}% of one core (round by round {lo:+.1} .. {hi:+.1})",
        round_len.as_secs(),
        mean(&without),
        mean(&with),
        mean(&diffs)
    );
    println!(
        "of which the gateway runtime (API, live figures, forwarding): {:.2}% without the pages, {:.2}% with them; the pages cost {:+.2}% of one core there",
        mean(&without_rt),
        mean(&with_rt),
        mean(&with_rt) - mean(&without_rt)
    );
    println!(
        "updates: {updates_total} in all, {:.2} per page per second; latency gate pass committed -> page: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} (page, pass) pairs, {missed} missed",
        updates_total as f64 / page_seconds.max(1.0),
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
