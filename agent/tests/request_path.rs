//! In-process integration tier for the request path, on 127.0.0.1 without root: the real
//! pipeline (framing guard, hyper server, outbound builder, enforce, forward, respond,
//! audit writer) between a raw-socket client and an upstream that records the exact bytes
//! it receives. The kernel's origin map is replaced by [`StaticOrigins`], which users never
//! see; everything else is what production runs.
//!
//! For every refusal: the status, the reason, exactly one audit record, nothing at the
//! upstream, and the connection closed. For every forwarded request: the pure decision on
//! the request AS THE UPSTREAM RECEIVED IT allows it by the rule the record names.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::panic, missing_docs, reason = "tests")]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use scopegate::{
    policy::{self, WorkloadId},
    resolve::{Resolver, StaticLookup},
};

mod support;

use support::{Proxy, SECRET};

/// One request as the upstream received it: the exact bytes.
#[derive(Clone, Debug)]
struct Received {
    head: String,
    body: Vec<u8>,
}

impl Received {
    fn target(&self) -> &str {
        self.head.split(' ').nth(1).unwrap()
    }
    fn method(&self) -> &str {
        self.head.split(' ').next().unwrap()
    }
    fn headers(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for line in self.head.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(':').unwrap();
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v.trim()).unwrap(),
            );
        }
        map
    }
}

/// An HTTP/1.1 upstream on 127.0.0.1 that records each request's bytes and answers 200.
/// Under `/echo` it answers with the request's own bytes (a debug endpoint that reflects
/// whatever it was sent, credentials included).
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Recorder {
    fn start() -> Self {
        Self::start_on("127.0.0.1:0")
    }

    /// The recorder on `addr` (e.g. a fixed port 80 on an address no other test uses).
    fn start_on(addr: &str) -> Self {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let s = s.clone();
                thread::spawn(move || serve_recorded(stream, &s));
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_recorded(stream: TcpStream, seen: &Mutex<Vec<Received>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let head = head.trim_end_matches("\r\n").to_owned();
        let lower = head.to_ascii_lowercase();
        let length = lower
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>().unwrap());
        let chunked = lower.contains("\r\ntransfer-encoding: chunked");
        let mut body = Vec::new();
        if let Some(n) = length {
            body.resize(n, 0);
            reader.read_exact(&mut body).unwrap();
        } else if chunked {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; n + 2];
                reader.read_exact(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        }
        let received = Received { head, body };
        let reply = if received.target().starts_with("/echo") {
            format!(
                "{}\r\n\r\n{}",
                received.head,
                String::from_utf8_lossy(&received.body)
            )
        } else {
            "ok".to_owned()
        };
        // Under `/gzip` it claims a content coding whatever the client asked for.
        let coding = if received.target().starts_with("/gzip") {
            "content-encoding: gzip\r\n"
        } else {
            ""
        };
        seen.lock().unwrap().push(received);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n{coding}content-length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn policy_text(port: u16, secret_file: &Path) -> String {
    format!(
        r#"workload: app
select:
  cgroup: /test/app
egress:
  - host: "127.0.0.1"
    port: {port}
    credential:
      header: authorization
      format: "Bearer {{secret}}"
      secret_file: {secret}
    rules:
      - id: tenant
        methods: [GET]
        path: /tenant/**
        headers:
          x-tenant: {{one_of: [t1]}}
      - id: reports
        methods: [GET]
        path: /reports/**
      - id: exact
        methods: [GET, OPTIONS]
        path: /exact
      - id: override-ok
        methods: [POST]
        path: /rpc
        headers:
          x-http-method-override: {{one_of: [PATCH]}}
      - id: charge
        methods: [POST]
        path: /charges
        json:
          - {{field: amount, max: 100}}
      - id: echo
        methods: [GET]
        path: /echo
      - id: gzip
        methods: [GET]
        path: /gzip
      - id: connect
        methods: [GET]
        path: /connect
"#,
        secret = secret_file.display()
    )
}

impl Proxy {
    fn start(upstream: SocketAddr) -> Self {
        Self::start_with(
            upstream,
            |secret| policy_text(upstream.port(), secret),
            Resolver::new(StaticLookup::new()),
        )
    }

    /// Re-decides a request as the upstream received it with the pure policy decision.
    fn redecide(&self, received: &Received) -> Result<String, String> {
        let path = policy::normalize(received.target()).map_err(|e| e.to_string())?;
        assert_eq!(
            path.as_request_target(),
            received.target(),
            "the upstream received a non-canonical target"
        );
        let headers = received.headers();
        let json = (!received.body.is_empty())
            .then(|| {
                policy::parse_json_body(
                    &received.body,
                    headers.get("content-type").and_then(|v| v.to_str().ok()),
                )
                .ok()
            })
            .flatten();
        let host = headers.get("host").unwrap().to_str().unwrap();
        // No port: the scheme's default (plain HTTP here).
        let (host, port) = host
            .rsplit_once(':')
            .map_or((host, 80), |(h, p)| (h, p.parse().unwrap()));
        let request = policy::Request {
            workload: WorkloadId(0),
            uid: 1000,
            method: received.method(),
            host,
            port,
            path: &path,
            headers: &headers,
            body: json.as_ref(),
            at: jiff::Timestamp::now(),
        };
        match policy::decide(&self.policy, &request) {
            policy::Decision::Allow { rule, .. } => Ok(rule.rule_id().to_owned()),
            policy::Decision::Deny(reason) => Err(reason.code().to_owned()),
        }
    }
}

/// A parsed response, and whether the proxy closed the connection after it.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
    closed: bool,
}

fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("connection closed before a response; got {head:?}");
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .to_ascii_lowercase()
        .split("\r\n")
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut rest = [0u8; 1];
    let closed = matches!(reader.read(&mut rest), Ok(0));
    Answer {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
        closed,
    }
}

fn exchange(proxy: &Proxy, raw: &[u8]) -> Answer {
    exchange_to(proxy, proxy.upstream, raw)
}

/// `raw` on a connection the kernel recorded as a connect to `dst`.
fn exchange_to(proxy: &Proxy, dst: SocketAddr, raw: &[u8]) -> Answer {
    let mut stream = proxy.connect_to(dst);
    stream.write_all(raw).unwrap();
    read_answer(&mut stream)
}

fn get(target: &str, host: SocketAddr, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n{extra}\r\n").into_bytes()
}

fn setup() -> (Recorder, Proxy) {
    let recorder = Recorder::start();
    let proxy = Proxy::start(recorder.addr);
    (recorder, proxy)
}

/// Asserts one refusal: status, reason, exactly one new record that says so, nothing new
/// at the upstream, and, for a request refused as the client's fault, the connection
/// closed (a 403 by policy keeps it).
fn assert_refused(
    recorder: &Recorder,
    proxy: &Proxy,
    raw: &[u8],
    status: u16,
    reason: &str,
    error_kind: Option<&str>,
) {
    assert_refused_to(
        recorder,
        proxy,
        proxy.upstream,
        raw,
        status,
        reason,
        error_kind,
    );
}

/// [`assert_refused`] on a connection the kernel recorded as a connect to `dst`; returns
/// the answer.
fn assert_refused_to(
    recorder: &Recorder,
    proxy: &Proxy,
    dst: SocketAddr,
    raw: &[u8],
    status: u16,
    reason: &str,
    error_kind: Option<&str>,
) -> Answer {
    let (before_seen, before_records) = (recorder.seen().len(), proxy.records().len());
    let answer = exchange_to(proxy, dst, raw);
    let case = String::from_utf8_lossy(raw);
    assert_eq!(answer.status, status, "{case}\n{answer:?}");
    assert!(answer.body.contains(reason), "{case}\n{answer:?}");
    let origin = if status == 403 { "policy" } else { "client" };
    if origin == "client" {
        assert!(answer.closed, "the connection stays open after {case:?}");
    }
    let records = proxy.records();
    assert_eq!(
        records.len(),
        before_records + 1,
        "exactly one record for {case:?}: {records:#?}"
    );
    let record = &records[before_records];
    assert_eq!(record["decision"], "deny", "{record}");
    assert_eq!(record["reason"], reason, "{record}");
    assert_eq!(record["status"], status, "{record}");
    assert_eq!(record["origin"], origin, "{record}");
    assert_eq!(record["workload"], "app", "{record}");
    assert_eq!(record["cgroup"], "/test/app", "{record}");
    if let Some(kind) = error_kind {
        assert_eq!(record["error_kind"], kind, "{record}");
    }
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        recorder.seen().len(),
        before_seen,
        "the upstream saw {case:?}"
    );
    answer
}

#[test]
fn connection_may_not_nominate_what_the_decision_read() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    let cases: [(&str, &str); 5] = [
        // a header a rule constrains: stripping it after the decision changed the request
        ("/tenant/a", "x-tenant: t1\r\nconnection: x-tenant\r\n"),
        // Host: the upstream would get no Host at all
        ("/reports/a", "connection: Host\r\n"),
        // the credential header
        ("/reports/a", "connection: authorization\r\n"),
        // framing
        ("/reports/a", "connection: content-length\r\n"),
        // a method override, even where a rule names it
        ("/reports/a", "connection: X-HTTP-Method-Override\r\n"),
    ];
    for (target, extra) in cases {
        assert_refused(
            &recorder,
            &proxy,
            &get(target, up, extra),
            400,
            "connection_names_protected_header",
            None,
        );
    }
}

#[test]
fn harmless_nominations_are_removed_before_the_decision() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    let raw = get(
        "/tenant/a",
        up,
        "x-tenant: t1\r\nx-trace: 1\r\nconnection: keep-alive, x-trace\r\nkeep-alive: 5\r\nte: trailers\r\n",
    );
    let answer = exchange(&proxy, &raw);
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = recorder.seen();
    assert_eq!(seen.len(), 1);
    let head = seen[0].head.to_ascii_lowercase();
    assert!(head.contains("\r\nx-tenant: t1"), "{head}");
    for gone in ["x-trace", "connection:", "keep-alive", "\r\nte:"] {
        assert!(!head.contains(gone), "{gone} reached the upstream: {head}");
    }
    let records = proxy.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["rule"], "tenant");
    assert_eq!(proxy.redecide(&seen[0]), Ok("tenant".to_owned()));
}

#[test]
fn trailing_slash_is_part_of_the_path() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    for (target, forwarded) in [
        ("/reports/dir/", "/reports/dir/"),
        ("/reports/dir", "/reports/dir"),
        ("/reports/%64ir/", "/reports/dir/"),
        ("/reports/a/b/..", "/reports/a/"),
        ("/reports", "/reports"),
        ("/reports/", "/reports/"),
    ] {
        let answer = exchange(&proxy, &get(target, up, ""));
        assert_eq!(answer.status, 200, "{target}: {answer:?}");
        let seen = recorder.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.target(), forwarded, "{target}");
        let records = proxy.records();
        assert_eq!(records.last().unwrap()["path"], forwarded);
        assert_eq!(proxy.redecide(last), Ok("reports".to_owned()));
    }
    // `/exact` names one resource; `/exact/` is another.
    let answer = exchange(&proxy, &get("/exact/", up, ""));
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(answer.body.contains("path_not_allowed"), "{answer:?}");
}

#[test]
fn header_names_and_overrides() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    assert_refused(
        &recorder,
        &proxy,
        &get("/reports/a", up, "x-role: user\r\nx_role: admin\r\n"),
        400,
        "header_name_invalid",
        None,
    );
    for name in [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "X-Original-URL",
        "X-Rewrite-URL",
    ] {
        assert_refused(
            &recorder,
            &proxy,
            &get("/reports/a", up, &format!("{name}: /admin\r\n")),
            403,
            "override_header_refused",
            None,
        );
    }
    // A rule that names the override header decides it like any header.
    let raw = format!(
        "POST /rpc HTTP/1.1\r\nhost: {up}\r\nx-http-method-override: PATCH\r\ncontent-length: 0\r\n\r\n"
    );
    let answer = exchange(&proxy, raw.as_bytes());
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = recorder.seen();
    assert_eq!(
        proxy.redecide(seen.last().unwrap()),
        Ok("override-ok".to_owned())
    );
}

#[test]
fn framing_refusals_are_recorded_and_close() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    let post = |extra: &str, body: &str| {
        format!("POST /reports/x HTTP/1.1\r\nhost: {up}\r\n{extra}\r\n{body}").into_bytes()
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            post(
                "content-length: 5\r\ntransfer-encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            400,
            "content_length_with_transfer_encoding",
        ),
        (
            post("content-length: 2\r\ncontent-length: 2\r\n", "ab"),
            400,
            "content_length_duplicate",
        ),
        (
            post("content-length: +2\r\n", "ab"),
            400,
            "content_length_invalid",
        ),
        (
            post("transfer-encoding: gzip, chunked\r\n", "0\r\n\r\n"),
            501,
            "transfer_encoding_unsupported",
        ),
        (
            post("transfer-encoding: chunked\r\n", "2 \r\nab\r\n0\r\n\r\n"),
            400,
            "chunk_size_invalid",
        ),
        (
            format!("GET /reports/a#frag HTTP/1.1\r\nhost: {up}\r\n\r\n").into_bytes(),
            400,
            "target_invalid",
        ),
        (
            format!("GET /reports/a HTTP/1.1\r\nhost: {up}\r\nx-a: 1\r\n  folded\r\n\r\n")
                .into_bytes(),
            400,
            "",
        ),
        (
            format!("GET /reports/a HTTP/1.1\r\nhost: {up}\r\nx-a: a\0b\r\n\r\n").into_bytes(),
            400,
            "",
        ),
        (
            format!(
                "GET /reports/a HTTP/1.1\r\nhost: {up}\r\nx-big: {}\r\n\r\n",
                "a".repeat(70_000)
            )
            .into_bytes(),
            431,
            "",
        ),
        (
            format!(
                "GET /reports/{} HTTP/1.1\r\nhost: {up}\r\n\r\n",
                "a".repeat(9_000)
            )
            .into_bytes(),
            414,
            "",
        ),
    ];
    for (raw, status, kind) in cases {
        assert_refused(
            &recorder,
            &proxy,
            &raw,
            status,
            "malformed_request",
            (!kind.is_empty()).then_some(kind),
        );
        let record = proxy.records().pop().unwrap();
        assert!(
            record["error_kind"].as_str().is_some_and(|k| !k.is_empty()),
            "{record}"
        );
    }
}

#[test]
fn connect_is_never_granted() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    let raw = format!("CONNECT {up} HTTP/1.1\r\nhost: {up}\r\n\r\n");
    let before = recorder.seen().len();
    let answer = exchange(&proxy, raw.as_bytes());
    assert_eq!(answer.status, 405, "{answer:?}");
    assert!(answer.body.contains("connect_not_allowed"));
    let records = proxy.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["reason"], "connect_not_allowed");
    assert_eq!(recorder.seen().len(), before);
}

#[test]
fn bodies_are_decided_on_their_exact_text() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    let post = |extra: &str, body: &str| {
        format!(
            "POST /charges HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    // f64 would round this to 100 and let it pass.
    let answer = exchange(&proxy, &post("", r#"{"amount": 100.000000000000001}"#));
    assert_eq!(answer.status, 403, "{answer:?}");
    let answer = exchange(&proxy, &post("", r#"{"amount": 100}"#));
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = recorder.seen();
    assert_eq!(seen.last().unwrap().body, br#"{"amount": 100}"#);
    assert_eq!(
        proxy.redecide(seen.last().unwrap()),
        Ok("charge".to_owned())
    );
    assert_refused(
        &recorder,
        &proxy,
        &post("", "{\"amount\\u0000\": 1000}"),
        400,
        "json_key_invalid",
        None,
    );
    let before = recorder.seen().len();
    let answer = exchange(
        &proxy,
        &post("content-encoding: gzip\r\n", r#"{"amount": 1}"#),
    );
    assert_eq!(answer.status, 415, "{answer:?}");
    assert!(answer.body.contains("content_encoding_unsupported"));
    assert_eq!(recorder.seen().len(), before);
}

#[test]
fn a_reflected_credential_is_redacted_and_recorded() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    let answer = exchange(&proxy, &get("/echo", up, "x-a: 1\r\n"));
    assert_eq!(answer.status, 200, "{answer:?}");
    // The upstream got the secret; the workload never sees it.
    let seen = recorder.seen();
    assert!(seen[0].head.contains(SECRET), "{:?}", seen[0].head);
    assert!(!answer.body.contains(SECRET), "{answer:?}");
    assert!(!answer.head.contains(SECRET), "{answer:?}");
    assert!(
        answer.body.contains(&"*".repeat(SECRET.len())),
        "{answer:?}"
    );
    let records = proxy.wait_records(2);
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0]["decision"], "allow");
    assert_eq!(records[1]["reason"], "credential_reflected");
    assert_eq!(records[1]["origin"], "upstream");
    assert_eq!(records[1]["request_id"], records[0]["request_id"]);
    // A response without the secret: no second record.
    let answer = exchange(&proxy, &get("/reports/x", up, ""));
    assert_eq!(answer.status, 200);
    assert_eq!(proxy.wait_records(3).len(), 3);
    // A coded response cannot be scanned: withheld, recorded; the request asked for identity.
    let answer = exchange(&proxy, &get("/gzip", up, "accept-encoding: gzip\r\n"));
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(
        answer.body.contains("upstream_encoding_unscannable"),
        "{answer:?}"
    );
    let head = recorder.seen().last().unwrap().head.to_ascii_lowercase();
    assert!(head.contains("\r\naccept-encoding: identity"), "{head}");
    assert!(!head.contains("accept-encoding: gzip"), "{head}");
    let records = proxy.wait_records(4);
    // Forwarded (allowed, recorded first); the outcome is the withheld response.
    assert_eq!(records[3]["decision"], "allow");
    assert_eq!(records[3]["outcome"]["decision"], "error");
    assert_eq!(
        records[3]["outcome"]["reason"],
        "upstream_encoding_unscannable"
    );
    assert_eq!(records[3]["status"], 502);
    // OPTIONS gets the credential only where the rule names OPTIONS (here: /exact does).
    let answer = exchange(
        &proxy,
        &format!("OPTIONS /exact HTTP/1.1\r\nhost: {up}\r\n\r\n").into_bytes(),
    );
    assert_eq!(answer.status, 200);
    assert!(recorder.seen().last().unwrap().head.contains(SECRET));
}

#[test]
fn pipelined_requests_after_a_refusal_are_never_forwarded() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    let mut raw = get("/reports/one", up, "");
    raw.extend(get("/reports/two", up, "connection: host\r\n"));
    raw.extend(get("/reports/three", up, ""));
    let mut stream = proxy.connect();
    stream.write_all(&raw).unwrap();
    let first = read_answer_keep(&mut stream);
    assert_eq!(first, 200);
    let answer = read_answer(&mut stream);
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.closed);
    let targets: Vec<_> = recorder
        .seen()
        .iter()
        .map(|r| r.target().to_owned())
        .collect();
    assert_eq!(targets, ["/reports/one"]);
    let records = proxy.records();
    assert_eq!(records.len(), 2, "{records:#?}");
}

/// Reads one response without checking for close.
fn read_answer_keep(stream: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .to_ascii_lowercase()
        .split("\r\n")
        .find_map(|l| {
            l.strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// Destination binding: a name is not an address.

/// A policy of name destinations on the upstream's port, one rule each; `extra` lines go
/// into every destination (e.g. `allow_internal`), per name.
fn names_policy(port: u16, names: &[(&str, &str)]) -> String {
    let mut text = "workload: app\nselect:\n  cgroup: /test/app\negress:\n".to_owned();
    for (i, (name, extra)) in names.iter().enumerate() {
        text.push_str(&format!(
            "  - host: {name}\n    port: {port}\n{extra}    rules:\n      - id: r{i}\n        methods: [GET]\n        path: /**\n"
        ));
    }
    text
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

/// The proxy with name destinations answered by `answers`.
fn names_setup(names: &[(&str, &str)], answers: &[(&str, &[&str])]) -> (Recorder, Proxy) {
    let recorder = Recorder::start();
    let lookup = answers.iter().fold(StaticLookup::new(), |l, (name, ips)| {
        l.with(name, ips.iter().map(|s| ip(s)))
    });
    let port = recorder.addr.port();
    let proxy = Proxy::start_with(
        recorder.addr,
        |_| names_policy(port, names),
        Resolver::new(lookup),
    );
    (recorder, proxy)
}

fn get_name(name: &str, port: u16) -> Vec<u8> {
    format!("GET /x HTTP/1.1\r\nhost: {name}:{port}\r\n\r\n").into_bytes()
}

/// The connection's address (the upstream's port) as the kernel would record it.
fn at(proxy: &Proxy, addr: &str) -> SocketAddr {
    SocketAddr::new(ip(addr), proxy.upstream.port())
}

#[test]
fn name_resolving_to_an_internal_address_is_denied() {
    let (recorder, proxy) = names_setup(
        &[("lo.test", ""), ("private.test", "")],
        &[("lo.test", &["127.0.0.1"]), ("private.test", &["10.0.0.1"])],
    );
    let port = proxy.upstream.port();
    let answer = assert_refused_to(
        &recorder,
        &proxy,
        proxy.upstream,
        &get_name("lo.test", port),
        403,
        "destination_internal_address",
        None,
    );
    assert!(
        answer
            .body
            .contains("lo.test resolves to 127.0.0.1 (loopback), an internal address"),
        "{answer:?}"
    );
    let record = proxy.records().pop().unwrap();
    assert_eq!(record["dst"]["ip"], "127.0.0.1", "{record}");
    // RFC 1918 too (denied before any dial: nothing listens there).
    let answer = assert_refused_to(
        &recorder,
        &proxy,
        at(&proxy, "10.0.0.1"),
        &get_name("private.test", port),
        403,
        "destination_internal_address",
        None,
    );
    assert!(answer.body.contains("10.0.0.1 (private)"), "{answer:?}");
    assert!(recorder.seen().is_empty());
    assert_eq!(proxy.records().len(), 2);
}

#[test]
fn allow_internal_true_forwards_to_loopback() {
    let (recorder, proxy) = names_setup(
        &[("lo.test", "    allow_internal: true\n")],
        &[("lo.test", &["127.0.0.1"])],
    );
    let answer = exchange(&proxy, &get_name("lo.test", proxy.upstream.port()));
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = recorder.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(proxy.redecide(&seen[0]), Ok("r0".to_owned()));
    let records = proxy.wait_records(1);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["decision"], "allow");
    assert_eq!(records[0]["rule"], "r0");
}

#[test]
fn embedded_ipv4_loopback_answers_are_denied_as_loopback() {
    let (recorder, proxy) = names_setup(
        &[("mapped.test", ""), ("nat64.test", "")],
        &[
            ("mapped.test", &["::ffff:127.0.0.31"]),
            ("nat64.test", &["64:ff9b::7f00:1"]),
        ],
    );
    let port = proxy.upstream.port();
    // The kernel may record the v4-mapped connect as IPv6 or as IPv4: both are 127.0.0.31.
    for dst in ["::ffff:127.0.0.31", "127.0.0.31"] {
        let answer = assert_refused_to(
            &recorder,
            &proxy,
            at(&proxy, dst),
            &get_name("mapped.test", port),
            403,
            "destination_internal_address",
            None,
        );
        assert!(answer.body.contains("127.0.0.31 (loopback)"), "{answer:?}");
    }
    let answer = assert_refused_to(
        &recorder,
        &proxy,
        at(&proxy, "64:ff9b::7f00:1"),
        &get_name("nat64.test", port),
        403,
        "destination_internal_address",
        None,
    );
    assert!(
        answer
            .body
            .contains("64:ff9b::7f00:1 (loopback, IPv4 127.0.0.1 in NAT64 64:ff9b::/96)"),
        "{answer:?}"
    );
    assert_eq!(proxy.records().len(), 3);
}

#[test]
fn a_mixed_answer_set_binds_only_the_allowed_address() {
    let (recorder, proxy) = names_setup(
        &[
            ("mixed.test", ""),
            ("inside.test", "    allow_internal: [127.0.0.0/8]\n"),
        ],
        &[
            ("mixed.test", &["198.51.100.7", "127.0.0.1"]),
            ("inside.test", &["10.0.0.1", "127.0.0.1"]),
        ],
    );
    let port = proxy.upstream.port();
    // Public + loopback, no allow_internal: the connection to loopback is not bound.
    // (A connection to 198.51.100.7 is: `enforce` unit tests; nothing listens there.)
    assert_refused_to(
        &recorder,
        &proxy,
        proxy.upstream,
        &get_name("mixed.test", port),
        403,
        "destination_internal_address",
        None,
    );
    // allow_internal [127.0.0.0/8]: the connection to 127.0.0.1 is forwarded ...
    let answer = exchange(&proxy, &get_name("inside.test", port));
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(recorder.seen().len(), 1);
    assert_eq!(proxy.redecide(&recorder.seen()[0]), Ok("r1".to_owned()));
    // ... but 10.0.0.1, also in the answers, is still not bindable: the connection's
    // address decides, not the answer set.
    let before = proxy.wait_records(2).len();
    let answer = assert_refused_to(
        &recorder,
        &proxy,
        at(&proxy, "10.0.0.1"),
        &get_name("inside.test", port),
        403,
        "destination_internal_address",
        None,
    );
    assert!(answer.body.contains("10.0.0.1 (private)"), "{answer:?}");
    assert_eq!(proxy.records().len(), before + 1);
    // An address outside the answers is still a mismatch.
    assert_refused_to(
        &recorder,
        &proxy,
        at(&proxy, "127.0.0.2"),
        &get_name("mixed.test", port),
        403,
        "destination_address_mismatch",
        None,
    );
}

/// The Host values of a request as the upstream received it.
fn received_hosts(received: &Received) -> Vec<String> {
    received
        .headers()
        .get_all("host")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

/// Each `host` is sent on a connection to the upstream; the upstream must receive exactly
/// one Host, `want`, and the record names the canonical host.
fn assert_forwarded_host(recorder: &Recorder, proxy: &Proxy, hosts: &[String], want: &str) {
    for host in hosts {
        let before = recorder.seen().len();
        let raw = format!("GET /x HTTP/1.1\r\nhost: {host}\r\n\r\n");
        let answer = exchange(proxy, raw.as_bytes());
        assert_eq!(answer.status, 200, "{host}: {answer:?}");
        let seen = recorder.seen();
        assert_eq!(seen.len(), before + 1, "{host}");
        assert_eq!(
            received_hosts(&seen[before]),
            [want],
            "{host}: {}",
            seen[before].head
        );
        assert_eq!(proxy.redecide(&seen[before]), Ok("r0".to_owned()), "{host}");
    }
    let records = proxy.wait_records(hosts.len());
    assert_eq!(records.len(), hosts.len(), "{records:#?}");
    for r in &records {
        assert_eq!(r["decision"], "allow", "{r}");
        assert_eq!(r["dst"]["host"], "api.allowed.test", "{r}");
    }
}

#[test]
fn the_upstream_receives_the_canonical_host() {
    let (recorder, proxy) = names_setup(
        &[("api.allowed.test", "    allow_internal: true\n")],
        &[("api.allowed.test", &["127.0.0.1"])],
    );
    let port = proxy.upstream.port();
    // Mixed case, a leading zero in the port, one trailing dot: lowercase, no dot, the
    // port as a number.
    let hosts = [
        format!("API.Allowed.TEST:0{port}"),
        format!("api.allowed.test.:{port}"),
        format!("Api.ALLOWED.test.:00{port}"),
    ];
    assert_forwarded_host(
        &recorder,
        &proxy,
        &hosts,
        &format!("api.allowed.test:{port}"),
    );
}

#[test]
fn the_default_port_is_dropped_from_the_forwarded_host() {
    // Port 80 on an address no other test uses.
    let recorder = Recorder::start_on("127.0.80.13:80");
    let proxy = Proxy::start_with(
        recorder.addr,
        |_| names_policy(80, &[("api.allowed.test", "    allow_internal: true\n")]),
        Resolver::new(StaticLookup::new().with("api.allowed.test", [ip("127.0.80.13")])),
    );
    let hosts = [
        "API.Allowed.TEST:0080".to_owned(),
        "api.allowed.test.".to_owned(),
        "Api.Allowed.Test.:80".to_owned(),
    ];
    assert_forwarded_host(&recorder, &proxy, &hosts, "api.allowed.test");
}

#[test]
fn the_binding_is_checked_before_the_rules() {
    let recorder = Recorder::start();
    let port = recorder.addr.port();
    let proxy = Proxy::start_with(
        recorder.addr,
        |_| {
            format!(
                "workload: app\nselect:\n  cgroup: /test/app\negress:\n  - host: api.allowed.test\n    port: {port}\n    allow_internal: true\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n"
            )
        },
        Resolver::new(StaticLookup::new().with("api.allowed.test", [ip("127.0.0.1")])),
    );
    let request = |method: &str, path: &str| {
        format!("{method} {path} HTTP/1.1\r\nhost: api.allowed.test:{port}\r\n\r\n").into_bytes()
    };
    let cases = [
        (request("DELETE", "/allowed/x"), "method_not_allowed"),
        (request("GET", "/other"), "path_not_allowed"),
    ];
    for (raw, rule_reason) in &cases {
        // On the name's address, the rules refuse it ...
        assert_refused_to(
            &recorder,
            &proxy,
            proxy.upstream,
            raw,
            403,
            rule_reason,
            None,
        );
        // ... on an address that is not among the name's answers, the binding does, first.
        let answer = assert_refused_to(
            &recorder,
            &proxy,
            at(&proxy, "127.0.0.2"),
            raw,
            403,
            "destination_address_mismatch",
            None,
        );
        assert!(!answer.body.contains(rule_reason), "{answer:?}");
        let record = proxy.records().pop().unwrap();
        assert_eq!(record["dst"]["ip"], "127.0.0.2", "{record}");
        assert!(record["rule"].is_null(), "{record}");
    }
    // The request the rules allow is forwarded on the name's address only.
    assert_eq!(exchange(&proxy, &request("GET", "/allowed/x")).status, 200);
    assert_refused_to(
        &recorder,
        &proxy,
        at(&proxy, "127.0.0.2"),
        &request("GET", "/allowed/x"),
        403,
        "destination_address_mismatch",
        None,
    );
    assert_eq!(recorder.seen().len(), 1);
}

#[test]
fn numeric_hosts_match_no_destination() {
    // An IP-literal destination 127.0.0.1 and a name destination: inet_aton spellings of
    // 127.0.0.1 in Host name neither.
    let recorder = Recorder::start();
    let port = recorder.addr.port();
    let proxy = Proxy::start_with(
        recorder.addr,
        |_| {
            format!(
                "workload: app\nselect:\n  cgroup: /test/app\negress:\n  - host: \"127.0.0.1\"\n    port: {port}\n    rules:\n      - id: lit\n        methods: [GET]\n        path: /**\n  - host: lo.test\n    port: {port}\n    allow_internal: true\n    rules:\n      - id: name\n        methods: [GET]\n        path: /**\n"
            )
        },
        Resolver::new(StaticLookup::new().with("lo.test", [ip("127.0.0.1")])),
    );
    for spelling in [
        "0x7f.0x1",
        "0x7f000001",
        "2130706433",
        "017700000001",
        "127.1",
        "0177.0.0.1",
    ] {
        let raw = format!("GET /x HTTP/1.1\r\nhost: {spelling}:{port}\r\n\r\n");
        let answer = exchange(&proxy, raw.as_bytes());
        assert_eq!(answer.status, 403, "{spelling}: {answer:?}");
        assert!(
            answer
                .body
                .contains("\"reason\":\"destination_not_allowed\""),
            "{spelling}: {answer:?}"
        );
    }
    assert!(recorder.seen().is_empty());
    assert_eq!(proxy.records().len(), 6);
    // The canonical spellings do match.
    let answer = exchange(&proxy, &get("/x", recorder.addr, ""));
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = exchange(&proxy, &get_name("lo.test", port));
    assert_eq!(answer.status, 200, "{answer:?}");
}

#[test]
fn a_partial_head_is_refused_at_the_header_timeout_and_an_idle_connection_closes() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    // A head that never completes: closed at the header timeout, one record.
    let mut stream = proxy.connect();
    let started = std::time::Instant::now();
    stream
        .write_all(format!("GET /reports/a HTTP/1.1\r\nhost: {up}\r\nx-a: 1").as_bytes())
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a partial head got an answer");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "closed after {waited:?}");
    let records = proxy.wait_records(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["reason"], "header_timeout");
    assert_eq!(records[0]["status"], 408);
    assert_eq!(records[0]["origin"], "client");
    assert!(recorder.seen().is_empty());
    // An idle keep-alive connection is closed after its last response, without a record.
    let mut stream = proxy.connect();
    stream.write_all(&get("/reports/a", up, "")).unwrap();
    assert_eq!(read_answer_keep(&mut stream), 200);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(stream.read(&mut buf).unwrap_or(0), 0);
    assert_eq!(proxy.records().len(), 2, "{:#?}", proxy.records());
}

#[test]
fn a_body_that_does_not_arrive_is_refused_at_the_body_timeout() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    let raw = format!(
        "POST /charges HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{{\"amount\""
    );
    let answer = exchange(&proxy, raw.as_bytes());
    assert_eq!(answer.status, 408, "{answer:?}");
    assert!(answer.body.contains("body_timeout"), "{answer:?}");
    assert!(answer.closed);
    let records = proxy.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["reason"], "body_timeout");
    assert!(recorder.seen().is_empty());
}

#[test]
fn connections_over_the_workload_limit_are_refused_and_recorded() {
    let recorder = Recorder::start();
    let up = recorder.addr;
    let proxy = Proxy::start_with(
        up,
        |_| {
            format!(
                "workload: app\nselect:\n  cgroup: /test/app\nmax_connections: 2\negress:\n  - host: \"127.0.0.1\"\n    port: {}\n    rules:\n      - {{id: all, methods: [GET], path: /**}}\n",
                up.port()
            )
        },
        Resolver::new(StaticLookup::new()),
    );
    let mut held: Vec<TcpStream> = (0..2).map(|_| proxy.connect()).collect();
    // Let the proxy take both slots before the third connection arrives.
    thread::sleep(Duration::from_millis(200));
    let mut third = proxy.connect();
    let mut buf = [0u8; 16];
    let _ = third.write_all(&get("/x", up, ""));
    let refused = matches!(third.read(&mut buf), Ok(0) | Err(_));
    assert!(refused, "the third connection was served");
    let records = proxy.wait_records(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["reason"], "connection_limit");
    assert_eq!(records[0]["decision"], "deny");
    assert!(recorder.seen().is_empty());
    // A held connection still works; once one closes, a new one is admitted.
    held[0].write_all(&get("/a", up, "")).unwrap();
    assert_eq!(read_answer_keep(&mut held[0]), 200);
    // (A connection closed before sending anything releases its slot at once.)
    drop(held.pop());
    thread::sleep(Duration::from_millis(300));
    let answer = exchange(&proxy, &get("/b", up, ""));
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(recorder.seen().len(), 2);
}

/// The record of a request with a query carries the parameter names (never the values),
/// and `policy suggest` turns the real writer's file into a policy that lists exactly them.
#[test]
fn records_carry_query_names_and_suggest_lists_them() {
    let (recorder, proxy) = setup();
    let up = recorder.addr;
    for target in [
        "/reports/q?token=s3cr3t-value&limit=1&limit=2",
        "/reports/plain",
        "/reports/7?expand=card",
    ] {
        let answer = exchange(&proxy, &get(target, up, ""));
        assert_eq!(answer.status, 200, "{target}: {answer:?}");
    }
    let answer = exchange(&proxy, &get("/nope?z=1", up, ""));
    assert_eq!(answer.status, 403, "{answer:?}");
    let records = proxy.wait_records(4);
    let names: Vec<&serde_json::Value> = records.iter().map(|r| &r["query_names"]).collect();
    assert_eq!(
        names,
        [
            &serde_json::json!(["token", "limit", "limit"]),
            &serde_json::Value::Null,
            &serde_json::json!(["expand"]),
            &serde_json::json!(["z"]),
        ]
    );
    let text = std::fs::read_to_string(&proxy.audit).unwrap();
    assert!(
        !text.contains("s3cr3t"),
        "a query value reached the audit file"
    );

    let (policy_text, _) = scopegate::policy::cli::suggest_policy(
        std::slice::from_ref(&proxy.audit),
        None,
        scopegate::policy::suggest::Options {
            workload: "app".to_owned(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        policy_text.contains(
            "        path: /reports/q\n        query:\n          limit: any\n          token: \
             any\n        query_repeat: [limit]\n"
        ),
        "{policy_text}"
    );
    assert!(
        policy_text.contains("        path: /reports/plain\n        query: {}\n"),
        "{policy_text}"
    );
    assert!(
        policy_text.contains(
            "        path: /reports/{id:[0-9]+}\n        query:\n          expand: any\n"
        ),
        "{policy_text}"
    );
    assert!(
        !policy_text.contains("/nope"),
        "a denial is not demand: {policy_text}"
    );
}

fn timeouts(header: u64, idle: u64, body: u64) -> scopegate::state::Timeouts {
    scopegate::state::Timeouts {
        header: Duration::from_secs(header),
        idle: Duration::from_secs(idle),
        body: Duration::from_secs(body),
    }
}

/// The audit file's records as written (outcome records apart), once there are `n`.
fn raw_records(proxy: &Proxy, n: usize) -> Vec<serde_json::Value> {
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&proxy.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for _ in 0..300 {
        if read().len() >= n {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    read()
}

/// Reads until EOF or error; whether the proxy closed the connection within `wait`.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// The idle timeout (between requests) and the header timeout (a head's first byte to its
/// end) are separate: a keep-alive connection idle past the header timeout still serves its
/// next request; a partial head is refused at the header timeout although the idle timeout
/// is longer; an idle connection is closed at the idle timeout, without a record.
#[test]
fn the_idle_timeout_closes_keep_alive_connections_and_differs_from_the_header_timeout() {
    let recorder = Recorder::start();
    let up = recorder.addr;
    let proxy = Proxy::start_timed(
        up,
        |secret| policy_text(up.port(), secret),
        Resolver::new(StaticLookup::new()),
        timeouts(1, 4, 30),
    );
    let mut stream = proxy.connect();
    stream.write_all(&get("/reports/a", up, "")).unwrap();
    assert_eq!(read_answer_keep(&mut stream), 200);
    // Idle for twice the header timeout: still open, and the next request is served.
    thread::sleep(Duration::from_secs(2));
    stream.write_all(&get("/reports/b", up, "")).unwrap();
    assert_eq!(read_answer_keep(&mut stream), 200);
    assert!(
        closed_within(&mut stream, Duration::from_secs(20)),
        "an idle keep-alive connection stayed open"
    );
    assert_eq!(recorder.seen().len(), 2);
    let records = proxy.wait_records(2);
    assert_eq!(
        records.len(),
        2,
        "the idle close is no decision: {records:#?}"
    );
    // A partial head is refused at the (shorter) header timeout, recorded.
    let mut partial = proxy.connect();
    partial
        .write_all(format!("GET /reports/c HTTP/1.1\r\nhost: {up}\r\nx-a: 1").as_bytes())
        .unwrap();
    assert!(closed_within(&mut partial, Duration::from_secs(20)));
    let records = proxy.wait_records(3);
    assert_eq!(records.len(), 3, "{records:#?}");
    assert_eq!(records[2]["reason"], "header_timeout");
    assert_eq!(records[2]["status"], 408);
    // A partial second head on a keep-alive connection is timed from its own first byte.
    let mut second = proxy.connect();
    second.write_all(&get("/reports/d", up, "")).unwrap();
    assert_eq!(read_answer_keep(&mut second), 200);
    second.write_all(b"GET /reports/e HTTP/1.1\r\n").unwrap();
    assert!(closed_within(&mut second, Duration::from_secs(20)));
    let records = proxy.wait_records(5);
    assert_eq!(records.len(), 5, "{records:#?}");
    assert_eq!(records[4]["reason"], "header_timeout");
    assert_eq!(recorder.seen().len(), 3);
}

/// A streamed body (no rule reads it, so it is relayed as it arrives) that stops arriving
/// is cut at the body timeout: the upstream request is aborted (the upstream never gets
/// the rest), the client gets 408 `body_timeout`, and the allowed decision's outcome
/// record says so.
#[test]
fn a_streamed_body_that_stalls_is_cut_at_the_body_timeout_and_recorded() {
    let recorder = Recorder::start();
    let up = recorder.addr;
    let proxy = Proxy::start_timed(
        up,
        |_| {
            format!(
                "workload: app\nselect:\n  cgroup: /test/app\negress:\n  - host: \"127.0.0.1\"\n    port: {}\n    rules:\n      - {{id: upload, methods: [POST], path: /upload}}\n",
                up.port()
            )
        },
        Resolver::new(StaticLookup::new()),
        timeouts(5, 30, 1),
    );
    let mut stream = proxy.connect();
    stream
        .write_all(
            format!("POST /upload HTTP/1.1\r\nhost: {up}\r\ncontent-length: 100\r\n\r\n0123456789")
                .as_bytes(),
        )
        .unwrap();
    let answer = read_answer(&mut stream);
    assert_eq!(answer.status, 408, "{answer:?}");
    assert!(answer.body.contains("body_timeout"), "{answer:?}");
    let raw = raw_records(&proxy, 2);
    assert_eq!(raw.len(), 2, "a decision and its outcome: {raw:#?}");
    assert_eq!(raw[0]["decision"], "allow");
    assert_eq!(raw[0]["rule"], "upload");
    assert_eq!(raw[1]["outcome_of"], raw[0]["seq"]);
    assert_eq!(raw[1]["reason"], "body_timeout");
    assert_eq!(raw[1]["status"], 408);
    assert_eq!(raw[1]["origin"], "client");
    // The upstream never received a complete request.
    thread::sleep(Duration::from_millis(300));
    assert!(recorder.seen().is_empty(), "{:?}", recorder.seen());
}

/// A TLS passthrough splice with no byte in either direction for the idle timeout is
/// closed, and its outcome record says `idle_timeout` with the bytes that moved.
#[test]
fn an_idle_passthrough_splice_is_closed_at_the_idle_timeout_and_recorded() {
    // The upstream takes the connection and stays silent.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(0usize));
    let g = got.clone();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            *g.lock().unwrap() += n;
        }
    });
    let proxy = Proxy::start_timed(
        upstream,
        |_| {
            format!(
                "workload: app\nselect:\n  cgroup: /test/app\negress:\n  - host: pt.test\n    port: {}\n    tls: passthrough\n    allow_internal: true\n",
                upstream.port()
            )
        },
        Resolver::new(StaticLookup::new().with("pt.test", [ip("127.0.0.1")])),
        timeouts(5, 1, 30),
    );
    // A real ClientHello for pt.test, from rustls.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut tls =
        rustls::ClientConnection::new(Arc::new(config), "pt.test".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    let mut stream = proxy.connect();
    stream.write_all(&hello).unwrap();
    assert!(
        closed_within(&mut stream, Duration::from_secs(20)),
        "an idle splice stayed open"
    );
    let raw = raw_records(&proxy, 2);
    assert_eq!(raw.len(), 2, "{raw:#?}");
    assert_eq!(raw[0]["decision"], "allow");
    assert_eq!(raw[0]["proto"], "tls");
    assert_eq!(raw[1]["outcome_of"], raw[0]["seq"]);
    assert_eq!(raw[1]["reason"], "idle_timeout");
    assert_eq!(raw[1]["bytes_up"], hello.len());
    assert_eq!(*got.lock().unwrap(), hello.len());
}

/// An intercepted HTTP/2 connection is served (a refused request gets its 403 and its
/// record), then, with no stream open for the idle timeout, shut down by the proxy.
#[test]
fn an_idle_http2_connection_is_closed_at_the_idle_timeout() {
    use http_body_util::{BodyExt as _, Empty};
    let state = tempfile::tempdir().unwrap();
    let ca = Arc::new(scopegate::tls::HostCa::load_or_create(state.path(), None).unwrap());
    let leaves = scopegate::tls::LeafCache::new(
        ca.clone(),
        16,
        &[
            scopegate::tls::upstream::ALPN_H2,
            scopegate::tls::upstream::ALPN_HTTP1,
        ],
    );
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let proxy = Proxy::start_full(
        upstream,
        |_| {
            "workload: app\nselect:\n  cgroup: /test/app\negress:\n  - host: h2.test\n    port: 9\n    tls: intercept\n    allow_internal: true\n    rules:\n      - {id: read, methods: [GET], path: /allowed/**}\n".to_owned()
        },
        Resolver::new(StaticLookup::new().with("h2.test", [ip("127.0.0.1")])),
        timeouts(5, 1, 30),
        Some(leaves),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let stream = proxy.connect();
    stream.set_nonblocking(true).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::from_std(stream).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("h2.test".try_into().unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let request = http::Request::get("https://h2.test:9/forbidden")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 403);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("path_not_allowed"));
        // No stream open from here: the proxy ends the connection (GOAWAY, then close).
        let ended = tokio::time::timeout(Duration::from_secs(20), conn).await;
        assert!(ended.is_ok(), "an idle HTTP/2 connection stayed open");
    });
    let records = proxy.wait_records(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["reason"], "path_not_allowed");
}
