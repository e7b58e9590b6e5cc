//! Processes, cgroups and pins the benchmark owns, each stopped or removed by a guard when
//! dropped (also on error paths), and the `/proc` readings the report is made of.

use std::{
    fs::{self, File},
    io::Read,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{ctx, sys};

/// How long a stopped process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A background process, stopped by PID (SIGTERM, then SIGKILL; descendants it leaves
/// behind too) when dropped.
#[derive(Debug)]
pub struct Proc {
    /// Name for messages.
    name: String,
    /// The process; `None` once stopped.
    child: Option<Child>,
    /// Where its stderr (and stdout, unless redirected elsewhere) goes.
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin closed, stderr to `log`, stdout to `stdout` (or `log`).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, stdout: Option<&Path>) -> Result<Self> {
        let err = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let out = match stdout {
            Some(path) => File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
            None => err
                .try_clone()
                .with_context(|| format!("duplicating {}", log.display()))?,
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start {name}: `{}`", ctx::describe(&cmd)))?;
        eprintln!("bench: started {name} (pid {})", child.id());
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// The PID.
    pub fn pid(&self) -> Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .with_context(|| format!("{} is not running", self.name))
    }

    /// Fails (with the log's tail) if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        let name = self.name.clone();
        let Some(child) = self.child.as_mut() else {
            bail!("{name} is not running");
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                bail!("{name} exited early ({status}); {}", log_tail(&self.log))
            }
            Err(err) => bail!("checking on {name}: {err}"),
        }
    }

    /// Waits until something accepts on `addr`.
    pub fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.ensure_running()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within 10 s; {}",
                    self.name,
                    log_tail(&self.log)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the log has a line containing `marker`.
    pub fn wait_log_line(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = fs::read(&self.log).unwrap_or_default();
            if String::from_utf8_lossy(&text).contains(marker) {
                return Ok(());
            }
            self.ensure_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not print `{marker}` within {} s; {}",
                    self.name,
                    timeout.as_secs(),
                    log_tail(&self.log)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL now (by its PID) and reap it: an abrupt crash, for the soak.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "bench: killed {} (pid {}) with SIGKILL",
                self.name,
                child.id()
            );
        }
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL; reaps it, then stops any
    /// descendant it left behind (nginx workers), by PID.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let descendants = descendants(pid);
        if !matches!(child.try_wait(), Ok(Some(_))) {
            if let Err(err) = sys::sigterm(pid) {
                eprintln!("bench: SIGTERM to {} (pid {pid}): {err}", self.name);
            }
            let deadline = Instant::now() + STOP_GRACE;
            let mut exited = false;
            while Instant::now() < deadline {
                match child.try_wait() {
                    Ok(Some(_)) => {
                        exited = true;
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
            if !exited {
                eprintln!(
                    "bench: {} (pid {pid}) ignored SIGTERM; killing it",
                    self.name
                );
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for (pid, start) in descendants {
            stop_orphan(pid, start);
        }
        eprintln!("bench: stopped {} (pid {pid})", self.name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops `pid` (SIGTERM, then SIGKILL) if it is still the process that started at
/// `start` (so a recycled PID is never signalled).
fn stop_orphan(pid: u32, start: u64) {
    let alive = || stat_fields(pid).is_ok_and(|f| f.start == start && f.state != 'Z');
    if !alive() {
        return;
    }
    let _ = sys::sigterm(pid);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if !alive() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    if alive() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// The last lines of a log, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(12)..].join("\n  ");
    if tail.is_empty() {
        format!("{} is empty", log.display())
    } else {
        format!("last lines of {}:\n  {tail}", log.display())
    }
}

/// Runs `cmd` to completion with piped output, killing it (by its PID) after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", ctx::describe(cmd)))?;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let mut stderr = child.stderr.take().context("child stderr")?;
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{}` did not finish within {} s; killed it",
                ctx::describe(cmd),
                timeout.as_secs()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Like [`run_bounded`], but fails unless the command succeeds; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let out = run_bounded(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            ctx::describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A throwaway cgroup subtree. Dropping it stops every process still in it (by PID: only
/// the benchmark's own children run there) and removes the directories, deepest first.
#[derive(Debug)]
pub struct CgroupTree {
    /// Absolute directory.
    pub dir: PathBuf,
    /// Path relative to the cgroup2 mount (`/sgbench123`).
    pub path: String,
}

impl CgroupTree {
    /// Creates `<mount>/<name>`.
    pub fn new(mount: &Path, name: &str) -> Result<Self> {
        let dir = mount.join(name);
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(Self {
            dir,
            path: format!("/{name}"),
        })
    }

    /// Creates a child cgroup; returns its path relative to the mount.
    pub fn child(&self, name: &str) -> Result<String> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(format!("{}/{name}", self.path))
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.dir, true);
    }
}

/// Every directory of a cgroup subtree, deepest first.
fn dirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

/// The PIDs in a cgroup subtree.
fn pids_in(dir: &Path) -> Vec<u32> {
    dirs_deepest_first(dir)
        .iter()
        .flat_map(|d| {
            fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|p| p.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Stops the processes in a cgroup subtree by PID (if `kill`), then removes its
/// directories deepest first. Returns false if processes remain.
fn remove_cgroup_tree(dir: &Path, kill: bool) -> bool {
    if !dir.exists() {
        return true;
    }
    if kill {
        for round in 0..100 {
            let pids = pids_in(dir);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                if round < 25 {
                    let _ = sys::sigterm(pid);
                } else {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    if !pids_in(dir).is_empty() {
        return false;
    }
    for d in dirs_deepest_first(dir) {
        if let Err(err) = fs::remove_dir(&d) {
            eprintln!("bench: removing cgroup {}: {err}", d.display());
        }
    }
    true
}

/// A bpffs pin directory for the benchmark's agent: dropping it runs `scopegate
/// uninstall` (detaching the hooks) and removes the directory.
#[derive(Debug)]
pub struct PinDir {
    /// The directory.
    pub dir: PathBuf,
    /// The scopegate binary.
    bin: PathBuf,
}

impl PinDir {
    /// A pin directory that does not exist yet (the agent creates it).
    pub fn new(bin: &Path, dir: PathBuf) -> Self {
        Self {
            dir,
            bin: bin.to_path_buf(),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        uninstall(&self.bin, &self.dir);
    }
}

/// `scopegate uninstall --pin-dir DIR`, then removes what is left of DIR.
fn uninstall(bin: &Path, dir: &Path) {
    if !dir.exists() {
        return;
    }
    let mut cmd = Command::new(bin);
    cmd.arg("uninstall").arg("--pin-dir").arg(dir);
    match run_bounded(&mut cmd, Duration::from_secs(30)) {
        Ok(out) if out.status.success() => eprintln!("bench: unpinned {}", dir.display()),
        Ok(out) => eprintln!(
            "bench: `{}` failed: {}",
            ctx::describe(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => eprintln!("bench: {err:#}"),
    }
    if dir.exists() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Removes what an earlier benchmark run (a dead xtask whose PID is in the name) left
/// behind, e.g. after Ctrl-C: its pins (hooks detached) and its cgroups if they are
/// empty. Processes still in such cgroups are reported, never signalled.
pub fn sweep_stale(bin: &Path, cgroup_mount: &Path, prefix: &str) {
    let stale = |name: &str| {
        let Some(rest) = name.strip_prefix(prefix) else {
            return false;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        !pid.is_empty() && !Path::new("/proc").join(&pid).exists()
    };
    for (root, is_pins) in [(Path::new("/sys/fs/bpf"), true), (cgroup_mount, false)] {
        let Ok(entries) = fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !stale(&name) {
                continue;
            }
            let path = entry.path();
            if is_pins {
                eprintln!("bench: removing stale pins {}", path.display());
                uninstall(bin, &path);
            } else if remove_cgroup_tree(&path, false) {
                eprintln!("bench: removed stale cgroup {}", path.display());
            } else {
                eprintln!(
                    "bench: warning: stale cgroup {} still holds processes {:?}; left alone",
                    path.display(),
                    pids_in(&path)
                );
            }
        }
    }
}

/// The fields of `/proc/<pid>/stat` the benchmark uses.
#[derive(Debug, Clone, Copy)]
pub struct StatFields {
    /// State letter (`Z`: zombie, already dead).
    pub state: char,
    /// Parent PID.
    pub ppid: u32,
    /// utime + stime, in clock ticks (all threads, live and exited).
    pub cpu_ticks: u64,
    /// Start time in clock ticks after boot (identifies the process with its PID).
    pub start: u64,
}

/// Reads `/proc/<pid>/stat`.
pub fn stat_fields(pid: u32) -> Result<StatFields> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&text).with_context(|| format!("{path}: unexpected format"))
}

/// Parses a `/proc/<pid>/stat` line (the command name may contain spaces and parens).
fn parse_stat(text: &str) -> Option<StatFields> {
    let after = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // f[0] is field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(StatFields {
        state: f.first()?.chars().next()?,
        ppid: u32::try_from(num(4)?).ok()?,
        cpu_ticks: num(14)? + num(15)?,
        start: num(22)?,
    })
}

/// The live descendants of `pid`, with their start times.
pub fn descendants(pid: u32) -> Vec<(u32, u64)> {
    let mut all = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(f) = stat_fields(p) {
                all.push((p, f));
            }
        }
    }
    let mut out: Vec<(u32, u64)> = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, f) in &all {
            if f.ppid == parent && !out.iter().any(|(q, _)| q == p) {
                out.push((*p, f.start));
                frontier.push(*p);
            }
        }
    }
    out
}

/// CPU ticks (utime + stime) of `pid` and all its live descendants.
pub fn tree_cpu_ticks(pid: u32) -> Result<u64> {
    let mut total = stat_fields(pid)?.cpu_ticks;
    for (p, _) in descendants(pid) {
        total += stat_fields(p).map(|f| f.cpu_ticks).unwrap_or(0);
    }
    Ok(total)
}

/// Context switches (voluntary + involuntary) of every thread of `pid` and of its live
/// descendants, from `/proc/<pid>/task/<tid>/status`.
pub fn tree_context_switches(pid: u32) -> Result<u64> {
    let mut total = 0;
    for p in std::iter::once(pid).chain(descendants(pid).into_iter().map(|(p, _)| p)) {
        let dir = format!("/proc/{p}/task");
        let Ok(tasks) = fs::read_dir(&dir) else {
            if p == pid {
                bail!("reading {dir}: the process is gone");
            }
            continue;
        };
        for task in tasks.flatten() {
            let Ok(text) = fs::read_to_string(task.path().join("status")) else {
                continue; // the thread ended meanwhile
            };
            total += context_switches(&text);
        }
    }
    Ok(total)
}

/// The sum of the `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` lines.
fn context_switches(status: &str) -> u64 {
    status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        })
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

/// A `Key:  value` line of `/proc/<pid>/status`.
pub fn status_field(pid: u32, key: &str) -> Result<String> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("{path}: no {key} line"))
}

/// VmRSS of `pid` in KiB.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let value = status_field(pid, "VmRSS")?;
    value
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("VmRSS of {pid}: {value:?}"))
}

/// Number of open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .count())
}

/// Counts the lines of an append-only log, reading only what was added since last time.
#[derive(Debug)]
pub struct LineCounter {
    /// The file.
    path: PathBuf,
    /// Bytes read so far.
    offset: u64,
    /// Newlines seen so far.
    lines: u64,
}

impl LineCounter {
    /// Starts counting `path` (which may not exist yet).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            lines: 0,
        }
    }

    /// Reads what was appended; returns the total number of lines.
    pub fn count(&mut self) -> Result<u64> {
        let Ok(mut file) = File::open(&self.path) else {
            return Ok(self.lines);
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // Truncated: start over.
            self.offset = 0;
            self.lines = 0;
        }
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(self.offset))
            .with_context(|| format!("seeking in {}", self.path.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("reading {}", self.path.display()))?;
            if n == 0 {
                break;
            }
            self.lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
            self.offset += n as u64;
        }
        Ok(self.lines)
    }

    /// Counts until the total stops growing for 300 ms (asynchronous writers), at most 5 s.
    pub fn settled(&mut self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.count()?;
        let mut stable_since = Instant::now();
        while Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
            let now = self.count()?;
            if now != last {
                last = now;
                stable_since = Instant::now();
            } else if stable_since.elapsed() >= Duration::from_millis(300) {
                break;
            }
        }
        Ok(last)
    }
}

/// A free TCP port on `ip` (and on `also`, if given); best effort.
pub fn free_port(ip: &str, also: Option<&str>) -> Result<u16> {
    for _ in 0..50 {
        let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
        let port = listener.local_addr()?.port();
        if also.is_none_or(|other| TcpListener::bind((other, port)).is_ok()) {
            return Ok(port);
        }
    }
    bail!(
        "no free port on {ip}{}",
        also.map(|a| format!(" and {a}")).unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn counts_context_switches() -> Result<()> {
        let status =
            "Name:\tscopegate\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(context_switches(status), 127);
        assert_eq!(context_switches("Name:\tx\n"), 0);
        let me = std::process::id();
        assert!(tree_context_switches(me)? > 0);
        Ok(())
    }

    #[test]
    fn parses_proc_stat() {
        let line = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    25 17 0 0 20 0 3 0 987654 1000 200 18446744073709551615";
        let f = parse_stat(line);
        assert_eq!(
            f.map(|f| (f.ppid, f.cpu_ticks, f.start)),
            Some((1, 42, 987654))
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_readings() -> Result<()> {
        let me = std::process::id();
        assert!(vm_rss_kib(me)? > 0);
        assert!(fd_count(me)? > 0);
        let _ = tree_cpu_ticks(me)?;
        Ok(())
    }

    #[test]
    fn counts_appended_lines() -> Result<()> {
        let path = std::env::temp_dir().join(format!("xtask-lines-{}", std::process::id()));
        fs::write(&path, "a\nb\n")?;
        let mut counter = LineCounter::new(&path);
        assert_eq!(counter.count()?, 2);
        File::options()
            .append(true)
            .open(&path)?
            .write_all(b"c\n")?;
        assert_eq!(counter.count()?, 3);
        fs::remove_file(&path)?;
        Ok(())
    }

    #[test]
    fn proc_guard_stops_children() -> Result<()> {
        let log = std::env::temp_dir().join(format!("xtask-proc-{}.log", std::process::id()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30"]);
        let mut p = Proc::spawn("sleeper", cmd, &log, None)?;
        p.ensure_running()?;
        let pid = p.pid()?;
        thread::sleep(Duration::from_millis(100));
        let kids = descendants(pid);
        assert!(!kids.is_empty());
        drop(p);
        for (kid, start) in kids {
            assert!(
                stat_fields(kid)
                    .map(|f| f.start != start || f.state == 'Z')
                    .unwrap_or(true)
            );
        }
        fs::remove_file(&log)?;
        Ok(())
    }
}
