//! Workloads: which cgroup belongs to which policy.
//!
//! The kernel identifies a task's cgroup by its cgroup v2 id, the inode number of the cgroup
//! directory. This module finds the cgroup2 mount, resolves policy selectors (an exact cgroup
//! path or a systemd unit name) to ids, and extends each selected cgroup to its descendants,
//! so a child cgroup never escapes its parent's policy. The agent rescans periodically, so a
//! cgroup created after start is enforced once it exists.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::policy::{Snapshot, WorkloadId};

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
    /// Whether a selector names this cgroup itself (not only an ancestor).
    pub selected: bool,
}

/// The result of resolving a policy snapshot against the cgroup tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Every managed cgroup id → its path and workload.
    pub managed: HashMap<u64, CgroupInfo>,
    /// Workloads whose selector matched no cgroup (yet).
    pub unmatched: Vec<WorkloadId>,
}

impl Resolution {
    /// The workload and path of a cgroup id, if it is managed.
    pub fn lookup(&self, cgroup_id: u64) -> Option<&CgroupInfo> {
        self.managed.get(&cgroup_id)
    }
}

/// Walks the cgroup tree under `root` (a directory under `mount`) and resolves every
/// workload's selector. A directly selected cgroup and all its descendants are managed by
/// that workload; a deeper selection wins over an inherited one.
///
/// `subtrees` are managed slices (paths relative to the mount): every cgroup below one of
/// them is managed even without a policy of its own, and then gets the default, deny all.
pub fn resolve(snapshot: &Snapshot, mount: &Path, root: &Path, subtrees: &[String]) -> Resolution {
    let mut dirs = Vec::new();
    walk(root, &mut dirs);
    // (path relative to mount, id), parents before children.
    let mut tree: Vec<(String, u64)> = dirs
        .into_iter()
        .filter_map(|(dir, id)| relative_cgroup_path(mount, &dir).map(|p| (p, id)))
        .collect();
    tree.sort();

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

    let mut managed = HashMap::new();
    for (path, id) in &tree {
        // The deepest selected ancestor-or-self decides.
        let mut candidate: Option<Option<WorkloadId>> = None;
        let mut prefix = path.as_str();
        let selected = direct.contains_key(prefix);
        loop {
            if let Some(w) = direct.get(prefix) {
                candidate = Some(*w);
                break;
            }
            match prefix.rfind('/') {
                Some(0) | None => break,
                Some(i) => prefix = &prefix[..i],
            }
        }
        if let Some(workload) = candidate {
            managed.insert(
                *id,
                CgroupInfo {
                    path: path.clone(),
                    workload,
                    selected,
                },
            );
        }
    }
    let unmatched = matched
        .iter()
        .enumerate()
        .filter(|(_, m)| !**m)
        .map(|(i, _)| WorkloadId(i as u32))
        .collect();
    Resolution { managed, unmatched }
}

/// `dir` relative to `mount`, as a cgroup path starting with '/'.
pub fn relative_cgroup_path(mount: &Path, dir: &Path) -> Option<String> {
    let rel = dir.strip_prefix(mount).ok()?;
    let rel = rel.to_str()?;
    Some(format!("/{rel}"))
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    let Ok(meta) = fs::metadata(dir) else { return };
    out.push((dir.to_path_buf(), meta.ino()));
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        // Cgroup directories are real directories; never follow symlinks.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&entry.path(), out);
        }
    }
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
