//! The stream header and status decoders on arbitrary bytes: no panic, and a decoded
//! header re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustorium_p2p::wire::{decode_header, decode_status, encode_header};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((route, len))) = decode_header(data) {
        assert_eq!(encode_header(route), &data[..len]);
    }
    let _ = decode_status(data);
});
