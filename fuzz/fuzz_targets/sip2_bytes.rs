//! Arbitrary bytes through the SIP2 tap, as kiosk or ILS, split arbitrarily: no panic
//! (the `sip2` crate's parser slices text by byte index; the tap's guards keep it safe).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    branch_gateway::sip2::fuzz_sip2_bytes(data);
});
