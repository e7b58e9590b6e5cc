//! Workloads: which cgroup belongs to which policy.
//!
//! The kernel identifies a task's cgroup by its cgroup v2 id, the inode number of the cgroup
//! directory. This module finds the cgroup2 mount, resolves policy selectors (an exact cgroup
//! path or a systemd unit name) to ids, and extends each selected cgroup to its descendants,
//! so a child cgroup never escapes its parent's policy. The agent rescans periodically, so a
//! cgroup created after start is enforced once it exists.
//!
//! A partial view never removes enforcement: a rescan that cannot read part of the tree
//! (EMFILE, EACCES, a race with rmdir or rename, anything) keeps every previously managed
//! cgroup it did not see, unless that cgroup positively no longer exists (its own path is
//! gone, or now names another cgroup). See [`resolve_from`]. Each error kind is counted,
//! logged and recorded (`cgroup_scan_incomplete`) once per incident ([`ScanIncidents`]).
//!
//! Managed means managed until released: a cgroup that is in the kernel's managed map (the
//! pinned `SG_MANAGED`, which outlives the agent) stays managed when no policy selects it
//! any more (its policy file was removed, the policy set is empty, or the agent restarted
//! with no or an invalid policy under `--allow-empty`). It is then *held*: deny-all, like a
//! `--managed-subtree` cgroup without a policy, until a policy selects it again, the
//! operator releases it (`scopegate release`, see [`crate::release`]), or its directory is
//! removed. The caller passes the held candidates (the pinned map's keys) to
//! [`resolve_from`]; the pinned map is the only record of them.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{
    audit::{Record, lifecycle},
    policy::{Snapshot, WorkloadId},
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    /// /proc/self/mounts has no cgroup2 entry.
    #[error("no cgroup v2 filesystem is mounted (searched {mounts}); scopegate needs cgroup v2")]
    NoCgroup2 {
        /// The file searched.
        mounts: PathBuf,
    },
    /// Reading a file or directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A cgroup path given on the command line is not inside the cgroup2 mount.
    #[error("{path}: not a cgroup v2 directory under {mount}")]
    NotACgroup {
        /// The path given.
        path: PathBuf,
        /// The cgroup2 mount.
        mount: PathBuf,
    },
}

/// Finds the cgroup v2 mount point from /proc/self/mounts.
pub fn cgroup2_mount() -> Result<PathBuf, WorkloadsError> {
    let mounts = Path::new("/proc/self/mounts");
    let text = fs::read_to_string(mounts).map_err(|source| WorkloadsError::Io {
        path: mounts.into(),
        source,
    })?;
    parse_cgroup2_mount(&text).ok_or_else(|| WorkloadsError::NoCgroup2 {
        mounts: mounts.into(),
    })
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(dir)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_field(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup v2 id of a cgroup directory.
pub fn cgroup_id(dir: &Path) -> Result<u64, WorkloadsError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| WorkloadsError::Io {
            path: dir.into(),
            source,
        })
}

/// The cgroup v2 path (relative to the mount, starting with '/') of a process.
pub fn cgroup_of_pid(pid: &str) -> Result<String, WorkloadsError> {
    let file = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&file).map_err(|source| WorkloadsError::Io {
        path: file.clone(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or(WorkloadsError::Io {
            path: file,
            source: io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 entry (0::)"),
        })
}

/// A cgroup the agent knows about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Path relative to the cgroup2 mount, starting with '/'.
    pub path: String,
    /// The workload whose policy applies, if any.
    pub workload: Option<WorkloadId>,
    /// Whether a selector names this cgroup itself (not only an ancestor), or it is a
    /// managed-subtree root, or it is held.
    pub selected: bool,
    /// Held: managed before, selected by no policy now; deny-all until released.
    pub held: bool,
}

/// The result of resolving a policy snapshot against the cgroup tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Every managed cgroup id → its path and workload.
    pub managed: HashMap<u64, CgroupInfo>,
    /// Workloads whose selector matched no cgroup (yet).
    pub unmatched: Vec<WorkloadId>,
    /// Held cgroup ids whose directory a blind scan could not find (no path known): they
    /// stay deny-all in the kernel until a complete scan shows they are gone.
    pub unseen_held: BTreeSet<u64>,
}

impl Resolution {
    /// The workload and path of a cgroup id, if it is managed.
    pub fn lookup(&self, cgroup_id: u64) -> Option<&CgroupInfo> {
        self.managed.get(&cgroup_id)
    }
}

/// How a scan reads the cgroup tree: the real filesystem ([`Fs`]), or a test double that
/// injects errors.
pub trait TreeReader {
    /// The cgroup id (inode number) of a directory (stat, no descriptor needed).
    fn id(&self, dir: &Path) -> io::Result<u64>;
    /// The child directories of a directory; symlinks are never followed. Any error while
    /// listing (opening, reading an entry, its type) is an error of the whole listing.
    fn children(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
}

/// The real cgroup filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fs;

impl TreeReader for Fs {
    fn id(&self, dir: &Path) -> io::Result<u64> {
        fs::metadata(dir).map(|m| m.ino())
    }

    fn children(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            // Cgroup directories are real directories; never follow symlinks.
            if entry.file_type()?.is_dir() {
                out.push(entry.path());
            }
        }
        Ok(out)
    }
}

/// A part of the tree a scan could not read.
#[derive(Debug)]
pub struct ScanError {
    /// The directory.
    pub path: PathBuf,
    /// What failed.
    pub action: &'static str,
    /// The error.
    pub error: io::Error,
}

/// Scan errors seen since start (a metric).
static SCAN_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Previously managed cgroups kept because a scan could not see them (a metric).
static KEPT: AtomicU64 = AtomicU64::new(0);

/// Number of cgroup scan errors since start.
pub fn scan_errors() -> u64 {
    SCAN_ERRORS.load(Ordering::Relaxed)
}

/// Number of times a managed cgroup was kept because a scan could not see it.
pub fn kept_unseen() -> u64 {
    KEPT.load(Ordering::Relaxed)
}

/// The scan error kinds (operation and errno) reported in the current incident. An
/// incident starts with a scan that could not read part of the tree and ends with the next
/// complete scan; within it each kind is logged and recorded once (not on every rescan, a
/// second a time), and a kind that comes back after a complete scan is reported again.
#[derive(Debug, Default)]
pub struct ScanIncidents {
    reported: HashSet<(&'static str, Option<i32>, io::ErrorKind)>,
}

impl ScanIncidents {
    /// Counts the errors of one scan (the metric), logs those of a kind new in this
    /// incident and returns their `cgroup_scan_incomplete` records, to be written by the
    /// caller; a scan without errors ends the incident.
    pub fn report(&mut self, mount: &Path, errors: &[ScanError]) -> Vec<Record> {
        if errors.is_empty() {
            self.reported.clear();
            return Vec::new();
        }
        SCAN_ERRORS.fetch_add(errors.len() as u64, Ordering::Relaxed);
        let mut records = Vec::new();
        for e in errors {
            let kind = (e.action, e.error.raw_os_error(), e.error.kind());
            if !self.reported.insert(kind) {
                continue;
            }
            tracing::error!(
                path = %e.path.display(),
                action = e.action,
                error = %e.error,
                "cgroup scan incomplete; managed cgroups under it keep their enforcement (logged and recorded once per error kind until a scan is complete; see scopegate_cgroup_scan_errors_total)"
            );
            let path = relative_cgroup_path(mount, &e.path)
                .unwrap_or_else(|| e.path.display().to_string());
            records.push(lifecycle::cgroup_scan_incomplete(&path, e.action, &e.error));
        }
        records
    }
}

/// Walks the cgroup tree under `root` (a directory under `mount`) and resolves every
/// workload's selector. A directly selected cgroup and all its descendants are managed by
/// that workload; a deeper selection wins over an inherited one.
///
/// `subtrees` are managed slices (paths relative to the mount): every cgroup below one of
/// them is managed even without a policy of its own, and then gets the default, deny all.
///
/// This is a first scan (nothing known before) on the real filesystem; the agent's rescans
/// use [`resolve_from`].
pub fn resolve(snapshot: &Snapshot, mount: &Path, root: &Path, subtrees: &[String]) -> Resolution {
    resolve_from(snapshot, mount, root, subtrees, None, &HashSet::new(), &Fs).0
}

/// [`resolve`], keeping what `previous` knew where this scan is blind.
///
/// Every cgroup `previous` managed that the walk did not find is looked at once more, by
/// its own path: when the path is gone (ENOENT) or now names another cgroup, it no longer
/// exists and is dropped; when it still has the same id, or cannot be looked at (any other
/// error), it stays in the tree and is resolved against `snapshot` like any other cgroup.
/// So a scan error can never un-manage a cgroup. Returns the resolution and the errors.
///
/// `held` are the ids the kernel manages now (the pinned map's keys): each one that no
/// policy covers (neither itself nor an ancestor is selected by a workload) stays managed,
/// deny-all, as a held cgroup ([`CgroupInfo::held`]). A held id the walk did not find is
/// dropped when the scan was complete (the cgroup is gone) and kept in
/// [`Resolution::unseen_held`] when it was not.
pub fn resolve_from(
    snapshot: &Snapshot,
    mount: &Path,
    root: &Path,
    subtrees: &[String],
    previous: Option<&Resolution>,
    held: &HashSet<u64>,
    reader: &dyn TreeReader,
) -> (Resolution, Vec<ScanError>) {
    let mut dirs = Vec::new();
    let mut errors = Vec::new();
    walk(reader, root, &mut dirs, &mut errors);
    // (path relative to mount, id), parents before children.
    let mut tree: Vec<(String, u64)> = dirs
        .into_iter()
        .filter_map(|(dir, id)| relative_cgroup_path(mount, &dir).map(|p| (p, id)))
        .collect();
    if let Some(previous) = previous {
        let seen: HashSet<u64> = tree.iter().map(|(_, id)| *id).collect();
        let mut unseen: Vec<(&u64, &CgroupInfo)> = previous
            .managed
            .iter()
            .filter(|(id, _)| !seen.contains(id))
            .collect();
        unseen.sort_by(|a, b| a.1.path.cmp(&b.1.path));
        for (id, info) in unseen {
            let dir = mount.join(info.path.trim_start_matches('/'));
            match reader.id(&dir) {
                Ok(now) if now == *id => {}
                // Gone, or the path now names a new cgroup (which the walk saw or not).
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => errors.push(ScanError {
                    path: dir,
                    action: "stat",
                    error,
                }),
            }
            KEPT.fetch_add(1, Ordering::Relaxed);
            tree.push((info.path.clone(), *id));
        }
    }
    tree.sort();
    tree.dedup();
    // Selected cgroup path → its workload (None: a managed subtree without a policy).
    let mut direct: HashMap<&str, Option<WorkloadId>> = HashMap::new();
    for (path, _) in &tree {
        if subtrees.iter().any(|s| s == path) {
            direct.insert(path.as_str(), None);
        }
    }
    let mut matched = vec![false; snapshot.workloads().len()];
    for (index, workload) in snapshot.workloads().iter().enumerate() {
        let id = WorkloadId(index as u32);
        for (path, _) in &tree {
            let hit = workload.selector.matches_cgroup_path(path);
            if hit {
                direct.insert(path.as_str(), Some(id));
                matched[index] = true;
            }
        }
    }

    // Held: in the kernel's map, but no workload covers it (itself or an ancestor), and it
    // is not a managed-subtree root (those are configuration, not held).
    let mut held_paths: HashSet<&str> = HashSet::new();
    for (path, id) in &tree {
        if held.contains(id)
            && !direct.contains_key(path.as_str())
            && !matches!(deepest(&direct, path), Some(Some(_)))
        {
            held_paths.insert(path.as_str());
        }
    }
    for path in &held_paths {
        direct.insert(*path, None);
    }
    let mut managed = HashMap::new();
    for (path, id) in &tree {
        if let Some(workload) = deepest(&direct, path) {
            managed.insert(
                *id,
                CgroupInfo {
                    path: path.clone(),
                    workload,
                    selected: direct.contains_key(path.as_str()),
                    held: held_paths.contains(path.as_str()),
                },
            );
        }
    }
    let in_tree: HashSet<u64> = tree.iter().map(|(_, id)| *id).collect();
    let unseen_held = if errors.is_empty() {
        BTreeSet::new()
    } else {
        held.iter()
            .filter(|id| !in_tree.contains(id))
            .copied()
            .collect()
    };
    let unmatched = matched
        .iter()
        .enumerate()
        .filter(|(_, m)| !**m)
        .map(|(i, _)| WorkloadId(i as u32))
        .collect();
    (
        Resolution {
            managed,
            unmatched,
            unseen_held,
        },
        errors,
    )
}

/// The deepest selected ancestor-or-self of `path` decides: `Some(workload)` if there is
/// one (`Some(None)`: deny-all), `None` when the cgroup is not managed.
fn deepest(direct: &HashMap<&str, Option<WorkloadId>>, path: &str) -> Option<Option<WorkloadId>> {
    let mut prefix = path;
    loop {
        if let Some(w) = direct.get(prefix) {
            return Some(*w);
        }
        match prefix.rfind('/') {
            Some(0) | None => return None,
            Some(i) => prefix = &prefix[..i],
        }
    }
}

/// `dir` relative to `mount`, as a cgroup path starting with '/'.
pub fn relative_cgroup_path(mount: &Path, dir: &Path) -> Option<String> {
    let rel = dir.strip_prefix(mount).ok()?;
    let rel = rel.to_str()?;
    Some(format!("/{rel}"))
}

/// Depth-first walk. A directory that is gone (ENOENT on itself) is skipped with its
/// subtree; any other error is reported, and what lies below stays unknown.
fn walk(
    reader: &dyn TreeReader,
    dir: &Path,
    out: &mut Vec<(PathBuf, u64)>,
    errors: &mut Vec<ScanError>,
) {
    // Explicit stack: bounded by the tree, not by the thread's stack.
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let id = match reader.id(&dir) {
            Ok(id) => id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => {
                errors.push(ScanError {
                    path: dir,
                    action: "stat",
                    error,
                });
                continue;
            }
        };
        match reader.children(&dir) {
            Ok(children) => {
                out.push((dir, id));
                stack.extend(children);
            }
            // Removed between the stat and the listing: gone, and so are its children.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                out.push((dir.clone(), id));
                errors.push(ScanError {
                    path: dir,
                    action: "read_dir",
                    error,
                });
            }
        }
    }
}

/// Warnings of `scopegate policy check` about how a valid policy meets this host (counted
/// by `--strict`): each workload whose selector matches no cgroup here. They need a complete scan of the cgroup2
/// tree: without a cgroup2 mount, or when any part of the tree cannot be read, none is
/// given. (An empty directory is a policy warning: [`crate::policy::PolicyWarning`].)
pub fn host_warnings(snapshot: &Snapshot) -> Vec<String> {
    let Ok(mount) = cgroup2_mount() else {
        return Vec::new();
    };
    host_warnings_in(snapshot, &mount, &Fs)
}

fn host_warnings_in(snapshot: &Snapshot, mount: &Path, reader: &dyn TreeReader) -> Vec<String> {
    let (resolution, errors) =
        resolve_from(snapshot, mount, mount, &[], None, &HashSet::new(), reader);
    if !errors.is_empty() {
        return Vec::new();
    }
    resolution
        .unmatched
        .iter()
        .filter_map(|id| snapshot.workload(*id))
        .map(|w| {
            format!(
                "{}: workload {}: its selector ({:?}) matches no cgroup on this host (yet); it is enforced once such a cgroup exists",
                w.source.display(),
                w.name,
                w.selector
            )
        })
        .collect()
}

/// Creates (if needed) the cgroup at `path` (relative to the cgroup2 mount) and returns its
/// directory.
pub fn ensure_cgroup(mount: &Path, path: &str) -> Result<PathBuf, WorkloadsError> {
    let dir = mount.join(path.trim_start_matches('/'));
    fs::create_dir_all(&dir).map_err(|source| WorkloadsError::Io {
        path: dir.clone(),
        source,
    })?;
    if !dir.join("cgroup.procs").exists() {
        return Err(WorkloadsError::NotACgroup {
            path: dir,
            mount: mount.into(),
        });
    }
    Ok(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
        assert_eq!(parse_cgroup2_mount(""), None);
    }

    #[test]
    fn unescapes_octal_mount_fields() {
        assert_eq!(unescape_mount_field("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_field("/a\\\\b"), "/a\\\\b");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
    }

    #[test]
    fn relative_paths() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(
            relative_cgroup_path(m, Path::new("/sys/fs/cgroup/system.slice/a.service")),
            Some("/system.slice/a.service".into())
        );
        assert_eq!(relative_cgroup_path(m, Path::new("/etc")), None);
    }

    fn snapshot(files: &[(&str, &str)]) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        Snapshot::load_dir(dir.path()).unwrap()
    }

    /// Resolution over a fake tree of plain directories (ids are inode numbers there too).
    #[test]
    fn resolves_selectors_and_inherits_to_children() {
        let tree = tempfile::tempdir().unwrap();
        let mount = tree.path();
        for d in [
            "system.slice/billing.service/child",
            "system.slice/other.service",
            "custom/app/deeper",
            "custom/app/special",
        ] {
            fs::create_dir_all(mount.join(d)).unwrap();
        }
        let policy = |name: &str, select: &str| {
            format!(
                "workload: {name}\nselect:\n  {select}\negress:\n  - host: 127.0.0.1\n    port: 80\n    rules:\n      - id: r\n        methods: [GET]\n        path: /\n"
            )
        };
        let snap = snapshot(&[
            (
                "a.yaml",
                &policy("billing", "systemd_unit: billing.service"),
            ),
            ("b.yaml", &policy("app", "cgroup: /custom/app")),
            ("c.yaml", &policy("special", "cgroup: /custom/app/special")),
            ("d.yaml", &policy("ghost", "cgroup: /nowhere")),
        ]);
        fs::create_dir_all(mount.join("managed.slice/stray.service")).unwrap();
        let res = resolve(&snap, mount, mount, &["/managed.slice".to_owned()]);
        let id = |p: &str| cgroup_id(&mount.join(p)).unwrap();
        let name = |p: &str| {
            let w = res.lookup(id(p)).unwrap().workload.unwrap();
            snap.workload(w).unwrap().name.clone()
        };
        assert_eq!(name("system.slice/billing.service"), "billing");
        assert_eq!(name("system.slice/billing.service/child"), "billing");
        assert_eq!(name("custom/app"), "app");
        assert_eq!(name("custom/app/deeper"), "app");
        assert_eq!(name("custom/app/special"), "special");
        assert!(res.lookup(id("system.slice/other.service")).is_none());
        assert!(res.lookup(id("custom")).is_none());
        assert!(res.lookup(id("custom/app")).unwrap().selected);
        assert!(!res.lookup(id("custom/app/deeper")).unwrap().selected);
        assert_eq!(
            res.lookup(id("custom/app/deeper")).unwrap().path,
            "/custom/app/deeper"
        );
        // A managed subtree without a policy: managed, no workload (deny all).
        let stray = res.lookup(id("managed.slice/stray.service")).unwrap();
        assert_eq!((stray.workload, stray.selected), (None, false));
        assert!(res.lookup(id("managed.slice")).unwrap().selected);
        let ghost = snap.workload_by_name("ghost").unwrap();
        assert_eq!(res.unmatched, vec![ghost]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod scan_tests {
    use super::*;

    /// The real filesystem, with errors injected per directory.
    #[derive(Default)]
    struct Faulty {
        /// Directory → errno of `children`.
        list: HashMap<PathBuf, i32>,
        /// Directory → errno of `id`.
        stat: HashMap<PathBuf, i32>,
    }

    impl TreeReader for Faulty {
        fn id(&self, dir: &Path) -> io::Result<u64> {
            match self.stat.get(dir) {
                Some(code) => Err(io::Error::from_raw_os_error(*code)),
                None => Fs.id(dir),
            }
        }

        fn children(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
            match self.list.get(dir) {
                Some(code) => Err(io::Error::from_raw_os_error(*code)),
                None => Fs.children(dir),
            }
        }
    }

    fn policy(name: &str, select: &str) -> String {
        format!(
            "workload: {name}\nselect:\n  {select}\negress:\n  - host: 127.0.0.1\n    port: 80\n    rules:\n      - id: r\n        methods: [GET]\n        path: /\n"
        )
    }

    fn snapshot(files: &[(&str, String)]) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        Snapshot::load_dir(dir.path()).unwrap()
    }

    struct Tree {
        dir: tempfile::TempDir,
        snap: Snapshot,
        first: Resolution,
    }

    impl Tree {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for d in [
                "system.slice/billing.service/child",
                "system.slice/other.service",
                "managed.slice/stray.service",
            ] {
                fs::create_dir_all(dir.path().join(d)).unwrap();
            }
            let snap = snapshot(&[("a.yaml", policy("billing", "systemd_unit: billing.service"))]);
            let first = resolve(&snap, dir.path(), dir.path(), &subtrees());
            assert_eq!(first.managed.len(), 4, "{first:?}");
            Self { dir, snap, first }
        }

        fn path(&self, p: &str) -> PathBuf {
            self.dir.path().join(p)
        }

        fn id(&self, p: &str) -> u64 {
            cgroup_id(&self.path(p)).unwrap()
        }

        fn rescan(&self, snap: &Snapshot, reader: &Faulty) -> (Resolution, Vec<ScanError>) {
            let m = self.dir.path();
            resolve_from(
                snap,
                m,
                m,
                &subtrees(),
                Some(&self.first),
                &HashSet::new(),
                reader,
            )
        }
    }

    fn subtrees() -> Vec<String> {
        vec!["/managed.slice".to_owned()]
    }

    #[test]
    fn emfile_on_a_parent_keeps_its_managed_children() {
        let t = Tree::new();
        let mut reader = Faulty::default();
        reader.list.insert(t.path("system.slice"), libc::EMFILE);
        reader.list.insert(t.path("managed.slice"), libc::EMFILE);
        // Without the last known state, the partial view would drop them (the old bug).
        let m = t.dir.path();
        let none = HashSet::new();
        let (blind, errors) = resolve_from(&t.snap, m, m, &subtrees(), None, &none, &reader);
        assert!(blind.lookup(t.id("system.slice/billing.service")).is_none());
        assert_eq!(errors.len(), 2);
        let (res, errors) = t.rescan(&t.snap, &reader);
        assert_eq!(res, t.first, "nothing un-managed");
        assert_eq!(errors.len(), 2);
        assert!(
            errors
                .iter()
                .all(|e| e.error.raw_os_error() == Some(libc::EMFILE))
        );
        let billing = res.lookup(t.id("system.slice/billing.service")).unwrap();
        assert!(billing.selected);
        let before = scan_errors();
        let records = ScanIncidents::default().report(m, &errors);
        assert!(scan_errors() >= before + 2);
        // Both are `read_dir` EMFILE: one kind, one record.
        assert_eq!(records.len(), 1, "{records:?}");
    }

    /// Each kind of scan error (operation, errno) is recorded once per incident, with the
    /// cgroup path, the operation and the errno; a complete scan ends the incident, and the
    /// same error afterwards is recorded again.
    #[test]
    fn scan_errors_are_recorded_once_per_kind_per_incident() {
        let t = Tree::new();
        let m = t.dir.path();
        let mut incidents = ScanIncidents::default();
        let mut emfile = Faulty::default();
        emfile.list.insert(t.path("system.slice"), libc::EMFILE);
        let (_, errors) = t.rescan(&t.snap, &emfile);
        let records = incidents.report(m, &errors);
        assert_eq!(records.len(), 1, "{records:?}");
        let r = serde_json::to_value(&records[0]).unwrap();
        assert_eq!(r["reason"], "cgroup_scan_incomplete");
        assert_eq!(r["decision"], "error");
        assert_eq!(r["origin"], "agent");
        assert_eq!(r["cgroup"], "/system.slice");
        assert_eq!(r["trigger"], "read_dir");
        let text = r["errors"][0].as_str().unwrap();
        assert!(text.starts_with("/system.slice: read_dir: "), "{text}");
        assert!(text.ends_with("(EMFILE)"), "{text}");
        // The next rescans, still blind in the same way: nothing new to record.
        for _ in 0..3 {
            let (_, errors) = t.rescan(&t.snap, &emfile);
            assert_eq!(errors.len(), 1);
            assert!(incidents.report(m, &errors).is_empty());
        }
        // Another kind in the same incident is recorded once.
        let mut both = Faulty::default();
        both.list.insert(t.path("system.slice"), libc::EMFILE);
        both.stat.insert(t.path("managed.slice"), libc::EACCES);
        let (_, errors) = t.rescan(&t.snap, &both);
        let records = incidents.report(m, &errors);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].trigger.as_deref(), Some("stat"));
        assert!(records[0].errors.as_ref().unwrap()[0].ends_with("(EACCES)"));
        // A complete scan ends the incident: the same EMFILE is recorded again.
        let (_, errors) = t.rescan(&t.snap, &Faulty::default());
        assert!(errors.is_empty());
        assert!(incidents.report(m, &errors).is_empty());
        let (_, errors) = t.rescan(&t.snap, &emfile);
        assert_eq!(incidents.report(m, &errors).len(), 1);
    }

    #[test]
    fn eacces_on_the_cgroup_itself_keeps_it() {
        let t = Tree::new();
        let mut reader = Faulty::default();
        for p in [
            "system.slice/billing.service",
            "system.slice/billing.service/child",
        ] {
            reader.stat.insert(t.path(p), libc::EACCES);
        }
        let (res, errors) = t.rescan(&t.snap, &reader);
        assert_eq!(res, t.first);
        // The walk's stat and the re-check of each unseen cgroup.
        assert!(!errors.is_empty());
    }

    #[test]
    fn a_cgroup_that_is_gone_is_dropped_even_while_blind() {
        let t = Tree::new();
        let gone = t.id("system.slice/billing.service/child");
        fs::remove_dir(t.path("system.slice/billing.service/child")).unwrap();
        let mut reader = Faulty::default();
        reader.list.insert(t.path("system.slice"), libc::EMFILE);
        let (res, _) = t.rescan(&t.snap, &reader);
        assert!(res.lookup(gone).is_none(), "ENOENT on itself: gone");
        assert!(res.lookup(t.id("system.slice/billing.service")).is_some());
        // ENOENT while listing a directory: it was removed after its stat; nothing kept.
        let mut reader = Faulty::default();
        reader
            .list
            .insert(t.path("managed.slice/stray.service"), libc::ENOENT);
        let (res, errors) = t.rescan(&t.snap, &reader);
        assert!(errors.is_empty());
        // Still exists on disk, so the re-check by its own path keeps it.
        assert!(res.lookup(t.id("managed.slice/stray.service")).is_some());
    }

    #[test]
    fn a_path_that_names_another_cgroup_now_drops_the_old_id() {
        let t = Tree::new();
        let old = t.id("system.slice/billing.service/child");
        // A directory that exists alongside, so its inode cannot be the old one reused.
        fs::create_dir(t.path("system.slice/billing.service/spare")).unwrap();
        fs::remove_dir(t.path("system.slice/billing.service/child")).unwrap();
        fs::rename(
            t.path("system.slice/billing.service/spare"),
            t.path("system.slice/billing.service/child"),
        )
        .unwrap();
        let new = t.id("system.slice/billing.service/child");
        assert_ne!(old, new);
        let (res, errors) = t.rescan(&t.snap, &Faulty::default());
        assert!(errors.is_empty());
        assert!(res.lookup(old).is_none());
        assert!(res.lookup(new).is_some());
    }

    #[test]
    fn kept_cgroups_are_resolved_against_the_new_policy() {
        let t = Tree::new();
        // A new snapshot in which billing has another workload index.
        let snap = snapshot(&[
            ("0.yaml", policy("aaa", "cgroup: /nowhere")),
            ("a.yaml", policy("billing", "systemd_unit: billing.service")),
        ]);
        let mut reader = Faulty::default();
        reader.list.insert(t.path("system.slice"), libc::EMFILE);
        let (res, _) = t.rescan(&snap, &reader);
        for p in [
            "system.slice/billing.service",
            "system.slice/billing.service/child",
        ] {
            let w = res.lookup(t.id(p)).unwrap().workload.unwrap();
            assert_eq!(snap.workload(w).unwrap().name, "billing", "{p}");
        }
    }

    /// Held ids: the billing cgroup as the kernel's map holds it.
    fn held(t: &Tree, paths: &[&str]) -> HashSet<u64> {
        paths.iter().map(|p| t.id(p)).collect()
    }

    #[test]
    fn a_cgroup_no_policy_selects_any_more_is_held_deny_all() {
        let t = Tree::new();
        let m = t.dir.path();
        let empty = Snapshot::empty();
        let ids = held(&t, &["system.slice/billing.service", "managed.slice"]);
        let (res, errors) = resolve_from(&empty, m, m, &[], Some(&t.first), &ids, &Fs);
        assert!(errors.is_empty());
        let billing = res.lookup(t.id("system.slice/billing.service")).unwrap();
        assert_eq!(
            (billing.workload, billing.selected, billing.held),
            (None, true, true)
        );
        // Its child inherits deny-all (not held itself: the kernel finds the ancestor).
        let child = res
            .lookup(t.id("system.slice/billing.service/child"))
            .unwrap();
        assert_eq!(
            (child.workload, child.selected, child.held),
            (None, false, false)
        );
        // A managed-subtree root is configuration, not held.
        let (res2, _) = resolve_from(&empty, m, m, &subtrees(), Some(&t.first), &ids, &Fs);
        let root = res2.lookup(t.id("managed.slice")).unwrap();
        assert_eq!((root.selected, root.held), (true, false));
        // A former --managed-subtree root stays too, and so does what lies below it.
        assert!(res.lookup(t.id("managed.slice")).unwrap().held);
        assert!(res.lookup(t.id("managed.slice/stray.service")).is_some());
        assert!(res.lookup(t.id("system.slice/other.service")).is_none());
        // Without the pinned ids (the old behaviour) the empty policy un-manages it.
        let (open, _) = resolve_from(&empty, m, m, &[], None, &HashSet::new(), &Fs);
        assert!(open.managed.is_empty());
    }

    #[test]
    fn a_policy_that_selects_a_held_cgroup_again_takes_over() {
        let t = Tree::new();
        let m = t.dir.path();
        let ids = held(&t, &["system.slice/billing.service"]);
        let (res, _) = resolve_from(&t.snap, m, m, &subtrees(), Some(&t.first), &ids, &Fs);
        let billing = res.lookup(t.id("system.slice/billing.service")).unwrap();
        assert!(!billing.held);
        assert_eq!(
            t.snap.workload(billing.workload.unwrap()).unwrap().name,
            "billing"
        );
        // A policy on an ancestor covers it too: not held.
        let parent = snapshot(&[("p.yaml", policy("slice", "cgroup: /system.slice"))]);
        let (res, _) = resolve_from(&parent, m, m, &[], Some(&t.first), &ids, &Fs);
        let billing = res.lookup(t.id("system.slice/billing.service")).unwrap();
        assert!(!billing.held && billing.workload.is_some());
    }

    #[test]
    fn a_held_cgroup_that_is_gone_is_dropped_unless_the_scan_was_blind() {
        let t = Tree::new();
        let m = t.dir.path();
        let empty = Snapshot::empty();
        // An id no directory has (as after an rmdir while the agent was down).
        let ids: HashSet<u64> = [u64::MAX - 7].into_iter().collect();
        let (res, errors) = resolve_from(&empty, m, m, &[], None, &ids, &Fs);
        assert!(errors.is_empty());
        assert!(res.managed.is_empty() && res.unseen_held.is_empty());
        // A blind scan cannot tell: the id is kept, without a path.
        let mut reader = Faulty::default();
        reader.list.insert(t.path("system.slice"), libc::EMFILE);
        let (res, errors) = resolve_from(&empty, m, m, &[], None, &ids, &reader);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            res.unseen_held.iter().copied().collect::<Vec<_>>(),
            vec![u64::MAX - 7]
        );
        // A held cgroup the blind walk did not reach but whose path is known is kept by
        // the re-check of the previous state.
        let ids = held(&t, &["system.slice/billing.service"]);
        let (res, _) = resolve_from(&empty, m, m, &[], Some(&t.first), &ids, &reader);
        assert!(
            res.lookup(t.id("system.slice/billing.service"))
                .unwrap()
                .held
        );
    }

    #[test]
    fn check_warns_on_selectors_that_match_nothing_only_after_a_complete_scan() {
        let t = Tree::new();
        let m = t.dir.path();
        let snap = snapshot(&[
            ("a.yaml", policy("billing", "systemd_unit: billing.service")),
            ("g.yaml", policy("ghost", "cgroup: /nowhere")),
        ]);
        let warnings = host_warnings_in(&snap, m, &Fs);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("g.yaml: workload ghost"),
            "{warnings:?}"
        );
        // A scan that could not read everything cannot tell: no warning.
        let mut reader = Faulty::default();
        reader.list.insert(t.path("system.slice"), libc::EACCES);
        assert!(host_warnings_in(&snap, m, &reader).is_empty());
    }
}
