//! The decision: a pure function of the snapshot and one request.
//!
//! No I/O, no clock, and no allocation when the request is allowed. Everything is denied
//! unless a rule allows it:
//!
//! 1. the workload must exist in the snapshot;
//! 2. a destination must match the request's host (case-insensitively, IP literals as
//!    addresses) and the ORIGINAL destination port;
//! 3. one of that destination's rules must list the method (exact, uppercase) and match
//!    the canonical path (case-sensitive). When several rules allow the request, the first
//!    one in file order is reported.

use std::fmt;
use std::sync::Arc;

use super::Snapshot;
use super::canonical::CanonicalPath;
use super::model::WorkloadId;

/// One HTTP request, as seen by the proxy.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The calling workload, identified by the kernel.
    pub workload: WorkloadId,
    /// The method, as received.
    pub method: &'a str,
    /// The host of the request's authority (Host header or `:authority`), port stripped,
    /// as received; matched case-insensitively.
    pub host: &'a str,
    /// The ORIGINAL destination port of the connection, from the kernel.
    pub port: u16,
    /// The canonical path, from [`normalize`](super::canonical::normalize).
    pub path: &'a CanonicalPath,
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Decision {
    /// A rule allows the request.
    Allow {
        /// Index in the workload's [`destinations`](super::Workload::destinations).
        destination: usize,
        /// The allowing rule.
        rule: RuleRef,
    },
    /// Nothing allows the request.
    Deny(DenyReason),
}

impl Decision {
    /// Whether the request is allowed.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// The rule that allowed a request. Cheap to clone (no allocation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    index: usize,
    id: Arc<str>,
}

impl RuleRef {
    /// The rule id, as written in the policy.
    pub fn rule_id(&self) -> &str {
        &self.id
    }

    /// Index in the destination's [`rules`](super::Destination::rules).
    pub fn index(&self) -> usize {
        self.index
    }
}

/// Why a request was denied.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// The workload is not in the snapshot.
    UnknownWorkload,
    /// No destination of the workload has this host and port.
    NoDestination {
        /// The request's host, as received.
        host: String,
        /// The original destination port.
        port: u16,
    },
    /// The destination is allowed but none of its rules allows the request.
    NoRuleMatched {
        /// The request's method, as received.
        method: String,
        /// The canonical path.
        path: String,
        /// Whether some rule matched the path (so only the method was not allowed).
        path_matched: bool,
    },
}

impl DenyReason {
    /// A stable snake_case code for audit records, metrics and the 403 body.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::UnknownWorkload => "unknown_workload",
            DenyReason::NoDestination { .. } => "destination_not_allowed",
            DenyReason::NoRuleMatched {
                path_matched: true, ..
            } => "method_not_allowed",
            DenyReason::NoRuleMatched {
                path_matched: false,
                ..
            } => "path_not_allowed",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::UnknownWorkload => f.write_str("the caller is not a known workload"),
            DenyReason::NoDestination { host, port } if host.contains(':') => {
                write!(f, "destination [{host}]:{port} is not allowed")
            }
            DenyReason::NoDestination { host, port } => {
                write!(f, "destination {host}:{port} is not allowed")
            }
            DenyReason::NoRuleMatched {
                method,
                path,
                path_matched: true,
            } => write!(f, "method {method} is not allowed for {path}"),
            DenyReason::NoRuleMatched {
                method,
                path,
                path_matched: false,
            } => write!(f, "no rule allows {method} {path}"),
        }
    }
}

/// Decides one request. Pure: the same snapshot and request always give the same answer.
pub fn decide(snapshot: &Snapshot, req: &Request<'_>) -> Decision {
    let Some(workload) = snapshot.workload(req.workload) else {
        return Decision::Deny(DenyReason::UnknownWorkload);
    };
    let found = workload
        .destinations
        .iter()
        .enumerate()
        .find(|(_, d)| d.port == req.port && d.host.matches_authority(req.host));
    let Some((destination, dest)) = found else {
        return Decision::Deny(DenyReason::NoDestination {
            host: req.host.to_owned(),
            port: req.port,
        });
    };

    let rules = dest.rules();
    let mut best: Option<usize> = None;
    let mut path_matched = false;
    dest.routes().for_each_match(req.path.path(), &mut |index| {
        path_matched = true;
        if best.is_none_or(|b| index < b) && rules[index].allows_method(req.method) {
            best = Some(index);
        }
    });
    match best {
        Some(index) => Decision::Allow {
            destination,
            rule: RuleRef {
                index,
                id: Arc::clone(rules[index].id_arc()),
            },
        },
        None => Decision::Deny(DenyReason::NoRuleMatched {
            method: req.method.to_owned(),
            path: req.path.path().to_owned(),
            path_matched,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::policy::canonical::normalize;

    const BILLING: &str = "\
workload: billing
select:
  cgroup: /system.slice/billing.service
egress:
  - host: api.example.com
    port: 443
    rules:
      - id: create-charge
        methods: [POST]
        path: /v1/charges
      - id: read-customer
        methods: [GET, HEAD]
        path: /v1/customers/{id}
      - id: files
        methods: [GET]
        path: /files/**
      - id: root-options
        methods: [OPTIONS]
        path: /
      - id: Case
        methods: [PUT]
        path: /V2/Upper
  - host: api.example.com
    port: 8443
    rules:
      - id: alt-port
        methods: [DELETE]
        path: /v1/charges/{id}
  - host: 192.0.2.10
    port: 80
    rules:
      - id: v4
        methods: [GET]
        path: /health
  - host: \"[2001:db8::1]\"
    port: 80
    rules:
      - id: v6
        methods: [GET]
        path: /health
";

    const OTHER: &str = "\
- workload: other
  select:
    systemd_unit: other.service
  egress:
    - host: Internal.Example.com
      port: 80
      rules:
        - id: first
          methods: [GET]
          path: /a/{x}
        - id: second
          methods: [GET, POST]
          path: /a/b
        - id: third
          methods: [POST]
          path: /a/**
        - id: anything
          methods: [PATCH, POST]
          path: /**
- workload: locked
  select:
    cgroup: /locked
  egress: []
";

    fn snapshot() -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("billing.yaml"), BILLING).unwrap();
        std::fs::write(dir.path().join("other.yml"), OTHER).unwrap();
        Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Expected: `Ok(rule id)` or `Err(deny code)`.
    type Expect = Result<&'static str, &'static str>;

    #[rustfmt::skip]
    const CASES: &[(&str, &str, &str, u16, &str, Expect)] = &[
        // (workload, method, host, port, target, expected)
        ("billing", "POST", "api.example.com", 443, "/v1/charges", Ok("create-charge")),
        ("billing", "POST", "API.Example.COM", 443, "/v1/charges", Ok("create-charge")),
        ("billing", "POST", "api.example.com", 443, "/v1/charges/", Ok("create-charge")),
        ("billing", "POST", "api.example.com", 443, "/v1/%63harges", Ok("create-charge")),
        ("billing", "POST", "api.example.com", 443, "/v1/x/../charges", Ok("create-charge")),
        ("billing", "POST", "api.example.com", 443, "/v1/charges?x=1", Ok("create-charge")),
        ("billing", "GET", "api.example.com", 443, "/v1/charges", Err("method_not_allowed")),
        ("billing", "post", "api.example.com", 443, "/v1/charges", Err("method_not_allowed")),
        ("billing", "PUT", "api.example.com", 443, "/v1/charges", Err("method_not_allowed")),
        ("billing", "POST", "api.example.com", 443, "/v1/charge", Err("path_not_allowed")),
        ("billing", "POST", "api.example.com", 443, "/v1/charges/1", Err("path_not_allowed")),
        ("billing", "POST", "api.example.com", 443, "/V1/charges", Err("path_not_allowed")),
        ("billing", "POST", "api.example.com", 443, "/", Err("method_not_allowed")),
        ("billing", "POST", "api.example.com", 443, "/x", Err("path_not_allowed")),
        // {id}
        ("billing", "GET", "api.example.com", 443, "/v1/customers/cus_1", Ok("read-customer")),
        ("billing", "HEAD", "api.example.com", 443, "/v1/customers/cus_1", Ok("read-customer")),
        ("billing", "HEAD", "api.example.com", 443, "/v1/customers", Err("path_not_allowed")),
        ("billing", "HEAD", "api.example.com", 443, "/v1/customers/a/b", Err("path_not_allowed")),
        ("billing", "POST", "api.example.com", 443, "/v1/customers/1", Err("method_not_allowed")),
        // ** tail, including zero segments
        ("billing", "GET", "api.example.com", 443, "/files", Ok("files")),
        ("billing", "GET", "api.example.com", 443, "/files/a", Ok("files")),
        ("billing", "GET", "api.example.com", 443, "/files/a/b/c", Ok("files")),
        ("billing", "GET", "api.example.com", 443, "/filesx", Err("path_not_allowed")),
        ("billing", "GET", "api.example.com", 443, "/file", Err("path_not_allowed")),
        ("billing", "GET", "api.example.com", 443, "/", Err("method_not_allowed")),
        ("billing", "OPTIONS", "api.example.com", 443, "/", Ok("root-options")),
        ("billing", "OPTIONS", "api.example.com", 443, "/a", Err("path_not_allowed")),
        // case sensitivity
        ("billing", "PUT", "api.example.com", 443, "/V2/Upper", Ok("Case")),
        ("billing", "PUT", "api.example.com", 443, "/v2/upper", Err("path_not_allowed")),
        ("billing", "PUT", "api.example.com", 443, "/V2/upper", Err("path_not_allowed")),
        // ports
        ("billing", "DELETE", "api.example.com", 8443, "/v1/charges/ch_1", Ok("alt-port")),
        ("billing", "DELETE", "api.example.com", 443, "/v1/charges/ch_1", Err("path_not_allowed")),
        ("billing", "POST", "api.example.com", 8443, "/v1/charges", Err("path_not_allowed")),
        ("billing", "POST", "api.example.com", 80, "/v1/charges", Err("destination_not_allowed")),
        // hosts
        ("billing", "POST", "evil.example.com", 443, "/v1/charges", Err("destination_not_allowed")),
        ("billing", "POST", "api.example.com.", 443, "/v1/charges", Err("destination_not_allowed")),
        ("billing", "POST", "", 443, "/v1/charges", Err("destination_not_allowed")),
        ("billing", "GET", "192.0.2.10", 80, "/health", Ok("v4")),
        ("billing", "GET", "192.0.2.11", 80, "/health", Err("destination_not_allowed")),
        ("billing", "GET", "[2001:db8::1]", 80, "/health", Ok("v6")),
        ("billing", "GET", "2001:DB8:0::1", 80, "/health", Ok("v6")),
        ("billing", "GET", "[2001:db8::2]", 80, "/health", Err("destination_not_allowed")),
        ("billing", "GET", "[2001:db8::1]", 80, "/other", Err("path_not_allowed")),
        // first of several allowing rules, in file order
        ("other", "GET", "internal.example.com", 80, "/a/b", Ok("first")),
        ("other", "POST", "internal.example.com", 80, "/a/b", Ok("second")),
        ("other", "POST", "internal.example.com", 80, "/a/c", Ok("third")),
        ("other", "POST", "internal.example.com", 80, "/a", Ok("third")),
        ("other", "GET", "internal.example.com", 80, "/a", Err("method_not_allowed")),
        ("other", "GET", "internal.example.com", 80, "/b", Err("method_not_allowed")),
        ("other", "PATCH", "internal.example.com", 80, "/", Ok("anything")),
        ("other", "PATCH", "internal.example.com", 80, "/a/b/c", Ok("anything")),
        ("other", "POST", "internal.example.com", 80, "/zz", Ok("anything")),
        ("other", "POST", "internal.example.com", 81, "/zz", Err("destination_not_allowed")),
        // a workload without egress denies everything
        ("locked", "GET", "api.example.com", 443, "/", Err("destination_not_allowed")),
    ];

    #[test]
    fn table() {
        let snap = snapshot();
        let mut failures = Vec::new();
        for &(workload, method, host, port, target, expected) in CASES {
            let path = normalize(target).unwrap();
            let id = snap.workload_by_name(workload).unwrap();
            let req = Request {
                workload: id,
                method,
                host,
                port,
                path: &path,
            };
            let got = match decide(&snap, &req) {
                Decision::Allow { destination, rule } => {
                    let w = snap.workload(id).unwrap();
                    let r = &w.destinations[destination].rules()[rule.index()];
                    assert_eq!(r.id(), rule.rule_id());
                    Ok(rule.rule_id().to_owned())
                }
                Decision::Deny(reason) => Err(reason.code()),
            };
            let ok = match (&got, expected) {
                (Ok(g), Ok(e)) => g == e,
                (Err(g), Err(e)) => *g == e,
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "{workload} {method} {host}:{port}{target}: expected {expected:?}, got {got:?}"
                ));
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn allow_reports_destination_index() {
        let snap = snapshot();
        let path = normalize("/v1/charges/1").unwrap();
        let req = Request {
            workload: snap.workload_by_name("billing").unwrap(),
            method: "DELETE",
            host: "api.example.com",
            port: 8443,
            path: &path,
        };
        match decide(&snap, &req) {
            Decision::Allow { destination, rule } => {
                assert_eq!(destination, 1);
                assert_eq!(rule.index(), 0);
                assert_eq!(rule.rule_id(), "alt-port");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_workload_and_empty_snapshot() {
        let path = normalize("/").unwrap();
        let req = Request {
            workload: WorkloadId(0),
            method: "GET",
            host: "api.example.com",
            port: 443,
            path: &path,
        };
        let d = decide(&Snapshot::empty(), &req);
        assert_eq!(d, Decision::Deny(DenyReason::UnknownWorkload));
        assert!(!d.is_allow());
        let snap = snapshot();
        let d = decide(
            &snap,
            &Request {
                workload: WorkloadId(99),
                ..req
            },
        );
        assert_eq!(d, Decision::Deny(DenyReason::UnknownWorkload));
    }

    #[test]
    fn deny_messages() {
        let cases = [
            (
                DenyReason::UnknownWorkload,
                "the caller is not a known workload",
            ),
            (
                DenyReason::NoDestination {
                    host: "evil.com".into(),
                    port: 443,
                },
                "destination evil.com:443 is not allowed",
            ),
            (
                DenyReason::NoDestination {
                    host: "::1".into(),
                    port: 80,
                },
                "destination [::1]:80 is not allowed",
            ),
            (
                DenyReason::NoRuleMatched {
                    method: "PUT".into(),
                    path: "/a".into(),
                    path_matched: true,
                },
                "method PUT is not allowed for /a",
            ),
            (
                DenyReason::NoRuleMatched {
                    method: "GET".into(),
                    path: "/b".into(),
                    path_matched: false,
                },
                "no rule allows GET /b",
            ),
        ];
        for (reason, message) in cases {
            assert_eq!(reason.to_string(), message);
        }
    }
}
