//! Serial devices end to end: the real binary reads simulated counters on real
//! pseudo-terminal pairs linked at the configured path (like /dev/serial/by-id). Split
//! lines, noise, overlong lines, bad CRCs, a 65,535 wrap, a power-cycle reset, unplug and
//! replug, a gateway restart and Modbus polling: exact rows and counters in SQLite.
//! Ptys are not safe to create in parallel, so the tests take one lock.

mod common;

use std::path::Path;
use std::time::Duration;

use branch_gateway::serial::sim::{evo_frame, modbus_reply, Pty};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static PTYS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn serial_device(id: &str, profile: &str, link: &Path) -> String {
    format!(
        "[[devices]]\nid = \"{id}\"\nprofile = \"{profile}\"\nserial = {{ path = \"{}\", baud = 9600 }}\n",
        link.display()
    )
}

const TELEMETRY: &str = "SELECT COUNT(*) FROM messages WHERE device = 'gs' AND kind = 'telemetry'";

/// (raw_in, raw_out, delta_in, delta_out, reset) of every stored telemetry row, in order.
fn rows(branch: &Branch, device: &str) -> Vec<(i64, i64, i64, i64, bool)> {
    let db = branch.db();
    let mut st = db
        .prepare(
            "SELECT payload FROM messages WHERE device = ?1 AND kind = 'telemetry' ORDER BY seq",
        )
        .unwrap();
    st.query_map([device], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|p| {
            let v: serde_json::Value = serde_json::from_str(&p.unwrap()).unwrap();
            (
                v["raw_in"].as_i64().unwrap(),
                v["raw_out"].as_i64().unwrap(),
                v["delta_in"].as_i64().unwrap(),
                v["delta_out"].as_i64().unwrap(),
                v["reset"].as_bool().unwrap(),
            )
        })
        .collect()
}

async fn write(pty: &mut Pty, bytes: &[u8]) {
    pty.master.write_all(bytes).await.unwrap();
    pty.master.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_counter_survives_noise_wraps_resets_unplug_and_restart() {
    let _guard = PTYS.lock().await;
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("usb-gate-text");
    let branch = Branch::with_extra(&[], &serial_device("gs", "gate-counter-text", &link));
    // The adapter is missing at start: logged, counted, `offline`, retried.
    let gw = branch.start();
    let offline = "SELECT COUNT(*) FROM messages WHERE device = 'gs' AND kind = 'status' AND payload = 'offline'";
    assert_eq!(
        branch.wait_count(offline, 1, Duration::from_secs(10)),
        1,
        "{}",
        gw.log()
    );
    assert!(branch.counter("gs", "serial_open_failed") >= 1);
    assert!(
        gw.log().contains("cannot open serial port; retrying"),
        "{}",
        gw.log()
    );
    let mut pty = Pty::open(&link).unwrap();
    assert_eq!(branch.wait_counter("gs", "connects", 1), 1, "{}", gw.log());

    write(&mut pty, b"IN=65530 OUT=00100\r\n").await; // baseline
    write(&mut pty, b"#$%garbage\n").await; // noise line
    write(&mut pty, b"IN=655").await; // one line in three writes
    write(&mut pty, b"33 OUT=001").await;
    write(&mut pty, b"02\r\n").await;
    write(&mut pty, b"IN=00004 OUT=00103\n").await; // IN wrapped past 65,535
    write(&mut pty, &[b'7'; 100]).await; // overlong, discarded up to its newline
    write(&mut pty, b"\n").await;
    write(&mut pty, b"IN=00000 OUT=00000\n").await; // power cycle
    write(&mut pty, b"IN=00003 OUT=00002\n").await;
    assert_eq!(
        branch.wait_count(TELEMETRY, 5, Duration::from_secs(10)),
        5,
        "{}",
        gw.log()
    );
    assert_eq!(
        rows(&branch, "gs"),
        vec![
            (65530, 100, 0, 0, false),
            (65533, 102, 3, 2, false),
            (4, 103, 7, 1, false),
            (0, 0, 0, 0, true),
            (3, 2, 3, 2, false),
        ]
    );
    assert_eq!(branch.wait_counter("gs", "serial_no_match", 1), 1);
    assert_eq!(branch.wait_counter("gs", "serial_too_long", 1), 1);

    // Unplug: the gateway sees end of file, marks the device offline and keeps trying.
    drop(pty);
    assert_eq!(
        branch.wait_count(offline, 2, Duration::from_secs(10)),
        2,
        "{}",
        gw.log()
    );
    assert_eq!(
        branch.count("SELECT online FROM devices WHERE id = 'gs'"),
        0
    );
    assert!(
        gw.log().contains("serial port closed; reopening"),
        "{}",
        gw.log()
    );
    // Replug: a new pty at the same path; counting continues from the last reading.
    let mut pty = Pty::open(&link).unwrap();
    assert_eq!(branch.wait_counter("gs", "connects", 2), 2, "{}", gw.log());
    write(&mut pty, b"IN=00005 OUT=00004\n").await;
    assert_eq!(branch.wait_count(TELEMETRY, 6, Duration::from_secs(10)), 6);
    assert_eq!(rows(&branch, "gs")[5], (5, 4, 2, 2, false));

    // Restart: the increments resume from the stored reading, nothing is counted twice.
    let (ok, _) = gw.terminate();
    assert!(ok.success());
    let gw = branch.start();
    assert_eq!(branch.wait_counter("gs", "connects", 3), 3, "{}", gw.log());
    write(&mut pty, b"IN=00006 OUT=00004\n").await;
    assert_eq!(
        branch.wait_count(TELEMETRY, 7, Duration::from_secs(10)),
        7,
        "{}",
        gw.log()
    );
    let all = rows(&branch, "gs");
    assert_eq!(all[6], (6, 4, 1, 0, false));
    let (ins, outs): (i64, i64) = all.iter().fold((0, 0), |a, r| (a.0 + r.2, a.1 + r.3));
    assert_eq!((ins, outs), (16, 7));
    let online = "SELECT COUNT(*) FROM messages WHERE device = 'gs' AND kind = 'status' AND payload = 'online'";
    assert_eq!(branch.count(online), 3);
    let (ok, _) = gw.terminate();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_with_crc_and_modbus_polling() {
    let _guard = PTYS.lock().await;
    let links = tempfile::tempdir().unwrap();
    let evo_link = links.path().join("usb-gate-evo");
    let modbus_link = links.path().join("usb-gate-modbus");
    let mut evo = Pty::open(&evo_link).unwrap();
    let mut modbus = Pty::open(&modbus_link).unwrap();
    let branch = Branch::with_extra(
        &[],
        &format!(
            "{}{}",
            serial_device("ge", "gate-counter-evo", &evo_link),
            serial_device("gm", "gate-counter-modbus", &modbus_link)
        ),
    );
    let gw = branch.start();
    assert_eq!(branch.wait_counter("ge", "connects", 1), 1, "{}", gw.log());

    let mut bad = evo_frame(1, 11, 7);
    bad[14] ^= 0x5a;
    let mut stream = vec![0x13, 0x37];
    stream.extend(evo_frame(1, 10, 7));
    stream.extend(&bad);
    stream.extend(evo_frame(1, 12, 8));
    for chunk in stream.chunks(3) {
        write(&mut evo, chunk).await;
    }
    let evo_rows = "SELECT COUNT(*) FROM messages WHERE device = 'ge' AND kind = 'telemetry'";
    assert_eq!(
        branch.wait_count(evo_rows, 2, Duration::from_secs(10)),
        2,
        "{}",
        gw.log()
    );
    assert_eq!(
        rows(&branch, "ge"),
        vec![(10, 7, 0, 0, false), (12, 8, 2, 1, false)]
    );
    assert_eq!(branch.wait_counter("ge", "serial_bad_checksum", 1), 1);

    // Modbus: leave the polls unanswered for 1.2 s (at least one times out and is
    // counted), then answer two of them.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let request = [0x01, 0x03, 0x00, 0x00, 0x00, 0x04, 0x44, 0x09];
    let mut buf = [0u8; 8];
    for reply in [(123_456u32, 122_718u32), (123_460, 122_720)] {
        tokio::time::timeout(Duration::from_secs(5), modbus.master.read_exact(&mut buf))
            .await
            .expect("a poll within 5 s")
            .unwrap();
        assert_eq!(buf, request);
        write(&mut modbus, &modbus_reply(reply.0, reply.1)).await;
    }
    let gm_rows = "SELECT COUNT(*) FROM messages WHERE device = 'gm' AND kind = 'telemetry'";
    assert_eq!(
        branch.wait_count(gm_rows, 2, Duration::from_secs(10)),
        2,
        "{}",
        gw.log()
    );
    assert_eq!(
        rows(&branch, "gm"),
        vec![
            (123_456, 122_718, 0, 0, false),
            (123_460, 122_720, 4, 2, false)
        ]
    );
    assert!(branch.counter("gm", "serial_poll_timeout") >= 1);
    let (ok, _) = gw.terminate();
    assert!(ok.success());
}

/// Commands declared in the profile are written to the port (library-level: the command
/// API for the central side comes later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_from_the_profile_reach_the_device() {
    use branch_gateway::serial::{self, decode::CounterState, SerialDevice, SerialEvent};
    let _guard = PTYS.lock().await;
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("usb-gate-cmd");
    let mut pty = Pty::open(&link).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles/gate-counter-text.json"),
    )
    .unwrap();
    let profile = branch_gateway::config::profile::Profile::from_json(&text).unwrap();
    let spec = std::sync::Arc::new(profile.serial.unwrap());
    let port: branch_gateway::config::SerialPortSection =
        toml::from_str(&format!("path = \"{}\"\nbaud = 9600\n", link.display())).unwrap();
    let (events_tx, mut events) = tokio::sync::mpsc::channel(64);
    let (cmd_tx, cmd_rx) = tokio::sync::mpsc::channel(4);
    let mut commands = serial::Commands::default();
    commands.insert("gc".into(), spec.clone(), cmd_tx);
    let stop = tokio_util::sync::CancellationToken::new();
    let reader = tokio::spawn(serial::run(
        SerialDevice {
            device: "gc".into(),
            port,
            spec,
        },
        CounterState::default(),
        events_tx,
        cmd_rx,
        stop.clone(),
    ));
    assert_eq!(
        events.recv().await,
        Some(SerialEvent::Online {
            device: "gc".into()
        })
    );
    commands.send("gc", "reset").unwrap();
    let mut got = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(5), pty.master.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"Z\r\n");
    assert_eq!(
        commands.send("gc", "self-destruct"),
        Err(serial::CommandError::Unknown {
            device: "gc".into(),
            command: "self-destruct".into()
        })
    );
    assert_eq!(
        commands.send("kiosk-01", "reset"),
        Err(serial::CommandError::NotSerial("kiosk-01".into()))
    );
    stop.cancel();
    reader.await.unwrap();
}

/// A command for a serial device (from the API, as central's would be) is its profile's
/// bytes written to the port: `delivered` once written; one not in the profile is
/// rejected and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_a_serial_device_is_written_to_its_port() {
    let _guard = PTYS.lock().await;
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("usb-gate-cmd");
    let mut pty = Pty::open(&link).unwrap();
    let api = free_port();
    const TOKEN: &str = "serial-command-token-0123456789";
    let branch = Branch::with_extra(
        &[],
        &format!(
            "{}[api]\nlisten = \"127.0.0.1:{api}\"\ntoken = \"{TOKEN}\"\n",
            serial_device("gs", "gate-counter-text", &link)
        ),
    );
    let gw = branch.start();
    assert_eq!(branch.wait_counter("gs", "connects", 1), 1, "{}", gw.log());
    let post = |body: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", api)).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "POST /api/v1/devices/gs/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw
    };
    let answer = post(r#"{"command_id":"bad-1","name":"self-destruct"}"#);
    assert!(answer.contains("unknown_command"), "{answer}");
    let answer = post(r#"{"command_id":"reset-1","name":"reset"}"#);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut got = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(10), pty.master.read_exact(&mut got))
        .await
        .expect("the command reached the port")
        .unwrap();
    assert_eq!(&got, b"Z\r\n");
    let states = "SELECT COUNT(*) FROM messages WHERE device = 'gs' AND kind = 'command'";
    // queued, sent, delivered for reset-1; rejected for bad-1.
    assert_eq!(branch.wait_count(states, 4, Duration::from_secs(10)), 4);
    let db = branch.db();
    let state: String = db
        .query_row(
            "SELECT state FROM commands WHERE command_id = 'reset-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(state, "delivered");
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
}
