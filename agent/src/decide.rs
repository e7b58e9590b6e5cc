//! Decide: turn one HTTP request into a verdict, using the current snapshot.
//!
//! The request is first brought to its one canonical form (the form that is matched and the
//! form that is forwarded). The Host header must name a destination of the workload's policy
//! on the original destination port, and the original destination address must belong to
//! that destination: the upstream is always the address the kernel recorded, accepted only
//! when policy allows it, never an address the client names freely. The rule decision itself
//! is the pure [`policy::decide`].
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use http::{StatusCode, header};

use crate::{
    audit::{Fault, Record},
    identify::{Identity, normalize},
    pipeline::Enforcement,
    policy::{self, CanonicalPath, Decision, Host, Mode, RateLimiter, WorkloadId},
};

/// A request the policy allows (or, in audit mode, would deny), with everything forwarding
/// needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The rule that allowed it (None for a would-deny in audit mode).
    pub rule: Option<String>,
    /// Canonical request target (path and query) to forward.
    pub target: String,
    /// The address to dial: the original destination.
    pub upstream: SocketAddr,
    /// The destination host as the policy names it, when a destination matched.
    pub host: Option<Host>,
    /// Speak verified TLS upstream with this server name (the policy host).
    pub tls_name: Option<String>,
    /// The credential to inject, when the allowing rule or destination has one.
    pub credential: Option<policy::Credential>,
}

/// A refusal: the status, a stable reason code, a human detail, and whose fault it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status for the client.
    pub status: StatusCode,
    /// Stable snake_case reason code.
    pub reason: &'static str,
    /// Human-readable detail.
    pub detail: String,
    /// Where the failure came from.
    pub fault: Fault,
    /// For 429: when to retry.
    pub retry_after: Option<Duration>,
}

impl Refused {
    fn new(status: StatusCode, reason: &'static str, detail: String, fault: Fault) -> Self {
        Self {
            status,
            reason,
            detail,
            fault,
            retry_after: None,
        }
    }

    /// 400, the client's fault.
    pub fn client(reason: &'static str, detail: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, reason, detail, Fault::Client)
    }

    /// 403 by policy.
    pub fn policy(reason: &'static str, detail: String) -> Self {
        Self::new(StatusCode::FORBIDDEN, reason, detail, Fault::Policy)
    }

    /// A refusal with any status.
    pub fn status(status: StatusCode, reason: &'static str, detail: String, fault: Fault) -> Self {
        Self::new(status, reason, detail, fault)
    }
}

/// What the request looks like before its body is read.
#[derive(Debug)]
pub struct Prepared {
    workload: WorkloadId,
    mode: Mode,
    host: String,
    port: u16,
    path: CanonicalPath,
    /// Whether a candidate rule inspects the body: buffer it (up to `body_cap`) first.
    pub needs_body: bool,
    /// The workload's body cap.
    pub body_cap: usize,
}

impl Prepared {
    /// The host the request names (Host header, port stripped, lowercased).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether the workload is in audit mode (denials are recorded, not enforced).
    pub fn audit_mode(&self) -> bool {
        self.mode == Mode::Audit
    }
}

/// The outcome of [`decide`].
#[derive(Debug)]
pub enum Verdict {
    /// Forward.
    Allow(Allowed),
    /// Audit mode: forward, but record `would_deny` with the refusal's reason.
    WouldDeny(Allowed, Refused),
    /// Refuse.
    Deny(Refused),
}

/// First phase: who is calling, which destination the request names, its canonical
/// path, and whether its body must be inspected. Fills the audit record as it goes.
///
/// `default_port` is the port an authority without one means: 80 for plain HTTP, 443
/// inside intercepted TLS.
pub fn prepare(
    enforcement: &Enforcement,
    identity: &Identity,
    parts: &http::request::Parts,
    default_port: u16,
    record: &mut Record,
) -> Result<Prepared, Refused> {
    let (workload, cgroup) = identity.workload(&enforcement.cgroups);
    record.cgroup = cgroup;
    record.method = Some(parts.method.as_str().to_owned());
    let workload = workload.ok_or_else(|| {
        Refused::policy(
            "unmanaged_cgroup",
            format!("cgroup id {} has no policy", identity.cgroup_id),
        )
    })?;
    let policy = &enforcement.policy;
    let w = policy
        .workload(workload)
        .ok_or_else(|| Refused::policy("unknown_workload", "workload not in snapshot".into()))?;
    record.workload = Some(w.name.clone());
    let (host, port) = authority(parts, default_port)?;
    record.dst.host = Some(host.clone());
    let raw_target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let destination = w.destination_for(&host, identity.original_dst.port());
    let options = destination
        .map(|(_, d)| d.normalize_options())
        .unwrap_or_default();
    let path = policy::normalize_with(raw_target, options).map_err(|e| {
        record.path = Some(raw_target.to_owned());
        Refused::client(e.code(), e.to_string())
    })?;
    record.path = Some(path.path().to_owned());
    let needs_body = destination.is_some_and(|(_, d)| d.needs_body(parts.method.as_str(), &path));
    Ok(Prepared {
        workload,
        mode: w.mode(),
        host,
        port,
        path,
        needs_body,
        body_cap: w.body_cap(),
    })
}

/// Second phase: the decision, with the parsed body when [`Prepared::needs_body`] asked
/// for it, and the rate limits of the allowing rule. In audit mode a policy refusal
/// becomes [`Verdict::WouldDeny`]; a malformed request is refused in every mode.
pub fn decide(
    enforcement: &Enforcement,
    identity: &Identity,
    parts: &http::request::Parts,
    prepared: &Prepared,
    body: Option<&crate::policy::JsonBody>,
    limiter: &RateLimiter,
    record: &mut Record,
) -> Verdict {
    let policy = &enforcement.policy;
    let outcome = decide_enforced(
        enforcement,
        identity,
        parts,
        prepared,
        body,
        limiter,
        record,
    );
    match outcome {
        Ok(allowed) => Verdict::Allow(allowed),
        Err(refused) if prepared.audit_mode() && refused.fault == Fault::Policy => {
            let host = policy
                .workload(prepared.workload)
                .and_then(|w| w.destination_for(&prepared.host, identity.original_dst.port()))
                .map(|(_, d)| d.host.clone());
            let tls_name = policy
                .workload(prepared.workload)
                .and_then(|w| w.destination_for(&prepared.host, identity.original_dst.port()))
                .filter(|(_, d)| d.upstream_tls())
                .map(|(_, d)| d.host.to_string());
            Verdict::WouldDeny(
                Allowed {
                    rule: None,
                    target: prepared.path.as_request_target(),
                    upstream: identity.original_dst,
                    host,
                    tls_name,
                    credential: None,
                },
                refused,
            )
        }
        Err(refused) => Verdict::Deny(refused),
    }
}

fn decide_enforced(
    enforcement: &Enforcement,
    identity: &Identity,
    parts: &http::request::Parts,
    prepared: &Prepared,
    body: Option<&crate::policy::JsonBody>,
    limiter: &RateLimiter,
    record: &mut Record,
) -> Result<Allowed, Refused> {
    let policy = &enforcement.policy;
    if prepared.port != identity.original_dst.port() {
        return Err(Refused::policy(
            "host_port_mismatch",
            format!(
                "Host names port {} but the connection was to port {}",
                prepared.port,
                identity.original_dst.port()
            ),
        ));
    }
    let request = policy::Request {
        workload: prepared.workload,
        uid: identity.uid,
        method: parts.method.as_str(),
        host: &prepared.host,
        port: prepared.port,
        path: &prepared.path,
        headers: &parts.headers,
        body,
        at: jiff::Timestamp::now(),
    };
    match policy::decide(policy, &request) {
        Decision::Deny(reason) => {
            record.rule = reason.rule().map(str::to_owned);
            Err(Refused::policy(reason.code(), reason.to_string()))
        }
        Decision::Allow { destination, rule } => {
            let dest = policy
                .workload(prepared.workload)
                .and_then(|w| w.destinations.get(destination))
                .ok_or_else(|| {
                    Refused::status(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal_error",
                        "destination index out of range".into(),
                        Fault::Agent,
                    )
                })?;
            record.rule = Some(rule.rule_id().to_owned());
            let limits = policy.rate_limits(prepared.workload, destination, &rule);
            if let Err(limited) = limiter.check_all(limits, std::time::Instant::now()) {
                let mut refused = Refused::status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    limited.to_string(),
                    Fault::Policy,
                );
                refused.retry_after = Some(limited.retry_after);
                return Err(refused);
            }
            // Never on TRACE, which echoes the request (and so the credential) back.
            let credential = (parts.method != http::Method::TRACE)
                .then(|| dest.credential(rule.index()).cloned())
                .flatten();
            Ok(Allowed {
                rule: Some(rule.rule_id().to_owned()),
                target: prepared.path.as_request_target(),
                upstream: identity.original_dst,
                host: Some(dest.host.clone()),
                tls_name: dest.upstream_tls().then(|| dest.host.to_string()),
                credential,
            })
        }
    }
}

/// The host and port the request names: the Host header (exactly one), which an
/// absolute-form target must agree with.
fn authority(parts: &http::request::Parts, default_port: u16) -> Result<(String, u16), Refused> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next(), parts.uri.authority()) {
        (Some(h), None, _) => h
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .filter(|a| !a.as_str().contains('@'))
            .ok_or_else(|| {
                Refused::client(
                    "invalid_host",
                    format!("Host header {h:?} is not a valid authority"),
                )
            })?,
        // HTTP/2 carries the authority in :authority (the request URI), not in Host.
        (None, _, Some(authority)) if parts.version == http::Version::HTTP_2 => authority.clone(),
        (None, _, _) => return Err(Refused::client("missing_host", "no Host header".into())),
        (Some(_), Some(_), _) => {
            return Err(Refused::client(
                "duplicate_host",
                "more than one Host header".into(),
            ));
        }
    };
    if let Some(uri_authority) = parts.uri.authority()
        && !uri_authority.as_str().eq_ignore_ascii_case(host.as_str())
    {
        return Err(Refused::client(
            "absolute_form_mismatch",
            format!(
                "request target names {uri_authority} but Host is {}",
                host.as_str()
            ),
        ));
    }
    let name = host
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    Ok((name, host.port_u16().unwrap_or(default_port)))
}

/// Confirms that the original destination address belongs to the destination the policy
/// allowed: an IP literal must be that address; a DNS name must resolve to it.
pub async fn confirm_address(resolver: &Resolver, allowed: &Allowed) -> Result<(), Refused> {
    let want = normalize(allowed.upstream).ip();
    let Some(host) = &allowed.host else {
        return Err(Refused::policy(
            "destination_not_allowed",
            format!("no destination of the policy for {}", allowed.upstream),
        ));
    };
    let ok = match host {
        Host::Ip(ip) => normalize(SocketAddr::new(*ip, 0)).ip() == want,
        Host::Name(name) => resolver
            .resolve(name, allowed.upstream.port())
            .await
            .map_err(|detail| {
                Refused::status(
                    StatusCode::BAD_GATEWAY,
                    "resolve_failed",
                    detail,
                    Fault::Upstream,
                )
            })?
            .contains(&want),
    };
    if ok {
        Ok(())
    } else {
        Err(Refused::policy(
            "destination_address_mismatch",
            format!(
                "the connection was to {} which is not an address of {host}",
                allowed.upstream
            ),
        ))
    }
}

/// A small DNS cache for confirming destination names.
#[derive(Debug, Default)]
pub struct Resolver {
    cache: Mutex<HashMap<(String, u16), Resolved>>,
}

/// When a name was resolved, and to what.
type Resolved = (Instant, Vec<IpAddr>);

/// How long a resolution is trusted.
const DNS_TTL: Duration = Duration::from_secs(30);

impl Resolver {
    /// The addresses of `name` (cached for a short time).
    pub async fn resolve(&self, name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        let key = (name.to_owned(), port);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|(at, _)| at.elapsed() < DNS_TTL)
            .map(|(_, ips)| ips.clone());
        if let Some(ips) = cached {
            return Ok(ips);
        }
        let ips: Vec<IpAddr> = tokio::net::lookup_host((name, port))
            .await
            .map_err(|e| format!("resolving {name}: {e}"))?
            .map(|a| normalize(a).ip())
            .collect();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (Instant::now(), ips.clone()));
        Ok(ips)
    }
}
