//! The pages in a real browser: headless Chromium (Debian's `chromium`, installed by the
//! test command) driven over the DevTools protocol loads `/lobby` and `/` from the real
//! binary. The figures in the DOM (by their `data-metric`) equal the API's; a gate pass
//! reaches the open lobby page within 2 s without a reload; the dashboard shows a device
//! going offline; every request the browser makes goes to the gateway on 127.0.0.1.
//! A reload that changes the figures reaches an open screen.
//! Screenshots of both pages at 1920x1080 (and the lobby at 1080x1920, where every figure
//! must still be on screen) go to `target/screenshots/`.

mod common;
use common::mqtt::{self, Connect};
use common::*;

use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const TOKEN: &str = "pages-test-token-0123456789";

/// Headless Chromium with a DevTools connection to one page (killed when dropped).
struct Browser {
    _child: Killed,
    ws: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    /// Every URL the page requested (Network.requestWillBeSent).
    requests: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let binary = ["chromium", "chromium-browser"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("chromium (scripts/test installs it)");
        let child = Killed(
            Command::new(binary)
                .args([
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--hide-scrollbars",
                    "--remote-debugging-port=0",
                    // Nothing but loopback resolves: a page that tried the internet would fail
                    // (and be seen in `requests`).
                    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                    &format!("--window-size={width},{height}"),
                    &format!("--user-data-dir={}", profile.path().display()),
                    "about:blank",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Chromium writes its DevTools port to this file once it listens.
        let file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                if let Some(p) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                    break p;
                }
            }
            assert!(Instant::now() < deadline, "chromium did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        // DevTools' HTTP keeps the connection open: read by Content-Length.
        let list = {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(s, "GET /json/list HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
            let mut r = std::io::BufReader::new(s);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; length];
            std::io::Read::read_exact(&mut r, &mut body).unwrap();
            body
        };
        let pages: Value = serde_json::from_slice(&list).unwrap();
        let url = pages
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == "page")
            .expect("a page")["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_owned();
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).unwrap();
        let mut b = Browser {
            _child: child,
            ws,
            next_id: 0,
            requests: Vec::new(),
            _profile: profile,
        };
        b.call("Network.enable", json!({}));
        b.call("Page.enable", json!({}));
        b
    }

    /// A DevTools command; its result (events that arrive meanwhile are recorded).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(tungstenite::Message::text(msg)).unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap();
            if v["method"] == "Network.requestWillBeSent" {
                self.requests.push(
                    v["params"]["request"]["url"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                );
            }
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluate `expr` in the page; its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }

    /// Go to `url` and wait until the document has loaded (bounded).
    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait(
            "document.readyState === 'complete' && location.href",
            10,
            |v| v.as_str().is_some_and(|h| h.starts_with("http")),
        );
    }

    /// Poll `expr` every 20 ms until `ok` holds (or `seconds` pass); its last value.
    fn wait(&mut self, expr: &str, seconds: u64, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let v = self.eval(expr);
            if ok(&v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The page's viewport exactly `width` x `height` CSS pixels (a screen of that size).
    fn viewport(&mut self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        let want = format!("{width}x{height}");
        let got = self.wait("innerWidth + 'x' + innerHeight", 5, |v| v == want.as_str());
        assert_eq!(got, want.as_str());
    }

    /// Every `data-metric` of the page and its text.
    fn metrics(&mut self) -> Value {
        self.eval(
            "Object.fromEntries([...document.querySelectorAll('[data-metric]')].map(e => [e.dataset.metric, e.textContent.trim()]))",
        )
    }

    fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// True when every figure of the page (each `data-metric` element shown) lies inside the
/// viewport: a lobby screen cannot scroll.
const ALL_FIGURES_ON_SCREEN: &str = "[...document.querySelectorAll('[data-metric]')].filter(e => e.getClientRects().length).every(e => { const r = e.getBoundingClientRect(); return r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight + 1 && r.right <= innerWidth + 1; })";

fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
}

/// A device that logs in and publishes at QoS 1, each publish waited for (its PUBACK
/// comes after the commit).
struct Mqtt(TcpStream, u16);

impl Mqtt {
    fn connect(port: u16, id: &str) -> Mqtt {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&mqtt::connect(&Connect {
            v5: false,
            client_id: id,
            login: Some((id, &format!("{id}-pw"))),
            keep_alive: 60,
            clean: true,
            will: None,
            properties: &[],
        }))
        .unwrap();
        let (first, body) = mqtt::read_packet(&mut s, Duration::from_secs(10)).expect("CONNACK");
        assert_eq!((first, body[1]), (0x20, 0));
        Mqtt(s, 0)
    }

    fn publish(&mut self, topic: &str, payload: &str) {
        self.1 += 1;
        let id = self.1;
        self.0
            .write_all(&mqtt::publish(
                topic.as_bytes(),
                payload.as_bytes(),
                1,
                id,
                None,
            ))
            .unwrap();
        let (first, body) = mqtt::read_packet(&mut self.0, Duration::from_secs(10)).unwrap();
        assert_eq!((first, &body[..2]), (0x40, &id.to_be_bytes()[..]));
    }
}

fn gate(delta_in: u32, delta_out: u32) -> String {
    format!(
        r#"{{"raw_in":{delta_in},"raw_out":{delta_out},"delta_in":{delta_in},"delta_out":{delta_out},"interval_s":60,"occupancy_est":0,"link":"ok","crc_errors":0}}"#
    )
}

/// Today's figure `metric` as the pull API has it (the day bucket, UTC).
fn api_day(api: u16, metric: &str) -> f64 {
    let now = jiff::Timestamp::now();
    let today = now.strftime("%Y-%m-%d").to_string();
    let tomorrow = (now + jiff::SignedDuration::from_hours(24)).strftime("%Y-%m-%d");
    let (code, body) = http_get(
        api,
        &format!("/api/v1/summaries?period=day&from={today}&to={tomorrow}"),
        Some(TOKEN),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["items"][0]["metrics"][metric].as_f64().unwrap_or(0.0)
}

#[test]
fn the_lobby_and_the_dashboard_in_a_browser() {
    let api = free_port();
    let branch = Branch::with_extra(
        &[
            device("gate-1", "gate-counter"),
            device("kiosk-01", "self-check-kiosk"),
            device("booth-1", "reading-booth"),
        ],
        &format!("[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n"),
    );
    // The pages in Chinese.
    let cfg = std::fs::read_to_string(branch.config()).unwrap().replacen(
        "[gateway]\n",
        "[gateway]\nlanguage = \"zh\"\n",
        1,
    );
    std::fs::write(branch.config(), cfg).unwrap();
    let gw = branch.start();
    let mut gate1 = Mqtt::connect(branch.port, "gate-1");
    gate1.publish("devices/gate-1/telemetry", &gate(5, 2));
    let mut kiosk = Mqtt::connect(branch.port, "kiosk-01");
    kiosk.publish(
        "devices/kiosk-01/events",
        r#"{"event":"loan","session_ref":"session-0001","item_barcode":"39000001","media_type":"001","latency_ms":120}"#,
    );
    let base = format!("http://127.0.0.1:{api}");

    let mut b = Browser::start(1920, 1080);
    b.viewport(1920, 1080);
    b.open(&format!("{base}/lobby"));
    // The first render already holds the committed figures (or the stream brings them).
    let m = b.wait(
        "document.querySelector('[data-metric=\"visitors_in\"]').textContent",
        5,
        |v| v == "5",
    );
    assert_eq!(m, "5", "{}", gw.log());
    let m = b.wait(
        "document.querySelector('[data-metric=\"loans\"]').textContent",
        5,
        |v| v == "1",
    );
    assert_eq!(m, "1", "{}", gw.log());
    let figures = b.metrics();
    assert_eq!(figures["visitors_in"].as_str(), Some("5"));
    assert_eq!(figures["occupancy"].as_str(), Some("3"));
    assert_eq!(figures["returns"].as_str(), Some("0"));
    assert_eq!(figures["booth_sessions"].as_str(), Some("0"));
    assert_eq!(figures["devices_online"].as_str(), Some("2 / 3"));
    // The same as the pull API's figures for today.
    assert_eq!(api_day(api, "visitors_in"), 5.0);
    assert_eq!(api_day(api, "loans"), 1.0);
    let text = b
        .eval("document.body.innerText")
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.contains("今日到馆人次") && text.contains("当前在馆人数"),
        "{text}"
    );
    assert!(
        !text.contains("21234000000001"),
        "no patron datum on the page"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('#chart svg').length"),
        1,
        "the hourly chart, drawn on the server"
    );

    // A gate pass: on the open page within 2 s of its commit, without a reload.
    b.eval("window.__not_reloaded = true");
    gate1.publish("devices/gate-1/telemetry", &gate(3, 0));
    let committed = Instant::now();
    let v = b.wait(
        "document.querySelector('[data-metric=\"visitors_in\"]').textContent",
        5,
        |v| v == "8",
    );
    let took = committed.elapsed();
    assert_eq!(v, "8");
    assert!(took < Duration::from_secs(2), "the update took {took:?}");
    assert_eq!(b.eval("window.__not_reloaded === true"), true);
    assert_eq!(api_day(api, "visitors_in"), 8.0);
    assert_eq!(
        b.eval(ALL_FIGURES_ON_SCREEN),
        true,
        "landscape: every figure on screen"
    );
    b.screenshot(&screenshots().join("lobby.png"));
    // Portrait screens (1080x1920): every figure still on screen.
    b.viewport(1080, 1920);
    assert_eq!(
        b.eval(ALL_FIGURES_ON_SCREEN),
        true,
        "portrait: every figure on screen"
    );
    b.screenshot(&screenshots().join("lobby-portrait.png"));
    b.viewport(1920, 1080);

    // The dashboard: the login form, then every device and the figures of `status`.
    b.open(&format!("{base}/"));
    assert!(b.eval("location.pathname").as_str() == Some("/login"));
    b.eval(&format!(
        "document.querySelector('input[name=token]').value = '{TOKEN}'; document.querySelector('form').submit(); true"
    ));
    let path = b.wait(
        "document.readyState === 'complete' && location.pathname",
        10,
        |v| v == "/",
    );
    assert_eq!(path, "/");
    let state = |b: &mut Browser, device: &str| {
        b.eval(&format!(
            "(document.querySelector('tr[data-device=\"{device}\"] [data-metric=device_state]') || {{}}).textContent"
        ))
    };
    assert_eq!(state(&mut b, "gate-1"), "online");
    assert_eq!(state(&mut b, "booth-1"), "offline");
    let accepted = b.eval(
        "document.querySelector('tr[data-device=\"gate-1\"] [data-metric=accepted]').textContent",
    );
    assert_eq!(accepted, branch.counter("gate-1", "accepted").to_string());
    assert_eq!(
        b.eval("document.querySelectorAll('[data-metric=messages_by_hour] svg').length"),
        1
    );
    let (code, devices) = http_get(api, "/api/v1/devices", Some(TOKEN));
    assert_eq!(code, 200);
    let devices: Value = serde_json::from_str(&devices).unwrap();
    let online = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["online"] == true)
        .count();
    assert_eq!(b.metrics()["devices_online"], online.to_string().as_str());
    b.screenshot(&screenshots().join("dashboard.png"));

    // A device goes offline: the dashboard shows it (reloaded until it does, bounded).
    drop(gate1);
    branch.wait_counter("gate-1", "disconnects", 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        b.call("Page.reload", json!({}));
        b.wait(
            "document.readyState === 'complete' && location.pathname",
            5,
            |v| v == "/",
        );
        if state(&mut b, "gate-1") == "offline" || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(state(&mut b, "gate-1"), "offline");

    // Nothing but the gateway on loopback was ever asked for.
    b.eval("true");
    assert!(!b.requests.is_empty());
    for url in &b.requests {
        assert!(
            url.starts_with(&format!("{base}/")) || url == "about:blank",
            "the page requested {url}"
        );
    }
    drop(kiosk);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// A reload that changes which figures the lobby shows reaches a screen already open: it
/// loads itself again and shows the new figure, without anyone touching it.
#[test]
fn an_open_lobby_loads_itself_again_when_a_reload_changes_its_figures() {
    let api = free_port();
    let branch = Branch::with_extra(
        &[device("gate-1", "test-gate")],
        &format!("[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n"),
    );
    branch.write_test_gate(false);
    let gw = branch.start();
    let mut gate1 = Mqtt::connect(branch.port, "gate-1");
    gate1.publish(
        "devices/gate-1/telemetry",
        r#"{"delta_in":5,"delta_out":2}"#,
    );

    let mut b = Browser::start(1920, 1080);
    b.open(&format!("http://127.0.0.1:{api}/lobby"));
    let shown = b.wait(
        "document.querySelector('[data-metric=\"visitors_in\"]').textContent",
        5,
        |v| v == "5",
    );
    assert_eq!(shown, "5", "{}", gw.log());
    assert_eq!(b.eval("document.body.dataset.layout"), "visitors_in+hourly");
    assert_eq!(
        b.eval("document.querySelectorAll('[data-metric=\"occupancy\"]').length"),
        0
    );
    b.eval("window.__drawn_before_the_reload = true");

    branch.write_test_gate(true);
    gw.hangup();
    gw.wait_log("configuration reloaded", 1);
    // The stream tells the page at once; it checks the page answers, then loads it again.
    let layout = b.wait(
        "document.readyState === 'complete' && document.body.dataset.layout",
        10,
        |v| v == "visitors_in,occupancy+hourly",
    );
    assert_eq!(layout, "visitors_in,occupancy+hourly", "{}", gw.log());
    assert_eq!(
        b.eval("window.__drawn_before_the_reload === undefined"),
        true,
        "the page was loaded again"
    );
    // The new figure counts from the reload on (what was committed before had no
    // visitors_out rollup): 5 in before; 1 in and 4 out after it.
    gate1.publish(
        "devices/gate-1/telemetry",
        r#"{"delta_in":1,"delta_out":4}"#,
    );
    let occupancy = b.wait(
        "(document.querySelector('[data-metric=\"occupancy\"]') || {}).textContent",
        5,
        |v| v == "2",
    );
    assert_eq!(occupancy, "2");
    assert_eq!(b.metrics()["visitors_in"], "6");
    drop(gate1);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// `api.lobby = "token"`: the lobby wants the token (bearer or the login cookie), and the
/// dashboard never shows without it.
#[test]
fn the_lobby_can_be_behind_the_token() {
    let api = free_port();
    let branch = Branch::with_extra(
        &[device("gate-1", "gate-counter")],
        &format!("[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\nlobby = \"token\"\n"),
    );
    let gw = branch.start();
    let raw = |path: &str, extra: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", api)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
        )
        .unwrap();
        let mut head = String::new();
        std::io::BufReader::new(s).read_line(&mut head).unwrap();
        head
    };
    assert!(
        raw("/lobby", "").starts_with("HTTP/1.1 303"),
        "to the login form"
    );
    assert!(raw("/lobby/events", "").starts_with("HTTP/1.1 401"));
    assert!(raw("/", "").starts_with("HTTP/1.1 303"));
    assert!(raw("/", "Cookie: branch_gateway_session=forged\r\n").starts_with("HTTP/1.1 303"));
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    assert!(raw("/lobby", &bearer).starts_with("HTTP/1.1 200"));
    assert!(raw("/", &bearer).starts_with("HTTP/1.1 200"));
    // A wrong token at the form: 401, counted.
    let mut s = TcpStream::connect(("127.0.0.1", api)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = "token=wrong&next=";
    write!(
        s,
        "POST /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut head = String::new();
    std::io::BufReader::new(s).read_line(&mut head).unwrap();
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let (_, metrics) = http_get(api, "/metrics", Some(TOKEN));
    assert!(
        metrics.contains("branch_gateway_page_logins_refused_total 1\n"),
        "{metrics}"
    );
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}
