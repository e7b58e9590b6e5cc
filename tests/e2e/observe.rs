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
    // Scrape between two identical reads of the chain, so the counts compare exactly
    // (a debounced reload may still be running for a moment).
    let (scrape, records) = (0..50)
        .find_map(|_| {
            thread::sleep(Duration::from_millis(200));
            let before = agent.all_audit_records();
            let scrape = Scrape::take(metrics_port);
            let after = agent.all_audit_records();
            (before.len() == after.len()).then_some((scrape, after))
        })
        .expect("the audit chain kept growing for 10 s");
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

/// One journal entry as the native protocol sent it: its fields in order.
type Entry = Vec<(String, Vec<u8>)>;

/// Parses one native-protocol datagram (systemd.io/JOURNAL_NATIVE_PROTOCOL): `KEY=VALUE\n`,
/// or `KEY\n` + 64-bit little-endian length + value + `\n` for values with newlines.
fn parse_native(mut data: &[u8]) -> Result<Entry, String> {
    let mut fields = Vec::new();
    while !data.is_empty() {
        let end = data
            .iter()
            .position(|&b| b == b'=' || b == b'\n')
            .ok_or("a field without = or newline")?;
        let key = String::from_utf8(data[..end].to_vec()).map_err(|e| e.to_string())?;
        if key.is_empty() {
            return Err("an empty field name".into());
        }
        if data[end] == b'=' {
            let rest = &data[end + 1..];
            let nl = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or("a value without its newline")?;
            fields.push((key, rest[..nl].to_vec()));
            data = &rest[nl + 1..];
        } else {
            let rest = &data[end + 1..];
            let len: [u8; 8] = rest
                .get(..8)
                .ok_or("a length cut short")?
                .try_into()
                .map_err(|_| "length")?;
            let len = u64::from_le_bytes(len) as usize;
            let value = rest.get(8..8 + len).ok_or("a value cut short")?;
            if rest.get(8 + len) != Some(&b'\n') {
                return Err("a binary value without its newline".into());
            }
            fields.push((key, value.to_vec()));
            data = &rest[9 + len..];
        }
    }
    Ok(fields)
}

fn field<'a>(entry: &'a Entry, key: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// A journal socket of the test's own: a datagram socket bound in a temporary directory
/// that the agent sees as /run/systemd/journal (a private mount namespace).
struct FakeJournal {
    dir: tempfile::TempDir,
    datagrams: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeJournal {
    fn start() -> Self {
        use std::os::unix::net::UnixDatagram;
        let dir = tempfile::tempdir().unwrap();
        let socket = UnixDatagram::bind(dir.path().join("socket")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let datagrams = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let datagrams = datagrams.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        datagrams.lock().unwrap().push(buf[..n].to_vec());
                    }
                }
            });
        }
        Self {
            dir,
            datagrams,
            stop,
        }
    }

    /// Every entry received so far, parsed (a malformed datagram fails the test).
    fn entries(&self) -> Vec<Entry> {
        self.datagrams
            .lock()
            .unwrap()
            .iter()
            .map(|d| {
                parse_native(d).unwrap_or_else(|e| {
                    panic!("malformed datagram ({e}): {:?}", String::from_utf8_lossy(d))
                })
            })
            .collect()
    }

    /// `journalctl -t IDENT -o cat`: the MESSAGE of each entry with that identifier.
    fn cat(&self, ident: &str) -> String {
        self.entries()
            .iter()
            .filter(|e| field(e, "SYSLOG_IDENTIFIER") == Some(ident))
            .map(|e| format!("{}\n", field(e, "MESSAGE").unwrap_or_default()))
            .collect()
    }

    /// The agent is started through this: a private mount namespace in which
    /// /run/systemd/journal is this directory, and JOURNAL_STREAM names its stderr (as
    /// systemd sets it for a unit with StandardError=journal).
    fn wrapper(&self) -> Vec<String> {
        let script = r#"set -e
[ -d /run/systemd ] || mkdir -p /run/systemd
mount -t tmpfs -o mode=0755 sgobs-journal /run/systemd
mkdir /run/systemd/journal
mount --bind "$0" /run/systemd/journal
JOURNAL_STREAM=$(stat -L -c '%d:%i' /proc/self/fd/2)
export JOURNAL_STREAM
exec "$@""#;
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            self.dir.path().to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

impl Drop for FakeJournal {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn under_journald_logs_have_priorities_and_audit_records_verify_from_the_journal() {
    privileged_test(
        "under_journald_logs_have_priorities_and_audit_records_verify_from_the_journal",
    );
    let journal = FakeJournal::start();
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let dead_port = free_port();
    let policies = policy_dir(&[("obs.yaml", policy(&managed, &upstream, dead_port, 0))]);
    let pins = PinDir::new();
    let audit = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.path().join("audit.jsonl"),
    );
    cfg.extra = vec!["--audit-journal".into()];
    cfg.wrapper = journal.wrapper();
    let mut agent = Agent::spawn(cfg);
    // Ready is logged to the journal, not to stderr.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        if let Some(e) = journal
            .entries()
            .into_iter()
            .find(|e| field(e, "MESSAGE") == Some("scopegate ready"))
        {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "no `scopegate ready` journal entry after 20 s; stderr:\n{}",
            agent.stderr().join("\n")
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(field(&ready, "PRIORITY"), Some("5"), "{ready:?}");
    assert_eq!(field(&ready, "SYSLOG_IDENTIFIER"), Some("scopegate"));
    let port = agent.port.to_string();
    assert_eq!(field(&ready, "F_PORT"), Some(port.as_str()), "{ready:?}");

    let status = |path: &str| {
        let out = curl_in(&managed, &["-w", STATUS, &upstream.url(path)]);
        status_and_body(&out).0
    };
    assert_eq!(status("/allowed/1"), 200);
    assert_eq!(status("/denied"), 403);
    agent.signal(15);
    assert_eq!(agent.wait_exit(), Some(0));
    thread::sleep(Duration::from_millis(200));

    // `journalctl -t scopegate-audit -o cat | scopegate audit verify -` passes, and holds
    // exactly the chain of the file sink.
    let cat = journal.cat("scopegate-audit");
    let file = fs::read_to_string(&agent.audit).unwrap();
    assert_eq!(cat, file, "the journal's records differ from the file's");
    let records: Vec<Value> = cat
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.iter().any(|r| r["reason"] == "agent_started"));
    assert!(records.iter().any(|r| r["reason"] == "path_not_allowed"));
    assert_eq!(records.last().unwrap()["reason"], "agent_stopping");
    let mut verify = Command::new(bin())
        .args(["audit", "verify", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = verify.stdin.take().unwrap();
        stdin.write_all(cat.as_bytes()).unwrap();
    }
    let out = verify.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with(&format!("OK: {} records", records.len())),
        "{text}"
    );
    // A record edited in the journal's output fails, naming standard input.
    let tampered = cat.replacen("path_not_allowed", "path_not_allowex", 1);
    let mut verify = Command::new(bin())
        .args(["audit", "verify", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        verify
            .stdin
            .take()
            .unwrap()
            .write_all(tampered.as_bytes())
            .unwrap();
    }
    let out = verify.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("FAIL: edited: <stdin>:"), "{text}");

    // The logs: each entry has a PRIORITY and no timestamp of its own; nothing on stderr.
    let logs: Vec<Entry> = journal
        .entries()
        .into_iter()
        .filter(|e| field(e, "SYSLOG_IDENTIFIER") == Some("scopegate"))
        .collect();
    assert!(logs.len() >= 3, "{logs:?}");
    for entry in &logs {
        let priority: u8 = field(entry, "PRIORITY").unwrap().parse().unwrap();
        assert!(priority <= 7, "{entry:?}");
        let message = field(entry, "MESSAGE").unwrap();
        let starts_with_time = message.len() >= 5
            && message.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && message.as_bytes()[4] == b'-';
        assert!(!starts_with_time, "timestamp in MESSAGE: {message:?}");
    }
    assert!(
        logs.iter()
            .any(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with("scopegate stopping"))),
        "{logs:?}"
    );
    assert!(
        !agent.stderr().iter().any(|l| l.contains("scopegate ready")),
        "logs duplicated on stderr: {:?}",
        agent.stderr()
    );
}

#[test]
fn native_journal_datagrams_parse_and_broken_ones_are_refused() {
    let mut data = b"MESSAGE=hello\nPRIORITY=5\nMULTI\n".to_vec();
    data.extend_from_slice(&3u64.to_le_bytes());
    data.extend_from_slice(b"a\nb\n");
    let entry = parse_native(&data).unwrap();
    assert_eq!(field(&entry, "MESSAGE"), Some("hello"));
    assert_eq!(field(&entry, "MULTI"), Some("a\nb"));
    for bad in [
        &b"MESSAGE=no newline"[..],
        b"=x\n",
        b"KEY\n\x05\x00",
        b"KEY\n\x09\x00\x00\x00\x00\x00\x00\x00abc\n",
    ] {
        assert!(parse_native(bad).is_err(), "{bad:?}");
    }
}
