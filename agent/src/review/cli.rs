//! `scopegate audit report`: reads the audit files and the policy directory, verifies the
//! chain, writes the HTML review (atomically: a temporary file renamed into place) and
//! prints the plain-text summary. Exit 0, or 1 when the chain of the files is damaged (the
//! report is still written, and says so first).
#![forbid(unsafe_code)]

use std::{
    io::{self, Write},
    path::PathBuf,
};

use jiff::{SignedDuration, Timestamp};

use super::{ChainState, Period, Review};
use crate::audit::{
    query,
    verify::{self, VerifyError, VerifyOptions},
};
use crate::policy::{
    PolicyErrors, Snapshot,
    trail::{self, TrailError},
};

/// Arguments of `audit report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// An audit file (its rotated files are read too); repeatable.
    #[arg(long = "from", required = true, value_name = "AUDIT")]
    pub from: Vec<PathBuf>,
    /// The policy directory in force in the period.
    #[arg(long, value_name = "DIR")]
    pub policies: PathBuf,
    /// Write the review as one self-contained HTML file here.
    #[arg(long, value_name = "OUT")]
    pub html: Option<PathBuf>,
    /// Print the review as JSON instead of the text summary.
    #[arg(long)]
    pub json: bool,
    /// Only records at or after this time: RFC 3339, or a duration before now (30d, 12h).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only records before this time (same forms as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// List grants that end within this many days.
    #[arg(long, value_name = "DAYS", default_value_t = 14)]
    pub expiring_within: u32,
    /// Columns of the decisions-over-time chart.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=500))]
    pub buckets: u16,
}

/// Errors of `audit report`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// The policy directory is invalid.
    #[error("{0}")]
    Policy(#[from] PolicyErrors),
    /// An audit file cannot be read.
    #[error(transparent)]
    Read(#[from] TrailError),
    /// The chain walk could not run.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A time argument is invalid.
    #[error("--{flag} {value:?}: {reason}")]
    Time {
        /// `since` or `until`.
        flag: &'static str,
        /// The value given.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The HTML file cannot be written.
    #[error("{}: cannot write the report: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The JSON form cannot be made.
    #[error("cannot write the review as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Writing the summary failed.
    #[error("writing the output: {0}")]
    Output(#[from] io::Error),
}

/// Runs `audit report`, summary to `out`, warnings to `err`; Ok(false) when the chain is
/// damaged.
pub fn run(
    args: ReportArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<bool, ReviewError> {
    let now = Timestamp::now();
    let time = |flag: &'static str, value: Option<String>| {
        value
            .map(|value| {
                query::parse_time(&value, now).map_err(|reason| ReviewError::Time {
                    flag,
                    value,
                    reason,
                })
            })
            .transpose()
    };
    let period = Period {
        since: time("since", args.since)?,
        until: time("until", args.until)?,
        now,
        expiring_within: SignedDuration::from_hours(24 * i64::from(args.expiring_within)),
        buckets: usize::from(args.buckets),
    };
    let snapshot = Snapshot::load_dir(&args.policies)?;
    // The whole trail is read; the period (it has an end too) is the review's business.
    let mut records = Vec::new();
    let read = trail::read(&args.from, None, |r| records.push(r))?;
    for finding in &read.findings {
        writeln!(err, "warning: {finding}")?;
    }
    let walk = verify::verify(&VerifyOptions {
        files: args.from.clone(),
        pubkey: None,
        anchors: Vec::new(),
    })?;
    let mut review = Review::build(&records, &snapshot, &period);
    review.files = read.files.iter().map(|f| f.display().to_string()).collect();
    review.chain = Some(ChainState {
        intact: walk.ok(),
        records: walk.records,
        damage: walk
            .damage
            .as_ref()
            .map(|d| format!("{}:{}: {} ({})", d.file.display(), d.line, d.kind, d.detail)),
    });
    if let Some(path) = &args.html {
        crate::policy::cli::write_atomically(path, super::html::render(&review).as_bytes())
            .map_err(|source| ReviewError::Write {
                path: path.clone(),
                source,
            })?;
    }
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&review)?)?;
    } else {
        out.write_all(review.summary().as_bytes())?;
        if let Some(path) = &args.html {
            writeln!(out, "report: {}", path.display())?;
        }
    }
    Ok(walk.ok())
}
