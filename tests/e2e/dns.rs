//! Destination binding through DNS, end to end: the real agent resolves policy host names
//! with its own resolver (hickory, `--resolv-conf` naming only a test DNS server on a
//! 127.0.53.x address of each test's own), and the real kernel redirects a real curl in a
//! throwaway cgroup. curl never resolves anything itself (`--connect-to`), so the workload
//! picks the address and the agent decides whether that address may be bound to the name.
//!
//! Network rule: curl connects only to loopback addresses (127.0.0.0/8, also as
//! `::ffff:127.x`); answers in the other internal classes (private, link-local, CGNAT, ULA,
//! NAT64 forms) are never connected to, even though the hook would rewrite the connect:
//! `policy explain`, which resolves with the agent's resolver code against the same test
//! server, shows how the agent classifies and binds them. The upstreams are on loopback.
//!
//! The test DNS server listens on the host's loopback (127.0.53.x, one address per test),
//! which the test rule allows, rather than in a network namespace of the test's
//! own: the agent that resolves through it must run in the host's network namespace,
//! because its hooks are attached to the host's cgroup tree and its proxy serves
//! connections redirected there; a server inside another namespace is unreachable from
//! it. Loopback keeps every query on this machine, and no test asks a real resolver.
#![allow(clippy::unwrap_used, missing_docs, reason = "tests")]

use std::{process::Command, time::Duration};

use scopegate_e2e::{
    dns_server::{Answer, DnsServer},
    *,
};

/// An agent whose resolver asks only `dns`, on a fresh cgroup tree with one managed child.
struct Fixture {
    managed: String,
    agent: Agent,
    _policies: tempfile::TempDir,
    _pins: PinDir,
    _tree: CgroupTree,
    _audit_dir: tempfile::TempDir,
}

impl Fixture {
    /// `egress` is the policy's egress list (YAML, indented by two spaces).
    fn new(dns: &DnsServer, egress: &str, ttl: (u32, u32), agent_inside: bool) -> Self {
        let tree = CgroupTree::new();
        let managed = tree.child("managed");
        let policy = format!("workload: web\nselect:\n  cgroup: {managed}\negress:\n{egress}");
        let policies = policy_dir(&[("web.yaml", policy)]);
        let pins = PinDir::new();
        let audit_dir = tempfile::tempdir().unwrap();
        let mut config = AgentConfig::new(
            policies.path(),
            &tree,
            &pins,
            audit_dir.path().join("audit.jsonl"),
        );
        config.extra = vec![
            "--resolv-conf".into(),
            dns.resolv_conf().display().to_string(),
            "--dns-min-ttl".into(),
            ttl.0.to_string(),
            "--dns-max-ttl".into(),
            ttl.1.to_string(),
        ];
        config.inside = agent_inside.then(|| managed.clone());
        let agent = Agent::start(config);
        Self {
            managed,
            agent,
            _policies: policies,
            _pins: pins,
            _tree: tree,
            _audit_dir: audit_dir,
        }
    }

    /// GET http://NAME:PORT/allowed/x from the managed cgroup, connecting to `addr`.
    fn get(&self, name: &str, port: u16, addr: &str) -> (u16, String) {
        self.request(name, port, addr, "/allowed/x", &[])
    }

    /// curl http://NAME:PORT/PATH from the managed cgroup with `args` (a method, a Host
    /// header), connecting to `addr` (always a loopback address: the network rule).
    fn request(
        &self,
        name: &str,
        port: u16,
        addr: &str,
        path: &str,
        args: &[&str],
    ) -> (u16, String) {
        let connect_to = format!("{name}:{port}:{addr}:{port}");
        let url = format!("http://{name}:{port}{path}");
        let mut all = vec!["--connect-to", &connect_to, "-w", STATUS];
        all.extend_from_slice(args);
        all.push(&url);
        let out = curl_in(&self.managed, &all);
        status_and_body(&out)
    }

    /// `policy explain` of GET http://NAME:PORT/allowed/x by `web`, resolving with the
    /// test server (as the agent does): the exit code and the report.
    fn explain(&self, dns: &DnsServer, name: &str, port: u16) -> (Option<i32>, String) {
        explain_in(self._policies.path(), dns, name, port)
    }

    /// The decision records so far, after waiting for `n`.
    fn records(&self, n: usize) -> Vec<serde_json::Value> {
        let records = self.agent.wait_audit(n);
        assert_eq!(records.len(), n, "{records:#?}");
        records
    }
}

/// `policy explain` of GET http://NAME:PORT/allowed/x by `web` with the policies of `dir`,
/// resolving with the test server `dns` (as the agent does): the exit code and the report.
fn explain_in(
    dir: &std::path::Path,
    dns: &DnsServer,
    name: &str,
    port: u16,
) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(["policy", "explain"])
        .arg(dir)
        .args(["--workload", "web", "--request"])
        .arg(format!("GET http://{name}:{port}/allowed/x"))
        .arg("--resolv-conf")
        .arg(dns.resolv_conf())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// An address as reports show it: the standard text form, a v4-mapped AAAA answer as the
/// IPv4 address it maps (the agent's resolver canonicalises it).
fn shown(addr: &str) -> String {
    addr.parse::<std::net::IpAddr>()
        .unwrap()
        .to_canonical()
        .to_string()
}

/// A destination entry for `name:port` with an optional `allow_internal` value.
fn dest(name: &str, port: u16, allow_internal: Option<&str>) -> String {
    let allow = allow_internal.map_or(String::new(), |a| format!("    allow_internal: {a}\n"));
    let id = name.replace('.', "-");
    format!(
        "  - host: {name}\n    port: {port}\n{allow}    rules:\n      - id: read-{id}\n        methods: [GET]\n        path: /allowed/**\n"
    )
}

#[test]
fn dns_internal_answers_are_denied_for_a_name_destination() {
    privileged_test("dns_internal_answers_are_denied_for_a_name_destination");
    let dns = DnsServer::start("127.0.53.10");
    let upstream = Upstream::start("127.0.0.51");
    let port = upstream.addr.port();
    // Connected to (loopback only): (name, answer, the address curl connects to).
    let connected = [
        ("lo.dns.test", "127.0.0.51", "127.0.0.51"),
        ("mapped.dns.test", "::ffff:127.0.0.51", "::ffff:127.0.0.51"),
    ];
    // Never connected to (network rule): the agent's resolver and `policy explain` classify
    // the answer. (name, answer, the class and detail `policy explain` names)
    let explained = [
        ("private.dns.test", "10.0.0.7", "private"),
        (
            "metadata.dns.test",
            "169.254.169.254",
            "link-local, cloud metadata service",
        ),
        ("cgnat.dns.test", "100.64.0.7", "cgnat"),
        ("ula.dns.test", "fd00::7", "ula"),
        (
            "nat64.dns.test",
            "64:ff9b::a00:7",
            "private, IPv4 10.0.0.7 in NAT64 64:ff9b::/96",
        ),
        ("multicast.dns.test", "224.0.0.7", "multicast"),
        ("unspecified.dns.test", "0.0.0.0", "unspecified"),
        ("broadcast.dns.test", "255.255.255.255", "broadcast"),
        ("bench.dns.test", "198.18.0.7", "benchmarking"),
        ("reserved.dns.test", "240.0.0.7", "reserved"),
        ("ll6.dns.test", "fe80::7", "link-local"),
        (
            "compat.dns.test",
            "::a00:7",
            "private, IPv4 10.0.0.7 in IPv4-compatible ::/96",
        ),
        (
            "sixtofour.dns.test",
            "2002:a00:7::",
            "private, IPv4 10.0.0.7 in 6to4 2002::/16",
        ),
        // Teredo: the client address is the last 32 bits, inverted (10.0.0.7).
        (
            "teredo.dns.test",
            "2001:0:4136:e378:8000:63bf:f5ff:fff8",
            "private, IPv4 10.0.0.7 in Teredo 2001::/32",
        ),
        // An AAAA answer in v4-mapped form is the IPv4 address it maps.
        ("mapped-private.dns.test", "::ffff:10.0.0.7", "private"),
    ];
    let mut egress = String::new();
    for (name, answer, _) in connected.iter().chain(&explained) {
        dns.set(name, &[Answer::addr(answer, 60)]);
        egress.push_str(&dest(name, port, None));
    }
    let f = Fixture::new(&dns, &egress, (5, 300), false);
    for (i, (name, answer, connect)) in connected.iter().enumerate() {
        let addr = if connect.contains(':') {
            format!("[{connect}]")
        } else {
            (*connect).to_owned()
        };
        let (status, body) = f.get(name, port, &addr);
        assert_eq!(status, 403, "{name} -> {answer}: {body}");
        assert!(body.contains("destination_internal_address"), "{body}");
        let records = f.records(i + 1);
        let r = &records[i];
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["reason"], "destination_internal_address", "{r}");
        assert_eq!(r["dst"]["host"], *name, "{r}");
        // The kernel's original destination (v4-mapped as IPv4) and its class.
        let want_ip = connect.strip_prefix("::ffff:").unwrap_or(connect);
        assert_eq!(r["dst"]["ip"], want_ip, "{r}");
        assert_eq!(r["dst"]["class"], "loopback", "{r}");
        // The refusal names the address and its class.
        assert!(body.contains(&format!("{want_ip} (loopback")), "{body}");
    }
    // Nothing reached the loopback upstream.
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    // The other classes, through the agent's own resolver code in `policy explain`, asking
    // the same test server: each answer classified and denied; the rules alone would allow.
    for (name, answer, detail) in &explained {
        let (code, text) = f.explain(&dns, name, port);
        assert_eq!(code, Some(1), "{name}: {text}");
        assert!(text.contains("decision:  ALLOW by rule"), "{name}: {text}");
        // Trusted for what is left of the 60 s TTL (the agent's cache counts down).
        assert!(
            text.contains(&format!(
                "binding:   {name} resolves to 1 address(es) via the nameservers of {}, \
                 trusted for ",
                dns.resolv_conf().display()
            )) && text.contains(" s (allow_internal: none)"),
            "{name}: {text}"
        );
        assert!(
            text.contains(&format!(
                "  {} ({detail}): internal, denied (destination_internal_address)",
                shown(answer)
            )),
            "{name}: {text}"
        );
    }
    // With `allow_internal: true` the same answers may be bound (exit 0).
    let mut open = String::new();
    for (name, ..) in &explained {
        open.push_str(&dest(name, port, Some("true")));
    }
    let open_dir = policy_dir(&[(
        "web.yaml",
        format!("workload: web\nselect:\n  cgroup: /sg-unused\negress:\n{open}"),
    )]);
    for (name, answer, detail) in &explained {
        let (code, text) = explain_in(open_dir.path(), &dns, name, port);
        assert_eq!(code, Some(0), "{name}: {text}");
        assert!(
            text.contains(&format!(
                "  {} ({detail}): allowed (allow_internal)",
                shown(answer)
            )),
            "{name}: {text}"
        );
    }
    let asked: Vec<String> = dns.queries().into_iter().map(|q| q.qname).collect();
    for (name, ..) in connected.iter() {
        assert!(
            asked.contains(&format!("{name}.")),
            "{name} not asked: {asked:?}"
        );
    }
    for (name, ..) in explained.iter() {
        assert!(
            asked.contains(&format!("{name}.")),
            "{name} not asked: {asked:?}"
        );
    }
}

#[test]
fn dns_loopback_answer_is_allowed_with_allow_internal() {
    privileged_test("dns_loopback_answer_is_allowed_with_allow_internal");
    let dns = DnsServer::start("127.0.53.11");
    let upstream = Upstream::start("127.0.0.52");
    let port = upstream.addr.port();
    dns.set("cidr.dns.test", &[Answer::addr("127.0.0.52", 60)]);
    dns.set("all.dns.test", &[Answer::addr("127.0.0.52", 60)]);
    let egress = format!(
        "{}{}",
        dest("cidr.dns.test", port, Some("[127.0.0.52/32]")),
        dest("all.dns.test", port, Some("true"))
    );
    let f = Fixture::new(&dns, &egress, (5, 300), false);
    for name in ["cidr.dns.test", "all.dns.test"] {
        let (status, body) = f.get(name, port, "127.0.0.52");
        assert_eq!(status, 200, "{name}: {body}");
        assert!(body.contains("says hi: GET /allowed/x"), "{body}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let records = f.records(2);
    assert!(
        records.iter().all(|r| r["decision"] == "allow"),
        "{records:#?}"
    );
    assert_eq!(records[0]["dst"]["ip"], "127.0.0.52");
}

#[test]
fn dns_rebinding_after_ttl_expiry_is_denied() {
    privileged_test("dns_rebinding_after_ttl_expiry_is_denied");
    let dns = DnsServer::start("127.0.53.12");
    let a = Upstream::start("127.0.0.53");
    let b = Upstream::start("127.0.0.54");
    let port = a.addr.port();
    let name = "rebind.dns.test";
    dns.set(name, &[Answer::addr("127.0.0.53", 1)]);
    let egress = dest(name, port, Some("[127.0.0.53/32]"));
    // TTL floor 1 s, ceiling 2 s: any answer is looked up again after at most 2 s.
    let f = Fixture::new(&dns, &egress, (1, 2), false);
    let (status, body) = f.get(name, port, "127.0.0.53");
    assert_eq!(status, 200, "{body}");
    let asked_before = dns.queries().len();

    // The zone moves the name to an address the destination does not allow.
    dns.set(name, &[Answer::addr("127.0.0.54", 1)]);
    std::thread::sleep(Duration::from_millis(2500));
    let (status, body) = f.get(name, port, "127.0.0.54");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("destination_internal_address"), "{body}");
    // The old address is no longer in the answer set.
    let (status, body) = f.get(name, port, "127.0.0.53");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("destination_address_mismatch"), "{body}");

    let records = f.records(3);
    let reasons: Vec<&serde_json::Value> = records.iter().map(|r| &r["reason"]).collect();
    assert_eq!(
        reasons,
        [
            &serde_json::Value::Null,
            &serde_json::json!("destination_internal_address"),
            &serde_json::json!("destination_address_mismatch"),
        ],
        "{records:#?}"
    );
    assert_eq!(a.seen().len(), 1, "only the first request reached A");
    assert!(b.seen().is_empty(), "{:?}", b.seen());
    assert!(
        dns.queries().len() > asked_before,
        "the agent resolved the name again after the TTL: {:?}",
        dns.queries()
    );
}

#[test]
fn dns_mixed_answer_set_binds_only_the_allowed_address() {
    privileged_test("dns_mixed_answer_set_binds_only_the_allowed_address");
    let dns = DnsServer::start("127.0.53.13");
    let allowed = Upstream::start("127.0.0.55");
    let other = Upstream::start("127.0.0.56");
    let port = allowed.addr.port();
    let name = "mixed.dns.test";
    dns.set(
        name,
        &[
            Answer::addr("127.0.0.55", 60),
            Answer::addr("127.0.0.56", 60),
            Answer::addr("10.0.0.9", 60),
        ],
    );
    let egress = dest(name, port, Some("[127.0.0.55/32]"));
    let f = Fixture::new(&dns, &egress, (5, 300), false);
    // Only loopback is connected to (network rule): the allowed answer and one outside the
    // allowed range; `policy explain` shows the binding of all three.
    let (status, body) = f.get(name, port, "127.0.0.55");
    assert_eq!(status, 200, "{body}");
    let (status, body) = f.get(name, port, "127.0.0.56");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("destination_internal_address"), "{body}");
    let records = f.records(2);
    assert_eq!(records[0]["decision"], "allow");
    assert_eq!(records[0]["dst"]["ip"], "127.0.0.55");
    assert_eq!(records[0]["dst"]["class"], "loopback");
    assert_eq!(records[1]["reason"], "destination_internal_address");
    assert_eq!(records[1]["dst"]["ip"], "127.0.0.56");
    assert_eq!(allowed.seen().len(), 1);
    assert!(other.seen().is_empty(), "{:?}", other.seen());
    let (code, text) = f.explain(&dns, name, port);
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "resolves to 3 address(es)",
        "(allow_internal: 127.0.0.55/32)",
        "  127.0.0.55 (loopback): allowed (allow_internal)",
        "  127.0.0.56 (loopback): internal, denied (destination_internal_address)",
        "  10.0.0.9 (private): internal, denied (destination_internal_address)",
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }
}

#[test]
fn dns_of_the_agent_inside_a_managed_cgroup_passes_its_hooks() {
    privileged_test("dns_of_the_agent_inside_a_managed_cgroup_passes_its_hooks");
    // The agent runs in the cgroup its policy selects: only its SO_MARK exempts its
    // sockets, and the policy allows no DNS, so an unmarked query would be refused.
    let dns = DnsServer::start("127.0.53.14");
    let upstream = Upstream::start("127.0.0.57");
    let port = upstream.addr.port();
    dns.set("inside.dns.test", &[Answer::addr("127.0.0.57", 60)]);
    let egress = dest("inside.dns.test", port, Some("true"));
    let f = Fixture::new(&dns, &egress, (5, 300), true);
    let (status, body) = f.get("inside.dns.test", port, "127.0.0.57");
    assert_eq!(status, 200, "{body}");
    let records = f.records(1);
    assert_eq!(records[0]["decision"], "allow", "{records:#?}");
    assert_eq!(upstream.seen().len(), 1);
    let asked: Vec<String> = dns.queries().into_iter().map(|q| q.qname).collect();
    assert!(asked.contains(&"inside.dns.test.".to_owned()), "{asked:?}");
}

#[test]
fn dns_numeric_looking_names_are_refused_by_policy_check() {
    privileged_test("dns_numeric_looking_names_are_refused_by_policy_check");
    for (host, line) in [
        ("0x7f.0x21", 5),
        ("0x7f000001", 5),
        ("0xa9fea9fe", 5),
        ("2130706433", 5),
        ("127.1", 5),
        ("0177.0.0.1", 5),
    ] {
        let text = format!(
            "workload: web\nselect:\n  cgroup: /x\negress:\n  - host: \"{host}\"\n    port: 80\n"
        );
        let dir = policy_dir(&[("web.yaml", text)]);
        let out = Command::new(bin())
            .args(["policy", "check"])
            .arg(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{host}: {stdout}");
        let want = format!("web.yaml:{line}:");
        assert!(stdout.contains(&want), "{host}: {stdout}");
        let col = stdout
            .split(&want)
            .nth(1)
            .and_then(|rest| rest.split(':').next())
            .and_then(|c| c.parse::<u32>().ok());
        assert!(col.is_some_and(|c| c > 0), "{host}: no column in {stdout}");
    }
}

#[test]
fn dns_internal_answers_bind_no_loopback_connection() {
    privileged_test("dns_internal_answers_bind_no_loopback_connection");
    let dns = DnsServer::start("127.0.53.15");
    let upstream = Upstream::start("127.0.0.61");
    let port = upstream.addr.port();
    // The names answer only internal addresses (never connected to: the network rule);
    // curl connects to the loopback upstream instead, which is none of the answers.
    let only = [
        ("private-only.dns.test", "10.0.0.7", "private"),
        (
            "metadata-only.dns.test",
            "169.254.169.254",
            "link-local, cloud metadata service",
        ),
        ("mapped-only.dns.test", "::ffff:10.0.0.7", "private"),
    ];
    // Mixed: the same internal answer and the loopback upstream, which alone is allowed.
    let mixed = [
        ("private-mixed.dns.test", "10.0.0.7", "private"),
        (
            "metadata-mixed.dns.test",
            "169.254.169.254",
            "link-local, cloud metadata service",
        ),
        ("mapped-mixed.dns.test", "::ffff:10.0.0.7", "private"),
    ];
    let mut egress = String::new();
    for (name, answer, _) in &only {
        dns.set(name, &[Answer::addr(answer, 60)]);
        egress.push_str(&dest(name, port, None));
    }
    for (name, answer, _) in &mixed {
        dns.set(
            name,
            &[Answer::addr(answer, 60), Answer::addr("127.0.0.61", 60)],
        );
        egress.push_str(&dest(name, port, Some("[127.0.0.61/32]")));
    }
    let f = Fixture::new(&dns, &egress, (5, 300), false);
    for (i, (name, answer, _)) in only.iter().enumerate() {
        let (status, body) = f.get(name, port, "127.0.0.61");
        assert_eq!(status, 403, "{name} -> {answer}: {body}");
        assert!(body.contains("destination_address_mismatch"), "{body}");
        let r = &f.records(i + 1)[i];
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["reason"], "destination_address_mismatch", "{r}");
        assert_eq!(r["dst"]["host"], *name, "{r}");
        assert_eq!(r["dst"]["ip"], "127.0.0.61", "{r}");
        assert_eq!(r["dst"]["class"], "loopback", "{r}");
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    for (i, (name, answer, _)) in mixed.iter().enumerate() {
        let (status, body) = f.get(name, port, "127.0.0.61");
        assert_eq!(status, 200, "{name} -> {answer} + 127.0.0.61: {body}");
        let n = only.len() + i + 1;
        let r = &f.records(n)[n - 1];
        assert_eq!(r["decision"], "allow", "{r}");
        assert_eq!(r["dst"]["ip"], "127.0.0.61", "{r}");
        assert_eq!(r["dst"]["class"], "loopback", "{r}");
    }
    assert_eq!(upstream.seen().len(), mixed.len());
    // The internal answer of each name, as the agent's resolver code binds it.
    for (name, answer, detail) in only.iter().chain(&mixed) {
        let (_, text) = f.explain(&dns, name, port);
        assert!(
            text.contains(&format!(
                "  {} ({detail}): internal, denied (destination_internal_address)",
                shown(answer)
            )),
            "{name}: {text}"
        );
    }
    let asked: Vec<String> = dns.queries().into_iter().map(|q| q.qname).collect();
    for (name, ..) in only.iter().chain(&mixed) {
        assert!(asked.contains(&format!("{name}.")), "{name}: {asked:?}");
    }
}

#[test]
fn dns_the_upstream_receives_the_canonical_host() {
    privileged_test("dns_the_upstream_receives_the_canonical_host");
    let dns = DnsServer::start("127.0.53.16");
    let upstream = Upstream::start("127.0.0.62");
    // The scheme's default port, on an address no other test uses.
    let default = Upstream::start_on("127.0.80.12", 80);
    let port = upstream.addr.port();
    let name = "api.allowed.test";
    dns.set(
        name,
        &[
            Answer::addr("127.0.0.62", 60),
            Answer::addr("127.0.80.12", 60),
        ],
    );
    let egress = format!(
        "{}{}",
        dest(name, port, Some("true")),
        // Rule ids are unique per workload.
        dest(name, 80, Some("true")).replace("id: read-", "id: read80-")
    );
    let f = Fixture::new(&dns, &egress, (5, 300), false);
    let cases = [
        (
            port,
            "127.0.0.62",
            format!("API.Allowed.TEST:0{port}"),
            format!("{name}:{port}"),
        ),
        (
            port,
            "127.0.0.62",
            format!("{name}.:{port}"),
            format!("{name}:{port}"),
        ),
        (
            80,
            "127.0.80.12",
            "Api.Allowed.Test:0080".to_owned(),
            name.to_owned(),
        ),
        (80, "127.0.80.12", format!("{name}."), name.to_owned()),
    ];
    for (i, (to_port, addr, host, want)) in cases.iter().enumerate() {
        let header = format!("Host: {host}");
        let (status, body) = f.request(name, *to_port, addr, "/allowed/x", &["-H", &header]);
        assert_eq!(status, 200, "{host}: {body}");
        let target = if *to_port == 80 { &default } else { &upstream };
        let seen = target.seen();
        let last = seen.last().unwrap();
        let hosts: Vec<&str> = last
            .headers
            .iter()
            .filter(|(k, _)| k == "host")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(hosts, [want.as_str()], "{host}: {last:?}");
        let r = &f.records(i + 1)[i];
        assert_eq!(r["decision"], "allow", "{r}");
        assert_eq!(r["dst"]["host"], name, "{r}");
        assert_eq!(r["dst"]["port"], *to_port, "{r}");
    }
    assert_eq!((upstream.seen().len(), default.seen().len()), (2, 2));
}

#[test]
fn dns_binding_is_checked_before_the_rules() {
    privileged_test("dns_binding_is_checked_before_the_rules");
    let dns = DnsServer::start("127.0.53.17");
    let answered = Upstream::start("127.0.0.63");
    let port = answered.addr.port();
    // Not among the name's answers; listening so that a forward would show.
    let other = Upstream::start_on("127.0.0.64", port);
    let name = "bind.dns.test";
    dns.set(name, &[Answer::addr("127.0.0.63", 60)]);
    let f = Fixture::new(&dns, &dest(name, port, Some("true")), (5, 300), false);
    // (method, path, the rules' reason): only GET /allowed/** is allowed.
    let cases = [
        ("DELETE", "/allowed/x", "method_not_allowed"),
        ("GET", "/other", "path_not_allowed"),
    ];
    let mut n = 0;
    for (method, path, rule_reason) in cases {
        // On the name's address the rules refuse it; on another address the binding does,
        // before any rule is read.
        for (addr, reason) in [
            ("127.0.0.63", rule_reason),
            ("127.0.0.64", "destination_address_mismatch"),
        ] {
            let (status, body) = f.request(name, port, addr, path, &["-X", method]);
            assert_eq!(status, 403, "{method} {path} to {addr}: {body}");
            assert!(body.contains(reason), "{method} {path} to {addr}: {body}");
            n += 1;
            let r = &f.records(n)[n - 1];
            assert_eq!(r["decision"], "deny", "{r}");
            assert_eq!(r["reason"], reason, "{r}");
            assert_eq!(r["method"], method, "{r}");
            assert_eq!(r["dst"]["ip"], addr, "{r}");
        }
    }
    assert!(answered.seen().is_empty(), "{:?}", answered.seen());
    assert!(other.seen().is_empty(), "{:?}", other.seen());
}
