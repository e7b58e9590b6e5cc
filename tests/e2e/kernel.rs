//! Kernel enforcement without blind spots: every way out of a managed cgroup is either
//! proxied or denied, new cgroups are enforced from their first connect, and the pinned
//! hooks keep enforcing (fail closed) while the agent is dead or being replaced.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use scopegate_e2e::*;

/// An agent whose workload `web` (cgroup `managed`) may GET /allowed/** on the upstream.
struct Fixture {
    upstream: Upstream,
    managed: String,
    agent: Agent,
    policies: tempfile::TempDir,
    pins: PinDir,
    tree: CgroupTree,
    audit_dir: tempfile::TempDir,
}

fn policy(managed: &str, upstream: &Upstream) -> String {
    format!(
        "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n  - host: \"::1\"\n    port: {port}\n    rules:\n      - id: read6\n        methods: [GET]\n        path: /allowed/**\n",
        ip = upstream.addr.ip(),
        port = upstream.addr.port()
    )
}

impl Fixture {
    fn new() -> Self {
        let tree = CgroupTree::new();
        let managed = tree.child("managed");
        let upstream = Upstream::start("127.0.0.2");
        let policies = policy_dir(&[("web.yaml", policy(&managed, &upstream))]);
        let pins = PinDir::new();
        let audit_dir = tempfile::tempdir().unwrap();
        let agent = Agent::start(AgentConfig::new(
            policies.path(),
            &tree,
            &pins,
            audit_dir.path().join("audit.jsonl"),
        ));
        Self {
            upstream,
            managed,
            agent,
            policies,
            pins,
            tree,
            audit_dir,
        }
    }

    fn config(&self) -> AgentConfig<'_> {
        let mut config = AgentConfig::new(
            self.policies.path(),
            &self.tree,
            &self.pins,
            self.audit_dir.path().join("audit.jsonl"),
        );
        config.port = Some(self.agent.port);
        config
    }
}

#[test]
fn bypass_attempts_are_denied_or_proxied() {
    privileged_test("bypass_attempts_are_denied_or_proxied");
    let f = Fixture::new();
    let other_port = TcpSink::start("127.0.0.2");
    // Not the upstream's port (granted on ::1 too) nor the proxy's: the probe must be one
    // that the hooks refuse.
    let other_port6 = TcpSink::start_avoiding("::1", &[f.upstream.addr.port(), f.agent.port]);
    let udp = UdpSink::start("127.0.0.2");
    let udp6 = UdpSink::start("::1");
    let dns = UdpSink::start("127.0.0.53");
    let script = format!(
        "{PY_PRELUDE}
print('v4_other_port', attempt(tcp(socket.AF_INET, ('127.0.0.2', {p4}))))
print('v6_other_port', attempt(tcp(socket.AF_INET6, ('::1', {p6}))))
print('mapped_other_port', attempt(tcp(socket.AF_INET6, ('::ffff:127.0.0.2', {p4}))))
print('udp_sendto', attempt(udp_sendto(socket.AF_INET, ('127.0.0.2', {u4}))))
print('udp_connect', attempt(udp_connect(socket.AF_INET, ('127.0.0.2', {u4}))))
print('udp6_sendto', attempt(udp_sendto(socket.AF_INET6, ('::1', {u6}))))
print('udp_mapped_sendto', attempt(udp_sendto(socket.AF_INET6, ('::ffff:127.0.0.2', {u4}))))
print('dns_unlisted_resolver', attempt(udp_sendto(socket.AF_INET, ('127.0.0.53', {dns}))))
print('raw_socket', attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)))
print('raw6_socket', attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)))
",
        p4 = other_port.addr.port(),
        p6 = other_port6.addr.port(),
        u4 = udp.addr.port(),
        u6 = udp6.addr.port(),
        dns = dns.addr.port(),
    );
    let out = python_in(&f.managed, &script);
    for line in out.lines() {
        let (probe, result) = line.split_once(' ').unwrap();
        assert_eq!(result, "EPERM", "{probe}: {out}");
    }
    assert_eq!(out.lines().count(), 10, "{out}");
    // ICMP "ping" sockets: the host's net.ipv4.ping_group_range may forbid them already
    // (EACCES); open it in a private network namespace so only the hook can refuse.
    let ping = |cgroup: &str| {
        let script = format!(
            "{PY_PRELUDE}\nprint(attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)))"
        );
        let out = Command::new(bin())
            .args([
                "exec", "--cgroup", cgroup, "--", "unshare", "--net", "sh", "-c",
            ])
            .arg("sysctl -qw net.ipv4.ping_group_range='0 2147483647' && python3 -c \"$0\"")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        ping(&f.managed),
        "EPERM",
        "ping socket in the managed cgroup"
    );
    let unmanaged = f.tree.child("unmanaged");
    assert_eq!(
        ping(&unmanaged),
        "ok",
        "ping socket outside: the hook is what refused"
    );
    // The same probes from the test process itself (unmanaged) reach their targets, so the
    // targets were live and the EPERMs came from the hooks.
    std::net::TcpStream::connect(other_port.addr).unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        other_port.count(),
        1,
        "only the unmanaged probe got through"
    );
    assert_eq!(other_port6.count(), 0);
    assert_eq!((udp.count(), udp6.count(), dns.count()), (0, 0, 0));

    // Each denial is a kernel-sourced audit record with the caller's pid and cgroup.
    let records = f.agent.wait_audit(11);
    assert_eq!(records.len(), 11, "{records:#?}");
    let ping_record = records.iter().find(|r| r["proto"] == "icmp").unwrap();
    assert_eq!(ping_record["reason"], "raw_socket_not_allowed");
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| r["proto"] != "icmp")
        .collect();
    let pids: HashSet<_> = records.iter().map(|r| r["pid"].clone()).collect();
    let records: Vec<_> = records.iter().collect();
    assert_eq!(
        pids.len(),
        1,
        "one python process made every probe: {records:#?}"
    );
    for r in &records {
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["workload"], "web", "{r}");
        assert_eq!(r["cgroup"], f.managed.as_str(), "{r}");
    }
    let reasons: Vec<&str> = records
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "port_not_allowed").count(),
        3,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "udp_not_allowed").count(),
        5,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "raw_socket_not_allowed")
            .count(),
        2,
        "{reasons:?}"
    );
    let v6 = records
        .iter()
        .find(|r| r["dst"]["ip"] == "::1" && r["proto"] == "tcp")
        .unwrap();
    assert_eq!(v6["dst"]["port"], other_port6.addr.port());

    // Allowed destinations on IPv4, IPv6 and v4-mapped still work, through the proxy.
    let out = curl_in(&f.managed, &["-w", STATUS, &f.upstream.url("/allowed/x")]);
    assert_eq!(status_and_body(&out).0, 200);
    assert_eq!(f.upstream.seen().len(), 1);
}

#[test]
fn cgroups_created_after_start_are_enforced_from_their_first_connect() {
    privileged_test("cgroups_created_after_start_are_enforced_from_their_first_connect");
    let mut f = Fixture::new();
    // No rescan runs during the test: the agent never learns of the new cgroups, so the
    // kernel must apply the parent's policy itself, from each one's first connect.
    f.agent.stop();
    let mut config = f.config();
    config.rescan_secs = "3600";
    f.agent = Agent::start(config);
    let sink = TcpSink::start("127.0.0.2");
    for i in 0..20 {
        let child = format!("{}/fresh{i}/deeper", f.managed);
        let script = format!(
            "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
            sink.addr.port()
        );
        let out = python_in(&child, &script);
        assert_eq!(out, "EPERM", "child {child}");
    }
    assert_eq!(sink.count(), 0);
    // And a fresh child is proxied, decided by the parent's policy, and recorded with it.
    let child = format!("{}/late-child", f.managed);
    let out = curl_in(&child, &["-w", STATUS, &f.upstream.url("/allowed/ok")]);
    assert_eq!(status_and_body(&out).0, 200);
    let out = curl_in(&child, &["-w", STATUS, &f.upstream.url("/nope")]);
    assert_eq!(status_and_body(&out).0, 403);
    assert_eq!(f.upstream.seen().len(), 1);
    let records = f.agent.wait_audit(22);
    let http: Vec<_> = records.iter().filter(|r| r["proto"] == "http").collect();
    assert_eq!(http.len(), 2, "{records:#?}");
    assert!(http.iter().all(|r| r["workload"] == "web"));
}

#[test]
fn a_foreign_network_namespace_is_denied_with_an_event() {
    privileged_test("a_foreign_network_namespace_is_denied_with_an_event");
    let f = Fixture::new();
    // Inside a fresh network namespace (loopback up) a redirect to the host's proxy could
    // not work: the hook denies instead of letting it through or breaking silently.
    let script = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        f.upstream.addr.port()
    );
    let out = Command::new(bin())
        .args([
            "exec", "--cgroup", &f.managed, "--", "unshare", "--net", "sh", "-c",
        ])
        .arg("ip link set lo up && python3 -c \"$0\"")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "EPERM",
        "{out:?}"
    );
    let records = f.agent.wait_audit(1);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["reason"], "foreign_network_namespace");
    assert!(f.upstream.seen().is_empty());
}

/// Inode of each pinned link: BPF_LINK_UPDATE keeps the same link (and pin); a re-attach
/// would pin a new one.
fn link_inodes(pins: &PinDir) -> Vec<(String, u64)> {
    let dir = pins.0.join("v2");
    let mut out: Vec<(String, u64)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("link_"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().ino(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A load client in the managed cgroup: for `secs` seconds, as fast as it can (bounded),
/// alternate an allowed request and a connect to a denied port. It sends a canary header
/// named in `Connection`, which the proxy strips: an upstream that sees the canary was
/// reached without the proxy. Each request has its own path (`/allowed/load/N`). Prints
/// counts as JSON, with `ok_ids`: the N of every request answered 200.
/// A load client that runs until `secs` have passed or the file `stop` exists (when given).
fn load_script(upstream: &Upstream, denied: &TcpSink, secs: f64, stop: Option<&Path>) -> String {
    let stop = stop.map_or_else(String::new, |p| p.display().to_string());
    format!(
        "{PY_PRELUDE}
import json, os, time
end = time.time() + {secs}
stop = {stop:?}
c = dict(attempts=0, ok=0, refused=0, eperm=0, denied_reached=0, other=0, ok_ids=[])
while time.time() < end and c['attempts'] < 200000 and not (stop and os.path.exists(stop)):
    c['attempts'] += 1
    n = c['attempts']
    req = b'GET /allowed/load/%d HTTP/1.1\\r\\nHost: 127.0.0.2:{port}\\r\\nConnection: close, X-Canary\\r\\nX-Canary: bypass\\r\\n\\r\\n' % n
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect(('127.0.0.2', {port}))
        s.sendall(req)
        data = s.recv(64)
        if data.startswith(b'HTTP/1.1 200'):
            c['ok'] += 1
            c['ok_ids'].append(n)
        else: c['other'] += 1
    except ConnectionRefusedError: c['refused'] += 1
    except OSError: c['other'] += 1
    finally: s.close()
    r = attempt(tcp(socket.AF_INET, ('127.0.0.2', {dport}), 2))
    if r == 'EPERM': c['eperm'] += 1
    elif r == 'ok': c['denied_reached'] += 1
    else: c['other'] += 1
print(json.dumps(c))
",
        port = upstream.addr.port(),
        dport = denied.addr.port(),
    )
}

/// The load client's counts, and the ids of its requests answered 200 (taken out of the
/// counts so that assertion messages stay short).
fn load_counts(output: &str) -> (serde_json::Value, Vec<u64>) {
    let mut counts: serde_json::Value = serde_json::from_str(output).unwrap();
    let ids = counts
        .as_object_mut()
        .and_then(|o| o.remove("ok_ids"))
        .and_then(|v| serde_json::from_value(v).ok())
        .expect("the load client prints ok_ids");
    (counts, ids)
}

fn canaries(upstream: &Upstream) -> usize {
    upstream
        .seen()
        .iter()
        .filter(|s| s.headers.iter().any(|(k, _)| k == "x-canary"))
        .count()
}

#[test]
fn kill_9_and_restart_20_times_under_load_fails_closed() {
    privileged_test("kill_9_and_restart_20_times_under_load_fails_closed");
    let mut f = Fixture::new();
    let denied = TcpSink::start("127.0.0.2");
    let inodes = link_inodes(&f.pins);
    let managed = f.managed.clone();
    // The client runs until the 20 restarts are done (a stop file), bounded at 90 s: the
    // count of restarts is what the test needs, not how fast they go on a loaded machine.
    let stop_dir = tempfile::tempdir().unwrap();
    let stop = stop_dir.path().join("stop");
    let script = load_script(&f.upstream, &denied, 90.0, Some(&stop));
    let client = thread::spawn(move || python_in(&managed, &script));
    let mut restarts = 0;
    let started = Instant::now();
    while restarts < 20 && started.elapsed() < Duration::from_secs(85) {
        thread::sleep(Duration::from_millis(150));
        f.agent.kill9();
        // Dead agent: hooks pinned, nobody listening.
        thread::sleep(Duration::from_millis(100));
        f.agent = Agent::start(f.config());
        restarts += 1;
    }
    // Let the last agent serve for a moment, then stop the client.
    thread::sleep(Duration::from_millis(300));
    fs::write(&stop, "").unwrap();
    let (counts, ok_ids) = load_counts(&client.join().unwrap());
    eprintln!("chaos: {restarts} kill -9 + restarts, client counts {counts}");
    assert_eq!(restarts, 20);
    assert!(counts["attempts"].as_u64().unwrap() >= 1000, "{counts}");
    assert!(counts["ok"].as_u64().unwrap() > 0, "{counts}");
    assert!(
        counts["refused"].as_u64().unwrap() > 0,
        "the agent really was down: {counts}"
    );
    assert_eq!(counts["denied_reached"], 0, "{counts}");
    assert_eq!(denied.count(), 0, "a denied target was reached");
    assert_eq!(
        canaries(&f.upstream),
        0,
        "the upstream was reached without the proxy"
    );
    assert_eq!(
        counts["eperm"].as_u64().unwrap(),
        counts["attempts"].as_u64().unwrap(),
        "every denied connect got EPERM, agent up or down: {counts}"
    );
    // Every request that got through is in the audit: its decision record is written before
    // any byte goes upstream (record before forward), so a kill -9 loses none. A decision
    // recorded just before a kill may never have been forwarded: then it has no outcome.
    let records: Vec<serde_json::Value> = f
        .agent
        .all_audit_records()
        .into_iter()
        .filter(|r| r["proto"] != "audit")
        .collect();
    let is_outcome = |r: &serde_json::Value| r.get("outcome_of").is_some_and(|v| !v.is_null());
    let with_outcome: HashSet<String> = records
        .iter()
        .filter(|r| is_outcome(r))
        .filter_map(|r| r["request_id"].as_str().map(str::to_owned))
        .collect();
    let allowed: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["decision"] == "allow" && !is_outcome(r))
        .collect();
    let recorded: HashSet<String> = allowed
        .iter()
        .filter_map(|r| r["path"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ok_ids.len() as u64, counts["ok"].as_u64().unwrap());
    let unrecorded: Vec<_> = ok_ids
        .iter()
        .map(|n| format!("/allowed/load/{n}"))
        .filter(|p| !recorded.contains(p))
        .collect();
    let seen: HashSet<String> = f.upstream.seen().into_iter().map(|s| s.target).collect();
    let forwarded_unrecorded: Vec<&String> = seen.difference(&recorded).collect();
    let never_forwarded: Vec<&serde_json::Value> = allowed
        .iter()
        .copied()
        .filter(|r| r["path"].as_str().is_some_and(|p| !seen.contains(p)))
        .collect();
    eprintln!(
        "chaos: {} answered 200, all {} of them in the audit; upstream saw {} requests, \
         {} of them without a decision record; {} decisions recorded but not forwarded \
         (killed in between)",
        ok_ids.len(),
        ok_ids.len() - unrecorded.len(),
        seen.len(),
        forwarded_unrecorded.len(),
        never_forwarded.len()
    );
    assert!(
        unrecorded.is_empty(),
        "answered 200 but not in the audit: {unrecorded:?}"
    );
    assert!(
        forwarded_unrecorded.is_empty(),
        "requests reached the upstream without a decision record across {restarts} kills: \
         {forwarded_unrecorded:?}"
    );
    for r in &never_forwarded {
        let id = r["request_id"].as_str().unwrap_or_default();
        assert!(
            !with_outcome.contains(id),
            "a decision with an outcome record never reached the upstream: {r}"
        );
    }
    // Restarts adopted the pinned links instead of attaching new ones.
    assert_eq!(link_inodes(&f.pins), inodes);
}

#[test]
fn upgrading_swaps_programs_behind_the_pinned_links_without_a_gap() {
    privileged_test("upgrading_swaps_programs_behind_the_pinned_links_without_a_gap");
    let mut f = Fixture::new();
    let denied = TcpSink::start("127.0.0.2");
    let inodes = link_inodes(&f.pins);
    // connect4/6, sendmsg4/6, recvmsg4/6, getpeername4/6, sock_create, sock_ops.
    assert_eq!(inodes.len(), 10, "{inodes:?}");
    // Simulate an older layout's pins next to the current ones: an upgrade retires them.
    let old = f.pins.0.join("v1");
    std::fs::create_dir_all(&old).unwrap();
    let managed = f.managed.clone();
    let script = load_script(&f.upstream, &denied, 4.0, None);
    let client = thread::spawn(move || python_in(&managed, &script));
    for _ in 0..5 {
        thread::sleep(Duration::from_millis(500));
        // Graceful stop and start of the new binary: the new programs go behind the same
        // links with BPF_LINK_UPDATE.
        f.agent.stop();
        f.agent = Agent::start(f.config());
    }
    let (counts, _) = load_counts(&client.join().unwrap());
    eprintln!("upgrade: client counts {counts}");
    assert_eq!(counts["denied_reached"], 0, "{counts}");
    assert_eq!(denied.count(), 0);
    assert_eq!(canaries(&f.upstream), 0);
    assert_eq!(counts["eperm"], counts["attempts"], "{counts}");
    assert_eq!(link_inodes(&f.pins), inodes, "same links, new programs");
    assert!(!old.exists(), "older layout pins are retired");
}

#[test]
fn uninstall_removes_enforcement_deliberately() {
    privileged_test("uninstall_removes_enforcement_deliberately");
    let mut f = Fixture::new();
    let sink = TcpSink::start("127.0.0.2");
    let probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        sink.addr.port()
    );
    f.agent.kill9();
    assert_eq!(
        python_in(&f.managed, &probe),
        "EPERM",
        "still enforced with the agent dead"
    );
    let out = Command::new(bin())
        .arg("uninstall")
        .arg("--pin-dir")
        .arg(&f.pins.0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        python_in(&f.managed, &probe),
        "ok",
        "hooks detached after uninstall"
    );
    assert_eq!(sink.count(), 1);
}

#[test]
fn a_managed_subtree_denies_cgroups_without_a_policy() {
    privileged_test("a_managed_subtree_denies_cgroups_without_a_policy");
    let tree = CgroupTree::new();
    let slice = tree.child("system.slice");
    let app = tree.child("system.slice/app.service");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", policy(&app, &upstream))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, dir.path().join("a.jsonl"));
    config.extra = vec!["--managed-subtree".into(), slice.clone()];
    let agent = Agent::start(config);
    let probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        upstream.addr.port()
    );
    // A unit started after the agent, with no policy of its own: denied from its first
    // connect, even to a destination another workload may use.
    let stray = format!("{slice}/stray.service");
    assert_eq!(python_in(&stray, &probe), "EPERM");
    // Once the agent has seen the cgroup, the record names it.
    thread::sleep(Duration::from_millis(600));
    assert_eq!(python_in(&stray, &probe), "EPERM");
    let records = agent.wait_audit(2);
    assert_eq!(records.len(), 2, "{records:#?}");
    assert!(
        records
            .iter()
            .all(|r| r["reason"] == "no_policy" && r["workload"].is_null())
    );
    assert_eq!(records[1]["cgroup"], stray.as_str());
    // The workload with a policy inside the same slice is proxied as usual.
    let out = curl_in(&app, &["-w", STATUS, &upstream.url("/allowed/ok")]);
    assert_eq!(status_and_body(&out).0, 200);
    assert_eq!(upstream.seen().len(), 1);
}

/// L4 exceptions go straight through; DNS does not: every port-53 datagram of a workload
/// with `dns:` goes to the agent's DNS proxy, to the listed resolver or any other.
#[test]
fn l4_exceptions_pass_straight_through_and_dns_goes_to_the_dns_proxy() {
    privileged_test("l4_exceptions_pass_straight_through_and_dns_goes_to_the_dns_proxy");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let database = TcpSink::start("127.0.0.4");
    // The probes that must be refused avoid the upstream's (granted) port: the hooks manage
    // ports per workload, whatever the address.
    let granted = [upstream.addr.port()];
    let other_on_db_host = TcpSink::start_avoiding("127.0.0.4", &granted);
    let resolver = UdpSink::start_on("127.0.0.54:53");
    let rogue_resolver = UdpSink::start_on("127.0.0.55:53");
    let syslog = UdpSink::start_avoiding("127.0.0.4", &granted);
    let text = format!(
        "{}  - cidr: 127.0.0.4/32\n    ports: [{}]\n  - cidr: 127.0.0.4/30\n    ports: [{}]\n    protocol: udp\ndns: [127.0.0.54]\n",
        policy(&managed, &upstream),
        database.addr.port(),
        syslog.addr.port(),
    );
    let policies = policy_dir(&[("web.yaml", text)]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        dir.path().join("a.jsonl"),
    ));
    let script = format!(
        "{PY_PRELUDE}
print('db', attempt(tcp(socket.AF_INET, ('127.0.0.4', {db}))))
print('db_other_port', attempt(tcp(socket.AF_INET, ('127.0.0.4', {other}))))
print('dns_allowed', attempt(udp_sendto(socket.AF_INET, ('127.0.0.54', 53))))
print('dns_rogue', attempt(udp_sendto(socket.AF_INET, ('127.0.0.55', 53))))
print('dns_allowed_wrong_port', attempt(udp_sendto(socket.AF_INET, ('127.0.0.54', 5353))))
print('udp_exception', attempt(udp_sendto(socket.AF_INET, ('127.0.0.4', {syslog}))))
print('udp_exception_as_tcp', attempt(tcp(socket.AF_INET, ('127.0.0.4', {syslog}))))
",
        db = database.addr.port(),
        other = other_on_db_host.addr.port(),
        syslog = syslog.addr.port(),
    );
    let out = python_in(&managed, &script);
    let results: std::collections::BTreeMap<&str, &str> =
        out.lines().filter_map(|l| l.split_once(' ')).collect();
    assert_eq!(results["db"], "ok", "{out}");
    assert_eq!(results["db_other_port"], "EPERM", "{out}");
    assert_eq!(results["dns_allowed"], "ok", "{out}");
    assert_eq!(
        results["dns_rogue"], "ok",
        "redirected to the DNS proxy: {out}"
    );
    assert_eq!(results["dns_allowed_wrong_port"], "EPERM", "{out}");
    assert_eq!(results["udp_exception"], "ok", "{out}");
    assert_eq!(results["udp_exception_as_tcp"], "EPERM", "{out}");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        database.count(),
        1,
        "the L4 exception went straight to the database"
    );
    assert_eq!(other_on_db_host.count(), 0);
    assert_eq!(
        (resolver.count(), rogue_resolver.count(), syslog.count()),
        (0, 0, 1),
        "neither resolver saw the (non-DNS) datagrams: the DNS proxy did"
    );
    // Straight through means no proxy: no HTTP record, only the kernel's three denials and
    // the DNS proxy's two `dns_malformed` records (the probes' payload is not DNS).
    let records = agent.wait_audit(5);
    assert_eq!(records.len(), 5, "{records:#?}");
    assert!(records.iter().all(|r| r["decision"] == "deny"));
    let malformed = records
        .iter()
        .filter(|r| r["proto"] == "dns" && r["reason"] == "dns_malformed")
        .count();
    assert_eq!(malformed, 2, "{records:#?}");
}

/// `unshare -Urn` gives an unprivileged task CAP_NET_ADMIN in a namespace of its own, so it
/// can set the agent's SO_MARK there. The hooks check the namespace before the mark: the
/// connect is denied and recorded, not let through.
#[test]
fn the_agent_mark_set_in_a_private_user_and_network_namespace_is_not_honoured() {
    privileged_test("the_agent_mark_set_in_a_private_user_and_network_namespace_is_not_honoured");
    let f = Fixture::new();
    let script = format!(
        "{PY_PRELUDE}
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(('192.0.2.1', 8080))
listener.listen(4)
def marked(mark):
    def f():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            if mark:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            s.connect(('192.0.2.1', 8080))
        finally:
            s.close()
    return f
print('marked', attempt(marked({mark:#x})))
print('unmarked', attempt(marked(0)))
",
        mark = scopegate::run::AGENT_MARK
    );
    // Unprivileged (uid 65534, no capabilities) outside; "root" only inside its own
    // user namespace. A documentation address on the namespace's own loopback.
    let out = Command::new(bin())
        .args([
            "exec",
            "--cgroup",
            &f.managed,
            "--",
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps=-all",
            "unshare",
            "-Urn",
            "sh",
            "-c",
        ])
        .arg("ip link set lo up && ip addr add 192.0.2.1/32 dev lo && python3 -c \"$0\"")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout.trim(), "marked EPERM\nunmarked EPERM", "{out:?}");
    let records = f.agent.wait_audit(2);
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["reason"], "foreign_network_namespace", "{r}");
        assert_eq!(r["dst"]["ip"], "192.0.2.1", "{r}");
        assert_eq!(r["cgroup"], f.managed, "{r}");
    }
    assert!(f.upstream.seen().is_empty());
}

/// MPTCP would connect through kernel-made TCP subflows: refused at socket() with one
/// record each; plain TCP from the same cgroup is still proxied.
#[test]
fn mptcp_sockets_are_refused_at_socket_and_tcp_still_works() {
    privileged_test("mptcp_sockets_are_refused_at_socket_and_tcp_still_works");
    let f = Fixture::new();
    let script = format!(
        "{PY_PRELUDE}
IPPROTO_MPTCP = 262
print('mptcp4', attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)))
print('mptcp6', attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM, IPPROTO_MPTCP)))
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    print('python', 'ok')
except PermissionError:
    print('python', 'PermissionError')
print('tcp', attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()))
"
    );
    let out = python_in(&f.managed, &script);
    assert_eq!(
        out, "mptcp4 EPERM\nmptcp6 EPERM\npython PermissionError\ntcp ok",
        "{out}"
    );
    let curl = curl_in(&f.managed, &["-w", STATUS, &f.upstream.url("/allowed/x")]);
    let (status, body) = status_and_body(&curl);
    assert_eq!(status, 200, "{body} {curl:?}");
    let records = f.agent.wait_audit(4);
    assert_eq!(records.len(), 4, "{records:#?}");
    let denied: Vec<_> = records.iter().filter(|r| r["decision"] == "deny").collect();
    assert_eq!(denied.len(), 3, "{records:#?}");
    for r in denied {
        assert_eq!(r["reason"], "protocol_not_allowed", "{r}");
        assert_eq!(r["proto"], "mptcp", "{r}");
        assert_eq!(r["cgroup"], f.managed, "{r}");
    }
    assert_eq!(f.upstream.seen().len(), 1);
}

/// The agent raises its soft RLIMIT_NOFILE to the hard limit at start (as under
/// `prlimit --nofile=1024:HARD`, HARD being the test's own hard limit).
#[test]
fn the_agent_raises_its_open_file_limit_to_the_hard_limit() {
    privileged_test("the_agent_raises_its_open_file_limit_to_the_hard_limit");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", policy(&managed, &upstream))]);
    let pins = PinDir::new();
    let audit_dir = tempfile::tempdir().unwrap();
    // The soft limit of this test process is lowered (with prlimit(1) on its own pid) only
    // while the agent is spawned, which inherits it; then it is restored.
    let nofile = |pid: u32| -> (String, String) {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .to_owned();
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields[3].to_owned(), fields[4].to_owned())
    };
    let me = std::process::id();
    let (saved_soft, saved_hard) = nofile(me);
    // The hard limit stays (raising it needs CAP_SYS_RESOURCE); it must be above 1024.
    let hard: u64 = saved_hard.parse().unwrap();
    assert!(
        hard > 1024,
        "hard RLIMIT_NOFILE {hard} leaves nothing to raise"
    );
    let prlimit = |soft: &str, hard: u64| {
        let status = Command::new("prlimit")
            .arg("--pid")
            .arg(me.to_string())
            .arg(format!("--nofile={soft}:{hard}"))
            .status()
            .unwrap();
        assert!(status.success(), "prlimit failed");
    };
    prlimit("1024", hard);
    assert_eq!(nofile(me).0, "1024");
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit_dir.path().join("audit.jsonl"),
    ));
    prlimit(&saved_soft, hard);
    let (soft, agent_hard) = nofile(agent.pid());
    assert_eq!(agent_hard, hard.to_string());
    assert_eq!(soft, agent_hard, "soft limit not raised");
    assert!(
        agent
            .stderr()
            .iter()
            .any(|l| l.contains("raised RLIMIT_NOFILE") && l.contains("1024")),
        "{:?}",
        agent.stderr()
    );
}

/// A keep-alive connection opened before its cgroup was managed was never decided: when the
/// agent starts and manages the cgroup, the connection is destroyed (SOCK_DESTROY) and
/// recorded. A connection of an unmanaged sibling cgroup stays up.
/// A Python client in `cgroup` that opens a keep-alive connection to `upstream`, makes one
/// request, says `connected`, then on a line on stdin waits up to `timeout` seconds for the
/// connection and reports `reset`, `eof`, `data` or `alive`.
struct HeldConnection {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl HeldConnection {
    fn open(cgroup: &str, upstream: &Upstream, timeout: &str) -> Self {
        use std::io::BufRead as _;
        let script = format!(
            "
import socket, sys
s = socket.create_connection(('{ip}', {port}), timeout=5)
s.sendall(b'GET /allowed/before HTTP/1.1\\r\\nHost: {ip}\\r\\n\\r\\n')
assert s.recv(4096).startswith(b'HTTP/1.1 200')
print('connected', flush=True)
sys.stdin.readline()
s.settimeout(float(sys.argv[1]))
try:
    print('eof' if s.recv(100) == b'' else 'data', flush=True)
except (ConnectionResetError, ConnectionAbortedError):
    print('reset', flush=True)
except socket.timeout:
    print('alive', flush=True)
",
            ip = upstream.addr.ip(),
            port = upstream.addr.port()
        );
        let mut child = Command::new(bin())
            .args([
                "exec", "--cgroup", cgroup, "--", "python3", "-c", &script, timeout,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "connected");
        Self { child, out }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the connection saw after the go line.
    fn result(mut self) -> String {
        use std::io::{BufRead as _, Write as _};
        self.child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let _ = self.child.wait();
        line.trim().to_owned()
    }
}

/// Asserts `r` is the cut record of `pid`'s connection from `cgroup` (workload
/// `workload`) to `upstream`.
fn assert_cut_record(
    r: &serde_json::Value,
    cgroup: &str,
    workload: &str,
    pid: u32,
    upstream: &Upstream,
) {
    assert_eq!(r["decision"], "deny", "{r}");
    assert_eq!(r["reason"], "preexisting_connection_cut", "{r}");
    assert_eq!(r["cgroup"], cgroup, "{r}");
    assert_eq!(r["workload"], workload, "{r}");
    assert_eq!(r["pid"], pid, "{r}");
    assert_eq!(r["dst"]["ip"], upstream.addr.ip().to_string(), "{r}");
    assert_eq!(r["dst"]["port"], upstream.addr.port(), "{r}");
}

#[test]
fn connections_opened_before_the_cgroup_was_managed_are_cut() {
    privileged_test("connections_opened_before_the_cgroup_was_managed_are_cut");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let other = tree.child("other");
    let upstream = Upstream::start("127.0.0.2");
    let victim = HeldConnection::open(&managed, &upstream, "5");
    let bystander = HeldConnection::open(&other, &upstream, "1");
    let policies = policy_dir(&[("web.yaml", policy(&managed, &upstream))]);
    let pins = PinDir::new();
    let audit_dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit_dir.path().join("audit.jsonl"),
    ));
    let records = agent.wait_audit(1);
    let victim_pid = victim.pid();
    let victim_saw = victim.result();
    let bystander_saw = bystander.result();
    assert!(
        victim_saw == "reset" || victim_saw == "eof",
        "the managed connection survived: {victim_saw}"
    );
    assert_eq!(bystander_saw, "alive", "an unmanaged connection was cut");
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_cut_record(&records[0], &managed, "web", victim_pid, &upstream);
    // Only the request from before; nothing after.
    assert_eq!(upstream.seen().len(), 2, "{:?}", upstream.seen().len());
}

/// A cgroup that becomes managed by a reload (a policy file added while the agent runs,
/// then SIGHUP): its live keep-alive connection to an upstream its new policy forbids is
/// cut and recorded, and it cannot connect there again.
#[test]
fn a_reload_that_manages_a_cgroup_cuts_its_live_connections() {
    privileged_test("a_reload_that_manages_a_cgroup_cuts_its_live_connections");
    let tree = CgroupTree::new();
    let web = tree.child("web");
    let late = tree.child("late");
    let allowed = Upstream::start("127.0.0.2");
    let forbidden = Upstream::start("127.0.0.3");
    let policies = policy_dir(&[("web.yaml", policy(&web, &allowed))]);
    let pins = PinDir::new();
    let audit_dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit_dir.path().join("audit.jsonl"),
    ));
    // `late` is not managed yet: its keep-alive connection to the forbidden upstream works.
    let victim = HeldConnection::open(&late, &forbidden, "5");
    let victim_pid = victim.pid();
    assert_eq!(forbidden.seen().len(), 1);
    // A policy for `late` that names only the allowed upstream, then a reload.
    let text = policy(&late, &allowed).replace("workload: web", "workload: late");
    fs::write(policies.path().join("late.yaml"), text).unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    let cut = loop {
        let cut: Vec<_> = agent
            .audit_records()
            .into_iter()
            .filter(|r| r["reason"] == "preexisting_connection_cut")
            .collect();
        if !cut.is_empty() || Instant::now() > deadline {
            break cut;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(cut.len(), 1, "{:#?}", agent.all_audit_records());
    assert_cut_record(&cut[0], &late, "late", victim_pid, &forbidden);
    let saw = victim.result();
    assert!(
        saw == "reset" || saw == "eof",
        "the connection survived: {saw}"
    );
    assert!(
        agent
            .all_audit_records()
            .iter()
            .any(|r| r["reason"] == "policy_reloaded"),
        "the reload is recorded"
    );
    assert!(
        !agent
            .all_audit_records()
            .iter()
            .any(|r| r["reason"] == "preexisting_connection_cut_failed"),
        "{:#?}",
        agent.all_audit_records()
    );
    // Managed now: a new connect to the forbidden upstream is refused in the kernel.
    let probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.3', {}))))",
        forbidden.addr.port()
    );
    assert_eq!(python_in(&late, &probe), "EPERM");
    assert_eq!(
        forbidden.seen().len(),
        1,
        "nothing reached it after the cut"
    );
}
