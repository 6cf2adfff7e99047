//! Shared helpers for the end-to-end tests: a scratch folder with a config and profiles,
//! the real `branch-gateway` binary as a child process on a free loopback port, and MQTT
//! clients (rumqttc) that connect as devices.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet};
use tokio::sync::mpsc;

pub const BIN: &str = env!("CARGO_BIN_EXE_branch-gateway");

/// A small profile whose payloads tests can build and compare exactly.
pub const TEST_PROFILE: &str = r#"{
  "name": "test-sensor",
  "description": "test device",
  "telemetry": { "max_bytes": 512, "fields": {
      "n": {"type": "integer", "min": 0},
      "device": {"type": "string", "max_length": 32},
      "pad": {"type": "string", "required": false, "max_length": 400}
  }},
  "events": { "max_bytes": 512, "type_field": "event", "types": {
      "tick": {"fields": {"n": {"type": "integer", "min": 0}}}
  }}
}"#;

#[derive(Clone)]
pub struct Device {
    pub id: String,
    pub profile: String,
    pub password: String,
}

pub fn device(id: &str, profile: &str) -> Device {
    Device {
        id: id.into(),
        profile: profile.into(),
        password: format!("{id}-pw"),
    }
}

/// A scratch branch: `gateway.toml`, `profiles/` (test-sensor plus every shipped profile),
/// `data/`.
pub struct Branch {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Branch {
    pub fn new(devices: &[Device]) -> Branch {
        Self::with_extra(devices, "")
    }

    /// `extra` is appended to the `[storage]` section (and may open further sections).
    pub fn with_extra(devices: &[Device], extra: &str) -> Branch {
        let dir = tempfile::tempdir().unwrap();
        let profiles = dir.path().join("profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        std::fs::write(profiles.join("test-sensor.json"), TEST_PROFILE).unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
        for e in std::fs::read_dir(shipped).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                std::fs::copy(&p, profiles.join(p.file_name().unwrap())).unwrap();
            }
        }
        let port = free_port();
        let branch = Branch { dir, port };
        branch.write_config(devices, extra);
        branch
    }

    pub fn write_config(&self, devices: &[Device], extra: &str) {
        let mut cfg = format!(
            "[gateway]\nbranch_id = \"test-branch\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"info\"\n\
             [broker]\nlisten = \"127.0.0.1:{}\"\n[storage]\n{extra}\n",
            self.port
        );
        // Shipped profiles hash patron fields: every test branch has a privacy key.
        if !extra.contains("[privacy]") {
            cfg.push_str("[privacy]\nhmac_secret = \"test-branch-secret-0123456789\"\n");
        }
        for d in devices {
            cfg.push_str(&format!(
                "[[devices]]\nid = \"{}\"\nprofile = \"{}\"\npassword = \"{}\"\n",
                d.id, d.profile, d.password
            ));
        }
        std::fs::write(self.config(), cfg).unwrap();
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    /// Write the profile `test-gate` (telemetry `delta_in`, `delta_out`): its rollups are
    /// `visitors_in`, and `visitors_out` too when `with_visitors_out` (which makes the live
    /// figures show occupancy).
    pub fn write_test_gate(&self, with_visitors_out: bool) {
        let visitors_in =
            r#"{"metric": "visitors_in", "kind": "telemetry", "op": "sum", "field": "delta_in"}"#;
        let visitors_out = r#", {"metric": "visitors_out", "kind": "telemetry", "op": "sum", "field": "delta_out"}"#;
        let rollups = if with_visitors_out {
            format!("{visitors_in}{visitors_out}")
        } else {
            visitors_in.to_owned()
        };
        let profile = format!(
            r#"{{"name": "test-gate", "description": "a gate",
  "telemetry": {{"max_bytes": 256, "fields": {{"delta_in": {{"type": "integer"}}, "delta_out": {{"type": "integer"}}}}}},
  "rollups": [{rollups}]}}"#
        );
        std::fs::write(self.dir.path().join("profiles/test-gate.json"), profile).unwrap();
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("data/branch-gateway.sqlite")
    }

    pub fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.db().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    /// Poll `sql` (returning one integer) until it equals `want` or `limit` passes.
    pub fn wait_count(&self, sql: &str, want: i64, limit: Duration) -> i64 {
        let deadline = Instant::now() + limit;
        loop {
            let n = self.count(sql);
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn counter(&self, device: &str, name: &str) -> i64 {
        self.db()
            .query_row(
                "SELECT COALESCE((SELECT value FROM device_counters WHERE device = ?1 AND counter = ?2), 0)",
                [device, name],
                |r| r.get(0),
            )
            .unwrap()
    }

    /// Poll a device counter until it equals `want` (or 10 s pass); returns its value.
    pub fn wait_counter(&self, device: &str, name: &str, want: i64) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.counter(device, name);
            if n == want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start the real binary on this branch and wait until its broker accepts connections.
    pub fn start(&self) -> Gateway {
        self.start_with_env(&[])
    }

    /// [`Branch::start`] with extra environment variables.
    pub fn start_with_env(&self, env: &[(&str, String)]) -> Gateway {
        let log = self
            .dir
            .path()
            .join(format!("gateway-{}.log", crate_time()));
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(self.config())
            .env("RUST_LOG", "info,rumqttd=off")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut gw = Gateway {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !gw.log().contains("gateway ready") {
            if let Some(status) = gw.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited early with {status}:\n{}", gw.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready:\n{}",
                gw.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        gw
    }

    /// Run a subcommand of the binary on this branch's config; returns (status, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (ExitStatus, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn crate_time() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A child process killed when dropped: a failing test never leaves it running.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Gateway {
    child: Option<Child>,
    log: PathBuf,
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// SIGHUP: reload the configuration.
    pub fn hangup(&self) {
        self.signal("-HUP");
    }

    /// Wait (at most 10 s) until `needle` is in the log `times` times.
    pub fn wait_log(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches(needle).count() < times {
            assert!(Instant::now() < deadline, "no {needle:?}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (at most 15 s) for the exit status.
    pub fn terminate(self) -> (ExitStatus, String) {
        self.terminate_within(Duration::from_secs(15))
    }

    /// SIGTERM, then wait at most `limit` for the exit status.
    pub fn terminate_within(mut self, limit: Duration) -> (ExitStatus, String) {
        self.signal("-TERM");
        let status = self.wait(limit);
        (status, self.log())
    }

    pub fn kill9(mut self) -> String {
        self.signal("-KILL");
        self.wait(Duration::from_secs(5));
        self.log()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "gateway did not exit within {limit:?}; its log ends:\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A device client: rumqttc with its event loop polled in a task; every event is forwarded.
pub struct Client {
    pub client: AsyncClient,
    pub events: mpsc::UnboundedReceiver<Result<Event, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn options(port: u16, id: &str, password: &str) -> MqttOptions {
    let mut o = MqttOptions::new(format!("c-{id}"), "127.0.0.1", port);
    o.set_credentials(id, password);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    o
}

/// Start polling; the first error stops the loop (tests see it on `events`).
pub fn spawn_client(opts: MqttOptions) -> Client {
    let (client, el) = AsyncClient::new(opts, 1000);
    let (tx, events) = mpsc::unbounded_channel();
    let task = tokio::spawn(poll(el, tx));
    Client {
        client,
        events,
        task,
    }
}

async fn poll(mut el: EventLoop, tx: mpsc::UnboundedSender<Result<Event, String>>) {
    loop {
        match el.poll().await {
            Ok(ev) => {
                if tx.send(Ok(ev)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return;
            }
        }
    }
}

impl Client {
    /// Wait for CONNACK; returns its return code.
    pub async fn connack(&mut self) -> Result<rumqttc::ConnectReturnCode, String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| "no CONNACK within 10 s".to_string())?
                .ok_or("event loop ended")?;
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(a))) => return Ok(a.code),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Queue telemetry `{"n": n, "device": id}` from device `id` at QoS 1.
    pub async fn telemetry(&self, id: &str, n: usize) {
        self.client
            .publish(
                format!("devices/{id}/telemetry"),
                rumqttc::QoS::AtLeastOnce,
                false,
                format!(r#"{{"n":{n},"device":"{id}"}}"#),
            )
            .await
            .unwrap();
    }

    /// Wait until `n` PUBACKs have arrived (other events are skipped).
    pub async fn pubacks(&mut self, n: usize, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = 0;
        while got < n {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Event::Incoming(Packet::PubAck(_))))) => got += 1,
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        got
    }

    /// Wait for the next SUBACK.
    pub async fn suback(&mut self) -> Option<rumqttc::SubAck> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(Event::Incoming(Packet::SubAck(a))))) => return Some(a),
                Ok(Some(Ok(_))) => {}
                _ => return None,
            }
        }
    }
}

/// Connect as device `id` and wait for a successful CONNACK.
pub async fn connect(port: u16, id: &str, password: &str) -> Client {
    let mut c = spawn_client(options(port, id, password));
    let code = c.connack().await.expect("CONNACK");
    assert_eq!(code, rumqttc::ConnectReturnCode::Success, "{id} refused");
    c
}

/// A plain HTTP/1.1 GET on loopback: (status, JSON or text body).
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Run `cmd` to completion with stdin closed and stdout/stderr captured. Kills it and
/// panics if it is still running after `limit`, so no test waits on a child forever.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// A real central broker for forwarding tests: Mosquitto from Debian's package, on a free
/// loopback port, with persistence so a consumer's session survives its restarts.
pub struct Central {
    pub port: u16,
    /// Lines added to mosquitto.conf at the next (re)start, e.g. `max_packet_size 1500`.
    pub extra: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Holds the port while the broker is stopped, so no other test can take it.
    holder: Option<std::net::TcpListener>,
}

impl Central {
    pub fn start() -> Central {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Central {
        Self::start_with(port, "")
    }

    /// Start with `extra` lines in mosquitto.conf.
    pub fn start_with(port: u16, extra: &str) -> Central {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Central {
            port,
            extra: extra.to_owned(),
            dir,
            child: None,
            holder: None,
        };
        c.restart();
        c
    }

    /// Start (again) on the same port and persistence folder.
    pub fn restart(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 autosave_interval 1\nmax_queued_messages 0\nmax_inflight_messages 0\nlog_dest stderr\nuser root\n{}\n",
                self.port,
                self.dir.path().display(),
                self.extra
            ),
        )
        .unwrap();
        self.holder = None;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (mosquitto saves its persistence file) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
        // Keep the port (a listener that never answers MQTT looks like a dead broker).
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.holder.is_none() && Instant::now() < deadline {
            self.holder = std::net::TcpListener::bind(("127.0.0.1", self.port)).ok();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Central {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A central-side consumer: persistent session, subscribed to `{prefix}/#` at QoS 1,
/// reconnecting by itself; every received (topic, payload) goes to `rx`.
pub struct Consumer {
    pub rx: mpsc::UnboundedReceiver<(String, String)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Consumer {
    pub async fn start(port: u16, prefix: &str) -> Consumer {
        let mut o = MqttOptions::new(format!("consumer-{port}"), "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_inflight(1000);
        let (client, mut el) = AsyncClient::new(o, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let filter = format!("{prefix}/#");
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client
                            .subscribe(&filter, rumqttc::QoS::AtLeastOnce)
                            .await
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((
                            p.topic.clone(),
                            String::from_utf8_lossy(&p.payload).into_owned(),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("consumer subscribed")
            .unwrap();
        Consumer { rx, task }
    }
}

/// The `[upstream]` section pointing at a central broker on `port`.
pub fn upstream_section(port: u16, prefix: &str) -> String {
    format!(
        "[upstream]\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"gw-test-{port}\"\ntopic_prefix = \"{prefix}\"\npush_summaries = false\n"
    )
}

/// Free loopback ports (shared with the benchmarks).
#[path = "../../examples/support/ports.rs"]
mod ports;
#[allow(unused_imports)] // not every binary that includes this asks for a port
pub use ports::free_port;

/// Raw MQTT packets (shared with the fuzzer and the attack benchmark).
#[path = "../../examples/support/mqtt.rs"]
pub mod mqtt;

/// The kill experiment (shared with the kill benchmark).
#[path = "../../examples/support/kill.rs"]
pub mod kill;

/// The canary device of the attack tests (shared with the attack benchmark).
#[path = "../../examples/support/canary.rs"]
pub mod canary;
pub use canary::{Canary, CanaryReport};

/// The device a [`Canary`] logs in as (add it to the branch's devices).
pub fn canary_device() -> Device {
    device("canary", "test-sensor")
}

/// Stop `canary` (after its fifth acknowledgement at least); assert it was never cut off
/// and every message it was acknowledged is stored.
pub fn finish_canary(canary: Canary, branch: &Branch) -> CanaryReport {
    let r = canary.stop_after(5, Duration::from_secs(10));
    assert!(
        r.acked.len() >= 5,
        "the canary was barely acknowledged: {r:?}"
    );
    assert_eq!(r.failures, 0, "the canary lost its connection or an ack");
    let last = *r.acked.last().unwrap() as i64;
    let stored = branch.wait_count(
        &format!(
            "SELECT COUNT(DISTINCT json_extract(payload, '$.n')) FROM messages \
             WHERE device = 'canary' AND json_extract(payload, '$.n') <= {last}"
        ),
        r.acked.len() as i64,
        Duration::from_secs(10),
    );
    assert_eq!(
        stored,
        r.acked.len() as i64,
        "acknowledged canary messages missing"
    );
    r
}
