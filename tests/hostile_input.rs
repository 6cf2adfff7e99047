//! Hostile or broken input the gateway must refuse cleanly (issue 13, items 7-9), with the
//! real binary:
//! - a payload with a repeated JSON key (at any depth) is a rejected message
//!   (`duplicate_key`), never stored as accepted nor forwarded;
//! - no secret of the config (device password, API token, `hmac_secret`, upstream password)
//!   is printed by `check-config`, `run` or a refused reload, whatever the syntax error next
//!   to it: errors name the key, line and column;
//! - rejected-message details quote at most 32 characters of a value, and none for a
//!   profile with privacy fields, in the log and in SQLite;
//! - a FIFO, `/dev/zero` or an oversized file as the config, a profile or a TLS file is
//!   refused at once with an error naming it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::QoS;

const LIMIT: Duration = Duration::from_secs(20);

const DEVICE_PW: &str = "dev-pw-Planted-7731";
const API_TOKEN: &str = "api-token-Planted-0420";
const HMAC: &str = "hmac-Planted-secret-5512";
const UPSTREAM_PW: &str = "up-pw-Planted-9090";
const SECRETS: [&str; 4] = [DEVICE_PW, API_TOKEN, HMAC, UPSTREAM_PW];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn bin(args: &[&str], config: &Path) -> std::process::Output {
    run_bounded(
        Command::new(BIN).args(args).arg("--config").arg(config),
        LIMIT,
    )
}

/// A config holding every kind of secret, each on its own line.
fn planted_config(port: u16, api_port: u16, upstream_port: u16) -> String {
    format!(
        "[gateway]\nbranch_id = \"b1\"\ndata_dir = \"data\"\nprofiles_dir = \"profiles\"\n\
         [broker]\nlisten = \"127.0.0.1:{port}\"\n\
         [api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{API_TOKEN}\"\n\
         [privacy]\nhmac_secret = \"{HMAC}\"\n\
         [upstream]\nurl = \"mqtt://127.0.0.1:{upstream_port}\"\nclient_id = \"gw-b1\"\n\
         topic_prefix = \"library/b1\"\nusername = \"gw\"\npassword = \"{UPSTREAM_PW}\"\n\
         [[devices]]\nid = \"k1\"\nprofile = \"test-sensor\"\npassword = \"{DEVICE_PW}\"\n"
    )
}

/// Ways to break the line holding `secret`, and the key the error must name.
fn broken_variants(config: &str) -> Vec<(String, usize, &'static str)> {
    let mut out = Vec::new();
    for (secret, key) in [
        (DEVICE_PW, "devices[0].password"),
        (API_TOKEN, "api.token"),
        (HMAC, "privacy.hmac_secret"),
        (UPSTREAM_PW, "upstream.password"),
    ] {
        let quoted = format!("\"{secret}\"");
        let line = config.lines().position(|l| l.contains(&quoted)).unwrap() + 1;
        for broken in [
            format!("\"{secret}"),            // unterminated string
            format!("\"{secret}\" trailing"), // garbage after the value
            secret.to_owned(),                // a bare word
            format!("[\"{secret}\", 1]"),     // the wrong type
        ] {
            out.push((config.replace(&quoted, &broken), line, key));
        }
    }
    out
}

fn assert_no_secret(place: &str, output: &str) {
    for s in SECRETS {
        assert!(!output.contains(s), "{s:?} printed in {place}:\n{output}");
        // Not even a good part of it.
        assert!(
            !output.contains(&s[..12]),
            "part of {s:?} in {place}:\n{output}"
        );
    }
}

#[test]
fn check_config_and_run_never_print_a_secret() {
    let branch = Branch::new(&[]);
    let valid = planted_config(free_port(), free_port(), free_port());
    std::fs::write(branch.config(), &valid).unwrap();
    let out = bin(&["check-config"], &branch.config());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    for (broken, line, key) in broken_variants(&valid) {
        std::fs::write(branch.config(), &broken).unwrap();
        for cmd in ["check-config", "run"] {
            let out = bin(&[cmd], &branch.config());
            let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
            assert_eq!(out.status.code(), Some(1), "{cmd}: {stderr}");
            let want = format!("line {line}, column ");
            assert!(stderr.contains(&want), "{cmd}: no {want:?} in {stderr}");
            assert!(
                stderr.contains(&format!("key `{key}`")),
                "{cmd}: no key {key} in {stderr}"
            );
            assert_no_secret(cmd, &format!("{stdout}{stderr}"));
        }
    }
    // A numeric password is a value serde would quote in its message.
    let numeric = valid.replace(&format!("\"{DEVICE_PW}\""), "98765432101");
    std::fs::write(branch.config(), numeric).unwrap();
    let out = bin(&["check-config"], &branch.config());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("key `devices[0].password`: invalid type: integer, expected a string"),
        "{stderr}"
    );
    assert!(!stderr.contains("98765432101"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_prints_no_secret() {
    let branch = Branch::new(&[]);
    let valid = planted_config(branch.port, free_port(), free_port());
    std::fs::write(branch.config(), &valid).unwrap();
    let mut gw = branch.start();
    for (i, (broken, line, key)) in broken_variants(&valid).iter().enumerate() {
        std::fs::write(branch.config(), broken).unwrap();
        gw.hangup();
        gw.wait_log("reload refused", i + 1);
        let log = gw.log();
        let last = log
            .lines()
            .rfind(|l| l.contains("reload refused"))
            .unwrap()
            .to_owned();
        assert!(
            last.contains(&format!("line {line}, column "))
                && last.contains(&format!("key `{key}`")),
            "{last}"
        );
    }
    // A FIFO in place of the config: refused at once, the reload task is not stuck on it.
    let n = broken_variants(&valid).len();
    std::fs::remove_file(branch.config()).unwrap();
    mkfifo(&branch.config());
    gw.hangup();
    gw.wait_log("reload refused", n + 1);
    assert!(gw
        .log()
        .contains("refused: a FIFO (named pipe), not a regular file"));
    std::fs::remove_file(branch.config()).unwrap();
    std::fs::write(branch.config(), &valid).unwrap();
    gw.hangup();
    gw.wait_log("configuration reloaded", 1);
    assert!(gw.is_running());
    // The running config stayed: the device logs in with its password.
    drop(connect(branch.port, "k1", DEVICE_PW).await);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    assert_no_secret("the log", &log);
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Run a subcommand with at most 1 GiB of address space: reading `/dev/zero` into memory
/// would fail the allocation (an abort), not print the clean error.
fn bin_small(args: &[&str], config: &Path) -> std::process::Output {
    run_bounded(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -v 1048576 && exec \"$0\" \"$@\"")
            .arg(BIN)
            .args(args)
            .arg("--config")
            .arg(config),
        LIMIT,
    )
}

fn assert_refused(out: &std::process::Output, path: &Path, what: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&path.display().to_string()),
        "no {} in {stderr}",
        path.display()
    );
    assert!(stderr.contains(what), "no {what:?} in {stderr}");
}

#[test]
fn special_and_oversized_config_files_are_refused_at_once() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let fifo = branch.dir.path().join("fifo.toml");
    mkfifo(&fifo);
    for cmd in ["check-config", "run"] {
        let started = Instant::now();
        let out = bin(&[cmd], &fifo);
        assert_refused(
            &out,
            &fifo,
            "refused: a FIFO (named pipe), not a regular file",
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let out = bin_small(&[cmd], Path::new("/dev/zero"));
        assert_refused(
            &out,
            Path::new("/dev/zero"),
            "refused: a character device, not a regular file",
        );
    }
    // A regular file over 1 MiB (comments only: it would parse).
    let big = branch.dir.path().join("big.toml");
    let valid = std::fs::read_to_string(branch.config()).unwrap();
    let padding = "# padding padding padding padding padding padding padding padding\n";
    let mut text = valid.clone();
    while text.len() <= 1024 * 1024 {
        text.push_str(padding);
    }
    std::fs::write(&big, &text).unwrap();
    let out = bin(&["check-config"], &big);
    assert_refused(&out, &big, "refused: larger than 1 MiB");
    // Just under the limit is fine.
    text.truncate(1024 * 1024);
    let cut = text.rfind('\n').unwrap() + 1;
    text.truncate(cut);
    std::fs::write(&big, &text).unwrap();
    let out = bin(&["check-config"], &big);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn special_and_oversized_profiles_and_tls_files_are_refused_at_once() {
    let branch = Branch::new(&[device("k1", "test-sensor")]);
    let profile = branch.dir.path().join("profiles/test-sensor.json");
    std::fs::remove_file(&profile).unwrap();
    mkfifo(&profile);
    let out = bin(&["check-config"], &branch.config());
    assert_refused(
        &out,
        &profile,
        "refused: a FIFO (named pipe), not a regular file",
    );
    assert!(text(&out.stderr).contains("devices[0].profile (id \"k1\")"));
    std::fs::remove_file(&profile).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &profile).unwrap();
    let out = bin_small(&["run"], &branch.config());
    assert_refused(
        &out,
        &profile,
        "refused: a character device, not a regular file",
    );
    std::fs::remove_file(&profile).unwrap();
    let mut big = TEST_PROFILE.trim_end().trim_end_matches('}').to_owned();
    big.push_str(&format!(", \"pad\": \"{}\"}}", "x".repeat(1024 * 1024)));
    std::fs::write(&profile, big).unwrap();
    let out = bin(&["check-config"], &branch.config());
    assert_refused(&out, &profile, "refused: larger than 1 MiB");

    // The upstream CA file: a FIFO would block `run` when it sets up TLS.
    std::fs::write(&profile, TEST_PROFILE).unwrap();
    let ca = branch.dir.path().join("ca.pem");
    mkfifo(&ca);
    let cfg = std::fs::read_to_string(branch.config()).unwrap().replace(
        "[storage]\n",
        &format!(
            "[upstream]\nurl = \"mqtts://127.0.0.1:{}\"\nclient_id = \"c\"\ntopic_prefix = \"p\"\n\
             ca_file = \"ca.pem\"\n[storage]\n",
            free_port()
        ),
    );
    std::fs::write(branch.config(), cfg).unwrap();
    for cmd in ["check-config", "run"] {
        let out = bin(&[cmd], &branch.config());
        assert_refused(&out, &ca, "upstream.ca_file: ");
        assert!(
            text(&out.stderr).contains("refused: a FIFO"),
            "{}",
            text(&out.stderr)
        );
    }
}

const NESTED_PROFILE: &str = r#"{
  "name": "nested-sensor",
  "description": "telemetry with an object field",
  "telemetry": { "max_bytes": 512, "fields": {
      "raw_in": {"type": "integer", "min": 0},
      "meta": {"type": "object", "required": false}
  }}
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_keys_are_rejected_and_never_stored_or_forwarded() {
    const TOKEN: &str = "central-test-token-0123456789";
    let central = Central::start();
    let mut consumer = Consumer::start(central.port, "library/dup").await;
    let api_port = free_port();
    let extra = format!(
        "{}[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n",
        upstream_section(central.port, "library/dup")
    );
    let branch = Branch::with_extra(&[device("n1", "nested-sensor")], &extra);
    std::fs::write(
        branch.dir.path().join("profiles/nested-sensor.json"),
        NESTED_PROFILE,
    )
    .unwrap();
    let gw = branch.start();
    let mut c = connect(branch.port, "n1", "n1-pw").await;
    let payloads = [
        // Each would pass with serde_json's "last value wins".
        r#"{"raw_in":"EVIL","raw_in":1}"#,
        r#"{"raw_in":1,"meta":{"fw":"EVIL","fw":"1.0"}}"#,
        r#"{"raw_in":1,"meta":{"list":[{"a":"EVIL","a":2}]}}"#,
        r#"{"raw_in":1,"\u0072aw_in":"EVIL"}"#,
        // The one valid message, last.
        r#"{"raw_in":2,"meta":{"fw":"1.0","list":[{"a":1},{"a":2}]}}"#,
    ];
    for p in payloads {
        c.client
            .publish("devices/n1/telemetry", QoS::AtLeastOnce, false, p)
            .await
            .unwrap();
    }
    assert_eq!(c.pubacks(payloads.len(), Duration::from_secs(10)).await, 5);
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages WHERE device = 'n1' AND kind = 'telemetry'",
            1,
            Duration::from_secs(10)
        ),
        1
    );
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM rejected WHERE device = 'n1' AND reason = 'duplicate_key'",
            4,
            Duration::from_secs(10)
        ),
        4
    );
    assert_eq!(branch.count("SELECT COUNT(*) FROM rejected"), 4);
    let stored: String = branch
        .db()
        .query_row(
            "SELECT payload FROM messages WHERE device = 'n1' AND kind = 'telemetry'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, payloads[4]);
    let details: Vec<String> = branch
        .db()
        .prepare("SELECT detail FROM rejected ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        details,
        [
            "key \"raw_in\" appears twice in one object (line 1, column 25)",
            "key \"fw\" appears twice in one object (line 1, column 36)",
            "key \"a\" appears twice in one object (line 1, column 43)",
            "key \"raw_in\" appears twice in one object (line 1, column 25)",
        ]
    );
    // Counted like every other reason, and shown.
    assert_eq!(branch.counter("n1", "duplicate_key"), 4);
    assert_eq!(branch.counter("n1", "rejected"), 4);
    let (_, devices, _) = branch.cli(&["devices"]);
    assert!(
        devices.contains("duplicate_key: key \"raw_in\" appears twice"),
        "{devices}"
    );
    let (status, body) = http_get(api_port, "/api/v1/devices", Some(TOKEN));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["devices"][0]["last_rejection"], "duplicate_key");
    assert_eq!(v["devices"][0]["rejected"], 4);
    let (_, metrics) = http_get(api_port, "/metrics", Some(TOKEN));
    assert!(
        metrics.contains("branch_gateway_messages_total{outcome=\"rejected\"} 4"),
        "{metrics}"
    );

    // Exactly the valid message reaches central.
    let mut forwarded = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while forwarded.is_empty() {
        match tokio::time::timeout_at(deadline, consumer.rx.recv()).await {
            Ok(Some((topic, payload))) if topic.ends_with("/devices/n1/telemetry") => {
                forwarded.push(payload)
            }
            Ok(Some(_)) => {}
            _ => panic!("nothing forwarded\n{}", gw.log()),
        }
    }
    while let Ok(Some((topic, payload))) =
        tokio::time::timeout(Duration::from_millis(500), consumer.rx.recv()).await
    {
        if topic.ends_with("/devices/n1/telemetry") {
            forwarded.push(payload);
        }
    }
    assert_eq!(forwarded.len(), 1, "{forwarded:?}");
    let v: serde_json::Value = serde_json::from_str(&forwarded[0]).unwrap();
    assert_eq!(v["data"]["raw_in"], 2);
    assert!(!forwarded[0].contains("EVIL"));
    drop(c);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("reason=\"duplicate_key\""), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_details_quote_little_and_nothing_for_privacy_profiles() {
    const CARD: &str = "21234000000777";
    let branch = Branch::new(&[
        device("kiosk-1", "self-check-kiosk"),
        device("s1", "test-sensor"),
    ]);
    let gw = branch.start();
    let mut kiosk = connect(branch.port, "kiosk-1", "kiosk-1-pw").await;
    let mut sensor = connect(branch.port, "s1", "s1-pw").await;
    // A card number in fields without a privacy rule of a profile that has some: an enum
    // field, a key, and a repeated key (different reasons: each is logged).
    let session = |extra: &str| {
        format!(
            r#"{{"event":"session_end","session_ref":"5f0c9a1e-7b2d-4c1e","duration_s":7,"checkouts_ok":1,"checkouts_failed":0,{extra}}}"#
        )
    };
    for p in [
        session(&format!(r#""end_reason":"{CARD}""#)),
        session(&format!(r#""end_reason":"timeout","{CARD}":1"#)),
        session(&format!(r#""end_reason":"timeout","{CARD}":1,"{CARD}":2"#)),
    ] {
        kiosk
            .client
            .publish("devices/kiosk-1/events", QoS::AtLeastOnce, false, p)
            .await
            .unwrap();
    }
    assert_eq!(kiosk.pubacks(3, Duration::from_secs(10)).await, 3);
    // A plain profile: a 60-character key is quoted to 32 characters.
    let key = format!("{}{}", "a".repeat(32), "B".repeat(28));
    sensor
        .client
        .publish(
            "devices/s1/telemetry",
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"n":1,"device":"s1","{key}":1}}"#),
        )
        .await
        .unwrap();
    assert_eq!(sensor.pubacks(1, Duration::from_secs(10)).await, 1);
    assert_eq!(
        branch.wait_count("SELECT COUNT(*) FROM rejected", 4, Duration::from_secs(10)),
        4
    );
    let rows: Vec<(String, String, String, String)> = branch
        .db()
        .prepare("SELECT device, reason, detail, excerpt FROM rejected ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let kiosk_rows: Vec<(&str, &str)> = rows[..3]
        .iter()
        .map(|r| (r.1.as_str(), r.2.as_str()))
        .collect();
    assert_eq!(
        kiosk_rows,
        [
            (
                "out_of_range",
                "field `end_reason` = <withheld> is not one of the allowed values"
            ),
            ("unknown_field", "field <withheld> is not in the profile"),
            (
                "duplicate_key",
                "key <withheld> appears twice in one object (line 1, column 169)"
            ),
        ]
    );
    for r in &rows[..3] {
        assert!(!r.3.contains(CARD), "excerpt {}", r.3);
    }
    let want = format!("field \"{}…\" is not in the profile", "a".repeat(32));
    assert_eq!(
        (rows[3].1.as_str(), rows[3].2.as_str()),
        ("unknown_field", want.as_str())
    );
    let (_, devices, _) = branch.cli(&["devices"]);
    assert!(!devices.contains(CARD), "{devices}");
    drop((kiosk, sensor));
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(log.matches("message rejected").count(), 4, "{log}");
    assert!(!log.contains(CARD), "{log}");
    assert!(log.contains(&want), "{log}");
    assert!(!log.contains("aB"), "{log}");
    for entry in std::fs::read_dir(branch.dir.path().join("data")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(!bytes.windows(CARD.len()).any(|w| w == CARD.as_bytes()));
    }
}
