//! The systemd unit and the Debian package, checked with the real tools: `systemd-analyze`
//! (verify, and the offline security rating), `cargo deb`, `dpkg-deb`. The package is
//! built once (into `target/tmp/packaging/`), its file list, modes, control files and
//! maintainer scripts are compared with what they must be, and the extracted tree's own
//! binary checks its own config.
//!
//! Only a missing tool skips a test, with a message on stderr: `scripts/test` installs
//! systemd, dpkg-dev and cargo-deb, so CI runs all of them.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use common::{run_bounded, BIN};

const UNIT: &str = "systemd/branch-gateway.service";
const PACKAGED_BIN: &str = "/usr/bin/branch-gateway";
/// The issue's bar for `systemd-analyze security` (0 = fully locked down, 10 = exposed).
const MAX_EXPOSURE: f64 = 1.5;
const TOOL_LIMIT: Duration = Duration::from_secs(60);
/// `cargo deb` builds the release binary when it is not up to date (3-4 minutes on 2 cores).
const BUILD_LIMIT: Duration = Duration::from_secs(900);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Run a tool, panicking with its output unless it exits 0.
fn run_ok(cmd: &mut Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let out = run_bounded(cmd, limit);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Whether `program args` starts and exits 0 (the tool is installed and works).
fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn have_systemd_analyze() -> bool {
    if works("systemd-analyze", &["--version"]) {
        return true;
    }
    eprintln!("SKIPPED: systemd-analyze is not installed (Debian package `systemd`; scripts/test installs it)");
    false
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The unit's `Key=value` lines, in order (comments and section headers left out).
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not Key=value: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn unit_declares_what_the_daemon_and_the_package_rely_on() {
    let unit = std::fs::read_to_string(manifest_dir().join(UNIT)).unwrap();
    let settings = unit_settings(&unit);
    let values = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let config = "--config /etc/branch-gateway/gateway.toml";
    for (key, want) in [
        ("Type", vec!["notify"]),
        ("NotifyAccess", vec!["main"]),
        ("WatchdogSec", vec!["30s"]),
        ("Restart", vec!["on-failure"]),
        ("TimeoutStopSec", vec!["30"]),
        (
            "ExecStartPre",
            vec![
                "+-/sbin/modprobe -qa usbserial cdc_acm",
                &*format!("{PACKAGED_BIN} check-config {config}"),
            ],
        ),
        ("TimeoutStartSec", vec!["15min"]),
        ("ExecStart", vec![&*format!("{PACKAGED_BIN} run {config}")]),
        ("ExecReload", vec!["/bin/kill -HUP $MAINPID"]),
        ("User", vec!["branch-gateway"]),
        ("Group", vec!["branch-gateway"]),
        ("DynamicUser", vec![]),
        ("SupplementaryGroups", vec!["dialout"]),
        ("StateDirectory", vec!["branch-gateway"]),
        ("ConfigurationDirectory", vec!["branch-gateway"]),
        ("DevicePolicy", vec!["closed"]),
        (
            "DeviceAllow",
            vec!["char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw"],
        ),
        ("PrivateDevices", vec![]),
        ("RestrictAddressFamilies", vec!["AF_INET AF_INET6 AF_UNIX"]),
        ("MemoryDenyWriteExecute", vec!["yes"]),
        (
            "SystemCallFilter",
            vec!["@system-service", "~@privileged @resources"],
        ),
        ("ProtectSystem", vec!["strict"]),
        ("LimitNOFILE", vec!["8192"]),
        ("MemoryHigh", vec!["384M"]),
        ("MemoryMax", vec!["512M"]),
        ("WantedBy", vec!["multi-user.target"]),
    ] {
        assert_eq!(values(key), want, "{key}= in {UNIT}");
    }

    // The shipped config's connections (devices and API) fit the unit's open-files limit,
    // with the headroom the daemon checks at start.
    let nofile: u64 = values("LimitNOFILE")[0].parse().unwrap();
    let shipped = manifest_dir().join("packaging/gateway.toml");
    let cfg =
        branch_gateway::config::Config::parse(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
    let api = cfg.api.as_ref().map_or(0, |a| a.max_fds());
    let needed = (cfg.broker.max_connections + api) as u64 + branch_gateway::service::FD_HEADROOM;
    assert!(
        needed <= nofile,
        "{needed} descriptors needed, LimitNOFILE={nofile}"
    );

    // The account the unit runs as is the one the package creates.
    let sysusers =
        std::fs::read_to_string(manifest_dir().join("systemd/branch-gateway.sysusers")).unwrap();
    let entries: Vec<&str> = sysusers
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        entries,
        [r#"u branch-gateway - "branch-gateway daemon" /var/lib/branch-gateway /usr/sbin/nologin"#]
    );
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !have_systemd_analyze() {
        return;
    }
    // verify checks that every Exec* program exists. The unit names the installed path
    // (/usr/bin/branch-gateway), so a copy names the binary this test run built instead;
    // nothing else in it changes.
    let unit = std::fs::read_to_string(manifest_dir().join(UNIT)).unwrap();
    assert_eq!(
        unit.matches(PACKAGED_BIN).count(),
        2,
        "ExecStartPre and ExecStart"
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("branch-gateway.service");
    std::fs::write(&copy, unit.replace(PACKAGED_BIN, BIN)).unwrap();

    let out = run_bounded(
        Command::new("systemd-analyze").arg("verify").arg(&copy),
        TOOL_LIMIT,
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (Some(0), String::new(), String::new()),
        "systemd-analyze verify must pass with no message"
    );
}

/// The number in `→ Overall exposure level for branch-gateway.service: 1.5 OK 🙂`.
fn overall_exposure(report: &str) -> f64 {
    let prefix = "Overall exposure level for branch-gateway.service: ";
    let line = report
        .lines()
        .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{report}"));
    let number = line.split_whitespace().next().unwrap();
    number
        .parse()
        .unwrap_or_else(|e| panic!("{number:?} in {line:?}: {e}"))
}

#[test]
fn unit_exposure_is_rated_at_most_1_5() {
    if !have_systemd_analyze() {
        return;
    }
    let out = run_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(manifest_dir().join(UNIT)),
        TOOL_LIMIT,
    );
    let report = text(&out.stdout);
    let exposure = overall_exposure(&report);
    eprintln!("systemd-analyze security --offline=yes: overall exposure {exposure}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
    );
    // The settings that carry the most weight are in force, as the report reads them.
    for passed in [
        "✓ User=/DynamicUser=",
        "✓ NoNewPrivileges=",
        "✓ ProtectSystem=",
        "✓ ProtectHome=",
        "✓ MemoryDenyWriteExecute=",
        "✓ SystemCallFilter=~@privileged",
        "✓ RestrictAddressFamilies=~AF_PACKET",
        "✓ CapabilityBoundingSet=~CAP_SYS_ADMIN",
    ] {
        assert!(
            report.lines().any(|l| l.starts_with(passed)),
            "no {passed:?} line in:\n{report}"
        );
    }
}

#[test]
fn overall_exposure_reads_the_rating_line() {
    let report = "✗ PrivateNetwork=  Service has access to the host's network  0.5\n\n\
                  → Overall exposure level for branch-gateway.service: 1.5 OK 🙂\n";
    assert_eq!(overall_exposure(report), 1.5);
}

/// The package built by `cargo deb` (once for this test binary), or None when cargo-deb
/// is missing.
struct Package {
    deb: PathBuf,
    /// Where the tests unpack it.
    work: PathBuf,
}

fn package() -> Option<&'static Package> {
    static PACKAGE: OnceLock<Option<Package>> = OnceLock::new();
    PACKAGE.get_or_init(build_package).as_ref()
}

fn build_package() -> Option<Package> {
    if !works(&cargo(), &["deb", "--version"]) {
        eprintln!("SKIPPED: cargo-deb is not installed (`cargo install cargo-deb --locked`; scripts/test installs it)");
        return None;
    }
    // A fresh folder each run, so no older .deb is picked up.
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packaging");
    if work.exists() {
        std::fs::remove_dir_all(&work).unwrap();
    }
    let out_dir = work.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    // Builds the release binary first when it is out of date (a no-op after scripts/test's
    // release build), so the package always holds the current code.
    run_ok(
        Command::new(cargo())
            .current_dir(manifest_dir())
            .args(["deb", "--output"])
            .arg(&out_dir)
            .args(["--", "--locked"]),
        BUILD_LIMIT,
    );
    let arch = text(&run_ok(Command::new("dpkg").arg("--print-architecture"), TOOL_LIMIT).stdout)
        .trim()
        .to_string();
    let built: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let name = format!("branch-gateway_{}-1_{arch}.deb", env!("CARGO_PKG_VERSION"));
    assert_eq!(built, std::slice::from_ref(&name), "cargo deb's output");
    Some(Package {
        deb: out_dir.join(name),
        work,
    })
}

/// Every shipped device profile's file name (device-profiles/*.json).
fn shipped_profiles() -> BTreeSet<String> {
    std::fs::read_dir(manifest_dir().join("device-profiles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect()
}

#[test]
fn package_holds_exactly_the_expected_files() {
    let Some(pkg) = package() else { return };
    let listing =
        text(&run_ok(Command::new("dpkg-deb").arg("-c").arg(&pkg.deb), TOOL_LIMIT).stdout);
    // `-rwxr-xr-x 0/0  10687960 2026-01-01 00:00 ./usr/bin/branch-gateway`: mode, owner, path.
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.len(), 6, "unexpected dpkg-deb -c line: {line}");
        if cols[0].starts_with('d') {
            continue;
        }
        let path = cols[5].strip_prefix("./").unwrap().to_string();
        files.insert((path, cols[0].to_string(), cols[1].to_string()));
    }
    let file = |path: &str, mode: &str| (path.to_string(), mode.to_string(), "0/0".to_string());
    let mut want: BTreeSet<_> = [
        file("usr/bin/branch-gateway", "-rwxr-xr-x"),
        file(
            "usr/lib/systemd/system/branch-gateway.service",
            "-rw-r--r--",
        ),
        file("usr/lib/sysusers.d/branch-gateway.conf", "-rw-r--r--"),
        // Secrets: postinst gives it group branch-gateway so the service can read it.
        file("etc/branch-gateway/gateway.toml", "-rw-r-----"),
        file("usr/share/doc/branch-gateway/README.md", "-rw-r--r--"),
        // cargo-deb writes the copyright file from Cargo.toml's license.
        file("usr/share/doc/branch-gateway/copyright", "-rw-r--r--"),
    ]
    .into_iter()
    .collect();
    let profiles = shipped_profiles();
    assert_eq!(profiles.len(), 9, "device-profiles/*.json");
    for p in &profiles {
        want.insert(file(
            &format!("usr/share/branch-gateway/device-profiles/{p}"),
            "-rw-r--r--",
        ));
    }
    assert_eq!(files, want, "dpkg-deb -c {}", pkg.deb.display());
}

#[test]
fn package_control_marks_the_conffile_and_carries_the_maintainer_scripts() {
    let Some(pkg) = package() else { return };
    let fields = text(
        &run_ok(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&pkg.deb)
                .args(["Package", "Version", "Section"]),
            TOOL_LIMIT,
        )
        .stdout,
    );
    assert_eq!(
        fields,
        format!(
            "Package: branch-gateway\nVersion: {}-1\nSection: net\n",
            env!("CARGO_PKG_VERSION")
        )
    );
    let depends = text(
        &run_ok(
            Command::new("dpkg-deb")
                .args(["-f"])
                .arg(&pkg.deb)
                .arg("Depends"),
            TOOL_LIMIT,
        )
        .stdout,
    );
    let depends: BTreeSet<&str> = depends
        .trim()
        .split(", ")
        .map(|d| d.split(' ').next().unwrap())
        .collect();
    assert!(depends.contains("systemd"), "Depends: {depends:?}");
    assert!(depends.contains("libc6"), "Depends: {depends:?}");

    let control = pkg.work.join("control");
    run_ok(
        Command::new("dpkg-deb")
            .arg("-e")
            .arg(&pkg.deb)
            .arg(&control),
        TOOL_LIMIT,
    );
    let names: BTreeSet<String> = std::fs::read_dir(&control)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = ["conffiles", "control", "postinst", "postrm", "prerm"]
        .map(String::from)
        .into();
    assert_eq!(names, want, "dpkg-deb -e");
    let read = |name: &str| std::fs::read_to_string(control.join(name)).unwrap();
    assert_eq!(read("conffiles"), "/etc/branch-gateway/gateway.toml\n");

    // dpkg -I lists the same members, the scripts marked executable:
    // `    5841 bytes,   132 lines   *  postinst             #!/bin/sh`.
    let info = text(&run_ok(Command::new("dpkg-deb").arg("-I").arg(&pkg.deb), TOOL_LIMIT).stdout);
    let listed: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_once(" lines "))
        .map(|(_, member)| {
            let words: Vec<&str> = member.split_whitespace().collect();
            match words[..] {
                ["*", name, ..] => format!("{name} (executable)"),
                [name, ..] => name.to_string(),
                [] => panic!("dpkg-deb -I line without a member:\n{info}"),
            }
        })
        .collect();
    assert_eq!(
        listed,
        [
            "conffiles",
            "control",
            "postinst (executable)",
            "postrm (executable)",
            "prerm (executable)"
        ],
        "dpkg-deb -I:\n{info}"
    );

    for script in ["postinst", "postrm", "prerm"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(control.join(script))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{script} mode");
        // Valid shell, and every #DEBHELPER# token replaced by cargo-deb's fragments.
        run_ok(
            Command::new("sh").arg("-n").arg(control.join(script)),
            TOOL_LIMIT,
        );
        assert!(!read(script).contains("#DEBHELPER#"), "{script}");
    }
    // Each generated section once: the token appears only where it is meant to expand.
    for (script, sections) in [("postinst", 3), ("postrm", 2), ("prerm", 1)] {
        assert_eq!(
            read(script)
                .matches("# Automatically added by cargo-deb")
                .count(),
            sections,
            "{script}:\n{}",
            read(script)
        );
    }

    let postinst = read("postinst");
    let postinst_lines: Vec<&str> = postinst.lines().map(str::trim).collect();
    // Ours first (account, state directory, config permissions), then cargo-deb's.
    let ordered = [
        r#"systemd-sysusers ${DPKG_ROOT:+--root="$DPKG_ROOT"} branch-gateway.conf"#,
        "install -d -o branch-gateway -g branch-gateway -m 0750 /var/lib/branch-gateway",
        r#"chown root:branch-gateway "$conf""#,
        r#"chmod 0640 "$conf""#,
        "deb-systemd-helper enable branch-gateway.service >/dev/null || true",
        "_dh_action=restart",
        "deb-systemd-invoke $_dh_action branch-gateway.service >/dev/null || true",
    ];
    let positions: Vec<usize> = ordered
        .iter()
        .map(|want| {
            postinst_lines
                .iter()
                .position(|l| l == want)
                .unwrap_or_else(|| panic!("postinst has no line {want:?}:\n{postinst}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "postinst lines out of order {positions:?}:\n{postinst}"
    );

    // Upgrades restart the service (prerm stops it only on remove).
    let prerm = read("prerm");
    assert!(
        prerm.contains(r#"if [ -d /run/systemd/system ] && [ "$1" = remove ]; then"#),
        "{prerm}"
    );
    assert!(
        prerm.contains("deb-systemd-invoke stop branch-gateway.service"),
        "{prerm}"
    );

    // The buffer is deleted on purge only.
    let postrm = read("postrm");
    let purge_block = postrm
        .split(r#"if [ "$1" = "purge" ]; then"#)
        .map(|block| block.split("\nfi").next().unwrap())
        .collect::<Vec<_>>();
    assert!(
        purge_block[1..].iter().any(|b| b
            .lines()
            .map(str::trim)
            .any(|l| l == "rm -rf /var/lib/branch-gateway")),
        "postrm must delete the buffer inside `purge`:\n{postrm}"
    );
    assert_eq!(postrm.matches("rm -rf").count(), 1, "{postrm}");
    assert!(
        postrm.contains("deb-systemd-helper purge branch-gateway.service"),
        "{postrm}"
    );
}

#[test]
fn extracted_package_checks_its_own_config() {
    let Some(pkg) = package() else { return };
    let root = pkg.work.join("root");
    run_ok(
        Command::new("dpkg-deb").arg("-x").arg(&pkg.deb).arg(&root),
        TOOL_LIMIT,
    );

    // What is unpacked is what the repository holds.
    let same = |packaged: &str, source: &str| {
        assert_eq!(
            std::fs::read(root.join(packaged)).unwrap(),
            std::fs::read(manifest_dir().join(source)).unwrap(),
            "{packaged} differs from {source}"
        );
    };
    same("usr/lib/systemd/system/branch-gateway.service", UNIT);
    same(
        "usr/lib/sysusers.d/branch-gateway.conf",
        "systemd/branch-gateway.sysusers",
    );
    same("etc/branch-gateway/gateway.toml", "packaging/gateway.toml");
    same("usr/share/doc/branch-gateway/README.md", "README.md");
    for p in shipped_profiles() {
        same(
            &format!("usr/share/branch-gateway/device-profiles/{p}"),
            &format!("device-profiles/{p}"),
        );
    }

    // The installed config names installed paths; inside the scratch root they move
    // under it, and nothing else changes.
    let installed = std::fs::read_to_string(root.join("etc/branch-gateway/gateway.toml")).unwrap();
    let mut config = installed.clone();
    for dir in [
        "/var/lib/branch-gateway",
        "/usr/share/branch-gateway/device-profiles",
    ] {
        let quoted = format!("\"{dir}\"");
        assert_eq!(
            installed.matches(&quoted).count(),
            1,
            "{dir} in gateway.toml"
        );
        let moved = format!("\"{}{dir}\"", root.display());
        config = config.replace(&quoted, &moved);
    }
    let scratch_config = root.join("etc/branch-gateway/gateway.scratch.toml");
    std::fs::write(&scratch_config, config).unwrap();

    let binary = root.join("usr/bin/branch-gateway");
    let out = run_bounded(
        Command::new(&binary)
            .current_dir(&pkg.work)
            .arg("check-config")
            .arg("--config")
            .arg(&scratch_config),
        TOOL_LIMIT,
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (
            Some(0),
            format!("{}: ok (0 devices, 0 profiles)\n", scratch_config.display()),
            String::new()
        ),
        "the packaged binary on the packaged config"
    );
}
