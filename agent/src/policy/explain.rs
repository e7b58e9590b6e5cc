//! `explain`: why a request is allowed or denied, rule by rule.
//!
//! Pure, like [`decide`]: the explanation's decision IS `decide`'s. For a denial it adds,
//! for each rule of the destination the request went to (or of every destination when
//! none matched, each evaluated as if its host and port had matched), the first check
//! that rule fails. Like denial reasons, it never shows header, query or body values.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use scopegate_common::deny_reasons;
use serde::Serialize;

use super::addr::{AddrClass, AllowInternal, Cidr, Verdict};
use super::decide::{Check, Decision, Evaluator, Request, RuleFailure, decide};
use super::dns::{self as dns_policy, DnsDecision, DnsDeny, DnsUpstream, TYPE_A, TYPE_AAAA};
use super::model::{Destination, Host, L4Protocol, Mode, Workload};
use super::{Snapshot, matchers};

/// The explanation of one decision. Displays as a short report; serialises to JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The workload's name; `None` if it is not in the snapshot.
    pub workload: Option<String>,
    /// The workload's mode.
    pub mode: Option<Mode>,
    /// The request, as decided.
    pub request: RequestSummary,
    /// `allow` or `deny` (the enforce-mode decision, also in audit mode).
    pub decision: &'static str,
    /// The denial code (`DenyReason::code`), for denials.
    pub code: Option<&'static str>,
    /// The denial reason, for denials.
    pub reason: Option<String>,
    /// The matched destination, `host:port`.
    pub destination: Option<String>,
    /// The allowing rule (None for a denial, as in the audit record).
    pub rule: Option<String>,
    /// For a denial by a rule's check: the nearest rule (the audit record's
    /// `nearest_rule`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nearest_rule: Option<String>,
    /// For an allow: the rate limits the request is charged against.
    pub rate_limits: Vec<String>,
    /// For a denial: why each rule did not allow the request.
    pub rules: Vec<RuleReport>,
    /// Destination binding of a matched name destination, when the caller resolved it
    /// ([`binding_report`]; `policy explain` does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<BindingReport>,
    /// Whether the workload may look the request's host name up through the agent's DNS
    /// proxy (A and AAAA), for a name host ([`dns_report`]; `policy explain` sets it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsReport>,
    /// What the kernel hook does with the TCP connect itself, when it decides it before the
    /// proxy could ([`kernel_report`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelReport>,
}

/// The kernel hook's outcome for a TCP connect that never reaches the proxy: a port on
/// which the workload has no destination, or an L4 exception.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelReport {
    /// `refused` (EPERM, recorded as `deny`), `audit_pass` (audit mode: passes unchanged,
    /// not through the proxy, recorded as `would_deny`) or `l4_exception` (passes
    /// unchanged, no record).
    pub outcome: &'static str,
    /// The kernel record's reason (`port_not_allowed`), for `refused` and `audit_pass`.
    pub code: Option<&'static str>,
    /// Why, in words.
    pub why: String,
}

/// What the connect hook does with a TCP connect of `workload` to `host:port` (`host` as
/// written: an IP literal is checked against the L4 exceptions, a name cannot be); `None`
/// when the connect goes to the proxy, which then decides the request. Pure.
pub fn kernel_report(workload: &Workload, host: &str, port: u16) -> Option<KernelReport> {
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    let dns_proxied = workload.dns.is_some() && port == 53;
    let l4 = ip.is_some_and(|ip| {
        workload.l4.iter().any(|x| {
            x.protocol == L4Protocol::Tcp
                && x.ports.contains(&port)
                && Cidr::new(x.addr, x.prefix).contains(ip)
        })
    });
    if l4 && !dns_proxied {
        return Some(KernelReport {
            outcome: "l4_exception",
            code: None,
            why: format!(
                "{host}:{port} is an L4 exception: the hook passes the connect unchanged (no \
                 proxy, no record)"
            ),
        });
    }
    if dns_proxied || workload.destinations.iter().any(|d| d.port == port) {
        return None;
    }
    let code = deny_reasons::code(deny_reasons::NO_DESTINATION_PORT);
    let why = if workload.mode() == Mode::Audit {
        format!(
            "no destination on port {port}: audit mode: passes, recorded as would_deny \
             {code} (the connect goes straight to {host}:{port}, not through the proxy)"
        )
    } else {
        format!(
            "no destination on port {port}: the hook refuses the connect (EPERM), recorded as deny {code}"
        )
    };
    Some(KernelReport {
        outcome: if workload.mode() == Mode::Audit {
            "audit_pass"
        } else {
            "refused"
        },
        code: Some(code),
        why,
    })
}

/// Destination binding for a name destination: what the name resolves to, each address's
/// class, and whether a connection to it may be bound.
#[derive(Clone, Debug, Serialize)]
pub struct BindingReport {
    /// The destination's host name.
    pub host: String,
    /// `allow_internal` as compiled: `none`, `all`, or the ranges.
    pub allow_internal: String,
    /// The resolution error, if the name did not resolve.
    pub error: Option<String>,
    /// The answers, in resolver order.
    pub addresses: Vec<AddressReport>,
    /// How long the agent trusts this answer set before it resolves again: the answer's
    /// TTL clamped to the agent's bounds (`--dns-min-ttl`, `--dns-max-ttl`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_for_secs: Option<u64>,
    /// Which resolvers answered (the caller says: `policy explain` names its
    /// `--resolv-conf`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolver: Option<String>,
}

/// What a destination name resolved to, for [`binding_report`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// The addresses, in resolver order.
    pub addrs: Vec<IpAddr>,
    /// How long the agent would trust them (TTL clamped to its bounds), when known.
    pub trusted_for: Option<Duration>,
}

impl BindingReport {
    /// Whether a connection to some answer may be bound (false if none resolved).
    pub fn any_bindable(&self) -> bool {
        self.addresses.iter().any(|a| a.verdict.is_allowed())
    }
}

/// One answer of a name destination.
#[derive(Clone, Debug, Serialize)]
pub struct AddressReport {
    /// The address.
    pub address: IpAddr,
    /// Its class.
    pub class: AddrClass,
    /// The class with its details (embedded IPv4, metadata service).
    pub detail: String,
    /// Whether a connection to it may be bound.
    pub verdict: Verdict,
}

/// The binding report for `dest` given the name's `answers` (None for an IP-literal
/// destination, which is bound to exactly its address).
pub fn binding_report(
    dest: &Destination,
    answers: Result<Resolution, String>,
) -> Option<BindingReport> {
    let Host::Name(name) = &dest.host else {
        return None;
    };
    let allow = dest.allow_internal();
    let allow_internal = match allow {
        AllowInternal::No => "none".to_owned(),
        AllowInternal::All => "all".to_owned(),
        AllowInternal::Ranges(r) => r
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    };
    let (error, addresses, trusted_for) = match answers {
        Err(e) => (Some(e), Vec::new(), None),
        Ok(Resolution { addrs, trusted_for }) => (
            None,
            addrs
                .into_iter()
                .map(|ip| {
                    let ip = ip.to_canonical();
                    let (verdict, class) = allow.check(ip);
                    AddressReport {
                        address: ip,
                        class: class.class,
                        detail: class.to_string(),
                        verdict,
                    }
                })
                .collect(),
            trusted_for,
        ),
    };
    Some(BindingReport {
        host: name.clone(),
        allow_internal,
        error,
        addresses,
        trusted_for_secs: trusted_for.map(|t| t.as_secs()),
        resolver: None,
    })
}

/// Whether a workload may look a name up through the agent's DNS proxy, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DnsReport {
    /// The query name, as asked.
    pub name: String,
    /// The query types decided (`A`, `AAAA`, `TXT`, …).
    pub types: Vec<String>,
    /// `answer` (forwarded to the resolvers, the answer returned) or `refused` (REFUSED).
    pub decision: &'static str,
    /// The refusal's reason code (the DNS record's `reason`).
    pub code: Option<&'static str>,
    /// Why: which part of the policy allows the name, or what is missing.
    pub why: String,
    /// Where an allowed query goes.
    pub resolvers: Option<String>,
    /// In audit mode a refusal is recorded as `would_deny` and the query answered.
    pub audit_mode: bool,
}

/// Explains the DNS proxy's decision on the questions `qname`/`qtypes` of `workload` (the
/// decision is [`dns::allowed`](dns_policy::allowed)'s, for each type; the first refusal
/// decides the report). Pure.
pub fn dns_report(workload: Option<&Workload>, qname: &str, qtypes: &[u16]) -> DnsReport {
    let types = qtypes.iter().map(|t| dns_policy::type_name(*t)).collect();
    let refusal = qtypes
        .iter()
        .find_map(|t| match dns_policy::allowed(workload, qname, *t) {
            DnsDecision::Allow => None,
            DnsDecision::Deny(deny) => Some((*t, deny)),
        });
    let audit_mode = workload.is_some_and(|w| w.mode() == Mode::Audit);
    let name = qname.to_owned();
    let Some(w) = workload else {
        return DnsReport {
            name,
            types,
            decision: "refused",
            code: Some(DnsDeny::NoWorkload.reason()),
            why: "the caller is not a workload of the policy".to_owned(),
            resolvers: None,
            audit_mode,
        };
    };
    let dns = w.dns.as_ref();
    let extra_types = || {
        let extra: Vec<String> = dns
            .map(|d| d.types.iter().map(|t| dns_policy::type_name(*t)).collect())
            .unwrap_or_default();
        if extra.is_empty() {
            "none".to_owned()
        } else {
            extra.join(", ")
        }
    };
    let (decision, code, why) = match refusal {
        Some((_, DnsDeny::NoDns)) if audit_mode => (
            "refused",
            Some(DnsDeny::NoDns.reason()),
            format!(
                "the policy has no `dns:`: audit mode: the workload's DNS to any resolver \
                 passes, recorded as would_deny {} (UDP) or {} (TCP, when no destination \
                 is on port 53)",
                deny_reasons::code(deny_reasons::UDP_NOT_ALLOWED),
                deny_reasons::code(deny_reasons::NO_DESTINATION_PORT)
            ),
        ),
        Some((_, DnsDeny::NoDns)) => (
            "refused",
            Some(DnsDeny::NoDns.reason()),
            "the policy has no `dns:`: the kernel refuses the workload's UDP (EPERM) and the \
             proxy refuses its DNS over TCP"
                .to_owned(),
        ),
        Some((_, DnsDeny::NameNotAllowed)) => (
            "refused",
            Some(DnsDeny::NameNotAllowed.reason()),
            format!(
                "{qname} is neither a destination's host name nor matched by dns.names ({})",
                dns.map(|d| {
                    if d.names.is_empty() {
                        "none".to_owned()
                    } else {
                        d.names
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                })
                .unwrap_or_default()
            ),
        ),
        Some((t, deny)) => (
            "refused",
            Some(deny.reason()),
            format!(
                "the name is allowed, the type {} is not (A and AAAA, plus dns.types: {})",
                dns_policy::type_name(t),
                extra_types()
            ),
        ),
        None => {
            let canonical = dns_policy::canonical_qname(qname).unwrap_or_default();
            let by_destination = w
                .destinations
                .iter()
                .any(|d| matches!(&d.host, Host::Name(h) if *h == canonical));
            let pattern = dns.and_then(|d| d.names.iter().find(|p| p.matches(&canonical)));
            let why = match (by_destination, pattern) {
                (true, _) => "the name of a destination".to_owned(),
                (false, Some(p)) => format!("dns.names pattern {p}"),
                (false, None) => "allowed".to_owned(),
            };
            ("answer", None, why)
        }
    };
    let resolvers = (decision == "answer").then(|| match dns.map(|d| &d.upstream) {
        Some(DnsUpstream::Resolvers(ips)) => ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        _ => "the host's resolvers (run --resolv-conf)".to_owned(),
    });
    DnsReport {
        name,
        types,
        decision,
        code,
        why,
        resolvers,
        audit_mode,
    }
}

/// [`dns_report`] for the A and AAAA lookups of a request's host name.
pub fn host_dns_report(workload: Option<&Workload>, host: &str) -> DnsReport {
    dns_report(workload, host, &[TYPE_A, TYPE_AAAA])
}

impl fmt::Display for DnsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let types = self.types.join("/");
        match (self.decision, self.code) {
            ("answer", _) => write!(
                f,
                "{types} {}: answered through the DNS proxy ({}; forwarded to {})",
                self.name,
                self.why,
                self.resolvers.as_deref().unwrap_or("?")
            ),
            (_, code) => {
                write!(
                    f,
                    "{types} {}: REFUSED {}: {}",
                    self.name,
                    code.unwrap_or("?"),
                    self.why
                )?;
                if self.audit_mode && code != Some(DnsDeny::NoDns.reason()) {
                    f.write_str(" (audit mode: answered and recorded as would_deny)")?;
                }
                Ok(())
            }
        }
    }
}

/// The request as the policy saw it.
#[derive(Clone, Debug, Serialize)]
pub struct RequestSummary {
    /// The caller's uid.
    pub uid: u32,
    /// The method.
    pub method: String,
    /// The authority host.
    pub host: String,
    /// The original destination port.
    pub port: u16,
    /// The canonical path.
    pub path: String,
    /// The raw query.
    pub query: Option<String>,
    /// The request time, RFC 3339 UTC.
    pub at: String,
    /// Whether a parsed JSON body was given.
    pub body: bool,
}

/// One rule's verdict on the request.
#[derive(Clone, Debug, Serialize)]
pub struct RuleReport {
    /// The rule's destination, `host:port`.
    pub destination: String,
    /// Whether that destination's host and port match the request.
    pub destination_matched: bool,
    /// The rule id.
    pub rule: String,
    /// `allow` or `deny`.
    pub result: &'static str,
    /// The first failing check.
    pub check: Option<Check>,
    /// Its code, e.g. `method_not_allowed`.
    pub code: Option<&'static str>,
    /// Its detail.
    pub detail: Option<String>,
}

/// Explains the decision for `req`.
pub fn explain(snapshot: &Snapshot, req: &Request<'_>) -> Explanation {
    let decision = decide(snapshot, req);
    let workload = snapshot.workload(req.workload);
    let mut out = Explanation {
        workload: workload.map(|w| w.name.clone()),
        mode: workload.map(|w| w.mode()),
        request: RequestSummary {
            uid: req.uid,
            method: matchers::clip(req.method),
            host: matchers::clip(req.host),
            port: req.port,
            path: req.path.path().to_owned(),
            query: req.path.query().map(str::to_owned),
            at: req.at.to_string(),
            body: req.body.is_some(),
        },
        decision: if decision.is_allow() { "allow" } else { "deny" },
        code: None,
        reason: None,
        destination: None,
        rule: None,
        nearest_rule: None,
        rate_limits: Vec::new(),
        rules: Vec::new(),
        binding: None,
        dns: None,
        kernel: None,
    };
    let Some(workload) = workload else {
        if let Decision::Deny(reason) = &decision {
            out.code = Some(reason.code());
            out.reason = Some(reason.to_string());
        }
        return out;
    };
    out.kernel = kernel_report(workload, req.host, req.port);
    let matched = workload.destination_for(req.host, req.port);
    out.destination = matched.map(|(_, d)| d.label());
    match &decision {
        Decision::Allow { destination, rule } => {
            out.rule = Some(rule.rule_id().to_owned());
            if let Some(dest) = workload.destinations.get(*destination) {
                out.rate_limits = dest
                    .rate_limits(rule.index())
                    .map(|(key, limit)| match key.rule() {
                        Some(r) => format!("{limit} (rule {r})"),
                        None => format!("{limit} (destination {})", key.destination()),
                    })
                    .collect();
            }
            return out;
        }
        Decision::Deny(reason) => {
            out.code = Some(reason.code());
            out.reason = Some(reason.to_string());
            out.nearest_rule = reason.rule().map(str::to_owned);
        }
    }
    let destinations: Vec<&Destination> = match matched {
        Some((_, d)) => vec![d],
        None => workload.destinations.iter().collect(),
    };
    for dest in destinations {
        let mut path_matched = vec![false; dest.rules().len()];
        dest.routes()
            .for_each_match(req.path.path(), &mut |i| path_matched[i] = true);
        // The same path with the trailing '/' toggled: which rules only that one would match.
        let toggled = match req.path.path().strip_suffix('/') {
            Some("") => None,
            Some(without) => Some(without.to_owned()),
            None => Some(format!("{}/", req.path.path())),
        };
        let mut slash_only = vec![false; dest.rules().len()];
        if let Some(toggled) = &toggled {
            dest.routes()
                .for_each_match(toggled, &mut |i| slash_only[i] = !path_matched[i]);
        }
        let mut eval = Evaluator::new(req);
        let label = dest.label();
        for (i, rule) in dest.rules().iter().enumerate() {
            let result = if path_matched[i] {
                eval.check_rule(dest, rule)
            } else {
                Err(RuleFailure::PathNotMatched {
                    pattern: rule.path().to_string(),
                })
            };
            out.rules.push(RuleReport {
                destination: label.clone(),
                destination_matched: matched.is_some(),
                rule: rule.id().to_owned(),
                result: if result.is_ok() { "allow" } else { "deny" },
                check: result.as_ref().err().map(RuleFailure::check),
                code: result.as_ref().err().map(RuleFailure::code),
                detail: result.err().map(|f| {
                    let detail = f.to_string();
                    if slash_only[i] {
                        let has = if req.path.has_trailing_slash() {
                            "has"
                        } else {
                            "lacks"
                        };
                        format!(
                            "{detail} (a trailing '/' is part of the path: the request {has} \
                             one and the pattern does not; `/x/**` matches both)"
                        )
                    } else {
                        detail
                    }
                }),
            });
        }
    }
    out
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.request;
        let host = if r.host.contains(':') {
            format!("[{}]", r.host)
        } else {
            r.host.clone()
        };
        let query = r
            .query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        writeln!(
            f,
            "request:   {} {host}:{}{}{query} (uid {}, at {}{})",
            r.method,
            r.port,
            r.path,
            r.uid,
            r.at,
            if r.body { ", with JSON body" } else { "" }
        )?;
        match (&self.workload, self.mode) {
            (Some(w), Some(mode)) => writeln!(f, "workload:  {w} (mode {mode})")?,
            _ => writeln!(f, "workload:  (unknown)")?,
        }
        match self.decision {
            "allow" => {
                writeln!(
                    f,
                    "decision:  ALLOW by rule {} of {}",
                    self.rule.as_deref().unwrap_or("?"),
                    self.destination.as_deref().unwrap_or("?")
                )?;
                for limit in &self.rate_limits {
                    writeln!(f, "rate:      {limit}")?;
                }
            }
            _ => {
                writeln!(
                    f,
                    "decision:  DENY {}: {}",
                    self.code.unwrap_or("?"),
                    self.reason.as_deref().unwrap_or("?")
                )?;
                if self.mode == Some(Mode::Audit) && self.kernel.is_none() {
                    writeln!(
                        f,
                        "           (audit mode: the proxy lets it pass and records would_deny)"
                    )?;
                }
            }
        }
        let mut current: Option<&str> = None;
        for report in &self.rules {
            if current != Some(&report.destination) {
                current = Some(&report.destination);
                let note = if report.destination_matched {
                    ""
                } else {
                    " (host/port do not match; rules evaluated as if they did)"
                };
                writeln!(f, "rules of {}{note}:", report.destination)?;
            }
            match (&report.code, &report.detail) {
                (Some(code), Some(detail)) => {
                    writeln!(f, "  {}: {code}: {detail}", report.rule)?;
                }
                _ => writeln!(f, "  {}: allow", report.rule)?,
            }
        }
        if let Some(k) = &self.kernel {
            writeln!(f, "kernel:    {}", k.why)?;
        }
        if let Some(d) = &self.dns {
            writeln!(f, "dns:       {d}")?;
        }
        if let Some(b) = &self.binding {
            match &b.error {
                Some(e) => writeln!(f, "binding:   {e} (the proxy answers 502 resolve_failed)")?,
                None => {
                    write!(
                        f,
                        "binding:   {} resolves to {} address(es)",
                        b.host,
                        b.addresses.len()
                    )?;
                    if let Some(r) = &b.resolver {
                        write!(f, " via {r}")?;
                    }
                    if let Some(t) = b.trusted_for_secs {
                        write!(f, ", trusted for {t} s")?;
                    }
                    writeln!(f, " (allow_internal: {})", b.allow_internal)?;
                }
            }
            for a in &b.addresses {
                match a.verdict {
                    Verdict::InternalDenied => writeln!(
                        f,
                        "  {} ({}): internal, denied (destination_internal_address)",
                        a.address, a.detail
                    )?,
                    v => writeln!(f, "  {} ({}): {v}", a.address, a.detail)?,
                }
            }
            if b.error.is_none() && !b.any_bindable() {
                writeln!(
                    f,
                    "           (no answer may be bound: the proxy denies every request to {} \
                     with destination_internal_address)",
                    b.host
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use crate::policy::{WorkloadId, normalize};
    use http::HeaderMap;

    const AUDITED: &str = "\
workload: legacy
select: {cgroup: /legacy}
mode: audit
egress:
  - host: api.example.com
    port: 443
    rules:
      - {id: read, methods: [GET], path: '/items/{id:[0-9]+}'}
      - {id: write, methods: [PUT], path: '/items/{id}', headers: {if-match: required}}
";

    fn snapshot() -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("legacy.yaml"), AUDITED).unwrap();
        Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn run(snap: &Snapshot, workload: u32, method: &str, target: &str) -> Explanation {
        let path = normalize(target).unwrap();
        let headers = HeaderMap::new();
        explain(
            snap,
            &Request {
                workload: WorkloadId(workload),
                uid: 7,
                method,
                host: "api.example.com",
                port: 443,
                path: &path,
                headers: &headers,
                body: None,
                at: "2024-06-03T10:00:00Z".parse().unwrap(),
            },
        )
    }

    #[test]
    fn audit_mode_denial_lists_every_rule() {
        let snap = snapshot();
        let e = run(&snap, 0, "PUT", "/items/42");
        assert_eq!(e.decision, "deny");
        assert_eq!(e.mode, Some(Mode::Audit));
        assert_eq!(e.code, Some("header_required"));
        assert_eq!(e.rule, None);
        assert_eq!(e.nearest_rule.as_deref(), Some("write"));
        assert_eq!(e.destination.as_deref(), Some("api.example.com:443"));
        assert_eq!(
            e.to_string(),
            "request:   PUT api.example.com:443/items/42 (uid 7, at 2024-06-03T10:00:00Z)\n\
             workload:  legacy (mode audit)\n\
             decision:  DENY header_required: rule write: header if-match is required\n           \
             (audit mode: the proxy lets it pass and records would_deny)\n\
             rules of api.example.com:443:\n  \
             read: method_not_allowed: method PUT is not allowed (allowed: GET)\n  \
             write: header_required: header if-match is required\n"
        );
        let e = run(&snap, 0, "GET", "/items/x");
        assert_eq!(e.code, Some("method_not_allowed"));
        assert_eq!(e.rules[0].code, Some("path_not_allowed"));
        assert_eq!(
            e.rules[0].detail.as_deref(),
            Some("the path does not match /items/{id:[0-9]+}")
        );
        assert_eq!(e.rules[1].check, Some(Check::Method));
    }

    fn workload_of(yaml: &str) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.yaml"), yaml).unwrap();
        Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_kernel_outcome_of_a_port_without_destination_follows_the_mode() {
        let audit = snapshot();
        let w = audit.workload(WorkloadId(0)).unwrap();
        // A named port goes to the proxy: no kernel report.
        assert_eq!(kernel_report(w, "api.example.com", 443), None);
        let k = kernel_report(w, "api.example.com", 8443).unwrap();
        assert_eq!(k.outcome, "audit_pass");
        assert_eq!(k.code, Some("port_not_allowed"));
        assert_eq!(
            k.why,
            "no destination on port 8443: audit mode: passes, recorded as would_deny \
             port_not_allowed (the connect goes straight to api.example.com:8443, not through \
             the proxy)"
        );
        // In the report: the kernel line replaces the proxy's audit-mode note.
        let path = normalize("/items/1").unwrap();
        let headers = HeaderMap::new();
        let e = explain(
            &audit,
            &Request {
                workload: WorkloadId(0),
                uid: 7,
                method: "GET",
                host: "api.example.com",
                port: 8443,
                path: &path,
                headers: &headers,
                body: None,
                at: "2024-06-03T10:00:00Z".parse().unwrap(),
            },
        );
        let text = e.to_string();
        assert!(
            text.contains(
                "decision:  DENY destination_not_allowed: destination api.example.com:8443 is \
                 not allowed\nrules of"
            ),
            "{text}"
        );
        assert!(
            text.contains("kernel:    no destination on port 8443: audit mode: passes"),
            "{text}"
        );
        assert!(!text.contains("the proxy lets it pass"), "{text}");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kernel"]["outcome"], "audit_pass");

        let enforce = workload_of(&AUDITED.replace("mode: audit", "mode: enforce"));
        let w = enforce.workload(WorkloadId(0)).unwrap();
        let k = kernel_report(w, "api.example.com", 8443).unwrap();
        assert_eq!(k.outcome, "refused");
        assert_eq!(
            k.why,
            "no destination on port 8443: the hook refuses the connect (EPERM), recorded as \
             deny port_not_allowed"
        );
    }

    #[test]
    fn the_kernel_outcome_of_l4_exceptions_and_dns() {
        let snap = workload_of(
            "workload: db\nselect: {cgroup: /db}\nmode: audit\negress:\n  \
             - {cidr: 192.0.2.8/29, ports: [5432]}\n  \
             - {cidr: 2001:db8::/32, ports: [5432]}\n  \
             - {cidr: 192.0.2.8/29, ports: [9000], protocol: udp}\n\
             dns: system\n",
        );
        let w = snap.workload(WorkloadId(0)).unwrap();
        let l4 = kernel_report(w, "192.0.2.9", 5432).unwrap();
        assert_eq!((l4.outcome, l4.code), ("l4_exception", None));
        assert_eq!(
            kernel_report(w, "[2001:db8::5]", 5432).unwrap().outcome,
            "l4_exception"
        );
        // Outside the range, another port, a UDP-only port, a name: no L4 exception.
        for (host, port) in [
            ("192.0.2.16", 5432),
            ("192.0.2.9", 5433),
            ("192.0.2.9", 9000),
            ("db.example.com", 5432),
        ] {
            let k = kernel_report(w, host, port).unwrap();
            assert_eq!(k.outcome, "audit_pass", "{host}:{port}");
        }
        // With `dns:`, TCP port 53 goes to the proxy's DNS over TCP.
        assert_eq!(kernel_report(w, "192.0.2.9", 53), None);
        assert!(dns_report(Some(w), "x.example", &[TYPE_A]).audit_mode);
    }

    #[test]
    fn dns_without_grant_in_audit_mode_says_it_passes() {
        let snap = snapshot();
        let w = snap.workload(WorkloadId(0)).unwrap();
        let r = host_dns_report(Some(w), "api.example.com");
        assert_eq!(r.code, Some("dns_not_allowed"));
        assert_eq!(
            r.to_string(),
            "A/AAAA api.example.com: REFUSED dns_not_allowed: the policy has no `dns:`: audit \
             mode: the workload's DNS to any resolver passes, recorded as would_deny \
             udp_not_allowed (UDP) or port_not_allowed (TCP, when no destination is on port 53)"
        );
    }

    #[test]
    fn allow_and_unknown_workload() {
        let snap = snapshot();
        let e = run(&snap, 0, "GET", "/items/%34%32");
        assert_eq!(e.decision, "allow");
        assert_eq!(e.rule.as_deref(), Some("read"));
        assert_eq!(e.request.path, "/items/42");
        // The trailing slash stays, and the explanation says it is why nothing matched.
        let slash = run(&snap, 0, "GET", "/items/42/");
        assert_eq!(slash.decision, "deny");
        assert_eq!(slash.request.path, "/items/42/");
        assert!(
            slash.rules[0]
                .detail
                .as_deref()
                .is_some_and(|d| d.contains("trailing '/'")),
            "{:?}",
            slash.rules[0].detail
        );
        assert!(e.rules.is_empty() && e.rate_limits.is_empty() && e.code.is_none());
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["decision"], "allow");
        assert_eq!(json["mode"], "audit");

        let e = run(&snap, 5, "GET", "/items/42");
        assert_eq!(e.workload, None);
        assert_eq!(e.code, Some("unknown_workload"));
        assert!(
            e.to_string()
                .contains("workload:  (unknown)\ndecision:  DENY unknown_workload")
        );
    }
}
