//! Policy decision benchmarks (targets: at most 1 µs per decision with 20 rules, at most
//! 2 µs with 1,000 rules per workload).
//!
//! - `decide/20_rules`: the 20 rules of the shared benchmark (`../shared/bench/rules.txt`,
//!   as `agent/src/policy/testdata/bench20.yaml`), cycling through its 20 requests;
//! - `decide/1000_rules`: a generated workload of 1,000 rules on one destination, with
//!   requests that hit rules spread across it;
//! - `normalize/20_targets`: the request-target normalisation alone, for the same 20
//!   requests;
//! - `normalize_and_decide/20_rules`: both, as the proxy runs them per request.
//!
//! Run with `AYA_BUILD_SKIP=1 cargo bench -p scopegate --bench decide`.
#![allow(missing_docs, reason = "criterion generates the entry points")]
#![allow(clippy::unwrap_used, reason = "benchmark setup")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use jiff::Timestamp;
use scopegate::policy::{
    CanonicalPath, Decision, Request, Snapshot, WorkloadId, decide, normalize,
};

const BENCH20: &str = include_str!("../src/policy/testdata/bench20.yaml");

/// `../shared/bench/requests.txt`.
const REQUESTS: [(&str, &str); 20] = [
    ("GET", "/api/v1/users"),
    ("GET", "/api/v1/users/12345"),
    ("POST", "/api/v1/orders"),
    ("GET", "/api/v1/orders/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a7f"),
    (
        "GET",
        "/api/v1/orders/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a7f/items",
    ),
    ("GET", "/api/v1/products"),
    ("GET", "/api/v1/products/blue-widget-42"),
    ("GET", "/api/v1/inventory/DE/1234"),
    ("POST", "/api/v1/payments"),
    ("GET", "/api/v1/payments/998877/status"),
    ("GET", "/api/v2/search?q=widgets&page=2"),
    ("GET", "/api/v2/reports/2024-05"),
    ("POST", "/api/v2/events"),
    ("GET", "/api/v2/tenants/acme/config"),
    ("GET", "/api/v2/invoices/5551212"),
    ("GET", "/api/v2/invoices/5551212/pdf"),
    ("POST", "/api/v2/sessions"),
    ("DELETE", "/api/v2/sessions/AbC123xYz"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
];

const HOST: &str = "127.0.0.1";
const PORT: u16 = 8080;

fn load(text: &str) -> (Snapshot, WorkloadId) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), text).unwrap();
    let snapshot = Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let id = WorkloadId(0);
    (snapshot, id)
}

/// A workload of 1,000 rules on one destination, in four shapes that repeat across
/// 333 resources and three API versions: a literal collection, an item with a numeric
/// id, a UUID-keyed sub-collection, and a `{name}` parameter with a literal tail.
fn policy_1000() -> String {
    let mut text = format!(
        "workload: big\nselect:\n  cgroup: /scopegate-bench/big\negress:\n  - host: {HOST}\n    \
         port: {PORT}\n    rules:\n"
    );
    for i in 0..1000 {
        let v = 1 + i % 3;
        let (methods, path) = match i % 4 {
            0 => ("[GET, POST]", format!("/api/v{v}/res{i:04}")),
            1 => (
                "[GET, PUT, DELETE]",
                format!("/api/v{v}/res{i:04}/{{id:[0-9]+}}"),
            ),
            2 => (
                "[GET]",
                format!("/api/v{v}/res{i:04}/{{id:[0-9a-f-]{{36}}}}/items"),
            ),
            _ => ("[GET, PUT]", format!("/api/v{v}/res{i:04}/{{name}}/config")),
        };
        text.push_str(&format!(
            "      - id: r{i}\n        methods: {methods}\n        path: {path}\n"
        ));
    }
    text
}

/// 20 requests, each allowed by a rule 50 apart (0, 51, 102, ... wrapping), so the four
/// shapes and the whole range of rules are hit.
fn requests_1000() -> Vec<(&'static str, String, String)> {
    (0..20)
        .map(|k| {
            let i = (k * 51) % 1000;
            let v = 1 + i % 3;
            let (method, target) = match i % 4 {
                0 => ("POST", format!("/api/v{v}/res{i:04}")),
                1 => ("DELETE", format!("/api/v{v}/res{i:04}/{}", 1000 + k)),
                2 => (
                    "GET",
                    format!("/api/v{v}/res{i:04}/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a7f/items"),
                ),
                _ => ("PUT", format!("/api/v{v}/res{i:04}/acme/config")),
            };
            (method, target, format!("r{i}"))
        })
        .collect()
}

/// Normalised requests, checked once to be allowed by the expected rule (if any).
fn prepared(
    snapshot: &Snapshot,
    id: WorkloadId,
    requests: &[(&'static str, String, Option<String>)],
) -> Vec<(&'static str, CanonicalPath)> {
    let headers = HeaderMap::new();
    requests
        .iter()
        .map(|(method, target, rule)| {
            let path = normalize(target).unwrap();
            let req = request(id, method, &path, &headers);
            match (decide(snapshot, &req), rule) {
                (Decision::Allow { rule: got, .. }, Some(want)) => {
                    assert_eq!(got.rule_id(), want, "{method} {target}");
                }
                (Decision::Allow { .. }, None) => {}
                (other, _) => panic!("{method} {target}: {other:?}"),
            }
            (*method, path)
        })
        .collect()
}

fn request<'a>(
    id: WorkloadId,
    method: &'a str,
    path: &'a CanonicalPath,
    headers: &'a HeaderMap,
) -> Request<'a> {
    Request {
        workload: id,
        uid: 0,
        method,
        host: HOST,
        port: PORT,
        path,
        headers,
        body: None,
        at: Timestamp::UNIX_EPOCH,
    }
}

fn bench(c: &mut Criterion) {
    let headers = HeaderMap::new();

    let (snap20, id20) = load(BENCH20);
    let reqs20: Vec<_> = REQUESTS
        .iter()
        .map(|(m, t)| (*m, (*t).to_owned(), None))
        .collect();
    let paths20 = prepared(&snap20, id20, &reqs20);
    let mut i = 0;
    c.bench_function("decide/20_rules", |b| {
        b.iter(|| {
            let (method, path) = &paths20[i % paths20.len()];
            i += 1;
            let req = request(id20, method, path, &headers);
            black_box(decide(black_box(&snap20), black_box(&req)))
        });
    });

    let (snap1000, id1000) = load(&policy_1000());
    assert_eq!(snap1000.workloads()[0].destinations[0].rules().len(), 1000);
    let reqs1000: Vec<_> = requests_1000()
        .into_iter()
        .map(|(m, t, r)| (m, t, Some(r)))
        .collect();
    let paths1000 = prepared(&snap1000, id1000, &reqs1000);
    let mut i = 0;
    c.bench_function("decide/1000_rules", |b| {
        b.iter(|| {
            let (method, path) = &paths1000[i % paths1000.len()];
            i += 1;
            let req = request(id1000, method, path, &headers);
            black_box(decide(black_box(&snap1000), black_box(&req)))
        });
    });

    let mut i = 0;
    c.bench_function("normalize/20_targets", |b| {
        b.iter(|| {
            let (_, target) = REQUESTS[i % REQUESTS.len()];
            i += 1;
            black_box(normalize(black_box(target)))
        });
    });

    let mut i = 0;
    c.bench_function("normalize_and_decide/20_rules", |b| {
        b.iter(|| {
            let (method, target) = REQUESTS[i % REQUESTS.len()];
            i += 1;
            let path = normalize(black_box(target)).unwrap();
            let req = request(id20, method, &path, &headers);
            black_box(decide(black_box(&snap20), black_box(&req)))
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
