//! A fuzzer of the device-facing protocol, against the real binary: many connections in
//! parallel send MQTT 3.1.1 and 5 packets, generated from the packet formats and then
//! mutated (bit flips, cut lengths, wrong types, server-only packets, garbage), before and
//! after a valid CONNECT, while a canary device keeps publishing at QoS 1. It fails (exit
//! status 1) if the gateway ends, stops answering the canary, or loses a message the canary
//! was acknowledged; the inputs sent last by every connection are written to
//! `target/mqtt-fuzz-crash/` for a rerun.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example mqtt_fuzz -- --seconds 60 [--connections 16] [--seed N]
//! ```
//! CI runs it for 60 s (scripts/test). `--binary PATH` fuzzes another build.

mod support;
use support::mqtt::{self, Connect};
use support::*;

use std::collections::VecDeque;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Valid logins come from 127.0.0.1; wrong ones (and garbage) from here, so the login
/// throttle of one address never locks the fuzzer's own devices out.
const HOSTILE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const DEVICES: &[&str] = &["fz-0", "fz-1", "fz-2", "fz-3"];

const PROFILE: &str = r#"{"name": "fuzz-sensor", "description": "fuzzing",
  "telemetry": {"max_bytes": 2048, "fields": {"n": {"type": "integer"}, "s": {"type": "string", "required": false}, "device": {"type": "string", "required": false}}},
  "events": {"max_bytes": 2048, "type_field": "event", "types": {"e": {"fields": {"n": {"type": "integer"}}}}}}"#;

fn topics(device: &str) -> Vec<Vec<u8>> {
    vec![
        format!("devices/{device}/telemetry").into_bytes(),
        format!("devices/{device}/events").into_bytes(),
        format!("devices/{device}/status").into_bytes(),
        b"devices/other/telemetry".to_vec(),
        b"branch/summary/live".to_vec(),
        b"".to_vec(),
        b"devices/+/x".to_vec(),
        b"#".to_vec(),
        b"\xc3\xa9/x".to_vec(),
        b"\xff\xfe".to_vec(),
        b"devices/fz-0/\0".to_vec(),
        vec![b'a'; 300],
    ]
}

const FILTERS: &[&[u8]] = &[
    b"branch/#",
    b"branch/summary/live",
    b"devices/fz-0/commands/#",
    b"#",
    b"+/+",
    b"branch/a#",
    b"$share/g/branch/#",
    b"$SYS/x",
    b"\xc3\xa9",
    b"",
    b"devices/fz-0/commands/+/x",
];

fn payload(rng: &mut StdRng) -> Vec<u8> {
    match rng.gen_range(0..5) {
        0 => format!(r#"{{"n":{}}}"#, rng.gen::<u32>()).into_bytes(),
        1 => br#"{"n":1,"n":2}"#.to_vec(),
        2 => (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect(),
        3 => br#"{"event":"e","n":3}"#.to_vec(),
        _ => Vec::new(),
    }
}

/// MQTT 5 properties: a few, of any id, well or badly formed.
fn properties(rng: &mut StdRng) -> Vec<u8> {
    let mut p = Vec::new();
    for _ in 0..rng.gen_range(0..4) {
        match rng.gen_range(0..8) {
            0 => p.extend_from_slice(&[0x23, 0, rng.gen_range(0..20)]), // topic alias
            1 => p.extend_from_slice(&[0x01, rng.gen()]),               // payload format
            2 => {
                p.push(0x26); // user property
                mqtt::string(b"k", &mut p);
                mqtt::string(b"v", &mut p);
            }
            3 => p.extend_from_slice(&[0x0b, rng.gen_range(0..3)]), // subscription id
            4 => p.extend_from_slice(&[0x11, 0, 0, 0, rng.gen()]),  // session expiry
            5 => p.extend_from_slice(&[0x21, 0, rng.gen()]),        // receive maximum
            6 => p.extend_from_slice(&[0x18, 0, 0, 0, rng.gen()]),  // will delay
            _ => p.push(rng.gen()),
        }
    }
    p
}

/// One packet of any type a client or a server may send.
fn any_packet(rng: &mut StdRng, v5: bool, device: &str) -> Vec<u8> {
    let pkid = rng.gen_range(0..5u16);
    let props = |rng: &mut StdRng| v5.then(|| properties(rng));
    match rng.gen_range(0..16) {
        0..=4 => {
            let topics = topics(device);
            let topic = &topics[rng.gen_range(0..topics.len())];
            let qos = rng.gen_range(0..3);
            let p = props(rng);
            let mut bytes = mqtt::publish(topic, &payload(rng), qos, pkid, p.as_deref());
            if qos > 0 && rng.gen_bool(0.2) {
                bytes[0] |= 0x08; // DUP
            }
            bytes
        }
        5 => {
            let n = rng.gen_range(0..4);
            let filters: Vec<(&[u8], u8)> = (0..n)
                .map(|_| {
                    (
                        FILTERS[rng.gen_range(0..FILTERS.len())],
                        rng.gen_range(0..4),
                    )
                })
                .collect();
            let p = props(rng);
            mqtt::subscribe(pkid, &filters, p.as_deref())
        }
        6 => {
            let mut body = pkid.to_be_bytes().to_vec();
            if v5 {
                body.push(0);
            }
            for _ in 0..rng.gen_range(0..3) {
                mqtt::string(FILTERS[rng.gen_range(0..FILTERS.len())], &mut body);
            }
            mqtt::packet(0xa2, &body)
        }
        7 => {
            // PUBACK, PUBREC, PUBREL, PUBCOMP with or without a reason.
            let first = [0x40, 0x50, 0x62, 0x70][rng.gen_range(0..4)];
            let mut body = pkid.to_be_bytes().to_vec();
            if v5 && rng.gen_bool(0.5) {
                body.push(rng.gen());
                body.push(0);
            }
            mqtt::packet(first, &body)
        }
        8 => vec![0xc0, 0x00],
        9 => {
            if v5 {
                mqtt::packet(0xe0, &[rng.gen(), 0])
            } else {
                vec![0xe0, 0x00]
            }
        }
        // What only a server sends: CONNACK, SUBACK, UNSUBACK, PINGRESP; and AUTH.
        10 => vec![0x20, 0x02, 0, 0],
        11 => vec![0x20, 0x01, 0x00],
        12 => vec![0x90, 0x03, 0, 1, 0],
        13 => vec![0xb0, 0x03, 0, 1, 0],
        14 => vec![0xd0, 0x00],
        _ => mqtt::packet(0xf0, &[0x00, 0x00]),
    }
}

fn mutate(rng: &mut StdRng, bytes: &mut Vec<u8>) {
    for _ in 0..rng.gen_range(1..4) {
        if bytes.is_empty() {
            bytes.push(rng.gen());
        }
        let at = rng.gen_range(0..bytes.len());
        match rng.gen_range(0..7) {
            0 => bytes[at] ^= 1 << rng.gen_range(0..8),
            1 => bytes[at] = rng.gen(),
            2 => bytes.truncate(at),
            3 => {
                let junk: Vec<u8> = (0..rng.gen_range(1..16)).map(|_| rng.gen()).collect();
                bytes.splice(at..at, junk);
            }
            4 if bytes.len() > 1 => {
                // A remaining length that lies.
                bytes[1] = [0x00, 0x7f, 0xff, 0x80][rng.gen_range(0..4)];
            }
            5 => bytes[0] = (rng.gen_range(0..16u8) << 4) | (bytes[0] & 0x0f),
            _ => {
                let end = (at + rng.gen_range(1..8)).min(bytes.len());
                bytes.drain(at..end);
            }
        }
    }
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    packets: AtomicU64,
    logged_in: AtomicU64,
}

/// What each connection sent last, for the crash report.
type Recent = Arc<Mutex<VecDeque<Vec<u8>>>>;

fn remember(recent: &Recent, bytes: &[u8]) {
    let mut r = recent.lock().unwrap();
    if r.len() >= 16 {
        r.pop_front();
    }
    r.push_back(bytes.to_vec());
}

fn send(s: &mut TcpStream, rng: &mut StdRng, bytes: &[u8]) -> bool {
    if rng.gen_bool(0.2) && bytes.len() > 1 {
        // Split mid-packet.
        let cut = rng.gen_range(1..bytes.len());
        s.write_all(&bytes[..cut]).is_ok() && s.write_all(&bytes[cut..]).is_ok()
    } else {
        s.write_all(bytes).is_ok()
    }
}

/// Read and drop whatever the gateway has sent, without waiting.
fn drain(s: &mut TcpStream) {
    let _ = s.set_nonblocking(true);
    let mut buf = [0u8; 4096];
    while let Ok(n) = std::io::Read::read(s, &mut buf) {
        if n == 0 {
            break;
        }
    }
    let _ = s.set_nonblocking(false);
}

fn worker(port: u16, seed: u64, stop: Arc<AtomicBool>, counts: Arc<Counts>, recent: Recent) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !stop.load(Ordering::Relaxed) {
        let v5 = rng.gen_bool(0.5);
        let device = DEVICES[rng.gen_range(0..DEVICES.len())];
        let password = format!("{device}-pw");
        let scenario = rng.gen_range(0..10);
        let hostile = scenario < 2;
        let Ok(mut s) = mqtt::tcp_from(if hostile { HOSTILE } else { LOCAL }, port) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        let client_id = format!("c{}", rng.gen_range(0..6));
        let props = if v5 { properties(&mut rng) } else { Vec::new() };
        let will_topic = format!("devices/{device}/status");
        let mut first = mqtt::connect(&Connect {
            v5,
            client_id: &client_id,
            login: Some((device, &password)),
            keep_alive: rng.gen_range(0..5),
            clean: rng.gen_bool(0.7),
            will: rng
                .gen_bool(0.3)
                .then_some((will_topic.as_str(), b"offline".as_slice())),
            properties: &props,
        });
        match scenario {
            0 => first = (0..rng.gen_range(1..200)).map(|_| rng.gen()).collect(),
            1 => mutate(&mut rng, &mut first),
            _ => {}
        }
        remember(&recent, &first);
        if !send(&mut s, &mut rng, &first) {
            continue;
        }
        if !hostile {
            match mqtt::read_packet(&mut s, Duration::from_secs(3)) {
                Some((0x20, body)) if body.get(1) == Some(&0) => {
                    counts.logged_in.fetch_add(1, Ordering::Relaxed);
                }
                _ => continue,
            }
        }
        for _ in 0..rng.gen_range(1..40) {
            let mut p = any_packet(&mut rng, v5, device);
            if rng.gen_bool(0.3) {
                mutate(&mut rng, &mut p);
            }
            remember(&recent, &p);
            counts.packets.fetch_add(1, Ordering::Relaxed);
            if !send(&mut s, &mut rng, &p) {
                break;
            }
            if rng.gen_bool(0.2) {
                drain(&mut s);
            }
        }
        match rng.gen_range(0..3) {
            0 => mqtt::reset(s),
            1 => {
                let _ = s.write_all(&[0xe0, 0x00]);
            }
            _ => drop(s),
        }
    }
}

fn main() {
    let seconds: u64 = arg("--seconds", 60);
    let connections: usize = arg("--connections", 16);
    let seed: u64 = arg("--seed", support::now_us());
    let argv: Vec<String> = std::env::args().collect();
    let binary = argv
        .iter()
        .position(|a| a == "--binary")
        .and_then(|i| argv.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/branch-gateway")
        });
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
    std::fs::write(dir.path().join("profiles/fuzz-sensor.json"), PROFILE).unwrap();
    let port = free_port();
    let mut cfg = format!(
        "[gateway]\nbranch_id = \"fuzz\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\n\
         [broker]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    for d in DEVICES.iter().chain(&["canary"]) {
        cfg.push_str(&format!(
            "[[devices]]\nid = \"{d}\"\nprofile = \"fuzz-sensor\"\npassword = \"{d}-pw\"\n"
        ));
    }
    std::fs::write(dir.path().join("gateway.toml"), cfg).unwrap();
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let mut gw = Command::new(&binary)
        .args(["run", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    wait_port(port);
    println!(
        "fuzzing {} for {seconds} s with {connections} connections, seed {seed}",
        binary.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let canary = support::canary::Canary::start(port);
    let mut recents = Vec::new();
    let workers: Vec<_> = (0..connections)
        .map(|i| {
            let recent: Recent = Default::default();
            recents.push(recent.clone());
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || {
                worker(port, seed.wrapping_add(i as u64), stop, counts, recent)
            })
        })
        .collect();

    let started = Instant::now();
    let mut died = None;
    while started.elapsed() < Duration::from_secs(seconds) {
        if let Ok(Some(status)) = gw.try_wait() {
            died = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    if died.is_none() {
        died = gw.try_wait().ok().flatten();
    }
    if let Some(status) = died {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/mqtt-fuzz-crash");
        std::fs::create_dir_all(&out).unwrap();
        for (i, r) in recents.iter().enumerate() {
            let lines: Vec<String> = r.lock().unwrap().iter().map(hex::encode).collect();
            std::fs::write(out.join(format!("connection-{i}.hex")), lines.join("\n")).unwrap();
        }
        let tail = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(20).collect();
        eprintln!(
            "FAIL: the gateway ended after {:.1} s ({status}); seed {seed}; last inputs per connection in {}\nlast log lines:\n{}",
            started.elapsed().as_secs_f64(),
            out.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        std::process::exit(1);
    }
    for w in workers {
        let _ = w.join();
    }
    let report = canary.stop_after(1, Duration::from_secs(5));
    let rss_mb = vm_hwm_kb(gw.id()) as f64 / 1024.0;
    // SIGTERM: every acknowledged canary message must be in the database afterwards.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(gw.id() as i32, libc::SIGTERM);
    }
    let status = gw.wait().unwrap();
    let db = rusqlite::Connection::open(dir.path().join("data/branch-gateway.sqlite")).unwrap();
    let stored: i64 = db
        .query_row(
            "SELECT COUNT(DISTINCT json_extract(payload, '$.n')) FROM messages WHERE device = 'canary'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let p99 = report.percentile(99);
    println!(
        "alive for {seconds} s: {} connections ({} logged in), {} packets; canary {} acknowledged, {} stored, p99 {:.1} ms, {} reconnects; peak RSS {rss_mb:.1} MiB; exit {status}",
        counts.connections.load(Ordering::Relaxed),
        counts.logged_in.load(Ordering::Relaxed),
        counts.packets.load(Ordering::Relaxed),
        report.acked.len(),
        stored,
        p99.as_secs_f64() * 1000.0,
        report.failures,
    );
    let mut failed = Vec::new();
    if !status.success() {
        failed.push(format!("the gateway did not stop cleanly: {status}"));
    }
    if stored < report.acked.len() as i64 {
        failed.push(format!(
            "{} acknowledged canary messages are not stored",
            report.acked.len() as i64 - stored
        ));
    }
    if report.acked.is_empty() {
        failed.push("the canary was never acknowledged".into());
    }
    if report.failures > 0 {
        failed.push("the canary lost its connection or waited over 5 s for a PUBACK".into());
    }
    if !failed.is_empty() {
        eprintln!("FAIL: {}", failed.join("; "));
        std::process::exit(1);
    }
}
