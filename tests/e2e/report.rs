//! The review report of a real audit trail: a workload's allowed, denied and kernel-refused
//! traffic through the real agent, then `scopegate audit report --html`, rendered in a real
//! headless browser (Debian's chromium-headless-shell, in a network namespace of its own
//! so that nothing can be fetched), its DOM checked for the figures of the trail; a
//! screenshot stays in the test output. An edited trail makes the report say DAMAGED and
//! exit 1.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use scopegate_e2e::*;

/// The text of the element with this `id` in the browser's DOM (`<b id="x">42</b>` → 42).
fn by_id<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = format!("id=\"{id}\"");
    let at = dom
        .find(&start)
        .unwrap_or_else(|| panic!("no element #{id} in the DOM:\n{dom}"));
    let rest = &dom[at..];
    let open = rest.find('>').unwrap() + 1;
    let close = rest[open..].find('<').unwrap();
    &rest[open..open + close]
}

/// The browser, in a new network namespace (only a down loopback: nothing to reach).
fn chromium(args: &[&str], page: &Path) -> Output {
    let out = Command::new("unshare")
        .args(["--net", "chromium-headless-shell"])
        .args(["--no-sandbox", "--disable-gpu", "--no-first-run"])
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()
        .expect("chromium-headless-shell (installed by `cargo xtask setup`) must run");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn report(audit: &Path, policies: &Path, html: &Path) -> (Option<i32>, String) {
    let out = Command::new(bin())
        .args(["audit", "report", "--from"])
        .arg(audit)
        .arg("--policies")
        .arg(policies)
        .arg("--html")
        .arg(html)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.code(), stdout)
}

#[test]
fn the_review_report_of_a_real_trail_renders_in_a_browser_with_its_figures() {
    privileged_test("the_review_report_of_a_real_trail_renders_in_a_browser_with_its_figures");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(72);
    let policy = format!(
        "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n      - id: write\n        methods: [POST]\n        path: /write\n        expires: \"{expires}\"\n",
        ip = upstream.addr.ip(),
        port = upstream.addr.port()
    );
    let policies = policy_dir(&[("web.yaml", policy)]);
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut agent = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        audit.clone(),
    ));
    let sink = TcpSink::start_avoiding("127.0.0.2", &[upstream.addr.port(), agent.port]);
    for (method, path, want) in [
        ("GET", "/allowed/a", 200),
        ("GET", "/allowed/b", 200),
        ("GET", "/allowed/c", 200),
        ("GET", "/secret", 403),
        ("GET", "/secret", 403),
        ("DELETE", "/allowed/a", 403),
    ] {
        let out = curl_in(&managed, &["-X", method, "-w", STATUS, &upstream.url(path)]);
        assert_eq!(status_and_body(&out).0, want, "{method} {path}");
    }
    let probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        sink.addr.port()
    );
    assert_eq!(python_in(&managed, &probe), "EPERM");
    assert_eq!(agent.wait_audit(7).len(), 7);
    agent.stop();

    let html = dir.path().join("review.html");
    let (code, summary) = report(&audit, policies.path(), &html);
    assert_eq!(code, Some(0), "{summary}");
    for line in [
        "chain: intact",
        "decisions: 7 (allow 3, deny 4, would_deny 0, error 0)",
        "workload web (enforce): 7 decisions (allow 3, deny 4, would_deny 0, error 0), 1 of 2 grant(s) used",
        "connection-level denies: 1",
        "unused grants: 1",
        "  workload web: rule write of 127.0.0.2:",
        "expiring grants: 1",
    ] {
        assert!(summary.contains(line), "{line:?} not in:\n{summary}");
    }

    let dom = String::from_utf8(chromium(&["--dump-dom"], &html).stdout).unwrap();
    assert_eq!(by_id(&dom, "total-allow"), "3");
    assert_eq!(by_id(&dom, "total-deny"), "4");
    assert_eq!(by_id(&dom, "total-would_deny"), "0");
    assert_eq!(by_id(&dom, "unused-count"), "1");
    assert_eq!(by_id(&dom, "expiring-count"), "1");
    assert_eq!(by_id(&dom, "connection-count"), "1");
    assert_eq!(by_id(&dom, "chain-state"), "intact");
    assert!(dom.contains("port_not_allowed"), "the kernel deny's reason");
    assert!(dom.contains("<td>/secret</td>") || dom.contains("<code>/secret</code>"));
    assert!(dom.contains("<svg id=\"timeline\""));
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("review-report");
    fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("review.png");
    let _ = fs::remove_file(&shot);
    chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1600",
        ],
        &html,
    );
    let png = fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    eprintln!("review screenshot: {}", shot.display());

    // One edited record (a deny turned into an allow): the review says so and exits 1.
    let text = fs::read_to_string(&audit).unwrap();
    let edited = text.replacen("\"decision\":\"deny\"", "\"decision\":\"allow\"", 1);
    assert_ne!(edited, text);
    let tampered = dir.path().join("tampered.jsonl");
    fs::write(&tampered, edited).unwrap();
    let damaged_html = dir.path().join("damaged.html");
    let (code, summary) = report(&tampered, policies.path(), &damaged_html);
    assert_eq!(code, Some(1), "{summary}");
    assert!(summary.contains("chain: DAMAGED: "), "{summary}");
    let dom = String::from_utf8(chromium(&["--dump-dom"], &damaged_html).stdout).unwrap();
    assert_eq!(by_id(&dom, "chain-state"), "DAMAGED");
}
