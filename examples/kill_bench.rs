//! Kill benchmark: devices publish QoS 1 at full speed, each recording the ids the gateway
//! acknowledged; the release binary is SIGKILLed at a random moment, restarted on the same
//! database, `--rounds` times. Prints acknowledged, stored, lost (must be 0), duplicate and
//! out-of-order figures (see `examples/support/kill.rs`).
//!
//! ```text
//! cargo build --release
//! cargo run --release --example kill_bench -- --devices 200 --rounds 20
//! # --binary PATH: another build (e.g. the one before a change), --seed N: redo a run,
//! # --in-flight N: unacknowledged messages per device (default 32)
//! ```

mod support;
use support::kill::{self, Plan};
use support::*;

use std::path::PathBuf;

fn main() {
    let seed = arg("--seed", now_us());
    let plan = Plan {
        binary: PathBuf::from(arg("--binary", "target/release/branch-gateway".to_owned())),
        devices: arg("--devices", 200),
        rounds: arg("--rounds", 20),
        in_flight: arg("--in-flight", 32),
        kill_after_ms: (arg("--kill-min-ms", 500), arg("--kill-max-ms", 3000)),
        seed,
    };
    let dir = std::env::temp_dir().join(format!("branch-gateway-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "kill_bench: {} devices (half MQTT 3.1.1, half 5), {} in flight each, {} rounds, SIGKILL {}-{} ms after the first PUBACK, seed {seed}, {}",
        plan.devices,
        plan.in_flight,
        plan.rounds,
        plan.kill_after_ms.0,
        plan.kill_after_ms.1,
        plan.binary.display()
    );
    let o = kill::run(&plan, &dir);
    println!("acknowledged per round: {:?}", o.per_round);
    println!(
        "acknowledged {}, stored {}, lost {}, duplicates {}, devices out of order {}, stored but not acknowledged {} ({:.1} s)",
        o.acknowledged, o.stored, o.lost, o.duplicates, o.out_of_order, o.stored_unacknowledged, o.seconds
    );
    let _ = std::fs::remove_dir_all(&dir);
    if o.lost > 0 || o.duplicates > 0 || o.out_of_order > 0 {
        std::process::exit(1);
    }
}
