//! The SIP2 tap end to end: the real binary between a kiosk and a scripted ILS on loopback.
//! Byte-for-byte transparency on both legs (messages split across TCP segments, several in
//! one segment), the derived events of a scripted day, planted patron data searched byte
//! for byte in the database files and the log, the `sip2` crate's client (a third-party
//! SIP2 client) through the tap, and an ILS that is down: the kiosk is disconnected and
//! nothing is invented.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const D: &str = "20261203    101502";
const PATRON: &str = "21234000000001";
const PIN: &str = "pin-7391";
const NAME: &str = "Wang Xiaoming";

/// The scripted ILS: answers each request by its code, records every byte it received;
/// with `split`, each answer is written in two pieces (split across TCP segments).
struct Ils {
    port: u16,
    received: Arc<Mutex<Vec<u8>>>,
    sent: Arc<Mutex<Vec<u8>>>,
}

fn answer(request: &str) -> Option<String> {
    Some(match &request[..2] {
        "93" => "941".to_owned(),
        "99" => format!("98YYYYNN600003{D}2.00AOBR01|AMCity Library|BXYYYYYYYYYYYYYYYY|"),
        "63" => format!("64              001{D}000000000000000000000000AOBR01|AA{PATRON}|AE{NAME}|BLY|CQY|BDSome street 1|BEw@example.org|BF555-0100|"),
        "11" if request.contains("AB3002") => format!("120NUN{D}AOBR01|AA{PATRON}|AB3002|AJA held book|AFItem is on hold for another patron|"),
        "11" => format!("121NUN{D}AOBR01|AA{PATRON}|AB3001|AJA title|AH20261224    235900|CK001|"),
        "29" => format!("301YUN{D}AOBR01|AA{PATRON}|AB3003|AH20261230|CK001|"),
        "09" => format!("101YNY{D}AOBR01|AB3004|AQBR01|CLbin3|CK006|CV01|CY{PATRON}|DA{NAME}|"),
        "35" => format!("36Y{D}AOBR01|AA{PATRON}|"),
        _ => return None,
    })
}

impl Ils {
    fn start(split: bool) -> Ils {
        Self::start_slow(split, Duration::ZERO)
    }

    /// An ILS that takes `delay` to answer each request.
    fn start_slow(split: bool, delay: Duration) -> Ils {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (r, s) = (received.clone(), sent.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let (r, s) = (r.clone(), s.clone());
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        r.lock().unwrap().extend_from_slice(&buf[..n]);
                        for &b in &buf[..n] {
                            if b != b'\r' {
                                line.push(b);
                                continue;
                            }
                            let req = String::from_utf8_lossy(&line).into_owned();
                            line.clear();
                            let Some(a) = answer(&req) else { continue };
                            std::thread::sleep(delay);
                            let bytes = format!("{a}\r").into_bytes();
                            let (x, y) =
                                bytes.split_at(if split { bytes.len() / 2 } else { bytes.len() });
                            s.lock().unwrap().extend_from_slice(&bytes);
                            let _ = conn.write_all(x);
                            let _ = conn.flush();
                            if split {
                                std::thread::sleep(Duration::from_millis(2));
                                let _ = conn.write_all(y);
                            }
                        }
                    }
                });
            }
        });
        Ils {
            port,
            received,
            sent,
        }
    }
}

fn kiosk_branch(listen: u16, ils: u16) -> Branch {
    Branch::with_extra(
        &[],
        &format!(
            "[[devices]]\nid = \"kiosk-01\"\nprofile = \"self-check-kiosk\"\nsip2 = {{ listen = \"127.0.0.1:{listen}\", ils = \"127.0.0.1:{ils}\" }}\n"
        ),
    )
}

/// Read from the kiosk's side until `want` CRs have arrived (bounded).
fn read_answers(s: &mut TcpStream, want: usize, got: &mut Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while got.iter().filter(|&&b| b == b'\r').count() < want {
        assert!(
            Instant::now() < deadline,
            "answers missing: {}",
            String::from_utf8_lossy(got)
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("tap closed the kiosk connection"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_scripted_day_passes_unchanged_and_becomes_events_without_patron_data() {
    let ils = Ils::start(true);
    let listen = free_port();
    // Central (Mosquitto) receives what the tap derived; the API shows the tap's counters.
    let central = Central::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut consumer = rt.block_on(Consumer::start(central.port, "lib/b1"));
    let api = free_port();
    let branch = Branch::with_extra(
        &[],
        &format!(
            "{}[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"t0ken-for-the-sip2-tests\"\n\
             [[devices]]\nid = \"kiosk-01\"\nprofile = \"self-check-kiosk\"\n\
             sip2 = {{ listen = \"127.0.0.1:{listen}\", ils = \"127.0.0.1:{}\" }}\n",
            upstream_section(central.port, "lib/b1"),
            ils.port
        ),
    );
    let gw = branch.start();
    let mut kiosk = TcpStream::connect(("127.0.0.1", listen)).unwrap();
    kiosk
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let day = [
        "9300CNkiosk-user|COkiosk-secret|CPBR01|".to_owned(),
        "9900302.00AY1AZFCA5".to_owned(),
        format!("63001{D}          AOBR01|AA{PATRON}|AD{PIN}|"),
        format!("11YN{D}{D}AOBR01|AA{PATRON}|AB3001|AC|AD{PIN}|"),
        format!("11YN{D}{D}AOBR01|AA{PATRON}|AB3002|AC|"),
        format!("29NY{D}{D}AOBR01|AA{PATRON}|AB3003|"),
        format!("09N{D}{D}APBR01|AOBR01|AB3004|AC|"),
        format!("35{D}AOBR01|AA{PATRON}|"),
    ];
    let mut sent = Vec::new();
    let mut got = Vec::new();
    // One at a time, each written in two segments; the last two in one segment.
    for (i, m) in day.iter().enumerate().take(day.len() - 2) {
        let bytes = format!("{m}\r").into_bytes();
        let (a, b) = bytes.split_at(bytes.len() / 2);
        kiosk.write_all(a).unwrap();
        kiosk.flush().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        kiosk.write_all(b).unwrap();
        sent.extend_from_slice(&bytes);
        read_answers(&mut kiosk, i + 1, &mut got);
    }
    let last = format!("{}\r{}\r", day[6], day[7]).into_bytes();
    kiosk.write_all(&last).unwrap();
    sent.extend_from_slice(&last);
    read_answers(&mut kiosk, day.len(), &mut got);
    drop(kiosk);

    // Transparent: both legs byte for byte.
    let deadline = Instant::now() + Duration::from_secs(5);
    while *ils.received.lock().unwrap() != sent {
        assert!(
            Instant::now() < deadline,
            "ILS got {:?}",
            String::from_utf8_lossy(&ils.received.lock().unwrap())
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        got,
        *ils.sent.lock().unwrap(),
        "the kiosk got exactly what the ILS sent"
    );

    // The derived events of the day, in order, and the SC status as telemetry.
    let events = "SELECT COUNT(*) FROM messages WHERE device = 'kiosk-01' AND kind = 'events'";
    assert_eq!(
        branch.wait_count(events, 5, Duration::from_secs(10)),
        5,
        "{}",
        gw.log()
    );
    let db = branch.db();
    let rows: Vec<serde_json::Value> = db
        .prepare("SELECT payload FROM messages WHERE device = 'kiosk-01' AND kind = 'events' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|p| serde_json::from_str(&p.unwrap()).unwrap())
        .collect();
    let kinds: Vec<&str> = rows.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["loan", "failure", "renewal", "return", "session_end"]
    );
    assert_eq!(rows[0]["item_barcode"], "3001");
    assert_eq!(rows[0]["due_date"], "2026-12-24");
    assert_eq!(rows[0]["media_type"], "001");
    assert_eq!(rows[1]["reason"], "hold_other_patron");
    assert_eq!(rows[2]["offline_replay"], true, "no block = Y");
    assert_eq!(rows[3]["alert"], true);
    assert_eq!(rows[3]["alert_type"], "01");
    assert_eq!(rows[3]["sort_bin"], "bin3");
    assert_eq!(rows[4]["checkouts_ok"], 1);
    assert_eq!(rows[4]["checkouts_failed"], 1);
    assert_eq!(rows[4]["end_reason"], "end_session");
    let hashed = rows[4]["patron_id"].as_str().unwrap();
    assert_eq!(hashed.len(), 64, "the patron id is the branch's HMAC");
    let telemetry: String = db
        .query_row(
            "SELECT payload FROM messages WHERE device = 'kiosk-01' AND kind = 'telemetry'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let t: serde_json::Value = serde_json::from_str(&telemetry).unwrap();
    assert_eq!(
        (t["sc_status"].as_i64(), t["sip_protocol"].as_str()),
        (Some(0), Some("2.00"))
    );
    assert_eq!(branch.counter("kiosk-01", "sip2_login_ok"), 1);
    // Presence: online while linked, offline once the kiosk left.
    let statuses = "SELECT COUNT(*) FROM messages WHERE device = 'kiosk-01' AND kind = 'status'";
    assert_eq!(branch.wait_count(statuses, 2, Duration::from_secs(10)), 2);
    let presence: Vec<String> = db
        .prepare("SELECT payload FROM messages WHERE device = 'kiosk-01' AND kind = 'status' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(presence, ["online", "offline"]);
    // The SC status carried a right checksum (AY1AZFCA5): nothing counted.
    assert_eq!(branch.counter("kiosk-01", "sip2_checksum_errors"), 0);
    let (code, metrics) = http_get(api, "/metrics", Some("t0ken-for-the-sip2-tests"));
    assert_eq!(code, 200);
    for line in [
        "branch_gateway_sip2_total{device=\"kiosk-01\",counter=\"sip2_login_ok\"} 1\n",
        "branch_gateway_sip2_total{device=\"kiosk-01\",counter=\"sip2_connections\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }

    // Central received the derived events, in order, like any device's.
    let central_got: Vec<String> = rt.block_on(async {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while got.len() < 5 {
            match tokio::time::timeout_at(deadline, consumer.rx.recv()).await {
                Ok(Some((topic, payload))) if topic == "lib/b1/devices/kiosk-01/events" => {
                    got.push(payload)
                }
                Ok(Some(_)) => {}
                _ => panic!("central got only {got:?}"),
            }
        }
        got
    });
    let central_kinds: Vec<String> = central_got
        .iter()
        .map(|p| {
            let v: serde_json::Value = serde_json::from_str(p).unwrap();
            v["data"]["event"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        central_kinds,
        ["loan", "failure", "renewal", "return", "session_end"]
    );

    // Patron data: nowhere in the database files or the log.
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    let (ok, out, _) = branch.cli(&["status"]);
    assert!(ok.success());
    assert!(out.contains("kiosk       kiosk-01: SC status "), "{out}");
    let mut files = vec![branch.db_path()];
    for ext in ["-wal", "-shm"] {
        files.push(std::path::PathBuf::from(format!(
            "{}{ext}",
            branch.db_path().display()
        )));
    }
    for secret in [
        PATRON,
        PIN,
        NAME,
        "kiosk-secret",
        "Some street",
        "w@example.org",
        "555-0100",
    ] {
        for f in &files {
            if let Ok(bytes) = std::fs::read(f) {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} in {}",
                    f.display()
                );
            }
        }
        assert!(!log.contains(secret), "{secret} in the log");
        for p in &central_got {
            assert!(!p.contains(secret), "{secret} sent to central: {p}");
        }
    }
}

/// The kiosk's derived events, in order.
fn kiosk_events(branch: &Branch) -> Vec<serde_json::Value> {
    branch
        .db()
        .prepare("SELECT payload FROM messages WHERE device = 'kiosk-01' AND kind = 'events' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|p| serde_json::from_str(&p.unwrap()).unwrap())
        .collect()
}

/// A third-party SIP2 server library as the ILS: pysip2 (PyPI; `scripts/test` installs it
/// in `target/pysip2-venv`) serving `tests/fixtures/pysip2_ils.py`. Its dialect (its own
/// dates, field order, no alert type) becomes the same events.
#[test]
fn a_third_party_sip2_server_as_the_ils() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("BRANCH_GATEWAY_PYSIP2_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/pysip2-venv/bin/python"));
    let mut ils = Killed(
        std::process::Command::new(&python)
            .arg(root.join("tests/fixtures/pysip2_ils.py"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs pysip2)", python.display())),
    );
    let ils_port: u16 = {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(ils.0.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("pysip2 ILS printed {line:?}"))
    };
    let listen = free_port();
    let branch = kiosk_branch(listen, ils_port);
    let gw = branch.start();
    let mut kiosk = TcpStream::connect(("127.0.0.1", listen)).unwrap();
    kiosk
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let day = [
        "9300CNkiosk-user|COkiosk-secret|CPBR01|".to_owned(),
        "9900302.00".to_owned(),
        format!("11YN{D}{D}AOBR01|AA{PATRON}|AB3001|AC|AD{PIN}|"),
        format!("11YN{D}{D}AOBR01|AA{PATRON}|AB3002|AC|"),
        format!("29NY{D}{D}AOBR01|AA{PATRON}|AB3003|"),
        format!("09N{D}{D}APBR01|AOBR01|AB3004|AC|"),
        format!("35{D}AOBR01|AA{PATRON}|"),
    ];
    let mut got = Vec::new();
    for (i, m) in day.iter().enumerate() {
        kiosk.write_all(format!("{m}\r").as_bytes()).unwrap();
        read_answers(&mut kiosk, i + 1, &mut got);
    }
    let answers: Vec<&[u8]> = got.split(|&b| b == b'\r').collect();
    let codes: Vec<&[u8]> = answers
        .iter()
        .filter(|a| a.len() >= 2)
        .map(|a| &a[..2])
        .collect();
    assert_eq!(
        codes,
        [b"94", b"98", b"12", b"12", b"30", b"10", b"36"],
        "{}",
        String::from_utf8_lossy(&got)
    );
    drop(kiosk);
    let events = "SELECT COUNT(*) FROM messages WHERE device = 'kiosk-01' AND kind = 'events'";
    assert_eq!(
        branch.wait_count(events, 5, Duration::from_secs(10)),
        5,
        "{}",
        gw.log()
    );
    let rows = kiosk_events(&branch);
    let kinds: Vec<&str> = rows.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["loan", "failure", "renewal", "return", "session_end"]
    );
    assert_eq!(
        (
            &rows[0]["item_barcode"],
            &rows[0]["due_date"],
            &rows[0]["media_type"]
        ),
        (
            &serde_json::json!("3001"),
            &serde_json::json!("2026-12-24"),
            &serde_json::json!("001")
        )
    );
    assert_eq!(rows[1]["reason"], "hold_other_patron");
    assert_eq!(rows[2]["due_date"], "2026-12-31");
    assert_eq!(
        (&rows[3]["alert"], &rows[3]["sort_bin"]),
        (&serde_json::json!(true), &serde_json::json!("bin3"))
    );
    assert_eq!(
        (&rows[4]["checkouts_ok"], &rows[4]["checkouts_failed"]),
        (&serde_json::json!(1), &serde_json::json!(1))
    );
    assert_eq!(branch.counter("kiosk-01", "sip2_login_ok"), 1);
    assert_eq!(
        branch.counter("kiosk-01", "sip2_unparsed"),
        0,
        "pysip2's answers all parse"
    );
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    drop(ils);
    let mut stored = std::fs::read(branch.db_path()).unwrap();
    stored.extend(std::fs::read(format!("{}-wal", branch.db_path().display())).unwrap_or_default());
    for secret in [PATRON, PIN, "kiosk-secret"] {
        assert!(
            !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} stored"
        );
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

/// The `sip2` crate's client as the kiosk: login and SC status through the tap (it needs
/// each answer in one read: the ILS writes them whole).
#[test]
fn a_third_party_sip2_client_works_through_the_tap() {
    let ils = Ils::start(false);
    let listen = free_port();
    let branch = kiosk_branch(listen, ils.port);
    let gw = branch.start();
    let mut client = sip2::Client::new(&format!("127.0.0.1:{listen}")).unwrap();
    let mut params = sip2::ParamSet::new();
    params
        .set_sip_user("kiosk-user")
        .set_sip_pass("kiosk-secret");
    let login = client.login(&params).unwrap();
    assert!(login.ok(), "{}", gw.log());
    let status = client.sc_status().unwrap();
    assert!(status.ok());
    assert_eq!(branch.wait_counter("kiosk-01", "sip2_login_ok", 1), 1);
    let telemetry =
        "SELECT COUNT(*) FROM messages WHERE device = 'kiosk-01' AND kind = 'telemetry'";
    assert_eq!(branch.wait_count(telemetry, 1, Duration::from_secs(10)), 1);
    drop(client);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// No ILS: the kiosk's connection is closed at once (it goes offline by itself), no byte
/// is answered in the ILS's place, and the refusal is counted and logged.
#[test]
fn an_unreachable_ils_closes_the_kiosk_connection() {
    let dead = free_port();
    let listen = free_port();
    let branch = kiosk_branch(listen, dead);
    let gw = branch.start();
    let mut kiosk = TcpStream::connect(("127.0.0.1", listen)).unwrap();
    kiosk
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = kiosk.write_all(b"9900302.00\r");
    let mut buf = [0u8; 64];
    let n = kiosk.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "nothing answered in the ILS's place");
    assert_eq!(
        branch.wait_counter("kiosk-01", "sip2_ils_unreachable", 1),
        1
    );
    // Only the link's state: no event, no status invented.
    let telemetry =
        "SELECT COUNT(*) FROM messages WHERE device = 'kiosk-01' AND kind = 'telemetry'";
    assert_eq!(branch.wait_count(telemetry, 1, Duration::from_secs(10)), 1);
    let link: String = branch
        .db()
        .query_row(
            "SELECT payload FROM messages WHERE device = 'kiosk-01' AND kind = 'telemetry'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(link, r#"{"sip_link":"down"}"#);
    let others = branch
        .count("SELECT COUNT(*) FROM messages WHERE device = 'kiosk-01' AND kind <> 'telemetry'");
    assert_eq!(others, 0);
    assert!(gw.log().contains("ILS unreachable"), "{}", gw.log());
    let (ok, out, _) = branch.cli(&["status"]);
    assert!(ok.success());
    assert!(
        out.contains("kiosk       kiosk-01: no SC status yet; ILS unreachable 1 times, last "),
        "{out}"
    );
    // `devices` says the same under the kiosk's row (from the same code).
    let (ok, out, _) = branch.cli(&["devices"]);
    assert!(ok.success());
    let row = out
        .lines()
        .position(|l| l.starts_with("kiosk-01 "))
        .expect(&out);
    assert!(
        out.lines()
            .nth(row + 1)
            .unwrap_or("")
            .trim_start()
            .starts_with("sip2: no SC status yet; ILS unreachable 1 times, last "),
        "{out}"
    );
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// A slow ILS (60 ms per answer) and a kiosk that sends three requests in one segment:
/// the answers reach the kiosk whole, in order, unchanged.
#[test]
fn a_slow_ils_changes_no_order() {
    let ils = Ils::start_slow(false, Duration::from_millis(60));
    let listen = free_port();
    let branch = kiosk_branch(listen, ils.port);
    let gw = branch.start();
    let mut kiosk = TcpStream::connect(("127.0.0.1", listen)).unwrap();
    kiosk
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let burst = format!(
        "9900302.00\r11YN{D}{D}AOBR01|AA{PATRON}|AB3001|AC|\r09N{D}{D}APBR01|AOBR01|AB3004|AC|\r"
    );
    kiosk.write_all(burst.as_bytes()).unwrap();
    let mut got = Vec::new();
    read_answers(&mut kiosk, 3, &mut got);
    assert_eq!(got, *ils.sent.lock().unwrap());
    let codes: Vec<&str> = std::str::from_utf8(&got)
        .unwrap()
        .split('\r')
        .filter(|l| !l.is_empty())
        .map(|l| &l[..2])
        .collect();
    assert_eq!(codes, ["98", "12", "10"]);
    assert_eq!(*ils.received.lock().unwrap(), burst.as_bytes());
    drop(kiosk);
    let events = "SELECT COUNT(*) FROM messages WHERE device = 'kiosk-01' AND kind = 'events'";
    // loan, return, and the session the patron's checkout opened.
    assert_eq!(
        branch.wait_count(events, 3, Duration::from_secs(10)),
        3,
        "{}",
        gw.log()
    );
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}

/// `tls = true`: the tap speaks TLS to the ILS (here a rustls server with a test CA made
/// with rcgen, as an stunnel in front of the ILS would), the kiosk plain TCP; a kiosk's
/// exchange passes unchanged. An ILS certificate the CA did not sign: the kiosk is
/// disconnected, nothing answered.
#[test]
fn the_ils_link_can_be_tls() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server_params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let server_key = KeyPair::generate().unwrap();
    let server = server_params.signed_by(&server_key, &ca).unwrap();
    let chain = vec![server.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap();
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ils_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let config = config.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut line = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let n = match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    for &b in &buf[..n] {
                        if b != b'\r' {
                            line.push(b);
                            continue;
                        }
                        let req = String::from_utf8_lossy(&line).into_owned();
                        line.clear();
                        if let Some(a) = answer(&req) {
                            let _ = tls.write_all(format!("{a}\r").as_bytes());
                            let _ = tls.flush();
                        }
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let right = dir.path().join("ca.pem");
    std::fs::write(&right, ca.pem()).unwrap();
    let other_ca = {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    };
    let wrong = dir.path().join("other-ca.pem");
    std::fs::write(&wrong, other_ca.pem()).unwrap();
    for (ca_file, works) in [(&right, true), (&wrong, false)] {
        let listen = free_port();
        let branch = Branch::with_extra(
            &[],
            &format!(
                "[[devices]]\nid = \"kiosk-01\"\nprofile = \"self-check-kiosk\"\nsip2 = {{ listen = \"127.0.0.1:{listen}\", ils = \"127.0.0.1:{ils_port}\", tls = true, ca_file = \"{}\" }}\n",
                ca_file.display()
            ),
        );
        let gw = branch.start();
        let mut kiosk = TcpStream::connect(("127.0.0.1", listen)).unwrap();
        kiosk
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        kiosk.write_all(b"9900302.00\r").unwrap();
        let mut got = Vec::new();
        if works {
            read_answers(&mut kiosk, 1, &mut got);
            assert_eq!(got, format!("{}\r", answer("99").unwrap()).as_bytes());
        } else {
            let mut buf = [0u8; 64];
            assert_eq!(kiosk.read(&mut buf).unwrap_or(0), 0, "nothing answered");
            assert_eq!(
                branch.wait_counter("kiosk-01", "sip2_ils_unreachable", 1),
                1
            );
            assert!(gw.log().contains("ILS unreachable"), "{}", gw.log());
        }
        drop(kiosk);
        let (status, log) = gw.terminate();
        assert!(status.success(), "{log}");
    }
}

/// With `allow`, only the kiosk's address may use the tap: anyone else is closed at
/// accept and never reaches the ILS.
#[test]
fn only_the_kiosks_address_may_use_the_tap() {
    let ils = Ils::start(false);
    let listen = free_port();
    let branch = Branch::with_extra(
        &[],
        &format!(
            "[[devices]]\nid = \"kiosk-01\"\nprofile = \"self-check-kiosk\"\nsip2 = {{ listen = \"127.0.0.1:{listen}\", ils = \"127.0.0.1:{}\", allow = [\"192.0.2.7\"] }}\n",
            ils.port
        ),
    );
    let gw = branch.start();
    let mut other = TcpStream::connect(("127.0.0.1", listen)).unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = other.write_all(b"9900302.00\r");
    let mut buf = [0u8; 64];
    assert_eq!(other.read(&mut buf).unwrap_or(0), 0);
    assert_eq!(branch.wait_counter("kiosk-01", "sip2_address_denied", 1), 1);
    assert!(
        ils.received.lock().unwrap().is_empty(),
        "the ILS saw nothing"
    );
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}
