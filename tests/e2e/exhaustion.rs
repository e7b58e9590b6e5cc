//! Fail closed under exhaustion: the agent at a low descriptor limit (`prlimit`), one
//! workload holding thousands of slow connections, and every other workload stays
//! enforced (403 / EPERM, recorded); the slow connections are refused over the cap or
//! closed by the header timeout, each with one record; the control plane (cgroup scan,
//! policy reload) keeps working because proxied connections never use its reserve.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use scopegate_e2e::*;

fn policy(name: &str, cgroup: &str, upstream: &Upstream, extra: &str) -> String {
    format!(
        "workload: {name}\nselect:\n  cgroup: {cgroup}\n{extra}egress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n",
        ip = upstream.addr.ip(),
        port = upstream.addr.port()
    )
}

/// A python client in `cgroup` that opens `n` connections to `port` on 127.0.0.2, sends
/// the start of a request head on each (enough to be recognised as HTTP/1) and holds them until the other side closes them (at most
/// 60 s). Prints `connected C failed F` once all are open, then `closed X open Y`.
fn slow_clients(
    cgroup: &str,
    port: u16,
    n: usize,
) -> (Child, BufReader<std::process::ChildStdout>) {
    let script = format!(
        r#"
import resource, select, socket, time
resource.setrlimit(resource.RLIMIT_NOFILE, ({n} + 256, {n} + 256))
socks, failed = [], 0
for i in range({n}):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect(("127.0.0.2", {port}))
        try:
            s.send(b"GET /allowed/slow HTTP/1.1\r\nHost: x")
        except OSError:
            pass
        socks.append(s)
    except OSError:
        failed += 1
        s.close()
print("connected", len(socks), "failed", failed, flush=True)
poll, live = select.poll(), {{}}
for s in socks:
    poll.register(s, select.POLLIN | select.POLLERR | select.POLLHUP)
    live[s.fileno()] = s
closed, deadline = 0, time.time() + 60
while live and time.time() < deadline:
    for fd, _ in poll.poll(500):
        s = live.get(fd)
        if s is None:
            continue
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        if not data:
            poll.unregister(fd)
            del live[fd]
            s.close()
            closed += 1
print("closed", closed, "open", len(live), flush=True)
"#
    );
    let mut child = Command::new(bin())
        .args(["exec", "--cgroup", cgroup, "--", "python3", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// Reads one `word A word B` line.
fn counts(out: &mut BufReader<std::process::ChildStdout>, first: &str) -> (usize, usize) {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.len(), 4, "{line:?}");
    assert_eq!(words[0], first, "{line:?}");
    (words[1].parse().unwrap(), words[3].parse().unwrap())
}

fn records_of(audit: &Path, workload: &str, reasons: &[&str]) -> usize {
    decisions(read_jsonl(audit))
        .iter()
        .filter(|r| r["workload"] == workload && reasons.iter().any(|x| r["reason"] == *x))
        .count()
}

/// Waits (up to 20 s) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "not within 20 s: {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Workload `b` is enforced: allowed 200, forbidden 403 with a record, a port without a
/// destination EPERM with a record; nothing forbidden reaches the upstream.
fn assert_b_enforced(b: &str, upstream: &Upstream, sink: &TcpSink, audit: &Path) {
    let out = curl_in(b, &["-w", STATUS, &upstream.url("/forbidden")]);
    assert_eq!(status_and_body(&out).0, 403, "{out:?}");
    let probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        sink.addr.port()
    );
    assert_eq!(python_in(b, &probe), "EPERM");
    assert!(upstream.seen().iter().all(|s| s.target != "/forbidden"));
    assert_eq!(sink.count(), 0);
    eventually("b's deny records", || {
        records_of(audit, "b", &["port_not_allowed"]) >= 1
            && decisions(read_jsonl(audit))
                .iter()
                .any(|r| r["workload"] == "b" && r["status"] == 403)
    });
}

#[test]
fn a_workload_holding_2000_slow_connections_does_not_open_the_others() {
    privileged_test("a_workload_holding_2000_slow_connections_does_not_open_the_others");
    let tree = CgroupTree::new();
    let a = tree.child("a");
    let b = tree.child("b");
    let upstream = Upstream::start("127.0.0.2");
    let sink = TcpSink::start("127.0.0.2");
    let policies = policy_dir(&[
        (
            "a.yaml",
            policy("a", &a, &upstream, "max_connections: 200\n"),
        ),
        ("b.yaml", policy("b", &b, &upstream, "")),
    ]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, dir.path().join("a.jsonl"));
    config.wrapper = ["prlimit", "--nofile=1024:1024", "--"]
        .map(String::from)
        .to_vec();
    config.extra = vec!["--header-timeout-secs".into(), "6".into()];
    let agent = Agent::start(config);
    let (mut child, mut out) = slow_clients(&a, upstream.addr.port(), 2000);
    let (connected, failed) = counts(&mut out, "connected");
    assert_eq!(connected + failed, 2000);
    assert!(
        connected > 1000,
        "the proxy accepted and answered: {connected}"
    );
    // While `a` holds its slots, `b` is enforced as before.
    assert_b_enforced(&b, &upstream, &sink, &agent.audit);
    let out200 = curl_in(&b, &["-w", STATUS, &upstream.url("/allowed/b")]);
    assert_eq!(status_and_body(&out200).0, 200, "{out200:?}");
    // Every slow connection is closed by the proxy: refused over the cap, or by the
    // header timeout; none stays open.
    let (closed, open) = counts(&mut out, "closed");
    assert_eq!((closed, open), (connected, 0));
    child.wait().unwrap();
    let refused = records_of(&agent.audit, "a", &["connection_limit"]);
    assert!(refused >= 1, "the cap refused the excess with records");
    // One record per connection of `a`: refused by the cap, or closed for its slow head.
    let histogram = || {
        let mut h = std::collections::BTreeMap::<String, usize>::new();
        for r in decisions(read_jsonl(&agent.audit)) {
            *h.entry(format!("{} {}", r["workload"], r["reason"]))
                .or_default() += 1;
        }
        format!("{connected} connected; records: {h:?}")
    };
    let per_connection = || {
        records_of(
            &agent.audit,
            "a",
            &["connection_limit", "header_timeout", "detect_timeout"],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while per_connection() < connected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    // Every connection the proxy saw has its record (a connect python saw fail may still
    // have reached the proxy, hence the range).
    let n = per_connection();
    assert!((connected..=2000).contains(&n), "{}", histogram());
    assert!(
        records_of(&agent.audit, "a", &["header_timeout"]) >= 1,
        "held heads are closed by the header timeout: {}",
        histogram()
    );
    assert!(
        upstream.seen().iter().all(|s| s.target == "/allowed/b"),
        "no slow request reached the upstream"
    );
}

#[test]
fn at_the_descriptor_limit_the_control_plane_keeps_enforcing() {
    privileged_test("at_the_descriptor_limit_the_control_plane_keeps_enforcing");
    let tree = CgroupTree::new();
    let a = tree.child("a");
    let b = tree.child("b");
    let upstream = Upstream::start("127.0.0.2");
    let sink = TcpSink::start("127.0.0.2");
    let policies = policy_dir(&[
        ("a.yaml", policy("a", &a, &upstream, "")),
        ("b.yaml", policy("b", &b, &upstream, "")),
    ]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, dir.path().join("a.jsonl"));
    // 200 descriptors: (200 - 128) / 2 = 36 proxied connections, the rest is reserved.
    config.wrapper = ["prlimit", "--nofile=200:200", "--"]
        .map(String::from)
        .to_vec();
    config.extra = vec!["--header-timeout-secs".into(), "8".into()];
    let agent = Agent::start(config);
    let (mut child, mut out) = slow_clients(&a, upstream.addr.port(), 300);
    let (connected, failed) = counts(&mut out, "connected");
    assert_eq!(connected + failed, 300);
    // Under that pressure a new workload appears: a new cgroup and its policy file. The
    // reload and the scan still run (they have their reserve), so it is enforced in the
    // kernel at once.
    let c = tree.child("c");
    let probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        sink.addr.port()
    );
    fs::write(
        policies.path().join("c.yaml"),
        policy("c", &c, &upstream, ""),
    )
    .unwrap();
    eventually("the new policy is loaded", || {
        read_jsonl(&agent.audit)
            .iter()
            .any(|r| r["reason"] == "policy_reloaded")
    });
    eventually("c is managed", || python_in(&c, &probe) == "EPERM");
    assert_eq!(python_in(&b, &probe), "EPERM");
    // `b` asks while every proxied slot is taken: refused (reset, recorded) or 403,
    // never forwarded.
    let out_b = curl_in(&b, &["-w", STATUS, &upstream.url("/forbidden")]);
    let status = status_and_body(&out_b).0;
    assert!(status == 403 || status == 0, "{out_b:?}");
    assert_eq!(sink.count(), 0);
    assert!(upstream.seen().is_empty(), "nothing was forwarded");
    let (closed, open) = counts(&mut out, "closed");
    assert_eq!((closed, open), (connected, 0));
    child.wait().unwrap();
    assert!(
        records_of(&agent.audit, "a", &["descriptor_limit"]) >= 1,
        "the budget refused the excess with records"
    );
    // Pressure gone: everything is enforced as before, nothing was un-managed.
    assert_b_enforced(&b, &upstream, &sink, &agent.audit);
    let out_c = curl_in(&c, &["-w", STATUS, &upstream.url("/forbidden")]);
    assert_eq!(status_and_body(&out_c).0, 403, "{out_c:?}");
    assert!(upstream.seen().is_empty());
    assert!(
        !agent
            .stderr()
            .iter()
            .any(|l| l.contains("Too many open files")),
        "the agent never ran out of descriptors"
    );
    // The reserve kept every cgroup scan whole: no scan error was recorded (one would be
    // a `cgroup_scan_incomplete` record, see workloads::ScanIncidents).
    let scan_records: Vec<_> = read_jsonl(&agent.audit)
        .into_iter()
        .filter(|r| r["reason"] == "cgroup_scan_incomplete")
        .collect();
    assert!(scan_records.is_empty(), "{scan_records:#?}");
}
