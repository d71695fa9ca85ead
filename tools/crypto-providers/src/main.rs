//! The crypto of a TLS 1.3 handshake, per operation, in ring (our provider) and in
//! aws-lc-rs: X25519 (two key pairs and one agreement per loop), Ed25519 signing and
//! verification. Pin it to one CPU for steady figures: `taskset -c 1 cargo run --release`.

use std::time::Instant;
fn time<F: FnMut()>(name: &str, n: u32, mut f: F) {
    for _ in 0..n / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("{name:40} {us:8.2} µs");
}
fn main() {
    let n = 20_000;
    // ring
    {
        use ring::{
            agreement,
            rand::SystemRandom,
            signature::{self, KeyPair},
        };
        let rng = SystemRandom::new();
        time("ring x25519 keygen+agree", n, || {
            let a = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
            let b = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
            let pb = b.compute_public_key().unwrap();
            let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, pb.as_ref().to_vec());
            agreement::agree_ephemeral(a, &peer, |k| k[0]).unwrap();
        });
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let msg = [7u8; 130];
        time("ring ed25519 sign", n, || {
            kp.sign(&msg);
        });
        let sig = kp.sign(&msg);
        let pk = signature::UnparsedPublicKey::new(
            &signature::ED25519,
            kp.public_key().as_ref().to_vec(),
        );
        time("ring ed25519 verify", n, || {
            pk.verify(&msg, sig.as_ref()).unwrap();
        });
    }
    {
        use aws_lc_rs::{
            agreement,
            rand::SystemRandom,
            signature::{self, KeyPair},
        };
        let rng = SystemRandom::new();
        time("aws-lc-rs x25519 keygen+agree", n, || {
            let a = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
            let b = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng).unwrap();
            let pb = b.compute_public_key().unwrap();
            let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, pb.as_ref().to_vec());
            agreement::agree_ephemeral(a, &peer, aws_lc_rs::error::Unspecified, |k| Ok(k[0]))
                .unwrap();
        });
        let pkcs8 = signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let msg = [7u8; 130];
        time("aws-lc-rs ed25519 sign", n, || {
            let _ = kp.sign(&msg);
        });
        let sig = kp.sign(&msg);
        let pk = signature::UnparsedPublicKey::new(
            &signature::ED25519,
            kp.public_key().as_ref().to_vec(),
        );
        time("aws-lc-rs ed25519 verify", n, || {
            pk.verify(&msg, sig.as_ref()).unwrap();
        });
    }
}
