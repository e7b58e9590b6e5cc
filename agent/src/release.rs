//! `scopegate release CGROUP`: the operator's explicit end of enforcement for a *held*
//! cgroup (one that a policy selected once and none selects now; see
//! [`crate::workloads`]).
//!
//! The pinned managed map (`<pin-dir>/v2/SG_MANAGED`) is the source of truth, so the
//! release goes through it, under the pin directory's lock ([`bpf::lock_pins`]) that the
//! agent also holds while it syncs the map:
//!
//! 1. the command resolves CGROUP (relative to the cgroup2 mount) to its id and refuses
//!    unless the map holds it with the `MANAGED_HELD` flag (a cgroup a policy still
//!    selects, a `--managed-subtree` root, a cgroup enforced through a managed ancestor,
//!    or one not managed at all cannot be released);
//! 2. it writes who asked (uid, pid, path, time) to `<state-dir>/releases/<id>.json`
//!    (atomically: temporary file, then rename) and sets `MANAGED_RELEASE_REQUESTED` on
//!    the entry; the cgroup stays denied;
//! 3. the running agent, at its next scan, records `cgroup_released` (durably) and only
//!    then removes the entry: the release is recorded before it takes effect, and the
//!    agent never re-adds a released cgroup. The command waits for that (`--wait-secs`);
//!    with no agent running the request stays pending, the cgroup stays denied, and the
//!    next agent start applies and records it.
#![forbid(unsafe_code)]

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use scopegate_common::{MANAGED_HELD, MANAGED_RELEASE_REQUESTED, ManagedCgroup, NO_WORKLOAD};
use serde::{Deserialize, Serialize};

use crate::{
    audit::{Auditor, Record, lifecycle},
    bpf::{self, BpfError},
    state::Enforcement,
    workloads::{self, CgroupInfo, Resolution, WorkloadsError},
};

/// Errors of `scopegate release`.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// CGROUP does not name a cgroup directory.
    #[error("{path}: no such cgroup under {mount}: {source}")]
    UnknownCgroup {
        /// The path given.
        path: String,
        /// The cgroup2 mount.
        mount: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The cgroup is not in the managed map.
    #[error(
        "{path} (cgroup id {id}): not managed by the scopegate pinned under {pin_dir}; nothing to release"
    )]
    NotManaged {
        /// The path given.
        path: String,
        /// Its id.
        id: u64,
        /// The pin directory.
        pin_dir: PathBuf,
    },
    /// A policy still selects the cgroup.
    #[error(
        "{path} (cgroup id {id}): a policy still selects it (workload #{workload} in the agent's snapshot); release is for cgroups no policy selects: remove or change that policy instead"
    )]
    StillSelected {
        /// The path given.
        path: String,
        /// Its id.
        id: u64,
        /// The workload index.
        workload: u32,
    },
    /// The cgroup is a managed-subtree root (deny-all by the agent's configuration).
    #[error(
        "{path} (cgroup id {id}): managed by --managed-subtree, not held; drop it from the agent's --managed-subtree options instead"
    )]
    Subtree {
        /// The path given.
        path: String,
        /// Its id.
        id: u64,
    },
    /// An ancestor is managed too, so releasing the cgroup would change nothing.
    #[error(
        "{path}: it stays enforced through its managed ancestor {ancestor}; release (or re-select) that one"
    )]
    ThroughAncestor {
        /// The path given.
        path: String,
        /// The managed ancestor.
        ancestor: String,
    },
    /// A policy selected the cgroup again while the release was pending.
    #[error(
        "{path} (cgroup id {id}): a policy (or a --managed-subtree) covers it again; the agent dropped the release and it stays enforced"
    )]
    SelectedAgain {
        /// The path given.
        path: String,
        /// Its id.
        id: u64,
    },
    /// Reading the pins failed.
    #[error("{0}")]
    Bpf(#[from] BpfError),
    /// cgroup2 problems.
    #[error(transparent)]
    Workloads(#[from] WorkloadsError),
    /// Writing the request file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// What a release request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The agent recorded the release and removed the cgroup from the managed map.
    Released,
    /// No agent applied it within the wait: the cgroup stays denied until an agent runs.
    Pending,
}

/// Who asked for a release: `<state-dir>/releases/<id>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The cgroup path given (relative to the cgroup2 mount).
    pub path: String,
    /// The cgroup id.
    pub id: u64,
    /// uid of the `scopegate release` process.
    pub uid: u32,
    /// Its pid.
    pub pid: u32,
    /// When it asked (RFC 3339).
    pub ts: String,
}

/// Errors reading a request file.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not readable.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Not a request.
    #[error("{path}: not a release request: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// A request for another cgroup id than its file name says.
    #[error("{path}: names cgroup id {found}, expected {expected}")]
    WrongId {
        /// The file.
        path: PathBuf,
        /// The id in the file.
        found: u64,
        /// The id of the file name.
        expected: u64,
    },
}

/// `<state-dir>/releases/<id>.json`.
pub fn request_path(state_dir: &Path, id: u64) -> PathBuf {
    state_dir.join("releases").join(format!("{id}.json"))
}

/// Parses a request file's text.
pub fn parse_request(path: &Path, text: &str, id: u64) -> Result<Request, RequestError> {
    let request: Request = serde_json::from_str(text).map_err(|source| RequestError::Parse {
        path: path.into(),
        source,
    })?;
    if request.id != id {
        return Err(RequestError::WrongId {
            path: path.into(),
            found: request.id,
            expected: id,
        });
    }
    Ok(request)
}

/// Reads the request for `id`, if there is one (`Ok(None)`: no file).
pub fn read_request(state_dir: &Path, id: u64) -> Result<Option<Request>, RequestError> {
    let path = request_path(state_dir, id);
    match fs::read_to_string(&path) {
        Ok(text) => parse_request(&path, &text, id).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RequestError::Io { path, source }),
    }
}

/// Removes the request file of `id` (after the release was recorded).
pub fn remove_request(state_dir: &Path, id: u64) {
    let path = request_path(state_dir, id);
    if let Err(e) = fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a release request file");
    }
}

fn write_request(state_dir: &Path, request: &Request) -> Result<(), ReleaseError> {
    let path = request_path(state_dir, request.id);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReleaseError::Io { path, source }
    };
    let dir = state_dir.join("releases");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp = dir.join(format!(".{}.json.tmp", request.id));
    let text = serde_json::to_string(request).map_err(|e| ReleaseError::Io {
        path: tmp.clone(),
        source: io::Error::other(e),
    })?;
    {
        use std::io::Write as _;
        let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Asks for the release of `cgroup` (relative to the cgroup2 mount) from the scopegate
/// pinned under `pin_dir`, then waits up to `wait` for the agent to apply it.
pub fn release(
    cgroup: &str,
    pin_dir: &Path,
    state_dir: &Path,
    wait: Duration,
) -> Result<Outcome, ReleaseError> {
    let mount = workloads::cgroup2_mount()?;
    let path = format!("/{}", cgroup.trim_matches('/'));
    let dir = mount.join(path.trim_start_matches('/'));
    let id = match fs::metadata(&dir) {
        Ok(m) if m.is_dir() && dir.join("cgroup.procs").exists() => {
            std::os::unix::fs::MetadataExt::ino(&m)
        }
        Ok(_) => {
            return Err(ReleaseError::UnknownCgroup {
                path,
                mount,
                source: io::Error::other("not a cgroup directory"),
            });
        }
        Err(source) => {
            return Err(ReleaseError::UnknownCgroup {
                path,
                mount,
                source,
            });
        }
    };
    let not_managed = || ReleaseError::NotManaged {
        path: path.clone(),
        id,
        pin_dir: pin_dir.into(),
    };
    if !bpf::versioned_pin_dir(pin_dir).exists() {
        return Err(not_managed());
    }
    {
        let _lock = bpf::lock_pins(pin_dir)?;
        let mut map = bpf::open_pinned_managed(pin_dir)?;
        // A managed ancestor keeps enforcing it whatever happens to its own entry.
        let mut ancestor = dir.parent();
        while let Some(a) = ancestor.filter(|a| a.starts_with(&mount) && *a != mount) {
            if let Ok(m) = fs::metadata(a)
                && map.get(&std::os::unix::fs::MetadataExt::ino(&m), 0).is_ok()
            {
                return Err(ReleaseError::ThroughAncestor {
                    path,
                    ancestor: workloads::relative_cgroup_path(&mount, a)
                        .unwrap_or_else(|| a.display().to_string()),
                });
            }
            ancestor = a.parent();
        }
        let entry = map.get(&id, 0).map_err(|_| not_managed())?;
        if entry.flags & MANAGED_HELD == 0 {
            return Err(if entry.workload == NO_WORKLOAD {
                ReleaseError::Subtree { path, id }
            } else {
                ReleaseError::StillSelected {
                    path,
                    id,
                    workload: entry.workload,
                }
            });
        }
        let request = Request {
            path: path.clone(),
            id,
            uid: nix::unistd::getuid().as_raw(),
            pid: std::process::id(),
            ts: crate::audit::now_rfc3339(),
        };
        if let Err(e) = write_request(state_dir, &request) {
            // The release still happens and is recorded, without who asked.
            tracing::warn!(error = %e, "cannot write the release request file; the record will not name who asked");
        }
        let mut flagged = entry;
        flagged.flags |= MANAGED_RELEASE_REQUESTED;
        map.insert(id, flagged, 0).map_err(|source| BpfError::Map {
            map: scopegate_common::maps::MANAGED,
            source,
        })?;
    }
    let deadline = Instant::now() + wait;
    loop {
        let map = bpf::open_pinned_managed(pin_dir)?;
        match map.get(&id, 0) {
            Err(_) => return Ok(Outcome::Released),
            Ok(entry) if entry.flags & MANAGED_RELEASE_REQUESTED == 0 => {
                remove_request(state_dir, id);
                return Err(ReleaseError::SelectedAgain { path, id });
            }
            Ok(_) => {}
        }
        if Instant::now() >= deadline {
            return Ok(Outcome::Pending);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pinned managed map, read by the agent at each sync: the ids to keep managed (held
/// when no policy covers them) and the release requests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pinned {
    /// Every entry without a release request.
    pub held: HashSet<u64>,
    /// Entries with `MANAGED_RELEASE_REQUESTED`, sorted.
    pub requests: Vec<u64>,
}

impl Pinned {
    /// Splits the map's entries.
    pub fn split(entries: &HashMap<u64, ManagedCgroup>) -> Self {
        let mut pinned = Self::default();
        for (id, entry) in entries {
            if entry.flags & MANAGED_RELEASE_REQUESTED != 0 {
                pinned.requests.push(*id);
            } else {
                pinned.held.insert(*id);
            }
        }
        pinned.requests.sort_unstable();
        pinned
    }
}

/// Applies the release requests against a fresh `resolution` (resolved without them):
/// each released cgroup is recorded (`cgroup_released`, waited for up to 5 s) before the
/// caller's map sync removes it. Returns the requests whose record could not be written:
/// they stay denied, and pending, until the next sync. A request for a cgroup that a
/// policy covers again is dropped (the sync then rewrites its entry without the flag).
pub fn apply_requests(
    requests: &[u64],
    resolution: &Resolution,
    previous: &Enforcement,
    state_dir: &Path,
    auditor: &Auditor,
) -> Vec<u64> {
    let mut unrecorded = Vec::new();
    for id in requests {
        let request = match read_request(state_dir, *id) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable release request file");
                None
            }
        };
        if let Some(info) = resolution.lookup(*id) {
            tracing::warn!(cgroup = %info.path, id, "release request dropped: a policy selects the cgroup again");
            remove_request(state_dir, *id);
            continue;
        }
        let path = request
            .as_ref()
            .map(|r| r.path.clone())
            .or_else(|| previous.cgroups.lookup(*id).map(|i| i.path.clone()));
        let record = lifecycle::cgroup_released(
            path.clone(),
            *id,
            request.as_ref().map(|r| r.uid),
            request.as_ref().map(|r| r.pid),
        );
        if record_durably(auditor, record) {
            tracing::info!(cgroup = ?path, id, "cgroup released by the operator; no longer enforced");
            remove_request(state_dir, *id);
        } else {
            tracing::error!(cgroup = ?path, id, "the release could not be recorded; the cgroup stays denied");
            unrecorded.push(*id);
        }
    }
    unrecorded
}

/// Records `cgroup_held` for every cgroup that became held since `previous`.
pub fn record_newly_held(previous: &Enforcement, resolution: &Resolution, auditor: &Auditor) {
    let mut newly: Vec<(&u64, &CgroupInfo)> = resolution
        .managed
        .iter()
        .filter(|(id, info)| info.held && !previous.cgroups.lookup(**id).is_some_and(|p| p.held))
        .collect();
    newly.sort_by(|a, b| a.1.path.cmp(&b.1.path));
    for (id, info) in newly {
        let was = previous
            .cgroups
            .lookup(*id)
            .and_then(|p| p.workload)
            .and_then(|w| previous.policy.workload(w))
            .map(|w| w.name.clone());
        tracing::warn!(
            cgroup = %info.path,
            id,
            was = ?was,
            "no policy selects this cgroup any more; it stays managed, deny-all, until a policy selects it or `scopegate release` releases it"
        );
        auditor.record(lifecycle::cgroup_held(&info.path, *id, was));
    }
}

/// Queues `record` and waits (up to 5 s) until it is in every sink.
fn record_durably(auditor: &Auditor, record: Record) -> bool {
    let written = auditor.record_written(record);
    let wait = tokio::time::timeout(Duration::from_secs(5), written);
    let done = match tokio::runtime::Handle::try_current() {
        Ok(handle) => tokio::task::block_in_place(|| handle.block_on(wait)),
        Err(_) => return false,
    };
    matches!(done, Ok(Ok(())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn text(id: u64) -> String {
        format!(r#"{{"path":"/a/b","id":{id},"uid":0,"pid":7,"ts":"2026-01-01T00:00:00Z"}}"#)
    }

    #[test]
    fn requests_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let request = Request {
            path: "/a/b".into(),
            id: 42,
            uid: 1000,
            pid: 7,
            ts: "2026-01-01T00:00:00Z".into(),
        };
        write_request(dir.path(), &request).unwrap();
        assert_eq!(read_request(dir.path(), 42).unwrap(), Some(request));
        assert_eq!(read_request(dir.path(), 43).unwrap(), None);
        remove_request(dir.path(), 42);
        assert_eq!(read_request(dir.path(), 42).unwrap(), None);
        // No temporary file is left behind.
        assert_eq!(
            fs::read_dir(dir.path().join("releases")).unwrap().count(),
            0
        );
    }

    #[test]
    fn hostile_request_files_are_errors_naming_the_file() {
        let path = Path::new("/state/releases/5.json");
        assert!(parse_request(path, &text(5), 5).is_ok());
        for bad in [
            String::new(),
            "{".into(),
            "null".into(),
            "[]".into(),
            r#"{"path":"/a","id":5}"#.into(),
            r#"{"path":"/a","id":-1,"uid":0,"pid":7,"ts":"x"}"#.into(),
            text(5).replace("\"ts\"", "\"extra\":1,\"ts\""),
            "\u{0}\u{ff}garbage".into(),
        ] {
            let e = parse_request(path, &bad, 5).unwrap_err();
            assert!(e.to_string().starts_with("/state/releases/5.json: "), "{e}");
        }
        let e = parse_request(path, &text(6), 5).unwrap_err();
        assert!(
            matches!(
                e,
                RequestError::WrongId {
                    found: 6,
                    expected: 5,
                    ..
                }
            ),
            "{e}"
        );
    }
}
