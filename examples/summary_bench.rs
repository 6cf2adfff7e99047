//! Summaries endpoint latency on a year of hourly rollups for 100 devices.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example summary_bench -- --devices 100 --requests 200
//! ```
//! Builds a scratch database (the gateway's own schema, then a year of hourly and daily
//! rollups for every device and the branch: visitors_in, visitors_out, messages), starts
//! the release binary with its HTTP API on loopback, and times typical pulls from a client
//! on the same machine: p50 / p99 / max over `--requests` requests each.

mod support;
use support::*;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-token-0123456789abcdef";
const HOUR: i64 = 3_600_000;

fn get(port: u16, path: &str) -> (u16, usize) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let status = std::str::from_utf8(&raw[9..12]).unwrap().parse().unwrap();
    (status, raw.len())
}

fn main() {
    let devices = arg("--devices", 100) as usize;
    let requests = arg("--requests", 200) as usize;
    assert!(devices <= 1000 && requests <= 10_000);
    let dir = std::env::temp_dir().join(format!(
        "branch-gateway-summary-bench-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(
        dir.join("profiles/bench-gate.json"),
        r#"{"name": "bench-gate", "description": "bench", "telemetry": {"max_bytes": 256, "fields": {"delta_in": {"type": "integer"}}}}"#,
    )
    .unwrap();
    let port = free_port();
    let api_port = free_port();
    let mut cfg = format!(
        "[gateway]\nbranch_id = \"bench\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"warn\"\ntimezone = \"Asia/Shanghai\"\n\
         [broker]\nlisten = \"127.0.0.1:{port}\"\n[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n"
    );
    for d in 0..devices {
        cfg.push_str(&format!(
            "[[devices]]\nid = \"gate-{d:03}\"\nprofile = \"bench-gate\"\npassword = \"pw\"\n"
        ));
    }
    std::fs::write(dir.join("gateway.toml"), cfg).unwrap();

    // The schema: start the gateway once, then stop it.
    let run = |dir: &std::path::Path| {
        Command::new("target/release/branch-gateway")
            .args(["run", "--config"])
            .arg(dir.join("gateway.toml"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cargo build --release first")
    };
    let mut gw = run(&dir);
    wait_port(port);
    let _ = Command::new("kill")
        .args(["-TERM", &gw.id().to_string()])
        .status();
    let _ = gw.wait();

    // A year of rollups: 2026-01-01 to 2027-01-01 Shanghai time (UTC+8, no DST).
    let start = 1_767_196_800_000i64; // 2025-12-31T16:00:00Z
    let t0 = Instant::now();
    let mut db = rusqlite::Connection::open(dir.join("data/branch-gateway.sqlite")).unwrap();
    let tx = db.transaction().unwrap();
    let mut rows = 0u64;
    {
        let mut st = tx
            .prepare(
                "INSERT INTO rollup_buckets (scope, period, bucket_ms, bucket, metrics, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .unwrap();
        let label = |ms: i64, day: bool| {
            let t = jiff::Timestamp::from_millisecond(ms)
                .unwrap()
                .to_zoned(jiff::tz::TimeZone::get("Asia/Shanghai").unwrap());
            if day {
                t.strftime("%Y-%m-%d").to_string()
            } else {
                t.strftime("%Y-%m-%dT%H:00").to_string()
            }
        };
        let scopes: Vec<String> = std::iter::once(String::new())
            .chain((0..devices).map(|d| format!("gate-{d:03}")))
            .collect();
        // Three metrics per bucket, stored the way the gateway stores them.
        let mut insert =
            |scope: &str, period: &str, ms: i64, label: &str, value: f64, samples: i64| {
                rows += 3;
                let metrics = serde_json::json!({
                    "messages": ["count", value, samples, 0],
                    "visitors_in": ["sum", value, samples, 0],
                    "visitors_out": ["sum", value, samples, 0],
                });
                st.execute(rusqlite::params![
                    scope,
                    period,
                    ms,
                    label,
                    metrics.to_string(),
                    rows as i64
                ])
                .unwrap();
            };
        for h in 0..8760i64 {
            let ms = start + h * HOUR;
            let hour = label(ms, false);
            let day = (h % 24 == 0).then(|| label(ms, true));
            for scope in &scopes {
                insert(scope, "hour", ms, &hour, (h % 37) as f64, 60);
                if let Some(day) = &day {
                    insert(scope, "day", ms, day, 400.0, 1440);
                }
            }
        }
    }
    tx.commit().unwrap();
    drop(db);
    println!(
        "{rows} rollup rows ({devices} devices + branch, a year of hours and days) written in {:.1} s; database {:.0} MiB",
        t0.elapsed().as_secs_f64(),
        size_mib(&dir.join("data/branch-gateway.sqlite"))
    );

    let mut gw = run(&dir);
    wait_port(api_port);
    let pulls = [
        (
            "branch, one day by hour",
            "/api/v1/summaries?period=hour&from=2026-11-20&to=2026-11-21".to_owned(),
        ),
        (
            "one device, one month by hour",
            "/api/v1/summaries?period=hour&from=2026-11-01&to=2026-12-01&device=gate-042"
                .to_owned(),
        ),
        (
            "every device, one day by hour",
            "/api/v1/summaries?period=hour&from=2026-11-20&to=2026-11-21&device=*".to_owned(),
        ),
        (
            "branch, the year by day",
            "/api/v1/summaries?period=day&from=2026-01-01&to=2027-01-01".to_owned(),
        ),
        (
            "branch, the year by hour",
            "/api/v1/summaries?period=hour&from=2026-01-01&to=2027-01-01".to_owned(),
        ),
        (
            "cursor page of 1,000 changes",
            format!("/api/v1/summaries?after={}&limit=1000", rows / 2),
        ),
    ];
    println!("\n| pull | response | p50 | p99 | max |\n|---|---|---|---|---|");
    for (name, path) in pulls {
        let mut times = Vec::with_capacity(requests);
        let mut size = 0;
        for _ in 0..requests {
            let t = Instant::now();
            let (status, n) = get(api_port, &path);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200, "{path}");
            size = n;
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
        println!(
            "| {name} | {:.0} KiB | {:.2} ms | {:.2} ms | {:.2} ms |",
            size as f64 / 1024.0,
            pct(0.5),
            pct(0.99),
            times[times.len() - 1]
        );
    }
    let _ = Command::new("kill")
        .args(["-TERM", &gw.id().to_string()])
        .status();
    let _ = gw.wait();
    if std::env::args().any(|a| a == "--keep") {
        println!("database kept: {}", dir.join("data").display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn size_mib(path: &std::path::Path) -> f64 {
    std::fs::metadata(path)
        .map(|m| m.len() as f64 / 1_048_576.0)
        .unwrap_or(0.0)
}
