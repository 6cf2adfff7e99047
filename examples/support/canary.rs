//! A device that publishes `{"n": i, "device": "canary"}` at QoS 1 every 20 ms over MQTT
//! 3.1.1 from 127.0.0.1 (user `canary`, password `canary-pw`) while an attack runs, and
//! records which messages were acknowledged and how long each acknowledgement took.
#![allow(dead_code)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mqtt;

pub struct Canary {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<CanaryReport>>,
}

#[derive(Debug, Default)]
pub struct CanaryReport {
    pub acked: Vec<u64>,
    pub latencies: Vec<Duration>,
    /// Connections lost or PUBACKs not received within 5 s.
    pub failures: u64,
}

impl CanaryReport {
    pub fn percentile(&self, p: usize) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(l.len().saturating_sub(1) * p / 100)
            .copied()
            .unwrap_or_default()
    }
}

impl Canary {
    pub fn start(port: u16) -> Canary {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || run(port, &flag, &count));
        Canary {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Stop once `at_least` messages were acknowledged (or `limit` has passed).
    pub fn stop_after(mut self, at_least: u64, limit: Duration) -> CanaryReport {
        let deadline = Instant::now() + limit;
        while self.acked.load(Ordering::Relaxed) < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(port: u16, stop: &AtomicBool, count: &AtomicU64) -> CanaryReport {
    let mut r = CanaryReport::default();
    let mut n = 0u64;
    'connect: while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            r.failures += 1;
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let _ = s.set_nodelay(true);
        let c = mqtt::connect(&mqtt::Connect {
            v5: false,
            client_id: "canary",
            login: Some(("canary", "canary-pw")),
            keep_alive: 30,
            clean: true,
            will: None,
            properties: &[],
        });
        if s.write_all(&c).is_err()
            || mqtt::read_packet(&mut s, Duration::from_secs(5)) != Some((0x20, vec![0, 0]))
        {
            r.failures += 1;
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let pkid = (n % 60_000 + 1) as u16;
            let body = format!(r#"{{"n":{n},"device":"canary"}}"#);
            let p = mqtt::publish(b"devices/canary/telemetry", body.as_bytes(), 1, pkid, None);
            let sent = Instant::now();
            if s.write_all(&p).is_err() {
                r.failures += 1;
                continue 'connect;
            }
            match mqtt::read_packet(&mut s, Duration::from_secs(5)) {
                Some((0x40, b)) if b == pkid.to_be_bytes() => {
                    r.acked.push(n);
                    r.latencies.push(sent.elapsed());
                    count.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    r.failures += 1;
                    continue 'connect;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    r
}
