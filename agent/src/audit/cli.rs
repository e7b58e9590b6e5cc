//! `scopegate audit …`: verify, tail and query audit files.
#![forbid(unsafe_code)]

use std::path::PathBuf;

/// The `audit` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain of one or more audit files (in order) and report the first damage.
    Verify {
        /// The files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Errors of the audit command line.
#[derive(Debug, thiserror::Error)]
pub enum AuditCliError {
    /// Not implemented yet.
    #[error("audit {what} is not implemented yet")]
    NotImplemented {
        /// The subcommand.
        what: &'static str,
    },
}

/// Runs an audit subcommand; `Ok(true)` means success (exit 0), `Ok(false)` a finding (exit 1).
pub fn run(command: AuditCommand) -> Result<bool, AuditCliError> {
    match command {
        AuditCommand::Verify { .. } => Err(AuditCliError::NotImplemented { what: "verify" }),
    }
}
