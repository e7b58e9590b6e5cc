//! Policy directory watch: inotify on the directory and on its parent.
//!
//! - The directory (its current target, if the path is a symlink): any entry created,
//!   written, removed or renamed; an editor's atomic save is a rename into it.
//! - The parent: only entries named like the directory that are created, removed or renamed
//!   over (`ln -sfn new current.tmp && mv -T current.tmp current`: a symlink swap). Writes
//!   to siblings (an audit file next to the policies, say) never wake the watch.
//!
//! When the directory entry is swapped, removed or moved, the directory watch is added
//! again on whatever the path names now, so edits inside the new target are seen too. A
//! queue overflow counts as a change. Every relevant batch of events sends one `()` on the
//! channel (a full channel already holds a pending reload); the watch thread ends when the
//! receiver is gone.
#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    thread,
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::sync::mpsc::{Sender, error::TrySendError};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// inotify could not be initialised.
    #[error("inotify: {source}")]
    Init {
        /// The error.
        source: io::Error,
    },
    /// A path could not be watched.
    #[error("watching {path}: {source}")]
    Watch {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The watch thread could not be started.
    #[error("starting the policy watch thread: {source}")]
    Spawn {
        /// The error.
        source: io::Error,
    },
}

/// What the directory itself is watched for.
fn dir_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MODIFY
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

/// What the parent is watched for: the directory entry appearing, going, or renamed over.
fn parent_mask() -> WatchMask {
    WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::MOVED_TO
}

/// A running watch (the thread runs until the channel's receiver is dropped).
#[derive(Debug)]
pub struct PolicyWatch {
    /// The watch thread.
    pub thread: thread::JoinHandle<()>,
}

/// Starts watching `dir`; sends `()` on `changed` after each relevant change.
pub fn watch(dir: &Path, changed: Sender<()>) -> Result<PolicyWatch, WatchError> {
    let inotify = Inotify::init().map_err(|source| WatchError::Init { source })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir.file_name().map(OsString::from);
    let parent_wd = inotify
        .watches()
        .add(&parent, parent_mask() | WatchMask::ONLYDIR)
        .map_err(|source| WatchError::Watch {
            path: parent.clone(),
            source,
        })?;
    let dir_wd = inotify
        .watches()
        .add(dir, dir_mask() | WatchMask::ONLYDIR)
        .map_err(|source| WatchError::Watch {
            path: dir.to_path_buf(),
            source,
        })?;
    let state = Watch {
        inotify,
        dir: dir.to_path_buf(),
        name,
        parent_wd,
        dir_wd: Some(dir_wd),
        changed,
    };
    let thread = thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || state.run())
        .map_err(|source| WatchError::Spawn { source })?;
    Ok(PolicyWatch { thread })
}

struct Watch {
    inotify: Inotify,
    dir: PathBuf,
    name: Option<OsString>,
    parent_wd: WatchDescriptor,
    dir_wd: Option<WatchDescriptor>,
    changed: Sender<()>,
}

impl Watch {
    fn run(mut self) {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let (relevant, rewatch) = match self.inotify.read_events_blocking(&mut buffer) {
                Ok(events) => {
                    let mut relevant = false;
                    let mut rewatch = false;
                    for event in events {
                        let (r, w) = classify(
                            &event.wd,
                            event.mask,
                            event.name,
                            &self.parent_wd,
                            self.dir_wd.as_ref(),
                            self.name.as_deref(),
                        );
                        relevant |= r;
                        rewatch |= w;
                    }
                    (relevant, rewatch)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading policy directory events failed; reload with SIGHUP");
                    return;
                }
            };
            if rewatch {
                self.rewatch();
            }
            if relevant {
                match self.changed.try_send(()) {
                    Ok(()) | Err(TrySendError::Full(())) => {}
                    Err(TrySendError::Closed(())) => return,
                }
            }
        }
    }

    /// Watches whatever the directory path names now.
    fn rewatch(&mut self) {
        if let Some(old) = self.dir_wd.take() {
            // Already gone if the directory was deleted.
            let _ = self.inotify.watches().remove(old);
        }
        match self
            .inotify
            .watches()
            .add(&self.dir, dir_mask() | WatchMask::ONLYDIR)
        {
            Ok(wd) => self.dir_wd = Some(wd),
            Err(e) => tracing::warn!(
                dir = %self.dir.display(),
                error = %e,
                "the policy directory cannot be watched now; watching again when it reappears"
            ),
        }
    }
}

/// Whether an event is a change of the policies, and whether the directory must be watched
/// again (its entry was replaced, or its watch ended).
fn classify(
    wd: &WatchDescriptor,
    mask: EventMask,
    name: Option<&std::ffi::OsStr>,
    parent_wd: &WatchDescriptor,
    dir_wd: Option<&WatchDescriptor>,
    dir_name: Option<&std::ffi::OsStr>,
) -> (bool, bool) {
    if mask.contains(EventMask::Q_OVERFLOW) {
        return (true, true);
    }
    if wd == parent_wd {
        let ours = name.is_some() && name == dir_name;
        return (ours, ours);
    }
    if Some(wd) == dir_wd {
        if mask.contains(EventMask::IGNORED) {
            return (false, true);
        }
        let gone = mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF);
        return (true, gone);
    }
    // Events of a watch already replaced.
    (false, false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use std::{fs, os::unix::fs::symlink, time::Duration};

    use tokio::sync::mpsc;

    use super::*;

    /// Waits up to 2 s for a change notification; then drains what else came.
    fn changed_within(rx: &mut mpsc::Receiver<()>) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if rx.try_recv().is_ok() {
                thread::sleep(Duration::from_millis(50));
                while rx.try_recv().is_ok() {}
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Nothing arrives within 300 ms.
    fn quiet(rx: &mut mpsc::Receiver<()>) -> bool {
        thread::sleep(Duration::from_millis(300));
        rx.try_recv().is_err()
    }

    #[test]
    fn edits_swaps_and_edits_after_a_swap_are_seen_and_siblings_are_not() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("rev-a"), root.path().join("rev-b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let link = root.path().join("current");
        symlink(&a, &link).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _watch = watch(&link, tx).unwrap();

        // A sibling of the directory (an audit file, say) written often: no wake-up.
        let sibling = root.path().join("audit.jsonl");
        for i in 0..50 {
            fs::write(&sibling, format!("{i}\n")).unwrap();
        }
        assert!(
            quiet(&mut rx),
            "a sibling's writes count as a policy change"
        );

        // An atomic save inside the directory.
        fs::write(a.join(".web.yaml.tmp"), "x").unwrap();
        fs::rename(a.join(".web.yaml.tmp"), a.join("web.yaml")).unwrap();
        assert!(changed_within(&mut rx), "edit inside the directory");

        // A symlink swap.
        let tmp = root.path().join("current.tmp");
        symlink(&b, &tmp).unwrap();
        fs::rename(&tmp, &link).unwrap();
        assert!(changed_within(&mut rx), "symlink swap");

        // An edit inside the new target is seen; one inside the old target is not.
        fs::write(b.join("web.yaml"), "y").unwrap();
        assert!(changed_within(&mut rx), "edit inside the new target");
        fs::write(a.join("web.yaml"), "z").unwrap();
        assert!(quiet(&mut rx), "an edit inside the old target counts");

        // The directory removed and created again: both seen, and watched again.
        fs::remove_file(&link).unwrap();
        assert!(changed_within(&mut rx), "directory entry removed");
        fs::create_dir(&link).unwrap();
        assert!(changed_within(&mut rx), "directory created again");
        fs::write(link.join("web.yaml"), "w").unwrap();
        assert!(
            changed_within(&mut rx),
            "edit inside the re-created directory"
        );
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let e = watch(&root.path().join("nope"), tx).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn the_thread_ends_when_the_receiver_is_gone() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p");
        fs::create_dir(&dir).unwrap();
        let (tx, rx) = mpsc::channel(1);
        let w = watch(&dir, tx).unwrap();
        drop(rx);
        fs::write(dir.join("x.yaml"), "x").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !w.thread.is_finished() && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(w.thread.is_finished());
    }
}
