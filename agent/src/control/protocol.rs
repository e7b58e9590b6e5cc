//! The admin socket's wire format: one JSON request line, one JSON response line, then the
//! agent closes the connection.
//!
//! Every line is a JSON object with `"v": 1` (the protocol version). A request:
//!
//! ```text
//! {"v":1,"cmd":"status"}
//! {"v":1,"cmd":"workloads"}
//! {"v":1,"cmd":"reload"}
//! {"v":1,"cmd":"explain","explain":{"workload":"billing","request":"GET http://127.0.0.1:8080/x"}}
//! ```
//!
//! A response: `{"v":1,"ok":true,"status":{…}}` (one of `status`, `workloads`, `reload`,
//! `explain`), or `{"v":1,"ok":false,"error":{"kind":"…","message":"…"}}`. Unknown fields
//! are errors both ways; a request line is at most [`MAX_REQUEST_LINE`] bytes.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

use super::ControlError;

/// The protocol version this agent and CLI speak.
pub const VERSION: u32 = 1;
/// Longest request line accepted, newline included.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;
/// Longest response line the CLI reads, newline included.
pub const MAX_RESPONSE_LINE: usize = 16 * 1024 * 1024;

/// What a client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// The agent's state.
    Status,
    /// Workload → cgroups → pids.
    Workloads,
    /// Reload the policy directory (as SIGHUP does) and wait for the result.
    Reload,
    /// Explain a request against the running snapshot.
    Explain,
}

/// A request line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Protocol version ([`VERSION`]).
    pub v: u32,
    /// The command.
    pub cmd: Command,
    /// The request to explain (`cmd: explain` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<ExplainRequest>,
}

/// The arguments of `policy explain --live`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    /// The calling workload's name.
    pub workload: String,
    /// 'METHOD URL'.
    pub request: String,
    /// 'Name: value' headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// The JSON request body (text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// RFC 3339 request time (default: now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The caller's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Render the explanation as JSON instead of text.
    #[serde(default)]
    pub json: bool,
}

/// Only the version, read first so a client of another version gets a version error and
/// not a schema error.
#[derive(Deserialize)]
struct Probe {
    v: Option<serde_json::Value>,
}

impl Request {
    /// A request without arguments.
    pub fn new(cmd: Command) -> Self {
        Self {
            v: VERSION,
            cmd,
            explain: None,
        }
    }

    /// Parses one request line (without or with its trailing newline).
    pub fn parse(line: &[u8]) -> Result<Self, ControlError> {
        let bad = |reason: String| ControlError::BadRequest { reason };
        let text = std::str::from_utf8(line)
            .map_err(|e| bad(format!("the request is not UTF-8 ({e})")))?
            .trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            return Err(bad("empty request line".into()));
        }
        let probe: Probe =
            serde_json::from_str(text).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        match probe.v {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
            Some(other) => {
                return Err(bad(format!(
                    "unsupported protocol version {other} (this agent speaks {VERSION})"
                )));
            }
            None => {
                return Err(bad(format!(
                    "missing \"v\" (the protocol version, {VERSION})"
                )));
            }
        }
        let request: Self =
            serde_json::from_str(text).map_err(|e| bad(format!("invalid request: {e}")))?;
        match (request.cmd, &request.explain) {
            (Command::Explain, None) => Err(bad("cmd explain needs \"explain\": {…}".into())),
            (Command::Explain, Some(_)) | (_, None) => Ok(request),
            (cmd, Some(_)) => Err(bad(format!(
                "\"explain\" is only allowed with cmd explain, not {}",
                serde_json::to_string(&cmd).unwrap_or_default()
            ))),
        }
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        line(self)
    }
}

/// A response line.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// Protocol version ([`VERSION`]).
    pub v: u32,
    /// Whether the request was carried out (a reload that rejected the policy is carried
    /// out: `ok` is true and `reload.ok` false).
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// `workloads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<Vec<WorkloadEntry>>,
    /// `reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadResult>,
    /// `explain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<ExplainResult>,
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable kind: `bad_request`, `too_large`, `incomplete`, `timeout`, `busy`, `failed`.
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

impl Response {
    /// A successful, still empty response.
    pub fn ok() -> Self {
        Self {
            v: VERSION,
            ok: true,
            ..Self::default()
        }
    }

    /// An error response.
    pub fn error(kind: &str, message: impl Into<String>) -> Self {
        Self {
            v: VERSION,
            ok: false,
            error: Some(ErrorBody {
                kind: kind.into(),
                message: message.into(),
            }),
            ..Self::default()
        }
    }

    /// Parses a response line.
    pub fn parse(line: &[u8]) -> Result<Self, ControlError> {
        let bad = |reason: String| ControlError::BadResponse { reason };
        let response: Self =
            serde_json::from_slice(line).map_err(|e| bad(format!("invalid response: {e}")))?;
        if response.v != VERSION {
            return Err(bad(format!(
                "the agent speaks protocol version {} (this CLI speaks {VERSION})",
                response.v
            )));
        }
        Ok(response)
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> String {
        line(self)
    }
}

fn line<T: Serialize>(value: &T) -> String {
    // Serialising these plain data types cannot fail.
    let mut text = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    text
}

/// `status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// The agent's version.
    pub version: String,
    /// The agent's pid.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// The policy in force.
    pub policy: PolicyStatus,
    /// The last reload attempt, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadResult>,
    /// Enforcement health (links attached and pinned).
    pub enforcement: EnforcementStatus,
    /// The hooks.
    pub hooks: Vec<HookEntry>,
    /// Managed cgroups.
    pub cgroups: CgroupCounts,
    /// The audit sinks.
    pub audit: AuditStatus,
    /// The main counters.
    pub counters: Counters,
}

/// The policy snapshot in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyStatus {
    /// The policy directory.
    pub dir: String,
    /// SHA-256 of its files when this snapshot was loaded (see `audit::lifecycle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// When this snapshot was loaded (RFC 3339).
    pub loaded_at: String,
    /// Workloads in it.
    pub workloads: usize,
    /// Grants (`expires:`) that end within 14 days or have ended, one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expiring: Vec<String>,
}

/// One reload attempt.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadResult {
    /// Whether the new policy took effect.
    pub ok: bool,
    /// When (RFC 3339).
    pub at: String,
    /// What triggered it (`SIGHUP`, `admin socket`, `policy directory changed`).
    pub trigger: String,
    /// The policy hash read for this attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    /// Workloads in the new snapshot (when ok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<usize>,
    /// The errors, one `file:line:col: message` each (when rejected), or what failed after
    /// the policy was accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Whether the hooks are in place.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforcementStatus {
    /// True while every program is attached and every link and map pinned.
    pub healthy: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds between checks.
    pub check_interval_secs: f64,
    /// When the last check ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// The last incident (kept after a restoration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_incident: Option<Incident>,
}

/// Enforcement found missing while the agent ran.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incident {
    /// When it was detected (RFC 3339).
    pub detected_at: String,
    /// What was missing.
    pub problems: Vec<String>,
    /// `enforcement_restored` or `enforcement_lost`.
    pub outcome: String,
    /// When it was restored (RFC 3339), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_at: Option<String>,
    /// Why it could not be restored, if it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookEntry {
    /// Program name.
    pub program: String,
    /// Kernel program id.
    pub program_id: u32,
    /// Kernel link id of the pinned link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<u32>,
    /// Link pin path.
    pub pin: String,
    /// The pin holds a link to this program.
    pub pinned: bool,
    /// Attached to the cgroup root.
    pub attached: bool,
}

/// Managed cgroups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupCounts {
    /// Managed cgroups known to the agent (selected ones and their descendants).
    pub managed: usize,
    /// Of those, held (deny-all until released).
    pub held: usize,
    /// Held cgroups a scan could not place (kept).
    pub unseen_held: usize,
    /// Release requests not applied yet.
    pub release_pending: usize,
}

/// The audit sinks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditStatus {
    /// True while the sinks can be written.
    pub healthy: bool,
    /// The audit file, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Records written.
    pub records_written: u64,
    /// Write, fsync or rotation errors.
    pub write_errors: u64,
    /// Records accepted, not yet written.
    pub queue_depth: u64,
}

/// The main counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counters {
    /// Managed connects redirected to the proxy.
    pub kernel_redirected: u64,
    /// Managed connects, sends and sockets denied in the kernel.
    pub kernel_denied: u64,
    /// Kernel deny events lost (ring buffer full).
    pub kernel_events_lost: u64,
    /// Parts of the cgroup tree scans could not read.
    pub cgroup_scan_errors: u64,
}

/// One workload and its cgroups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadEntry {
    /// The workload's name, or none for held cgroups and managed-subtree cgroups without
    /// a policy of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Its policy file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Its cgroups, by path.
    pub cgroups: Vec<CgroupEntry>,
}

/// One managed cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupEntry {
    /// Path relative to the cgroup2 mount.
    pub path: String,
    /// cgroup id.
    pub id: u64,
    /// Selected by name (not only as a descendant).
    pub selected: bool,
    /// Held (deny-all until released).
    pub held: bool,
    /// The processes in it now.
    pub pids: Vec<u32>,
}

/// `explain`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainResult {
    /// Whether the request would be allowed.
    pub allowed: bool,
    /// The explanation (text, or JSON when asked).
    pub text: String,
    /// The policy hash of the snapshot that decided it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn err(line: &[u8]) -> String {
        Request::parse(line).unwrap_err().to_string()
    }

    #[test]
    fn requests_round_trip() {
        for cmd in [Command::Status, Command::Workloads, Command::Reload] {
            let r = Request::new(cmd);
            assert_eq!(Request::parse(r.to_line().as_bytes()).unwrap(), r);
        }
        let explain = Request {
            explain: Some(ExplainRequest {
                workload: "billing".into(),
                request: "GET http://127.0.0.1/x".into(),
                headers: vec!["X-A: 1".into()],
                body: Some("{}".into()),
                at: None,
                uid: Some(7),
                json: true,
            }),
            ..Request::new(Command::Explain)
        };
        let line = explain.to_line();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert_eq!(Request::parse(line.as_bytes()).unwrap(), explain);
        assert_eq!(
            Request::parse(br#"{"v":1,"cmd":"status"}"#).unwrap(),
            Request::new(Command::Status),
            "no newline needed"
        );
    }

    #[test]
    fn hostile_requests_get_clear_errors() {
        assert!(err(b"").contains("empty request"));
        assert!(err(b"   \n").contains("empty request"));
        assert!(err(b"\xff\xfe garbage\n").contains("not UTF-8"));
        assert!(err(b"hello\n").contains("not a JSON object"));
        assert!(err(b"[1,2]\n").contains("not a JSON object"));
        assert!(
            err(b"{\"v\":1,\"cmd\":\"status\"").contains("not a JSON object"),
            "half a request"
        );
        assert!(err(br#"{"cmd":"status"}"#).contains("missing \"v\""));
        assert!(err(br#"{"v":2,"cmd":"status"}"#).contains("unsupported protocol version 2"));
        assert!(err(br#"{"v":"1","cmd":"status"}"#).contains("unsupported protocol version \"1\""));
        assert!(err(br#"{"v":1,"cmd":"shutdown"}"#).contains("unknown variant `shutdown`"));
        assert!(err(br#"{"v":1}"#).contains("missing field `cmd`"));
        assert!(err(br#"{"v":1,"cmd":"status","sudo":true}"#).contains("unknown field `sudo`"));
        assert!(err(br#"{"v":1,"cmd":"explain"}"#).contains("needs \"explain\""));
        assert!(
            err(br#"{"v":1,"cmd":"status","explain":{"workload":"a","request":"GET http://x/"}}"#)
                .contains("only allowed with cmd explain, not \"status\"")
        );
        assert!(
            err(br#"{"v":1,"cmd":"explain","explain":{"workload":"a","request":"x","rm":1}}"#)
                .contains("unknown field `rm`")
        );
        assert!(
            err(br#"{"v":1,"cmd":"explain","explain":{"request":"x"}}"#)
                .contains("missing field `workload`")
        );
        // Deeply nested input is an error (recursion limit or unknown field), not a stack
        // overflow.
        let deep = format!(
            "{{\"v\":1,\"cmd\":\"status\",\"x\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let e = err(deep.as_bytes());
        assert!(
            e.contains("recursion limit") || e.contains("unknown field `x`"),
            "{e}"
        );
    }

    #[test]
    fn responses_round_trip_and_check_the_version() {
        let mut r = Response::ok();
        r.reload = Some(ReloadResult {
            ok: false,
            at: "2026-01-01T00:00:00Z".into(),
            trigger: "admin socket".into(),
            errors: vec!["/p/a.yaml:3:5: unknown field `x`".into()],
            ..ReloadResult::default()
        });
        assert_eq!(Response::parse(r.to_line().as_bytes()).unwrap(), r);
        let e = Response::error("busy", "too many admin connections");
        assert_eq!(Response::parse(e.to_line().as_bytes()).unwrap(), e);
        let other = Response::parse(br#"{"v":9,"ok":true}"#)
            .unwrap_err()
            .to_string();
        assert!(other.contains("protocol version 9"), "{other}");
        let unknown = Response::parse(br#"{"v":1,"ok":true,"extra":1}"#)
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("unknown field `extra`"), "{unknown}");
        assert!(Response::parse(b"garbage").is_err());
    }
}
