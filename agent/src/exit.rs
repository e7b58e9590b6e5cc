//! Exit codes (sysexits.h, as systemd's `RestartPreventExitStatus=` wants them) and the
//! one way errors are printed.
//!
//! | code | meaning | examples |
//! |---|---|---|
//! | 0 | success | |
//! | 1 | any other failure (may be transient: restarting can help) | port in use, audit file unwritable |
//! | 69 (`EX_UNAVAILABLE`) | a kernel feature is missing, or the agent cannot be reached | no cgroup v2, no bpffs, programs rejected by the kernel; `status`/`reload` with no agent on the admin socket |
//! | 77 (`EX_NOPERM`) | missing privileges | not root, no CAP_BPF/CAP_NET_ADMIN/CAP_SYS_ADMIN, EPERM from bpf(2) |
//! | 78 (`EX_CONFIG`) | configuration or policy error | invalid policy, bad config file, non-loopback metrics address |
//!
//! Codes 69, 77 and 78 do not go away by restarting, so the unit lists them in
//! `RestartPreventExitStatus=`.
#![forbid(unsafe_code)]

use std::error::Error;

use crate::{
    accept::AcceptError, admin::AdminError, bpf::BpfError, config::ConfigError,
    policy::PolicyErrors, run::RunError, workloads::WorkloadsError,
};

/// Any other failure.
pub const FAILURE: u8 = 1;
/// A kernel feature the agent needs is unavailable.
pub const UNAVAILABLE: u8 = exitcode::UNAVAILABLE as u8;
/// Missing privileges.
pub const NOPERM: u8 = exitcode::NOPERM as u8;
/// A configuration or policy error.
pub const CONFIG: u8 = exitcode::CONFIG as u8;

/// The exit code for an error: the code of the first error in its source chain that has
/// one, else [`FAILURE`].
pub fn code(err: &(dyn Error + 'static)) -> u8 {
    chain(err).find_map(own_code).unwrap_or(FAILURE)
}

fn chain<'a>(err: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e| (*e).source())
}

/// The code an error of this crate carries by itself.
fn own_code(err: &(dyn Error + 'static)) -> Option<u8> {
    if err.is::<ConfigError>() || err.is::<PolicyErrors>() {
        return Some(CONFIG);
    }
    if let Some(e) = err.downcast_ref::<RunError>() {
        return Some(run_code(e));
    }
    if let Some(e) = err.downcast_ref::<BpfError>() {
        return Some(bpf_code(e));
    }
    if let Some(crate::control::ControlError::Unreachable { .. }) = err.downcast_ref() {
        return Some(UNAVAILABLE);
    }
    None
}

fn run_code(err: &RunError) -> u8 {
    match err {
        RunError::Policy(_) | RunError::CgroupRoot { .. } | RunError::UpstreamTls(_) => CONFIG,
        RunError::Admin(AdminError::NotLoopback { .. }) => CONFIG,
        RunError::NotPrivileged { .. } => NOPERM,
        RunError::Workloads(WorkloadsError::NoCgroup2 { .. }) => UNAVAILABLE,
        RunError::Bpf(e) => bpf_code(e),
        RunError::Accept(AcceptError::Bind { source, .. }) if denied(source) => NOPERM,
        _ => FAILURE,
    }
}

fn bpf_code(err: &BpfError) -> u8 {
    let refused = chain(err)
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(denied);
    match err {
        _ if refused => NOPERM,
        BpfError::NoObject
        | BpfError::NoBpffs { .. }
        | BpfError::Load { .. }
        | BpfError::Program { .. } => UNAVAILABLE,
        BpfError::Io { .. } | BpfError::Map { .. } => FAILURE,
    }
}

fn denied(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

/// The lines to print for an error, each message once: a source whose text its parent
/// already shows (`"{path}: {source}"`) is not repeated, and a message of several lines
/// (one per policy error) stays several lines.
pub fn lines(err: &(dyn Error + 'static)) -> Vec<String> {
    let mut text = String::new();
    for e in chain(err) {
        let message = e.to_string();
        if !text.contains(&message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&message);
        }
    }
    text.lines().map(str::to_owned).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use std::{io, path::PathBuf};

    #[derive(Debug, thiserror::Error)]
    #[error("starting: {source}")]
    struct Wrap {
        source: RunError,
    }

    #[test]
    fn codes_follow_sysexits() {
        assert_eq!((FAILURE, UNAVAILABLE, NOPERM, CONFIG), (1, 69, 77, 78));
        let policy = RunError::Policy(PolicyErrors(Vec::new()));
        assert_eq!(code(&policy), CONFIG);
        let wrapped = Wrap { source: policy };
        assert_eq!(code(&wrapped), CONFIG, "found through the source chain");
        let perm = RunError::NotPrivileged {
            missing: vec!["CAP_BPF"],
        };
        assert_eq!(code(&perm), NOPERM);
        let no_cgroup = RunError::Workloads(WorkloadsError::NoCgroup2 {
            mounts: "/proc/self/mounts".into(),
        });
        assert_eq!(code(&no_cgroup), UNAVAILABLE);
        assert_eq!(code(&RunError::Bpf(BpfError::NoObject)), UNAVAILABLE);
        let bpf_eperm = BpfError::Program {
            program: "sg_connect4",
            action: "attach",
            source: Box::new(io::Error::from_raw_os_error(libc::EPERM)),
        };
        assert_eq!(code(&RunError::Bpf(bpf_eperm)), NOPERM);
        let bpf_einval = BpfError::Program {
            program: "sg_connect4",
            action: "attach",
            source: Box::new(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        assert_eq!(code(&bpf_einval), UNAVAILABLE);
        let in_use = RunError::Accept(AcceptError::Bind {
            addr: "127.0.0.1:15001".parse().unwrap(),
            source: io::Error::from_raw_os_error(libc::EADDRINUSE),
            hint: "",
        });
        assert_eq!(code(&in_use), FAILURE, "may be transient: restart helps");
        let not_loopback = RunError::Admin(AdminError::NotLoopback {
            addr: "192.0.2.1:9464".parse().unwrap(),
        });
        assert_eq!(code(&not_loopback), CONFIG);
        let config = ConfigError::Read {
            file: PathBuf::from("/etc/scopegate/scopegate.yaml"),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert_eq!(code(&config), CONFIG);
        assert_eq!(code(&io::Error::other("x")), FAILURE);
    }

    #[test]
    fn each_message_is_printed_once() {
        let e = RunError::Accept(AcceptError::Bind {
            addr: "127.0.0.1:15001".parse().unwrap(),
            source: io::Error::from_raw_os_error(libc::EADDRINUSE),
            hint: "",
        });
        let printed = lines(&e);
        assert_eq!(printed.len(), 1, "{printed:?}");
        assert_eq!(
            printed[0].matches("Address already in use").count(),
            1,
            "{printed:?}"
        );
        // A context that does not repeat its source gets it appended.
        let wrapped = Wrap {
            source: RunError::NotPrivileged {
                missing: vec!["CAP_BPF"],
            },
        };
        assert_eq!(lines(&wrapped).len(), 1);
    }

    #[test]
    fn several_policy_errors_stay_one_per_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), "workload: a\nbogus: 1\n").unwrap();
        std::fs::write(dir.path().join("b.yaml"), "workload: b\nbogus: 2\n").unwrap();
        let errors = crate::policy::Snapshot::load_dir(dir.path()).unwrap_err();
        assert_eq!(errors.len(), 2);
        let run = RunError::Policy(errors);
        let printed = lines(&run);
        assert_eq!(printed.len(), 2, "{printed:?}");
        assert!(printed[0].contains("a.yaml:2:1"), "{printed:?}");
        assert!(printed[1].contains("b.yaml:2:1"), "{printed:?}");
        assert_eq!(code(&run), CONFIG);
    }
}
