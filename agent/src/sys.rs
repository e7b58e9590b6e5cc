//! The few raw system calls the agent needs that aya 0.14, socket2 and nix do not offer:
//! `BPF_OBJ_GET` and `BPF_LINK_UPDATE` (to swap the program behind a pinned link without a
//! gap), `BPF_PROG_QUERY` (which programs are attached to a cgroup, for the health
//! check), `SO_NETNS_COOKIE`, `RLIMIT_NOFILE`, and `SCHED_BATCH` for the audit writer
//! thread. Each is a thin, checked wrapper.
#![allow(
    unsafe_code,
    reason = "raw bpf(2), getsockopt(2), rlimits and sched_setscheduler(2); every call is wrapped and checked"
)]

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_QUERY: libc::c_long = 16;
const SO_NETNS_COOKIE: libc::c_int = 71;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, properly sized #[repr(C)] bpf_attr prefix; the kernel reads
    // at most size_of::<T>() bytes and zero-extends the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned bpf object (`BPF_OBJ_GET`).
pub fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program behind a link (`BPF_LINK_UPDATE`).
pub fn bpf_link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The ids of the programs attached to the cgroup `cgroup` for `attach_type`
/// (`BPF_PROG_QUERY`, effective and link-attached programs alike; at most 64).
pub fn bpf_prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`).
pub fn netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket fd, and a u64 buffer with its exact length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns (old soft, new soft).
///
/// Every proxied connection costs the agent two descriptors; at the distribution default
/// soft limit (1024) a burst of connections would make accept, the cgroup scan and the
/// audit writer fail with EMFILE.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let old = limit.rlim_cur;
    if limit.rlim_cur == limit.rlim_max {
        return Ok((old, old));
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: a valid rlimit struct; raising the soft limit up to the hard one is always
    // permitted.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((old, limit.rlim_cur))
}

/// Puts the calling thread under `SCHED_BATCH`: the same CPU share as any other thread
/// (same nice value), but its wake-ups never preempt the thread running on that CPU.
///
/// For the audit writer: every request hands it a record, and each hand-off wakes it. Under
/// the default policy each wake-up preempted the tokio worker at once (when both share a
/// CPU), so a batch held one record and every request paid two context switches per
/// record. A batch thread runs when the worker waits (for those very records) or at the
/// next tick, and then writes everything queued in one go: group commit.
pub fn batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid sched_param; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn a_thread_can_take_batch_scheduling() {
        let policy = std::thread::spawn(|| {
            batch_scheduling().unwrap();
            // SAFETY: no arguments; pid 0 is the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_BATCH);
        // The test thread itself keeps its policy.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }

    #[test]
    fn nofile_soft_limit_is_raised_to_the_hard_limit() {
        let (_old, new) = raise_nofile_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid, writable rlimit struct.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max);
        assert_eq!(new, limit.rlim_cur);
        assert_eq!(raise_nofile_limit().unwrap(), (new, new), "idempotent");
    }

    #[test]
    fn netns_cookie_is_stable_and_nonzero() {
        let a = netns_cookie().unwrap();
        assert_ne!(a, 0);
        assert_eq!(a, netns_cookie().unwrap());
    }

    #[test]
    fn obj_get_of_a_missing_pin_is_an_error() {
        assert!(bpf_obj_get(Path::new("/sys/fs/bpf/does-not-exist-scopegate")).is_err());
    }
}
