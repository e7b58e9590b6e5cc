//! `cargo xtask bench --profile`: a CPU profile of the agent under the keep-alive load.
//!
//! After the timed runs (so that the profiler disturbs none of them), one more keep-alive
//! run goes through the agent while `perf record` samples it (the `cpu-clock` software
//! event, so it works on VMs without hardware counters; DWARF call graphs, since the
//! release build keeps line tables but no frame pointers). perf runs on the load
//! generator's CPU. The samples become `profile.folded` (inferno's collapsed stacks),
//! `flamegraph.svg`, and `PROFILE.md`: the top 20 functions by self and by inclusive
//! time, and self time per crate, next to REPORT.md. inferno is installed into
//! `<root>/.tools` when missing.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::ctx::{self, Ctx};

/// The inferno release installed when missing.
const INFERNO_VERSION: &str = "0.12.8";
/// Sampling frequency, Hz (a prime, so it does not beat with periodic work).
const FREQUENCY: &str = "997";
/// Rows of each table.
const TOP: usize = 20;

/// Where the profile's files go.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// `perf record`'s data.
    pub data: PathBuf,
    /// Collapsed stacks.
    pub folded: PathBuf,
    /// The flame graph.
    pub svg: PathBuf,
    /// The tables.
    pub markdown: PathBuf,
}

impl Outputs {
    /// The files under `dir`.
    pub fn under(dir: &Path) -> Self {
        Self {
            data: dir.join("perf.data"),
            folded: dir.join("profile.folded"),
            svg: dir.join("flamegraph.svg"),
            markdown: dir.join("PROFILE.md"),
        }
    }
}

/// Installs inferno into `<root>/.tools` if missing; checks that perf runs.
pub fn ensure_tools(ctx: &Ctx) -> Result<()> {
    let status = Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    if !status.is_ok_and(|s| s.success()) {
        bail!(
            "`perf` is missing: install Debian's linux-perf package (apt-get install linux-perf)"
        );
    }
    let bins = ["inferno-collapse-perf", "inferno-flamegraph"];
    if bins.iter().all(|b| ctx.tools_bin().join(b).is_file()) {
        return Ok(());
    }
    eprintln!(
        "bench: installing inferno {INFERNO_VERSION} into {}",
        ctx.tools.display()
    );
    ctx::run(
        ctx.cargo([
            "install",
            "--locked",
            "--root",
            ctx.tools.to_str().context("non-UTF-8 tools path")?,
            &format!("inferno@{INFERNO_VERSION}"),
        ])
        .env_remove("CARGO_TARGET_DIR"),
    )
}

/// A running `perf record` of one process.
pub struct Recording {
    child: std::process::Child,
    outputs: Outputs,
}

/// Starts sampling `pid` for `secs` seconds, perf itself pinned to `cpu`.
pub fn start(pid: u32, secs: u64, cpu: &str, outputs: &Outputs) -> Result<Recording> {
    let log = File::create(outputs.data.with_extension("log"))
        .with_context(|| format!("creating the log next to {}", outputs.data.display()))?;
    let mut cmd = Command::new("taskset");
    cmd.args([
        "-c",
        cpu,
        "perf",
        "record",
        "-e",
        "cpu-clock",
        "-F",
        FREQUENCY,
    ])
    .args(["--call-graph", "dwarf,16384", "-p"])
    .arg(pid.to_string())
    .arg("-o")
    .arg(&outputs.data)
    .args(["--", "sleep"])
    .arg(secs.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    let child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", ctx::describe(&cmd)))?;
    // perf needs a moment to attach before the load starts.
    thread::sleep(Duration::from_millis(500));
    Ok(Recording {
        child,
        outputs: outputs.clone(),
    })
}

impl Recording {
    /// Waits for perf to finish, then writes the folded stacks, the flame graph and the
    /// tables; returns the tables' Markdown.
    pub fn finish(mut self, ctx: &Ctx, title: &str) -> Result<String> {
        let status = self.child.wait().context("waiting for perf record")?;
        if !status.success() {
            bail!(
                "perf record failed ({status}); see {}",
                self.outputs.data.with_extension("log").display()
            );
        }
        let o = &self.outputs;
        collapse(ctx, &o.data, &o.folded)?;
        let folded =
            File::open(&o.folded).with_context(|| format!("opening {}", o.folded.display()))?;
        let svg = File::create(&o.svg).with_context(|| format!("creating {}", o.svg.display()))?;
        ctx::run(
            Command::new(ctx.tools_bin().join("inferno-flamegraph"))
                .args(["--title", title])
                .stdin(folded)
                .stdout(svg),
        )?;
        let text = fs::read_to_string(&o.folded)
            .with_context(|| format!("reading {}", o.folded.display()))?;
        let profile = Profile::parse(&text)?;
        let md = profile.markdown(title, o);
        fs::write(&o.markdown, &md).with_context(|| format!("writing {}", o.markdown.display()))?;
        Ok(md)
    }
}

/// `perf script | inferno-collapse-perf > folded`.
fn collapse(ctx: &Ctx, data: &Path, folded: &Path) -> Result<()> {
    let mut script = Command::new("perf");
    script
        .args(["script", "--no-inline", "-i"])
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut script_child = script
        .spawn()
        .with_context(|| format!("could not start `{}`", ctx::describe(&script)))?;
    let stacks = script_child.stdout.take().context("perf script stdout")?;
    let out = File::create(folded).with_context(|| format!("creating {}", folded.display()))?;
    let mut collapse = Command::new(ctx.tools_bin().join("inferno-collapse-perf"));
    collapse.arg("--kernel").stdin(stacks).stdout(out);
    let status = ctx::status(&mut collapse)?;
    let script_status = script_child.wait().context("waiting for perf script")?;
    ctx::check(&collapse, status)?;
    ctx::check(&script, script_status)
}

/// Collapsed stacks, aggregated.
#[derive(Debug, Default, PartialEq)]
pub struct Profile {
    /// All samples.
    pub total: u64,
    /// Samples whose innermost frame is the function.
    pub self_samples: HashMap<String, u64>,
    /// Samples with the function anywhere on the stack (once per stack).
    pub inclusive: HashMap<String, u64>,
    /// Self samples per crate (the first path segment; kernel frames as `[kernel]`).
    pub crates: HashMap<String, u64>,
    /// Samples per thread (the first frame: the thread's name).
    pub threads: HashMap<String, u64>,
}

impl Profile {
    /// Parses inferno's collapsed format: `frame;frame;…;leaf COUNT` per line.
    pub fn parse(folded: &str) -> Result<Self> {
        let mut p = Self::default();
        for (n, line) in folded.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            let (stack, count) = line
                .rsplit_once(' ')
                .with_context(|| format!("folded line {}: no count in {line:?}", n + 1))?;
            let count: u64 = count
                .parse()
                .with_context(|| format!("folded line {}: count {count:?}", n + 1))?;
            p.total += count;
            let frames: Vec<String> = stack.split(';').map(function).collect();
            // The first frame is the thread's name.
            let Some(leaf) = frames.last() else { continue };
            *p.threads.entry(frames[0].clone()).or_default() += count;
            *p.self_samples.entry(leaf.clone()).or_default() += count;
            *p.crates.entry(crate_of(leaf)).or_default() += count;
            let mut seen: Vec<&String> = Vec::with_capacity(frames.len());
            for f in frames.iter().skip(1) {
                if !seen.contains(&f) {
                    seen.push(f);
                    *p.inclusive.entry(f.clone()).or_default() += count;
                }
            }
        }
        if p.total == 0 {
            bail!("the profile has no samples");
        }
        Ok(p)
    }

    /// The tables, in Markdown.
    pub fn markdown(&self, title: &str, o: &Outputs) -> String {
        let mut md = format!(
            "# {title}\n\n{:.0} ms of agent CPU sampled at {FREQUENCY} Hz (`perf record -e \
             cpu-clock --call-graph dwarf`; a sample weighs its period in ns). Flame graph: \
             `{}`; collapsed stacks: `{}`. Frames perf could not unwind show as `[unknown]`.\n",
            self.total as f64 / 1e6,
            file_name(&o.svg),
            file_name(&o.folded)
        );
        let pct = |n: u64| 100.0 * n as f64 / self.total as f64;
        for (heading, map) in [
            ("CPU per thread", &self.threads),
            ("Self time per crate", &self.crates),
            ("Top 20 functions by self time", &self.self_samples),
            (
                "Top 20 functions by inclusive time (on the stack)",
                &self.inclusive,
            ),
        ] {
            let _ = write!(
                md,
                "\n## {heading}\n\n| % | CPU ms | name |\n|---:|---:|---|\n"
            );
            for (name, n) in top(map) {
                let _ = writeln!(
                    md,
                    "| {:.1} | {:.1} | `{}` |",
                    pct(n),
                    n as f64 / 1e6,
                    name.replace('|', "\\|")
                );
            }
        }
        md
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The `TOP` largest entries, largest first (ties by name, so the table is stable).
fn top(map: &HashMap<String, u64>) -> Vec<(&str, u64)> {
    let mut v: Vec<(&str, u64)> = map.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v.truncate(TOP);
    v
}

/// A frame without its symbol hash (`…::h0123456789abcdef`) or offset.
fn function(frame: &str) -> String {
    let frame = frame.trim();
    let frame = match frame.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            head
        }
        _ => frame,
    };
    frame.to_owned()
}

/// The crate of a function: `[kernel]` for kernel frames (inferno marks them `_[k]`), the
/// first path segment of a Rust path (through `<…as …>` and `{{closure}}`), else the
/// library's symbol as it is (`libc`-level functions).
fn crate_of(function: &str) -> String {
    if function.ends_with("_[k]") {
        return "[kernel]".into();
    }
    // `<Type as Trait>::f`: the type's crate, or the trait's for a primitive type.
    let f = match function
        .strip_prefix('<')
        .and_then(|f| f.split_once(" as "))
    {
        Some((ty, _)) if ty.contains("::") => ty,
        Some((_, tr)) => tr,
        None => function,
    };
    let f = f.trim_start_matches(['<', '&']);
    let f = f.strip_prefix("mut ").unwrap_or(f);
    let f = f.strip_prefix("dyn ").unwrap_or(f);
    match f.split_once("::") {
        Some((krate, _)) if !krate.is_empty() => krate.to_owned(),
        _ => "[native: libc, unwinding, unknown]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_collapsed_stacks() -> Result<()> {
        let folded = "\
scopegate;tokio::runtime::park;hyper::proto::h1::parse::h0123456789abcdef 30
scopegate;tokio::runtime::park;scopegate::audit::chain::seal;sha2::compress 50
scopegate;scopegate::audit::chain::seal;scopegate::audit::chain::seal;do_syscall_64_[k] 20
";
        let p = Profile::parse(folded)?;
        assert_eq!(p.total, 100);
        assert_eq!(p.self_samples["hyper::proto::h1::parse"], 30);
        assert_eq!(p.self_samples["sha2::compress"], 50);
        // Recursion counts a function once per stack.
        assert_eq!(p.inclusive["scopegate::audit::chain::seal"], 70);
        assert_eq!(p.inclusive["tokio::runtime::park"], 80);
        assert_eq!(p.crates["[kernel]"], 20);
        assert_eq!(p.crates["sha2"], 50);
        assert_eq!(p.threads["scopegate"], 100);
        let md = p.markdown("t", &Outputs::under(Path::new("/x")));
        assert!(md.contains("| 50.0 | 0.0 | `sha2::compress` |"), "{md}");
        assert!(md.contains("flamegraph.svg"), "{md}");
        Ok(())
    }

    #[test]
    fn refuses_broken_folded_text() {
        assert!(Profile::parse("a;b notanumber\n").is_err());
        assert!(Profile::parse("nocount\n").is_err());
        assert!(Profile::parse("\n\n").is_err());
    }

    #[test]
    fn crates_of_frames() {
        assert_eq!(
            crate_of("<hyper::body::Incoming as http_body::Body>::poll_frame"),
            "hyper"
        );
        assert_eq!(crate_of("&mut tokio::io::poll"), "tokio");
        assert_eq!(crate_of("<&str as http::header::Sealed>::find"), "http");
        assert_eq!(crate_of("<u128 as core::fmt::LowerHex>::fmt"), "core");
        assert_eq!(
            crate_of("__memmove_avx_unaligned_erms"),
            "[native: libc, unwinding, unknown]"
        );
        assert_eq!(crate_of("tcp_sendmsg_[k]"), "[kernel]");
        assert_eq!(
            function("core::ptr::drop::h0123456789abcdef"),
            "core::ptr::drop"
        );
        assert_eq!(function("a::hash"), "a::hash");
    }
}
