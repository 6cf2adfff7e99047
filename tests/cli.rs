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
