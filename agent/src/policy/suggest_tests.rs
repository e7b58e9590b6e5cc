//! Tests of `policy suggest`: templating, the CLI path (records → policy text), and the
//! properties: the output validates, replays every observed request as allowed, denies
//! most of a held-out corpus, and stays valid and narrow for hostile records.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::path::{Path, PathBuf};

use super::*;
use crate::audit::chain;
use crate::audit::{Decision, Dst, Fault, Record};
use crate::policy::cli::{PolicyCliError, suggest_policy};
use crate::policy::offline::{self, Spec};
use crate::policy::{Snapshot, explain};

#[test]
fn segments_that_are_identifiers_become_parameters() {
    for (seg, want) in [
        ("42", Some(Kind::Numeric)),
        ("0", Some(Kind::Numeric)),
        ("3f2a9c1e-0b4d-4e5f-8a6b-7c8d9e0f1a2b", Some(Kind::Uuid)),
        ("deadbeef01", Some(Kind::Hex)),
        ("DEADBEEF01", Some(Kind::Hex)),
        ("AbCdEf0123456789xyz", Some(Kind::Opaque)),
        ("tok_9fQ2-kLm_84ZxYw", Some(Kind::Opaque)),
        // names stay literal
        ("v1", None),
        ("customers", None),
        ("deadbeef", None),                   // hex letters only: a word
        ("abc123", None),                     // short
        ("customer-addresses-archive", None), // long, but no digit
        ("cus_42", None),
        ("a%20b", None),
        ("", None),
    ] {
        assert_eq!(classify(seg), want, "{seg:?}");
    }
}

#[test]
fn templates_keep_stable_segments_and_the_trailing_slash() {
    let t = |p: &str| Template::of(p).unwrap().pattern();
    assert_eq!(t("/"), "/");
    assert_eq!(t("/v1/customers"), "/v1/customers");
    assert_eq!(t("/v1/customers/"), "/v1/customers/");
    assert_eq!(t("/v1/customers/42"), "/v1/customers/{id:[0-9]+}");
    assert_eq!(
        t("/v1/orgs/7/repos/deadbeef01/"),
        "/v1/orgs/{id:[0-9]+}/repos/{id2:[0-9a-fA-F]{8,}}/"
    );
    assert_eq!(
        Template::of("/v1/customers/1").unwrap(),
        Template::of("/v1/customers/99999").unwrap(),
        "siblings that differ in a parameterised segment share one template"
    );
    assert_ne!(
        Template::of("/v1/customers/1").unwrap(),
        Template::of("/v1/customers/1/").unwrap()
    );
    assert_eq!(
        Template::of("/v1/customers/42").unwrap().slug(),
        "v1-customers-id"
    );
    assert_eq!(Template::of("/").unwrap().slug(), "root");
    assert_eq!(Template::of("/a%20b/c.d").unwrap().slug(), "a-20b-c-d");
}

#[test]
fn hostile_paths_are_skipped_never_widened() {
    let long = format!("/{}", "a".repeat(MAX_PATH));
    for bad in [
        "/a/../b",
        "/a/./b",
        "/a%2fb",
        "/a%2Fb",
        "/a\\b",
        "/a//b",
        "/a\nb",
        "/a\u{2028}b",
        "/a\0b",
        "/{id}",
        "/files/**",
        "/a*b",
        "/a?x=1",
        "/a#frag",
        "relative",
        "/%7e",
        long.as_str(),
    ] {
        assert!(Template::of(bad).is_err(), "{bad:?} was taken");
    }
}

#[test]
fn scalars_and_comments_cannot_break_out_of_their_line() {
    for s in [
        "a: b # c",
        "'quoted' \"double\"",
        "- item",
        "{x: 1}",
        "[1]",
        "*alias",
        "&anchor",
        "!tag",
        "%YAML",
        "yes",
        "null",
        "1e3",
        "",
        " leading",
        "trailing ",
        "line\nbreak",
        "sep\u{2028}arator",
        "nel\u{85}x",
    ] {
        let y = scalar(s);
        assert!(!y.contains('\n'), "{s:?} → {y:?}");
        let doc = format!("k: {y}\n");
        let back: std::collections::BTreeMap<String, String> =
            serde_yaml::from_str(&doc).unwrap_or_else(|e| panic!("{s:?} → {y:?}: {e}"));
        if !s.contains(['\n', '\u{2028}', '\u{85}']) {
            assert_eq!(back["k"], s, "{y:?}");
        }
        let c = escape(s);
        assert!(c.chars().all(|c| c.is_ascii_graphic() || c == ' '), "{c:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Records → policy, as the CLI does it.
// ---------------------------------------------------------------------------------------

/// A record of `workload`: (proto, decision, method, host, port, path, ts).
struct Rec {
    workload: &'static str,
    proto: &'static str,
    decision: Decision,
    origin: Option<Fault>,
    method: Option<&'static str>,
    host: Option<&'static str>,
    ip: &'static str,
    class: Option<&'static str>,
    port: u16,
    path: Option<&'static str>,
    ts: &'static str,
    outcome_of: Option<u64>,
    dns: Option<(&'static str, &'static str)>,
    /// The raw query of an HTTP request, recorded as the proxy records it.
    query: Option<&'static str>,
    /// The caller's cgroup (default: `/system.slice/WORKLOAD.service`).
    cgroup: Option<&'static str>,
}

fn http(
    decision: Decision,
    method: &'static str,
    host: &'static str,
    port: u16,
    path: &'static str,
    ts: &'static str,
) -> Rec {
    Rec {
        workload: "billing",
        proto: "http",
        decision,
        origin: (decision != Decision::Allow).then_some(Fault::Policy),
        method: Some(method),
        host: Some(host),
        ip: "198.51.100.7",
        class: Some("documentation"),
        port,
        path: Some(path),
        ts,
        outcome_of: None,
        dns: None,
        query: None,
        cgroup: None,
    }
}

fn kernel(proto: &'static str, ip: &'static str, port: u16, ts: &'static str) -> Rec {
    Rec {
        proto,
        method: None,
        host: None,
        ip,
        class: None,
        port,
        path: None,
        ..http(Decision::WouldDeny, "GET", "x", 1, "/", ts)
    }
}

/// Writes sealed records (then `tail`) to `dir/name`.
fn audit_file(dir: &Path, name: &str, recs: &[Rec], tail: &[u8]) -> PathBuf {
    let mut out = Vec::new();
    let mut prev = chain::GENESIS;
    for (i, x) in recs.iter().enumerate() {
        let mut r = Record::new(x.proto);
        r.workload = Some(x.workload.to_owned());
        r.cgroup = Some(x.cgroup.map_or_else(
            || format!("/system.slice/{}.service", x.workload),
            str::to_owned,
        ));
        r.uid = Some(1001);
        r.pid = Some(4242);
        r.decision = x.decision;
        r.origin = x.origin;
        r.method = x.method.map(str::to_owned);
        r.path = x.path.map(str::to_owned);
        r.dst = Dst {
            host: x.host.map(str::to_owned),
            ip: Some(x.ip.to_owned()),
            port: Some(x.port),
            class: x.class.map(str::to_owned),
        };
        r.rule = (x.decision == Decision::Allow && x.proto == "http").then(|| "old".to_owned());
        r.outcome_of = x.outcome_of;
        if let Some(query) = x.query {
            let (names, clipped) = crate::policy::recorded_query_names(query);
            r.query_names = Some(names);
            r.query_names_clipped = clipped.then_some(true);
        }
        r.dns = x.dns.map(|(qname, qtype)| crate::audit::DnsQuery {
            qname: Some(qname.to_owned()),
            qtype: Some(qtype.to_owned()),
            transport: "udp".to_owned(),
            rcode: Some("NOERROR".to_owned()),
            answers: Vec::new(),
        });
        r.ts = x.ts.to_owned();
        prev = chain::seal(&mut r, i as u64 + 1, &prev, &mut out);
    }
    out.extend_from_slice(tail);
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

fn options(workload: &str) -> Options {
    Options {
        workload: workload.to_owned(),
        ..Options::default()
    }
}

/// What a billing service did for an hour (in audit mode: allow and would_deny).
fn observed() -> Vec<Rec> {
    use Decision::{Allow, WouldDeny};
    const API: &str = "api.example.com";
    vec![
        http(
            Allow,
            "GET",
            API,
            443,
            "/v1/customers/123",
            "2026-11-30T10:00:05Z",
        ),
        Rec {
            query: Some("expand=card&expand=owner&limit=10"),
            ..http(
                Allow,
                "GET",
                API,
                443,
                "/v1/customers/456",
                "2026-11-30T10:00:35Z",
            )
        },
        http(
            WouldDeny,
            "HEAD",
            API,
            443,
            "/v1/customers/789",
            "2026-11-30T10:00:50Z",
        ),
        http(
            Allow,
            "POST",
            API,
            443,
            "/v1/charges",
            "2026-11-30T10:01:00Z",
        ),
        http(
            Allow,
            "POST",
            API,
            443,
            "/v1/charges",
            "2026-11-30T10:01:10Z",
        ),
        http(
            WouldDeny,
            "GET",
            API,
            443,
            "/v1/invoices/3f2a9c1e-0b4d-4e5f-8a6b-7c8d9e0f1a2b/lines",
            "2026-11-30T10:20:00Z",
        ),
        http(
            WouldDeny,
            "DELETE",
            API,
            443,
            "/v1/sessions/deadbeef0123",
            "2026-11-30T10:30:00Z",
        ),
        http(
            WouldDeny,
            "GET",
            "legacy.example.com",
            80,
            "/",
            "2026-11-30T10:40:00Z",
        ),
        http(
            WouldDeny,
            "GET",
            "legacy.example.com",
            80,
            "/status/",
            "2026-11-30T10:41:00Z",
        ),
        Rec {
            class: Some("loopback"),
            ip: "127.0.0.1",
            ..http(
                WouldDeny,
                "GET",
                "internal.example.com",
                8080,
                "/health",
                "2026-11-30T10:42:00Z",
            )
        },
        Rec {
            proto: "tls",
            method: None,
            path: None,
            ..http(
                Allow,
                "GET",
                "pinned.example.com",
                443,
                "/",
                "2026-11-30T10:43:00Z",
            )
        },
        kernel("tcp", "192.0.2.10", 5432, "2026-11-30T10:44:00Z"),
        kernel("tcp", "192.0.2.10", 5432, "2026-11-30T10:45:00Z"),
        kernel("udp", "192.0.2.53", 53, "2026-11-30T10:46:00Z"),
        Rec {
            proto: "dns",
            method: None,
            path: None,
            dns: Some(("api.example.com", "A")),
            ..http(
                Allow,
                "GET",
                "api.example.com",
                53,
                "/",
                "2026-11-30T10:47:00Z",
            )
        },
        Rec {
            proto: "dns",
            method: None,
            path: None,
            dns: Some(("cdn-1.example.net", "TXT")),
            ..http(
                WouldDeny,
                "GET",
                "cdn-1.example.net",
                53,
                "/",
                "2026-11-30T10:48:00Z",
            )
        },
    ]
}

/// Records that are not demand: they must not appear in the policy.
fn noise() -> Vec<Rec> {
    use Decision::{Allow, Deny, Error};
    vec![
        // enforce-mode refusal: only with --include-denied
        http(
            Deny,
            "PUT",
            "api.example.com",
            443,
            "/v1/admin",
            "2026-11-30T10:50:00Z",
        ),
        // a client error: never
        Rec {
            origin: Some(Fault::Client),
            ..http(
                Deny,
                "GET",
                "api.example.com",
                443,
                "/v1/bad",
                "2026-11-30T10:51:00Z",
            )
        },
        // an upstream failure: never
        Rec {
            origin: Some(Fault::Upstream),
            ..http(
                Error,
                "GET",
                "api.example.com",
                443,
                "/v1/err",
                "2026-11-30T10:52:00Z",
            )
        },
        // an outcome record: not a decision
        Rec {
            outcome_of: Some(1),
            ..http(
                Allow,
                "GET",
                "api.example.com",
                443,
                "/v1/outcome",
                "2026-11-30T10:53:00Z",
            )
        },
        // another workload
        Rec {
            workload: "payroll",
            ..http(
                Allow,
                "GET",
                "payroll.example.com",
                443,
                "/pay",
                "2026-11-30T10:54:00Z",
            )
        },
    ]
}

fn suggest_from(files: &[PathBuf], opts: Options) -> Result<(String, Vec<String>), PolicyCliError> {
    suggest_policy(files, None, opts)
}

/// The error message of suggesting for `workload` from `files`.
fn suggest_err(files: &[PathBuf], workload: &str) -> String {
    suggest_from(files, options(workload))
        .unwrap_err()
        .to_string()
}

fn load(text: &str) -> Snapshot {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("suggested.yaml"), text).unwrap();
    Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn decide(snapshot: &Snapshot, request: &str) -> &'static str {
    let (id, w) = offline::workload(snapshot, "billing").unwrap();
    let spec = Spec {
        request,
        uid: Some(1001),
        ..Spec::default()
    };
    match offline::prepare(id, w, &spec) {
        Ok(prepared) => explain(snapshot, &prepared.request()).decision,
        // refused by normalisation: the proxy answers 400, a denial
        Err(_) => "deny",
    }
}

#[test]
fn suggests_a_policy_that_validates_replays_and_denies_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut recs = observed();
    recs.extend(noise());
    let file = audit_file(
        dir.path(),
        "audit.jsonl",
        &recs,
        b"{\"seq\":99,\"ts\":\"2026",
    );
    let (text, warnings) = suggest_from(std::slice::from_ref(&file), options("billing")).unwrap();
    println!("{text}");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("audit.jsonl:22: not an audit record (a torn last line"));

    // The real validator, as `policy check` runs it on the file.
    let out = dir.path().join("billing.yaml");
    std::fs::write(&out, &text).unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (verdict, snapshot) =
        crate::policy::cli::check(&out, false, true, 14, &mut stdout, &mut stderr);
    assert_eq!(
        verdict,
        crate::policy::cli::Verdict::Ok,
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    let snapshot = snapshot.unwrap();
    let (_, w) = offline::workload(&snapshot, "billing").unwrap();
    assert_eq!(w.mode(), crate::policy::Mode::Enforce);
    assert_eq!(w.uid, Some(1001));
    assert_eq!(
        w.selector,
        crate::policy::Selector::Cgroup("/system.slice/billing.service".to_owned())
    );

    // Replay: every observed request is allowed by the pure decision.
    for r in observed().iter().filter(|r| r.proto == "http") {
        let request = format!(
            "{} http://{}:{}{}{}",
            r.method.unwrap(),
            r.host.unwrap(),
            r.port,
            r.path.unwrap(),
            r.query.map(|q| format!("?{q}")).unwrap_or_default()
        );
        assert_eq!(decide(&snapshot, &request), "allow", "{request}\n{text}");
    }
    // L4 exception for the database, DNS for the TXT name, passthrough for the pinned host.
    assert_eq!(w.l4.len(), 1, "{:?}", w.l4);
    assert_eq!(w.l4[0].ports, [5432]);
    assert_eq!(w.l4[0].prefix, 32);
    assert!(text.contains("  - host: pinned.example.com\n    port: 443\n    rate: 10/minute\n    tls: passthrough\n"), "{text}");
    assert!(
        text.contains("dns:\n  names: [cdn-1.example.net]\n  types: [TXT]\n"),
        "{text}"
    );
    assert!(
        text.contains("    allow_internal: [127.0.0.1/32]\n"),
        "{text}"
    );

    // Comments: count and first/last seen per rule and destination; the header.
    assert!(
        text.contains(
            "      # 3 request(s), first 2026-11-30T10:00:05Z, last 2026-11-30T10:00:50Z (GET 2, HEAD 1)\n      \
             - id: v1-customers-id\n        methods: [GET, HEAD]\n        path: /v1/customers/{id:[0-9]+}\n"
        ),
        "{text}"
    );
    assert!(
        text.starts_with("# Suggested by `scopegate policy suggest`"),
        "{text}"
    );
    assert!(
        text.contains("# counted: 6 allow, 10 would_deny\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "# skipped 1 deny (not refused by policy), 1 deny (refused by policy; \
             --include-denied counts them), 1 error (not refused by policy)\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("# other workloads in the files (not used): payroll (1)\n"),
        "{text}"
    );
    assert!(text.contains("# window: all records; 16 demand record(s), first 2026-11-30T10:00:05Z, last 2026-11-30T10:48:00Z\n"), "{text}");
    // The busiest minute of api.example.com is 10:00 with 3 requests: 6/minute, floored at 10.
    assert!(
        text.contains("  - host: api.example.com\n    port: 443\n    rate: 10/minute\n"),
        "{text}"
    );
    // Nothing of the noise.
    for absent in [
        "/v1/admin",
        "/v1/bad",
        "/v1/err",
        "/v1/outcome",
        "payroll.example.com",
    ] {
        assert!(!text.contains(absent), "{absent}: {text}");
    }

    // Held out: other requests to the same hosts. Most are denied.
    let held_out = [
        "PUT http://api.example.com:443/v1/customers/123",
        "DELETE http://api.example.com:443/v1/customers/123",
        "POST http://api.example.com:443/v1/customers/123",
        "GET http://api.example.com:443/v1/customers",
        "GET http://api.example.com:443/v1/customers/",
        "GET http://api.example.com:443/v1/customers/cus_123",
        "GET http://api.example.com:443/v1/customers/123/cards",
        "GET http://api.example.com:443/v1/customers/123/",
        "GET http://api.example.com:443/v1/customers/..%2f..%2fadmin",
        "GET http://api.example.com:443/v1/customers/../admin",
        "GET http://api.example.com:443/v1/customers/%2e%2e/admin",
        "GET http://api.example.com:443/v1/charges",
        "DELETE http://api.example.com:443/v1/charges",
        "POST http://api.example.com:443/v1/charges/1",
        "GET http://api.example.com:443/v1/invoices/3f2a9c1e-0b4d-4e5f-8a6b-7c8d9e0f1a2b",
        "GET http://api.example.com:443/v1/invoices/not-a-uuid/lines",
        "GET http://api.example.com:443/v1/invoices/3f2a9c1e-0b4d-4e5f-8a6b-7c8d9e0f1a2b/lines/1",
        "GET http://api.example.com:443/v1/sessions/deadbeef0123",
        "DELETE http://api.example.com:443/v1/sessions/zzzz",
        "GET http://api.example.com:443/v2/customers/123",
        "GET http://api.example.com:443/",
        "GET http://api.example.com:443/admin",
        "GET http://api.example.com:8443/v1/customers/123",
        "GET http://api.example.com:80/v1/customers/123",
        "POST http://legacy.example.com:80/",
        "GET http://legacy.example.com:80/status",
        "GET http://legacy.example.com:80/status/x",
        "GET http://legacy.example.com:80/etc/passwd",
        "GET http://legacy.example.com:8080/",
        "GET http://internal.example.com:8080/admin",
        "POST http://internal.example.com:8080/health",
        "GET http://other.example.com:443/v1/customers/123",
        "GET http://api.example.com:443/v1/customers/123?admin=true",
        "GET http://api.example.com:443/v1/customers/123?expand=card&debug=1",
        "GET http://api.example.com:443/v1/customers/123?limit=1&limit=2",
        "POST http://api.example.com:443/v1/charges?amount=1",
        "GET http://legacy.example.com:80/?x=1",
        // allowed, and rightly: the template's other values, the same methods and query
        // parameters (`expand` was seen repeated)
        "GET http://api.example.com:443/v1/customers/999999",
        "GET http://api.example.com:443/v1/customers/7?expand=card&expand=x",
        "HEAD http://api.example.com:443/v1/customers/1",
    ];
    let denied = held_out
        .iter()
        .filter(|r| decide(&snapshot, r) != "allow")
        .count();
    println!(
        "held-out corpus: {denied} of {} requests denied ({:.0}%)",
        held_out.len(),
        100.0 * denied as f64 / held_out.len() as f64
    );
    assert_eq!(
        denied,
        held_out.len() - 3,
        "only the last three are allowed"
    );

    // Deterministic: the same records in another order give the same text.
    let mut shuffled = observed();
    shuffled.reverse();
    shuffled.extend(noise());
    let again = audit_file(
        dir.path(),
        "audit.jsonl",
        &shuffled,
        b"{\"seq\":99,\"ts\":\"2026",
    );
    assert_eq!(suggest_from(&[again], options("billing")).unwrap().0, text);
}

#[test]
fn include_denied_and_audit_mode() {
    let dir = tempfile::tempdir().unwrap();
    let file = audit_file(dir.path(), "audit.jsonl", &noise(), b"");
    let e = suggest_err(std::slice::from_ref(&file), "billing");
    assert_eq!(
        e,
        "--workload \"billing\": 3 record(s), none of them observed demand (allow or \
         would_deny): skipped 1 deny (not refused by policy), 1 deny (refused by policy; \
         --include-denied counts them), 1 error (not refused by policy)"
    );
    let opts = Options {
        include_denied: true,
        mode: SuggestMode::Audit,
        ..options("billing")
    };
    let (text, _) = suggest_from(std::slice::from_ref(&file), opts).unwrap();
    let snapshot = load(&text);
    assert_eq!(
        decide(&snapshot, "PUT http://api.example.com:443/v1/admin"),
        "allow"
    );
    assert_eq!(
        decide(&snapshot, "GET http://api.example.com:443/v1/bad"),
        "deny"
    );
    assert!(text.contains("\nmode: audit\n"), "{text}");
}

#[test]
fn broken_and_foreign_audit_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Empty.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, b"").unwrap();
    let e = suggest_err(std::slice::from_ref(&empty), "billing");
    assert_eq!(
        e,
        "--workload \"billing\": no records of this workload in the audit files (the files hold \
         no record of any workload)"
    );
    // Records of other workloads only: names them.
    let payroll = dir.path().join("payroll");
    std::fs::create_dir(&payroll).unwrap();
    let other = audit_file(&payroll, "audit.jsonl", &noise()[4..], b"");
    let e = suggest_err(std::slice::from_ref(&other), "billing");
    assert_eq!(
        e,
        "--workload \"billing\": no records of this workload in the audit files (workloads \
         with records: \"payroll\" (1))"
    );
    // Unknown workload next to a known one.
    let mixed = audit_file(dir.path(), "mixed.jsonl", &observed(), b"");
    let e = suggest_err(std::slice::from_ref(&mixed), "nope");
    assert!(
        e.contains("workloads with records: \"billing\" (16)"),
        "{e}"
    );
    // Outcome records are not counted as records of their own.
    let both = audit_file(dir.path(), "both.jsonl", &noise(), b"");
    let e = suggest_err(std::slice::from_ref(&both), "nope");
    assert!(
        e.ends_with("(workloads with records: \"billing\" (3), \"payroll\" (1))"),
        "{e}"
    );
    // A garbage line in the middle: an error with file:line.
    let mut bytes = std::fs::read(&mixed).unwrap();
    let at = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
    bytes.splice(at..at, b"not json at all\n".iter().copied());
    std::fs::write(&mixed, &bytes).unwrap();
    let e = suggest_err(std::slice::from_ref(&mixed), "billing");
    assert!(
        e.starts_with(&format!("{}:2: not an audit record (", mixed.display())),
        "{e}"
    );
    assert!(
        e.contains("the file is damaged or not an audit file"),
        "{e}"
    );
    // A missing file.
    let e = suggest_err(&[dir.path().join("nope.jsonl")], "billing");
    assert!(e.contains("nope.jsonl: cannot read audit records"), "{e}");
}

#[test]
fn hostile_records_give_a_valid_policy_that_grants_no_more_than_seen() {
    use Decision::Allow;
    let dir = tempfile::tempdir().unwrap();
    let mut recs = vec![
        http(
            Allow,
            "GET",
            "api.example.com",
            443,
            "/ok/%23a:b&c=d",
            "2026-11-30T10:00:00Z",
        ),
        http(
            Allow,
            "GET",
            "api.example.com",
            443,
            "/ok/x:%20y'z%22",
            "2026-11-30T10:00:01Z",
        ),
        http(
            Allow,
            "GET",
            "api.example.com",
            443,
            "/ok/-%20item",
            "2026-11-30T10:00:02Z",
        ),
        http(
            Allow,
            "GET",
            "api.example.com",
            443,
            "/a/../b",
            "2026-11-30T10:00:03Z",
        ),
        http(
            Allow,
            "GET",
            "api.example.com",
            443,
            "/a%2f..%2fadmin",
            "2026-11-30T10:00:04Z",
        ),
        http(
            Allow,
            "GET",
            "api.example.com",
            443,
            "/x\n  - id: evil\n    path: /**",
            "2026-11-30T10:00:05Z",
        ),
        http(
            Allow,
            "GET",
            "api.example.com",
            443,
            "/{all}",
            "2026-11-30T10:00:06Z",
        ),
        http(
            Allow,
            "GET",
            "api.example.com",
            443,
            "/**",
            "2026-11-30T10:00:07Z",
        ),
        http(
            Allow,
            "get",
            "api.example.com",
            443,
            "/lower",
            "2026-11-30T10:00:08Z",
        ),
        http(
            Allow,
            "GET",
            "evil.example.com\n- cidr: 0.0.0.0/0",
            443,
            "/",
            "2026-11-30T10:00:09Z",
        ),
        http(
            Allow,
            "GET",
            "*.example.com",
            443,
            "/",
            "2026-11-30T10:00:10Z",
        ),
        Rec {
            workload: "x\n# evil\nworkload: x",
            ..http(
                Allow,
                "GET",
                "api.example.com",
                443,
                "/",
                "2026-11-30T10:00:11Z",
            )
        },
    ];
    let huge: &'static str = Box::leak(format!("/big/{}", "A".repeat(5000)).into_boxed_str());
    recs.push(http(
        Allow,
        "GET",
        "api.example.com",
        443,
        huge,
        "2026-11-30T10:00:12Z",
    ));
    let file = audit_file(dir.path(), "audit.jsonl", &recs, b"");
    let (text, _) = suggest_from(std::slice::from_ref(&file), options("billing")).unwrap();
    println!("{text}");
    let snapshot = load(&text);
    let (_, w) = offline::workload(&snapshot, "billing").unwrap();
    assert_eq!(snapshot.workloads().len(), 1);
    assert_eq!(w.destinations.len(), 1, "{text}");
    assert!(w.l4.is_empty());
    let rules: Vec<String> = w.destinations[0]
        .rules()
        .iter()
        .map(|r| r.path().to_string())
        .collect();
    assert_eq!(
        rules,
        ["/ok/%23a:b&c=d", "/ok/-%20item", "/ok/x:%20y'z%22"]
            .map(str::to_owned)
            .to_vec(),
        "{text}"
    );
    // Nothing beyond what was seen.
    for r in [
        "GET http://api.example.com:443/admin",
        "GET http://api.example.com:443/b",
        "GET http://api.example.com:443/anything",
        "GET http://api.example.com:443/ok/%23a:b",
        "POST http://api.example.com:443/ok/-%20item",
        "GET http://evil.example.com:443/",
    ] {
        assert_eq!(decide(&snapshot, r), "deny", "{r}\n{text}");
    }
    // Every comment is one line; the other workload's name is escaped in the header.
    assert!(
        text.contains(r#"(not used): x\n# evil\nworkload: x (1)"#),
        "{text}"
    );
    assert!(
        text.contains(
            "# skipped 2 destination host not a DNS name or IP, 1 method not an uppercase token, \
             1 path longer than 2048 bytes, 2 path not canonical, 2 path with '*', '{' or '}' \
             (reserved by the path language), 1 path with control or non-ASCII characters\n"
        ),
        "{text}"
    );
}

#[test]
fn the_command_writes_the_file_and_honours_since() {
    use crate::policy::cli::{PolicyCommand, Verdict, run};
    let dir = tempfile::tempdir().unwrap();
    let file = audit_file(dir.path(), "audit.jsonl", &observed(), b"");
    let out = dir.path().join("out/billing.yaml");
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let command = |since: Option<&str>| PolicyCommand::Suggest {
        from: vec![file.clone()],
        workload: "billing".to_owned(),
        out: Some(out.clone()),
        since: since.map(str::to_owned),
        mode: SuggestMode::Enforce,
        include_denied: false,
    };
    assert_eq!(run(command(None)).unwrap(), Verdict::Ok);
    let written = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        written,
        suggest_from(std::slice::from_ref(&file), options("billing"))
            .unwrap()
            .0
    );
    // Only what happened from 10:40 on: the legacy host, the internal one, L4 and DNS.
    assert_eq!(
        run(command(Some("2026-11-30T10:40:00Z"))).unwrap(),
        Verdict::Ok
    );
    let recent = std::fs::read_to_string(&out).unwrap();
    assert!(
        !recent.contains("api.example.com\n    port: 443"),
        "{recent}"
    );
    assert!(
        recent.contains("  - host: legacy.example.com\n"),
        "{recent}"
    );
    assert!(
        recent.contains("# window: since 2026-11-30T10:40:00Z;"),
        "{recent}"
    );
    assert!(
        recent.contains("# note: 7 record(s) before the window not read\n"),
        "{recent}"
    );
    load(&recent);
    // A bad --since names the value.
    let e = run(command(Some("yesterday"))).unwrap_err().to_string();
    assert!(e.starts_with("--since \"yesterday\": "), "{e}");
    // Nowhere to write: an error naming the file, and nothing half-written.
    let bad = PolicyCommand::Suggest {
        from: vec![file.clone()],
        workload: "billing".to_owned(),
        out: Some(dir.path().join("missing-dir/billing.yaml")),
        since: None,
        mode: SuggestMode::Enforce,
        include_denied: false,
    };
    let e = run(bad).unwrap_err().to_string();
    assert!(
        e.contains("missing-dir/billing.yaml: cannot write the policy"),
        "{e}"
    );
}

#[test]
fn records_carry_query_names_never_values_and_bounded() {
    use crate::policy::{MAX_RECORDED_QUERY_NAME, MAX_RECORDED_QUERY_NAMES, recorded_query_names};
    let names = |q: &str| recorded_query_names(q);
    assert_eq!(
        names("b=secret&a=1&b=2"),
        (vec!["b".into(), "a".into(), "b".into()], false)
    );
    assert_eq!(
        names("a%20b=1&c+d=2&flag"),
        (vec!["a b".into(), "c d".into(), "flag".into()], false)
    );
    assert_eq!(names(""), (vec![], false));
    assert_eq!(names("&&"), (vec![], false));
    // Unprintable, too long, too many, unparseable: clipped.
    assert_eq!(names("%0Aevil=1&ok=2"), (vec!["ok".into()], true));
    let long = format!("{}=1", "n".repeat(MAX_RECORDED_QUERY_NAME + 1));
    assert_eq!(names(&long), (vec![], true));
    let many: Vec<String> = (0..=MAX_RECORDED_QUERY_NAMES)
        .map(|i| format!("p{i}=1"))
        .collect();
    let (got, clipped) = names(&many.join("&"));
    assert_eq!((got.len(), clipped), (MAX_RECORDED_QUERY_NAMES, true));
    assert_eq!(names("a=%zz"), (vec![], true));
    assert_eq!(names("a=1;b=2"), (vec![], true));
}

#[test]
fn hostile_and_clipped_query_names() {
    use Decision::Allow;
    let dir = tempfile::tempdir().unwrap();
    let recs = vec![
        Rec {
            query: Some("a%3A%20b=1&%23x=2&it's=3&%22q%22=4&-%20item=5&%7B%7D=6&%3C%3C=7&=8"),
            ..http(
                Allow,
                "GET",
                "api.example.com",
                443,
                "/hostile",
                "2026-11-30T10:00:00Z",
            )
        },
        Rec {
            query: Some("a%3A%20b=1&%23x=2&it's=3&%22q%22=4&-%20item=5&%7B%7D=6&%3C%3C=7"),
            ..http(
                Allow,
                "GET",
                "api.example.com",
                443,
                "/named",
                "2026-11-30T10:00:01Z",
            )
        },
        Rec {
            query: Some("ok=1&%0Aevil%3A%20x=2"),
            ..http(
                Allow,
                "GET",
                "api.example.com",
                443,
                "/clipped",
                "2026-11-30T10:00:02Z",
            )
        },
    ];
    let file = audit_file(dir.path(), "audit.jsonl", &recs, b"");
    let (text, _) = suggest_from(std::slice::from_ref(&file), options("billing")).unwrap();
    println!("{text}");
    let snapshot = load(&text);
    // The empty name cannot be listed: that rule allows any query, and says so.
    assert!(
        text.contains(
            "        path: /clipped\n        # query: not every parameter name was recorded, \
             so any query is allowed\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "        path: /hostile\n        # query: not every parameter name was recorded"
        ),
        "{text}"
    );
    let q = "a%3A%20b=1&%23x=2&it's=3&%22q%22=4&-%20item=5&%7B%7D=6&%3C%3C=7";
    assert_eq!(
        decide(
            &snapshot,
            &format!("GET http://api.example.com:443/named?{q}")
        ),
        "allow"
    );
    for denied in ["a=1", "a%3A=1", "q=1", "x=1", "%23x=1&admin=1", "item=1"] {
        let r = format!("GET http://api.example.com:443/named?{denied}");
        assert_eq!(decide(&snapshot, &r), "deny", "{r}\n{text}");
    }
}

#[test]
fn the_selector_is_the_recorded_cgroup_exactly_or_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let rec = |cgroup: &'static str| Rec {
        cgroup: Some(cgroup),
        ..http(
            Decision::Allow,
            "GET",
            "api.example.com",
            443,
            "/",
            "2026-11-30T10:00:00Z",
        )
    };
    // YAML-special characters: quoted, and the selector is exactly the path.
    let odd = "/system.slice/a: b #c 'd' \"e\" - &x !y %z";
    let file = audit_file(dir.path(), "odd.jsonl", &[rec(odd)], b"");
    let (text, _) = suggest_from(std::slice::from_ref(&file), options("billing"))
        .unwrap_or_else(|e| panic!("{e}"));
    let snapshot = load(&text);
    let (_, w) = offline::workload(&snapshot, "billing").unwrap();
    assert_eq!(
        w.selector,
        crate::policy::Selector::Cgroup(odd.to_owned()),
        "{text}"
    );
    // A '*' would be read as a glob (selecting more than the workload): an error.
    let file = audit_file(
        dir.path(),
        "glob.jsonl",
        &[rec("/system.slice/app-*.service")],
        b"",
    );
    assert_eq!(
        suggest_err(std::slice::from_ref(&file), "billing"),
        "--workload \"billing\": recorded cgroup \"/system.slice/app-*.service\" cannot be \
         selected exactly: it contains '*', which the policy reads as a glob"
    );
    // Several cgroups: the most frequent is selected, the header lists them all.
    let file = audit_file(
        dir.path(),
        "two.jsonl",
        &[rec("/a.service"), rec("/b.service"), rec("/b.service")],
        b"",
    );
    let (text, _) = suggest_from(std::slice::from_ref(&file), options("billing")).unwrap();
    assert!(text.contains("  cgroup: /b.service\n"), "{text}");
    assert!(
        text.contains(
            "# several cgroups seen, selecting the most frequent: /a.service (1), /b.service (2)\n"
        ),
        "{text}"
    );
}
