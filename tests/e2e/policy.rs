//! Policy reload end to end: the policy directory is edited while a managed workload keeps
//! sending requests through the kernel redirect.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{fs, path::Path, thread, time::Duration};

use scopegate_e2e::*;

fn web(managed: &str, upstream: &Upstream, version: u32, extra_rules: &str) -> String {
    format!(
        "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read-v{version}\n        methods: [GET]\n        path: /allowed/**\n{extra_rules}",
        ip = upstream.addr.ip(),
        port = upstream.addr.port()
    )
}

/// Writes `text` to `dir/name` the way editors do: a temporary file renamed over the old.
fn atomic_write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A keep-alive client in the managed cgroup: `n` GETs of /allowed/x over one connection
/// (reconnecting only if the server closes), then prints status counts as JSON.
fn steady_client(upstream: &Upstream, n: usize) -> String {
    format!(
        "import http.client, json, time
c = {{}}
conn = http.client.HTTPConnection('127.0.0.2', {port}, timeout=5)
for i in range({n}):
    try:
        conn.request('GET', '/allowed/x?i=%d' % i)
        r = conn.getresponse(); r.read()
        c[str(r.status)] = c.get(str(r.status), 0) + 1
    except Exception as e:
        c['error'] = c.get('error', 0) + 1
        conn = http.client.HTTPConnection('127.0.0.2', {port}, timeout=5)
    time.sleep(0.002)
print(json.dumps(c))
",
        port = upstream.addr.port()
    )
}

#[test]
fn reload_under_steady_traffic_loses_nothing_and_applies_atomically() {
    privileged_test("reload_under_steady_traffic_loses_nothing_and_applies_atomically");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream, 0, ""))]);
    let pins = PinDir::new();
    let audit = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.path().join("audit.jsonl"),
    ));
    let script = steady_client(&upstream, 600);
    let m = managed.clone();
    let client = thread::spawn(move || python_in(&m, &script));
    for version in 1..=10 {
        thread::sleep(Duration::from_millis(150));
        // Every version allows /allowed/**; odd versions also allow /extra.
        let extra = if version % 2 == 1 {
            "      - id: extra\n        methods: [GET]\n        path: /extra\n"
        } else {
            ""
        };
        atomic_write(
            policies.path(),
            "web.yaml",
            &web(&managed, &upstream, version, extra),
        );
    }
    let counts: serde_json::Value = serde_json::from_str(&client.join().unwrap()).unwrap();
    eprintln!("steady client: {counts}");
    assert_eq!(
        counts["200"], 600,
        "no request failed because of a reload: {counts}"
    );
    let records = agent.wait_audit(600);
    assert_eq!(records.len(), 600);
    let versions: std::collections::BTreeSet<String> = records
        .iter()
        .map(|r| r["rule"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        versions.len() >= 3,
        "reloads were applied mid-stream: {versions:?}"
    );
    // Rule ids go up monotonically: each request saw one whole snapshot, never an old one
    // after a newer one.
    let seq: Vec<u32> = records
        .iter()
        .map(|r| r["rule"].as_str().unwrap()[6..].parse().unwrap())
        .collect();
    assert!(seq.windows(2).all(|w| w[0] <= w[1]), "{seq:?}");
    // The last version (10) has no /extra rule.
    thread::sleep(Duration::from_millis(400));
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/extra")]);
    assert_eq!(status_and_body(&out).0, 403);
}

#[test]
fn an_invalid_policy_written_during_traffic_keeps_the_old_one() {
    privileged_test("an_invalid_policy_written_during_traffic_keeps_the_old_one");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let policies = policy_dir(&[("web.yaml", web(&managed, &upstream, 1, ""))]);
    let pins = PinDir::new();
    let audit = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.path().join("audit.jsonl"),
    ));
    let script = steady_client(&upstream, 200);
    let m = managed.clone();
    let client = thread::spawn(move || python_in(&m, &script));
    thread::sleep(Duration::from_millis(200));
    atomic_write(
        policies.path(),
        "web.yaml",
        &format!("{}    bogus_field: 1\n", web(&managed, &upstream, 2, "")),
    );
    let counts: serde_json::Value = serde_json::from_str(&client.join().unwrap()).unwrap();
    assert_eq!(counts["200"], 200, "{counts}");
    let records = agent.wait_audit(200);
    assert!(
        records.iter().all(|r| r["rule"] == "read-v1"),
        "the old policy stayed"
    );
    let log = agent.stderr().join("\n");
    assert!(log.contains("web.yaml:"), "the error names the file: {log}");
    assert!(log.contains("bogus_field"), "{log}");
    assert!(log.contains("keeping the last good policy"), "{log}");
    // Fixing the file is picked up.
    atomic_write(
        policies.path(),
        "web.yaml",
        &web(&managed, &upstream, 3, ""),
    );
    thread::sleep(Duration::from_millis(500));
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/y")]);
    assert_eq!(status_and_body(&out).0, 200);
    let records = agent.wait_audit(201);
    assert_eq!(records.last().unwrap()["rule"], "read-v3");
}

#[test]
fn a_symlink_swap_of_the_policy_directory_is_picked_up() {
    privileged_test("a_symlink_swap_of_the_policy_directory_is_picked_up");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("rev-a"), root.path().join("rev-b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    fs::write(a.join("web.yaml"), web(&managed, &upstream, 1, "")).unwrap();
    fs::write(b.join("web.yaml"), web(&managed, &upstream, 2, "")).unwrap();
    let link = root.path().join("current");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let pins = PinDir::new();
    let agent = Agent::start(AgentConfig::new(
        &link,
        &tree,
        &pins,
        root.path().join("audit.jsonl"),
    ));
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/1")]);
    assert_eq!(status_and_body(&out).0, 200);
    // Swap: a new symlink renamed over the old one (`ln -sfn` semantics, atomic).
    let tmp = root.path().join("current.tmp");
    std::os::unix::fs::symlink(&b, &tmp).unwrap();
    fs::rename(&tmp, &link).unwrap();
    thread::sleep(Duration::from_millis(600));
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/2")]);
    assert_eq!(status_and_body(&out).0, 200);
    let records = agent.wait_audit(2);
    assert_eq!(records[0]["rule"], "read-v1");
    assert_eq!(records[1]["rule"], "read-v2");
}
