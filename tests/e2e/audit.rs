//! The audit stream end to end: kernel-sourced records, a full disk, kill -9 mid-traffic,
//! and bursts: every decision exactly once, hash-chained, verifiable.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use scopegate_e2e::*;

fn web(managed: &str, upstream: &Upstream) -> String {
    format!(
        "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: {}\n    port: {}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n",
        upstream.addr.ip(),
        upstream.addr.port()
    )
}

fn verify(files: &[&Path]) -> (bool, String) {
    let out = Command::new(bin())
        .args(["audit", "verify"])
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A small tmpfs mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "sgtest-audit"])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs for the full-disk test failed");
        Self { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn kernel_denials_are_records_with_the_callers_pid_and_cgroup() {
    privileged_test("kernel_denials_are_records_with_the_callers_pid_and_cgroup");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let denied = TcpSink::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.clone(),
    ));
    let script = format!(
        "{PY_PRELUDE}\nimport os\nprint(os.getpid(), attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        denied.addr.port()
    );
    let out = python_in(&managed, &script);
    let (pid, result) = out.split_once(' ').unwrap();
    assert_eq!(result, "EPERM");
    let records = agent.wait_audit(1);
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r["pid"].to_string(), pid, "{r}");
    assert_eq!(r["cgroup"], managed.as_str());
    assert_eq!(r["workload"], "web");
    assert_eq!(r["proto"], "tcp");
    assert_eq!(r["reason"], "port_not_allowed");
    assert_eq!(r["dst"]["port"], denied.addr.port());
    assert!(r["exe"].is_null() || r["exe"].is_string());
    let (ok, text) = verify(&[&audit]);
    assert!(ok, "{text}");
}

#[test]
fn a_full_disk_denies_with_503_forwards_nothing_and_recovers() {
    privileged_test("a_full_disk_denies_with_503_forwards_nothing_and_recovers");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream))]);
    let pins = PinDir::new();
    let fs = Tmpfs::new("256k");
    let audit = fs.path.join("audit.jsonl");
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.clone(),
    ));
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/before")]);
    assert_eq!(status_and_body(&out).0, 200);
    assert_eq!(upstream.seen().len(), 1);
    // Fill the filesystem.
    let filler = fs.path.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    // The first request after the disk filled may still be written into the last free
    // bytes; from the moment a write fails, every request is refused with 503.
    let mut statuses = Vec::new();
    for i in 0..30 {
        let out = curl_in(
            &managed,
            &["-w", STATUS, &upstream.url(&format!("/allowed/full{i}"))],
        );
        statuses.push(status_and_body(&out));
        thread::sleep(Duration::from_millis(30));
    }
    let first_503 = statuses
        .iter()
        .position(|(s, _)| *s == 503)
        .expect("503 while the disk is full");
    // Record before forward: what was forwarded is exactly what was answered 200.
    let forwarded_while_full = upstream.seen().len() - 1;
    assert_eq!(forwarded_while_full, first_503, "{statuses:?}");
    for (status, body) in &statuses[first_503..] {
        assert_eq!(*status, 503, "{statuses:?}");
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["reason"], "audit_unavailable");
    }
    let before = upstream.seen().len();
    let out = curl_in(
        &managed,
        &["-w", STATUS, &upstream.url("/allowed/still-full")],
    );
    assert_eq!(status_and_body(&out).0, 503);
    assert_eq!(
        upstream.seen().len(),
        before,
        "nothing is forwarded while the log is down"
    );
    // Free the space: records resume by themselves.
    std::fs::remove_file(&filler).unwrap();
    let mut recovered = false;
    for _ in 0..50 {
        thread::sleep(Duration::from_millis(100));
        let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/after")]);
        if status_and_body(&out).0 == 200 {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "requests pass again once the disk has space");
    drop(agent);
    let (ok, text) = verify(&[&audit]);
    assert!(ok, "{text}");
    let records = read_jsonl(&audit);
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous seq: {seqs:?}"
    );
    // A decision refused with 503 after its record was queued is an allow decision with
    // an `audit_unavailable` outcome: not forwarded.
    let forwarded = decisions(records.clone())
        .into_iter()
        .filter(|r| r["decision"] == "allow" && r["outcome"]["reason"] != "audit_unavailable")
        .count();
    assert_eq!(
        forwarded,
        upstream.seen().len(),
        "every forwarded request has its record"
    );
    let refusals: u64 = records
        .iter()
        .filter(|r| r["reason"] == "audit_unavailable")
        .map(|r| r["count"].as_u64().unwrap_or(1))
        .sum();
    assert!(
        refusals >= 1,
        "the refusals are accounted for: {records:#?}"
    );
}

/// The paths of the allow decisions in an audit file (raw: whatever was written).
fn allowed_paths(audit: &Path) -> std::collections::HashSet<String> {
    read_jsonl(audit)
        .iter()
        .filter(|r| r["decision"] == "allow" && r["outcome_of"].is_null())
        .filter_map(|r| r["path"].as_str().map(str::to_owned))
        .collect()
}

/// Record before forward, with traffic running while the audit filesystem fills: no
/// request reaches the upstream before its decision record is written; while full, every
/// request is a 503 and nothing is forwarded; a kill -9 while full (losing whatever the
/// agent held in memory) still leaves a record for every request the upstream ever received,
/// before and after a restart on the freed disk.
#[test]
fn no_request_reaches_the_upstream_without_its_record_across_a_full_disk_and_kill_9() {
    privileged_test(
        "no_request_reaches_the_upstream_without_its_record_across_a_full_disk_and_kill_9",
    );
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    };
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream))]);
    let pins = PinDir::new();
    let fs = Tmpfs::new("320k");
    let audit = fs.path.join("audit.jsonl");
    let mut agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.clone(),
    ));
    let port = agent.port;
    // Two clients, each at most 150 requests with unique paths, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let clients: Vec<_> = (0..2)
        .map(|t| {
            let (m, stop, answers) = (managed.clone(), stop.clone(), answers.clone());
            let base = upstream.url("");
            thread::spawn(move || {
                for i in 0..150 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let path = format!("/allowed/c{t}-{i}");
                    let out = curl_in(&m, &["-w", STATUS, &format!("{base}{path}")]);
                    answers
                        .lock()
                        .unwrap()
                        .push((path, status_and_body(&out).0));
                }
            })
        })
        .collect();
    let answered = |status: u16| {
        answers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s == status)
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while answered(200) < 10 {
        assert!(std::time::Instant::now() < deadline, "no traffic passed");
        thread::sleep(Duration::from_millis(20));
    }
    // Fill the filesystem under the running traffic.
    let filler = fs.path.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=1000"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    while answered(503) < 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "no 503 while the disk is full: {:?}",
            answers.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    // While full: refused, nothing forwarded. (A request whose decision was written just
    // before the disk filled was forwarded; its response waits for its outcome record.)
    let before = upstream.seen().len();
    for i in 0..5 {
        let out = curl_in(
            &managed,
            &["-w", STATUS, &upstream.url(&format!("/allowed/full{i}"))],
        );
        let (status, body) = status_and_body(&out);
        assert_eq!(status, 503, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["reason"], "audit_unavailable");
    }
    assert_eq!(
        upstream.seen().len(),
        before,
        "forwarded while the log was full"
    );
    // kill -9 while full: what the agent held in memory is gone; the file must already
    // hold a decision for every request the upstream received.
    agent.kill9();
    for c in clients {
        c.join().unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let received: std::collections::HashSet<String> =
        upstream.seen().into_iter().map(|s| s.target).collect();
    for (path, status) in &answers {
        match status {
            200 => assert!(received.contains(path), "{path}: 200 but not received"),
            503 => assert!(!received.contains(path), "{path}: 503 but forwarded"),
            // In flight at the kill (its response held for its outcome record).
            _ => {}
        }
    }
    let written = allowed_paths(&audit);
    let missing: Vec<&String> = received.iter().filter(|p| !written.contains(*p)).collect();
    assert!(
        missing.is_empty(),
        "received upstream without a written record: {missing:?}"
    );
    // Free the space and restart: traffic passes again, the chain verifies, and still
    // every request the upstream ever received has its decision record.
    std::fs::remove_file(&filler).unwrap();
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, audit.clone());
    config.port = Some(port);
    agent = Agent::start(config);
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/after")]);
    assert_eq!(status_and_body(&out).0, 200);
    drop(agent);
    let (ok, text) = verify(&[&audit]);
    assert!(ok, "{text}");
    let written = allowed_paths(&audit);
    let received: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert!(received.len() > 10);
    let missing: Vec<&String> = received.iter().filter(|p| !written.contains(*p)).collect();
    assert!(missing.is_empty(), "{missing:?}");
}

#[test]
fn kill_9_mid_traffic_leaves_a_verifiable_chain() {
    privileged_test("kill_9_mid_traffic_leaves_a_verifiable_chain");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, audit.clone());
    let mut agent = Agent::start(config);
    let port = agent.port;
    for round in 0..3 {
        let m = managed.clone();
        let url = upstream.url("/allowed/x");
        let client = thread::spawn(move || {
            for _ in 0..40 {
                let _ = curl_in(&m, &[&url]);
            }
        });
        thread::sleep(Duration::from_millis(300 + 100 * round));
        agent.kill9();
        client.join().unwrap();
        config = AgentConfig::new(policies.path(), &tree, &pins, audit.clone());
        config.port = Some(port);
        agent = Agent::start(config);
        let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/after")]);
        assert_eq!(status_and_body(&out).0, 200);
    }
    drop(agent);
    let (ok, text) = verify(&[&audit]);
    assert!(ok, "{text}");
    let records = read_jsonl(&audit);
    let recovered = records
        .iter()
        .filter(|r| r["reason"] == "recovered_truncation")
        .count();
    assert!(
        recovered <= 3,
        "at most one recovered truncation per kill: {recovered}"
    );
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "the chain continued across restarts"
    );
}

#[test]
fn a_burst_of_n_requests_yields_exactly_n_records() {
    privileged_test("a_burst_of_n_requests_yields_exactly_n_records");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.clone(),
    ));
    // 8 threads × 50 requests, half allowed, half denied, over keep-alive connections.
    let script = format!(
        "import http.client, threading
codes = []
def run(t):
    c = http.client.HTTPConnection('127.0.0.2', {port}, timeout=10)
    for i in range(50):
        c.request('GET', ('/allowed/%d/%d' if i % 2 else '/denied/%d/%d') % (t, i))
        r = c.getresponse(); r.read(); codes.append(r.status)
ts = [threading.Thread(target=run, args=(t,)) for t in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print(len(codes), codes.count(200), codes.count(403))
",
        port = upstream.addr.port()
    );
    let out = python_in(&managed, &script);
    assert_eq!(out, "400 200 200");
    let records = agent.wait_audit(400);
    thread::sleep(Duration::from_millis(300));
    let records = if records.len() == 400 {
        agent.audit_records()
    } else {
        records
    };
    assert_eq!(records.len(), 400, "exactly one record per request");
    // The whole chain (agent_started first) is contiguous from 1.
    let all = agent.all_audit_records();
    assert_eq!(all[0]["reason"], "agent_started", "{:#}", all[0]);
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<u64>>());
    let ids: std::collections::HashSet<_> =
        records.iter().map(|r| r["request_id"].clone()).collect();
    assert_eq!(ids.len(), 400);
    assert_eq!(upstream.seen().len(), 200);
    let (ok, text) = verify(&[&audit]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("{} records", all.len())), "{text}");
}

#[test]
fn kernel_events_are_not_replayed_after_a_restart() {
    privileged_test("kernel_events_are_not_replayed_after_a_restart");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let denied = TcpSink::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.clone(),
    ));
    let probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        denied.addr.port()
    );
    assert_eq!(python_in(&managed, &probe), "EPERM");
    assert_eq!(agent.wait_audit(1).len(), 1);
    // A denial while the agent is down is delivered after the restart; the one already
    // recorded is not recorded again.
    let port = agent.port;
    agent.stop();
    assert_eq!(python_in(&managed, &probe), "EPERM");
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, audit.clone());
    config.port = Some(port);
    let agent = Agent::start(config);
    let records = agent.wait_audit(2);
    thread::sleep(Duration::from_millis(500));
    let records = if records.len() == 2 {
        agent.audit_records()
    } else {
        records
    };
    let denials = records
        .iter()
        .filter(|r| r["reason"] == "port_not_allowed")
        .count();
    assert_eq!(denials, 2, "{records:#?}");
}

#[test]
fn lifecycle_records_bracket_each_run_and_a_cut_tail_is_caught_by_the_anchor() {
    privileged_test("lifecycle_records_bracket_each_run_and_a_cut_tail_is_caught_by_the_anchor");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream))]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = || AgentConfig::new(policies.path(), &tree, &pins, audit.clone());
    let reasons = |records: &[serde_json::Value]| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["proto"] == "audit")
            .map(|r| r["reason"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let wait_for = |agent: &Agent, reason: &str, n: usize| {
        for _ in 0..200 {
            let records = agent.all_audit_records();
            if records.iter().filter(|r| r["reason"] == reason).count() >= n {
                return;
            }
            thread::sleep(Duration::from_millis(25));
        }
        panic!("no {reason} record: {:#?}", agent.all_audit_records());
    };

    // Run 1: a request, a rejected reload, an accepted reload, a clean stop.
    let mut agent = Agent::start(config());
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/1")]);
    assert_eq!(status_and_body(&out).0, 200);
    std::fs::write(policies.path().join("bad.yaml"), "workload: [\n").unwrap();
    agent.signal(libc::SIGHUP);
    wait_for(&agent, "policy_rejected", 1);
    std::fs::remove_file(policies.path().join("bad.yaml")).unwrap();
    agent.signal(libc::SIGHUP);
    wait_for(&agent, "policy_reloaded", 1);
    agent.stop();
    let run1 = read_jsonl(&audit);
    assert_eq!(run1[0]["reason"], "agent_started", "{:#}", run1[0]);
    assert!(run1[0]["clean"].is_null(), "a new chain: {:#}", run1[0]);
    // The version is the binary's own (`scopegate --version` prints `scopegate X.Y.Z`).
    let version = Command::new(bin()).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let version = version.strip_prefix("scopegate ").unwrap_or(&version);
    assert!(!version.is_empty());
    assert_eq!(run1[0]["version"], version, "{:#}", run1[0]);
    assert!(
        run1[0]["policy_hash"]
            .as_str()
            .is_some_and(|h| h.len() == 64)
    );
    let rejected = run1
        .iter()
        .find(|r| r["reason"] == "policy_rejected")
        .unwrap();
    // Each error names `…/bad.yaml:LINE:COL: message`.
    let errors = rejected["errors"].as_array().unwrap();
    assert!(!errors.is_empty(), "{rejected:#}");
    let file = policies.path().join("bad.yaml").display().to_string();
    for e in errors {
        let e = e.as_str().unwrap();
        let position = e
            .strip_prefix(&file)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|rest| rest.splitn(3, ':').collect::<Vec<_>>());
        let ok = position.is_some_and(|p| {
            p.len() == 3
                && p[..2]
                    .iter()
                    .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                && p[2].starts_with(' ')
        });
        assert!(ok, "not {file}:line:col: message: {e:?}");
    }
    assert_eq!(run1.last().unwrap()["reason"], "agent_stopping");
    assert!(audit.with_extension("jsonl.anchor").is_file());
    let (ok, text) = verify(&[&audit]);
    assert!(ok, "{text}");

    // Run 2 knows that run 1 ended cleanly; killed with a torn last line, run 3 knows that
    // run 2 did not, and records the cut tail at once (no traffic needed).
    let mut agent = Agent::start(config());
    wait_for(&agent, "agent_started", 2);
    agent.kill9();
    let torn = r#"{"seq":99,"ts":"2026-12-02T00:00:00Z","decision":"al"#;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .unwrap();
    std::io::Write::write_all(&mut file, torn.as_bytes()).unwrap();
    drop(file);
    let agent = Agent::start(config());
    wait_for(&agent, "agent_started", 3);
    let recovered: Vec<_> = agent
        .all_audit_records()
        .into_iter()
        .filter(|r| r["reason"] == "recovered_truncation")
        .collect();
    assert_eq!(
        recovered.len(),
        1,
        "{:?}",
        reasons(&agent.all_audit_records())
    );
    assert_eq!(
        recovered[0]["truncated_bytes"],
        torn.len(),
        "{:#}",
        recovered[0]
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(torn), "the torn line was cut");
    thread::sleep(Duration::from_millis(300));
    drop(agent);
    let all = read_jsonl(&audit);
    let starts: Vec<_> = all
        .iter()
        .filter(|r| r["reason"] == "agent_started")
        .map(|r| r["clean"].clone())
        .collect();
    assert_eq!(
        starts,
        [serde_json::Value::Null, true.into(), false.into()],
        "{:?}",
        reasons(&all)
    );
    let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<u64>>());
    let (ok, text) = verify(&[&audit]);
    assert!(ok, "{text}");

    // Cutting the tail after the clean stop is detected against the anchor.
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let cut = lines[..lines.len() - 2].join("\n") + "\n";
    std::fs::write(&audit, cut).unwrap();
    let (ok, text) = verify(&[&audit]);
    assert!(!ok, "a cut tail verified OK: {text}");
    assert!(
        text.contains("truncated") || text.contains("removed"),
        "{text}"
    );
}
