//! The decision: a pure function of the snapshot and one request.
//!
//! No I/O and no clock (the request carries its instant). Everything is denied unless a
//! rule allows it:
//!
//! 1. the workload must exist in the snapshot (`unknown_workload`), and if it has a
//!    `select.uid`, the request must come from that uid (`uid_not_allowed`);
//! 2. a destination must match the request's host (case-insensitively, IP literals as
//!    addresses) and the ORIGINAL destination port (`destination_not_allowed`);
//! 3. one of that destination's rules must allow the request: every check of the rule
//!    holds, in this order: path (canonical, case-sensitive), method (exact), query,
//!    headers, JSON body, time windows (the destination's and the rule's). When several
//!    rules allow it, the first one in file order is reported.
//!
//! When no rule allows the request, the denial reports the "nearest" rule: among the
//! rules whose path matched, the one that got furthest through the checks (ties: the
//! first in file order), with its first failing check. No rule's path matching is
//! `path_not_allowed`.
//!
//! The decision is the enforce-mode decision even for a workload in audit mode
//! ([`Workload::mode`](super::Workload::mode)); the caller turns a `Deny` into "would
//! deny". Rate limits are not part of the decision: after an `Allow`, the caller takes
//! tokens with [`RateLimiter::check_all`](super::RateLimiter::check_all) for
//! [`Snapshot::rate_limits`](super::Snapshot::rate_limits).
//!
//! An allowed request without query, header or body constraints allocates nothing.

use std::fmt;
use std::sync::Arc;

use http::HeaderMap;
use jiff::Timestamp;

use super::Snapshot;
use super::body::JsonBody;
use super::canonical::CanonicalPath;
use super::matchers::{QueryPairs, clip, parse_query};
use super::model::{Destination, Rule, WorkloadId};

/// Headers that ask a server to act on another method or path than the request line's
/// (`X-HTTP-Method-Override: DELETE` on a GET, `X-Original-URL: /admin`). A rule allows a
/// request that carries one only if it constrains that header under `headers`.
pub const OVERRIDE_HEADERS: [&str; 5] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
];

/// One HTTP request, as seen by the proxy.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The calling workload, identified by the kernel.
    pub workload: WorkloadId,
    /// The uid of the calling process, from the kernel.
    pub uid: u32,
    /// The method, as received.
    pub method: &'a str,
    /// The host of the request's authority (Host header or `:authority`), port stripped,
    /// as received; matched case-insensitively.
    pub host: &'a str,
    /// The ORIGINAL destination port of the connection, from the kernel.
    pub port: u16,
    /// The canonical path (and raw query), from
    /// [`normalize`](super::canonical::normalize) or, for a destination that
    /// [allows path parameters](super::Destination::allows_path_params),
    /// [`normalize_with`](super::canonical::normalize_with).
    pub path: &'a CanonicalPath,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The parsed JSON body ([`parse_json_body`](super::parse_json_body)), when the
    /// caller buffered it because [`Destination::needs_body`] said so; `None` otherwise. A
    /// rule with `json` constraints denies a request without a body (`body_required`).
    pub body: Option<&'a JsonBody>,
    /// When the request arrived (the caller passes the current time), for `when`.
    pub at: Timestamp,
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

    fn of(index: usize, rule: &Rule) -> Self {
        RuleRef {
            index,
            id: Arc::clone(rule.id_arc()),
        }
    }
}

/// The checks of a rule, in evaluation order; a later check means a "nearer" rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// The path pattern.
    Path,
    /// The method list.
    Method,
    /// `query` / `query_repeat`.
    Query,
    /// `headers`.
    Headers,
    /// `json` (and the presence of a body).
    Json,
    /// `when`, of the destination and of the rule.
    When,
}

impl Check {
    /// The check's name: `path`, `method`, `query`, `headers`, `json` or `when`.
    pub fn name(self) -> &'static str {
        match self {
            Check::Path => "path",
            Check::Method => "method",
            Check::Query => "query",
            Check::Headers => "headers",
            Check::Json => "json",
            Check::When => "when",
        }
    }
}

/// Why one rule did not allow a request: its first failing check. Never contains header
/// values, query values or body values (they may be secrets); names are clipped.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuleFailure {
    /// The rule's path pattern does not match the canonical path.
    PathNotMatched {
        /// The rule's pattern.
        pattern: String,
    },
    /// The method is not in the rule's list.
    MethodNotAllowed {
        /// The request's method (clipped).
        method: String,
        /// The rule's methods, comma-separated.
        allowed: String,
    },
    /// The query cannot be parsed unambiguously.
    InvalidQuery {
        /// What is wrong.
        detail: String,
    },
    /// A query parameter the rule does not list, or lists as `absent`.
    QueryParamNotAllowed {
        /// The decoded name.
        name: String,
    },
    /// A query parameter appears more than once and is not in `query_repeat`.
    QueryParamRepeated {
        /// The decoded name.
        name: String,
    },
    /// A query parameter's value fails its `one_of` or `pattern`.
    QueryValueNotAllowed {
        /// The decoded name.
        name: String,
        /// The constraint.
        expected: String,
    },
    /// A `present`, `one_of` or `pattern` query parameter is missing.
    QueryParamRequired {
        /// The name.
        name: String,
    },
    /// A header's value fails its `one_of` or `pattern` (or is not text).
    HeaderNotAllowed {
        /// The lowercase name.
        name: String,
        /// The constraint.
        expected: String,
    },
    /// A `required`, `one_of` or `pattern` header is missing.
    HeaderRequired {
        /// The lowercase name.
        name: String,
    },
    /// A `forbidden` header is present.
    HeaderForbidden {
        /// The lowercase name.
        name: String,
    },
    /// A constrained header is present more than once.
    DuplicateHeader {
        /// The lowercase name.
        name: String,
    },
    /// A method-override or URL-rewrite header that the rule does not constrain.
    OverrideHeader {
        /// The lowercase name.
        name: String,
    },
    /// The rule has `json` constraints but the request has no parsed body.
    BodyRequired,
    /// A `json` constraint fails.
    JsonConstraintFailed {
        /// The field path.
        field: String,
        /// What the field must be (or `is missing`).
        constraint: String,
    },
    /// The request's time is outside a `when` window.
    OutsideTimeWindow {
        /// `destination` or `rule`: whose window.
        scope: &'static str,
        /// The window, e.g. `mon,tue 08:00-18:00 (Europe/Berlin)`.
        window: String,
        /// The request's local time in the window's zone.
        local: String,
    },
    /// The grant's `expires` time has passed.
    GrantExpired {
        /// `destination` or `rule`: whose grant.
        scope: &'static str,
        /// When it ended.
        expires: jiff::Timestamp,
    },
}

impl RuleFailure {
    /// The stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            RuleFailure::PathNotMatched { .. } => "path_not_allowed",
            RuleFailure::MethodNotAllowed { .. } => "method_not_allowed",
            RuleFailure::InvalidQuery { .. } => "invalid_query",
            RuleFailure::QueryParamNotAllowed { .. } => "query_param_not_allowed",
            RuleFailure::QueryParamRepeated { .. } => "query_param_repeated",
            RuleFailure::QueryValueNotAllowed { .. } => "query_value_not_allowed",
            RuleFailure::QueryParamRequired { .. } => "query_param_required",
            RuleFailure::HeaderNotAllowed { .. } => "header_not_allowed",
            RuleFailure::HeaderRequired { .. } => "header_required",
            RuleFailure::HeaderForbidden { .. } => "header_forbidden",
            RuleFailure::DuplicateHeader { .. } => "duplicate_header",
            RuleFailure::OverrideHeader { .. } => "override_header_refused",
            RuleFailure::BodyRequired => "body_required",
            RuleFailure::JsonConstraintFailed { .. } => "json_constraint_failed",
            RuleFailure::OutsideTimeWindow { .. } => "outside_time_window",
            RuleFailure::GrantExpired { .. } => "grant_expired",
        }
    }

    /// The check that failed.
    pub fn check(&self) -> Check {
        match self {
            RuleFailure::PathNotMatched { .. } => Check::Path,
            RuleFailure::MethodNotAllowed { .. } => Check::Method,
            RuleFailure::InvalidQuery { .. }
            | RuleFailure::QueryParamNotAllowed { .. }
            | RuleFailure::QueryParamRepeated { .. }
            | RuleFailure::QueryValueNotAllowed { .. }
            | RuleFailure::QueryParamRequired { .. } => Check::Query,
            RuleFailure::HeaderNotAllowed { .. }
            | RuleFailure::HeaderRequired { .. }
            | RuleFailure::HeaderForbidden { .. }
            | RuleFailure::DuplicateHeader { .. }
            | RuleFailure::OverrideHeader { .. } => Check::Headers,
            RuleFailure::BodyRequired | RuleFailure::JsonConstraintFailed { .. } => Check::Json,
            RuleFailure::OutsideTimeWindow { .. } | RuleFailure::GrantExpired { .. } => Check::When,
        }
    }
}

impl fmt::Display for RuleFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleFailure::PathNotMatched { pattern } => {
                write!(f, "the path does not match {pattern}")
            }
            RuleFailure::MethodNotAllowed { method, allowed } => {
                write!(f, "method {method} is not allowed (allowed: {allowed})")
            }
            RuleFailure::InvalidQuery { detail } => write!(f, "invalid query: {detail}"),
            RuleFailure::QueryParamNotAllowed { name } => {
                write!(f, "query parameter {name:?} is not allowed")
            }
            RuleFailure::QueryParamRepeated { name } => {
                write!(f, "query parameter {name:?} may appear only once")
            }
            RuleFailure::QueryValueNotAllowed { name, expected } => {
                write!(f, "query parameter {name:?} must be {expected}")
            }
            RuleFailure::QueryParamRequired { name } => {
                write!(f, "query parameter {name:?} is required")
            }
            RuleFailure::HeaderNotAllowed { name, expected } => {
                write!(f, "header {name} must be {expected}")
            }
            RuleFailure::HeaderRequired { name } => write!(f, "header {name} is required"),
            RuleFailure::HeaderForbidden { name } => write!(f, "header {name} is forbidden"),
            RuleFailure::DuplicateHeader { name } => {
                write!(f, "header {name} appears more than once")
            }
            RuleFailure::OverrideHeader { name } => write!(
                f,
                "header {name} asks the upstream to act on another method or path; the rule \
                 must constrain it under `headers` to allow it"
            ),
            RuleFailure::BodyRequired => {
                f.write_str("the rule inspects the JSON body, but there is none")
            }
            RuleFailure::JsonConstraintFailed { field, constraint } => {
                write!(f, "json field {field} {constraint}")
            }
            RuleFailure::OutsideTimeWindow {
                scope,
                window,
                local,
            } => write!(f, "{local} is outside the {scope}'s time window {window}"),
            RuleFailure::GrantExpired { scope, expires } => {
                write!(f, "the {scope}'s grant expired at {expires}")
            }
        }
    }
}

/// Why a request was denied.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// The workload is not in the snapshot.
    UnknownWorkload,
    /// The workload's `select.uid` does not match the caller's uid.
    UidNotAllowed {
        /// The caller's uid.
        uid: u32,
        /// The uid the policy requires.
        required: u32,
    },
    /// No destination of the workload has this host and port.
    NoDestination {
        /// The request's host, as received (clipped).
        host: String,
        /// The original destination port.
        port: u16,
    },
    /// No rule of the destination matches the path.
    NoRuleMatched {
        /// The request's method, as received (clipped).
        method: String,
        /// The canonical path.
        path: String,
    },
    /// Rules matched the path, but none allowed the request; this is the nearest one.
    RuleFailed {
        /// The id of the rule that got furthest.
        rule: String,
        /// Its first failing check.
        failure: RuleFailure,
    },
}

impl DenyReason {
    /// A stable snake_case code for audit records, metrics and the 403 body.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::UnknownWorkload => "unknown_workload",
            DenyReason::UidNotAllowed { .. } => "uid_not_allowed",
            DenyReason::NoDestination { .. } => "destination_not_allowed",
            DenyReason::NoRuleMatched { .. } => "path_not_allowed",
            DenyReason::RuleFailed { failure, .. } => failure.code(),
        }
    }

    /// The nearest rule, for denials by a rule's check.
    pub fn rule(&self) -> Option<&str> {
        match self {
            DenyReason::RuleFailed { rule, .. } => Some(rule),
            _ => None,
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::UnknownWorkload => f.write_str("the caller is not a known workload"),
            DenyReason::UidNotAllowed { uid, required } => {
                write!(
                    f,
                    "uid {uid} is not allowed (the workload requires uid {required})"
                )
            }
            DenyReason::NoDestination { host, port } if host.contains(':') => {
                write!(f, "destination [{host}]:{port} is not allowed")
            }
            DenyReason::NoDestination { host, port } => {
                write!(f, "destination {host}:{port} is not allowed")
            }
            DenyReason::NoRuleMatched { method, path } => {
                write!(f, "no rule allows {method} {path}")
            }
            DenyReason::RuleFailed { rule, failure } => write!(f, "rule {rule}: {failure}"),
        }
    }
}

/// Evaluates rules against one request, parsing the query at most once.
pub(crate) struct Evaluator<'r, 'a> {
    req: &'r Request<'a>,
    query: Option<Result<QueryPairs<'a>, String>>,
}

impl<'r, 'a> Evaluator<'r, 'a> {
    pub(crate) fn new(req: &'r Request<'a>) -> Self {
        Evaluator { req, query: None }
    }

    /// Every check of `rule` (a rule of `dest`) except the path, in order.
    pub(crate) fn check_rule(
        &mut self,
        dest: &Destination,
        rule: &Rule,
    ) -> Result<(), RuleFailure> {
        let req = self.req;
        if !rule.allows_method(req.method) {
            return Err(RuleFailure::MethodNotAllowed {
                method: clip(req.method),
                allowed: rule.methods().collect::<Vec<_>>().join(", "),
            });
        }
        if let Some(query) = rule.query() {
            let path: &'a CanonicalPath = req.path;
            let parsed = self
                .query
                .get_or_insert_with(|| parse_query(path.query().unwrap_or_default()));
            match parsed {
                Ok(pairs) => query.check(pairs)?,
                Err(detail) => {
                    return Err(RuleFailure::InvalidQuery {
                        detail: detail.clone(),
                    });
                }
            }
        }
        if let Some(headers) = rule.headers() {
            headers.check(req.headers)?;
        }
        // A server that honours these would act on what the policy never saw.
        for name in OVERRIDE_HEADERS {
            if req.headers.contains_key(name)
                && !rule
                    .headers()
                    .is_some_and(|h| h.headers().any(|(n, _)| n == name))
            {
                return Err(RuleFailure::OverrideHeader {
                    name: name.to_owned(),
                });
            }
        }
        if rule.needs_body() {
            let Some(body) = req.body else {
                return Err(RuleFailure::BodyRequired);
            };
            for constraint in rule.json() {
                constraint.check(body)?;
            }
        }
        for (scope, expires) in [("destination", dest.expires()), ("rule", rule.expires())] {
            if let Some(expires) = expires
                && req.at >= expires
            {
                return Err(RuleFailure::GrantExpired { scope, expires });
            }
        }
        for (scope, window) in [("destination", dest.when()), ("rule", rule.when())] {
            if let Some(window) = window
                && !window.contains(req.at)
            {
                return Err(RuleFailure::OutsideTimeWindow {
                    scope,
                    window: window.to_string(),
                    local: window.local_time(req.at),
                });
            }
        }
        Ok(())
    }
}

/// Decides one request. Pure: the same snapshot and request always give the same answer.
pub fn decide(snapshot: &Snapshot, req: &Request<'_>) -> Decision {
    let Some(workload) = snapshot.workload(req.workload) else {
        return Decision::Deny(DenyReason::UnknownWorkload);
    };
    if let Some(required) = workload.uid
        && required != req.uid
    {
        return Decision::Deny(DenyReason::UidNotAllowed {
            uid: req.uid,
            required,
        });
    }
    let Some((destination, dest)) = workload.destination_for(req.host, req.port) else {
        return Decision::Deny(DenyReason::NoDestination {
            host: clip(req.host),
            port: req.port,
        });
    };

    let rules = dest.rules();
    let mut eval = Evaluator::new(req);
    let mut allowed: Option<usize> = None;
    let mut nearest: Option<(usize, RuleFailure)> = None;
    dest.routes().for_each_match(req.path.path(), &mut |index| {
        if allowed.is_some_and(|a| a < index) {
            return;
        }
        match eval.check_rule(dest, &rules[index]) {
            Ok(()) => allowed = Some(index),
            Err(failure) => {
                let nearer = nearest.as_ref().is_none_or(|(i, best)| {
                    failure.check() > best.check()
                        || (failure.check() == best.check() && index < *i)
                });
                if nearer {
                    nearest = Some((index, failure));
                }
            }
        }
    });
    match (allowed, nearest) {
        (Some(index), _) => Decision::Allow {
            destination,
            rule: RuleRef::of(index, &rules[index]),
        },
        (None, Some((index, failure))) => Decision::Deny(DenyReason::RuleFailed {
            rule: rules[index].id().to_owned(),
            failure,
        }),
        (None, None) => Decision::Deny(DenyReason::NoRuleMatched {
            method: clip(req.method),
            path: req.path.path().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::policy::canonical::{normalize, normalize_with};
    use crate::policy::{Mode, RateLimiter, Selector, parse_json_body};
    use http::{HeaderName, HeaderValue};

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
        // A trailing slash is part of the path: /v1/charges/ is not /v1/charges.
        ("billing", "POST", "api.example.com", 443, "/v1/charges/", Err("path_not_allowed")),
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
        let headers = HeaderMap::new();
        let mut failures = Vec::new();
        for &(workload, method, host, port, target, expected) in CASES {
            let path = normalize(target).unwrap();
            let id = snap.workload_by_name(workload).unwrap();
            let req = Request {
                workload: id,
                uid: 0,
                method,
                host,
                port,
                path: &path,
                headers: &headers,
                body: None,
                at: Timestamp::UNIX_EPOCH,
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
        let headers = HeaderMap::new();
        let req = Request {
            workload: snap.workload_by_name("billing").unwrap(),
            uid: 0,
            method: "DELETE",
            host: "api.example.com",
            port: 8443,
            path: &path,
            headers: &headers,
            body: None,
            at: Timestamp::UNIX_EPOCH,
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
        let headers = HeaderMap::new();
        let req = Request {
            workload: WorkloadId(0),
            uid: 0,
            method: "GET",
            host: "api.example.com",
            port: 443,
            path: &path,
            headers: &headers,
            body: None,
            at: Timestamp::UNIX_EPOCH,
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
                DenyReason::RuleFailed {
                    rule: "r1".into(),
                    failure: RuleFailure::MethodNotAllowed {
                        method: "PUT".into(),
                        allowed: "GET, HEAD".into(),
                    },
                },
                "rule r1: method PUT is not allowed (allowed: GET, HEAD)",
            ),
            (
                DenyReason::NoRuleMatched {
                    method: "GET".into(),
                    path: "/b".into(),
                },
                "no rule allows GET /b",
            ),
            (
                DenyReason::UidNotAllowed {
                    uid: 0,
                    required: 1001,
                },
                "uid 0 is not allowed (the workload requires uid 1001)",
            ),
        ];
        for (reason, message) in cases {
            assert_eq!(reason.to_string(), message);
        }
    }

    const SHOP: &str = "\
workload: shop
select:
  cgroup: /system.slice/shop-*.service
  uid: 1001
mode: audit
egress:
  - host: api.example.com
    port: 443
    rate: 100/minute
    rules:
      - id: list-orders
        methods: [GET]
        path: /v1/orders
        query:
          limit: {pattern: '[0-9]{1,3}'}
          status: {one_of: [open, closed]}
          cursor: any
          expand: absent
          tag: any
        query_repeat: [tag]
      - id: get-order
        methods: [GET]
        path: /v1/orders/{id:[0-9]+}
        headers:
          X-Api-Version: {one_of: ['2024-01-01']}
          x-debug: forbidden
      - id: create-charge
        methods: [POST]
        path: /v1/charges
        rate: 5/second
        headers:
          content-type: {pattern: 'application/json(; ?charset=utf-8)?'}
        json:
          - {field: currency, one_of: [usd, eur]}
          - {field: amount, min: 1, max: 100000}
      - id: office-hours
        methods: [DELETE]
        path: /v1/orders/{id}
        when: {days: [mon, tue, wed, thu, fri], hours: '08:00-18:00', timezone: Europe/Berlin}
  - host: batch.example.com
    port: 443
    when: {hours: '22:00-06:00', timezone: UTC}
    rules:
      - id: nightly
        methods: [POST]
        path: /jobs
  - host: matrix.example.com
    port: 80
    path_params: true
    rules:
      - id: cars
        methods: [GET]
        path: /{c:cars(;[a-z]+=[a-z]+)*}
";

    fn shop() -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shop.yaml"), SHOP).unwrap();
        Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// One request of the v1 table, with defaults: uid 1001, Monday 2024-06-03 12:00
    /// in Berlin, no headers, no body.
    struct Case {
        method: &'static str,
        host: &'static str,
        target: &'static str,
        headers: Vec<(&'static str, &'static str)>,
        body: Option<&'static str>,
        at: &'static str,
        uid: u32,
    }

    fn case(method: &'static str, host: &'static str, target: &'static str) -> Case {
        Case {
            method,
            host,
            target,
            headers: Vec::new(),
            body: None,
            at: "2024-06-03T10:00:00Z",
            uid: 1001,
        }
    }

    impl Case {
        fn h(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers.push((name, value));
            self
        }
        fn json(self, body: &'static str) -> Self {
            Case {
                body: Some(body),
                ..self.h("content-type", "application/json")
            }
        }
        fn at(self, at: &'static str) -> Self {
            Case { at, ..self }
        }
        fn uid(self, uid: u32) -> Self {
            Case { uid, ..self }
        }

        /// Runs the case the way the proxy does; `Ok(rule)` or `Err(code)`.
        fn run(&self, snap: &Snapshot) -> Result<String, String> {
            let id = snap.workload_by_name("shop").unwrap();
            let w = snap.workload(id).unwrap();
            let options = w
                .destination_for(self.host, 443)
                .or_else(|| w.destination_for(self.host, 80))
                .map(|(_, d)| d.normalize_options())
                .unwrap_or_default();
            let port = if self.host.starts_with("matrix") {
                80
            } else {
                443
            };
            let path = normalize_with(self.target, options).map_err(|e| e.code().to_owned())?;
            let mut headers = HeaderMap::new();
            for (n, v) in &self.headers {
                headers.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_static(v),
                );
            }
            let dest = w.destination_for(self.host, port).map(|(_, d)| d);
            let needs_body = dest.is_some_and(|d| d.needs_body(self.method, &path));
            let body = match (needs_body, self.body) {
                (true, Some(b)) => Some(
                    parse_json_body(b.as_bytes(), Some("application/json"))
                        .map_err(|e| e.code().to_owned())?,
                ),
                _ => None,
            };
            let req = Request {
                workload: id,
                uid: self.uid,
                method: self.method,
                host: self.host,
                port,
                path: &path,
                headers: &headers,
                body: body.as_ref(),
                at: self.at.parse().unwrap(),
            };
            match decide(snap, &req) {
                Decision::Allow { rule, .. } => Ok(rule.rule_id().to_owned()),
                Decision::Deny(reason) => Err(reason.code().to_owned()),
            }
        }
    }

    #[test]
    fn v1_matchers_table() {
        const API: &str = "api.example.com";
        const V: &str = "x-api-version";
        let charge = r#"{"currency": "usd", "amount": 100}"#;
        let cases: Vec<(Case, Result<&str, &str>)> = vec![
            // method-override and URL-rewrite headers need a rule that constrains them
            (
                case("GET", API, "/v1/orders?limit=10&status=open")
                    .h("x-http-method-override", "DELETE"),
                Err("override_header_refused"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10&status=open").h("X-Original-URL", "/admin"),
                Err("override_header_refused"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10&status=open").h("x-rewrite-url", "/x"),
                Err("override_header_refused"),
            ),
            // query
            (
                case("GET", API, "/v1/orders?limit=10&status=open"),
                Ok("list-orders"),
            ),
            (
                case("GET", API, "/v1/orders?status=closed&limit=1&cursor=abc"),
                Ok("list-orders"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10&status=open&tag=a&tag=b"),
                Ok("list-orders"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10&status=%6Fpen"),
                Ok("list-orders"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10"),
                Err("query_param_required"),
            ),
            (case("GET", API, "/v1/orders/"), Err("path_not_allowed")),
            (
                case("GET", API, "/v1/orders?limit=10&status=open&x=1"),
                Err("query_param_not_allowed"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10&status=open&expand=items"),
                Err("query_param_not_allowed"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10&limit=20&status=open"),
                Err("query_param_repeated"),
            ),
            (
                case("GET", API, "/v1/orders?limit=1&status=open&status=closed"),
                Err("query_param_repeated"),
            ),
            (
                case("GET", API, "/v1/orders?limit=1000&status=open"),
                Err("query_value_not_allowed"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10&status=OPEN"),
                Err("query_value_not_allowed"),
            ),
            (
                case("GET", API, "/v1/orders?limit=%zz&status=open"),
                Err("invalid_query"),
            ),
            (
                case("GET", API, "/v1/orders?limit=1&status=open;x=1"),
                Err("invalid_query"),
            ),
            (
                case("POST", API, "/v1/orders?limit=10&status=open"),
                Err("method_not_allowed"),
            ),
            // headers, and a constrained {id:[0-9]+}
            (
                case("GET", API, "/v1/orders/42").h(V, "2024-01-01"),
                Ok("get-order"),
            ),
            (
                case("GET", API, "/v1/orders/42").h("X-API-Version", "2024-01-01"),
                Ok("get-order"),
            ),
            (case("GET", API, "/v1/orders/42"), Err("header_required")),
            (
                case("GET", API, "/v1/orders/42").h(V, "2023-01-01"),
                Err("header_not_allowed"),
            ),
            (
                case("GET", API, "/v1/orders/42")
                    .h(V, "2024-01-01")
                    .h(V, "2024-01-01"),
                Err("duplicate_header"),
            ),
            (
                case("GET", API, "/v1/orders/42")
                    .h(V, "2023-01-01")
                    .h(V, "2024-01-01"),
                Err("duplicate_header"),
            ),
            (
                case("GET", API, "/v1/orders/42")
                    .h(V, "2024-01-01")
                    .h("x-debug", "1"),
                Err("header_forbidden"),
            ),
            // {id:[0-9]+} does not match; the {id} rule only allows DELETE
            (
                case("GET", API, "/v1/orders/abc").h(V, "2024-01-01"),
                Err("method_not_allowed"),
            ),
            // json
            (
                case("POST", API, "/v1/charges").json(charge),
                Ok("create-charge"),
            ),
            (
                case("POST", API, "/v1/charges").json(r#"{"currency": "eur", "amount": 100000.0}"#),
                Ok("create-charge"),
            ),
            (
                case("POST", API, "/v1/charges").h("content-type", "application/json"),
                Err("body_required"),
            ),
            (
                case("POST", API, "/v1/charges").json(r#"{"currency": "usd", "amount": 0}"#),
                Err("json_constraint_failed"),
            ),
            (
                case("POST", API, "/v1/charges").json(r#"{"currency": "gbp", "amount": 1}"#),
                Err("json_constraint_failed"),
            ),
            (
                case("POST", API, "/v1/charges").json(r#"{"amount": 1}"#),
                Err("json_constraint_failed"),
            ),
            (
                case("POST", API, "/v1/charges")
                    .json(r#"{"currency": "usd", "currency": "gbp", "amount": 1}"#),
                Err("duplicate_json_key"),
            ),
            (
                case("POST", API, "/v1/charges").h("content-type", "text/plain"),
                Err("header_not_allowed"),
            ),
            // when (rule)
            (case("DELETE", API, "/v1/orders/42"), Ok("office-hours")),
            (
                case("DELETE", API, "/v1/orders/42").at("2024-06-03T06:00:00Z"),
                Ok("office-hours"),
            ),
            (
                case("DELETE", API, "/v1/orders/42").at("2024-06-03T05:59:59Z"),
                Err("outside_time_window"),
            ),
            (
                case("DELETE", API, "/v1/orders/42").at("2024-06-03T16:00:00Z"),
                Err("outside_time_window"),
            ),
            (
                case("DELETE", API, "/v1/orders/42").at("2024-06-08T10:00:00Z"),
                Err("outside_time_window"),
            ),
            // when (destination), crossing midnight
            (
                case("POST", "batch.example.com", "/jobs").at("2024-06-03T23:00:00Z"),
                Ok("nightly"),
            ),
            (
                case("POST", "batch.example.com", "/jobs").at("2024-06-04T05:59:00Z"),
                Ok("nightly"),
            ),
            (
                case("POST", "batch.example.com", "/jobs"),
                Err("outside_time_window"),
            ),
            (
                case("POST", "batch.example.com", "/other").at("2024-06-03T23:00:00Z"),
                Err("path_not_allowed"),
            ),
            // uid
            (
                case("GET", API, "/v1/orders?limit=10&status=open").uid(1002),
                Err("uid_not_allowed"),
            ),
            (
                case("GET", API, "/v1/orders?limit=10&status=open").uid(0),
                Err("uid_not_allowed"),
            ),
            // path parameters, only where the destination opts in
            (case("GET", "matrix.example.com", "/cars"), Ok("cars")),
            (
                case("GET", "matrix.example.com", "/cars;color=red"),
                Ok("cars"),
            ),
            (
                case("GET", "matrix.example.com", "/cars;color=red;size=xl"),
                Ok("cars"),
            ),
            (
                case("GET", "matrix.example.com", "/cars;Color=red"),
                Err("path_not_allowed"),
            ),
            (
                case("GET", "matrix.example.com", "/..;/cars"),
                Err("ambiguous_path_parameter"),
            ),
            (case("GET", API, "/v1/orders;x=1"), Err("path_parameter")),
            // destinations and paths
            (case("GET", API, "/nope"), Err("path_not_allowed")),
            (
                case("GET", "evil.example.com", "/v1/orders"),
                Err("destination_not_allowed"),
            ),
        ];
        let snap = shop();
        let mut failures = Vec::new();
        for (c, expected) in &cases {
            let got = c.run(&snap);
            if got.as_deref().map_err(String::as_str) != *expected {
                failures.push(format!(
                    "{} {}{} {:?} body={:?} at={} uid={}: expected {expected:?}, got {got:?}",
                    c.method, c.host, c.target, c.headers, c.body, c.at, c.uid
                ));
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn denial_names_the_nearest_rule() {
        let snap = shop();
        let id = snap.workload_by_name("shop").unwrap();
        let headers = HeaderMap::new();
        let decide_path = |method: &str, target: &str| {
            let path = normalize(target).unwrap();
            let req = Request {
                workload: id,
                uid: 1001,
                method,
                host: "api.example.com",
                port: 443,
                path: &path,
                headers: &headers,
                body: None,
                at: "2024-06-08T10:00:00Z".parse().unwrap(),
            };
            match decide(&snap, &req) {
                Decision::Deny(reason) => reason,
                other => panic!("{other:?}"),
            }
        };
        // /v1/orders/42: get-order (path, method ok; fails headers) is nearer than
        // office-hours (fails method).
        let reason = decide_path("GET", "/v1/orders/42");
        assert_eq!(reason.rule(), Some("get-order"));
        assert_eq!(
            reason.to_string(),
            "rule get-order: header x-api-version is required"
        );
        // DELETE: office-hours gets to `when` (Saturday); get-order stops at the method.
        let reason = decide_path("DELETE", "/v1/orders/42");
        assert_eq!(
            reason.to_string(),
            "rule office-hours: sat 2024-06-08 12:00:00 Europe/Berlin is outside the rule's \
             time window mon,tue,wed,thu,fri 08:00-18:00 (Europe/Berlin)"
        );
        // Values never appear, names do.
        let reason = decide_path("GET", "/v1/orders?limit=10&status=open&secret=hunter2");
        assert_eq!(
            reason.to_string(),
            "rule list-orders: query parameter \"secret\" is not allowed"
        );
        let reason = decide_path("GET", "/v1/orders?limit=10&status=hunter2");
        assert_eq!(
            reason.to_string(),
            "rule list-orders: query parameter \"status\" must be one of [\"open\", \"closed\"]"
        );
        let reason = decide_path("PUT", "/v1/charges");
        assert_eq!(
            reason.to_string(),
            "rule create-charge: method PUT is not allowed (allowed: POST)"
        );
        assert_eq!(reason.code(), "method_not_allowed");
    }

    #[test]
    fn workload_accessors_rates_and_body_needs() {
        let snap = shop();
        let id = snap.workload_by_name("shop").unwrap();
        let w = snap.workload(id).unwrap();
        assert_eq!(w.mode(), Mode::Audit);
        assert_eq!(w.uid, Some(1001));
        assert_eq!(w.body_cap(), crate::policy::DEFAULT_BODY_CAP);
        assert_eq!(
            w.selector,
            Selector::CgroupGlob("/system.slice/shop-*.service".into())
        );
        assert!(
            w.selector
                .matches_cgroup_path("/system.slice/shop-eu.service")
        );
        let (d, api) = w.destination_for("API.example.com", 443).unwrap();
        assert_eq!(d, 0);
        assert!(!api.allows_path_params());
        assert!(
            w.destination_for("matrix.example.com", 80)
                .unwrap()
                .1
                .allows_path_params()
        );

        let path = |t: &str| normalize(t).unwrap();
        assert!(api.needs_body("POST", &path("/v1/charges")));
        assert!(!api.needs_body("POST", &path("/v1/charges/")));
        assert!(!api.needs_body("GET", &path("/v1/charges")));
        assert!(!api.needs_body("POST", &path("/v1/orders")));
        assert!(api.rules()[2].needs_body());
        assert!(!api.rules()[0].needs_body());

        // rate limits: the destination's, then the rule's; stable keys.
        let charge = crate::policy::RuleRef::of(2, &api.rules()[2]);
        let limits: Vec<String> = snap
            .rate_limits(id, 0, &charge)
            .map(|(k, l)| format!("{l} {k}"))
            .collect();
        assert_eq!(
            limits,
            [
                "100/minute workload shop destination api.example.com:443",
                "5/second workload shop destination api.example.com:443 rule create-charge \
                 (/v1/charges)"
            ]
        );
        let list = crate::policy::RuleRef::of(0, &api.rules()[0]);
        assert_eq!(snap.rate_limits(id, 0, &list).count(), 1);
        assert_eq!(snap.rate_limits(id, 1, &list).count(), 0);
        assert_eq!(snap.rate_limits(id, 9, &list).count(), 0);

        // The caller's loop: decide, then charge the buckets.
        let limiter = RateLimiter::new();
        let now = std::time::Instant::now();
        let passed = (0..10)
            .filter(|_| {
                limiter
                    .check_all(snap.rate_limits(id, 0, &charge), now)
                    .is_ok()
            })
            .count();
        assert_eq!(passed, 5);
        // A reloaded snapshot shares the buckets.
        let again = shop();
        let err = limiter
            .check_all(again.rate_limits(id, 0, &charge), now)
            .unwrap_err();
        assert_eq!(err.limit.to_string(), "5/second");
    }

    /// The shared benchmark's requests (../shared/bench/requests.txt), in order, with the
    /// rule of bench20.yaml that allows each.
    const BENCH_REQUESTS: [(&str, &str, &str); 20] = [
        ("GET", "/api/v1/users", "users"),
        ("GET", "/api/v1/users/12345", "user"),
        ("POST", "/api/v1/orders", "orders"),
        (
            "GET",
            "/api/v1/orders/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a7f",
            "order",
        ),
        (
            "GET",
            "/api/v1/orders/3f2b8c1e-9d4a-4e6b-8f7a-2c1d0e9b8a7f/items",
            "order-items",
        ),
        ("GET", "/api/v1/products", "products"),
        ("GET", "/api/v1/products/blue-widget-42", "product"),
        ("GET", "/api/v1/inventory/DE/1234", "inventory"),
        ("POST", "/api/v1/payments", "payments"),
        ("GET", "/api/v1/payments/998877/status", "payment-status"),
        ("GET", "/api/v2/search?q=widgets&page=2", "search"),
        ("GET", "/api/v2/reports/2024-05", "report"),
        ("POST", "/api/v2/events", "events"),
        ("GET", "/api/v2/tenants/acme/config", "tenant-config"),
        ("GET", "/api/v2/invoices/5551212", "invoice"),
        ("GET", "/api/v2/invoices/5551212/pdf", "invoice-pdf"),
        ("POST", "/api/v2/sessions", "sessions"),
        ("DELETE", "/api/v2/sessions/AbC123xYz", "session"),
        ("GET", "/healthz", "healthz"),
        ("GET", "/metrics", "metrics"),
    ];

    #[test]
    fn bench_policy_allows_the_benchmark_and_denies_denied_txt() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bench.yaml"),
            include_str!("testdata/bench20.yaml"),
        )
        .unwrap();
        let snap = Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let id = snap.workload_by_name("bench").unwrap();
        let headers = HeaderMap::new();
        let run = |method: &str, target: &str| {
            let path = normalize(target).unwrap();
            let req = Request {
                workload: id,
                uid: 0,
                method,
                host: "127.0.0.1",
                port: 8080,
                path: &path,
                headers: &headers,
                body: None,
                at: Timestamp::UNIX_EPOCH,
            };
            match decide(&snap, &req) {
                Decision::Allow { rule, .. } => Ok(rule.rule_id().to_owned()),
                Decision::Deny(reason) => Err(reason.code()),
            }
        };
        for (method, target, rule) in BENCH_REQUESTS {
            assert_eq!(
                run(method, target),
                Ok(rule.to_owned()),
                "{method} {target}"
            );
        }
        // ../shared/bench/denied.txt
        for (method, target, code) in [
            ("DELETE", "/api/v1/users", "method_not_allowed"),
            ("GET", "/api/v1/payments", "method_not_allowed"),
            (
                "POST",
                "/api/v1/products/blue-widget-42",
                "method_not_allowed",
            ),
            ("GET", "/api/v1/orders/not-a-uuid", "path_not_allowed"),
            ("GET", "/admin", "path_not_allowed"),
            ("GET", "/api/v2/reports/2024-5", "path_not_allowed"),
        ] {
            assert_eq!(run(method, target), Err(code), "{method} {target}");
        }
    }
}
