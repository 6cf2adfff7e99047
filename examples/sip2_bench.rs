//! SIP2 tap benchmark: self-check kiosks talk SIP2 through the gateway's transparent tap
//! to a scripted ILS inside this command, while in the same run a matching set of direct
//! clients talks to the same ILS without the tap, at the same pace. Measures the latency of
//! an exchange (request written -> whole answer read) tapped and direct, p50 / p99 of both,
//! and the latency the tap adds (tapped minus direct, at p50 and p99); the gateway's CPU
//! (user + sys from /proc) per 1,000 tapped exchanges and its peak RSS; whether every
//! tapped answer arrived byte for byte as the ILS wrote it; and the loan and return events
//! committed to SQLite against the successful tapped exchanges.
//!
//! ```text
//! cargo build --release --locked
//! cargo run --release --locked --example sip2_bench -- --kiosks 64 --rate 10 --seconds 30
//! ```
//! Each kiosk (and each direct client) has one connection, sends one SC status (99) to warm
//! up, then alternates checkout (11) and checkin (09) of its own item ids, one request at a
//! time, `--rate` exchanges per second; the clients' schedules are spread evenly over the
//! period, tapped and direct interleaved. One `[[devices]]` entry per kiosk (one listener
//! each). Loopback only, free ports, everything under a temp dir (kept, with the gateway's
//! log, when something failed). Every loop is bounded in count and time.

mod support;
use support::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const D: &str = "20261203    101502";
/// Longest an exchange may take before the client counts an error and stops.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
const LOAN_RETURN: &str = "SELECT COUNT(*), COUNT(DISTINCT device || ' ' || json_extract(payload, '$.event') || ' ' || json_extract(payload, '$.item_barcode')) \
     FROM messages WHERE kind = 'events' AND device LIKE 'kiosk-%' AND json_valid(payload) AND json_extract(payload, '$.event') IN ('loan', 'return')";

/// A variable field's value (after the fixed part), or "".
fn field<'a>(req: &'a str, code: &str) -> &'a str {
    req.split('|')
        .skip(1)
        .find_map(|p| p.strip_prefix(code))
        .unwrap_or("")
}

/// The scripted ILS's answer to a request (deterministic, without the CR).
fn answer(req: &str) -> Option<String> {
    Some(match req.get(..2)? {
        "11" => format!(
            "121NUN{D}AOBR01|AA{}|AB{}|AH20261224|CK001|",
            field(req, "AA"),
            field(req, "AB")
        ),
        "09" => format!("101YNN{D}AOBR01|AB{}|CK001|", field(req, "AB")),
        "99" => format!("98YYYYNN600003{D}2.00AOBR01|"),
        _ => return None,
    })
}

/// Exchange `n` of client `k`: checkout of a fresh item, then its checkin (no CR).
fn request(k: usize, n: u64, tapped: bool) -> String {
    let item = format!("3{}{k:03}{:06}", if tapped { 1 } else { 2 }, n / 2);
    if n % 2 == 0 {
        format!("11YN{D}{D}AOBR01|AA21234{k:09}|AB{item}|AC|")
    } else {
        format!("09N{D}{D}APBR01|AOBR01|AB{item}|AC|")
    }
}

/// The scripted ILS: answers every CR-terminated request by its code, at once, until `until`.
async fn ils(listener: TcpListener, until: Instant) {
    while let Ok(accepted) = tokio::time::timeout_at(until, listener.accept()).await {
        let Ok((mut s, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let (mut line, mut buf) = (Vec::new(), vec![0u8; 16 * 1024]);
            while let Ok(Ok(n)) = tokio::time::timeout_at(until, s.read(&mut buf)).await {
                if n == 0 {
                    return;
                }
                let mut out = Vec::new();
                for &b in &buf[..n] {
                    if b != b'\r' {
                        if line.len() < 64 * 1024 {
                            line.push(b);
                        }
                        continue;
                    }
                    if let Some(a) = answer(&String::from_utf8_lossy(&line)) {
                        out.extend_from_slice(a.as_bytes());
                        out.push(b'\r');
                    }
                    line.clear();
                }
                if !out.is_empty() && s.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Write one request and read up to the answer's CR: the bytes read and how long it took.
async fn exchange(s: &mut TcpStream, req: &str) -> Result<(Vec<u8>, Duration), String> {
    let t0 = Instant::now();
    let deadline = t0 + EXCHANGE_TIMEOUT;
    s.write_all(format!("{req}\r").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    while !got.contains(&b'\r') {
        if got.len() > 64 * 1024 {
            return Err("64 KiB without a CR".into());
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .map_err(|_| format!("no answer within {EXCHANGE_TIMEOUT:?}"))?
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok((got, t0.elapsed()))
}

/// One client's connection, warmed up with an SC status exchange.
async fn connect(port: u16) -> Result<TcpStream, String> {
    let mut s = tokio::time::timeout(EXCHANGE_TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    let req = "9900302.00";
    let (got, _) = exchange(&mut s, req).await?;
    if got != format!("{}\r", answer(req).unwrap()).as_bytes() {
        return Err(format!(
            "warm-up answer {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    Ok(s)
}

#[derive(Default)]
struct Outcome {
    lat_us: Vec<u64>,
    ok: u64,
    mismatches: u64,
    errors: u64,
    problem: Option<String>,
}

/// Shared schedule of the load.
#[derive(Clone, Copy)]
struct Plan {
    start: Instant,
    stop: Instant,
    rate: u64,
    total: u64,
    clients: u64,
}

/// Client `k` (tapped or direct; `slot` spreads its schedule): `plan.total` paced exchanges.
async fn client(mut s: TcpStream, k: usize, tapped: bool, slot: u64, plan: Plan) -> Outcome {
    let mut o = Outcome::default();
    let offset = Duration::from_micros(1_000_000 * slot / (plan.rate * plan.clients));
    for n in 0..plan.total {
        let at = plan.start + offset + Duration::from_micros(1_000_000 * n / plan.rate);
        if at > plan.stop {
            o.problem.get_or_insert_with(|| "out of time".into());
            break;
        }
        tokio::time::sleep_until(at).await;
        let req = request(k, n, tapped);
        match exchange(&mut s, &req).await {
            Ok((got, took)) => {
                o.ok += 1;
                o.lat_us.push(took.as_micros() as u64);
                let want = format!("{}\r", answer(&req).unwrap());
                if got != want.as_bytes() {
                    o.mismatches += 1;
                    o.problem.get_or_insert_with(|| {
                        format!("sent {want:?}, got {:?}", String::from_utf8_lossy(&got))
                    });
                }
            }
            Err(e) => {
                o.errors += 1;
                o.problem.get_or_insert(format!("exchange {n}: {e}"));
                break;
            }
        }
    }
    o
}

/// p50, p99 and max in microseconds (sorts `v`).
fn pcts(v: &mut [u64]) -> (u64, u64, u64) {
    if v.is_empty() {
        return (0, 0, 0);
    }
    v.sort_unstable();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn open(db: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.busy_timeout(Duration::from_secs(5))?;
    Ok(c)
}

/// Rows of a one-column query as text (none if the database cannot be read).
fn strings(db: &Path, sql: &str) -> Vec<String> {
    let rows = |c: rusqlite::Connection| -> rusqlite::Result<Vec<String>> {
        let mut st = c.prepare(sql)?;
        let v = st.query_map([], |r| r.get(0))?.collect();
        v
    };
    open(db).and_then(rows).unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let kiosks: usize = arg("--kiosks", 64);
    let rate: u64 = arg("--rate", 10);
    let seconds: u64 = arg("--seconds", 30);
    assert!((1..=500).contains(&kiosks), "--kiosks 1..=500");
    assert!((1..=200).contains(&rate) && (1..=600).contains(&seconds));
    let total = rate * seconds;
    // Hard stop for the ILS, every client and every wait.
    let until = Instant::now() + Duration::from_secs(seconds + 120);

    let dir = std::env::temp_dir().join(format!("branch-gateway-sip2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::copy(
        "device-profiles/self-check-kiosk.json",
        dir.join("profiles/self-check-kiosk.json"),
    )
    .expect("run from the repository root");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ils_port = listener.local_addr().unwrap().port();
    tokio::spawn(ils(listener, until));

    let listen: Vec<u16> = (0..kiosks).map(|_| free_port()).collect();
    let mut cfg = format!(
        "[gateway]\nbranch_id = \"bench\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"info\"\n\
         [broker]\nlisten = \"127.0.0.1:{}\"\n[privacy]\nhmac_secret = \"sip2-bench-secret-0123456789\"\n",
        free_port()
    );
    for (k, port) in listen.iter().enumerate() {
        cfg.push_str(&format!(
            "[[devices]]\nid = \"kiosk-{k:02}\"\nprofile = \"self-check-kiosk\"\n\
             sip2 = {{ listen = \"127.0.0.1:{port}\", ils = \"127.0.0.1:{ils_port}\" }}\n"
        ));
    }
    std::fs::write(dir.join("gateway.toml"), cfg).unwrap();
    let log = dir.join("gateway.log");
    let launched = Instant::now();
    let mut gw = Command::new("target/release/branch-gateway")
        .args(["run", "--config"])
        .arg(dir.join("gateway.toml"))
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("cargo build --release --locked first, run from the repository root");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    while !read_log().contains("gateway ready") {
        let exited = gw.try_wait().ok().flatten();
        if exited.is_some() || launched.elapsed() > Duration::from_secs(30) {
            let _ = gw.kill();
            let _ = gw.wait();
            panic!(
                "gateway not ready ({exited:?}); kept {}:\n{}",
                dir.display(),
                read_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready_s = launched.elapsed().as_secs_f64();

    // Connect and warm up every client: kiosk k through its listener, direct k to the ILS.
    let mut conns = Vec::new();
    for (k, &listen) in listen.iter().enumerate() {
        for tapped in [true, false] {
            let port = if tapped { listen } else { ils_port };
            conns.push((k, tapped, tokio::spawn(connect(port))));
        }
    }
    let mut streams = Vec::new();
    let mut setup_errors = Vec::new();
    for (k, tapped, h) in conns {
        match h.await.unwrap() {
            Ok(s) => streams.push((k, tapped, s)),
            Err(e) => setup_errors.push(format!(
                "{} {k}: {e}",
                if tapped { "kiosk" } else { "direct" }
            )),
        }
    }

    // The load, with the gateway's CPU around it.
    let plan = Plan {
        start: Instant::now() + Duration::from_millis(200),
        stop: until - Duration::from_secs(60),
        rate,
        total,
        clients: 2 * kiosks as u64,
    };
    let (gw_cpu0, own_cpu0) = (cpu_ms(gw.id()), cpu_ms(std::process::id()));
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|(k, tapped, s)| {
            let slot = 2 * k as u64 + u64::from(!tapped);
            (tapped, tokio::spawn(client(s, k, tapped, slot, plan)))
        })
        .collect();
    let (mut tap, mut direct) = (Outcome::default(), Outcome::default());
    for (tapped, t) in tasks {
        let o = t.await.unwrap();
        let sum = if tapped { &mut tap } else { &mut direct };
        sum.lat_us.extend(o.lat_us);
        sum.ok += o.ok;
        sum.mismatches += o.mismatches;
        sum.errors += o.errors;
        if sum.problem.is_none() {
            sum.problem = o.problem;
        }
    }
    let load_s = plan.start.elapsed().as_secs_f64();
    let (gw_cpu, own_cpu) = (
        cpu_ms(gw.id()) - gw_cpu0,
        cpu_ms(std::process::id()) - own_cpu0,
    );
    let rss_mib = vm_hwm_kb(gw.id()) as f64 / 1024.0;

    // Events: every successful tapped exchange is a loan or a return row (bounded wait).
    let db = dir.join("data/branch-gateway.sqlite");
    let waited = Instant::now();
    let counts = || {
        let row =
            |c: rusqlite::Connection| c.query_row(LOAN_RETURN, [], |r| Ok((r.get(0)?, r.get(1)?)));
        open(&db).and_then(row).unwrap_or((0i64, 0i64))
    };
    let mut committed = counts();
    while committed.0 < tap.ok as i64 && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        committed = counts();
    }
    let wait_s = waited.elapsed().as_secs_f64();

    // Stop the gateway (intake drains), then read what it rejected and counted.
    let _ = Command::new("kill")
        .args(["-TERM", &gw.id().to_string()])
        .status();
    let stopping = Instant::now();
    while gw.try_wait().ok().flatten().is_none() && stopping.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = gw.try_wait().ok().flatten();
    if status.is_none() {
        println!("gateway did not stop within 15 s of SIGTERM; killed");
        let _ = gw.kill();
        let _ = gw.wait();
    }
    let rejected = strings(&db, "SELECT kind || ' ' || reason || ' (' || detail || ') x' || COUNT(*) FROM rejected WHERE device LIKE 'kiosk-%' GROUP BY kind, reason, detail");
    let counters = strings(&db, "SELECT counter || ' ' || SUM(value) FROM device_counters WHERE device LIKE 'kiosk-%' GROUP BY counter ORDER BY counter");

    let (tp50, tp99, tmax) = pcts(&mut tap.lat_us);
    let (dp50, dp99, dmax) = pcts(&mut direct.lat_us);
    let expected = kiosks as u64 * total;
    let per_k = gw_cpu as f64 / (tap.ok.max(1) as f64 / 1000.0);
    let diff = |a: u64, b: u64| (a as f64 - b as f64) / 1000.0;
    for l in [
        format!("setup: {kiosks} self-check kiosks through the tap (one listener each) + {kiosks} direct clients, scripted ILS on 127.0.0.1:{ils_port}; gateway ready {ready_s:.2} s after start; setup errors {}", setup_errors.len()),
        format!("load: {rate} exchanges/s per client for {seconds} s, checkout/checkin alternating, tapped and direct in the same run (load phase {load_s:.2} s)"),
        format!("tapped exchanges: {} of {expected} answered ({:.0}/s), errors {}, answers not byte-identical to the ILS's {}", tap.ok, tap.ok as f64 / load_s, tap.errors, tap.mismatches),
        format!("direct exchanges: {} of {expected} answered ({:.0}/s), errors {}, answers not as expected {}", direct.ok, direct.ok as f64 / load_s, direct.errors, direct.mismatches),
        format!("latency through the tap: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms", ms(tp50), ms(tp99), ms(tmax)),
        format!("latency direct:          p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms", ms(dp50), ms(dp99), ms(dmax)),
        format!("added latency (tap - direct): p50 {:+.3} ms, p99 {:+.3} ms", diff(tp50, dp50), diff(tp99, dp99)),
        format!("gateway CPU during the load: {:.2} s ({:.1}% of one core) = {per_k:.0} ms per 1,000 tapped exchanges; peak RSS {rss_mib:.1} MiB", gw_cpu as f64 / 1000.0, gw_cpu as f64 / 10.0 / load_s),
        format!("bench process CPU (clients + ILS) during the load: {:.2} s", own_cpu as f64 / 1000.0),
        format!("events committed: {} loan + return rows of {} expected ({} distinct; after {wait_s:.2} s wait, limit 10 s)", committed.0, tap.ok, committed.1),
        format!("rejected messages of the kiosks: {}", if rejected.is_empty() { "none".into() } else { rejected.join(", ") }),
        format!("kiosk counters: {}", if counters.is_empty() { "none".into() } else { counters.join(", ") }),
    ] {
        println!("{l}");
    }
    for p in setup_errors
        .iter()
        .take(5)
        .chain(tap.problem.iter())
        .chain(direct.problem.iter())
    {
        println!("  first problem: {p}");
    }

    let text = read_log();
    let bad: Vec<&str> = text
        .lines()
        .filter(|l| matches!(l.split_whitespace().nth(1), Some("WARN" | "ERROR")))
        .collect();
    println!(
        "gateway log: {} lines, {} at warn or error; exit {status:?}",
        text.lines().count(),
        bad.len()
    );
    for l in bad.iter().take(10) {
        println!("  {}", l.chars().take(300).collect::<String>());
    }
    let failures: Vec<&str> = [
        (!setup_errors.is_empty(), "setup errors"),
        (tap.errors + direct.errors > 0, "exchange errors"),
        (tap.mismatches + direct.mismatches > 0, "answers changed"),
        (tap.ok < expected, "exchanges missing"),
        (
            committed.0 != tap.ok as i64,
            "loan/return rows missing or extra",
        ),
        (committed.1 != committed.0, "duplicate loan/return rows"),
        (!rejected.is_empty(), "messages rejected"),
        (!bad.is_empty(), "warnings in the gateway log"),
        (!status.is_some_and(|s| s.success()), "gateway exit"),
    ]
    .into_iter()
    .filter_map(|(bad, what)| bad.then_some(what))
    .collect();
    if !failures.is_empty() {
        println!(
            "result: FAILED ({}); kept {} (config, database, gateway.log)",
            failures.join(", "),
            dir.display()
        );
        std::process::exit(1);
    }
    println!("result: ok");
    let _ = std::fs::remove_dir_all(&dir);
}
