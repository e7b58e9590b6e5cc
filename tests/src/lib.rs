//! Harness for scopegate's privileged end-to-end tests.
//!
//! Each test gets its own throwaway cgroup subtree, its own bpffs pin directory, its own
//! proxy port and its own agent process, all cleaned up by RAII guards (children are
//! stopped by PID, pins removed, cgroups removed). Clients are real `curl` processes put
//! into cgroups with `scopegate exec`. Upstreams are tiny HTTP/1.1 servers on loopback
//! addresses (127.0.0.2 and up) that record every request they receive.
//!
//! These tests need root and a kernel with cgroup v2, BTF and bpf. They never skip: when
//! something is missing they fail, naming it.
#![forbid(unsafe_code)]

pub mod dns_server;
pub mod pki;
pub mod raw_upstream;

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique name for this process and call: `sgt<pid>x<n>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Marks the start of a privileged test; fails loudly when the test cannot run.
pub fn privileged_test(name: &str) {
    assert!(
        nix_geteuid_is_root(),
        "privileged test {name} needs root; run it through `cargo xtask test`"
    );
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "privileged test {name} needs a kernel with BTF (/sys/kernel/btf/vmlinux)"
    );
    let _ = bin();
    eprintln!("PRIVILEGED-TEST-RAN {name}");
}

fn nix_geteuid_is_root() -> bool {
    // /proc/self/status "Uid:" real, effective, saved, fs.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The scopegate binary under test (`SCOPEGATE_BIN`, set by `cargo xtask test`).
pub fn bin() -> PathBuf {
    let path = std::env::var_os("SCOPEGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/scopegate")
        });
    assert!(
        path.exists(),
        "scopegate binary {} not found; build it with `cargo xtask build` or set SCOPEGATE_BIN",
        path.display()
    );
    path
}

/// The cgroup v2 mount point.
pub fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup v2 mount: these tests need cgroup v2")
}

/// A throwaway cgroup subtree. Dropping it kills every process in it (by PID; they are
/// this test's own children) and removes the directories, deepest first.
pub struct CgroupTree {
    /// Absolute directory of the subtree root.
    pub dir: PathBuf,
    /// Path relative to the cgroup2 mount ("/sgt123x0").
    pub path: String,
}

impl CgroupTree {
    /// Creates `/<unique>` under the cgroup2 mount.
    pub fn new() -> Self {
        let mount = cgroup2_mount();
        let name = unique("sgt");
        let dir = mount.join(&name);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self {
            dir,
            path: format!("/{name}"),
        }
    }

    /// Creates a child cgroup and returns its path relative to the mount.
    pub fn child(&self, name: &str) -> String {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        format!("{}/{name}", self.path)
    }

    fn dirs_deepest_first(&self) -> Vec<PathBuf> {
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
        walk(&self.dir, &mut out);
        out
    }
}

impl Default for CgroupTree {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        for _ in 0..50 {
            let mut alive = false;
            for dir in self.dirs_deepest_first() {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    alive = true;
                    kill(pid, 9);
                }
            }
            if !alive {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        for dir in self.dirs_deepest_first() {
            let _ = fs::remove_dir(&dir);
        }
    }
}

fn kill(pid: i32, signal: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// A bpffs pin directory for one agent, removed (hooks detached) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/<unique>`.
    pub fn new() -> Self {
        Self(PathBuf::from("/sys/fs/bpf").join(unique("sgt")))
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Command::new(bin())
                .arg("uninstall")
                .arg("--force")
                .arg("--pin-dir")
                .arg(&self.0)
                .stdout(Stdio::null())
                .status();
            // A directory a test made for an agent that never pinned anything (uninstall
            // then says "no scopegate pins"): removed if empty.
            let _ = fs::remove_dir(&self.0);
        }
    }
}

/// A free TCP port on both 127.0.0.1 and [::1] (best effort).
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        if TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on both 127.0.0.1 and ::1");
}

/// A free UDP port on both 127.0.0.1 and [::1] (best effort), for the DNS proxy.
pub fn free_udp_port() -> u16 {
    for _ in 0..50 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = s.local_addr().expect("local addr").port();
        if std::net::UdpSocket::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port on both 127.0.0.1 and ::1");
}

/// A running agent. Dropping it stops it by PID (SIGTERM, then SIGKILL).
pub struct Agent {
    child: Child,
    reaped: bool,
    /// The agent's state directory (host CA).
    pub state_dir: PathBuf,
    _state: Option<tempfile::TempDir>,
    stderr: Arc<Mutex<Vec<String>>>,
    ready: Arc<AtomicBool>,
    /// Proxy port.
    pub port: u16,
    /// DNS proxy port (UDP).
    pub dns_port: u16,
    /// Audit file.
    pub audit: PathBuf,
    /// The agent's admin socket (in a temporary directory of its own).
    pub admin_socket: PathBuf,
    _admin_dir: tempfile::TempDir,
}

/// The nameserver of the resolv.conf an agent gets when its test names none: a loopback
/// address nothing listens on (no test binds 127.0.53.254), so a name the agent resolves
/// (not in `/etc/hosts`, not `localhost`) fails fast instead of asking the machine's real
/// resolver, and the DNS proxy's `dns: system` questions go nowhere.
pub const NO_RESOLVER: &str = "127.0.53.254";

/// Whether `args` name a resolv.conf (`--resolv-conf PATH` or `--resolv-conf=PATH`).
fn names_resolv_conf(args: &[String]) -> bool {
    args.iter()
        .any(|a| a == "--resolv-conf" || a.starts_with("--resolv-conf="))
}

/// What to start an agent with.
#[derive(Clone)]
pub struct AgentConfig<'a> {
    /// Policy directory.
    pub policies: &'a Path,
    /// cgroup subtree to attach to.
    pub tree: &'a CgroupTree,
    /// Pin directory.
    pub pins: &'a PinDir,
    /// Audit file.
    pub audit: PathBuf,
    /// Run the agent itself inside this cgroup (relative to the mount), via `exec`.
    pub inside: Option<String>,
    /// Proxy port (default: a free one).
    pub port: Option<u16>,
    /// DNS proxy port (default: a free one).
    pub dns_port: Option<u16>,
    /// More arguments for `scopegate run`. Without a `--resolv-conf` among them the agent
    /// gets [`NO_RESOLVER`]'s resolv.conf: a test never reaches a real resolver.
    pub extra: Vec<String>,
    /// State directory (default: a fresh temporary one).
    pub state_dir: Option<PathBuf>,
    /// `--rescan-secs` (default 0.2).
    pub rescan_secs: &'static str,
    /// Extra environment variables for the agent (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// A command the agent is started through, e.g. `prlimit --nofile=1024:1024 --`
    /// (default: none; see [`unit_sandbox`] for the shipped unit's sandbox).
    pub wrapper: Vec<String>,
    /// Admin socket path (default: in a fresh temporary directory).
    pub admin_socket: Option<PathBuf>,
}

impl<'a> AgentConfig<'a> {
    /// The usual configuration: agent outside the tree, free port, no extra arguments.
    pub fn new(policies: &'a Path, tree: &'a CgroupTree, pins: &'a PinDir, audit: PathBuf) -> Self {
        Self {
            policies,
            tree,
            pins,
            audit,
            inside: None,
            port: None,
            dns_port: None,
            extra: Vec::new(),
            state_dir: None,
            rescan_secs: "0.2",
            env: Vec::new(),
            wrapper: Vec::new(),
            admin_socket: None,
        }
    }
}

impl Agent {
    /// Starts the agent and waits until it prints `scopegate ready` (or fails).
    pub fn start(cfg: AgentConfig<'_>) -> Self {
        // A port the harness picked can be taken by another test between the pick and the
        // agent's bind (tests run two at a time): the agent then refuses to start with
        // EADDRINUSE, and it is started again on other free ports. Ports a test chose are
        // not retried.
        let retry = cfg.port.is_none() && cfg.dns_port.is_none();
        for _ in 0..3 {
            let mut agent = Self::spawn(cfg.clone());
            match agent.ready_or_exit() {
                Ok(()) => return agent,
                Err(stderr) if retry && stderr.contains("Address already in use") => {
                    eprintln!("harness: a picked port was taken meanwhile; starting again");
                }
                Err(stderr) => panic!("{stderr}"),
            }
        }
        panic!("scopegate could not get free ports in 3 attempts");
    }

    /// Starts the agent without waiting for it to be ready.
    pub fn spawn(cfg: AgentConfig<'_>) -> Self {
        let port = cfg.port.unwrap_or_else(free_port);
        let dns_port = cfg.dns_port.unwrap_or_else(free_udp_port);
        let (state_dir, state_guard) = match &cfg.state_dir {
            Some(dir) => (dir.clone(), None),
            None => {
                let dir = tempfile::tempdir().expect("state dir");
                (dir.path().join("state"), Some(dir))
            }
        };
        let admin_dir = tempfile::tempdir().expect("admin socket dir");
        let admin_socket = cfg
            .admin_socket
            .clone()
            .unwrap_or_else(|| admin_dir.path().join("admin.sock"));
        let mut resolv_conf = Vec::new();
        if !names_resolv_conf(&cfg.extra) {
            let path = admin_dir.path().join("resolv.conf");
            fs::write(&path, format!("nameserver {NO_RESOLVER}\n")).expect("write resolv.conf");
            resolv_conf = vec!["--resolv-conf".to_owned(), path.display().to_string()];
        }
        let mut cmd = match cfg.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin());
                cmd
            }
            None => Command::new(bin()),
        };
        if let Some(cgroup) = &cfg.inside {
            cmd.arg("exec")
                .arg("--cgroup")
                .arg(cgroup)
                .arg("--")
                .arg(bin());
        }
        cmd.arg("run")
            .arg("--policies")
            .arg(cfg.policies)
            .arg("--proxy-port")
            .arg(port.to_string())
            .arg("--dns-port")
            .arg(dns_port.to_string())
            .arg("--pin-dir")
            .arg(&cfg.pins.0)
            .arg("--cgroup-root")
            .arg(&cfg.tree.dir)
            .arg("--audit-file")
            .arg(&cfg.audit)
            .arg("--no-audit-stdout")
            .arg("--rescan-secs")
            .arg(cfg.rescan_secs)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--admin-socket")
            .arg(&admin_socket)
            .args(&resolv_conf)
            .args(&cfg.extra)
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn scopegate");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let ready = Arc::new(AtomicBool::new(false));
        {
            let pipe = child.stderr.take().expect("stderr pipe");
            let lines = stderr.clone();
            let ready = ready.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if line.contains("scopegate ready") {
                        ready.store(true, Ordering::SeqCst);
                    }
                    eprintln!("[agent] {line}");
                    lines.lock().expect("lock").push(line);
                }
            });
        }
        Self {
            child,
            reaped: false,
            state_dir,
            _state: state_guard,
            stderr,
            ready,
            port,
            dns_port,
            audit: cfg.audit,
            admin_socket,
            _admin_dir: admin_dir,
        }
    }

    /// Waits until the agent prints `scopegate ready` (fails if it exits first or takes
    /// more than 20 s).
    pub fn wait_ready(&mut self) {
        if let Err(message) = self.ready_or_exit() {
            panic!("{message}");
        }
    }

    /// [`Agent::wait_ready`], with an early exit returned as its message (and the agent
    /// reaped) instead of a panic.
    fn ready_or_exit(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ready.load(Ordering::SeqCst) {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped = true;
                thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "scopegate exited with {status} before it was ready:\n{}",
                    self.stderr().join("\n")
                ));
            }
            assert!(
                Instant::now() < deadline,
                "scopegate not ready after 20 s:\n{}",
                self.stderr().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits for the agent to exit (at most 20 s) and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped = true;
                // Let the stderr reader drain the last lines.
                thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "scopegate still running after 20 s:\n{}",
            self.stderr().join("\n")
        );
    }

    /// The agent's stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("lock").clone()
    }

    /// The agent's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent with SIGKILL and reaps it (the pins stay).
    pub fn kill9(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    /// Stops the agent with SIGTERM and waits for it (SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if self.reaped {
            return;
        }
        kill(self.child.id() as i32, 15);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.reaped = true;
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.kill9();
    }

    /// Sends a signal to the agent (while it has not been reaped).
    pub fn signal(&self, signal: i32) {
        if !self.reaped {
            kill(self.child.id() as i32, signal);
        }
    }

    /// Decision records written so far (the audit subsystem's own records, `proto:
    /// "audit"`: lifecycle, checkpoints, truncation recovery, are left out; see
    /// [`Agent::all_audit_records`]).
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        decisions(read_jsonl(&self.audit))
    }

    /// Every record of the chain, lifecycle records included.
    pub fn all_audit_records(&self) -> Vec<serde_json::Value> {
        read_jsonl(&self.audit)
    }

    /// Waits until at least `n` audit records exist (records are written asynchronously).
    pub fn wait_audit(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records = self.audit_records();
            if records.len() >= n || Instant::now() > deadline {
                return records;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The decisions among `records`, one value each: without the audit subsystem's own
/// records (`proto: "audit"`: agent_started/stopping, policy_reloaded/rejected,
/// checkpoints, …), and with each outcome record (`outcome_of`: status, sizes, duration of
/// a forwarded request, written after its decision) folded into the decision record it
/// completes (under `"outcome"`, its status and sizes copied;
/// [`scopegate::audit::query::fold_outcomes`]). An outcome that links to no decision stays
/// a value of its own, so counts show it.
pub fn decisions(records: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    scopegate::audit::query::fold_outcomes(
        records
            .into_iter()
            .filter(|r| r["proto"] != "audit")
            .collect(),
    )
}

/// Reads a JSON-lines file (missing file: no records).
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}")))
        .collect()
}

/// A request an upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Request target.
    pub target: String,
    /// Headers, lowercased names.
    pub headers: Vec<(String, String)>,
    /// The client's address (the proxy, for redirected traffic).
    pub peer: SocketAddr,
}

/// A loopback HTTP/1.1 upstream that answers 200 and records every request.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    /// Starts an upstream on `ip` (port chosen by the kernel).
    pub fn start(ip: &str) -> Self {
        Self::start_on(ip, 0)
    }

    /// Starts an upstream on `ip:port` (e.g. port 80 on an address no other test uses).
    pub fn start_on(ip: &str, port: u16) -> Self {
        let listener = TcpListener::bind((ip, port))
            .unwrap_or_else(|e| panic!("bind upstream {ip}:{port}: {e}"));
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let seen = seen.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let seen = seen.clone();
                            thread::spawn(move || serve_upstream(stream, peer, addr, &seen));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        Self { addr, seen, stop }
    }

    /// Requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// `http://ip:port` for curl.
    pub fn url(&self, path: &str) -> String {
        match self.addr {
            SocketAddr::V4(a) => format!("http://{a}{path}"),
            SocketAddr::V6(a) => format!("http://[{}]:{}{path}", a.ip(), a.port()),
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve_upstream(
    mut stream: TcpStream,
    peer: SocketAddr,
    me: SocketAddr,
    seen: &Mutex<Vec<Seen>>,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let close = headers
            .iter()
            .any(|(k, v)| k == "connection" && v.eq_ignore_ascii_case("close"));
        seen.lock().expect("lock").push(Seen {
            method: method.clone(),
            target: target.clone(),
            headers,
            peer,
        });
        let body = format!("upstream {me} says hi: {method} {target}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Runs `curl ARGS` inside `cgroup` (relative to the mount) with a 10 s limit.
pub fn curl_in(cgroup: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.arg("exec")
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--")
        .arg("curl")
        .arg("-sS")
        .arg("--max-time")
        .arg("10")
        .arg("--noproxy")
        .arg("*")
        .args(args);
    cmd.stdin(Stdio::null()).output().expect("run curl")
}

/// `curl -w` format that appends the status code on its own last line.
pub const STATUS: &str = "\n%{http_code}";

/// Splits curl output made with [`STATUS`] into (status, body).
pub fn status_and_body(out: &Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Writes policy files into a fresh temporary directory.
pub fn policy_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        fs::write(dir.path().join(name), text).expect("write policy");
    }
    dir
}

/// Runs `python3 -c SCRIPT` inside `cgroup` (relative to the mount) and returns stdout,
/// trimmed. The script prints its findings; a Python exception fails the test.
pub fn python_in(cgroup: &str, script: &str) -> String {
    let out = Command::new(bin())
        .args(["exec", "--cgroup", cgroup, "--", "python3", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python in {cgroup} failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A Python prelude with `attempt(fn)` → "ok" | errno name, for bypass probes.
pub const PY_PRELUDE: &str = r#"
import errno, socket, sys
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def tcp(family, addr, timeout=3):
    def f():
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(addr)
        finally:
            s.close()
    return f
def udp_sendto(family, addr):
    def f():
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.sendto(b"x", addr)
        finally:
            s.close()
    return f
def udp_connect(family, addr):
    def f():
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.connect(addr)
            s.send(b"x")
        finally:
            s.close()
    return f
"#;

/// A UDP listener that counts datagrams.
pub struct UdpSink {
    /// Its address.
    pub addr: SocketAddr,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl UdpSink {
    /// Binds `ip:0`.
    pub fn start(ip: &str) -> Self {
        Self::start_on(&format!("{ip}:0"))
    }

    /// Binds `ip:0` on a port not in `avoid` (see [`TcpSink::start_avoiding`]).
    pub fn start_avoiding(ip: &str, avoid: &[u16]) -> Self {
        loop {
            let socket = std::net::UdpSocket::bind((ip, 0)).expect("bind udp");
            if !avoid.contains(&socket.local_addr().expect("addr").port()) {
                break Self::serve(socket);
            }
        }
    }

    /// Binds an exact address, e.g. `127.0.0.54:53`.
    pub fn start_on(addr: &str) -> Self {
        Self::serve(std::net::UdpSocket::bind(addr).expect("bind udp"))
    }

    fn serve(socket: std::net::UdpSocket) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (count, stop) = (count.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::SeqCst) {
                    if socket.recv_from(&mut buf).is_ok() {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        Self { addr, count, stop }
    }

    /// Datagrams received so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A TCP listener that counts accepted connections.
pub struct TcpSink {
    /// Its address.
    pub addr: SocketAddr,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TcpSink {
    /// Binds `ip:0`.
    pub fn start(ip: &str) -> Self {
        Self::start_avoiding(ip, &[])
    }

    /// Binds `ip:0` on a port not in `avoid`. The hooks manage ports per workload, not per
    /// address: a sink on another address that drew a port the policy grants (or the
    /// proxy's own) would be proxied, not refused, and a bypass probe would "succeed".
    pub fn start_avoiding(ip: &str, avoid: &[u16]) -> Self {
        let listener = loop {
            let listener = TcpListener::bind((ip, 0)).expect("bind tcp");
            let port = listener.local_addr().expect("addr").port();
            if !avoid.contains(&port) {
                break listener;
            }
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (count, stop) = (count.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok(_) => {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
        }
        Self { addr, count, stop }
    }

    /// Connections accepted so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The shipped unit file, `packaging/scopegate.service`.
pub fn shipped_unit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/scopegate.service")
        .canonicalize()
        .expect("packaging/scopegate.service")
}

/// A wrapper ([`AgentConfig::wrapper`]) that runs the agent inside the sandbox of the
/// shipped unit, as systemd would set it up (systemd is not PID 1 here): its read-only
/// file system with the writable directories mapped to the test's (`maps`: directive or
/// `ReadWritePaths=` path → the test's directory), its capabilities, securebits, no new
/// privileges, file limit, environment, umask, system call filter and address families
/// (`tests/src/unit_sandbox.py` says what is and is not emulated). It fails the start
/// (exit 125) on a directive of the unit it does not know.
pub fn unit_sandbox(maps: &[(&str, &Path)]) -> Vec<String> {
    let mut wrapper: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        // Debian's python3: the one python3-seccomp is installed for.
        "/usr/bin/python3",
        "-c",
        include_str!("unit_sandbox.py"),
        "--unit",
    ]
    .map(String::from)
    .into();
    wrapper.push(shipped_unit().display().to_string());
    for (key, path) in maps {
        wrapper.push("--map".into());
        wrapper.push(format!("{key}={}", path.display()));
    }
    wrapper.push("--".into());
    wrapper
}
