//! `scopegate policy …`: check and explain.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use super::{PolicyErrors, Snapshot};

/// The `policy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory; prints every error as file:line:col: message.
    Check {
        /// The directory.
        dir: PathBuf,
    },
}

/// Errors of the policy command line.
#[derive(Debug, thiserror::Error)]
pub enum PolicyCliError {
    /// The policy directory is invalid.
    #[error("{0}")]
    Policy(#[from] PolicyErrors),
}

/// Runs a policy subcommand; `Ok(true)` means success (exit 0), `Ok(false)` a finding (exit 1).
pub fn run(command: PolicyCommand) -> Result<bool, PolicyCliError> {
    match command {
        PolicyCommand::Check { dir } => match Snapshot::load_dir(&dir) {
            Ok(snapshot) => {
                println!(
                    "{}: OK, {} workload(s)",
                    dir.display(),
                    snapshot.workloads().len()
                );
                Ok(true)
            }
            Err(errors) => {
                for e in &errors.0 {
                    println!("{e}");
                }
                Ok(false)
            }
        },
    }
}
