//! Lifecycle records: the agent's own history, in the same hash chain as its decisions.
//!
//! All are ordinary chained records with `proto: "audit"`; `reason` names the kind:
//!
//! | reason | decision | origin | fields | written |
//! |---|---|---|---|---|
//! | `agent_started` | `allow` | `agent` | `version`, `policy_hash`, `clean` | at start, right after the audit file is opened (after a `recovered_truncation`, if any) |
//! | `agent_stopping` | `allow` | `agent` | `trigger` (`SIGTERM`/`SIGINT`) | at a clean stop; followed by a final checkpoint when signing, and the anchor file is updated (see [`super::Auditor::stop`]) |
//! | `policy_reloaded` | `allow` | `policy` | `policy_hash`, `trigger` | on every reload that took effect, before the new policy decides anything |
//! | `policy_rejected` | `error` | `policy` | `policy_hash`, `trigger`, `errors` | on every reload that was refused (the last good policy stays), and at a start with `--allow-empty` and an invalid policy (`trigger: start`) |
//! | `cgroup_held` | `deny` | `policy` | `cgroup`, `cgroup_id`, `workload` (the one that selected it before, if known) | when a managed cgroup is selected by no policy any more (policy removed, empty or invalid policy set, restart): it stays deny-all until released (see `workloads`) |
//! | `cgroup_released` | `allow` | `policy` | `cgroup`, `cgroup_id`, `uid`/`pid` of `scopegate release` (when known), `trigger` | when the agent applies a `scopegate release`, before the cgroup leaves the kernel's managed map |
//! | `enforcement_restored` | `error` | `agent` | `errors` (what was missing), `trigger: health check` | when the health check (`control::health`) found a program detached or a pin gone while the agent ran, and re-attached and re-pinned it |
//! | `enforcement_lost` | `error` | `agent` | `errors` (what was missing, then why it could not be restored), `trigger: health check` | when that restoration failed (once per incident; retried every check) |
//! | `cgroup_scan_incomplete` | `error` | `agent` | `cgroup` (the directory that could not be read), `trigger` (the operation: `stat`, `read_dir`), `errors` (path, operation, error and errno name) | when a cgroup scan could not read part of the tree (the managed cgroups there keep their enforcement, see `workloads`): once per operation and errno per incident, an incident ending with the next complete scan |
//! | `preexisting_connection_cut_failed` | `error` | `agent` | `errors`; with `pid`, `uid`, `cgroup`, `dst` when one socket could not be destroyed | when cutting the connections of a newly managed cgroup failed: the socket dump (then no socket fields), or one socket's destroy |
//! | `clock_step` | `error` | `agent` | `clock_step_us` | by the writer, when the wall clock moved more than [`CLOCK_STEP_THRESHOLD`] away from the monotonic clock since the record before |
//!
//! `clean` on `agent_started` is `true` when the previous run's last lifecycle record is
//! `agent_stopping` and no torn tail had to be cut; `false` after a crash (torn tail, or the
//! last lifecycle record is an `agent_started`, or none is found in the last
//! [`TAIL_WINDOW`] bytes of a non-empty chain); absent for a new chain or without a file sink.
#![forbid(unsafe_code)]

use std::{
    fmt, fs, io,
    path::Path,
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use super::{Ack, Auditor, Decision, Entry, Fault, Record, Written};

/// Reason of the record written at start.
pub const AGENT_STARTED: &str = "agent_started";
/// Reason of the record written at a clean stop.
pub const AGENT_STOPPING: &str = "agent_stopping";
/// Reason of the record of a reload that took effect.
pub const POLICY_RELOADED: &str = "policy_reloaded";
/// Reason of the record of a refused policy.
pub const POLICY_REJECTED: &str = "policy_rejected";
/// Reason of the record of a cgroup held deny-all because no policy selects it any more.
pub const CGROUP_HELD: &str = "cgroup_held";
/// Reason of the record of an operator's release of a held cgroup.
pub const CGROUP_RELEASED: &str = "cgroup_released";
/// Reason of the record of enforcement found gone and put back.
pub const ENFORCEMENT_RESTORED: &str = "enforcement_restored";
/// Reason of the record of enforcement found gone that could not be put back.
pub const ENFORCEMENT_LOST: &str = "enforcement_lost";
/// Reason of the record of a wall-clock step.
pub const CLOCK_STEP: &str = "clock_step";
/// Reason of the record of a cgroup scan that could not read part of the tree.
pub const CGROUP_SCAN_INCOMPLETE: &str = "cgroup_scan_incomplete";
/// Reason of the record of a failed cut of pre-existing connections.
pub const CUT_FAILED: &str = "preexisting_connection_cut_failed";

/// A wall-clock move beyond the monotonic clock larger than this is a `clock_step`.
pub const CLOCK_STEP_THRESHOLD: Duration = Duration::from_secs(2);
/// How much of the end of the audit file the start-up scan reads to find the previous
/// run's last lifecycle record.
pub const TAIL_WINDOW: u64 = 1 << 20;
/// At most this many errors are kept on a `policy_rejected` record (then a summary line).
pub const MAX_ERRORS: usize = 20;
/// Each error kept is clipped to this many bytes.
pub const MAX_ERROR_LEN: usize = 512;

/// The clocks the writer compares: the seam for tests that step the wall clock.
pub trait Clock: Send + Sync + fmt::Debug {
    /// A monotonic reading (from any fixed origin).
    fn monotonic(&self) -> Duration;
    /// The wall clock.
    fn wall(&self) -> jiff::Timestamp;
}

/// The system's clocks: `Instant` and the real-time clock. `Instant` stops during a
/// suspend of the host, so a resume shows as a forward `clock_step`.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }

    fn wall(&self) -> jiff::Timestamp {
        jiff::Timestamp::now()
    }
}

fn audit_record(reason: &str, decision: Decision, origin: Fault) -> Record {
    let mut r = Record::new("audit");
    r.decision = decision;
    r.reason = Some(reason.into());
    r.origin = Some(origin);
    r
}

/// The `agent_started` record. The writer fills in `clean`.
pub fn agent_started(policy_hash: Option<String>) -> Record {
    let mut r = audit_record(AGENT_STARTED, Decision::Allow, Fault::Agent);
    r.version = Some(env!("CARGO_PKG_VERSION").into());
    r.policy_hash = policy_hash;
    r
}

/// The `agent_stopping` record (use [`Auditor::stop`], which also anchors it).
pub fn agent_stopping(trigger: &str) -> Record {
    let mut r = audit_record(AGENT_STOPPING, Decision::Allow, Fault::Agent);
    r.trigger = Some(trigger.into());
    r
}

/// The `policy_reloaded` record.
pub fn policy_reloaded(policy_hash: Option<String>, trigger: &str) -> Record {
    let mut r = audit_record(POLICY_RELOADED, Decision::Allow, Fault::Policy);
    r.policy_hash = policy_hash;
    r.trigger = Some(trigger.into());
    r
}

/// The `policy_rejected` record: the errors (`file:line:col: message`), clipped.
pub fn policy_rejected<E: fmt::Display>(
    policy_hash: Option<String>,
    trigger: &str,
    errors: &[E],
) -> Record {
    let mut r = audit_record(POLICY_REJECTED, Decision::Error, Fault::Policy);
    r.policy_hash = policy_hash;
    r.trigger = Some(trigger.into());
    r.errors = Some(clip_errors(errors));
    r
}

/// The `cgroup_held` record: `path` (id `id`) stays deny-all; `was` is the workload that
/// selected it before, if known.
pub fn cgroup_held(path: &str, id: u64, was: Option<String>) -> Record {
    let mut r = audit_record(CGROUP_HELD, Decision::Deny, Fault::Policy);
    r.cgroup = Some(path.into());
    r.cgroup_id = Some(id);
    r.workload = was;
    r
}

/// The `cgroup_released` record, with who asked (`uid`, `pid` of `scopegate release`)
/// when known.
pub fn cgroup_released(
    path: Option<String>,
    id: u64,
    uid: Option<u32>,
    pid: Option<u32>,
) -> Record {
    let mut r = audit_record(CGROUP_RELEASED, Decision::Allow, Fault::Policy);
    r.cgroup = path;
    r.cgroup_id = Some(id);
    r.uid = uid;
    r.pid = pid;
    r.trigger = Some("scopegate release".into());
    r
}

/// The `enforcement_restored` record: `problems` were found and repaired.
pub fn enforcement_restored<E: fmt::Display>(problems: &[E]) -> Record {
    let mut r = audit_record(ENFORCEMENT_RESTORED, Decision::Error, Fault::Agent);
    r.trigger = Some("health check".into());
    r.errors = Some(clip_errors(problems));
    r
}

/// The `enforcement_lost` record: `problems` were found and `error` kept them from being
/// repaired.
pub fn enforcement_lost<E: fmt::Display>(problems: &[E], error: &str) -> Record {
    let mut r = audit_record(ENFORCEMENT_LOST, Decision::Error, Fault::Agent);
    r.trigger = Some("health check".into());
    let mut errors: Vec<String> = problems.iter().map(ToString::to_string).collect();
    errors.push(format!("not restored: {error}"));
    r.errors = Some(clip_errors(&errors));
    r
}

/// The `cgroup_scan_incomplete` record: `action` on the cgroup directory `path` failed.
pub fn cgroup_scan_incomplete(path: &str, action: &'static str, error: &io::Error) -> Record {
    let mut r = audit_record(CGROUP_SCAN_INCOMPLETE, Decision::Error, Fault::Agent);
    r.cgroup = Some(path.to_owned());
    r.trigger = Some(action.into());
    r.errors = Some(clip_errors(&[format!(
        "{path}: {action}: {error}{}",
        errno_name(error)
    )]));
    r
}

/// The `preexisting_connection_cut_failed` record of `error` (the caller adds what is
/// known of the socket).
pub fn cut_failed(error: &dyn fmt::Display) -> Record {
    let mut r = audit_record(CUT_FAILED, Decision::Error, Fault::Agent);
    r.proto = "tcp";
    r.errors = Some(clip_errors(&[error]));
    r
}

/// ` (EMFILE)` for an OS error, else nothing.
pub fn errno_name(error: &io::Error) -> String {
    error
        .raw_os_error()
        .map(|code| format!(" ({:?})", nix::errno::Errno::from_raw(code)))
        .unwrap_or_default()
}

/// The `clock_step` record, stamped with the stepped wall clock.
pub(crate) fn clock_step(step_us: i64, wall: jiff::Timestamp) -> Record {
    let mut r = audit_record(CLOCK_STEP, Decision::Error, Fault::Agent);
    r.ts = format!("{wall:.6}");
    r.clock_step_us = Some(step_us);
    r
}

/// The first [`MAX_ERRORS`] errors, each at most [`MAX_ERROR_LEN`] bytes (cut at a
/// character boundary, ending in `…`), then `… N more errors` if some were left out.
pub fn clip_errors<E: fmt::Display>(errors: &[E]) -> Vec<String> {
    let mut out: Vec<String> = errors
        .iter()
        .take(MAX_ERRORS)
        .map(|e| clip(e.to_string(), MAX_ERROR_LEN))
        .collect();
    if errors.len() > MAX_ERRORS {
        out.push(format!("… {} more errors", errors.len() - MAX_ERRORS));
    }
    out
}

fn clip(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// Whether the policy loader reads this file name (kept in step with `policy::load_dir`).
fn is_policy_file(name: &str) -> bool {
    !name.starts_with('.')
        && !name.ends_with('~')
        && !name.ends_with(".swp")
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// SHA-256 over the policy files of `dir` in sorted name order, hex: for each file, its
/// name, a NUL byte, its length as 8 bytes big-endian, then its bytes. Read separately
/// from the loader, so a file changed between the two reads shows as the next reload.
pub fn policy_hash(dir: &Path) -> io::Result<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        if is_policy_file(&name.to_string_lossy()) {
            names.push(name);
        }
    }
    names.sort();
    let mut hasher = Sha256::new();
    for name in names {
        let bytes = fs::read(dir.join(&name))?;
        hasher.update(name.as_encoded_bytes());
        hasher.update([0]);
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(&bytes);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// [`policy_hash`], or `None` (logged) if the directory cannot be read.
pub fn policy_hash_or_log(dir: &Path) -> Option<String> {
    match policy_hash(dir) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot hash the policy directory");
            None
        }
    }
}

impl Auditor {
    /// Records `agent_stopping` (with `trigger`, e.g. `SIGTERM`) and returns what resolves
    /// once it is durable: written and fsynced, followed by a final signed checkpoint when
    /// a signing key is set, and `FILE.anchor` replaced by the last of these lines (the
    /// checkpoint, or without a key the `agent_stopping` record itself: an unsigned anchor
    /// of its seq and hash). `audit verify` then detects records cut off the end. Records
    /// that arrive later (connections still ending) are chained after it.
    pub fn stop(&self, trigger: &str) -> Written {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut record = agent_stopping(trigger);
        record.host = self.host.to_string();
        self.shared
            .queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self
            .tx
            .send(Entry {
                record: Box::new(record),
                written: Some(Ack::Written(tx)),
                stop: true,
            })
            .is_err()
        {
            self.shared
                .queued
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!("audit writer stopped; agent_stopping record lost");
        }
        Written { rx: Some(rx) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn errors_are_clipped_in_count_and_length() {
        let long = "é".repeat(400);
        let errors: Vec<String> = (0..25).map(|i| format!("a.yaml:{i}:3: {long}")).collect();
        let clipped = clip_errors(&errors);
        assert_eq!(clipped.len(), MAX_ERRORS + 1);
        assert!(clipped[0].starts_with("a.yaml:0:3: "));
        assert!(clipped[0].len() <= MAX_ERROR_LEN && clipped[0].ends_with('…'));
        assert_eq!(clipped[MAX_ERRORS], "… 5 more errors");
        assert_eq!(clip_errors(&["x.yaml:1:1: bad"]), vec!["x.yaml:1:1: bad"]);
    }

    #[test]
    fn policy_hash_covers_names_and_bytes_of_policy_files_only() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.yaml"), "x: 1\n").unwrap();
        fs::write(dir.path().join("b.yml"), "y: 2\n").unwrap();
        let h1 = policy_hash(dir.path()).unwrap();
        assert_eq!(h1.len(), 64);
        fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        fs::write(dir.path().join(".a.yaml.swp"), "ignored").unwrap();
        assert_eq!(policy_hash(dir.path()).unwrap(), h1);
        fs::write(dir.path().join("b.yml"), "y: 3\n").unwrap();
        let h2 = policy_hash(dir.path()).unwrap();
        assert_ne!(h2, h1);
        fs::rename(dir.path().join("b.yml"), dir.path().join("c.yml")).unwrap();
        assert_ne!(policy_hash(dir.path()).unwrap(), h2);
    }
}
