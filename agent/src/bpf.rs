//! The kernel side, from userspace: load the programs, attach them to the cgroup root, pin
//! links and maps under a versioned bpffs directory, and keep the maps in sync.
//!
//! Pinning is what makes scopegate fail closed: the links stay attached when the agent
//! exits or dies, so managed connects keep being redirected to the proxy port (refused when
//! nobody listens) or denied. A restarted or upgraded agent reuses the pinned maps and swaps
//! the program behind each pinned link with `BPF_LINK_UPDATE`: one atomic replacement, no
//! window without hooks and no double attachment. Only when there is no usable pinned link
//! (first start, or a new pin layout version) is a new link attached and pinned; pins of
//! older layout versions are then removed, after the new links are in place.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap as StdHashMap,
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use scopegate_common::{
    Config, DENY_EVENT_V1_LEN, DenyEvent, DnsConfig, FAMILY_V4, L4Allow, L4Key, MAX_CGROUP_DEPTH,
    ManagedCgroup, Origin, PIN_LAYOUT_VERSION, PortKey, SockKey, VERDICT_DENY, counters, maps,
};

use crate::sys;

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/scopegate"));

/// The programs, the name each link is pinned under and the cgroup attach type
/// (`enum bpf_attach_type`) each is attached with.
const PROGRAMS: [(&str, &str, u32); 10] = [
    ("sg_connect4", "link_connect4", 10),
    ("sg_connect6", "link_connect6", 11),
    ("sg_sendmsg4", "link_sendmsg4", 14),
    ("sg_sendmsg6", "link_sendmsg6", 15),
    ("sg_recvmsg4", "link_recvmsg4", 19),
    ("sg_recvmsg6", "link_recvmsg6", 20),
    ("sg_getpeername4", "link_getpeername4", 29),
    ("sg_getpeername6", "link_getpeername6", 30),
    ("sg_sock_create", "link_sock_create", 2),
    ("sg_sock_ops", "link_sock_ops", 3),
];

/// Every map; each is pinned under its own name.
const MAPS: [&str; 11] = [
    maps::CONFIG,
    maps::MANAGED,
    maps::EXEMPT,
    maps::PORTS,
    maps::L4,
    maps::PENDING,
    maps::ORIGINS,
    maps::EVENTS,
    maps::COUNTERS,
    maps::DNS_CONFIG,
    maps::DNS_PEERS,
];

/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The binary was built with AYA_BUILD_SKIP and carries no programs.
    #[error(
        "this scopegate binary was built without its eBPF programs (AYA_BUILD_SKIP); build it with `cargo xtask build`"
    )]
    NoObject,
    /// The pin directory is not on a bpffs and one could not be mounted.
    #[error("{dir}: not on a bpf filesystem and mounting bpffs at {mountpoint} failed: {source}")]
    NoBpffs {
        /// The pin directory.
        dir: PathBuf,
        /// Where a mount was attempted.
        mountpoint: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Loading the object failed.
    #[error(
        "loading the eBPF programs failed (needs root or CAP_BPF+CAP_NET_ADMIN+CAP_SYS_ADMIN): {source}"
    )]
    Load {
        /// The error.
        source: Box<aya::EbpfError>,
    },
    /// A program failed to load, attach or pin.
    #[error("program {program}: {action} failed: {source}")]
    Program {
        /// The program.
        program: &'static str,
        /// What was being done.
        action: &'static str,
        /// The error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map is missing or has the wrong type.
    #[error("map {map}: {source}")]
    Map {
        /// The map.
        map: &'static str,
        /// The error.
        source: MapError,
    },
}

/// Options for [`Kernel::start`].
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// Base pin directory; the layout version is appended (`<dir>/v1`).
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory the programs are attached to.
    pub cgroup_root: PathBuf,
    /// Proxy port (the same on 127.0.0.1 and [::1]).
    pub proxy_port: u16,
    /// SO_MARK set on the agent's own upstream sockets.
    pub agent_mark: u32,
    /// UDP port of the DNS proxy (the same on 127.0.0.1 and [::1]).
    pub dns_port: u16,
}

/// The loaded, attached and pinned programs and the maps the agent writes or reads.
pub struct Kernel {
    /// The loaded programs (re-attached from here by [`Kernel::restore`]).
    ebpf: Mutex<Ebpf>,
    /// The cgroup the programs are attached to.
    cgroup_root: PathBuf,
    /// Each program's kernel id, in [`PROGRAMS`] order.
    program_ids: Vec<u32>,
    /// A second handle on every map, to pin it again ([`Kernel::restore`]), in [`MAPS`] order.
    map_handles: Vec<MapData>,
    managed: Mutex<HashMap<MapData, u64, ManagedCgroup>>,
    exempt: Mutex<HashMap<MapData, u64, u8>>,
    ports: Mutex<HashMap<MapData, PortKey, u8>>,
    l4: Mutex<LpmTrie<MapData, L4Key, L4Allow>>,
    /// The configuration as last written (the map holds exactly this value).
    config: Mutex<(Array<MapData, Config>, Config)>,
    origins: Mutex<HashMap<MapData, SockKey, Origin>>,
    dns_peers: HashMap<MapData, u64, SockKey>,
    counters: PerCpuArray<MapData, u64>,
    events: Mutex<Option<RingBuf<MapData>>>,
    pin_dir: PathBuf,
    /// A shared `flock` on the base pin directory for the agent's lifetime: how
    /// `scopegate uninstall` knows an agent is running ([`agent_running`]).
    running: Mutex<Option<nix::fcntl::Flock<fs::File>>>,
}

/// The versioned pin directory under a base directory.
pub fn versioned_pin_dir(base: &Path) -> PathBuf {
    base.join(format!("v{PIN_LAYOUT_VERSION}"))
}

impl Kernel {
    /// Loads the programs (reusing pinned maps), writes the start-up configuration (managed
    /// connects refused), attaches the programs to the cgroup root and pins the links
    /// (replacing older pins atomically). Nothing is redirected until [`Kernel::enable`].
    pub fn start(opts: &KernelOptions) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NoObject);
        }
        let pin_dir = versioned_pin_dir(&opts.pin_dir);
        ensure_bpffs(&opts.pin_dir)?;
        fs::create_dir_all(&pin_dir).map_err(|source| BpfError::Io {
            path: pin_dir.clone(),
            source,
        })?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(OBJECT)
            .map_err(|e| BpfError::Load {
                source: Box::new(e),
            })?;

        // Configure before attaching (and, on a restart, before anything else: the pinned
        // hooks read this map at once). `enabled: 0` is the start-up state: a managed
        // connect is refused with EPERM and a deny event, never redirected to a proxy that
        // does not serve yet, until [`Kernel::enable`]. Until the first sync, every ancestor
        // level is looked at.
        let base_config = Config {
            proxy_port_be: u32::from(opts.proxy_port.to_be()),
            enabled: 0,
            agent_mark: opts.agent_mark,
            max_depth: MAX_CGROUP_DEPTH,
            netns_cookie: sys::netns_cookie().map_err(|source| BpfError::Io {
                path: "SO_NETNS_COOKIE".into(),
                source,
            })?,
        };
        {
            let map = ebpf.map_mut(maps::CONFIG).ok_or(BpfError::Map {
                map: maps::CONFIG,
                source: MapError::InvalidName {
                    name: maps::CONFIG.into(),
                },
            })?;
            let mut config: Array<_, Config> =
                Array::try_from(map).map_err(|source| BpfError::Map {
                    map: maps::CONFIG,
                    source,
                })?;
            config
                .set(0, base_config, 0)
                .map_err(|source| BpfError::Map {
                    map: maps::CONFIG,
                    source,
                })?;
        }
        {
            let map = ebpf.map_mut(maps::DNS_CONFIG).ok_or(BpfError::Map {
                map: maps::DNS_CONFIG,
                source: MapError::InvalidName {
                    name: maps::DNS_CONFIG.into(),
                },
            })?;
            let mut dns: Array<_, DnsConfig> =
                Array::try_from(map).map_err(|source| BpfError::Map {
                    map: maps::DNS_CONFIG,
                    source,
                })?;
            let value = DnsConfig {
                port_be: u32::from(opts.dns_port.to_be()),
                _reserved: 0,
            };
            dns.set(0, value, 0).map_err(|source| BpfError::Map {
                map: maps::DNS_CONFIG,
                source,
            })?;
        }

        let cgroup = fs::File::open(&opts.cgroup_root).map_err(|source| BpfError::Io {
            path: opts.cgroup_root.clone(),
            source,
        })?;
        let mut program_ids = Vec::with_capacity(PROGRAMS.len());
        for (name, pin, _) in PROGRAMS {
            install(&mut ebpf, name, &cgroup, &pin_dir.join(pin))?;
            program_ids.push(program_id(&ebpf, name)?);
        }
        retire_old_layouts(&opts.pin_dir);
        let map_handles = MAPS
            .iter()
            .map(|name| {
                MapData::from_pin(pin_dir.join(name))
                    .map_err(|source| BpfError::Map { map: name, source })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let managed = take_map(&mut ebpf, maps::MANAGED)?;
        let exempt = take_map(&mut ebpf, maps::EXEMPT)?;
        let ports = take_map(&mut ebpf, maps::PORTS)?;
        let l4 = take_map(&mut ebpf, maps::L4)?;
        let config = take_map(&mut ebpf, maps::CONFIG)?;
        let origins = take_map(&mut ebpf, maps::ORIGINS)?;
        let counters = take_map(&mut ebpf, maps::COUNTERS)?;
        let dns_peers = take_map(&mut ebpf, maps::DNS_PEERS)?;
        let events = take_map(&mut ebpf, maps::EVENTS)?;
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            cgroup_root: opts.cgroup_root.clone(),
            program_ids,
            map_handles,
            managed: Mutex::new(managed),
            exempt: Mutex::new(exempt),
            ports: Mutex::new(ports),
            l4: Mutex::new(l4),
            config: Mutex::new((config, base_config)),
            origins: Mutex::new(origins),
            dns_peers,
            counters,
            events: Mutex::new(Some(events)),
            running: Mutex::new(Some(lock_running(&opts.pin_dir)?)),
            pin_dir,
        })
    }

    /// The versioned pin directory in use.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// What is attached and pinned now, against what the agent loaded: every program's
    /// link pinned (the pin holds a link to this program) and attached to the cgroup root
    /// (`BPF_PROG_QUERY` lists the program id), every map pinned (the pin is this map).
    pub fn check(&self) -> EnforcementCheck {
        let root = fs::File::open(&self.cgroup_root);
        let hooks = PROGRAMS
            .iter()
            .zip(&self.program_ids)
            .map(|((program, pin_name, attach_type), id)| {
                let pin = self.pin_dir.join(pin_name);
                let link = PinnedLink::from_pin(&pin)
                    .ok()
                    .and_then(|link| FdLink::from(link).info().ok());
                let attached = match &root {
                    Ok(root) => sys::bpf_prog_query(root.as_fd(), *attach_type)
                        .is_ok_and(|ids| ids.contains(id)),
                    Err(_) => false,
                };
                HookStatus {
                    program,
                    program_id: *id,
                    link_id: link.as_ref().map(aya::programs::links::LinkInfo::id),
                    pinned: link.is_some_and(|l| l.program_id() == *id),
                    attached,
                    pin,
                }
            })
            .collect();
        let maps = MAPS
            .iter()
            .zip(&self.map_handles)
            .map(|(map, handle)| {
                let pin = self.pin_dir.join(map);
                let ours = handle.info().ok().map(|i| i.id());
                let pinned = ours.is_some()
                    && MapData::from_pin(&pin)
                        .ok()
                        .and_then(|m| m.info().ok())
                        .map(|i| i.id())
                        == ours;
                MapPinStatus { map, pin, pinned }
            })
            .collect();
        EnforcementCheck {
            cgroup_root: self.cgroup_root.clone(),
            root_error: root.err().map(|e| e.to_string()),
            hooks,
            maps,
        }
    }

    /// Puts back what [`Kernel::check`] found missing: the pin directory, every map pin
    /// (the same maps, so no state is lost) and every program that is no longer attached
    /// (a new link, pinned). A program still attached but not pinned (someone else holds
    /// the link) is left alone: attaching it twice would run it twice.
    pub fn restore(&self, found: &EnforcementCheck) -> Result<(), BpfError> {
        fs::create_dir_all(&self.pin_dir).map_err(|source| BpfError::Io {
            path: self.pin_dir.clone(),
            source,
        })?;
        for (status, handle) in found.maps.iter().zip(&self.map_handles) {
            if status.pinned {
                continue;
            }
            match fs::remove_file(&status.pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(BpfError::Io {
                        path: status.pin.clone(),
                        source,
                    });
                }
            }
            handle.pin(&status.pin).map_err(|e| BpfError::Program {
                program: status.map,
                action: "pin map",
                source: Box::new(e),
            })?;
        }
        let cgroup = fs::File::open(&self.cgroup_root).map_err(|source| BpfError::Io {
            path: self.cgroup_root.clone(),
            source,
        })?;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        for hook in &found.hooks {
            if !hook.attached {
                attach_and_pin(&mut ebpf, hook.program, &cgroup, &hook.pin)?;
            }
        }
        // A recreated base directory is a new inode: lock it again.
        let base = self.pin_dir.parent().unwrap_or(&self.pin_dir);
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock_running(base)?);
        Ok(())
    }

    /// Makes the managed-cgroup map equal to `want`: stale entries are removed, new or
    /// changed ones written. Each entry changes atomically on its own.
    pub fn sync_managed(&self, want: &StdHashMap<u64, ManagedCgroup>) -> Result<(), BpfError> {
        let mut map = self.managed.lock().unwrap_or_else(|p| p.into_inner());
        let have: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for (id, value) in want {
            if map.get(id, 0).ok().as_ref() != Some(value) {
                map.insert(id, value, 0).map_err(|source| BpfError::Map {
                    map: maps::MANAGED,
                    source,
                })?;
            }
        }
        for id in have {
            if !want.contains_key(&id) {
                match map.remove(&id) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(source) => {
                        return Err(BpfError::Map {
                            map: maps::MANAGED,
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The managed-cgroup map as it is in the kernel now (the pinned source of truth for
    /// held cgroups).
    pub fn managed_entries(&self) -> StdHashMap<u64, ManagedCgroup> {
        let map = self.managed.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().filter_map(Result::ok).collect()
    }

    /// Sets how deep the hooks look for a managed ancestor.
    pub fn set_max_depth(&self, depth: u32) -> Result<(), BpfError> {
        self.update_config(|c| c.max_depth = depth.min(MAX_CGROUP_DEPTH))
    }

    /// Ends the start-up state: from now on managed TCP connects are redirected to
    /// `proxy_port` (which must already be served). One atomic write of the config entry.
    pub fn enable(&self, proxy_port: u16) -> Result<(), BpfError> {
        self.update_config(|c| {
            c.proxy_port_be = u32::from(proxy_port.to_be());
            c.enabled = 1;
        })
    }

    /// Whether [`Kernel::enable`] has run (managed connects are redirected, not refused).
    pub fn enabled(&self) -> bool {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .enabled
            != 0
    }

    fn update_config(&self, change: impl FnOnce(&mut Config)) -> Result<(), BpfError> {
        let mut guard = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let (map, current) = &mut *guard;
        let mut value = *current;
        change(&mut value);
        map.set(0, value, 0).map_err(|source| BpfError::Map {
            map: maps::CONFIG,
            source,
        })?;
        *current = value;
        Ok(())
    }

    /// Makes the (workload, TCP port) set equal to `want`.
    pub fn sync_ports(&self, want: &std::collections::HashSet<PortKey>) -> Result<(), BpfError> {
        let mut map = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        let have: Vec<PortKey> = map.keys().filter_map(Result::ok).collect();
        for key in want {
            if !have.contains(key) {
                map.insert(key, 1, 0).map_err(|source| BpfError::Map {
                    map: maps::PORTS,
                    source,
                })?;
            }
        }
        for key in have.iter().filter(|k| !want.contains(k)) {
            match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(BpfError::Map {
                        map: maps::PORTS,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Makes the L4 exception trie equal to `want` (prefix length, key) → allow.
    pub fn sync_l4(&self, want: &StdHashMap<(u32, L4Key), L4Allow>) -> Result<(), BpfError> {
        let mut map = self.l4.lock().unwrap_or_else(|p| p.into_inner());
        let have: Vec<Key<L4Key>> = map.keys().filter_map(Result::ok).collect();
        for ((prefix, data), value) in want {
            map.insert(&Key::new(*prefix, *data), value, 0)
                .map_err(|source| BpfError::Map {
                    map: maps::L4,
                    source,
                })?;
        }
        for key in have {
            let (prefix, data) = (key.prefix_len(), key.data());
            if !want.contains_key(&(prefix, data)) {
                match map.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(source) => {
                        return Err(BpfError::Map {
                            map: maps::L4,
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the set of exempt cgroups (never redirected) equal to `want`.
    pub fn sync_exempt(&self, want: &[u64]) -> Result<(), BpfError> {
        let mut map = self.exempt.lock().unwrap_or_else(|p| p.into_inner());
        let have: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for id in want {
            map.insert(id, 1, 0).map_err(|source| BpfError::Map {
                map: maps::EXEMPT,
                source,
            })?;
        }
        for id in have.iter().filter(|id| !want.contains(id)) {
            match map.remove(id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(BpfError::Map {
                        map: maps::EXEMPT,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Takes the origin of an accepted connection (the client's address as the proxy sees
    /// it). The entry is removed, so one origin identifies exactly one connection.
    pub fn take_origin(&self, peer: std::net::SocketAddr) -> Option<Origin> {
        let key = sock_key(peer);
        let mut map = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        let origin = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(origin)
    }

    /// The resolver a redirected UDP DNS socket (by cookie) addressed last.
    pub fn dns_peer(&self, cookie: u64) -> Option<std::net::SocketAddr> {
        let peer = self.dns_peers.get(&cookie, 0).ok()?;
        Some(origin_addr(peer.ip, peer.port, peer.family))
    }

    /// Sum over CPUs of one kernel counter (see `scopegate_common::counters`).
    pub fn counter(&self, index: u32) -> u64 {
        self.counters
            .get(&index, 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    /// Hands out the deny-event ring buffer (once).
    pub fn take_events(&self) -> Option<RingBuf<MapData>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Number of connects the kernel redirected so far.
    pub fn redirected(&self) -> u64 {
        self.counter(counters::REDIRECTED)
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::Map {
        map: name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| BpfError::Map { map: name, source })
}

/// Loads program `name` and puts it behind the link pinned at `pin` ([`attach_and_pin`]).
fn install(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    pin: &Path,
) -> Result<(), BpfError> {
    let err = |action| program_error(name, action);
    let program = ebpf.program_mut(name).ok_or_else(|| not_in_object(name))?;
    match name {
        "sg_sock_ops" => {
            let prog: &mut SockOps = program.try_into().map_err(err("type check"))?;
            prog.load().map_err(err("load"))?;
        }
        "sg_sock_create" => {
            let prog: &mut CgroupSock = program.try_into().map_err(err("type check"))?;
            prog.load().map_err(err("load"))?;
        }
        _ => {
            let prog: &mut CgroupSockAddr = program.try_into().map_err(err("type check"))?;
            prog.load().map_err(err("load"))?;
        }
    }
    attach_and_pin(ebpf, name, cgroup, pin)
}

/// Puts the loaded program `name` behind the link pinned at `pin`: by `BPF_LINK_UPDATE`
/// when such a link exists (atomic, no gap, no double attachment), otherwise by attaching a
/// new link to `cgroup` and pinning it.
fn attach_and_pin(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    pin: &Path,
) -> Result<(), BpfError> {
    let err = |action| program_error(name, action);
    let program = ebpf.program_mut(name).ok_or_else(|| not_in_object(name))?;
    enum Loaded<'a> {
        SockOps(&'a mut SockOps),
        SockAddr(&'a mut CgroupSockAddr),
        Sock(&'a mut CgroupSock),
    }
    let loaded = match name {
        "sg_sock_ops" => Loaded::SockOps(program.try_into().map_err(err("type check"))?),
        "sg_sock_create" => Loaded::Sock(program.try_into().map_err(err("type check"))?),
        _ => Loaded::SockAddr(program.try_into().map_err(err("type check"))?),
    };
    if pin.exists() {
        let prog_fd = match &loaded {
            Loaded::SockOps(p) => p.fd(),
            Loaded::SockAddr(p) => p.fd(),
            Loaded::Sock(p) => p.fd(),
        }
        .map_err(err("program fd"))?;
        let updated = sys::bpf_obj_get(pin)
            .and_then(|link| sys::bpf_link_update(link.as_fd(), prog_fd.as_fd()));
        match updated {
            Ok(()) => {
                tracing::debug!(program = name, pin = %pin.display(), "program replaced behind pinned link");
                return Ok(());
            }
            Err(e) => tracing::warn!(
                program = name,
                pin = %pin.display(),
                error = %e,
                "cannot update the pinned link; attaching a new one"
            ),
        }
    }
    let convert = |e: aya::programs::links::LinkError| BpfError::Program {
        program: name,
        action: "convert link",
        source: Box::new(e),
    };
    let link: FdLink = match loaded {
        Loaded::SockOps(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(err("attach"))?;
            FdLink::try_from(p.take_link(id).map_err(err("take link"))?).map_err(convert)?
        }
        Loaded::SockAddr(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(err("attach"))?;
            FdLink::try_from(p.take_link(id).map_err(err("take link"))?).map_err(convert)?
        }
        Loaded::Sock(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(err("attach"))?;
            FdLink::try_from(p.take_link(id).map_err(err("take link"))?).map_err(convert)?
        }
    };
    replace_pin(link, pin, name)
}

/// The error of `action` on program `name`, for `map_err`.
fn program_error(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(ProgramError) -> BpfError {
    move |e| BpfError::Program {
        program: name,
        action,
        source: Box::new(e),
    }
}

/// The error of a program missing from the object.
fn not_in_object(name: &'static str) -> BpfError {
    BpfError::Program {
        program: name,
        action: "lookup",
        source: "not in the object".into(),
    }
}

/// The kernel id of the loaded program `name`.
fn program_id(ebpf: &Ebpf, name: &'static str) -> Result<u32, BpfError> {
    let program = ebpf.program(name).ok_or_else(|| not_in_object(name))?;
    program
        .info()
        .map(|info| info.id())
        .map_err(|e| BpfError::Program {
            program: name,
            action: "read program info",
            source: Box::new(e),
        })
}

/// One program as [`Kernel::check`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookStatus {
    /// The program's name (`sg_connect4`, …).
    pub program: &'static str,
    /// Its kernel program id.
    pub program_id: u32,
    /// The kernel id of the link pinned at `pin`, if a link is pinned there.
    pub link_id: Option<u32>,
    /// Where its link is pinned.
    pub pin: PathBuf,
    /// The pin holds a link to this program.
    pub pinned: bool,
    /// The program is attached to the cgroup root.
    pub attached: bool,
}

/// One map pin as [`Kernel::check`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapPinStatus {
    /// The map's name.
    pub map: &'static str,
    /// Where it is pinned.
    pub pin: PathBuf,
    /// The pin is this map.
    pub pinned: bool,
}

/// The result of [`Kernel::check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnforcementCheck {
    /// The cgroup the programs must be attached to.
    pub cgroup_root: PathBuf,
    /// Why the cgroup root could not be opened, if it could not.
    pub root_error: Option<String>,
    /// Every program.
    pub hooks: Vec<HookStatus>,
    /// Every map.
    pub maps: Vec<MapPinStatus>,
}

impl EnforcementCheck {
    /// What is wrong, one line each; empty when everything is attached and pinned.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.root_error {
            out.push(format!("cgroup root {}: {e}", self.cgroup_root.display()));
        }
        for h in &self.hooks {
            if !h.attached {
                out.push(format!(
                    "{} (program id {}) is not attached to {}",
                    h.program,
                    h.program_id,
                    self.cgroup_root.display()
                ));
            }
            if !h.pinned {
                out.push(format!(
                    "{}: link pin {} is missing or holds another program",
                    h.program,
                    h.pin.display()
                ));
            }
        }
        for m in &self.maps {
            if !m.pinned {
                out.push(format!(
                    "map {}: pin {} is missing or holds another map",
                    m.map,
                    m.pin.display()
                ));
            }
        }
        out
    }
}

/// Pins `link` at `path`, atomically replacing (and so detaching) any older link pinned
/// there. The new link is attached before the old one goes: no gap.
fn replace_pin(link: FdLink, path: &Path, program: &'static str) -> Result<(), BpfError> {
    let tmp = path.with_file_name(format!(
        "{}_new",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("link")
    ));
    let _ = fs::remove_file(&tmp);
    let pinned: PinnedLink = link.pin(&tmp).map_err(|e| BpfError::Program {
        program,
        action: "pin",
        source: Box::new(e),
    })?;
    fs::rename(&tmp, path).map_err(|source| BpfError::Io {
        path: path.into(),
        source,
    })?;
    // Our fd closes here; the pin keeps the link attached.
    drop(pinned);
    Ok(())
}

/// Removes the pins of older layout versions under `base`, once the current links are in
/// place: their links detach, their maps are freed.
fn retire_old_layouts(base: &Path) {
    let current = versioned_pin_dir(base);
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let old_layout = path != current
            && path.is_dir()
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('v') && n[1..].parse::<u32>().is_ok());
        if old_layout {
            if let Ok(pins) = fs::read_dir(&path) {
                for pin in pins.flatten() {
                    let _ = fs::remove_file(pin.path());
                }
            }
            let _ = fs::remove_dir(&path);
            tracing::info!(dir = %path.display(), "removed pins of an older layout version");
        }
    }
}

/// Makes sure `dir` lives on a bpffs, mounting one at /sys/fs/bpf when that is missing.
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if is_bpffs(probe) {
        return Ok(());
    }
    let mountpoint = PathBuf::from("/sys/fs/bpf");
    if !dir.starts_with(&mountpoint) {
        return Err(BpfError::NoBpffs {
            dir: dir.into(),
            mountpoint,
            source: io::Error::other(
                "the pin directory must be on a bpffs (e.g. under /sys/fs/bpf)",
            ),
        });
    }
    fs::create_dir_all(&mountpoint).map_err(|source| BpfError::Io {
        path: mountpoint.clone(),
        source,
    })?;
    nix::mount::mount(
        Some("bpffs"),
        &mountpoint,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| BpfError::NoBpffs {
        dir: dir.into(),
        mountpoint: mountpoint.clone(),
        source: io::Error::from(e),
    })?;
    tracing::info!(mountpoint = %mountpoint.display(), "mounted bpffs");
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// An exclusive lock on the versioned pin directory (`flock`, released on drop): the agent
/// holds it from reading the managed map to writing it back, `scopegate release` while it
/// edits an entry, so neither undoes the other.
pub fn lock_pins(base: &Path) -> Result<nix::fcntl::Flock<fs::File>, BpfError> {
    let dir = versioned_pin_dir(base);
    let file = fs::File::open(&dir).map_err(|source| BpfError::Io {
        path: dir.clone(),
        source,
    })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        BpfError::Io {
            path: dir,
            source: io::Error::from(e),
        }
    })
}

/// A shared lock on the base pin directory, held by a running agent.
fn lock_running(base: &Path) -> Result<nix::fcntl::Flock<fs::File>, BpfError> {
    let file = fs::File::open(base).map_err(|source| BpfError::Io {
        path: base.into(),
        source,
    })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockShared).map_err(|(_, e)| BpfError::Io {
        path: base.into(),
        source: io::Error::from(e),
    })
}

/// Whether an agent runs on the pin directory `base` (it holds a shared lock on it for its
/// lifetime). False when `base` does not exist.
pub fn agent_running(base: &Path) -> Result<bool, BpfError> {
    let file = match fs::File::open(base) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(BpfError::Io {
                path: base.into(),
                source,
            });
        }
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_probe) => Ok(false),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(true),
        Err((_, e)) => Err(BpfError::Io {
            path: base.into(),
            source: io::Error::from(e),
        }),
    }
}

/// The pinned managed-cgroup map under `base`, opened without loading any program (for
/// `scopegate release`).
pub fn open_pinned_managed(base: &Path) -> Result<HashMap<MapData, u64, ManagedCgroup>, BpfError> {
    let pin = versioned_pin_dir(base).join(maps::MANAGED);
    let data = MapData::from_pin(&pin).map_err(|source| BpfError::Map {
        map: maps::MANAGED,
        source,
    })?;
    HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|source| BpfError::Map {
        map: maps::MANAGED,
        source,
    })
}

/// Removes scopegate's pins under `base` (all layout versions): the links detach and the
/// maps are freed. Enforcement stops; this is the deliberate way to uninstall.
///
/// A directory without any pin is left as it is (0 is returned).
pub fn uninstall(base: &Path) -> Result<usize, BpfError> {
    let has_pins = fs::read_dir(base).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.path().is_dir() && fs::read_dir(e.path()).is_ok_and(|mut pins| pins.next().is_some())
        })
    });
    if !has_pins {
        return Ok(0);
    }
    let mut removed = 0;
    let entries = match fs::read_dir(base) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(BpfError::Io {
                path: base.into(),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            for pin in fs::read_dir(&path)
                .map_err(|source| BpfError::Io {
                    path: path.clone(),
                    source,
                })?
                .flatten()
            {
                fs::remove_file(pin.path()).map_err(|source| BpfError::Io {
                    path: pin.path(),
                    source,
                })?;
                removed += 1;
            }
            fs::remove_dir(&path).map_err(|source| BpfError::Io {
                path: path.clone(),
                source,
            })?;
        }
    }
    fs::remove_dir(base).map_err(|source| BpfError::Io {
        path: base.into(),
        source,
    })?;
    Ok(removed)
}

/// The map key for a peer address as the proxy sees it.
pub fn sock_key(peer: std::net::SocketAddr) -> SockKey {
    match peer {
        std::net::SocketAddr::V4(v4) => SockKey {
            ip: [u32::from_ne_bytes(v4.ip().octets()), 0, 0, 0],
            port: u32::from(v4.port()),
            family: FAMILY_V4,
        },
        std::net::SocketAddr::V6(v6) => {
            if let Some(v4) = v6.ip().to_ipv4_mapped() {
                return sock_key(std::net::SocketAddr::from((v4, v6.port())));
            }
            let o = v6.ip().octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            SockKey {
                ip: [w(0), w(4), w(8), w(12)],
                port: u32::from(v6.port()),
                family: scopegate_common::FAMILY_V6,
            }
        }
    }
}

/// The original destination of an [`Origin`] (or a [`DenyEvent`]) as a socket address.
pub fn origin_addr(ip: [u32; 4], port: u32, family: u32) -> std::net::SocketAddr {
    let port = port as u16;
    if family == FAMILY_V4 {
        std::net::SocketAddr::from((ip[0].to_ne_bytes(), port))
    } else {
        let mut octets = [0u8; 16];
        for (i, word) in ip.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        std::net::SocketAddr::from((std::net::Ipv6Addr::from(octets), port))
    }
}

/// Decodes a deny event from the ring buffer: the current form, or the older 64-byte
/// form without `verdict` (a denial) that a pinned buffer may still hold from before an
/// upgrade. Anything shorter is not an event.
pub fn parse_deny_event(bytes: &[u8]) -> Option<DenyEvent> {
    if bytes.len() < DENY_EVENT_V1_LEN {
        return None;
    }
    let word = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let dword = |i: usize| u64::from(word(i)) | (u64::from(word(i + 4)) << 32);
    Some(DenyEvent {
        ts_ns: dword(0),
        cgroup_id: dword(8),
        dst_ip: [word(16), word(20), word(24), word(28)],
        dst_port: word(32),
        family: word(36),
        pid: word(40),
        uid: word(44),
        hook: word(48),
        reason: word(52),
        sock_type: word(56),
        protocol: word(60),
        verdict: if bytes.len() >= std::mem::size_of::<DenyEvent>() {
            word(64)
        } else {
            VERDICT_DENY
        },
        _reserved: 0,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn sock_keys_match_the_kernel_layout() {
        let k = sock_key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(k.family, FAMILY_V4);
        assert_eq!(k.port, 40000);
        // 127.0.0.1 in network order, read as a native u32, as the kernel stores it.
        assert_eq!(k.ip, [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0]);
        // A v4-mapped peer is keyed as its IPv4 form, as the sock_ops program does.
        assert_eq!(sock_key("[::ffff:127.0.0.1]:40000".parse().unwrap()), k);
        let v6 = sock_key("[::1]:5".parse().unwrap());
        assert_eq!(v6.family, scopegate_common::FAMILY_V6);
        assert_eq!(v6.ip, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
    }

    #[test]
    fn origin_addresses_round_trip() {
        for text in ["192.0.2.7:443", "[2001:db8::7]:8443"] {
            let addr: SocketAddr = text.parse().unwrap();
            let key = sock_key(addr);
            assert_eq!(origin_addr(key.ip, key.port, key.family), addr);
        }
    }

    #[test]
    fn deny_events_decode() {
        let event = DenyEvent {
            ts_ns: 1 << 40,
            cgroup_id: 77,
            dst_ip: [1, 2, 3, 4],
            dst_port: 5432,
            family: FAMILY_V4,
            pid: 42,
            uid: 1001,
            hook: 1,
            reason: 1,
            sock_type: 2,
            protocol: 17,
            verdict: scopegate_common::VERDICT_AUDIT_PASS,
            _reserved: 0,
        };
        assert_eq!(std::mem::size_of::<DenyEvent>(), 72);
        let mut bytes = Vec::new();
        for v in [event.ts_ns, event.cgroup_id] {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        for v in event.dst_ip.iter().chain(&[
            event.dst_port,
            event.family,
            event.pid,
            event.uid,
            event.hook,
            event.reason,
            event.sock_type,
            event.protocol,
            event.verdict,
            0,
        ]) {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_deny_event(&bytes), Some(event));
        // The older form, still in a pinned buffer after an upgrade: a denial.
        let old = parse_deny_event(&bytes[..DENY_EVENT_V1_LEN]).unwrap();
        assert_eq!(old.verdict, VERDICT_DENY);
        assert_eq!((old.reason, old.dst_port, old.pid), (1, 5432, 42));
        // Truncated or empty: not an event.
        assert_eq!(parse_deny_event(&bytes[..DENY_EVENT_V1_LEN - 1]), None);
        assert_eq!(parse_deny_event(&bytes[..10]), None);
        assert_eq!(parse_deny_event(&[]), None);
    }

    #[test]
    fn audit_mode_passes_only_policy_refusals() {
        use scopegate_common::deny_reasons::*;
        assert!(audit_passes(NO_DESTINATION_PORT));
        assert!(audit_passes(UDP_NOT_ALLOWED));
        for integrity in [
            PROTOCOL,
            NOT_CONFIGURED,
            ORIGIN_STORE_FAILED,
            RAW_SOCKET,
            FOREIGN_NETNS,
            NO_POLICY,
            0,
            u32::MAX,
        ] {
            assert!(!audit_passes(integrity), "reason {integrity}");
        }
    }
}
