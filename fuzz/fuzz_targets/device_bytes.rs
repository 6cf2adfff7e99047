//! Arbitrary bytes as a device would send them: a CONNECT's checks and decoding, then
//! every packet's frame checks, rumqttd's codec and the session. No panic, ever (rumqttd
//! 0.20's own MQTT 5 reader aborts on a 3-byte CONNACK).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    branch_gateway::broker::fuzz_device_bytes(data);
});
