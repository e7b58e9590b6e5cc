//! The admin socket and the enforcement health check.
//!
//! A Unix socket (default `/run/scopegate/admin.sock`, `run --admin-socket`, config key
//! `admin_socket`) serves `scopegate status`, `workloads`, `reload` and `policy explain
//! --live` with the line-delimited JSON protocol of [`protocol`]. Authorisation is the
//! socket's file mode: 0660, owned by root and by the group `scopegate` when that group
//! exists; whoever can open the socket can read the agent's state and trigger a reload
//! (nothing on the socket can change the policy itself or stop enforcement).
//!
//! A hostile or broken client cannot wedge the agent: a request line is bounded
//! ([`protocol::MAX_REQUEST_LINE`]) and must arrive within [`server::REQUEST_TIMEOUT`];
//! at most [`server::MAX_CONNECTIONS`] admin connections are served at once (more are
//! answered `busy` and closed); every error is answered with a JSON error line.
//!
//! [`health`] checks every `--health-interval-secs` that the programs are attached to the
//! cgroup root and their links and maps pinned, and re-attaches at once what is gone.
//!
//! [`state`] holds what `status` and `/healthz` report; [`format`] renders it for people.
#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod client;
pub mod format;
pub mod health;
pub mod protocol;
pub mod server;
pub mod state;

pub use state::AgentState;

/// Errors of the admin socket, its client and the commands that use it.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A request line the agent cannot accept.
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// A response line the CLI cannot accept.
    #[error("bad response from the agent: {reason}")]
    BadResponse {
        /// What is wrong with it.
        reason: String,
    },
    /// The socket could not be created.
    #[error("admin socket {path}: {action}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// Another agent answers on the socket.
    #[error(
        "admin socket {path} is in use by a running agent; give this one another --admin-socket"
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The path exists and is not a socket.
    #[error("admin socket {path}: exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The agent cannot be reached.
    #[error(
        "cannot reach the agent at {path}: {source} (is `scopegate run` running with this --admin-socket?)"
    )]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("the agent at {path} refused the request: {kind}: {message}")]
    Refused {
        /// The socket path.
        path: PathBuf,
        /// The error kind.
        kind: String,
        /// The agent's message.
        message: String,
    },
    /// `uninstall` while an agent runs, without `--force`.
    #[error(
        "an agent is running on {pin_dir} (it holds a lock on it); not uninstalling. Stop it first (systemctl stop scopegate), or pass --force: the pins are removed, enforcement stops, and the running agent re-attaches its hooks within its health check interval and records enforcement_restored"
    )]
    AgentRunning {
        /// The pin directory.
        pin_dir: PathBuf,
    },
    /// `uninstall` of a directory without pins.
    #[error("no scopegate pins under {pin_dir}: nothing to uninstall")]
    NothingPinned {
        /// The pin directory.
        pin_dir: PathBuf,
    },
}
