//! The agent as a systemd service: readiness on a NOTIFY_SOCKET of the test's own, no
//! unenforced window while the agent starts, the configuration file, and exit codes.
//! Real kernel, real binary, real curl and python clients, loopback upstreams.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use scopegate_e2e::*;

/// A policy for `managed`: POST /items allowed with an injected credential, everything
/// else (DELETE in particular) denied.
fn items_policy(managed: &str, upstream: &Upstream, secret: &Path) -> String {
    format!(
        "workload: items\n\
         select:\n  cgroup: {managed}\n\
         egress:\n\
         \x20 - host: {ip}\n\
         \x20   port: {port}\n\
         \x20   credential:\n\
         \x20     header: Authorization\n\
         \x20     format: \"Bearer {{secret}}\"\n\
         \x20     secret_file: {secret}\n\
         \x20   rules:\n\
         \x20     - id: create-item\n\
         \x20       methods: [POST]\n\
         \x20       path: /items\n",
        ip = upstream.addr.ip(),
        port = upstream.addr.port(),
        secret = secret.display(),
    )
}

/// [`items_policy`] enforced: `DELETE /items/1` gets a 403, `POST /items` reaches the
/// upstream (the only request it sees) with the injected `Bearer s3cret`.
fn delete_refused_post_forwarded_with_credential(managed: &str, upstream: &Upstream) {
    let out = curl_in(
        managed,
        &["-X", "DELETE", "-w", STATUS, &upstream.url("/items/1")],
    );
    let (status, body) = status_and_body(&out);
    assert_eq!(
        status,
        403,
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl_in(
        managed,
        &[
            "-X",
            "POST",
            "-d",
            "x",
            "-w",
            STATUS,
            &upstream.url("/items"),
        ],
    );
    assert_eq!(status_and_body(&out).0, 200, "{out:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "POST");
    assert!(
        seen[0]
            .headers
            .contains(&("authorization".into(), "Bearer s3cret".into())),
        "{seen:?}"
    );
}

/// Reads datagrams from the notify socket until one holds `READY=1`; returns every
/// message received, in order.
fn wait_for_ready(socket: &UnixDatagram, agent: &Agent) -> Vec<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        assert!(
            Instant::now() < deadline,
            "no READY=1 within 20 s; got {messages:?}\n{}",
            agent.stderr().join("\n")
        );
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let ready = text.lines().any(|l| l == "READY=1");
                messages.push(text);
                if ready {
                    return messages;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
}

#[test]
fn ready_is_notified_only_once_managed_connects_are_enforced() {
    privileged_test("ready_is_notified_only_once_managed_connects_are_enforced");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let policies = policy_dir(&[("items.yaml", items_policy(&managed, &upstream, &secret))]);
    let pins = PinDir::new();
    let notify_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    // The configuration file is read (metrics_addr comes only from it) and the flags
    // override it (its policies directory does not exist; --policies wins).
    let metrics_port = free_port();
    let config = dir.path().join("scopegate.yaml");
    std::fs::write(
        &config,
        format!(
            "policies: /nonexistent/overridden-by-the-flag\nmetrics_addr: 127.0.0.1:{metrics_port}\n"
        ),
    )
    .unwrap();
    let mut cfg = AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        dir.path().join("audit.jsonl"),
    );
    cfg.env
        .push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    cfg.extra = vec!["--config".into(), config.display().to_string()];
    let mut agent = Agent::spawn(cfg);
    let messages = wait_for_ready(&socket, &agent);

    // At the moment READY=1 arrives, a forbidden request of the managed cgroup is
    // decided: refused with a 403 and a record, and it never reaches the upstream.
    delete_refused_post_forwarded_with_credential(&managed, &upstream);
    let records = agent.wait_audit(2);
    let deny = records
        .iter()
        .find(|r| r["method"] == "DELETE")
        .unwrap_or_else(|| panic!("no record of the DELETE: {records:#?}"));
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["workload"], "items");
    assert_eq!(deny["cgroup"], managed.as_str());
    assert!(
        records
            .iter()
            .any(|r| r["method"] == "POST" && r["decision"] == "allow"),
        "{records:#?}"
    );

    // The phases were announced before READY=1, and READY=1 came once.
    let before: Vec<&String> = messages[..messages.len() - 1].iter().collect();
    assert!(
        before
            .iter()
            .any(|m| m.contains("STATUS=attaching the hooks")),
        "{messages:?}"
    );
    assert!(
        before.iter().all(|m| !m.contains("READY=1")),
        "{messages:?}"
    );
    assert!(
        messages
            .last()
            .unwrap()
            .contains("STATUS=enforcing 1 workload(s)"),
        "{messages:?}"
    );

    // The metrics address came from the configuration file.
    let mut health = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    health
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    health.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // SIGHUP: RELOADING=1, then READY=1 again; SIGTERM: STOPPING=1.
    agent.signal(1);
    let reload = wait_for_ready(&socket, &agent);
    assert!(
        reload.iter().any(|m| m.contains("RELOADING=1")),
        "{reload:?}"
    );
    agent.signal(15);
    assert_eq!(agent.wait_exit(), Some(0));
    let mut buf = [0u8; 4096];
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1");
    let stderr = agent.stderr().join("\n");
    assert!(!stderr.contains("cannot notify"), "{stderr}");
}

/// What one request of the workload loop got.
#[derive(Debug, PartialEq)]
enum Outcome {
    Status(u16),
    /// The connection was refused, reset or denied (EPERM): nothing was sent.
    Refused(String),
}

fn parse_outcomes(text: &str) -> Vec<(String, Outcome)> {
    text.lines()
        .map(|line| {
            let (method, result) = line.split_once(' ').unwrap();
            let outcome = match result.parse::<u16>() {
                Ok(code) => Outcome::Status(code),
                Err(_) => Outcome::Refused(result.to_owned()),
            };
            (method.to_owned(), outcome)
        })
        .collect()
}

/// The workload's loop: a forbidden DELETE and an allowed POST every 20 ms, each on a new
/// connection, until `stop` exists (at most 10 s and 250 rounds).
const LOOP: &str = r#"
import http.client, os, sys, time
host, port, stop, started = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
start = time.monotonic()
for _ in range(250):
    if os.path.exists(stop) or time.monotonic() - start > 10:
        break
    for method, path, body in (("DELETE", "/items/1", None), ("POST", "/items", b"x")):
        try:
            c = http.client.HTTPConnection(host, port, timeout=3)
            c.request(method, path, body=body)
            print(method, c.getresponse().status, flush=True)
            c.close()
        except Exception as e:
            print(method, type(e).__name__, flush=True)
    if not os.path.exists(started):
        open(started, "w").close()
    time.sleep(0.02)
"#;

#[test]
fn a_workload_looping_through_an_agent_restart_is_never_unenforced() {
    privileged_test("a_workload_looping_through_an_agent_restart_is_never_unenforced");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.3");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let policies = policy_dir(&[("items.yaml", items_policy(&managed, &upstream, &secret))]);
    let pins = PinDir::new();
    // A first run leaves the hooks pinned (as after a crash, an upgrade or `systemctl
    // restart`), then stops.
    let mut first = Agent::start(AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        dir.path().join("first.jsonl"),
    ));
    first.stop();

    // The workload starts looping while no agent runs.
    let stop = dir.path().join("stop");
    let started = dir.path().join("started");
    let client = {
        let managed = managed.clone();
        let ip = upstream.addr.ip().to_string();
        let port = upstream.addr.port().to_string();
        let stop = stop.display().to_string();
        let started = started.display().to_string();
        thread::spawn(move || {
            let out = Command::new(bin())
                .args(["exec", "--cgroup", &managed, "--", "python3", "-c", LOOP])
                .args([&ip, &port, &stop, &started])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).to_string()
        })
    };
    // Its first round (a DELETE and a POST) is done before the second agent starts, so
    // the loop's first outcomes are those of no agent at all (under load, python's start
    // can take longer than the agent's).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !started.exists() {
        assert!(
            Instant::now() < deadline,
            "the loop did not start within 10 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());

    // The second agent starts under the loop (on another proxy port).
    let audit = dir.path().join("second.jsonl");
    let mut second = Agent::spawn(AgentConfig::new(policies.path(), &tree, &pins, audit));
    second.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(8);
    while upstream.seen().len() < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&stop, "").unwrap();
    let outcomes = parse_outcomes(&client.join().unwrap());

    // Refusals first (nobody served the pinned redirect), then only policy decisions.
    assert!(
        matches!(outcomes.first(), Some((_, Outcome::Refused(_)))),
        "{outcomes:?}"
    );
    for (method, outcome) in &outcomes {
        match (method.as_str(), outcome) {
            ("DELETE", Outcome::Status(403)) | ("POST", Outcome::Status(200)) => {}
            (_, Outcome::Refused(kind)) => assert!(
                [
                    "ConnectionRefusedError",
                    "ConnectionResetError",
                    "PermissionError",
                    "RemoteDisconnected",
                    "BrokenPipeError",
                ]
                .contains(&kind.as_str()),
                "{method}: {kind}\n{outcomes:?}"
            ),
            _ => panic!(
                "{method}: {outcome:?} is neither a refusal nor the policy's decision\n{outcomes:?}"
            ),
        }
    }
    assert!(
        outcomes.contains(&("DELETE".into(), Outcome::Status(403))),
        "{outcomes:?}"
    );
    let allowed = outcomes
        .iter()
        .filter(|o| o.1 == Outcome::Status(200))
        .count();
    assert!(allowed > 0, "{outcomes:?}");

    // The upstream got no forbidden request, and every request it got went through the
    // proxy: the credential is injected and each has its allow record.
    let seen = upstream.seen();
    assert_eq!(seen.len(), allowed, "{seen:?}\n{outcomes:?}");
    for s in &seen {
        assert_eq!((s.method.as_str(), s.target.as_str()), ("POST", "/items"));
        assert!(
            s.headers
                .contains(&("authorization".into(), "Bearer s3cret".into())),
            "{s:?}"
        );
    }
    second.stop();
    let records = second.audit_records();
    let allows = records
        .iter()
        .filter(|r| r["decision"] == "allow" && r["method"] == "POST")
        .count();
    assert_eq!(allows, seen.len(), "{records:#?}");
    let denies = records
        .iter()
        .filter(|r| r["decision"] == "deny" && r["method"] == "DELETE")
        .count();
    let refused_by_policy = outcomes
        .iter()
        .filter(|o| o.1 == Outcome::Status(403))
        .count();
    assert_eq!(denies, refused_by_policy, "{records:#?}");
    // Refusals while the agent started were kernel denies, recorded as such.
    for r in records
        .iter()
        .filter(|r| r["reason"] == "agent_not_configured")
    {
        assert_eq!(r["decision"], "deny", "{r}");
        assert_eq!(r["cgroup"], managed.as_str(), "{r}");
    }
}

/// Runs `scopegate ARGS` and returns (exit code, stderr).
fn scopegate(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn exit_codes_tell_configuration_privilege_and_other_failures_apart() {
    privileged_test("exit_codes_tell_configuration_privilege_and_other_failures_apart");
    let tree = CgroupTree::new();
    let pins = PinDir::new();
    let dir = tempfile::tempdir().unwrap();
    let base = |policies: &str| {
        vec![
            "run".to_owned(),
            "--policies".into(),
            policies.to_owned(),
            "--proxy-port".into(),
            free_port().to_string(),
            "--pin-dir".into(),
            pins.0.display().to_string(),
            "--cgroup-root".into(),
            tree.dir.display().to_string(),
            "--no-audit-stdout".into(),
        ]
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        scopegate(&args)
    };
    // Two bad policy files: 78, one line per error, each printed once.
    let bad = policy_dir(&[
        ("a.yaml", "workload: a\nbogus: 1\n".into()),
        ("b.yaml", "workload: b\nbogus: 2\n".into()),
    ]);
    let (code, stderr) = run(base(bad.path().to_str().unwrap()));
    assert_eq!(code, Some(78), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 2, "{stderr}");
    assert!(
        errors[0].contains("a.yaml:2:1") && !errors[0].contains("b.yaml"),
        "{stderr}"
    );
    assert!(
        errors[1].contains("b.yaml:2:1") && !errors[1].contains("a.yaml"),
        "{stderr}"
    );
    // A bad configuration file: 78, with file:line:col.
    let config = dir.path().join("scopegate.yaml");
    std::fs::write(&config, "proxy_port: 15001\nproxy-port: 15002\n").unwrap();
    let good = policy_dir(&[(
        "w.yaml",
        "workload: w\nselect:\n  cgroup: /nowhere\negress: []\n".into(),
    )]);
    let mut args = base(good.path().to_str().unwrap());
    args.extend(["--config".into(), config.display().to_string()]);
    let (code, stderr) = run(args.clone());
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:2:1: unknown field `proxy-port`",
            config.display()
        )),
        "{stderr}"
    );
    std::fs::write(&config, "rescan_secs: 0\n").unwrap();
    let (code, stderr) = run(args.clone());
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:1:14: rescan_secs: 0:", config.display())),
        "{stderr}"
    );
    let (code, stderr) = run({
        let mut a = base(good.path().to_str().unwrap());
        a.extend(["--config".into(), "/nonexistent/scopegate.yaml".into()]);
        a
    });
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("/nonexistent/scopegate.yaml"), "{stderr}");
    // A port in use: 1 (transient), the OS error printed once.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let mut args = base(good.path().to_str().unwrap());
    args[4] = port;
    let (code, stderr) = run(args);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.matches("in use").count(), 1, "{stderr}");
    // Without privileges: 77.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(bin())
        .args(["run", "--policies"])
        .arg(good.path())
        .args(["--proxy-port", &free_port().to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(77), "{out:?}");
}

/// The shipped unit's own sandbox (`packaging/scopegate.service`, emulated by
/// [`unit_sandbox`] since systemd is not PID 1 here: read-only file system with its
/// writable directories, its capabilities and securebits, no new privileges, its system
/// call filter and address families, its file limit, environment and umask) around the
/// shipped configuration file: the agent starts, says READY=1, enforces in the kernel and
/// in the proxy, injects the credential, answers on the admin socket, reloads and stops
/// cleanly. A unit that takes away something the agent needs fails here, not on a host.
/// The GID the test gives the unit's `scopegate` group (no such group exists on the host;
/// the sandbox's /etc/group has it).
const ADMIN_GID: u32 = 64_999;

#[test]
fn the_shipped_unit_sandbox_runs_an_enforcing_agent() {
    privileged_test("the_shipped_unit_sandbox_runs_an_enforcing_agent");
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let upstream = Upstream::start("127.0.0.2");
    let dir = tempfile::tempdir().unwrap();
    let [state, logs, run, config_dir] =
        ["state", "logs", "run", "etc"].map(|d| dir.path().join(d));
    for d in [&state, &logs, &run, &config_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    let secret = config_dir.join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let policies = policy_dir(&[("items.yaml", items_policy(&managed, &upstream, &secret))]);
    // The pin directory exists before the start, as tmpfiles.d/scopegate.conf makes it.
    let pins = PinDir::new();
    std::fs::create_dir_all(&pins.0).unwrap();
    // The shipped configuration file, its paths moved into the test's directories.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/scopegate.yaml"),
    )
    .unwrap();
    let metrics_port = free_port();
    let config_text = shipped
        .replace("/etc/scopegate/policies", policies.path().to_str().unwrap())
        .replace("/sys/fs/bpf/scopegate", pins.0.to_str().unwrap())
        .replace("/var/lib/scopegate", state.to_str().unwrap())
        .replace("/var/log/scopegate", logs.to_str().unwrap())
        .replace("/run/scopegate", run.to_str().unwrap())
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{metrics_port}"));
    for unit_path in [
        "/etc/scopegate/",
        "/var/lib/scopegate",
        "/var/log/scopegate",
        "/run/scopegate",
    ] {
        assert!(
            !config_text.contains(unit_path),
            "{unit_path} left in\n{config_text}"
        );
    }
    let config = config_dir.join("scopegate.yaml");
    std::fs::write(&config, config_text).unwrap();
    let notify_path = run.join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();

    let mut cfg = AgentConfig::new(policies.path(), &tree, &pins, logs.join("audit.jsonl"));
    cfg.state_dir = Some(state.clone());
    cfg.admin_socket = Some(run.join("admin.sock"));
    cfg.env
        .push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    // As systemd sets it for WatchdogSec=2s (the unit's is 30 s).
    cfg.env.push(("WATCHDOG_USEC".into(), "2000000".into()));
    cfg.extra = vec!["--config".into(), config.display().to_string()];
    cfg.wrapper = unit_sandbox(&[
        ("StateDirectory", &state),
        ("LogsDirectory", &logs),
        ("RuntimeDirectory", &run),
        ("/sys/fs/bpf/scopegate", &pins.0),
        // The group the package's sysusers.d file creates.
        (
            "SupplementaryGroups",
            Path::new(&format!("scopegate={ADMIN_GID}")),
        ),
    ]);
    let mut agent = Agent::spawn(cfg);
    let messages = wait_for_ready(&socket, &agent);
    assert!(
        messages
            .last()
            .unwrap()
            .contains("STATUS=enforcing 1 workload(s)"),
        "{messages:?}"
    );

    // Inside the sandbox, the agent's view: read-only outside its directories, the
    // unit's capabilities, no new privileges, a seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:\t")))
            .unwrap_or_else(|| panic!("no {name} in\n{status}"))
            .to_owned()
    };
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    assert_eq!(field("Seccomp"), "2", "{status}");
    // CAP_SYS_ADMIN (21), CAP_SYS_PTRACE (19), CAP_NET_ADMIN (12), CAP_BPF (39): nothing else.
    let want = (1u64 << 21) | (1 << 19) | (1 << 12) | (1 << 39);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            u64::from_str_radix(&field(set), 16).unwrap(),
            want,
            "{set}: {status}"
        );
    }

    // Enforced in the proxy: the forbidden DELETE is refused and recorded, the POST
    // forwarded with the credential the sandboxed agent read.
    delete_refused_post_forwarded_with_credential(&managed, &upstream);
    // Enforced in the kernel: a port no destination names is refused at connect.
    let sink = TcpSink::start_avoiding("127.0.0.3", &[upstream.addr.port(), agent.port]);
    let probe = python_in(
        &managed,
        &format!(
            "import socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.3', {}))\n    print('connected')\nexcept OSError as e:\n    print(e.errno)\n",
            sink.addr.port()
        ),
    );
    assert_eq!(probe.trim(), "1", "EPERM expected: {probe}");

    // The admin socket in the runtime directory has the unit's group (the agent is in
    // it, without CAP_CHOWN) and mode 0660, and answers.
    let meta = std::fs::metadata(run.join("admin.sock")).unwrap();
    {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        assert_eq!(meta.gid(), ADMIN_GID, "{meta:?}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o660, "{meta:?}");
    }
    let out = Command::new(bin())
        .args(["status", "--admin-socket"])
        .arg(run.join("admin.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("): healthy") && text.contains("1 workload(s)"),
        "{text}"
    );

    // The control loop pings the watchdog (every WATCHDOG_USEC / 2) while it runs.
    thread::sleep(Duration::from_millis(2500));
    // SIGHUP reloads inside the sandbox; SIGTERM stops with the final record anchored in
    // the logs directory.
    agent.signal(1);
    let reload = wait_for_ready(&socket, &agent);
    assert!(
        reload.iter().any(|m| m.contains("RELOADING=1")),
        "{reload:?}"
    );
    assert!(
        reload.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2,
        "{reload:?}"
    );
    agent.signal(15);
    assert_eq!(agent.wait_exit(), Some(0), "{}", agent.stderr().join("\n"));
    // The whole run: agent_started … agent_stopping (then the signed checkpoint: the
    // shipped configuration sets audit_signing_key in the state directory).
    let records = agent.all_audit_records();
    let reasons: Vec<&str> = records
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert_eq!(reasons.first(), Some(&"agent_started"), "{reasons:?}");
    assert!(reasons.contains(&"agent_stopping"), "{reasons:?}");
    assert!(
        records.last().is_some_and(|r| r["checkpoint"].is_object()),
        "{records:#?}"
    );
    let verify = Command::new(bin())
        .args(["audit", "verify"])
        .arg(logs.join("audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let stderr = agent.stderr().join("\n");
    for bad in [
        "Operation not permitted",
        "Read-only file system",
        "Permission denied",
    ] {
        assert!(!stderr.contains(bad), "{bad} in the agent's log:\n{stderr}");
    }
}
