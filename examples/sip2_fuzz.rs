//! A fuzzer of the SIP2 tap, against the real binary: kiosk connections send SIP2
//! requests generated from the message formats and then mutated (bit flips, cut and
//! overlong fields, wrong checksums, non-ASCII and GB18030 bytes, NULs, lines over the
//! tap's 8 KiB, garbage), split at random points or several in one write; a fuzzing ILS
//! answers every CR with a mutated response the same way, and sometimes hangs up
//! mid-exchange; a kiosk sometimes hangs up too. Meanwhile an MQTT canary device keeps
//! publishing at QoS 1.
//!
//! It fails (exit status 1) if the gateway ends, if any byte of a completed connection
//! differs, is missing or is added on either leg (transparency under garbage), if the
//! canary stops being acknowledged, or if the gateway does not stop cleanly. The inputs
//! of the last connection of every worker are written to `target/sip2-fuzz-crash/`.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example sip2_fuzz -- --seconds 30 [--kiosks 8] [--seed N]
//! ```
//! CI runs it for 30 s (scripts/test). `--binary PATH` fuzzes another build.

mod support;
use support::*;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const D: &str = "20261203    101502";

const CANARY_PROFILE: &str = r#"{"name": "fuzz-sensor", "description": "canary",
  "telemetry": {"max_bytes": 2048, "fields": {"n": {"type": "integer"}, "device": {"type": "string", "required": false}}}}"#;

/// The ILS's side of one connection: (bytes it received, bytes it sent).
type IlsLeg = (Vec<u8>, Vec<u8>);

/// What the ILS saw of each connection, by connection id (the kiosk's login `CN`).
#[derive(Default)]
struct Legs {
    ils: Mutex<HashMap<String, IlsLeg>>,
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    checked: AtomicU64,
    chaos: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    failures: Mutex<Vec<String>>,
}

fn requests(r: &mut StdRng) -> Vec<u8> {
    let patron = format!("2123400000{:04}", r.gen_range(0..10_000));
    let item = format!("{}", r.gen_range(1000..99_999));
    let m = match r.gen_range(0..12) {
        0 => format!("9900302.00AY{}AZ{:04X}", r.gen_range(0..10), r.gen::<u16>()),
        1 => "9900302.00".to_owned(),
        2 => format!("63001{D}          AOBR01|AA{patron}|AD1234|"),
        3 => format!("11YN{D}{D}AOBR01|AA{patron}|AB{item}|AC|AD1234|"),
        4 => format!("11NY{D}{D}AOBR01|AA{patron}|AB{item}|"),
        5 => format!("09N{D}{D}APBR01|AOBR01|AB{item}|AC|"),
        6 => format!("29NY{D}{D}AOBR01|AA{patron}|AB{item}|"),
        7 => format!("35{D}AOBR01|AA{patron}|"),
        8 => format!("23001{D}AOBR01|AA{patron}|AC|AD1234|"),
        9 => format!("17{D}AOBR01|AB{item}|"),
        10 => "9300CNx|COy|CPz|".to_owned(),
        _ => String::new(),
    };
    mutate(r, m.into_bytes())
}

fn responses(r: &mut StdRng) -> Vec<u8> {
    let patron = format!("2123400000{:04}", r.gen_range(0..10_000));
    let item = format!("{}", r.gen_range(1000..99_999));
    let screen = [
        "Item checked out",
        "Item on hold for another patron",
        "\u{501f}\u{4e66}\u{6210}\u{529f}",
        "",
    ][r.gen_range(0..4)];
    let m = match r.gen_range(0..12) {
        0 => "941".to_owned(),
        1 => "940".to_owned(),
        2 => format!(
            "98YYYNYN01000320261203    1015022.00AOBR01|AMBranch|BXYYYYYYYYYYYYYYYY|AY{}AZ{:04X}",
            r.gen_range(0..10),
            r.gen::<u16>()
        ),
        3 => format!(
            "121NNY{D}AOBR01|AA{patron}|AB{item}|AJTitle|AH20261224    235900|CK001|AF{screen}|"
        ),
        4 => format!("120NUN{D}AOBR01|AA{patron}|AB{item}|AJ|AH|AF{screen}|"),
        5 => format!(
            "101YNY{D}AOBR01|AB{item}|AQBR01|CL{}|CV01|AF{screen}|",
            r.gen_range(0..9)
        ),
        6 => format!("301YNY{D}AOBR01|AA{patron}|AB{item}|AJT|AH20261231|"),
        7 => format!("64              001{D}000000000000000000000000AOBR01|AA{patron}|AEWang|BLY|"),
        8 => format!("24              001{D}AOBR01|AA{patron}|AEWang|BLY|"),
        9 => format!("36Y{D}AOBR01|AA{patron}|"),
        10 => format!("18080001{D}AB{item}|AJT|"),
        _ => String::new(),
    };
    mutate(r, m.into_bytes())
}

/// Mutate a message; never a CR inside (the CR ends it, added by the caller).
fn mutate(r: &mut StdRng, mut m: Vec<u8>) -> Vec<u8> {
    for _ in 0..r.gen_range(0..4) {
        match r.gen_range(0..9) {
            0 if !m.is_empty() => {
                let i = r.gen_range(0..m.len());
                m[i] ^= 1 << r.gen_range(0..8);
            }
            1 if !m.is_empty() => m.truncate(r.gen_range(0..m.len())),
            2 => {
                let i = r.gen_range(0..=m.len());
                let n = r.gen_range(1..200);
                m.splice(i..i, std::iter::repeat_n(b'|', n));
            }
            3 => {
                // An overlong field, sometimes over the tap's line bound.
                let n = [40, 300, 9_000, 20_000][r.gen_range(0..4)];
                m.extend(std::iter::repeat_n(b'A' + r.gen_range(0..26u8), n));
            }
            4 => m.extend_from_slice("\u{6d4b}\u{8bd5}".as_bytes()),
            5 => m.extend_from_slice(b"\xc7\xeb\xbb\xb9\xca\xe9"), // GB18030
            6 => {
                let n = r.gen_range(1..64);
                m.extend((0..n).map(|_| r.gen::<u8>()));
            }
            7 => m.push(0),
            _ => m.push(b'\n'),
        }
    }
    for b in &mut m {
        if *b == b'\r' {
            *b = b'X';
        }
    }
    m
}

/// Write `bytes` in 1-4 pieces.
fn write_split(s: &mut TcpStream, r: &mut StdRng, bytes: &[u8]) -> std::io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = if r.gen_bool(0.5) {
            rest.len()
        } else {
            r.gen_range(1..=rest.len())
        };
        s.write_all(&rest[..n])?;
        rest = &rest[n..];
    }
    Ok(())
}

/// The fuzzing ILS: one thread per connection, answering every CR.
fn ils(listener: TcpListener, seed: u64, legs: Arc<Legs>, stop: Arc<AtomicBool>) {
    listener.set_nonblocking(true).unwrap();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok((s, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        n += 1;
        let legs = legs.clone();
        std::thread::spawn(move || ils_connection(s, seed.wrapping_mul(31).wrapping_add(n), legs));
    }
}

fn ils_connection(mut s: TcpStream, seed: u64, legs: Arc<Legs>) {
    let mut r = StdRng::seed_from_u64(seed);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let hang_up_after = r.gen_bool(0.05).then(|| r.gen_range(0..10));
    let (mut got, mut sent) = (Vec::new(), Vec::new());
    let mut id: Option<String> = None;
    let mut buf = vec![0u8; 16 * 1024];
    let mut answered = 0;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        got.extend_from_slice(&buf[..n]);
        if id.is_none() {
            // The kiosk's first line names the connection: "9300CN<id>|".
            if let Some(end) = got.iter().position(|&b| b == b'|') {
                id = Some(String::from_utf8_lossy(&got[6.min(end)..end]).into_owned());
            }
        }
        let crs = got.iter().filter(|&&b| b == b'\r').count();
        if answered < crs && hang_up_after.is_some_and(|h| h < crs) {
            let _ = s.shutdown(Shutdown::Both);
            return; // chaos: the kiosk's side is not checked
        }
        let mut answers = Vec::new();
        while answered < crs {
            answers.extend_from_slice(&responses(&mut r));
            answers.push(b'\r');
            answered += 1;
        }
        sent.extend_from_slice(&answers);
        // Recorded before the answers are written: a kiosk that has them all finds the
        // whole record.
        if let Some(id) = &id {
            legs.ils
                .lock()
                .unwrap()
                .insert(id.clone(), (got.clone(), sent.clone()));
        }
        if write_split(&mut s, &mut r, &answers).is_err() {
            break;
        }
    }
}

/// One kiosk worker: connections one after another until `stop`.
fn kiosk(
    port: u16,
    worker: usize,
    seed: u64,
    legs: Arc<Legs>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    last: Arc<Mutex<Vec<u8>>>,
) {
    let mut r = StdRng::seed_from_u64(seed);
    let mut conn = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // At most 25 connections a second per worker: loopback's ephemeral ports (each
        // connection takes two, then TIME_WAIT) last the whole run.
        std::thread::sleep(Duration::from_millis(40));
        conn += 1;
        let id = format!("fz{worker}-{conn}");
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        counts.connections.fetch_add(1, Ordering::Relaxed);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sent = format!("9300CN{id}|COpw|CPBR01|\r").into_bytes();
        for _ in 0..r.gen_range(0..60) {
            let mut m = requests(&mut r);
            m.push(b'\r');
            sent.extend_from_slice(&m);
        }
        *last.lock().unwrap() = sent.clone();
        let crs = sent.iter().filter(|&&b| b == b'\r').count();
        counts.messages.fetch_add(crs as u64, Ordering::Relaxed);
        counts.bytes.fetch_add(sent.len() as u64, Ordering::Relaxed);
        let hang_up = r.gen_bool(0.05);
        let writer = {
            let mut w = s.try_clone().unwrap();
            let (bytes, seed) = (sent.clone(), r.gen::<u64>());
            std::thread::spawn(move || {
                let mut r = StdRng::seed_from_u64(seed);
                let _ = write_split(&mut w, &mut r, &bytes);
            })
        };
        if hang_up {
            let _ = writer.join();
            counts.chaos.fetch_add(1, Ordering::Relaxed);
            continue; // dropped: the tap sees the kiosk go mid-exchange
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let mut closed = false;
        while got.iter().filter(|&&b| b == b'\r').count() < crs {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = writer.join();
        // The ILS's record of this connection (it writes it after each answer).
        let ils_side = legs.ils.lock().unwrap().remove(&id);
        if closed {
            // The ILS hung up (chaos): nothing to compare.
            counts.chaos.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let fail = |what: String| {
            counts
                .failures
                .lock()
                .unwrap()
                .push(format!("{id}: {what}"))
        };
        match ils_side {
            None => fail("the ILS never saw the connection".into()),
            Some((ils_got, ils_sent)) => {
                if ils_got != sent {
                    fail(format!(
                        "the ILS got {} bytes, the kiosk sent {} (first difference at {:?})",
                        ils_got.len(),
                        sent.len(),
                        first_difference(&ils_got, &sent)
                    ));
                }
                if ils_sent != got {
                    fail(format!(
                        "the kiosk got {} bytes, the ILS sent {} (first difference at {:?})",
                        got.len(),
                        ils_sent.len(),
                        first_difference(&got, &ils_sent)
                    ));
                }
            }
        }
        counts.checked.fetch_add(1, Ordering::Relaxed);
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

fn main() {
    let seconds: u64 = arg("--seconds", 30);
    let kiosks: usize = arg("--kiosks", 8);
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
    let profiles = dir.path().join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    std::fs::write(profiles.join("fuzz-sensor.json"), CANARY_PROFILE).unwrap();
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("device-profiles/self-check-kiosk.json"),
        profiles.join("self-check-kiosk.json"),
    )
    .unwrap();
    let ils_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ils_port = ils_listener.local_addr().unwrap().port();
    let (port, tap) = (free_port(), free_port());
    let cfg = format!(
        "[gateway]\nbranch_id = \"fuzz\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\n\
         [broker]\nlisten = \"127.0.0.1:{port}\"\n\
         [privacy]\nhmac_secret = \"fuzz-branch-secret-0123456789\"\n\
         [[devices]]\nid = \"canary\"\nprofile = \"fuzz-sensor\"\npassword = \"canary-pw\"\n\
         [[devices]]\nid = \"kiosk-01\"\nprofile = \"self-check-kiosk\"\n\
         sip2 = {{ listen = \"127.0.0.1:{tap}\", ils = \"127.0.0.1:{ils_port}\", max_connections = {} }}\n",
        kiosks + 4
    );
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
    wait_port(tap);
    println!(
        "fuzzing the SIP2 tap of {} for {seconds} s with {kiosks} kiosk connections, seed {seed}",
        binary.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let legs = Arc::new(Legs::default());
    let counts = Arc::new(Counts::default());
    {
        let (legs, stop) = (legs.clone(), stop.clone());
        std::thread::spawn(move || ils(ils_listener, seed, legs, stop));
    }
    let canary = support::canary::Canary::start(port);
    let mut lasts = Vec::new();
    let workers: Vec<_> = (0..kiosks)
        .map(|i| {
            let last: Arc<Mutex<Vec<u8>>> = Default::default();
            lasts.push(last.clone());
            let (legs, counts, stop) = (legs.clone(), counts.clone(), stop.clone());
            let seed = seed.wrapping_add(1 + i as u64);
            std::thread::spawn(move || kiosk(tap, i, seed, legs, counts, stop, last))
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
    for w in workers {
        let _ = w.join();
    }
    if died.is_none() {
        died = gw.try_wait().ok().flatten();
    }
    let mut failed: Vec<String> = counts.failures.lock().unwrap().clone();
    if let Some(status) = died {
        failed.push(format!(
            "the gateway ended after {:.1} s ({status})",
            started.elapsed().as_secs_f64()
        ));
    }
    let report = canary.stop_after(1, Duration::from_secs(5));
    let rss_mb = vm_hwm_kb(gw.id()) as f64 / 1024.0;
    if failed.is_empty() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(gw.id() as i32, libc::SIGTERM);
        }
        let status = gw.wait().unwrap();
        if !status.success() {
            failed.push(format!("the gateway did not stop cleanly: {status}"));
        }
    } else {
        let _ = gw.kill();
        let _ = gw.wait();
    }
    let events: i64 = rusqlite::Connection::open(dir.path().join("data/branch-gateway.sqlite"))
        .and_then(|db| {
            db.query_row(
                "SELECT COUNT(*) FROM messages WHERE device = 'kiosk-01'",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(0);
    println!(
        "{} kiosk connections ({} checked byte for byte on both legs, {} hung up by either side), {} messages, {:.1} MiB from kiosks; {events} kiosk messages committed; canary {} acknowledged, {} failures; peak RSS {rss_mb:.1} MiB",
        counts.connections.load(Ordering::Relaxed),
        counts.checked.load(Ordering::Relaxed),
        counts.chaos.load(Ordering::Relaxed),
        counts.messages.load(Ordering::Relaxed),
        counts.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64,
        report.acked.len(),
        report.failures,
    );
    if report.acked.is_empty() || report.failures > 0 {
        failed.push("the canary was not acknowledged throughout".into());
    }
    if counts.checked.load(Ordering::Relaxed) == 0 {
        failed.push("no connection completed".into());
    }
    if !failed.is_empty() {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sip2-fuzz-crash");
        std::fs::create_dir_all(&out).unwrap();
        for (i, l) in lasts.iter().enumerate() {
            std::fs::write(out.join(format!("kiosk-{i}.bin")), &*l.lock().unwrap()).unwrap();
        }
        let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        eprintln!(
            "FAIL (seed {seed}; last inputs in {}):\n{}\nlast log lines:\n{}",
            out.display(),
            failed
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        std::process::exit(1);
    }
}
