//! Credential reflection guard benchmarks: streaming scan throughput for one 40-byte
//! needle (a typical bearer token) against a plain copy of the same bytes.
//!
//! - `reflect/scan/128B`, `reflect/scan/64KiB`: [`Scanner::push`] + [`Scanner::finish`]
//!   over a body of that size in one chunk, with no match (the common case);
//! - `reflect/scan_16KiB_chunks/64KiB`: the same 64 KiB body in four chunks (the held-back
//!   tail is copied into each following chunk);
//! - `reflect/scan_one_match/64KiB`: one occurrence in the middle;
//! - `reflect/copy/*`: `Bytes::copy_from_slice` of the same body, for scale.
//!
//! Run with `AYA_BUILD_SKIP=1 cargo bench -p scopegate --bench reflect`.
#![allow(missing_docs, reason = "criterion generates the entry points")]
#![allow(clippy::unwrap_used, reason = "benchmark setup")]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use scopegate::reflect::Needles;

const SECRET: &str = "sk_live_4eC39HqLyjWDarjtT1zdp7dcAbCdEfGh";

/// Printable JSON-ish filler without the secret.
fn body(len: usize) -> Vec<u8> {
    let filler = br#"{"id":"ord_1234","status":"ok","items":[{"sku":"w-42","qty":2}],"note":"x"},"#;
    filler.iter().copied().cycle().take(len).collect()
}

fn scan(needles: &Needles, chunks: &[Bytes]) -> usize {
    let mut scanner = needles.scanner();
    let mut n = 0;
    for c in chunks {
        n += scanner.push(c.clone()).0.len();
    }
    n + scanner.finish().0.len()
}

fn benches(c: &mut Criterion) {
    assert_eq!(SECRET.len(), 40);
    let needles = Needles::new([SECRET]);
    let mut group = c.benchmark_group("reflect");
    for (name, len) in [("128B", 128), ("64KiB", 64 << 10)] {
        let data = Bytes::from(body(len));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("scan/{name}"), |b| {
            let chunks = [data.clone()];
            b.iter(|| black_box(scan(&needles, black_box(&chunks))));
        });
        group.bench_function(format!("copy/{name}"), |b| {
            b.iter(|| black_box(Bytes::copy_from_slice(black_box(&data[..]))));
        });
    }
    let len = 64 << 10;
    group.throughput(Throughput::Bytes(len as u64));
    let data = Bytes::from(body(len));
    let chunks: Vec<Bytes> = (0..4)
        .map(|i| data.slice(i * 16384..(i + 1) * 16384))
        .collect();
    group.bench_function("scan_16KiB_chunks/64KiB", |b| {
        b.iter(|| black_box(scan(&needles, black_box(&chunks))));
    });
    let mut with_match = body(len);
    with_match[len / 2..len / 2 + 40].copy_from_slice(SECRET.as_bytes());
    let with_match = [Bytes::from(with_match)];
    group.bench_function("scan_one_match/64KiB", |b| {
        b.iter(|| black_box(scan(&needles, black_box(&with_match))));
    });
    group.finish();
}

criterion_group!(reflect, benches);
criterion_main!(reflect);
