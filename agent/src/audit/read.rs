//! Reading audit files for the offline tools (`policy unused`, `audit report`): each base
//! path stands for its rotated set (oldest first); every line that is not an audit record
//! is named (`file:line`) in a warning and skipped, never silently dropped, and a file
//! with no record at all is a warning too. Chain integrity is `audit verify`'s business;
//! this reader only parses.
#![forbid(unsafe_code)]

use std::{
    io,
    path::{Path, PathBuf},
};

use super::{chain, chain::StoredRecord, sink};

/// Errors reading audit files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// A file (or its rotated set) cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// The records of a set of audit files.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Every record, in file order.
    pub records: Vec<StoredRecord>,
    /// The files read (rotated ones included), in order.
    pub files: Vec<PathBuf>,
    /// Lines skipped and empty files, `file:line: …`.
    pub warnings: Vec<String>,
}

/// Reads every record of the rotated sets of `bases`, in order.
pub fn read_sets(bases: &[PathBuf]) -> Result<Loaded, ReadError> {
    let mut out = Loaded::default();
    for base in bases {
        if !base.exists() {
            return Err(ReadError::Io {
                path: base.clone(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let files = sink::rotated_set(base).map_err(|source| ReadError::Io {
            path: base.clone(),
            source,
        })?;
        for file in files {
            read_file(&file, &mut out)?;
        }
    }
    Ok(out)
}

fn read_file(file: &Path, out: &mut Loaded) -> Result<(), ReadError> {
    let bytes = std::fs::read(file).map_err(|source| ReadError::Io {
        path: file.to_owned(),
        source,
    })?;
    out.files.push(file.to_owned());
    let before = out.records.len();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        match chain::parse_line(line) {
            Ok(parsed) => out.records.push(parsed.record),
            Err(_) => out.warnings.push(format!(
                "{}:{}: not an audit record, skipped",
                file.display(),
                i + 1
            )),
        }
    }
    if out.records.len() == before {
        out.warnings
            .push(format!("{}: no audit records", file.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn garbage_lines_and_empty_files_are_named_and_a_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("audit.jsonl");
        std::fs::write(&base, "not json\n{\"half\": \n\n").unwrap();
        let loaded = read_sets(std::slice::from_ref(&base)).unwrap();
        assert!(loaded.records.is_empty());
        assert_eq!(loaded.files, vec![base.clone()]);
        let file = base.display();
        assert_eq!(
            loaded.warnings,
            vec![
                format!("{file}:1: not an audit record, skipped"),
                format!("{file}:2: not an audit record, skipped"),
                format!("{file}: no audit records"),
            ]
        );
        let missing = dir.path().join("nope.jsonl");
        let err = read_sets(std::slice::from_ref(&missing)).unwrap_err();
        assert!(
            err.to_string().starts_with(&missing.display().to_string()),
            "{err}"
        );
    }
}
