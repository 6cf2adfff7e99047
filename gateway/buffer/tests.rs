use super::commit::seq_runs;
use super::retention::prune_delivered;
use super::rollups::DistinctSlot;
use super::*;
use crate::model::Kind;
use rusqlite::Connection;

const DAY: i64 = 86_400_000;

fn message(received_ms: i64) -> Write {
    Write::Accepted(
        Accepted {
            device: "gate-1".into(),
            profile: "gate-counter".into(),
            kind: crate::model::Kind::Telemetry,
            received_ms,
            payload: r#"{"in":1}"#.into(),
            rollup_ms: None,
            contributions: Default::default(),
        },
        None,
    )
}

/// A buffer with a small queue, a week's retention and one configured device, `gate-1`.
fn open_test_buffer(path: &Path) -> Buffer {
    open_test_buffer_with(path, true)
}

fn open_test_buffer_with(path: &Path, rollups: bool) -> Buffer {
    let options = BufferOptions {
        synchronous: Synchronous::Normal,
        rejected_keep: 100,
        queue_capacity: 64,
        max_bytes: 1 << 30,
        keep_delivered: Duration::from_millis(7 * DAY as u64),
        live: None,
        rollup_tz: jiff::tz::TimeZone::UTC,
        rollups,
        commands: None,
    };
    Buffer::open(path, options, &[("gate-1".into(), "gate-counter".into())]).unwrap()
}

fn seqs_left(path: &Path) -> Vec<i64> {
    let conn = open_read_only(path).unwrap();
    let mut st = conn
        .prepare("SELECT seq FROM messages ORDER BY seq")
        .unwrap();
    let rows = st.query_map([], |r| r.get(0)).unwrap();
    rows.collect::<rusqlite::Result<_>>().unwrap()
}

/// `[storage] rollups = false` stores messages and no rollup rows; switched back on,
/// the next message fills its four buckets (device and branch, hour and day).
#[test]
fn rollups_can_be_switched_off() {
    let dir = std::env::temp_dir().join(format!("bgw-no-rollups-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("buffer.sqlite");
    let counted = |at_ms: i64| {
        let Write::Accepted(mut m, _) = message(at_ms) else {
            unreachable!()
        };
        m.rollup_ms = Some(at_ms);
        Write::Accepted(m, None)
    };
    let count = |sql: &str| -> i64 {
        open_read_only(&path)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    };
    let now = 1_795_575_600_000i64;
    let buffer = open_test_buffer_with(&path, false);
    buffer.sender().blocking_send(counted(now)).unwrap();
    buffer.close().unwrap();
    assert_eq!(count("SELECT COUNT(*) FROM messages"), 1);
    assert_eq!(count("SELECT COUNT(*) FROM rollup_buckets"), 0);
    let buffer = open_test_buffer_with(&path, true);
    buffer.sender().blocking_send(counted(now)).unwrap();
    buffer.close().unwrap();
    assert_eq!(count("SELECT COUNT(*) FROM rollup_buckets"), 4);
    assert_eq!(
        count("SELECT CAST(SUM(value) AS INTEGER) FROM rollups WHERE metric = 'messages'"),
        4
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Retention removes exactly the rows delivered longer ago than `keep_delivered`:
/// never an undelivered one, and rows delivered late (after an older walk passed them)
/// on a later pass.
#[test]
fn retention_prunes_only_rows_delivered_before_the_cutoff() {
    let dir = std::env::temp_dir().join(format!("bgw-retention-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("buffer.sqlite");
    let open = || open_test_buffer(&path);
    let now = crate::model::now_ms();
    let buffer = open();
    let tx = buffer.sender();
    // seq 1..=10 received ten days ago, 11..=15 now.
    for _ in 0..10 {
        tx.blocking_send(message(now - 10 * DAY)).unwrap();
    }
    for _ in 0..5 {
        tx.blocking_send(message(now)).unwrap();
    }
    let delivered = |seqs: Vec<i64>, at_ms| Write::Delivered { seqs, at_ms };
    tx.blocking_send(delivered(vec![1, 2, 3, 4, 5], now - 8 * DAY))
        .unwrap();
    tx.blocking_send(delivered(vec![6, 7], now - DAY)).unwrap();
    tx.blocking_send(delivered(vec![11, 12], now)).unwrap();
    tx.blocking_send(Write::Maintain).unwrap();
    drop(tx);
    buffer.close().unwrap();
    assert_eq!(seqs_left(&path), vec![6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);

    // seq 9 is delivered long ago after all (late mark): the next pass finds it.
    let buffer = open();
    let tx = buffer.sender();
    tx.blocking_send(delivered(vec![9], now - 9 * DAY)).unwrap();
    tx.blocking_send(Write::Maintain).unwrap();
    drop(tx);
    buffer.close().unwrap();
    assert_eq!(seqs_left(&path), vec![6, 7, 8, 10, 11, 12, 13, 14, 15]);
    // The walk itself, three rows at a time: 8 and 10 are undelivered, 6 and 7 were
    // delivered a day ago (kept); mark 8 and 10 delivered long ago and walk again.
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE messages SET delivered_ms = ?1 WHERE seq IN (8, 10)",
            params![now - 9 * DAY],
        )
        .unwrap();
        let cutoff = now - 7 * DAY;
        let mut cursor = 0;
        assert_eq!(
            prune_delivered(&conn, &mut None, &mut cursor, cutoff, 3).unwrap(),
            1
        );
        assert_eq!(cursor, 8, "the first window is 6, 7, 8");
        assert_eq!(
            prune_delivered(&conn, &mut None, &mut cursor, cutoff, 3).unwrap(),
            1
        );
        assert_eq!(
            cursor, 0,
            "10, 11, 12: reached rows received after the cutoff"
        );
        assert_eq!(
            prune_delivered(&conn, &mut None, &mut cursor, cutoff, 3).unwrap(),
            0
        );
    }
    assert_eq!(seqs_left(&path), vec![6, 7, 11, 12, 13, 14, 15]);
    let report = buffer_report(&open_read_only(&path).unwrap(), now).unwrap();
    assert_eq!(report.backlog, 3, "13..=15 undelivered");
    assert_eq!(report.oldest_undelivered_ms, Some(now));
    assert_eq!(report.last_delivered_ms, Some(now));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A distinct value is counted once per bucket however the batches fall, whether the
/// writer remembers it (same run) or has to ask SQLite (after a reopen).
#[test]
fn distinct_values_count_once_across_batches_and_restarts() {
    let dir = std::env::temp_dir().join(format!("bgw-distinct-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("buffer.sqlite");
    let open = || open_test_buffer(&path);
    let hour = 1_795_575_600_000i64; // 2026-11-25T01:00Z
    let metric = crate::model::Metric::new("patrons");
    let patron = |value: &str| {
        let Write::Accepted(mut m, _) = message(hour + 60_000) else {
            unreachable!()
        };
        m.rollup_ms = Some(hour + 60_000);
        m.contributions = smallvec::smallvec![crate::model::Declared::distinct(
            crate::model::RuleRef::new(metric, crate::model::RollupOp::Distinct),
            crate::model::distinct_key(value),
        )];
        Write::Accepted(m, None)
    };
    // One transaction per group: wait for each to commit before sending the next.
    let send_batches = |buffer: &Buffer, groups: &[&[&str]]| {
        let tx = buffer.sender();
        for group in groups {
            let before = buffer.stats.messages_committed.load(Ordering::Relaxed);
            for v in *group {
                tx.blocking_send(patron(v)).unwrap();
            }
            let want = before + group.len() as u64;
            while buffer.stats.messages_committed.load(Ordering::Relaxed) < want {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let buffer = open();
    send_batches(&buffer, &[&["a", "b"], &["b", "c", "a"], &["c"]]);
    buffer.close().unwrap();
    let buffer = open();
    send_batches(&buffer, &[&["a", "d"], &["d"]]);
    buffer.close().unwrap();

    let conn = open_read_only(&path).unwrap();
    let mut st = conn
        .prepare(
            "SELECT scope, period, value, samples FROM rollups
             WHERE metric = 'patrons' ORDER BY scope, period",
        )
        .unwrap();
    let rows: Vec<(String, String, f64, i64)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let expected: Vec<(String, String, f64, i64)> = [
        ("", "day"),
        ("", "hour"),
        ("gate-1", "day"),
        ("gate-1", "hour"),
    ]
    .iter()
    .map(|(s, p)| (s.to_string(), p.to_string(), 4.0, 9))
    .collect();
    assert_eq!(rows, expected, "a, b, c, d: four patrons in nine sessions");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Distinct keys of buckets no message can reach any more (started more than
/// `DISTINCT_KEPT_MS` ago) are pruned by maintenance; newer ones stay, and so do the
/// counts of every bucket.
#[test]
fn distinct_keys_of_closed_buckets_are_pruned() {
    let dir = std::env::temp_dir().join(format!("bgw-distinct-prune-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("buffer.sqlite");
    let now = crate::model::now_ms();
    let metric = crate::model::Metric::new("patrons");
    let patron = |at_ms: i64, value: &str| {
        let Write::Accepted(mut m, _) = message(at_ms) else {
            unreachable!()
        };
        m.rollup_ms = Some(at_ms);
        m.contributions = smallvec::smallvec![crate::model::Declared::distinct(
            crate::model::RuleRef::new(metric, crate::model::RollupOp::Distinct),
            crate::model::distinct_key(value),
        )];
        Write::Accepted(m, None)
    };
    let old = now - crate::summary::DISTINCT_KEPT_MS - 2 * DAY;
    let buffer = open_test_buffer(&path);
    let older = old - 5 * DAY;
    let tx = buffer.sender();
    for (at, v) in [(older, "c"), (old, "a"), (old, "b"), (now, "a")] {
        tx.blocking_send(patron(at, v)).unwrap();
    }
    tx.blocking_send(Write::Maintain).unwrap();
    drop(tx);
    buffer.close().unwrap();
    let keys = |path: &Path| -> i64 {
        open_read_only(path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM rollup_distinct_keys", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    // One pass forgets at most a day of buckets: `older`'s four keys, not `old`'s eight.
    assert_eq!(keys(&path), 8 + 4);
    let buffer = open_test_buffer(&path);
    buffer.sender().blocking_send(Write::Maintain).unwrap();
    buffer.close().unwrap();
    assert_eq!(
        keys(&path),
        4,
        "the current hour and day of the device and the branch"
    );
    let conn = open_read_only(&path).unwrap();
    let counts: Vec<f64> = conn
        .prepare(
            "SELECT value FROM rollups WHERE metric = 'patrons' AND scope = 'gate-1'
             AND period = 'hour' ORDER BY bucket_ms",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(counts, vec![1.0, 2.0, 1.0], "counts stay");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The writer's memory of stored distinct values: a value is known only once its
/// transaction committed, a rolled-back one is forgotten, and the memory starts over
/// empty (never keeps more) when it would pass its bound.
#[test]
fn known_distinct_values_follow_commits() {
    let key = |bucket_ms| -> DistinctSlot {
        (
            crate::summary::Period::Hour,
            bucket_ms,
            crate::model::Metric::new("patrons"),
        )
    };
    let mut known = KnownDistinct::default();
    known.stage("gate-1", key(0), 1);
    assert!(
        !known.contains("gate-1", key(0), 1),
        "not before the commit"
    );
    known.rolled_back();
    known.committed();
    assert!(
        !known.contains("gate-1", key(0), 1),
        "rolled back: forgotten"
    );
    known.stage("gate-1", key(0), 1);
    known.committed();
    assert!(known.contains("gate-1", key(0), 1));
    assert!(
        !known.contains("gate-1", key(3_600_000), 1),
        "another bucket"
    );
    for n in 1..KnownDistinct::MAX_VALUES {
        known.stage("gate-1", key(0), n as u64 + 1);
    }
    known.committed();
    assert_eq!(known.values, KnownDistinct::MAX_VALUES);
    known.stage("gate-1", key(0), u64::MAX);
    known.committed();
    assert_eq!(known.values, 1, "started over");
    assert!(known.contains("gate-1", key(0), u64::MAX));
    assert!(!known.contains("gate-1", key(0), 1));
}

/// The disk cap takes from the device holding the most bytes (oldest first), and
/// the writer's tally stays equal to what is stored through inserts, retention and
/// the cap itself (checked after every pass in test builds).
#[test]
fn disk_cap_takes_from_the_biggest_holder_first() {
    let dir = std::env::temp_dir().join(format!("bgw-fair-cap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("buffer.sqlite");
    let options = BufferOptions {
        synchronous: Synchronous::Normal,
        rejected_keep: 100,
        queue_capacity: 64,
        max_bytes: 2 << 20,
        keep_delivered: Duration::ZERO,
        live: None,
        rollup_tz: jiff::tz::TimeZone::UTC,
        rollups: false,
        commands: None,
    };
    let configured = [
        ("flood".to_owned(), "p".to_owned()),
        ("canary".to_owned(), "p".to_owned()),
    ];
    let buffer = Buffer::open(&path, options, &configured).unwrap();
    let tx = buffer.sender();
    let now = crate::model::now_ms();
    let msg = |device: &str, kind: Kind, n: usize, pad: usize| {
        Write::Accepted(
            Accepted {
                device: device.into(),
                profile: "p".into(),
                kind,
                received_ms: now,
                payload: format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(pad)),
                rollup_ms: None,
                contributions: Default::default(),
            },
            None,
        )
    };
    // The canary's backlog is older than all of the flood.
    for n in 0..200 {
        tx.blocking_send(msg("canary", Kind::Telemetry, n, 20))
            .unwrap();
    }
    for n in 0..20 {
        tx.blocking_send(msg("canary", Kind::Events, n, 20))
            .unwrap();
    }
    for n in 0..6_000 {
        tx.blocking_send(msg("flood", Kind::Telemetry, n, 1_000))
            .unwrap();
    }
    // Deliver everything so far: retention (keep 0) prunes it, tracked by the tally.
    let last = buffer.stats.last_seq.load(Ordering::Relaxed);
    let wait_last = |want: u64| {
        while buffer.stats.last_seq.load(Ordering::Relaxed) < want {
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    wait_last(6_220);
    tx.blocking_send(Write::Delivered {
        seqs: (1..=last.max(6_220) as i64).collect(),
        at_ms: now - 1,
    })
    .unwrap();
    tx.blocking_send(Write::Maintain).unwrap();
    // A second outage: the canary's modest backlog, then the flood again.
    for n in 0..100 {
        tx.blocking_send(msg("canary", Kind::Telemetry, n, 20))
            .unwrap();
    }
    for n in 0..6_000 {
        tx.blocking_send(msg("flood", Kind::Events, n, 1_000))
            .unwrap();
    }
    tx.blocking_send(Write::Maintain).unwrap();
    drop(tx);
    let stats = buffer.stats();
    buffer.close().unwrap();

    let conn = open_read_only(&path).unwrap();
    let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        count("SELECT COUNT(*) FROM messages WHERE device = 'canary' AND delivered_ms IS NULL"),
        100,
        "the canary lost nothing"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM drops WHERE device = 'canary'"),
        0
    );
    let dropped = count("SELECT count FROM drops WHERE device = 'flood' AND kind = 'events'");
    let kept = count("SELECT COUNT(*) FROM messages WHERE device = 'flood' AND kind = 'events'");
    assert!(dropped > 0);
    assert_eq!(dropped + kept, 6_000);
    // Oldest first: the flood's newest events are what is left.
    assert_eq!(
        count("SELECT MIN(json_extract(payload, '$.n')) FROM messages WHERE device = 'flood' AND kind = 'events'"),
        dropped
    );
    let dropped_telemetry = count(
        "SELECT COALESCE((SELECT count FROM drops WHERE device = 'flood' AND kind = 'telemetry'), 0)",
    );
    assert_eq!(
        stats.dropped.load(Ordering::Relaxed) as i64,
        dropped + dropped_telemetry
    );
    assert_eq!(
        count("SELECT value FROM device_counters WHERE device = 'flood' AND counter = 'dropped_events'"),
        dropped
    );
    assert!(size_on_disk(&path) <= 2 << 20);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn acknowledgements_become_runs() {
    assert_eq!(seq_runs(&[]), vec![]);
    assert_eq!(seq_runs(&[5]), vec![(5, 5)]);
    assert_eq!(
        seq_runs(&[3, 1, 2, 2, 7, 9, 8, 11]),
        vec![(1, 3), (7, 9), (11, 11)]
    );
}

/// Quarantined rows count against the disk cap and go last of all: with nearly every row
/// quarantined, the cap keeps the file under its cap by dropping the oldest quarantined
/// rows, and every one is counted (`drops` kind `quarantined`, `dropped_quarantined`).
#[test]
fn the_disk_cap_drops_quarantined_rows_last_and_counts_them() {
    let dir = std::env::temp_dir().join(format!("bgw-cap-quarantine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("buffer.sqlite");
    let options = BufferOptions {
        synchronous: Synchronous::Normal,
        rejected_keep: 100,
        queue_capacity: 64,
        max_bytes: 2 << 20,
        keep_delivered: Duration::ZERO,
        live: None,
        rollup_tz: jiff::tz::TimeZone::UTC,
        rollups: false,
        commands: None,
    };
    let buffer = Buffer::open(&path, options, &[("dev".into(), "p".into())]).unwrap();
    let tx = buffer.sender();
    let marks = buffer.marks();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let now = crate::model::now_ms();
    const N: i64 = 3_000;
    for chunk in 0..N / 100 {
        for n in 0..100 {
            tx.blocking_send(Write::Accepted(
                Accepted {
                    device: "dev".into(),
                    profile: "p".into(),
                    kind: Kind::Events,
                    received_ms: now,
                    payload: format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(1_000)),
                    rollup_ms: None,
                    contributions: Default::default(),
                },
                None,
            ))
            .unwrap();
        }
        while buffer.stats.last_seq.load(Ordering::Relaxed) < ((chunk + 1) * 100) as u64 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let rows = (chunk * 100 + 1..=chunk * 100 + 100)
            .map(|s| (s, "refused_by_central"))
            .collect();
        rt.block_on(marks.send(Write::Quarantined { rows, at_ms: now }));
    }
    drop((tx, marks));
    buffer.close().unwrap();
    let conn = open_read_only(&path).unwrap();
    let one = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    let quarantined = one("SELECT COUNT(*) FROM quarantine");
    let in_messages = one("SELECT COUNT(*) FROM messages");
    let dropped_q = one("SELECT COALESCE(SUM(count), 0) FROM drops WHERE kind = 'quarantined'");
    let dropped_other =
        one("SELECT COALESCE(SUM(count), 0) FROM drops WHERE kind <> 'quarantined'");
    assert!(dropped_q > 0, "the cap reached the quarantine");
    assert_eq!(
        quarantined + in_messages + dropped_q + dropped_other,
        N,
        "every row accounted for"
    );
    assert_eq!(
        one("SELECT value FROM device_counters WHERE device = 'dev' AND counter = 'dropped_quarantined'"),
        dropped_q
    );
    // The oldest went first: what is left of the quarantine is its newest rows. A batch the
    // cap saw before its quarantine mark was still undelivered and went before any
    // quarantined row (that is the policy), so holes in the kept range may only be those.
    let (min, max) = (
        one("SELECT MIN(seq) FROM quarantine"),
        one("SELECT MAX(seq) FROM quarantine"),
    );
    assert!(max > N - 100, "the newest batch is kept");
    assert!(
        (max - min + 1) - quarantined <= dropped_other,
        "a quarantined row was dropped while an older one was kept"
    );
    assert!(min - 1 <= dropped_q + dropped_other);
    assert!(size_on_disk(&path) <= 2 << 20);
    let _ = std::fs::remove_dir_all(&dir);
}
