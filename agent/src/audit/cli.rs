//! `scopegate audit …`: verify, tail and query audit files; make checkpoint keys.
#![forbid(unsafe_code)]

use std::{
    io::{self, IsTerminal as _, Write},
    path::PathBuf,
};

use super::{
    Decision,
    checkpoint::{self, CheckpointError},
    query::{self, Filter, QueryError, TailSource},
    verify::{self, VerifyError, VerifyOptions},
};

/// The `audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain of one or more audit files (in order) and report the first damage.
    ///
    /// A base path (e.g. audit.jsonl) stands for its rotated set (audit.jsonl.N … .1, then
    /// audit.jsonl). Prints `OK: N records, seq A..B, K checkpoints verified`, or the first
    /// bad record's file, line and seq with the kind of damage (edited, deleted, reordered,
    /// truncated, spliced, bad_signature). Exit status 1 on damage. `-` reads the records
    /// from standard input, e.g. `journalctl -t scopegate-audit -o cat | scopegate audit
    /// verify -`.
    Verify {
        /// The files, oldest first; `-` alone: standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Check checkpoint signatures with this ed25519 public key (PEM).
        #[arg(long, value_name = "FILE")]
        pubkey: Option<PathBuf>,
        /// A file with checkpoint or agent_stopping records (e.g. a journal export) to
        /// detect a cut-off tail; FILE.anchor next to the audit file is used automatically.
        #[arg(long, value_name = "FILE")]
        anchor: Vec<PathBuf>,
    },
    /// Print the last records as aligned columns; with -f, keep printing new ones.
    Tail {
        /// The audit file (followed across rotation); `-` or none: standard input.
        file: Option<PathBuf>,
        /// Keep printing records as they are written.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many records to print first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// Only this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Only this decision.
        #[arg(long, value_enum)]
        decision: Option<Decision>,
    },
    /// Print the records that match all the given filters.
    Query {
        /// The files; a base path stands for its rotated set.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Only this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Only this decision.
        #[arg(long, value_enum)]
        decision: Option<Decision>,
        /// Only records at or after this time: RFC 3339, or a duration ago (90s, 15m, 1h, 2d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only records before this time (same forms as --since).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Only this destination host or IP (optionally HOST:PORT).
        #[arg(long, value_name = "HOST")]
        dst: Option<String>,
        /// Only this rule id.
        #[arg(long, value_name = "ID")]
        rule: Option<String>,
        /// Print the matching stored lines (JSON) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The access review of a period: per workload its grants and whether each was used,
    /// decisions over time, top denied requests, connection-level (kernel) denies,
    /// expiring and unused grants, the chain's state. Prints a plain-text summary; with
    /// --html, also writes one self-contained HTML file (no scripts, nothing fetched).
    /// Exit 1 when the hash chain of the files is damaged.
    Report(crate::review::cli::ReportArgs),
    /// Create a checkpoint signing key (FILE, mode 0600) and its public key (FILE.pub).
    Keygen {
        /// Where to write the private key (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// Errors of the audit command line.
#[derive(Debug, thiserror::Error)]
pub enum AuditCliError {
    /// Reading files for verify failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Reading files for query or tail failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A key could not be read or written.
    #[error(transparent)]
    Key(#[from] CheckpointError),
    /// The review could not be made.
    #[error(transparent)]
    Review(#[from] crate::review::cli::ReviewError),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(io::Error),
}

impl From<io::Error> for AuditCliError {
    fn from(e: io::Error) -> Self {
        Self::Output(e)
    }
}

impl AuditCliError {
    /// The reader of our output went away (`| head`): not an error worth reporting.
    fn is_broken_pipe(&self) -> bool {
        matches!(
            self,
            Self::Output(e) | Self::Query(QueryError::Output(e))
                if e.kind() == io::ErrorKind::BrokenPipe
        )
    }
}

/// The name standard input has in a report.
const STDIN_NAME: &str = "<stdin>";

/// Verifies the records read from `input` (a pipe: copied to a private temporary file
/// first, because locating a break reads the chain more than once); the report names the
/// input `<stdin>`.
pub fn verify_reader(
    input: &mut dyn io::Read,
    pubkey: Option<ed25519_dalek::VerifyingKey>,
    anchors: Vec<PathBuf>,
) -> Result<verify::Report, AuditCliError> {
    let stdin_error = |error: io::Error| {
        AuditCliError::Verify(VerifyError::Io {
            path: STDIN_NAME.into(),
            error,
        })
    };
    let mut copy = tempfile::NamedTempFile::new().map_err(stdin_error)?;
    io::copy(input, copy.as_file_mut()).map_err(stdin_error)?;
    let temp = copy.path().to_owned();
    let mut report = verify::verify(&VerifyOptions {
        files: vec![temp.clone()],
        pubkey,
        anchors,
    })?;
    let shown = temp.display().to_string();
    for file in &mut report.files {
        if *file == temp {
            *file = STDIN_NAME.into();
        }
    }
    if let Some(damage) = &mut report.damage
        && damage.file == temp
    {
        damage.file = STDIN_NAME.into();
    }
    if let Some((file, _)) = &mut report.anchor
        && *file == temp
    {
        *file = STDIN_NAME.into();
    }
    for note in &mut report.notes {
        *note = note.replace(&shown, STDIN_NAME);
    }
    Ok(report)
}

/// Runs an audit subcommand; `Ok(true)` means success (exit 0), `Ok(false)` a finding (exit 1).
pub fn run(command: AuditCommand) -> Result<bool, AuditCliError> {
    let color = io::stdout().is_terminal();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match run_to(command, &mut out, color) {
        Err(e) if e.is_broken_pipe() => Ok(true),
        other => other,
    }
}

/// [`run`] writing to `out`, with red deny decisions when `color`.
pub fn run_to(
    command: AuditCommand,
    out: &mut dyn Write,
    color: bool,
) -> Result<bool, AuditCliError> {
    match command {
        AuditCommand::Verify {
            files,
            pubkey,
            anchor,
        } => {
            let pubkey = match pubkey {
                Some(p) => Some(checkpoint::load_verifying_key(&p)?),
                None => None,
            };
            let report = if files.iter().any(|f| f.as_os_str() == "-") {
                if files.len() != 1 {
                    return Err(AuditCliError::Usage(
                        "`-` (standard input) cannot be combined with files".into(),
                    ));
                }
                verify_reader(&mut io::stdin().lock(), pubkey, anchor)?
            } else {
                verify::verify(&VerifyOptions {
                    files,
                    pubkey,
                    anchors: anchor,
                })?
            };
            // The verdict stands even if the reader of the output went away.
            match report.render(out) {
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
            Ok(report.ok())
        }
        AuditCommand::Tail {
            file,
            follow,
            lines,
            workload,
            decision,
        } => {
            let source = match file {
                Some(p) if p.as_os_str() != "-" => TailSource::File(p),
                _ => TailSource::Stdin,
            };
            let filter = Filter {
                workload,
                decision,
                ..Filter::default()
            };
            query::tail(&source, lines, &filter, follow, color, out, &|| false)?;
            Ok(true)
        }
        AuditCommand::Query {
            files,
            workload,
            decision,
            since,
            until,
            dst,
            rule,
            json,
        } => {
            let now = jiff::Timestamp::now();
            let time = |s: Option<String>, what: &str| {
                s.map(|s| query::parse_time(&s, now))
                    .transpose()
                    .map_err(|e| AuditCliError::Usage(format!("--{what}: {e}")))
            };
            let filter = Filter {
                workload,
                decision,
                since: time(since, "since")?,
                until: time(until, "until")?,
                dst,
                rule,
            };
            let stats = query::query(&files, &filter, json, color, out)?;
            if stats.unreadable > 0 {
                tracing::warn!(
                    lines = stats.unreadable,
                    "skipped lines that are not audit records; run `scopegate audit verify`"
                );
            }
            Ok(true)
        }
        AuditCommand::Report(args) => Ok(crate::review::cli::run(
            args,
            out,
            &mut io::stderr().lock(),
        )?),
        AuditCommand::Keygen { out: path } => {
            let key = checkpoint::generate();
            checkpoint::write_key_pair(&key, &path)?;
            writeln!(
                out,
                "wrote {} (private, 0600) and {} (public: give it to `audit verify --pubkey`)",
                path.display(),
                checkpoint::public_key_path(&path).display()
            )?;
            Ok(true)
        }
    }
}
