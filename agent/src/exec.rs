//! `scopegate exec --cgroup PATH -- CMD…`: run a command inside a cgroup (created if
//! needed), so a policy can be tried on any command without systemd.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible, fs, io, os::unix::process::CommandExt as _, path::PathBuf,
    process::Command,
};

use crate::workloads::{self, WorkloadsError};

/// Errors of `exec`.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No command was given.
    #[error("no command given: scopegate exec --cgroup PATH -- CMD [ARGS...]")]
    NoCommand,
    /// The cgroup path is not absolute or climbs out of the cgroup tree.
    #[error("cgroup path {path:?} must start with '/' and contain no '..'")]
    BadPath {
        /// The path given.
        path: String,
    },
    /// Finding or creating the cgroup failed.
    #[error(transparent)]
    Cgroup(#[from] WorkloadsError),
    /// Moving this process into the cgroup failed.
    #[error("moving into {procs}: {source}")]
    Move {
        /// The cgroup.procs file.
        procs: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The command could not be executed.
    #[error("executing {command:?}: {source}")]
    Exec {
        /// The command.
        command: String,
        /// The error.
        source: io::Error,
    },
}

/// Moves this process into `cgroup` (relative to the cgroup2 mount) and replaces it with
/// `argv`. Returns only on error.
pub fn exec(cgroup: &str, argv: &[String]) -> Result<Infallible, ExecError> {
    let (program, args) = argv.split_first().ok_or(ExecError::NoCommand)?;
    if !cgroup.starts_with('/') || cgroup.split('/').any(|s| s == "..") {
        return Err(ExecError::BadPath {
            path: cgroup.into(),
        });
    }
    let mount = workloads::cgroup2_mount()?;
    let dir = workloads::ensure_cgroup(&mount, cgroup)?;
    let procs = dir.join("cgroup.procs");
    // "0" moves the writing process itself.
    fs::write(&procs, "0").map_err(|source| ExecError::Move {
        procs: procs.clone(),
        source,
    })?;
    let source = Command::new(program).args(args).exec();
    Err(ExecError::Exec {
        command: program.clone(),
        source,
    })
}
