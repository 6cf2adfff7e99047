//! One client trying to exhaust what all devices share (issue 13, items 3-6), each attack
//! for `--seconds` against the release binary at default settings, with a canary device
//! publishing at QoS 1 every 20 ms throughout. For each attack it prints: whether the
//! gateway stayed up, the canary's publish-to-PUBACK p50 and p99 (and whether every message
//! it was acknowledged is stored), the gateway's RSS at its peak and 5 s after the attack,
//! the gateway's CPU seconds during the attack, and the attack's own figures.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example attack_bench -- [--seconds 30] [--only logins|subscriptions|connections|disk]
//! ```
//! - `logins`: 32 connections retry wrong passwords for an argon2-hashed device; meanwhile
//!   that device logs in (remembered) every 200 ms and a never-seen argon2 device every 2 s.
//! - `subscriptions`: one device's 8 connections subscribe to ever new `branch/...`
//!   filters (100,000 within the first seconds), 100 to a SUBSCRIBE, reconnecting when
//!   refused, for the whole run.
//! - `connections`: one device opens 1,028 authenticated connections, 1,000 HTTP clients
//!   send their request head one byte a second, 300 TCP connections never send a CONNECT;
//!   meanwhile another device connects every 200 ms and `/healthz` is read every 200 ms.
//! - `disk`: one device publishes 1 KB QoS 1 messages as fast as acknowledgements allow,
//!   central is down, the disk cap is 64 MiB (the only setting changed, so the cap is
//!   reached within the run).
//!
//! Attackers connect from 127.0.0.2-127.0.0.4 (loopback), the canary and the legitimate
//! clients from 127.0.0.1.

mod support;
use support::canary::Canary;
use support::mqtt::{self, Connect};
use support::*;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const SLOW_HTTP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const IDLE_TCP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const TOKEN: &str = "attack-bench-token-0123456789";

const PROFILE: &str = r#"{"name": "bench-sensor", "description": "attack benchmark",
  "telemetry": {"max_bytes": 2048, "fields": {"n": {"type": "integer"},
    "device": {"type": "string", "required": false}, "pad": {"type": "string", "required": false}}}}"#;

struct Gateway {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    api_port: u16,
}

impl Gateway {
    fn start(binary: &PathBuf, extra_storage: &str, upstream_port: Option<u16>) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
        std::fs::write(dir.path().join("profiles/bench-sensor.json"), PROFILE).unwrap();
        let (port, api_port) = (free_port(), free_port());
        let mut cfg = format!(
            "[gateway]\nbranch_id = \"attack\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\n\
             [broker]\nlisten = \"127.0.0.1:{port}\"\n[storage]\n{extra_storage}\n\
             [api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n"
        );
        if let Some(up) = upstream_port {
            cfg.push_str(&format!(
                "[upstream]\nurl = \"mqtt://127.0.0.1:{up}\"\nclient_id = \"attack\"\ntopic_prefix = \"library/attack\"\n"
            ));
        }
        let hashed = branch_gateway::config::Password::hash("kiosk-secret");
        let mut add = |id: &str, password: &str| {
            cfg.push_str(&format!(
                "[[devices]]\nid = \"{id}\"\nprofile = \"bench-sensor\"\npassword = \"{password}\"\n"
            ));
        };
        add("canary", "canary-pw");
        add("kiosk", &hashed);
        for i in 0..32 {
            add(&format!("fresh-{i}"), &hashed);
        }
        for id in ["flood", "subs", "other"] {
            add(id, &format!("{id}-pw"));
        }
        std::fs::write(dir.path().join("gateway.toml"), cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let child = Command::new(binary)
            .args(["run", "--config"])
            .arg(dir.path().join("gateway.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        wait_port(port);
        wait_port(api_port);
        Gateway {
            child,
            dir,
            port,
            api_port,
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn rss_kb(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn db(&self) -> rusqlite::Connection {
        let c =
            rusqlite::Connection::open(self.dir.path().join("data/branch-gateway.sqlite")).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    fn counter(&self, device: &str, name: &str) -> i64 {
        self.db()
            .query_row(
                "SELECT COALESCE((SELECT value FROM device_counters WHERE device = ?1 AND counter = ?2), 0)",
                [device, name],
                |r| r.get(0),
            )
            .unwrap_or(0)
    }

    fn stop(mut self) -> bool {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

fn login(client_id: &str, user: &str, pass: &str) -> Vec<u8> {
    mqtt::connect(&Connect {
        v5: false,
        client_id,
        login: Some((user, pass)),
        keep_alive: 60,
        clean: true,
        will: None,
        properties: &[],
    })
}

/// Log in from 127.0.0.1; returns the time to a successful CONNACK, or `None`.
fn timed_login(port: u16, client_id: &str, user: &str, pass: &str) -> Option<Duration> {
    let started = Instant::now();
    let mut s = mqtt::tcp_from(LOCAL, port).ok()?;
    s.write_all(&login(client_id, user, pass)).ok()?;
    match mqtt::read_packet(&mut s, Duration::from_secs(10)) {
        Some((0x20, ack)) if ack == [0, 0] => Some(started.elapsed()),
        _ => None,
    }
}

fn max_ms(v: &[Duration]) -> f64 {
    v.iter().max().copied().unwrap_or_default().as_secs_f64() * 1000.0
}

fn p50_ms(v: &[Duration]) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2)
        .copied()
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// Failed logins against an argon2 device (item 3).
fn logins(gw: &Gateway, seconds: u64, stop: &Arc<AtomicBool>) -> String {
    let port = gw.port;
    assert!(timed_login(port, "app", "kiosk", "kiosk-secret").is_some());
    let attempts = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..32)
        .map(|i| {
            let (stop, attempts) = (stop.clone(), attempts.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = mqtt::tcp_from(ATTACKER, port) else {
                        continue;
                    };
                    let n = attempts.fetch_add(1, Ordering::Relaxed);
                    let _ = s.write_all(&login("evil", "kiosk", &format!("guess-{i}-{n}")));
                    let _ = mqtt::read_packet(&mut s, Duration::from_secs(10));
                }
            })
        })
        .collect();
    let (mut remembered, mut fresh, mut failed) = (Vec::new(), Vec::new(), 0);
    let started = Instant::now();
    let mut next_fresh = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        match timed_login(port, "app", "kiosk", "kiosk-secret") {
            Some(t) => remembered.push(t),
            None => failed += 1,
        }
        if started.elapsed() >= Duration::from_secs(2 * next_fresh as u64) && next_fresh < 32 {
            match timed_login(port, "app", &format!("fresh-{next_fresh}"), "kiosk-secret") {
                Some(t) => fresh.push(t),
                None => failed += 1,
            }
            next_fresh += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.join();
    }
    format!(
        "{} wrong passwords tried, {} checked, {} throttled; remembered logins p50 {:.1} ms max {:.1} ms ({}), first logins of argon2 devices max {:.1} ms ({}), {} legitimate logins failed",
        attempts.load(Ordering::Relaxed),
        gw.counter("kiosk", "connect_bad_password"),
        gw.counter("kiosk", "connect_throttled") + gw.counter("", "connect_throttled"),
        p50_ms(&remembered),
        max_ms(&remembered),
        remembered.len(),
        max_ms(&fresh),
        fresh.len(),
        failed
    )
}

/// 100,000 subscription filters from one device (item 4).
fn subscriptions(gw: &Gateway, seconds: u64, stop: &Arc<AtomicBool>) -> String {
    let port = gw.port;
    let next = Arc::new(AtomicU64::new(0));
    let granted = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let (stop, next, granted) = (stop.clone(), next.clone(), granted.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = mqtt::tcp_from(ATTACKER, port) else {
                        continue;
                    };
                    let _ = s.write_all(&login(&format!("w{w}"), "subs", "subs-pw"));
                    if mqtt::read_packet(&mut s, Duration::from_secs(5)) != Some((0x20, vec![0, 0]))
                    {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    for pkid in 1..=u16::MAX {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let first = next.fetch_add(100, Ordering::Relaxed);
                        let names: Vec<String> = (first..first + 100)
                            .map(|i| format!("branch/x/{i}"))
                            .collect();
                        let filters: Vec<(&[u8], u8)> =
                            names.iter().map(|f| (f.as_bytes(), 1)).collect();
                        if s.write_all(&mqtt::subscribe(pkid, &filters, None)).is_err() {
                            break;
                        }
                        match mqtt::read_packet(&mut s, Duration::from_secs(5)) {
                            Some((0x90, body)) => {
                                let n = body[2..].iter().filter(|c| **c < 0x80).count();
                                granted.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            _ => break,
                        }
                    }
                }
            })
        })
        .collect();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    format!(
        "{} distinct filters asked for, {} granted, {} refused over a cap",
        next.load(Ordering::Relaxed),
        granted.load(Ordering::Relaxed),
        gw.counter("subs", "subscribe_quota_denied")
    )
}

fn http_healthz(port: u16) -> Option<(u16, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, started.elapsed()))
}

/// Connections: one device's 1,028, 1,000 slow HTTP clients, 300 silent TCP (item 5).
fn connections(gw: &Gateway, seconds: u64, stop: &Arc<AtomicBool>) -> String {
    let (port, api) = (gw.port, gw.api_port);
    let held = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, held, accepted) = (stop.clone(), held.clone(), accepted.clone());
        std::thread::spawn(move || {
            for i in 0..1028 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = mqtt::tcp_from(ATTACKER, port) else {
                    continue;
                };
                let _ = s.write_all(&login(&format!("f{i}"), "flood", "flood-pw"));
                if mqtt::read_packet(&mut s, Duration::from_secs(5)) == Some((0x20, vec![0, 0])) {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                held.lock().unwrap().push(s);
            }
        })
    };
    let slow = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut clients: Vec<TcpStream> = (0..1000)
                .filter_map(|_| mqtt::tcp_from(SLOW_HTTP, api).ok())
                .collect();
            let head = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n";
            let mut at = 0;
            while !stop.load(Ordering::Relaxed) {
                let byte = [head[at % head.len()]];
                clients.retain_mut(|c| c.write_all(&byte).is_ok());
                at += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            clients.len()
        })
    };
    let silent: Vec<TcpStream> = (0..300)
        .filter_map(|_| mqtt::tcp_from(IDLE_TCP, port).ok())
        .collect();
    let (mut other, mut health, mut failures) = (Vec::new(), Vec::new(), 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        match timed_login(port, "o", "other", "other-pw") {
            Some(t) => other.push(t),
            None => failures += 1,
        }
        match http_healthz(api) {
            Some((200, t)) => health.push(t),
            _ => failures += 1,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    let slow_left = slow.join().unwrap_or(0);
    drop(silent);
    held.lock().unwrap().clear();
    format!(
        "flood device: {} of 1028 connections accepted, {} refused at its limit; slow HTTP clients still open at the end: {slow_left} of 1000; silent TCP closed at accept {} and at the connect timeout {}; other device's logins p50 {:.1} ms max {:.1} ms ({}), /healthz p50 {:.1} ms max {:.1} ms ({}), {} failed",
        accepted.load(Ordering::Relaxed),
        gw.counter("flood", "connect_device_limit"),
        gw.counter("", "connect_address_limit"),
        gw.counter("", "connect_timeout"),
        p50_ms(&other),
        max_ms(&other),
        other.len(),
        p50_ms(&health),
        max_ms(&health),
        health.len(),
        failures
    )
}

/// One device filling the disk (item 6).
fn disk(gw: &Gateway, seconds: u64, stop: &Arc<AtomicBool>) -> String {
    let port = gw.port;
    let sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let pad = "x".repeat(1000);
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = mqtt::tcp_from(ATTACKER, port) else {
                    continue;
                };
                let _ = s.write_all(&login("flood", "flood", "flood-pw"));
                if mqtt::read_packet(&mut s, Duration::from_secs(5)) != Some((0x20, vec![0, 0])) {
                    continue;
                }
                // 100 in flight: the next one for each acknowledgement.
                let mut n = 0u64;
                let publish = |s: &mut TcpStream, n: u64| {
                    let body = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
                    let pkid = (n % 60_000 + 1) as u16;
                    s.write_all(&mqtt::publish(
                        b"devices/flood/telemetry",
                        body.as_bytes(),
                        1,
                        pkid,
                        None,
                    ))
                };
                let mut ok = true;
                for _ in 0..100 {
                    n += 1;
                    ok &= publish(&mut s, n).is_ok();
                }
                while ok && !stop.load(Ordering::Relaxed) {
                    match mqtt::read_packet(&mut s, Duration::from_secs(10)) {
                        Some((0x40, _)) => {
                            sent.fetch_add(1, Ordering::Relaxed);
                            n += 1;
                            ok = publish(&mut s, n).is_ok();
                        }
                        _ => ok = false,
                    }
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    let db = gw.db();
    let dropped = |device: &str| -> i64 {
        db.query_row(
            "SELECT COALESCE(SUM(count), 0) FROM drops WHERE device = ?1",
            [device],
            |r| r.get(0),
        )
        .unwrap_or(-1)
    };
    format!(
        "flood device: {} messages of 1 KB acknowledged ({:.0}/s), {} dropped by the cap; canary dropped: {}",
        sent.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed) as f64 / seconds as f64,
        dropped("flood"),
        dropped("canary")
    )
}

type Attack = fn(&Gateway, u64, &Arc<AtomicBool>) -> String;

fn main() {
    let seconds: u64 = arg("--seconds", 30);
    let argv: Vec<String> = std::env::args().collect();
    let only = argv
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| argv.get(i + 1))
        .cloned();
    let binary = argv
        .iter()
        .position(|a| a == "--binary")
        .and_then(|i| argv.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/branch-gateway")
        });
    let attacks: [(&str, Attack, &str, Option<u16>); 4] = [
        ("logins", logins, "", None),
        ("subscriptions", subscriptions, "", None),
        ("connections", connections, "", None),
        // Central is down (nothing listens on its port): nothing is delivered.
        ("disk", disk, "max_bytes = 67108864", Some(free_port())),
    ];
    println!(
        "attack | gateway | canary p50 / p99 (acknowledged, stored) | RSS peak / after | CPU s | the attack"
    );
    for (name, attack, storage, upstream) in attacks {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let mut gw = Gateway::start(&binary, storage, upstream);
        let canary = Canary::start(gw.port);
        let cpu_before = cpu_ms(gw.child.id());
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (stop, peak, pid) = (stop.clone(), peak.clone(), gw.child.id());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                        .unwrap_or_default()
                        .lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    peak.fetch_max(rss, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let what = attack(&gw, seconds, &stop);
        let _ = sampler.join();
        let cpu = (cpu_ms(gw.child.id()) - cpu_before) as f64 / 1000.0;
        let report = canary.stop_after(1, Duration::from_secs(5));
        std::thread::sleep(Duration::from_secs(5));
        let after = gw.rss_kb();
        let alive = gw.alive();
        let last = report.acked.last().copied().unwrap_or(0);
        let stored: i64 = gw
            .db()
            .query_row(
                "SELECT COUNT(DISTINCT json_extract(payload, '$.n')) FROM messages
                 WHERE device = 'canary' AND json_extract(payload, '$.n') <= ?1",
                [last as i64],
                |r| r.get(0),
            )
            .unwrap_or(-1);
        let clean_stop = gw.stop();
        println!(
            "{name} | {} | {:.1} / {:.1} ms ({}, {stored}{}) | {:.1} / {:.1} MiB | {cpu:.1} | {what}",
            if alive && clean_stop { "alive" } else { "DIED" },
            report.percentile(50).as_secs_f64() * 1000.0,
            report.percentile(99).as_secs_f64() * 1000.0,
            report.acked.len(),
            if report.failures > 0 {
                format!(", {} canary failures", report.failures)
            } else {
                String::new()
            },
            peak.load(Ordering::Relaxed) as f64 / 1024.0,
            after as f64 / 1024.0,
        );
    }
}
