//! The DNS stage: managed workloads' DNS, under policy.
//!
//! The hooks redirect a managed workload's DNS (UDP and TCP to port 53, any resolver) to
//! the agent: UDP to the DNS listener ([`serve_udp`], 127.0.0.1 and [::1] on `--dns-port`),
//! TCP to the proxy, whose composer hands connections with original port 53 to
//! [`serve_tcp`] before protocol detection. Every query is decided by the pure
//! [`policy::dns::allowed`](crate::policy::dns::allowed) and is exactly one `proto: "dns"`
//! audit record (an [`AuditGuard`] from the moment the message arrives):
//!
//! - refused (name or type not allowed, unknown caller, not a plain query): REFUSED, with
//!   the query's id and question;
//! - malformed: dropped (UDP) or the connection closed (TCP), recorded as `dns_malformed`;
//! - allowed: **record before forward**: the decision record (qname, qtype, transport,
//!   `allow`, or `would_deny` in audit mode) is written and acknowledged by every sink
//!   ([`AuditGuard::record_decision`], the same mechanism as HTTP) before a fresh query
//!   with only the decided question (no client EDNS options, no extra records) goes to
//!   the workload's resolvers ([`upstream::exchange`] takes the [`Recorded`](crate::audit::Recorded)
//!   proof) from a socket carrying the agent's mark; the answer goes back with the
//!   client's id, its rcode and A/AAAA addresses in the linked outcome record
//!   (`outcome_of`), and the addresses are taught to the destination binding
//!   ([`Resolver::learn`]).
//!
//! Every record is written (and awaited) before the answer is returned. When the sink
//! cannot write (unhealthy before the decision, or failing while the decision record is
//! written), the answer is SERVFAIL, recorded `audit_unavailable`, and nothing is
//! forwarded.
//!
//! The caller of a UDP query is the kernel-attested cgroup of the sending socket, found
//! through sock_diag ([`UdpCallers`]); a query whose sender cannot be identified is
//! REFUSED and recorded, never forwarded.
#![forbid(unsafe_code)]

pub mod upstream;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, RData},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
};

use crate::{
    audit::{AuditGuard, Auditor, Decision, DnsQuery, Fault, Record},
    identify::Identity,
    policy::{
        DnsDecision, DnsUpstream, Mode, WorkloadId,
        dns::{self, TYPE_A, TYPE_AAAA},
    },
    resolve::Resolver,
    state::Enforcement,
};

/// Largest DNS message over TCP (the 2-byte length prefix).
const MAX_TCP_MESSAGE: usize = 65535;
/// The UDP payload a client without EDNS accepts.
const CLASSIC_UDP: usize = 512;
/// The largest UDP payload advertised upstream (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;
/// How long a DNS-over-TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Errors of this stage.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The DNS listener could not be bound.
    #[error("binding the DNS listener {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The resolv.conf could not be read.
    #[error("{path}: cannot read the resolv.conf for the DNS proxy: {source}")]
    ResolvConf {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The DNS proxy's own state: where allowed queries go, and how many may be in flight.
#[derive(Debug)]
pub struct DnsProxy {
    /// The host's resolvers (`--resolv-conf`, port 53), for `dns: system`.
    pub system: Vec<SocketAddr>,
    /// How long one upstream may take to answer.
    pub timeout: Duration,
    permits: Arc<Semaphore>,
}

impl Default for DnsProxy {
    /// No host resolvers (`dns: system` queries fail with SERVFAIL), 2 s upstream timeout.
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// Queries in flight at once; more are answered SERVFAIL (`dns_overloaded`) and recorded.
pub const MAX_IN_FLIGHT: usize = 512;

impl DnsProxy {
    /// A proxy forwarding `dns: system` queries to `system`.
    pub fn new(system: Vec<SocketAddr>) -> Self {
        Self {
            system,
            timeout: Duration::from_secs(2),
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// A proxy forwarding `dns: system` queries to the nameservers of `resolv_conf`.
    pub fn from_resolv_conf(resolv_conf: &Path) -> Result<Self, DnsError> {
        let text = std::fs::read_to_string(resolv_conf).map_err(|source| DnsError::ResolvConf {
            path: resolv_conf.to_owned(),
            source,
        })?;
        let servers = upstream::parse_resolv_conf(&text)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, upstream::DNS_PORT))
            .collect();
        Ok(Self::new(servers))
    }
}

/// What the DNS stage needs from the agent; the composer implements it.
pub trait DnsEnv: Send + Sync + 'static {
    /// The current snapshot.
    fn enforcement(&self) -> &ArcSwap<Enforcement>;
    /// The audit writer.
    fn auditor(&self) -> &Auditor;
    /// The destination-binding cache the answers feed.
    fn resolver(&self) -> &Resolver;
    /// The proxy's state.
    fn dns(&self) -> &DnsProxy;
}

/// Who sent a query, as the kernel attests it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// cgroup v2 id of the sending socket (UDP) or connecting task (TCP).
    pub cgroup_id: u64,
    /// The managed cgroup whose policy applies, if the kernel named it (TCP).
    pub policy_cgroup: Option<u64>,
    /// Process id, if known.
    pub pid: Option<u32>,
    /// uid of the socket or task.
    pub uid: Option<u32>,
    /// The resolver the workload addressed, if known.
    pub resolver: Option<SocketAddr>,
}

impl Caller {
    /// The caller of a redirected TCP connection.
    pub fn from_identity(identity: &Identity) -> Self {
        Self {
            cgroup_id: identity.cgroup_id,
            policy_cgroup: Some(identity.policy_cgroup),
            pid: Some(identity.pid),
            uid: Some(identity.uid),
            resolver: Some(identity.original_dst),
        }
    }

    fn workload(&self, enforcement: &Enforcement) -> (Option<WorkloadId>, Option<String>) {
        if let Some(info) = enforcement.cgroups.lookup(self.cgroup_id) {
            return (info.workload, Some(info.path.clone()));
        }
        match self
            .policy_cgroup
            .and_then(|id| enforcement.cgroups.lookup(id))
        {
            Some(info) => (info.workload, Some(format!("{}/…", info.path))),
            None => (None, None),
        }
    }
}

/// Who sent a UDP datagram to the DNS listener: the seam between the kernel (sock_diag)
/// and the in-process tests.
pub trait UdpCallers: Send + Sync + 'static {
    /// The caller whose socket sent from `peer` to the listener at `listener`; None when
    /// no such socket exists (any more).
    fn caller(&self, listener: SocketAddr, peer: SocketAddr) -> Option<Caller>;
}

/// The production [`UdpCallers`]: the sending socket from sock_diag (its cgroup id and
/// uid), the resolver it addressed from the kernel's map.
pub struct SockDiagCallers {
    /// The kernel maps (for the resolver address).
    pub kernel: Option<Arc<crate::bpf::Kernel>>,
}

impl UdpCallers for SockDiagCallers {
    fn caller(&self, listener: SocketAddr, peer: SocketAddr) -> Option<Caller> {
        let sock = match crate::cut::udp_socket(peer, listener) {
            Ok(sock) => sock?,
            Err(e) => {
                tracing::warn!(error = %e, %peer, "sock_diag lookup of a DNS client failed");
                return None;
            }
        };
        Some(Caller {
            cgroup_id: sock.cgroup?,
            policy_cgroup: None,
            pid: None,
            uid: Some(sock.uid),
            resolver: self.kernel.as_ref().and_then(|k| k.dns_peer(sock.cookie())),
        })
    }
}

/// How a query arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A datagram.
    Udp,
    /// A length-prefixed message on a TCP connection.
    Tcp,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        }
    }
}

/// The name of a response code.
pub fn rcode_name(code: ResponseCode) -> String {
    match u16::from(code) {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

/// A response with the query's id, opcode, RD flag and question, and `code`.
fn error_response(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut response = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.add_queries(query.queries.iter().cloned());
    response.to_vec().ok()
}

/// Answers one query message from `caller`: the bytes to send back (None: drop the
/// datagram, or close the TCP connection). Exactly one decision record (a forwarded query
/// also has its linked outcome record), written before this returns; the decision record
/// of a forwarded query before the question leaves.
pub async fn answer(
    env: &dyn DnsEnv,
    caller: Option<&Caller>,
    wire: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let enforcement = env.enforcement().load_full();
    let mut record = Record::new("dns");
    record.dns = Some(DnsQuery {
        transport: transport.as_str().to_owned(),
        ..DnsQuery::default()
    });
    let mut workload = None;
    if let Some(caller) = caller {
        let (id, cgroup) = caller.workload(&enforcement);
        workload = id.and_then(|w| enforcement.policy.workload(w));
        record.cgroup = cgroup;
        record.workload = workload.map(|w| w.name.clone());
        record.pid = caller.pid;
        record.uid = caller.uid;
        if let Some(resolver) = caller.resolver {
            record = record.with_dst_addr(resolver);
        }
    }
    let mut guard = env.auditor().guard(record);
    let Ok(query) = Message::from_vec(wire) else {
        return refuse(guard, None, "dns_malformed", Fault::Client).await;
    };
    if query.metadata.message_type != MessageType::Query || query.queries.len() != 1 {
        return refuse(guard, None, "dns_malformed", Fault::Client).await;
    }
    let question = &query.queries[0];
    let qname = question.name().to_ascii().to_ascii_lowercase();
    let qname = qname.strip_suffix('.').unwrap_or(&qname).to_owned();
    let qtype = u16::from(question.query_type());
    if let Some(dns) = guard.record_mut().dns.as_mut() {
        dns.qname = Some(qname.clone());
        dns.qtype = Some(dns::type_name(qtype));
    }
    guard.record_mut().dst.host = Some(qname.clone());
    let refused = error_response(&query, ResponseCode::Refused);
    if caller.is_none() {
        return refuse(guard, refused, "dns_unknown_sender", Fault::Client).await;
    }
    if query.metadata.op_code != OpCode::Query {
        return refuse(guard, refused, "dns_opcode_not_allowed", Fault::Policy).await;
    }
    if question.query_class() != DNSClass::IN {
        return refuse(guard, refused, "dns_class_not_allowed", Fault::Policy).await;
    }
    let decision = dns::allowed(workload, &qname, qtype);
    let mut would_deny = None;
    if let DnsDecision::Deny(deny) = decision {
        if workload.is_none_or(|w| w.mode() != Mode::Audit) {
            return refuse(guard, refused, deny.reason(), Fault::Policy).await;
        }
        would_deny = Some(deny.reason());
    }
    let upstream = match workload.and_then(|w| w.dns.as_ref()).map(|d| &d.upstream) {
        Some(DnsUpstream::Resolvers(list)) => list
            .iter()
            .map(|ip| SocketAddr::new(*ip, upstream::DNS_PORT))
            .collect(),
        _ => env.dns().system.clone(),
    };
    // Nothing leaves that cannot be recorded.
    if !env.auditor().healthy() {
        if let Some(dns) = guard.record_mut().dns.as_mut() {
            dns.rcode = Some("SERVFAIL".into());
        }
        guard.finish_unavailable();
        return error_response(&query, ResponseCode::ServFail);
    }
    let Ok(_permit) = env.dns().permits.clone().try_acquire_owned() else {
        let servfail = error_response(&query, ResponseCode::ServFail);
        return refuse(guard, servfail, "dns_overloaded", Fault::Agent).await;
    };
    // Decide what you forward: a fresh message with only the decided question.
    let mut outbound = Message::query();
    outbound.metadata.recursion_desired = query.metadata.recursion_desired;
    outbound.metadata.checking_disabled = query.metadata.checking_disabled;
    outbound.add_query(question.clone());
    let client_max = match &query.edns {
        Some(edns) => {
            let payload = edns.max_payload().clamp(CLASSIC_UDP as u16, EDNS_PAYLOAD);
            let mut out = Edns::new();
            out.set_max_payload(payload);
            out.set_dnssec_ok(edns.flags().dnssec_ok);
            outbound.set_edns(out);
            usize::from(payload)
        }
        None => CLASSIC_UDP,
    };
    // Record before forward: the decision (name, type, transport, allow) is in every sink
    // before the question leaves; the answer is its linked outcome record, written before
    // the answer is returned.
    let (decision, reason, fault) = match would_deny {
        Some(reason) => (Decision::WouldDeny, Some(reason), Some(Fault::Policy)),
        None => (Decision::Allow, None, None),
    };
    let (recorded, mut outcome) = match guard.record_decision(decision, reason, fault).await {
        Ok(recorded) => recorded,
        Err(mut outcome) => {
            if let Some(dns) = outcome.record_mut().dns.as_mut() {
                dns.rcode = Some("SERVFAIL".into());
            }
            outcome.finish_unavailable();
            return error_response(&query, ResponseCode::ServFail);
        }
    };
    let tcp = transport == Transport::Tcp;
    let reply = upstream::exchange(&recorded, &outbound, &upstream, tcp, env.dns().timeout).await;
    let mut response = match reply {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(error = %e, qname, "DNS upstream failed");
            let servfail = error_response(&query, ResponseCode::ServFail);
            if let Some(dns) = outcome.record_mut().dns.as_mut() {
                dns.rcode = Some("SERVFAIL".into());
            }
            let written = outcome.finish_written(
                Decision::Error,
                None,
                Some("dns_upstream_failed"),
                Some(Fault::Upstream),
            );
            return written.wait().await.ok().and(servfail);
        }
    };
    response.metadata.id = query.metadata.id;
    let mut addrs = Vec::new();
    let mut ttl = u32::MAX;
    for r in &response.answers {
        let ip = match &r.data {
            RData::A(a) if qtype == TYPE_A => IpAddr::V4(a.0),
            RData::AAAA(a) if qtype == TYPE_AAAA => IpAddr::V6(a.0),
            _ => continue,
        };
        addrs.push(ip);
        ttl = ttl.min(r.ttl);
    }
    let rcode = rcode_name(response.metadata.response_code);
    if let Some(dns) = outcome.record_mut().dns.as_mut() {
        dns.rcode = Some(rcode);
        dns.answers = addrs.iter().map(ToString::to_string).collect();
    }
    if !addrs.is_empty() && would_deny.is_none() {
        env.resolver()
            .learn(&qname, &addrs, Duration::from_secs(u64::from(ttl)));
    }
    let mut bytes = response.to_vec().ok()?;
    if transport == Transport::Udp && bytes.len() > client_max {
        // Too big for the client's datagram: truncated, so it asks again over TCP.
        bytes = response.truncate().to_vec().ok()?;
    }
    let written = outcome.finish_written(decision, None, reason, fault);
    written.wait().await.ok().map(|()| bytes)
}

/// Records a refusal (or a drop, when `response` is None), then returns the response.
async fn refuse(
    mut guard: AuditGuard,
    response: Option<Vec<u8>>,
    reason: &str,
    fault: Fault,
) -> Option<Vec<u8>> {
    if let (Some(dns), Some(_)) = (guard.record_mut().dns.as_mut(), &response) {
        dns.rcode = Some(if reason == "dns_overloaded" {
            "SERVFAIL".into()
        } else {
            "REFUSED".into()
        });
    }
    let written = guard.finish_written(Decision::Deny, None, Some(reason), Some(fault));
    written.wait().await.ok().and(response)
}

/// Datagrams of one UDP listener being answered at once. Beyond it the listener stops
/// reading (backpressure): the kernel's socket buffer fills and drops what a flood sends,
/// before the agent has seen it; every datagram the agent reads is answered and recorded.
pub const MAX_UDP_TASKS: usize = 2048;

/// Serves the UDP DNS listeners until they fail: each datagram is answered in its own
/// task (at most [`MAX_UDP_TASKS`] at once, at most [`MAX_IN_FLIGHT`] forwarded).
pub async fn serve_udp(env: Arc<dyn DnsEnv>, socket: UdpSocket, callers: Arc<dyn UdpCallers>) {
    let socket = Arc::new(socket);
    let Ok(listener) = socket.local_addr() else {
        return;
    };
    let tasks = Arc::new(Semaphore::new(MAX_UDP_TASKS));
    let mut buf = vec![0u8; MAX_TCP_MESSAGE];
    loop {
        let Ok(task) = tasks.clone().acquire_owned().await else {
            return; // never: the semaphore is not closed
        };
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // ICMP errors of earlier replies surface here; the socket stays usable.
                tracing::debug!(error = %e, "DNS listener receive error");
                continue;
            }
        };
        let wire = buf[..n].to_vec();
        let (env, socket, callers) = (env.clone(), socket.clone(), callers.clone());
        tokio::spawn(async move {
            let _task = task;
            // sock_diag is a blocking netlink round trip: off the runtime's workers.
            let peer_addr = crate::identify::normalize(peer);
            let caller = tokio::task::spawn_blocking(move || callers.caller(listener, peer_addr))
                .await
                .ok()
                .flatten();
            if let Some(out) = answer(env.as_ref(), caller.as_ref(), &wire, Transport::Udp).await {
                let _ = socket.send_to(&out, peer).await;
            }
        });
    }
}

/// Binds the UDP DNS listeners on 127.0.0.1:`port` and [::1]:`port` (the IPv6 one only
/// where the host has IPv6 loopback).
pub fn bind_udp(port: u16) -> Result<Vec<UdpSocket>, DnsError> {
    let mut out = Vec::new();
    for ip in [
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ] {
        let addr = SocketAddr::new(ip, port);
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .map_err(|source| DnsError::Bind { addr, source })?;
        if ip.is_ipv6() {
            socket
                .set_only_v6(true)
                .map_err(|source| DnsError::Bind { addr, source })?;
        }
        socket
            .set_nonblocking(true)
            .map_err(|source| DnsError::Bind { addr, source })?;
        match socket.bind(&addr.into()) {
            Ok(()) => {}
            Err(e) if ip.is_ipv6() && e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => continue,
            Err(source) => return Err(DnsError::Bind { addr, source }),
        }
        let socket =
            UdpSocket::from_std(socket.into()).map_err(|source| DnsError::Bind { addr, source })?;
        out.push(socket);
    }
    Ok(out)
}

/// DNS over TCP on a redirected connection (original port 53): length-prefixed queries,
/// each answered and recorded like a UDP one; a malformed one closes the connection.
pub async fn serve_tcp(env: &dyn DnsEnv, mut stream: TcpStream, identity: &Identity) {
    let caller = Caller::from_identity(identity);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
        let mut wire = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut wire)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                let _ = answer(env, Some(&caller), &[], Transport::Tcp).await;
                return;
            }
        }
        let Some(out) = answer(env, Some(&caller), &wire, Transport::Tcp).await else {
            return;
        };
        let Ok(out_len) = u16::try_from(out.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&out_len.to_be_bytes());
        framed.extend_from_slice(&out);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
