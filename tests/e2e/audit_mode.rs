//! Audit mode end to end, in the kernel too: a workload in `mode: audit` is never refused
//! by policy. HTTP its rules do not allow is forwarded (proxy), a TCP port no destination
//! names and UDP that no L4 exception or `dns:` grants pass the hooks unchanged; each is
//! recorded once as `would_deny` with the reason enforce mode gives. Switched to
//! `mode: enforce` by a reload, the same probes are refused from the next connect, with
//! the same reasons. A cgroup of the managed subtree without a policy is refused in both
//! phases (integrity refusals are not audit-mode passes).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs,
    net::SocketAddr,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use scopegate_e2e::{
    dns_server::{Answer, DnsServer},
    *,
};

fn policy(app: &str, upstream: &Upstream, mode: &str) -> String {
    format!(
        "workload: app\nmode: {mode}\nselect:\n  cgroup: {app}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n",
        ip = upstream.addr.ip(),
        port = upstream.addr.port()
    )
}

/// Replaces the policy file in one rename, so the inotify reload never reads half of it.
fn write_policy(dir: &std::path::Path, text: &str) {
    let tmp = dir.join(".app.yaml.tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, dir.join("app.yaml")).unwrap();
}

/// Reloads through the admin socket; returns once the new snapshot and its kernel maps are
/// in place.
fn reload(agent: &Agent) {
    let out = Command::new(bin())
        .arg("reload")
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "reload: {out:?}");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["ok"], true, "{answer:#}");
    assert!(
        answer["errors"].as_array().is_none_or(Vec::is_empty),
        "{answer:#}"
    );
}

/// Waits (at most 5 s) until `count()` reaches `n`, then returns it.
fn wait_count(count: impl Fn() -> usize, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    while count() < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    count()
}

/// Exactly `n` decision records: waits for them, then checks that no more follow.
fn exactly(agent: &Agent, n: usize) -> Vec<serde_json::Value> {
    let records = agent.wait_audit(n);
    thread::sleep(Duration::from_millis(300));
    let records_after = agent.audit_records();
    assert_eq!(records.len(), n, "{records:#?}");
    assert_eq!(records_after.len(), n, "{records_after:#?}");
    records_after
}

/// Whether the record's `dst` is `addr` (ip and port).
fn dst_is(record: &serde_json::Value, addr: SocketAddr) -> bool {
    record["dst"]["ip"] == addr.ip().to_string().as_str()
        && record["dst"]["port"] == u64::from(addr.port())
}

/// The record of workload `app` whose `dst` is `addr`, exactly one.
fn to(records: &[serde_json::Value], addr: SocketAddr) -> &serde_json::Value {
    let matching: Vec<_> = records
        .iter()
        .filter(|r| r["workload"] == "app" && dst_is(r, addr))
        .collect();
    assert_eq!(matching.len(), 1, "one record to {addr}: {records:#?}");
    matching[0]
}

#[test]
fn audit_mode_passes_and_records_what_enforce_mode_refuses() {
    privileged_test("audit_mode_passes_and_records_what_enforce_mode_refuses");
    let tree = CgroupTree::new();
    let slice = tree.child("work.slice");
    let app = tree.child("work.slice/app.service");
    let stray = format!("{slice}/stray.service");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("app.yaml", policy(&app, &upstream, "audit"))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, dir.path().join("a.jsonl"));
    config.extra = vec!["--managed-subtree".into(), slice.clone()];
    let agent = Agent::start(config);
    // Sinks on ports the policy does not name (nor the proxy's), so only the hook decides.
    let avoid = [upstream.addr.port(), agent.port, agent.dns_port];
    let tcp = TcpSink::start_avoiding("127.0.0.3", &avoid);
    let tcp6 = TcpSink::start_avoiding("::1", &avoid);
    let udp = UdpSink::start_avoiding("127.0.0.3", &avoid);
    // A resolver on the DNS port; the policy has no `dns:`.
    let resolver = UdpSink::start_on("127.0.97.53:53");
    let resolver_addr: SocketAddr = "127.0.97.53:53".parse().unwrap();
    let probes = format!(
        "{PY_PRELUDE}
print('tcp', attempt(tcp(socket.AF_INET, ('127.0.0.3', {t4}))))
print('tcp6', attempt(tcp(socket.AF_INET6, ('::1', {t6}))))
print('udp_sendto', attempt(udp_sendto(socket.AF_INET, ('127.0.0.3', {u4}))))
print('dns', attempt(udp_sendto(socket.AF_INET, ('127.0.97.53', 53))))
",
        t4 = tcp.addr.port(),
        t6 = tcp6.addr.port(),
        u4 = udp.addr.port(),
    );
    let connected_udp = format!(
        "{PY_PRELUDE}\nprint(attempt(udp_connect(socket.AF_INET, ('127.0.0.3', {}))))",
        udp.addr.port()
    );
    let stray_probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.3', {}))))",
        tcp.addr.port()
    );
    let http = |path: &str| status_and_body(&curl_in(&app, &["-w", STATUS, &upstream.url(path)]));

    // Audit mode: nothing is refused by policy.
    assert_eq!(http("/allowed/1").0, 200);
    let (code, body) = http("/forbidden");
    assert_eq!(
        code, 200,
        "audit mode forwards what the rules do not allow: {body}"
    );
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(
        python_in(&app, &probes),
        "tcp ok\ntcp6 ok\nudp_sendto ok\ndns ok"
    );
    assert_eq!(python_in(&app, &connected_udp), "ok");
    assert_eq!(
        wait_count(|| tcp.count(), 1),
        1,
        "the TCP sink saw the connect"
    );
    assert_eq!(
        wait_count(|| tcp6.count(), 1),
        1,
        "the TCP6 sink saw the connect"
    );
    assert_eq!(
        wait_count(|| udp.count(), 2),
        2,
        "the UDP sink got both datagrams"
    );
    assert_eq!(
        wait_count(|| resolver.count(), 1),
        1,
        "the resolver got the query"
    );
    // Integrity: a cgroup of the managed subtree without a policy is refused.
    assert_eq!(python_in(&stray, &stray_probe), "EPERM");
    assert_eq!(
        tcp.count(),
        1,
        "nothing of the stray cgroup reached the sink"
    );

    // allow, would_deny (L7), would_deny ×5 (tcp, tcp6, udp sendto, dns, connected udp),
    // deny (no_policy).
    let records = exactly(&agent, 8);
    let audit_phase = records.clone();
    let allows: Vec<_> = records
        .iter()
        .filter(|r| r["decision"] == "allow")
        .collect();
    assert_eq!(allows.len(), 1, "{records:#?}");
    assert_eq!(allows[0]["rule"], "read");
    let l7 = records.iter().find(|r| r["path"] == "/forbidden").unwrap();
    assert_eq!(l7["decision"], "would_deny", "{l7:#}");
    assert_eq!(l7["reason"], "path_not_allowed", "{l7:#}");
    assert_eq!(l7["status"], 200, "{l7:#}");
    let kernel: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["workload"] == "app" && r["proto"] != "http")
        .collect();
    assert_eq!(kernel.len(), 5, "{records:#?}");
    for r in &kernel {
        assert_eq!(r["decision"], "would_deny", "{r:#}");
        assert_eq!(r["cgroup"], app.as_str(), "{r:#}");
        assert!(r["pid"].as_u64().is_some_and(|p| p > 0), "{r:#}");
        assert!(r["uid"].is_u64(), "{r:#}");
    }
    assert_eq!(to(&records, tcp.addr)["proto"], "tcp");
    assert_eq!(to(&records, tcp.addr)["reason"], "port_not_allowed");
    assert_eq!(to(&records, tcp6.addr)["reason"], "port_not_allowed");
    assert_eq!(to(&records, resolver_addr)["proto"], "udp");
    assert_eq!(to(&records, resolver_addr)["reason"], "udp_not_allowed");
    let udp_records: Vec<_> = kernel
        .iter()
        .filter(|r| r["dst"]["port"] == u64::from(udp.addr.port()))
        .collect();
    assert_eq!(udp_records.len(), 2, "sendto and connect: {kernel:#?}");
    assert!(
        udp_records
            .iter()
            .all(|r| r["proto"] == "udp" && r["reason"] == "udp_not_allowed")
    );
    let denied: Vec<_> = records.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denied.len(), 1, "{records:#?}");
    assert_eq!(denied[0]["reason"], "no_policy");
    assert!(denied[0]["workload"].is_null());

    // Enforce mode from the next connect after the reload: the same probes are refused
    // with the same reasons, and nothing reaches the sinks.
    write_policy(policies.path(), &policy(&app, &upstream, "enforce"));
    reload(&agent);
    assert_eq!(http("/forbidden").0, 403);
    assert_eq!(upstream.seen().len(), 2);
    assert_eq!(
        python_in(&app, &probes),
        "tcp EPERM\ntcp6 EPERM\nudp_sendto EPERM\ndns EPERM"
    );
    assert_eq!(python_in(&stray, &stray_probe), "EPERM");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        (tcp.count(), tcp6.count(), udp.count(), resolver.count()),
        (1, 1, 2, 1)
    );
    let records = exactly(&agent, 8 + 6);
    let enforce_phase = &records[8..];
    assert!(
        enforce_phase.iter().all(|r| r["decision"] == "deny"),
        "{enforce_phase:#?}"
    );
    for addr in [tcp.addr, tcp6.addr, resolver_addr, udp.addr] {
        let enforce = to(enforce_phase, addr);
        assert_eq!(enforce["workload"], "app", "{enforce:#}");
        let audit: Vec<_> = audit_phase
            .iter()
            .filter(|r| r["workload"] == "app" && dst_is(r, addr))
            .map(|r| {
                (
                    r["decision"].clone(),
                    r["proto"].clone(),
                    r["reason"].clone(),
                )
            })
            .collect();
        let want = (
            serde_json::Value::from("would_deny"),
            enforce["proto"].clone(),
            enforce["reason"].clone(),
        );
        assert!(
            !audit.is_empty() && audit.iter().all(|a| *a == want),
            "the same reason in both modes for {addr}: {audit:?} vs {enforce:#}"
        );
    }
    let l7_enforce = enforce_phase
        .iter()
        .find(|r| r["path"] == "/forbidden")
        .unwrap();
    assert_eq!(l7_enforce["reason"], l7["reason"]);
    assert_eq!(
        enforce_phase
            .iter()
            .filter(|r| r["reason"] == "no_policy")
            .count(),
        1
    );
    // The chain of both phases verifies.
    let out = Command::new(bin())
        .args(["audit", "verify"])
        .arg(&agent.audit)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// With `dns:` granted, DNS goes to the DNS proxy in both modes; in audit mode a name the
/// policy does not allow is answered (forwarded to the resolver) and recorded `would_deny`,
/// in enforce mode it is REFUSED and never forwarded, with the same reason.
#[test]
fn audit_mode_dns_under_dns_grant_is_answered_and_recorded_would_deny() {
    privileged_test("audit_mode_dns_under_dns_grant_is_answered_and_recorded_would_deny");
    let server = DnsServer::start("127.0.97.1");
    server.set("other.test", &[Answer::addr("127.0.97.250", 60)]);
    let tree = CgroupTree::new();
    let app = tree.child("app");
    let upstream = Upstream::start("127.0.0.2");
    let with_dns = |mode: &str| format!("{}dns: system\n", policy(&app, &upstream, mode));
    let policies = policy_dir(&[("app.yaml", with_dns("audit"))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, dir.path().join("a.jsonl"));
    config.extra = vec![
        "--resolv-conf".into(),
        server.resolv_conf().display().to_string(),
    ];
    let agent = Agent::start(config);
    let dig = || {
        let out = Command::new(bin())
            .args(["exec", "--cgroup", &app, "--", "dig", "@127.0.97.1"])
            .args(["+tries=1", "+time=5", "+norec", "other.test", "A"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let queries = || {
        server
            .queries()
            .iter()
            .filter(|q| q.qname == "other.test.")
            .count()
    };

    let answer = dig();
    assert!(answer.contains("status: NOERROR"), "{answer}");
    assert!(answer.contains("127.0.97.250"), "{answer}");
    assert_eq!(queries(), 1, "forwarded to the resolver");
    let records = exactly(&agent, 1);
    assert_eq!(records[0]["proto"], "dns", "{:#}", records[0]);
    assert_eq!(records[0]["decision"], "would_deny", "{:#}", records[0]);
    assert_eq!(
        records[0]["reason"], "dns_name_not_allowed",
        "{:#}",
        records[0]
    );
    assert_eq!(records[0]["workload"], "app");

    write_policy(policies.path(), &with_dns("enforce"));
    reload(&agent);
    let answer = dig();
    assert!(answer.contains("status: REFUSED"), "{answer}");
    assert_eq!(queries(), 1, "a refused name is never forwarded");
    let records = exactly(&agent, 2);
    assert_eq!(records[1]["decision"], "deny", "{:#}", records[1]);
    assert_eq!(records[1]["reason"], records[0]["reason"]);
}
