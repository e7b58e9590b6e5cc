//! The few raw libc calls xtask makes. This is the only module with `unsafe`.

use std::io;

/// The effective user id of this process.
#[allow(
    unsafe_code,
    reason = "geteuid(2) takes no arguments, touches no memory and cannot fail"
)]
pub fn geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Calls bpf(2) with a command no kernel knows and no attribute buffer.
///
/// Returns the errno it fails with: `ENOSYS` means the kernel has no bpf syscall;
/// `EINVAL` (unknown command), `EPERM` or `E2BIG` mean it exists.
#[allow(
    unsafe_code,
    reason = "bpf(2) with an unknown command and a NULL, zero-sized attr reads no memory"
)]
pub fn bpf_probe_errno() -> i32 {
    let cmd = libc::c_long::from(i32::MAX);
    // SAFETY: the attr pointer is NULL with size 0, so the kernel copies nothing; an
    // unknown command creates no file descriptor.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, 0 as libc::c_long, 0 as libc::c_long) };
    if ret < 0 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

/// Sends SIGTERM to `pid`.
#[allow(
    unsafe_code,
    reason = "kill(2) on the PID of a child we spawned and have not reaped yet"
)]
pub fn sigterm(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill has no memory-safety preconditions; callers pass the PID of their own
    // unreaped child, so it cannot have been recycled.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
