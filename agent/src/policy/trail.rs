//! The audit trail as the offline policy tools read it (`policy unused`, `policy suggest`):
//! every audit file given and its rotated files, line by line, with the records at or
//! after a `--since` time handed to the caller one by one.
//!
//! A line that is not a record is never skipped silently. The last line of a file that
//! does not end in a newline is a *torn tail* (an agent killed mid-write; the agent cuts it
//! at its next start): a [`Finding::Torn`]. Any other such line is [`Finding::Garbage`]:
//! the file was damaged or edited. Both name file and line; the caller decides whether a
//! finding is a warning or an error. The hash chain is `audit verify`'s job, not this one.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::audit::chain::{self, StoredRecord};
use crate::audit::sink;

/// Why the audit files cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrailError {
    /// An audit file cannot be read.
    #[error("{}: cannot read audit records: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// A line that is not a record, or a file without records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The last line of the file, without its newline, is not a record.
    Torn {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
    },
    /// A line that is not a record (not the torn tail).
    Garbage {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parser's message.
        reason: String,
    },
    /// The file holds no record at all.
    Empty {
        /// The file.
        file: PathBuf,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Torn { file, line } => write!(
                f,
                "{}:{line}: not an audit record (a torn last line: the agent stopped \
                 mid-write), skipped",
                file.display()
            ),
            Finding::Garbage { file, line, reason } => write!(
                f,
                "{}:{line}: not an audit record ({reason})",
                file.display()
            ),
            Finding::Empty { file } => write!(f, "{}: no audit records", file.display()),
        }
    }
}

/// What a read saw besides the records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The files read, in reading order.
    pub files: Vec<PathBuf>,
    /// Records parsed (before the `since` filter).
    pub records: u64,
    /// Records before `since`, not handed over.
    pub before_since: u64,
    /// Lines that are not records, files without records.
    pub findings: Vec<Finding>,
}

impl Summary {
    /// The first line that is neither a record nor a torn tail.
    pub fn garbage(&self) -> Option<&Finding> {
        self.findings
            .iter()
            .find(|f| matches!(f, Finding::Garbage { .. }))
    }
}

/// Reads each audit file of `from` and its rotated files (oldest first) and hands every
/// record at or after `since` to `each` (a record whose time does not parse is handed
/// over too: the window cannot exclude what it cannot place).
pub fn read(
    from: &[PathBuf],
    since: Option<jiff::Timestamp>,
    mut each: impl FnMut(StoredRecord),
) -> Result<Summary, TrailError> {
    let mut summary = Summary::default();
    for base in from {
        if !base.exists() {
            return Err(TrailError::Read {
                path: base.clone(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let files = sink::rotated_set(base).map_err(|source| TrailError::Read {
            path: base.clone(),
            source,
        })?;
        for file in files {
            let bytes = std::fs::read(&file).map_err(|source| TrailError::Read {
                path: file.clone(),
                source,
            })?;
            let mut records = 0usize;
            let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
            let last = lines.len().saturating_sub(1);
            for (i, line) in lines.iter().enumerate() {
                if line.is_empty() {
                    continue;
                }
                let parsed = match chain::parse_line(line) {
                    Ok(parsed) => parsed,
                    // No newline after it: the last line of the file, torn.
                    Err(_) if i == last => {
                        summary.findings.push(Finding::Torn {
                            file: file.clone(),
                            line: i + 1,
                        });
                        continue;
                    }
                    Err(e) => {
                        summary.findings.push(Finding::Garbage {
                            file: file.clone(),
                            line: i + 1,
                            reason: e.to_string(),
                        });
                        continue;
                    }
                };
                records += 1;
                summary.records += 1;
                let r = parsed.record;
                if let Some(since) = since
                    && r.ts.parse::<jiff::Timestamp>().is_ok_and(|ts| ts < since)
                {
                    summary.before_since += 1;
                    continue;
                }
                each(r);
            }
            if records == 0 {
                summary.findings.push(Finding::Empty { file: file.clone() });
            }
            summary.files.push(file);
        }
    }
    Ok(summary)
}
