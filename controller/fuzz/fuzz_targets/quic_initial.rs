//! The relay's reading of client Initial datagrams on arbitrary bytes: header parsing and
//! decryption attempts, then (where random bytes do get) frames and the ClientHello, must
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_controller::relay::initial::{fuzz_decrypted, HelloReader};

fuzz_target!(|data: &[u8]| {
    let mut reader = HelloReader::default();
    for datagram in data.chunks(1300) {
        if reader.push(datagram).is_err() {
            break;
        }
    }
    let _ = fuzz_decrypted(data);
});
