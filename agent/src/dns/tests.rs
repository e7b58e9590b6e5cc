//! The DNS proxy in process: real sockets on 127.0.0.1, an in-process upstream resolver,
//! the real audit writer.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use hickory_proto::{
    op::{Edns, Message, ResponseCode},
    rr::{Name, RData, Record as Rr, RecordType, rdata::A},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
};

use super::*;
use crate::{
    audit::Sinks,
    policy::Snapshot,
    resolve::StaticLookup,
    workloads::{CgroupInfo, Resolution},
};

const CGROUP: u64 = 4242;

struct Env {
    enforcement: ArcSwap<Enforcement>,
    auditor: Auditor,
    resolver: Resolver,
    dns: DnsProxy,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl DnsEnv for Env {
    fn enforcement(&self) -> &ArcSwap<Enforcement> {
        &self.enforcement
    }
    fn auditor(&self) -> &Auditor {
        &self.auditor
    }
    fn resolver(&self) -> &Resolver {
        &self.resolver
    }
    fn dns(&self) -> &DnsProxy {
        &self.dns
    }
}

impl Env {
    /// One value per decision (outcome records folded into their decision).
    fn records(&self) -> Vec<serde_json::Value> {
        crate::audit::query::fold_outcomes(self.raw_records())
    }

    /// The `proto: dns` lines of the audit file, as written.
    fn raw_records(&self) -> Vec<serde_json::Value> {
        dns_lines(&self.audit)
    }
}

/// The `proto: dns` lines of the audit file `path` (none when it does not exist yet).
fn dns_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["proto"] == "dns")
        .collect()
}

/// The in-process upstream: `api.test` A 192.0.2.7; `big.test`: truncated over UDP, 40 A
/// records over TCP; everything else NXDOMAIN. Counts queries per transport.
struct FakeResolver {
    addr: SocketAddr,
    udp: Arc<AtomicUsize>,
    tcp: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Message>>>,
    /// The audit file to look at when a question arrives (set by the test).
    watch: Arc<Mutex<Option<std::path::PathBuf>>>,
    /// Per question, the `proto: dns` records that file held when the question arrived.
    at_arrival: Arc<Mutex<Vec<Vec<serde_json::Value>>>>,
}

fn respond(query: &Message, tcp: bool) -> Vec<u8> {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.add_queries(query.queries.iter().cloned());
    let q = &query.queries[0];
    let name = q.name().to_ascii().to_ascii_lowercase();
    let a = |ip: [u8; 4]| {
        Rr::from_rdata(
            q.name().clone(),
            300,
            RData::A(A::from(std::net::Ipv4Addr::from(ip))),
        )
    };
    match name.as_str() {
        "api.test." if q.query_type() == RecordType::A => {
            response.add_answer(a([192, 0, 2, 7]));
        }
        "big.test." if !tcp => response.metadata.truncation = true,
        "big.test." => {
            for i in 0..40 {
                response.add_answer(a([198, 51, 100, i]));
            }
        }
        "api.test." => {}
        _ => response.metadata.response_code = ResponseCode::NXDomain,
    }
    response.to_vec().unwrap()
}

impl FakeResolver {
    async fn start() -> Self {
        let (udp_socket, tcp_listener) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp_socket.local_addr().unwrap();
        let (udp, tcp) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let watch: Arc<Mutex<Option<std::path::PathBuf>>> = Arc::new(Mutex::new(None));
        let at_arrival = Arc::new(Mutex::new(Vec::new()));
        {
            let (udp, seen) = (udp.clone(), seen.clone());
            let (watch, at_arrival) = (watch.clone(), at_arrival.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65535];
                loop {
                    let (n, peer) = udp_socket.recv_from(&mut buf).await.unwrap();
                    let query = Message::from_vec(&buf[..n]).unwrap();
                    if let Some(path) = watch.lock().unwrap().as_deref() {
                        at_arrival.lock().unwrap().push(dns_lines(path));
                    }
                    udp.fetch_add(1, Ordering::SeqCst);
                    let out = respond(&query, false);
                    seen.lock().unwrap().push(query);
                    udp_socket.send_to(&out, peer).await.unwrap();
                }
            });
        }
        {
            let (tcp, seen) = (tcp.clone(), seen.clone());
            tokio::spawn(async move {
                loop {
                    let (mut stream, _) = tcp_listener.accept().await.unwrap();
                    let mut head = [0u8; 2];
                    stream.read_exact(&mut head).await.unwrap();
                    let mut body = vec![0u8; usize::from(u16::from_be_bytes(head))];
                    stream.read_exact(&mut body).await.unwrap();
                    let query = Message::from_vec(&body).unwrap();
                    tcp.fetch_add(1, Ordering::SeqCst);
                    let out = respond(&query, true);
                    seen.lock().unwrap().push(query);
                    let mut framed = (out.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&out);
                    stream.write_all(&framed).await.unwrap();
                }
            });
        }
        Self {
            addr,
            udp,
            tcp,
            seen,
            watch,
            at_arrival,
        }
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.udp.load(Ordering::SeqCst),
            self.tcp.load(Ordering::SeqCst),
        )
    }
}

fn env(upstream: SocketAddr, dns: &str) -> Env {
    env_with(upstream, dns, crate::audit::sink::default_opener())
}

/// [`env`] with the audit file opened by `opener` (fault injection).
fn env_with(upstream: SocketAddr, dns: &str, opener: crate::audit::SinkOpener) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("p");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("w.yaml"),
        format!(
            "workload: w\nselect:\n  cgroup: /w\negress:\n  - host: api.test\n    port: 80\n    rules:\n      - id: r\n        methods: [GET]\n        path: /\n{dns}"
        ),
    )
    .unwrap();
    let snapshot = Arc::new(Snapshot::load_dir(&policies).unwrap_or_else(|e| panic!("{e}")));
    let mut managed = HashMap::new();
    managed.insert(
        CGROUP,
        CgroupInfo {
            path: "/w".into(),
            workload: Some(WorkloadId(0)),
            selected: true,
            held: false,
        },
    );
    let audit = dir.path().join("audit.jsonl");
    let sinks = Sinks {
        file: Some(audit.clone()),
        stdout: false,
        ..Sinks::default()
    };
    let (auditor, _writer) =
        Auditor::start_with(&sinks, opener, Box::new(std::io::sink())).unwrap();
    Env {
        enforcement: ArcSwap::from_pointee(Enforcement {
            policy: snapshot,
            cgroups: Arc::new(Resolution {
                managed,
                unmatched: Vec::new(),
                unseen_held: Default::default(),
            }),
        }),
        auditor,
        resolver: Resolver::new(StaticLookup::new()),
        dns: DnsProxy::new(vec![upstream]),
        audit,
        _dir: dir,
    }
}

fn caller() -> Caller {
    Caller {
        cgroup_id: CGROUP,
        uid: Some(1000),
        resolver: Some("192.0.2.53:53".parse().unwrap()),
        ..Caller::default()
    }
}

fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(hickory_proto::op::Query::query(
        Name::from_ascii(name).unwrap(),
        rtype,
    ));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        q.set_edns(e);
    }
    q
}

async fn ask(env: &Env, q: &Message, transport: Transport) -> Message {
    let out = answer(env, Some(&caller()), &q.to_vec().unwrap(), transport)
        .await
        .expect("an answer");
    Message::from_vec(&out).unwrap()
}

#[tokio::test]
async fn an_allowed_query_is_forwarded_answered_recorded_and_learned() {
    let upstream = FakeResolver::start().await;
    let env = env(upstream.addr, "dns: system\n");
    let q = query("API.test.", RecordType::A, Some(4096));
    let r = ask(&env, &q, Transport::Udp).await;
    assert_eq!(r.metadata.id, q.metadata.id);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.queries, q.queries);
    let ips: Vec<IpAddr> = r
        .answers
        .iter()
        .filter_map(|rr| match &rr.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect();
    assert_eq!(ips, vec![IpAddr::from([192, 0, 2, 7])]);
    assert_eq!(upstream.counts(), (1, 0));
    // What went upstream is a fresh question: another id, the decided question only.
    let sent = upstream.seen.lock().unwrap()[0].clone();
    assert_ne!(sent.metadata.id, q.metadata.id);
    assert_eq!(sent.queries, q.queries);
    assert!(sent.additionals.is_empty());
    assert_eq!(sent.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    // The answer binds the name for the request path.
    assert!(
        env.resolver
            .has_address("api.test", IpAddr::from([192, 0, 2, 7]))
            .await
            .unwrap()
    );
    let records = env.records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r["decision"], "allow");
    assert_eq!(r["workload"], "w");
    assert_eq!(r["cgroup"], "/w");
    assert_eq!(r["dst"]["ip"], "192.0.2.53");
    assert_eq!(
        r["dns"],
        serde_json::json!({"qname": "api.test", "qtype": "A", "transport": "udp",
            "rcode": "NOERROR", "answers": ["192.0.2.7"]})
    );
}

#[tokio::test]
async fn refusals_keep_the_id_and_question_and_nothing_is_forwarded() {
    let upstream = FakeResolver::start().await;
    let env = env(upstream.addr, "dns: system\n");
    for (name, rtype, reason) in [
        ("other.test.", RecordType::A, "dns_name_not_allowed"),
        ("x.api.test.", RecordType::AAAA, "dns_name_not_allowed"),
        ("api.test.", RecordType::TXT, "dns_type_not_allowed"),
        ("api.test.", RecordType::ANY, "dns_type_not_allowed"),
        ("api.test.", RecordType::CNAME, "dns_type_not_allowed"),
    ] {
        let q = query(name, rtype, None);
        let r = ask(&env, &q, Transport::Udp).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{name}");
        assert_eq!(r.metadata.id, q.metadata.id);
        assert_eq!(r.queries, q.queries);
        assert!(r.answers.is_empty());
        let last = env.records().pop().unwrap();
        assert_eq!(last["reason"], reason, "{name} {rtype}");
        assert_eq!(last["decision"], "deny");
        assert_eq!(last["dns"]["rcode"], "REFUSED");
    }
    // An unidentified sender is refused without a decision on the name.
    let q = query("api.test.", RecordType::A, None);
    let out = answer(&env, None, &q.to_vec().unwrap(), Transport::Udp)
        .await
        .unwrap();
    let r = Message::from_vec(&out).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(env.records().pop().unwrap()["reason"], "dns_unknown_sender");
    assert_eq!(upstream.counts(), (0, 0));
    assert_eq!(env.records().len(), 6);
}

#[tokio::test]
async fn malformed_messages_are_dropped_and_recorded() {
    let upstream = FakeResolver::start().await;
    let env = env(upstream.addr, "dns: system\n");
    let mut response = query("api.test.", RecordType::A, None);
    response.metadata.message_type = hickory_proto::op::MessageType::Response;
    let mut two = query("api.test.", RecordType::A, None);
    two.add_query(hickory_proto::op::Query::query(
        Name::from_ascii("other.test.").unwrap(),
        RecordType::A,
    ));
    let truncated = query("api.test.", RecordType::A, None).to_vec().unwrap();
    let hostile: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0; 3],
        b"\x12\x34not dns at all".to_vec(),
        truncated[..truncated.len() - 3].to_vec(),
        // A header claiming 65535 questions and nothing after it.
        vec![0x12, 0x34, 1, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0],
        // A compression pointer loop in the question name.
        vec![
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
        ],
        response.to_vec().unwrap(),
        two.to_vec().unwrap(),
    ];
    for wire in &hostile {
        for transport in [Transport::Udp, Transport::Tcp] {
            assert!(
                answer(&env, Some(&caller()), wire, transport)
                    .await
                    .is_none(),
                "{wire:?}"
            );
        }
    }
    let records = env.records();
    assert_eq!(records.len(), hostile.len() * 2);
    assert!(
        records
            .iter()
            .all(|r| r["reason"] == "dns_malformed" && r["decision"] == "deny")
    );
    assert_eq!(upstream.counts(), (0, 0));
}

#[tokio::test]
async fn truncated_upstream_answers_are_fetched_over_tcp_and_fitted_to_the_client() {
    let upstream = FakeResolver::start().await;
    let env = env(upstream.addr, "dns:\n  names: [big.test]\n");
    // A client with a large EDNS buffer gets the whole answer.
    let r = ask(
        &env,
        &query("big.test.", RecordType::A, Some(4096)),
        Transport::Udp,
    )
    .await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 40);
    assert_eq!(upstream.counts(), (1, 1), "UDP, truncated, then TCP");
    // A client without EDNS (512 bytes) gets TC and retries over TCP.
    let r = ask(
        &env,
        &query("big.test.", RecordType::A, None),
        Transport::Udp,
    )
    .await;
    assert!(r.metadata.truncation);
    assert!(r.answers.is_empty());
    let r = ask(
        &env,
        &query("big.test.", RecordType::A, None),
        Transport::Tcp,
    )
    .await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 40);
    assert_eq!(upstream.counts(), (2, 3));
    let records = env.records();
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r["decision"] == "allow"));
    assert_eq!(records[2]["dns"]["transport"], "tcp");
    assert_eq!(records[2]["dns"]["answers"].as_array().unwrap().len(), 40);
}

#[tokio::test]
async fn an_unreachable_resolver_is_servfail_and_recorded() {
    // A port nobody listens on (bound, then dropped).
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut env = env(dead, "dns: system\n");
    env.dns.timeout = std::time::Duration::from_millis(300);
    let r = ask(
        &env,
        &query("api.test.", RecordType::A, None),
        Transport::Udp,
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    // The decision to ask was recorded before asking; the failure is its outcome.
    let raw = env.raw_records();
    assert_eq!(raw.len(), 2, "{raw:#?}");
    assert_eq!(raw[0]["decision"], "allow");
    assert!(raw[0]["dns"]["rcode"].is_null(), "{}", raw[0]);
    assert_eq!(raw[1]["outcome_of"], raw[0]["seq"]);
    assert_eq!(raw[1]["decision"], "error");
    assert_eq!(raw[1]["reason"], "dns_upstream_failed");
    assert_eq!(raw[1]["origin"], "upstream");
    assert_eq!(raw[1]["dns"]["rcode"], "SERVFAIL");
    let records = env.records();
    assert_eq!(records.len(), 1, "one decision: {records:#?}");
    assert_eq!(records[0]["outcome"]["reason"], "dns_upstream_failed");
}

#[tokio::test]
async fn the_decision_is_recorded_before_the_question_goes_upstream() {
    let upstream = FakeResolver::start().await;
    let env = env(upstream.addr, "dns: system\n");
    *upstream.watch.lock().unwrap() = Some(env.audit.clone());
    let r = ask(
        &env,
        &query("api.test.", RecordType::A, None),
        Transport::Udp,
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(upstream.counts(), (1, 0));
    // When the question reached the resolver, its decision was already in the sink: the
    // name, the type, the transport and `allow`, with no answer yet.
    let at_arrival = upstream.at_arrival.lock().unwrap().clone();
    assert_eq!(at_arrival.len(), 1);
    let held = &at_arrival[0];
    assert_eq!(held.len(), 1, "{held:#?}");
    assert_eq!(held[0]["decision"], "allow");
    assert!(held[0]["outcome_of"].is_null(), "{}", held[0]);
    assert_eq!(
        held[0]["dns"],
        serde_json::json!({"qname": "api.test", "qtype": "A", "transport": "udp",
            "rcode": null, "answers": []})
    );
    // The answer is the linked outcome record, written before the answer was returned.
    let raw = env.raw_records();
    assert_eq!(raw.len(), 2, "{raw:#?}");
    assert_eq!(raw[1]["outcome_of"], held[0]["seq"]);
    assert_eq!(raw[1]["request_id"], held[0]["request_id"]);
    assert_eq!(raw[1]["decision"], "allow");
    assert_eq!(raw[1]["dns"]["rcode"], "NOERROR");
    assert_eq!(raw[1]["dns"]["answers"], serde_json::json!(["192.0.2.7"]));
}

#[tokio::test]
async fn a_sink_that_cannot_write_is_servfail_and_nothing_is_forwarded() {
    let upstream = FakeResolver::start().await;
    let faults = crate::audit::tests::Faults::default();
    let env = env_with(upstream.addr, "dns: system\n", faults.opener());
    // The sink fails while the decision record is written (the writer still looks
    // healthy), then while it is known to fail.
    faults.set_write(1);
    for (i, name) in ["api.test.", "API.test."].iter().enumerate() {
        let q = query(name, RecordType::A, None);
        let r = ask(&env, &q, Transport::Udp).await;
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{i}");
        assert_eq!(r.metadata.id, q.metadata.id);
        assert!(r.answers.is_empty());
    }
    assert_eq!(upstream.counts(), (0, 0), "the resolver was never asked");
    assert!(
        !env.resolver
            .has_address("api.test", IpAddr::from([192, 0, 2, 7]))
            .await
            .unwrap_or(false)
    );
    // Once the sink writes again, the backlog shows why: nothing was forwarded.
    faults.set_write(0);
    let mut records = Vec::new();
    for _ in 0..100 {
        records = env.records();
        if records.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        let unavailable = if r["outcome"].is_null() {
            r
        } else {
            &r["outcome"]
        };
        assert_eq!(unavailable["reason"], "audit_unavailable", "{r}");
        assert_eq!(unavailable["dns"]["rcode"], "SERVFAIL", "{r}");
        assert_eq!(r["dns"]["qname"], "api.test", "{r}");
    }
}

#[tokio::test]
async fn the_udp_listener_answers_over_real_sockets() {
    struct Fixed;
    impl UdpCallers for Fixed {
        fn caller(&self, _listener: SocketAddr, _peer: SocketAddr) -> Option<Caller> {
            Some(caller())
        }
    }
    let upstream = FakeResolver::start().await;
    let env: Arc<dyn DnsEnv> = Arc::new(env(upstream.addr, "dns: system\n"));
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let listener = socket.local_addr().unwrap();
    tokio::spawn(serve_udp(env, socket, Arc::new(Fixed)));
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.connect(listener).await.unwrap();
    let q = query("api.test.", RecordType::A, None);
    client.send(&q.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id);
    assert_eq!(r.answers.len(), 1);
}
