//! `cargo xtask soak --minutes N`: the release agent under hostile conditions for N
//! minutes, outside CI (never part of `cargo xtask test`).
//!
//! In throwaway cgroups (`/sgsoak<pid>/web`, `/sgsoak<pid>/slow`) with its own pins and
//! loopback upstreams, it runs at once:
//!
//! * **mixed load**: every tick (10 s) two Python clients in `web` (each at most
//!   [`CLIENT_REQUESTS`] requests in at most [`CLIENT_SECONDS`]) send allowed requests,
//!   requests to a forbidden path of the allowed upstream, requests to a path only some
//!   policy versions allow, and connects to a destination no policy names; plus one curl
//!   of an allowed and one of a forbidden path. Every path is unique.
//! * **fd pressure**: the agent runs under `prlimit --nofile=`[`AGENT_NOFILE`] (soft and
//!   hard, so it cannot raise it), and a Python workload in `slow` (`max_connections:`
//!   [`SLOW_MAX_CONNECTIONS`]) holds up to [`SLOW_CONNECTIONS`] connections that drip a
//!   request head byte by byte (at most [`SLOW_SECONDS`] each run): the cap refuses the
//!   excess (`connection_limit`) and the header timeout closes the rest (`header_timeout`).
//! * **policy churn** every tick: `web.yaml` gains or loses a rule, and every third tick
//!   `slow.yaml` is swapped (written aside, renamed over).
//! * **kill -9** of the agent every [`KILL_EVERY`], then a restart on the same port, pins
//!   and audit file.
//!
//! At the end it compares what the upstreams received with the audit file: a **bypass** is a
//! forbidden request that reached an upstream, a **missing record** a request an upstream
//! received without an allow decision record for its (unique) path. Both must be 0, and the
//! chain must verify; and the pressure must have happened (at least one `connection_limit`
//! record); the exit status says so.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    bench::procs::{self, CgroupTree, PinDir, Proc},
    ci,
    ctx::Ctx,
    setup,
    upstream::{self, Seen},
};

/// Prefix of the cgroups and pin directories (then the xtask's PID).
const PREFIX: &str = "sgsoak";
/// Policy churn and load rounds.
const TICK: Duration = Duration::from_secs(10);
/// kill -9 of the agent.
const KILL_EVERY: Duration = Duration::from_secs(120);
/// Requests per client run, at most.
const CLIENT_REQUESTS: u32 = 400;
/// Seconds per client run, at most.
const CLIENT_SECONDS: u32 = 9;
/// Slow connections the fd-pressure workload holds, at most.
const SLOW_CONNECTIONS: u32 = 600;
/// The `slow` workload's `max_connections`, below [`SLOW_CONNECTIONS`].
const SLOW_MAX_CONNECTIONS: u32 = 200;
/// The agent's open-file limit (soft and hard).
const AGENT_NOFILE: u32 = 1024;
/// The reasons of the fd-pressure records the report counts.
const PRESSURE_REASONS: [&str; 3] = ["connection_limit", "descriptor_limit", "header_timeout"];
/// Seconds per fd-pressure run, at most.
const SLOW_SECONDS: u32 = 40;
/// The agent's ready line.
const READY_LINE: &str = "scopegate ready";

/// Arguments of `cargo xtask soak`.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    minutes: u64,
}

/// The mixed-load client: bounded in count and time; prints a JSON summary.
const CLIENT_PY: &str = r#"
import http.client, json, socket, sys, time
allowed_host, allowed_port, forbidden_host, forbidden_port, tag, count, seconds = sys.argv[1:8]
allowed_port, forbidden_port, count = int(allowed_port), int(forbidden_port), int(count)
deadline = time.monotonic() + float(seconds)
out = {}
def note(kind, result):
    key = f"{kind} {result}"
    out[key] = out.get(key, 0) + 1
def get(kind, host, port, path):
    try:
        c = http.client.HTTPConnection(host, port, timeout=5)
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        r.read()
        c.close()
        note(kind, r.status)
    except OSError as e:
        note(kind, type(e).__name__ if e.errno is None else f"errno{e.errno}")
    except Exception as e:
        note(kind, type(e).__name__)
for i in range(count):
    if time.monotonic() > deadline:
        break
    k = i % 8
    if k in (0, 1, 2, 4, 5):
        get("allowed", allowed_host, allowed_port, f"/allowed/{tag}-{i}")
    elif k == 3:
        get("forbidden_path", allowed_host, allowed_port, f"/forbidden/{tag}-{i}")
    elif k == 6:
        get("churned", allowed_host, allowed_port, f"/extra/{tag}-{i}")
    else:
        get("forbidden_dst", forbidden_host, forbidden_port, f"/forbidden/{tag}-{i}")
print(json.dumps(out))
"#;

/// The fd-pressure workload: many connections dripping a request head.
const SLOW_PY: &str = r#"
import json, socket, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + seconds
head = f"GET /slow/x HTTP/1.1\r\nHost: {host}:{port}\r\nX-Slow: ".encode()
conns, refused = [], 0
for i in range(count):
    if time.monotonic() > deadline:
        break
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(head[:10])
        conns.append(s)
    except OSError:
        refused += 1
opened, closed = len(conns), 0
while conns and time.monotonic() < deadline:
    time.sleep(2)
    alive = []
    for s in conns:
        try:
            s.sendall(b"a")
            alive.append(s)
        except OSError:
            closed += 1
            s.close()
    conns = alive
for s in conns:
    s.close()
print(json.dumps({"opened": opened, "refused": refused, "closed_by_agent": closed}))
"#;

fn web_policy(web: &str, port: u16, extra: bool) -> String {
    let extra = if extra {
        "      - id: extra\n        methods: [GET]\n        path: /extra/**\n"
    } else {
        ""
    };
    format!(
        "workload: web\nselect:\n  cgroup: {web}\negress:\n  - host: 127.0.0.2\n    port: {port}\n    \
         rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n{extra}"
    )
}

fn slow_policy(slow: &str, port: u16, version: u32) -> String {
    format!(
        "# version {version}\nworkload: slow\nselect:\n  cgroup: {slow}\n\
         max_connections: {SLOW_MAX_CONNECTIONS}\negress:\n  - host: 127.0.0.2\n    \
         port: {port}\n    rules:\n      - id: slow\n        methods: [GET]\n        path: /slow/**\n"
    )
}

/// Writes `text` to `path` through a file next to it and a rename (an atomic swap).
fn swap_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("yaml.swap");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))
}

/// Everything the agent runs with.
struct AgentSetup {
    bin: PathBuf,
    policies: PathBuf,
    port: u16,
    pins: PathBuf,
    root: PathBuf,
    audit: PathBuf,
    work: PathBuf,
}

impl AgentSetup {
    fn start(&self, n: u32) -> Result<Proc> {
        // prlimit sets the limit on itself, then execs the agent (same PID, for kill -9).
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={AGENT_NOFILE}:{AGENT_NOFILE}"))
            .arg("--")
            .arg(&self.bin)
            .arg("run")
            .arg("--policies")
            .arg(&self.policies)
            .arg("--proxy-port")
            .arg(self.port.to_string())
            .arg("--pin-dir")
            .arg(&self.pins)
            .arg("--cgroup-root")
            .arg(&self.root)
            .arg("--audit-file")
            .arg(&self.audit)
            .arg("--no-audit-stdout")
            .arg("--admin-socket")
            .arg(self.work.join("admin.sock"))
            .env("NO_COLOR", "1");
        let log = self.work.join(format!("agent-{n}.log"));
        let mut proc = Proc::spawn("scopegate agent", cmd, &log, None)?;
        proc.wait_log_line(READY_LINE, Duration::from_secs(60))?;
        Ok(proc)
    }
}

/// A bounded helper process whose JSON summary goes to a file.
struct Helper {
    child: Child,
    out: PathBuf,
    deadline: Instant,
}

impl Helper {
    fn spawn(
        bin: &Path,
        cgroup: &str,
        script: &Path,
        args: &[String],
        out: PathBuf,
    ) -> Result<Self> {
        let file = fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
        let child = Command::new(bin)
            .args(["exec", "--cgroup", cgroup, "--", "python3"])
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .context("starting a soak client")?;
        Ok(Self {
            child,
            out,
            deadline: Instant::now() + Duration::from_secs(u64::from(SLOW_SECONDS) + 30),
        })
    }

    /// Whether it is done; kills it (by its PID) past its deadline. Adds its summary.
    fn reap(&mut self, totals: &mut BTreeMap<String, u64>) -> bool {
        let done = match self.child.try_wait() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) if Instant::now() > self.deadline => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                true
            }
            Ok(None) => false,
        };
        if done {
            add_summary(&self.out, totals);
        }
        done
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn add_summary(path: &Path, totals: &mut BTreeMap<String, u64>) {
    let text = fs::read_to_string(path).unwrap_or_default();
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text.trim()) {
        Ok(map) => {
            for (k, v) in map {
                *totals.entry(k).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        Err(_) => *totals.entry("client without summary".into()).or_default() += 1,
    }
}

fn recording_upstream(ip: &str) -> Result<(u16, Seen)> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    let port = listener.local_addr()?.port();
    let seen = Seen::default();
    upstream::serve_recording(listener, seen.clone());
    Ok((port, seen))
}

fn curl(bin: &Path, cgroup: &str, url: &str) -> String {
    let mut cmd = Command::new(bin);
    cmd.args([
        "exec",
        "--cgroup",
        cgroup,
        "--",
        "curl",
        "-s",
        "-o",
        "/dev/null",
    ])
    .args([
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "--noproxy",
        "*",
        url,
    ]);
    match procs::run_bounded(&mut cmd, Duration::from_secs(10)) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(_) => "timeout".into(),
    }
}

/// Runs the soak; returns whether it found no bypass, no missing record, and a verified chain.
pub fn soak(ctx: &Ctx, args: &SoakArgs) -> Result<bool> {
    let host = setup::check_host()?;
    let bin = ci::build_release(ctx)?
        .canonicalize()
        .context("resolving the release binary")?;
    let pid = std::process::id();
    let work = ctx.target_dir.join("soak");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let policies = work.join("policies");
    fs::create_dir_all(&policies).with_context(|| format!("creating {}", policies.display()))?;
    procs::sweep_stale(&bin, &host.cgroup2, PREFIX);
    let name = format!("{PREFIX}{pid}");
    let pins = PinDir::new(&bin, PathBuf::from("/sys/fs/bpf").join(&name));
    let tree = CgroupTree::new(&host.cgroup2, &name)?;
    let web = tree.child("web")?;
    let slow = tree.child("slow")?;
    let (up_port, up_seen) = recording_upstream("127.0.0.2")?;
    let (bad_port, bad_seen) = recording_upstream("127.0.0.3")?;
    let client_py = work.join("client.py");
    let slow_py = work.join("slow.py");
    fs::write(&client_py, CLIENT_PY).context("writing client.py")?;
    fs::write(&slow_py, SLOW_PY).context("writing slow.py")?;
    let web_yaml = policies.join("web.yaml");
    let slow_yaml = policies.join("slow.yaml");
    fs::write(&web_yaml, web_policy(&web, up_port, false)).context("writing web.yaml")?;
    fs::write(&slow_yaml, slow_policy(&slow, up_port, 0)).context("writing slow.yaml")?;
    let agent_setup = AgentSetup {
        bin: bin.clone(),
        policies: policies.clone(),
        port: procs::free_port("127.0.0.1", Some("::1"))?,
        pins: pins.dir.clone(),
        root: tree.dir.clone(),
        audit: work.join("audit.jsonl"),
        work: work.clone(),
    };
    let started = Instant::now();
    let end = started + Duration::from_secs(args.minutes * 60);
    eprintln!(
        "soak: {} min; agent port {}, upstream 127.0.0.2:{up_port}, forbidden 127.0.0.3:{bad_port}, work {}",
        args.minutes,
        agent_setup.port,
        work.display()
    );
    let mut starts = 0;
    let mut agent = agent_setup.start(starts)?;
    let mut last_kill = Instant::now();
    let (mut kills, mut churns, mut rounds) = (0u32, 0u32, 0u32);
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut clients: Vec<Helper> = Vec::new();
    let mut holder: Option<Helper> = None;
    let mut curls: BTreeMap<String, u64> = BTreeMap::new();
    while Instant::now() < end {
        let tick = Instant::now();
        clients.retain_mut(|c| !c.reap(&mut totals));
        if holder.as_mut().is_some_and(|h| h.reap(&mut totals)) {
            holder = None;
        }
        if holder.is_none() {
            let args = [
                "127.0.0.2".to_owned(),
                up_port.to_string(),
                SLOW_CONNECTIONS.to_string(),
                SLOW_SECONDS.to_string(),
            ];
            let out = work.join(format!("slow-{rounds}.json"));
            holder = Some(Helper::spawn(&bin, &slow, &slow_py, &args, out)?);
        }
        for c in 0..2 {
            if clients.len() >= 4 {
                break;
            }
            let tag = format!("r{rounds}c{c}");
            let args = [
                "127.0.0.2".to_owned(),
                up_port.to_string(),
                "127.0.0.3".to_owned(),
                bad_port.to_string(),
                tag.clone(),
                CLIENT_REQUESTS.to_string(),
                CLIENT_SECONDS.to_string(),
            ];
            let out = work.join(format!("client-{tag}.json"));
            clients.push(Helper::spawn(&bin, &web, &client_py, &args, out)?);
        }
        for (kind, path) in [("allowed", "allowed"), ("forbidden_path", "forbidden")] {
            let url = format!("http://127.0.0.2:{up_port}/{path}/curl-{rounds}");
            let code = curl(&bin, &web, &url);
            *curls.entry(format!("curl {kind} {code}")).or_default() += 1;
        }
        // Policy churn: a rule added or removed; every third tick a file swapped.
        churns += 1;
        swap_file(&web_yaml, &web_policy(&web, up_port, churns % 2 == 1))?;
        if churns % 3 == 0 {
            swap_file(&slow_yaml, &slow_policy(&slow, up_port, churns))?;
        }
        if last_kill.elapsed() >= KILL_EVERY {
            eprintln!("soak: kill -9 of the agent");
            agent.kill9();
            kills += 1;
            starts += 1;
            agent = agent_setup.start(starts)?;
            last_kill = Instant::now();
        }
        agent.ensure_running()?;
        rounds += 1;
        eprintln!(
            "soak: {:>4}s round {rounds}: upstream received {}, kills {kills}",
            started.elapsed().as_secs(),
            up_seen.lock().map(|s| s.len()).unwrap_or(0)
        );
        thread::sleep(TICK.saturating_sub(tick.elapsed()));
    }
    // Let the bounded clients finish, then stop everything.
    let drain = Instant::now() + Duration::from_secs(u64::from(SLOW_SECONDS) + 30);
    while !clients.is_empty() && Instant::now() < drain {
        clients.retain_mut(|c| !c.reap(&mut totals));
        thread::sleep(Duration::from_millis(200));
    }
    drop(clients);
    if let Some(mut h) = holder.take() {
        let _ = h.child.kill();
        let _ = h.child.wait();
        add_summary(&h.out, &mut totals);
    }
    agent.stop();
    totals.extend(curls);
    let report = analyse(&bin, &agent_setup.audit, &up_seen, &bad_seen)?;
    print_report(args, started.elapsed(), &totals, &report, kills, churns);
    Ok(report.bypasses == 0
        && report.missing.is_empty()
        && report.verified
        && report.pressure("connection_limit") > 0)
}

/// What the audit file and the upstreams say.
struct Report {
    received: usize,
    bypasses: usize,
    missing: Vec<String>,
    decisions: BTreeMap<String, u64>,
    outcomes: u64,
    verified: bool,
    verify_text: String,
}

impl Report {
    /// Decision records with the fd-pressure reason `reason`.
    fn pressure(&self, reason: &str) -> u64 {
        self.decisions
            .iter()
            .filter(|(key, _)| key.rsplit(' ').next() == Some(reason))
            .map(|(_, n)| n)
            .sum()
    }
}

fn analyse(bin: &Path, audit: &Path, up_seen: &Seen, bad_seen: &Seen) -> Result<Report> {
    let text = fs::read_to_string(audit).with_context(|| format!("reading {}", audit.display()))?;
    let mut allowed_paths = HashSet::new();
    let mut decisions: BTreeMap<String, u64> = BTreeMap::new();
    let mut outcomes = 0;
    for (i, line) in text.lines().enumerate() {
        let r: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON record", audit.display(), i + 1))?;
        if !r["outcome_of"].is_null() {
            outcomes += 1;
            continue;
        }
        let decision = r["decision"].as_str().unwrap_or("?");
        let key = format!(
            "{} {decision} {}",
            r["proto"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("-")
        );
        *decisions.entry(key).or_default() += r["count"].as_u64().unwrap_or(1);
        if matches!(decision, "allow" | "would_deny")
            && let Some(path) = r["path"].as_str()
        {
            allowed_paths.insert(path.to_owned());
        }
    }
    let lock = |s: &Seen| s.lock().map(|v| v.clone()).unwrap_or_default();
    let (up, bad) = (lock(up_seen), lock(bad_seen));
    let bypasses = bad.len() + up.iter().filter(|p| p.starts_with("/forbidden/")).count();
    let missing: Vec<String> = up
        .iter()
        .chain(&bad)
        .filter(|p| !allowed_paths.contains(*p))
        .cloned()
        .collect();
    let out = procs::run_bounded(
        Command::new(bin).args(["audit", "verify"]).arg(audit),
        Duration::from_secs(120),
    )?;
    let verify_text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.is_empty() {
        bail!("the audit file {} is empty", audit.display());
    }
    Ok(Report {
        received: up.len() + bad.len(),
        bypasses,
        missing,
        decisions,
        outcomes,
        verified: out.status.success(),
        verify_text,
    })
}

fn print_report(
    args: &SoakArgs,
    took: Duration,
    totals: &BTreeMap<String, u64>,
    report: &Report,
    kills: u32,
    churns: u32,
) {
    println!(
        "\nsoak report ({} min requested, ran {} s)",
        args.minutes,
        took.as_secs()
    );
    println!("  agent kill -9 + restart: {kills}; policy changes: {churns}");
    println!("  client results (kind result: count):");
    for (k, n) in totals {
        println!("    {k}: {n}");
    }
    println!("  upstream received: {}", report.received);
    println!("  decision records (proto decision reason: count):");
    for (k, n) in &report.decisions {
        println!("    {k}: {n}");
    }
    println!("  outcome records: {}", report.outcomes);
    println!(
        "  fd pressure (agent nofile {AGENT_NOFILE}, slow max_connections {SLOW_MAX_CONNECTIONS}, {SLOW_CONNECTIONS} slow connections):"
    );
    for reason in PRESSURE_REASONS {
        println!("    {reason} records: {}", report.pressure(reason));
    }
    if report.pressure("connection_limit") == 0 {
        println!("    FAILED: the cap never refused a connection (no pressure happened)");
    }
    println!(
        "  audit verify: {}",
        if report.verified { "ok" } else { "FAILED" }
    );
    if !report.verified {
        println!("{}", report.verify_text.trim());
    }
    println!(
        "  bypasses (forbidden requests that reached an upstream): {}",
        report.bypasses
    );
    println!(
        "  missing records (received upstream without a decision record): {}",
        report.missing.len()
    );
    for p in report.missing.iter().take(20) {
        println!("    {p}");
    }
}
