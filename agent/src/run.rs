//! `scopegate run`: the control plane, composed in start-up order.
//!
//! 1. load and validate the policy directory (an invalid policy refuses to start);
//! 2. check privileges, find the cgroup2 mount and the cgroup root;
//! 3. load, attach and pin the kernel programs in the *start-up state*: a managed connect
//!    is refused (EPERM, with a deny event recorded once the reader runs), never
//!    redirected. On a restart the pinned hooks enter that state at once;
//! 4. resolve selectors to cgroups and fill the kernel maps: from here every selected
//!    cgroup is refused (on a first start nothing could be managed before this point);
//! 5. bind the proxy listeners;
//! 6. start the audit writer, load the host CA and the upstream trust roots;
//! 7. publish the snapshot, sync the maps, cut connections opened before a cgroup was managed;
//! 8. serve, start the deny-event reader, and only then switch the hooks to redirecting
//!    to the proxy port ([`Kernel::enable`]);
//!    The admin socket (bound in 5) is served and the enforcement health check
//!    (`control::health`) starts here;
//! 9. `READY=1` (sd_notify) and the `scopegate ready` log line: managed connects are decided
//!    from here. Then rescan cgroups periodically; reload on SIGHUP; turn kernel deny events
//!    into audit records (`deny`; an audit-mode workload's passes, `VERDICT_AUDIT_PASS`,
//!    into `would_deny` with the same reason: the cgroup's `MANAGED_AUDIT` flag follows
//!    its policy's mode on every publish); on SIGTERM/SIGINT stop serving and leave the pins in place (fail
//!    closed).
//!
//! So there is no state in which a managed connect is passed unenforced: before step 8 it
//! is refused by the hook, after it the proxy decides it. `STATUS=` lines name each phase.
//!
//! Lifecycle audit records (`audit::lifecycle`): `agent_started` right after the audit
//! writer starts, `policy_reloaded`/`policy_rejected` on every reload attempt, and
//! `agent_stopping` (checkpointed and anchored, awaited up to 10 s) at SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use scopegate_common::{
    L4_MAX_PORTS, L4Allow, L4Key, MANAGED_AUDIT, MANAGED_DNS, MANAGED_HELD,
    MANAGED_RELEASE_REQUESTED, MAX_CGROUP_DEPTH, ManagedCgroup, NO_WORKLOAD, PortKey,
    VERDICT_AUDIT_PASS, deny_reasons,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    accept::{AcceptError, Listeners},
    audit::{AuditError, Auditor, Decision, Fault, Record, Sinks, lifecycle},
    bpf::{self, BpfError, Kernel, KernelOptions},
    forward::Upstream,
    pipeline::{self, Shared},
    policy::{L4Protocol, Mode, PolicyErrors, Snapshot},
    resolve::Resolver,
    state::Enforcement,
    workloads::{self, WorkloadsError},
};

/// The SO_MARK on the agent's own upstream sockets ("SG" in ASCII, plus a version nibble).
pub use crate::state::AGENT_MARK;

/// Options of `scopegate run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Policy directory.
    pub policies: PathBuf,
    /// Proxy port on 127.0.0.1 and [::1].
    pub proxy_port: u16,
    /// UDP port of the DNS proxy on 127.0.0.1 and [::1].
    pub dns_port: u16,
    /// resolv.conf naming the host's resolvers (for `dns: system`).
    pub resolv_conf: PathBuf,
    /// Base bpffs pin directory.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory to attach to (default: the cgroup2 mount).
    pub cgroup_root: Option<PathBuf>,
    /// Audit sinks.
    pub audit: Sinks,
    /// How often the cgroup tree is rescanned for new cgroups.
    pub rescan: Duration,
    /// Managed slices: cgroups below them without a policy of their own are denied
    /// everything (paths relative to the cgroup2 mount).
    pub managed_subtrees: Vec<String>,
    /// Start with an empty (deny-all) snapshot when the policy directory is invalid,
    /// instead of refusing to start.
    pub allow_empty: bool,
    /// Loopback address for /metrics and /healthz.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Whether a non-loopback `metrics_addr` is allowed (`--metrics-allow-non-loopback`).
    pub metrics_allow_non_loopback: bool,
    /// State directory (0700): the host CA for TLS interception lives here.
    pub state_dir: PathBuf,
    /// PEM bundle of trust roots for upstream TLS (default: the system's roots).
    pub upstream_ca: Option<PathBuf>,
    /// Header and body read timeouts of proxied requests.
    pub timeouts: crate::state::Timeouts,
    /// Floor and ceiling of the DNS TTLs the agent honours.
    pub dns_ttl: crate::resolve::TtlBounds,
    /// DNS suffixes the host CA is constrained to (X.509 name constraints); empty: none.
    pub ca_name_constraints: Vec<String>,
    /// The admin socket (`control`).
    pub admin_socket: PathBuf,
    /// How often the links and pins are checked (`control::health`).
    pub health_interval: Duration,
}

/// Errors of `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The policy directory is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyErrors),
    /// Missing capabilities.
    #[error("scopegate run needs root or CAP_BPF+CAP_NET_ADMIN+CAP_SYS_ADMIN; missing: {}", missing.join(", "))]
    NotPrivileged {
        /// The missing capabilities.
        missing: Vec<&'static str>,
    },
    /// cgroup problems.
    #[error(transparent)]
    Workloads(#[from] WorkloadsError),
    /// The cgroup root is not under the cgroup2 mount.
    #[error("--cgroup-root {root}: not a cgroup v2 directory under {mount}")]
    CgroupRoot {
        /// The root given.
        root: PathBuf,
        /// The cgroup2 mount.
        mount: PathBuf,
    },
    /// Listening failed.
    #[error(transparent)]
    Accept(#[from] AcceptError),
    /// Audit sink problems.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Kernel program problems.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// The DNS proxy could not start.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// The resolver could not be configured.
    #[error(transparent)]
    Resolve(#[from] crate::resolve::ResolveError),
    /// The host CA could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] crate::tls::CaError),
    /// The upstream trust roots could not be loaded.
    #[error(transparent)]
    UpstreamTls(#[from] crate::tls::UpstreamTlsError),
    /// The admin endpoint could not start.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// The admin socket could not be created.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// Signal handlers or threads could not be set up.
    #[error("starting the agent's signal handlers and threads: {0}")]
    Signal(std::io::Error),
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: RunOptions) -> Result<(), RunError> {
    // 0. descriptors: two per proxied connection, plus the scan and the audit writer
    let nofile = match crate::sys::raise_nofile_limit() {
        Ok((old, new)) if old != new => {
            tracing::info!(
                old,
                new,
                "raised RLIMIT_NOFILE soft limit to the hard limit"
            );
            new
        }
        Ok((old, _)) => {
            tracing::debug!(limit = old, "RLIMIT_NOFILE already at the hard limit");
            old
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE");
            1024
        }
    };
    // 1. policy
    let policy_hash = lifecycle::policy_hash_or_log(&opts.policies);
    let mut start_rejected = None;
    let snapshot = match Snapshot::load_dir(&opts.policies) {
        Ok(snapshot) => Arc::new(snapshot),
        Err(errors) if opts.allow_empty => {
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            tracing::error!("invalid policy; starting deny-all because of --allow-empty");
            start_rejected = Some(lifecycle::policy_rejected(
                policy_hash.clone(),
                "start",
                &errors.0,
            ));
            Arc::new(Snapshot::empty())
        }
        Err(errors) => return Err(errors.into()),
    };
    tracing::info!(
        dir = %opts.policies.display(),
        workloads = snapshot.workloads().len(),
        "policy loaded"
    );
    // 2. privileges and cgroups
    crate::service::status("checking privileges and cgroups");
    check_privileges()?;
    let mount = workloads::cgroup2_mount()?;
    let root = opts.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    if !root.starts_with(&mount) || !root.join("cgroup.procs").exists() {
        return Err(RunError::CgroupRoot { root, mount });
    }
    // 3. kernel, in the start-up state: managed connects are refused (EPERM + deny event)
    //    until step 8. On a restart the pinned hooks switch to that state at once.
    crate::service::status("attaching the hooks (managed connects refused)");
    let own_cgroup = workloads::cgroup_of_pid("self")?;
    let own_id = workloads::cgroup_id(&mount.join(own_cgroup.trim_start_matches('/')))?;
    let kernel = Arc::new(Kernel::start(&KernelOptions {
        pin_dir: opts.pin_dir.clone(),
        cgroup_root: root.clone(),
        proxy_port: opts.proxy_port,
        agent_mark: AGENT_MARK,
        dns_port: opts.dns_port,
    })?);
    // 4. the managed set, as early as possible: from here every selected cgroup is refused
    //    (on a first start it was unmanaged until now; its older connections are cut in 7).
    crate::service::status("filling the kernel maps (managed connects refused)");
    let mut scan_incidents = workloads::ScanIncidents::default();
    let start_scan_records;
    {
        // Managed until released: what the pins hold stays held; pending release requests
        // stay pending (they are recorded and applied by the first publish, in 7).
        let _pins = bpf::lock_pins(&opts.pin_dir)?;
        let pinned = crate::release::Pinned::split(&kernel.managed_entries());
        let (resolution, scan_errors) = workloads::resolve_from(
            &snapshot,
            &mount,
            &root,
            &opts.managed_subtrees,
            None,
            &pinned.held,
            &workloads::Fs,
        );
        start_scan_records = scan_incidents.report(&mount, &scan_errors);
        sync_kernel(
            &kernel,
            &snapshot,
            &resolution,
            &pinned.requests,
            own_id,
            false,
        )?;
    }
    // 5. listeners (nothing is redirected to them before step 8)
    crate::service::status("binding the proxy listeners");
    let listeners = Listeners::bind(opts.proxy_port)?;
    let port = listeners.port();
    let dns_sockets = crate::dns::bind_udp(opts.dns_port)?;
    let dns_proxy = match crate::dns::DnsProxy::from_resolv_conf(&opts.resolv_conf) {
        Ok(proxy) => proxy,
        Err(e) => {
            tracing::warn!(error = %e, "`dns: system` queries will get SERVFAIL");
            crate::dns::DnsProxy::default()
        }
    };
    let admin = match opts.metrics_addr {
        Some(addr) => Some(crate::admin::bind(addr, opts.metrics_allow_non_loopback).await?),
        None => None,
    };
    // The admin socket (control): bound now, served from step 8.
    let admin_socket = crate::control::server::bind(&opts.admin_socket)?;
    let agent_state = Arc::new(crate::control::AgentState::new(
        opts.policies.clone(),
        opts.audit.file.clone(),
        policy_hash.clone(),
        opts.health_interval,
    ));
    // 6. audit
    crate::service::status("starting the audit writer");
    let (auditor, _writer) = Auditor::start(&opts.audit)?;
    auditor.record(lifecycle::agent_started(policy_hash));
    if let Some(rejected) = start_rejected {
        auditor.record(rejected);
    }
    for record in start_scan_records {
        auditor.record(record);
    }
    // TLS: the host CA (interception) and the upstream trust roots.
    let ca = Arc::new(crate::tls::HostCa::load_or_create(
        &opts.state_dir,
        Some(&opts.ca_name_constraints),
    )?);
    let leaves = crate::tls::LeafCache::new(
        ca,
        crate::tls::ca::DEFAULT_LEAF_CAPACITY,
        &[
            crate::tls::upstream::ALPN_H2,
            crate::tls::upstream::ALPN_HTTP1,
        ],
    );
    let upstream_tls = match &opts.upstream_ca {
        Some(bundle) => Some(crate::tls::UpstreamTls::with_bundle(bundle)?),
        None => match crate::tls::UpstreamTls::system() {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::warn!(error = %e, "no system trust roots; upstream TLS will fail with 502");
                None
            }
        },
    };
    // Proxied connections stay below the fd limit by the control plane's reserve: at most
    // `budget` client connections and `budget` upstream sockets (pooled idle ones and HTTP/2
    // fan-out included). What is open by now (maps, programs, links, listeners, the audit
    // file) is not available to them either.
    let budget = crate::state::descriptor_budget(nofile.saturating_sub(open_descriptors()));
    // 7. the snapshot: published (one swap), then the maps synced again and the
    //    connections that newly managed cgroups opened before they were managed cut.
    let shared = Arc::new(Shared {
        enforcement: ArcSwap::from_pointee(Enforcement::empty()),
        origins: kernel.clone(),
        auditor: auditor.clone(),
        upstream: Upstream::new(
            AGENT_MARK,
            upstream_tls,
            crate::forward::UpstreamSockets::with_budget(budget),
        ),
        resolver: Resolver::with_bounds(
            crate::resolve::DnsLookup::from_resolv_conf(
                &opts.resolv_conf,
                opts.dns_ttl,
                AGENT_MARK,
            )?,
            opts.dns_ttl,
        ),
        limiter: crate::policy::RateLimiter::new(),
        detect_timeout: Duration::from_secs(10),
        leaves: Some(leaves),
        secrets: crate::secrets::Secrets::default(),
        framing: crate::framing::Limits::default(),
        timeouts: opts.timeouts,
        connections: crate::state::ConnectionCounts::with_budget(budget),
        dns: dns_proxy,
    });
    let control = Control {
        shared: shared.clone(),
        kernel: kernel.clone(),
        mount,
        root,
        policies: opts.policies.clone(),
        own_cgroup: own_id,
        subtrees: opts.managed_subtrees.clone(),
        proxy_port: port,
        pin_base: opts.pin_dir.clone(),
        state_dir: opts.state_dir.clone(),
        scan_incidents: std::sync::Mutex::new(scan_incidents),
    };
    crate::service::status("publishing the policy snapshot");
    control.publish(snapshot, true)?;
    // 8. serve, and only then redirect: every managed connect from here on reaches a
    //    listener that decides it against the published snapshot.
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    {
        let shared = shared.clone();
        tokio::spawn(listeners.serve(move |stream, peer, pending| {
            tokio::spawn(pipeline::serve_pending(
                shared.clone(),
                stream,
                peer,
                pending,
            ));
        }));
    }
    for socket in dns_sockets {
        let callers = Arc::new(crate::dns::SockDiagCallers {
            kernel: Some(kernel.clone()),
        });
        tokio::spawn(crate::dns::serve_udp(shared.clone(), socket, callers));
    }
    if let Some(admin) = admin {
        let sources = Arc::new(crate::admin::Sources {
            shared: shared.clone(),
            kernel: kernel.clone(),
            control: agent_state.clone(),
        });
        tokio::spawn(crate::admin::serve(admin, sources));
    }
    if let Some(events) = kernel.take_events() {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("deny-events".into())
            .spawn(move || deny_events(events, shared))
            .map_err(RunError::Signal)?;
    }
    kernel.enable(port)?;
    // The admin socket and the enforcement health check (control).
    let (reload_tx, mut admin_reloads) = tokio::sync::mpsc::channel(4);
    tokio::spawn(crate::control::server::serve(
        admin_socket,
        Arc::new(crate::control::server::Context {
            shared: shared.clone(),
            kernel: kernel.clone(),
            state: agent_state.clone(),
            reload: reload_tx,
            mount: control.mount.clone(),
        }),
    ));
    tokio::spawn(crate::control::health::watch(
        kernel.clone(),
        agent_state.clone(),
        shared.auditor.clone(),
    ));
    // 9. ready: managed connects are decided now.
    let workload_count = shared.enforcement.load().policy.workloads().len();
    crate::service::ready(&format!(
        "enforcing {workload_count} workload(s); proxy on port {port}"
    ));
    tracing::info!(
        port,
        pin_dir = %kernel.pin_dir().display(),
        cgroup_root = %control.root.display(),
        "scopegate ready"
    );
    // WATCHDOG=1 from the control loop itself (below), not from a task of its own: a
    // control loop wedged in a scan or a reload stops the pings, and systemd restarts the
    // agent (the pinned hooks refuse managed connects meanwhile).
    let watchdog_every = crate::service::watchdog_interval().map(|i| i / 2);
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rescan = tokio::time::interval(opts.rescan);
    let mut events_lost = kernel.counter(scopegate_common::counters::EVENTS_LOST);
    let (changed_tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    let _watch = match crate::watch::watch(&opts.policies, changed_tx) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the policy directory; reload with SIGHUP");
            None
        }
    };
    let stop = loop {
        tokio::select! {
            _ = rescan.tick() => {
                let current = shared.enforcement.load().policy.clone();
                if let Err(e) = control.publish(current, false) {
                    tracing::error!(error = %e, "cgroup rescan failed");
                }
                // Events the kernel could not deliver (denials and audit-mode passes) are
                // surfaced, never silent.
                let lost = kernel.counter(scopegate_common::counters::EVENTS_LOST);
                if lost > events_lost {
                    let mut record = Record::new("kernel");
                    record.count = Some(lost - events_lost);
                    tracing::error!(lost = lost - events_lost, "kernel deny and audit-pass events lost (ring buffer full)");
                    shared.auditor.guard(record).finish(
                        Decision::Error,
                        None,
                        Some("kernel_events_lost"),
                        Some(Fault::Agent),
                    );
                    events_lost = lost;
                }
            }
            _ = watchdog.tick(), if watchdog_every.is_some() => crate::service::watchdog_ping(),
            _ = hup.recv() => {
                crate::service::reloading();
                agent_state.reloaded(&control.reload("SIGHUP"));
                crate::service::ready("reload done");
            }
            Some(reply) = admin_reloads.recv() => {
                crate::service::reloading();
                let result = control.reload("admin socket");
                agent_state.reloaded(&result);
                let _ = reply.send(result);
                crate::service::ready("reload done");
            }
            Some(()) = changed.recv() => {
                // Debounce: editors write, rename and chmod in bursts.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while changed.try_recv().is_ok() {}
                agent_state.reloaded(&control.reload("policy directory changed"));
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    crate::service::stopping(&format!(
        "stopping ({stop}); the pinned hooks stay attached"
    ));
    // The run's last record: durable, checkpointed and anchored before the agent exits.
    match tokio::time::timeout(Duration::from_secs(10), shared.auditor.stop(stop)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the agent_stopping audit record was not written")
        }
        Err(_) => tracing::error!("the agent_stopping audit record was not written within 10 s"),
    }
    tracing::info!(
        "scopegate stopping; the pinned hooks stay attached (managed connects are refused until restart; `scopegate uninstall` removes them)"
    );
    Ok(())
}

/// How many descriptors this process has open (0 if /proc cannot be read).
fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// The control-plane handle: publishes snapshots and keeps the kernel in step.
struct Control {
    shared: Arc<Shared>,
    kernel: Arc<Kernel>,
    mount: PathBuf,
    root: PathBuf,
    policies: PathBuf,
    /// The agent's own cgroup id.
    own_cgroup: u64,
    /// Managed slices.
    subtrees: Vec<String>,
    /// The proxy port (connections to it are not cut).
    proxy_port: u16,
    /// `--pin-dir` (locked while the managed map is synced).
    pin_base: PathBuf,
    /// `--state-dir` (release requests).
    state_dir: PathBuf,
    /// Scan error kinds recorded in the current incident (see [`workloads::ScanIncidents`]).
    scan_incidents: std::sync::Mutex<workloads::ScanIncidents>,
}

impl Control {
    /// Resolves `policy` against the cgroup tree and, if anything changed, publishes the new
    /// snapshot (one swap) and then syncs the kernel's managed-cgroup map.
    fn publish(&self, policy: Arc<Snapshot>, announce: bool) -> Result<(), BpfError> {
        crate::metrics::global().set_workloads(policy.workloads().iter().map(|w| w.name.as_str()));
        // Managed until released: the pinned map is the source of truth for what stays
        // managed; the lock keeps `scopegate release` out until the map is written back.
        let _pins = bpf::lock_pins(&self.pin_base)?;
        let current = self.shared.enforcement.load();
        let pinned = crate::release::Pinned::split(&self.kernel.managed_entries());
        // A partial view never removes enforcement: what the scan could not see is kept.
        let (resolution, scan_errors) = workloads::resolve_from(
            &policy,
            &self.mount,
            &self.root,
            &self.subtrees,
            Some(&current.cgroups),
            &pinned.held,
            &workloads::Fs,
        );
        let scan_records = self
            .scan_incidents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report(&self.mount, &scan_errors);
        for record in scan_records {
            self.shared.auditor.record(record);
        }
        if Arc::ptr_eq(&current.policy, &policy)
            && *current.cgroups == resolution
            && pinned.requests.is_empty()
        {
            return Ok(());
        }
        // Released cgroups are recorded before the sync below removes them.
        let unrecorded = crate::release::apply_requests(
            &pinned.requests,
            &resolution,
            &current,
            &self.state_dir,
            &self.shared.auditor,
        );
        crate::release::record_newly_held(&current, &resolution, &self.shared.auditor);
        if announce {
            for id in &resolution.unmatched {
                if let Some(w) = policy.workload(*id) {
                    tracing::warn!(
                        workload = %w.name,
                        file = %w.source.display(),
                        selector = ?w.selector,
                        "selector matches no cgroup yet; it is enforced as soon as the cgroup exists"
                    );
                }
            }
        }
        // Cgroups managed from now on: their connections from before are cut below.
        let newly: HashSet<u64> = resolution
            .managed
            .keys()
            .filter(|id| !current.cgroups.managed.contains_key(id) && **id != self.own_cgroup)
            .copied()
            .collect();
        // Publish first: the proxy knows a workload before the kernel redirects it, and a
        // cgroup dropped from policy is denied by the proxy until the map forgets it.
        let enforcement = Arc::new(Enforcement {
            policy,
            cgroups: Arc::new(resolution),
        });
        self.shared.enforcement.store(enforcement.clone());
        sync_kernel(
            &self.kernel,
            &enforcement.policy,
            &enforcement.cgroups,
            &unrecorded,
            self.own_cgroup,
            announce,
        )?;
        // The hooks now decide every new connect of those cgroups; what they had opened
        // before was never decided.
        self.cut_preexisting(&enforcement, &newly);
        Ok(())
    }

    /// Destroys the TCP connections that newly managed cgroups opened before they were
    /// managed (not those to the proxy), one deny record each.
    fn cut_preexisting(&self, enforcement: &Enforcement, newly: &HashSet<u64>) {
        let passes = |sock: &crate::cut::DiagSock| {
            sock.cgroup
                .and_then(|id| enforcement.cgroups.lookup(id))
                .and_then(|info| info.workload)
                .and_then(|w| enforcement.policy.workload(w))
                .is_some_and(|w| l4_passes(w, sock.remote))
        };
        let cut = match crate::cut::cut(newly, self.proxy_port, AGENT_MARK, &passes) {
            Ok(cut) => cut,
            Err(e) => {
                tracing::error!(error = %e, "cannot list TCP sockets to cut pre-existing connections of newly managed cgroups");
                let mut record = lifecycle::cut_failed(&format_args!(
                    "listing TCP sockets (sock_diag dump) for the cgroup ids {newly:?}: {e}{}",
                    lifecycle::errno_name(&e)
                ));
                record.trigger = Some("sock_diag dump".into());
                self.shared.auditor.record(record);
                return;
            }
        };
        for c in cut {
            let mut record = match &c.failed {
                None => Record::new("tcp"),
                Some(e) => lifecycle::cut_failed(&format_args!(
                    "SOCK_DESTROY of {} -> {}: {e}{}",
                    c.sock.local,
                    c.sock.remote,
                    lifecycle::errno_name(e)
                )),
            }
            .with_dst_addr(c.sock.remote);
            record.pid = c.pid;
            record.uid = Some(c.sock.uid);
            if let Some(info) = c.sock.cgroup.and_then(|id| enforcement.cgroups.lookup(id)) {
                record.cgroup = Some(info.path.clone());
                record.workload = info
                    .workload
                    .and_then(|w| enforcement.policy.workload(w))
                    .map(|w| w.name.clone());
            }
            if c.failed.is_some() {
                record.cgroup_id = c.sock.cgroup;
                record.trigger = Some("SOCK_DESTROY".into());
                self.shared.auditor.record(record);
                continue;
            }
            tracing::info!(local = %c.sock.local, remote = %c.sock.remote, pid = ?c.pid, "cut a connection opened before its cgroup was managed");
            self.shared.auditor.guard(record).finish(
                Decision::Deny,
                None,
                Some("preexisting_connection_cut"),
                Some(Fault::Policy),
            );
        }
    }

    /// Reloads the policy directory; an invalid policy keeps the last good snapshot. Every
    /// attempt is recorded (`policy_reloaded` before the new policy decides anything, or
    /// `policy_rejected` with the errors) and returned (for `status` and `scopegate reload`).
    fn reload(&self, why: &str) -> crate::control::protocol::ReloadResult {
        let hash = lifecycle::policy_hash_or_log(&self.policies);
        let mut result = crate::control::protocol::ReloadResult {
            ok: false,
            at: crate::control::state::now(),
            trigger: why.into(),
            policy_hash: hash.clone(),
            workloads: None,
            errors: Vec::new(),
        };
        match Snapshot::load_dir(&self.policies) {
            Ok(snapshot) => {
                let count = snapshot.workloads().len();
                self.shared
                    .auditor
                    .record(lifecycle::policy_reloaded(hash, why));
                result.ok = true;
                result.workloads = Some(count);
                match self.publish(Arc::new(snapshot), true) {
                    Ok(()) => tracing::info!(workloads = count, trigger = why, "policy reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "policy reloaded but the kernel map sync failed");
                        result.errors.push(format!(
                            "policy reloaded but the kernel map sync failed: {e}"
                        ));
                    }
                }
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!("{e}");
                }
                result.errors = errors.0.iter().map(ToString::to_string).collect();
                self.shared
                    .auditor
                    .record(lifecycle::policy_rejected(hash, why, &errors.0));
                tracing::error!("policy reload rejected; keeping the last good policy");
            }
        }
        result
    }
}

/// Makes the kernel maps hold what `policy` resolved to `resolution` needs: the agent's own
/// cgroup exempt (unless a policy selects it), then ports, L4 exceptions, depth and the
/// managed set (held cgroups included: `resolution` carries them; `pending_releases` are
/// release requests not yet recorded, kept held with their flag).
fn sync_kernel(
    kernel: &Kernel,
    policy: &Snapshot,
    resolution: &workloads::Resolution,
    pending_releases: &[u64],
    own_cgroup: u64,
    announce: bool,
) -> Result<(), BpfError> {
    let mut kernel_state = KernelState::from_policy(policy, resolution);
    // A release whose record could not be written stays held (deny-all) with its request
    // flag, so the next publish records and applies it.
    for id in pending_releases {
        kernel_state.managed.insert(
            *id,
            ManagedCgroup {
                workload: NO_WORKLOAD,
                flags: MANAGED_HELD | MANAGED_RELEASE_REQUESTED,
            },
        );
    }
    // The agent's own cgroup is exempt, unless a policy selects it by name: then
    // workloads share it, and only the SO_MARK on the agent's sockets exempts them.
    let shared_with_workloads = resolution
        .lookup(own_cgroup)
        .is_some_and(|info| info.selected);
    if shared_with_workloads && announce {
        tracing::warn!(
            "a policy selects the agent's own cgroup; its upstream sockets are exempted by SO_MARK only"
        );
    }
    let exempt: &[u64] = if shared_with_workloads {
        &[]
    } else {
        &[own_cgroup]
    };
    kernel.sync_exempt(exempt)?;
    kernel_state.apply(kernel)
}

/// What the kernel maps must hold for a snapshot.
#[derive(Debug, Default, PartialEq, Eq)]
struct KernelState {
    /// Selected cgroups (the kernel applies them to descendants itself).
    managed: HashMap<u64, ManagedCgroup>,
    /// Deepest level among them.
    max_depth: u32,
    /// (workload, TCP port) pairs with proxied destinations.
    ports: HashSet<PortKey>,
    /// L4 exceptions: (prefix length, key) → allowed ports and protocols.
    l4: HashMap<(u32, L4Key), L4Allow>,
}

/// Whether the hooks let a TCP connect of `workload` to `remote` straight through (an L4
/// exception), the same rule as the kernel's L4 map. DNS (port 53) of a workload with
/// `dns:` is never straight through: it goes to the DNS proxy.
fn l4_passes(workload: &crate::policy::Workload, remote: std::net::SocketAddr) -> bool {
    let in_range = |addr: std::net::IpAddr, prefix: u8| {
        let bits = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(a) => (u128::from(a.to_ipv6_mapped()), 96),
            std::net::IpAddr::V6(a) => (u128::from(a), 0),
        };
        let (net, offset) = bits(addr);
        let (ip, ip_offset) = bits(remote.ip());
        let len = u32::from(prefix) + offset;
        offset == ip_offset && (len == 0 || (net ^ ip) >> (128 - len.min(128)) == 0)
    };
    let l4 = workload.l4.iter().any(|x| {
        x.protocol == L4Protocol::Tcp
            && x.ports.contains(&remote.port())
            && in_range(x.addr, x.prefix)
    });
    let dns = remote.port() == 53 && workload.dns.is_some();
    l4 && !dns
}

/// The L4 trie key of an address range for a workload.
fn l4_key(workload: u32, addr: std::net::IpAddr, prefix: u8) -> (u32, L4Key) {
    let (v6, bits) = match addr {
        std::net::IpAddr::V4(a) => (a.to_ipv6_mapped(), 96 + u32::from(prefix)),
        std::net::IpAddr::V6(a) => (a, u32::from(prefix)),
    };
    let o = v6.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    (
        32 + bits,
        L4Key {
            workload_be: workload.to_be(),
            ip: [w(0), w(4), w(8), w(12)],
        },
    )
}

/// An LPM trie answers with the longest matching prefix only, so a longer entry must also
/// carry the ports of every shorter entry of the same workload that contains it.
fn inherit_shorter_prefixes(l4: &mut HashMap<(u32, L4Key), L4Allow>) {
    let bits = |key: &L4Key| {
        key.ip
            .iter()
            .fold(0u128, |acc, w| (acc << 32) | u128::from(u32::from_be(*w)))
    };
    let entries: Vec<((u32, L4Key), L4Allow)> = l4.iter().map(|(k, v)| (*k, *v)).collect();
    for ((prefix, key), allow) in l4.iter_mut() {
        for ((outer_prefix, outer), outer_allow) in &entries {
            let ip_prefix = outer_prefix - 32;
            let contains = outer.workload_be == key.workload_be
                && outer_prefix < prefix
                && (ip_prefix == 0 || (bits(outer) ^ bits(key)) >> (128 - ip_prefix) == 0);
            if contains {
                let tcp: Vec<u16> = outer_allow
                    .tcp_ports
                    .iter()
                    .copied()
                    .filter(|p| *p != 0)
                    .collect();
                let udp: Vec<u16> = outer_allow
                    .udp_ports
                    .iter()
                    .copied()
                    .filter(|p| *p != 0)
                    .collect();
                merge_l4(allow, &tcp, L4Protocol::Tcp);
                merge_l4(allow, &udp, L4Protocol::Udp);
            }
        }
    }
}

/// Adds ports of one protocol to an L4 entry, keeping at most [`L4_MAX_PORTS`] per
/// protocol; false when some did not fit.
fn merge_l4(entry: &mut L4Allow, ports: &[u16], protocol: L4Protocol) -> bool {
    let slots = match protocol {
        L4Protocol::Tcp => &mut entry.tcp_ports,
        L4Protocol::Udp => &mut entry.udp_ports,
    };
    let mut fits = true;
    for port in ports {
        if slots.contains(port) {
            continue;
        }
        match slots.iter_mut().find(|p| **p == 0) {
            Some(slot) => *slot = *port,
            None => fits = false,
        }
    }
    fits
}

impl KernelState {
    fn from_policy(policy: &Snapshot, resolution: &workloads::Resolution) -> Self {
        let mut state = Self::default();
        for (id, info) in &resolution.managed {
            if !info.selected {
                continue;
            }
            let workload = info.workload.map_or(NO_WORKLOAD, |w| w.0);
            let policy_of = info.workload.and_then(|w| policy.workload(w));
            let dns = policy_of.is_some_and(|w| w.dns.is_some());
            let audit = policy_of.is_some_and(|w| w.mode() == Mode::Audit);
            let flags = if info.held { MANAGED_HELD } else { 0 }
                | if dns { MANAGED_DNS } else { 0 }
                | if audit { MANAGED_AUDIT } else { 0 };
            state.managed.insert(*id, ManagedCgroup { workload, flags });
            let depth = info.path.split('/').filter(|c| !c.is_empty()).count() as u32;
            state.max_depth = state.max_depth.max(depth);
        }
        // Held cgroups a blind scan could not place: kept, at any depth.
        for id in &resolution.unseen_held {
            state.managed.insert(
                *id,
                ManagedCgroup {
                    workload: NO_WORKLOAD,
                    flags: MANAGED_HELD,
                },
            );
            state.max_depth = MAX_CGROUP_DEPTH;
        }
        for (index, workload) in policy.workloads().iter().enumerate() {
            let w = index as u32;
            for destination in &workload.destinations {
                state.ports.insert(PortKey {
                    workload: w,
                    port: u32::from(destination.port),
                });
            }
            for x in &workload.l4 {
                let entry = state.l4.entry(l4_key(w, x.addr, x.prefix)).or_default();
                if !merge_l4(entry, &x.ports, x.protocol) {
                    tracing::warn!(workload = %workload.name, cidr = %x.addr, "more than {L4_MAX_PORTS} ports for one address range; extra ports ignored");
                }
            }
        }
        inherit_shorter_prefixes(&mut state.l4);
        state
    }

    /// Writes the state. Ports first, then depth, then the managed set: a cgroup becomes
    /// managed only once its destinations are known to the kernel.
    fn apply(&self, kernel: &Kernel) -> Result<(), BpfError> {
        kernel.sync_ports(&self.ports)?;
        kernel.sync_l4(&self.l4)?;
        kernel.set_max_depth(self.max_depth)?;
        kernel.sync_managed(&self.managed)
    }
}

/// Reads deny events from the kernel ring buffer (on its own thread, woken by poll(2)) and
/// records each one.
fn deny_events(mut events: aya::maps::RingBuf<aya::maps::MapData>, shared: Arc<Shared>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    loop {
        while let Some(item) = events.next() {
            if let Some(event) = bpf::parse_deny_event(&item) {
                record_deny_event(&shared, &event);
            }
        }
        let mut fds = [PollFd::new(events.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "polling the deny-event ring buffer failed");
                return;
            }
        }
    }
}

fn record_deny_event(shared: &Shared, event: &scopegate_common::DenyEvent) {
    let enforcement = shared.enforcement.load();
    let proto = match (event.sock_type, event.protocol) {
        (1, 262) => "mptcp",
        (1, _) => "tcp",
        (2, 17) => "udp",
        (2, 1 | 58) => "icmp",
        (3, _) => "raw",
        _ => "other",
    };
    let mut record = Record::new(proto).with_dst_addr(bpf::origin_addr(
        event.dst_ip,
        event.dst_port,
        event.family,
    ));
    record.pid = Some(event.pid);
    record.uid = Some(event.uid);
    record.rule = None;
    if let Some(info) = enforcement.cgroups.lookup(event.cgroup_id) {
        record.cgroup = Some(info.path.clone());
        record.workload = info
            .workload
            .and_then(|w| enforcement.policy.workload(w))
            .map(|w| w.name.clone());
    }
    let reason = deny_reasons::code(event.reason);
    record.kernel_event = true;
    // An audit-mode pass: the kernel let it through; the record says what enforce mode
    // would have done, with the same reason.
    let decision = if event.verdict == VERDICT_AUDIT_PASS {
        Decision::WouldDeny
    } else {
        crate::metrics::global().kernel_deny(reason);
        Decision::Deny
    };
    shared
        .auditor
        .guard(record)
        .finish(decision, None, Some(reason), Some(Fault::Policy));
}

/// Checks the effective capabilities the agent needs.
fn check_privileges() -> Result<(), RunError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&'static str> = [
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| caps & (1u64 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RunError::NotPrivileged { missing })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn preexisting_connections_to_l4_exceptions_pass() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("db.yaml"),
            "workload: db\nselect:\n  cgroup: /x\negress:\n  - cidr: 192.0.2.8/29\n    ports: [5432]\n  - cidr: 2001:db8::/32\n    ports: [5432]\ndns: [198.51.100.53]\n",
        )
        .unwrap();
        let snap = Snapshot::load_dir(dir.path()).unwrap();
        let w = &snap.workloads()[0];
        let pass = |a: &str| l4_passes(w, a.parse().unwrap());
        assert!(pass("192.0.2.9:5432"));
        assert!(pass("[2001:db8::7]:5432"));
        assert!(!pass("198.51.100.53:53"), "DNS goes to the DNS proxy");
        assert!(!pass("192.0.2.9:5433"));
        assert!(!pass("192.0.2.16:5432"));
        assert!(!pass("198.51.100.54:53"));
    }

    #[test]
    fn l4_keys_put_v4_in_the_mapped_range() {
        let (prefix, key) = l4_key(7, "192.0.2.0".parse().unwrap(), 24);
        assert_eq!(prefix, 32 + 96 + 24);
        assert_eq!(key.workload_be, 7u32.to_be());
        assert_eq!(key.ip[2], u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        assert_eq!(key.ip[3], u32::from_ne_bytes([192, 0, 2, 0]));
        let (prefix6, _) = l4_key(7, "2001:db8::".parse().unwrap(), 32);
        assert_eq!(prefix6, 64);
    }

    #[test]
    fn longer_prefixes_inherit_the_ports_of_containing_ranges() {
        let mut l4 = HashMap::new();
        let mut db = L4Allow::default();
        merge_l4(&mut db, &[5432], L4Protocol::Tcp);
        l4.insert(l4_key(1, "192.0.2.4".parse().unwrap(), 32), db);
        let mut range = L4Allow::default();
        merge_l4(&mut range, &[514], L4Protocol::Udp);
        l4.insert(l4_key(1, "192.0.2.4".parse().unwrap(), 30), range);
        let mut other_workload = L4Allow::default();
        merge_l4(&mut other_workload, &[9], L4Protocol::Udp);
        l4.insert(l4_key(2, "192.0.2.0".parse().unwrap(), 24), other_workload);
        let mut elsewhere = L4Allow::default();
        merge_l4(&mut elsewhere, &[7], L4Protocol::Tcp);
        l4.insert(l4_key(1, "198.51.100.0".parse().unwrap(), 24), elsewhere);
        inherit_shorter_prefixes(&mut l4);
        let host = l4[&l4_key(1, "192.0.2.4".parse().unwrap(), 32)];
        assert_eq!(host.tcp_ports[..2], [5432, 0]);
        assert_eq!(
            host.udp_ports[..2],
            [514, 0],
            "inherited from the /30, not from workload 2"
        );
        let range = l4[&l4_key(1, "192.0.2.4".parse().unwrap(), 30)];
        assert_eq!(range.tcp_ports[0], 0, "a shorter prefix inherits nothing");
    }

    #[test]
    fn merging_l4_ports_is_per_protocol_and_bounded() {
        let mut entry = L4Allow::default();
        assert!(merge_l4(&mut entry, &[5432, 5433], L4Protocol::Tcp));
        assert!(merge_l4(&mut entry, &[5432, 53], L4Protocol::Udp));
        assert!(merge_l4(&mut entry, &[5432], L4Protocol::Tcp));
        assert_eq!(&entry.tcp_ports[..3], &[5432, 5433, 0]);
        assert_eq!(&entry.udp_ports[..3], &[5432, 53, 0]);
        assert!(!merge_l4(
            &mut entry,
            &[1, 2, 3, 4, 5, 6, 7],
            L4Protocol::Tcp
        ));
        assert!(entry.tcp_ports.iter().all(|p| *p != 0));
    }
}
