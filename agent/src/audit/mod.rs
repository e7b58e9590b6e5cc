//! Audit: exactly one tamper-evident record per decision (a forwarded decision also has
//! one linked outcome record), written by a dedicated thread.
//!
//! Every decision point creates an [`AuditGuard`] holding a partly filled [`Record`]. The
//! guard is finished with the decision; if it is dropped unfinished (an early return, a
//! panic, a dropped connection), its `Drop` records an `error` decision, so a decision can
//! never go unrecorded and never be recorded twice.
//!
//! Records go through a bounded queue to a dedicated writer thread (`writer.rs`) that
//! assigns `seq`, seals each record into the hash chain ([`chain`]), and writes batches to
//! the sinks ([`sink`]: a rotated file with an fsync policy, and/or stdout). A full queue
//! blocks the recording task (backpressure); records are never dropped. When a sink
//! cannot write (ENOSPC, EROFS, EIO), the writer keeps the unwritten records in memory,
//! reports [`Auditor::healthy`] = false (the proxy then refuses requests with 503
//! `audit_unavailable`), retries every 200 ms and, once a write succeeds, writes the
//! backlog in order.
//!
//! **Record before forward.** A request that is forwarded (an allow, or a would-deny in
//! audit mode; a TLS passthrough splice) has two linked records. The *decision record*
//! ([`AuditGuard::record_decision`]: decision, rule, request id, no status) is written
//! before any byte goes upstream: `record_decision` waits until the writer has it in every
//! sink (the [`Written`] contract below: it waits for the writer's batch, and adds no fsync
//! of its own) and only then returns the [`Recorded`] proof that
//! [`enforce`](crate::enforce) needs to make the `Admitted` request the forwarder takes; so
//! nothing can be forwarded without a written decision. If a sink fails first (or while
//! the writer writes it), the writer answers at once: no proof, the client gets 503
//! `audit_unavailable`, and nothing is forwarded; the record stays in the backlog and is
//! written later, followed by its 503 outcome. The *outcome record* (same fields, `ts` and
//! `latency_us` of the outcome, [`Record::outcome_of`] = the decision's `seq`) carries
//! status, sizes and duration, or the upstream's failure; it is written before the
//! response is relayed (write before respond). An outcome record is not a decision: the
//! decisions of a chain are the records without `outcome_of`, each exactly once
//! ([`chain::StoredRecord::is_decision`], [`query::fold_outcomes`]). A decision without an
//! outcome was in flight when the agent died (or its client went away before the
//! forward); it may or may not have reached the upstream, but nothing reached the upstream
//! without one.
//!
//! **Write before respond.** [`AuditGuard::finish_written`] returns a [`Written`] that
//! resolves once the writer has handed the record to every sink (the file: `write(2)`
//! done, and fsynced too under `--audit-fsync every-record`). The proxy awaits it before
//! it returns a response, so a client never holds an answer whose record exists only in
//! the agent's memory: a `kill -9` can lose at most the records of requests that had not
//! been answered yet. Optional signed checkpoints ([`checkpoint`]) make truncation and
//! wholesale rewriting detectable. [`verify`], [`query`] and [`cli`] read the files back.
//!
//! The record schema is `record.schema.json` in this directory.
#![forbid(unsafe_code)]

pub mod chain;
pub mod checkpoint;
pub mod cli;
pub mod lifecycle;
pub mod query;
pub mod sink;
pub mod verify;
mod writer;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{SyncSender, TrySendError, sync_channel},
    },
    task::{Context, Poll},
    thread,
    time::{Duration, Instant},
};

use crate::metrics::Observed;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use self::{
    chain::ChainHash,
    checkpoint::Checkpoint,
    lifecycle::{Clock, SystemClock},
    sink::{Fsync, Rotation, SinkFile, SinkOpener},
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The audit file could not be opened (or prepared: read, truncated, rotated).
    #[error("audit file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The existing audit file ends in a way that is not a crash artefact: the agent does
    /// not continue a chain it cannot trust, and does not destroy the evidence either.
    #[error(
        "audit file {path}: {message}; run `scopegate audit verify` on it and move it aside \
         to start a new chain"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The checkpoint signing key could not be loaded or generated.
    #[error(transparent)]
    Key(#[from] checkpoint::CheckpointError),
    /// The writer thread could not be started.
    #[error("starting the audit writer: {source}")]
    Spawn {
        /// The error.
        source: io::Error,
    },
    /// The writer stopped (shutdown, or a crash of the writer thread) before it wrote
    /// the awaited record (the caller knows which one; nothing is cloned for it per request).
    #[error("the audit writer stopped before it wrote the awaited record")]
    WriterStopped,
}

/// The decision a record documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Decision {
    /// Forwarded.
    Allow,
    /// Refused by policy (or by a check that could not pass).
    Deny,
    /// Would have been refused, but the workload is in audit mode.
    WouldDeny,
    /// Failed: the upstream, the agent, or a dropped connection.
    Error,
}

impl Decision {
    /// The serialised name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::WouldDeny => "would_deny",
            Self::Error => "error",
        }
    }
}

/// Where a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The client sent something wrong.
    Client,
    /// The upstream failed.
    Upstream,
    /// The agent itself failed.
    Agent,
    /// The policy refused it.
    Policy,
}

/// The destination of a record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dst {
    /// The host the request named (Host header), if known.
    pub host: Option<String>,
    /// The original destination address the kernel recorded.
    pub ip: Option<String>,
    /// The original destination port.
    pub port: Option<u16>,
    /// The class of `ip` (`global`, `documentation`, `loopback`, `private`, `link-local`,
    /// `cgnat`, `ula`, …; an IPv6 form embedding an IPv4 address has the IPv4 address's
    /// class): what destination binding checked, so that an auditor sees when a name
    /// destination reached an internal address (only with `allow_internal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
}

/// The DNS part of a `proto: "dns"` record: one query through the DNS proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsQuery {
    /// The query name as asked (lowercase, without the trailing dot), if it parsed.
    pub qname: Option<String>,
    /// The query type (`A`, `AAAA`, `TXT`, `TYPE123`, …), if it parsed.
    pub qtype: Option<String>,
    /// `udp` or `tcp`.
    pub transport: String,
    /// The response code returned to the workload (`NOERROR`, `NXDOMAIN`, `REFUSED`,
    /// `SERVFAIL`, …); None when nothing was answered (a malformed UDP query is dropped).
    pub rcode: Option<String>,
    /// The A/AAAA addresses of the answer returned.
    pub answers: Vec<String>,
}

/// One audit record (one JSON line). Field order is the serialised order, which is part
/// of the hash chain's canonical bytes (see [`chain`]): do not reorder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Sequence number, assigned by the writer: contiguous along the chain, across
    /// restarts and rotation.
    pub seq: u64,
    /// When the decision was made, RFC 3339 UTC with microseconds.
    pub ts: String,
    /// This host's name.
    pub host: String,
    /// Workload name, if the caller was identified.
    pub workload: Option<String>,
    /// cgroup v2 path of the caller.
    pub cgroup: Option<String>,
    /// Process id of the caller.
    pub pid: Option<u32>,
    /// Real uid of the caller.
    pub uid: Option<u32>,
    /// Executable of the caller, when cheaply known (the caller of the API fills it).
    pub exe: Option<String>,
    /// Destination.
    pub dst: Dst,
    /// `http`, `tcp` (kernel-level), `audit` (records of the audit subsystem itself), ...
    pub proto: &'static str,
    /// HTTP method.
    pub method: Option<String>,
    /// Canonical path (what was matched and forwarded).
    pub path: Option<String>,
    /// The id of the rule that allowed the request.
    pub rule: Option<String>,
    /// The decision.
    pub decision: Decision,
    /// Stable reason code for anything but a plain allow.
    pub reason: Option<String>,
    /// Where a failure came from.
    pub origin: Option<Fault>,
    /// HTTP status returned to the client.
    pub status: Option<u16>,
    /// Request body bytes sent upstream.
    pub bytes_up: Option<u64>,
    /// Response bytes returned to the client.
    pub bytes_down: Option<u64>,
    /// Time from the start of the decision to the response head, µs.
    pub latency_us: Option<u64>,
    /// Request id, also returned to the client in denials.
    pub request_id: Option<String>,
    /// On checkpoint records only: the signed point of the chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// On summary records only: how many decisions this record stands for (503
    /// `audit_unavailable` refusals that could not be queued one by one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// On `recovered_truncation` records only: how many torn bytes were cut off the end of
    /// the file at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_bytes: Option<u64>,
    /// On `malformed_request` records only: the parser's precise error kind
    /// (`content_length_with_transfer_encoding`, `chunk_size_invalid`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// On `agent_started` records only: the agent's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// On `agent_started` records only: whether the previous run ended cleanly (its last
    /// lifecycle record is `agent_stopping` and no torn tail was cut). Absent when there
    /// was no previous chain to look at (a new chain, or no file sink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clean: Option<bool>,
    /// On `agent_started`, `policy_reloaded` and `policy_rejected` records: SHA-256 of the
    /// policy directory's files (see [`lifecycle::policy_hash`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// On `agent_stopping`, `policy_reloaded` and `policy_rejected` records: what caused it
    /// (`SIGTERM`, `SIGINT`, `SIGHUP`, `start`, `policy directory changed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// On `policy_rejected` records only: the errors, `file:line:col: message`, clipped
    /// (see [`lifecycle::clip_errors`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<String>>,
    /// On `clock_step` records only: by how much the wall clock moved beyond the monotonic
    /// clock since the record before, µs (negative: stepped backwards).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_step_us: Option<i64>,
    /// On outcome records only: the `seq` of the decision record this record completes
    /// (same `request_id`). An outcome record is not a decision: it carries what happened
    /// after a forwarded decision (status, sizes, duration, upstream errors); see
    /// "Record before forward" in the module docs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome_of: Option<u64>,
    /// On `cgroup_held` and `cgroup_released` records only: the cgroup v2 id (inode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// On `proto: "dns"` records only: the question, how it came, and the answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsQuery>,
    /// On denials (and `would_deny`) by a rule's check only: the rule that got furthest
    /// (path → method → query → headers → body → time), for explanation. `rule` is only
    /// ever the rule that allowed the request, so usage analysis can count `rule` alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nearest_rule: Option<String>,
    /// On HTTP decision records of a request with a query only: the query's parameter
    /// names, decoded, in request order (a repeated name repeats), never their values; at
    /// most [`crate::policy::MAX_RECORDED_QUERY_NAMES`] names of at most
    /// [`crate::policy::MAX_RECORDED_QUERY_NAME`] printable bytes each, so that `policy
    /// suggest` can list them (see [`crate::policy::recorded_query_names`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_names: Option<Vec<String>>,
    /// With `query_names` only: `true` when the names could not all be recorded (more of
    /// them, a longer or unprintable one, a query that does not parse).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_names_clipped: Option<bool>,
    /// Hash of the previous record; set by the writer.
    pub(crate) prev: ChainHash,
    /// Not serialised: the record of a kernel deny event (counted by
    /// `scopegate_kernel_denies_total`, not as a proxy decision).
    #[serde(skip)]
    pub(crate) kernel_event: bool,
}

impl Record {
    /// A new record stamped now, with the decision still `error` (set it before finishing).
    pub fn new(proto: &'static str) -> Self {
        Self {
            seq: 0,
            ts: now_rfc3339(),
            host: String::new(),
            workload: None,
            cgroup: None,
            pid: None,
            uid: None,
            exe: None,
            dst: Dst::default(),
            proto,
            method: None,
            path: None,
            rule: None,
            decision: Decision::Error,
            reason: None,
            origin: None,
            status: None,
            bytes_up: None,
            bytes_down: None,
            latency_us: None,
            request_id: None,
            checkpoint: None,
            count: None,
            truncated_bytes: None,
            error_kind: None,
            version: None,
            clean: None,
            policy_hash: None,
            trigger: None,
            errors: None,
            clock_step_us: None,
            outcome_of: None,
            cgroup_id: None,
            dns: None,
            nearest_rule: None,
            query_names: None,
            query_names_clipped: None,
            prev: chain::GENESIS,
            kernel_event: false,
        }
    }

    /// What the metrics count of this record (see [`crate::metrics::Metrics::observe`]).
    fn observed(&self) -> Option<Observed<'_>> {
        if self.proto == "audit" {
            return match self.reason.as_deref() {
                Some(lifecycle::AGENT_STARTED) => Some(Observed::PolicyLoaded {
                    hash: self.policy_hash.as_deref(),
                    reload: false,
                }),
                Some(lifecycle::POLICY_RELOADED) => Some(Observed::PolicyLoaded {
                    hash: self.policy_hash.as_deref(),
                    reload: true,
                }),
                Some(lifecycle::POLICY_REJECTED) => Some(Observed::PolicyRejected {
                    at_start: self.trigger.as_deref() == Some("start"),
                }),
                _ => None,
            };
        }
        if self.outcome_of.is_some() {
            return (self.origin == Some(Fault::Upstream)).then_some(Observed::UpstreamError {
                workload: self.workload.as_deref(),
            });
        }
        if self.kernel_event || self.proto == "kernel" {
            return None;
        }
        Some(Observed::Decision {
            workload: self.workload.as_deref(),
            decision: self.decision.as_str(),
            reason: self.reason.as_deref(),
        })
    }

    /// Sets the original destination address.
    pub fn with_dst_addr(mut self, addr: SocketAddr) -> Self {
        self.dst.ip = Some(addr.ip().to_string());
        self.dst.port = Some(addr.port());
        self.dst.class = Some(
            crate::policy::addr::classify(addr.ip().to_canonical())
                .class
                .as_str()
                .to_owned(),
        );
        self
    }
}

/// Current time, RFC 3339 UTC with microseconds.
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    format!("{now:.6}")
}

/// When to write signed checkpoints (only with [`Sinks::signing_key`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// After this many records since the last checkpoint.
    pub every_records: Option<u64>,
    /// After this much time since the last checkpoint (if anything was recorded).
    pub interval: Option<Duration>,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_records: Some(10_000),
            interval: Some(Duration::from_secs(60)),
        }
    }
}

/// Where records go.
#[derive(Clone, Debug, Default)]
pub struct Sinks {
    /// Write each record to stdout.
    pub stdout: bool,
    /// Send each record to the journal as its own entry (`SYSLOG_IDENTIFIER=scopegate-audit`,
    /// the record as `MESSAGE`): `journalctl -t scopegate-audit -o cat | scopegate audit
    /// verify -` checks the chain.
    pub journal: bool,
    /// Append each record to this file (rotated set: `FILE.1` newest … `FILE.N` oldest).
    pub file: Option<PathBuf>,
    /// Rotation and retention of the file.
    pub rotation: Rotation,
    /// When the file is fsynced.
    pub fsync: Fsync,
    /// ed25519 PKCS#8 PEM key for signed checkpoints; generated (0600, plus `.pub`) if
    /// missing. `None`: no checkpoints.
    pub signing_key: Option<PathBuf>,
    /// When checkpoints are written.
    pub checkpoints: CheckpointPolicy,
}

/// Counters of the audit writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditMetrics {
    /// Records written to every sink (and, for the file, fsynced), including the audit
    /// subsystem's own records (checkpoints, summaries). Counted when a whole batch has
    /// reached every sink, so it lags by up to one fsync interval, and stays put during
    /// an outage even for records already in the file.
    pub records_written: u64,
    /// Failed attempts to write, fsync or rotate.
    pub write_errors: u64,
    /// Records accepted but not yet written: in the queue plus the writer's backlog.
    pub queue_depth: u64,
    /// Whether the sinks currently cannot write (see [`Auditor::healthy`]).
    pub unhealthy: bool,
    /// Checkpoint records written.
    pub checkpoints: u64,
    /// `audit_unavailable` refusals that found the queue full and were recorded as part
    /// of a summary record (`count`) instead of one record each.
    pub unavailable_summarised: u64,
}

/// State shared by the handles and the writer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) healthy: AtomicBool,
    pub(crate) written: AtomicU64,
    pub(crate) write_errors: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) backlog: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
    /// Refusals waiting to be summarised.
    pub(crate) unavailable_pending: AtomicU64,
    pub(crate) unavailable_summarised: AtomicU64,
}

impl Shared {
    fn new() -> Self {
        Self {
            healthy: AtomicBool::new(true),
            written: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            backlog: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            unavailable_pending: AtomicU64::new(0),
            unavailable_summarised: AtomicU64::new(0),
        }
    }
}

/// One record on its way to the writer, with whom to tell once it is written.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Boxed: a record is about a kilobyte, and it moves from the request's future
    /// through the queue to the writer; a box moves as one pointer.
    pub(crate) record: Box<Record>,
    pub(crate) written: Option<Ack>,
    /// The `agent_stopping` record of [`Auditor::stop`]: checkpoint and anchor after it.
    pub(crate) stop: bool,
}

/// Whom the writer tells about one record.
#[derive(Debug)]
pub(crate) enum Ack {
    /// Write before respond: told once the record is in every sink, however long the
    /// sinks fail.
    Written(oneshot::Sender<()>),
    /// Record before forward: told the record's seq once it is in every sink (`Ok`), or
    /// at once when a sink fails (`Err`: the record stays in the backlog and is written
    /// when the sink recovers, but nothing may be forwarded on it now).
    Forward(oneshot::Sender<Result<u64, u64>>),
}

/// Proof that a decision record is in every sink (the writer acknowledged it): what
/// [`enforce`](crate::enforce) needs to make the [`Admitted`](crate::enforce::Admitted)
/// request that the forwarder takes, so nothing can be forwarded before its decision is
/// recorded. Only [`AuditGuard::record_decision`] makes one; it cannot be cloned.
#[derive(Debug)]
pub struct Recorded {
    seq: u64,
}

impl Recorded {
    /// The `seq` of the decision record.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Resolves once the writer has handed one record to every sink (see
/// [`AuditGuard::finish_written`]).
#[derive(Debug)]
#[must_use = "a Written does nothing unless awaited with `wait`"]
pub struct Written {
    rx: Option<oneshot::Receiver<()>>,
}

impl Written {
    /// Already written (or nothing to wait for).
    fn done() -> Self {
        Self { rx: None }
    }

    /// Waits until the record is in every sink. Errs only if the writer stopped first;
    /// the record may then be lost (it was printed on stderr if the writer shut down).
    pub async fn wait(self) -> Result<(), AuditError> {
        self.await
    }
}

/// Awaiting a `Written` (also by `&mut`, e.g. under a timeout) is [`Written::wait`].
impl Future for Written {
    type Output = Result<(), AuditError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.rx = None;
                Poll::Ready(result.map_err(|_| AuditError::WriterStopped))
            }
        }
    }
}

/// Handle to the audit writer; cheap to clone.
#[derive(Clone, Debug)]
pub struct Auditor {
    tx: SyncSender<Entry>,
    host: Arc<str>,
    shared: Arc<Shared>,
}

/// Queue capacity between the request path and the writer. A full queue blocks the
/// recording task (backpressure); records are never dropped.
pub(crate) const QUEUE: usize = 8192;

/// Reason code of the refusal recorded when the audit sink cannot write.
pub const AUDIT_UNAVAILABLE: &str = "audit_unavailable";

impl Auditor {
    /// Opens the sinks (continuing an existing chain, recovering a torn last line) and
    /// starts the writer thread.
    pub fn start(sinks: &Sinks) -> Result<(Self, thread::JoinHandle<()>), AuditError> {
        Self::start_with(sinks, sink::default_opener(), Box::new(io::stdout()))
    }

    /// [`Auditor::start`] with the file opener and the stdout writer supplied: the seam
    /// for tests that simulate failing disks, and for embedding.
    pub fn start_with(
        sinks: &Sinks,
        opener: SinkOpener,
        stdout: Box<dyn io::Write + Send>,
    ) -> Result<(Self, thread::JoinHandle<()>), AuditError> {
        Self::start_with_clock(sinks, opener, stdout, Arc::new(SystemClock::default()))
    }

    /// [`Auditor::start_with`] with the clocks the writer compares for `clock_step`
    /// records supplied: the seam for tests that step the wall clock.
    pub fn start_with_clock(
        sinks: &Sinks,
        opener: SinkOpener,
        stdout: Box<dyn io::Write + Send>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, thread::JoinHandle<()>), AuditError> {
        let host: Arc<str> = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into())
            .into();
        let shared = Arc::new(Shared::new());
        let (tx, rx) = sync_channel(QUEUE);
        let writer = writer::Writer::open(
            sinks,
            opener,
            stdout,
            rx,
            shared.clone(),
            host.clone(),
            clock,
        )?;
        let handle = thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                // Group commit: see `sys::batch_scheduling`. Without it (a seccomp filter
                // that refuses it, say) records are still written, one wake-up each.
                if let Err(e) = crate::sys::batch_scheduling() {
                    tracing::debug!(error = %e, "the audit writer keeps the default scheduling policy");
                }
                writer.run();
            })
            .map_err(|source| AuditError::Spawn { source })?;
        Ok((Self { tx, host, shared }, handle))
    }

    /// Queues a finished record. Blocks when the queue is full.
    pub fn record(&self, record: Record) {
        self.send(Box::new(record), None);
    }

    /// Queues a finished record and returns what resolves once it is written. Blocks
    /// when the queue is full.
    pub fn record_written(&self, record: Record) -> Written {
        self.record_written_boxed(Box::new(record))
    }

    fn record_written_boxed(&self, record: Box<Record>) -> Written {
        let (tx, rx) = oneshot::channel();
        // If the writer is gone, the sender is dropped with the entry and `wait` says so.
        self.send(record, Some(Ack::Written(tx)));
        Written { rx: Some(rx) }
    }

    fn send(&self, mut record: Box<Record>, written: Option<Ack>) {
        record.host = self.host.to_string();
        observe(&record);
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        if self
            .tx
            .send(Entry {
                record,
                written,
                stop: false,
            })
            .is_err()
        {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            // Only after shutdown; the writer is gone, so say so loudly.
            tracing::error!("audit writer stopped; record lost at shutdown");
        }
    }

    /// Records a refusal because the audit sink is unavailable (`deny`, 503,
    /// `audit_unavailable`, origin `agent`) **without blocking**: if the queue is full,
    /// the refusal is counted and the writer records one summary record (`count` = how
    /// many) as soon as it has room. Use it for the 503 the proxy answers while
    /// [`Auditor::healthy`] is false; nothing was forwarded for these requests.
    pub fn record_unavailable(&self, record: Record) {
        self.record_unavailable_boxed(Box::new(record));
    }

    fn record_unavailable_boxed(&self, mut record: Box<Record>) {
        record.host = self.host.to_string();
        record.decision = Decision::Deny;
        record.status = Some(503);
        record.reason = Some(AUDIT_UNAVAILABLE.into());
        record.origin = Some(Fault::Agent);
        observe(&record);
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Entry {
            record,
            written: None,
            stop: false,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                self.shared
                    .unavailable_pending
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                tracing::error!("audit writer stopped; record lost at shutdown");
            }
        }
    }

    /// Starts the record of one decision.
    pub fn guard(&self, record: Record) -> AuditGuard {
        AuditGuard {
            auditor: self.clone(),
            record: Some(Box::new(record)),
            started: Instant::now(),
        }
    }

    /// Whether the sinks can write. False from the first failed write until the backlog
    /// has been written; also false once the writer has stopped. While false, the proxy
    /// must not forward anything (answer 503 `audit_unavailable`).
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Relaxed)
    }

    /// Current counters.
    pub fn metrics(&self) -> AuditMetrics {
        let s = &self.shared;
        AuditMetrics {
            records_written: s.written.load(Ordering::Relaxed),
            write_errors: s.write_errors.load(Ordering::Relaxed),
            queue_depth: s.queued.load(Ordering::Relaxed) + s.backlog.load(Ordering::Relaxed),
            unhealthy: !s.healthy.load(Ordering::Relaxed),
            checkpoints: s.checkpoints.load(Ordering::Relaxed),
            unavailable_summarised: s.unavailable_summarised.load(Ordering::Relaxed),
        }
    }
}

/// The pending record of one decision. Finish it with [`AuditGuard::finish`]; dropping it
/// unfinished records an `error` decision with reason `aborted`.
#[derive(Debug)]
pub struct AuditGuard {
    auditor: Auditor,
    /// Boxed, so that moving the guard through the request's awaits moves a pointer.
    record: Option<Box<Record>>,
    started: Instant,
}

impl AuditGuard {
    /// The record being built.
    pub fn record_mut(&mut self) -> &mut Record {
        // The record is only taken by finish (which consumes self) or Drop.
        self.record
            .get_or_insert_with(|| Box::new(Record::new("http")))
    }

    fn elapsed_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Takes the record to finish it: latency set, and an outcome record stamped now.
    fn take(&mut self) -> Option<Box<Record>> {
        let latency = self.elapsed_us();
        let mut record = self.record.take()?;
        record.latency_us = Some(latency);
        if record.outcome_of.is_some() {
            record.ts = now_rfc3339();
        }
        Some(record)
    }

    /// The guard of the outcome record of a decision written as `seq` (None: not written),
    /// made from a copy of the decision record.
    fn outcome(&self, mut outcome: Box<Record>, seq: Option<u64>) -> Self {
        outcome.outcome_of = seq;
        outcome.latency_us = None;
        Self {
            auditor: self.auditor.clone(),
            record: Some(outcome),
            started: self.started,
        }
    }

    /// **Record before forward.** Records the decision to forward (`allow`, or in audit
    /// mode `would_deny` with its reason) and waits until the writer has it in every sink
    /// (the same contract as [`Written`]: written, and fsynced per the fsync policy,
    /// waiting for the writer's batch and no fsync of its own). Only then does it return
    /// the [`Recorded`] proof the forwarder needs, with the guard of the linked *outcome*
    /// record (same fields, `outcome_of` = the decision's seq): finish that one with the
    /// status once the upstream answered (dropped unfinished, it records an `aborted`
    /// outcome). `Err` when a sink fails before the record is written (or the writer
    /// stopped): nothing may be forwarded; the guard then returned records the 503
    /// `audit_unavailable` outcome with [`AuditGuard::finish_unavailable`].
    pub async fn record_decision(
        mut self,
        decision: Decision,
        reason: Option<&str>,
        origin: Option<Fault>,
    ) -> Result<(Recorded, AuditGuard), AuditGuard> {
        let Some(mut record) = self.take() else {
            return Err(self);
        };
        record.decision = decision;
        record.reason = reason.map(str::to_owned);
        record.origin = origin;
        let (tx, rx) = oneshot::channel();
        let outcome_template = record.clone();
        self.auditor.send(record, Some(Ack::Forward(tx)));
        match rx.await {
            Ok(Ok(seq)) => Ok((Recorded { seq }, self.outcome(outcome_template, Some(seq)))),
            Ok(Err(seq)) => Err(self.outcome(outcome_template, Some(seq))),
            Err(_) => Err(self.outcome(outcome_template, None)),
        }
    }

    /// Records the decision.
    pub fn finish(
        mut self,
        decision: Decision,
        status: Option<u16>,
        reason: Option<&str>,
        origin: Option<Fault>,
    ) {
        if let Some(mut record) = self.take() {
            record.decision = decision;
            record.status = status;
            record.reason = reason.map(str::to_owned);
            record.origin = origin;
            self.auditor.send(record, None);
        }
    }

    /// Records the decision like [`AuditGuard::finish`], and returns what resolves once
    /// the record is written: await it before answering the client.
    pub fn finish_written(
        mut self,
        decision: Decision,
        status: Option<u16>,
        reason: Option<&str>,
        origin: Option<Fault>,
    ) -> Written {
        match self.take() {
            Some(mut record) => {
                record.decision = decision;
                record.status = status;
                record.reason = reason.map(str::to_owned);
                record.origin = origin;
                self.auditor.record_written_boxed(record)
            }
            None => Written::done(),
        }
    }

    /// Records the 503 `audit_unavailable` refusal without blocking (see
    /// [`Auditor::record_unavailable`]).
    pub fn finish_unavailable(mut self) {
        if let Some(record) = self.take() {
            self.auditor.record_unavailable_boxed(record);
        }
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if let Some(mut record) = self.take() {
            record.decision = Decision::Error;
            record.reason = Some("aborted".into());
            record.origin = Some(Fault::Agent);
            self.auditor.send(record, None);
        }
    }
}

/// Every record handed to the writer is counted once, queued or summarised.
fn observe(record: &Record) {
    if let Some(observed) = record.observed() {
        crate::metrics::global().observe(observed);
    }
}

#[cfg(test)]
pub(crate) mod tests;
