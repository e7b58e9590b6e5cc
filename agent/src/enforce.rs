//! Enforce: the request stage that applies the policy to one [`Outbound`] request.
//!
//! In order: the port the request names must be the port the kernel recorded; the
//! connection's original address must belong to the destination the request names
//! (destination binding comes before any rule, so a request to the wrong address is
//! always `destination_address_mismatch`); then the pure [`policy::decide`] on exactly the
//! outbound request; then the rate limits of the allowing rule. Only then is the
//! credential injected, into the one header that `policy check` forbids rules to
//! constrain, so the decision is the same with or without it.
//!
//! The result, an [`Admitted`] request, can only be made here and is consumed by the
//! [`forward`](crate::forward) stage, which sends it unchanged. The pure decision itself
//! lives in [`policy::decide`](crate::policy::decide); this module does the I/O around it
//! (DNS, secrets, the clock, rate-limit state).
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use http::{HeaderValue, Method, StatusCode};

use crate::{
    audit::{Fault, Record},
    identify::{Identity, normalize},
    outbound::Outbound,
    policy::{self, Decision, Host, Mode, RateLimiter},
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

/// A request the policy allows (or, in audit mode, would deny), ready to send unchanged.
#[derive(Debug)]
pub struct Admitted {
    outbound: Outbound,
    upstream: SocketAddr,
    tls_name: Option<String>,
    rule: Option<String>,
    would_deny: Option<Refused>,
    secret: Option<String>,
}

impl Admitted {
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

    /// The request to send: the address (the kernel's original destination), the verified
    /// TLS server name (the policy host), and the request itself. Only the forwarder
    /// calls it.
    pub(crate) fn into_request(self) -> Sendable {
        let (method, target, headers, body) = self.outbound.into_parts();
        Sendable {
            addr: self.upstream,
            tls_name: self.tls_name,
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

/// Decides `outbound`. A refusal the policy makes becomes, for a workload in audit mode, an
/// [`Admitted`] that carries it as [`Admitted::would_deny`]; malformed requests and
/// failures of the agent are refused in every mode.
pub async fn admit(
    cx: Context<'_>,
    mut outbound: Outbound,
    record: &mut Record,
) -> Result<Admitted, Refused> {
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
            Ok(Admitted {
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
            Ok(Admitted {
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
        confirm_address(cx.resolver, &dest.host, cx.identity.original_dst).await?;
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
            record.rule = reason.rule().map(str::to_owned);
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

/// Confirms that the connection's original address belongs to `host`: an IP literal must
/// be that address; a DNS name must resolve to it.
pub async fn confirm_address(
    resolver: &Resolver,
    host: &Host,
    original: SocketAddr,
) -> Result<(), Refused> {
    let want = normalize(original).ip();
    let ok = match host {
        Host::Ip(ip) => normalize(SocketAddr::new(*ip, 0)).ip() == want,
        Host::Name(name) => resolver
            .resolve(name, original.port())
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
            format!("the connection was to {original} which is not an address of {host}"),
        ))
    }
}
