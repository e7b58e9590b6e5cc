//! `policy diff`: what a policy change grants and revokes, per workload, for review in a
//! pull request. Pure: two loaded snapshots in, a list of changes out.
//!
//! Each change is a **grant** (the new policy may allow something the old one refused),
//! a **revoke** (the reverse), or both at once for a replaced value. The classification is
//! conservative in the direction that matters to a `--fail-on-grant` gate: a change whose
//! effect is not simply narrower (a new path pattern, a changed query or header
//! constraint, a different credential) counts as a grant.
#![forbid(unsafe_code)]

use std::fmt;

use serde::Serialize;

use super::model::{Destination, Mode, Rule, Workload};
use super::{AllowInternal, Snapshot};

/// Whether a change widens or narrows what is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// May allow what was refused.
    Grant,
    /// Refuses what was allowed.
    Revoke,
}

/// One change of one workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The workload.
    pub workload: String,
    /// Grant or revoke.
    pub effect: Effect,
    /// What changed, in words.
    pub what: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = match self.effect {
            Effect::Grant => "+ grant ",
            Effect::Revoke => "- revoke",
        };
        write!(f, "{sign}  {}: {}", self.workload, self.what)
    }
}

/// The changes from `old` to `new`, per workload in name order.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Change> {
    let mut names: Vec<&str> = old
        .workloads()
        .iter()
        .chain(new.workloads())
        .map(|w| w.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let mut c = Changes {
            workload: name,
            out: &mut out,
        };
        match (find(old, name), find(new, name)) {
            (None, Some(w)) => c.grant(format!(
                "new workload (selects {}) with {} destination(s)",
                w.selector,
                w.destinations.len()
            )),
            (Some(w), None) => c.revoke(format!(
                "workload removed (its cgroups stay held, deny-all, until released; selected {})",
                w.selector
            )),
            (Some(a), Some(b)) => workload(&mut c, a, b),
            (None, None) => {}
        }
    }
    out
}

/// The workload `name` of `s`.
fn find<'s>(s: &'s Snapshot, name: &str) -> Option<&'s Workload> {
    s.workloads().iter().find(|w| w.name == name)
}

struct Changes<'a> {
    workload: &'a str,
    out: &'a mut Vec<Change>,
}

impl Changes<'_> {
    fn push(&mut self, effect: Effect, what: String) {
        self.out.push(Change {
            workload: self.workload.to_owned(),
            effect,
            what,
        });
    }
    fn grant(&mut self, what: String) {
        self.push(Effect::Grant, what);
    }
    fn revoke(&mut self, what: String) {
        self.push(Effect::Revoke, what);
    }
    /// A replaced value: a grant (conservative) naming both.
    fn replaced(&mut self, what: &str, old: &str, new: &str) {
        self.grant(format!("{what} changed from {old} to {new}"));
    }
}

fn workload(c: &mut Changes<'_>, a: &Workload, b: &Workload) {
    if a.selector != b.selector {
        c.replaced("selector", &a.selector.to_string(), &b.selector.to_string());
    }
    match (a.uid, b.uid) {
        (Some(x), None) => c.grant(format!("uid condition {x} removed (any uid)")),
        (None, Some(y)) => c.revoke(format!("uid condition {y} added")),
        (Some(x), Some(y)) if x != y => c.replaced("uid condition", &x.to_string(), &y.to_string()),
        _ => {}
    }
    match (a.mode(), b.mode()) {
        (Mode::Enforce, Mode::Audit) => {
            c.grant("mode enforce → audit: what the policy refuses passes, recorded would_deny (requests the rules deny, TCP ports without a destination, UDP, DNS without `dns:`)".into())
        }
        (Mode::Audit, Mode::Enforce) => {
            c.revoke("mode audit → enforce: what the policy refuses is refused (requests, ports, UDP, DNS), from the next connect".into())
        }
        _ => {}
    }
    dns(c, a, b);
    for d in &b.destinations {
        match a.destinations.iter().find(|x| x.label() == d.label()) {
            None => c.grant(format!(
                "new destination {} (rules: {})",
                d.label(),
                rule_list(d)
            )),
            Some(old) => destination(c, old, d),
        }
    }
    for d in &a.destinations {
        if !b.destinations.iter().any(|x| x.label() == d.label()) {
            c.revoke(format!("destination {} removed", d.label()));
        }
    }
    for l in &b.l4 {
        if !a.l4.contains(l) {
            c.grant(format!(
                "new L4 exception `{l}` (passed in the kernel, no proxy)"
            ));
        }
    }
    for l in &a.l4 {
        if !b.l4.contains(l) {
            c.revoke(format!("L4 exception `{l}` removed"));
        }
    }
}

fn dns(c: &mut Changes<'_>, a: &Workload, b: &Workload) {
    match (&a.dns, &b.dns) {
        (None, Some(_)) => c.grant("DNS through the agent's proxy allowed (dns: added)".into()),
        (Some(_), None) => c.revoke("DNS removed (dns: absent)".into()),
        (Some(x), Some(y)) => {
            for n in &y.names {
                if !x.names.contains(n) {
                    c.grant(format!("dns.names: {n} added"));
                }
            }
            for n in &x.names {
                if !y.names.contains(n) {
                    c.revoke(format!("dns.names: {n} removed"));
                }
            }
            for t in &y.types {
                if !x.types.contains(t) {
                    c.grant(format!("dns.types: {} added", super::dns::type_name(*t)));
                }
            }
            for t in &x.types {
                if !y.types.contains(t) {
                    c.revoke(format!("dns.types: {} removed", super::dns::type_name(*t)));
                }
            }
            if x.upstream != y.upstream {
                c.replaced(
                    "dns resolvers",
                    &format!("{:?}", x.upstream),
                    &format!("{:?}", y.upstream),
                );
            }
        }
        (None, None) => {}
    }
}

fn rule_list(d: &Destination) -> String {
    d.rules()
        .iter()
        .map(Rule::id)
        .collect::<Vec<_>>()
        .join(", ")
}

fn destination(c: &mut Changes<'_>, a: &Destination, b: &Destination) {
    let label = b.label();
    let internal = |x: &AllowInternal| format!("{x:?}");
    if a.allow_internal() != b.allow_internal() {
        c.replaced(
            &format!("{label}: allow_internal"),
            &internal(a.allow_internal()),
            &internal(b.allow_internal()),
        );
    }
    if a.tls() != b.tls() || a.upstream_tls() != b.upstream_tls() {
        c.replaced(
            &format!("{label}: tls"),
            &format!("{:?} (upstream_tls {})", a.tls(), a.upstream_tls()),
            &format!("{:?} (upstream_tls {})", b.tls(), b.upstream_tls()),
        );
    }
    if a.allows_path_params() != b.allows_path_params()
        || a.allows_underscore_headers() != b.allows_underscore_headers()
    {
        c.grant(format!(
            "{label}: path_params {} → {}, allow_underscore_headers {} → {}",
            a.allows_path_params(),
            b.allows_path_params(),
            a.allows_underscore_headers(),
            b.allows_underscore_headers()
        ));
    }
    limits(
        c,
        &label,
        Limits::of_destination(a),
        Limits::of_destination(b),
    );
    if format!("{:?}", a.credential(usize::MAX)) != format!("{:?}", b.credential(usize::MAX)) {
        c.grant(format!("{label}: destination credential changed"));
    }
    for r in b.rules() {
        match a.rules().iter().find(|x| x.id() == r.id()) {
            None => c.grant(format!(
                "{label}: new rule {} ({} {})",
                r.id(),
                r.methods().collect::<Vec<_>>().join(","),
                r.path()
            )),
            Some(old) => rule(c, &label, old, r),
        }
    }
    for r in a.rules() {
        if !b.rules().iter().any(|x| x.id() == r.id()) {
            c.revoke(format!("{label}: rule {} removed", r.id()));
        }
    }
}

/// Time window, expiry and rate of a destination or a rule, as text.
struct Limits {
    when: Option<String>,
    expires: Option<jiff::Timestamp>,
    rate: Option<String>,
}

impl Limits {
    fn of_destination(d: &Destination) -> Self {
        Self {
            when: d.when().map(ToString::to_string),
            expires: d.expires(),
            rate: d.rate().map(|(_, r)| r.to_string()),
        }
    }
    fn of_rule(r: &Rule) -> Self {
        Self {
            when: r.when().map(ToString::to_string),
            expires: r.expires(),
            rate: r.rate().map(|(_, r)| r.to_string()),
        }
    }
}

fn limits(c: &mut Changes<'_>, at: &str, a: Limits, b: Limits) {
    match (&a.when, &b.when) {
        (Some(x), None) => c.grant(format!("{at}: time window {x} removed")),
        (None, Some(y)) => c.revoke(format!("{at}: time window {y} added")),
        (Some(x), Some(y)) if x != y => c.replaced(&format!("{at}: time window"), x, y),
        _ => {}
    }
    match (a.expires, b.expires) {
        (Some(x), None) => c.grant(format!("{at}: expiry {x} removed (no end)")),
        (None, Some(y)) => c.revoke(format!("{at}: expires {y}")),
        (Some(x), Some(y)) if y > x => c.grant(format!("{at}: expiry extended {x} → {y}")),
        (Some(x), Some(y)) if y < x => c.revoke(format!("{at}: expiry brought forward {x} → {y}")),
        _ => {}
    }
    match (&a.rate, &b.rate) {
        (Some(x), None) => c.grant(format!("{at}: rate limit {x} removed")),
        (None, Some(y)) => c.revoke(format!("{at}: rate limit {y} added")),
        (Some(x), Some(y)) if x != y => c.replaced(&format!("{at}: rate limit"), x, y),
        _ => {}
    }
}

fn rule(c: &mut Changes<'_>, label: &str, a: &Rule, b: &Rule) {
    let at = format!("{label}: rule {}", b.id());
    let (ma, mb): (Vec<&str>, Vec<&str>) = (a.methods().collect(), b.methods().collect());
    let added: Vec<&str> = mb.iter().filter(|m| !ma.contains(m)).copied().collect();
    let removed: Vec<&str> = ma.iter().filter(|m| !mb.contains(m)).copied().collect();
    if !added.is_empty() {
        c.grant(format!("{at}: methods {} added", added.join(", ")));
    }
    if !removed.is_empty() {
        c.revoke(format!("{at}: methods {} removed", removed.join(", ")));
    }
    if a.path() != b.path() {
        c.replaced(
            &format!("{at}: path"),
            &a.path().to_string(),
            &b.path().to_string(),
        );
    }
    match (a.query(), b.query()) {
        (Some(_), None) => c.grant(format!("{at}: query constraints removed (any query)")),
        (None, Some(_)) => c.revoke(format!("{at}: query constraints added")),
        (Some(x), Some(y)) if x != y => {
            c.grant(format!("{at}: query constraints changed"));
        }
        _ => {}
    }
    match (a.headers(), b.headers()) {
        (Some(_), None) => c.grant(format!("{at}: header constraints removed")),
        (None, Some(_)) => c.revoke(format!("{at}: header constraints added")),
        (Some(x), Some(y)) if x != y => c.grant(format!("{at}: header constraints changed")),
        _ => {}
    }
    let (ja, jb) = (a.json(), b.json());
    if ja != jb {
        if jb.is_empty() {
            c.grant(format!("{at}: JSON body constraints removed"));
        } else if ja.iter().all(|j| jb.contains(j)) {
            // Every old constraint is kept (none before counts): only additions.
            c.revoke(format!("{at}: JSON body constraints added"));
        } else {
            c.grant(format!("{at}: JSON body constraints changed"));
        }
    }
    limits(c, &at, Limits::of_rule(a), Limits::of_rule(b));
}

/// The changes as a Markdown section for a pull request.
pub fn markdown(changes: &[Change]) -> String {
    use std::fmt::Write as _;
    let grants = changes.iter().filter(|c| c.effect == Effect::Grant).count();
    let mut out = format!(
        "### scopegate policy diff\n\n{grants} grant(s), {} revoke(s)\n\n",
        changes.len() - grants
    );
    if changes.is_empty() {
        out.push_str("No change in what any workload may do.\n");
        return out;
    }
    out.push_str("| workload | effect | change |\n|---|---|---|\n");
    for ch in changes {
        let effect = match ch.effect {
            Effect::Grant => "**grant**",
            Effect::Revoke => "revoke",
        };
        let _ = writeln!(
            out,
            "| {} | {effect} | {} |",
            ch.workload,
            ch.what.replace('|', "\\|")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const OLD: &str = "\
workload: billing
select: {cgroup: /billing, uid: 1001}
egress:
  - host: api.example.com
    port: 443
    rules:
      - {id: charge, methods: [POST], path: /v1/charges, json: [{field: currency, one_of: [usd]}]}
      - {id: read, methods: [GET], path: '/v1/customers/{id}', query: {expand: absent}}
      - {id: old, methods: [GET], path: /v1/legacy}
  - host: gone.example.com
    port: 443
    rules: [{id: gone, methods: [GET], path: /}]
";

    const NEW: &str = "\
workload: billing
select: {cgroup: /billing}
mode: audit
dns: system
egress:
  - host: api.example.com
    port: 443
    rate: 10/second
    rules:
      - {id: charge, methods: [POST, PUT], path: /v1/charges}
      - {id: read, methods: [GET], path: '/v1/**'}
      - {id: fresh, methods: [DELETE], path: /v1/x}
  - host: new.example.com
    port: 443
    rules: [{id: n, methods: [GET], path: /}]
";

    fn load(text: &str) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), text).unwrap();
        Snapshot::load_dir(dir.path()).unwrap()
    }

    #[test]
    fn grants_and_revokes_of_a_change() {
        let changes = diff(&load(OLD), &load(NEW));
        let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "+ grant   billing: uid condition 1001 removed (any uid)",
                "+ grant   billing: mode enforce → audit: what the policy refuses passes, recorded would_deny (requests the rules deny, TCP ports without a destination, UDP, DNS without `dns:`)",
                "+ grant   billing: DNS through the agent's proxy allowed (dns: added)",
                "- revoke  billing: api.example.com:443: rate limit 10/second added",
                "+ grant   billing: api.example.com:443: rule charge: methods PUT added",
                "+ grant   billing: api.example.com:443: rule charge: JSON body constraints removed",
                "+ grant   billing: api.example.com:443: rule read: path changed from /v1/customers/{id} to /v1/**",
                "+ grant   billing: api.example.com:443: rule read: query constraints removed (any query)",
                "+ grant   billing: api.example.com:443: new rule fresh (DELETE /v1/x)",
                "- revoke  billing: api.example.com:443: rule old removed",
                "+ grant   billing: new destination new.example.com:443 (rules: n)",
                "- revoke  billing: destination gone.example.com:443 removed",
            ]
        );
        // The reverse change revokes what this one grants, except replaced values.
        let back = diff(&load(NEW), &load(OLD));
        assert!(back.iter().any(|c| c.effect == Effect::Revoke
            && c.what == "api.example.com:443: rule charge: methods PUT removed"));
        assert!(
            back.iter()
                .any(|c| c.effect == Effect::Revoke && c.what.contains("mode audit → enforce"))
        );
        let md = markdown(&changes);
        assert!(
            md.starts_with("### scopegate policy diff\n\n9 grant(s), 3 revoke(s)\n"),
            "{md}"
        );
        assert!(
            md.contains("| billing | **grant** | new destination new.example.com:443 (rules: n) |"),
            "{md}"
        );
    }

    #[test]
    fn no_change_and_whole_workloads() {
        assert!(diff(&load(OLD), &load(OLD)).is_empty());
        assert_eq!(
            markdown(&[]).lines().last(),
            Some("No change in what any workload may do.")
        );
        let other = "workload: payroll\nselect: {cgroup: /payroll}\negress: []\n";
        let changes = diff(&load(OLD), &load(other));
        let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "- revoke  billing: workload removed (its cgroups stay held, deny-all, until released; selected cgroup /billing)",
                "+ grant   payroll: new workload (selects cgroup /payroll) with 0 destination(s)",
            ]
        );
    }
}
