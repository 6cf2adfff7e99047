//! A full disk under the buffer: commits fail loudly, devices are held (no PUBACK for what
//! is not committed), the process keeps running, and everything goes in once space
//! returns; a stop while the disk stays full ends in bounded time and counts what it gave
//! up. Needs a small filesystem: a tmpfs mounted for the test (root only; skipped with a
//! message elsewhere).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{Event, Packet, QoS};

const MESSAGES: usize = 3000;

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn available_bytes(path: &std::path::Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A gateway whose data directory is a 64 MiB tmpfs, filled up to 256 KiB free, and one
/// device publishing `MESSAGES` padded messages. Returns `None` where tmpfs cannot be
/// mounted.
struct FullDisk {
    branch: Branch,
    data: std::path::PathBuf,
    filler: std::path::PathBuf,
    gw: Gateway,
    device: Client,
    publisher: tokio::task::JoinHandle<()>,
    _mount: Mount,
}

async fn full_disk() -> Option<FullDisk> {
    let dev = device("gate-1", "test-sensor");
    // A short writer queue, so the device is held soon after commits start failing (the
    // queue's messages were acknowledged on intake, see README "Durability").
    let branch = Branch::with_extra(std::slice::from_ref(&dev), "queue_capacity = 256");
    let data = branch.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Room enough, once the filler is gone, for the WAL to grow without a checkpoint.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&data)
        .output();
    if !mounted.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): {mounted:?}");
        return None;
    }
    let mount = Mount(data.clone());
    let gw = branch.start();

    // Leave about 256 KiB: far less than the messages below need.
    let filler = data.join("filler");
    let fill = available_bytes(&data).saturating_sub(256 * 1024);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();

    let device = connect(branch.port, &dev.id, &dev.password).await;
    let topic = format!("devices/{}/telemetry", dev.id);
    let pad = "p".repeat(380);
    let publisher = {
        let client = device.client.clone();
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                let body = format!(r#"{{"n":{n},"device":"gate-1","pad":"{pad}"}}"#);
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, body)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    Some(FullDisk {
        branch,
        data,
        filler,
        gw,
        device,
        publisher,
        _mount: mount,
    })
}

/// Wait for the first failed commit, then until no PUBACK came for 2 s; returns the
/// number of PUBACKs the device got and of publishes it wrote to the wire.
async fn held(fd: &mut FullDisk) -> (usize, usize) {
    let mut t = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if fd.gw.log().contains("cannot commit to the buffer") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no commit error:\n{}",
            fd.gw.log()
        );
        drain_acks(&mut fd.device, &mut t, Duration::from_millis(50)).await;
    }
    drain_acks(&mut fd.device, &mut t, Duration::from_secs(2)).await;
    let held_at = t.acked;
    drain_acks(&mut fd.device, &mut t, Duration::from_secs(2)).await;
    assert_eq!(t.acked, held_at, "no PUBACK while nothing can be committed");
    assert!(t.acked < MESSAGES, "{}", t.acked);
    (t.acked, t.sent)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_holds_intake_and_it_resumes_when_space_returns() {
    let Some(mut fd) = full_disk().await else {
        return;
    };
    let pid = fd.gw.pid();
    let (mut acked, _) = held(&mut fd).await;
    let (branch, gw, c, filler) = (&fd.branch, &mut fd.gw, &mut fd.device, &fd.filler);

    // The disk filled: commits fail with a loud, repeated error and devices are held.
    let log = gw.log();
    let error = log
        .lines()
        .find(|l| l.contains("cannot commit to the buffer"))
        .unwrap();
    assert!(error.contains("full"), "{error}");
    eprintln!("devices held at {acked} of {MESSAGES} acknowledged: {error}");
    assert!(gw.is_running());
    let committed = branch.count("SELECT COUNT(*) FROM messages") as usize;
    assert!(
        committed <= acked + 1,
        "committed {committed}, acked {acked}"
    );

    // Space returns: the held messages go in, without a restart.
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < MESSAGES {
        assert!(Instant::now() < deadline, "{acked} acked:\n{}", gw.log());
        let mut t = Tally { acked, sent: 0 };
        drain_acks(c, &mut t, Duration::from_millis(200)).await;
        acked = t.acked;
    }
    (&mut fd.publisher).await.unwrap();
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages",
            MESSAGES as i64,
            Duration::from_secs(10)
        ),
        MESSAGES as i64
    );
    assert_eq!(
        branch.count("SELECT COUNT(DISTINCT json_extract(payload, '$.n')) FROM messages"),
        MESSAGES as i64
    );
    assert!(gw.is_running());
    assert_eq!(gw.pid(), pid);
    let FullDisk { gw, device, .. } = fd;
    drop(device);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// Stopping while the disk stays full: the writer retries for 20 s, then gives up what it
/// holds, logs and counts it, and the process exits non-zero well before systemd's
/// 90 s stop timeout. Every message the device saw acknowledged is either committed or
/// in that count; devices held in the queue are disconnected without an acknowledgement.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_on_a_full_disk_ends_in_time_and_counts_what_it_gave_up() {
    let Some(mut fd) = full_disk().await else {
        return;
    };
    let (acked, sent) = held(&mut fd).await;
    let FullDisk {
        branch,
        data,
        gw,
        device,
        _mount,
        ..
    } = fd;
    let started = Instant::now();
    let (status, log) = gw.terminate_within(Duration::from_secs(40));
    let took = started.elapsed();
    drop(device);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(took >= Duration::from_secs(19), "{took:?}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    let lost: usize = log
        .lines()
        .filter(|l| l.contains("stopping without committing accepted messages"))
        .map(|l| {
            let v = l.split("lost=").nth(1).unwrap();
            v.split_whitespace()
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert!(lost > 0, "{log}");
    assert!(
        log.contains(&format!(
            "{lost} accepted messages could not be committed before the stop"
        )),
        "{log}"
    );
    // Read what was committed (with room again, so SQLite can open the WAL).
    std::fs::remove_file(data.join("filler")).unwrap();
    let committed = branch.count("SELECT COUNT(*) FROM messages") as usize;
    eprintln!("acked {acked}, sent {sent}, committed {committed}, given up at the stop {lost}");
    assert!(
        committed + lost >= acked,
        "acked {acked}, committed {committed}, lost {lost}"
    );
    // At most what the device wrote: captured, but the PUBACK never left.
    assert!(
        committed + lost <= sent,
        "acked {acked}, committed {committed}, lost {lost}"
    );
}

/// PUBACKs received and publishes written by the device so far.
#[derive(Default)]
struct Tally {
    acked: usize,
    sent: usize,
}

async fn drain_acks(c: &mut Client, t: &mut Tally, for_: Duration) {
    let deadline = tokio::time::Instant::now() + for_;
    loop {
        match tokio::time::timeout_at(deadline, c.events.recv()).await {
            Ok(Some(Ok(Event::Incoming(Packet::PubAck(_))))) => t.acked += 1,
            Ok(Some(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))))) => t.sent += 1,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("device connection failed: {e}"),
            Ok(None) => panic!("device event loop ended"),
            Err(_) => return,
        }
    }
}
