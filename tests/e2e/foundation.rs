//! Foundation: a managed workload's plain `curl` is pinned to the proxy by the kernel and
//! decided by its policy; everything else is untouched. Real kernel, real binary, real curl.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{fs, net::TcpStream, process::Command, time::Duration};

use scopegate_e2e::{
    dns_server::{Answer, DnsServer},
    *,
};

/// One agent on a fresh cgroup subtree with a `managed` and an `unmanaged` child, and an
/// upstream on 127.0.0.2.
struct Fixture {
    upstream: Upstream,
    managed: String,
    unmanaged: String,
    agent: Agent,
    _policies: tempfile::TempDir,
    _pins: PinDir,
    _tree: CgroupTree,
    _audit_dir: tempfile::TempDir,
}

fn web_policy(managed: &str, upstream: &Upstream, extra: &str) -> String {
    format!(
        "workload: web\n\
         select:\n  cgroup: {managed}\n\
         egress:\n\
         \x20 - host: {ip}\n\
         \x20   port: {port}\n\
         \x20   rules:\n\
         \x20     - id: read-allowed\n\
         \x20       methods: [GET, HEAD]\n\
         \x20       path: /allowed/**\n\
         \x20     - id: create-item\n\
         \x20       methods: [POST]\n\
         \x20       path: /items\n{extra}",
        ip = upstream.addr.ip(),
        port = upstream.addr.port(),
    )
}

impl Fixture {
    fn new(agent_inside_managed: bool) -> Self {
        Self::with_policy(agent_inside_managed, |managed, upstream| {
            web_policy(managed, upstream, "")
        })
    }

    fn with_policy(agent_inside_managed: bool, policy: impl Fn(&str, &Upstream) -> String) -> Self {
        let tree = CgroupTree::new();
        let managed = tree.child("managed");
        let unmanaged = tree.child("unmanaged");
        let upstream = Upstream::start("127.0.0.2");
        let policies = policy_dir(&[("web.yaml", policy(&managed, &upstream))]);
        let pins = PinDir::new();
        let audit_dir = tempfile::tempdir().unwrap();
        let mut config = AgentConfig::new(
            policies.path(),
            &tree,
            &pins,
            audit_dir.path().join("audit.jsonl"),
        );
        config.inside = agent_inside_managed.then(|| managed.clone());
        let agent = Agent::start(config);
        Self {
            upstream,
            managed,
            unmanaged,
            agent,
            _policies: policies,
            _pins: pins,
            _tree: tree,
            _audit_dir: audit_dir,
        }
    }
}

#[test]
fn allowed_request_gets_the_upstream_answer_and_one_audit_record() {
    privileged_test("allowed_request_gets_the_upstream_answer_and_one_audit_record");
    let f = Fixture::new(false);
    let out = curl_in(
        &f.managed,
        &["-w", STATUS, &f.upstream.url("/allowed/thing?x=1")],
    );
    let (status, body) = status_and_body(&out);
    assert_eq!(
        status,
        200,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(body.contains("says hi: GET /allowed/thing?x=1"), "{body}");

    let seen = f.upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, "/allowed/thing?x=1");

    let records = f.agent.wait_audit(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r["decision"], "allow");
    assert_eq!(r["workload"], "web");
    assert_eq!(r["cgroup"], f.managed.as_str());
    assert_eq!(r["method"], "GET");
    assert_eq!(r["path"], "/allowed/thing");
    assert_eq!(r["rule"], "read-allowed");
    assert_eq!(r["status"], 200);
    assert_eq!(r["dst"]["ip"], "127.0.0.2");
    assert_eq!(r["dst"]["port"], f.upstream.addr.port());
    assert_eq!(r["dst"]["host"], "127.0.0.2");
    assert_eq!(r["uid"], 0);
    assert!(r["pid"].as_u64().is_some_and(|p| p > 1), "{r}");
    assert!(
        r["request_id"].as_str().is_some_and(|id| id.len() == 32),
        "{r}"
    );
    assert!(r["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    assert_eq!(r["seq"], 2, "seq 1 is the agent_started record");
    // The kernel's redirect really happened: the upstream saw the proxy's socket, not
    // curl's, and curl never knew (it connected to the upstream's address).
    assert_ne!(seen[0].peer.port(), 0);
}

#[test]
fn denied_method_and_path_get_403_json_and_never_reach_the_upstream() {
    privileged_test("denied_method_and_path_get_403_json_and_never_reach_the_upstream");
    let f = Fixture::new(false);
    let cases = [
        (vec!["-X", "DELETE"], "/allowed/thing", "method_not_allowed"),
        (vec![], "/forbidden", "path_not_allowed"),
        (vec!["-X", "POST"], "/items/extra", "path_not_allowed"),
    ];
    for (i, (flags, path, reason)) in cases.iter().enumerate() {
        let url = f.upstream.url(path);
        let mut args: Vec<&str> = flags.clone();
        args.extend(["-w", STATUS, url.as_str()]);
        let out = curl_in(&f.managed, &args);
        let (status, body) = status_and_body(&out);
        assert_eq!(status, 403, "{path}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "denied");
        assert_eq!(json["workload"], "web");
        assert_eq!(json["reason"], *reason, "{json}");
        let id = json["request_id"].as_str().unwrap().to_owned();
        let records = f.agent.wait_audit(i + 1);
        let r = records
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap();
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["reason"], *reason);
        assert_eq!(r["status"], 403);
        assert_eq!(r["origin"], "policy");
    }
    assert!(f.upstream.seen().is_empty(), "{:?}", f.upstream.seen());
    // The allowed POST still passes on the same policy.
    let out = curl_in(
        &f.managed,
        &[
            "-X",
            "POST",
            "-d",
            "{}",
            "-w",
            STATUS,
            &f.upstream.url("/items"),
        ],
    );
    assert_eq!(status_and_body(&out).0, 200);
    assert_eq!(f.upstream.seen().len(), 1);
    let records = f.agent.wait_audit(4);
    assert_eq!(
        records.len(),
        4,
        "exactly one record per decision: {records:#?}"
    );
}

#[test]
fn unmanaged_cgroup_is_untouched() {
    privileged_test("unmanaged_cgroup_is_untouched");
    let f = Fixture::new(false);
    let out = curl_in(
        &f.unmanaged,
        &["-X", "DELETE", "-w", STATUS, &f.upstream.url("/forbidden")],
    );
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("says hi: DELETE /forbidden"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        f.agent.audit_records().is_empty(),
        "{:#?}",
        f.agent.audit_records()
    );
}

#[test]
fn agent_inside_the_managed_cgroup_is_not_looped_back() {
    privileged_test("agent_inside_the_managed_cgroup_is_not_looped_back");
    // The agent runs in the very cgroup it manages; its own upstream connects must pass.
    let f = Fixture::new(true);
    let out = curl_in(&f.managed, &["-w", STATUS, &f.upstream.url("/allowed")]);
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 200, "{body}");
    let seen = f.upstream.seen();
    assert_eq!(
        seen.len(),
        1,
        "the upstream sees the request exactly once: {seen:?}"
    );
    let records = f.agent.wait_audit(1);
    std::thread::sleep(Duration::from_millis(200));
    let records = if records.len() == 1 {
        f.agent.audit_records()
    } else {
        records
    };
    assert_eq!(records.len(), 1, "a loop would add records: {records:#?}");
    assert_eq!(records[0]["decision"], "allow");
}

#[test]
fn host_header_naming_another_destination_is_denied() {
    privileged_test("host_header_naming_another_destination_is_denied");
    let other = Upstream::start("127.0.0.3");
    // Both upstreams are allowed destinations; the connection goes to 127.0.0.2.
    let f = Fixture::with_policy(false, |managed, upstream| {
        let extra = format!(
            "  - host: {}\n    port: {}\n    rules:\n      - id: other\n        methods: [GET]\n        path: /**\n",
            other.addr.ip(),
            other.addr.port()
        );
        web_policy(managed, upstream, &extra)
    });
    let url = f.upstream.url("/allowed");
    // Host names the other allowed destination: the address does not belong to it.
    let host = format!("Host: {}", other.addr);
    let out = curl_in(&f.managed, &["-H", &host, "-w", STATUS, &url]);
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"reason\""), "{body}");
    // Host names a destination the policy does not have at all.
    let out = curl_in(
        &f.managed,
        &["-H", "Host: api.example.com", "-w", STATUS, &url],
    );
    assert_eq!(status_and_body(&out).0, 403);
    assert!(f.upstream.seen().is_empty());
    assert!(other.seen().is_empty());
    let records = f.agent.wait_audit(2);
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["decision"] == "deny"));
}

#[test]
fn a_connection_without_kernel_origin_is_closed_and_recorded() {
    privileged_test("a_connection_without_kernel_origin_is_closed_and_recorded");
    let f = Fixture::new(false);
    // This test process is outside the managed tree: a direct connect to the proxy has no
    // origin in the kernel map.
    let mut s = TcpStream::connect(("127.0.0.1", f.agent.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    use std::io::{Read as _, Write as _};
    let _ = s.write_all(b"GET /allowed HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n");
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed without an answer");
    let records = f.agent.wait_audit(1);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["decision"], "deny");
    assert_eq!(records[0]["reason"], "unknown_connection");
    assert!(f.upstream.seen().is_empty());
}

#[test]
fn non_http_bytes_are_closed_and_recorded() {
    privileged_test("non_http_bytes_are_closed_and_recorded");
    let f = Fixture::new(false);
    // python3 sends raw bytes from inside the managed cgroup.
    let script = format!(
        "import socket\ns=socket.create_connection(('{}',{}))\ns.sendall(b'\\x00\\x01binary-garbage\\r\\n')\ns.settimeout(5)\ntry:\n  print(len(s.recv(100)))\nexcept ConnectionResetError:\n  print(0)\n",
        f.upstream.addr.ip(),
        f.upstream.addr.port()
    );
    let out = Command::new(bin())
        .args([
            "exec", "--cgroup", &f.managed, "--", "python3", "-c", &script,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    let records = f.agent.wait_audit(1);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["reason"], "not_http");
    assert_eq!(records[0]["workload"], "web");
    assert!(f.upstream.seen().is_empty());
}

#[test]
fn ipv6_and_v4_mapped_connects_are_redirected() {
    privileged_test("ipv6_and_v4_mapped_connects_are_redirected");
    let v6 = Upstream::start("::1");
    let f = Fixture::with_policy(false, |managed, upstream| {
        let extra = format!(
            "  - host: \"::1\"\n    port: {}\n    rules:\n      - id: v6\n        methods: [GET]\n        path: /v6\n",
            v6.addr.port()
        );
        web_policy(managed, upstream, &extra)
    });
    let out = curl_in(&f.managed, &["-w", STATUS, &v6.url("/v6")]);
    assert_eq!(status_and_body(&out).0, 200, "{out:?}");
    let out = curl_in(&f.managed, &["-w", STATUS, &v6.url("/other")]);
    assert_eq!(status_and_body(&out).0, 403);
    assert_eq!(v6.seen().len(), 1);
    // A v4-mapped destination on an IPv6 socket gets the IPv4 treatment.
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET6)\ns.connect(('::ffff:127.0.0.2',{}))\ns.sendall(b'GET /forbidden HTTP/1.1\\r\\nHost: 127.0.0.2:{}\\r\\nConnection: close\\r\\n\\r\\n')\ns.settimeout(5)\nprint(s.recv(200).split(b'\\r\\n')[0].decode())\n",
        f.upstream.addr.port(),
        f.upstream.addr.port()
    );
    let out = Command::new(bin())
        .args([
            "exec", "--cgroup", &f.managed, "--", "python3", "-c", &script,
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "HTTP/1.1 403 Forbidden",
        "{out:?}"
    );
    assert!(f.upstream.seen().is_empty());
    let records = f.agent.wait_audit(3);
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["dst"]["ip"], "::1");
    assert_eq!(records[2]["dst"]["ip"], "127.0.0.2");
}

#[test]
fn bad_input_gets_one_clear_error_line() {
    privileged_test("bad_input_gets_one_clear_error_line");
    let tree = CgroupTree::new();
    let pins = PinDir::new();
    let run = |policies: &str, port: u16, extra: &[&str]| {
        let out = Command::new(bin())
            .args([
                "run",
                "--policies",
                policies,
                "--proxy-port",
                &port.to_string(),
            ])
            .arg("--pin-dir")
            .arg(&pins.0)
            .arg("--cgroup-root")
            .arg(&tree.dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert!(!errors.is_empty(), "{stderr}");
        errors.join("\n")
    };
    // Missing directory.
    let e = run("/nonexistent/policies", free_port(), &[]);
    assert!(e.contains("/nonexistent/policies"), "{e}");
    // Malformed YAML and an unknown field: file:line:col.
    let bad = policy_dir(&[
        ("broken.yaml", "workload: [unclosed\n".into()),
        (
            "unknown.yaml",
            "workload: w\nselect:\n  cgroup: /x\negress: []\ncolour: blue\n".into(),
        ),
    ]);
    let e = run(bad.path().to_str().unwrap(), free_port(), &[]);
    assert!(e.contains("broken.yaml:"), "{e}");
    assert!(e.contains("unknown.yaml:5:"), "{e}");
    assert!(e.contains("colour"), "{e}");
    // Proxy port in use.
    let good = policy_dir(&[(
        "w.yaml",
        "workload: w\nselect:\n  cgroup: /nowhere\negress: []\n".into(),
    )]);
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let e = run(good.path().to_str().unwrap(), port, &[]);
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("in use"),
        "{e}"
    );
    // Not privileged.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(bin())
        .args(["run", "--policies"])
        .arg(good.path())
        .args(["--proxy-port", &free_port().to_string()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("needs root") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
    // `policy check` reports the same errors and exits 1; a valid dir exits 0.
    let out = Command::new(bin())
        .args(["policy", "check"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown.yaml:5:"));
    let out = Command::new(bin())
        .args(["policy", "check"])
        .arg(good.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn selector_for_a_missing_cgroup_warns_and_is_enforced_once_it_exists() {
    privileged_test("selector_for_a_missing_cgroup_warns_and_is_enforced_once_it_exists");
    let tree = CgroupTree::new();
    let upstream = Upstream::start("127.0.0.2");
    let later = format!("{}/later", tree.path);
    let policies = policy_dir(&[("web.yaml", web_policy(&later, &upstream, ""))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        dir.path().join("audit.jsonl"),
    ));
    assert!(
        agent
            .stderr()
            .iter()
            .any(|l| l.contains("matches no cgroup")),
        "{:#?}",
        agent.stderr()
    );
    tree.child("later");
    // The agent rescans every 0.2 s in tests; wait for the map to be updated.
    std::thread::sleep(Duration::from_millis(800));
    let out = curl_in(&later, &["-w", STATUS, &upstream.url("/forbidden")]);
    assert_eq!(status_and_body(&out).0, 403);
    assert!(upstream.seen().is_empty());
}

/// `dig` (UDP and TCP) against the test DNS server: answers, NXDOMAIN, rebinding between two
/// queries, TXT, and the query log the DNS tests assert on.
#[test]
fn the_test_dns_server_answers_rebinds_and_logs_queries() {
    privileged_test("the_test_dns_server_answers_rebinds_and_logs_queries");
    let server = DnsServer::start("127.0.53.1");
    server.set("api.fixture.test", &[Answer::addr("127.0.0.9", 1)]);
    server.set("note.fixture.test", &[Answer::txt("hello", 5)]);
    let dig = |args: &[&str]| -> String {
        let out = Command::new("dig")
            .arg(format!("@{}", server.addr.ip()))
            .args(["+time=2", "+tries=1"])
            .args(args)
            .output()
            .expect("run dig");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        dig(&["+short", "api.fixture.test", "A"]).trim(),
        "127.0.0.9"
    );
    assert_eq!(
        dig(&["+short", "+tcp", "note.fixture.test", "TXT"]).trim(),
        "\"hello\""
    );
    assert!(dig(&["missing.fixture.test", "A"]).contains("status: NXDOMAIN"));
    server.set("api.fixture.test", &[Answer::addr("::1", 1)]);
    assert_eq!(dig(&["+short", "api.fixture.test", "AAAA"]).trim(), "::1");
    assert_eq!(dig(&["+short", "api.fixture.test", "A"]).trim(), "");
    let queries = server.queries();
    let seen: Vec<(&str, &str, &str)> = queries
        .iter()
        .map(|q| (q.qname.as_str(), q.qtype.as_str(), q.transport.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("api.fixture.test.", "A", "udp"),
            ("note.fixture.test.", "TXT", "tcp"),
            ("missing.fixture.test.", "A", "udp"),
            ("api.fixture.test.", "AAAA", "udp"),
            ("api.fixture.test.", "A", "udp"),
        ]
    );
    let conf = fs::read_to_string(server.resolv_conf()).expect("resolv.conf");
    assert!(conf.starts_with("nameserver 127.0.53.1\n"), "{conf}");
}
