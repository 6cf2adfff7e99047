//! Commands from central to devices, end to end: Mosquitto as central (commands published
//! with `mosquitto_pub`, states read by a consumer), the real binary, paho-mqtt devices
//! that dedupe by `command_id` (tests/fixtures/paho_commands.py). Every state central
//! sees, in order (by `seq`, duplicates of at-least-once delivery removed); offline
//! devices, expiry, every rejection with its reason, a repeated `command_id`, the API, the
//! queue limit; a gateway SIGKILL and SIGTERM and a central outage with commands in every
//! state: none lost, none run twice; branch notices retained for screens and cleared.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PREFIX: &str = "library/cmd";
const TOKEN: &str = "commands-test-token-0123456789";
/// The gateway's log line once central granted its subscription (a command or notice
/// published before it would be dropped by central: nobody subscribed yet).
const SUBSCRIBED: &str = "subscribed at central to commands and branch notices";

const PYTHON: &str = "/usr/bin/python3";

/// A paho-mqtt device taking commands; killed when dropped.
struct Paho {
    child: Child,
}

impl Drop for Paho {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Paho {
    fn start(
        branch: &Branch,
        dev: &Device,
        done: &std::path::Path,
        delay_ms: u64,
        proto: &str,
    ) -> Paho {
        let mut child = Command::new(PYTHON)
            .arg(format!(
                "{}/tests/fixtures/paho_commands.py",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args([
                "127.0.0.1",
                &branch.port.to_string(),
                &dev.id,
                &dev.password,
            ])
            .arg(done)
            .args([&delay_ms.to_string(), proto])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 with paho-mqtt (Debian python3-paho-mqtt; scripts/test installs it)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end: a closed pipe would fail the device's next print.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // A persistent session may get a command before paho reports its SUBACK.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut line = rx.recv_timeout(Duration::from_secs(15));
        while matches!(&line, Ok(l) if l != "ready") {
            line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        match line {
            Ok(line) if line == "ready" => {}
            other => {
                let _ = child.kill();
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("paho device not ready: {other:?} {err}");
            }
        }
        Paho { child }
    }
}

/// Publish a command for `device` to central with mosquitto_pub (QoS 1).
fn publish(central: &Central, topic: &str, body: &str) {
    let out = run_bounded(
        Command::new("mosquitto_pub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &central.port.to_string(),
            "-q",
            "1",
            "-V",
            "mqttv5",
            "-t",
            &format!("{PREFIX}/{topic}"),
            "-m",
            body,
        ]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
}

fn command(central: &Central, device: &str, body: &str) {
    publish(central, &format!("commands/devices/{device}"), body);
}

/// Command states central received: command_id -> seq -> (state, detail).
#[derive(Default)]
struct States(BTreeMap<String, BTreeMap<i64, (String, String)>>);

impl States {
    fn drain(&mut self, consumer: &mut Consumer) {
        while let Ok((topic, body)) = consumer.rx.try_recv() {
            if !topic.ends_with("/command") {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["kind"], "command", "{body}");
            let d = &v["data"];
            self.0
                .entry(d["command_id"].as_str().unwrap().to_owned())
                .or_default()
                .insert(
                    v["seq"].as_i64().unwrap(),
                    (
                        d["state"].as_str().unwrap().to_owned(),
                        d["detail"].as_str().unwrap_or("").to_owned(),
                    ),
                );
        }
    }

    fn of(&self, id: &str) -> Vec<String> {
        self.0
            .get(id)
            .map(|m| m.values().map(|(s, _)| s.clone()).collect())
            .unwrap_or_default()
    }

    fn detail(&self, id: &str) -> String {
        self.0
            .get(id)
            .and_then(|m| m.values().last())
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }

    /// Wait until `id`'s states are exactly `want`.
    async fn wait(
        &mut self,
        consumer: &mut Consumer,
        id: &str,
        want: &[&str],
        log: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.drain(consumer);
            if self.of(id) == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: states {:?}, want {want:?}; all: {:?}\n{}",
                self.of(id),
                self.0,
                log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

const DONE: [&str; 4] = ["queued", "sent", "delivered", "succeeded"];

fn done_ids(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn http_post(port: u16, path: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw[9..12].parse().unwrap();
    (
        status,
        raw.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

fn branch_with(devices: &[Device], central: &Central, api_port: u16, extra: &str) -> Branch {
    Branch::with_extra(
        devices,
        &format!(
            "{}[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n{extra}",
            upstream_section(central.port, PREFIX)
        ),
    )
}

fn notice_cmd(id: &str, text: &str) -> String {
    format!(r#"{{"command_id":"{id}","name":"notice","args":{{"text":"{text}"}}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_offline_devices_expiry_rejections_repeats_and_the_api() {
    let central = Central::start();
    let mut consumer = Consumer::start(central.port, PREFIX).await;
    let (s1, s2) = (device("s1", "lobby-screen"), device("s2", "lobby-screen"));
    let s3 = device("s3", "lobby-screen");
    let api = free_port();
    let branch = branch_with(
        &[s1.clone(), s2.clone(), s3.clone()],
        &central,
        api,
        "[commands]\nmax_per_device = 3\n",
    );
    let gw = branch.start();
    let log = || gw.log();
    let done = branch.dir.path().join("s1-done");
    let mut states = States::default();

    // Connected: every state in order.
    let paho = Paho::start(&branch, &s1, &done, 0, "5");
    // Central drops what nobody subscribes to: wait for the gateway's subscription.
    gw.wait_log(SUBSCRIBED, 1);
    command(&central, "s1", &notice_cmd("c1", "closing in 15 minutes"));
    states.wait(&mut consumer, "c1", &DONE, log).await;

    // Offline: queued until the device is back, then delivered.
    drop(paho);
    branch.wait_counter("s1", "disconnects", 1);
    command(&central, "s1", &notice_cmd("c2", "second"));
    states.wait(&mut consumer, "c2", &["queued"], log).await;
    let paho = Paho::start(&branch, &s1, &done, 0, "5");
    states.wait(&mut consumer, "c2", &DONE, log).await;

    // Expired while offline: never delivered (the next one is).
    drop(paho);
    branch.wait_counter("s1", "disconnects", 2);
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(2);
    command(
        &central,
        "s1",
        &format!(
            r#"{{"command_id":"c3","name":"notice","args":{{"text":"x"}},"expires_at":"{soon}"}}"#
        ),
    );
    states
        .wait(&mut consumer, "c3", &["queued", "expired"], log)
        .await;
    command(&central, "s1", &notice_cmd("c4", "fourth"));
    let _paho = Paho::start(&branch, &s1, &done, 0, "5");
    states.wait(&mut consumer, "c4", &DONE, log).await;
    assert_eq!(done_ids(&done), ["c1", "c2", "c4"]);

    // Rejected, each with its reason, never sent.
    command(&central, "s1", r#"{"command_id":"r1","name":"reboot"}"#);
    command(
        &central,
        "s1",
        r#"{"command_id":"r2","name":"notice","args":{"text":7}}"#,
    );
    command(&central, "ghost", &notice_cmd("r3", "x"));
    command(
        &central,
        "s1",
        r#"{"command_id":"r4","name":"notice","args":{"text":"x"},"expires_at":"2020-01-01T00:00:00Z"}"#,
    );
    command(
        &central,
        "s1",
        r#"{"command_id":"r5","name":"notice","args":{"text":"x"},"colour":"red"}"#,
    );
    for (id, reason) in [
        ("r1", "unknown_command"),
        ("r2", "bad_args"),
        ("r3", "unknown_device"),
        ("r4", "already_expired"),
        ("r5", "unknown_field"),
    ] {
        states.wait(&mut consumer, id, &["rejected"], log).await;
        assert!(
            states.detail(id).starts_with(reason),
            "{id}: {}",
            states.detail(id)
        );
    }
    // Not even storable (no command_id): acknowledged, counted, nothing stored.
    command(&central, "s1", r#"{"name":"notice"}"#);

    // The same command_id again: not run again, its state reported again.
    command(&central, "s1", &notice_cmd("c1", "closing in 15 minutes"));
    states
        .wait(
            &mut consumer,
            "c1",
            &["queued", "sent", "delivered", "succeeded", "succeeded"],
            log,
        )
        .await;

    // The queue limit (3 open commands per device here): s2 never connects.
    for id in ["q1", "q2", "q3", "q4"] {
        command(&central, "s2", &notice_cmd(id, "x"));
    }
    states.wait(&mut consumer, "q4", &["rejected"], log).await;
    assert!(states.detail("q4").starts_with("queue_full"));
    for id in ["q1", "q2", "q3"] {
        assert_eq!(states.of(id), ["queued"]);
    }

    // The API takes the same object and answers with the state.
    let (status, body) = http_post(
        api,
        "/api/v1/devices/s1/commands",
        r#"{"command_id":"a1","name":"brightness","args":{"percent":40}}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["command_id"], "a1");
    assert_eq!(v["state"], "queued");
    states.wait(&mut consumer, "a1", &DONE, log).await;
    let (status, body) = http_post(
        api,
        "/api/v1/devices/s1/commands",
        r#"{"command_id":"a1","name":"brightness","args":{"percent":40}}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["state"],
        "succeeded"
    );
    let (status, body) = http_post(
        api,
        "/api/v1/devices/s1/commands",
        r#"{"command_id":"a2","name":"brightness","args":{"percent":400}}"#,
    );
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("bad_args"), "{body}");
    let (status, _) = http_post(api, "/api/v1/devices/s1/commands", "not json");
    assert_eq!(status, 400);
    let (status, body) = http_get(api, "/api/v1/commands?device=s2&state=queued", Some(TOKEN));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["command_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["q1", "q2", "q3"]);
    assert_eq!(v["counts"]["succeeded"], 4, "{body}");
    assert_eq!(done_ids(&done), ["c1", "c2", "c4", "a1"]);

    // A device that subscribes to `notice` only: a `brightness` for it fails once (not
    // sent), and its `notice` still arrives.
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &branch.port.to_string(),
            "-u",
            &s3.id,
            "-P",
            &s3.password,
        ])
        .args([
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "devices/s3/commands/notice",
            "-W",
            "30",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    branch.wait_counter("s3", "connects", 1);
    command(
        &central,
        "s3",
        r#"{"command_id":"b1","name":"brightness","args":{"percent":10}}"#,
    );
    states
        .wait(&mut consumer, "b1", &["queued", "sent", "failed"], log)
        .await;
    assert!(
        states.detail("b1").starts_with("not_subscribed"),
        "{}",
        states.detail("b1")
    );
    command(&central, "s3", &notice_cmd("n1", "hello"));
    // mosquitto_sub acknowledges (delivered) and never replies.
    states
        .wait(&mut consumer, "n1", &["queued", "sent", "delivered"], log)
        .await;
    let _ = sub.kill();
    let mut got = String::new();
    sub.stdout.take().unwrap().read_to_string(&mut got).unwrap();
    let _ = sub.wait();
    assert!(got.contains(r#""command_id":"n1""#), "{got}");

    // Counted per state in /metrics and per device.
    let (_, metrics) = http_get(api, "/metrics", Some(TOKEN));
    assert!(
        metrics.contains("branch_gateway_commands{state=\"succeeded\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("branch_gateway_commands{state=\"rejected\"} 7")
            && metrics.contains("branch_gateway_commands{state=\"failed\"} 1"),
        "{metrics}"
    );
    assert_eq!(branch.counter("s1", "command_succeeded"), 4);
    drop(consumer);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// Commands in every state when the gateway is SIGKILLed, then SIGTERMed, then while
/// central is down: every command reaches `succeeded`, the device ran each exactly once,
/// in order, and central saw every state in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_lost_or_run_twice_across_kill_stop_and_central_outage() {
    let mut central = Central::start();
    let mut consumer = Consumer::start(central.port, PREFIX).await;
    let s1 = device("s1", "lobby-screen");
    let api = free_port();
    let branch = branch_with(std::slice::from_ref(&s1), &central, api, "");
    let done = branch.dir.path().join("s1-done");
    let mut states = States::default();
    let mut want: Vec<String> = Vec::new();
    let debug = [(
        "RUST_LOG",
        "info,rumqttd=off,branch_gateway::commands=debug".to_owned(),
    )];
    let mut gw = Some(branch.start_with_env(&debug));
    // The device takes 150 ms per command: when the gateway goes, some are delivered,
    // one is sent, the rest queued.
    let _paho = Paho::start(&branch, &s1, &done, 150, "5");
    gw.as_ref().unwrap().wait_log(SUBSCRIBED, 1);
    for (round, stop) in ["kill", "term"].into_iter().enumerate() {
        let ids: Vec<String> = (0..8).map(|i| format!("k{round}-{i}")).collect();
        for id in &ids {
            command(&central, "s1", &notice_cmd(id, "x"));
        }
        want.extend(ids.iter().cloned());
        // Wait until the third has been delivered (so the rest are sent or queued).
        let g = gw.as_ref().unwrap();
        states
            .wait(&mut consumer, &ids[2], &DONE[..3], || g.log())
            .await;
        let g = gw.take().unwrap();
        if stop == "kill" {
            g.kill9();
        } else {
            let (status, log) = g.terminate();
            assert!(status.success(), "{log}");
        }
        gw = Some(branch.start());
        for id in &ids {
            let log = || gw.as_ref().unwrap().log();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                states.drain(&mut consumer);
                let s = states.of(id);
                if s.last().map(String::as_str) == Some("succeeded") {
                    // A command sent again after the restart may show `sent` twice.
                    let mut seen = s.clone();
                    seen.dedup();
                    assert_eq!(seen, DONE, "{id}: {s:?}");
                    break;
                }
                assert!(Instant::now() < deadline, "{id}: {s:?}\n{}", log());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(done_ids(&done), want, "each command run once, in order");
    }

    // Central down while commands are delivered and answered: every state arrives later.
    let ids: Vec<String> = (0..5).map(|i| format!("o-{i}")).collect();
    for id in &ids {
        command(&central, "s1", &notice_cmd(id, "x"));
    }
    want.extend(ids.iter().cloned());
    states
        .wait(&mut consumer, &ids[4], &["queued"], String::new)
        .await;
    central.stop();
    let deadline = Instant::now() + Duration::from_secs(20);
    while done_ids(&done) != want {
        assert!(
            Instant::now() < deadline,
            "device did not run them while central was down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    central.restart();
    for id in &ids {
        states
            .wait(&mut consumer, id, &DONE, || gw.as_ref().unwrap().log())
            .await;
    }
    assert_eq!(done_ids(&done), want);
    drop(consumer);
    let (status, log) = gw.take().unwrap().terminate();
    assert!(status.success(), "{log}");
}

/// Central's notice is republished retained on `branch/notices` for screens (read-only
/// for devices), and cleared when it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_notices_are_retained_for_screens_and_expire() {
    let central = Central::start();
    let screen = device("screen-1", "lobby-screen");
    let branch = branch_with(std::slice::from_ref(&screen), &central, free_port(), "");
    let gw = branch.start();
    gw.wait_log(SUBSCRIBED, 1);
    let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3);
    publish(
        &central,
        "branch/notices",
        &format!(
            r#"{{"text":"The library closes in 15 minutes","level":"warning","expires_at":"{soon}"}}"#
        ),
    );
    // A screen that subscribes afterwards gets it (retained).
    let sub = |wait_s: &str| {
        run_bounded(
            Command::new("mosquitto_sub").args([
                "-h",
                "127.0.0.1",
                "-p",
                &branch.port.to_string(),
                "-u",
                &screen.id,
                "-P",
                &screen.password,
                "-t",
                "branch/notices",
                "-C",
                "1",
                "-W",
                wait_s,
            ]),
            Duration::from_secs(10),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let out = sub("1");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("closes in 15 minutes") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no notice on branch/notices\n{}",
            gw.log()
        );
    };
    let v: serde_json::Value = serde_json::from_str(got.trim()).unwrap();
    assert_eq!(v["level"], "warning");
    // A device cannot publish there.
    let out = run_bounded(
        Command::new("mosquitto_pub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &branch.port.to_string(),
            "-u",
            &screen.id,
            "-P",
            &screen.password,
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            "branch/notices",
            "-m",
            "{\"text\":\"fake\"}",
        ]),
        Duration::from_secs(10),
    );
    let _ = out;
    // Expired: cleared (a new subscriber gets nothing retained).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = sub("1");
        if out.stdout.is_empty() {
            break;
        }
        assert!(!String::from_utf8_lossy(&out.stdout).contains("fake"));
        assert!(
            Instant::now() < deadline,
            "notice never cleared\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}
