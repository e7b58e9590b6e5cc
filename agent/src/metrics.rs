//! Prometheus metrics: one registry, built once, with typed families (prometheus-client).
//!
//! [`global`] is the agent's registry. Its families are fed from three places:
//! - the audit layer, for every record it is handed ([`Metrics::observe`]): decisions
//!   (`scopegate_requests_total`), upstream errors of outcome records, and the policy
//!   lifecycle records (`agent_started`, `policy_reloaded`, `policy_rejected`), so the
//!   counters say exactly what the audit stream says;
//! - the proxy, for the agent's own overhead per request ([`Metrics::overhead`]) and the
//!   kernel deny events it records ([`Metrics::kernel_deny`]);
//! - at scrape time, a [`LiveSource`] (kernel counters, audit writer state, snapshot
//!   sizes; see `admin`) and the process itself (`/proc/self`).
//!
//! Label cardinality is bounded by construction:
//! - `workload` is a name of the current policy, or `""` (caller not identified, or a
//!   workload that is no longer in the policy). [`Metrics::set_workloads`] is called on
//!   every publish and drops the series of workloads the policy no longer has;
//! - `decision` is one of `allow`, `deny`, `would_deny`, `error`;
//! - `reason` is a stable reason code (`[a-z][a-z0-9_]*`, at most 64 bytes); at most
//!   [`MAX_REASONS`] distinct codes get their own label value, anything else is `other`;
//! - no label carries a path, a host or an address.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, LazyLock, Mutex, OnceLock, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Distinct reason codes that get their own `reason` label value; further ones are `other`.
pub const MAX_REASONS: usize = 128;

/// Content type of [`Metrics::encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Labels of `scopegate_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RequestLabels {
    /// Workload name from the policy, or empty.
    pub workload: String,
    /// `allow`, `deny`, `would_deny` or `error`.
    pub decision: String,
    /// Stable reason code, empty for a plain allow.
    pub reason: String,
}

/// A `workload` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabel {
    /// Workload name from the policy, or empty.
    pub workload: String,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Stable reason code.
    pub reason: String,
}

/// A `result` label (`success` or `failure`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failure`.
    pub result: String,
}

/// The `path` label of the overhead histogram: `forwarded` or `refused`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// `forwarded` or `refused`.
    pub path: String,
}

/// A `version` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// A `hash` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HashLabel {
    hash: String,
}

/// How a request left the agent, for [`Metrics::overhead`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestPath {
    /// Sent upstream; the overhead excludes the time the upstream took.
    Forwarded,
    /// Answered by the agent (refusal, 503, framing error).
    Refused,
}

/// One audit record, as far as the metrics care (see [`Metrics::observe`]).
#[derive(Clone, Copy, Debug)]
pub enum Observed<'a> {
    /// A decision of the proxy (HTTP request, TLS or TCP connection, DNS query).
    Decision {
        /// Workload name, if the caller was identified.
        workload: Option<&'a str>,
        /// `allow`, `deny`, `would_deny` or `error`.
        decision: &'static str,
        /// Reason code.
        reason: Option<&'a str>,
    },
    /// An outcome record whose upstream failed.
    UpstreamError {
        /// Workload name, if known.
        workload: Option<&'a str>,
    },
    /// A policy became the running one (`agent_started`, `policy_reloaded`).
    PolicyLoaded {
        /// SHA-256 of the policy directory, if it could be computed.
        hash: Option<&'a str>,
        /// Whether this was a reload (not the start).
        reload: bool,
    },
    /// A policy was rejected (`policy_rejected`).
    PolicyRejected {
        /// Whether this was at start (the agent then runs deny-all).
        at_start: bool,
    },
}

/// Values read at scrape time from the running agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// Kernel counter: connects redirected to the proxy.
    pub kernel_redirected: u64,
    /// Kernel counter: connects, sends and sockets denied.
    pub kernel_denied: u64,
    /// Kernel counter: deny events lost (ring buffer full).
    pub kernel_events_lost: u64,
    /// Kernel counter: redirects whose origin could not be stored.
    pub kernel_origin_store_failed: u64,
    /// Kernel counter: UDP DNS redirected to the DNS proxy.
    pub kernel_dns_redirected: u64,
    /// Kernel counter: connects and sends of audit-mode workloads that enforce mode would
    /// deny, let through.
    pub kernel_audit_passed: u64,
    /// Parts of the cgroup tree scans could not read.
    pub cgroup_scan_errors: u64,
    /// Managed cgroups kept although a scan did not see them.
    pub cgroup_scan_kept: u64,
    /// Audit records written.
    pub audit_records_written: u64,
    /// Failed audit writes.
    pub audit_write_errors: u64,
    /// Signed checkpoints written.
    pub audit_checkpoints: u64,
    /// Audit-outage refusals recorded in summary records.
    pub audit_unavailable_summarised: u64,
    /// Audit records accepted but not yet written.
    pub audit_queue_depth: u64,
    /// Whether the audit log cannot be written.
    pub audit_unavailable: bool,
    /// Workloads in the current snapshot.
    pub workloads: u64,
    /// Managed cgroups known to the agent.
    pub managed_cgroups: u64,
}

/// Where the scrape-time values come from (the admin endpoint's sources).
pub trait LiveSource: std::fmt::Debug + Send + Sync + 'static {
    /// The current values.
    fn live(&self) -> Live;
}

/// The agent's metrics registry and its families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    overhead: Family<PathLabel, Histogram, fn() -> Histogram>,
    upstream_errors: Family<WorkloadLabel, Counter>,
    rate_limited: Family<WorkloadLabel, Counter>,
    kernel_denies: Family<ReasonLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    last_reload_successful: Gauge,
    last_reload_timestamp: Gauge<f64, AtomicU64>,
    last_reload_success_timestamp: Gauge<f64, AtomicU64>,
    policy_info: Family<HashLabel, Gauge>,
    live: Arc<LiveCollector>,
    labels: Mutex<LabelBounds>,
}

/// What bounds the label values, and which series exist per workload (to drop them).
#[derive(Debug, Default)]
struct LabelBounds {
    workloads: BTreeSet<String>,
    reasons: BTreeSet<String>,
    series: BTreeMap<String, BTreeSet<RequestLabels>>,
}

fn overhead_histogram() -> Histogram {
    // 25 µs … ~0.8 s.
    Histogram::new(exponential_buckets(0.000_025, 2.0, 16))
}

/// The agent's registry, built on first use.
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family registered (the families start empty).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "scopegate_requests",
            "Decisions of the proxy (HTTP requests, TLS and TCP connections, DNS queries), one per audit decision record",
            requests.clone(),
        );
        let overhead: Family<PathLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(overhead_histogram);
        registry.register(
            "scopegate_request_overhead_seconds",
            "Time an HTTP request spent in the agent, excluding the upstream: from the parsed request head to the handover to the upstream client (or the refusal written), plus from the upstream response head to the response handed back",
            overhead.clone(),
        );
        let upstream_errors = Family::<WorkloadLabel, Counter>::default();
        registry.register(
            "scopegate_upstream_errors",
            "Forwarded requests and connections whose upstream failed (unreachable, reset, timeout, TLS)",
            upstream_errors.clone(),
        );
        let rate_limited = Family::<WorkloadLabel, Counter>::default();
        registry.register(
            "scopegate_rate_limited",
            "Requests refused (or would-denied in audit mode) by a rate limit",
            rate_limited.clone(),
        );
        let kernel_denies = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "scopegate_kernel_denies",
            "Kernel deny events recorded by the agent, by reason (events lost in the ring buffer are in scopegate_kernel_events_lost_total)",
            kernel_denies.clone(),
        );
        let reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "scopegate_policy_reload",
            "Policy reload attempts (SIGHUP or a change of the policy directory), by result",
            reloads.clone(),
        );
        let last_reload_successful = Gauge::default();
        registry.register(
            "scopegate_policy_last_reload_successful",
            "1 if the last policy load (start or reload) succeeded, 0 if it was rejected",
            last_reload_successful.clone(),
        );
        let last_reload_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "scopegate_policy_last_reload_timestamp_seconds",
            "Unix time of the last policy load attempt (start or reload)",
            last_reload_timestamp.clone(),
        );
        let last_reload_success_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "scopegate_policy_last_reload_success_timestamp_seconds",
            "Unix time of the last successful policy load (start or reload)",
            last_reload_success_timestamp.clone(),
        );
        let policy_info = Family::<HashLabel, Gauge>::default();
        registry.register(
            "scopegate_policy_info",
            "The running policy: hash is the SHA-256 of the policy directory's files (as in the audit records); empty when it could not be computed, deny-all when the agent started deny-all",
            policy_info.clone(),
        );
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "scopegate_build_info",
            "The agent's build: version",
            build_info,
        );
        let live = Arc::new(LiveCollector::default());
        registry.register_collector(Box::new(live.clone()));
        registry.register_collector(Box::new(ProcessCollector));
        Self {
            registry,
            requests,
            overhead,
            upstream_errors,
            rate_limited,
            kernel_denies,
            reloads,
            last_reload_successful,
            last_reload_timestamp,
            last_reload_success_timestamp,
            policy_info,
            live,
            labels: Mutex::new(LabelBounds::default()),
        }
    }

    /// Sets where the scrape-time values come from (the first call wins).
    pub fn attach(&self, source: Arc<dyn LiveSource>) {
        let _ = self.live.source.set(source);
    }

    /// The text exposition (Prometheus text format 0.0.4, [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a collector's fmt error would only cut the
        // output short.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        out
    }

    /// Sets the workload names of the current policy: only these are `workload` label
    /// values; the series of names no longer in the policy are dropped.
    pub fn set_workloads<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let names: BTreeSet<String> = names.into_iter().map(str::to_owned).collect();
        let mut bounds = self.bounds();
        let gone: Vec<String> = bounds
            .workloads
            .iter()
            .filter(|w| !names.contains(*w))
            .cloned()
            .collect();
        for workload in gone {
            for labels in bounds.series.remove(&workload).unwrap_or_default() {
                self.requests.remove(&labels);
            }
            let label = WorkloadLabel { workload };
            self.upstream_errors.remove(&label);
            self.rate_limited.remove(&label);
        }
        bounds.workloads = names;
    }

    /// Counts one audit record (called by the audit layer for every record it is handed).
    pub fn observe(&self, observed: Observed<'_>) {
        match observed {
            Observed::Decision {
                workload,
                decision,
                reason,
            } => {
                let mut bounds = self.bounds();
                let workload = bounds.workload(workload);
                let reason = bounds.reason(reason);
                if reason == "rate_limited" {
                    self.rate_limited
                        .get_or_create(&WorkloadLabel {
                            workload: workload.clone(),
                        })
                        .inc();
                }
                let labels = RequestLabels {
                    workload,
                    decision: decision.to_owned(),
                    reason,
                };
                if !labels.workload.is_empty() {
                    bounds
                        .series
                        .entry(labels.workload.clone())
                        .or_default()
                        .insert(labels.clone());
                }
                self.requests.get_or_create(&labels).inc();
            }
            Observed::UpstreamError { workload } => {
                let workload = self.bounds().workload(workload);
                self.upstream_errors
                    .get_or_create(&WorkloadLabel { workload })
                    .inc();
            }
            Observed::PolicyLoaded { hash, reload } => {
                let now = unix_now();
                if reload {
                    self.reload_result("success");
                }
                self.last_reload_successful.set(1);
                self.last_reload_timestamp.set(now);
                self.last_reload_success_timestamp.set(now);
                self.policy_info.clear();
                self.policy_info
                    .get_or_create(&HashLabel {
                        hash: hash.unwrap_or_default().to_owned(),
                    })
                    .set(1);
            }
            Observed::PolicyRejected { at_start } => {
                self.last_reload_successful.set(0);
                self.last_reload_timestamp.set(unix_now());
                if at_start {
                    // The agent runs deny-all (`--allow-empty`); the last good policy is none.
                    self.policy_info.clear();
                    self.policy_info
                        .get_or_create(&HashLabel {
                            hash: "deny-all".to_owned(),
                        })
                        .set(1);
                } else {
                    self.reload_result("failure");
                }
            }
        }
    }

    /// Counts one kernel deny event the agent recorded, by its reason code.
    pub fn kernel_deny(&self, reason: &str) {
        let reason = self.bounds().reason(Some(reason));
        self.kernel_denies
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Observes the agent's own time for one HTTP request.
    pub fn overhead(&self, path: RequestPath, spent: Duration) {
        let path = match path {
            RequestPath::Forwarded => "forwarded",
            RequestPath::Refused => "refused",
        };
        self.overhead
            .get_or_create(&PathLabel {
                path: path.to_owned(),
            })
            .observe(spent.as_secs_f64());
    }

    fn reload_result(&self, result: &str) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    fn bounds(&self) -> std::sync::MutexGuard<'_, LabelBounds> {
        self.labels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LabelBounds {
    fn workload(&self, name: Option<&str>) -> String {
        match name {
            Some(name) if self.workloads.contains(name) => name.to_owned(),
            _ => String::new(),
        }
    }

    fn reason(&mut self, reason: Option<&str>) -> String {
        let Some(reason) = reason else {
            return String::new();
        };
        if !is_reason_code(reason) {
            return "other".to_owned();
        }
        if self.reasons.contains(reason) {
            return reason.to_owned();
        }
        if self.reasons.len() >= MAX_REASONS {
            return "other".to_owned();
        }
        self.reasons.insert(reason.to_owned());
        reason.to_owned()
    }
}

/// A stable reason code: `[a-z][a-z0-9_]*`, at most 64 bytes.
pub fn is_reason_code(s: &str) -> bool {
    let mut bytes = s.bytes();
    s.len() <= 64
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Encodes one constant metric.
fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// The scrape-time values of the running agent (names kept from the hand-written
/// exposition of earlier versions).
#[derive(Debug, Default)]
struct LiveCollector {
    source: OnceLock<Arc<dyn LiveSource>>,
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.source.get() else {
            return Ok(());
        };
        let live = source.live();
        let counters: [(&str, &str, u64); 12] = [
            (
                "scopegate_kernel_redirected",
                "Managed TCP connects redirected to the proxy.",
                live.kernel_redirected,
            ),
            (
                "scopegate_kernel_denied",
                "Managed connects, sends and sockets denied in the kernel (all reasons, including events lost).",
                live.kernel_denied,
            ),
            (
                "scopegate_kernel_events_lost",
                "Kernel deny events not delivered because the ring buffer was full.",
                live.kernel_events_lost,
            ),
            (
                "scopegate_kernel_origin_store_failed",
                "Redirects whose origin could not be stored (denied).",
                live.kernel_origin_store_failed,
            ),
            (
                "scopegate_kernel_dns_redirected",
                "UDP DNS connects and sends redirected to the DNS proxy.",
                live.kernel_dns_redirected,
            ),
            (
                "scopegate_kernel_audit_passed",
                "Connects and sends of audit-mode workloads that enforce mode would deny, let through (each recorded would_deny).",
                live.kernel_audit_passed,
            ),
            (
                "scopegate_cgroup_scan_errors",
                "Parts of the cgroup tree a scan could not read (their managed cgroups were kept).",
                live.cgroup_scan_errors,
            ),
            (
                "scopegate_cgroup_scan_kept",
                "Managed cgroups kept although a scan did not see them.",
                live.cgroup_scan_kept,
            ),
            (
                "scopegate_audit_records_written",
                "Audit records written to every sink.",
                live.audit_records_written,
            ),
            (
                "scopegate_audit_write_errors",
                "Failed attempts to write, fsync or rotate the audit log.",
                live.audit_write_errors,
            ),
            (
                "scopegate_audit_checkpoints",
                "Signed checkpoints written.",
                live.audit_checkpoints,
            ),
            (
                "scopegate_audit_unavailable_summarised",
                "Refusals during an audit outage recorded in summary records.",
                live.audit_unavailable_summarised,
            ),
        ];
        for (name, help, value) in counters {
            encode_one(&mut encoder, name, help, &ConstCounter::new(value))?;
        }
        let gauges: [(&str, &str, u64); 4] = [
            (
                "scopegate_audit_queue_depth",
                "Audit records accepted but not yet written.",
                live.audit_queue_depth,
            ),
            (
                "scopegate_audit_unavailable",
                "1 while the audit log cannot be written (requests get 503).",
                u64::from(live.audit_unavailable),
            ),
            (
                "scopegate_workloads",
                "Workloads in the current policy snapshot.",
                live.workloads,
            ),
            (
                "scopegate_managed_cgroups",
                "Managed cgroups known to the agent.",
                live.managed_cgroups,
            ),
        ];
        for (name, help, value) in gauges {
            encode_one(&mut encoder, name, help, &ConstGauge::new(value))?;
        }
        Ok(())
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at scrape time.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let process = Process::read();
        if let Some(cpu) = process.cpu_seconds {
            encode_one(
                &mut encoder,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                &ConstCounter::new(cpu),
            )?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                process.resident_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (soft limit).",
                process.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                encode_one(&mut encoder, name, help, &ConstGauge::new(value))?;
            }
        }
        if let Some(start) = process.start_time_seconds {
            encode_one(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                &ConstGauge::new(start),
            )?;
        }
        Ok(())
    }
}

/// What `/proc` says about this process; a value that cannot be read is left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Process {
    /// utime + stime, seconds.
    pub cpu_seconds: Option<f64>,
    /// VmRSS, bytes.
    pub resident_bytes: Option<u64>,
    /// Entries of /proc/self/fd.
    pub open_fds: Option<u64>,
    /// The soft "Max open files" limit.
    pub max_fds: Option<u64>,
    /// Unix time the process started.
    pub start_time_seconds: Option<f64>,
}

impl Process {
    /// Reads `/proc/self/{stat,status,fd,limits}` and `/proc/stat`.
    pub fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .map(|t| t as f64);
        let stat = read("/proc/self/stat").and_then(|s| parse_stat(&s));
        let btime = read("/proc/stat").and_then(|s| parse_btime(&s));
        Self {
            cpu_seconds: stat.zip(ticks).map(|(s, t)| (s.utime + s.stime) as f64 / t),
            resident_bytes: read("/proc/self/status").and_then(|s| parse_vm_rss(&s)),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: read("/proc/self/limits").and_then(|s| parse_max_open_files(&s)),
            start_time_seconds: stat
                .zip(ticks)
                .zip(btime)
                .map(|((s, t), b)| b as f64 + s.starttime as f64 / t),
        }
    }
}

/// The fields of `/proc/PID/stat` the process metrics use, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Field 14.
    pub utime: u64,
    /// Field 15.
    pub stime: u64,
    /// Field 22: ticks after boot.
    pub starttime: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) may hold spaces and parentheses,
/// so the fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // rest starts at field 3 (state).
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
    })
}

/// The `btime` line of `/proc/stat`: boot time, unix seconds.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// `VmRSS:  1234 kB` of `/proc/PID/status`, in bytes.
pub fn parse_vm_rss(text: &str) -> Option<u64> {
    let value = text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib = value
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    kib.checked_mul(1024)
}

/// The soft limit of the `Max open files` line of `/proc/PID/limits` (None if unlimited).
pub fn parse_max_open_files(text: &str) -> Option<u64> {
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    rest.split_ascii_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision<'a>(w: Option<&'a str>, d: &'static str, r: Option<&'a str>) -> Observed<'a> {
        Observed::Decision {
            workload: w,
            decision: d,
            reason: r,
        }
    }

    /// The sample lines of `name` (without HELP/TYPE).
    fn samples(text: &str, name: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn decisions_are_counted_by_workload_decision_and_reason() {
        let m = Metrics::new();
        m.set_workloads(["billing", "crm"]);
        m.observe(decision(Some("billing"), "allow", None));
        m.observe(decision(Some("billing"), "allow", None));
        m.observe(decision(Some("billing"), "deny", Some("no_rule_matched")));
        m.observe(decision(Some("crm"), "deny", Some("rate_limited")));
        m.observe(decision(None, "deny", Some("unknown_connection")));
        let text = m.encode();
        let got = samples(&text, "scopegate_requests_total");
        for want in [
            r#"scopegate_requests_total{workload="billing",decision="allow",reason=""} 2"#,
            r#"scopegate_requests_total{workload="billing",decision="deny",reason="no_rule_matched"} 1"#,
            r#"scopegate_requests_total{workload="crm",decision="deny",reason="rate_limited"} 1"#,
            r#"scopegate_requests_total{workload="",decision="deny",reason="unknown_connection"} 1"#,
        ] {
            assert!(got.iter().any(|l| l == want), "{want} not in {got:#?}");
        }
        assert_eq!(got.len(), 4, "{got:#?}");
        assert_eq!(
            samples(&text, "scopegate_rate_limited_total"),
            [r#"scopegate_rate_limited_total{workload="crm"} 1"#]
        );
    }

    #[test]
    fn workloads_outside_the_policy_get_no_label_and_removed_ones_are_dropped() {
        let m = Metrics::new();
        m.set_workloads(["billing", "crm"]);
        m.observe(decision(Some("intruder"), "deny", Some("x")));
        m.observe(decision(Some("crm"), "allow", None));
        m.observe(decision(Some("crm"), "deny", Some("rate_limited")));
        m.observe(Observed::UpstreamError {
            workload: Some("crm"),
        });
        m.observe(decision(Some("billing"), "allow", None));
        let text = m.encode();
        assert!(!text.contains("intruder"), "{text}");
        assert!(
            text.contains(r#"scopegate_requests_total{workload="",decision="deny",reason="x"} 1"#),
            "{text}"
        );
        m.set_workloads(["billing"]);
        let text = m.encode();
        assert!(!text.contains(r#"workload="crm""#), "{text}");
        assert!(
            text.contains(
                r#"scopegate_requests_total{workload="billing",decision="allow",reason=""} 1"#
            ),
            "{text}"
        );
        // A late record of the removed workload counts without its name.
        m.observe(decision(Some("crm"), "allow", None));
        assert!(!m.encode().contains(r#"workload="crm""#));
    }

    #[test]
    fn reasons_are_codes_and_capped() {
        let m = Metrics::new();
        m.set_workloads(["w"]);
        for hostile in [
            "/v1/charges?id=1",
            "Api.Example.Com",
            "",
            "a\"b",
            "x\n# TYPE evil counter",
            &"a".repeat(65),
            "ümlaut",
            "9lives",
        ] {
            m.observe(decision(Some("w"), "deny", Some(hostile)));
        }
        let text = m.encode();
        assert!(
            text.contains(
                r#"scopegate_requests_total{workload="w",decision="deny",reason="other"} 8"#
            ),
            "{text}"
        );
        assert!(!text.contains("evil"), "{text}");
        for i in 0..(MAX_REASONS + 10) {
            m.kernel_deny(&format!("reason_{i}"));
        }
        let text = m.encode();
        let kernel = samples(&text, "scopegate_kernel_denies_total");
        // The codes seen first (including "other" for the hostile ones above) take the
        // slots; the rest is "other".
        assert!(kernel.len() <= MAX_REASONS + 1, "{}", kernel.len());
        assert!(
            kernel
                .iter()
                .any(|l| l.starts_with(r#"scopegate_kernel_denies_total{reason="other"} "#)),
            "{kernel:#?}"
        );
        assert!(is_reason_code("rate_limited"));
        assert!(is_reason_code("a1_b2"));
        assert!(!is_reason_code("_x"));
        assert!(!is_reason_code("Rate"));
    }

    #[test]
    fn reloads_policy_info_and_build_info() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(
            text.contains(&format!(
                r#"scopegate_build_info{{version="{}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        m.observe(Observed::PolicyLoaded {
            hash: Some("aa11"),
            reload: false,
        });
        m.observe(Observed::PolicyRejected { at_start: false });
        m.observe(Observed::PolicyLoaded {
            hash: Some("bb22"),
            reload: true,
        });
        m.observe(Observed::PolicyRejected { at_start: false });
        let text = m.encode();
        assert!(
            text.contains(r#"scopegate_policy_reload_total{result="failure"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"scopegate_policy_reload_total{result="success"} 1"#),
            "{text}"
        );
        assert_eq!(
            samples(&text, "scopegate_policy_info"),
            [r#"scopegate_policy_info{hash="bb22"} 1"#]
        );
        assert_eq!(
            samples(&text, "scopegate_policy_last_reload_successful"),
            ["scopegate_policy_last_reload_successful 0"]
        );
        let stamp = |name: &str| -> f64 {
            samples(&text, name)[0]
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        assert!(stamp("scopegate_policy_last_reload_timestamp_seconds") > 1.0e9);
        assert!(
            stamp("scopegate_policy_last_reload_success_timestamp_seconds")
                <= stamp("scopegate_policy_last_reload_timestamp_seconds")
        );
        m.observe(Observed::PolicyRejected { at_start: true });
        assert_eq!(
            samples(&m.encode(), "scopegate_policy_info"),
            [r#"scopegate_policy_info{hash="deny-all"} 1"#]
        );
    }

    #[test]
    fn overhead_is_a_histogram_in_seconds() {
        let m = Metrics::new();
        m.overhead(RequestPath::Forwarded, Duration::from_micros(30));
        m.overhead(RequestPath::Forwarded, Duration::from_millis(3));
        m.overhead(RequestPath::Refused, Duration::from_micros(10));
        let text = m.encode();
        assert!(
            text.contains("# TYPE scopegate_request_overhead_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(r#"scopegate_request_overhead_seconds_count{path="forwarded"} 2"#),
            "{text}"
        );
        for want in [
            r#"scopegate_request_overhead_seconds_bucket{path="refused",le="2.5e-05"} 1"#,
            r#"scopegate_request_overhead_seconds_bucket{path="forwarded",le="2.5e-05"} 0"#,
            r#"scopegate_request_overhead_seconds_bucket{path="forwarded",le="5e-05"} 1"#,
            r#"scopegate_request_overhead_seconds_bucket{path="forwarded",le="0.0032"} 2"#,
            r#"scopegate_request_overhead_seconds_bucket{path="forwarded",le="+Inf"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == want), "{want} not in\n{text}");
        }
    }

    #[derive(Debug)]
    struct Fixed(Live);
    impl LiveSource for Fixed {
        fn live(&self) -> Live {
            self.0.clone()
        }
    }

    #[test]
    fn live_values_keep_their_names_and_types() {
        let m = Metrics::new();
        assert!(!m.encode().contains("scopegate_kernel_redirected"));
        m.attach(Arc::new(Fixed(Live {
            kernel_redirected: 7,
            kernel_denied: 3,
            kernel_audit_passed: 5,
            audit_queue_depth: 2,
            audit_unavailable: true,
            workloads: 4,
            ..Live::default()
        })));
        let text = m.encode();
        for want in [
            "# TYPE scopegate_kernel_redirected_total counter",
            "scopegate_kernel_redirected_total 7",
            "scopegate_kernel_denied_total 3",
            "scopegate_kernel_audit_passed_total 5",
            "scopegate_kernel_events_lost_total 0",
            "scopegate_kernel_origin_store_failed_total 0",
            "scopegate_cgroup_scan_errors_total 0",
            "scopegate_cgroup_scan_kept_total 0",
            "scopegate_audit_records_written_total 0",
            "scopegate_audit_write_errors_total 0",
            "scopegate_audit_checkpoints_total 0",
            "scopegate_audit_unavailable_summarised_total 0",
            "# TYPE scopegate_audit_queue_depth gauge",
            "scopegate_audit_queue_depth 2",
            "scopegate_audit_unavailable 1",
            "scopegate_workloads 4",
            "scopegate_managed_cgroups 0",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} not in\n{text}");
        }
    }

    #[test]
    fn process_metrics_come_from_proc_self() {
        let p = Process::read();
        assert!(p.cpu_seconds.is_some_and(|c| c >= 0.0), "{p:?}");
        assert!(p.resident_bytes.is_some_and(|r| r > 0), "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        assert!(
            p.max_fds.is_some_and(|n| n >= p.open_fds.unwrap_or(0)),
            "{p:?}"
        );
        let now = unix_now();
        assert!(
            p.start_time_seconds
                .is_some_and(|s| s > 1.0e9 && s <= now + 1.0),
            "{p:?}"
        );
        let text = Metrics::new().encode();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name}\n{text}"
            );
        }
    }

    #[test]
    fn proc_parsers_take_hostile_input() {
        let stat = "4242 (a) b) (c d) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15 16 17 18 999 20";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                utime: 111,
                stime: 222,
                starttime: 999
            })
        );
        for bad in [
            "",
            "4242 (x",
            "4242 (x) S 1 2",
            "1 (x) S a b c d e f g h i j k l m n o p q r s t",
        ] {
            assert_eq!(parse_stat(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_btime("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_btime("btime\n"), None);
        assert_eq!(parse_btime("btime -1\n"), None);
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  1024 kB\n"),
            Some(1024 * 1024)
        );
        assert_eq!(parse_vm_rss("VmRSS: 12 MB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS: 99999999999999999999 kB\n"), None);
        assert_eq!(parse_vm_rss(""), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
        assert_eq!(parse_max_open_files("garbage"), None);
    }
}
