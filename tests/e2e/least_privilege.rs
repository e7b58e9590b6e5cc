//! The least-privilege loop, end to end, with the real agent, hooks and clients, from
//! "unknown traffic" to an enforced, tested, reviewed policy using only scopegate's
//! commands:
//!
//! 1. **Observe.** A workload in `mode: audit` (its policy names only the two hosts it is
//!    known to call, with placeholder rules, and `dns: system`) runs a scripted mix: HTTP
//!    to both hosts, a TCP connect to a port no destination names, a DNS query through the
//!    DNS proxy. Nothing is refused; every decision is recorded `would_deny`, the kernel's
//!    (the TCP connect) with the reason enforce mode gives.
//! 2. **Suggest.** `policy suggest` turns the agent's audit file into a policy, which passes
//!    `policy check`; `policy diff` shows what it changes.
//! 3. **Enforce.** Put in place and reloaded, it allows the same script and denies a second
//!    script of other requests to the same hosts, ports and resolver.
//! 4. **Review.** `policy unused` and `audit report` read the whole trail.
//!
//! The commands' output is printed (`--nocapture`): the README's walk-through shows it.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::{Command, Output},
    thread,
    time::Duration,
};

use scopegate_e2e::{
    dns_server::{Answer, DnsServer},
    *,
};

/// The test's own resolver address (no other test uses 127.0.59.0/24).
const RESOLVER: &str = "127.0.59.1";

/// A python script: one `name result` line per probe (HTTP status, errno name for sockets,
/// DNS rcode).
fn script(probes: &[String]) -> String {
    let mut s = format!("{PY_PRELUDE}\nimport http.client, dns.message, dns.query, dns.rcode\n");
    s.push_str(concat!(
        "def request(name, host, port, method, path):\n",
        "    try:\n",
        "        c = http.client.HTTPConnection(host, port, timeout=5)\n",
        "        c.request(method, path, body=b'{}' if method == 'POST' else None)\n",
        "        print(name, c.getresponse().status)\n",
        "    except OSError as e:\n",
        "        print(name, errno.errorcode.get(e.errno, str(e)))\n",
        "def query(name, qname):\n",
        "    q = dns.message.make_query(qname, 'A')\n",
    ));
    s.push_str(&format!(
        "    r = dns.query.udp(q, '{RESOLVER}', port=53, timeout=3)\n    print(name, dns.rcode.to_text(r.rcode()))\n"
    ));
    for p in probes {
        s.push_str(p);
        s.push('\n');
    }
    s
}

fn results(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect()
}

/// Runs the real binary; prints the command and its output for the walk-through.
fn scopegate(args: &[&str], shown: &[&str]) -> Output {
    let out = Command::new(bin()).args(args).output().unwrap();
    println!(
        "$ scopegate {}\n{}{}",
        shown.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Sends SIGHUP and waits for the agent's `policy_reloaded` record.
fn reload(agent: &Agent) {
    let before = agent.all_audit_records().len();
    agent.signal(1);
    for _ in 0..250 {
        if agent.all_audit_records()[before..]
            .iter()
            .any(|r| r["reason"] == "policy_reloaded")
        {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "the agent did not reload: {:?}",
        &agent.all_audit_records()[before..]
    );
}

#[test]
fn audit_mode_then_suggest_then_enforce_closes_the_loop() {
    privileged_test("audit_mode_then_suggest_then_enforce_closes_the_loop");
    let dns = DnsServer::start(RESOLVER);
    dns.set("api.one.test", &[Answer::addr("127.0.0.2", 60)]);
    dns.set("exfil.other.test", &[Answer::addr("127.0.0.9", 60)]);
    let one = Upstream::start("127.0.0.2");
    let two = Upstream::start("127.0.0.3");
    let tree = CgroupTree::new();
    let app = tree.child("app");
    let (p1, p2) = (one.addr.port(), two.addr.port());
    let observe = format!(
        "workload: app\nmode: audit\nselect:\n  cgroup: {app}\negress:\n  - host: 127.0.0.2\n    port: {p1}\n    rules:\n      - {{id: placeholder, methods: [GET], path: /never}}\n  - host: 127.0.0.3\n    port: {p2}\n    rules:\n      - {{id: placeholder2, methods: [GET], path: /never}}\ndns: system\n"
    );
    let policies = policy_dir(&[("app.yaml", observe.clone())]);
    let observed_dir = tempfile::tempdir().unwrap();
    fs::write(observed_dir.path().join("app.yaml"), &observe).unwrap();
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut config = AgentConfig::new(policies.path(), &tree, &pins, audit.clone());
    config.extra = vec![
        "--resolv-conf".into(),
        dns.resolv_conf().display().to_string(),
    ];
    let mut agent = Agent::start(config);
    let avoid = [p1, p2, agent.port];
    let db = TcpSink::start_avoiding("127.0.0.4", &avoid);
    let other_db = TcpSink::start_avoiding("127.0.0.4", &avoid);

    // 1. Observe: nothing is refused.
    let first = script(&[
        format!("request('one_item_42', '127.0.0.2', {p1}, 'GET', '/v1/items/42')"),
        format!("request('one_item_7', '127.0.0.2', {p1}, 'GET', '/v1/items/7')"),
        format!("request('one_post_items', '127.0.0.2', {p1}, 'POST', '/v1/items')"),
        format!("request('two_status', '127.0.0.3', {p2}, 'GET', '/status')"),
        format!(
            "print('db', attempt(tcp(socket.AF_INET, ('127.0.0.4', {}))))",
            db.addr.port()
        ),
        "query('dns_api', 'api.one.test')".to_owned(),
    ]);
    let observed = results(&python_in(&app, &first));
    let all_pass: BTreeMap<String, String> = [
        ("db", "ok"),
        ("dns_api", "NOERROR"),
        ("one_item_42", "200"),
        ("one_item_7", "200"),
        ("one_post_items", "200"),
        ("two_status", "200"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(observed, all_pass, "audit mode refused something");
    let records = agent.wait_audit(6);
    assert_eq!(records.len(), 6, "{records:#?}");
    assert!(
        records.iter().all(|r| r["decision"] == "would_deny"),
        "{records:#?}"
    );
    let kernel: Vec<_> = records.iter().filter(|r| r["proto"] == "tcp").collect();
    assert_eq!(kernel.len(), 1, "{records:#?}");
    assert_eq!(kernel[0]["reason"], "port_not_allowed");
    assert_eq!(kernel[0]["dst"]["port"], db.addr.port());
    assert_eq!(db.count(), 1, "the unnamed port was reached straight");

    // 2. Suggest, check, diff.
    let suggested_dir = tempfile::tempdir().unwrap();
    let suggested = suggested_dir.path().join("app.yaml");
    let out = scopegate(
        &[
            "policy",
            "suggest",
            "--workload",
            "app",
            "--from",
            path(&audit),
            "--out",
            path(&suggested),
        ],
        &["policy suggest --workload app --from audit.jsonl --out suggested/app.yaml"],
    );
    assert!(out.status.success());
    let text = fs::read_to_string(&suggested).unwrap();
    println!("$ cat suggested/app.yaml\n{text}");
    assert!(text.contains("\nmode: enforce\n"), "{text}");
    assert!(text.contains("path: /v1/items/{id:[0-9]+}"), "{text}");
    assert!(text.contains("cidr: 127.0.0.4/32"), "{text}");
    assert!(text.contains("api.one.test"), "{text}");
    assert!(!text.contains("exfil"), "{text}");
    let out = scopegate(
        &["policy", "check", path(suggested_dir.path())],
        &["policy check suggested/"],
    );
    assert!(out.status.success());
    let out = scopegate(
        &[
            "policy",
            "diff",
            path(observed_dir.path()),
            path(suggested_dir.path()),
        ],
        &["policy diff observed/ suggested/"],
    );
    assert!(out.status.success());
    let diff = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(diff.contains("mode audit → enforce"), "{diff}");
    let l4 = format!(
        "+ grant   app: new L4 exception `cidr: 127.0.0.4/32 ports: [{}] protocol: tcp`",
        db.addr.port()
    );
    assert!(diff.contains(&l4), "{diff}");

    // 3. Enforce: the same script passes, other requests are denied.
    let tmp = policies.path().join(".app.yaml.tmp");
    fs::write(&tmp, &text).unwrap();
    fs::rename(&tmp, policies.path().join("app.yaml")).unwrap();
    reload(&agent);
    let before = agent.audit_records().len();
    let again = results(&python_in(&app, &first));
    assert_eq!(
        again, all_pass,
        "the suggested policy refused the observed script"
    );
    assert_eq!(db.count(), 2, "the L4 exception passed the connect");
    let second = script(&[
        format!("request('one_delete', '127.0.0.2', {p1}, 'DELETE', '/v1/items/42')"),
        format!("request('one_admin', '127.0.0.2', {p1}, 'GET', '/v1/admin')"),
        format!("request('one_item_name', '127.0.0.2', {p1}, 'GET', '/v1/items/abc')"),
        format!("request('two_post', '127.0.0.3', {p2}, 'POST', '/status')"),
        format!("request('two_deeper', '127.0.0.3', {p2}, 'GET', '/status/secret')"),
        format!(
            "print('db_other_port', attempt(tcp(socket.AF_INET, ('127.0.0.4', {}))))",
            other_db.addr.port()
        ),
        "query('dns_exfil', 'exfil.other.test')".to_owned(),
    ]);
    let denied = results(&python_in(&app, &second));
    let want: BTreeMap<String, String> = [
        ("db_other_port", "EPERM"),
        ("dns_exfil", "REFUSED"),
        ("one_admin", "403"),
        ("one_delete", "403"),
        ("one_item_name", "403"),
        ("two_deeper", "403"),
        ("two_post", "403"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(denied, want);
    assert_eq!(other_db.count(), 0);
    // The same script: 4 HTTP allows and the DNS allow (the L4 exception passes in the
    // kernel without a record); the other script: 7 denials.
    let records = agent.wait_audit(before + 12);
    let tail = &records[before..];
    let count = |d: &str| tail.iter().filter(|r| r["decision"] == d).count();
    assert_eq!((count("allow"), count("deny")), (5, 7), "{tail:#?}");
    assert_eq!(tail.len(), 12, "{tail:#?}");
    assert!(
        !dns.queries().iter().any(|q| q.qname.contains("exfil")),
        "the refused name never reached the resolver"
    );
    agent.stop();

    // 4. Review the whole trail.
    let out = scopegate(
        &[
            "policy",
            "unused",
            path(policies.path()),
            "--from",
            path(&audit),
        ],
        &["policy unused /etc/scopegate/policies --from audit.jsonl"],
    );
    assert!(out.status.success());
    let html = dir.path().join("review.html");
    let out = scopegate(
        &[
            "audit",
            "report",
            "--from",
            path(&audit),
            "--policies",
            path(policies.path()),
            "--html",
            path(&html),
        ],
        &["audit report --from audit.jsonl --policies /etc/scopegate/policies --html review.html"],
    );
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("chain: intact"), "{summary}");
    assert!(
        summary.contains("decisions: 18 (allow 5, deny 7, would_deny 6, error 0)"),
        "{summary}"
    );
}
