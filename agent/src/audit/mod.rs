//! Audit: exactly one record per decision, written off the request path.
//!
//! Every decision point creates an [`AuditGuard`] holding a partly filled [`Record`]. The
//! guard is finished with the decision; if it is dropped unfinished (an early return, a
//! panic, a dropped connection), its `Drop` records an `error` decision, so a decision can
//! never go unrecorded and never be recorded twice. Records go through a bounded queue to a
//! dedicated writer thread that assigns `seq`, serialises one JSON object per line and
//! writes each batch to the configured sinks (stdout and/or a file).
#![forbid(unsafe_code)]

pub mod cli;

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::mpsc::{Receiver, SyncSender, sync_channel},
    thread,
    time::Instant,
};

use serde::Serialize;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The audit file could not be opened.
    #[error("audit file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The writer thread could not be started.
    #[error("starting the audit writer: {source}")]
    Spawn {
        /// The error.
        source: io::Error,
    },
}

/// The decision a record documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
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

/// Where a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Dst {
    /// The host the request named (Host header), if known.
    pub host: Option<String>,
    /// The original destination address the kernel recorded.
    pub ip: Option<String>,
    /// The original destination port.
    pub port: Option<u16>,
}

/// One audit record (one JSON line). Field order is the serialised order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Sequence number, assigned by the writer (contiguous per agent process and file).
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
    /// Destination.
    pub dst: Dst,
    /// `http`, `tcp` (kernel-level), ...
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
        }
    }

    /// Sets the original destination address.
    pub fn with_dst_addr(mut self, addr: SocketAddr) -> Self {
        self.dst.ip = Some(addr.ip().to_string());
        self.dst.port = Some(addr.port());
        self
    }
}

/// Current time, RFC 3339 UTC with microseconds.
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    format!("{now:.6}")
}

/// Where records go.
#[derive(Clone, Debug, Default)]
pub struct Sinks {
    /// Write each record to stdout (journald under systemd).
    pub stdout: bool,
    /// Append each record to this file.
    pub file: Option<PathBuf>,
}

/// Handle to the audit writer; cheap to clone.
#[derive(Clone, Debug)]
pub struct Auditor {
    tx: SyncSender<Record>,
    host: std::sync::Arc<str>,
}

/// Queue capacity between the request path and the writer. A full queue blocks the
/// recording task (backpressure); records are never dropped.
const QUEUE: usize = 8192;

impl Auditor {
    /// Opens the sinks and starts the writer thread.
    pub fn start(sinks: &Sinks) -> Result<(Self, thread::JoinHandle<()>), AuditError> {
        let file = match &sinks.file {
            Some(path) => Some(open_append(path)?),
            None => None,
        };
        let (tx, rx) = sync_channel(QUEUE);
        let stdout = sinks.stdout;
        let handle = thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer(rx, stdout, file))
            .map_err(|source| AuditError::Spawn { source })?;
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into());
        Ok((
            Self {
                tx,
                host: host.into(),
            },
            handle,
        ))
    }

    /// Queues a finished record. Blocks when the queue is full.
    pub fn record(&self, mut record: Record) {
        record.host = self.host.to_string();
        if self.tx.send(record).is_err() {
            // Only after shutdown; the writer is gone, so say so loudly.
            tracing::error!("audit writer stopped; record lost at shutdown");
        }
    }

    /// Starts the record of one decision.
    pub fn guard(&self, record: Record) -> AuditGuard {
        AuditGuard {
            auditor: self.clone(),
            record: Some(record),
            started: Instant::now(),
        }
    }
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.into(),
            source,
        })
}

fn writer(rx: Receiver<Record>, stdout: bool, mut file: Option<File>) {
    let mut seq: u64 = 0;
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        batch.clear();
        let mut next = Some(first);
        while let Some(mut record) = next {
            seq += 1;
            record.seq = seq;
            if serde_json::to_writer(&mut batch, &record).is_ok() {
                batch.push(b'\n');
            }
            next = if batch.len() < 256 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(&batch).and_then(|()| out.flush());
        }
        if let Some(f) = file.as_mut()
            && let Err(e) = f.write_all(&batch)
        {
            tracing::error!(error = %e, "writing the audit file failed");
        }
    }
}

/// The pending record of one decision. Finish it with [`AuditGuard::finish`]; dropping it
/// unfinished records an `error` decision with reason `aborted`.
pub struct AuditGuard {
    auditor: Auditor,
    record: Option<Record>,
    started: Instant,
}

impl AuditGuard {
    /// The record being built.
    pub fn record_mut(&mut self) -> &mut Record {
        // The record is only taken by finish (which consumes self) or Drop.
        self.record.get_or_insert_with(|| Record::new("http"))
    }

    /// Records the decision.
    pub fn finish(
        mut self,
        decision: Decision,
        status: Option<u16>,
        reason: Option<&str>,
        origin: Option<Fault>,
    ) {
        if let Some(mut record) = self.record.take() {
            record.decision = decision;
            record.status = status;
            record.reason = reason.map(str::to_owned);
            record.origin = origin;
            record.latency_us = Some(self.started.elapsed().as_micros() as u64);
            self.auditor.record(record);
        }
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.decision = Decision::Error;
            record.reason = Some("aborted".into());
            record.origin = Some(Fault::Agent);
            record.latency_us = Some(self.started.elapsed().as_micros() as u64);
            self.auditor.record(record);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn one_record_per_guard_finished_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (auditor, handle) = Auditor::start(&Sinks {
            stdout: false,
            file: Some(path.clone()),
        })
        .unwrap();
        let mut g = auditor.guard(Record::new("http"));
        g.record_mut().workload = Some("billing".into());
        g.finish(
            Decision::Deny,
            Some(403),
            Some("path_not_allowed"),
            Some(Fault::Policy),
        );
        {
            let _dropped = auditor.guard(Record::new("http"));
        }
        let g = auditor.guard(Record::new("http"));
        g.finish(Decision::Allow, Some(200), None, None);
        drop(auditor);
        handle.join().unwrap();
        let records = lines(&path);
        assert_eq!(records.len(), 3);
        assert_eq!(records[0]["seq"], 1);
        assert_eq!(records[0]["decision"], "deny");
        assert_eq!(records[0]["reason"], "path_not_allowed");
        assert_eq!(records[0]["origin"], "policy");
        assert_eq!(records[0]["workload"], "billing");
        assert_eq!(records[1]["seq"], 2);
        assert_eq!(records[1]["decision"], "error");
        assert_eq!(records[1]["reason"], "aborted");
        assert_eq!(records[1]["origin"], "agent");
        assert_eq!(records[2]["decision"], "allow");
        assert_eq!(records[2]["status"], 200);
        assert!(records[2]["host"].as_str().is_some_and(|h| !h.is_empty()));
    }

    #[test]
    fn timestamps_are_utc_microseconds() {
        let ts = now_rfc3339();
        assert!(ts.ends_with('Z'), "{ts}");
        let frac = ts.rsplit('.').next().unwrap();
        assert_eq!(frac.len(), 7, "{ts}"); // 6 digits + Z
    }

    #[test]
    fn unopenable_file_is_a_clear_error() {
        let err = Auditor::start(&Sinks {
            stdout: false,
            file: Some("/nonexistent-dir/audit.jsonl".into()),
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent-dir/audit.jsonl"),
            "{err}"
        );
    }
}
