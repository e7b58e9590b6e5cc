//! The types every request stage shares, below all of them: the published enforcement
//! snapshot, the proxy's body type, the agent's socket mark and the refusal value.
//!
//! Stages (`identify`, `detect`, `outbound`, `enforce`, `forward`, `respond`) import from
//! here and from the control-plane modules below them, never from each other upward and
//! never from [`pipeline`](crate::pipeline), which composes them.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::combinators::BoxBody;

use crate::{audit::Fault, policy, workloads::Resolution};

/// The SO_MARK on every socket the agent opens upstream, so the hooks never redirect the
/// agent's own traffic back to itself.
pub const AGENT_MARK: u32 = 0x5347_0001;

/// The body type of requests and responses through the proxy.
pub type Body = BoxBody<Bytes, BodyError>;

/// The error of a [`Body`]: hyper's, or the proxy's own (a streamed request body that
/// stalled past the body timeout, see [`crate::outbound`]).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Everything a decision depends on, published as ONE immutable value and swapped
/// atomically: the policy and the cgroup → workload resolution made from it.
#[derive(Debug)]
pub struct Enforcement {
    /// The validated policy.
    pub policy: Arc<policy::Snapshot>,
    /// Which cgroup belongs to which workload.
    pub cgroups: Arc<Resolution>,
}

impl Enforcement {
    /// Deny-all.
    pub fn empty() -> Self {
        Self {
            policy: Arc::new(policy::Snapshot::empty()),
            cgroups: Arc::new(Resolution::default()),
        }
    }
}

/// A refusal: the status, a stable reason code, a human detail, and whose fault it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status for the client.
    pub status: StatusCode,
    /// Stable snake_case reason code.
    pub reason: &'static str,
    /// Human-readable detail.
    pub detail: String,
    /// Where the failure came from.
    pub fault: Fault,
    /// For 429: when to retry.
    pub retry_after: Option<Duration>,
    /// For `malformed_request`: the parser's precise error kind (also in the record).
    pub error_kind: Option<&'static str>,
}

impl Refused {
    /// A refusal with any status.
    pub fn status(status: StatusCode, reason: &'static str, detail: String, fault: Fault) -> Self {
        Self {
            status,
            reason,
            detail,
            fault,
            retry_after: None,
            error_kind: None,
        }
    }

    /// 400, the client's fault.
    pub fn client(reason: &'static str, detail: String) -> Self {
        Self::status(StatusCode::BAD_REQUEST, reason, detail, Fault::Client)
    }

    /// 403 by policy.
    pub fn policy(reason: &'static str, detail: String) -> Self {
        Self::status(StatusCode::FORBIDDEN, reason, detail, Fault::Policy)
    }

    /// 500, the agent's fault.
    pub fn agent(reason: &'static str, detail: String) -> Self {
        Self::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            reason,
            detail,
            Fault::Agent,
        )
    }

    /// `malformed_request` with the parser's error kind, the client's fault.
    pub fn malformed(status: StatusCode, kind: &'static str, detail: String) -> Self {
        let mut refused = Self::status(status, MALFORMED_REQUEST, detail, Fault::Client);
        refused.error_kind = Some(kind);
        refused
    }

    /// Whether the connection must close after this refusal: every 4xx the client caused
    /// (after a request the proxy refused as malformed or ambiguous, nothing else it sent
    /// on that connection can be trusted to be framed as it thinks).
    pub fn closes_connection(&self) -> bool {
        self.fault == Fault::Client && self.status.is_client_error()
    }
}

/// The reason of every request the HTTP parser or the framing guard refused.
pub const MALFORMED_REQUEST: &str = "malformed_request";

/// How long a client may take, per stage of a request. Each is one timer per connection
/// (or per streamed body), armed only when a read waits, never one per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From the first byte of a request head until the head is complete. A partial head
    /// at expiry is refused (`header_timeout`, 408, recorded) and the connection closed.
    pub header: Duration,
    /// How long a connection may sit with no request in flight: an HTTP/1 keep-alive
    /// connection waiting for its next head (a new one too), an HTTP/2 connection with no
    /// open stream, a TLS passthrough splice with no byte in either direction. An idle
    /// HTTP connection is closed without a record (there is no decision to record); a
    /// splice's outcome record says `idle_timeout`.
    pub idle: Duration,
    /// Reading a request body: the whole of a body a rule inspects (buffered before the
    /// decision: 408 `body_timeout`), and each read of a streamed body relayed upstream
    /// (a body that stops arriving for this long is cut, the upstream request aborted,
    /// and the outcome record says `body_timeout`).
    pub body: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            body: Duration::from_secs(30),
        }
    }
}

/// Descriptors kept free for the control plane (cgroup scans, policy reloads, inotify,
/// the audit writer and its rotation, bpf maps): proxied connections never use them.
pub const FD_RESERVE: u64 = 128;

/// How many proxied connections fit in `nofile` descriptors with [`FD_RESERVE`] kept free:
/// at most this many client connections, and at most this many upstream sockets
/// ([`UpstreamSockets`](crate::forward::UpstreamSockets), pooled idle ones and HTTP/2
/// fan-out included).
pub fn descriptor_budget(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(FD_RESERVE) / 2)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Why a connection got no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exhausted {
    /// The workload holds `max_connections` already (`connection_limit`).
    Workload,
    /// The proxy as a whole is at its descriptor budget (`descriptor_limit`).
    Descriptors,
}

#[derive(Debug)]
struct Counts {
    per: std::collections::HashMap<String, usize>,
    total: usize,
    budget: usize,
}

/// Live proxy connections per workload (for `max_connections`) and in all (for the
/// descriptor budget, see [`descriptor_budget`]).
#[derive(Debug)]
pub struct ConnectionCounts(Arc<std::sync::Mutex<Counts>>);

impl Default for ConnectionCounts {
    fn default() -> Self {
        Self::with_budget(usize::MAX)
    }
}

impl ConnectionCounts {
    /// Counts with at most `budget` connections in all.
    pub fn with_budget(budget: usize) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Counts {
            per: std::collections::HashMap::new(),
            total: 0,
            budget,
        })))
    }

    /// Takes one of `limit` connection slots of `workload`, and one of the budget.
    pub fn acquire(&self, workload: &str, limit: usize) -> Result<ConnectionSlot, Exhausted> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= counts.budget {
            return Err(Exhausted::Descriptors);
        }
        let count = counts.per.entry(workload.to_owned()).or_insert(0);
        if *count >= limit {
            return Err(Exhausted::Workload);
        }
        *count += 1;
        counts.total += 1;
        Ok(ConnectionSlot {
            counts: Arc::clone(&self.0),
            workload: workload.to_owned(),
        })
    }

    /// The live connections of `workload`.
    pub fn live(&self, workload: &str) -> usize {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.per.get(workload).copied().unwrap_or(0)
    }
}

/// One taken connection slot; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    counts: Arc<std::sync::Mutex<Counts>>,
    workload: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(count) = counts.per.get_mut(&self.workload) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.per.remove(&self.workload);
            }
        }
    }
}

/// Connects to `addr` with SO_MARK `mark` (0: none) and TCP_NODELAY: the agent's own
/// sockets, which the hooks let out. Workload requests reach such a socket only through
/// `forward` (which takes the proof that the decision is recorded); the DNS proxy uses it
/// for its exchanges with the host's resolvers.
pub(crate) async fn connect_marked(
    addr: std::net::SocketAddr,
    mark: u32,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if mark != 0 {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_counted_and_released() {
        let counts = ConnectionCounts::default();
        let a = counts.acquire("w", 2).unwrap();
        let b = counts.acquire("w", 2).unwrap();
        assert_eq!(counts.acquire("w", 2).unwrap_err(), Exhausted::Workload);
        assert!(counts.acquire("other", 2).is_ok());
        assert_eq!(counts.live("w"), 2);
        drop(a);
        assert_eq!(counts.live("w"), 1);
        let _c = counts.acquire("w", 2).unwrap();
        drop(b);
        assert_eq!(counts.live("w"), 1);
    }

    #[test]
    fn the_descriptor_budget_caps_all_workloads_together() {
        assert_eq!(descriptor_budget(1024), 448);
        assert_eq!(descriptor_budget(10), 1, "never zero");
        let counts = ConnectionCounts::with_budget(2);
        let a = counts.acquire("a", 10).unwrap();
        let _b = counts.acquire("b", 10).unwrap();
        assert_eq!(counts.acquire("c", 10).unwrap_err(), Exhausted::Descriptors);
        drop(a);
        assert!(counts.acquire("c", 10).is_ok());
    }
}
