//! Grant usage: which grants of a policy the audit trail shows exercised, and which not
//! (the permission-creep report of `policy unused`). Pure: the caller reads the audit
//! records and hands over one [`Use`] per allowed request.
//!
//! A grant is used when an `allow` decision record names it: `rule` on a record is only
//! ever the rule that allowed the request (denials carry `nearest_rule`), so a rule is used
//! iff some allow record names it, a method of a rule iff some allow record names the rule
//! with that method, and a destination iff one of its rules is used. `would_deny` records
//! (audit mode) exercise nothing. L4 exceptions are passed in the kernel without a record
//! per connection and are not reported.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::Snapshot;

/// One allowed request, from its decision record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Use<'a> {
    /// The workload.
    pub workload: &'a str,
    /// The allowing rule.
    pub rule: &'a str,
    /// The request's method.
    pub method: &'a str,
}

/// A grant that nothing used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unused {
    /// The workload.
    pub workload: String,
    /// `destination`, `rule` or `methods`.
    pub kind: &'static str,
    /// The destination, `host:port`.
    pub destination: String,
    /// The rule, for `rule` and `methods`.
    pub rule: Option<String>,
    /// The unused methods, for `methods`.
    pub methods: Vec<String>,
}

impl fmt::Display for Unused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workload {}: ", self.workload)?;
        match self.kind {
            "destination" => write!(
                f,
                "destination {} was never used (none of its rules allowed a request)",
                self.destination
            ),
            "rule" => write!(
                f,
                "rule {} of {} was never used",
                self.rule.as_deref().unwrap_or("?"),
                self.destination
            ),
            _ => write!(
                f,
                "rule {} of {}: method(s) {} never used",
                self.rule.as_deref().unwrap_or("?"),
                self.destination,
                self.methods.join(", ")
            ),
        }
    }
}

/// The report: the unused grants, and how many allow records were counted per workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Unused grants, in workload, destination and rule order.
    pub unused: Vec<Unused>,
    /// Allow records counted, per workload of the policy.
    pub allows: BTreeMap<String, u64>,
    /// Allow records of workloads the policy does not have, per name.
    pub other_workloads: BTreeMap<String, u64>,
    /// Allow records naming a rule the workload does not have (the policy changed since).
    pub unknown_rules: u64,
}

/// Which grants of `snapshot` the `uses` exercise; the unused ones.
pub fn unused<'a>(snapshot: &Snapshot, uses: impl IntoIterator<Item = Use<'a>>) -> Report {
    let mut report = Report::default();
    for w in snapshot.workloads() {
        report.allows.insert(w.name.clone(), 0);
    }
    // (workload, rule) → methods seen
    let mut seen: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for u in uses {
        let Some(w) = snapshot.workloads().iter().find(|w| w.name == u.workload) else {
            *report
                .other_workloads
                .entry(u.workload.to_owned())
                .or_default() += 1;
            continue;
        };
        *report.allows.entry(w.name.clone()).or_default() += 1;
        let known = w
            .destinations
            .iter()
            .any(|d| d.rules().iter().any(|r| r.id() == u.rule));
        if !known {
            report.unknown_rules += 1;
            continue;
        }
        seen.entry((u.workload, u.rule))
            .or_default()
            .insert(u.method);
    }
    for w in snapshot.workloads() {
        for d in &w.destinations {
            let label = d.label();
            let used: Vec<bool> = d
                .rules()
                .iter()
                .map(|r| seen.contains_key(&(w.name.as_str(), r.id())))
                .collect();
            if !used.iter().any(|u| *u) {
                report.unused.push(Unused {
                    workload: w.name.clone(),
                    kind: "destination",
                    destination: label,
                    rule: None,
                    methods: Vec::new(),
                });
                continue;
            }
            for r in d.rules() {
                let Some(methods) = seen.get(&(w.name.as_str(), r.id())) else {
                    report.unused.push(Unused {
                        workload: w.name.clone(),
                        kind: "rule",
                        destination: label.clone(),
                        rule: Some(r.id().to_owned()),
                        methods: Vec::new(),
                    });
                    continue;
                };
                let idle: Vec<String> = r
                    .methods()
                    .filter(|m| !methods.contains(m))
                    .map(str::to_owned)
                    .collect();
                if !idle.is_empty() {
                    report.unused.push(Unused {
                        workload: w.name.clone(),
                        kind: "methods",
                        destination: label.clone(),
                        rule: Some(r.id().to_owned()),
                        methods: idle,
                    });
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const POLICY: &str = "\
workload: billing
select: {cgroup: /billing}
egress:
  - host: api.example.com
    port: 443
    rules:
      - {id: charge, methods: [POST], path: /v1/charges}
      - {id: read, methods: [GET, HEAD], path: '/v1/customers/{id}'}
  - host: legacy.example.com
    port: 80
    rules:
      - {id: legacy, methods: [GET], path: /**}
";

    fn snapshot() -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("billing.yaml"), POLICY).unwrap();
        Snapshot::load_dir(dir.path()).unwrap()
    }

    fn uses(list: &[(&'static str, &'static str, &'static str)]) -> Vec<Use<'static>> {
        list.iter()
            .map(|(workload, rule, method)| Use {
                workload,
                rule,
                method,
            })
            .collect()
    }

    #[test]
    fn reports_unused_destinations_rules_and_methods() {
        let snap = snapshot();
        let report = unused(
            &snap,
            uses(&[
                ("billing", "read", "GET"),
                ("billing", "read", "GET"),
                ("payroll", "x", "GET"),
                ("billing", "gone-rule", "GET"),
            ]),
        );
        let lines: Vec<String> = report.unused.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "workload billing: rule charge of api.example.com:443 was never used",
                "workload billing: rule read of api.example.com:443: method(s) HEAD never used",
                "workload billing: destination legacy.example.com:80 was never used (none of \
                 its rules allowed a request)",
            ]
        );
        assert_eq!(report.allows["billing"], 3);
        assert_eq!(report.other_workloads["payroll"], 1);
        assert_eq!(report.unknown_rules, 1);
    }

    #[test]
    fn nothing_observed_means_every_destination_is_unused() {
        let snap = snapshot();
        let report = unused(&snap, Vec::new());
        assert_eq!(report.unused.len(), 2, "{:?}", report.unused);
        assert!(report.unused.iter().all(|u| u.kind == "destination"));
        assert_eq!(report.allows["billing"], 0);
    }

    #[test]
    fn everything_used_reports_nothing() {
        let snap = snapshot();
        let report = unused(
            &snap,
            uses(&[
                ("billing", "charge", "POST"),
                ("billing", "read", "GET"),
                ("billing", "read", "HEAD"),
                ("billing", "legacy", "GET"),
            ]),
        );
        assert!(report.unused.is_empty(), "{:?}", report.unused);
    }
}
