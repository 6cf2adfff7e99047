//! A full disk under the buffer: commits fail loudly, devices are held (no PUBACK for what
//! is not committed), the process keeps running, and everything goes in once space
//! returns. Needs a small filesystem: a tmpfs mounted for the test (root only; skipped
//! with a message elsewhere).

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

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_holds_intake_and_it_resumes_when_space_returns() {
    let dev = device("gate-1", "test-sensor");
    // A short writer queue, so the device is held soon after commits start failing (the
    // queue's messages were acknowledged on intake, see README "Durability").
    let branch = Branch::with_extra(std::slice::from_ref(&dev), "queue_capacity = 256");
    let data = branch.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&data)
        .output();
    if !mounted.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): {mounted:?}");
        return;
    }
    let _mount = Mount(data.clone());
    let mut gw = branch.start();
    let pid = gw.pid();

    // Leave about 256 KiB: far less than the messages below need.
    let filler = data.join("filler");
    let fill = available_bytes(&data).saturating_sub(256 * 1024);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();

    let mut c = connect(branch.port, &dev.id, &dev.password).await;
    let topic = format!("devices/{}/telemetry", dev.id);
    let pad = "p".repeat(380);
    let publisher = {
        let client = c.client.clone();
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
    let mut acked = 0usize;

    // The disk fills: commits fail with a loud, repeated error and devices are held.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if gw.log().contains("cannot commit to the buffer") {
            break;
        }
        assert!(Instant::now() < deadline, "no commit error:\n{}", gw.log());
        drain_acks(&mut c, &mut acked, Duration::from_millis(50)).await;
    }
    drain_acks(&mut c, &mut acked, Duration::from_secs(2)).await;
    let held_at = acked;
    drain_acks(&mut c, &mut acked, Duration::from_secs(2)).await;
    assert_eq!(acked, held_at, "no PUBACK while nothing can be committed");
    assert!(acked < MESSAGES, "{acked}");
    let log = gw.log();
    let error = log
        .lines()
        .find(|l| l.contains("cannot commit to the buffer"))
        .unwrap();
    assert!(error.contains("full"), "{error}");
    eprintln!("devices held at {held_at} of {MESSAGES} acknowledged: {error}");
    assert!(gw.is_running());
    let committed = branch.count("SELECT COUNT(*) FROM messages") as usize;
    assert!(
        committed <= acked + 1,
        "committed {committed}, acked {acked}"
    );

    // Space returns: the held messages go in, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < MESSAGES {
        assert!(Instant::now() < deadline, "{acked} acked:\n{}", gw.log());
        drain_acks(&mut c, &mut acked, Duration::from_millis(200)).await;
    }
    publisher.await.unwrap();
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
    drop(c);
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

async fn drain_acks(c: &mut Client, acked: &mut usize, for_: Duration) {
    let deadline = tokio::time::Instant::now() + for_;
    loop {
        match tokio::time::timeout_at(deadline, c.events.recv()).await {
            Ok(Some(Ok(Event::Incoming(Packet::PubAck(_))))) => *acked += 1,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("device connection failed: {e}"),
            Ok(None) => panic!("device event loop ended"),
            Err(_) => return,
        }
    }
}
