//! scopegate's kernel programs.
//!
//! * `sg_connect4` / `sg_connect6` (cgroup/connect4, cgroup/connect6): for a socket whose
//!   cgroup is managed, record where a TCP connect was meant to go and rewrite it to the
//!   local proxy; deny (EPERM) every other protocol except DNS, with an event on the ring
//!   buffer.
//!   DNS (UDP and TCP to port 53, any resolver) of a workload whose policy grants DNS is
//!   redirected too: TCP to the proxy like any connect, UDP to the agent's DNS proxy, with
//!   the resolver it addressed remembered per socket.
//! * `sg_recvmsg4` / `sg_recvmsg6` / `sg_getpeername4` / `sg_getpeername6`: a reply from
//!   the DNS proxy (and the peer of a connected DNS socket) shows the resolver the socket
//!   addressed, so stub resolvers accept the answer.
//! * `sg_sock_ops` (sock_ops, TCP_CONNECT_CB): once the client's source port is chosen and
//!   before the SYN leaves, move the recorded origin to a map keyed by the client's local
//!   address, which is exactly the peer address the proxy sees on `accept()`.
//!
//! Everything the programs need from userspace lives in pinned maps, so the hooks keep
//! enforcing (fail closed) while the agent is down.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The programs only exist for the bpf target; `cargo xtask build` builds them.
}
