//! The in-process proxy that the integration tests of this directory drive: the real
//! pipeline (framing guard, hyper server, outbound builder, enforce, forward, respond,
//! audit writer to a file) on 127.0.0.1:0, with one workload whose connections the
//! "kernel" ([`StaticOrigins`], which users never see) attributes to cgroup [`CGROUP`].
#![allow(dead_code, reason = "each test binary uses part of the support module")]

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::Duration,
};

use arc_swap::ArcSwap;
use scopegate::{
    audit::{Auditor, Sinks},
    forward::Upstream,
    framing,
    identify::StaticOrigins,
    pipeline::{self, Shared},
    policy::{RateLimiter, Snapshot, WorkloadId},
    resolve::Resolver,
    secrets::Secrets,
    state::{ConnectionCounts, Enforcement, Timeouts},
    workloads::{CgroupInfo, Resolution},
};
use scopegate_common::{FAMILY_V4, FAMILY_V6, Origin};

/// The cgroup id the "kernel" gives every client connection.
pub const CGROUP: u64 = 4242;
/// The injected credential's value.
pub const SECRET: &str = "sk-live-0123456789abcdef";

/// The proxy, in process, with one workload.
pub struct Proxy {
    pub addr: SocketAddr,
    pub origins: Arc<StaticOrigins>,
    pub upstream: SocketAddr,
    pub audit: PathBuf,
    pub policy: Arc<Snapshot>,
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    /// The proxy with the policy `text(secret_file)` and DNS answered by `resolver`.
    pub fn start_with(
        upstream: SocketAddr,
        text: impl FnOnce(&Path) -> String,
        resolver: Resolver,
    ) -> Self {
        let timeouts = Timeouts {
            header: Duration::from_secs(3),
            idle: Duration::from_secs(3),
            body: Duration::from_secs(2),
        };
        Self::start_timed(upstream, text, resolver, timeouts)
    }

    /// Like [`Proxy::start_with`], with the client timeouts `timeouts`.
    pub fn start_timed(
        upstream: SocketAddr,
        text: impl FnOnce(&Path) -> String,
        resolver: Resolver,
        timeouts: Timeouts,
    ) -> Self {
        Self::start_full(upstream, text, resolver, timeouts, None)
    }

    /// Like [`Proxy::start_timed`], intercepting TLS with leaves from `leaves`.
    pub fn start_full(
        upstream: SocketAddr,
        text: impl FnOnce(&Path) -> String,
        resolver: Resolver,
        timeouts: Timeouts,
        leaves: Option<scopegate::tls::LeafCache>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap();
        std::fs::write(policies.join("app.yaml"), text(&secret)).unwrap();
        let snapshot = Arc::new(Snapshot::load_dir(&policies).unwrap_or_else(|e| panic!("{e}")));
        let mut managed = HashMap::new();
        managed.insert(
            CGROUP,
            CgroupInfo {
                path: "/test/app".into(),
                workload: Some(WorkloadId(0)),
                selected: true,
                held: false,
            },
        );
        let cgroups = Arc::new(Resolution {
            managed,
            unmatched: Vec::new(),
            unseen_held: Default::default(),
        });
        let audit = dir.path().join("audit.jsonl");
        let (auditor, _writer) = Auditor::start(&Sinks {
            file: Some(audit.clone()),
            ..Sinks::default()
        })
        .unwrap();
        let origins = Arc::new(StaticOrigins::default());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Shared {
            enforcement: ArcSwap::from_pointee(Enforcement {
                policy: snapshot.clone(),
                cgroups,
            }),
            origins: origins.clone(),
            auditor,
            upstream: Upstream::new(0, None, scopegate::forward::UpstreamSockets::unlimited()),
            resolver,
            limiter: RateLimiter::new(),
            detect_timeout: Duration::from_secs(5),
            leaves,
            secrets: Secrets::default(),
            framing: framing::Limits::default(),
            timeouts,
            connections: ConnectionCounts::default(),
            dns: scopegate::dns::DnsProxy::default(),
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            loop {
                let (stream, peer) = listener.accept().await.unwrap();
                tokio::spawn(pipeline::serve_connection(shared.clone(), stream, peer));
            }
        });
        Self {
            addr,
            origins,
            upstream,
            audit,
            policy: snapshot,
            _dir: dir,
            _runtime: runtime,
        }
    }

    /// A client connection that the "kernel" attributed to the workload, meant for the
    /// upstream.
    pub fn connect(&self) -> TcpStream {
        self.connect_to(self.upstream)
    }

    /// A client connection that the "kernel" recorded as a connect to `dst` (IPv4 or
    /// IPv6). The proxy dials `dst` only for a request it admits.
    pub fn connect_to(&self, dst: SocketAddr) -> TcpStream {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let local = socket.local_addr().unwrap().as_socket().unwrap();
        let (dst_ip, family) = match dst {
            SocketAddr::V4(v4) => ([u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0], FAMILY_V4),
            SocketAddr::V6(v6) => {
                let o = v6.ip().octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                ([word(0), word(4), word(8), word(12)], FAMILY_V6)
            }
        };
        self.origins.insert(
            local,
            Origin {
                dst_ip,
                dst_port: u32::from(dst.port()),
                family,
                cgroup_id: CGROUP,
                pid: std::process::id(),
                uid: 1000,
                policy_cgroup: CGROUP,
                workload: 0,
                _reserved: 0,
            },
        );
        socket.connect(&self.addr.into()).unwrap();
        let stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// One value per decision: outcome records folded into the decision they complete.
    pub fn records(&self) -> Vec<serde_json::Value> {
        scopegate::audit::query::fold_outcomes(
            std::fs::read_to_string(&self.audit)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    }

    /// Waits until there are at least `n` records (for records written after a response).
    pub fn wait_records(&self, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..200 {
            let records = self.records();
            if records.len() >= n {
                return records;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.records()
    }
}
