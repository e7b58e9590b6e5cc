//! TLS interception costs, in process (no network): what the proxy pays per new TLS
//! connection, and what the leaf cache saves.
//!
//! - `leaf/mint`: minting a leaf certificate for a new name (a cache miss);
//! - `leaf/cached`: the same lookup when the leaf is cached (a hit);
//! - `handshake/intercept_full`: a complete TLS 1.3 handshake between a rustls client
//!   and the interception server config, over memory buffers (the CPU cost of one new
//!   intercepted connection, both sides);
//! - `client_hello/parse`: parsing the ClientHello the proxy peeks at.
//!
//! Run with `AYA_BUILD_SKIP=1 cargo bench -p scopegate --bench tls`.
#![allow(missing_docs, reason = "criterion generates the entry points")]
#![allow(clippy::unwrap_used, reason = "benchmark setup")]

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::{ClientConnection, RootCertStore, ServerConnection};
use scopegate::tls::{HostCa, LeafCache, Parse, parse};

fn setup() -> (tempfile::TempDir, Arc<HostCa>) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(HostCa::load_or_create(&dir.path().join("state"), None).unwrap());
    (dir, ca)
}

fn client_config(ca: &HostCa) -> Arc<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Moves TLS records between the two sides until neither has anything to say.
fn pump(client: &mut ClientConnection, server: &mut ServerConnection) {
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let mut moved = false;
        while client.wants_write() {
            buf.clear();
            client.write_tls(&mut buf).unwrap();
            let mut slice = &buf[..];
            while !slice.is_empty() {
                server.read_tls(&mut slice).unwrap();
            }
            server.process_new_packets().unwrap();
            moved = true;
        }
        while server.wants_write() {
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            let mut slice = &buf[..];
            while !slice.is_empty() {
                client.read_tls(&mut slice).unwrap();
            }
            client.process_new_packets().unwrap();
            moved = true;
        }
        if !moved {
            break;
        }
    }
}

fn bench(c: &mut Criterion) {
    let (_dir, ca) = setup();
    let cache = LeafCache::new(ca.clone(), 1 << 20, &[b"http/1.1"]);
    let mut n = 0u64;
    c.bench_function("leaf/mint", |b| {
        b.iter(|| {
            n += 1;
            black_box(cache.leaf_for(&format!("host{n}.example")).unwrap())
        })
    });
    let hot = LeafCache::new(ca.clone(), 16, &[b"http/1.1"]);
    hot.leaf_for("api.example.com").unwrap();
    c.bench_function("leaf/cached", |b| {
        b.iter(|| black_box(hot.server_config(black_box("api.example.com")).unwrap()))
    });

    let client = client_config(&ca);
    let server = hot.server_config("api.example.com").unwrap();
    c.bench_function("handshake/intercept_full", |b| {
        b.iter(|| {
            let name = "api.example.com".try_into().unwrap();
            let mut c = ClientConnection::new(client.clone(), name).unwrap();
            let mut s = ServerConnection::new(server.clone()).unwrap();
            pump(&mut c, &mut s);
            assert!(!c.is_handshaking() && !s.is_handshaking());
        })
    });

    let mut hello = Vec::new();
    let name = "api.example.com".try_into().unwrap();
    ClientConnection::new(client.clone(), name)
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    c.bench_function("client_hello/parse", |b| {
        b.iter(|| match parse(black_box(&hello)) {
            Parse::Hello(h) => black_box(h),
            _ => unreachable!(),
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
