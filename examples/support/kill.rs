//! The kill experiment, shared by `tests/kill.rs` (5 rounds in CI) and the `kill_bench`
//! command (20 rounds, 200 devices): devices publish QoS 1 as fast as their in-flight
//! window allows and record every message id the gateway acknowledged; the real binary is
//! SIGKILLed at a random moment, restarted on the same database, and so on. At the end,
//! the database must hold every acknowledged id exactly once, and each device's rows in
//! the order it sent them.
//!
//! Ids are per device and never sent twice (a message whose PUBACK was lost to a kill is
//! not resent), so any duplicate is the gateway's.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mqtt;

const PROFILE: &str = r#"{
  "name": "kill-sensor",
  "description": "kill experiment device: a per-device message id and padding",
  "telemetry": { "max_bytes": 512, "fields": {
      "n": {"type": "integer", "min": 0},
      "pad": {"type": "string", "max_length": 200}
  }}
}"#;

/// What one experiment does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub binary: PathBuf,
    pub devices: usize,
    pub rounds: usize,
    /// Messages a device has sent and not yet seen acknowledged.
    pub in_flight: usize,
    /// The gateway is killed this long after a round's first acknowledgement, at a
    /// random point of the range.
    pub kill_after_ms: (u64, u64),
    pub seed: u64,
}

/// What it found.
#[derive(Debug, Default)]
pub struct Outcome {
    pub acknowledged: u64,
    /// Rows of the experiment's devices in the database.
    pub stored: u64,
    /// Acknowledged ids missing from the database.
    pub lost: u64,
    /// Ids stored more than once (counting each extra row).
    pub duplicates: u64,
    /// Devices whose rows are not in the order they were sent.
    pub out_of_order: u64,
    /// Stored ids that were never acknowledged (committed, PUBACK lost to the kill).
    pub stored_unacknowledged: u64,
    /// Acknowledgements per round.
    pub per_round: Vec<u64>,
    pub seconds: f64,
}

/// A small deterministic generator (the seed is printed, so a failing run can be redone).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

fn device_id(d: usize) -> String {
    format!("k{d:04}")
}

fn write_setup(dir: &Path, port: u16, devices: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::write(dir.join("profiles/kill-sensor.json"), PROFILE).unwrap();
    let mut cfg = format!(
        "[gateway]\nbranch_id = \"kill\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"warn\"\n\
         [broker]\nlisten = \"127.0.0.1:{port}\"\nmax_pending_per_address = {}\n[storage]\nsynchronous = \"full\"\n",
        devices + 16
    );
    for d in 0..devices {
        cfg.push_str(&format!(
            "[[devices]]\nid = \"{}\"\nprofile = \"kill-sensor\"\npassword = \"pw-{d}\"\n",
            device_id(d)
        ));
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

fn start(binary: &Path, config: &Path, port: u16) -> Child {
    let child = Command::new(binary)
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not listen");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

/// One device for one round: connect, then publish ids from `next` on, keeping
/// `in_flight` unacknowledged, until the connection ends. Returns the ids acknowledged,
/// in order, and the next id to use.
fn device_round(
    port: u16,
    d: usize,
    mut next: u64,
    in_flight: usize,
    acked_total: &AtomicU64,
    stop: &AtomicBool,
) -> (Vec<u64>, u64) {
    let id = device_id(d);
    let password = format!("pw-{d}");
    let v5 = d % 2 == 1;
    let topic = format!("devices/{id}/telemetry");
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        if stop.load(Ordering::Relaxed) {
            return (acked, next);
        }
        if let Ok(s) = connect(port, &id, &password, v5) {
            break s;
        }
        assert!(Instant::now() < deadline, "{id} could not log in");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    // pkid -> id, in send order (PUBACKs come back in that order).
    let mut waiting: std::collections::VecDeque<(u16, u64)> = Default::default();
    let mut pkid: u16 = 0;
    let pad = "x".repeat(120);
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        out.clear();
        while waiting.len() < in_flight {
            pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
            let payload = format!(r#"{{"n":{next},"pad":"{pad}"}}"#);
            let props: Option<&[u8]> = v5.then_some(&[]);
            out.extend_from_slice(&mqtt::publish(
                topic.as_bytes(),
                payload.as_bytes(),
                1,
                pkid,
                props,
            ));
            waiting.push_back((pkid, next));
            next += 1;
        }
        if !out.is_empty() && writer.write_all(&out).is_err() {
            return (acked, next);
        }
        match read_ack(&mut reader) {
            Some(got) => {
                let (want, n) = waiting.pop_front().expect("a PUBACK for something sent");
                assert_eq!(got, want, "{id}: PUBACKs out of order");
                acked.push(n);
                acked_total.fetch_add(1, Ordering::Relaxed);
            }
            None => return (acked, next),
        }
    }
}

fn connect(port: u16, id: &str, password: &str, v5: bool) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(&mqtt::connect(&mqtt::Connect {
        v5,
        client_id: id,
        login: Some((id, password)),
        keep_alive: 60,
        clean: true,
        will: None,
        properties: &[],
    }))?;
    match mqtt::read_packet(&mut s, Duration::from_secs(10)) {
        Some((0x20, body)) if body.get(1) == Some(&0) => Ok(s),
        _ => Err(std::io::Error::other("no successful CONNACK")),
    }
}

/// The packet id of the next PUBACK; `None` when the connection ends (or sends anything
/// else, which it must not).
fn read_ack(r: &mut impl Read) -> Option<u16> {
    let mut head = [0u8; 2];
    r.read_exact(&mut head).ok()?;
    if head[0] != 0x40 || head[1] < 2 || head[1] > 127 {
        return None;
    }
    let mut body = vec![0u8; head[1] as usize];
    r.read_exact(&mut body).ok()?;
    if body.len() > 2 && body[2] != 0 {
        panic!("a PUBACK with reason {:#x}", body[2]);
    }
    Some(u16::from_be_bytes([body[0], body[1]]))
}

/// Run the experiment in `dir` (created; left for inspection).
pub fn run(plan: &Plan, dir: &Path) -> Outcome {
    let started = Instant::now();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = write_setup(dir, port, plan.devices);
    let mut rng = Rng::new(plan.seed);
    let mut next: Vec<u64> = vec![0; plan.devices];
    let mut acked: Vec<Vec<u64>> = vec![Vec::new(); plan.devices];
    let mut outcome = Outcome::default();
    for _round in 0..plan.rounds {
        let mut child = start(&plan.binary, &config, port);
        let total = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..plan.devices)
            .map(|d| {
                let (total, stop, from) = (total.clone(), stop.clone(), next[d]);
                let in_flight = plan.in_flight;
                std::thread::spawn(move || device_round(port, d, from, in_flight, &total, &stop))
            })
            .collect();
        // The kill comes at a random moment once messages flow.
        let deadline = Instant::now() + Duration::from_secs(60);
        while total.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "no acknowledgement within 60 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (lo, hi) = plan.kill_after_ms;
        std::thread::sleep(Duration::from_millis(rng.between(lo, hi)));
        child.kill().unwrap();
        child.wait().unwrap();
        stop.store(true, Ordering::Relaxed);
        for (d, t) in threads.into_iter().enumerate() {
            let (ids, n) = t.join().unwrap();
            acked[d].extend(ids);
            next[d] = n;
        }
        outcome.per_round.push(total.load(Ordering::Relaxed));
    }
    let db = rusqlite::Connection::open(dir.join("data/branch-gateway.sqlite")).unwrap();
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    let mut st = db
        .prepare(
            "SELECT device, json_extract(payload, '$.n') FROM messages
             WHERE kind = 'telemetry' ORDER BY seq",
        )
        .unwrap();
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .unwrap();
    for row in rows {
        let (device, n) = row.unwrap();
        stored.entry(device).or_default().push(n as u64);
    }
    for (d, acked) in acked.iter().enumerate() {
        let rows = stored.remove(&device_id(d)).unwrap_or_default();
        outcome.acknowledged += acked.len() as u64;
        outcome.stored += rows.len() as u64;
        if rows.windows(2).any(|w| w[0] >= w[1]) {
            outcome.out_of_order += 1;
        }
        let mut counts: HashMap<u64, u64> = HashMap::with_capacity(rows.len());
        for n in &rows {
            *counts.entry(*n).or_default() += 1;
        }
        outcome.duplicates += counts.values().map(|c| c - 1).sum::<u64>();
        for n in acked {
            if !counts.contains_key(n) {
                outcome.lost += 1;
            }
        }
        let acked: std::collections::HashSet<u64> = acked.iter().copied().collect();
        outcome.stored_unacknowledged +=
            counts.keys().filter(|n| !acked.contains(n)).count() as u64;
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome
}
