//! `cargo xtask bench`: scopegate side by side with direct, nginx and HAProxy, in one run.
//!
//! One nginx origin on 127.0.0.2 (a fixed 128-byte body) serves every target. The same 20
//! rules of the shared workload (`../shared/bench`) become a scopegate policy, nginx regex
//! locations and HAProxy ACLs; every configuration is checked (200 for each request of
//! `requests.txt`, 403 for each of `denied.txt`) before anything is timed. Then each
//! scenario runs every target, interleaved per repetition, with the load generator and
//! the origin pinned to CPU 0 and the proxy under test to CPU 1. The report (medians over
//! repetitions) goes to stdout and `<target>/bench/REPORT.md`, the raw figures to
//! `<target>/bench/results.json`.
//!
//! Everything the benchmark starts is stopped by PID when it ends, also on errors (guards
//! in [`procs`]); cgroups and pins are removed. A run killed by Ctrl-C (which stops its
//! children too: they share the terminal's process group) leaves its pins and empty
//! cgroups behind; the next run removes them.

mod client;
pub(crate) mod procs;
mod profile;
mod report;
mod tls;
mod workload;

use std::{
    env,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{self, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use serde_json::Value;

pub use self::client::{Helper, run as run_helper};
use self::{
    procs::{CgroupTree, LineCounter, PinDir, Proc},
    report::{ConnectSample, Memory, Results, Sample},
    workload::{PathStyle, Workload},
};
use crate::{
    ci,
    ctx::{self, Ctx},
    setup,
};

/// Prefix of the cgroups and pin directories the benchmark creates (then its PID).
const PREFIX: &str = "sgbench";
/// The origin's address (on a free port).
const UPSTREAM_IP: &str = "127.0.0.2";
/// Where the connect() micro-benchmark listens.
const CONNECT_IP: &str = "127.0.0.3";
/// Idle connections held for the memory measurement.
const HOLD_CONNECTIONS: u64 = 10_000;
/// Connections of the paced client.
const PACED_CONNECTIONS: usize = 8;
/// The open-files limit the agent and the idle-connection client ask for.
const NOFILE_WANTED: u64 = 65_536;
/// What the agent prints once it is ready.
const READY_LINE: &str = "scopegate ready";

/// Benchmark scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Keep-alive at saturation (wrk -t1 -cN).
    Keepalive,
    /// A new connection per request (wrk with `Connection: close`).
    Close,
    /// Paced at `--rate` req/s, keep-alive and new connection per request.
    Paced,
    /// connect() through the hooks, and agent memory with 10,000 idle connections.
    Micro,
    /// The agent's criterion benches: policy decision, audit sink, TLS interception
    /// and reflection guard (`cargo bench -p scopegate --bench decide|audit|tls|reflect`).
    Decide,
    /// TLS interception through the redirect: keep-alive and a new TLS connection per
    /// request, next to plain HTTP through the same agent.
    Tls,
}

/// What the load goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The client against the origin.
    Direct,
    /// Through the eBPF redirect and the agent's proxy.
    Scopegate,
    /// nginx with the rules as regex locations.
    Nginx,
    /// HAProxy with the rules as ACLs.
    Haproxy,
}

impl Target {
    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Scopegate => "scopegate",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }
}

/// One kind of timed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// wrk, keep-alive, saturated.
    Keepalive,
    /// wrk, `Connection: close`.
    Close,
    /// Paced, keep-alive.
    PacedKeepalive,
    /// Paced, new connection per request.
    PacedClose,
}

impl Kind {
    /// Every kind, in run and report order.
    pub const ALL: [Self; 4] = [
        Self::Keepalive,
        Self::Close,
        Self::PacedKeepalive,
        Self::PacedClose,
    ];

    /// Key for the JSON.
    pub fn key(self) -> &'static str {
        match self {
            Self::Keepalive => "keepalive",
            Self::Close => "close",
            Self::PacedKeepalive => "paced-keepalive",
            Self::PacedClose => "paced-close",
        }
    }

    /// Short name for sentences.
    pub fn short(self) -> &'static str {
        match self {
            Self::Keepalive => "keep-alive, saturated",
            Self::Close => "new connection per request, saturated",
            Self::PacedKeepalive => "paced, keep-alive",
            Self::PacedClose => "paced, new connection per request",
        }
    }

    /// Section title.
    pub fn title(self) -> &'static str {
        match self {
            Self::Keepalive => "Keep-alive, saturated",
            Self::Close => "New connection per request (`Connection: close`), saturated",
            Self::PacedKeepalive => "Paced, keep-alive",
            Self::PacedClose => "Paced, new connection per request",
        }
    }

    /// Paced (open loop) rather than saturated.
    pub fn paced(self) -> bool {
        matches!(self, Self::PacedKeepalive | Self::PacedClose)
    }

    /// A new connection per request.
    pub fn close(self) -> bool {
        matches!(self, Self::Close | Self::PacedClose)
    }
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Scenarios, comma-separated: keepalive, close, paced, micro, decide.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "keepalive,close,paced,micro"
    )]
    scenarios: Vec<Scenario>,
    /// Targets, comma-separated, in run order: direct, scopegate, nginx, haproxy.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "direct,scopegate,nginx,haproxy"
    )]
    targets: Vec<Target>,
    /// Length of each timed run (e.g. 10s, 1500ms, 1m; wrk rounds to whole seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Repetitions of every (scenario, target); the report shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    reps: u32,
    /// Smoke test: 1 repetition of 2 s and shorter micro-benchmarks (overrides --reps and
    /// --duration).
    #[arg(long)]
    quick: bool,
    /// wrk connections in the saturated scenarios.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,
    /// Request rate of the paced scenarios, per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    rate: u32,
    /// Use the existing release binary instead of running `cargo xtask build` first.
    #[arg(long)]
    no_build: bool,
    /// Directory with rules.txt, requests.txt and denied.txt [default: <root>/../shared/bench].
    #[arg(long, value_name = "DIR")]
    workload: Option<PathBuf>,
    /// After the timed runs, one more keep-alive run through the agent under `perf
    /// record`: flame graph, collapsed stacks and PROFILE.md (top 20 functions) next to
    /// REPORT.md.
    #[arg(long)]
    profile: bool,
}

/// Parses `10s`, `1500ms`, `1m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |at| text.split_at(at));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 10s, 1500ms or 1m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s or m)")),
    };
    if !(0.5..=600.0).contains(&secs) {
        return Err(format!("{text:?}: must be between 500ms and 10m"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The settings a run uses, after `--quick`.
#[derive(Debug, Clone)]
struct Settings {
    /// Scenarios, deduplicated.
    scenarios: Vec<Scenario>,
    /// Targets, deduplicated, in run order.
    targets: Vec<Target>,
    /// Each timed run.
    duration: Duration,
    /// Repetitions.
    reps: u32,
    /// wrk connections.
    connections: u32,
    /// Paced rate.
    rate: u32,
    /// Timed connects per connect() run.
    connects: usize,
    /// CPU of the load generator and the origin.
    loadgen_cpu: &'static str,
    /// CPU of the proxy under test.
    proxy_cpu: &'static str,
}

impl Settings {
    /// Resolves the command line.
    fn new(args: &BenchArgs) -> Self {
        let mut scenarios = Vec::new();
        for s in &args.scenarios {
            if !scenarios.contains(s) {
                scenarios.push(*s);
            }
        }
        let mut targets = Vec::new();
        for t in &args.targets {
            if !targets.contains(t) {
                targets.push(*t);
            }
        }
        let cpus = thread::available_parallelism().map_or(1, usize::from);
        Self {
            scenarios,
            targets,
            duration: if args.quick {
                Duration::from_secs(2)
            } else {
                args.duration
            },
            reps: if args.quick { 1 } else { args.reps },
            connections: args.connections,
            rate: args.rate,
            connects: if args.quick { 5_000 } else { 20_000 },
            loadgen_cpu: "0",
            proxy_cpu: if cpus >= 2 { "1" } else { "0" },
        }
    }

    /// The timed kinds to run.
    fn kinds(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| match k {
                Kind::Keepalive => self.scenarios.contains(&Scenario::Keepalive),
                Kind::Close => self.scenarios.contains(&Scenario::Close),
                Kind::PacedKeepalive | Kind::PacedClose => {
                    self.scenarios.contains(&Scenario::Paced)
                }
            })
            .collect()
    }

    /// wrk's whole seconds.
    fn wrk_secs(&self) -> u64 {
        self.duration.as_secs_f64().round().max(1.0) as u64
    }

    /// True if a target takes part in a timed kind.
    fn runs(&self, target: Target) -> bool {
        self.targets.contains(&target) && !self.kinds().is_empty()
    }
}

/// A target ready to take load.
#[derive(Debug)]
struct Live {
    /// Which.
    target: Target,
    /// Where clients connect.
    addr: SocketAddr,
    /// Clients run inside this cgroup (scopegate's managed one).
    cgroup: Option<String>,
    /// The proxy's PID (CPU accounting).
    pid: Option<u32>,
    /// Its audit or access log.
    log: Option<LineCounter>,
    /// scopegate with the plain `{pN}` fallback policy (looser than the rules).
    plain_policy: bool,
}

/// The long-running processes. Fields drop in order: proxies, then the origin.
#[derive(Debug, Default)]
struct Fleet {
    /// nginx as the peer proxy.
    nginx: Option<Proc>,
    /// HAProxy.
    haproxy: Option<Proc>,
    /// The scopegate agent.
    agent: Option<Proc>,
    /// The nginx origin.
    upstream: Option<Proc>,
}

impl Fleet {
    /// Fails if any of them exited.
    fn check(&mut self) -> Result<()> {
        for p in [
            &mut self.nginx,
            &mut self.haproxy,
            &mut self.agent,
            &mut self.upstream,
        ]
        .into_iter()
        .flatten()
        {
            p.ensure_running()?;
        }
        Ok(())
    }
}

/// What the runs need to know about the environment.
#[derive(Debug)]
struct Env {
    /// The scopegate binary.
    bin: PathBuf,
    /// This xtask binary (for the helper clients).
    xtask: PathBuf,
    /// The workload directory.
    workload_dir: PathBuf,
    /// Generated files and logs.
    work: PathBuf,
    /// Clock ticks per second.
    clk_tck: f64,
    /// The origin.
    upstream: SocketAddr,
}

/// Runs `cargo xtask bench`.
pub fn bench(ctx: &Ctx, args: &BenchArgs) -> Result<()> {
    let started = Instant::now();
    let settings = Settings::new(args);
    let host = setup::check_host()?;
    let bin = if args.no_build {
        let bin = ctx.release_bin();
        if !bin.is_file() {
            bail!(
                "{} does not exist: run without --no-build (or `cargo xtask build` first)",
                bin.display()
            );
        }
        bin
    } else {
        ci::build_release(ctx)?
    };
    let bin = bin
        .canonicalize()
        .with_context(|| format!("resolving {}", bin.display()))?;
    ensure_packages(&settings)?;
    if args.profile {
        profile::ensure_tools(ctx)?;
    }

    let out = ctx.target_dir.join("bench");
    let work = out.join("work");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    for dir in [work.join("tmp"), work.join("policies")] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    procs::sweep_stale(&bin, &host.cgroup2, PREFIX);
    let workload_dir = args
        .workload
        .clone()
        .unwrap_or_else(|| ctx.root.join("..").join("shared").join("bench"));
    let workload = Workload::load(&workload_dir)?;
    let workload_dir = workload_dir.canonicalize()?;
    let clk_tck: f64 = procs::run_ok(
        Command::new("getconf").arg("CLK_TCK"),
        Duration::from_secs(10),
    )?
    .trim()
    .parse()
    .context("parsing `getconf CLK_TCK`")?;
    // A free port rather than 8080, which `cargo xtask demo` and others may want meanwhile.
    let upstream: SocketAddr =
        format!("{UPSTREAM_IP}:{}", procs::free_port(UPSTREAM_IP, None)?).parse()?;
    let env = Env {
        bin,
        xtask: env::current_exe().context("finding the xtask binary")?,
        workload_dir,
        work,
        clk_tck,
        upstream,
    };
    let mut results = Results::default();
    meta(&mut results, &settings, &env, args);

    // Guards drop in reverse order: the fleet (processes), then the pins (hooks
    // detached), then the cgroups (anything left in them stopped by PID).
    let name = format!("{PREFIX}{}", process::id());
    let tree = CgroupTree::new(&host.cgroup2, &name)?;
    let managed = tree.child("managed")?;
    let unmanaged = tree.child("unmanaged")?;
    let nohook_tree = CgroupTree::new(&host.cgroup2, &format!("{name}-nohook"))?;
    let nohook = nohook_tree.child("base")?;
    let pins = PinDir::new(&env.bin, PathBuf::from("/sys/fs/bpf").join(&name));
    let mut fleet = Fleet::default();

    let mut up = start_upstream(&env, &settings)?;
    up.wait_listening(env.upstream)?;
    fleet.upstream = Some(up);

    let mut lives = Vec::new();
    let need_agent =
        settings.runs(Target::Scopegate) || settings.scenarios.contains(&Scenario::Micro);
    for target in settings.targets.clone() {
        if !settings.runs(target) {
            continue;
        }
        lives.push(match target {
            Target::Direct => Live {
                target,
                addr: env.upstream,
                cgroup: None,
                pid: None,
                log: None,
                plain_policy: false,
            },
            Target::Scopegate => start_agent(
                &env,
                &settings,
                &workload,
                &tree,
                &managed,
                &pins,
                &mut fleet,
                &mut results,
            )?,
            Target::Nginx => start_nginx_proxy(&env, &settings, &workload, &mut fleet)?,
            Target::Haproxy => start_haproxy(&env, &settings, &workload, &mut fleet)?,
        });
    }
    if need_agent && fleet.agent.is_none() {
        start_agent(
            &env,
            &settings,
            &workload,
            &tree,
            &managed,
            &pins,
            &mut fleet,
            &mut results,
        )?;
    }
    for live in &lives {
        if let Some(pid) = live.pid {
            let cpus = procs::status_field(pid, "Cpus_allowed_list").unwrap_or_default();
            let threads = procs::status_field(pid, "Threads").unwrap_or_default();
            let kids = procs::descendants(pid).len();
            results.meta.push((
                format!("{} process", live.target.name()),
                format!("pid {pid}, CPUs {cpus}, {threads} thread(s), {kids} child process(es)"),
            ));
        }
    }

    verify(&env, &workload, &mut lives, &mut results)?;
    fleet.check()?;

    if settings.scenarios.contains(&Scenario::Micro) {
        let agent_pid = fleet
            .agent
            .as_ref()
            .context("the micro-benchmarks need the agent")?
            .pid()?;
        micro(
            &env,
            &settings,
            &workload,
            agent_pid,
            [&nohook, &unmanaged, &managed],
            &mut results,
        )?;
        fleet.check()?;
    }

    let wrk_script = env.work.join("workload.lua");
    fs::write(&wrk_script, workload::wrk_script(&workload.requests))
        .with_context(|| format!("writing {}", wrk_script.display()))?;
    for kind in settings.kinds() {
        let note = kind_note(kind, &settings);
        eprintln!("\n==> bench: {} ({note})", kind.title());
        results.kind_notes.push((kind, note));
        for rep in 1..=settings.reps {
            for live in &mut lives {
                let sample = measure(&env, &settings, kind, rep, live, &wrk_script)?;
                eprintln!(
                    "bench: {} rep {rep} {:<9} {:>8.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  CPU/req {:>6}  switches/req {:>5}  errors {}",
                    kind.key(),
                    live.target.name(),
                    sample.rps,
                    sample.p50_us,
                    sample.p99_us,
                    sample
                        .cpu_us_per_req
                        .map_or_else(|| "–".to_owned(), |v| format!("{v:.1}")),
                    sample
                        .switches_per_req
                        .map_or_else(|| "–".to_owned(), |v| format!("{v:.2}")),
                    sample.non2xx + sample.socket_errors
                );
                results.samples.push(sample);
                fleet.check()?;
                thread::sleep(Duration::from_millis(200));
            }
        }
    }

    if args.profile {
        let live = lives
            .iter_mut()
            .find(|l| l.target == Target::Scopegate)
            .context("--profile needs the scopegate target")?;
        results.profile = Some(profile_agent(
            ctx,
            &env,
            &settings,
            live,
            &wrk_script,
            &out,
        )?);
        fleet.check()?;
    }
    if settings.scenarios.contains(&Scenario::Tls) {
        results.tls = Some(tls::run(&env, &settings, &host.cgroup2, &name)?);
    }
    if settings.scenarios.contains(&Scenario::Decide) {
        results.decide = Some(decide(ctx)?);
    }

    // Stop everything before writing the report, so that failures to stop show first.
    drop(fleet);
    drop(pins);
    drop(nohook_tree);
    drop(tree);

    results.meta.push((
        "load average after".into(),
        loadavg().unwrap_or_else(|| "?".into()),
    ));
    let elapsed = started.elapsed();
    results.meta.push((
        "wall time".into(),
        format!("{:.0} s (including build and setup)", elapsed.as_secs_f64()),
    ));
    let md = results.markdown();
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let report = out.join("REPORT.md");
    fs::write(&report, &md).with_context(|| format!("writing {}", report.display()))?;
    let json = out.join("results.json");
    let text = serde_json::to_string_pretty(&results.json()).context("serialising results")?;
    fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    println!("{md}");
    eprintln!(
        "bench: report in {}, raw results in {}, logs and configs in {} ({:.0} s)",
        report.display(),
        json.display(),
        env.work.display(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// One keep-alive run through the agent under `perf record` (not a timed sample);
/// returns the report's section.
fn profile_agent(
    ctx: &Ctx,
    env: &Env,
    settings: &Settings,
    live: &mut Live,
    wrk_script: &Path,
    out: &Path,
) -> Result<String> {
    let pid = live.pid.context("the agent's pid")?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let outputs = profile::Outputs::under(out);
    eprintln!("\n==> bench: profiling the agent (pid {pid}) under keep-alive load");
    let recording = profile::start(pid, settings.wrk_secs() + 1, settings.loadgen_cpu, &outputs)?;
    let sample = measure(env, settings, Kind::Keepalive, 0, live, wrk_script)?;
    let title = format!(
        "scopegate agent, keep-alive wrk -t1 -c{}, {:.0} req/s under the profiler",
        settings.connections, sample.rps
    );
    let md = recording.finish(ctx, &title)?;
    eprintln!("bench: profile in {}", outputs.markdown.display());
    // The report carries the per-crate table; PROFILE.md has the function tables.
    let per_crate = md
        .split("\n## ")
        .find(|s| s.starts_with("Self time per crate"))
        .unwrap_or_default();
    Ok(format!(
        "\n## Profile (`--profile`)\n\n{title}: flame graph `flamegraph.svg`, top 20 \
         functions in `PROFILE.md`.\n\n### {}\n",
        per_crate.trim_end()
    ))
}

/// The header lines of the report.
fn meta(results: &mut Results, settings: &Settings, env: &Env, args: &BenchArgs) {
    let m = &mut results.meta;
    let first_line = |cmd: &mut Command| {
        procs::run_bounded(cmd, Duration::from_secs(10))
            .ok()
            .map(|o| {
                let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&o.stderr));
                text.lines().next().unwrap_or("").trim().to_owned()
            })
            .unwrap_or_else(|| "?".into())
    };
    m.push((
        "date".into(),
        first_line(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
    ));
    m.push((
        "machine".into(),
        format!(
            "{} CPU(s), kernel {}, CLK_TCK {}",
            thread::available_parallelism().map_or(0, usize::from),
            first_line(Command::new("uname").arg("-r")),
            env.clk_tck
        ),
    ));
    m.push((
        "load average before".into(),
        loadavg().unwrap_or_else(|| "?".into()),
    ));
    let scenarios: Vec<String> = settings
        .scenarios
        .iter()
        .filter_map(|s| s.to_possible_value().map(|v| v.get_name().to_owned()))
        .collect();
    let targets: Vec<&str> = settings.targets.iter().map(|t| t.name()).collect();
    m.push((
        "settings".into(),
        format!(
            "--scenarios {} --targets {} --duration {:.1}s --reps {}{} (wrk -t1 -c{}, paced {} req/s over {PACED_CONNECTIONS} connections)",
            scenarios.join(","),
            targets.join(","),
            settings.duration.as_secs_f64(),
            settings.reps,
            if args.quick { " (--quick)" } else { "" },
            settings.connections,
            settings.rate,
        ),
    ));
    m.push((
        "pinning".into(),
        format!(
            "load generator + origin on CPU {}, proxy under test on CPU {}",
            settings.loadgen_cpu, settings.proxy_cpu
        ),
    ));
    m.push((
        "origin".into(),
        format!(
            "nginx on {}, 1 worker, `return 200` with a 128-byte body",
            env.upstream
        ),
    ));
    m.push((
        "workload".into(),
        format!(
            "{} (rules.txt, requests.txt, denied.txt)",
            env.workload_dir.display()
        ),
    ));
    m.push(("scopegate binary".into(), env.bin.display().to_string()));
    m.push((
        "peers".into(),
        format!(
            "{}; {}; {}",
            first_line(Command::new("nginx").arg("-v")),
            first_line(Command::new("haproxy").arg("-v")),
            first_line(Command::new("wrk").arg("-v")),
        ),
    ));
}

/// `--nofile=N:N` for prlimit: [`NOFILE_WANTED`], or this process's hard limit if that is
/// lower (raising it needs CAP_SYS_RESOURCE, which containers often lack).
fn nofile_arg() -> String {
    let n = nofile_limit();
    format!("--nofile={n}:{n}")
}

/// [`NOFILE_WANTED`], or this process's hard open-files limit if that is lower.
fn nofile_limit() -> u64 {
    let hard = fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("Max open files"))?;
            let hard = line.split_whitespace().nth(4)?;
            Some(if hard == "unlimited" {
                NOFILE_WANTED
            } else {
                hard.parse().ok()?
            })
        })
        .unwrap_or(NOFILE_WANTED);
    hard.min(NOFILE_WANTED)
}

/// `/proc/loadavg`'s three averages.
fn loadavg() -> Option<String> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The sentence under a kind's heading.
fn kind_note(kind: Kind, s: &Settings) -> String {
    let runs = format!(
        "{} × {:.1} s per target, medians",
        s.reps,
        if kind.paced() {
            s.duration.as_secs_f64()
        } else {
            s.wrk_secs() as f64
        }
    );
    match kind {
        Kind::Keepalive => format!("wrk -t1 -c{} --latency, {runs}.", s.connections),
        Kind::Close => format!(
            "wrk -t1 -c{} --latency -H 'Connection: close', {runs}.",
            s.connections
        ),
        Kind::PacedKeepalive => format!(
            "Open-loop client at {} req/s over {PACED_CONNECTIONS} kept-alive connections, latency from the scheduled send time, {runs}.",
            s.rate
        ),
        Kind::PacedClose => format!(
            "Open-loop client at {} req/s, a new connection per request, latency from the scheduled send time, {runs}.",
            s.rate
        ),
    }
}

/// Installs wrk, nginx and HAProxy from Debian packages if missing (services are kept
/// from starting with a temporary policy-rc.d when there is none).
fn ensure_packages(settings: &Settings) -> Result<()> {
    let mut wanted = vec!["nginx", "curl"];
    if settings.kinds().iter().any(|k| !k.paced()) {
        wanted.push("wrk");
    }
    if settings.runs(Target::Haproxy) {
        wanted.push("haproxy");
    }
    setup::install_missing_debs("bench", &wanted)
}

/// `taskset -c CPU PROGRAM`.
fn pinned(cpu: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu]).arg(program);
    cmd
}

/// Checks an nginx config with `nginx -t`.
fn nginx_test(env: &Env, conf: &Path, error_log: &Path) -> Result<()> {
    let mut cmd = Command::new("nginx");
    cmd.arg("-t")
        .arg("-p")
        .arg(&env.work)
        .arg("-e")
        .arg(error_log)
        .arg("-c")
        .arg(conf)
        .args(["-g", "daemon off;"]);
    procs::run_ok(&mut cmd, Duration::from_secs(20)).map(drop)
}

/// Starts nginx with `conf` on `cpu`.
fn start_nginx(env: &Env, name: &str, conf: &Path, cpu: &str) -> Result<Proc> {
    let error_log = env.work.join(format!("{name}-error.log"));
    nginx_test(env, conf, &error_log)?;
    let mut cmd = pinned(cpu, "nginx");
    cmd.arg("-p")
        .arg(&env.work)
        .arg("-e")
        .arg(&error_log)
        .arg("-c")
        .arg(conf)
        .args(["-g", "daemon off;"]);
    Proc::spawn(name, cmd, &env.work.join(format!("{name}.log")), None)
}

/// The nginx origin, on the load generator's CPU.
fn start_upstream(env: &Env, settings: &Settings) -> Result<Proc> {
    let conf = env.work.join("upstream.conf");
    fs::write(
        &conf,
        workload::nginx_upstream_conf(&env.work, env.upstream, nofile_limit()),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    start_nginx(env, "upstream", &conf, settings.loadgen_cpu)
}

/// nginx as the peer proxy.
fn start_nginx_proxy(
    env: &Env,
    settings: &Settings,
    workload: &Workload,
    fleet: &mut Fleet,
) -> Result<Live> {
    let listen: SocketAddr =
        format!("127.0.0.1:{}", procs::free_port("127.0.0.1", None)?).parse()?;
    let conf = env.work.join("nginx-proxy.conf");
    fs::write(
        &conf,
        workload::nginx_proxy_conf(
            &env.work,
            listen,
            env.upstream,
            &workload.rules,
            nofile_limit(),
        ),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    let mut proc = start_nginx(env, "nginx-proxy", &conf, settings.proxy_cpu)?;
    proc.wait_listening(listen)?;
    let pid = proc.pid()?;
    fleet.nginx = Some(proc);
    Ok(Live {
        target: Target::Nginx,
        addr: listen,
        cgroup: None,
        pid: Some(pid),
        log: Some(LineCounter::new(&env.work.join("nginx-access.jsonl"))),
        plain_policy: false,
    })
}

/// HAProxy as the peer proxy, logging to stdout (a file).
fn start_haproxy(
    env: &Env,
    settings: &Settings,
    workload: &Workload,
    fleet: &mut Fleet,
) -> Result<Live> {
    let listen: SocketAddr =
        format!("127.0.0.1:{}", procs::free_port("127.0.0.1", None)?).parse()?;
    let conf = env.work.join("haproxy.cfg");
    fs::write(
        &conf,
        workload::haproxy_conf(listen, env.upstream, &workload.rules, nofile_limit()),
    )
    .with_context(|| format!("writing {}", conf.display()))?;
    procs::run_ok(
        Command::new("haproxy").arg("-c").arg("-f").arg(&conf),
        Duration::from_secs(20),
    )?;
    let log = env.work.join("haproxy-access.log");
    let mut cmd = pinned(settings.proxy_cpu, "haproxy");
    cmd.arg("-db").arg("-f").arg(&conf);
    let mut proc = Proc::spawn(
        "haproxy",
        cmd,
        &env.work.join("haproxy-stderr.log"),
        Some(&log),
    )?;
    proc.wait_listening(listen)?;
    let pid = proc.pid()?;
    fleet.haproxy = Some(proc);
    Ok(Live {
        target: Target::Haproxy,
        addr: listen,
        cgroup: None,
        pid: Some(pid),
        log: Some(LineCounter::new(&log)),
        plain_policy: false,
    })
}

/// Writes the scopegate policy in the best path style the binary accepts; returns the
/// directory and the style.
fn write_policy(
    env: &Env,
    workload: &Workload,
    managed: &str,
    results: &mut Results,
) -> Result<(PathBuf, PathStyle)> {
    let dir = env.work.join("policies");
    let file = dir.join("bench.yaml");
    let mut rejected = Vec::new();
    for style in PathStyle::ALL {
        let Some(yaml) = workload::policy_yaml(&workload.rules, managed, env.upstream, style)?
        else {
            continue;
        };
        fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
        let out = procs::run_bounded(
            Command::new(&env.bin).arg("policy").arg("check").arg(&dir),
            Duration::from_secs(20),
        )?;
        if out.status.success() {
            if style == PathStyle::Plain {
                let first = rejected.first().cloned().unwrap_or_default();
                let warning = format!(
                    "this scopegate binary rejects `{{name:REGEX}}` path parameters, so the policy uses plain `{{pN}}` segments: looser than the other configurations (denied requests it lets through are not checked). First error: {first}"
                );
                eprintln!("bench: WARNING: {warning}");
                results.warnings.push(warning);
            } else if style == PathStyle::RegexNoBraces {
                results.warnings.push(
                    "the scopegate binary rejects `{n}` quantifiers inside `{name:REGEX}`; the policy spells them out (e.g. `[0-9]{2}` as `[0-9][0-9]`)".into(),
                );
            }
            results.meta.push((
                "scopegate policy".into(),
                format!("{} ({})", file.display(), style.name()),
            ));
            return Ok((dir, style));
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        rejected.push(
            text.lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned(),
        );
    }
    bail!(
        "`scopegate policy check` rejected every form of the generated policy {}:\n  {}",
        file.display(),
        rejected.join("\n  ")
    )
}

/// Starts the agent (policy for the managed cgroup, hooks on the benchmark's tree).
#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the parts are distinct"
)]
fn start_agent(
    env: &Env,
    settings: &Settings,
    workload: &Workload,
    tree: &CgroupTree,
    managed: &str,
    pins: &PinDir,
    fleet: &mut Fleet,
    results: &mut Results,
) -> Result<Live> {
    let (policies, style) = write_policy(env, workload, managed, results)?;
    let port = procs::free_port("127.0.0.1", Some("::1"))?;
    let audit = env.work.join("scopegate-audit.jsonl");
    // prlimit and taskset exec the agent: the PID stays the agent's.
    let nofile = nofile_arg();
    let mut cmd = Command::new("prlimit");
    cmd.args([nofile.as_str(), "taskset", "-c", settings.proxy_cpu])
        .arg(&env.bin)
        .arg("run")
        .arg("--policies")
        .arg(&policies)
        .arg("--proxy-port")
        .arg(port.to_string())
        .arg("--pin-dir")
        .arg(&pins.dir)
        .arg("--cgroup-root")
        .arg(&tree.dir)
        .arg("--audit-file")
        .arg(&audit)
        .arg("--no-audit-stdout")
        .arg("--admin-socket")
        .arg(env.work.join("scopegate-admin.sock"))
        .env("TOKIO_WORKER_THREADS", "1")
        // The allocator settings of packaging/scopegate.service.
        .env("MIMALLOC_ARENA_EAGER_COMMIT", "0")
        .env("MIMALLOC_PURGE_DELAY", "100")
        .env("NO_COLOR", "1");
    let mut proc = Proc::spawn(
        "scopegate agent",
        cmd,
        &env.work.join("scopegate-agent.log"),
        None,
    )?;
    proc.wait_log_line(READY_LINE, Duration::from_secs(30))?;
    let pid = proc.pid()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "scopegate" {
        bail!(
            "pid {pid} is {:?}, not the agent: prlimit/taskset did not exec it",
            comm.trim()
        );
    }
    results.meta.push((
        "scopegate agent".into(),
        format!(
            "proxy port {port}, TOKIO_WORKER_THREADS=1, MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=100 (as the unit), prlimit {nofile}, audit {} ({})",
            audit.display(),
            match style {
                PathStyle::Plain => "fallback policy",
                _ => "regex policy",
            }
        ),
    ));
    fleet.agent = Some(proc);
    Ok(Live {
        target: Target::Scopegate,
        addr: env.upstream,
        cgroup: Some(managed.to_owned()),
        pid: Some(pid),
        log: Some(LineCounter::new(&audit)),
        plain_policy: style == PathStyle::Plain,
    })
}

/// `COMMAND`, or `scopegate exec --cgroup CG -- COMMAND`, pinned to `cpu` if given.
fn client_command(
    env: &Env,
    cpu: Option<&str>,
    cgroup: Option<&str>,
    program: impl AsRef<std::ffi::OsStr>,
) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(cg) = cgroup {
        argv.push(env.bin.clone().into_os_string());
        argv.extend(["exec", "--cgroup", cg, "--"].map(Into::into));
    }
    argv.push(program.as_ref().to_owned());
    let mut cmd = match cpu {
        Some(cpu) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", cpu]);
            cmd
        }
        None => Command::new(argv.remove(0)),
    };
    cmd.args(argv);
    cmd
}

/// `curl` one request through a target; returns (status, body bytes).
fn curl(env: &Env, live: &Live, req: &workload::Request) -> Result<(u16, u64)> {
    let mut cmd = client_command(env, None, live.cgroup.as_deref(), "curl");
    cmd.args([
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        "-X",
        &req.method,
    ]);
    if let Some(body) = req.body() {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    cmd.arg(format!("http://{}{}", live.addr, req.target));
    let out = procs::run_bounded(&mut cmd, Duration::from_secs(20))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let status = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let size = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    Ok((status, size))
}

/// Checks every target: 200 for every request of requests.txt (and the 128-byte body
/// directly from the origin), 403 for every one of denied.txt. Fails listing every
/// mismatch.
fn verify(env: &Env, workload: &Workload, lives: &mut [Live], results: &mut Results) -> Result<()> {
    let mut problems = Vec::new();
    for live in lives.iter_mut() {
        let name = live.target.name();
        let before = match live.log.as_mut() {
            Some(c) => Some(c.settled()?),
            None => None,
        };
        let (mut sent, mut allowed_ok, mut denied_ok, mut denied_checked) = (0u64, 0, 0, 0);
        for req in &workload.requests {
            let (status, size) = curl(env, live, req)?;
            sent += 1;
            if status != 200 {
                problems.push(format!("{name}: {} → {status}, expected 200", req.show()));
            } else if live.target == Target::Direct && size != 128 {
                problems.push(format!(
                    "{name}: {} → {size} body bytes, expected 128",
                    req.show()
                ));
            } else {
                allowed_ok += 1;
            }
        }
        let mut skipped = Vec::new();
        // The origin allows everything: denied.txt only applies to the proxies.
        let denied: &[workload::Request] = if live.target == Target::Direct {
            &[]
        } else {
            &workload.denied
        };
        for req in denied {
            if live.plain_policy && workload::plain_policy_allows(&workload.rules, req)? {
                skipped.push(req.show());
                continue;
            }
            let (status, _) = curl(env, live, req)?;
            sent += 1;
            denied_checked += 1;
            if status == 403 {
                denied_ok += 1;
            } else {
                problems.push(format!("{name}: {} → {status}, expected 403", req.show()));
            }
        }
        if !skipped.is_empty() {
            let warning = format!(
                "{name}: not checked for 403 (the fallback policy allows them): {}",
                skipped.join(", ")
            );
            eprintln!("bench: WARNING: {warning}");
            results.warnings.push(warning);
        }
        if let (Some(before), Some(counter)) = (before, live.log.as_mut()) {
            let after = counter.settled()?;
            if after < before + sent {
                problems.push(format!(
                    "{name}: {} line(s) in {} for {sent} checked requests",
                    after.saturating_sub(before),
                    counter_path(live)
                ));
            }
        }
        let denied_part = if live.target == Target::Direct {
            String::new()
        } else {
            format!(", {denied_ok}/{denied_checked} denied requests → 403")
        };
        eprintln!(
            "bench: check {name}: {allowed_ok}/{} allowed requests → 200{denied_part}",
            workload.requests.len(),
        );
    }
    if !problems.is_empty() {
        bail!(
            "the configurations do not behave as the workload requires (nothing was timed; configs and logs in {}):\n  {}",
            env.work.display(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Where a target's log is (for messages).
fn counter_path(live: &Live) -> String {
    match live.target {
        Target::Scopegate => "the audit file".into(),
        Target::Nginx => "the access log".into(),
        Target::Haproxy => "the HAProxy log".into(),
        Target::Direct => "–".into(),
    }
}

/// One timed run of `kind` against `live`.
fn measure(
    env: &Env,
    settings: &Settings,
    kind: Kind,
    rep: u32,
    live: &mut Live,
    wrk_script: &Path,
) -> Result<Sample> {
    let lines_before = match live.log.as_mut() {
        Some(c) => Some(c.settled()?),
        None => None,
    };
    let cpu_before = live.pid.map(procs::tree_cpu_ticks).transpose()?;
    let switches_before = live.pid.map(procs::tree_context_switches).transpose()?;
    let (raw, requests, rps, p50, p99, p999, non2xx, socket_errors) = if kind.paced() {
        let mut cmd = client_command(
            env,
            Some(settings.loadgen_cpu),
            live.cgroup.as_deref(),
            &env.xtask,
        );
        cmd.args(["bench-helper", "paced", "--addr"])
            .arg(live.addr.to_string())
            .arg("--host")
            .arg(live.addr.to_string())
            .arg("--requests")
            .arg(env.workload_dir.join("requests.txt"))
            .arg("--rate")
            .arg(settings.rate.to_string())
            .arg("--duration-ms")
            .arg(settings.duration.as_millis().to_string())
            .arg("--conns")
            .arg(PACED_CONNECTIONS.to_string());
        if kind.close() {
            cmd.arg("--close");
        }
        let text = procs::run_ok(&mut cmd, settings.duration + Duration::from_secs(40))?;
        let raw: Value = serde_json::from_str(text.trim())
            .with_context(|| format!("paced client printed {text:?}"))?;
        let f = |k: &str| raw[k].as_f64().unwrap_or(0.0);
        let n = |k: &str| raw[k].as_u64().unwrap_or(0);
        (
            raw.clone(),
            n("completed"),
            f("rps"),
            f("p50_us"),
            f("p99_us"),
            f("p999_us"),
            n("non2xx"),
            n("errors"),
        )
    } else {
        let secs = settings.wrk_secs();
        let mut cmd = client_command(
            env,
            Some(settings.loadgen_cpu),
            live.cgroup.as_deref(),
            "wrk",
        );
        cmd.args(["-t1", &format!("-c{}", settings.connections)])
            .arg(format!("-d{secs}s"))
            .arg("--latency")
            .arg("-s")
            .arg(wrk_script);
        if kind.close() {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("http://{}/", live.addr));
        let text = procs::run_ok(&mut cmd, Duration::from_secs(secs + 40))?;
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("SGBENCH "))
            .with_context(|| format!("wrk printed no SGBENCH line:\n{text}"))?;
        let raw: Value =
            serde_json::from_str(line).with_context(|| format!("wrk's summary {line:?}"))?;
        let f = |k: &str| raw[k].as_f64().unwrap_or(0.0);
        let n = |k: &str| raw[k].as_u64().unwrap_or(0);
        let duration_s = f("duration_us") / 1e6;
        (
            raw.clone(),
            n("requests"),
            if duration_s > 0.0 {
                f("requests") / duration_s
            } else {
                0.0
            },
            f("p50_us"),
            f("p99_us"),
            f("p999_us"),
            n("status"),
            n("connect") + n("read") + n("write") + n("timeout"),
        )
    };
    let cpu_after = live.pid.map(procs::tree_cpu_ticks).transpose()?;
    let switches_after = live.pid.map(procs::tree_context_switches).transpose()?;
    let lines_after = match live.log.as_mut() {
        Some(c) => Some(c.settled()?),
        None => None,
    };
    let per_req = |delta: f64| (requests > 0).then(|| delta / requests as f64);
    let cpu_us_per_req = match (cpu_before, cpu_after) {
        (Some(b), Some(a)) => per_req(a.saturating_sub(b) as f64 * 1e6 / env.clk_tck),
        _ => None,
    };
    let switches_per_req = match (switches_before, switches_after) {
        (Some(b), Some(a)) => per_req(a.saturating_sub(b) as f64),
        _ => None,
    };
    let log_lines_per_req = match (lines_before, lines_after) {
        (Some(b), Some(a)) => per_req(a.saturating_sub(b) as f64),
        _ => None,
    };
    Ok(Sample {
        kind,
        rep,
        target: live.target,
        rps,
        p50_us: p50,
        p99_us: p99,
        p999_us: p999,
        requests,
        non2xx,
        socket_errors,
        cpu_us_per_req,
        switches_per_req,
        log_lines_per_req,
        raw,
    })
}

/// The micro-benchmarks: agent memory with idle connections, then connect() through the
/// hooks, interleaved per repetition, from `cgroups`: outside the agent's tree (no
/// hooks), unmanaged under it (the hooks' fast path), managed (redirected).
fn micro(
    env: &Env,
    settings: &Settings,
    workload: &Workload,
    agent_pid: u32,
    cgroups: [&String; 3],
    results: &mut Results,
) -> Result<()> {
    eprintln!("\n==> bench: micro-benchmarks");
    let managed = cgroups[2];
    results.memory = Some(hold_memory(env, settings, workload, agent_pid, managed)?);
    for rep in 1..=settings.reps {
        for (path, cgroup) in cgroups.iter().enumerate() {
            let mut cmd = client_command(env, Some(settings.loadgen_cpu), Some(cgroup), &env.xtask);
            cmd.args(["bench-helper", "connect", "--listen", CONNECT_IP, "--count"])
                .arg(settings.connects.to_string());
            if path == 2 {
                // The managed cgroup may only connect to the policy's destinations: the
                // origin's address, which the hook redirects to the proxy.
                cmd.arg("--to").arg(env.upstream.to_string());
            }
            let text = procs::run_ok(&mut cmd, Duration::from_secs(180))?;
            let raw: Value = serde_json::from_str(text.trim())
                .with_context(|| format!("connect client printed {text:?}"))?;
            let f = |k: &str| raw[k].as_f64().unwrap_or(0.0);
            let sample = ConnectSample {
                rep,
                path,
                median_ns: f("median_ns"),
                mean_ns: f("mean_ns"),
                p99_ns: f("p99_ns"),
                count: raw["count"].as_u64().unwrap_or(0),
                errors: raw["errors"].as_u64().unwrap_or(0),
            };
            eprintln!(
                "bench: connect rep {rep} {:<45} median {:>6.0} ns  mean {:>6.0} ns  failed {}",
                report::CONNECT_PATHS[path],
                sample.median_ns,
                sample.mean_ns,
                sample.errors
            );
            results.connect.push(sample);
        }
    }
    Ok(())
}

/// Holds [`HOLD_CONNECTIONS`] idle connections through the proxy and reads the agent's
/// VmRSS before, while and after.
fn hold_memory(
    env: &Env,
    settings: &Settings,
    workload: &Workload,
    agent_pid: u32,
    managed: &str,
) -> Result<Memory> {
    let target = workload
        .requests
        .iter()
        .find(|r| r.method == "GET")
        .map(|r| r.target.clone())
        .context("requests.txt has no GET request to open idle connections with")?;
    thread::sleep(Duration::from_millis(500));
    let before_kib = procs::vm_rss_kib(agent_pid)?;
    let fds_before = procs::fd_count(agent_pid)? as u64;
    let mut cmd = pinned(settings.loadgen_cpu, &env.bin);
    cmd.args(["exec", "--cgroup", managed, "--", "prlimit"])
        .arg(nofile_arg())
        .arg(&env.xtask)
        .args(["bench-helper", "hold", "--addr"])
        .arg(env.upstream.to_string())
        .arg("--host")
        .arg(env.upstream.to_string())
        .arg("--target")
        .arg(&target)
        .arg("--count")
        .arg(HOLD_CONNECTIONS.to_string())
        .arg("--max-secs")
        .arg("180")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let client_log = env.work.join("hold-client.log");
    cmd.stderr(
        fs::File::create(&client_log)
            .with_context(|| format!("creating {}", client_log.display()))?,
    );
    let child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", ctx::describe(&cmd)))?;
    let mut holder = Holder(Some(child));
    let stdout = holder
        .0
        .as_mut()
        .and_then(|c| c.stdout.take())
        .context("holder stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(180))
        .context("the idle-connection client did not report within 180 s")?;
    let raw: Value = serde_json::from_str(line.trim()).with_context(|| {
        format!(
            "idle-connection client printed {line:?}; {}",
            procs::log_tail(&client_log)
        )
    })?;
    thread::sleep(Duration::from_secs(1));
    let held_kib = procs::vm_rss_kib(agent_pid)?;
    let fds_held = procs::fd_count(agent_pid)? as u64;
    holder.finish();
    // Wait (bounded) until the agent has closed its ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs::fd_count(agent_pid)? as u64 > fds_before + 16 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(500));
    let after_kib = procs::vm_rss_kib(agent_pid)?;
    let fds_after = procs::fd_count(agent_pid)? as u64;
    let memory = Memory {
        wanted: HOLD_CONNECTIONS,
        held: raw["held"].as_u64().unwrap_or(0),
        errors: raw["errors"].as_u64().unwrap_or(0),
        non2xx: raw["non2xx"].as_u64().unwrap_or(0),
        before_kib,
        held_kib,
        after_kib,
        fds_before,
        fds_held,
        fds_after,
    };
    eprintln!(
        "bench: {} idle connections held: agent VmRSS {} → {} KiB ({} fds → {}), {} KiB after close",
        memory.held, before_kib, held_kib, fds_before, fds_held, after_kib
    );
    Ok(memory)
}

/// The idle-connection client: its stdin is closed (it exits) and it is reaped, or killed
/// by PID when dropped.
struct Holder(Option<std::process::Child>);

impl Holder {
    /// Closes its stdin and waits up to 30 s, then kills it.
    fn finish(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        drop(child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the criterion decide bench if the agent has one; returns its result lines.
fn decide(ctx: &Ctx) -> Result<String> {
    // The agent's criterion benches: policy decision, audit sink, TLS interception
    // (leaf minting vs the leaf cache, a full intercepted handshake, ClientHello parsing), and
    // the credential reflection guard (response scanning on credential routes only).
    let mut kept = String::new();
    for name in ["decide", "audit", "tls", "reflect"] {
        let bench = ctx
            .root
            .join("agent")
            .join("benches")
            .join(format!("{name}.rs"));
        if !bench.is_file() {
            let _ = writeln!(kept, "(skipped: {} does not exist)", bench.display());
            continue;
        }
        eprintln!("\n==> bench: cargo bench -p scopegate --bench {name}");
        let mut cmd = ctx.cargo(["bench", "-p", "scopegate", "--bench", name]);
        let out = procs::run_bounded(&mut cmd, Duration::from_secs(1800))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                ctx::describe(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut last_name = "";
        for line in text.lines() {
            if line.contains("time:") {
                let label = line.split("time:").next().unwrap_or("").trim();
                let label = if label.is_empty() { last_name } else { label };
                let _ = writeln!(
                    kept,
                    "{label}: time:{}",
                    line.split("time:").nth(1).unwrap_or("")
                );
            } else if !line.trim().is_empty() && !line.starts_with(' ') {
                last_name = line.trim();
            }
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line() -> Result<()> {
        use clap::Parser as _;
        let cli = crate::Cli::try_parse_from([
            "xtask",
            "bench",
            "--scenarios",
            "keepalive,micro",
            "--targets",
            "nginx,direct",
            "--duration",
            "5s",
            "--reps",
            "2",
        ])?;
        let crate::Cmd::Bench(args) = cli.cmd else {
            bail!("not a bench command");
        };
        assert_eq!(args.scenarios, [Scenario::Keepalive, Scenario::Micro]);
        assert_eq!(args.targets, [Target::Nginx, Target::Direct]);
        assert_eq!((args.duration, args.reps), (Duration::from_secs(5), 2));
        let cli = crate::Cli::try_parse_from(["xtask", "bench"])?;
        let crate::Cmd::Bench(args) = cli.cmd else {
            bail!("not a bench command");
        };
        assert_eq!(args.targets.len(), 4);
        assert_eq!(args.scenarios.len(), 4);
        assert!(crate::Cli::try_parse_from(["xtask", "bench", "--targets", "envoy"]).is_err());
        Ok(())
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("0s").is_err());
    }

    /// A fake `scopegate` whose `policy check` runs `check` (a shell condition on "$3").
    fn fake_env(dir: &Path, check: &str) -> Result<Env> {
        use std::os::unix::fs::PermissionsExt as _;
        fs::create_dir_all(dir.join("policies"))?;
        let bin = dir.join("fake-scopegate");
        fs::write(&bin, format!("#!/bin/sh\n{check}\n"))?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
        Ok(Env {
            bin,
            xtask: PathBuf::from("xtask"),
            workload_dir: dir.to_path_buf(),
            work: dir.to_path_buf(),
            clk_tck: 100.0,
            upstream: "127.0.0.2:8080".parse()?,
        })
    }

    #[test]
    fn policy_style_falls_back_step_by_step() -> Result<()> {
        let dir = env::temp_dir().join(format!("xtask-bench-policy-{}", process::id()));
        let workload = Workload {
            rules: workload::parse_rules("GET ^/a/[0-9]+$\nGET ^/b/[0-9a-f-]{36}$\n")?,
            requests: Vec::new(),
            denied: Vec::new(),
        };
        let cases = [
            ("exit 0", PathStyle::Regex),
            // Rejects braces inside a parameter.
            (
                "! grep -q '{36}' \"$3/bench.yaml\"",
                PathStyle::RegexNoBraces,
            ),
            // Rejects any parameter with a colon.
            ("! grep -q '{p1:' \"$3/bench.yaml\"", PathStyle::Plain),
        ];
        for (check, want) in cases {
            let env = fake_env(&dir, check)?;
            let mut results = Results::default();
            let (_, style) = write_policy(&env, &workload, "/x/managed", &mut results)?;
            assert_eq!(style, want, "{check}");
            assert_eq!(
                results.warnings.len(),
                usize::from(want != PathStyle::Regex)
            );
        }
        let env = fake_env(&dir, "echo 'bench.yaml:1:1: nope'; exit 1")?;
        let err = write_policy(&env, &workload, "/x/managed", &mut Results::default());
        assert!(format!("{:#}", err.err().context("no error")?).contains("nope"));
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn kinds_follow_scenarios() {
        let args = BenchArgs {
            scenarios: vec![Scenario::Paced, Scenario::Keepalive, Scenario::Paced],
            targets: vec![Target::Nginx, Target::Direct],
            duration: Duration::from_secs(10),
            reps: 3,
            quick: true,
            connections: 32,
            rate: 1000,
            no_build: true,
            workload: None,
            profile: false,
        };
        let s = Settings::new(&args);
        assert_eq!(
            s.kinds(),
            [Kind::Keepalive, Kind::PacedKeepalive, Kind::PacedClose]
        );
        assert_eq!((s.reps, s.wrk_secs()), (1, 2));
        assert_eq!(s.scenarios.len(), 2);
        assert!(s.runs(Target::Nginx) && !s.runs(Target::Scopegate));
    }
}
