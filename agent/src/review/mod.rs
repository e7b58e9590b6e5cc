//! The access review: `scopegate audit report`. One review period of the audit trail set
//! against the policy in force: per workload its grants and whether each was used,
//! decisions over time, the most frequent denied requests, connection-level denies (the
//! kernel hooks'), grants that expire soon and grants nothing used, and whether the hash
//! chain of the files is intact. Built here as plain data ([`Review`], pure: records and a
//! snapshot in, no I/O), then rendered as a plain-text summary ([`Review::summary`]) and
//! as one self-contained HTML page ([`html::render`]).
#![forbid(unsafe_code)]

pub mod cli;
pub mod html;

use std::collections::{BTreeMap, HashMap};

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use crate::audit::{Decision, chain::StoredRecord};
use crate::policy::{
    Snapshot,
    expiry::{self, Expiring},
    usage::{self, Use},
};

/// How many rows the top-denied and connection-deny tables keep.
pub const TOP: usize = 10;

/// What the review covers.
#[derive(Clone, Debug)]
pub struct Period {
    /// Records before this are left out.
    pub since: Option<Timestamp>,
    /// Records at or after this are left out.
    pub until: Option<Timestamp>,
    /// When the review is made (for expiring grants).
    pub now: Timestamp,
    /// Grants that end within this of `now` are listed.
    pub expiring_within: SignedDuration,
    /// Columns of the decisions-over-time chart.
    pub buckets: usize,
}

/// Decision counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// `allow` decisions.
    pub allow: u64,
    /// `deny` decisions.
    pub deny: u64,
    /// `would_deny` decisions (audit mode).
    pub would_deny: u64,
    /// `error` decisions.
    pub error: u64,
}

impl Counts {
    fn add(&mut self, decision: Decision) {
        match decision {
            Decision::Allow => self.allow += 1,
            Decision::Deny => self.deny += 1,
            Decision::WouldDeny => self.would_deny += 1,
            Decision::Error => self.error += 1,
        }
    }

    /// All decisions.
    pub fn total(&self) -> u64 {
        self.allow + self.deny + self.would_deny + self.error
    }
}

/// One grant of a workload (a rule of a destination) and its use in the period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// `host:port`.
    pub destination: String,
    /// The rule id.
    pub rule: String,
    /// The methods the rule allows.
    pub methods: Vec<String>,
    /// Allow decisions naming this rule.
    pub allows: u64,
    /// The rule's (or its destination's) `expires`, if any.
    pub expires: Option<String>,
}

/// One workload's part of the review.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadReview {
    /// The name.
    pub name: String,
    /// `enforce` or `audit`; None for a workload the policy does not have (any more).
    pub mode: Option<String>,
    /// Its decisions.
    pub counts: Counts,
    /// Its grants, in policy order (empty for a workload the policy does not have).
    pub grants: Vec<Grant>,
}

/// A group of identical refused requests.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Denied {
    /// How many.
    pub count: u64,
    /// The workload (`-`: unidentified).
    pub workload: String,
    /// `deny` or `would_deny`.
    pub decision: String,
    /// The protocol of the records.
    pub proto: String,
    /// HTTP method, `-` for connection-level records.
    pub method: String,
    /// `host:port` (or `ip:port`).
    pub destination: String,
    /// Path, `-` for connection-level records.
    pub path: String,
    /// The reason code.
    pub reason: String,
}

/// Decision counts per interval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timeline {
    /// Start of the first interval, RFC 3339.
    pub start: Option<String>,
    /// Interval length, seconds.
    pub bucket_secs: u64,
    /// Counts per interval, in time order.
    pub buckets: Vec<Counts>,
}

/// The state of the hash chain of the reviewed files (from `audit verify`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainState {
    /// No damage found.
    pub intact: bool,
    /// Records verified.
    pub records: u64,
    /// The first damage, as `audit verify` states it.
    pub damage: Option<String>,
}

/// The review.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Review {
    /// First and last record time of the period.
    pub first: Option<String>,
    /// Last record time.
    pub last: Option<String>,
    /// The audit files read.
    pub files: Vec<String>,
    /// The chain's state.
    pub chain: Option<ChainState>,
    /// Decisions in the period.
    pub totals: Counts,
    /// Per workload, the policy's first (in policy order), then others seen.
    pub workloads: Vec<WorkloadReview>,
    /// Decisions over time.
    pub timeline: Timeline,
    /// The most frequent refused requests (HTTP and DNS), most first.
    pub top_denied: Vec<Denied>,
    /// The most frequent connection-level refusals (kernel hooks), most first.
    pub connection_denies: Vec<Denied>,
    /// Grants that end within the window (or ended), `workload …: … expires at …`.
    pub expiring: Vec<String>,
    /// Grants no allow record in the period used.
    pub unused: Vec<String>,
    /// Lifecycle records that need a reviewer's eye (`policy_rejected`,
    /// `enforcement_lost`, `enforcement_restored`, `audit_unavailable`), `ts reason`.
    pub incidents: Vec<String>,
}

/// Record protocols of the proxy and the DNS proxy; any other decision record
/// (tcp, udp, icmp, raw, …) is a connection-level one.
const REQUEST_PROTOS: &[&str] = &["http", "dns"];

/// Lifecycle reasons listed as incidents.
const INCIDENTS: &[&str] = &[
    "policy_rejected",
    "enforcement_lost",
    "enforcement_restored",
    "audit_unavailable",
];

impl Review {
    /// Builds the review of `records` (in file order) against `snapshot` for `period`.
    pub fn build(records: &[StoredRecord], snapshot: &Snapshot, period: &Period) -> Self {
        let in_period: Vec<(&StoredRecord, Timestamp)> = records
            .iter()
            .filter(|r| r.is_decision())
            .filter_map(|r| r.ts.parse::<Timestamp>().ok().map(|ts| (r, ts)))
            .filter(|(_, ts)| period.since.is_none_or(|s| *ts >= s))
            .filter(|(_, ts)| period.until.is_none_or(|u| *ts < u))
            .collect();
        let mut totals = Counts::default();
        let mut per_workload: BTreeMap<&str, Counts> = BTreeMap::new();
        let mut allows_per_rule: HashMap<(&str, &str), u64> = HashMap::new();
        let mut denied: HashMap<Denied, u64> = HashMap::new();
        let mut connection: HashMap<Denied, u64> = HashMap::new();
        let mut incidents = Vec::new();
        let mut uses = Vec::new();
        for (r, _) in &in_period {
            if r.proto == "audit" || r.proto == "kernel" {
                if let Some(reason) = r.reason.as_deref().filter(|x| INCIDENTS.contains(x)) {
                    incidents.push(format!("{} {reason}", r.ts));
                }
                continue;
            }
            totals.add(r.decision);
            let workload = r.workload.as_deref().unwrap_or("-");
            per_workload.entry(workload).or_default().add(r.decision);
            match r.decision {
                Decision::Allow => {
                    if let (Some(w), Some(rule)) = (r.workload.as_deref(), r.rule.as_deref()) {
                        *allows_per_rule.entry((w, rule)).or_default() += 1;
                        uses.push(Use {
                            workload: w,
                            rule,
                            method: r.method.as_deref().unwrap_or_default(),
                        });
                    }
                }
                Decision::Deny | Decision::WouldDeny => {
                    let key = denied_key(r, workload);
                    let table = if REQUEST_PROTOS.contains(&r.proto.as_str()) {
                        &mut denied
                    } else {
                        &mut connection
                    };
                    *table.entry(key).or_default() += 1;
                }
                Decision::Error => {}
            }
        }
        let mut workloads: Vec<WorkloadReview> = snapshot
            .workloads()
            .iter()
            .map(|w| WorkloadReview {
                name: w.name.clone(),
                mode: Some(w.mode().to_string()),
                counts: per_workload.remove(w.name.as_str()).unwrap_or_default(),
                grants: w
                    .destinations
                    .iter()
                    .flat_map(|d| {
                        let label = d.label();
                        d.rules().iter().map(move |rule| (label.clone(), d, rule))
                    })
                    .map(|(destination, d, rule)| Grant {
                        allows: allows_per_rule
                            .get(&(w.name.as_str(), rule.id()))
                            .copied()
                            .unwrap_or(0),
                        methods: rule.methods().map(str::to_owned).collect(),
                        // The sooner of the rule's and its destination's end.
                        expires: match (rule.expires(), d.expires()) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        }
                        .map(|t| t.to_string()),
                        rule: rule.id().to_owned(),
                        destination,
                    })
                    .collect(),
            })
            .collect();
        workloads.extend(
            per_workload
                .into_iter()
                .map(|(name, counts)| WorkloadReview {
                    name: name.to_owned(),
                    mode: None,
                    counts,
                    grants: Vec::new(),
                }),
        );
        let unused = usage::unused(snapshot, uses)
            .unused
            .iter()
            .map(ToString::to_string)
            .collect();
        let expiring = expiry::expiring(snapshot, period.now, period.expiring_within)
            .iter()
            .map(Expiring::to_string)
            .collect();
        let times: Vec<Timestamp> = in_period
            .iter()
            .filter(|(r, _)| r.proto != "audit" && r.proto != "kernel")
            .map(|(_, ts)| *ts)
            .collect();
        let timeline = timeline(&in_period, &times, period.buckets.max(1));
        Self {
            first: times.iter().min().map(ToString::to_string),
            last: times.iter().max().map(ToString::to_string),
            files: Vec::new(),
            chain: None,
            totals,
            workloads,
            timeline,
            top_denied: top(denied),
            connection_denies: top(connection),
            expiring,
            unused,
            incidents,
        }
    }

    /// The plain-text summary (what `audit report` prints on stdout).
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "review of {} file(s), {} .. {}",
            self.files.len(),
            self.first.as_deref().unwrap_or("-"),
            self.last.as_deref().unwrap_or("-")
        );
        if let Some(chain) = &self.chain {
            match &chain.damage {
                None => {
                    let _ = writeln!(s, "chain: intact ({} records verified)", chain.records);
                }
                Some(d) => {
                    let _ = writeln!(s, "chain: DAMAGED: {d}");
                }
            }
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "decisions: {} (allow {}, deny {}, would_deny {}, error {})",
            t.total(),
            t.allow,
            t.deny,
            t.would_deny,
            t.error
        );
        for w in &self.workloads {
            let used = w.grants.iter().filter(|g| g.allows > 0).count();
            let _ = writeln!(
                s,
                "workload {} ({}): {} decisions (allow {}, deny {}, would_deny {}, error {}), {used} of {} grant(s) used",
                w.name,
                w.mode.as_deref().unwrap_or("not in the policy"),
                w.counts.total(),
                w.counts.allow,
                w.counts.deny,
                w.counts.would_deny,
                w.counts.error,
                w.grants.len()
            );
        }
        let _ = writeln!(
            s,
            "connection-level denies: {}",
            self.connection_denies.iter().map(|d| d.count).sum::<u64>()
        );
        for (title, lines) in [
            ("unused grants", &self.unused),
            ("expiring grants", &self.expiring),
            ("incidents", &self.incidents),
        ] {
            let _ = writeln!(s, "{title}: {}", lines.len());
            for line in lines {
                let _ = writeln!(s, "  {line}");
            }
        }
        s
    }
}

fn denied_key(r: &StoredRecord, workload: &str) -> Denied {
    let host = r
        .dst
        .host
        .clone()
        .or_else(|| r.dst.ip.clone())
        .unwrap_or_else(|| "-".into());
    let destination = match r.dst.port {
        Some(p) if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{p}"),
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    let path = match (&r.path, &r.dns) {
        (Some(p), _) => p.clone(),
        (None, Some(q)) => q.qname.clone().unwrap_or_else(|| "-".into()),
        (None, None) => "-".into(),
    };
    Denied {
        count: 0,
        workload: workload.to_owned(),
        decision: r.decision.as_str().to_owned(),
        proto: r.proto.clone(),
        method: r.method.clone().unwrap_or_else(|| "-".into()),
        destination,
        path,
        reason: r.reason.clone().unwrap_or_else(|| "-".into()),
    }
}

fn top(groups: HashMap<Denied, u64>) -> Vec<Denied> {
    let mut rows: Vec<Denied> = groups
        .into_iter()
        .map(|(mut d, n)| {
            d.count = n;
            d
        })
        .collect();
    rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.cmp(b)));
    rows.truncate(TOP);
    rows
}

fn timeline(records: &[(&StoredRecord, Timestamp)], times: &[Timestamp], n: usize) -> Timeline {
    let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) else {
        return Timeline::default();
    };
    let span = last.duration_since(*first).as_secs().max(0).unsigned_abs();
    // Whole seconds, at least 1, so that the last record falls in the last interval.
    let bucket_secs = (span / n as u64) + 1;
    let mut buckets = vec![Counts::default(); n];
    for (r, ts) in records {
        if r.proto == "audit" || r.proto == "kernel" {
            continue;
        }
        let offset = ts.duration_since(*first).as_secs().max(0).unsigned_abs();
        let i = usize::try_from(offset / bucket_secs)
            .unwrap_or(n - 1)
            .min(n - 1);
        buckets[i].add(r.decision);
    }
    Timeline {
        start: Some(first.to_string()),
        bucket_secs,
        buckets,
    }
}

#[cfg(test)]
mod tests;
