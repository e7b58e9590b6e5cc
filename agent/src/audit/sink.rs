//! Sinks: the rotated, fsynced audit file, stdout, and the journal (one entry per record,
//! `SYSLOG_IDENTIFIER=scopegate-audit`).
//!
//! # Files
//!
//! The live file is the configured path, e.g. `audit.jsonl`. Rotation renames it to
//! `audit.jsonl.1` after shifting older ones (`.1` → `.2`, …), logrotate style: **the
//! highest number is the oldest**. The rotated set in chain order is therefore
//! `FILE.N, …, FILE.2, FILE.1, FILE` ([`rotated_set`]); `verify`, `query` and `tail` accept the
//! base path and find the rest. A rotation happens between records, never inside one:
//! before a record that would make the live file exceed [`Rotation::max_bytes`] (a record
//! larger than that gets a file of its own), or when the live file's first record is older
//! than [`Rotation::max_age`] (checked when the next record is written). The old file is
//! fsynced before it is renamed and the directory is fsynced after. With
//! [`Rotation::keep`] = `Some(n)`, rotated files numbered above `n` are deleted; `None`
//! keeps everything. The first record of the new file continues the chain of the old one.
//!
//! Next to the live file the writer keeps `FILE.anchor` (see [`super::checkpoint`]).
//!
//! # Failures
//!
//! Writes go through [`SinkFile`], so tests can simulate a failing disk. A failed write may
//! have written part of a batch: the file is truncated back to the length it had before
//! the attempt before anything else is written, so the chain in the file never contains
//! partial or duplicated records. A failed fsync may have lost anything written since the
//! last good fsync (the kernel drops the dirty pages): the file is truncated back to the
//! last synced length and the writer rewrites those records from memory.
#![forbid(unsafe_code)]

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// When the audit file is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// After every write (group commit: the writer writes what it has queued in one
    /// `write`, fsyncs, and only then takes more records).
    EveryRecord,
    /// After `max_records` unsynced records or `max_interval` after the first unsynced
    /// write, whichever comes first (and before every rotation and at shutdown).
    Batch {
        /// Records written since the last fsync that trigger one.
        max_records: usize,
        /// Longest time a written record stays unsynced.
        max_interval: Duration,
    },
}

impl Default for Fsync {
    fn default() -> Self {
        Self::Batch {
            max_records: 4096,
            max_interval: Duration::from_millis(100),
        }
    }
}

/// Rotation and retention of the audit file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate before the live file would exceed this size.
    pub max_bytes: Option<u64>,
    /// Rotate when the live file's first record is older than this.
    pub max_age: Option<Duration>,
    /// Keep this many rotated files (`FILE.1` … `FILE.keep`); `None` keeps all.
    pub keep: Option<usize>,
}

/// The file operations the audit writer needs; implemented for [`File`] (opened for
/// appending). A test double can fail them.
pub trait SinkFile: Send {
    /// Appends all of `buf` (may have appended a part of it when it fails).
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes everything written so far durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Truncates the file to `len`; later appends go to the new end.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

impl SinkFile for File {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Write::write_all(self, buf)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
}

/// Opens (creating if needed) a file for appending.
pub type SinkOpener = Box<dyn Fn(&Path) -> io::Result<Box<dyn SinkFile>> + Send>;

/// The opener for real files: append mode, created with mode 0640.
pub fn default_opener() -> SinkOpener {
    Box::new(|path| Ok(Box::new(open_append(path)?)))
}

pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// `base.n`.
pub fn numbered(base: &Path, n: u64) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// `base` with `suffix` appended to its name.
pub fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The rotated files of `base` that exist, as `(number, path)`, sorted by number
/// ascending (newest first).
pub fn rotated_files(base: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = base.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match base.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let Some(rest) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) || rest.starts_with('0') {
            continue;
        }
        if let Ok(n) = rest.parse::<u64>() {
            out.push((n, numbered(base, n)));
        }
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// The rotated set of `base` in chain order: the rotated files oldest first, then `base`
/// itself (if it exists).
pub fn rotated_set(base: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = rotated_files(base)?
        .into_iter()
        .rev()
        .map(|(_, p)| p)
        .collect();
    if base.exists() {
        out.push(base.to_path_buf());
    }
    Ok(out)
}

/// Whether `path` names a rotated file (`….N`).
pub fn is_rotated_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()))
}

/// Expands each path that is a base with rotated siblings (none of them given
/// explicitly) into its rotated set; keeps the given order otherwise.
pub fn expand_paths(paths: &[PathBuf]) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if is_rotated_name(p) {
            out.push(p.clone());
            continue;
        }
        let rotated = rotated_files(p)?;
        if rotated.iter().any(|(_, r)| paths.contains(r)) || rotated.is_empty() {
            out.push(p.clone());
        } else {
            out.extend(rotated.into_iter().rev().map(|(_, r)| r));
            // A crash between a rotation's rename and the new file's creation leaves no
            // live file: the set is the rotated files.
            if p.exists() {
                out.push(p.clone());
            }
        }
    }
    Ok(out)
}

/// Sealed lines waiting to reach every sink: one contiguous buffer plus the end offset of
/// each line.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) buf: Vec<u8>,
    pub(crate) ends: Vec<usize>,
}

impl Pending {
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn start(&self, i: usize) -> usize {
        if i == 0 { 0 } else { self.ends[i - 1] }
    }

    /// Bytes of records `i..j`.
    pub(crate) fn bytes(&self, i: usize, j: usize) -> &[u8] {
        &self.buf[self.start(i)..self.start(j)]
    }

    fn record_len(&self, i: usize) -> u64 {
        (self.ends[i] - self.start(i)) as u64
    }

    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }
}

/// The stdout sink (or any writer standing in for it).
pub(crate) struct StdoutSink {
    out: Box<dyn Write + Send>,
    /// Records of `Pending` written.
    pub(crate) written: usize,
}

impl StdoutSink {
    pub(crate) fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out, written: 0 }
    }

    pub(crate) fn write(&mut self, pending: &Pending) -> io::Result<()> {
        let n = pending.len();
        if self.written < n {
            self.out.write_all(pending.bytes(self.written, n))?;
            self.out.flush()?;
            self.written = n;
        }
        Ok(())
    }
}

/// `SYSLOG_IDENTIFIER` of the audit records in the journal: `journalctl -t scopegate-audit
/// -o cat` prints the chain, one record per line.
pub const JOURNAL_IDENTIFIER: &str = "scopegate-audit";

/// Sends one journal entry: the record line (without its newline) as `MESSAGE`.
pub(crate) type JournalSend = Box<dyn FnMut(&str) -> io::Result<()> + Send>;

/// The journal sink: each record is one journal entry (native protocol), `MESSAGE` = the
/// record's JSON line, `SYSLOG_IDENTIFIER=scopegate-audit`, `PRIORITY=6` (info),
/// `SYSLOG_FACILITY=13` (log audit).
pub(crate) struct JournalSink {
    send: JournalSend,
    /// Records of `Pending` sent.
    pub(crate) written: usize,
}

impl JournalSink {
    /// A sink sending through `send`.
    pub(crate) fn new(send: JournalSend) -> Self {
        Self { send, written: 0 }
    }

    /// The sink of the system journal (`/run/systemd/journal/socket`).
    pub(crate) fn system() -> Self {
        Self::new(Box::new(|line| {
            let fields = [
                ("SYSLOG_IDENTIFIER", JOURNAL_IDENTIFIER),
                ("SYSLOG_FACILITY", "13"),
            ];
            libsystemd::logging::journal_send(
                libsystemd::logging::Priority::Info,
                line,
                fields.into_iter(),
            )
            .map_err(|e| io::Error::other(format!("journal: {e}")))
        }))
    }

    /// Sends the records not sent yet, one entry each; a failure keeps the cursor at the
    /// record that failed, so a retry neither loses nor repeats one.
    pub(crate) fn write(&mut self, pending: &Pending) -> io::Result<()> {
        while self.written < pending.len() {
            let bytes = pending.bytes(self.written, self.written + 1);
            let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
            let line = std::str::from_utf8(bytes).map_err(io::Error::other)?;
            (self.send)(line)?;
            self.written += 1;
        }
        Ok(())
    }
}

/// The audit file sink.
pub(crate) struct FileSink {
    path: PathBuf,
    opener: SinkOpener,
    /// `None` between renaming the old file and opening the new one.
    file: Option<Box<dyn SinkFile>>,
    rotation: Rotation,
    /// Length of the file as far as we know it is good (all whole records).
    len: u64,
    /// Length at the last successful fsync.
    synced_len: u64,
    /// A write failed: truncate to `len` before the next one.
    dirty: bool,
    /// Records of `Pending` written / fsynced.
    pub(crate) written: usize,
    pub(crate) synced: usize,
    /// When the first unsynced record was written.
    unsynced_since: Option<Instant>,
    /// When the live file got its first record.
    first_record: Option<jiff::Timestamp>,
}

impl FileSink {
    /// A sink appending to `file`, which is `len` bytes long (all whole, synced records).
    pub(crate) fn new(
        path: PathBuf,
        opener: SinkOpener,
        file: Box<dyn SinkFile>,
        len: u64,
        rotation: Rotation,
        first_record: Option<jiff::Timestamp>,
    ) -> Self {
        Self {
            path,
            opener,
            file: Some(file),
            rotation,
            len,
            synced_len: len,
            dirty: false,
            written: 0,
            synced: 0,
            unsynced_since: None,
            first_record,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// When an unsynced write must be fsynced at the latest.
    pub(crate) fn sync_deadline(&self, fsync: Fsync) -> Option<Instant> {
        match fsync {
            Fsync::EveryRecord => None,
            Fsync::Batch { max_interval, .. } => self.unsynced_since.map(|t| t + max_interval),
        }
    }

    /// Whether the fsync policy asks for a sync now.
    pub(crate) fn sync_due(&self, fsync: Fsync, now: Instant) -> bool {
        if self.synced >= self.written {
            return false;
        }
        match fsync {
            Fsync::EveryRecord => true,
            Fsync::Batch {
                max_records,
                max_interval,
            } => {
                self.written - self.synced >= max_records
                    || self.unsynced_since.is_some_and(|t| now >= t + max_interval)
            }
        }
    }

    fn rotation_due(&self, next_len: u64, now: jiff::Timestamp) -> bool {
        if self.len == 0 {
            return false;
        }
        if self
            .rotation
            .max_bytes
            .is_some_and(|max| self.len + next_len > max)
        {
            return true;
        }
        match (self.rotation.max_age, self.first_record) {
            (Some(max_age), Some(first)) => now
                .duration_since(first)
                .try_into()
                .is_ok_and(|age: Duration| age >= max_age),
            _ => false,
        }
    }

    /// Writes the records of `pending` this sink has not written yet, rotating as needed.
    pub(crate) fn write(&mut self, pending: &Pending, fsync: Fsync) -> io::Result<()> {
        self.reopen_if_needed()?;
        if self.dirty {
            let len = self.len;
            self.file_mut()?.set_len(len)?;
            self.dirty = false;
        }
        let n = pending.len();
        let mut i = self.written;
        while i < n {
            let now = jiff::Timestamp::now();
            if self.rotation_due(pending.record_len(i), now) {
                self.rotate()?;
            }
            // The records that fit before the next size-based rotation.
            let mut j = i + 1;
            let mut bytes = pending.record_len(i);
            while j < n {
                let next = pending.record_len(j);
                if self
                    .rotation
                    .max_bytes
                    .is_some_and(|max| self.len + bytes + next > max)
                {
                    break;
                }
                bytes += next;
                j += 1;
            }
            let file = self.file_mut()?;
            if let Err(e) = file.write_all(pending.bytes(i, j)) {
                // Cut off whatever part of the batch made it.
                self.dirty = true;
                let len = self.len;
                if self.file_mut()?.set_len(len).is_ok() {
                    self.dirty = false;
                }
                return Err(e);
            }
            if self.len == 0 {
                self.first_record = Some(now);
            }
            self.len += bytes;
            self.written = j;
            if self.unsynced_since.is_none() {
                self.unsynced_since = Some(Instant::now());
            }
            if fsync == Fsync::EveryRecord {
                self.sync()?;
            }
            i = j;
        }
        Ok(())
    }

    fn file_mut(&mut self) -> io::Result<&mut Box<dyn SinkFile>> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("audit file not open"))
    }

    /// fsyncs what was written. On failure, forgets everything since the last good fsync.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if self.synced >= self.written && !self.dirty {
            return Ok(());
        }
        match self.file_mut()?.sync_data() {
            Ok(()) => {
                self.synced = self.written;
                self.synced_len = self.len;
                self.unsynced_since = None;
                Ok(())
            }
            Err(e) => {
                // The kernel may have dropped the dirty pages: rewrite from memory.
                self.written = self.synced;
                self.len = self.synced_len;
                self.dirty = true;
                let len = self.len;
                if let Ok(f) = self.file_mut()
                    && f.set_len(len).is_ok()
                {
                    self.dirty = false;
                }
                Err(e)
            }
        }
    }

    /// Everything in `pending` is written and synced.
    pub(crate) fn caught_up(&self, pending: &Pending) -> bool {
        self.written == pending.len() && self.synced == pending.len()
    }

    pub(crate) fn reset_cursors(&mut self) {
        self.written = 0;
        self.synced = 0;
    }

    /// Renames the live file into the rotated set and opens a new one.
    fn rotate(&mut self) -> io::Result<()> {
        self.sync()?;
        // Make room for `.1`: shift the contiguous run `.1 ..= .m` up by one.
        let rotated = rotated_files(&self.path)?;
        let mut m = 0;
        while rotated.iter().any(|(n, _)| *n == m + 1) {
            m += 1;
        }
        for k in (1..=m).rev() {
            fs::rename(numbered(&self.path, k), numbered(&self.path, k + 1))?;
        }
        fs::rename(&self.path, numbered(&self.path, 1))?;
        self.file = None;
        self.len = 0;
        self.synced_len = 0;
        self.first_record = None;
        tracing::info!(file = %self.path.display(), "rotated the audit file");
        self.reopen_if_needed()?;
        if let Some(keep) = self.rotation.keep {
            for (n, p) in rotated_files(&self.path)? {
                if n > keep as u64
                    && let Err(e) = fs::remove_file(&p)
                {
                    tracing::warn!(file = %p.display(), error = %e, "removing an old audit file failed");
                }
            }
        }
        Ok(())
    }

    /// Opens the live file after a rotation (retried after failures).
    fn reopen_if_needed(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            self.file = Some((self.opener)(&self.path)?);
            sync_dir(&self.path);
        }
        Ok(())
    }
}

/// fsyncs the directory holding `path` (best effort: renames and creations become durable).
pub(crate) fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "fsync of the audit directory failed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn the_journal_sink_sends_one_entry_per_record_and_resumes_after_a_failure() {
        use std::sync::{Arc, Mutex};
        let sent = Arc::new(Mutex::new(Vec::<String>::new()));
        let fail_at = Arc::new(Mutex::new(Some(1usize)));
        let mut sink = {
            let sent = sent.clone();
            let fail_at = fail_at.clone();
            JournalSink::new(Box::new(move |line: &str| {
                let mut sent = sent.lock().unwrap();
                if *fail_at.lock().unwrap() == Some(sent.len()) {
                    return Err(io::Error::other("journal gone"));
                }
                sent.push(line.to_owned());
                Ok(())
            }))
        };
        let mut pending = Pending::default();
        for line in ["{\"seq\":1}\n", "{\"seq\":2}\n", "{\"seq\":3}\n"] {
            pending.buf.extend_from_slice(line.as_bytes());
            pending.ends.push(pending.buf.len());
        }
        assert!(sink.write(&pending).is_err());
        assert_eq!(sink.written, 1);
        *fail_at.lock().unwrap() = None;
        sink.write(&pending).unwrap();
        assert_eq!(sink.written, 3);
        // Each record once, in order, without its newline.
        assert_eq!(
            *sent.lock().unwrap(),
            ["{\"seq\":1}", "{\"seq\":2}", "{\"seq\":3}"]
        );
        sink.write(&pending).unwrap();
        assert_eq!(sent.lock().unwrap().len(), 3);
    }

    #[test]
    fn rotated_set_is_oldest_first_and_ignores_other_names() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        for name in [
            "audit.jsonl",
            "audit.jsonl.1",
            "audit.jsonl.2",
            "audit.jsonl.10",
            "audit.jsonl.anchor",
            "audit.jsonl.01",
            "other.jsonl.3",
        ] {
            fs::write(dir.path().join(name), "").unwrap();
        }
        let set = rotated_set(&base).unwrap();
        let names: Vec<_> = set
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "audit.jsonl.10",
                "audit.jsonl.2",
                "audit.jsonl.1",
                "audit.jsonl"
            ]
        );
        let expanded = expand_paths(std::slice::from_ref(&base)).unwrap();
        assert_eq!(expanded, set);
        // Explicitly given files are taken as given.
        let explicit = vec![numbered(&base, 1), base.clone()];
        assert_eq!(expand_paths(&explicit).unwrap(), explicit);
    }
}
