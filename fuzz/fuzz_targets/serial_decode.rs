//! Arbitrary bytes, split arbitrarily, through the decoders of every shipped serial
//! profile: no panic, increments never negative.
#![no_main]

use std::sync::Arc;

use branch_gateway::config::profile::Profile;
use branch_gateway::serial::decode::{CounterState, FrameDecoder};
use libfuzzer_sys::fuzz_target;

const PROFILES: [&str; 3] = [
    include_str!("../../device-profiles/gate-counter-text.json"),
    include_str!("../../device-profiles/gate-counter-evo.json"),
    include_str!("../../device-profiles/gate-counter-modbus.json"),
];

fuzz_target!(|data: &[u8]| {
    let split = data.first().copied().unwrap_or(1).max(1) as usize;
    for text in PROFILES {
        let spec = Arc::new(Profile::from_json(text).unwrap().serial.unwrap());
        let mut decoder = FrameDecoder::new(spec.clone()).unwrap();
        let mut counters = CounterState::default();
        let mut out = Vec::new();
        for chunk in data.chunks(split) {
            decoder.push(chunk, &mut out);
            for decoded in out.drain(..) {
                if let Ok(mut obj) = decoded {
                    counters.apply(&spec, &mut obj);
                    for c in spec.counters.values() {
                        assert!(obj[&c.delta].as_u64().is_some(), "increments are never negative");
                    }
                }
            }
        }
    }
});
