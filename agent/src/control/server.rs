//! The agent's side of the admin socket: bind (mode 0660, group `scopegate` if it exists),
//! accept with a bound on concurrent connections, read one bounded request line within a
//! timeout, answer one response line, close.
#![forbid(unsafe_code)]

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};

use super::{
    AgentState, ControlError,
    protocol::{
        AuditStatus, CgroupCounts, CgroupEntry, Command, Counters, ExplainRequest, ExplainResult,
        HookEntry, MAX_REQUEST_LINE, PolicyStatus, ReloadResult, Request, Response, Status,
        WorkloadEntry,
    },
};
use crate::{bpf::Kernel, pipeline::Shared};

/// At most this many admin connections are served at once; more are answered `busy`.
pub const MAX_CONNECTIONS: usize = 8;
/// A client must send its whole request line within this time.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Writing the response may take at most this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A reload answer is awaited at most this long.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// A reload asked for over the socket: the control loop answers on the sender.
pub type ReloadRequest = oneshot::Sender<ReloadResult>;

/// What the admin commands read.
pub struct Context {
    /// Proxy state (the published snapshot, the auditor).
    pub shared: Arc<Shared>,
    /// The kernel side (hooks, counters, pinned maps).
    pub kernel: Arc<Kernel>,
    /// Status kept by the control loop.
    pub state: Arc<AgentState>,
    /// The control loop's reload queue.
    pub reload: mpsc::Sender<ReloadRequest>,
    /// The cgroup2 mount (to list pids).
    pub mount: PathBuf,
}

/// The bound socket; the file is removed on drop (if it is still ours).
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the admin socket at `path`: refuses if another agent answers there or the path
/// is not a socket; creates the parent directory (0755) if needed; the socket appears at
/// `path` already with mode 0660 and its group (bound under a temporary name, then renamed).
pub fn bind(path: &Path) -> Result<AdminSocket, ControlError> {
    let err = |action: &'static str| {
        move |source: std::io::Error| ControlError::Bind {
            path: path.to_owned(),
            action,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ControlError::NotASocket { path: path.into() });
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse { path: path.into() });
            }
        }
        Err(_) => {}
    }
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(err("creating its directory"))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .map_err(err("setting its directory's mode"))?;
    }
    let tmp = path.with_file_name(format!(
        ".{}.{}",
        path.file_name()
            .map_or("admin.sock".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err("bind"))?;
    let prepared = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))
        .map_err(err("chmod 0660"))
        .and_then(|()| {
            let group = nix::unistd::Group::from_name("scopegate").ok().flatten();
            nix::unistd::chown(
                &tmp,
                Some(nix::unistd::Uid::from_raw(0)),
                group.map(|g| g.gid),
            )
            .map_err(std::io::Error::from)
            .map_err(err("chown"))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(err("rename into place")));
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let ino = std::fs::symlink_metadata(path).map_err(err("stat"))?.ino();
    Ok(AdminSocket {
        listener,
        path: path.to_owned(),
        ino,
    })
}

/// Serves the socket forever.
pub async fn serve(socket: AdminSocket, ctx: Arc<Context>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match socket.listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    handle(stream, &ctx).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let busy = Response::error(
                        "busy",
                        format!("{MAX_CONNECTIONS} admin connections are open; try again"),
                    );
                    let mut stream = stream;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        stream.write_all(busy.to_line().as_bytes()),
                    )
                    .await;
                });
            }
        }
    }
}

/// Reads one request line: bounded, within [`REQUEST_TIMEOUT`].
async fn read_request(stream: &mut UnixStream) -> Result<Vec<u8>, Response> {
    let mut reader = BufReader::new(stream).take(MAX_REQUEST_LINE as u64 + 1);
    let mut line = Vec::new();
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => Err(Response::error(
            "timeout",
            format!(
                "no complete request line within {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) => Err(Response::error("bad_request", format!("reading: {e}"))),
        Ok(Ok(_)) if line.len() > MAX_REQUEST_LINE => Err(Response::error(
            "too_large",
            format!("the request line is longer than {MAX_REQUEST_LINE} bytes"),
        )),
        Ok(Ok(_)) if !line.ends_with(b"\n") => Err(Response::error(
            "incomplete",
            format!(
                "the connection ended after {} bytes without a newline: half a request",
                line.len()
            ),
        )),
        Ok(Ok(_)) => Ok(line),
    }
}

async fn handle(mut stream: UnixStream, ctx: &Context) {
    let response = match read_request(&mut stream).await {
        Err(response) => response,
        Ok(line) => match Request::parse(&line) {
            Err(ControlError::BadRequest { reason }) => Response::error("bad_request", reason),
            Err(e) => Response::error("bad_request", e.to_string()),
            Ok(request) => dispatch(request, ctx).await,
        },
    };
    if let Some(e) = &response.error {
        tracing::warn!(kind = %e.kind, message = %e.message, "admin socket: refused a request");
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(response.to_line().as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

async fn dispatch(request: Request, ctx: &Context) -> Response {
    let mut response = Response::ok();
    match request.cmd {
        Command::Status => response.status = Some(status(ctx)),
        Command::Workloads => response.workloads = Some(workloads(ctx)),
        Command::Reload => {
            let (tx, rx) = oneshot::channel();
            if ctx.reload.send(tx).await.is_err() {
                return Response::error("failed", "the control loop is not running");
            }
            match tokio::time::timeout(RELOAD_TIMEOUT, rx).await {
                Ok(Ok(result)) => response.reload = Some(result),
                Ok(Err(_)) => return Response::error("failed", "the reload was dropped"),
                Err(_) => {
                    return Response::error(
                        "timeout",
                        format!("no reload result within {} s", RELOAD_TIMEOUT.as_secs()),
                    );
                }
            }
        }
        Command::Explain => {
            let Some(args) = request.explain else {
                return Response::error("bad_request", "cmd explain needs \"explain\"");
            };
            let enforcement = ctx.shared.enforcement.load_full();
            let hash = ctx.state.policy().0;
            // Destination binding with the agent's own resolver and cache (its current
            // answer set), resolved here, before the blocking explanation.
            let known = match crate::policy::cli::request_name(&args.request) {
                Some(name) => {
                    let answers = ctx.shared.resolver.resolve(&name).await.map(|r| {
                        crate::policy::Resolution {
                            addrs: r.addrs,
                            trusted_for: Some(
                                r.valid_until
                                    .saturating_duration_since(std::time::Instant::now()),
                            ),
                        }
                    });
                    Some(crate::policy::cli::KnownAnswers { name, answers })
                }
                None => None,
            };
            let result = tokio::task::spawn_blocking(move || {
                explain(&enforcement.policy, args, known.as_ref())
            })
            .await;
            match result {
                Ok(Ok((allowed, text))) => {
                    response.explain = Some(ExplainResult {
                        allowed,
                        text,
                        policy_hash: hash,
                    });
                }
                Ok(Err(e)) => return Response::error("bad_request", e.to_string()),
                Err(e) => return Response::error("failed", e.to_string()),
            }
        }
    }
    response
}

/// `explain` against the running snapshot.
fn explain(
    snapshot: &crate::policy::Snapshot,
    args: ExplainRequest,
    known: Option<&crate::policy::cli::KnownAnswers>,
) -> Result<(bool, String), crate::policy::cli::PolicyCliError> {
    let input = crate::policy::cli::ExplainInput {
        workload: args.workload,
        request: args.request,
        headers: args.headers,
        body: args
            .body
            .map(|b| ("the request body".to_owned(), b.into_bytes())),
        at: args.at,
        uid: args.uid,
        json: args.json,
    };
    let none = crate::policy::cli::KnownAnswers {
        name: String::new(),
        answers: Err("not a name".to_owned()),
    };
    crate::policy::cli::explain_in(snapshot, &input, known.unwrap_or(&none))
}

/// `status` lists grants that end within this many days.
const EXPIRING_WITHIN_DAYS: i64 = 14;

/// `status`: read now from the kernel, the snapshot, the auditor and the control state.
pub fn status(ctx: &Context) -> Status {
    let (started_at, uptime) = ctx.state.started();
    let (hash, loaded_at) = ctx.state.policy();
    let enforcement = ctx.shared.enforcement.load();
    let check = ctx.kernel.check();
    let pinned = ctx.kernel.managed_entries();
    let audit = ctx.shared.auditor.metrics();
    let k = &ctx.kernel;
    use scopegate_common::counters as c;
    Status {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        started_at,
        uptime_secs: uptime.as_secs(),
        policy: PolicyStatus {
            dir: ctx.state.policy_dir.display().to_string(),
            hash,
            loaded_at,
            workloads: enforcement.policy.workloads().len(),
            expiring: crate::policy::expiry::expiring(
                &enforcement.policy,
                jiff::Timestamp::now(),
                jiff::SignedDuration::from_hours(24 * EXPIRING_WITHIN_DAYS),
            )
            .iter()
            .map(ToString::to_string)
            .collect(),
        },
        last_reload: ctx.state.last_reload(),
        enforcement: ctx.state.enforcement(),
        hooks: check
            .hooks
            .iter()
            .map(|h| HookEntry {
                program: h.program.into(),
                program_id: h.program_id,
                link_id: h.link_id,
                pin: h.pin.display().to_string(),
                pinned: h.pinned,
                attached: h.attached,
            })
            .collect(),
        cgroups: CgroupCounts {
            managed: enforcement.cgroups.managed.len(),
            held: enforcement
                .cgroups
                .managed
                .values()
                .filter(|i| i.held)
                .count(),
            unseen_held: enforcement.cgroups.unseen_held.len(),
            release_pending: crate::release::Pinned::split(&pinned).requests.len(),
        },
        audit: AuditStatus {
            healthy: ctx.shared.auditor.healthy(),
            file: ctx
                .state
                .audit_file
                .as_ref()
                .map(|p| p.display().to_string()),
            records_written: audit.records_written,
            write_errors: audit.write_errors,
            queue_depth: audit.queue_depth,
        },
        counters: Counters {
            kernel_redirected: k.counter(c::REDIRECTED),
            kernel_denied: k.counter(c::DENIED),
            kernel_events_lost: k.counter(c::EVENTS_LOST),
            cgroup_scan_errors: crate::workloads::scan_errors(),
        },
    }
}

/// `workloads`: each workload of the running snapshot with its managed cgroups and their
/// pids now (cgroups without a workload — held, or below a managed subtree — last).
pub fn workloads(ctx: &Context) -> Vec<WorkloadEntry> {
    let enforcement = ctx.shared.enforcement.load();
    let mut out: Vec<WorkloadEntry> = enforcement
        .policy
        .workloads()
        .iter()
        .map(|w| WorkloadEntry {
            workload: Some(w.name.clone()),
            file: Some(w.source.display().to_string()),
            cgroups: Vec::new(),
        })
        .collect();
    let mut unowned = WorkloadEntry::default();
    for (id, info) in &enforcement.cgroups.managed {
        let entry = CgroupEntry {
            path: info.path.clone(),
            id: *id,
            selected: info.selected,
            held: info.held,
            pids: pids(&ctx.mount, &info.path),
        };
        match info.workload.and_then(|w| out.get_mut(w.0 as usize)) {
            Some(w) => w.cgroups.push(entry),
            None => unowned.cgroups.push(entry),
        }
    }
    if !unowned.cgroups.is_empty() {
        out.push(unowned);
    }
    for w in &mut out {
        w.cgroups.sort_by(|a, b| a.path.cmp(&b.path));
    }
    out
}

/// The pids in a cgroup (relative to the mount) now; none if it cannot be read.
fn pids(mount: &Path, cgroup: &str) -> Vec<u32> {
    let procs = mount
        .join(cgroup.trim_start_matches('/'))
        .join("cgroup.procs");
    let mut pids: Vec<u32> = std::fs::read_to_string(procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    pids.sort_unstable();
    pids
}
