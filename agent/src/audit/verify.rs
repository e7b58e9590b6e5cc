//! `verify`: walk the hash chain across files and name the first damage.
//!
//! Files are walked in the order given; a base path whose rotated siblings are not given
//! explicitly stands for its whole rotated set, oldest first ([`super::sink::expand_paths`]).
//! Each line must be a sealed record whose hash matches its content, and must link to the
//! record before it (`prev` = that record's `hash`, `seq` = its `seq` + 1). The first
//! violation is reported with its file, line and seq and one of these kinds:
//!
//! | kind | meaning |
//! |---|---|
//! | `edited` | the line is not a valid record, or its hash does not match its content, or it links to its predecessor's position but not its content (the predecessor was altered and rehashed) |
//! | `deleted` | `seq` jumps forward and the record it links to is nowhere later: records are missing |
//! | `reordered` | the record it links to appears *later*, or `seq` goes backwards/repeats within a file |
//! | `truncated` | the last line is torn (no newline), or the chain ends before the anchor (a signed checkpoint, or the `agent_stopping` record of a clean stop) |
//! | `spliced` | at a file boundary, the first record does not continue the previous file's chain |
//! | `bad_signature` | a checkpoint (or the anchor) does not verify with `--pubkey` |
//!
//! **Tail truncation.** Removing whole records from the end leaves a valid, shorter chain:
//! the chain alone cannot tell. It is detected only against an anchor kept elsewhere: the
//! anchor file `FILE.anchor` the agent keeps next to the live file (used automatically when
//! the live file is among the files verified), or any file given with `--anchor` that
//! contains checkpoint or `agent_stopping` records (e.g. `journalctl -o cat` output). An
//! anchor is a signed checkpoint record, or, without a signing key, the `agent_stopping`
//! record of a clean stop (unsigned: it vouches for its seq and hash only; whoever can
//! rewrite the file and the anchor can forge it). Without one, `verify` says how far it
//! verified and that tail truncation is detectable only against an anchor.
//!
//! **Clock steps.** `ts` follows the wall clock, which may step; `seq` orders the chain. A
//! `ts` more than 1 s before the record before, and each `clock_step` record, are notes.
//!
//! Verifying a set the agent is writing can race with a write (a torn last line) or a
//! rotation (files renamed during the walk); run it again before concluding.
//!
//! The head of the chain is different: retention deletes old files, so a chain that does
//! not start at seq 1 is accepted with a note (its link to the record before is unchecked).
//! A `recovered_truncation` record (the agent cut a torn line off after a crash) is a
//! normal link of the chain and is accepted with a note.
#![forbid(unsafe_code)]

use std::{
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader, Write},
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;

use super::{
    chain::{self, ChainHash, GENESIS, StoredRecord},
    checkpoint::{self, Checkpoint},
    lifecycle, sink,
};

/// A `ts` this much (µs) before the record before is reported (records are stamped when
/// decided and sealed in queue order, so small steps back are normal).
const BACKWARDS_NOTICE_US: i64 = 1_000_000;
/// Backwards steps reported one by one; beyond, a count.
const MAX_STEP_NOTES: u64 = 10;

/// What to verify.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// The files, oldest first (base paths expand to their rotated sets).
    pub files: Vec<PathBuf>,
    /// Checks checkpoint signatures with this key.
    pub pubkey: Option<VerifyingKey>,
    /// Extra files holding checkpoint records to check the tail against.
    pub anchors: Vec<PathBuf>,
}

/// The kind of damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// Content changed.
    Edited,
    /// Records missing.
    Deleted,
    /// Records out of order.
    Reordered,
    /// Torn last line, or the tail was cut off (against an anchor).
    Truncated,
    /// Files from different chains put together.
    Spliced,
    /// A checkpoint signature does not verify.
    BadSignature,
}

impl DamageKind {
    /// The name printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Edited => "edited",
            Self::Deleted => "deleted",
            Self::Reordered => "reordered",
            Self::Truncated => "truncated",
            Self::Spliced => "spliced",
            Self::BadSignature => "bad_signature",
        }
    }
}

impl fmt::Display for DamageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first damage found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: u64,
    /// The record's seq, if readable.
    pub seq: Option<u64>,
    /// The seq the chain expected there.
    pub expected_seq: u64,
    /// What kind.
    pub kind: DamageKind,
    /// Human explanation.
    pub detail: String,
}

/// The result of a walk.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The files walked, in order.
    pub files: Vec<PathBuf>,
    /// Intact, linked records before the damage (all of them if none).
    pub records: u64,
    /// First and last seq verified.
    pub first_seq: Option<u64>,
    /// Last seq verified.
    pub last_seq: Option<u64>,
    /// Outcome records among [`Report::records`] (`outcome_of`: they complete a decision
    /// recorded before them and are not decisions themselves).
    pub outcomes: u64,
    /// Checkpoint records seen.
    pub checkpoints: u64,
    /// Checkpoint signatures verified (with a public key).
    pub checkpoints_verified: u64,
    /// Whether signatures were checked.
    pub signatures_checked: bool,
    /// The anchor used: file and the seq its checkpoint covers.
    pub anchor: Option<(PathBuf, u64)>,
    /// Remarks that do not make the chain bad.
    pub notes: Vec<String>,
    /// `clock_step` records seen.
    pub clock_steps: u64,
    /// Records whose `ts` is more than 1 s before the record before (a clock step).
    pub ts_steps_back: u64,
    /// The first damage, if any.
    pub damage: Option<Damage>,
}

impl Report {
    /// No damage.
    pub fn ok(&self) -> bool {
        self.damage.is_none()
    }

    /// Prints the report: `OK: …` or `FAIL: …`, then notes.
    pub fn render(&self, out: &mut dyn Write) -> io::Result<()> {
        let range = match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => format!("seq {a}..{b}"),
            _ => "no seq".into(),
        };
        let cps = if self.signatures_checked {
            format!("{} checkpoints verified", self.checkpoints_verified)
        } else {
            format!(
                "{} checkpoints (signatures not checked: no --pubkey)",
                self.checkpoints
            )
        };
        match &self.damage {
            None if self.outcomes > 0 => writeln!(
                out,
                "OK: {} records ({} decisions, {} outcome records), {range}, {cps}",
                self.records,
                self.records - self.outcomes,
                self.outcomes
            )?,
            None => writeln!(out, "OK: {} records, {range}, {cps}", self.records)?,
            Some(d) => {
                let seq = match d.seq {
                    Some(s) => format!("seq {s}"),
                    None => format!("seq ? (expected {})", d.expected_seq),
                };
                writeln!(
                    out,
                    "FAIL: {}: {}:{} {seq}: {}",
                    d.kind,
                    d.file.display(),
                    d.line,
                    d.detail
                )?;
                if self.records > 0 {
                    writeln!(
                        out,
                        "verified before the damage: {} records, {range}, {cps}",
                        self.records
                    )?;
                } else {
                    writeln!(out, "nothing verified before the damage")?;
                }
            }
        }
        for note in &self.notes {
            writeln!(out, "note: {note}")?;
        }
        Ok(())
    }
}

/// Errors that stop a walk (as opposed to damage, which is a finding).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// An anchor file given holds no checkpoint record (nor `agent_stopping` record).
    #[error("{path}: no checkpoint or agent_stopping record found")]
    NoCheckpoint {
        /// The file.
        path: PathBuf,
    },
}

/// The newest anchor found: a signed checkpoint record, or an `agent_stopping` record
/// (unsigned: its seq and hash).
#[derive(Clone, Debug)]
struct Anchor {
    source: PathBuf,
    line: u64,
    /// The signed point, on a checkpoint record.
    checkpoint: Option<Checkpoint>,
    /// The anchor record's own seq and hash.
    record_seq: u64,
    record_hash: ChainHash,
}

impl Anchor {
    /// What it is, for messages.
    fn describe(&self) -> String {
        match &self.checkpoint {
            Some(_) => format!("the signed checkpoint in {}", self.source.display()),
            None => format!(
                "the unsigned anchor (agent_stopping record) in {}",
                self.source.display()
            ),
        }
    }
}

/// Position of the last good record.
#[derive(Clone, Copy, Debug)]
struct Last {
    seq: u64,
    hash: ChainHash,
    file: usize,
    line: u64,
}

/// Walks the chain.
pub fn verify(opts: &VerifyOptions) -> Result<Report, VerifyError> {
    let files = sink::expand_paths(&opts.files).map_err(|source| VerifyError::Io {
        path: opts.files.first().cloned().unwrap_or_default(),
        error: source,
    })?;
    let mut report = Report {
        files: files.clone(),
        signatures_checked: opts.pubkey.is_some(),
        ..Report::default()
    };
    // The anchor is read before the files: a writer updates it only after the files.
    let mut anchor = load_anchor(opts, &files)?;
    // An anchor whose signature does not verify is not used; it is reported after the
    // walk unless the chain itself is damaged earlier.
    let mut bad_anchor = None;
    if let (Some(a), Some(key)) = (&anchor, &opts.pubkey)
        && a.checkpoint
            .as_ref()
            .is_some_and(|cp| !checkpoint::signature_valid(key, cp))
    {
        bad_anchor = anchor.take();
    }
    if let Some(a) = &anchor {
        report.anchor = Some((a.source.clone(), a.record_seq));
    }
    let mut last_ts: Option<jiff::Timestamp> = None;
    let mut steps = Vec::new();
    let mut last: Option<Last> = None;
    let mut recovered = Vec::new();
    let mut last_line = (0usize, 0u64);
    'files: for (fi, path) in files.iter().enumerate() {
        let io_err = |source| VerifyError::Io {
            path: path.clone(),
            error: source,
        };
        let mut reader = BufReader::with_capacity(1 << 16, File::open(path).map_err(io_err)?);
        let mut buf = Vec::new();
        let mut ln = 0u64;
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
                break;
            }
            ln += 1;
            last_line = (fi, ln);
            let expected_seq = last.map_or(1, |l| l.seq + 1);
            let damage = |kind, seq, detail: String| Damage {
                file: path.clone(),
                line: ln,
                seq,
                expected_seq,
                kind,
                detail,
            };
            if buf.last() != Some(&b'\n') {
                let live = fi + 1 == files.len();
                report.damage = Some(damage(
                    DamageKind::Truncated,
                    loose_seq(&buf),
                    format!(
                        "torn last line: {} bytes without a newline (cut mid-record{})",
                        buf.len(),
                        if live {
                            ", or the agent was writing it just now"
                        } else {
                            ""
                        }
                    ),
                ));
                break 'files;
            }
            let line = &buf[..buf.len() - 1];
            let parsed = match chain::parse_line(line) {
                Ok(p) => p,
                Err(e) => {
                    report.damage =
                        Some(damage(DamageKind::Edited, loose_seq(line), e.to_string()));
                    break 'files;
                }
            };
            let rec = &parsed.record;
            if !parsed.intact() {
                report.damage = Some(damage(
                    DamageKind::Edited,
                    Some(rec.seq),
                    "hash mismatch: the record's content is not what was sealed".into(),
                ));
                break 'files;
            }
            // The link to the record before.
            match last {
                None => {
                    if rec.seq == 1 && rec.prev != GENESIS {
                        report.damage = Some(damage(
                            DamageKind::Edited,
                            Some(1),
                            "seq 1 does not start a chain (prev is not zero)".into(),
                        ));
                        break 'files;
                    }
                    if rec.seq != 1 {
                        report.notes.push(format!(
                            "the chain starts at seq {} ({}:{}): earlier records were rotated \
                             away or not given; its link to seq {} is not checked",
                            rec.seq,
                            path.display(),
                            ln,
                            rec.seq.saturating_sub(1)
                        ));
                    }
                }
                Some(l) if rec.prev == l.hash && rec.seq == l.seq + 1 => {}
                Some(l) => {
                    let (kind, detail) = classify_break(&files, fi, ln, rec, l)?;
                    report.damage = Some(damage(kind, Some(rec.seq), detail));
                    break 'files;
                }
            }
            // Checkpoints.
            if let Some(cp) = &rec.checkpoint {
                report.checkpoints += 1;
                let consistent = cp.seq.checked_add(1) == Some(rec.seq)
                    && ChainHash::from_hex(&cp.hash) == Some(rec.prev);
                if !consistent {
                    report.damage = Some(damage(
                        DamageKind::Edited,
                        Some(rec.seq),
                        "the checkpoint does not sign the record before it".into(),
                    ));
                    break 'files;
                }
                if let Some(key) = &opts.pubkey {
                    if !checkpoint::signature_valid(key, cp) {
                        report.damage = Some(damage(
                            DamageKind::BadSignature,
                            Some(rec.seq),
                            format!(
                                "the checkpoint signature over seq {} does not verify with the \
                                 given public key",
                                cp.seq
                            ),
                        ));
                        break 'files;
                    }
                    report.checkpoints_verified += 1;
                }
            }
            // The anchor's points, where they are in the chain.
            if let Some(a) = &anchor {
                let anchored =
                    if let Some(cp) = a.checkpoint.as_ref().filter(|cp| cp.seq == rec.seq) {
                        ChainHash::from_hex(&cp.hash)
                    } else if rec.seq == a.record_seq {
                        Some(a.record_hash)
                    } else {
                        None
                    };
                if let Some(h) = anchored
                    && h != rec.hash
                {
                    report.damage = Some(damage(
                        DamageKind::Edited,
                        Some(rec.seq),
                        format!(
                            "differs from the record {} vouches for (a rewritten chain)",
                            a.describe()
                        ),
                    ));
                    break 'files;
                }
            }
            if rec.is_recovered_truncation() {
                recovered.push(format!(
                    "{}:{} seq {}: recovered_truncation: the agent cut {} torn bytes off the \
                     end at start (a crash during a write); the chain continues from seq {}",
                    path.display(),
                    ln,
                    rec.seq,
                    rec.truncated_bytes
                        .map_or_else(|| "?".into(), |n| n.to_string()),
                    rec.seq.saturating_sub(1)
                ));
            }
            // The wall clock may step (the writer records a clock_step): seq orders the
            // chain, so a backwards ts is a notice, not damage.
            if rec.is_audit(lifecycle::CLOCK_STEP) {
                report.clock_steps += 1;
                steps.push(format!(
                    "{}:{} seq {}: clock_step: the wall clock moved {:+.3} s beyond the \
                     monotonic clock",
                    path.display(),
                    ln,
                    rec.seq,
                    rec.clock_step_us.unwrap_or(0) as f64 / 1e6
                ));
            }
            if let Ok(ts) = rec.ts.parse::<jiff::Timestamp>() {
                if let Some(before) = last_ts
                    && before.as_microsecond() - ts.as_microsecond() > BACKWARDS_NOTICE_US
                {
                    report.ts_steps_back += 1;
                    if report.ts_steps_back <= MAX_STEP_NOTES {
                        steps.push(format!(
                            "{}:{} seq {}: ts goes back {:.3} s ({} after {}); records are \
                             ordered by seq",
                            path.display(),
                            ln,
                            rec.seq,
                            (before.as_microsecond() - ts.as_microsecond()) as f64 / 1e6,
                            rec.ts,
                            before
                        ));
                    }
                }
                last_ts = Some(ts);
            }
            report.records += 1;
            if let Some(of) = rec.outcome_of {
                report.outcomes += 1;
                if of >= rec.seq {
                    report.notes.push(format!(
                        "seq {}: an outcome record of seq {of}, which is not before it",
                        rec.seq
                    ));
                }
            }
            report.first_seq.get_or_insert(rec.seq);
            report.last_seq = Some(rec.seq);
            last = Some(Last {
                seq: rec.seq,
                hash: rec.hash,
                file: fi,
                line: ln,
            });
        }
    }
    report.notes.extend(recovered);
    if report.ts_steps_back > MAX_STEP_NOTES {
        steps.push(format!(
            "ts goes back by more than 1 s at {} records in all",
            report.ts_steps_back
        ));
    }
    report.notes.extend(steps);
    if report.damage.is_some() {
        return Ok(report);
    }
    if let Some(a) = bad_anchor {
        report.damage = Some(Damage {
            file: a.source.clone(),
            line: a.line,
            seq: Some(a.record_seq),
            expected_seq: a.record_seq,
            kind: DamageKind::BadSignature,
            detail: "the anchor's checkpoint signature does not verify with the given public key"
                .into(),
        });
        return Ok(report);
    }
    let end_seq = last.map_or(0, |l| l.seq);
    match &anchor {
        Some(a) if end_seq < a.record_seq => {
            let first = report.first_seq.unwrap_or(1);
            if first > a.record_seq {
                report.notes.push(format!(
                    "the anchor in {} covers seq {}, before the first record given; not checked",
                    a.source.display(),
                    a.record_seq
                ));
            } else {
                let (fi, ln) = last_line;
                report.damage = Some(Damage {
                    file: files.get(fi).cloned().unwrap_or_default(),
                    line: ln + 1,
                    seq: None,
                    expected_seq: end_seq + 1,
                    kind: DamageKind::Truncated,
                    detail: format!(
                        "the chain ends at seq {end_seq}, but {} (line {}) covers seq {}: \
                         records {}..={} were removed from the end",
                        a.describe(),
                        a.line,
                        a.record_seq,
                        end_seq + 1,
                        a.record_seq
                    ),
                });
            }
        }
        Some(a) => report.notes.push(format!(
            "tail checked against {} (seq {}); records after it are protected by the hash \
             chain only",
            a.describe(),
            a.record_seq
        )),
        None => report.notes.push(format!(
            "verified up to seq {end_seq}; tail truncation is detectable only against an anchor \
             (a signed checkpoint or an agent_stopping record; none found: no FILE.anchor, no \
             --anchor)"
        )),
    }
    if anchor.as_ref().is_some_and(|a| a.checkpoint.is_some()) && opts.pubkey.is_none() {
        report
            .notes
            .push("the anchor's signature was not checked (no --pubkey)".into());
    }
    Ok(report)
}

/// Why record `rec` (at `files[fi]:ln`) does not link to `l`.
fn classify_break(
    files: &[PathBuf],
    fi: usize,
    ln: u64,
    rec: &StoredRecord,
    l: Last,
) -> Result<(DamageKind, String), VerifyError> {
    let here = |f: usize, line: u64| format!("{}:{}", files[f].display(), line);
    if rec.prev == l.hash {
        return Ok((
            DamageKind::Edited,
            format!(
                "seq {} links to seq {} ({}) but does not follow it",
                rec.seq,
                l.seq,
                here(l.file, l.line)
            ),
        ));
    }
    if let Some((f, line, seq)) = find_later(files, fi, ln, &rec.prev)? {
        return Ok((
            DamageKind::Reordered,
            format!(
                "its predecessor (seq {seq}) comes later, at {}",
                here(f, line)
            ),
        ));
    }
    if l.file != fi {
        if rec.seq > l.seq + 1 {
            return Ok((
                DamageKind::Deleted,
                format!(
                    "seq {}..={} are missing between {} and {} (a rotated file may be missing)",
                    l.seq + 1,
                    rec.seq - 1,
                    files[l.file].display(),
                    files[fi].display()
                ),
            ));
        }
        return Ok((
            DamageKind::Spliced,
            format!(
                "the file does not continue the chain of {} (its last record is seq {} at line {})",
                files[l.file].display(),
                l.seq,
                l.line
            ),
        ));
    }
    if rec.seq <= l.seq {
        return Ok((
            DamageKind::Reordered,
            format!("seq goes backwards: seq {} after seq {}", rec.seq, l.seq),
        ));
    }
    if rec.seq > l.seq + 1 {
        let missing = if rec.seq == l.seq + 2 {
            format!("seq {} is missing", l.seq + 1)
        } else {
            format!("seq {}..={} are missing", l.seq + 1, rec.seq - 1)
        };
        return Ok((DamageKind::Deleted, missing));
    }
    Ok((
        DamageKind::Edited,
        format!(
            "prev does not match the hash of seq {} ({}): that record was altered and rehashed",
            l.seq,
            here(l.file, l.line)
        ),
    ))
}

/// The first record after `files[fi]:ln` whose hash is `target`: (file, line, seq).
fn find_later(
    files: &[PathBuf],
    fi: usize,
    ln: u64,
    target: &ChainHash,
) -> Result<Option<(usize, u64, u64)>, VerifyError> {
    let needle = format!("\"hash\":\"{}\"", target.to_hex());
    for (f, path) in files.iter().enumerate().skip(fi) {
        let io_err = |source| VerifyError::Io {
            path: path.clone(),
            error: source,
        };
        let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
        let mut buf = Vec::new();
        let mut line = 0u64;
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
                break;
            }
            line += 1;
            if f == fi && line <= ln {
                continue;
            }
            if memfind(&buf, needle.as_bytes())
                && let Ok(p) = chain::parse_line(buf.strip_suffix(b"\n").unwrap_or(&buf))
                && p.record.hash == *target
            {
                return Ok(Some((f, line, p.record.seq)));
            }
        }
    }
    Ok(None)
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The `seq` of a line that is not a valid record, if it has one.
fn loose_seq(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    if let Ok(s) = serde_json::from_slice::<Seq>(line) {
        return Some(s.seq);
    }
    // A torn line: digits after `{"seq":`.
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits: Vec<u8> = rest
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    if digits.is_empty() || digits.len() == rest.len() {
        return None;
    }
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// The newest checkpoint in the anchor files (given, and `BASE.anchor` next to the files).
fn load_anchor(opts: &VerifyOptions, files: &[PathBuf]) -> Result<Option<Anchor>, VerifyError> {
    let mut sources: Vec<(PathBuf, bool)> =
        opts.anchors.iter().map(|p| (p.clone(), true)).collect();
    // Only next to a live file: an old rotated file alone is legitimately behind it.
    for f in files.iter().filter(|f| !sink::is_rotated_name(f)) {
        let anchor = sink::with_suffix(f, ".anchor");
        if anchor.is_file() && !sources.iter().any(|(p, _)| *p == anchor) {
            sources.push((anchor, false));
        }
    }
    let mut best: Option<Anchor> = None;
    for (path, explicit) in sources {
        let found = read_checkpoints(&path)?;
        if found.is_empty() && explicit {
            return Err(VerifyError::NoCheckpoint { path });
        }
        for a in found {
            if best.as_ref().is_none_or(|b| a.record_seq > b.record_seq) {
                best = Some(a);
            }
        }
    }
    Ok(best)
}

fn read_checkpoints(path: &Path) -> Result<Vec<Anchor>, VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: path.into(),
        error: source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
    let mut buf = Vec::new();
    let mut line = 0u64;
    let mut out = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
            break;
        }
        line += 1;
        let trimmed = buf.trim_ascii();
        // Journal exports may prefix lines; take the record from the first `{`.
        let Some(open) = trimmed.iter().position(|&b| b == b'{') else {
            continue;
        };
        let Ok(p) = chain::parse_line(&trimmed[open..]) else {
            continue;
        };
        if !p.intact() {
            continue;
        }
        if p.record.checkpoint.is_some() || p.record.is_audit(lifecycle::AGENT_STOPPING) {
            out.push(Anchor {
                source: path.into(),
                line,
                checkpoint: p.record.checkpoint,
                record_seq: p.record.seq,
                record_hash: p.record.hash,
            });
        }
    }
    Ok(out)
}
