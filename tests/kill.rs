//! Acknowledged means durable: the real binary SIGKILLed under load, five times.
//!
//! 50 devices (half MQTT 3.1.1, half 5) publish QoS 1 at full speed, 32 in flight each,
//! recording every id the gateway acknowledged; the gateway is killed at a random moment
//! 300-1500 ms after the first PUBACK and restarted on the same database. Every
//! acknowledged id must be stored exactly once, each device's rows in the order sent.
//! The same experiment at 200 devices and 20 rounds: `examples/kill_bench.rs`.

mod common;

use common::kill::{self, Plan};

#[test]
fn every_acknowledged_message_survives_sigkill_exactly_once_in_order() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan {
        binary: common::BIN.into(),
        devices: 50,
        rounds: 5,
        in_flight: 32,
        kill_after_ms: (300, 1500),
        seed,
    };
    let o = kill::run(&plan, dir.path());
    eprintln!("seed {seed}: {o:?}");
    assert!(
        o.per_round.iter().all(|&n| n > 0),
        "every round acknowledged messages before its kill: {:?}",
        o.per_round
    );
    assert_eq!(
        (o.lost, o.duplicates, o.out_of_order),
        (0, 0, 0),
        "seed {seed}: acknowledged {}, stored {}",
        o.acknowledged,
        o.stored
    );
    assert!(o.stored >= o.acknowledged);
    assert_eq!(o.stored, o.acknowledged + o.stored_unacknowledged);
}
