//! Cut what existed before: when a cgroup becomes managed (agent start, a new policy, a new
//! selection), TCP connections its tasks opened before are destroyed, so nothing that was
//! never decided keeps talking.
//!
//! The kernel's sock_diag netlink interface lists the host namespace's TCP sockets with
//! their cgroup id (`INET_DIAG_CGROUP_ID`) and mark (`INET_DIAG_MARK`), and destroys one by
//! its exact id and cookie (`SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY; what `ss -K` does).
//! Kept: connections to the proxy (already decided there), sockets carrying the agent's
//! mark, and the accepted side of a listening port of the same cgroup (inbound, not
//! egress).
#![allow(
    unsafe_code,
    reason = "raw netlink socket(2), send(2), recv(2); every call is wrapped and checked"
)]

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_MARK: u16 = 15;
const INET_DIAG_CGROUP_ID: u16 = 21;
const TCP_ESTABLISHED: u8 = 1;
const TCP_SYN_SENT: u8 = 2;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LISTEN: u8 = 10;
const NLMSG_HDR: usize = 16;
const SOCKID_LEN: usize = 48;
const REQ_LEN: usize = 8 + SOCKID_LEN;
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// Upper bound on netlink messages read for one dump (bounded loop).
const MAX_MESSAGES: usize = 4_000_000;

/// One TCP socket from a sock_diag dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSock {
    /// AF_INET or AF_INET6 (of the socket).
    pub family: u8,
    /// TCP state.
    pub state: u8,
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
    /// Socket inode (to find the owning process).
    pub inode: u32,
    /// Socket uid.
    pub uid: u32,
    /// cgroup v2 id of the socket, when the kernel reports it.
    pub cgroup: Option<u64>,
    /// SO_MARK, when the kernel reports it.
    pub mark: Option<u32>,
    /// The raw `inet_diag_sockid`, to name the socket back to the kernel.
    id: [u8; SOCKID_LEN],
}

impl DiagSock {
    /// The socket's cookie (as `bpf_get_socket_cookie` returns it).
    pub fn cookie(&self) -> u64 {
        let lo = u32::from_ne_bytes([self.id[40], self.id[41], self.id[42], self.id[43]]);
        let hi = u32::from_ne_bytes([self.id[44], self.id[45], self.id[46], self.id[47]]);
        u64::from(lo) | (u64::from(hi) << 32)
    }
}

fn addr(family: u8, words: &[u8], port: u16) -> SocketAddr {
    let ip = if i32::from(family) == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::new(words[0], words[1], words[2], words[3]))
    } else {
        let mut o = [0u8; 16];
        o.copy_from_slice(&words[..16]);
        let v6 = Ipv6Addr::from(o);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    };
    SocketAddr::new(ip, port)
}

/// Parses the `inet_diag_msg` messages of one netlink datagram. Returns the sockets and
/// whether the dump is done; a netlink error message is an error.
pub fn parse_dump(mut buf: &[u8], out: &mut Vec<DiagSock>) -> io::Result<bool> {
    while buf.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDR || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "short netlink message",
            ));
        }
        let body = &buf[NLMSG_HDR..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= MSG_LEN => {
                let family = body[0];
                let state = body[1];
                let id = &body[4..4 + SOCKID_LEN];
                let sport = u16::from_be_bytes([id[0], id[1]]);
                let dport = u16::from_be_bytes([id[2], id[3]]);
                let tail = &body[4 + SOCKID_LEN..];
                let word =
                    |i: usize| u32::from_ne_bytes([tail[i], tail[i + 1], tail[i + 2], tail[i + 3]]);
                let mut sock = DiagSock {
                    family,
                    state,
                    local: addr(family, &id[4..20], sport),
                    remote: addr(family, &id[20..36], dport),
                    uid: word(12),
                    inode: word(16),
                    cgroup: None,
                    mark: None,
                    id: [0; SOCKID_LEN],
                };
                sock.id.copy_from_slice(id);
                let mut attrs = &body[MSG_LEN..];
                while attrs.len() >= 4 {
                    let alen = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
                    let atype = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    let data = &attrs[4..alen];
                    match (atype, data.len()) {
                        (INET_DIAG_CGROUP_ID, 8) => {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(data);
                            sock.cgroup = Some(u64::from_ne_bytes(b));
                        }
                        (INET_DIAG_MARK, 4) => {
                            sock.mark =
                                Some(u32::from_ne_bytes([data[0], data[1], data[2], data[3]]));
                        }
                        _ => {}
                    }
                    attrs = &attrs[((alen + 3) & !3).min(attrs.len())..];
                }
                out.push(sock);
            }
            _ => {}
        }
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Ok(false)
}

struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked and owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and a timeval with its exact size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(fd))
    }

    fn send(&self, kind: u16, flags: u16, seq: u32, req: &[u8; REQ_LEN]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
        msg.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(req);
        // SAFETY: a valid socket and a buffer with its exact length; the kernel is the
        // default destination of a netlink socket.
        let rc = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        // SAFETY: a valid socket and a writable buffer with its exact length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(&buf[..n as usize])
    }
}

fn request(family: u8, states: u32, id: Option<&[u8; SOCKID_LEN]>) -> [u8; REQ_LEN] {
    let mut req = [0u8; REQ_LEN];
    req[0] = family;
    req[1] = libc::IPPROTO_TCP as u8;
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    if let Some(id) = id {
        req[8..].copy_from_slice(id);
    }
    req
}

/// Every TCP socket of the agent's network namespace in `states` (a bit mask of TCP
/// states), both families.
pub fn dump(states: u32) -> io::Result<Vec<DiagSock>> {
    let nl = Netlink::open()?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (seq, family) in [(1, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        nl.send(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &request(family, states, None),
        )?;
        let mut done = false;
        for _ in 0..MAX_MESSAGES {
            if parse_dump(nl.recv(&mut buf)?, &mut out)? {
                done = true;
                break;
            }
        }
        if !done {
            return Err(io::Error::other("sock_diag dump did not end"));
        }
    }
    Ok(out)
}

/// The UDP socket that would receive a datagram from `remote` to `local` (connected to
/// `remote`, or bound to `local`'s port): the kernel's exact lookup (`SOCK_DIAG_BY_FAMILY`
/// without a dump), with the socket's cgroup id and uid. Ok(None) when there is none.
pub fn udp_socket(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<DiagSock>> {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let family = if local.is_ipv4() && remote.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    };
    let put = |out: &mut [u8], a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) if family == libc::AF_INET as u8 => out[..4].copy_from_slice(&v4.octets()),
        _ => out[..16].copy_from_slice(&v6(a).octets()),
    };
    // The kernel's UDP lookup reads idiag_src/sport as the datagram's source (the remote
    // end) and idiag_dst/dport as the receiving socket's address.
    let mut id = [0u8; SOCKID_LEN];
    id[0..2].copy_from_slice(&remote.port().to_be_bytes());
    id[2..4].copy_from_slice(&local.port().to_be_bytes());
    put(&mut id[4..20], remote);
    put(&mut id[20..36], local);
    id[40..48].copy_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    let mut req = request(family, u32::MAX, Some(&id));
    req[1] = libc::IPPROTO_UDP as u8;
    let nl = Netlink::open()?;
    nl.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, &req)?;
    let mut buf = vec![0u8; 8192];
    let mut out = Vec::new();
    match parse_dump(nl.recv(&mut buf)?, &mut out) {
        Ok(_) => Ok(out.into_iter().next()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Destroys one socket (`SOCK_DESTROY`): its peer sees a reset, its owner ECONNABORTED.
pub fn destroy(sock: &DiagSock) -> io::Result<()> {
    let nl = Netlink::open()?;
    nl.send(
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        1,
        &request(sock.family, u32::MAX, Some(&sock.id)),
    )?;
    let mut buf = vec![0u8; 4096];
    let mut ignored = Vec::new();
    parse_dump(nl.recv(&mut buf)?, &mut ignored).map(|_| ())
}

/// A socket that [`cut`] destroyed, or failed to.
#[derive(Debug)]
pub struct Cut {
    /// The socket.
    pub sock: DiagSock,
    /// The process holding it, if one was found.
    pub pid: Option<u32>,
    /// Why `SOCK_DESTROY` failed (the connection lives on); None: destroyed.
    pub failed: Option<io::Error>,
}

fn is_proxy(remote: SocketAddr, proxy_port: u16) -> bool {
    remote.port() == proxy_port && remote.ip().is_loopback()
}

/// Which of `socks` belong to `cgroups` and are egress that was never decided.
pub fn to_cut<'s>(
    socks: &'s [DiagSock],
    cgroups: &HashSet<u64>,
    proxy_port: u16,
    agent_mark: u32,
) -> Vec<&'s DiagSock> {
    let listening: HashSet<(u64, u16)> = socks
        .iter()
        .filter(|s| s.state == TCP_LISTEN)
        .filter_map(|s| s.cgroup.map(|c| (c, s.local.port())))
        .collect();
    socks
        .iter()
        .filter(|s| s.state != TCP_LISTEN)
        .filter(|s| s.cgroup.is_some_and(|c| cgroups.contains(&c)))
        .filter(|s| !is_proxy(s.remote, proxy_port))
        .filter(|s| s.mark != Some(agent_mark))
        .filter(|s| {
            s.cgroup
                .is_none_or(|c| !listening.contains(&(c, s.local.port())))
        })
        .collect()
}

/// Socket inode → pid, from /proc/*/fd (best effort, only for the inodes asked for).
fn owners(inodes: &HashSet<u32>) -> HashMap<u32, u32> {
    let mut found = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok());
            if let Some(inode) = inode.filter(|i| inodes.contains(i)) {
                found.entry(inode).or_insert(pid);
            }
        }
        if found.len() == inodes.len() {
            break;
        }
    }
    found
}

/// Destroys every established (or connecting, or half-closed) TCP connection of a task in
/// `cgroups` that is not to the proxy. Returns what was cut, and each socket that could not
/// be destroyed with its error (the caller records both). One that closed meanwhile
/// (ENOENT) is neither. `destroy` is [`destroy`] outside tests.
///
/// `passes(sock)` says whether the hooks would let this connection through now (an L4
/// exception or a DNS resolver of the cgroup's workload); such connections are kept.
pub fn cut(
    cgroups: &HashSet<u64>,
    proxy_port: u16,
    agent_mark: u32,
    passes: &dyn Fn(&DiagSock) -> bool,
) -> io::Result<Vec<Cut>> {
    cut_with(cgroups, proxy_port, agent_mark, passes, &dump, &destroy)
}

/// [`cut`] with its kernel calls given (the seam the tests inject errors through).
fn cut_with(
    cgroups: &HashSet<u64>,
    proxy_port: u16,
    agent_mark: u32,
    passes: &dyn Fn(&DiagSock) -> bool,
    dump: &dyn Fn(u32) -> io::Result<Vec<DiagSock>>,
    destroy: &dyn Fn(&DiagSock) -> io::Result<()>,
) -> io::Result<Vec<Cut>> {
    if cgroups.is_empty() {
        return Ok(Vec::new());
    }
    let states =
        (1u32 << TCP_ESTABLISHED) | (1 << TCP_SYN_SENT) | (1 << TCP_CLOSE_WAIT) | (1 << TCP_LISTEN);
    let socks = dump(states)?;
    let mut doomed = to_cut(&socks, cgroups, proxy_port, agent_mark);
    doomed.retain(|s| !passes(s));
    if doomed.is_empty() {
        return Ok(Vec::new());
    }
    let pids = owners(&doomed.iter().map(|s| s.inode).collect());
    let mut cut = Vec::new();
    for sock in doomed {
        let failed = match destroy(sock) {
            Ok(()) => None,
            // Closed meanwhile: nothing left to cut.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => {
                tracing::error!(
                    local = %sock.local,
                    remote = %sock.remote,
                    error = %e,
                    "cannot destroy a pre-existing connection of a newly managed cgroup"
                );
                Some(e)
            }
        };
        cut.push(Cut {
            sock: sock.clone(),
            pid: pids.get(&sock.inode).copied(),
            failed,
        });
    }
    Ok(cut)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn message(
        family: u8,
        state: u8,
        local: ([u8; 4], u16),
        remote: ([u8; 4], u16),
        cgroup: u64,
    ) -> Vec<u8> {
        let mut body = vec![family, state, 0, 0];
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&local.1.to_be_bytes());
        id[2..4].copy_from_slice(&remote.1.to_be_bytes());
        id[4..8].copy_from_slice(&local.0);
        id[20..24].copy_from_slice(&remote.0);
        body.extend_from_slice(&id);
        let mut tail = [0u8; 20];
        tail[12..16].copy_from_slice(&1000u32.to_ne_bytes());
        tail[16..20].copy_from_slice(&4242u32.to_ne_bytes());
        body.extend_from_slice(&tail);
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        body.extend_from_slice(&cgroup.to_ne_bytes());
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn parses_a_dump_and_picks_undecided_egress() {
        let v4 = libc::AF_INET as u8;
        let mut buf = message(
            v4,
            TCP_ESTABLISHED,
            ([127, 0, 0, 1], 40000),
            ([127, 0, 0, 2], 80),
            7,
        );
        buf.extend(message(
            v4,
            TCP_ESTABLISHED,
            ([127, 0, 0, 1], 40001),
            ([127, 0, 0, 1], 15001),
            7,
        ));
        buf.extend(message(
            v4,
            TCP_LISTEN,
            ([0, 0, 0, 0], 8080),
            ([0, 0, 0, 0], 0),
            7,
        ));
        buf.extend(message(
            v4,
            TCP_ESTABLISHED,
            ([127, 0, 0, 1], 8080),
            ([127, 0, 0, 9], 50000),
            7,
        ));
        buf.extend(message(
            v4,
            TCP_ESTABLISHED,
            ([127, 0, 0, 1], 40002),
            ([127, 0, 0, 2], 80),
            8,
        ));
        let mut done = Vec::new();
        done.extend_from_slice(&(NLMSG_HDR as u32 + 4).to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        buf.extend(done);
        let mut socks = Vec::new();
        assert!(parse_dump(&buf, &mut socks).unwrap());
        assert_eq!(socks.len(), 5);
        assert_eq!(socks[0].remote, "127.0.0.2:80".parse().unwrap());
        assert_eq!(
            (socks[0].cgroup, socks[0].inode, socks[0].uid),
            (Some(7), 4242, 1000)
        );
        let cut = to_cut(&socks, &HashSet::from([7]), 15001, 1);
        // Not the proxy connection, not the listener, not its accepted side, not cgroup 8.
        assert_eq!(cut, vec![&socks[0]]);
    }

    /// A dump that fails is an error of the whole cut; a destroy that fails is returned
    /// with its error (not dropped); one that finds the socket gone is neither.
    #[test]
    fn failed_destroys_and_dumps_are_reported_not_dropped() {
        let v4 = libc::AF_INET as u8;
        let mut buf = Vec::new();
        for port in [40000, 40001, 40002] {
            buf.extend(message(
                v4,
                TCP_ESTABLISHED,
                ([127, 0, 0, 1], port),
                ([127, 0, 0, 2], 80),
                7,
            ));
        }
        let mut socks = Vec::new();
        parse_dump(&buf, &mut socks).unwrap();
        let dumped = |_states: u32| Ok(socks.clone());
        let destroy = |sock: &DiagSock| match sock.local.port() {
            40000 => Ok(()),
            40001 => Err(io::Error::from_raw_os_error(libc::EPERM)),
            _ => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        };
        let none = |_: &DiagSock| false;
        let cut = cut_with(&HashSet::from([7]), 15001, 1, &none, &dumped, &destroy).unwrap();
        assert_eq!(cut.len(), 2, "{cut:?}");
        assert!(cut[0].failed.is_none());
        assert_eq!(cut[0].sock.local.port(), 40000);
        assert_eq!(cut[1].sock.local.port(), 40001);
        let err = cut[1].failed.as_ref().unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        let failing = |_states: u32| Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        let err = cut_with(&HashSet::from([7]), 15001, 1, &none, &failing, &destroy).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS));
    }
}
