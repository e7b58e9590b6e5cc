//! The benchmark's results: medians over repetitions, the Markdown report and the raw JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Kind, Target};

/// One timed run of one target.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What ran.
    pub kind: Kind,
    /// Repetition, from 1.
    pub rep: u32,
    /// Against what.
    pub target: Target,
    /// Completed requests per second.
    pub rps: f64,
    /// Latency percentiles, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Completed requests.
    pub requests: u64,
    /// Responses outside 2xx (wrk: status >= 400).
    pub non2xx: u64,
    /// Socket errors (connect, read, write, timeout).
    pub socket_errors: u64,
    /// Proxy CPU time (utime + stime) per completed request, µs.
    pub cpu_us_per_req: Option<f64>,
    /// Context switches (voluntary and not) of the proxy's threads per completed request.
    pub switches_per_req: Option<f64>,
    /// Audit or access-log lines written per completed request.
    pub log_lines_per_req: Option<f64>,
    /// The load generator's own summary.
    pub raw: Value,
}

/// One connect() micro-benchmark run.
#[derive(Debug, Clone)]
pub struct ConnectSample {
    /// Repetition, from 1.
    pub rep: u32,
    /// Which path (index into [`CONNECT_PATHS`]).
    pub path: usize,
    /// Median ns per connect.
    pub median_ns: f64,
    /// Mean ns per connect.
    pub mean_ns: f64,
    /// 99th percentile ns.
    pub p99_ns: f64,
    /// Timed connects.
    pub count: u64,
    /// Failed connects.
    pub errors: u64,
}

/// The connect() paths measured, in report order.
pub const CONNECT_PATHS: [&str; 3] = [
    "no hooks (cgroup outside the agent's tree) → 127.0.0.3",
    "hooks attached, unmanaged cgroup (fast path) → 127.0.0.3",
    "managed cgroup → origin address, redirected to the proxy",
];

/// The agent's memory with idle connections held through it.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Connections requested.
    pub wanted: u64,
    /// Connections held.
    pub held: u64,
    /// Failed connections or requests.
    pub errors: u64,
    /// Responses outside 2xx while opening them.
    pub non2xx: u64,
    /// VmRSS before, KiB.
    pub before_kib: u64,
    /// VmRSS while held, KiB.
    pub held_kib: u64,
    /// VmRSS after the client closed them, KiB.
    pub after_kib: u64,
    /// Agent file descriptors before.
    pub fds_before: u64,
    /// Agent file descriptors while held.
    pub fds_held: u64,
    /// Agent file descriptors after the client closed them.
    pub fds_after: u64,
}

/// Everything the report shows.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// `(name, value)` lines for the header.
    pub meta: Vec<(String, String)>,
    /// Warnings (fallbacks, skipped checks, ...).
    pub warnings: Vec<String>,
    /// Timed runs.
    pub samples: Vec<Sample>,
    /// connect() runs.
    pub connect: Vec<ConnectSample>,
    /// Idle-connection memory, if measured.
    pub memory: Option<Memory>,
    /// Criterion output lines of the decide bench, if run.
    pub decide: Option<String>,
    /// The TLS scenario's Markdown section, if run.
    pub tls: Option<String>,
    /// How each kind was run (shown under its heading).
    pub kind_notes: Vec<(Kind, String)>,
    /// The `--profile` section (where PROFILE.md and the flame graph are, self time per
    /// crate), if profiled.
    pub profile: Option<String>,
}

/// Median; `None` if empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Medians over the repetitions of one (kind, target).
#[derive(Debug, Clone)]
pub struct Medians {
    /// Requests per second.
    pub rps: f64,
    /// p50 µs.
    pub p50_us: f64,
    /// p99 µs.
    pub p99_us: f64,
    /// p99.9 µs.
    pub p999_us: f64,
    /// Proxy CPU µs per request.
    pub cpu_us_per_req: Option<f64>,
    /// Proxy context switches per request.
    pub switches_per_req: Option<f64>,
    /// Log lines per request.
    pub log_lines_per_req: Option<f64>,
    /// Sum of non-2xx over the repetitions.
    pub non2xx: u64,
    /// Sum of socket errors over the repetitions.
    pub socket_errors: u64,
    /// Repetitions.
    pub reps: usize,
}

impl Results {
    /// The medians of `(kind, target)`, if it ran.
    pub fn medians(&self, kind: Kind, target: Target) -> Option<Medians> {
        let runs: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.kind == kind && s.target == target)
            .collect();
        if runs.is_empty() {
            return None;
        }
        let m = |f: &dyn Fn(&Sample) -> f64| median(runs.iter().map(|s| f(s)));
        let opt = |f: &dyn Fn(&Sample) -> Option<f64>| median(runs.iter().filter_map(|s| f(s)));
        Some(Medians {
            rps: m(&|s| s.rps)?,
            p50_us: m(&|s| s.p50_us)?,
            p99_us: m(&|s| s.p99_us)?,
            p999_us: m(&|s| s.p999_us)?,
            cpu_us_per_req: opt(&|s| s.cpu_us_per_req),
            switches_per_req: opt(&|s| s.switches_per_req),
            log_lines_per_req: opt(&|s| s.log_lines_per_req),
            non2xx: runs.iter().map(|s| s.non2xx).sum(),
            socket_errors: runs.iter().map(|s| s.socket_errors).sum(),
            reps: runs.len(),
        })
    }

    /// Kinds that ran, in report order.
    fn kinds(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| self.samples.iter().any(|s| s.kind == *k))
            .collect()
    }

    /// Targets that ran, in run order.
    fn targets(&self) -> Vec<Target> {
        let mut out: Vec<Target> = Vec::new();
        for s in &self.samples {
            if !out.contains(&s.target) {
                out.push(s.target);
            }
        }
        out
    }

    /// Median of one connect path's metric.
    fn connect_median(&self, path: usize, f: impl Fn(&ConnectSample) -> f64) -> Option<f64> {
        median(self.connect.iter().filter(|c| c.path == path).map(f))
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut md = String::from("# scopegate benchmark\n\n");
        for (name, value) in &self.meta {
            let _ = writeln!(md, "- **{name}**: {value}");
        }
        for w in &self.warnings {
            let _ = writeln!(md, "- **WARNING**: {w}");
        }
        for kind in self.kinds() {
            let note = self
                .kind_notes
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or("", |(_, n)| n.as_str());
            let _ = write!(md, "\n## {}\n\n{note}\n\n", kind.title());
            if kind.paced() {
                self.paced_table(&mut md, kind);
            } else {
                self.saturated_table(&mut md, kind);
            }
        }
        self.micro_section(&mut md);
        self.targets_section(&mut md);
        if let Some(profile) = &self.profile {
            md.push_str(profile);
        }
        md.push_str(NOTES);
        md
    }

    /// Table of a saturated kind.
    fn saturated_table(&self, md: &mut String, kind: Kind) {
        md.push_str(
            "| target | req/s | × direct | p50 µs | p99 µs | p99.9 µs | proxy CPU µs/req | proxy context switches/req | non-2xx | socket errors | log lines/req |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let direct = self.medians(kind, Target::Direct);
        for target in self.targets() {
            let Some(m) = self.medians(kind, target) else {
                continue;
            };
            let ratio = direct
                .as_ref()
                .filter(|d| d.rps > 0.0)
                .map_or_else(dash, |d| format!("{:.2}", m.rps / d.rps));
            let _ = writeln!(
                md,
                "| {} | {:.0} | {ratio} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
                target.name(),
                m.rps,
                m.p50_us,
                m.p99_us,
                m.p999_us,
                opt1(m.cpu_us_per_req),
                opt2(m.switches_per_req),
                m.non2xx,
                m.socket_errors,
                opt2(m.log_lines_per_req),
            );
        }
    }

    /// Table of a paced kind.
    fn paced_table(&self, md: &mut String, kind: Kind) {
        md.push_str(
            "| target | req/s | p50 µs | p99 µs | p99.9 µs | +p50 µs vs direct | +p99 µs vs direct | proxy CPU µs/req | non-2xx | errors | log lines/req |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let direct = self.medians(kind, Target::Direct);
        for target in self.targets() {
            let Some(m) = self.medians(kind, target) else {
                continue;
            };
            let (add50, add99) = match (&direct, target) {
                (Some(d), t) if t != Target::Direct => (
                    format!("{:+.0}", m.p50_us - d.p50_us),
                    format!("{:+.0}", m.p99_us - d.p99_us),
                ),
                _ => (dash(), dash()),
            };
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {add50} | {add99} | {} | {} | {} | {} |",
                target.name(),
                m.rps,
                m.p50_us,
                m.p99_us,
                m.p999_us,
                opt1(m.cpu_us_per_req),
                m.non2xx,
                m.socket_errors,
                opt2(m.log_lines_per_req),
            );
        }
    }

    /// connect() and memory.
    fn micro_section(&self, md: &mut String) {
        if self.connect.is_empty()
            && self.memory.is_none()
            && self.decide.is_none()
            && self.tls.is_none()
        {
            return;
        }
        md.push_str("\n## Micro-benchmarks\n");
        if !self.connect.is_empty() {
            let reps = self.connect.iter().map(|c| c.rep).max().unwrap_or(0);
            let count = self.connect.first().map_or(0, |c| c.count);
            let batch = super::client::CONNECT_BATCH;
            let _ = write!(
                md,
                "\n### connect() through the hooks ({count} timed connects per run, batches of {batch} queued then accepted; median of {reps} run(s); loop pinned to CPU 0)\n\n\
                 | path | median ns | mean ns | p99 ns | added vs no hooks (median) | failed |\n\
                 |---|---:|---:|---:|---:|---:|\n"
            );
            let base = self.connect_median(0, |c| c.median_ns);
            for (i, name) in CONNECT_PATHS.iter().enumerate() {
                let Some(med) = self.connect_median(i, |c| c.median_ns) else {
                    continue;
                };
                let added = match (i, base) {
                    (0, _) | (_, None) => dash(),
                    (_, Some(b)) => format!("{:+.0}", med - b),
                };
                let errors: u64 = self
                    .connect
                    .iter()
                    .filter(|c| c.path == i)
                    .map(|c| c.errors)
                    .sum();
                let _ = writeln!(
                    md,
                    "| {name} | {med:.0} | {:.0} | {:.0} | {added} | {errors} |",
                    self.connect_median(i, |c| c.mean_ns).unwrap_or(0.0),
                    self.connect_median(i, |c| c.p99_ns).unwrap_or(0.0),
                );
            }
        }
        if let Some(m) = &self.memory {
            let mib = |kib: u64| kib as f64 / 1024.0;
            let delta = m.held_kib.saturating_sub(m.before_kib);
            let per_conn = if m.held > 0 {
                format!("{:.1}", delta as f64 / m.held as f64)
            } else {
                dash()
            };
            let _ = write!(
                md,
                "\n### Agent memory with idle connections (client in the managed cgroup, one GET each, then idle)\n\n\
                 | connections held | agent fds before → held → after | VmRSS before | VmRSS held | delta | KiB per connection | VmRSS after close | failed / non-2xx |\n\
                 |---:|---:|---:|---:|---:|---:|---:|---:|\n\
                 | {} of {} | {} → {} → {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {per_conn} | {:.1} MiB | {} / {} |\n",
                m.held,
                m.wanted,
                m.fds_before,
                m.fds_held,
                m.fds_after,
                mib(m.before_kib),
                mib(m.held_kib),
                mib(delta),
                mib(m.after_kib),
                m.errors,
                m.non2xx,
            );
        }
        if let Some(tls) = &self.tls {
            md.push_str(tls);
        }
        if let Some(decide) = &self.decide {
            let _ = write!(
                md,
                "\n### Policy decision (criterion, `cargo bench -p scopegate --bench decide`)\n\n```text\n{}\n```\n",
                decide.trim_end()
            );
        }
    }

    /// The figures DESIGN.md sets targets for, side by side (reported, not asserted).
    fn targets_section(&self, md: &mut String) {
        let mut lines = Vec::new();
        let cpu = |kind, target| {
            self.medians(kind, target)
                .and_then(|m| m.cpu_us_per_req)
                .filter(|v| *v > 0.0)
        };
        for kind in [Kind::Keepalive, Kind::Close] {
            let Some(sg) = cpu(kind, Target::Scopegate) else {
                continue;
            };
            for peer in [Target::Nginx, Target::Haproxy] {
                if let Some(p) = cpu(kind, peer) {
                    lines.push(format!(
                        "{}: scopegate proxy CPU per request = {:.2}× {}'s ({sg:.1} vs {p:.1} µs)",
                        kind.short(),
                        sg / p,
                        peer.name()
                    ));
                }
            }
        }
        for kind in [Kind::PacedKeepalive, Kind::PacedClose] {
            let (Some(d), Some(sg)) = (
                self.medians(kind, Target::Direct),
                self.medians(kind, Target::Scopegate),
            ) else {
                continue;
            };
            let mut line = format!(
                "{}: scopegate adds {:+.0} µs p50, {:+.0} µs p99 over direct",
                kind.short(),
                sg.p50_us - d.p50_us,
                sg.p99_us - d.p99_us
            );
            if let Some(n) = self.medians(kind, Target::Nginx) {
                let _ = write!(
                    line,
                    "; nginx adds {:+.0} µs p50, {:+.0} µs p99",
                    n.p50_us - d.p50_us,
                    n.p99_us - d.p99_us
                );
            }
            lines.push(line);
        }
        if let (Some(base), Some(hooks)) = (
            self.connect_median(0, |c| c.median_ns),
            self.connect_median(1, |c| c.median_ns),
        ) {
            lines.push(format!(
                "connect() through the hooks (unmanaged fast path): {:+.0} ns median over no hooks (target: at most 1 µs)",
                hooks - base
            ));
        }
        if let Some(m) = &self.memory
            && m.held > 0
        {
            let delta = m.held_kib.saturating_sub(m.before_kib) as f64 / 1024.0;
            let scaled = delta * 10_000.0 / m.held as f64;
            lines.push(format!(
                "memory: {scaled:.1} MiB of agent RSS per 10,000 idle connections (target: at most 100 MiB)"
            ));
        }
        if lines.is_empty() {
            return;
        }
        md.push_str("\n## Against the DESIGN.md performance targets (reported, not asserted)\n\n");
        for line in lines {
            let _ = writeln!(md, "- {line}");
        }
    }

    /// The raw results.
    pub fn json(&self) -> Value {
        let samples: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                json!({
                    "scenario": s.kind.key(),
                    "rep": s.rep,
                    "target": s.target.name(),
                    "rps": s.rps,
                    "p50_us": s.p50_us,
                    "p99_us": s.p99_us,
                    "p999_us": s.p999_us,
                    "requests": s.requests,
                    "non2xx": s.non2xx,
                    "socket_errors": s.socket_errors,
                    "proxy_cpu_us_per_req": s.cpu_us_per_req,
                    "proxy_context_switches_per_req": s.switches_per_req,
                    "log_lines_per_req": s.log_lines_per_req,
                    "raw": s.raw,
                })
            })
            .collect();
        let mut medians = Vec::new();
        for kind in self.kinds() {
            for target in self.targets() {
                if let Some(m) = self.medians(kind, target) {
                    medians.push(json!({
                        "scenario": kind.key(),
                        "target": target.name(),
                        "reps": m.reps,
                        "rps": m.rps,
                        "p50_us": m.p50_us,
                        "p99_us": m.p99_us,
                        "p999_us": m.p999_us,
                        "proxy_cpu_us_per_req": m.cpu_us_per_req,
                        "proxy_context_switches_per_req": m.switches_per_req,
                        "log_lines_per_req": m.log_lines_per_req,
                        "non2xx_total": m.non2xx,
                        "socket_errors_total": m.socket_errors,
                    }));
                }
            }
        }
        let connect: Vec<Value> = self
            .connect
            .iter()
            .map(|c| {
                json!({
                    "rep": c.rep,
                    "path": CONNECT_PATHS.get(c.path),
                    "median_ns": c.median_ns,
                    "mean_ns": c.mean_ns,
                    "p99_ns": c.p99_ns,
                    "count": c.count,
                    "errors": c.errors,
                })
            })
            .collect();
        let memory = self.memory.as_ref().map(|m| {
            json!({
                "wanted": m.wanted,
                "held": m.held,
                "errors": m.errors,
                "non2xx": m.non2xx,
                "rss_before_kib": m.before_kib,
                "rss_held_kib": m.held_kib,
                "rss_after_close_kib": m.after_kib,
                "fds_before": m.fds_before,
                "fds_held": m.fds_held,
                "fds_after_close": m.fds_after,
            })
        });
        let meta: serde_json::Map<String, Value> = self
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({
            "meta": meta,
            "warnings": self.warnings,
            "runs": samples,
            "medians": medians,
            "connect": connect,
            "memory": memory,
            "decide": self.decide,
            "profile": self.profile,
        })
    }
}

/// An en dash for "not applicable".
fn dash() -> String {
    "–".to_owned()
}

/// One decimal, or a dash.
fn opt1(v: Option<f64>) -> String {
    v.map_or_else(dash, |v| format!("{v:.1}"))
}

/// Two decimals, or a dash.
fn opt2(v: Option<f64>) -> String {
    v.map_or_else(dash, |v| format!("{v:.2}"))
}

/// How the figures are obtained.
const NOTES: &str = "
## How the figures are obtained

- Every cell is the median over the repetitions (error counts are summed). Runs are
  interleaved per repetition: rep 1 runs every target, then rep 2, and so on.
- The load generator (wrk `-t1`, or the paced client) and the nginx origin are pinned to
  CPU 0; each proxy to CPU 1 with one worker/thread (nginx `worker_processes 1`, HAProxy
  `nbthread 1`, scopegate `TOKIO_WORKER_THREADS=1`, its other threads on the same CPU).
- **Proxy CPU µs/req**: utime + stime from `/proc/<pid>/stat` (all threads, live and
  exited) of the proxy process and its live descendants (nginx master + worker), sampled
  right before and right after each run, converted with `getconf CLK_TCK`, divided by the
  requests the load generator completed. Clock-tick resolution is 1/CLK_TCK s per
  process, so short runs (`--quick`) carry a few % of quantisation error. Idle work the
  proxy does during the run (the agent's cgroup rescan every 1 s) is included.
- **Log lines/req**: lines appended to the scopegate audit file / nginx JSON access log /
  HAProxy log (stdout, `format raw`) during the run, counted after the file stopped
  growing, divided by completed requests (requests cut off when wrk stops can add a
  line).
- **scopegate** clients run inside the managed cgroup (`scopegate exec`) and connect to
  the origin's own address; the eBPF connect hook redirects them to the agent's proxy.
  nginx and HAProxy are addressed directly. **direct** is the client against the origin.
- **Paced**: an open-loop client in xtask (8 connections, slots dealt round-robin);
  latency is measured from each request's scheduled send time, so queueing behind a slow
  response counts (no coordinated omission). wrk2 is not packaged by Debian.
- wrk's p99.9 comes from `latency:percentile(99.9)` in the generated Lua `done()`;
  wrk counts non-2xx as responses with status > 399.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(target: Target, rep: u32, rps: f64, cpu: Option<f64>) -> Sample {
        Sample {
            kind: Kind::Keepalive,
            rep,
            target,
            rps,
            p50_us: 100.0,
            p99_us: 200.0,
            p999_us: 300.0,
            requests: 1000,
            non2xx: 1,
            socket_errors: 0,
            cpu_us_per_req: cpu,
            switches_per_req: cpu.map(|_| 0.5),
            log_lines_per_req: cpu.map(|_| 1.0),
            raw: Value::Null,
        }
    }

    #[test]
    fn medians_and_tables() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0]), Some(2.5));
        assert_eq!(median([]), None);
        let results = Results {
            samples: vec![
                sample(Target::Direct, 1, 1000.0, None),
                sample(Target::Scopegate, 1, 500.0, Some(10.0)),
                sample(Target::Direct, 2, 3000.0, None),
                sample(Target::Scopegate, 2, 700.0, Some(14.0)),
                sample(Target::Nginx, 1, 600.0, Some(12.0)),
            ],
            ..Results::default()
        };
        let m = results.medians(Kind::Keepalive, Target::Scopegate);
        assert_eq!(m.as_ref().map(|m| m.rps), Some(600.0));
        assert_eq!(m.as_ref().map(|m| m.non2xx), Some(2));
        let md = results.markdown();
        assert!(md.contains("| scopegate | 600 | 0.30 |"), "{md}");
        assert!(md.contains("| direct | 2000 | 1.00 |"), "{md}");
        assert!(md.contains("= 1.00× nginx's"), "{md}");
        let json = results.json();
        assert_eq!(json["runs"].as_array().map(Vec::len), Some(5));
    }
}
