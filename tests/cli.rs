//! The command line as branch IT meets it: --help, --version, and the simulator and demo
//! against the real gateway.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn help_and_version() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "run",
        "check-config",
        "devices",
        "simulate",
        "demo",
        "hash-password",
    ] {
        assert!(help.contains(cmd), "--help lists {cmd}:\n{help}");
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("branch-gateway {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert!(!out.status.success());
}

fn shipped_devices() -> Vec<Device> {
    vec![
        device("kiosk-01", "self-check-kiosk"),
        device("opac-01", "catalogue-kiosk"),
        device("booth-01", "reading-booth"),
        device("nav-01", "touch-navigator"),
        device("gate-east", "gate-counter"),
    ]
}

#[test]
fn simulate_plays_every_device_into_the_running_gateway() {
    let branch = Branch::new(&shipped_devices());
    let gw = branch.start();
    let out = run_bounded(
        Command::new(BIN)
            .args([
                "simulate",
                "--speed",
                "60",
                "--seconds",
                "4",
                "--invalid-every",
                "10",
                "--config",
            ])
            .arg(branch.config()),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("simulated 5 devices"), "{stdout}");
    // Every device came online, sent data and went offline again.
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    for d in shipped_devices() {
        let rows = branch.count(&format!(
            "SELECT COUNT(*) FROM messages WHERE device = '{}' AND kind != 'status'",
            d.id
        ));
        assert!(rows > 0, "{} sent data", d.id);
        assert_eq!(
            branch.count(&format!(
                "SELECT reported_status = 'offline' FROM devices WHERE id = '{}'",
                d.id
            )),
            1
        );
    }
    assert!(
        branch.count("SELECT COUNT(*) FROM rejected") > 0,
        "some invalid messages were played"
    );
}

#[test]
fn demo_runs_a_branch_and_prints_what_flows() {
    let branch = Branch::new(&shipped_devices());
    let out = run_bounded(
        Command::new(BIN)
            .args(["demo", "--seconds", "7", "--speed", "40", "--config"])
            .arg(branch.config()),
        Duration::from_secs(40),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("gateway listening on"), "{stdout}");
    assert!(stdout.contains("devices online 5"), "{stdout}");
    assert!(stdout.contains("stopped"), "{stdout}");
    assert!(branch.count("SELECT COUNT(*) FROM messages") > 10);
}

/// A child process killed when dropped.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The README's first command on the shipped example branch (its ports moved to free ones,
/// its serial device's path into a temp dir): the devices flow, central receives and
/// publishes a notice, the lobby shows it, the dashboard asks to sign in, the pull API
/// answers with the token from the config.
#[test]
fn the_demo_of_the_example_branch_shows_central_the_pages_and_the_api() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, api, tap, ils) = (free_port(), free_port(), free_port(), free_port());
    let example = std::fs::read_to_string(root.join("gateway.example.toml")).unwrap();
    let token = example
        .lines()
        .find_map(|l| l.strip_prefix("token = \""))
        .and_then(|l| l.split('"').next())
        .expect("the example has an [api] token")
        .to_owned();
    let config = example
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{mqtt}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{api}"))
        .replace("127.0.0.1:16001", &format!("127.0.0.1:{tap}"))
        .replace("127.0.0.1:16101", &format!("127.0.0.1:{ils}"))
        .replace(
            "/tmp/branch-gateway-example",
            &dir.path().join("serial").display().to_string(),
        )
        .replace(
            "./device-profiles",
            &root.join("device-profiles").display().to_string(),
        );
    std::fs::create_dir_all(dir.path().join("serial")).unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    // Until stopped, as the README runs it; killed on drop if the test fails first.
    let mut demo = Demo(
        Command::new(BIN)
            .args(["demo", "--config"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("demo.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let printed = printed.clone();
        let mut out = std::io::BufReader::new(demo.0.stdout.take().unwrap());
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut line = String::new();
            while out.read_line(&mut line).is_ok_and(|n| n > 0) {
                printed.lock().unwrap().push_str(&line);
                line.clear();
            }
        })
    };
    // The lobby shows central's notice once it has come down the upstream link.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let lobby = loop {
        let page = std::net::TcpStream::connect(("127.0.0.1", api))
            .ok()
            .map(|_| http_get(api, "/lobby", None));
        if let Some((200, body)) = &page {
            if body.contains("closes at 20:00 tonight") {
                break body.clone();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no notice on the lobby: {page:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(lobby.contains(r#"data-metric="visitors_in""#), "{lobby}");
    assert!(
        lobby.contains("三楼阅览室"),
        "the notice as central sent it"
    );
    let (status, _) = http_get(api, "/", None);
    assert_eq!(status, 303, "the dashboard sends a stranger to /login");
    let (status, body) = http_get(api, "/login", None);
    assert_eq!(status, 200);
    assert!(body.contains("API token"), "{body}");
    // The example branch's days are Shanghai's, as is the demo's curl line.
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::get("Asia/Shanghai").unwrap())
        .date();
    let query = format!(
        "/api/v1/summaries?period=hour&from={today}&to={}",
        today.tomorrow().unwrap()
    );
    let (status, _) = http_get(api, &query, None);
    assert_eq!(status, 401, "the pull API wants the token");
    let (status, body) = http_get(api, &query, Some(&token));
    assert_eq!(status, 200, "{body}");
    let summaries: serde_json::Value = serde_json::from_str(&body).unwrap();
    let visitors = summaries["items"]
        .as_array()
        .and_then(|items| items.last())
        .and_then(|hour| hour["metrics"]["visitors_in"].as_f64());
    assert!(
        visitors.is_some_and(|v| v > 0.0),
        "this hour has visitors: {body}"
    );
    // Two 5-second reports of what central received, then Ctrl-C.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while printed
        .lock()
        .unwrap()
        .matches("central has received")
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no reports:\n{}",
            printed.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = demo.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = demo.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the demo did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    let stdout = printed.lock().unwrap().clone();
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("stopped;"), "{stdout}");
    for line in [
        format!("lobby page:  http://127.0.0.1:{api}/lobby"),
        format!("'http://127.0.0.1:{api}{query}'"),
        format!("dashboard:   http://127.0.0.1:{api}/"),
        "central has received".to_owned(),
        "mosquitto_sub -V mqttv5 -h 127.0.0.1 -p".to_owned(),
        "curl -H \"Authorization: Bearer $TOKEN\"".to_owned(),
    ] {
        assert!(
            stdout.contains(&line),
            "the demo prints {line:?}:\n{stdout}"
        );
    }
    let received: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("central has received "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        received.len() >= 2 && received.windows(2).all(|w| w[0] < w[1]) && received[0] > 0,
        "central receives more and more: {received:?}"
    );
    assert!(
        !token.is_empty() && !stdout.contains(&token),
        "the token is never printed"
    );
}
