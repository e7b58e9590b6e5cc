//! `cargo xtask demo`: the agent in front of a local upstream, one allowed and one denied
//! request.

use std::{
    env,
    fs::{self, File},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    ci,
    ctx::{self, Ctx},
    sys,
};

/// Where the demo upstream listens (the demo policy allows GET /hello** there).
pub const UPSTREAM_ADDR: &str = "127.0.0.2:8080";
/// The cgroup the demo's clients run in (selected by `policies/demo.yaml`).
const DEMO_CGROUP: &str = "/scopegate-demo/app";
/// What the agent prints to stderr once its hooks are attached and the proxy listens.
const READY_LINE: &str = "scopegate ready";
/// How long the agent gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A background process that is stopped by PID (SIGTERM, then SIGKILL) when dropped,
/// unless [`Background::detach`] was called.
#[derive(Debug)]
struct Background {
    /// Name for messages.
    name: &'static str,
    /// The process; `None` once stopped or detached.
    child: Option<Child>,
}

impl Background {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log`.
    fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}: `{}`", ctx::describe(&cmd)))?;
        println!(
            "demo: started {name} (pid {}), log {}",
            child.id(),
            log.display()
        );
        Ok(Self {
            name,
            child: Some(child),
        })
    }

    /// The PID, while the process is owned.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails if the process has already exited.
    fn ensure_running(&mut self) -> Result<()> {
        let name = self.name;
        let Some(child) = self.child.as_mut() else {
            bail!("{name} is not running");
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                bail!("{name} exited early ({status})")
            }
            Err(err) => bail!("checking on {name}: {err}"),
        }
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL; reaps the process.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = child.id();
        if let Err(err) = sys::sigterm(pid) {
            eprintln!("demo: SIGTERM to {} (pid {pid}): {err}", self.name);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(status)) => {
                    println!("demo: stopped {} (pid {pid}, {status})", self.name);
                    return;
                }
                Ok(None) => thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
        eprintln!(
            "demo: {} (pid {pid}) ignored SIGTERM; killing it",
            self.name
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Leaves the process running after xtask exits; returns its PID.
    fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the demo.
pub fn demo(ctx: &Ctx, keep: bool) -> Result<()> {
    let policies = ctx.root.join("policies");
    let demo_policy = policies.join("demo.yaml");
    if !demo_policy.is_file() {
        bail!(
            "{} is missing: the demo needs the policy that allows GET /hello** on {UPSTREAM_ADDR} for cgroup {DEMO_CGROUP}",
            demo_policy.display()
        );
    }
    let upstream_addr: SocketAddr = UPSTREAM_ADDR
        .parse()
        .with_context(|| format!("parsing {UPSTREAM_ADDR}"))?;
    if TcpStream::connect_timeout(&upstream_addr, Duration::from_millis(300)).is_ok() {
        bail!(
            "something already listens on {UPSTREAM_ADDR} (a demo left running with --keep?); stop it first"
        );
    }

    let bin = ci::build_release(ctx)?;
    fs::create_dir_all(&ctx.target_dir)
        .with_context(|| format!("creating {}", ctx.target_dir.display()))?;

    // The upstream runs as its own process so that `--keep` can leave it behind.
    let xtask = env::current_exe().context("finding the xtask binary")?;
    let mut upstream_cmd = Command::new(xtask);
    upstream_cmd.args(["demo-upstream", "--listen", UPSTREAM_ADDR]);
    let upstream_log = ctx.target_dir.join("demo-upstream.log");
    let mut upstream = Background::spawn("demo upstream", upstream_cmd, &upstream_log)?;
    wait_listening(&mut upstream, upstream_addr, &upstream_log)?;

    // The demo cgroup exists before the agent starts, so the agent selects it from its
    // first scan; `--managed-subtree` makes any other cgroup under /scopegate-demo deny-all.
    let host = crate::setup::check_host()?;
    let demo_dir = host.cgroup2.join(DEMO_CGROUP.trim_start_matches('/'));
    fs::create_dir_all(&demo_dir)
        .with_context(|| format!("creating the demo cgroup {}", demo_dir.display()))?;
    let audit = ctx.target_dir.join("demo-audit.jsonl");
    let audit_start = fs::metadata(&audit).map(|m| m.len()).unwrap_or(0);
    let mut agent_cmd = ctx.command(&bin);
    agent_cmd
        .arg("run")
        .arg("--policies")
        .arg(&policies)
        .arg("--audit-file")
        .arg(&audit)
        .arg("--managed-subtree")
        .arg("/scopegate-demo")
        .arg("--state-dir")
        .arg(ctx.target_dir.join("demo-state"))
        .arg("--admin-socket")
        .arg(ctx.target_dir.join("demo-admin.sock"))
        .env("NO_COLOR", "1");
    let agent_log = ctx.target_dir.join("demo-agent.log");
    let mut agent = Background::spawn("scopegate agent", agent_cmd, &agent_log)?;
    wait_ready(&mut agent, &agent_log)?;

    let url = format!("http://{UPSTREAM_ADDR}/hello");
    let allowed = client(ctx, &bin, &["curl", "-sS", "-i", "--max-time", "10", &url])?;
    let denied = client(
        ctx,
        &bin,
        &[
            "curl",
            "-sS",
            "-i",
            "--max-time",
            "10",
            "-X",
            "DELETE",
            &url,
        ],
    )?;

    println!("\n--- audit records ({}) ---", audit.display());
    match fs::read(&audit) {
        Ok(bytes) => {
            let start = usize::try_from(audit_start).unwrap_or(0).min(bytes.len());
            print!("{}", String::from_utf8_lossy(&bytes[start..]));
        }
        Err(err) => println!("(could not read it: {err})"),
    }

    let mut problems = Vec::new();
    if allowed != Some(200) {
        problems.push(format!("GET /hello: expected 200, got {}", show(allowed)));
    }
    if denied != Some(403) {
        problems.push(format!("DELETE /hello: expected 403, got {}", show(denied)));
    }
    if problems.is_empty() {
        println!("\ndemo: GET /hello was allowed (200), DELETE /hello was denied (403)");
    }

    if keep && problems.is_empty() {
        let agent_pid = agent.detach();
        let upstream_pid = upstream.detach();
        let pids: Vec<String> = [agent_pid, upstream_pid]
            .iter()
            .flatten()
            .map(u32::to_string)
            .collect();
        println!(
            "demo: left running: agent pid {} (log {}), upstream pid {} on {UPSTREAM_ADDR} (log {})",
            show_pid(agent_pid),
            agent_log.display(),
            show_pid(upstream_pid),
            upstream_log.display()
        );
        println!(
            "demo: try `{} exec --cgroup {DEMO_CGROUP} -- curl -sS -i {url}`",
            bin.display()
        );
        println!("demo: stop them with: kill -TERM {}", pids.join(" "));
        return Ok(());
    }
    // Reverse start order: the agent, then its upstream.
    agent.stop();
    upstream.stop();
    if !problems.is_empty() {
        bail!(
            "demo: {} (agent log: {})",
            problems.join("; "),
            agent_log.display()
        );
    }
    Ok(())
}

/// Runs `scopegate exec --cgroup DEMO_CGROUP -- ARGV`, prints what it printed, and returns
/// the HTTP status of the response curl printed, if any.
fn client(ctx: &Ctx, bin: &Path, argv: &[&str]) -> Result<Option<u16>> {
    let mut cmd = ctx.command(bin);
    cmd.args(["exec", "--cgroup", DEMO_CGROUP, "--"])
        .args(argv)
        .stdin(Stdio::null());
    println!("\n$ {}", ctx::describe(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", ctx::describe(&cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !stdout.is_empty() && !stdout.ends_with('\n') {
        println!();
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        println!("[stderr] {}", stderr.trim_end());
    }
    if !out.status.success() {
        println!("[{}]", out.status);
    }
    Ok(http_status(&stdout))
}

/// The status code of the last `HTTP/x y reason` line in curl's `-i` output.
fn http_status(output: &str) -> Option<u16> {
    output
        .lines()
        .filter(|l| l.starts_with("HTTP/"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .next_back()
}

/// A status for messages.
fn show(status: Option<u16>) -> String {
    status.map_or_else(|| "no HTTP response".to_owned(), |s| s.to_string())
}

/// A PID for messages.
fn show_pid(pid: Option<u32>) -> String {
    pid.map_or_else(|| "?".to_owned(), |p| p.to_string())
}

/// Waits until something accepts on `addr`, failing if `proc` exits first.
fn wait_listening(proc: &mut Background, addr: SocketAddr, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        proc.ensure_running().with_context(|| log_tail(log))?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not listen on {addr} within 5 s; {}",
                proc.name,
                log_tail(log)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the agent's log has a line containing [`READY_LINE`].
fn wait_ready(agent: &mut Background, log: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let text = fs::read(log).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(READY_LINE) {
            println!("demo: agent is ready (pid {})", show_pid(agent.pid()));
            return Ok(());
        }
        agent.ensure_running().with_context(|| log_tail(log))?;
        if Instant::now() > deadline {
            bail!(
                "the agent did not print `{READY_LINE}` within {} s; {}",
                READY_TIMEOUT.as_secs(),
                log_tail(log)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The last lines of a log, for error messages.
fn log_tail(log: &Path) -> String {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    let path: PathBuf = log.to_path_buf();
    if tail.is_empty() {
        format!("{} is empty", path.display())
    } else {
        format!("last lines of {}:\n  {tail}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_final_status() {
        let out =
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\ncontent-length: 3\r\n\r\nno\n";
        assert_eq!(http_status(out), Some(403));
        assert_eq!(http_status("curl: (7) Failed to connect"), None);
    }

    #[test]
    fn background_is_stopped_on_drop() -> Result<()> {
        let log = env::temp_dir().join(format!("xtask-bg-{}.log", std::process::id()));
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut bg = Background::spawn("sleeper", cmd, &log)?;
        bg.ensure_running()?;
        let pid = bg.pid().context("no pid")?;
        drop(bg);
        // Reaped: /proc/<pid> is gone (or reused by something else, which is not a sleeper).
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep");
        fs::remove_file(&log)?;
        Ok(())
    }
}
