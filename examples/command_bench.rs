//! Command round trip under telemetry load: central publishes commands at a fixed rate to
//! `lobby-screen` devices through the gateway while the same devices publish telemetry.
//! Measures the round trip central -> gateway -> device -> reply -> gateway -> central (from
//! central's PUBLISH of the command to central's receipt of its `succeeded` state), p50 / p99
//! / max, with the legs central -> device and reply -> central; the final state of every
//! command; and telemetry sent, acknowledged and received by central. "Lost" = commands
//! without `succeeded` after the drain wait plus telemetry that never reached central.
//!
//! ```text
//! cargo build --release --locked
//! cargo run --release --locked --example command_bench -- --devices 200 --rate 100 --seconds 30 --telemetry 5000 --drain 20 [--nodelay 1]
//! ```
//! Needs `mosquitto` (Debian package) as the central broker (MQTT 5, which commands need).
//! Loopback only, free ports, everything under a temp dir (kept, with the gateway's log,
//! when something was lost or the gateway logged anything). Every loop is bounded.
//! The bench's clients keep rumqttc's default (Nagle on) unless `--nodelay 1`: with it on, a
//! device's reply written right after its PUBACK of the command waits for the gateway's
//! delayed ACK, about 40 ms of the reply leg on Linux loopback.

mod support;
use support::*;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use serde_json::Value;
use tokio::task::JoinHandle;

const PREFIX: &str = "bench";
const FINAL: [&str; 5] = ["succeeded", "failed", "timed_out", "expired", "rejected"];

/// One command as seen from both ends.
#[derive(Default)]
struct Cmd {
    sent: Option<Instant>,
    at_device: Option<Instant>,
    replied: Option<Instant>,
    /// Every state central received for it, in arrival order.
    states: Vec<(String, Instant)>,
}

impl Cmd {
    fn first(&self, state: &str) -> Option<Instant> {
        self.states
            .iter()
            .find(|(s, _)| s == state)
            .map(|(_, t)| *t)
    }
}

#[derive(Default)]
struct Shared {
    cmds: Mutex<HashMap<String, Cmd>>,
    /// (device, uptime_s) of every telemetry envelope central received.
    telemetry: Mutex<HashSet<(String, u64)>>,
    tel_dups: AtomicU64,
    backfill: AtomicU64,
    state_msgs: AtomicU64,
    tel_sent: AtomicU64,
    replies: AtomicU64,
    device_acks: AtomicU64,
    subscribed: AtomicU64,
    device_errors: AtomicU64,
    central_errors: AtomicU64,
    observer_ready: AtomicBool,
    probe_seen: AtomicBool,
}

/// A client of this bench; `--nodelay 1` sets TCP_NODELAY on its socket (rumqttc's default
/// is Nagle on, which holds a small write while the previous one is unacknowledged).
fn client(o: MqttOptions, cap: usize) -> (AsyncClient, EventLoop) {
    let (c, mut el) = AsyncClient::new(o, cap);
    let mut n = NetworkOptions::new();
    n.set_tcp_nodelay(arg("--nodelay", 0u8) == 1);
    el.set_network_options(n);
    (c, el)
}

fn start_central(dir: &std::path::Path, port: u16) -> Child {
    let conf = dir.join("central.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\nuser root\n"),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto installed");
    wait_port(port);
    child
}

/// Central's consumer: every state of every command, and the telemetry envelopes.
fn observer(port: u16, sh: Arc<Shared>, until: Instant) -> (AsyncClient, JoinHandle<()>) {
    let mut o = MqttOptions::new("central-observer", "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(1000);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = client(o, 100);
    let c = client.clone();
    let task = tokio::spawn(async move {
        while Instant::now() < until {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.try_subscribe(format!("{PREFIX}/#"), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => sh.observer_ready.store(true, Relaxed),
                Ok(Event::Incoming(Packet::Publish(p))) => take(&sh, &p.topic, &p.payload),
                Ok(_) => {}
                Err(_) => {
                    sh.central_errors.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    (client, task)
}

fn take(sh: &Shared, topic: &str, payload: &[u8]) {
    let at = Instant::now();
    let kind = topic.rsplit('/').next().unwrap_or("");
    if kind != "command" && kind != "telemetry" {
        return; // gateway status and health
    }
    if topic.starts_with(&format!("{PREFIX}/backfill/")) {
        sh.backfill.fetch_add(1, Relaxed);
    }
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    if kind == "telemetry" {
        let (Some(dev), Some(k)) = (v["device"].as_str(), v["data"]["uptime_s"].as_u64()) else {
            return;
        };
        if !sh.telemetry.lock().unwrap().insert((dev.to_owned(), k)) {
            sh.tel_dups.fetch_add(1, Relaxed);
        }
        return;
    }
    let (Some(cid), Some(state)) = (
        v["data"]["command_id"].as_str(),
        v["data"]["state"].as_str(),
    ) else {
        return;
    };
    if cid.starts_with("probe-") {
        sh.probe_seen.store(true, Relaxed);
        return;
    }
    sh.state_msgs.fetch_add(1, Relaxed);
    let mut cmds = sh.cmds.lock().unwrap();
    cmds.entry(cid.to_owned())
        .or_default()
        .states
        .push((state.to_owned(), at));
}

/// A lobby screen: subscribes to its commands and answers each with `succeeded` at once.
fn device(d: u64, port: u16, sh: Arc<Shared>, until: Instant) -> (AsyncClient, JoinHandle<()>) {
    let id = format!("d{d}");
    let mut o = MqttOptions::new(format!("bench-{id}"), "127.0.0.1", port);
    o.set_credentials(&id, "pw");
    o.set_inflight(100);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = client(o, 256);
    let c = client.clone();
    let task = tokio::spawn(async move {
        let filter = format!("devices/{id}/commands/#");
        let replies = format!("devices/{id}/replies");
        while Instant::now() < until {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.try_subscribe(&filter, QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    sh.subscribed.fetch_add(1, Relaxed);
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    sh.device_acks.fetch_add(1, Relaxed);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let at = Instant::now();
                    let v: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                    let Some(cid) = v["command_id"].as_str() else {
                        continue;
                    };
                    let body = serde_json::json!({"command_id": cid, "status": "succeeded", "detail": "ok"})
                        .to_string();
                    if let Some(cmd) = sh.cmds.lock().unwrap().get_mut(cid) {
                        cmd.at_device.get_or_insert(at);
                        cmd.replied = Some(Instant::now());
                    }
                    sh.replies.fetch_add(1, Relaxed);
                    // Never wait inside the event loop: a full request queue goes by a task.
                    if c.try_publish(&replies, QoS::AtLeastOnce, false, body.clone())
                        .is_err()
                    {
                        let (c, t) = (c.clone(), replies.clone());
                        tokio::spawn(async move {
                            let _ = c.publish(t, QoS::AtLeastOnce, false, body).await;
                        });
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    sh.device_errors.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    (client, task)
}

/// Call `f(0..total)` at `rate` per second, for at most `limit`; how many and how long.
async fn pace<F, Fut>(rate: u64, total: u64, limit: Duration, mut f: F) -> (u64, f64)
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i = 0;
    while i < total && start.elapsed() < limit {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
        while i < due {
            f(i).await;
            i += 1;
        }
    }
    (i, start.elapsed().as_secs_f64())
}

/// "p50 X ms, p99 Y ms, max Z ms (N samples)" of durations in milliseconds, and the p99.
fn stats(mut v: Vec<f64>) -> (String, Option<f64>) {
    if v.is_empty() {
        return ("no samples".into(), None);
    }
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
    let (p50, p99, max) = (pct(0.5), pct(0.99), v[v.len() - 1]);
    let text = format!(
        "p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({} samples)",
        v.len()
    );
    (text, Some(p99))
}

fn ms(a: Option<Instant>, b: Option<Instant>) -> Option<f64> {
    Some(b?.checked_duration_since(a?)?.as_secs_f64() * 1000.0)
}

/// Print the summary, one line per figure; the number lost.
fn report(sh: &Shared, sent: u64, tel_total: u64) -> u64 {
    let (mut rtt, mut to_device, mut back, mut queued) = (vec![], vec![], vec![], vec![]);
    let mut finals: HashMap<String, u64> = HashMap::new();
    let (mut every_state, mut repeated) = (0u64, 0u64);
    for c in sh.cmds.lock().unwrap().values() {
        rtt.extend(ms(c.sent, c.first("succeeded")));
        to_device.extend(ms(c.sent, c.at_device));
        back.extend(ms(c.replied, c.first("succeeded")));
        queued.extend(ms(c.sent, c.first("queued")));
        let names: HashSet<&str> = c.states.iter().map(|(s, _)| s.as_str()).collect();
        repeated += (c.states.len() - names.len()) as u64;
        let all = ["queued", "sent", "delivered", "succeeded"];
        every_state += all.iter().all(|s| names.contains(s)) as u64;
        let last_final = c
            .states
            .iter()
            .rev()
            .find(|(s, _)| FINAL.contains(&s.as_str()));
        let key = match (last_final, c.states.last()) {
            (Some((s, _)), _) => s.clone(),
            (None, Some((s, _))) => format!("still open ({s})"),
            (None, None) => "no state at all".into(),
        };
        *finals.entry(key).or_default() += 1;
    }
    let succeeded = finals.remove("succeeded").unwrap_or(0);
    let mut others: Vec<String> = finals.iter().map(|(k, n)| format!("{k} {n}")).collect();
    others.sort();
    if others.is_empty() {
        others.push("none".into());
    }
    let tel_sent = sh.tel_sent.load(Relaxed);
    let tel_got = sh.telemetry.lock().unwrap().len() as u64;
    let replies = sh.replies.load(Relaxed);
    let cmd_lost = sent.saturating_sub(succeeded);
    let tel_lost = tel_total.saturating_sub(tel_got);
    let (rtt, p99) = stats(rtt);
    let lines = [
        format!("commands that reached succeeded: {succeeded}"),
        format!("other final or last states: {}", others.join(", ")),
        format!("commands with queued, sent, delivered and succeeded all seen by central: {every_state}"),
        format!("command state messages at central: {} ({repeated} repeats of a state already seen)", sh.state_msgs.load(Relaxed)),
        format!("round trip central -> device -> reply -> central succeeded: {rtt}"),
        format!("  leg central publish -> command at device: {}", stats(to_device).0),
        format!("  leg device reply -> succeeded at central: {}", stats(back).0),
        format!("  central publish -> queued at central: {}", stats(queued).0),
        format!("device publishes acknowledged by the gateway: {} of {} ({tel_sent} telemetry + {replies} replies)", sh.device_acks.load(Relaxed), tel_sent + replies),
        format!("telemetry received by central: {tel_got} unique, {} duplicates", sh.tel_dups.load(Relaxed)),
        format!("envelopes on backfill topics: {}", sh.backfill.load(Relaxed)),
        format!("lost: {} ({cmd_lost} commands without succeeded + {tel_lost} telemetry not received)", cmd_lost + tel_lost),
        format!("connection errors: devices {}, central clients {}", sh.device_errors.load(Relaxed), sh.central_errors.load(Relaxed)),
        match p99 {
            Some(p) => format!("target round-trip p99 < 100 ms: {} ({p:.2} ms)", if p < 100.0 { "met" } else { "NOT met" }),
            None => "target round-trip p99 < 100 ms: no samples".into(),
        },
    ];
    for l in lines {
        println!("{l}");
    }
    cmd_lost + tel_lost
}

#[tokio::main]
async fn main() {
    let devices: u64 = arg("--devices", 200);
    let rate: u64 = arg("--rate", 100);
    let seconds: u64 = arg("--seconds", 30);
    let tel_rate: u64 = arg("--telemetry", 5000);
    let drain: u64 = arg("--drain", 20);
    assert!((1..=1000).contains(&devices) && rate <= 2000 && tel_rate <= 50_000);
    assert!((1..=300).contains(&seconds) && drain <= 120);
    let (commands, tel_total) = (rate * seconds, tel_rate * seconds);
    // Hard stop for every task and loop: setup, load, drain and some slack.
    let until = Instant::now() + Duration::from_secs(seconds * 2 + drain + 180);

    let dir = std::env::temp_dir().join(format!("branch-gateway-command-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("profiles")).unwrap();
    std::fs::copy(
        "device-profiles/lobby-screen.json",
        dir.join("profiles/lobby-screen.json"),
    )
    .expect("run from the repository root");
    let (gw_port, central_port) = (free_port(), free_port());
    let mut central = start_central(&dir, central_port);
    let sh = Arc::new(Shared::default());
    let (_observer, observer_task) = observer(central_port, sh.clone(), until);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh.observer_ready.load(Relaxed) {
        assert!(
            Instant::now() < deadline,
            "central observer did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut cfg = format!(
        "[gateway]\nbranch_id = \"bench\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\nlog_level = \"warn\"\n\
         [broker]\nlisten = \"127.0.0.1:{gw_port}\"\n\
         [upstream]\nurl = \"mqtt://127.0.0.1:{central_port}\"\nclient_id = \"gw-command-bench\"\ntopic_prefix = \"{PREFIX}\"\npush_summaries = false\n"
    );
    // `probe` never connects: its commands only show that the gateway takes central's.
    let ids = (0..devices).map(|d| format!("d{d}"));
    for id in ids.chain(["probe".to_owned()]) {
        cfg.push_str(&format!(
            "[[devices]]\nid = \"{id}\"\nprofile = \"lobby-screen\"\npassword = \"pw\"\n"
        ));
    }
    std::fs::write(dir.join("gateway.toml"), cfg).unwrap();
    let log = dir.join("gateway.log");
    let mut gw = Command::new("target/release/branch-gateway")
        .args(["run", "--config"])
        .arg(dir.join("gateway.toml"))
        .env_remove("RUST_LOG")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("cargo build --release --locked first");
    wait_port(gw_port);

    // Central's command sender.
    let mut o = MqttOptions::new("central-commander", "127.0.0.1", central_port);
    o.set_inflight(1000);
    o.set_keep_alive(Duration::from_secs(30));
    let (commander, mut el) = client(o, 1000);
    let sh2 = sh.clone();
    let commander_task = tokio::spawn(async move {
        while Instant::now() < until {
            if el.poll().await.is_err() {
                sh2.central_errors.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let send = |c: AsyncClient, device: String, cid: String| async move {
        let body = format!(
            r#"{{"command_id":"{cid}","name":"notice","args":{{"text":"bench notice {cid}"}}}}"#
        );
        let topic = format!("{PREFIX}/commands/devices/{device}");
        let _ = c.publish(topic, QoS::AtLeastOnce, false, body).await;
    };
    // The gateway is subscribed to central's commands once a probe's `queued` comes back.
    let ready = Instant::now();
    for k in 0..150 {
        if sh.probe_seen.load(Relaxed) {
            break;
        }
        send(commander.clone(), "probe".into(), format!("probe-{k}")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        sh.probe_seen.load(Relaxed),
        "the gateway never took a command from central"
    );
    println!(
        "setup: gateway takes central's commands {:.2} s after its port opened",
        ready.elapsed().as_secs_f64()
    );

    let mut clients = Vec::new();
    let mut tasks = vec![observer_task, commander_task];
    let connecting = Instant::now();
    // In batches of 100: the gateway refuses more than 128 pending logins from one address.
    for d in 0..devices {
        let (c, t) = device(d, gw_port, sh.clone(), until);
        clients.push(c);
        tasks.push(t);
        let batch_done = (d + 1) % 100 == 0 || d + 1 == devices;
        while batch_done && sh.subscribed.load(Relaxed) <= d {
            let n = sh.subscribed.load(Relaxed);
            assert!(
                connecting.elapsed() < Duration::from_secs(60),
                "{n} devices subscribed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "setup: {devices} lobby-screen devices connected and subscribed to devices/ID/commands/# in {:.2} s",
        connecting.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The load: telemetry from every device, commands round-robin over them.
    let cpu_before = cpu_ms(gw.id());
    let load = Instant::now();
    let limit = Duration::from_secs(seconds + 30);
    let clients = Arc::new(clients);
    let (cl, sh2) = (clients.clone(), sh.clone());
    let telemetry = tokio::spawn(async move {
        pace(tel_rate, tel_total, limit, |i| {
            let d = i % devices;
            let (c, sh) = (cl[d as usize].clone(), sh2.clone());
            async move {
                let body = format!(r#"{{"uptime_s":{},"brightness_pct":80}}"#, i / devices);
                let topic = format!("devices/d{d}/telemetry");
                if c.publish(topic, QoS::AtLeastOnce, false, body)
                    .await
                    .is_ok()
                {
                    sh.tel_sent.fetch_add(1, Relaxed);
                }
            }
        })
        .await
    });
    let (sent, cmd_s) = pace(rate, commands, limit, |i| {
        let cid = format!("c-{i:06}");
        sh.cmds.lock().unwrap().entry(cid.clone()).or_default().sent = Some(Instant::now());
        send(commander.clone(), format!("d{}", i % devices), cid)
    })
    .await;
    let (tel_paced, tel_s) = telemetry.await.unwrap();
    let load_s = load.elapsed().as_secs_f64();
    let cpu_load = cpu_ms(gw.id()) - cpu_before;

    // Drain: every command succeeded and every telemetry message sent received, or `drain` s.
    let drained = Instant::now();
    let done = |sh: &Shared| {
        let cmds = sh.cmds.lock().unwrap();
        let ok = cmds.values().filter(|c| c.first("succeeded").is_some());
        ok.count() as u64 >= sent
            && sh.telemetry.lock().unwrap().len() as u64 >= sh.tel_sent.load(Relaxed)
    };
    while !done(&sh) && drained.elapsed() < Duration::from_secs(drain) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_s = drained.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await; // late duplicates or states

    let tel_s = tel_s.max(0.001);
    let tel_sent = sh.tel_sent.load(Relaxed);
    for l in [
        format!("load: {devices} devices (TCP_NODELAY {}), commands {rate}/s and telemetry {tel_rate} msg/s for {seconds} s (load phase {load_s:.2} s)", arg("--nodelay", 0u8) == 1),
        format!("commands sent by central: {sent} of {commands} in {cmd_s:.2} s ({:.1}/s)", sent as f64 / cmd_s),
        format!("telemetry sent by devices: {tel_sent} of {tel_total} ({tel_paced} paced in {tel_s:.2} s, {:.0} msg/s)", tel_sent as f64 / tel_s),
        format!("drain wait after the load: {drain_s:.2} s (limit {drain} s)"),
    ] {
        println!("{l}");
    }
    let lost = report(&sh, sent, tel_total);
    println!(
        "gateway CPU during the load: {:.1} s ({:.0}% of one core); peak RSS {:.1} MiB",
        cpu_load as f64 / 1000.0,
        cpu_load as f64 / 10.0 / load_s,
        vm_hwm_kb(gw.id()) as f64 / 1024.0
    );

    for t in tasks {
        t.abort();
    }
    let _ = Command::new("kill")
        .args(["-TERM", &gw.id().to_string()])
        .status();
    let stop = Instant::now();
    while gw.try_wait().ok().flatten().is_none() && stop.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if gw.try_wait().ok().flatten().is_none() {
        println!("gateway did not stop within 15 s of SIGTERM; killed");
        let _ = gw.kill();
        let _ = gw.wait();
    }
    let _ = central.kill();
    let _ = central.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    println!("gateway log (warn and above): {} lines", lines.len());
    for l in lines.iter().take(20) {
        println!("  {}", l.chars().take(300).collect::<String>());
    }
    if lost > 0 || !lines.is_empty() {
        println!("kept {} (config, database, gateway.log)", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
