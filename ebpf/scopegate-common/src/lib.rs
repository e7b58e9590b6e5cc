//! Plain-old-data types shared by the kernel programs (`scopegate-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, has no padding holes the verifier could trip on, and
//! is laid out identically on both sides. Addresses are stored as four 32-bit words in
//! network byte order, exactly as the kernel presents `user_ip6`; an IPv4 address uses
//! word 0 only and [`FAMILY_V4`].
#![no_std]
#![cfg_attr(not(feature = "user"), forbid(unsafe_code))]

/// `AF_INET`.
pub const FAMILY_V4: u32 = 2;
/// `AF_INET6`.
pub const FAMILY_V6: u32 = 10;

/// Version of the pinned map and link layout. Bump when any type below changes.
pub const PIN_LAYOUT_VERSION: u32 = 2;

/// Deepest cgroup level the hooks look at for a managed ancestor.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// `ManagedCgroup::workload` of a cgroup managed without a policy (deny everything).
pub const NO_WORKLOAD: u32 = u32::MAX;

/// [`ManagedCgroup::flags`]: held deny-all because no policy selects it any more (it was
/// selected once; managed until released). The kernel programs ignore this bit
/// (`NO_WORKLOAD` already denies everything); the agent and `scopegate release` read it.
pub const MANAGED_HELD: u32 = 1;
/// [`ManagedCgroup::flags`]: `scopegate release` asked for this held cgroup to be released.
/// It stays denied until the agent has recorded the release and removed the entry.
pub const MANAGED_RELEASE_REQUESTED: u32 = 2;
/// [`ManagedCgroup::flags`] bit: the workload's policy grants DNS, so its UDP and TCP
/// port-53 traffic (to any resolver) is redirected to the agent's DNS proxy.
pub const MANAGED_DNS: u32 = 4;
/// [`ManagedCgroup::flags`] bit: the workload's policy is in `mode: audit`. What the hooks
/// would refuse *by policy* (a TCP port no destination names, UDP that is no L4 exception
/// or granted DNS) passes unchanged and is reported with [`VERDICT_AUDIT_PASS`]. Integrity
/// refusals (no policy, not configured, another network namespace, an origin that could
/// not be stored, sockets no address hook sees) stay refusals. Ignored for
/// [`NO_WORKLOAD`].
pub const MANAGED_AUDIT: u32 = 8;

/// The DNS port, host order.
pub const DNS_PORT: u32 = 53;

/// Names of the pinned maps (bpffs names may not contain '.').
pub mod maps {
    /// `Array<Config>` with one entry.
    pub const CONFIG: &str = "SG_CONFIG";
    /// `HashMap<u64 cgroup id, ManagedCgroup>`.
    pub const MANAGED: &str = "SG_MANAGED";
    /// `HashMap<u64 cgroup id, u8>`: cgroups whose sockets are never redirected.
    pub const EXEMPT: &str = "SG_EXEMPT";
    /// `LruHashMap<u64 socket cookie, Origin>`: connect4/6 → sock_ops hand-off.
    pub const PENDING: &str = "SG_PENDING";
    /// `LruHashMap<SockKey, Origin>`: client address as the proxy sees it → origin.
    pub const ORIGINS: &str = "SG_ORIGINS";
    /// `HashMap<PortKey, u8>`: TCP ports a workload has proxied destinations on.
    pub const PORTS: &str = "SG_PORTS";
    /// `LpmTrie<L4Key, L4Allow>`: per-workload L4 exceptions (cidr + ports), passed straight
    /// through without the proxy; DNS resolvers are entries here too.
    pub const L4: &str = "SG_L4";
    /// `RingBuf` of [`crate::DenyEvent`].
    pub const EVENTS: &str = "SG_EVENTS";
    /// `Array<u64>`: counters, indexed by [`crate::counters`].
    pub const COUNTERS: &str = "SG_COUNTERS";
    /// `Array<DnsConfig>` with one entry: where the agent's DNS proxy listens.
    pub const DNS_CONFIG: &str = "SG_DNS_CONFIG";
    /// `LruHashMap<u64 socket cookie, SockKey>`: the resolver a redirected UDP DNS socket
    /// addressed last, so its replies (recvmsg) and its peer (getpeername) show that
    /// resolver, not the proxy.
    pub const DNS_PEERS: &str = "SG_DNS_PEERS";
}

/// Indices into the counters array.
pub mod counters {
    /// Connects redirected to the proxy.
    pub const REDIRECTED: u32 = 0;
    /// Connects and sends denied with EPERM.
    pub const DENIED: u32 = 1;
    /// Deny events that could not be written because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 2;
    /// Redirected connects whose origin could not be stored (map full or error).
    pub const ORIGIN_STORE_FAILED: u32 = 3;
    /// UDP DNS connects and sends redirected to the DNS proxy.
    pub const DNS_REDIRECTED: u32 = 4;
    /// Replies (recvmsg) and peer names (getpeername) rewritten back to the resolver.
    pub const DNS_REWRITTEN: u32 = 5;
    /// Connects and sends of audit-mode workloads that enforce mode would deny, let
    /// through (each reported with [`crate::VERDICT_AUDIT_PASS`]).
    pub const AUDIT_PASSED: u32 = 6;
    /// Number of counters.
    pub const LEN: u32 = 8;
}

/// Global configuration written by the agent (index 0 of [`maps::CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Proxy port in network byte order, in the low 16 bits (as `user_port` expects).
    pub proxy_port_be: u32,
    /// Non-zero once the agent has written a valid configuration.
    pub enabled: u32,
    /// SO_MARK the agent sets on its own upstream sockets; such sockets are never touched.
    pub agent_mark: u32,
    /// Deepest level of any managed cgroup (0 = only the root); ancestors deeper than this
    /// are never looked up.
    pub max_depth: u32,
    /// Network namespace cookie of the agent; a managed socket in another namespace cannot
    /// reach the proxy and is denied.
    pub netns_cookie: u64,
}

/// Where the DNS proxy listens (index 0 of [`maps::DNS_CONFIG`]). A separate map, so the
/// pinned [`Config`] keeps its layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// DNS proxy port (UDP on 127.0.0.1 and [::1]) in network byte order, low 16 bits; 0:
    /// not configured (DNS of managed cgroups is denied).
    pub port_be: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}

/// Per managed cgroup entry (value of [`maps::MANAGED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManagedCgroup {
    /// Index of the workload in the agent's policy snapshot (informational for the kernel).
    pub workload: u32,
    /// Bit flags, see `MANAGED_*`.
    pub flags: u32,
}

/// Where a redirected connection was meant to go, and who opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// Original destination address, network order words ([`FAMILY_V4`] uses word 0).
    pub dst_ip: [u32; 4],
    /// Original destination port, host byte order.
    pub dst_port: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`] of the original destination.
    pub family: u32,
    /// cgroup v2 id of the connecting task.
    pub cgroup_id: u64,
    /// Thread-group id (the process id) of the connecting task.
    pub pid: u32,
    /// Real uid of the connecting task.
    pub uid: u32,
    /// The managed cgroup (the task's own or its nearest managed ancestor) whose policy
    /// applies.
    pub policy_cgroup: u64,
    /// [`ManagedCgroup::workload`] of that cgroup.
    pub workload: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}

/// Key of [`maps::PORTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Workload index.
    pub workload: u32,
    /// Destination port, host byte order.
    pub port: u32,
}

/// Data part of an [`maps::L4`] key. The prefix length counts from the start of this
/// struct: 32 bits of workload, then the address as IPv6 (IPv4 as ::ffff:a.b.c.d), so an
/// IPv4 /24 is prefix 32 + 96 + 24.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L4Key {
    /// Workload index, big-endian (LPM tries compare bytes in order).
    pub workload_be: u32,
    /// Address words, network order.
    pub ip: [u32; 4],
}

/// Maximum ports in one [`L4Allow`].
pub const L4_MAX_PORTS: usize = 8;

/// Value of an [`maps::L4`] entry: the ports allowed per protocol (host order; 0 = an
/// unused slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L4Allow {
    /// Allowed TCP ports.
    pub tcp_ports: [u16; L4_MAX_PORTS],
    /// Allowed UDP ports.
    pub udp_ports: [u16; L4_MAX_PORTS],
}

/// Key of [`maps::ORIGINS`]: the client's local address, as the proxy sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Client local address, network order words ([`FAMILY_V4`] uses word 0, rest zero).
    pub ip: [u32; 4],
    /// Client local port, host byte order.
    pub port: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
}

/// Which hook produced a [`DenyEvent`].
pub mod hooks {
    /// cgroup/connect4.
    pub const CONNECT4: u32 = 1;
    /// cgroup/connect6.
    pub const CONNECT6: u32 = 2;
    /// cgroup/sendmsg4.
    pub const SENDMSG4: u32 = 3;
    /// cgroup/sendmsg6.
    pub const SENDMSG6: u32 = 4;
    /// cgroup/sock_create.
    pub const SOCK_CREATE: u32 = 5;
}

/// Why the kernel denied a connect.
pub mod deny_reasons {
    /// A managed cgroup tried a protocol the proxy cannot handle (not TCP, not DNS).
    pub const PROTOCOL: u32 = 1;
    /// The agent has not configured the hooks yet, so nothing managed may leave.
    pub const NOT_CONFIGURED: u32 = 2;
    /// The redirect could not be recorded, so the proxy could not identify the caller.
    pub const ORIGIN_STORE_FAILED: u32 = 3;
    /// A TCP connect to a port on which the workload has no destination.
    pub const NO_DESTINATION_PORT: u32 = 4;
    /// UDP that is not to an allowed resolver or L4 exception.
    pub const UDP_NOT_ALLOWED: u32 = 5;
    /// A raw or ICMP socket.
    pub const RAW_SOCKET: u32 = 6;
    /// The socket is in another network namespace than the proxy.
    pub const FOREIGN_NETNS: u32 = 7;
    /// The cgroup is managed but has no policy (managed subtree default).
    pub const NO_POLICY: u32 = 8;

    /// Whether `reason` is a refusal *by policy* (something the workload's policy could
    /// grant), which audit mode lets through and reports; every other reason protects the
    /// agent's integrity (no policy, not configured, another network namespace, an origin
    /// that could not be stored, a socket no address hook would see) and is refused in
    /// audit mode too.
    pub const fn audit_passes(reason: u32) -> bool {
        matches!(reason, NO_DESTINATION_PORT | UDP_NOT_ALLOWED)
    }

    /// The audit record's `reason` for a kernel refusal.
    pub const fn code(reason: u32) -> &'static str {
        match reason {
            PROTOCOL => "protocol_not_allowed",
            NOT_CONFIGURED => "agent_not_configured",
            ORIGIN_STORE_FAILED => "origin_store_failed",
            NO_DESTINATION_PORT => "port_not_allowed",
            UDP_NOT_ALLOWED => "udp_not_allowed",
            RAW_SOCKET => "raw_socket_not_allowed",
            FOREIGN_NETNS => "foreign_network_namespace",
            NO_POLICY => "no_policy",
            _ => "kernel_deny",
        }
    }
}

/// [`DenyEvent::verdict`]: the operation was refused (EPERM).
pub const VERDICT_DENY: u32 = 0;
/// [`DenyEvent::verdict`]: the workload is in audit mode and the operation, which enforce
/// mode refuses for [`DenyEvent::reason`], was let through unchanged.
pub const VERDICT_AUDIT_PASS: u32 = 1;

/// A connect or send the kernel denied (or, in audit mode, would have denied and let
/// through), written to [`maps::EVENTS`].
///
/// The ring buffer's definition does not depend on this type, so a pinned buffer is kept
/// across upgrades; events of the older 64-byte form (without `verdict`) are denials.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    /// Monotonic kernel time (ns) of the event.
    pub ts_ns: u64,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// Destination address, network order words.
    pub dst_ip: [u32; 4],
    /// Destination port, host byte order.
    pub dst_port: u32,
    /// Address family of the destination.
    pub family: u32,
    /// Process id.
    pub pid: u32,
    /// Real uid.
    pub uid: u32,
    /// One of [`hooks`].
    pub hook: u32,
    /// One of [`deny_reasons`].
    pub reason: u32,
    /// Socket type (SOCK_STREAM = 1, SOCK_DGRAM = 2).
    pub sock_type: u32,
    /// IP protocol of the socket.
    pub protocol: u32,
    /// [`VERDICT_DENY`] or [`VERDICT_AUDIT_PASS`].
    pub verdict: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}

/// Size of a [`DenyEvent`] written before `verdict` existed (always a denial).
pub const DENY_EVENT_V1_LEN: usize = 64;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, and made only of integers with no padding.
    #![allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::ManagedCgroup {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::DenyEvent {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::L4Key {}
    unsafe impl aya::Pod for super::L4Allow {}
    unsafe impl aya::Pod for super::DnsConfig {}
}
