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
    policy::{self, Decision, Host},
};

/// A request the policy allows, with everything forwarding needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The rule that allowed it.
    pub rule: String,
    /// Canonical request target (path and query) to forward.
    pub target: String,
    /// The address to dial: the original destination.
    pub upstream: SocketAddr,
    /// The destination host as the policy names it.
    pub host: Host,
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
}

impl Refused {
    fn client(reason: &'static str, detail: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason,
            detail,
            fault: Fault::Client,
        }
    }

    fn policy(reason: &'static str, detail: String) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            reason,
            detail,
            fault: Fault::Policy,
        }
    }
}

/// Checks one request against the snapshot. Fills the audit record with what it learns
/// (workload, cgroup, method, canonical path, host, rule) as it goes.
pub fn check(
    enforcement: &Enforcement,
    identity: &Identity,
    parts: &http::request::Parts,
    record: &mut Record,
) -> Result<Allowed, Refused> {
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
    let name = policy
        .workload(workload)
        .map(|w| w.name.clone())
        .ok_or_else(|| Refused::policy("unknown_workload", "workload not in snapshot".into()))?;
    record.workload = Some(name);

    let (host, port) = authority(parts)?;
    record.dst.host = Some(host.clone());
    let raw_target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let path = policy::canonical::normalize(raw_target).map_err(|e| {
        record.path = Some(raw_target.to_owned());
        Refused::client(e.code(), e.to_string())
    })?;
    record.path = Some(path.path().to_owned());
    if port != identity.original_dst.port() {
        return Err(Refused::policy(
            "host_port_mismatch",
            format!(
                "Host names port {port} but the connection was to port {}",
                identity.original_dst.port()
            ),
        ));
    }
    let request = policy::Request {
        workload,
        method: parts.method.as_str(),
        host: &host,
        port,
        path: &path,
    };
    match policy::decide(policy, &request) {
        Decision::Deny(reason) => Err(Refused::policy(reason.code(), reason.to_string())),
        Decision::Allow { destination, rule } => {
            let dest = policy
                .workload(workload)
                .and_then(|w| w.destinations.get(destination))
                .ok_or_else(|| Refused {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    reason: "internal_error",
                    detail: "destination index out of range".into(),
                    fault: Fault::Agent,
                })?;
            record.rule = Some(rule.rule_id().to_owned());
            Ok(Allowed {
                rule: rule.rule_id().to_owned(),
                target: path.as_request_target(),
                upstream: identity.original_dst,
                host: dest.host.clone(),
            })
        }
    }
}

/// The host and port the request names: the Host header (exactly one), which an
/// absolute-form target must agree with.
fn authority(parts: &http::request::Parts) -> Result<(String, u16), Refused> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h,
        (None, _) => return Err(Refused::client("missing_host", "no Host header".into())),
        (Some(_), Some(_)) => {
            return Err(Refused::client(
                "duplicate_host",
                "more than one Host header".into(),
            ));
        }
    };
    let host = host
        .to_str()
        .ok()
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .filter(|a| !a.as_str().contains('@'))
        .ok_or_else(|| {
            Refused::client(
                "invalid_host",
                format!("Host header {:?} is not a valid authority", host),
            )
        })?;
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
    Ok((name, host.port_u16().unwrap_or(80)))
}

/// Confirms that the original destination address belongs to the destination the policy
/// allowed: an IP literal must be that address; a DNS name must resolve to it.
pub async fn confirm_address(resolver: &Resolver, allowed: &Allowed) -> Result<(), Refused> {
    let want = normalize(allowed.upstream).ip();
    let ok = match &allowed.host {
        Host::Ip(ip) => normalize(SocketAddr::new(*ip, 0)).ip() == want,
        Host::Name(name) => resolver
            .resolve(name, allowed.upstream.port())
            .await
            .map_err(|detail| Refused {
                status: StatusCode::BAD_GATEWAY,
                reason: "resolve_failed",
                detail,
                fault: Fault::Upstream,
            })?
            .contains(&want),
    };
    if ok {
        Ok(())
    } else {
        Err(Refused::policy(
            "destination_address_mismatch",
            format!(
                "the connection was to {} which is not an address of {}",
                allowed.upstream, allowed.host
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
