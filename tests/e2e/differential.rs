//! Differential tier: "decide what you forward", checked from the upstream's side.
//!
//! A generated corpus (deterministic seed, 500+ variants: dot segments, `%2e`, unreserved
//! and reserved escapes, trailing slashes, `**` tails, `{id}` params, constrained headers
//! present/absent/duplicated with mixed-case names, `Connection:` nominations of
//! constrained headers, Host and harmless headers, query strings, JSON bodies with `json:`
//! constraints, Content-Length and chunked framing, malformed framing) is sent by a raw
//! Python socket client inside the managed cgroup, one connection per request, to the
//! upstream's real address; the eBPF redirect pins it to the agent. The upstream records
//! the exact bytes it receives. Then, for EVERY request the upstream received, the pure
//! `scopegate::policy::decide` is run on the request AS RECEIVED: it must be allowed, by
//! the rule the audit record names; the audited path must be the received path; the
//! received target must already be canonical. Every refused variant must have exactly one
//! record and must not have reached the upstream. Each variant also carries the outcome
//! the new per-request path promises (status, reason, forwarded target), so a proxy that
//! rewrites a request's meaning is caught even when the rewritten request would be allowed.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    fs,
    path::Path,
    time::Instant,
};

use http::{HeaderMap, HeaderName, HeaderValue};
use scopegate::policy::{self, Decision, Snapshot};
use scopegate_e2e::{raw_upstream::RawUpstream, *};
use serde_json::Value;

const UPSTREAM_IP: &str = "127.0.0.31";
const CORPUS_SIZE: usize = 560;
const SEED: u64 = 0x5C0F_E6A7_E000_0001;

/// splitmix64: small, deterministic, good enough for a corpus.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What the new per-request path must do with a variant.
#[derive(Clone, Debug)]
enum Expect {
    /// Forwarded, allowed by `rule`, with exactly this request-target.
    Allow { rule: &'static str, target: String },
    /// Refused with this status and reason; nothing forwarded.
    Refuse { status: u16, reason: &'static str },
}

#[derive(Clone, Debug)]
enum Framing {
    None,
    Length(Vec<u8>),
    Chunked(Vec<u8>, Vec<usize>),
    /// Hand-made framing bytes (headers already in the head): appended as is.
    Raw(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Variant {
    id: usize,
    family: &'static str,
    what: String,
    raw: Vec<u8>,
    expect: Expect,
    /// Header names (lowercase) that `Connection` nominated and that must not arrive.
    hop: Vec<String>,
    /// The body the upstream must receive (after de-chunking), when forwarded.
    body: Vec<u8>,
    /// A framing error: the connection must be closed after the 400.
    malformed: bool,
}

struct Builder {
    host: String,
    rng: Rng,
    out: Vec<Variant>,
}

fn mixed_case(rng: &mut Rng, name: &str) -> String {
    match rng.below(4) {
        0 => name.to_ascii_lowercase(),
        1 => name.to_ascii_uppercase(),
        2 => name.to_owned(),
        _ => name
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect(),
    }
}

impl Builder {
    #[allow(clippy::too_many_arguments, reason = "one variant's parts")]
    fn push(
        &mut self,
        family: &'static str,
        what: String,
        method: &str,
        target: &str,
        headers: Vec<(String, String)>,
        framing: Framing,
        expect: Expect,
        hop: Vec<String>,
    ) {
        let id = self.out.len();
        let host_name = mixed_case(&mut self.rng, "Host");
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\n{host_name}: {}\r\n",
            self.host
        );
        write!(head, "X-Seq: {id}\r\n").unwrap();
        for (k, v) in &headers {
            write!(head, "{k}: {v}\r\n").unwrap();
        }
        let mut raw = head.into_bytes();
        let mut body = Vec::new();
        let mut malformed = false;
        match framing {
            Framing::None => raw.extend_from_slice(b"\r\n"),
            Framing::Length(b) => {
                raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", b.len()).as_bytes());
                raw.extend_from_slice(&b);
                body = b;
            }
            Framing::Chunked(b, splits) => {
                raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                let mut at = 0;
                for s in splits.into_iter().chain([usize::MAX]) {
                    let end = s.min(b.len());
                    if end > at {
                        raw.extend_from_slice(format!("{:x}\r\n", end - at).as_bytes());
                        raw.extend_from_slice(&b[at..end]);
                        raw.extend_from_slice(b"\r\n");
                        at = end;
                    }
                }
                raw.extend_from_slice(b"0\r\n\r\n");
                body = b;
            }
            Framing::Raw(bytes) => {
                raw.extend_from_slice(&bytes);
                malformed = true;
            }
        }
        self.out.push(Variant {
            id,
            family,
            what,
            raw,
            expect,
            hop,
            body,
            malformed,
        });
    }
}

fn allow(rule: &'static str, target: impl Into<String>) -> Expect {
    Expect::Allow {
        rule,
        target: target.into(),
    }
}

fn refuse(status: u16, reason: &'static str) -> Expect {
    Expect::Refuse { status, reason }
}

/// Spells the canonical segments `segs` on the wire with meaning-preserving noise:
/// unreserved escapes (`%61`), `.`/`%2e` segments and `x/..` detours, never as the last
/// segment (where RFC 3986 and "keep the trailing slash" could disagree).
fn obfuscate(rng: &mut Rng, segs: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for seg in segs {
        if rng.chance(12) {
            out.push(rng.pick(&[".", "%2e", "%2E"]).to_string());
        }
        if rng.chance(12) {
            out.push("zz".into());
            out.push(rng.pick(&["..", "%2e%2e", ".%2E", "%2E."]).to_string());
        }
        let mut s = seg.clone();
        if rng.chance(25) {
            // Escape one unreserved character (never inside an existing %XX).
            let bytes: Vec<(usize, u8)> = s
                .bytes()
                .enumerate()
                .filter(|(i, b)| {
                    (b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~'))
                        && !s[..*i].ends_with('%')
                        && !(*i >= 2 && s.as_bytes()[i - 2] == b'%')
                })
                .collect();
            if !bytes.is_empty() {
                let (i, b) = *rng.pick(&bytes);
                let esc = if rng.chance(50) {
                    format!("%{b:02X}")
                } else {
                    format!("%{b:02x}")
                };
                s = format!("{}{esc}{}", &s[..i], &s[i + 1..]);
            }
        }
        out.push(s);
    }
    out
}

fn join(segs: &[String], trailing: bool) -> String {
    let mut p = String::new();
    for s in segs {
        p.push('/');
        p.push_str(s);
    }
    if p.is_empty() || trailing {
        p.push('/');
    }
    p
}

const SEGMENTS: [&str; 8] = [
    "q1",
    "2024",
    "a.b",
    "x~y",
    "data-set",
    "v_2",
    "caf%C3%A9",
    "Z9",
];

fn harmless_hop(rng: &mut Rng) -> (Vec<(String, String)>, Vec<String>) {
    let name = *rng.pick(&["X-Hop", "X-Trace-Hop", "Keep-Me-Local"]);
    let connection = if rng.chance(50) {
        format!("keep-alive, {}", mixed_case(rng, name))
    } else {
        mixed_case(rng, name)
    };
    (
        vec![("Connection".into(), connection), (name.into(), "1".into())],
        vec![name.to_ascii_lowercase()],
    )
}

fn gen_reports(b: &mut Builder) {
    let rng = &mut b.rng;
    let depth = rng.below(4);
    let mut segs: Vec<String> = vec!["reports".into()];
    for _ in 0..depth {
        segs.push(rng.pick(&SEGMENTS).to_string());
    }
    let trailing = rng.chance(40);
    let canonical = join(&segs, trailing);
    let mut wire = join(&obfuscate(rng, &segs), trailing);
    // Lowercase hex of a non-unreserved escape stays an escape, in uppercase.
    if rng.chance(50) {
        wire = wire.replace("%C3%A9", "%c3%a9");
    }
    let query = match rng.below(4) {
        0 => "?a=1&b=two".to_owned(),
        1 => "?x".to_owned(),
        _ => String::new(),
    };
    let mut headers = Vec::new();
    let mut hop = Vec::new();
    let mut expect = allow("reports-tree", format!("{canonical}{query}"));
    let mut what = format!("GET {wire}{query}");
    let mut method = "GET";
    match rng.below(14) {
        0 => {
            let (h, n) = harmless_hop(rng);
            what += " +Connection harmless";
            headers = h;
            hop = n;
        }
        1 => {
            let host = mixed_case(rng, "host");
            what += &format!(" +Connection: {host}");
            headers.push(("Connection".into(), host));
            expect = refuse(400, "connection_names_protected_header");
        }
        2 => {
            // A reserved escape that changes the path's structure: refused, never repaired.
            let esc = *rng.pick(&["%2F", "%2f", "%5C", "%5c"]);
            wire = format!("/reports/a{esc}b");
            what = format!("GET {wire}");
            let reason = if esc.eq_ignore_ascii_case("%2F") {
                "encoded_slash"
            } else {
                "encoded_backslash"
            };
            expect = refuse(400, reason);
        }
        3 => {
            wire = rng
                .pick(&["/reports//a", "/reports/a//b/", "//reports/a"])
                .to_string();
            what = format!("GET {wire}");
            expect = refuse(400, "empty_segment");
        }
        4 => {
            wire = rng
                .pick(&["/../reports/a", "/reports/../../a", "/%2e%2e/reports"])
                .to_string();
            what = format!("GET {wire}");
            expect = refuse(400, "above_root");
        }
        5 => {
            wire = rng
                .pick(&["/report/a", "/REPORTS/a", "/reportsx", "/other/reports"])
                .to_string();
            what = format!("GET {wire}");
            expect = refuse(403, "path_not_allowed");
        }
        6 => {
            method = *rng.pick(&["DELETE", "PUT", "PATCH"]);
            what = format!("{method} {wire}{query}");
            expect = refuse(403, "method_not_allowed");
        }
        7 => {
            let name = *rng.pick(&["X_Role", "x_tenant", "Bad_Name"]);
            what += &format!(" +{name}");
            headers.push((name.into(), "admin".into()));
            expect = refuse(400, "header_name_invalid");
        }
        8 => {
            let name = *rng.pick(&[
                "X-HTTP-Method-Override",
                "X-HTTP-Method",
                "X-Method-Override",
                "X-Original-URL",
                "X-Rewrite-URL",
            ]);
            let value = if name.contains("URL") {
                "/admin"
            } else {
                "DELETE"
            };
            what += &format!(" +{name}");
            headers.push((mixed_case(rng, name), value.into()));
            expect = refuse(403, "override_header_refused");
        }
        _ => {}
    }
    b.push(
        "reports",
        what,
        method,
        &format!("{wire}{query}"),
        headers,
        Framing::None,
        expect,
        hop,
    );
}

fn gen_items(b: &mut Builder) {
    let rng = &mut b.rng;
    let id = *rng.pick(&["42", "7", "007", "123456"]);
    let wire_id = if rng.chance(30) {
        id.bytes().map(|c| format!("%{c:02X}")).collect::<String>()
    } else {
        id.to_owned()
    };
    let trailing = rng.chance(15);
    let canonical = format!("/items/{id}{}", if trailing { "/" } else { "" });
    let segs = vec!["items".to_owned(), wire_id];
    let wire = join(&obfuscate(rng, &segs), trailing);
    let (query, mut expect): (&str, Expect) = match rng.below(10) {
        0 => ("fields=name", allow("item", "")),
        1 => ("fields=price&page=3", allow("item", "")),
        2 => ("page=12&fields=name", allow("item", "")),
        3 => ("", refuse(403, "query_param_required")),
        4 => ("page=1", refuse(403, "query_param_required")),
        5 => ("fields=secret", refuse(403, "query_value_not_allowed")),
        6 => ("fields=name&zz=1", refuse(403, "query_param_not_allowed")),
        7 => (
            "fields=name&debug=1",
            refuse(403, "query_param_not_allowed"),
        ),
        8 => (
            "fields=name&fields=price",
            refuse(403, "query_param_repeated"),
        ),
        _ => ("fields=price", allow("item", "")),
    };
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    if let Expect::Allow { target, .. } = &mut expect {
        *target = format!("{canonical}{q}");
    }
    if trailing {
        // `/items/{id}` matches `/items/42`, not `/items/42/`.
        expect = refuse(403, "path_not_allowed");
    }
    let mut target = format!("{wire}{q}");
    let mut what = format!("GET {target}");
    if rng.chance(8) {
        target = format!("/items/abc{q}");
        what = format!("GET {target}");
        expect = refuse(403, "path_not_allowed");
    }
    b.push(
        "items",
        what,
        "GET",
        &target,
        Vec::new(),
        Framing::None,
        expect,
        Vec::new(),
    );
}

fn gen_tenants(b: &mut Builder) {
    let rng = &mut b.rng;
    let tenant = *rng.pick(&["acme", "t-1", "x"]);
    let trailing = rng.chance(10);
    let segs = vec!["tenants".to_owned(), tenant.to_owned(), "data".to_owned()];
    let canonical = join(&segs, trailing);
    let wire = join(&obfuscate(rng, &segs), trailing);
    let tname = mixed_case(rng, "X-Tenant");
    let good = format!("t{}", rng.below(10));
    let mut headers = vec![(tname.clone(), good.clone())];
    let mut hop = Vec::new();
    let mut expect = allow("tenant-read", canonical.clone());
    let mut what = format!("GET {wire} {tname}: {good}");
    match rng.below(12) {
        0 => {
            headers.clear();
            what = format!("GET {wire} (no x-tenant)");
            expect = refuse(403, "header_required");
        }
        1 => {
            headers[0].1 = "admin".into();
            what = format!("GET {wire} {tname}: admin");
            expect = refuse(403, "header_not_allowed");
        }
        2 => {
            let other = mixed_case(rng, "x-tenant");
            headers.push((other, rng.pick(&["t2", good.as_str()]).to_string()));
            what += " (twice)";
            expect = refuse(403, "duplicate_header");
        }
        3 => {
            headers.push((mixed_case(rng, "X-Debug"), "1".into()));
            what += " +x-debug";
            expect = refuse(403, "header_forbidden");
        }
        4 | 5 => {
            // The bug: Connection: x-tenant made the proxy drop X-Tenant after deciding.
            let named = mixed_case(rng, "x-tenant");
            let value = if rng.chance(50) {
                format!("keep-alive, {named}")
            } else {
                named
            };
            what += &format!(" +Connection: {value}");
            headers.push(("Connection".into(), value));
            expect = refuse(400, "connection_names_protected_header");
        }
        6 => {
            let named = mixed_case(rng, "x-debug");
            what += &format!(" +Connection: {named}");
            headers.push(("Connection".into(), named));
            if rng.chance(50) {
                headers.push(("X-Debug".into(), "1".into()));
                what += " +x-debug";
            }
            expect = refuse(400, "connection_names_protected_header");
        }
        7 => {
            let named = mixed_case(rng, "host");
            what += &format!(" +Connection: {named}");
            headers.push(("Connection".into(), named));
            expect = refuse(400, "connection_names_protected_header");
        }
        8 | 9 => {
            let (h, n) = harmless_hop(rng);
            what += " +Connection harmless";
            headers.extend(h);
            hop = n;
        }
        _ => {}
    }
    if trailing {
        // A literal last segment matches only without the slash; with no rule's path
        // matching, the policy's refusal is `path_not_allowed` whatever the headers (the
        // 400s of the outbound builder come first).
        if matches!(
            expect,
            Expect::Allow { .. } | Expect::Refuse { status: 403, .. }
        ) {
            expect = refuse(403, "path_not_allowed");
        }
    }
    b.push(
        "tenants",
        what,
        "GET",
        &wire,
        headers,
        Framing::None,
        expect,
        hop,
    );
}

fn gen_charges(b: &mut Builder) {
    let rng = &mut b.rng;
    let currency = *rng.pick(&["usd", "eur"]);
    let amount = 1 + rng.below(1000);
    let (body, mut expect, what): (String, Expect, &str) = match rng.below(12) {
        0 => (
            format!(r#"{{"currency":"gbp","amount":{amount}}}"#),
            refuse(403, "json_constraint_failed"),
            "currency gbp",
        ),
        1 => (
            format!(r#"{{"currency":"{currency}","amount":{}}}"#, 1000 + amount),
            refuse(403, "json_constraint_failed"),
            "amount too big",
        ),
        2 => (
            format!(r#"{{"currency":"{currency}","amount":{amount},"admin":true}}"#),
            refuse(403, "json_constraint_failed"),
            "admin present",
        ),
        3 => (
            format!(r#"{{"currency":"{currency}","amount":"#),
            refuse(400, "invalid_json"),
            "truncated json",
        ),
        4 => (
            format!(r#"{{"currency":"{currency}","currency":"gbp","amount":{amount}}}"#),
            refuse(400, "duplicate_json_key"),
            "duplicate key",
        ),
        5 => (
            format!(r#"{{"amount":{amount},"currency":"{currency}","memo":"x y","n":[1,2]}}"#),
            allow("charge", "/charges"),
            "extra fields",
        ),
        _ => (
            format!(r#"{{"currency":"{currency}","amount":{amount}}}"#),
            allow("charge", "/charges"),
            "valid",
        ),
    };
    let body = body.into_bytes();
    let chunked = rng.chance(40);
    let framing = if chunked {
        let mut splits = Vec::new();
        let mut at = 0;
        while at < body.len() {
            at += 1 + rng.below(12);
            splits.push(at);
        }
        Framing::Chunked(body, splits)
    } else {
        Framing::Length(body)
    };
    let mut headers = vec![(
        mixed_case(rng, "Content-Type"),
        rng.pick(&["application/json", "application/json; charset=utf-8"])
            .to_string(),
    )];
    let mut method = "POST";
    let mut what = format!("POST /charges {what}");
    match rng.below(10) {
        0 => {
            headers[0].1 = "text/plain".into();
            what += " text/plain";
            expect = refuse(415, "unsupported_media_type");
        }
        1 => {
            method = "PUT";
            what = what.replacen("POST", "PUT", 1);
            expect = refuse(403, "method_not_allowed");
        }
        2 => {
            let (h, n) = harmless_hop(rng);
            what += " +Connection harmless";
            headers.extend(h);
            b.push(
                "charges",
                what + if chunked { " chunked" } else { " length" },
                method,
                "/charges",
                headers,
                framing,
                expect,
                n,
            );
            return;
        }
        _ => {}
    }
    b.push(
        "charges",
        what + if chunked { " chunked" } else { " length" },
        method,
        "/charges",
        headers,
        framing,
        expect,
        Vec::new(),
    );
}

fn gen_exact(b: &mut Builder) {
    let rng = &mut b.rng;
    let (wire, expect) = match rng.below(4) {
        0 => ("/exact", allow("exact", "/exact")),
        1 => ("/ex%61ct", allow("exact", "/exact")),
        2 => ("/zz/../exact", allow("exact", "/exact")),
        // `/exact` matches only `/exact`, not `/exact/`.
        _ => ("/exact/", refuse(403, "path_not_allowed")),
    };
    b.push(
        "exact",
        format!("GET {wire}"),
        "GET",
        wire,
        Vec::new(),
        Framing::None,
        expect,
        Vec::new(),
    );
}

/// Framings no two parsers read the same way: 400 (501 for transfer codings)
/// `malformed_request`, one record,
/// nothing upstream, connection closed.
fn gen_malformed(b: &mut Builder) {
    let json = br#"{"currency":"usd","amount":5}"#;
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "CL+TE",
            "/charges",
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                json.len(),
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        (
            "TE+CL",
            "/charges",
            format!(
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        (
            "duplicate CL (same)",
            "/charges",
            format!(
                "Content-Type: application/json\r\nContent-Length: {0}\r\nContent-Length: {0}\r\n\r\n{1}",
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        (
            "duplicate CL (different)",
            "/charges",
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\nContent-Length: 2\r\n\r\n{}",
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        (
            "CL list",
            "/charges",
            format!(
                "Content-Type: application/json\r\nContent-Length: {0}, {0}\r\n\r\n{1}",
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        (
            "TE gzip, chunked",
            "/charges",
            format!(
                "Content-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        (
            "TE identity",
            "/charges",
            format!(
                "Content-Type: application/json\r\nTransfer-Encoding: identity\r\nContent-Length: {}\r\n\r\n{}",
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        (
            "TE chunked twice",
            "/charges",
            format!(
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        (
            "chunk size with trailing space",
            "/charges",
            format!(
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x} \r\n{}\r\n0\r\n\r\n",
                json.len(),
                String::from_utf8_lossy(json)
            ),
        ),
        ("raw # in the target", "/reports/a#frag", "\r\n".to_owned()),
        (
            "raw # in the query",
            "/reports/a?x=1#frag",
            "\r\n".to_owned(),
        ),
    ];
    for (what, target, tail) in cases {
        let method = if target == "/charges" { "POST" } else { "GET" };
        // A transfer coding other than one `chunked` is "not implemented" (RFC 9112 §6.1).
        let status = match what {
            "TE gzip, chunked" | "TE chunked twice" => 501,
            _ => 400,
        };
        b.push(
            "malformed",
            format!("{method} {target} {what}"),
            method,
            target,
            Vec::new(),
            Framing::Raw(tail.into_bytes()),
            refuse(status, "malformed_request"),
            Vec::new(),
        );
    }
}

fn corpus(host: &str) -> Vec<Variant> {
    let mut b = Builder {
        host: host.to_owned(),
        rng: Rng(SEED),
        out: Vec::new(),
    };
    gen_malformed(&mut b);
    while b.out.len() < CORPUS_SIZE {
        match b.rng.below(20) {
            0..=7 => gen_reports(&mut b),
            8..=10 => gen_items(&mut b),
            11..=14 => gen_tenants(&mut b),
            15..=18 => gen_charges(&mut b),
            _ => gen_exact(&mut b),
        }
    }
    b.out
}

fn policy_yaml(managed: &str, ip: &str, port: u16) -> String {
    format!(
        r#"workload: diff
select:
  cgroup: {managed}
body_cap: 4096
egress:
  - host: "{ip}"
    port: {port}
    rules:
      - id: reports-tree
        methods: [GET]
        path: /reports/**
      - id: item
        methods: [GET]
        path: /items/{{id:[0-9]+}}
        query:
          fields: {{ one_of: [name, price] }}
          page: any
          debug: absent
      - id: tenant-read
        methods: [GET]
        path: /tenants/{{tenant}}/data
        headers:
          x-tenant: {{ pattern: "t[0-9]" }}
          x-debug: forbidden
      - id: exact
        methods: [GET]
        path: /exact
      - id: charge
        methods: [POST]
        path: /charges
        json:
          - {{ field: currency, one_of: [usd, eur] }}
          - {{ field: amount, min: 1, max: 1000 }}
          - {{ field: admin, absent: true }}
"#
    )
}

/// The raw client: one connection per variant, sequential; prints one JSON result per
/// variant: status (0 = no response), body, and for framing errors whether the agent
/// closed the connection after answering.
const CLIENT: &str = r#"
import json, socket, sys
ip, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
corpus = json.load(open(path))
def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        c = s.recv(65536)
        if not c:
            return 0, buf, True
        buf += c
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except Exception:
        return 0, buf, True
    hdrs = {}
    for l in lines[1:]:
        k, _, v = l.partition(b":")
        hdrs[k.strip().lower()] = v.strip()
    if b"content-length" in hdrs:
        n = int(hdrs[b"content-length"])
        while len(rest) < n:
            c = s.recv(65536)
            if not c:
                break
            rest += c
        return status, rest[:n], False
    if hdrs.get(b"transfer-encoding", b"").lower() == b"chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            c = s.recv(65536)
            if not c:
                break
            rest += c
        body, data = b"", rest
        while True:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, data = body + data[:size], data[size + 2:]
        return status, body, False
    while True:
        c = s.recv(65536)
        if not c:
            return status, rest, True
        rest += c
out = []
for v in corpus:
    r = {"id": v["id"]}
    try:
        s = socket.create_connection((ip, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(bytes.fromhex(v["raw"]))
        status, body, closed = read_response(s)
        if v["malformed"] and not closed:
            s.settimeout(0.3)
            try:
                closed = s.recv(1) == b""
            except socket.timeout:
                closed = False
            except OSError:
                closed = True
        r.update(status=status, body=body.decode("latin-1"), closed=closed)
        s.close()
    except Exception as e:
        r.update(status=0, body="", closed=True, error=repr(e))
    out.append(r)
print(json.dumps(out))
"#;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the pure decision on a request exactly as the upstream received it.
fn decide_received(
    snapshot: &Snapshot,
    workload: policy::WorkloadId,
    port: u16,
    r: &raw_upstream::Received,
) -> Result<Decision, String> {
    let path = policy::normalize(&r.target).map_err(|e| format!("normalize: {e}"))?;
    let mut headers = HeaderMap::new();
    for (name, value) in &r.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("header name {name:?}: {e}"))?;
        let value = HeaderValue::from_bytes(value).map_err(|e| format!("header value: {e}"))?;
        headers.append(name, value);
    }
    let hosts = r.header_all("host");
    if hosts.len() != 1 {
        return Err(format!("received {} Host headers: {hosts:?}", hosts.len()));
    }
    let host = hosts[0]
        .rsplit_once(':')
        .map_or(hosts[0].as_str(), |(h, _)| h);
    let w = snapshot.workload(workload).ok_or("no workload")?;
    let needs_body = w
        .destination_for(host, port)
        .is_some_and(|(_, d)| d.needs_body(&r.method, &path));
    let body = if needs_body {
        let ct = r.header("content-type");
        policy::parse_json_body(&r.body, ct.as_deref()).ok()
    } else {
        None
    };
    let req = policy::Request {
        workload,
        uid: 0,
        method: &r.method,
        host,
        port,
        path: &path,
        headers: &headers,
        body: body.as_ref(),
        at: jiff::Timestamp::now(),
    };
    Ok(policy::decide(snapshot, &req))
}

#[derive(Default)]
struct Failures(BTreeMap<String, Vec<String>>);

impl Failures {
    fn add(&mut self, category: &str, detail: String) {
        self.0.entry(category.to_owned()).or_default().push(detail);
    }

    fn report(&self) -> String {
        let mut out = String::new();
        for (category, details) in &self.0 {
            let mut families: BTreeMap<&str, usize> = BTreeMap::new();
            for d in details {
                let family = d
                    .split_once('[')
                    .and_then(|(_, rest)| rest.split_once(']'))
                    .map_or("-", |(f, _)| f);
                *families.entry(family).or_default() += 1;
            }
            writeln!(
                out,
                "== {category}: {} failures {families:?}",
                details.len()
            )
            .unwrap();
            for d in details.iter().take(6) {
                writeln!(out, "   {d}").unwrap();
            }
            if details.len() > 6 {
                writeln!(out, "   … and {} more", details.len() - 6).unwrap();
            }
        }
        out
    }
}

#[test]
fn every_forwarded_request_is_allowed_as_received_and_every_refusal_is_one_record() {
    privileged_test(
        "every_forwarded_request_is_allowed_as_received_and_every_refusal_is_one_record",
    );
    let started = Instant::now();
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = RawUpstream::start(UPSTREAM_IP);
    let port = upstream.addr.port();
    let policy = policy_yaml(&managed, UPSTREAM_IP, port);
    let policies = policy_dir(&[("diff.yaml", policy)]);
    let snapshot = Snapshot::load_dir(policies.path()).expect("the test policy loads");
    let workload = snapshot.workload_by_name("diff").unwrap();
    let pins = PinDir::new();
    let work = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        work.path().join("audit.jsonl"),
    ));

    let variants = corpus(&format!("{UPSTREAM_IP}:{port}"));
    assert!(variants.len() >= 500);
    let corpus_file = work.path().join("corpus.json");
    let json: Vec<Value> = variants
        .iter()
        .map(|v| serde_json::json!({"id": v.id, "raw": hex(&v.raw), "malformed": v.malformed}))
        .collect();
    fs::write(&corpus_file, serde_json::to_vec(&json).unwrap()).unwrap();
    let client = work.path().join("client.py");
    fs::write(&client, CLIENT).unwrap();
    let out = run_python_file(
        &managed,
        &client,
        &[UPSTREAM_IP, &port.to_string()],
        &corpus_file,
    );
    let results: Vec<Value> = serde_json::from_str(&out).expect("client output");
    assert_eq!(results.len(), variants.len());
    let sent_in = started.elapsed();

    let records = agent.wait_audit(variants.len());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let records = if records.len() >= variants.len() {
        agent.audit_records()
    } else {
        records
    };
    let received = upstream.received();
    let mut failures = Failures::default();

    // Index the audit: by request id, and allow records in order.
    let mut by_request_id: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        if let Some(id) = r["request_id"].as_str() {
            by_request_id.entry(id.to_owned()).or_default().push(i);
        }
    }
    let allow_records: Vec<&Value> = records
        .iter()
        .filter(|r| r["decision"] == "allow")
        .collect();

    // Receipts by the marker header.
    let mut receipts: HashMap<usize, Vec<&raw_upstream::Received>> = HashMap::new();
    for r in &received {
        match r.header("x-seq").and_then(|s| s.parse::<usize>().ok()) {
            Some(seq) => receipts.entry(seq).or_default().push(r),
            None => failures.add(
                "upstream received a request without its X-Seq marker",
                format!("{} {} {:?}", r.method, r.target, r.error),
            ),
        }
    }

    let mut allow_index = 0;
    let mut stats: BTreeMap<String, usize> = BTreeMap::new();
    for (v, res) in variants.iter().zip(&results) {
        let status = res["status"].as_u64().unwrap_or(0) as u16;
        let body = res["body"].as_str().unwrap_or("");
        let got = receipts.get(&v.id).cloned().unwrap_or_default();
        let reached = !got.is_empty();
        let label = format!("#{} [{}] {}", v.id, v.family, v.what);
        *stats
            .entry(format!(
                "{} {}",
                v.family,
                if reached { "forwarded" } else { "refused" }
            ))
            .or_default() += 1;

        if reached {
            // The client saw the upstream's answer, and the audit has its allow record.
            if status != 200 || body != format!("ok {}", v.id) {
                failures.add(
                    "forwarded but the client did not get the upstream's answer",
                    format!("{label}: {status} {body:?}"),
                );
            }
            if got.len() != 1 {
                failures.add(
                    "forwarded more than once",
                    format!("{label}: {}", got.len()),
                );
            }
            let record = allow_records.get(allow_index).copied();
            allow_index += 1;
            let Some(record) = record else {
                failures.add("forwarded without an allow record", label.clone());
                continue;
            };
            let r = got[0];
            if let Some(e) = &r.error {
                failures.add(
                    "upstream could not delimit the forwarded request",
                    format!("{label}: {e}"),
                );
                continue;
            }
            // Re-decide what the upstream received.
            match decide_received(&snapshot, workload, port, r) {
                Ok(Decision::Allow { rule, .. }) => {
                    if record["rule"].as_str() != Some(rule.rule_id()) {
                        failures.add(
                            "re-decided with a different rule than the audit names",
                            format!("{label}: audit {} vs {}", record["rule"], rule.rule_id()),
                        );
                    }
                }
                Ok(Decision::Deny(reason)) => failures.add(
                    "forwarded request is DENIED when decided as received",
                    format!(
                        "{label}: received {} {} → {} ({reason}); headers {:?}",
                        r.method,
                        r.target,
                        reason.code(),
                        r.headers
                            .iter()
                            .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v)))
                            .collect::<Vec<_>>()
                    ),
                ),
                Err(e) => failures.add(
                    "forwarded request cannot be decided as received",
                    format!("{label}: {e}"),
                ),
            }
            if record["path"].as_str() != Some(r.path()) {
                failures.add(
                    "audited path differs from the received path",
                    format!(
                        "{label}: audit {} vs received {:?}",
                        record["path"],
                        r.path()
                    ),
                );
            }
            match policy::normalize(&r.target) {
                Ok(c) if c.as_request_target() == r.target => {}
                Ok(c) => failures.add(
                    "received target is not canonical",
                    format!("{label}: {:?} → {:?}", r.target, c.as_request_target()),
                ),
                Err(e) => failures.add(
                    "received target does not normalise",
                    format!("{label}: {:?}: {e}", r.target),
                ),
            }
            for name in &v.hop {
                if !r.header_all(name).is_empty() {
                    failures.add(
                        "a header named in Connection reached the upstream",
                        format!("{label}: {name}"),
                    );
                }
            }
            if !r.header_all("connection").iter().all(|c| {
                c.split(',').all(|t| {
                    matches!(
                        t.trim().to_ascii_lowercase().as_str(),
                        "keep-alive" | "close"
                    )
                })
            }) {
                failures.add(
                    "client's Connection nominations reached the upstream",
                    format!("{label}: {:?}", r.header_all("connection")),
                );
            }
            if !v.malformed && r.body != v.body {
                failures.add(
                    "forwarded body differs from the sent body",
                    format!(
                        "{label}: {:?} vs {:?}",
                        String::from_utf8_lossy(&r.body),
                        String::from_utf8_lossy(&v.body)
                    ),
                );
            }
            match &v.expect {
                Expect::Allow { rule, target } => {
                    if r.target != *target {
                        failures.add(
                            "forwarded target does not keep the request's meaning",
                            format!("{label}: expected {target:?}, upstream got {:?}", r.target),
                        );
                    }
                    if record["rule"].as_str() != Some(rule) {
                        failures.add(
                            "allowed by an unexpected rule",
                            format!("{label}: {} (expected {rule})", record["rule"]),
                        );
                    }
                }
                Expect::Refuse { status, reason } => failures.add(
                    "must be refused but reached the upstream",
                    format!(
                        "{label}: expected {status} {reason}; upstream got {} {}",
                        r.method, r.target
                    ),
                ),
            }
        } else {
            // Not forwarded: exactly one record, named by the request id of the answer.
            let answer: Option<Value> = serde_json::from_str(body).ok();
            let request_id = answer
                .as_ref()
                .and_then(|a| a["request_id"].as_str())
                .map(str::to_owned);
            let reason = answer
                .as_ref()
                .and_then(|a| a["reason"].as_str())
                .map(str::to_owned);
            let matching = request_id
                .as_ref()
                .and_then(|id| by_request_id.get(id))
                .cloned()
                .unwrap_or_default();
            if matching.len() != 1 {
                failures.add(
                    "refusal without exactly one audit record (by request id)",
                    format!(
                        "{label}: status {status}, {} records, answer {:?}",
                        matching.len(),
                        body.chars().take(120).collect::<String>()
                    ),
                );
            }
            let record = matching.first().map(|&i| &records[i]);
            if let Some(record) = record
                && record["decision"] == "allow"
            {
                failures.add("not forwarded but recorded as allowed", label.clone());
            }
            match &v.expect {
                Expect::Refuse {
                    status: want,
                    reason: want_reason,
                } => {
                    if status != *want || reason.as_deref() != Some(want_reason) {
                        failures.add(
                            &format!("expected {want} {want_reason}"),
                            format!(
                                "{label}: got {status} {}",
                                reason.clone().unwrap_or_else(|| format!(
                                    "(no reason; body {:?})",
                                    body.chars().take(80).collect::<String>()
                                ))
                            ),
                        );
                    }
                    if let Some(record) = record
                        && record["reason"].as_str() != Some(want_reason)
                    {
                        failures.add(
                            "audit reason differs from the expected reason",
                            format!("{label}: {} (expected {want_reason})", record["reason"]),
                        );
                    }
                    if v.malformed {
                        if let Some(record) = record
                            && record["error_kind"].as_str().is_none_or(str::is_empty)
                        {
                            failures.add(
                                "malformed_request record without error_kind",
                                format!("{label}: {record}"),
                            );
                        }
                        if res["closed"] != true {
                            failures
                                .add("connection stays open after a framing error", label.clone());
                        }
                    }
                }
                Expect::Allow { target, .. } => failures.add(
                    "must be forwarded but was refused",
                    format!(
                        "{label}: expected {target:?}; got {status} {}",
                        reason.unwrap_or_default()
                    ),
                ),
            }
        }
    }
    // Record before forward: each forwarded decision has its linked outcome, written
    // before the response went back.
    for r in &allow_records {
        if r["outcome"]["outcome_of"] != r["seq"] {
            failures.add(
                "allow record without its linked outcome record",
                format!("seq {} request_id {}", r["seq"], r["request_id"]),
            );
        }
    }
    if allow_index != allow_records.len() {
        failures.add(
            "allow records without a forwarded request",
            format!(
                "{} allow records, {allow_index} forwarded requests",
                allow_records.len()
            ),
        );
    }
    if records.len() != variants.len() {
        failures.add(
            "one record per request",
            format!("{} records for {} requests", records.len(), variants.len()),
        );
    }
    let forwarded: usize = stats
        .iter()
        .filter(|(k, _)| k.ends_with("forwarded"))
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "differential: {} variants, {} received by the upstream ({forwarded} variants forwarded), {} refused, {} audit records; sent in {:.1?}, total {:.1?}",
        variants.len(),
        received.len(),
        variants.len() - forwarded,
        records.len(),
        sent_in,
        started.elapsed()
    );
    for (k, n) in &stats {
        eprintln!("differential:   {k}: {n}");
    }
    let report = failures.report();
    eprintln!("{report}");
    assert!(failures.0.is_empty(), "differential failures:\n{report}");
}

/// Runs `python3 FILE ARGS… CORPUS` inside `cgroup`; returns stdout.
fn run_python_file(cgroup: &str, file: &Path, args: &[&str], corpus: &Path) -> String {
    let out = std::process::Command::new(bin())
        .args([
            "exec", "--cgroup", cgroup, "--", "timeout", "120", "python3",
        ])
        .arg(file)
        .args(args)
        .arg(corpus)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Rule paths and trailing slashes: `/a/**` matches `/a`, `/a/` and below; `/a` only
/// `/a`; `/a/` only `/a/`; the slash is forwarded as sent.
#[test]
fn rule_paths_distinguish_the_trailing_slash() {
    privileged_test("rule_paths_distinguish_the_trailing_slash");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = RawUpstream::start("127.0.0.32");
    let (ip, port) = (upstream.addr.ip(), upstream.addr.port());
    let policy = format!(
        "workload: slash\nselect:\n  cgroup: {managed}\negress:\n  - host: \"{ip}\"\n    port: {port}\n    rules:\n      - id: tree\n        methods: [GET]\n        path: /tree/**\n      - id: bare\n        methods: [GET]\n        path: /bare\n      - id: slashed\n        methods: [GET]\n        path: /slashed/\n"
    );
    let policies = policy_dir(&[("slash.yaml", policy)]);
    let pins = PinDir::new();
    let work = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        work.path().join("audit.jsonl"),
    ));
    let cases: [(&str, u16, Option<&str>); 9] = [
        ("/tree", 200, Some("tree")),
        ("/tree/", 200, Some("tree")),
        ("/tree/a", 200, Some("tree")),
        ("/tree/a/", 200, Some("tree")),
        ("/bare", 200, Some("bare")),
        ("/bare/", 403, None),
        ("/slashed/", 200, Some("slashed")),
        ("/slashed", 403, None),
        ("/treex", 403, None),
    ];
    let mut problems = Vec::new();
    for (path, want, rule) in cases {
        let out = curl_in(
            &managed,
            &["-w", STATUS, &format!("http://{ip}:{port}{path}")],
        );
        let (status, body) = status_and_body(&out);
        if status != want {
            problems.push(format!("{path}: {status} (expected {want}) {body}"));
        }
        let records = agent.audit_records();
        let last = records.last().cloned().unwrap_or_default();
        if let Some(rule) = rule
            && (last["rule"] != rule || last["path"] != path)
        {
            problems.push(format!(
                "{path}: audit rule {} path {} (expected {rule} {path})",
                last["rule"], last["path"]
            ));
        }
    }
    let targets: Vec<String> = upstream
        .received()
        .iter()
        .map(|r| r.target.clone())
        .collect();
    let want: Vec<&str> = cases.iter().filter(|c| c.1 == 200).map(|c| c.0).collect();
    if targets != want {
        problems.push(format!("upstream received {targets:?}, expected {want:?}"));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
