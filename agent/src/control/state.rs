//! What the agent knows about itself for `status` and `/healthz`: when it started, the
//! policy in force, the last reload, and enforcement health (with the last incident).
#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::protocol::{EnforcementStatus, Incident, ReloadResult};

/// Shared by the control loop (writes) and the admin endpoints (read).
#[derive(Debug)]
pub struct AgentState {
    started: Instant,
    started_at: jiff::Timestamp,
    /// The policy directory.
    pub policy_dir: PathBuf,
    /// The audit file, if any.
    pub audit_file: Option<PathBuf>,
    check_interval: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    policy_hash: Option<String>,
    loaded_at: jiff::Timestamp,
    last_reload: Option<ReloadResult>,
    enforcement: EnforcementStatus,
}

/// The current time as written in `status` (RFC 3339, microseconds, UTC).
pub fn now() -> String {
    format!("{:.6}", jiff::Timestamp::now())
}

impl AgentState {
    /// The state at start, with the policy loaded at start.
    pub fn new(
        policy_dir: PathBuf,
        audit_file: Option<PathBuf>,
        policy_hash: Option<String>,
        check_interval: Duration,
    ) -> Self {
        let at = jiff::Timestamp::now();
        Self {
            started: Instant::now(),
            started_at: at,
            policy_dir,
            audit_file,
            check_interval,
            inner: Mutex::new(Inner {
                policy_hash,
                loaded_at: at,
                last_reload: None,
                enforcement: EnforcementStatus {
                    healthy: true,
                    check_interval_secs: check_interval.as_secs_f64(),
                    ..EnforcementStatus::default()
                },
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the agent started (RFC 3339) and how long ago.
    pub fn started(&self) -> (String, Duration) {
        (format!("{:.6}", self.started_at), self.started.elapsed())
    }

    /// How often enforcement is checked.
    pub fn check_interval(&self) -> Duration {
        self.check_interval
    }

    /// The hash and load time of the policy in force.
    pub fn policy(&self) -> (Option<String>, String) {
        let inner = self.inner();
        (inner.policy_hash.clone(), format!("{:.6}", inner.loaded_at))
    }

    /// Records a reload attempt; a successful one also becomes the policy in force.
    pub fn reloaded(&self, result: &ReloadResult) {
        let mut inner = self.inner();
        if result.ok {
            inner.policy_hash = result.policy_hash.clone();
            inner.loaded_at = jiff::Timestamp::now();
        }
        inner.last_reload = Some(result.clone());
    }

    /// The last reload attempt.
    pub fn last_reload(&self) -> Option<ReloadResult> {
        self.inner().last_reload.clone()
    }

    /// Enforcement health as last checked.
    pub fn enforcement(&self) -> EnforcementStatus {
        self.inner().enforcement.clone()
    }

    /// A check found everything in place.
    pub fn check_passed(&self) {
        let mut inner = self.inner();
        inner.enforcement.last_check = Some(now());
        inner.enforcement.healthy = true;
        inner.enforcement.reason = None;
    }

    /// A check found enforcement gone; `incident` is what happened about it. Restored
    /// enforcement is healthy again (the incident stays visible), lost is not.
    pub fn incident(&self, incident: Incident) {
        let mut inner = self.inner();
        inner.enforcement.last_check = Some(now());
        inner.enforcement.healthy = incident.restored_at.is_some();
        inner.enforcement.reason = if incident.restored_at.is_some() {
            None
        } else {
            Some(format!(
                "enforcement_lost: {}",
                incident
                    .error
                    .clone()
                    .unwrap_or_else(|| incident.problems.join("; "))
            ))
        };
        inner.enforcement.last_incident = Some(incident);
    }

    /// Why enforcement is unhealthy, if it is (for `/healthz`).
    pub fn unhealthy(&self) -> Option<String> {
        let inner = self.inner();
        (!inner.enforcement.healthy).then(|| {
            inner
                .enforcement
                .reason
                .clone()
                .unwrap_or_else(|| "enforcement_lost".into())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn state() -> AgentState {
        AgentState::new("/p".into(), None, Some("aa".into()), Duration::from_secs(5))
    }

    #[test]
    fn a_lost_incident_is_unhealthy_until_a_check_passes() {
        let s = state();
        assert_eq!(s.unhealthy(), None);
        s.incident(Incident {
            detected_at: now(),
            problems: vec!["sg_connect4 is not attached".into()],
            outcome: "enforcement_lost".into(),
            restored_at: None,
            error: Some("attach failed: EPERM".into()),
        });
        assert_eq!(
            s.unhealthy().as_deref(),
            Some("enforcement_lost: attach failed: EPERM")
        );
        assert!(!s.enforcement().healthy);
        s.check_passed();
        assert_eq!(s.unhealthy(), None);
        let e = s.enforcement();
        assert!(
            e.healthy && e.last_incident.is_some(),
            "the incident stays visible"
        );
    }

    #[test]
    fn a_restored_incident_is_healthy_and_kept() {
        let s = state();
        s.incident(Incident {
            detected_at: now(),
            problems: vec!["map SG_MANAGED: pin missing".into()],
            outcome: "enforcement_restored".into(),
            restored_at: Some(now()),
            error: None,
        });
        assert_eq!(s.unhealthy(), None);
        assert_eq!(
            s.enforcement().last_incident.unwrap().outcome,
            "enforcement_restored"
        );
    }

    #[test]
    fn only_a_successful_reload_changes_the_policy() {
        let s = state();
        let rejected = ReloadResult {
            ok: false,
            policy_hash: Some("bb".into()),
            errors: vec!["/p/a.yaml:1:1: bad".into()],
            ..ReloadResult::default()
        };
        s.reloaded(&rejected);
        assert_eq!(s.policy().0.as_deref(), Some("aa"));
        assert_eq!(s.last_reload(), Some(rejected));
        s.reloaded(&ReloadResult {
            ok: true,
            policy_hash: Some("cc".into()),
            ..ReloadResult::default()
        });
        assert_eq!(s.policy().0.as_deref(), Some("cc"));
    }
}
