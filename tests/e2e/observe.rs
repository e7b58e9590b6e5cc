//! Observability end to end: labelled Prometheus metrics scraped from a running agent and
//! parsed with the Python `prometheus_client` text parser, checked against the traffic the
//! test drove (allowed, denied, rate-limited, an upstream failure, a kernel deny) and the
//! reloads it made (one good, one bad).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::BTreeMap,
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use scopegate_e2e::*;
use serde_json::Value;

/// Scrapes `/metrics` with urllib and parses it with
/// `prometheus_client.parser.text_string_to_metric_families`; prints every sample as
/// `[family, type, sample name, labels, value]` JSON.
const SCRAPE: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
with urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=5) as r:
    ctype = r.headers.get("Content-Type")
    text = r.read().decode()
out = {"content_type": ctype, "samples": []}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        out["samples"].append([family.name, family.type, s.name, s.labels, s.value])
print(json.dumps(out))
"#;

/// One parsed sample: (family, type, sample name, labels, value).
type Sample = (String, String, String, BTreeMap<String, String>, f64);

/// One scrape, parsed.
struct Scrape {
    content_type: String,
    samples: Vec<Sample>,
}

impl Scrape {
    fn take(port: u16) -> Self {
        let out = Command::new("python3")
            .args(["-c", SCRAPE, &port.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "scrape failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let samples = v["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let labels = s[3]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect();
                (
                    s[0].as_str().unwrap().to_owned(),
                    s[1].as_str().unwrap().to_owned(),
                    s[2].as_str().unwrap().to_owned(),
                    labels,
                    s[4].as_f64().unwrap(),
                )
            })
            .collect();
        Self {
            content_type: v["content_type"].as_str().unwrap_or_default().to_owned(),
            samples,
        }
    }

    /// The value of the sample `name` with exactly `labels` (None if absent).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|(_, _, n, l, _)| n == name && *l == want)
            .map(|s| s.4)
    }

    /// Like [`Scrape::value`], failing the test when absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {:#?}", self.names()))
    }

    /// The type the parser gave the family `family`.
    fn family_type(&self, family: &str) -> Option<&str> {
        self.samples
            .iter()
            .find(|(f, ..)| f == family)
            .map(|s| s.1.as_str())
    }

    /// Every sample of `name`, as (labels, value).
    fn all(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(_, _, n, ..)| n == name)
            .map(|s| (s.3.clone(), s.4))
            .collect()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.samples.iter().map(|s| s.2.clone()).collect();
        names.dedup();
        names
    }
}

fn policy(managed: &str, upstream: &Upstream, dead_port: u16, version: u32) -> String {
    format!(
        "workload: obs\nselect:\n  cgroup: {managed}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read-v{version}\n        methods: [GET]\n        path: /allowed/**\n      - id: limited\n        methods: [GET]\n        path: /limited\n        rate: 2/minute\n  - host: {ip}\n    port: {dead_port}\n    rules:\n      - id: dead\n        methods: [GET]\n        path: /**\n",
        ip = upstream.addr.ip(),
        port = upstream.addr.port()
    )
}

/// Waits until the chain holds `n` lifecycle records with reason `reason`.
fn wait_lifecycle(agent: &Agent, reason: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<Value> = agent
            .all_audit_records()
            .into_iter()
            .filter(|r| r["proto"] == "audit" && r["reason"] == reason)
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {n} `{reason}` records after 10 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_carry_labelled_decisions_reloads_and_process_values() {
    privileged_test("metrics_carry_labelled_decisions_reloads_and_process_values");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let dead_port = free_port();
    let policies = policy_dir(&[("obs.yaml", policy(&managed, &upstream, dead_port, 0))]);
    let pins = PinDir::new();
    let audit = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let mut cfg = AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.path().join("audit.jsonl"),
    );
    cfg.extra = vec!["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")];
    let agent = Agent::start(cfg);

    let status = |url: String| {
        let out = curl_in(&managed, &["-w", STATUS, &url]);
        status_and_body(&out).0
    };
    let mut statuses = Vec::new();
    for i in 0..3 {
        statuses.push(status(upstream.url(&format!("/allowed/{i}"))));
    }
    for _ in 0..2 {
        statuses.push(status(upstream.url("/denied")));
    }
    for _ in 0..4 {
        statuses.push(status(upstream.url("/limited")));
    }
    let dead = format!("http://127.0.0.2:{dead_port}/x");
    statuses.push(status(dead));
    assert_eq!(
        statuses,
        [200, 200, 200, 403, 403, 200, 200, 429, 429, 502],
        "{:?}",
        agent.stderr()
    );
    // A kernel deny: a port the workload has no destination on (EPERM, nothing sent).
    let out = curl_in(&managed, &["--connect-timeout", "2", "http://127.0.0.2:9/"]);
    assert!(!out.status.success(), "a connect to port 9 passed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent
        .audit_records()
        .iter()
        .any(|r| r["reason"] == "port_not_allowed")
    {
        assert!(Instant::now() < deadline, "no kernel deny record");
        thread::sleep(Duration::from_millis(50));
    }

    // A good reload (a new rule id changes the hash), then a bad one (kept: the good one).
    fs::write(
        policies.path().join("obs.yaml"),
        policy(&managed, &upstream, dead_port, 1),
    )
    .unwrap();
    let reloaded = wait_lifecycle(&agent, "policy_reloaded", 1);
    fs::write(policies.path().join("broken.yaml"), "workload: [unclosed\n").unwrap();
    wait_lifecycle(&agent, "policy_rejected", 1);
    thread::sleep(Duration::from_millis(500));

    let scrape = Scrape::take(metrics_port);
    let records = agent.all_audit_records();
    let count = |reason: &str| {
        records
            .iter()
            .filter(|r| r["proto"] == "audit" && r["reason"] == reason)
            .count() as f64
    };
    assert!(
        scrape.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        scrape.content_type
    );

    // Decisions, by workload, decision and reason.
    let req = |decision: &str, reason: &str| {
        scrape.get(
            "scopegate_requests_total",
            &[
                ("workload", "obs"),
                ("decision", decision),
                ("reason", reason),
            ],
        )
    };
    // 3 allowed + 2 within the rate + the request whose upstream failed (allowed, then
    // its outcome failed).
    assert_eq!(req("allow", ""), 6.0);
    assert_eq!(req("deny", "path_not_allowed"), 2.0);
    assert_eq!(req("deny", "rate_limited"), 2.0);
    assert_eq!(scrape.family_type("scopegate_requests"), Some("counter"));
    let obs_total: f64 = scrape
        .all("scopegate_requests_total")
        .iter()
        .filter(|(l, _)| l["workload"] == "obs")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        obs_total,
        10.0,
        "{:?}",
        scrape.all("scopegate_requests_total")
    );
    // No label holds a path or a host.
    for (labels, _) in scrape.all("scopegate_requests_total") {
        assert!(
            labels
                .values()
                .all(|v| !v.contains('/') && !v.contains('.')),
            "{labels:?}"
        );
    }
    assert_eq!(
        scrape.get("scopegate_rate_limited_total", &[("workload", "obs")]),
        2.0
    );
    assert_eq!(
        scrape.get("scopegate_upstream_errors_total", &[("workload", "obs")]),
        1.0
    );

    // Kernel denies by reason, as many as the agent recorded; the kernel's own total.
    let kernel_records = agent
        .audit_records()
        .iter()
        .filter(|r| r["reason"] == "port_not_allowed")
        .count() as f64;
    assert!(kernel_records >= 1.0);
    assert_eq!(
        scrape.get(
            "scopegate_kernel_denies_total",
            &[("reason", "port_not_allowed")]
        ),
        kernel_records
    );
    assert!(scrape.get("scopegate_kernel_denied_total", &[]) >= kernel_records);
    assert!(scrape.get("scopegate_kernel_redirected_total", &[]) >= 10.0);

    // The agent's overhead per request, in seconds: 6 forwarded, 4 refused.
    assert_eq!(
        scrape.family_type("scopegate_request_overhead_seconds"),
        Some("histogram")
    );
    let count_of = |path: &str| {
        scrape.get(
            "scopegate_request_overhead_seconds_count",
            &[("path", path)],
        )
    };
    assert_eq!(count_of("forwarded"), 6.0);
    assert_eq!(count_of("refused"), 4.0);
    let sum = scrape.get(
        "scopegate_request_overhead_seconds_sum",
        &[("path", "forwarded")],
    );
    assert!(sum > 0.0 && sum < 60.0, "{sum}");
    assert_eq!(
        scrape.get(
            "scopegate_request_overhead_seconds_bucket",
            &[("path", "forwarded"), ("le", "+Inf")]
        ),
        6.0
    );

    // Reloads: as many as the chain recorded, the last one failed, the good policy runs.
    let good = count("policy_reloaded");
    let bad = count("policy_rejected");
    assert!(good >= 1.0 && bad >= 1.0);
    assert_eq!(
        scrape.get("scopegate_policy_reload_total", &[("result", "success")]),
        good
    );
    assert_eq!(
        scrape.get("scopegate_policy_reload_total", &[("result", "failure")]),
        bad
    );
    assert_eq!(
        scrape.get("scopegate_policy_last_reload_successful", &[]),
        0.0
    );
    let now = jiff::Timestamp::now().as_second() as f64;
    let last = scrape.get("scopegate_policy_last_reload_timestamp_seconds", &[]);
    let last_ok = scrape.get(
        "scopegate_policy_last_reload_success_timestamp_seconds",
        &[],
    );
    assert!(
        last_ok <= last && last <= now + 1.0 && last > now - 120.0,
        "{last_ok} {last} {now}"
    );
    let hash = reloaded.last().unwrap()["policy_hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(scrape.all("scopegate_policy_info").len(), 1);
    assert_eq!(scrape.get("scopegate_policy_info", &[("hash", &hash)]), 1.0);
    assert_eq!(
        scrape.get(
            "scopegate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // What operators had before keeps its name.
    for name in [
        "scopegate_kernel_events_lost_total",
        "scopegate_kernel_origin_store_failed_total",
        "scopegate_cgroup_scan_errors_total",
        "scopegate_cgroup_scan_kept_total",
        "scopegate_audit_write_errors_total",
        "scopegate_audit_checkpoints_total",
        "scopegate_audit_unavailable_summarised_total",
        "scopegate_audit_queue_depth",
        "scopegate_audit_unavailable",
        "scopegate_managed_cgroups",
    ] {
        assert!(scrape.value(name, &[]).is_some(), "{name} missing");
    }
    assert!(scrape.get("scopegate_audit_records_written_total", &[]) >= records.len() as f64);
    assert_eq!(scrape.get("scopegate_workloads", &[]), 1.0);

    // Process metrics of the agent (not of this test).
    let open = scrape.get("process_open_fds", &[]);
    assert!(
        open >= 10.0 && open <= scrape.get("process_max_fds", &[]),
        "{open}"
    );
    assert!(scrape.get("process_resident_memory_bytes", &[]) > 1_000_000.0);
    assert!(scrape.get("process_cpu_seconds_total", &[]) > 0.0);
    let start = scrape.get("process_start_time_seconds", &[]);
    assert!(start <= now + 1.0 && start > now - 600.0, "{start} {now}");
}
