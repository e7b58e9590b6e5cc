//! `query` and `tail`: filter audit records and print them as aligned columns or JSON.
#![forbid(unsafe_code)]

use std::{
    collections::VecDeque,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};

use super::{
    Decision,
    chain::{self, StoredRecord},
    sink,
};

/// Which records to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this workload.
    pub workload: Option<String>,
    /// Only this decision.
    pub decision: Option<Decision>,
    /// Only records at or after this time.
    pub since: Option<Timestamp>,
    /// Only records before this time.
    pub until: Option<Timestamp>,
    /// Only this destination: host name or IP (case-insensitive), optionally `:port`.
    pub dst: Option<String>,
    /// Only this rule id.
    pub rule: Option<String>,
}

impl Filter {
    /// Whether `r` passes.
    pub fn matches(&self, r: &StoredRecord) -> bool {
        if let Some(w) = &self.workload
            && r.workload.as_deref() != Some(w.as_str())
        {
            return false;
        }
        if self.decision.is_some_and(|d| d != r.decision) {
            return false;
        }
        if let Some(rule) = &self.rule
            && r.rule.as_deref() != Some(rule.as_str())
        {
            return false;
        }
        if let Some(dst) = &self.dst
            && !dst_matches(dst, r)
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Ok(ts) = r.ts.parse::<Timestamp>() else {
                return false;
            };
            if self.since.is_some_and(|s| ts < s) || self.until.is_some_and(|u| ts >= u) {
                return false;
            }
        }
        true
    }
}

fn dst_matches(want: &str, r: &StoredRecord) -> bool {
    let (name, port) = match want.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') || n.starts_with('[') => {
            (n.trim_matches(['[', ']']), p.parse::<u16>().ok())
        }
        _ => (want, None),
    };
    if port.is_some_and(|p| r.dst.port != Some(p)) {
        return false;
    }
    [&r.dst.host, &r.dst.ip]
        .into_iter()
        .flatten()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// Parses a point in time: RFC 3339 (`2026-11-22T10:00:00Z`), or a duration before `now`
/// (`90s`, `15m`, `1h`, `2d`, `1h30m`, `1w`).
pub fn parse_time(s: &str, now: Timestamp) -> Result<Timestamp, String> {
    let s = s.trim();
    if let Ok(ts) = s.parse::<Timestamp>() {
        return Ok(ts);
    }
    let ago = parse_ago(s).ok_or_else(|| {
        format!("`{s}` is neither an RFC 3339 time nor a duration like 90s, 15m, 1h, 2d")
    })?;
    now.checked_sub(ago).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_ago(s: &str) -> Option<SignedDuration> {
    let mut total: i64 = 0;
    let mut digits = String::new();
    let mut any = false;
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: i64 = digits.parse().ok()?;
        digits.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
        any = true;
    }
    if !digits.is_empty() || !any {
        return None;
    }
    Some(SignedDuration::from_secs(total))
}

/// Column header of the table.
pub fn header() -> String {
    row_cells(
        "SEQ",
        "TIME",
        "WORKLOAD",
        "DECISION",
        "STATUS",
        "METHOD",
        "DESTINATION",
        "PATH",
        "RULE/REASON",
        false,
    )
}

/// One record as a table row (deny in red when `color`).
pub fn format_row(r: &StoredRecord, color: bool) -> String {
    let dst = match (&r.dst.host, &r.dst.ip, r.dst.port) {
        (Some(h), _, Some(p)) | (None, Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), _, None) | (None, Some(h), None) => h.clone(),
        (None, None, _) => "-".into(),
    };
    let what = match (&r.rule, &r.reason) {
        (Some(rule), Some(reason)) => format!("{rule} / {reason}"),
        (Some(x), None) | (None, Some(x)) => x.clone(),
        (None, None) => "-".into(),
    };
    let what = match (r.count, r.truncated_bytes, r.outcome_of) {
        (Some(n), _, _) => format!("{what} (x{n})"),
        (_, Some(n), _) => format!("{what} ({n} bytes)"),
        (_, _, Some(seq)) => format!("{what} (outcome of {seq})"),
        _ => what,
    };
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    row_cells(
        &r.seq.to_string(),
        &r.ts,
        &dash(&r.workload),
        r.decision.as_str(),
        &r.status.map_or_else(|| "-".into(), |s| s.to_string()),
        &dash(&r.method),
        &dst,
        &dash(&r.path),
        &what,
        color && r.decision == Decision::Deny,
    )
}

#[allow(clippy::too_many_arguments, reason = "one argument per column")]
fn row_cells(
    seq: &str,
    ts: &str,
    workload: &str,
    decision: &str,
    status: &str,
    method: &str,
    dst: &str,
    path: &str,
    what: &str,
    red: bool,
) -> String {
    let decision = if red {
        format!("\x1b[31m{}\x1b[0m", fit(decision, 10))
    } else {
        fit(decision, 10)
    };
    format!(
        "{:>8} {} {} {} {} {} {} {} {}",
        clip(seq, 8),
        fit(ts, 27),
        fit(workload, 16),
        decision,
        fit(status, 6),
        fit(method, 7),
        fit(dst, 32),
        fit(path, 40),
        what
    )
    .trim_end()
    .to_owned()
}

/// `s` cut to `width` characters (with `…`).
fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// `s` cut or padded to exactly `width` characters.
fn fit(s: &str, width: usize) -> String {
    let s = clip(s, width);
    let pad = width.saturating_sub(s.chars().count());
    format!("{s}{}", " ".repeat(pad))
}

/// Errors of query and tail.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(io::Error),
}

/// What a query found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryStats {
    /// Records printed.
    pub matched: u64,
    /// Lines that are not records (skipped; run `verify`).
    pub unreadable: u64,
}

/// Prints the records of `files` (base paths expand to their rotated sets) that pass
/// `filter`: the stored lines as they are with `json`, else a table.
pub fn query(
    files: &[PathBuf],
    filter: &Filter,
    json: bool,
    color: bool,
    out: &mut dyn Write,
) -> Result<QueryStats, QueryError> {
    let files = sink::expand_paths(files).map_err(|source| QueryError::Io {
        path: files.first().cloned().unwrap_or_default(),
        error: source,
    })?;
    let mut stats = QueryStats::default();
    if !json {
        writeln!(out, "{}", header()).map_err(QueryError::Output)?;
    }
    for path in &files {
        let io_err = |source| QueryError::Io {
            path: path.clone(),
            error: source,
        };
        let mut reader = BufReader::with_capacity(1 << 16, File::open(path).map_err(io_err)?);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
                break;
            }
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let Ok(r) = serde_json::from_slice::<StoredRecord>(line) else {
                stats.unreadable += 1;
                continue;
            };
            if !filter.matches(&r) {
                continue;
            }
            stats.matched += 1;
            if json {
                out.write_all(line)
                    .and_then(|()| out.write_all(b"\n"))
                    .map_err(QueryError::Output)?;
            } else {
                writeln!(out, "{}", format_row(&r, color)).map_err(QueryError::Output)?;
            }
        }
    }
    Ok(stats)
}

/// Where `tail` reads.
#[derive(Clone, Debug)]
pub enum TailSource {
    /// A file (followed across rotation with `follow`).
    File(PathBuf),
    /// Standard input (e.g. `journalctl -o cat -f -u scopegate | scopegate audit tail`).
    Stdin,
}

/// How often `tail -f` looks for new lines.
const POLL: Duration = Duration::from_millis(200);

/// Prints the last `lines` records that pass `filter`, then (with `follow`) new ones as
/// they arrive, until `stop` returns true; follows the file across rotation.
pub fn tail(
    source: &TailSource,
    lines: usize,
    filter: &Filter,
    follow: bool,
    color: bool,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<(), QueryError> {
    writeln!(out, "{}", header()).map_err(QueryError::Output)?;
    let path = match source {
        TailSource::Stdin => {
            return tail_stdin(lines, filter, follow, color, out);
        }
        TailSource::File(p) => p.clone(),
    };
    let io_err = |source| QueryError::Io {
        path: path.clone(),
        error: source,
    };
    let mut file = File::open(&path).map_err(io_err)?;
    let mut last = VecDeque::with_capacity(lines.min(4096));
    let mut partial = Vec::new();
    let mut pos = read_new(&mut file, 0, &mut partial, &mut |line| {
        if let Some(r) = parse(line)
            && filter.matches(&r)
        {
            if last.len() == lines {
                last.pop_front();
            }
            if lines > 0 {
                last.push_back(r);
            }
        }
    })
    .map_err(io_err)?;
    for r in &last {
        writeln!(out, "{}", format_row(r, color)).map_err(QueryError::Output)?;
    }
    out.flush().map_err(QueryError::Output)?;
    if !follow {
        return Ok(());
    }
    let mut ino = file.metadata().map_err(io_err)?.ino();
    let mut failed = None;
    while !stop() {
        std::thread::sleep(POLL);
        let mut emit = |line: &[u8]| {
            if let Some(r) = parse(line)
                && filter.matches(&r)
                && let Err(e) = writeln!(out, "{}", format_row(&r, color))
            {
                failed.get_or_insert(e);
            }
        };
        pos = read_new(&mut file, pos, &mut partial, &mut emit).map_err(io_err)?;
        // Rotated (a new file at the path) or truncated: read the rest of the old one
        // (done above), then start over with the new one.
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() != ino || m.len() < pos => {
                if let Ok(f) = File::open(&path) {
                    file = f;
                    ino = m.ino();
                    pos = 0;
                    partial.clear();
                    pos = read_new(&mut file, pos, &mut partial, &mut emit).map_err(io_err)?;
                }
            }
            _ => {}
        }
        if let Some(e) = failed.take() {
            return Err(QueryError::Output(e));
        }
        out.flush().map_err(QueryError::Output)?;
    }
    Ok(())
}

fn tail_stdin(
    lines: usize,
    filter: &Filter,
    follow: bool,
    color: bool,
    out: &mut dyn Write,
) -> Result<(), QueryError> {
    let stdin = io::stdin();
    let mut reader = stdin.lock();
    let mut last = VecDeque::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| QueryError::Io {
                path: "-".into(),
                error: source,
            })?;
        if n == 0 {
            break;
        }
        let Some(r) = parse(buf.strip_suffix(b"\n").unwrap_or(&buf)) else {
            continue;
        };
        if !filter.matches(&r) {
            continue;
        }
        if follow {
            writeln!(out, "{}", format_row(&r, color)).map_err(QueryError::Output)?;
            out.flush().map_err(QueryError::Output)?;
        } else {
            if last.len() == lines {
                last.pop_front();
            }
            if lines > 0 {
                last.push_back(r);
            }
        }
    }
    for r in &last {
        writeln!(out, "{}", format_row(r, color)).map_err(QueryError::Output)?;
    }
    Ok(())
}

/// A record from a line; journal exports may prefix it, so it starts at the first `{`.
fn parse(line: &[u8]) -> Option<StoredRecord> {
    let open = line.iter().position(|&b| b == b'{')?;
    serde_json::from_slice(&line[open..]).ok()
}

/// Reads from `pos` to the end, calling `each` per complete line; keeps a partial last
/// line in `partial`. Returns the new position.
fn read_new(
    file: &mut File,
    pos: u64,
    partial: &mut Vec<u8>,
    each: &mut dyn FnMut(&[u8]),
) -> io::Result<u64> {
    file.seek(SeekFrom::Start(pos))?;
    let mut chunk = vec![0u8; 1 << 16];
    let mut pos = pos;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            return Ok(pos);
        }
        pos += n as u64;
        partial.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(i) = partial[start..].iter().position(|&b| b == b'\n') {
            each(&partial[start..start + i]);
            start += i + 1;
        }
        partial.drain(..start);
    }
}

/// One value per decision: each outcome record (`outcome_of`) is folded into the decision
/// record it completes, which then carries the outcome's `status`, `bytes_up`,
/// `bytes_down`, `latency_us` and `dns` (a DNS query's answer: rcode and addresses) where
/// the outcome has them, and the whole outcome record
/// under `"outcome"`. An outcome whose decision is not among `records` (rotated away, or
/// cut), whose `request_id` differs from its decision's, or that comes second for the same
/// decision is kept as a value of its own, so a count of the result shows it. For tools and
/// tests that read JSON lines.
pub fn fold_outcomes(records: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = Vec::with_capacity(records.len());
    let mut by_seq = std::collections::HashMap::new();
    for record in records {
        let Some(of) = record.get("outcome_of").and_then(serde_json::Value::as_u64) else {
            if let Some(seq) = record.get("seq").and_then(serde_json::Value::as_u64) {
                by_seq.insert(seq, out.len());
            }
            out.push(record);
            continue;
        };
        let decision = by_seq.get(&of).and_then(|&i| out.get_mut(i)).filter(|d| {
            d.get("outcome").is_none() && d.get("request_id") == record.get("request_id")
        });
        let Some(serde_json::Value::Object(decision)) = decision else {
            out.push(record);
            continue;
        };
        for key in ["status", "bytes_up", "bytes_down", "latency_us", "dns"] {
            if let Some(v) = record.get(key).filter(|v| !v.is_null()) {
                decision.insert(key.into(), v.clone());
            }
        }
        decision.insert("outcome".into(), record);
    }
    out
}

/// Reads every record of `path` (for tests and tools).
pub fn read_records(path: &Path) -> io::Result<Vec<StoredRecord>> {
    let text = std::fs::read(path)?;
    Ok(text
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| chain::parse_line(l).ok().map(|p| p.record))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_times() {
        let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
        assert_eq!(
            parse_time("1h", now).unwrap(),
            "2026-11-22T09:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_time("1h30m", now).unwrap(),
            "2026-11-22T08:30:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_time("2d", now).unwrap(),
            "2026-11-20T10:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert_eq!(
            parse_time("2026-11-01T00:00:00Z", now).unwrap(),
            "2026-11-01T00:00:00Z".parse::<Timestamp>().unwrap()
        );
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("5", now).is_err());
    }

    #[test]
    fn columns_align_and_clip() {
        let h = header();
        let mut r: StoredRecord = serde_json::from_value(serde_json::json!({
            "seq": 12, "ts": "2026-11-22T10:00:00.123456Z", "host": "h",
            "workload": "a-very-long-workload-name-indeed", "cgroup": null, "pid": 1, "uid": 0,
            "exe": null, "dst": {"host": "api.example.com", "ip": "192.0.2.7", "port": 443},
            "proto": "http", "method": "POST", "path": "/v1/charges", "rule": null,
            "decision": "deny", "reason": "path_not_allowed", "origin": "policy", "status": 403,
            "bytes_up": null, "bytes_down": null, "latency_us": 10, "request_id": "r",
            "prev": "0".repeat(64), "hash": "0".repeat(64)
        }))
        .unwrap();
        let plain = format_row(&r, false);
        let at = |s: &str, col: &str| s[..s.find(col).unwrap()].chars().count();
        assert_eq!(at(&h, "DECISION"), at(&plain, "deny"));
        assert_eq!(at(&h, "DESTINATION"), at(&plain, "api.example.com:443"));
        assert!(plain.contains("a-very-long-wor…"), "{plain}");
        let red = format_row(&r, true);
        assert!(red.contains("\x1b[31mdeny"), "{red}");
        r.decision = Decision::Allow;
        assert!(!format_row(&r, true).contains('\x1b'));
    }
}
