//! The check every peer's certificate passes, on arbitrary bytes: a PeerId or a clean
//! error, never a panic; and whatever passes names a key that is not of small order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustorium_p2p::certificate::{verify_certificate, MAX_CERT_SIZE};

fuzz_target!(|data: &[u8]| {
    // 2027-01-15: inside the validity of certificates the seeds are made from.
    if let Ok(peer) = verify_certificate(data, 1_800_000_000) {
        assert!(data.len() <= MAX_CERT_SIZE);
        assert_ne!(peer.as_bytes(), &[0u8; 32]);
    }
});
