//! Enforce: the request stage that applies the policy to one [`Outbound`] request.
//!
//! In order: the port the request names must be the port the kernel recorded; the
//! connection's original address must belong to the destination the request names
//! (destination binding comes before any rule, so a request to the wrong address is
//! always `destination_address_mismatch`, and a name destination bound to an internal
//! address without `allow_internal` is `destination_internal_address`); then the pure [`policy::decide`] on exactly the
//! outbound request; then the rate limits of the allowing rule. Only then is the
//! credential injected, into the one header that `policy check` forbids rules to
//! constrain, so the decision is the same with or without it.
//!
//! The result is a [`Decided`] request. **Record before forward:** it becomes an
//! [`Admitted`] request only through [`Decided::record`], which writes the decision record
//! and waits until it is in every sink (an [`audit::Recorded`] proof, which only the audit
//! writer's acknowledgement makes). Both are made only here; the [`forward`](crate::forward)
//! stage takes only an `Admitted`, and sends it unchanged. The pure decision itself
//! lives in [`policy::decide`](crate::policy::decide); this module does the I/O around it
//! (DNS, secrets, the clock, rate-limit state).
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use http::{HeaderValue, Method, StatusCode};

use crate::{
    audit::{self, AuditGuard, Fault, Record},
    identify::{Identity, normalize},
    outbound::Outbound,
    policy::{self, AllowInternal, Decision, Host, Mode, RateLimiter},
    resolve::Resolver,
    secrets::Secrets,
    state::{Body, Enforcement, Refused},
};

/// What the enforce stage needs besides the request.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    /// The snapshot this request is decided by.
    pub enforcement: &'a Enforcement,
    /// Who is calling, and where they connected.
    pub identity: &'a Identity,
    /// Rate-limit buckets.
    pub limiter: &'a RateLimiter,
    /// DNS for destination binding.
    pub resolver: &'a Resolver,
    /// Secrets for credential injection.
    pub secrets: &'a Secrets,
}

/// A request the policy allows (or, in audit mode, would deny), not yet recorded: only
/// [`Decided::record`] turns it into something the forwarder takes.
#[derive(Debug)]
pub struct Decided {
    outbound: Outbound,
    upstream: SocketAddr,
    tls_name: Option<String>,
    rule: Option<String>,
    would_deny: Option<Refused>,
    secret: Option<String>,
}

/// A decided request whose decision record is durable, ready to send unchanged.
#[derive(Debug)]
pub struct Admitted {
    decided: Decided,
    recorded: audit::Recorded,
}

impl Decided {
    /// Writes the decision record (`allow`, or `would_deny` in audit mode) and waits until
    /// it is in every sink ([`AuditGuard::record_decision`]); only then is the request
    /// [`Admitted`]. Returns it with the guard of the linked outcome record; `Err` (the
    /// sink failed, nothing may be forwarded) with the guard that records the 503.
    pub async fn record(self, guard: AuditGuard) -> Result<(Admitted, AuditGuard), AuditGuard> {
        let (decision, reason, origin) = match &self.would_deny {
            None => (audit::Decision::Allow, None, None),
            Some(refused) => (
                audit::Decision::WouldDeny,
                Some(refused.reason),
                Some(Fault::Policy),
            ),
        };
        let (recorded, outcome) = guard.record_decision(decision, reason, origin).await?;
        Ok((
            Admitted {
                decided: self,
                recorded,
            },
            outcome,
        ))
    }

    /// The request body's size, when known before sending.
    pub fn body_len(&self) -> Option<u64> {
        self.outbound.body_len()
    }
    /// The allowing rule (None for a would-deny in audit mode).
    pub fn rule(&self) -> Option<&str> {
        self.rule.as_deref()
    }

    /// Audit mode: the refusal enforce mode would have made.
    pub fn would_deny(&self) -> Option<&Refused> {
        self.would_deny.as_ref()
    }

    /// The secret injected into this request, for the reflection guard.
    pub fn secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }
}

impl Admitted {
    /// The decided request.
    pub fn decided(&self) -> &Decided {
        &self.decided
    }

    /// The `seq` of its decision record.
    pub fn recorded_seq(&self) -> u64 {
        self.recorded.seq()
    }

    /// The request to send: the address (the kernel's original destination), the verified
    /// TLS server name (the policy host), and the request itself. Only the forwarder
    /// calls it.
    pub(crate) fn into_request(self) -> Sendable {
        let decided = self.decided;
        let (method, target, headers, body) = decided.outbound.into_parts();
        Sendable {
            addr: decided.upstream,
            tls_name: decided.tls_name,
            method,
            target,
            headers,
            body,
        }
    }
}

/// The pieces of an admitted request, for the forwarder only.
pub(crate) struct Sendable {
    pub addr: SocketAddr,
    pub tls_name: Option<String>,
    pub method: Method,
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Body,
}

/// Decides `outbound`. A refusal the policy makes becomes, for a workload in audit mode, a
/// [`Decided`] that carries it as [`Decided::would_deny`]; malformed requests and
/// failures of the agent are refused in every mode.
pub async fn admit(
    cx: Context<'_>,
    mut outbound: Outbound,
    record: &mut Record,
) -> Result<Decided, Refused> {
    match decide(cx, &outbound, record).await {
        Ok((rule_id, destination, rule_index)) => {
            let dest = destination_of(cx.enforcement, &outbound, destination)?;
            // Never on TRACE, which echoes the request (and so the credential) back.
            let credential = (outbound.method() != Method::TRACE)
                .then(|| dest.credential(rule_index))
                .flatten();
            let secret = match credential {
                Some(credential) => {
                    let secret = cx.secrets.get(&credential.source).map_err(|e| {
                        tracing::error!(error = %e, "credential unavailable");
                        Refused::agent("credential_unavailable", e.to_string())
                    })?;
                    let value =
                        HeaderValue::from_str(&credential.render(&secret)).map_err(|_| {
                            Refused::agent(
                                "credential_invalid",
                                format!(
                                    "the credential for header {} is not a valid header value",
                                    credential.header
                                ),
                            )
                        })?;
                    outbound.inject(credential.header.clone(), value);
                    Some(secret)
                }
                None => None,
            };
            Ok(Decided {
                upstream: cx.identity.original_dst,
                tls_name: dest.upstream_tls().then(|| dest.host.to_string()),
                rule: Some(rule_id),
                would_deny: None,
                secret,
                outbound,
            })
        }
        Err(refused) if outbound.mode() == Mode::Audit && refused.fault == Fault::Policy => {
            let tls_name = outbound
                .destination()
                .and_then(|i| destination_of(cx.enforcement, &outbound, i).ok())
                .filter(|d| d.upstream_tls())
                .map(|d| d.host.to_string());
            Ok(Decided {
                upstream: cx.identity.original_dst,
                tls_name,
                rule: None,
                would_deny: Some(refused),
                secret: None,
                outbound,
            })
        }
        Err(refused) => Err(refused),
    }
}

/// The enforce-mode decision: the allowing rule's id, destination index and rule index.
async fn decide(
    cx: Context<'_>,
    outbound: &Outbound,
    record: &mut Record,
) -> Result<(String, usize, usize), Refused> {
    let connected = cx.identity.original_dst.port();
    if outbound.port() != connected {
        return Err(Refused::policy(
            "host_port_mismatch",
            format!(
                "Host names port {} but the connection was to port {connected}",
                outbound.port()
            ),
        ));
    }
    // Binding first: the address must belong to the destination before any rule is read.
    if let Some(i) = outbound.destination() {
        let dest = destination_of(cx.enforcement, outbound, i)?;
        confirm_address(cx.resolver, dest, cx.identity.original_dst).await?;
    }
    let request = policy::Request {
        workload: outbound.workload(),
        uid: cx.identity.uid,
        method: outbound.method().as_str(),
        host: outbound.host(),
        port: outbound.port(),
        path: outbound.path(),
        headers: outbound.headers(),
        body: outbound.json(),
        at: jiff::Timestamp::now(),
    };
    let policy = &cx.enforcement.policy;
    match policy::decide(policy, &request) {
        Decision::Deny(reason) => {
            record.rule = None;
            record.nearest_rule = reason.rule().map(str::to_owned);
            Err(Refused::policy(reason.code(), reason.to_string()))
        }
        Decision::Allow { destination, rule } => {
            record.rule = Some(rule.rule_id().to_owned());
            let limits = policy.rate_limits(outbound.workload(), destination, &rule);
            if let Err(limited) = cx.limiter.check_all(limits, std::time::Instant::now()) {
                let mut refused = Refused::status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    limited.to_string(),
                    Fault::Policy,
                );
                refused.retry_after = Some(limited.retry_after);
                return Err(refused);
            }
            Ok((rule.rule_id().to_owned(), destination, rule.index()))
        }
    }
}

fn destination_of<'e>(
    enforcement: &'e Enforcement,
    outbound: &Outbound,
    index: usize,
) -> Result<&'e policy::Destination, Refused> {
    enforcement
        .policy
        .workload(outbound.workload())
        .and_then(|w| w.destinations.get(index))
        .ok_or_else(|| Refused::agent("internal_error", "destination index out of range".into()))
}

/// What destination binding needs to know of a destination: its host and which internal
/// addresses a name may be bound to.
pub trait BindTarget {
    /// The host, as policy names it.
    fn host(&self) -> &Host;
    /// `allow_internal`.
    fn allow_internal(&self) -> &AllowInternal;
}

/// A bare host allows no internal address (callers that have the destination pass it).
impl BindTarget for Host {
    fn host(&self) -> &Host {
        self
    }
    fn allow_internal(&self) -> &AllowInternal {
        static NONE: AllowInternal = AllowInternal::No;
        &NONE
    }
}

impl BindTarget for policy::Destination {
    fn host(&self) -> &Host {
        &self.host
    }
    fn allow_internal(&self) -> &AllowInternal {
        policy::Destination::allow_internal(self)
    }
}

impl BindTarget for policy::Binding {
    fn host(&self) -> &Host {
        &self.host
    }
    fn allow_internal(&self) -> &AllowInternal {
        &self.allow_internal
    }
}

/// Confirms that the connection's original address belongs to the destination: an IP
/// literal must be exactly that address (no class check: the policy named it); a DNS name
/// must resolve to it right now (be in the current answer set, or learned from the DNS
/// proxy and not expired: [`Resolver::has_address`]) AND the address must be of a class the destination may
/// reach: internal classes (loopback, private, link-local, CGNAT, ULA, embedded IPv4 of
/// those, …) only with `allow_internal` ([`policy::addr`]). The connection's address
/// decides: in a mixed answer set only the allowed addresses can be bound.
pub async fn confirm_address(
    resolver: &Resolver,
    dest: &(impl BindTarget + ?Sized),
    original: SocketAddr,
) -> Result<(), Refused> {
    let want = normalize(original).ip();
    let host = dest.host();
    let ok = match host {
        Host::Ip(ip) => normalize(SocketAddr::new(*ip, 0)).ip() == want,
        Host::Name(name) => resolver.has_address(name, want).await.map_err(|detail| {
            Refused::status(
                StatusCode::BAD_GATEWAY,
                "resolve_failed",
                detail,
                Fault::Upstream,
            )
        })?,
    };
    if !ok {
        return Err(Refused::policy(
            "destination_address_mismatch",
            format!("the connection was to {original} which is not an address of {host}"),
        ));
    }
    if let Host::Name(_) = host {
        let (verdict, class) = dest.allow_internal().check(want);
        if !verdict.is_allowed() {
            return Err(Refused::policy(
                "destination_internal_address",
                format!(
                    "{host} resolves to {want} ({class}), an internal address; a name \
                     destination reaches internal addresses only with `allow_internal`"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::resolve::StaticLookup;
    use policy::Cidr;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn binding(allow_internal: AllowInternal) -> policy::Binding {
        policy::Binding {
            host: Host::Name("api.test".to_owned()),
            allow_internal,
        }
    }

    async fn bind(answers: &[&str], allow: AllowInternal, to: &str) -> Result<(), Refused> {
        let resolver =
            Resolver::new(StaticLookup::new().with("api.test", answers.iter().map(|a| ip(a))));
        confirm_address(&resolver, &binding(allow), SocketAddr::new(ip(to), 443)).await
    }

    fn reason(r: Result<(), Refused>) -> &'static str {
        r.err().map_or("ok", |r| r.reason)
    }

    #[tokio::test]
    async fn a_mixed_answer_set_binds_only_to_the_allowed_address() {
        let mixed = ["198.51.100.7", "127.0.0.1"];
        assert_eq!(
            reason(bind(&mixed, AllowInternal::No, "198.51.100.7").await),
            "ok"
        );
        assert_eq!(
            reason(bind(&mixed, AllowInternal::No, "127.0.0.1").await),
            "destination_internal_address"
        );
        assert_eq!(
            reason(bind(&mixed, AllowInternal::No, "203.0.113.9").await),
            "destination_address_mismatch"
        );
        let lo = AllowInternal::Ranges(vec![Cidr::new(ip("127.0.0.0"), 8)]);
        let mixed = ["10.0.0.1", "127.0.0.1"];
        assert_eq!(reason(bind(&mixed, lo.clone(), "127.0.0.1").await), "ok");
        assert_eq!(
            reason(bind(&mixed, lo, "10.0.0.1").await),
            "destination_internal_address"
        );
        assert_eq!(
            reason(bind(&mixed, AllowInternal::All, "10.0.0.1").await),
            "ok"
        );
    }

    #[tokio::test]
    async fn the_deny_names_the_address_and_its_class() {
        let err = bind(&["64:ff9b::7f00:1"], AllowInternal::No, "64:ff9b::7f00:1")
            .await
            .unwrap_err();
        assert_eq!(err.reason, "destination_internal_address");
        assert_eq!(err.fault, Fault::Policy);
        assert_eq!(err.status, StatusCode::FORBIDDEN);
        assert!(
            err.detail
                .contains("64:ff9b::7f00:1 (loopback, IPv4 127.0.0.1 in NAT64 64:ff9b::/96)"),
            "{}",
            err.detail
        );
        // A bare host allows nothing internal; an IP literal is never class-checked.
        let resolver = Resolver::new(StaticLookup::new().with("api.test", [ip("127.0.0.1")]));
        let to = SocketAddr::new(ip("127.0.0.1"), 80);
        let name = Host::Name("api.test".to_owned());
        assert_eq!(
            reason(confirm_address(&resolver, &name, to).await),
            "destination_internal_address"
        );
        let literal = Host::Ip(ip("127.0.0.1"));
        assert_eq!(reason(confirm_address(&resolver, &literal, to).await), "ok");
    }
}
