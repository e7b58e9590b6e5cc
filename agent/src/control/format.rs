//! Human-readable text for `status`, `workloads` and `reload` (pure; `--json` prints the
//! protocol's values instead).
#![forbid(unsafe_code)]

use std::fmt::Write as _;

use super::protocol::{ReloadResult, Status, WorkloadEntry};

/// A duration in seconds as `3d 4h 5m 6s` (leading zero units left out).
pub fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    for (value, unit) in [(d, "d"), (h, "h"), (m, "m")] {
        if value > 0 || !out.is_empty() {
            let _ = write!(out, "{value}{unit} ");
        }
    }
    let _ = write!(out, "{s}s");
    out
}

/// `scopegate status` as text.
pub fn status(s: &Status) -> String {
    let mut out = String::new();
    let health = if s.enforcement.healthy && s.audit.healthy {
        "healthy"
    } else {
        "UNHEALTHY"
    };
    let _ = writeln!(out, "scopegate {} (pid {}): {health}", s.version, s.pid);
    let _ = writeln!(
        out,
        "  uptime:       {} (since {})",
        uptime(s.uptime_secs),
        s.started_at
    );
    let _ = writeln!(
        out,
        "  policy:       {} workload(s) from {}, hash {}, loaded {}",
        s.policy.workloads,
        s.policy.dir,
        s.policy.hash.as_deref().unwrap_or("unknown"),
        s.policy.loaded_at
    );
    for grant in &s.policy.expiring {
        let _ = writeln!(out, "  expiring:     {grant}");
    }
    match &s.last_reload {
        None => {
            let _ = writeln!(out, "  last reload:  none");
        }
        Some(r) => {
            let _ = writeln!(out, "  last reload:  {}", reload_line(r));
            for e in &r.errors {
                let _ = writeln!(out, "    {e}");
            }
        }
    }
    let e = &s.enforcement;
    let _ = writeln!(
        out,
        "  enforcement:  {} (checked every {} s, last {})",
        if e.healthy {
            "ok".to_owned()
        } else {
            e.reason.clone().unwrap_or_else(|| "unhealthy".into())
        },
        e.check_interval_secs,
        e.last_check.as_deref().unwrap_or("not yet")
    );
    if let Some(i) = &e.last_incident {
        let when = match (&i.restored_at, &i.error) {
            (Some(at), _) => format!("restored {at}"),
            (None, Some(err)) => format!("not restored: {err}"),
            (None, None) => "not restored".into(),
        };
        let _ = writeln!(
            out,
            "  last incident: {} detected {}, {when}",
            i.outcome, i.detected_at
        );
        for p in &i.problems {
            let _ = writeln!(out, "    {p}");
        }
    }
    let _ = writeln!(out, "  hooks:");
    for h in &s.hooks {
        let state = match (h.attached, h.pinned) {
            (true, true) => "attached, pinned",
            (true, false) => "attached, NOT PINNED",
            (false, true) => "NOT ATTACHED, pinned",
            (false, false) => "NOT ATTACHED, NOT PINNED",
        };
        let link = h.link_id.map_or_else(|| "-".into(), |id| id.to_string());
        let _ = writeln!(
            out,
            "    {:<16} prog {:<6} link {:<6} {state}  {}",
            h.program, h.program_id, link, h.pin
        );
    }
    let c = &s.cgroups;
    let _ = writeln!(
        out,
        "  cgroups:      {} managed, {} held, {} held unseen, {} release(s) pending",
        c.managed, c.held, c.unseen_held, c.release_pending
    );
    let a = &s.audit;
    let _ = writeln!(
        out,
        "  audit:        {}{}, {} written, {} write error(s), {} queued",
        if a.healthy { "ok" } else { "UNAVAILABLE" },
        a.file
            .as_deref()
            .map(|f| format!(" ({f})"))
            .unwrap_or_default(),
        a.records_written,
        a.write_errors,
        a.queue_depth
    );
    let k = &s.counters;
    let _ = write!(
        out,
        "  kernel:       {} redirected, {} denied, {} events lost; {} cgroup scan error(s)",
        k.kernel_redirected, k.kernel_denied, k.kernel_events_lost, k.cgroup_scan_errors
    );
    out
}

fn reload_line(r: &ReloadResult) -> String {
    let hash = r.policy_hash.as_deref().unwrap_or("unknown");
    if r.ok {
        format!(
            "ok at {} ({}), {} workload(s), hash {hash}",
            r.at,
            r.trigger,
            r.workloads.unwrap_or(0)
        )
    } else {
        format!(
            "REJECTED at {} ({}), hash {hash}; the last good policy stays in force",
            r.at, r.trigger
        )
    }
}

/// `scopegate reload` as text: one line, then each error on its own line.
pub fn reload(r: &ReloadResult) -> String {
    let mut out = format!("reload {}", reload_line(r));
    for e in &r.errors {
        let _ = write!(out, "\n{e}");
    }
    out
}

/// `scopegate workloads` as text: workload, then its cgroups, then their pids.
pub fn workloads(list: &[WorkloadEntry]) -> String {
    let mut out = String::new();
    for w in list {
        match (&w.workload, &w.file) {
            (Some(name), Some(file)) => {
                let _ = writeln!(out, "{name} ({file})");
            }
            (Some(name), None) => {
                let _ = writeln!(out, "{name}");
            }
            (None, _) => {
                let _ = writeln!(out, "(no workload: held or in a managed subtree)");
            }
        }
        if w.cgroups.is_empty() {
            let _ = writeln!(out, "  no cgroup yet");
        }
        for c in &w.cgroups {
            let mut flags = Vec::new();
            if !c.selected {
                flags.push("descendant");
            }
            if c.held {
                flags.push("held");
            }
            let flags = if flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", flags.join(", "))
            };
            let pids = if c.pids.is_empty() {
                "no processes".to_owned()
            } else {
                let list: Vec<String> = c.pids.iter().map(u32::to_string).collect();
                format!("pids {}", list.join(" "))
            };
            let _ = writeln!(out, "  {} (id {}){flags}: {pids}", c.path, c.id);
        }
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::control::protocol::{
        AuditStatus, CgroupCounts, CgroupEntry, Counters, EnforcementStatus, HookEntry, Incident,
        PolicyStatus,
    };

    #[test]
    fn uptimes_drop_leading_zero_units() {
        assert_eq!(uptime(0), "0s");
        assert_eq!(uptime(59), "59s");
        assert_eq!(uptime(3600), "1h 0m 0s");
        assert_eq!(uptime(90_061), "1d 1h 1m 1s");
    }

    fn sample() -> Status {
        Status {
            version: "0.1.0".into(),
            pid: 42,
            started_at: "2026-01-01T00:00:00Z".into(),
            uptime_secs: 61,
            policy: PolicyStatus {
                dir: "/etc/scopegate/policies".into(),
                hash: Some("ab12".into()),
                loaded_at: "2026-01-01T00:00:01Z".into(),
                workloads: 2,
                expiring: vec![
                    "workload billing: rule migrate of api.example.com:443 expires at \
                     2026-01-10T00:00:00Z (in 8 day(s))"
                        .into(),
                ],
            },
            last_reload: Some(ReloadResult {
                ok: false,
                at: "2026-01-01T00:00:30Z".into(),
                trigger: "admin socket".into(),
                policy_hash: Some("cd34".into()),
                workloads: None,
                errors: vec!["/p/a.yaml:3:5: unknown field `x`".into()],
            }),
            enforcement: EnforcementStatus {
                healthy: true,
                reason: None,
                check_interval_secs: 5.0,
                last_check: Some("2026-01-01T00:01:00Z".into()),
                last_incident: Some(Incident {
                    detected_at: "2026-01-01T00:00:50Z".into(),
                    problems: vec!["sg_connect4 (program id 7) is not attached to /x".into()],
                    outcome: "enforcement_restored".into(),
                    restored_at: Some("2026-01-01T00:00:50Z".into()),
                    error: None,
                }),
            },
            hooks: vec![HookEntry {
                program: "sg_connect4".into(),
                program_id: 7,
                link_id: Some(9),
                pin: "/sys/fs/bpf/scopegate/v2/link_connect4".into(),
                pinned: true,
                attached: true,
            }],
            cgroups: CgroupCounts {
                managed: 3,
                held: 1,
                unseen_held: 0,
                release_pending: 0,
            },
            audit: AuditStatus {
                healthy: true,
                file: Some("/var/log/scopegate/audit.jsonl".into()),
                records_written: 10,
                write_errors: 0,
                queue_depth: 0,
            },
            counters: Counters {
                kernel_redirected: 5,
                kernel_denied: 2,
                kernel_events_lost: 0,
                cgroup_scan_errors: 0,
            },
        }
    }

    #[test]
    fn status_text_names_every_part() {
        let text = status(&sample());
        assert!(
            text.starts_with("scopegate 0.1.0 (pid 42): healthy\n"),
            "{text}"
        );
        for part in [
            "uptime:       1m 1s",
            "2 workload(s) from /etc/scopegate/policies, hash ab12",
            "\n  expiring:     workload billing: rule migrate of api.example.com:443 expires at",
            "last reload:  REJECTED at 2026-01-01T00:00:30Z (admin socket), hash cd34",
            "\n    /p/a.yaml:3:5: unknown field `x`\n",
            "enforcement:  ok (checked every 5 s",
            "last incident: enforcement_restored detected 2026-01-01T00:00:50Z, restored",
            "sg_connect4      prog 7      link 9      attached, pinned  /sys/fs/bpf/scopegate/v2/link_connect4",
            "3 managed, 1 held",
            "audit:        ok (/var/log/scopegate/audit.jsonl), 10 written",
            "5 redirected, 2 denied, 0 events lost",
        ] {
            assert!(text.contains(part), "missing {part:?} in\n{text}");
        }
    }

    #[test]
    fn unhealthy_status_says_why() {
        let mut s = sample();
        s.enforcement.healthy = false;
        s.enforcement.reason = Some("enforcement_lost: attach failed".into());
        s.hooks[0].attached = false;
        s.hooks[0].link_id = None;
        let text = status(&s);
        assert!(
            text.starts_with("scopegate 0.1.0 (pid 42): UNHEALTHY"),
            "{text}"
        );
        assert!(
            text.contains("enforcement:  enforcement_lost: attach failed"),
            "{text}"
        );
        assert!(text.contains("link -      NOT ATTACHED, pinned"), "{text}");
        let mut audit_down = sample();
        audit_down.audit.healthy = false;
        assert!(status(&audit_down).contains("UNHEALTHY"));
        assert!(status(&audit_down).contains("audit:        UNAVAILABLE"));
    }

    #[test]
    fn reload_text_lists_errors_one_per_line() {
        let s = sample();
        let text = reload(s.last_reload.as_ref().unwrap());
        assert_eq!(
            text,
            "reload REJECTED at 2026-01-01T00:00:30Z (admin socket), hash cd34; the last good policy stays in force\n/p/a.yaml:3:5: unknown field `x`"
        );
        let ok = ReloadResult {
            ok: true,
            at: "t".into(),
            trigger: "SIGHUP".into(),
            policy_hash: Some("ef".into()),
            workloads: Some(3),
            errors: Vec::new(),
        };
        assert_eq!(
            reload(&ok),
            "reload ok at t (SIGHUP), 3 workload(s), hash ef"
        );
    }

    #[test]
    fn workloads_text_nests_cgroups_and_pids() {
        let list = vec![
            WorkloadEntry {
                workload: Some("billing".into()),
                file: Some("/p/billing.yaml".into()),
                cgroups: vec![
                    CgroupEntry {
                        path: "/app".into(),
                        id: 11,
                        selected: true,
                        held: false,
                        pids: vec![100, 101],
                    },
                    CgroupEntry {
                        path: "/app/child".into(),
                        id: 12,
                        selected: false,
                        held: false,
                        pids: Vec::new(),
                    },
                ],
            },
            WorkloadEntry {
                workload: Some("idle".into()),
                file: None,
                cgroups: Vec::new(),
            },
            WorkloadEntry {
                workload: None,
                file: None,
                cgroups: vec![CgroupEntry {
                    path: "/old".into(),
                    id: 13,
                    selected: true,
                    held: true,
                    pids: vec![7],
                }],
            },
        ];
        assert_eq!(
            workloads(&list),
            "billing (/p/billing.yaml)\n  /app (id 11): pids 100 101\n  /app/child (id 12) [descendant]: no processes\nidle\n  no cgroup yet\n(no workload: held or in a managed subtree)\n  /old (id 13) [held]: pids 7"
        );
        assert_eq!(workloads(&[]), "");
    }
}
