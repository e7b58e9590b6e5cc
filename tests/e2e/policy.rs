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
    // An edit inside the NEW target is seen too (the watch follows the swap), and an edit
    // inside the old one, no longer current, changes nothing.
    atomic_write(&b, "web.yaml", &web(&managed, &upstream, 3, ""));
    thread::sleep(Duration::from_millis(600));
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/3")]);
    assert_eq!(status_and_body(&out).0, 200);
    atomic_write(&a, "web.yaml", &web(&managed, &upstream, 4, ""));
    thread::sleep(Duration::from_millis(600));
    let out = curl_in(&managed, &["-w", STATUS, &upstream.url("/allowed/4")]);
    assert_eq!(status_and_body(&out).0, 200);
    let records = agent.wait_audit(4);
    let rules: Vec<_> = records.iter().map(|r| r["rule"].clone()).collect();
    assert_eq!(rules, ["read-v1", "read-v2", "read-v3", "read-v3"]);
}

/// The full matcher set through the real redirect: canonical paths, query and header
/// constraints, JSON body constraints and caps, rate limits, and audit mode.
#[test]
fn l7_matchers_rate_limits_and_audit_mode_end_to_end() {
    privileged_test("l7_matchers_rate_limits_and_audit_mode_end_to_end");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let observed = tree.child("observed");
    let upstream = Upstream::start("127.0.0.2");
    let (ip, port) = (upstream.addr.ip(), upstream.addr.port());
    let enforce = format!(
        r#"workload: api
select:
  cgroup: {managed}
body_cap: 1024
egress:
  - host: {ip}
    port: {port}
    rules:
      - id: read-item
        methods: [GET]
        path: /items/{{id:[0-9]+}}
        query:
          expand: absent
          fields: {{ one_of: [name, price] }}
      - id: create-charge
        methods: [POST]
        path: /charges
        headers:
          x-tenant: {{ pattern: "^[a-z]+$" }}
        json:
          - {{ field: currency, one_of: [usd, eur] }}
          - {{ field: amount, max: 1000 }}
      - id: limited
        methods: [GET]
        path: /limited
        rate: 3/minute
"#
    );
    let audit_mode = format!(
        "workload: observed\nmode: audit\nselect:\n  cgroup: {observed}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read-only\n        methods: [GET]\n        path: /items/**\n"
    );
    let policies = policy_dir(&[("api.yaml", enforce), ("observed.yaml", audit_mode)]);
    let pins = PinDir::new();
    let audit = tempfile::tempdir().unwrap();
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.path().join("audit.jsonl"),
    ));
    let url = |p: &str| upstream.url(p);
    let status = |cgroup: &str, args: &[&str]| {
        let mut all = vec!["-w", STATUS];
        all.extend_from_slice(args);
        let out = curl_in(cgroup, &all);
        status_and_body(&out)
    };
    // (expected status, expected reason or rule, curl args)
    let charge = url("/charges");
    let cases: Vec<(u16, &str, Vec<String>)> = vec![
        (200, "read-item", vec![url("/items/42?fields=name")]),
        (200, "read-item", vec![url("/%69tems/42?fields=price")]),
        // A trailing slash is part of the path: /items/{id} does not match /items/7/.
        (403, "path_not_allowed", vec![url("/items/7/?fields=name")]),
        (403, "path_not_allowed", vec![url("/items/abc")]),
        (
            403,
            "path_not_allowed",
            vec!["--path-as-is".into(), url("/items/%2e%2e/42")],
        ),
        (400, "", vec![url("/items%2f42")]),
        (
            403,
            "query_param_not_allowed",
            vec![url("/items/42?debug=1")],
        ),
        (
            403,
            "query_value_not_allowed",
            vec![url("/items/42?fields=secret")],
        ),
        (
            403,
            "query_param_repeated",
            vec![url("/items/42?fields=name&fields=price")],
        ),
        (
            403,
            "query_param_not_allowed",
            vec![url("/items/42?expand=all")],
        ),
        (
            200,
            "create-charge",
            vec![
                "-H".into(),
                "x-tenant: acme".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                r#"{"currency":"usd","amount":10}"#.into(),
                charge.clone(),
            ],
        ),
        (
            403,
            "json_constraint_failed",
            vec![
                "-H".into(),
                "x-tenant: acme".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                r#"{"currency":"gbp","amount":10}"#.into(),
                charge.clone(),
            ],
        ),
        (
            403,
            "json_constraint_failed",
            vec![
                "-H".into(),
                "x-tenant: acme".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                r#"{"currency":"usd","amount":5000}"#.into(),
                charge.clone(),
            ],
        ),
        (
            400,
            "duplicate_json_key",
            vec![
                "-H".into(),
                "x-tenant: acme".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                r#"{"currency":"usd","amount":1,"amount":9999}"#.into(),
                charge.clone(),
            ],
        ),
        (
            400,
            "invalid_json",
            vec![
                "-H".into(),
                "x-tenant: acme".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                "{not json".into(),
                charge.clone(),
            ],
        ),
        (
            415,
            "unsupported_media_type",
            vec![
                "-H".into(),
                "x-tenant: acme".into(),
                "-H".into(),
                "content-type: text/plain".into(),
                "-d".into(),
                "hello".into(),
                charge.clone(),
            ],
        ),
        (
            413,
            "body_too_large",
            vec![
                "-H".into(),
                "x-tenant: acme".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                format!(r#"{{"currency":"usd","pad":"{}"}}"#, "x".repeat(2000)),
                charge.clone(),
            ],
        ),
        (
            403,
            "header_not_allowed",
            vec![
                "-H".into(),
                "x-tenant: ACME".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                r#"{"currency":"usd","amount":1}"#.into(),
                charge.clone(),
            ],
        ),
        (
            403,
            "duplicate_header",
            vec![
                "-H".into(),
                "x-tenant: acme".into(),
                "-H".into(),
                "x-tenant: evil".into(),
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                r#"{"currency":"usd","amount":1}"#.into(),
                charge.clone(),
            ],
        ),
    ];
    let mut forwarded = 0;
    for (i, (want, what, args)) in cases.iter().enumerate() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (got, body) = status(&managed, &args);
        assert_eq!(got, *want, "case {i} {args:?}: {body}");
        if *want == 200 {
            forwarded += 1;
        } else if !what.is_empty() {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(json["reason"], *what, "case {i}: {json}");
        }
    }
    assert_eq!(
        upstream.seen().len(),
        forwarded,
        "only allowed requests reach the upstream"
    );
    // The canonical form is what is forwarded.
    assert!(
        upstream
            .seen()
            .iter()
            .any(|s| s.target == "/items/42?fields=price"),
        "{:?}",
        upstream.seen()
    );
    assert!(
        !upstream
            .seen()
            .iter()
            .any(|s| s.target.starts_with("/items/7")),
        "/items/7/ is not /items/7: {:?}",
        upstream.seen()
    );

    // Rate limit: 3 per minute; /limited, /./limited and /%6cimited share one bucket
    // (/limited/ is another path, which the rule does not match).
    let mut codes = Vec::new();
    for p in ["/limited", "/./limited", "/%6cimited", "/limited"] {
        let out = curl_in(&managed, &["-i", &url(p)]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        codes.push(text.split_whitespace().nth(1).unwrap_or("").to_owned());
        if codes.len() == 4 {
            assert!(text.to_ascii_lowercase().contains("retry-after:"), "{text}");
        }
    }
    assert_eq!(codes, ["200", "200", "200", "429"]);

    // Audit mode: a request the policy would deny passes and is recorded as would_deny.
    let (got, body) = status(&observed, &["-X", "DELETE", &url("/items/1")]);
    assert_eq!(got, 200, "{body}");
    let before = upstream.seen().len();
    let (got, _) = status(&observed, &[&url("/items/1")]);
    assert_eq!(got, 200);
    assert_eq!(upstream.seen().len(), before + 1);
    let records = agent.wait_audit(cases.len() + 4 + 2);
    let observed_records: Vec<_> = records
        .iter()
        .filter(|r| r["workload"] == "observed")
        .collect();
    assert_eq!(observed_records.len(), 2);
    assert_eq!(observed_records[0]["decision"], "would_deny");
    assert_eq!(observed_records[0]["reason"], "method_not_allowed");
    assert_eq!(observed_records[0]["status"], 200);
    assert_eq!(observed_records[1]["decision"], "allow");
    assert_eq!(
        records.len(),
        cases.len() + 4 + 2,
        "one record per decision"
    );
}

/// The least-privilege loop through the real redirect: a workload in audit mode runs a
/// script (nothing is refused, refusals are recorded as `would_deny`); the real `scopegate
/// policy suggest` turns the agent's audit file into a policy, which passes `policy check`;
/// put in place of the audit-mode policy, the agent enforces it: the same script is
/// allowed, other requests to the same upstream are denied.
#[test]
fn audit_records_become_a_suggested_policy_that_enforces_the_same_script() {
    privileged_test("audit_records_become_a_suggested_policy_that_enforces_the_same_script");
    let tree = CgroupTree::new();
    let app = tree.child("app");
    let upstream = Upstream::start("127.0.0.2");
    let (ip, port) = (upstream.addr.ip(), upstream.addr.port());
    let observe = format!(
        "workload: app\nmode: audit\nselect:\n  cgroup: {app}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: nothing-yet\n        methods: [GET]\n        path: /never\n"
    );
    let policies = policy_dir(&[("app.yaml", observe)]);
    let pins = PinDir::new();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.clone(),
    ));
    let url = |p: &str| upstream.url(p);
    let status = |args: &[String]| {
        let mut all = vec!["-w".to_owned(), STATUS.to_owned()];
        all.extend_from_slice(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        status_and_body(&curl_in(&app, &all)).0
    };
    let script: Vec<Vec<String>> = vec![
        vec![url("/v1/items/42?fields=name")],
        vec![url("/v1/items/1337?fields=price")],
        vec![
            "-X".into(),
            "POST".into(),
            "-d".into(),
            "x=1".into(),
            url("/v1/orders"),
        ],
        vec!["-I".into(), url("/status/")],
        vec![url("/v1/blobs/3f2a9c1e-0b4d-4e5f-8a6b-7c8d9e0f1a2b")],
    ];
    for args in &script {
        assert_eq!(status(args), 200, "audit mode refused {args:?}");
    }
    let records = agent.wait_audit(script.len());
    let decisions: Vec<&str> = records
        .iter()
        .map(|r| r["decision"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(decisions, vec!["would_deny"; script.len()], "{records:?}");

    // Suggest, with the real binary, from the agent's own audit file.
    let suggested = audit_dir.path().join("app.yaml");
    let out = std::process::Command::new(bin())
        .args(["policy", "suggest", "--workload", "app", "--from"])
        .arg(&audit)
        .arg("--out")
        .arg(&suggested)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = fs::read_to_string(&suggested).unwrap();
    println!("{text}");
    assert!(text.contains("\nmode: enforce\n"), "{text}");
    assert!(
        text.contains("path: /v1/items/{id:[0-9]+}\n        query:\n          fields: any\n"),
        "{text}"
    );
    let check = std::process::Command::new(bin())
        .args(["policy", "check"])
        .arg(&suggested)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // Enforce it: replace the audit-mode policy and wait for the reload record.
    let before = agent.all_audit_records().len();
    atomic_write(policies.path(), "app.yaml", &text);
    let mut reloaded = false;
    for _ in 0..250 {
        reloaded = agent.all_audit_records()[before..]
            .iter()
            .any(|r| r["reason"] == "policy_reloaded");
        if reloaded {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(reloaded, "the agent did not reload the suggested policy");
    for args in &script {
        assert_eq!(status(args), 200, "the suggested policy refused {args:?}");
    }
    let others: Vec<Vec<String>> = vec![
        vec!["-X".into(), "DELETE".into(), url("/v1/items/42")],
        vec![url("/v1/items/42/secrets")],
        vec![url("/v1/items/abc")],
        vec![url("/v1/items/42?debug=1")],
        vec![url("/admin")],
        vec![url("/v1/orders")],
        vec!["--path-as-is".into(), url("/v1/items/../admin")],
        vec![url("/status")],
        vec![url("/v1/blobs/not-a-uuid")],
    ];
    for args in &others {
        assert_eq!(status(args), 403, "the suggested policy allowed {args:?}");
    }
    let records = agent.wait_audit(2 * script.len() + others.len());
    let tail = &records[script.len()..];
    let allowed = tail.iter().filter(|r| r["decision"] == "allow").count();
    let denied = tail.iter().filter(|r| r["decision"] == "deny").count();
    assert_eq!((allowed, denied), (script.len(), others.len()), "{tail:?}");
}
