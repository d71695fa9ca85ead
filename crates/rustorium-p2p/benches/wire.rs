//! Encoder and decoder speed of the wire format: `cargo bench --bench wire`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use rustorium_p2p::wire::{decode_header, decode_status, encode_header};

fn wire(c: &mut Criterion) {
    let route = "sys/echo";
    let mut request = encode_header(route);
    request.extend_from_slice(&[7u8; 64]);
    c.bench_function("encode_header sys/echo", |b| {
        b.iter(|| encode_header(black_box(route)))
    });
    c.bench_function("decode_header sys/echo + 64 B", |b| {
        b.iter(|| decode_header(black_box(&request)))
    });
    let long = encode_header(&"r".repeat(255));
    c.bench_function("decode_header 255-byte route", |b| {
        b.iter(|| decode_header(black_box(&long)))
    });
    c.bench_function("decode_status", |b| {
        b.iter(|| decode_status(black_box(&[0, 1, 2])))
    });
}

criterion_group!(benches, wire);
criterion_main!(benches);
