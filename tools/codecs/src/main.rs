//! Encode + decode time and encoded size of three typical request values, postcard
//! against bincode 2 (standard configuration: variable-length integers, like postcard).
use std::hint::black_box;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// A small request: a key lookup.
#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Get {
    key: String,
    version: u64,
    consistent: bool,
}

/// A vote: fixed-size fields.
#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Vote {
    round: u64,
    height: u64,
    block: [u8; 32],
    signature: Vec<u8>,
}

/// A batch: a list of 1 KiB blobs.
#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Batch {
    items: Vec<Vec<u8>>,
}

fn measure<T>(name: &str, value: &T, rounds: u32)
where
    T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let config = bincode::config::standard();
    let p = postcard::to_stdvec(value).unwrap();
    let b = bincode::serde::encode_to_vec(value, config).unwrap();
    assert_eq!(&postcard::from_bytes::<T>(&p).unwrap(), value);
    assert_eq!(&bincode::serde::decode_from_slice::<T, _>(&b, config).unwrap().0, value);
    let mut best = [f64::MAX; 2];
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..rounds {
            let bytes = postcard::to_stdvec(black_box(value)).unwrap();
            black_box(postcard::from_bytes::<T>(&bytes).unwrap());
        }
        best[0] = best[0].min(start.elapsed().as_secs_f64() * 1e9 / rounds as f64);
        let start = Instant::now();
        for _ in 0..rounds {
            let bytes = bincode::serde::encode_to_vec(black_box(value), config).unwrap();
            black_box(bincode::serde::decode_from_slice::<T, _>(&bytes, config).unwrap());
        }
        best[1] = best[1].min(start.elapsed().as_secs_f64() * 1e9 / rounds as f64);
    }
    println!(
        "| {name} | {:.0} ns, {} B | {:.0} ns, {} B |",
        best[0],
        p.len(),
        best[1],
        b.len()
    );
}

fn main() {
    println!("| value | postcard 1 (encode + decode, size) | bincode 2 standard |");
    println!("|---|---:|---:|");
    let get = Get {
        key: "accounts/3fa2c0de".into(),
        version: 1_234_567,
        consistent: true,
    };
    measure("Get { key: 17 chars, u64, bool }", &get, 1_000_000);
    let vote = Vote {
        round: 7,
        height: 1_000_000,
        block: [9; 32],
        signature: vec![3; 64],
    };
    measure("Vote { u64, u64, [u8; 32], 64 B }", &vote, 1_000_000);
    let batch = Batch {
        items: vec![vec![5; 1024]; 16],
    };
    measure("Batch { 16 x 1 KiB }", &batch, 100_000);
}
