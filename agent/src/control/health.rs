//! Health reflects enforcement: every `--health-interval-secs` the agent checks that its
//! programs are attached to the cgroup root and their links and maps pinned
//! ([`Kernel::check`]). If something is gone while it runs (`scopegate uninstall --force`,
//! a stray `rm` on bpffs, `bpftool link detach`), it logs at error level, re-attaches and
//! re-pins at once ([`Kernel::restore`]: the same maps, so no state is lost) and records
//! `enforcement_restored`; if that fails it records `enforcement_lost` (once per incident),
//! `/healthz` answers 503 and `status` shows it unhealthy, and it keeps retrying every
//! interval. `status` keeps the last incident after a restoration.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::Duration};

use super::{AgentState, protocol::Incident, state::now};
use crate::{
    audit::{Auditor, lifecycle},
    bpf::Kernel,
};

/// How long a link unpinned a moment ago may still show as attached while the kernel
/// frees it: the check is repeated after this before re-attaching.
const SETTLE: Duration = Duration::from_millis(100);

/// Checks every `state.check_interval()`, forever.
pub async fn watch(kernel: Arc<Kernel>, state: Arc<AgentState>, auditor: Auditor) {
    let mut tick = tokio::time::interval(state.check_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost = false;
    loop {
        tick.tick().await;
        let (k, s, a) = (kernel.clone(), state.clone(), auditor.clone());
        match tokio::task::spawn_blocking(move || check_once(&k, &s, &a, lost)).await {
            Ok(now_lost) => lost = now_lost,
            Err(e) => tracing::error!(error = %e, "the enforcement health check panicked"),
        }
    }
}

/// One check (and restoration when needed). `lost`: the previous check could not restore
/// enforcement (its `enforcement_lost` is recorded already). Returns whether enforcement is
/// lost now.
pub fn check_once(kernel: &Kernel, state: &AgentState, auditor: &Auditor, lost: bool) -> bool {
    let found = kernel.check();
    let problems = found.problems();
    if problems.is_empty() {
        state.check_passed();
        return false;
    }
    let detected_at = now();
    tracing::error!(
        count = problems.len(),
        problems = %problems.join("; "),
        "enforcement is gone while the agent runs; re-attaching"
    );
    std::thread::sleep(SETTLE);
    let settled = kernel.check();
    let outcome = kernel
        .restore(&settled)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let after = kernel.check().problems();
            if after.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "still missing after re-attaching: {}",
                    after.join("; ")
                ))
            }
        });
    match outcome {
        Ok(()) => {
            tracing::error!(
                pin_dir = %kernel.pin_dir().display(),
                "enforcement restored: hooks re-attached and pins restored"
            );
            auditor.record(lifecycle::enforcement_restored(&problems));
            state.incident(Incident {
                detected_at,
                problems,
                outcome: lifecycle::ENFORCEMENT_RESTORED.into(),
                restored_at: Some(now()),
                error: None,
            });
            false
        }
        Err(error) => {
            tracing::error!(error = %error, "enforcement lost: cannot re-attach the hooks; retrying every check");
            if !lost {
                auditor.record(lifecycle::enforcement_lost(&problems, &error));
            }
            state.incident(Incident {
                detected_at,
                problems,
                outcome: lifecycle::ENFORCEMENT_LOST.into(),
                restored_at: None,
                error: Some(error),
            });
            true
        }
    }
}
