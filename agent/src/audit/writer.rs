//! The writer thread: continues the chain found on disk, seals records, writes batches,
//! fsyncs, rotates, writes checkpoints, and rides out failing sinks without losing a record.
//!
//! Loop: take what is queued (up to a batch), seal each record into the chain in memory,
//! then write the batch to every sink. A record leaves memory only when every sink has it
//! and the file has fsynced it. When a write fails, the sealed records stay in memory, the
//! auditor reports unhealthy, and the writer retries every [`RETRY`]; meanwhile it keeps
//! taking records from the queue until it holds [`BACKLOG_MAX`] of them, then stops
//! (the queue fills and recording blocks: backpressure). At shutdown (every [`Auditor`]
//! handle dropped) it writes a final checkpoint, fsyncs, and retries a failing sink for
//! [`SHUTDOWN_GRACE`]; what still cannot be written is printed on stderr as a last resort.
//!
//! At open, a torn tail is cut and the `recovered_truncation` record is written and fsynced
//! at once. Before sealing each record the writer compares the wall clock with the
//! monotonic clock and seals a `clock_step` record first if the wall clock stepped. An
//! `agent_stopping` entry ([`Auditor::stop`](super::Auditor::stop)) is followed by a
//! checkpoint (when signing) and an anchor; its acknowledgement waits for the anchor.
//!
//! After each successful write of the pending records, the writer answers the
//! [`Written`](super::Written) handles of the records in them, so the proxy can hold each
//! response until its record is out of the agent's memory, and tells each decision record
//! waiting to be forwarded its seq (record before forward). When a write fails, the
//! decision records waiting to be forwarded are answered at once with a refusal (and so is
//! any that arrives while the sink still fails): their requests get 503 and nothing goes
//! upstream; the records themselves stay in the backlog and are written in order later.
//!
//! [`Auditor`]: super::Auditor
#![forbid(unsafe_code)]

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::FileExt as _,
    path::Path,
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, RecvTimeoutError, TryRecvError},
    },
    thread,
    time::{Duration, Instant},
};

use ed25519_dalek::SigningKey;
use tokio::sync::oneshot;

use super::{
    AUDIT_UNAVAILABLE, Ack, AuditError, CheckpointPolicy, Decision, Entry, Fault, QUEUE, Record,
    Shared, Sinks,
    chain::{self, ChainHash, GENESIS, RECOVERED_TRUNCATION},
    checkpoint,
    lifecycle::{self, AGENT_STARTED, AGENT_STOPPING, CLOCK_STEP_THRESHOLD, Clock, TAIL_WINDOW},
    sink::{self, FileSink, Fsync, JournalSink, Pending, SinkOpener, StdoutSink},
};

/// Records taken from the queue per write.
const BATCH: usize = 4096;
/// Sealed records held in memory at most (the backlog while a sink fails).
pub(crate) const BACKLOG_MAX: usize = 2 * QUEUE;
/// Pending records that force an fsync whatever the policy (bounds memory).
const SYNC_AT: usize = QUEUE;
/// Pause between attempts while a sink fails.
pub(crate) const RETRY: Duration = Duration::from_millis(200);
/// How long the writer keeps retrying at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often a persisting failure is logged again.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);
/// Longest line the start-up scan accepts as the last record.
const MAX_LINE: u64 = 16 << 20;

pub(crate) struct Writer {
    rx: Receiver<Entry>,
    /// Whom to tell when the pending records are in every sink (with each record's seq).
    acks: Vec<(Ack, u64)>,
    shared: Arc<Shared>,
    host: Arc<str>,
    seq: u64,
    prev: ChainHash,
    pending: Pending,
    file: Option<FileSink>,
    stdout: Option<StdoutSink>,
    journal: Option<JournalSink>,
    fsync: Fsync,
    signer: Option<SigningKey>,
    checkpoints: CheckpointPolicy,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// The line of the last checkpoint record, for the anchor once it is fsynced.
    anchor: Option<Vec<u8>>,
    retry_at: Option<Instant>,
    failing_since: Option<Instant>,
    last_error_log: Option<Instant>,
    /// The clocks compared for `clock_step` records.
    clock: Arc<dyn Clock>,
    /// Monotonic and wall readings at the last seal.
    last_clock: Option<(Duration, jiff::Timestamp)>,
    /// Whether the previous run ended cleanly, for the first `agent_started` record.
    previous_clean: Option<bool>,
    /// Whom to tell once an `agent_stopping` record, its checkpoint and the anchor are
    /// durable.
    stop_acks: Vec<oneshot::Sender<()>>,
}

/// Where the chain stands in the existing files.
#[derive(Debug, Default)]
struct ChainEnd {
    /// Length of the live file up to its last good record.
    good_len: u64,
    /// Torn bytes after it (cut off).
    torn: u64,
    /// seq and hash of the last record of the chain (in the live file or `.1`).
    last: Option<(u64, ChainHash)>,
    /// Timestamp of the live file's first record.
    first_ts: Option<jiff::Timestamp>,
    /// The last lifecycle record near the end: `agent_stopping` (true) or
    /// `agent_started` (false).
    stopped: Option<bool>,
}

impl Writer {
    pub(crate) fn open(
        sinks: &Sinks,
        opener: SinkOpener,
        stdout: Box<dyn io::Write + Send>,
        rx: Receiver<Entry>,
        shared: Arc<Shared>,
        host: Arc<str>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, AuditError> {
        let signer = match &sinks.signing_key {
            Some(path) => Some(checkpoint::load_or_generate(path)?),
            None => None,
        };
        let (file, end) = match &sinks.file {
            Some(path) => {
                let end = recover(path)?;
                let f = opener(path).map_err(|source| AuditError::Open {
                    path: path.clone(),
                    source,
                })?;
                let sink = FileSink::new(
                    path.clone(),
                    opener,
                    f,
                    end.good_len,
                    sinks.rotation,
                    end.first_ts,
                );
                (Some(sink), end)
            }
            None => (None, ChainEnd::default()),
        };
        let (seq, prev) = end.last.unwrap_or((0, GENESIS));
        let previous_clean = if end.torn > 0 {
            Some(false)
        } else {
            end.last.map(|_| end.stopped == Some(true))
        };
        let last_clock = Some((clock.monotonic(), clock.wall()));
        let mut writer = Self {
            rx,
            acks: Vec::new(),
            shared,
            host,
            seq,
            prev,
            pending: Pending::default(),
            file,
            stdout: sinks.stdout.then(|| StdoutSink::new(stdout)),
            journal: sinks.journal.then(JournalSink::system),
            fsync: sinks.fsync,
            signer,
            checkpoints: sinks.checkpoints,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            anchor: None,
            retry_at: None,
            failing_since: None,
            last_error_log: None,
            clock,
            last_clock,
            previous_clean,
            stop_acks: Vec::new(),
        };
        if end.torn > 0 {
            let path = writer.file.as_ref().map(|f| f.path().display().to_string());
            tracing::warn!(
                file = path.as_deref().unwrap_or_default(),
                torn_bytes = end.torn,
                after_seq = seq,
                "cut a torn record off the end of the audit file (crash during a write)"
            );
            let mut r = Record::new("audit");
            r.decision = Decision::Error;
            r.origin = Some(Fault::Agent);
            r.reason = Some(RECOVERED_TRUNCATION.into());
            r.truncated_bytes = Some(end.torn);
            writer.seal(r);
            // Now, not with the next record: a second crash must not lose the evidence.
            writer.flush(Instant::now(), true);
        }
        Ok(writer)
    }

    pub(crate) fn run(mut self) {
        let _exit = UnhealthyOnExit(self.shared.clone());
        let mut open = true;
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            if open {
                open = self.receive();
            }
            let now = Instant::now();
            self.summarise_unavailable();
            self.maybe_checkpoint(now, !open);
            self.flush(now, !open);
            if !open {
                if self.pending.is_empty() {
                    break;
                }
                let deadline = *shutdown_deadline.get_or_insert(now + SHUTDOWN_GRACE);
                if now >= deadline {
                    self.dump_to_stderr();
                    break;
                }
                let wake = self.retry_at.unwrap_or(now + RETRY).min(deadline);
                thread::sleep(wake.saturating_duration_since(now));
            }
        }
    }

    /// Takes records from the queue; false once every handle is gone.
    fn receive(&mut self) -> bool {
        let room = BACKLOG_MAX.saturating_sub(self.pending.len());
        if room == 0 {
            // Leave further records in the queue until the backlog drains.
            let now = Instant::now();
            let wake = self.retry_at.unwrap_or(now + RETRY);
            thread::sleep(wake.saturating_duration_since(now));
            return true;
        }
        let first = match self.deadline() {
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => self
                .rx
                .recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match first {
            Ok(entry) => self.push(entry),
            Err(RecvTimeoutError::Timeout) => return true,
            Err(RecvTimeoutError::Disconnected) => return false,
        }
        let limit = room.min(BATCH);
        for _ in 1..limit {
            match self.rx.try_recv() {
                Ok(entry) => self.push(entry),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        true
    }

    /// When the loop must wake up without a new record.
    fn deadline(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        if !self.pending.is_empty() {
            consider(self.retry_at);
            consider(self.file.as_ref().and_then(|f| f.sync_deadline(self.fsync)));
        }
        if self.signer.is_some() && self.since_checkpoint > 0 {
            consider(self.checkpoints.interval.map(|i| self.last_checkpoint + i));
        }
        if self.shared.unavailable_pending.load(Ordering::Relaxed) > 0 {
            consider(Some(Instant::now() + RETRY));
        }
        at
    }

    /// A record from the queue.
    fn push(&mut self, entry: Entry) {
        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        let mut record = *entry.record;
        if record.clean.is_none()
            && record.proto == "audit"
            && record.reason.as_deref() == Some(AGENT_STARTED)
        {
            record.clean = self.previous_clean.take();
        }
        self.seal(record);
        if entry.stop {
            // The final point of this run: checkpoint it (when signing) and anchor it.
            if self.signer.is_some() {
                self.checkpoint(Instant::now());
            } else {
                let n = self.pending.len();
                self.anchor = Some(self.pending.bytes(n - 1, n).to_vec());
            }
            match entry.written {
                Some(Ack::Written(ack)) => self.stop_acks.push(ack),
                Some(ack @ Ack::Forward(_)) => self.acks.push((ack, self.seq)),
                None => {}
            }
        } else {
            match entry.written {
                // While a sink fails, nothing is forwarded: say so now, not after a retry.
                Some(Ack::Forward(ack)) if self.failing_since.is_some() => {
                    let _ = ack.send(Err(self.seq));
                }
                Some(ack) => self.acks.push((ack, self.seq)),
                None => {}
            }
        }
        self.checkpoint_if_count();
    }

    /// Seals a record into the chain, preceded by a `clock_step` record if the wall clock
    /// stepped since the last one.
    fn seal(&mut self, record: Record) {
        self.check_clock();
        self.seal_one(record);
    }

    /// Compares how far the wall clock and the monotonic clock moved since the last seal.
    fn check_clock(&mut self) {
        let mono = self.clock.monotonic();
        let wall = self.clock.wall();
        let Some((mono0, wall0)) = self.last_clock.replace((mono, wall)) else {
            return;
        };
        let mono_us = i128::try_from(mono.saturating_sub(mono0).as_micros()).unwrap_or(i128::MAX);
        let wall_us = i128::from(wall.as_microsecond()) - i128::from(wall0.as_microsecond());
        let step = wall_us - mono_us;
        if step.unsigned_abs() <= CLOCK_STEP_THRESHOLD.as_micros() {
            return;
        }
        let step_us = i64::try_from(step).unwrap_or(if step < 0 { i64::MIN } else { i64::MAX });
        tracing::warn!(
            step_us,
            "the wall clock stepped relative to the monotonic clock; recorded as clock_step"
        );
        self.seal_one(lifecycle::clock_step(step_us, wall));
    }

    /// Seals one record into the chain and the pending buffer.
    fn seal_one(&mut self, mut record: Record) {
        if record.host.is_empty() {
            record.host = self.host.to_string();
        }
        self.seq += 1;
        self.prev = chain::seal(&mut record, self.seq, &self.prev, &mut self.pending.buf);
        self.pending.ends.push(self.pending.buf.len());
        self.since_checkpoint += 1;
        self.shared
            .backlog
            .store(self.pending.len() as u64, Ordering::Relaxed);
    }

    /// One summary record for the `audit_unavailable` refusals that found the queue full.
    fn summarise_unavailable(&mut self) {
        if self.pending.len() >= BACKLOG_MAX {
            return;
        }
        let n = self.shared.unavailable_pending.swap(0, Ordering::Relaxed);
        if n == 0 {
            return;
        }
        let mut r = Record::new("audit");
        r.decision = Decision::Deny;
        r.status = Some(503);
        r.reason = Some(AUDIT_UNAVAILABLE.into());
        r.origin = Some(Fault::Agent);
        r.count = Some(n);
        self.seal(r);
        self.checkpoint_if_count();
        self.shared
            .unavailable_summarised
            .fetch_add(n, Ordering::Relaxed);
    }

    /// A checkpoint when the policy's record count is reached (checked per record, so
    /// checkpoints fall exactly every N records).
    fn checkpoint_if_count(&mut self) {
        if self.signer.is_some()
            && self
                .checkpoints
                .every_records
                .is_some_and(|n| self.since_checkpoint >= n)
        {
            self.checkpoint(Instant::now());
        }
    }

    /// A checkpoint when the interval has passed, or at shutdown (`last`).
    fn maybe_checkpoint(&mut self, now: Instant, last: bool) {
        if self.signer.is_none() || self.since_checkpoint == 0 {
            return;
        }
        let due = last
            || self
                .checkpoints
                .interval
                .is_some_and(|i| now >= self.last_checkpoint + i);
        if due {
            self.checkpoint(now);
        }
    }

    /// Appends a signed checkpoint over the last record.
    fn checkpoint(&mut self, now: Instant) {
        let Some(key) = &self.signer else {
            return;
        };
        let mut r = Record::new("audit");
        r.decision = Decision::Allow;
        r.reason = Some("checkpoint".into());
        r.origin = Some(Fault::Agent);
        r.checkpoint = Some(checkpoint::sign(key, self.seq, &self.prev));
        let start = self.pending.buf.len();
        self.seal(r);
        self.anchor = Some(self.pending.buf[start..].to_vec());
        self.since_checkpoint = 0;
        self.last_checkpoint = now;
        self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes the pending records to every sink that does not have them yet.
    fn flush(&mut self, now: Instant, last: bool) {
        if self.pending.is_empty() {
            return;
        }
        if self.retry_at.is_some_and(|t| now < t) {
            return;
        }
        let force_sync = last || self.anchor.is_some() || self.pending.len() >= SYNC_AT;
        match self.try_write(now, force_sync) {
            Ok(()) => {
                // Every pending record is now in every sink: answer the waiting requests.
                for (ack, seq) in self.acks.drain(..) {
                    match ack {
                        Ack::Written(ack) => {
                            let _ = ack.send(());
                        }
                        Ack::Forward(ack) => {
                            let _ = ack.send(Ok(seq));
                        }
                    }
                }
                self.retry_at = None;
                if let Some(since) = self.failing_since.take() {
                    tracing::info!(
                        after = ?since.elapsed(),
                        backlog = self.pending.len(),
                        "the audit sink writes again; backlog written in order"
                    );
                    self.last_error_log = None;
                }
                self.shared.healthy.store(true, Ordering::Relaxed);
                self.clear_if_done();
            }
            Err(e) => {
                self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                self.shared.healthy.store(false, Ordering::Relaxed);
                // Record before forward: those waiting to forward are refused now (their
                // records stay in the backlog); those waiting to respond keep waiting.
                for (ack, seq) in std::mem::take(&mut self.acks) {
                    match ack {
                        Ack::Forward(tx) => {
                            let _ = tx.send(Err(seq));
                        }
                        written @ Ack::Written(_) => self.acks.push((written, seq)),
                    }
                }
                self.retry_at = Some(now + RETRY);
                let file = self
                    .file
                    .as_ref()
                    .map(|f| f.path().display().to_string())
                    .unwrap_or_else(|| "stdout".into());
                if self.failing_since.is_none() {
                    self.failing_since = Some(now);
                    self.last_error_log = Some(now);
                    tracing::error!(
                        sink = file,
                        error = %e,
                        backlog = self.pending.len(),
                        "cannot write audit records; requests are refused (503) until it recovers"
                    );
                } else if self
                    .last_error_log
                    .is_none_or(|t| now >= t + ERROR_LOG_EVERY)
                {
                    self.last_error_log = Some(now);
                    tracing::error!(
                        sink = file,
                        error = %e,
                        backlog = self.pending.len(),
                        failing_for = ?self.failing_since.map(|t| now - t),
                        "audit sink still cannot write"
                    );
                }
            }
        }
    }

    fn try_write(&mut self, now: Instant, force_sync: bool) -> io::Result<()> {
        let mut first_error = None;
        if let Some(out) = self.stdout.as_mut()
            && let Err(e) = out.write(&self.pending)
        {
            first_error = Some(e);
        }
        if let Some(journal) = self.journal.as_mut()
            && let Err(e) = journal.write(&self.pending)
        {
            first_error.get_or_insert(e);
        }
        if let Some(f) = self.file.as_mut() {
            let result = f.write(&self.pending, self.fsync).and_then(|()| {
                if force_sync || f.sync_due(self.fsync, now) {
                    f.sync()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Forgets the pending records once every sink has them (and the file has fsynced them).
    fn clear_if_done(&mut self) {
        let n = self.pending.len();
        let stdout_done = self.stdout.as_ref().is_none_or(|s| s.written == n)
            && self.journal.as_ref().is_none_or(|s| s.written == n);
        let file_done = self
            .file
            .as_ref()
            .is_none_or(|f| f.caught_up(&self.pending));
        if !(stdout_done && file_done) {
            return;
        }
        self.shared.written.fetch_add(n as u64, Ordering::Relaxed);
        self.pending.clear();
        self.shared.backlog.store(0, Ordering::Relaxed);
        if let Some(s) = self.stdout.as_mut() {
            s.written = 0;
        }
        if let Some(s) = self.journal.as_mut() {
            s.written = 0;
        }
        if let Some(f) = self.file.as_mut() {
            f.reset_cursors();
        }
        if let Some(line) = self.anchor.take()
            && let Some(f) = self.file.as_ref()
        {
            let path = sink::with_suffix(f.path(), ".anchor");
            if let Err(e) = write_anchor(&path, &line) {
                tracing::warn!(anchor = %path.display(), error = %e, "writing the audit anchor failed");
            }
        }
        for ack in self.stop_acks.drain(..) {
            let _ = ack.send(());
        }
    }

    /// Last resort at shutdown: the records no sink took go to stderr (the journal).
    fn dump_to_stderr(&mut self) {
        let n = self.pending.len();
        let from = self
            .file
            .as_ref()
            .map_or(0, |f| f.written)
            .min(self.stdout.as_ref().map_or(n, |s| s.written))
            .min(self.journal.as_ref().map_or(n, |s| s.written));
        tracing::error!(
            records = n - from,
            "audit records could not be written before shutdown; they follow on stderr"
        );
        let mut err = io::stderr().lock();
        let _ = err.write_all(self.pending.bytes(from, n));
        let _ = err.flush();
    }
}

struct UnhealthyOnExit(Arc<Shared>);

impl Drop for UnhealthyOnExit {
    fn drop(&mut self) {
        self.0.healthy.store(false, Ordering::Relaxed);
    }
}

/// Replaces the anchor file atomically.
fn write_anchor(path: &Path, line: &[u8]) -> io::Result<()> {
    let tmp = sink::with_suffix(path, ".tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(line)?;
    f.sync_data()?;
    fs::rename(&tmp, path)?;
    sink::sync_dir(path);
    Ok(())
}

/// Finds where the chain stands, cutting a torn tail off the live file.
fn recover(path: &Path) -> Result<ChainEnd, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.into(),
        source,
    };
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        // No live file yet (the opener creates it): continue from the rotated set, if any.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return from_rotated(path),
        Err(e) => return Err(open_err(e)),
    };
    let len = file.metadata().map_err(open_err)?.len();
    if len == 0 {
        return from_rotated(path);
    }
    let end = match scan_end(&file, len, true).map_err(open_err)? {
        Scan::End(end) => end,
        Scan::Damaged(message) => {
            return Err(AuditError::Damaged {
                path: path.into(),
                message,
            });
        }
        Scan::Legacy => {
            drop(file);
            let aside = sink::with_suffix(
                path,
                &format!(".unchained-{}", jiff::Timestamp::now().as_second()),
            );
            fs::rename(path, &aside).map_err(open_err)?;
            tracing::warn!(
                file = %path.display(),
                moved_to = %aside.display(),
                "the audit file has records without a hash chain (older version); moved it \
                 aside and started a new chain"
            );
            return from_rotated(path);
        }
    };
    if end.torn > 0 {
        file.set_len(end.good_len).map_err(open_err)?;
        file.sync_all().map_err(open_err)?;
    }
    let first_ts = if end.good_len > 0 {
        first_timestamp(&file, end.good_len)
    } else {
        None
    };
    let mut end = end;
    end.first_ts = first_ts;
    if end.good_len > 0 {
        end.stopped = last_lifecycle(&file, end.good_len).map_err(open_err)?;
    }
    if end.last.is_none() {
        let rotated = from_rotated(path)?;
        end.last = rotated.last;
        end.stopped = rotated.stopped;
    }
    Ok(end)
}

/// The chain's end when the live file is empty or missing: the newest rotated file.
fn from_rotated(path: &Path) -> Result<ChainEnd, AuditError> {
    let open_err = |p: &Path, source| AuditError::Open {
        path: p.into(),
        source,
    };
    let rotated = sink::rotated_files(path).map_err(|e| open_err(path, e))?;
    let Some((_, newest)) = rotated.first() else {
        return Ok(ChainEnd::default());
    };
    let file = File::open(newest).map_err(|e| open_err(newest, e))?;
    let len = file.metadata().map_err(|e| open_err(newest, e))?.len();
    match scan_end(&file, len, false).map_err(|e| open_err(newest, e))? {
        Scan::End(end) if end.torn == 0 => Ok(ChainEnd {
            last: end.last,
            stopped: last_lifecycle(&file, len).map_err(|e| open_err(newest, e))?,
            ..ChainEnd::default()
        }),
        Scan::End(_) => Err(AuditError::Damaged {
            path: newest.clone(),
            message: "the rotated file ends with a torn line".into(),
        }),
        Scan::Damaged(message) => Err(AuditError::Damaged {
            path: newest.clone(),
            message,
        }),
        Scan::Legacy => Err(AuditError::Damaged {
            path: newest.clone(),
            message: "the rotated file's last record has no hash".into(),
        }),
    }
}

enum Scan {
    End(ChainEnd),
    Damaged(String),
    Legacy,
}

/// Reads the end of a file (seeking from the end): the last complete record, and the torn
/// bytes after it. With `repair`, one complete but unparsable last line also counts as
/// torn (a crash can leave garbage); a parsable record whose hash does not match is never
/// cut (that is tampering, not a crash).
fn scan_end(file: &File, len: u64, repair: bool) -> io::Result<Scan> {
    let mut good = last_newline(file, len)?.map_or(0, |p| p + 1);
    let mut torn = len - good;
    let mut cut_line = false;
    loop {
        if good == 0 {
            return Ok(Scan::End(ChainEnd {
                good_len: 0,
                torn,
                ..ChainEnd::default()
            }));
        }
        let line_end = good - 1;
        let start = last_newline(file, line_end)?.map_or(0, |p| p + 1);
        if line_end - start > MAX_LINE {
            return Ok(Scan::Damaged(format!(
                "the last line is longer than {MAX_LINE} bytes"
            )));
        }
        let mut line = vec![0; usize::try_from(line_end - start).unwrap_or(0)];
        file.read_exact_at(&mut line, start)?;
        match chain::parse_line(&line) {
            Ok(p) if p.intact() => {
                return Ok(Scan::End(ChainEnd {
                    good_len: good,
                    torn,
                    last: Some((p.record.seq, p.record.hash)),
                    first_ts: None,
                    stopped: None,
                }));
            }
            Ok(p) => {
                return Ok(Scan::Damaged(format!(
                    "the last record (seq {}) does not match its hash",
                    p.record.seq
                )));
            }
            Err(_) if is_legacy(&line) => return Ok(Scan::Legacy),
            Err(_) if repair && !cut_line => {
                torn += good - start;
                good = start;
                cut_line = true;
            }
            Err(e) => {
                return Ok(Scan::Damaged(format!(
                    "the line before the end is not an audit record ({e})"
                )));
            }
        }
    }
}

/// The last lifecycle record within the last [`TAIL_WINDOW`] bytes of `[0, len)`:
/// `Some(true)` for `agent_stopping`, `Some(false)` for `agent_started`, `None` if neither.
fn last_lifecycle(file: &File, len: u64) -> io::Result<Option<bool>> {
    let start = len.saturating_sub(TAIL_WINDOW);
    let mut buf = vec![0; usize::try_from(len - start).unwrap_or(0)];
    file.read_exact_at(&mut buf, start)?;
    let mut lines = buf.split(|&b| b == b'\n');
    if start > 0 {
        // Starts mid-line.
        lines.next();
    }
    const NEEDLE: &[u8] = b"\"reason\":\"agent_st";
    for line in lines.rev() {
        if !line.windows(NEEDLE.len()).any(|w| w == NEEDLE) {
            continue;
        }
        let Ok(p) = chain::parse_line(line) else {
            continue;
        };
        if !p.intact() {
            continue;
        }
        if p.record.is_audit(AGENT_STOPPING) {
            return Ok(Some(true));
        }
        if p.record.is_audit(AGENT_STARTED) {
            return Ok(Some(false));
        }
    }
    Ok(None)
}

/// A JSON record from before the hash chain: has `seq`, no `hash`.
fn is_legacy(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(line)
        .is_ok_and(|m| m.contains_key("seq") && !m.contains_key("hash"))
}

/// Position of the last `\n` in `[0, end)`.
fn last_newline(file: &File, end: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 8192;
    let mut buf = [0u8; CHUNK as usize];
    let mut pos = end;
    while pos > 0 {
        let start = pos.saturating_sub(CHUNK);
        let chunk = &mut buf[..usize::try_from(pos - start).unwrap_or(0)];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        pos = start;
    }
    Ok(None)
}

/// The `ts` of the file's first record (for age-based rotation).
fn first_timestamp(file: &File, len: u64) -> Option<jiff::Timestamp> {
    #[derive(serde::Deserialize)]
    struct Ts {
        ts: String,
    }
    let mut buf = vec![0; usize::try_from(len.min(1 << 16)).ok()?];
    file.read_exact_at(&mut buf, 0).ok()?;
    let end = buf.iter().position(|&b| b == b'\n')?;
    let ts: Ts = serde_json::from_slice(&buf[..end]).ok()?;
    ts.ts.parse().ok()
}
