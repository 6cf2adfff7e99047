//! `branch-gateway check-config` on broken configs and profiles (fixtures in
//! `tests/fixtures/check-config/`, each differing from `valid.toml` in one place): it fails,
//! and its message names the file, the key or field (and the line and column where the
//! parser knows them), and what is wrong, without quoting the file's text (which may hold
//! secrets). The shipped example config passes.
//!
//! The binary runs from an unrelated working directory, so the fixtures' relative
//! `profiles_dir` only works because it resolves against the config file's folder.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{run_bounded, BIN};

const LIMIT: Duration = Duration::from_secs(20);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    manifest_dir().join("tests/fixtures/check-config")
}

/// `check-config --config <config>`, run in `cwd`.
fn check_config(cwd: &Path, config: &Path) -> Output {
    run_bounded(
        Command::new(BIN)
            .current_dir(cwd)
            .arg("check-config")
            .arg("--config")
            .arg(config),
        LIMIT,
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Run check-config on `fixture` from a neutral folder; assert exit status 1, nothing on
/// stdout, and stderr that starts with `error: <file>: ` and contains every `expected`.
/// `file` is the fixture itself or, for a profile problem, the profile's path.
fn assert_fails(fixture: &str, file: &Path, expected: &[&str]) {
    let cwd = tempfile::tempdir().unwrap();
    let config = fixtures().join(fixture);
    let out = check_config(cwd.path(), &config);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{fixture}: {stderr}");
    assert_eq!(text(&out.stdout), "", "{fixture}: nothing on stdout");
    let prefix = format!("error: {}: ", file.display());
    assert!(
        stderr.starts_with(&prefix),
        "{fixture}: stderr should start with {prefix:?}:\n{stderr}"
    );
    for e in expected {
        assert!(
            stderr.contains(e),
            "{fixture}: stderr should contain {e:?}:\n{stderr}"
        );
    }
}

fn config_file(fixture: &str) -> PathBuf {
    fixtures().join(fixture)
}

fn profile_file(name: &str) -> PathBuf {
    fixtures().join("profiles").join(format!("{name}.json"))
}

#[test]
fn the_fixtures_base_config_is_valid() {
    let cwd = tempfile::tempdir().unwrap();
    let config = config_file("valid.toml");
    let out = check_config(cwd.path(), &config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{}: ok (2 devices, 1 profile: test-sensor)\n",
            config.display()
        )
    );
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn unknown_key_names_the_key_and_its_line() {
    assert_fails(
        "unknown-key.toml",
        &config_file("unknown-key.toml"),
        &[
            "line 8, column 1, key `broker.listne`: unknown field `listne`",
            "expected one of `listen`",
        ],
    );
}

#[test]
fn missing_required_key() {
    assert_fails(
        "missing-branch-id.toml",
        &config_file("missing-branch-id.toml"),
        // The parser points at the table that lacks the key.
        &["line 2, column 1, key `gateway`: missing field `branch_id`"],
    );
}

#[test]
fn listen_with_the_wrong_type() {
    // The value is not quoted (a value may be a secret): the key and position say where.
    let fixture = "listen-not-a-string.toml";
    assert_fails(
        fixture,
        &config_file(fixture),
        &["line 8, column 10, key `broker.listen`: invalid type: integer, expected socket address"],
    );
    let cwd = tempfile::tempdir().unwrap();
    let out = check_config(cwd.path(), &config_file(fixture));
    assert!(!text(&out.stderr).contains("1883"), "{}", text(&out.stderr));
}

#[test]
fn listen_that_is_not_an_address() {
    assert_fails(
        "listen-bad-address.toml",
        &config_file("listen-bad-address.toml"),
        &["line 8, column 10, key `broker.listen`: invalid socket address syntax"],
    );
}

#[test]
fn duplicate_device_id() {
    assert_fails(
        "duplicate-device.toml",
        &config_file("duplicate-device.toml"),
        &["devices[2].id (id \"k1\"): is used by an earlier device"],
    );
}

#[test]
fn empty_password() {
    assert_fails(
        "empty-password.toml",
        &config_file("empty-password.toml"),
        &["devices[1].password (id \"k2\"): must not be empty"],
    );
}

#[test]
fn serial_device_with_a_password_and_a_bad_baud() {
    assert_fails(
        "serial-with-password.toml",
        &config_file("serial-with-password.toml"),
        &[
            "devices[2].password (id \"gate-s\"): a serial device does not log in over MQTT",
            "devices[2].serial.baud (id \"gate-s\"): must be between 50 and 4000000",
        ],
    );
}

#[test]
fn sip2_kiosks_are_checked() {
    assert_fails(
        "sip2-bad.toml",
        &config_file("sip2-bad.toml"),
        &[
            "devices[2].password (id \"kiosk-a\"): a SIP2 kiosk does not log in over MQTT",
            "devices[2].sip2.ils (id \"kiosk-a\"): must be host:port",
            "devices[3].sip2.listen (id \"kiosk-b\"): is used by an earlier kiosk",
            "devices[3].sip2.ca_file (id \"kiosk-b\"): only with tls = true",
        ],
    );
}

#[test]
fn serial_device_whose_profile_cannot_decode_serial() {
    assert_fails(
        "serial-profile-without-serial.toml",
        &config_file("serial-profile-without-serial.toml"),
        &["devices[2].serial (id \"gate-s\"): profile \"test-sensor\" has no `serial` section"],
    );
}

#[test]
fn hashed_patron_field_without_a_secret() {
    assert_fails(
        "privacy-secret-missing.toml",
        &config_file("privacy-secret-missing.toml"),
        &["privacy.hmac_secret: is required: profile \"hashing-sensor\" hashes `events.card`"],
    );
}

#[test]
fn malformed_argon2_hash() {
    let fixture = "bad-argon2-hash.toml";
    assert_fails(
        fixture,
        &config_file(fixture),
        &[
            "devices[1].password (id \"k2\"): looks like an argon2 hash but does not parse",
            "salt invalid",
        ],
    );
    // The password itself is never echoed.
    let cwd = tempfile::tempdir().unwrap();
    let out = check_config(cwd.path(), &config_file(fixture));
    assert!(!text(&out.stderr).contains("not*base64"));
}

#[test]
fn profile_file_missing() {
    let missing = profile_file("no-such-profile");
    assert_fails(
        "profile-missing.toml",
        &config_file("profile-missing.toml"),
        &[
            "devices[1].profile (id \"k2\"): profile \"no-such-profile\": cannot read",
            &missing.display().to_string(),
            "No such file or directory",
        ],
    );
}

#[test]
fn profile_missing_path_resolves_against_the_config_folder() {
    // A relative --config: the profile path shown is relative to the same folder.
    let out = check_config(
        &manifest_dir().join("tests/fixtures"),
        Path::new("check-config/profile-missing.toml"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with(
            "error: check-config/profile-missing.toml: devices[1].profile (id \"k2\"): \
             profile \"no-such-profile\": cannot read check-config/profiles/no-such-profile.json: "
        ),
        "{}",
        text(&out.stderr)
    );
    let out = check_config(
        &manifest_dir().join("tests/fixtures"),
        Path::new("check-config/valid.toml"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "check-config/valid.toml: ok (2 devices, 1 profile: test-sensor)\n"
    );
}

#[test]
fn profile_with_an_unknown_key() {
    assert_fails(
        "profile-unknown-key.toml",
        &profile_file("typo-sensor"),
        &[
            "unknown field `requred`",
            "expected one of `type`, `required`",
            "at line 6 column 44",
        ],
    );
}

#[test]
fn profile_with_min_above_max() {
    assert_fails(
        "profile-min-above-max.toml",
        &profile_file("inverted-range"),
        &["telemetry.fields.temp_c: min 90 is greater than max -20"],
    );
}

#[test]
fn profile_named_differently_from_its_file() {
    assert_fails(
        "profile-name-mismatch.toml",
        &profile_file("renamed-sensor"),
        &["name: is \"old-sensor-name\" but the file is named \"renamed-sensor\""],
    );
}

#[test]
fn shipped_example_config_passes() {
    let out = check_config(manifest_dir(), Path::new("gateway.example.toml"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "gateway.example.toml: ok (16 devices, 7 profiles: catalogue-kiosk, gate-counter, \
         gate-counter-text, lobby-screen, reading-booth, self-check-kiosk, touch-navigator)\n"
    );
    assert_eq!(text(&out.stderr), "");
    // The same from elsewhere, by absolute path: data and profiles resolve next to it.
    let cwd = tempfile::tempdir().unwrap();
    let out = check_config(cwd.path(), &manifest_dir().join("gateway.example.toml"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(": ok (16 devices, 7 profiles: "),
        "{}",
        text(&out.stdout)
    );
}
