//! A corrupt buffer database at start: moved aside (never deleted), a fresh one created
//! and used, `seq` continuing above every earlier one, the event in `status` and the log.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::QoS;

async fn publish(branch: &Branch, dev: &Device, from: usize, n: usize) {
    let mut c = connect(branch.port, &dev.id, &dev.password).await;
    for i in from..from + n {
        c.client
            .publish(
                format!("devices/{}/telemetry", dev.id),
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"n":{i},"device":"{}"}}"#, dev.id),
            )
            .await
            .unwrap();
    }
    assert_eq!(c.pubacks(n, Duration::from_secs(10)).await, n);
}

fn aside_files(branch: &Branch) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(branch.dir.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("branch-gateway.sqlite.corrupt-")
                && !name.ends_with("-wal")
                && !name.ends_with("-shm")
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_a_database_is_moved_aside() {
    let dev = device("gate-1", "test-sensor");
    let branch = Branch::new(std::slice::from_ref(&dev));
    std::fs::create_dir_all(branch.dir.path().join("data")).unwrap();
    let junk = b"this is not an SQLite database\n".repeat(512);
    std::fs::write(branch.db_path(), &junk).unwrap();
    let floor = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        * 1000;

    let gw = branch.start();
    assert!(gw.log().contains("BUFFER DATABASE CORRUPT"), "{}", gw.log());
    let aside = aside_files(&branch);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(&aside[0]).unwrap(),
        junk,
        "kept byte for byte"
    );

    publish(&branch, &dev, 0, 3).await;
    assert_eq!(
        branch.wait_count("SELECT COUNT(*) FROM messages", 3, Duration::from_secs(10)),
        3
    );
    let first: i64 = branch.count("SELECT MIN(seq) FROM messages");
    assert!(first > floor, "seq {first} must continue above {floor}");
    assert_eq!(branch.count("SELECT MAX(seq) - MIN(seq) FROM messages"), 2);

    let (ok, out, err) = branch.cli(&["status"]);
    assert!(ok.success(), "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("incident"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("database-moved-aside"), "{line}");
    assert!(line.contains(&aside[0].display().to_string()), "{line}");
    let (status, log) = gw.terminate();
    assert!(status.success(), "{log}");

    // A restart on the fresh database is an ordinary start.
    let gw = branch.start();
    assert!(aside_files(&branch).len() == 1);
    assert_eq!(gw.log().matches("BUFFER DATABASE CORRUPT").count(), 0);
    drop(gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_pages_are_found_at_start_and_moved_aside() {
    let dev = device("gate-1", "test-sensor");
    let branch = Branch::new(std::slice::from_ref(&dev));
    let gw = branch.start();
    publish(&branch, &dev, 0, 300).await;
    assert_eq!(
        branch.wait_count(
            "SELECT COUNT(*) FROM messages",
            300,
            Duration::from_secs(10)
        ),
        300
    );
    let (status, _) = gw.terminate();
    assert!(status.success());
    // Overwrite the second half of the file (table and index pages) with junk.
    let mut bytes = std::fs::read(branch.db_path()).unwrap();
    let half = bytes.len() / 2;
    for (i, b) in bytes[half..].iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    std::fs::write(branch.db_path(), &bytes).unwrap();

    let gw = branch.start();
    assert!(gw.log().contains("BUFFER DATABASE CORRUPT"), "{}", gw.log());
    assert_eq!(aside_files(&branch).len(), 1);
    publish(&branch, &dev, 300, 2).await;
    assert_eq!(
        branch.wait_count("SELECT COUNT(*) FROM messages", 2, Duration::from_secs(10)),
        2
    );
    assert!(branch.count("SELECT MIN(seq) FROM messages") > 300);
    drop(gw);
}
