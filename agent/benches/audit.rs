//! Audit benchmarks: the cost of one record with and without the hash chain, and
//! records/s through the whole writer (queue → seal → file) with batch fsync.
//!
//! `cargo bench -p scopegate --bench audit`. Files go to a temporary directory (set
//! `TMPDIR` to measure a particular disk; fsync on tmpfs is free).
#![allow(missing_docs, reason = "criterion macros")]
#![allow(clippy::unwrap_used, reason = "benchmark")]

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use scopegate::audit::{
    Auditor, CheckpointPolicy, Decision, Fault, Fsync, Record, Sinks,
    chain::{self, GENESIS},
};

/// A typical denied request record (about 450 bytes sealed).
fn sample() -> Record {
    let mut r = Record::new("http").with_dst_addr("192.0.2.7:443".parse().unwrap());
    r.host = "web-7".into();
    r.workload = Some("billing".into());
    r.cgroup = Some("/system.slice/billing.service".into());
    r.pid = Some(4242);
    r.uid = Some(1001);
    r.dst.host = Some("api.example.com".into());
    r.method = Some("POST".into());
    r.path = Some("/v1/charges".into());
    r.decision = Decision::Deny;
    r.reason = Some("path_not_allowed".into());
    r.origin = Some(Fault::Policy);
    r.status = Some(403);
    r.latency_us = Some(12);
    r.request_id = Some("0f1e2d3c4b5a69788796a5b4c3d2e1f0".into());
    r
}

fn per_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("audit_record");
    g.throughput(Throughput::Elements(1));
    let record = sample();
    g.bench_function("serialize_only", |b| {
        let mut buf = Vec::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            chain::canonical_bytes(black_box(&record), &mut buf);
            black_box(buf.len())
        });
    });
    g.bench_function("serialize_and_chain", |b| {
        let mut buf = Vec::with_capacity(1024);
        let mut r = record.clone();
        let mut prev = GENESIS;
        let mut seq = 0;
        b.iter(|| {
            buf.clear();
            seq += 1;
            prev = chain::seal(black_box(&mut r), seq, &prev, &mut buf);
            black_box(buf.len())
        });
    });
    g.finish();
}

/// Records per measured iteration of the pipeline benchmarks.
const N: u64 = 100_000;

fn pipeline(c: &mut Criterion, name: &str, sinks: impl Fn(&std::path::Path) -> Sinks) {
    let mut g = c.benchmark_group("audit_pipeline");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(N));
    let record = sample();
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().unwrap();
                let (auditor, writer) = Auditor::start(&sinks(dir.path())).unwrap();
                let start = Instant::now();
                for _ in 0..N {
                    auditor.record(record.clone());
                }
                // Until every record is written and fsynced.
                drop(auditor);
                writer.join().unwrap();
                total += start.elapsed();
            }
            total
        });
    });
    g.finish();
}

fn file_batch_fsync(c: &mut Criterion) {
    pipeline(c, "file_batch_fsync", |dir| Sinks {
        file: Some(dir.join("audit.jsonl")),
        fsync: Fsync::default(),
        ..Sinks::default()
    });
}

fn file_every_write_fsync(c: &mut Criterion) {
    pipeline(c, "file_every_write_fsync", |dir| Sinks {
        file: Some(dir.join("audit.jsonl")),
        fsync: Fsync::EveryRecord,
        ..Sinks::default()
    });
}

fn file_batch_fsync_signed(c: &mut Criterion) {
    pipeline(c, "file_batch_fsync_checkpoint_every_10k", |dir| Sinks {
        file: Some(dir.join("audit.jsonl")),
        signing_key: Some(dir.join("audit.key")),
        checkpoints: CheckpointPolicy {
            every_records: Some(10_000),
            interval: None,
        },
        ..Sinks::default()
    });
}

criterion_group!(
    benches,
    per_record,
    file_batch_fsync,
    file_every_write_fsync,
    file_batch_fsync_signed
);
criterion_main!(benches);
