//! Identify: who opened an accepted connection, and where it was meant to go.
//!
//! The kernel recorded the original destination and the caller's cgroup, pid and uid, keyed
//! by the client's address as the proxy sees it (see `scopegate-ebpf`). The entry is taken
//! (read and removed), so each origin identifies exactly one connection. The workload is
//! resolved per request from the current snapshot, so a policy change applies to the next
//! request on a live connection.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use scopegate_common::Origin;

use crate::{bpf, policy::WorkloadId, workloads::Resolution};

/// Where the origins of accepted connections come from.
pub trait OriginTable: Send + Sync + 'static {
    /// Takes the origin recorded for a client address, if any.
    fn take(&self, peer: SocketAddr) -> Option<Origin>;
}

impl OriginTable for bpf::Kernel {
    fn take(&self, peer: SocketAddr) -> Option<Origin> {
        self.take_origin(peer)
    }
}

/// An in-memory origin table, filled by hand. For the in-process test tier, which runs the
/// proxy without the kernel programs; users never see it.
#[derive(Debug, Default)]
pub struct StaticOrigins(Mutex<HashMap<SocketAddr, Origin>>);

impl StaticOrigins {
    /// Records the origin of a client address.
    pub fn insert(&self, peer: SocketAddr, origin: Origin) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, origin);
    }
}

impl OriginTable for StaticOrigins {
    fn take(&self, peer: SocketAddr) -> Option<Origin> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer)
    }
}

/// Errors of this stage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentifyError {
    /// No origin was recorded for this client address: it was not redirected by the hooks.
    #[error("no kernel origin recorded for client {peer}")]
    UnknownConnection {
        /// The client address.
        peer: SocketAddr,
    },
}

/// The kernel-attested identity of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The client address as the proxy sees it.
    pub peer: SocketAddr,
    /// Where the client meant to connect.
    pub original_dst: SocketAddr,
    /// cgroup v2 id of the caller.
    pub cgroup_id: u64,
    /// Process id of the caller.
    pub pid: u32,
    /// Real uid of the caller.
    pub uid: u32,
    /// The managed cgroup whose policy the kernel applied (the caller's own cgroup or its
    /// nearest managed ancestor).
    pub policy_cgroup: u64,
    /// The caller's executable, when it could be read (the process may be gone already).
    pub exe: Option<String>,
}

impl Identity {
    /// The caller's workload and cgroup path in a resolution, if the cgroup is managed. A
    /// cgroup created since the last scan is found through the managed ancestor the kernel
    /// recorded; its path is then that ancestor's path followed by `/…`.
    pub fn workload(&self, resolution: &Resolution) -> (Option<WorkloadId>, Option<String>) {
        if let Some(info) = resolution.lookup(self.cgroup_id) {
            return (info.workload, Some(info.path.clone()));
        }
        match resolution.lookup(self.policy_cgroup) {
            Some(info) => (info.workload, Some(format!("{}/…", info.path))),
            None => (None, None),
        }
    }
}

/// Identifies the connection from `peer`.
pub fn identify(table: &dyn OriginTable, peer: SocketAddr) -> Result<Identity, IdentifyError> {
    let origin = table
        .take(peer)
        .ok_or(IdentifyError::UnknownConnection { peer })?;
    Ok(Identity {
        peer,
        original_dst: normalize(bpf::origin_addr(
            origin.dst_ip,
            origin.dst_port,
            origin.family,
        )),
        cgroup_id: origin.cgroup_id,
        pid: origin.pid,
        uid: origin.uid,
        policy_cgroup: origin.policy_cgroup,
        exe: std::fs::read_link(format!("/proc/{}/exe", origin.pid))
            .ok()
            .map(|p| p.display().to_string()),
    })
}

/// A v4-mapped IPv6 address is its IPv4 form.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, addr.port())),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use scopegate_common::FAMILY_V4;

    #[test]
    fn identifies_once_then_misses() {
        let table = StaticOrigins::default();
        let peer: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let key = bpf::sock_key("192.0.2.7:8080".parse().unwrap());
        table.insert(
            peer,
            Origin {
                dst_ip: key.ip,
                dst_port: 8080,
                family: FAMILY_V4,
                cgroup_id: 99,
                pid: 4242,
                uid: 1001,
                policy_cgroup: 98,
                workload: 0,
                _reserved: 0,
            },
        );
        let id = identify(&table, peer).unwrap();
        assert_eq!(id.original_dst, "192.0.2.7:8080".parse().unwrap());
        assert_eq!((id.cgroup_id, id.pid, id.uid), (99, 4242, 1001));
        assert_eq!(
            identify(&table, peer),
            Err(IdentifyError::UnknownConnection { peer })
        );
    }

    #[test]
    fn v4_mapped_is_v4() {
        assert_eq!(
            normalize("[::ffff:192.0.2.1]:80".parse().unwrap()),
            "192.0.2.1:80".parse().unwrap()
        );
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(normalize(v6), v6);
    }
}
