//! Policy loading errors.
//!
//! Every error names the file, the 1-based line and column of the offending value, the
//! value itself and the reason, and displays as `{file}:{line}:{col}: {message}`.
//!
//! Validation in `model` runs on deserialised values and does not know positions: it
//! builds errors with an empty `file`, line and column 0, and a `path` relative to the
//! value it validated. Callers prefix the path ([`PolicyError::nested`]) as the error
//! travels up, and the loader fills in the file and position
//! ([`PolicyError::located`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::position::{PositionIndex, join};

/// Builds a validation error whose file and position the loader fills in later.
macro_rules! invalid {
    ($variant:ident { $($fields:tt)* }) => {
        $crate::policy::error::PolicyError::$variant {
            file: ::std::path::PathBuf::new(),
            line: 0,
            col: 0,
            $($fields)*
        }
    };
}
pub(crate) use invalid;

/// One problem with the policy directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The policy directory cannot be listed.
    #[error("{dir}: cannot read policy directory: {source}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A policy file cannot be read (or is not UTF-8).
    #[error("{file}: cannot read policy file: {source}")]
    ReadFile {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The file is not well-formed YAML.
    #[error("{file}:{line}:{col}: malformed YAML: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// The YAML parser's message.
        message: String,
    },
    /// The file does not fit the schema: unknown field, missing field, wrong type.
    #[error("{file}:{line}:{col}: {message}")]
    Schema {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// The deserialiser's message, starting with the path of the value.
        message: String,
    },
    /// The file holds no YAML document.
    #[error("{file}:{line}:{col}: the file defines no workload")]
    EmptyFile {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
    },
    /// The file holds more than one YAML document.
    #[error(
        "{file}:{line}:{col}: a second YAML document; \
         write several workloads as a YAML list instead"
    )]
    MultipleDocuments {
        /// The file.
        file: PathBuf,
        /// 1-based line of the second document.
        line: usize,
        /// 1-based column.
        col: usize,
    },
    /// `workload:` is not a valid name.
    #[error(
        "{file}:{line}:{col}: {path}: {value:?} is not a valid workload name \
         (expected [a-z0-9][a-z0-9_-]*)"
    )]
    InvalidWorkloadName {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value, e.g. `workload` or `[1].workload`.
        path: String,
        /// The offending value.
        value: String,
    },
    /// `select:` does not have exactly one selector.
    #[error("{file}:{line}:{col}: {path}: {reason}")]
    InvalidSelector {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `select.cgroup` is not a valid cgroup path.
    #[error("{file}:{line}:{col}: {path}: {value:?} is not a valid cgroup path: {reason}")]
    InvalidCgroup {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `select.systemd_unit` is not a valid unit name.
    #[error("{file}:{line}:{col}: {path}: {value:?} is not a valid systemd unit: {reason}")]
    InvalidSystemdUnit {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `host:` is neither a valid DNS name nor an IP literal.
    #[error("{file}:{line}:{col}: {path}: {value:?} is not a valid host: {reason}")]
    InvalidHost {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `port:` is out of range.
    #[error("{file}:{line}:{col}: {path}: {value} is not a port (expected 1..=65535)")]
    InvalidPort {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: i64,
    },
    /// `rules:` is empty.
    #[error("{file}:{line}:{col}: {path}: a destination needs at least one rule")]
    NoRules {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
    },
    /// A rule `id:` is not valid.
    #[error(
        "{file}:{line}:{col}: {path}: {value:?} is not a valid rule id (expected [A-Za-z0-9_.-]+)"
    )]
    InvalidRuleId {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
    },
    /// `methods:` is empty.
    #[error("{file}:{line}:{col}: {path}: a rule needs at least one method")]
    NoMethods {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
    },
    /// An entry of `methods:` is not an uppercase HTTP method, or is repeated.
    #[error("{file}:{line}:{col}: {path}: {value:?} {reason}")]
    InvalidMethod {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong, phrased to follow the value.
        reason: &'static str,
    },
    /// `path:` is not a valid path pattern.
    #[error("{file}:{line}:{col}: {path}: {value:?} is not a valid path pattern: {reason}")]
    InvalidPathPattern {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// `path:` has a literal that request normalisation would change, so it could never
    /// match as written.
    #[error(
        "{file}:{line}:{col}: {path}: {value:?} is not in canonical form \
         (requests are matched as {canonical:?}); write {canonical:?}"
    )]
    NonCanonicalPath {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// The canonical spelling.
        canonical: String,
    },
    /// `select.uid` is not a valid uid.
    #[error("{file}:{line}:{col}: {path}: {value} is not a uid (expected 0..=4294967294)")]
    InvalidUid {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: i64,
    },
    /// `max_connections:` is out of range.
    #[error("{file}:{line}:{col}: {path}: {value} is not a valid connection limit (1 to 1000000)")]
    InvalidMaxConnections {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: i64,
    },
    /// `body_cap:` is not a valid size.
    #[error("{file}:{line}:{col}: {path}: {value:?} is not a valid body cap: {reason}")]
    InvalidBodyCap {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `rate:` is not a valid rate.
    #[error("{file}:{line}:{col}: {path}: {value:?} is not a valid rate: {reason}")]
    InvalidRate {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A regular expression (`pattern:` or a `{name:REGEX}` path segment) does not compile.
    #[error("{file}:{line}:{col}: {path}: {value:?} is not a valid regular expression: {reason}")]
    InvalidRegex {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending regular expression.
        value: String,
        /// The regex compiler's message.
        reason: String,
    },
    /// `when.timezone` names no zone of the tz database (or the database is unavailable).
    #[error(
        "{file}:{line}:{col}: {path}: {value:?} is not a time zone of the tz database ({reason})"
    )]
    UnknownTimeZone {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// jiff's message.
        reason: String,
    },
    /// `when.days` or `when.hours` has an invalid entry.
    #[error("{file}:{line}:{col}: {path}: {value:?} {reason}")]
    InvalidTimeWindow {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong, phrased to follow the value.
        reason: &'static str,
    },
    /// A matcher (`when`, `query`, `query_repeat`, `headers`, `json`, `path_params`) is
    /// inconsistent or names something invalid; the message names the value.
    #[error("{file}:{line}:{col}: {path}: {reason}")]
    InvalidMatcher {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// What is wrong, naming the offending value.
        reason: String,
    },
    /// An egress entry, L4 exception or DNS setting is malformed.
    #[error("{file}:{line}:{col}: {path}: {value:?}: {reason}")]
    InvalidEgress {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The offending value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two rules of one workload have the same id.
    #[error("{file}:{line}:{col}: {path}: rule id {id:?} is already used at {first}")]
    DuplicateRuleId {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the second id.
        path: String,
        /// The id.
        id: String,
        /// Logical path of the first id.
        first: String,
    },
    /// Two destinations of one workload have the same host and port.
    #[error("{file}:{line}:{col}: {path}: destination {host}:{port} is already defined at {first}")]
    DuplicateDestination {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the second destination's host.
        path: String,
        /// The host, as written in the second destination.
        host: String,
        /// The port.
        port: u16,
        /// Logical path of the first destination.
        first: String,
    },
    /// Two workloads have the same name.
    #[error(
        "{file}:{line}:{col}: {path}: workload {name:?} is already defined at \
         {first_file}:{first_line}:{first_col}"
    )]
    DuplicateWorkload {
        /// The file of the second definition.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The name.
        name: String,
        /// The file of the first definition.
        first_file: PathBuf,
        /// Its line.
        first_line: usize,
        /// Its column.
        first_col: usize,
    },
    /// Two workloads select the same cgroup or systemd unit.
    #[error(
        "{file}:{line}:{col}: {path}: {selector} is already selected by workload \
         {first_workload:?} at {first_file}:{first_line}:{first_col}"
    )]
    DuplicateSelector {
        /// The file of the second selector.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// Logical path of the value.
        path: String,
        /// The selector, e.g. `cgroup /system.slice/a.service`.
        selector: String,
        /// The workload that selected it first.
        first_workload: String,
        /// Its file.
        first_file: PathBuf,
        /// Its line.
        first_line: usize,
        /// Its column.
        first_col: usize,
    },
    /// More workloads than a [`WorkloadId`](super::WorkloadId) can number.
    #[error("{dir}: too many workloads ({count})")]
    TooManyWorkloads {
        /// The directory.
        dir: PathBuf,
        /// How many.
        count: usize,
    },
}

/// The mutable location fields of a validation error.
struct Site<'a> {
    file: &'a mut PathBuf,
    line: &'a mut usize,
    col: &'a mut usize,
    path: &'a mut String,
    /// Other logical paths in the message (the first occurrence of a duplicate).
    first: Option<&'a mut String>,
}

impl PolicyError {
    /// The file the error is in, if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::ReadDir { .. } | Self::TooManyWorkloads { .. } => None,
            Self::ReadFile { file, .. }
            | Self::Syntax { file, .. }
            | Self::Schema { file, .. }
            | Self::EmptyFile { file, .. }
            | Self::MultipleDocuments { file, .. }
            | Self::InvalidWorkloadName { file, .. }
            | Self::InvalidSelector { file, .. }
            | Self::InvalidCgroup { file, .. }
            | Self::InvalidSystemdUnit { file, .. }
            | Self::InvalidHost { file, .. }
            | Self::InvalidEgress { file, .. }
            | Self::InvalidPort { file, .. }
            | Self::NoRules { file, .. }
            | Self::InvalidRuleId { file, .. }
            | Self::NoMethods { file, .. }
            | Self::InvalidMethod { file, .. }
            | Self::InvalidPathPattern { file, .. }
            | Self::NonCanonicalPath { file, .. }
            | Self::InvalidUid { file, .. }
            | Self::InvalidBodyCap { file, .. }
            | Self::InvalidMaxConnections { file, .. }
            | Self::InvalidRate { file, .. }
            | Self::InvalidRegex { file, .. }
            | Self::UnknownTimeZone { file, .. }
            | Self::InvalidTimeWindow { file, .. }
            | Self::InvalidMatcher { file, .. }
            | Self::DuplicateRuleId { file, .. }
            | Self::DuplicateDestination { file, .. }
            | Self::DuplicateWorkload { file, .. }
            | Self::DuplicateSelector { file, .. } => Some(file),
        }
    }

    /// The 1-based line and column, for errors that point into a file.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            Self::ReadDir { .. } | Self::ReadFile { .. } | Self::TooManyWorkloads { .. } => None,
            Self::Syntax { line, col, .. }
            | Self::Schema { line, col, .. }
            | Self::EmptyFile { line, col, .. }
            | Self::MultipleDocuments { line, col, .. }
            | Self::InvalidWorkloadName { line, col, .. }
            | Self::InvalidSelector { line, col, .. }
            | Self::InvalidCgroup { line, col, .. }
            | Self::InvalidSystemdUnit { line, col, .. }
            | Self::InvalidHost { line, col, .. }
            | Self::InvalidEgress { line, col, .. }
            | Self::InvalidPort { line, col, .. }
            | Self::NoRules { line, col, .. }
            | Self::InvalidRuleId { line, col, .. }
            | Self::NoMethods { line, col, .. }
            | Self::InvalidMethod { line, col, .. }
            | Self::InvalidPathPattern { line, col, .. }
            | Self::NonCanonicalPath { line, col, .. }
            | Self::InvalidUid { line, col, .. }
            | Self::InvalidBodyCap { line, col, .. }
            | Self::InvalidMaxConnections { line, col, .. }
            | Self::InvalidRate { line, col, .. }
            | Self::InvalidRegex { line, col, .. }
            | Self::UnknownTimeZone { line, col, .. }
            | Self::InvalidTimeWindow { line, col, .. }
            | Self::InvalidMatcher { line, col, .. }
            | Self::DuplicateRuleId { line, col, .. }
            | Self::DuplicateDestination { line, col, .. }
            | Self::DuplicateWorkload { line, col, .. }
            | Self::DuplicateSelector { line, col, .. } => Some((*line, *col)),
        }
    }

    /// The logical path of the offending value, for validation errors.
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::InvalidWorkloadName { path, .. }
            | Self::InvalidSelector { path, .. }
            | Self::InvalidCgroup { path, .. }
            | Self::InvalidSystemdUnit { path, .. }
            | Self::InvalidHost { path, .. }
            | Self::InvalidEgress { path, .. }
            | Self::InvalidPort { path, .. }
            | Self::NoRules { path, .. }
            | Self::InvalidRuleId { path, .. }
            | Self::NoMethods { path, .. }
            | Self::InvalidMethod { path, .. }
            | Self::InvalidPathPattern { path, .. }
            | Self::NonCanonicalPath { path, .. }
            | Self::InvalidUid { path, .. }
            | Self::InvalidBodyCap { path, .. }
            | Self::InvalidMaxConnections { path, .. }
            | Self::InvalidRate { path, .. }
            | Self::InvalidRegex { path, .. }
            | Self::UnknownTimeZone { path, .. }
            | Self::InvalidTimeWindow { path, .. }
            | Self::InvalidMatcher { path, .. }
            | Self::DuplicateRuleId { path, .. }
            | Self::DuplicateDestination { path, .. }
            | Self::DuplicateWorkload { path, .. }
            | Self::DuplicateSelector { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The location fields of errors produced by validation before positions are known.
    #[rustfmt::skip]
    fn site(&mut self) -> Option<Site<'_>> {
        match self {
            Self::InvalidWorkloadName { file, line, col, path, .. }
            | Self::InvalidSelector { file, line, col, path, .. }
            | Self::InvalidCgroup { file, line, col, path, .. }
            | Self::InvalidSystemdUnit { file, line, col, path, .. }
            | Self::InvalidHost { file, line, col, path, .. }
            | Self::InvalidEgress { file, line, col, path, .. }
            | Self::InvalidPort { file, line, col, path, .. }
            | Self::NoRules { file, line, col, path }
            | Self::InvalidRuleId { file, line, col, path, .. }
            | Self::NoMethods { file, line, col, path }
            | Self::InvalidMethod { file, line, col, path, .. }
            | Self::InvalidPathPattern { file, line, col, path, .. }
            | Self::NonCanonicalPath { file, line, col, path, .. }
            | Self::InvalidUid { file, line, col, path, .. }
            | Self::InvalidBodyCap { file, line, col, path, .. }
            | Self::InvalidMaxConnections { file, line, col, path, .. }
            | Self::InvalidRate { file, line, col, path, .. }
            | Self::InvalidRegex { file, line, col, path, .. }
            | Self::UnknownTimeZone { file, line, col, path, .. }
            | Self::InvalidTimeWindow { file, line, col, path, .. }
            | Self::InvalidMatcher { file, line, col, path, .. } => {
                Some(Site { file, line, col, path, first: None })
            }
            Self::DuplicateRuleId { file, line, col, path, first, .. }
            | Self::DuplicateDestination { file, line, col, path, first, .. } => {
                Some(Site { file, line, col, path, first: Some(first) })
            }
            _ => None,
        }
    }

    /// Prefixes the logical path(s) of a validation error with `prefix`, as the error
    /// travels from a nested value up to its container.
    pub(crate) fn nested(mut self, prefix: &str) -> Self {
        if let Some(site) = self.site() {
            *site.path = join(prefix, site.path);
            if let Some(first) = site.first {
                *first = join(prefix, first);
            }
        }
        self
    }

    /// Fills in the file and the position of a validation error, whose path is relative
    /// to the document at `prefix` of `file`.
    pub(crate) fn located(self, file: &Path, prefix: &str, index: &PositionIndex) -> Self {
        let mut err = self.nested(prefix);
        if let Some(site) = err.site() {
            let pos = index.locate(site.path);
            *site.file = file.to_owned();
            *site.line = pos.line;
            *site.col = pos.col;
        }
        err
    }

    /// Sort key: file, line, column.
    fn sort_key(&self) -> (Option<&Path>, usize, usize) {
        let (line, col) = self.position().unwrap_or((0, 0));
        (self.file(), line, col)
    }
}

/// Something `policy check` reports that does not make the policy invalid (exit 2 under
/// `--strict`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyWarning {
    /// The directory holds no policy file.
    #[error(
        "{dir}: no policy files (*.yaml, *.yml): an agent loading this directory selects no workload (cgroups it already manages stay deny-all until `scopegate release`)"
    )]
    EmptyDirectory {
        /// The directory.
        dir: PathBuf,
    },
    /// An entry of the directory the agent does not read.
    #[error("{path}: ignored: {reason}")]
    Ignored {
        /// The entry.
        path: PathBuf,
        /// Why it is ignored.
        reason: &'static str,
    },
    /// A file given by name whose name the agent would not read in a directory.
    #[error(
        "{file}: checked, but not named *.yaml or *.yml: an agent loading its directory ignores it"
    )]
    NotPolicyName {
        /// The file.
        file: PathBuf,
    },
}

/// All the problems found in a policy directory, sorted by file, line and column.
#[derive(Debug)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    /// Sorts by file, line and column, keeping the order of errors at the same place.
    pub(crate) fn sorted(mut errors: Vec<PolicyError>) -> Self {
        errors.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        PolicyErrors(errors)
    }

    /// The errors.
    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.0.iter()
    }

    /// How many errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl<'a> IntoIterator for &'a PolicyErrors {
    type Item = &'a PolicyError;
    type IntoIter = std::slice::Iter<'a, PolicyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
