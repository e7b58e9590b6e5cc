//! The programs themselves (bpf target only).
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_ns,
        generated::{bpf_get_socket_cookie, bpf_getsockopt},
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockOpsContext},
};
use scopegate_common::{
    Config, DenyEvent, FAMILY_V4, FAMILY_V6, ManagedCgroup, Origin, SockKey, counters,
    deny_reasons, hooks,
};

const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const DNS_PORT_BE: u32 = (53u16).to_be() as u32;
/// 127.0.0.1 as the kernel stores it (network order read as a little-endian u32).
const LOOPBACK4: u32 = u32::from_be_bytes([1, 0, 0, 127]);
/// The third word of a v4-mapped IPv6 address (::ffff:0:0/96), network order.
const V4MAPPED_W2: u32 = u32::from_be_bytes([0xff, 0xff, 0, 0]);
/// The last word of ::1, network order.
const LOOPBACK6_W3: u32 = u32::from_be_bytes([1, 0, 0, 0]);

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "SG_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "SG_MANAGED")]
static MANAGED: HashMap<u64, ManagedCgroup> = HashMap::pinned(65536, 0);

#[map(name = "SG_EXEMPT")]
static EXEMPT: HashMap<u64, u8> = HashMap::pinned(1024, 0);

#[map(name = "SG_PENDING")]
static PENDING: LruHashMap<u64, Origin> = LruHashMap::pinned(65536, 0);

#[map(name = "SG_ORIGINS")]
static ORIGINS: LruHashMap<SockKey, Origin> = LruHashMap::pinned(65536, 0);

#[map(name = "SG_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

#[map(name = "SG_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counters::LEN, 0);

#[inline(always)]
fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

/// The destination of a connect, read from the context without branching on the family.
struct Dest {
    ip: [u32; 4],
    port_be: u32,
    family: u32,
}

#[inline(always)]
fn deny(dest: &Dest, cgroup_id: u64, hook: u32, reason: u32, sock_type: u32, protocol: u32) -> i32 {
    bump(counters::DENIED);
    let pid_tgid = bpf_get_current_pid_tgid();
    let event = DenyEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id,
        dst_ip: dest.ip,
        dst_port: u32::from(u16::from_be(dest.port_be as u16)),
        family: dest.family,
        pid: (pid_tgid >> 32) as u32,
        uid: bpf_get_current_uid_gid() as u32,
        hook,
        reason,
        sock_type,
        protocol,
    };
    if EVENTS.output::<DenyEvent>(&event, 0).is_err() {
        bump(counters::EVENTS_LOST);
    }
    DENY
}

/// Policy shared by both hooks once the destination is known.
///
/// Returns `Some(proxy_port_be)` when the connect must be redirected, `None` when it passes
/// untouched, or `Err(verdict)` when it is decided here (denied).
#[inline(always)]
fn classify(
    ctx: &SockAddrContext,
    dest: &Dest,
    hook: u32,
    to_proxy_ip: bool,
) -> Result<Option<u32>, i32> {
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // Fast path: an unmanaged cgroup costs one hash lookup.
    if unsafe { MANAGED.get(&cgroup_id) }.is_none() {
        return Ok(None);
    }
    if unsafe { EXEMPT.get(&cgroup_id) }.is_some() {
        return Ok(None);
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let sock_type = unsafe { (*sa).type_ };
    let protocol = unsafe { (*sa).protocol };
    let Some(config) = CONFIG.get(0) else {
        return Err(deny(
            dest,
            cgroup_id,
            hook,
            deny_reasons::NOT_CONFIGURED,
            sock_type,
            protocol,
        ));
    };
    if config.enabled == 0 {
        return Err(deny(
            dest,
            cgroup_id,
            hook,
            deny_reasons::NOT_CONFIGURED,
            sock_type,
            protocol,
        ));
    }
    // The agent's own upstream sockets carry its SO_MARK (setting a mark needs
    // CAP_NET_ADMIN, which managed workloads must not have).
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
            return Ok(None);
        }
    }
    if sock_type == SOCK_STREAM && protocol == IPPROTO_TCP {
        if to_proxy_ip && dest.port_be == config.proxy_port_be {
            // Already addressed to the proxy: nothing to record or rewrite. The proxy finds
            // no origin for it and closes it, with an audit record.
            return Ok(None);
        }
        let pid_tgid = bpf_get_current_pid_tgid();
        let origin = Origin {
            dst_ip: dest.ip,
            dst_port: u32::from(u16::from_be(dest.port_be as u16)),
            family: dest.family,
            cgroup_id,
            pid: (pid_tgid >> 32) as u32,
            uid: bpf_get_current_uid_gid() as u32,
        };
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if PENDING.insert(&cookie, &origin, 0).is_err() {
            bump(counters::ORIGIN_STORE_FAILED);
            return Err(deny(
                dest,
                cgroup_id,
                hook,
                deny_reasons::ORIGIN_STORE_FAILED,
                sock_type,
                protocol,
            ));
        }
        bump(counters::REDIRECTED);
        return Ok(Some(config.proxy_port_be));
    }
    if sock_type == SOCK_DGRAM && dest.port_be == DNS_PORT_BE {
        return Ok(None);
    }
    Err(deny(
        dest,
        cgroup_id,
        hook,
        deny_reasons::PROTOCOL,
        sock_type,
        protocol,
    ))
}

/// cgroup/connect4.
#[cgroup_sock_addr(connect4)]
pub fn sg_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let dest = Dest {
        ip: [unsafe { (*sa).user_ip4 }, 0, 0, 0],
        port_be: unsafe { (*sa).user_port },
        family: FAMILY_V4,
    };
    match classify(&ctx, &dest, hooks::CONNECT4, dest.ip[0] == LOOPBACK4) {
        Ok(None) => ALLOW,
        Ok(Some(port_be)) => {
            unsafe {
                (*sa).user_ip4 = LOOPBACK4;
                (*sa).user_port = port_be;
            }
            ALLOW
        }
        Err(verdict) => verdict,
    }
}

/// cgroup/connect6. A v4-mapped destination is treated exactly like its IPv4 form and
/// redirected to ::ffff:127.0.0.1; a native IPv6 destination goes to [::1].
#[cgroup_sock_addr(connect6)]
pub fn sg_connect6(ctx: SockAddrContext) -> i32 {
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
    let hook = if mapped {
        hooks::CONNECT4
    } else {
        hooks::CONNECT6
    };
    let (n2, n3) = if mapped {
        (V4MAPPED_W2, LOOPBACK4)
    } else {
        (0, LOOPBACK6_W3)
    };
    let to_proxy_ip = w0 == 0 && w1 == 0 && w2 == n2 && w3 == n3;
    match classify(&ctx, &dest, hook, to_proxy_ip) {
        Ok(None) => ALLOW,
        Ok(Some(proxy_port_be)) => {
            unsafe {
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = n2;
                (*sa).user_ip6[3] = n3;
                (*sa).user_port = proxy_port_be;
            }
            ALLOW
        }
        Err(verdict) => verdict,
    }
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
