//! Time-bound grants: `expires:` on a destination or a rule ends that grant at a point in
//! time (the decision refuses it as `grant_expired` from then on, in the pure
//! [`decide`](super::decide)). This module lists the grants that end soon (or already
//! ended), for `policy check` warnings and `status`.
#![forbid(unsafe_code)]

use std::fmt;

use jiff::{SignedDuration, Timestamp};

use super::Snapshot;

/// One grant with an `expires` time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiring {
    /// The workload.
    pub workload: String,
    /// The destination, `host:port`.
    pub destination: String,
    /// The rule id, for a rule's grant; None for the whole destination.
    pub rule: Option<String>,
    /// When it ends.
    pub expires: Timestamp,
    /// Time left at the check (negative: already ended).
    pub left: SignedDuration,
}

impl fmt::Display for Expiring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workload {}: ", self.workload)?;
        match &self.rule {
            Some(rule) => write!(f, "rule {rule} of {}", self.destination)?,
            None => write!(f, "destination {}", self.destination)?,
        }
        let days = self.left.as_secs() / 86_400;
        if self.left.is_negative() {
            write!(f, " expired at {} (grant_expired)", self.expires)
        } else if days == 0 {
            write!(f, " expires at {} (in less than a day)", self.expires)
        } else {
            write!(f, " expires at {} (in {days} day(s))", self.expires)
        }
    }
}

/// The grants of `snapshot` that end within `within` of `now` (or ended before it), in
/// workload, destination and rule order.
pub fn expiring(snapshot: &Snapshot, now: Timestamp, within: SignedDuration) -> Vec<Expiring> {
    let mut out = Vec::new();
    for w in snapshot.workloads() {
        for d in &w.destinations {
            let mut push = |rule: Option<&str>, expires: Option<Timestamp>| {
                let Some(expires) = expires else { return };
                let left = expires.duration_since(now);
                if left <= within {
                    out.push(Expiring {
                        workload: w.name.clone(),
                        destination: d.label(),
                        rule: rule.map(str::to_owned),
                        expires,
                        left,
                    });
                }
            };
            push(None, d.expires());
            for r in d.rules() {
                push(Some(r.id()), r.expires());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::policy::{PolicyErrors, Request, decide, normalize};
    use http::HeaderMap;

    const POLICY: &str = "\
workload: contractor
select: {cgroup: /contractor}
egress:
  - host: api.example.com
    port: 443
    expires: 2027-01-31T00:00:00Z
    rules:
      - {id: read, methods: [GET], path: /v1/**}
      - {id: migrate, methods: [POST], path: /v1/migrate, expires: '2026-12-15T12:00:00+01:00'}
  - host: status.example.com
    port: 443
    rules:
      - {id: status, methods: [GET], path: /}
";

    fn load(text: &str) -> Result<Snapshot, PolicyErrors> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), text).unwrap();
        Snapshot::load_dir(dir.path())
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// `Ok(rule)` or `Err(code)` for METHOD https://HOST/PATH at `when`.
    fn run(
        snap: &Snapshot,
        method: &str,
        host: &str,
        path: &str,
        when: &str,
    ) -> Result<String, String> {
        let path = normalize(path).unwrap();
        let headers = HeaderMap::new();
        let req = Request {
            workload: snap.workload_by_name("contractor").unwrap(),
            uid: 0,
            method,
            host,
            port: 443,
            path: &path,
            headers: &headers,
            body: None,
            at: at(when),
        };
        match decide(snap, &req) {
            crate::policy::Decision::Allow { rule, .. } => Ok(rule.rule_id().to_owned()),
            crate::policy::Decision::Deny(reason) => Err(format!("{}: {reason}", reason.code())),
        }
    }

    #[test]
    fn a_grant_ends_at_its_expires_time() {
        let snap = load(POLICY).unwrap();
        let api = "api.example.com";
        // Before: both grants.
        assert_eq!(
            run(&snap, "POST", api, "/v1/migrate", "2026-12-15T10:59:59Z"),
            Ok("migrate".into())
        );
        // The rule's grant ends at 11:00 UTC (12:00+01:00): exactly then, refused.
        assert_eq!(
            run(&snap, "POST", api, "/v1/migrate", "2026-12-15T11:00:00Z"),
            Err(
                "grant_expired: rule migrate: the rule's grant expired at 2026-12-15T11:00:00Z"
                    .into()
            )
        );
        // The destination's other rule still allows.
        assert_eq!(
            run(&snap, "GET", api, "/v1/items", "2026-12-16T00:00:00Z"),
            Ok("read".into())
        );
        // After the destination's expiry, every rule of it is refused; other destinations stay.
        assert_eq!(
            run(&snap, "GET", api, "/v1/items", "2027-01-31T00:00:00Z"),
            Err(
                "grant_expired: rule read: the destination's grant expired at 2027-01-31T00:00:00Z"
                    .into()
            )
        );
        assert_eq!(
            run(
                &snap,
                "GET",
                "status.example.com",
                "/",
                "2030-01-01T00:00:00Z"
            ),
            Ok("status".into())
        );
        // A request that fails an earlier check keeps that reason.
        assert_eq!(
            run(&snap, "DELETE", api, "/v1/items", "2027-02-01T00:00:00Z")
                .unwrap_err()
                .split(':')
                .next(),
            Some("method_not_allowed")
        );
    }

    #[test]
    fn expiring_lists_grants_ending_within_the_window() {
        let snap = load(POLICY).unwrap();
        let days = |n: i64| SignedDuration::from_hours(24 * n);
        let soon = expiring(&snap, at("2026-12-01T11:00:00Z"), days(30));
        let lines: Vec<String> = soon.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "workload contractor: rule migrate of api.example.com:443 expires at \
              2026-12-15T11:00:00Z (in 14 day(s))"
            ]
        );
        let later = expiring(&snap, at("2027-01-30T12:00:00Z"), days(30));
        let lines: Vec<String> = later.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "workload contractor: destination api.example.com:443 expires at \
                 2027-01-31T00:00:00Z (in less than a day)",
                "workload contractor: rule migrate of api.example.com:443 expired at \
                 2026-12-15T11:00:00Z (grant_expired)",
            ]
        );
        assert!(expiring(&snap, at("2026-01-01T00:00:00Z"), days(7)).is_empty());
    }

    #[test]
    fn a_bad_expires_is_an_error_with_its_position() {
        for (bad, want) in [
            (
                "2027-01-31",
                "p.yaml:6:14: egress[0].expires: \"2027-01-31\" is not an RFC 3339 time",
            ),
            (
                "2027-01-31T00:00:00",
                "p.yaml:6:14: egress[0].expires: \"2027-01-31T00:00:00\" is not",
            ),
            ("soon", "p.yaml:6:14: egress[0].expires: \"soon\" is not"),
        ] {
            let text = POLICY.replacen("2027-01-31T00:00:00Z", bad, 1);
            let e = load(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        // On an L4 exception it is refused (the kernel has no clock to enforce it).
        let l4 = "workload: x\nselect: {cgroup: /x}\negress:\n  - {cidr: 192.0.2.0/24, ports: [5432], expires: 2027-01-01T00:00:00Z}\n";
        assert!(load(l4).is_err());
    }
}
