//! DNS under policy, end to end: the real hooks redirect a managed workload's DNS (UDP and
//! TCP port 53, to the resolver it names) to the agent's DNS proxy, which answers only the
//! names and types the policy allows, records every query, and forwards allowed ones to the
//! resolver of its `--resolv-conf` (the test DNS server on 127.0.54.x). Real clients: dig
//! and python (dnspython, plain sockets).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use scopegate_e2e::{
    dns_server::{Answer, DnsServer},
    *,
};

/// An agent whose workload `web` (cgroup `managed`) may reach api.allowed.test (answered
/// with the loopback upstream) with `dns: <dns>`, forwarding to a test DNS server.
struct Fixture {
    server: DnsServer,
    upstream: Upstream,
    managed: String,
    tree: CgroupTree,
    agent: Agent,
    _policies: tempfile::TempDir,
    _pins: PinDir,
    _audit: tempfile::TempDir,
}

const NAME: &str = "api.allowed.test";

impl Fixture {
    fn new(server_ip: &str, upstream_ip: &str, dns: &str) -> Self {
        let server = DnsServer::start(server_ip);
        let upstream = Upstream::start(upstream_ip);
        server.set(
            NAME,
            &[
                Answer::addr(upstream_ip, 60),
                Answer::txt("v=allowed-txt", 60),
            ],
        );
        server.set("other.test", &[Answer::addr("127.0.54.250", 60)]);
        let tree = CgroupTree::new();
        let managed = tree.child("managed");
        let policy = format!(
            "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: {NAME}\n    port: {port}\n    allow_internal: true\n    rules:\n      - id: read\n        methods: [GET]\n        path: /**\n{dns}",
            port = upstream.addr.port()
        );
        let policies = policy_dir(&[("web.yaml", policy)]);
        let pins = PinDir::new();
        let audit = tempfile::tempdir().unwrap();
        let mut config =
            AgentConfig::new(policies.path(), &tree, &pins, audit.path().join("a.jsonl"));
        config.extra = vec![
            "--resolv-conf".into(),
            server.resolv_conf().display().to_string(),
        ];
        let agent = Agent::start(config);
        Self {
            server,
            upstream,
            managed,
            tree,
            agent,
            _policies: policies,
            _pins: pins,
            _audit: audit,
        }
    }

    fn dig(&self, cgroup: &str, args: &[&str]) -> String {
        let out = run_in(
            cgroup,
            "dig",
            &[
                &[
                    format!("@{}", self.server.addr.ip()).as_str(),
                    "+tries=1",
                    "+time=5",
                    "+norec",
                ],
                args,
            ]
            .concat(),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn dns_records(&self) -> Vec<serde_json::Value> {
        self.agent
            .audit_records()
            .into_iter()
            .filter(|r| r["proto"] == "dns")
            .collect()
    }

    fn wait_dns_records(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let records = self.dns_records();
            if records.len() >= n || std::time::Instant::now() >= deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn queries_for(&self, name: &str) -> usize {
        let name = format!("{name}.");
        self.server
            .queries()
            .iter()
            .filter(|q| q.qname == name)
            .count()
    }
}

fn run_in(cgroup: &str, program: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .args(["exec", "--cgroup", cgroup, "--", program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn status(dig: &str) -> &str {
    dig.split("status: ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("<no status>")
}

#[test]
fn an_allowed_name_resolves_from_the_original_server_and_then_connects() {
    privileged_test("an_allowed_name_resolves_from_the_original_server_and_then_connects");
    let f = Fixture::new("127.0.54.1", "127.0.54.11", "dns: system\n");
    // dig (UDP): it rejects replies from any other source than the server it asked.
    let answer = f.dig(&f.managed, &[NAME, "A", "+short"]);
    assert_eq!(answer.trim(), "127.0.54.11", "dig: {answer}");
    assert_eq!(f.queries_for(NAME), 1, "forwarded once to the resolver");
    // python: a connected UDP socket (recv from the connected peer, getpeername), and an
    // unconnected one (recvfrom shows the source).
    let script = format!(
        r#"
import socket, dns.message, dns.rdatatype
q = dns.message.make_query("{NAME}", "AAAA")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect(("{server}", 53))
s.send(q.to_wire())
r = dns.message.from_wire(s.recv(65535))
print("connected", r.id == q.id, dns.rcode.to_text(r.rcode()), "%s:%d" % s.getpeername())
q = dns.message.make_query("{NAME}", "A")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(q.to_wire(), ("{server}", 53))
data, src = u.recvfrom(65535)
r = dns.message.from_wire(data)
print("unconnected", r.id == q.id, "%s:%d" % src, [a.to_text() for rr in r.answer for a in rr])
"#,
        server = f.server.addr.ip()
    );
    let out = python_in(&f.managed, &script);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "connected True NOERROR 127.0.54.1:53",
            "unconnected True 127.0.54.1:53 ['127.0.54.11']",
        ],
        "{out}"
    );
    // The answer binds the name: a request to the answered address goes through. The zone
    // moves the name away first, so the request can pass only through the answer the
    // proxy learned (the agent's own resolver would now get 127.0.54.250), and the agent
    // asks nothing more.
    f.server.set(NAME, &[Answer::addr("127.0.54.250", 60)]);
    let asked = f.queries_for(NAME);
    assert_eq!(asked, 3, "{:?}", f.server.queries());
    let port = f.upstream.addr.port();
    let url = format!("http://{NAME}:{port}/hello");
    let resolve = format!("{NAME}:{port}:127.0.54.11");
    let out = curl_in(&f.managed, &["--resolve", &resolve, "-w", STATUS, &url]);
    let (code, body) = status_and_body(&out);
    assert_eq!(code, 200, "{body} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(f.upstream.seen().len(), 1);
    assert_eq!(f.queries_for(NAME), asked, "{:?}", f.server.queries());
    // One record per query, with the answer.
    let records = f.wait_dns_records(3);
    assert_eq!(records.len(), 3, "{records:#?}");
    for r in &records {
        assert_eq!(r["decision"], "allow", "{r}");
        assert_eq!(r["workload"], "web", "{r}");
        assert_eq!(r["dns"]["qname"], NAME, "{r}");
        assert_eq!(r["dns"]["transport"], "udp", "{r}");
        assert_eq!(r["dns"]["rcode"], "NOERROR", "{r}");
        assert_eq!(r["dst"]["ip"], "127.0.54.1", "{r}");
        assert_eq!(r["dst"]["port"], 53, "{r}");
    }
    let a: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["dns"]["qtype"] == "A")
        .collect();
    assert_eq!(a.len(), 2);
    assert!(
        a.iter()
            .all(|r| r["dns"]["answers"] == serde_json::json!(["127.0.54.11"]))
    );
}

#[test]
fn disallowed_names_and_types_are_refused_recorded_and_never_forwarded() {
    privileged_test("disallowed_names_and_types_are_refused_recorded_and_never_forwarded");
    let f = Fixture::new("127.0.54.2", "127.0.54.12", "dns: system\n");
    let other = f.dig(&f.managed, &["other.test", "A"]);
    assert_eq!(status(&other), "REFUSED", "{other}");
    let txt = f.dig(&f.managed, &[NAME, "TXT"]);
    assert_eq!(status(&txt), "REFUSED", "{txt}");
    let any = f.dig(&f.managed, &["+notcp", NAME, "ANY"]);
    assert_eq!(status(&any), "REFUSED", "{any}");
    // Over TCP: the same decisions.
    let tcp_other = f.dig(&f.managed, &["+tcp", "other.test", "A"]);
    assert_eq!(status(&tcp_other), "REFUSED", "{tcp_other}");
    let tcp_ok = f.dig(&f.managed, &["+tcp", NAME, "A", "+short"]);
    assert_eq!(tcp_ok.trim(), "127.0.54.12", "{tcp_ok}");
    assert_eq!(f.queries_for("other.test"), 0, "{:?}", f.server.queries());
    let queries = f.server.queries();
    assert_eq!(
        queries.len(),
        1,
        "only the allowed one was forwarded: {queries:?}"
    );
    assert_eq!(
        (queries[0].qtype.as_str(), queries[0].transport.as_str()),
        ("A", "tcp")
    );
    let records = f.wait_dns_records(5);
    assert_eq!(records.len(), 5, "{records:#?}");
    let summary: Vec<(String, String, String, String)> = records
        .iter()
        .map(|r| {
            let s = |v: &serde_json::Value| v.as_str().unwrap_or("null").to_owned();
            (
                s(&r["dns"]["qname"]),
                s(&r["dns"]["qtype"]),
                s(&r["dns"]["transport"]),
                s(&r["reason"]),
            )
        })
        .collect();
    let want = [
        ("other.test", "A", "udp", "dns_name_not_allowed"),
        (NAME, "TXT", "udp", "dns_type_not_allowed"),
        (NAME, "ANY", "udp", "dns_type_not_allowed"),
        ("other.test", "A", "tcp", "dns_name_not_allowed"),
        (NAME, "A", "tcp", "null"),
    ];
    let want: Vec<(String, String, String, String)> = want
        .iter()
        .map(|(a, b, c, d)| ((*a).into(), (*b).into(), (*c).into(), (*d).into()))
        .collect();
    assert_eq!(summary, want);
    for r in &records[..4] {
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["dns"]["rcode"], "REFUSED", "{r}");
        assert_eq!(r["workload"], "web", "{r}");
    }
}

#[test]
fn txt_is_answered_when_dns_types_lists_it() {
    privileged_test("txt_is_answered_when_dns_types_lists_it");
    let f = Fixture::new("127.0.54.3", "127.0.54.13", "dns:\n  types: [TXT]\n");
    let txt = f.dig(&f.managed, &[NAME, "TXT", "+short"]);
    assert_eq!(txt.trim(), "\"v=allowed-txt\"", "{txt}");
    let mx = f.dig(&f.managed, &[NAME, "MX"]);
    assert_eq!(status(&mx), "REFUSED", "{mx}");
    let records = f.wait_dns_records(2);
    assert_eq!(records[0]["decision"], "allow", "{records:#?}");
    assert_eq!(records[1]["reason"], "dns_type_not_allowed", "{records:#?}");
    assert_eq!(f.server.queries().len(), 1);
}

#[test]
fn a_hundred_random_subdomains_of_a_destination_are_all_refused() {
    privileged_test("a_hundred_random_subdomains_of_a_destination_are_all_refused");
    let f = Fixture::new(
        "127.0.54.4",
        "127.0.54.14",
        "dns:\n  names: ['*.cdn.test']\n",
    );
    let script = format!(
        r#"
import random, socket, string, dns.message, dns.rcode
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
codes = []
for i in range(100):
    label = "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(20))
    q = dns.message.make_query("%s%d.{NAME}" % (label, i), "A")
    s.sendto(q.to_wire(), ("{server}", 53))
    while True:
        data, src = s.recvfrom(65535)
        r = dns.message.from_wire(data)
        if r.id == q.id:
            break
    codes.append(dns.rcode.to_text(r.rcode()))
print(len(codes), sorted(set(codes)))
q = dns.message.make_query("img.cdn.test", "A")
s.sendto(q.to_wire(), ("{server}", 53))
r = dns.message.from_wire(s.recvfrom(65535)[0])
print("pattern", dns.rcode.to_text(r.rcode()))
"#,
        server = f.server.addr.ip()
    );
    let out = python_in(&f.managed, &script);
    // img.cdn.test is allowed by the pattern; the server does not know it (NXDOMAIN).
    assert_eq!(out, "100 ['REFUSED']\npattern NXDOMAIN", "{out}");
    let queries = f.server.queries();
    assert_eq!(queries.len(), 1, "only the pattern's name: {queries:?}");
    assert_eq!(queries[0].qname, "img.cdn.test.");
    let records = f.wait_dns_records(101);
    assert_eq!(records.len(), 101);
    let refused = records
        .iter()
        .filter(|r| r["reason"] == "dns_name_not_allowed" && r["decision"] == "deny")
        .count();
    assert_eq!(refused, 100);
    let names: std::collections::HashSet<&str> = records[..100]
        .iter()
        .filter_map(|r| r["dns"]["qname"].as_str())
        .collect();
    assert_eq!(names.len(), 100, "100 distinct names, one record each");
    assert_eq!(records[100]["dns"]["rcode"], "NXDOMAIN");
}

#[test]
fn malformed_queries_are_dropped_and_recorded_and_unmanaged_dns_is_untouched() {
    privileged_test("malformed_queries_are_dropped_and_recorded_and_unmanaged_dns_is_untouched");
    let f = Fixture::new("127.0.54.5", "127.0.54.15", "dns: system\n");
    let script = format!(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(b"\x12\x34not dns", ("{server}", 53))
try:
    s.recvfrom(65535)
    print("answered")
except socket.timeout:
    print("dropped")
"#,
        server = f.server.addr.ip()
    );
    assert_eq!(python_in(&f.managed, &script), "dropped");
    let records = f.wait_dns_records(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["reason"], "dns_malformed");
    assert_eq!(records[0]["workload"], "web");
    // An unmanaged cgroup's DNS goes straight to the server, unseen by the agent.
    let unmanaged = f.tree.child("unmanaged");
    let out = f.dig(&unmanaged, &["other.test", "A", "+short"]);
    assert_eq!(out.trim(), "127.0.54.250", "{out}");
    assert_eq!(f.queries_for("other.test"), 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.dns_records().len(), 1, "no record for unmanaged DNS");
}
