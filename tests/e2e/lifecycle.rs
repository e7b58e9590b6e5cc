//! Managed means managed until released: a cgroup a policy once selected stays enforced,
//! deny-all (`no_policy`), when its policy file is removed, the policy directory is empty
//! or invalid at a restart (`--allow-empty`), or the agent cannot start at all; only
//! `scopegate release` (recorded as `cgroup_released`) or a new policy ends that.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use scopegate_e2e::*;

fn policy(cgroup: &str, upstream: &Upstream) -> String {
    format!(
        "workload: web\nselect:\n  cgroup: {cgroup}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n",
        ip = upstream.addr.ip(),
        port = upstream.addr.port()
    )
}

/// One workload `web` (cgroup `<tree>/app`) with a policy, its agent, and what a restart
/// needs (same pins, port, audit file and state directory).
struct Fixture {
    upstream: Upstream,
    app: String,
    policies: tempfile::TempDir,
    pins: PinDir,
    tree: CgroupTree,
    dir: tempfile::TempDir,
    port: u16,
}

impl Fixture {
    fn new() -> Self {
        let tree = CgroupTree::new();
        let app = tree.child("app");
        let upstream = Upstream::start("127.0.0.2");
        let policies = policy_dir(&[("web.yaml", policy(&app, &upstream))]);
        Self {
            upstream,
            app,
            policies,
            pins: PinDir::new(),
            tree,
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
        }
    }

    fn config(&self, extra: &[&str]) -> AgentConfig<'_> {
        let mut config =
            AgentConfig::new(self.policies.path(), &self.tree, &self.pins, self.audit());
        config.port = Some(self.port);
        config.state_dir = Some(self.state_dir());
        config.extra = extra.iter().map(|s| (*s).to_owned()).collect();
        config
    }

    fn audit(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn app_id(&self) -> u64 {
        fs::metadata(cgroup2_mount().join(self.app.trim_start_matches('/')))
            .unwrap()
            .ino()
    }

    /// The workload is enforced through its policy: allowed via the proxy, forbidden 403.
    fn assert_enforced_by_policy(&self) {
        let out = curl_in(&self.app, &["-w", STATUS, &self.upstream.url("/allowed/x")]);
        assert_eq!(status_and_body(&out).0, 200, "{out:?}");
        let out = curl_in(&self.app, &["-w", STATUS, &self.upstream.url("/forbidden")]);
        assert_eq!(status_and_body(&out).0, 403, "{out:?}");
        assert!(
            self.upstream
                .seen()
                .iter()
                .all(|s| s.target != "/forbidden"),
            "a forbidden request reached the upstream"
        );
    }

    /// The workload is held deny-all: its connect is refused in the kernel (EPERM) with a
    /// `no_policy` record naming its cgroup, and curl reaches nothing.
    fn assert_held(&self, audit: &Path) {
        let before = self.upstream.seen().len();
        let probe = format!(
            "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
            self.upstream.addr.port()
        );
        assert_eq!(python_in(&self.app, &probe), "EPERM");
        let out = curl_in(&self.app, &["-w", STATUS, &self.upstream.url("/allowed/x")]);
        assert_eq!(status_and_body(&out).0, 0, "curl must not connect: {out:?}");
        assert_eq!(
            self.upstream.seen().len(),
            before,
            "nothing reached the upstream"
        );
        let denied = wait_n_records(audit, 2, |r| {
            r["reason"] == "no_policy" && r["cgroup"] == self.app.as_str()
        });
        assert!(
            denied.len() >= 2,
            "a no_policy record per connect: {denied:#?}"
        );
        for r in &denied {
            assert_eq!(r["decision"], "deny");
            assert_eq!(r["dst"]["port"], self.upstream.addr.port());
        }
    }

    fn release(&self, cgroup: &str) -> Output {
        Command::new(bin())
            .args(["release", cgroup, "--pin-dir"])
            .arg(&self.pins.0)
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--wait-secs", "10"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `scopegate release` opens the workload, recorded before it takes effect.
    fn assert_release_opens(&self, audit: &Path) {
        let out = self.release(&self.app);
        assert!(out.status.success(), "{out:?}");
        let released = wait_records(audit, |r| r["reason"] == "cgroup_released");
        assert_eq!(released.len(), 1, "{released:#?}");
        let r = &released[0];
        assert_eq!(r["proto"], "audit");
        assert_eq!(r["cgroup"], self.app.as_str());
        assert_eq!(r["cgroup_id"], self.app_id());
        assert_eq!(r["uid"], 0, "who asked: root");
        assert!(r["pid"].as_u64().is_some(), "{r}");
        // Unmanaged now: a request no policy allows goes straight to the upstream.
        let out = curl_in(&self.app, &["-w", STATUS, &self.upstream.url("/forbidden")]);
        assert_eq!(status_and_body(&out).0, 200, "{out:?}");
        assert!(
            self.upstream
                .seen()
                .iter()
                .any(|s| s.target == "/forbidden")
        );
        // Rescans (every 0.2 s) do not take it back.
        thread::sleep(Duration::from_millis(800));
        let out = curl_in(
            &self.app,
            &["-w", STATUS, &self.upstream.url("/forbidden2")],
        );
        assert_eq!(status_and_body(&out).0, 200, "{out:?}");
        // A second release: it is not managed any more.
        let again = self.release(&self.app);
        assert!(!again.status.success());
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("not managed"),
            "{again:?}"
        );
    }

    /// `release` refuses while a policy still selects the cgroup, for unknown cgroups and
    /// for cgroups that are not managed.
    fn assert_release_refusals(&self) {
        let out = self.release(&self.app);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("a policy still selects it"), "{err}");
        let out = self.release(&format!("{}/no-such-cgroup", self.tree.path));
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no such cgroup"),
            "{out:?}"
        );
        let other = self.tree.child("other");
        let out = self.release(&other);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not managed"),
            "{out:?}"
        );
    }
}

/// Waits (up to 10 s) until some record matches, then returns all that match.
fn wait_records(audit: &Path, want: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    wait_n_records(audit, 1, want)
}

/// Waits (up to 10 s) until `n` records match, then returns all that match.
fn wait_n_records(
    audit: &Path,
    n: usize,
    want: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found: Vec<_> = read_jsonl(audit).into_iter().filter(|r| want(r)).collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn assert_held_record(audit: &Path, cgroup: &str) {
    let held = wait_records(audit, |r| {
        r["reason"] == "cgroup_held" && r["cgroup"] == cgroup
    });
    assert!(!held.is_empty(), "no cgroup_held record for {cgroup}");
}

fn verify_chain(audit: &Path) {
    let out = Command::new(bin())
        .args(["audit", "verify"])
        .arg(audit)
        .output()
        .unwrap();
    assert!(out.status.success(), "audit verify: {out:?}");
}

#[test]
fn a_removed_policy_file_holds_the_cgroup_until_release() {
    privileged_test("a_removed_policy_file_holds_the_cgroup_until_release");
    let f = Fixture::new();
    let agent = Agent::start(f.config(&[]));
    f.assert_enforced_by_policy();
    f.assert_release_refusals();
    // An invalid reload keeps the last good policy.
    fs::write(f.policies.path().join("broken.yaml"), "workload: [\n").unwrap();
    wait_records(&agent.audit, |r| r["reason"] == "policy_rejected");
    f.assert_enforced_by_policy();
    fs::remove_file(f.policies.path().join("broken.yaml")).unwrap();
    // The policy file goes (inotify reload): the workload stays managed, deny-all.
    fs::remove_file(f.policies.path().join("web.yaml")).unwrap();
    assert_held_record(&agent.audit, &f.app);
    f.assert_held(&agent.audit);
    f.assert_release_opens(&agent.audit);
    verify_chain(&agent.audit);
}

#[test]
fn an_empty_policy_directory_at_restart_keeps_the_pinned_cgroups() {
    privileged_test("an_empty_policy_directory_at_restart_keeps_the_pinned_cgroups");
    let f = Fixture::new();
    let mut agent = Agent::start(f.config(&[]));
    f.assert_enforced_by_policy();
    agent.stop();
    fs::remove_file(f.policies.path().join("web.yaml")).unwrap();
    let _agent = Agent::start(f.config(&[]));
    assert_held_record(&f.audit(), &f.app);
    f.assert_held(&f.audit());
    f.assert_release_opens(&f.audit());
    verify_chain(&f.audit());
}

#[test]
fn allow_empty_with_an_invalid_policy_starts_deny_all_for_pins_and_subtrees() {
    privileged_test("allow_empty_with_an_invalid_policy_starts_deny_all_for_pins_and_subtrees");
    let f = Fixture::new();
    let slice = f.tree.child("slice");
    let mut agent = Agent::start(f.config(&[]));
    f.assert_enforced_by_policy();
    agent.stop();
    fs::write(
        f.policies.path().join("web.yaml"),
        "workload: web\nselect: [\n",
    )
    .unwrap();
    let _agent = Agent::start(f.config(&["--allow-empty", "--managed-subtree", &slice]));
    assert!(
        !wait_records(&f.audit(), |r| r["reason"] == "policy_rejected"
            && r["trigger"] == "start")
        .is_empty()
    );
    f.assert_held(&f.audit());
    // A cgroup below the managed subtree, never selected: deny-all too.
    let stray = f.tree.child("slice/stray");
    let probe = format!(
        "{PY_PRELUDE}\nprint(attempt(tcp(socket.AF_INET, ('127.0.0.2', {}))))",
        f.upstream.addr.port()
    );
    assert_eq!(python_in(&stray, &probe), "EPERM");
    // The subtree root is configuration, not held: release refuses it.
    let out = f.release(&slice);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--managed-subtree"),
        "{out:?}"
    );
    f.assert_release_opens(&f.audit());
    assert_eq!(
        python_in(&stray, &probe),
        "EPERM",
        "the subtree stays enforced"
    );
    verify_chain(&f.audit());
}

#[test]
fn an_agent_that_cannot_start_leaves_the_cgroup_closed_and_a_release_pending() {
    privileged_test("an_agent_that_cannot_start_leaves_the_cgroup_closed_and_a_release_pending");
    let f = Fixture::new();
    let mut agent = Agent::start(f.config(&[]));
    f.assert_enforced_by_policy();
    agent.stop();
    // Restarted with an invalid policy (no --allow-empty): the agent refuses to start.
    fs::write(f.policies.path().join("web.yaml"), "workload: [\n").unwrap();
    let out = Command::new(bin())
        .arg("run")
        .arg("--policies")
        .arg(f.policies.path())
        .arg("--pin-dir")
        .arg(&f.pins.0)
        .arg("--cgroup-root")
        .arg(&f.tree.dir)
        .arg("--proxy-port")
        .arg(f.port.to_string())
        .arg("--state-dir")
        .arg(f.state_dir())
        .arg("--no-audit-stdout")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("web.yaml"),
        "{out:?}"
    );
    // The pinned hooks still hold the workload: nothing reaches the upstream.
    let before = f.upstream.seen().len();
    let out = curl_in(&f.app, &["-w", STATUS, &f.upstream.url("/forbidden")]);
    assert_eq!(status_and_body(&out).0, 0, "{out:?}");
    assert_eq!(f.upstream.seen().len(), before);
    // Still selected as far as the pins know (the last agent wrote it with its workload).
    assert!(!f.release(&f.app).status.success());
    // The operator empties the policy directory and starts the agent: held deny-all.
    fs::remove_file(f.policies.path().join("web.yaml")).unwrap();
    let mut agent = Agent::start(f.config(&[]));
    assert_held_record(&f.audit(), &f.app);
    f.assert_held(&f.audit());
    agent.stop();
    // A release while no agent runs is pending (exit 3); the cgroup stays closed.
    let pending = Command::new(bin())
        .args(["release", &f.app, "--pin-dir"])
        .arg(&f.pins.0)
        .arg("--state-dir")
        .arg(f.state_dir())
        .args(["--wait-secs", "0.5"])
        .output()
        .unwrap();
    assert_eq!(pending.status.code(), Some(3), "{pending:?}");
    assert!(String::from_utf8_lossy(&pending.stderr).contains("pending"));
    let out = curl_in(&f.app, &["-w", STATUS, &f.upstream.url("/forbidden")]);
    assert_eq!(status_and_body(&out).0, 0, "{out:?}");
    assert_eq!(f.upstream.seen().len(), before);
    // The next agent applies and records it, naming who asked.
    let _agent = Agent::start(f.config(&[]));
    let released = wait_records(&f.audit(), |r| r["reason"] == "cgroup_released");
    assert_eq!(released.len(), 1, "{released:#?}");
    assert_eq!(released[0]["cgroup"], f.app.as_str());
    assert_eq!(released[0]["uid"], 0);
    let out = curl_in(&f.app, &["-w", STATUS, &f.upstream.url("/forbidden")]);
    assert_eq!(status_and_body(&out).0, 200, "{out:?}");
    verify_chain(&f.audit());
}
