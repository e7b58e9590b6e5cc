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
    /// truncated, spliced, bad_signature). Exit status 1 on damage.
    Verify {
        /// The files, oldest first.
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
            let report = verify::verify(&VerifyOptions {
                files,
                pubkey,
                anchors: anchor,
            })?;
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
