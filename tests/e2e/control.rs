//! The admin socket (`scopegate status`, `workloads`, `reload`, `policy explain --live`)
//! and health that reflects enforcement (`uninstall --force` while the agent runs is
//! detected, re-attached and recorded), against the real agent, kernel and curl.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::HashSet,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use scopegate_e2e::*;

fn policy(cgroup: &str, upstream: &Upstream, allowed: &str) -> String {
    format!(
        "workload: web\nselect:\n  cgroup: {cgroup}\negress:\n  - host: {ip}\n    port: {port}\n    rules:\n      - id: read\n        methods: [GET]\n        path: {allowed}\n",
        ip = upstream.addr.ip(),
        port = upstream.addr.port()
    )
}

/// `scopegate ARGS` (a CLI command talking to the agent), with a time limit from the
/// command's own timeouts.
fn cli(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn admin(agent: &Agent, cmd: &str, extra: &[&str]) -> Output {
    let socket = agent.admin_socket.to_str().unwrap().to_owned();
    let mut args = vec![cmd, "--admin-socket", socket.as_str()];
    args.extend_from_slice(extra);
    cli(&args)
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"))
}

fn status(agent: &Agent) -> serde_json::Value {
    let out = admin(agent, "status", &["--json"]);
    assert!(out.status.success(), "{out:?}");
    json(&out)
}

/// The ids of the bpf programs a process holds open, from /proc/PID/fdinfo.
fn held_program_ids(pid: u32) -> HashSet<u64> {
    let mut ids = HashSet::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(id) = line.strip_prefix("prog_id:") {
                ids.insert(id.trim().parse().unwrap());
            }
        }
    }
    ids
}

/// Waits up to `limit` for audit records matching `pred`.
fn wait_records(
    agent: &Agent,
    limit: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        let found: Vec<_> = agent
            .all_audit_records()
            .into_iter()
            .filter(&pred)
            .collect();
        if !found.is_empty() || Instant::now() > deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

struct Fixture {
    upstream: Upstream,
    app: String,
    policies: tempfile::TempDir,
    pins: PinDir,
    tree: CgroupTree,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let tree = CgroupTree::new();
        let app = tree.child("app");
        let upstream = Upstream::start("127.0.0.2");
        let policies = policy_dir(&[("web.yaml", policy(&app, &upstream, "/allowed/**"))]);
        Self {
            upstream,
            app,
            policies,
            pins: PinDir::new(),
            tree,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn start(&self, extra: &[&str]) -> Agent {
        let mut config = AgentConfig::new(
            self.policies.path(),
            &self.tree,
            &self.pins,
            self.dir.path().join("audit.jsonl"),
        );
        config.extra = extra.iter().map(|s| (*s).to_owned()).collect();
        Agent::start(config)
    }

    fn write_policy(&self, text: &str) {
        fs::write(self.policies.path().join("web.yaml"), text).unwrap();
    }

    fn get(&self, path: &str) -> u16 {
        let out = curl_in(&self.app, &["-w", STATUS, &self.upstream.url(path)]);
        status_and_body(&out).0
    }
}

/// A process in a cgroup, killed by PID on drop.
struct Sleeper(std::process::Child);

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn status_workloads_reload_and_live_explain_over_the_admin_socket() {
    privileged_test("status_workloads_reload_and_live_explain_over_the_admin_socket");
    let f = Fixture::new();
    let agent = f.start(&["--health-interval-secs", "0.5"]);

    // The socket: 0660, a socket file.
    let meta = fs::metadata(&agent.admin_socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    // status, against reality.
    let sleeper = Sleeper(
        Command::new(bin())
            .args(["exec", "--cgroup", &f.app, "--", "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let s = status(&agent);
    assert_eq!(s["pid"], agent.pid());
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["enforcement"]["healthy"], true, "{s:#}");
    let hooks = s["hooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 10, "{s:#}");
    let held = held_program_ids(agent.pid());
    for h in hooks {
        assert_eq!(h["attached"], true, "{h}");
        assert_eq!(h["pinned"], true, "{h}");
        assert!(
            held.contains(&h["program_id"].as_u64().unwrap()),
            "program id {} is not a program the agent holds ({held:?})",
            h["program_id"]
        );
        let pin = h["pin"].as_str().unwrap();
        assert!(pin.starts_with(f.pins.0.to_str().unwrap()), "{pin}");
        assert!(Path::new(pin).exists(), "{pin}");
    }
    assert_eq!(s["cgroups"]["managed"], 1, "{s:#}");
    assert_eq!(s["cgroups"]["held"], 0, "{s:#}");
    assert_eq!(s["audit"]["healthy"], true);
    let started = agent
        .all_audit_records()
        .into_iter()
        .find(|r| r["reason"] == "agent_started")
        .unwrap();
    let hash0 = s["policy"]["hash"].as_str().unwrap().to_owned();
    assert_eq!(
        started["policy_hash"],
        hash0.as_str(),
        "the hash the agent recorded at start"
    );
    assert_eq!(s["policy"]["workloads"], 1);
    // Human text carries the same facts.
    let text = admin(&agent, "status", &[]);
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("(pid {}): healthy", agent.pid())),
        "{text}"
    );
    assert!(text.contains(&hash0), "{text}");

    // workloads: workload → cgroup → pids.
    let out = admin(&agent, "workloads", &["--json"]);
    assert!(out.status.success(), "{out:?}");
    let list = json(&out);
    let web = &list.as_array().unwrap()[0];
    assert_eq!(web["workload"], "web", "{list:#}");
    let cgroup = &web["cgroups"][0];
    assert_eq!(cgroup["path"], f.app.as_str());
    // `scopegate exec` execs sleep: the pid is the sleeper's.
    let pid = u64::from(sleeper.0.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pids = cgroup["pids"].clone();
    while !pids
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p.as_u64() == Some(pid))
    {
        assert!(Instant::now() < deadline, "pid {pid} not listed: {pids}");
        thread::sleep(Duration::from_millis(50));
        pids = json(&admin(&agent, "workloads", &["--json"]))[0]["cgroups"][0]["pids"].clone();
    }
    let text = admin(&agent, "workloads", &[]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&format!("{} (id ", f.app)));
    drop(sleeper);

    // An edit and a reload: the hash changes, the new policy decides.
    assert_eq!(f.get("/allowed/a"), 200);
    f.write_policy(&policy(&f.app, &f.upstream, "/other/**"));
    let out = admin(&agent, "reload", &["--json"]);
    assert!(out.status.success(), "{out:?}");
    let reload = json(&out);
    assert_eq!(reload["ok"], true, "{reload:#}");
    let hash1 = reload["policy_hash"].as_str().unwrap().to_owned();
    assert_ne!(hash1, hash0);
    let s = status(&agent);
    assert_eq!(s["policy"]["hash"], hash1.as_str());
    // (The inotify watch may reload the same files too; this answer is the socket's own.)
    assert_eq!(reload["trigger"], "admin socket");
    assert_eq!(f.get("/other/a"), 200);
    assert_eq!(f.get("/allowed/a"), 403);

    // A broken policy: reload answers its file:line:col errors and exits 78; the last good
    // policy keeps enforcing.
    f.write_policy(&format!(
        "{}    colour: blue\n",
        policy(&f.app, &f.upstream, "/allowed/**")
    ));
    let out = admin(&agent, "reload", &[]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = f.policies.path().join("web.yaml");
    assert!(stderr.contains("REJECTED"), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("{}:", file.display())) && l.contains("colour")),
        "an error line file:line:col: … naming the field: {stderr}"
    );
    let position = stderr
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{}:", file.display())))
        .unwrap();
    let mut parts = position.splitn(3, ':');
    assert!(parts.next().unwrap().parse::<u32>().is_ok(), "{position}");
    assert!(parts.next().unwrap().parse::<u32>().is_ok(), "{position}");
    let s = status(&agent);
    assert_eq!(
        s["policy"]["hash"],
        hash1.as_str(),
        "still the last good policy"
    );
    assert_eq!(s["last_reload"]["ok"], false);
    assert!(
        s["last_reload"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    let before = agent.audit_records().len();
    assert_eq!(f.get("/allowed/b"), 403, "the old policy still forbids it");
    let records = agent.wait_audit(before + 1);
    let last = records.last().unwrap();
    assert_eq!(last["decision"], "deny", "{last:#}");
    assert_eq!(last["path"], "/allowed/b");
    assert!(f.upstream.seen().iter().all(|s| s.target != "/allowed/b"));

    // explain --live: the running snapshot (/other/**), not the files (which do not load).
    let socket = agent.admin_socket.to_str().unwrap();
    let live = |path: &str| {
        cli(&[
            "policy",
            "explain",
            "--live",
            "--admin-socket",
            socket,
            "--workload",
            "web",
            "--request",
            &format!("GET {}", f.upstream.url(path)),
        ])
    };
    let allowed = live("/other/x");
    assert_eq!(allowed.status.code(), Some(0), "{allowed:?}");
    assert!(
        String::from_utf8_lossy(&allowed.stdout).contains("read"),
        "{allowed:?}"
    );
    let denied = live("/allowed/x");
    assert_eq!(denied.status.code(), Some(1), "{denied:?}");
    let offline = cli(&[
        "policy",
        "explain",
        f.policies.path().to_str().unwrap(),
        "--workload",
        "web",
        "--request",
        &format!("GET {}", f.upstream.url("/other/x")),
    ]);
    assert_ne!(
        offline.status.code(),
        Some(0),
        "the files on disk do not load: {offline:?}"
    );
    let unknown = cli(&[
        "policy",
        "explain",
        "--live",
        "--admin-socket",
        socket,
        "--workload",
        "nope",
        "--request",
        "GET http://127.0.0.2/",
    ]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no such workload"),
        "{unknown:?}"
    );
}

/// Sends `bytes` on a fresh connection (then, if `close`, ends the write side) and returns
/// the agent's answer line.
fn exchange(socket: &Path, bytes: &[u8], close: bool) -> serde_json::Value {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let payload = bytes.to_vec();
    // A large write may stop half-way when the agent answers and closes: that is fine.
    let w = thread::spawn(move || {
        let _ = writer.write_all(&payload);
        if close {
            let _ = writer.shutdown(std::net::Shutdown::Write);
        }
    });
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line).unwrap();
    w.join().unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

#[test]
fn hostile_admin_clients_get_errors_and_cannot_wedge_the_agent() {
    privileged_test("hostile_admin_clients_get_errors_and_cannot_wedge_the_agent");
    let f = Fixture::new();
    let agent = f.start(&[]);
    let socket = agent.admin_socket.clone();
    let kind = |v: &serde_json::Value| v["error"]["kind"].as_str().unwrap_or("").to_owned();

    let garbage = exchange(&socket, b"\x00\xffGET / HTTP/1.1\r\n\r\n", false);
    assert_eq!(garbage["ok"], false);
    assert_eq!(kind(&garbage), "bad_request", "{garbage}");
    let wrong = exchange(&socket, b"{\"v\":1,\"cmd\":\"shutdown\"}\n", false);
    assert_eq!(kind(&wrong), "bad_request", "{wrong}");
    assert!(
        wrong["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutdown")
    );
    let huge = exchange(&socket, &vec![b'a'; 1 << 20], false);
    assert_eq!(kind(&huge), "too_large", "{huge}");
    let half = exchange(&socket, b"{\"v\":1,\"cmd\":\"sta", true);
    assert_eq!(kind(&half), "incomplete", "{half}");

    // Idle clients: each is answered `timeout` and closed; while they hold every slot a
    // further client is answered `busy`; the agent serves again afterwards.
    let idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(200));
    let busy = exchange(&socket, b"{\"v\":1,\"cmd\":\"status\"}\n", false);
    assert_eq!(kind(&busy), "busy", "{busy}");
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(kind(&v), "timeout", "{v}");
    }
    let s = status(&agent);
    assert_eq!(s["pid"], agent.pid(), "the agent still serves the socket");
    assert_eq!(f.get("/allowed/x"), 200, "and the proxy");

    // No agent on a socket: a clear message naming it, exit 69.
    let gone = f.dir.path().join("nobody.sock");
    let out = cli(&["status", "--admin-socket", gone.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(gone.to_str().unwrap()),
        "{out:?}"
    );
}

#[test]
fn uninstall_while_running_is_refused_or_restored() {
    privileged_test("uninstall_while_running_is_refused_or_restored");
    let f = Fixture::new();
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let agent = f.start(&[
        "--health-interval-secs",
        "0.5",
        "--metrics-addr",
        &metrics_addr,
    ]);
    let pin_dir = f.pins.0.to_str().unwrap().to_owned();
    let before = status(&agent);

    // Without --force: refused, says what --force would do, nothing removed.
    let out = cli(&["uninstall", "--pin-dir", &pin_dir]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("agent is running") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(stderr.contains("re-attaches"), "{stderr}");
    assert_eq!(status(&agent)["hooks"], before["hooks"], "nothing changed");

    // With --force: removed, then re-attached by the health check and recorded.
    let out = cli(&["uninstall", "--force", "--pin-dir", &pin_dir]);
    assert!(out.status.success(), "{out:?}");
    let restored = wait_records(&agent, Duration::from_secs(10), |r| {
        r["reason"] == "enforcement_restored"
    });
    assert_eq!(restored.len(), 1, "{:#?}", agent.all_audit_records());
    let r = &restored[0];
    assert_eq!(r["decision"], "error");
    assert!(
        r["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("not attached")),
        "{r:#}"
    );
    assert!(
        agent
            .stderr()
            .iter()
            .any(|l| l.contains("ERROR") && l.contains("enforcement restored")),
        "logged at error level"
    );
    // Enforced again: forbidden refused with a record, allowed proxied.
    let n = agent.audit_records().len();
    assert_eq!(f.get("/forbidden"), 403);
    let records = agent.wait_audit(n + 1);
    assert_eq!(records.last().unwrap()["path"], "/forbidden");
    assert!(f.upstream.seen().iter().all(|s| s.target != "/forbidden"));
    assert_eq!(f.get("/allowed/x"), 200);
    // status and /healthz show the incident; the same programs are attached and pinned.
    let s = status(&agent);
    assert_eq!(s["enforcement"]["healthy"], true, "{s:#}");
    let incident = &s["enforcement"]["last_incident"];
    assert_eq!(incident["outcome"], "enforcement_restored", "{s:#}");
    assert!(!incident["problems"].as_array().unwrap().is_empty());
    for (now, then) in s["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .zip(before["hooks"].as_array().unwrap())
    {
        assert_eq!(now["program_id"], then["program_id"]);
        assert_eq!(now["attached"], true, "{now}");
        assert_eq!(now["pinned"], true, "{now}");
        assert_ne!(now["link_id"], then["link_id"], "a new link");
    }
    let text = String::from_utf8_lossy(&admin(&agent, "status", &[]).stdout).to_string();
    assert!(
        text.contains("last incident: enforcement_restored"),
        "{text}"
    );
    let health = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", STATUS])
        .arg(format!("http://{metrics_addr}/healthz"))
        .output()
        .unwrap();
    let (code, body) = status_and_body(&health);
    assert_eq!(code, 200, "{health:?}");
    assert!(
        body.contains("last incident: enforcement_restored"),
        "{body}"
    );
    // The re-created pin directory is locked again: uninstall still refuses.
    let out = cli(&["uninstall", "--pin-dir", &pin_dir]);
    assert!(!out.status.success(), "{out:?}");

    // A directory without pins: says so, exits non-zero.
    let empty = tempfile::tempdir().unwrap();
    let out = cli(&["uninstall", "--pin-dir", empty.path().to_str().unwrap()]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no scopegate pins"),
        "{out:?}"
    );
    let missing = empty.path().join("missing");
    let out = cli(&["uninstall", "--pin-dir", missing.to_str().unwrap()]);
    assert!(!out.status.success(), "{out:?}");
}

/// When the health check cannot put the pins back (here: the pin directory was moved away
/// and a symlink into nowhere took its place, so re-pinning fails), the agent records
/// `enforcement_lost` once, logs at error level, and `/healthz` and `status` say unhealthy
/// while it keeps retrying; once the obstacle is gone the next check restores the pins and
/// records `enforcement_restored`.
#[test]
fn enforcement_that_cannot_be_restored_is_recorded_lost_and_turns_health_red() {
    privileged_test("enforcement_that_cannot_be_restored_is_recorded_lost_and_turns_health_red");
    let f = Fixture::new();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let agent = f.start(&[
        "--health-interval-secs",
        "1",
        "--metrics-addr",
        &metrics_addr,
    ]);
    let healthz = || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-w", STATUS])
            .arg(format!("http://{metrics_addr}/healthz"))
            .output()
            .unwrap();
        status_and_body(&out)
    };
    assert_eq!(healthz().0, 200);
    let pin_dir = f.pins.0.to_str().unwrap().to_owned();
    // The pins go (uninstall --force) and a symlink into nowhere takes the directory's
    // place before the next check (1 s apart) can re-create it; if a check came in between
    // and restored the pins already, the symlink finds the path taken: go again.
    let mut blocked = false;
    for _ in 0..5 {
        let out = cli(&["uninstall", "--force", "--pin-dir", &pin_dir]);
        assert!(out.status.success(), "{out:?}");
        match std::os::unix::fs::symlink("/nonexistent/scopegate-pins", &f.pins.0) {
            Ok(()) => {
                blocked = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("symlink at {pin_dir}: {e}"),
        }
    }
    assert!(blocked, "the health check re-created the pins every time");

    let lost = wait_records(&agent, Duration::from_secs(15), |r| {
        r["reason"] == "enforcement_lost"
    });
    assert_eq!(lost.len(), 1, "{:#?}", agent.all_audit_records());
    assert_eq!(lost[0]["decision"], "error", "{:#}", lost[0]);
    assert!(
        agent
            .stderr()
            .iter()
            .any(|l| l.contains("ERROR") && l.contains("enforcement lost")),
        "logged at error level"
    );
    let (code, body) = healthz();
    assert_eq!(code, 503, "{body}");
    let out = admin(&agent, "status", &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = admin(&agent, "status", &["--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let s = json(&out);
    assert_eq!(s["enforcement"]["healthy"], false, "{s:#}");
    assert_eq!(
        s["enforcement"]["last_incident"]["outcome"], "enforcement_lost",
        "{s:#}"
    );
    // Retried every check, recorded once per incident.
    thread::sleep(Duration::from_secs(3));
    let again = agent
        .all_audit_records()
        .into_iter()
        .filter(|r| r["reason"] == "enforcement_lost")
        .count();
    assert_eq!(again, 1, "{:#?}", agent.all_audit_records());

    // The obstacle goes: the next check restores, records it, health is green again.
    std::fs::remove_file(&f.pins.0).unwrap();
    // (Restorations of a race above were recorded too: count from here.)
    let after_lost = |r: &serde_json::Value| {
        r["reason"] == "enforcement_restored" && r["seq"].as_u64() > lost[0]["seq"].as_u64()
    };
    let restored = wait_records(&agent, Duration::from_secs(15), after_lost);
    assert_eq!(restored.len(), 1, "{:#?}", agent.all_audit_records());
    let s = status(&agent);
    assert_eq!(s["enforcement"]["healthy"], true, "{s:#}");
    assert_eq!(
        s["enforcement"]["last_incident"]["outcome"], "enforcement_restored",
        "{s:#}"
    );
    assert_eq!(healthz().0, 200);
    assert_eq!(f.get("/forbidden"), 403);
    assert_eq!(f.get("/allowed/x"), 200);
}
