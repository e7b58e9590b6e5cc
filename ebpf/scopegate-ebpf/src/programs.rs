//! The programs themselves (bpf target only).
//!
//! Every hook first finds the socket's *policy cgroup*: the task's own cgroup if it is in
//! `SG_MANAGED`, else its nearest managed ancestor (via `bpf_get_current_ancestor_cgroup_id`,
//! deepest first, down to the configured depth). That closes the race between `mkdir` of a
//! new child cgroup and the agent noticing it: the child inherits from its first
//! connect. A cgroup without a managed ancestor is untouched (one hash lookup per level).
//!
//! Audit mode (`MANAGED_AUDIT` on the policy cgroup): what enforce mode refuses *by policy*
//! (`deny_reasons::audit_passes`: a TCP port no destination names, UDP that is neither an L4
//! exception nor granted DNS) is let through unchanged, not redirected, and reported on
//! the ring buffer with `VERDICT_AUDIT_PASS` and the reason enforce mode would give, so the
//! agent records one `would_deny` per connect or send. Passing straight through keeps the
//! proxy out of traffic it has no policy for and adds no path that enforce mode could
//! take. Integrity refusals (not configured, another network namespace, no policy, an
//! origin that could not be stored, sockets no address hook sees) are refusals in both
//! modes.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_ns,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_getsockopt,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use scopegate_common::{
    Config, DNS_PORT, DenyEvent, DnsConfig, FAMILY_V4, FAMILY_V6, L4_MAX_PORTS, L4Allow, L4Key,
    MANAGED_AUDIT, MANAGED_DNS, MAX_CGROUP_DEPTH, ManagedCgroup, NO_WORKLOAD, Origin, PortKey,
    SockKey, VERDICT_AUDIT_PASS, VERDICT_DENY, counters, deny_reasons, hooks,
};

const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;
/// 127.0.0.1 as the kernel stores it (network order read as a little-endian u32).
const LOOPBACK4: u32 = u32::from_be_bytes([1, 0, 0, 127]);
/// The third word of a v4-mapped IPv6 address (::ffff:0:0/96), network order.
const V4MAPPED_W2: u32 = u32::from_be_bytes([0xff, 0xff, 0, 0]);
/// The last word of ::1, network order.
const LOOPBACK6_W3: u32 = u32::from_be_bytes([1, 0, 0, 0]);
/// LPM prefix length of a full lookup key: 32 bits of workload + 128 bits of address.
const L4_FULL_PREFIX: u32 = 32 + 128;

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "SG_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "SG_MANAGED")]
static MANAGED: HashMap<u64, ManagedCgroup> = HashMap::pinned(65536, 0);

#[map(name = "SG_EXEMPT")]
static EXEMPT: HashMap<u64, u8> = HashMap::pinned(1024, 0);

#[map(name = "SG_PORTS")]
static PORTS: HashMap<PortKey, u8> = HashMap::pinned(65536, 0);

#[map(name = "SG_L4")]
static L4: LpmTrie<L4Key, L4Allow> = LpmTrie::pinned(65536, 0);

#[map(name = "SG_PENDING")]
static PENDING: LruHashMap<u64, Origin> = LruHashMap::pinned(65536, 0);

#[map(name = "SG_ORIGINS")]
static ORIGINS: LruHashMap<SockKey, Origin> = LruHashMap::pinned(65536, 0);

#[map(name = "SG_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

#[map(name = "SG_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::LEN, 0);

#[map(name = "SG_DNS_CONFIG")]
static DNS_CONFIG: Array<DnsConfig> = Array::pinned(1, 0);

#[map(name = "SG_DNS_PEERS")]
static DNS_PEERS: LruHashMap<u64, SockKey> = LruHashMap::pinned(65536, 0);

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

/// The managed cgroup whose policy applies to the current task, if any.
#[inline(always)]
fn policy_cgroup(max_depth: u32) -> Option<(u64, ManagedCgroup)> {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(m) = unsafe { MANAGED.get(&own) } {
        return Some((own, *m));
    }
    // Deepest ancestor first: a deeper selection wins over an inherited one.
    let mut level = MAX_CGROUP_DEPTH;
    while level > 0 {
        if level <= max_depth {
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id != 0 && id != own {
                if let Some(m) = unsafe { MANAGED.get(&id) } {
                    return Some((id, *m));
                }
            }
        }
        level -= 1;
    }
    None
}

/// The destination of a connect or send, read from the context without branching on the
/// family.
struct Dest {
    ip: [u32; 4],
    port_be: u32,
    family: u32,
}

impl Dest {
    fn port(&self) -> u32 {
        u32::from(u16::from_be(self.port_be as u16))
    }
}

struct Caller {
    cgroup_id: u64,
    policy_cgroup: u64,
    workload: u32,
    /// The workload's policy grants DNS (redirected to the DNS proxy).
    dns: bool,
    /// The workload's policy is in audit mode (never for `NO_WORKLOAD`).
    audit: bool,
}

/// Reports a refusal (`VERDICT_DENY`) or an audit-mode pass (`VERDICT_AUDIT_PASS`) on the
/// ring buffer; a full buffer is counted in `EVENTS_LOST` either way.
#[inline(always)]
fn emit(
    cgroup_id: u64,
    dest: &Dest,
    hook: u32,
    reason: u32,
    sock_type: u32,
    protocol: u32,
    verdict: u32,
) {
    bump(if verdict == VERDICT_AUDIT_PASS {
        counters::AUDIT_PASSED
    } else {
        counters::DENIED
    });
    // Written in place in the ring buffer: no copy of the event on the (512-byte) stack.
    let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) else {
        bump(counters::EVENTS_LOST);
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points to a reserved, writable DenyEvent in the ring buffer; every field
    // is a plain integer and is written exactly once before the entry is submitted.
    unsafe {
        (*e).ts_ns = bpf_ktime_get_ns();
        (*e).cgroup_id = cgroup_id;
        (*e).dst_ip = dest.ip;
        (*e).dst_port = dest.port();
        (*e).family = dest.family;
        (*e).pid = (pid_tgid >> 32) as u32;
        (*e).uid = bpf_get_current_uid_gid() as u32;
        (*e).hook = hook;
        (*e).reason = reason;
        (*e).sock_type = sock_type;
        (*e).protocol = protocol;
        (*e).verdict = verdict;
        (*e)._reserved = 0;
    }
    entry.submit(0);
}

/// Is `dest` an L4 exception of `workload` for this protocol and port?
#[inline(always)]
fn l4_allowed(workload: u32, dest: &Dest, udp: bool) -> bool {
    let ip = if dest.family == FAMILY_V4 {
        [0, 0, V4MAPPED_W2, dest.ip[0]]
    } else {
        dest.ip
    };
    let key = Key::new(
        L4_FULL_PREFIX,
        L4Key {
            workload_be: workload.to_be(),
            ip,
        },
    );
    let Some(allow) = L4.get(&key) else {
        return false;
    };
    let ports = if udp {
        &allow.udp_ports
    } else {
        &allow.tcp_ports
    };
    let port = dest.port() as u16;
    let mut i = 0;
    while i < L4_MAX_PORTS {
        if ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// What the hook does with a socket address operation.
enum Verdict {
    /// Leave it alone.
    Pass,
    /// Rewrite the destination to the loopback port given (network order): the proxy for
    /// TCP, the DNS proxy for UDP DNS.
    Redirect(u32),
    /// EPERM.
    Deny,
}

/// What [`decide`] concluded: [`Verdict`] before the refusal is reported.
enum Outcome {
    /// [`Verdict::Pass`].
    Pass,
    /// [`Verdict::Redirect`].
    Redirect(u32),
    /// Refused for this `deny_reasons` reason (in audit mode possibly passed, see
    /// [`classify`]).
    Refuse(u32),
}

/// What [`decide`] learnt about the socket, for the event of a refusal.
struct Seen {
    cgroup_id: u64,
    sock_type: u32,
    protocol: u32,
    /// The policy cgroup is in audit mode (and has a policy).
    audit: bool,
}

/// The policy shared by the connect and sendmsg hooks. A refusal is reported once, here:
/// denied (EPERM) in enforce mode, passed in audit mode when it is a refusal by policy.
#[inline(always)]
fn classify(ctx: &SockAddrContext, dest: &Dest, hook: u32, to_proxy_ip: bool) -> Verdict {
    let mut seen = Seen {
        cgroup_id: 0,
        sock_type: 0,
        protocol: 0,
        audit: false,
    };
    match decide(ctx, dest, to_proxy_ip, &mut seen) {
        Outcome::Pass => Verdict::Pass,
        Outcome::Redirect(port_be) => Verdict::Redirect(port_be),
        Outcome::Refuse(reason) => {
            let audit_pass = seen.audit && deny_reasons::audit_passes(reason);
            let verdict = if audit_pass {
                VERDICT_AUDIT_PASS
            } else {
                VERDICT_DENY
            };
            emit(
                seen.cgroup_id,
                dest,
                hook,
                reason,
                seen.sock_type,
                seen.protocol,
                verdict,
            );
            if audit_pass {
                Verdict::Pass
            } else {
                Verdict::Deny
            }
        }
    }
}

/// The decision of [`classify`], before a refusal is reported.
#[inline(always)]
fn decide(ctx: &SockAddrContext, dest: &Dest, to_proxy_ip: bool, seen: &mut Seen) -> Outcome {
    let Some(config) = CONFIG.get(0) else {
        return Outcome::Pass;
    };
    // Fast path: a task without a managed cgroup costs the lookups of policy_cgroup().
    let Some((policy_cgroup, managed)) = policy_cgroup(config.max_depth) else {
        return Outcome::Pass;
    };
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { EXEMPT.get(&cgroup_id) }.is_some() {
        return Outcome::Pass;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let sock_type = unsafe { (*sa).type_ };
    let protocol = unsafe { (*sa).protocol };
    seen.cgroup_id = cgroup_id;
    seen.sock_type = sock_type;
    seen.protocol = protocol;
    if config.enabled == 0 {
        return Outcome::Refuse(deny_reasons::NOT_CONFIGURED);
    }
    // A socket in another network namespace cannot reach the proxy on the host's loopback.
    // Checked before the SO_MARK: inside its own user and network namespace
    // (`unshare -Urn`) an unprivileged task holds CAP_NET_ADMIN there and can set any mark.
    if config.netns_cookie != 0
        && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != config.netns_cookie
    {
        return Outcome::Refuse(deny_reasons::FOREIGN_NETNS);
    }
    // The agent's own upstream sockets carry its SO_MARK (setting a mark needs
    // CAP_NET_ADMIN over the socket's network namespace, which managed workloads must not
    // have in the host's; the namespace was checked above).
    if config.agent_mark != 0 {
        let mut mark: u32 = 0;
        let rc = unsafe {
            bpf_getsockopt(
                ctx.as_ptr(),
                SOL_SOCKET,
                SO_MARK,
                (&mut mark as *mut u32).cast(),
                4,
            )
        };
        if rc == 0 && mark == config.agent_mark {
            return Outcome::Pass;
        }
    }
    let caller = Caller {
        cgroup_id,
        policy_cgroup,
        workload: managed.workload,
        dns: managed.workload != NO_WORKLOAD && managed.flags & MANAGED_DNS != 0,
        audit: managed.workload != NO_WORKLOAD && managed.flags & MANAGED_AUDIT != 0,
    };
    seen.audit = caller.audit;
    // DNS of a workload that may resolve names goes to the DNS proxy, whatever resolver it
    // names and whatever L4 exception would match: names are decided there.
    let dns = caller.dns && dest.port() == DNS_PORT;
    if sock_type == SOCK_STREAM && protocol == IPPROTO_TCP {
        if to_proxy_ip && dest.port_be == config.proxy_port_be {
            // Already addressed to the proxy: nothing to record or rewrite. The proxy finds
            // no origin for it and closes it, with an audit record.
            return Outcome::Pass;
        }
        if caller.workload == NO_WORKLOAD {
            return Outcome::Refuse(deny_reasons::NO_POLICY);
        }
        if !dns && l4_allowed(caller.workload, dest, false) {
            return Outcome::Pass;
        }
        let port_key = PortKey {
            workload: caller.workload,
            port: dest.port(),
        };
        if !dns && unsafe { PORTS.get(&port_key) }.is_none() {
            return Outcome::Refuse(deny_reasons::NO_DESTINATION_PORT);
        }
        let pid_tgid = bpf_get_current_pid_tgid();
        let origin = Origin {
            dst_ip: dest.ip,
            dst_port: dest.port(),
            family: dest.family,
            cgroup_id: caller.cgroup_id,
            pid: (pid_tgid >> 32) as u32,
            uid: bpf_get_current_uid_gid() as u32,
            policy_cgroup: caller.policy_cgroup,
            workload: caller.workload,
            _reserved: 0,
        };
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if PENDING.insert(&cookie, &origin, 0).is_err() {
            bump(counters::ORIGIN_STORE_FAILED);
            return Outcome::Refuse(deny_reasons::ORIGIN_STORE_FAILED);
        }
        bump(counters::REDIRECTED);
        return Outcome::Redirect(config.proxy_port_be);
    }
    if sock_type == SOCK_DGRAM && protocol == IPPROTO_UDP {
        if dns {
            // Not configured yet: nothing to redirect to, so nothing leaves.
            let port_be = DNS_CONFIG.get(0).map_or(0, |c| c.port_be);
            if port_be == 0 {
                return Outcome::Refuse(deny_reasons::NOT_CONFIGURED);
            }
            // The resolver this socket addressed, for the reply's source address.
            let peer = SockKey {
                ip: dest.ip,
                port: dest.port(),
                family: dest.family,
            };
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if DNS_PEERS.insert(&cookie, &peer, 0).is_err() {
                bump(counters::ORIGIN_STORE_FAILED);
                return Outcome::Refuse(deny_reasons::ORIGIN_STORE_FAILED);
            }
            bump(counters::DNS_REDIRECTED);
            return Outcome::Redirect(port_be);
        }
        if caller.workload != NO_WORKLOAD && l4_allowed(caller.workload, dest, true) {
            return Outcome::Pass;
        }
        return Outcome::Refuse(deny_reasons::UDP_NOT_ALLOWED);
    }
    Outcome::Refuse(deny_reasons::PROTOCOL)
}

#[inline(always)]
fn dest4(sa: *mut bpf_sock_addr) -> Dest {
    Dest {
        ip: [unsafe { (*sa).user_ip4 }, 0, 0, 0],
        port_be: unsafe { (*sa).user_port },
        family: FAMILY_V4,
    }
}

#[inline(always)]
fn sock_addr4(ctx: SockAddrContext, hook: u32) -> i32 {
    let sa = ctx.sock_addr;
    let dest = dest4(sa);
    match classify(&ctx, &dest, hook, dest.ip[0] == LOOPBACK4) {
        Verdict::Pass => ALLOW,
        Verdict::Redirect(port_be) => {
            unsafe {
                (*sa).user_ip4 = LOOPBACK4;
                (*sa).user_port = port_be;
            }
            ALLOW
        }
        Verdict::Deny => DENY,
    }
}

/// A v4-mapped destination is treated exactly like its IPv4 form and redirected to
/// ::ffff:127.0.0.1; a native IPv6 destination goes to [::1].
#[inline(always)]
fn sock_addr6(ctx: SockAddrContext, hook6: u32, hook4: u32) -> i32 {
    let sa = ctx.sock_addr;
    // Each word is read unconditionally; the verifier rejects array reads of user_ip6.
    let w0 = unsafe { (*sa).user_ip6[0] };
    let w1 = unsafe { (*sa).user_ip6[1] };
    let w2 = unsafe { (*sa).user_ip6[2] };
    let w3 = unsafe { (*sa).user_ip6[3] };
    let port_be = unsafe { (*sa).user_port };
    let mapped = w0 == 0 && w1 == 0 && w2 == V4MAPPED_W2;
    let dest = if mapped {
        Dest {
            ip: [w3, 0, 0, 0],
            port_be,
            family: FAMILY_V4,
        }
    } else {
        Dest {
            ip: [w0, w1, w2, w3],
            port_be,
            family: FAMILY_V6,
        }
    };
    let hook = if mapped { hook4 } else { hook6 };
    let (n2, n3) = if mapped {
        (V4MAPPED_W2, LOOPBACK4)
    } else {
        (0, LOOPBACK6_W3)
    };
    let to_proxy_ip = w0 == 0 && w1 == 0 && w2 == n2 && w3 == n3;
    match classify(&ctx, &dest, hook, to_proxy_ip) {
        Verdict::Pass => ALLOW,
        Verdict::Redirect(proxy_port_be) => {
            unsafe {
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = n2;
                (*sa).user_ip6[3] = n3;
                (*sa).user_port = proxy_port_be;
            }
            ALLOW
        }
        Verdict::Deny => DENY,
    }
}

/// cgroup/connect4: TCP connects and connected UDP.
#[cgroup_sock_addr(connect4)]
pub fn sg_connect4(ctx: SockAddrContext) -> i32 {
    sock_addr4(ctx, hooks::CONNECT4)
}

/// cgroup/connect6: TCP connects and connected UDP, IPv6 and v4-mapped.
#[cgroup_sock_addr(connect6)]
pub fn sg_connect6(ctx: SockAddrContext) -> i32 {
    sock_addr6(ctx, hooks::CONNECT6, hooks::CONNECT4)
}

/// cgroup/sendmsg4: unconnected UDP sends.
#[cgroup_sock_addr(sendmsg4)]
pub fn sg_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr4(ctx, hooks::SENDMSG4)
}

/// cgroup/sendmsg6: unconnected UDP sends, IPv6 and v4-mapped.
#[cgroup_sock_addr(sendmsg6)]
pub fn sg_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr6(ctx, hooks::SENDMSG6, hooks::SENDMSG4)
}

/// The DNS proxy's port (network order), if configured.
#[inline(always)]
fn dns_port_be() -> u32 {
    DNS_CONFIG.get(0).map_or(0, |c| c.port_be)
}

/// recvmsg4 / getpeername4: an address that is the DNS proxy, on a socket whose DNS was
/// redirected, is shown as the resolver that socket addressed.
#[inline(always)]
fn restore_resolver4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip = unsafe { (*sa).user_ip4 };
    let port_be = unsafe { (*sa).user_port };
    if ip != LOOPBACK4 {
        return ALLOW;
    }
    let dns = dns_port_be();
    if dns == 0 || port_be != dns {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(peer) = unsafe { DNS_PEERS.get(&cookie) } {
        if peer.family == FAMILY_V4 {
            let peer_ip = peer.ip[0];
            let peer_port_be = u32::from((peer.port as u16).to_be());
            unsafe {
                (*sa).user_ip4 = peer_ip;
                (*sa).user_port = peer_port_be;
            }
            bump(counters::DNS_REWRITTEN);
        }
    }
    ALLOW
}

/// recvmsg6 / getpeername6: like [`restore_resolver4`], for [::1] and ::ffff:127.0.0.1.
#[inline(always)]
fn restore_resolver6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let w0 = unsafe { (*sa).user_ip6[0] };
    let w1 = unsafe { (*sa).user_ip6[1] };
    let w2 = unsafe { (*sa).user_ip6[2] };
    let w3 = unsafe { (*sa).user_ip6[3] };
    let port_be = unsafe { (*sa).user_port };
    let mapped = w0 == 0 && w1 == 0 && w2 == V4MAPPED_W2 && w3 == LOOPBACK4;
    let native = w0 == 0 && w1 == 0 && w2 == 0 && w3 == LOOPBACK6_W3;
    if !mapped && !native {
        return ALLOW;
    }
    let dns = dns_port_be();
    if dns == 0 || port_be != dns {
        return ALLOW;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(peer) = unsafe { DNS_PEERS.get(&cookie) } {
        let words = if peer.family == FAMILY_V4 {
            [0, 0, V4MAPPED_W2, peer.ip[0]]
        } else {
            [peer.ip[0], peer.ip[1], peer.ip[2], peer.ip[3]]
        };
        let peer_port_be = u32::from((peer.port as u16).to_be());
        unsafe {
            (*sa).user_ip6[0] = words[0];
            (*sa).user_ip6[1] = words[1];
            (*sa).user_ip6[2] = words[2];
            (*sa).user_ip6[3] = words[3];
            (*sa).user_port = peer_port_be;
        }
        bump(counters::DNS_REWRITTEN);
    }
    ALLOW
}

/// cgroup/recvmsg4: the source of a DNS reply from the DNS proxy is the original resolver.
#[cgroup_sock_addr(recvmsg4)]
pub fn sg_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_resolver4(ctx)
}

/// cgroup/recvmsg6: the same for IPv6 and v4-mapped sockets.
#[cgroup_sock_addr(recvmsg6)]
pub fn sg_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_resolver6(ctx)
}

/// cgroup/getpeername4: a connected DNS socket's peer is the resolver it connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn sg_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_resolver4(ctx)
}

/// cgroup/getpeername6: the same for IPv6 and v4-mapped sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn sg_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_resolver6(ctx)
}

/// cgroup/sock_create: a managed task may open only plain TCP (`SOCK_STREAM`,
/// `IPPROTO_TCP`) and UDP (`SOCK_DGRAM`, `IPPROTO_UDP`) sockets. Raw and ICMP ("ping")
/// sockets would be seen by no address hook; MPTCP connects through kernel-made TCP
/// subflows that the proxy cannot identify; SCTP, UDP-Lite and the like are not proxied.
/// All of them get EPERM at `socket()`, in audit mode too: no address hook would see what
/// they send, so nothing could be recorded per connect or send. The kernel resolves protocol 0 to TCP or UDP before
/// this hook runs, and its own sockets (MPTCP subflows) never reach it.
#[cgroup_sock(sock_create)]
pub fn sg_sock_create(ctx: SockContext) -> i32 {
    let sk: *mut bpf_sock = ctx.sock;
    let sock_type = unsafe { (*sk).type_ };
    let protocol = unsafe { (*sk).protocol };
    let family = unsafe { (*sk).family };
    let tcp = sock_type == SOCK_STREAM && protocol == IPPROTO_TCP;
    let udp = sock_type == SOCK_DGRAM && protocol == IPPROTO_UDP;
    if tcp || udp {
        return ALLOW;
    }
    let Some(config) = CONFIG.get(0) else {
        return ALLOW;
    };
    if policy_cgroup(config.max_depth).is_none() {
        return ALLOW;
    }
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { EXEMPT.get(&cgroup_id) }.is_some() {
        return ALLOW;
    }
    let raw = sock_type == SOCK_RAW;
    let ping = sock_type == SOCK_DGRAM && (protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6);
    let reason = if raw || ping {
        deny_reasons::RAW_SOCKET
    } else {
        deny_reasons::PROTOCOL
    };
    let dest = Dest {
        ip: [0; 4],
        port_be: 0,
        family,
    };
    emit(
        cgroup_id,
        &dest,
        hooks::SOCK_CREATE,
        reason,
        sock_type,
        protocol,
        VERDICT_DENY,
    );
    DENY
}

/// sock_ops: at TCP_CONNECT_CB, key the recorded origin by the client's local address.
#[sock_ops]
pub fn sg_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    let ops = ctx.ops;
    let family = ctx.family();
    let port = unsafe { (*ops).local_port };
    let v4 = unsafe { (*ops).local_ip4 };
    let w0 = unsafe { (*ops).local_ip6[0] };
    let w1 = unsafe { (*ops).local_ip6[1] };
    let w2 = unsafe { (*ops).local_ip6[2] };
    let w3 = unsafe { (*ops).local_ip6[3] };
    let key = if family == FAMILY_V6 {
        if w0 == 0 && w1 == 0 && w2 == V4MAPPED_W2 {
            SockKey {
                ip: [w3, 0, 0, 0],
                port,
                family: FAMILY_V4,
            }
        } else {
            SockKey {
                ip: [w0, w1, w2, w3],
                port,
                family: FAMILY_V6,
            }
        }
    } else {
        SockKey {
            ip: [v4, 0, 0, 0],
            port,
            family: FAMILY_V4,
        }
    };
    let cookie = unsafe { bpf_get_socket_cookie(ops as *mut c_void) };
    match unsafe { PENDING.get(&cookie) } {
        Some(origin) => {
            let origin = *origin;
            if ORIGINS.insert(&key, &origin, 0).is_err() {
                bump(counters::ORIGIN_STORE_FAILED);
            }
            let _ = PENDING.remove(&cookie);
        }
        None => {
            // A connect that was not redirected. If it goes to the proxy port from an
            // address a stale origin is keyed by, drop that origin so it cannot be reused.
            let remote_port_be = unsafe { (*ops).remote_port } >> 16;
            if let Some(config) = CONFIG.get(0) {
                if remote_port_be == (config.proxy_port_be & 0xffff) {
                    let _ = ORIGINS.remove(&key);
                }
            }
        }
    }
    1
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
