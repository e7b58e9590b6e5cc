//! DNS under policy: which query names and types a workload may resolve through the
//! agent's DNS proxy, validated from `dns:` and decided by the pure [`allowed`].
//!
//! A workload with `dns:` may ask for
//! - the host names of its destinations, exactly, and
//! - the names matching a `dns.names` pattern: `api.example.com` (exactly that name) or
//!   `*.example.com` (exactly one more label in front: `a.example.com`, never
//!   `example.com` nor `a.b.example.com`);
//!
//! with the types A and AAAA (the CNAMEs inside their answers come along), plus the types
//! `dns.types` lists. Everything else is refused. Names compare case-insensitively, with
//! or without one trailing dot.
#![forbid(unsafe_code)]

use std::net::IpAddr;

use super::error::{PolicyError, invalid};
use super::model::{Host, Workload};
use super::raw;

/// Where the DNS proxy forwards a workload's allowed queries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DnsUpstream {
    /// The host's resolvers (the agent's `--resolv-conf`).
    #[default]
    System,
    /// These resolvers (`dns: [addr, …]` or `dns.resolvers`).
    Resolvers(Vec<IpAddr>),
}

/// A `dns.names` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamePattern {
    /// Exactly this name (lowercase, no trailing dot).
    Exact(String),
    /// `*.suffix`: one label, then exactly this suffix (lowercase, no trailing dot).
    OneLabel(String),
}

impl NamePattern {
    /// Whether `name` (lowercase, no trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::OneLabel(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        }
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::OneLabel(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// The query types a policy may name in `dns.types` (RFC mnemonic → type number).
const TYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("PTR", 12),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DS", 43),
    ("SSHFP", 44),
    ("DNSKEY", 48),
    ("TLSA", 52),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("ANY", 255),
    ("CAA", 257),
];

/// Type A.
pub const TYPE_A: u16 = 1;
/// Type AAAA.
pub const TYPE_AAAA: u16 = 28;

/// The mnemonic of a query type number (`TYPE123` for one without).
pub fn type_name(qtype: u16) -> String {
    TYPES
        .iter()
        .find(|(_, n)| *n == qtype)
        .map_or_else(|| format!("TYPE{qtype}"), |(name, _)| (*name).to_owned())
}

/// `dns:` of a workload that may resolve names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    /// Where allowed queries are forwarded.
    pub upstream: DnsUpstream,
    /// `dns.names`: names allowed besides the destinations' host names.
    pub names: Vec<NamePattern>,
    /// `dns.types`: types allowed besides A and AAAA (type numbers).
    pub types: Vec<u16>,
}

impl Dns {
    /// `dns: system`: the destinations' names, A and AAAA, through the host's resolvers.
    pub fn system() -> Self {
        Self::default()
    }
}

/// Why a query is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsDeny {
    /// The caller is not a known workload (or its policy is gone).
    NoWorkload,
    /// The workload's policy has no `dns:`.
    NoDns,
    /// The query name is neither a destination's name nor matched by `dns.names`.
    NameNotAllowed,
    /// The name is allowed, the type is not (not A/AAAA, not in `dns.types`).
    TypeNotAllowed,
}

impl DnsDeny {
    /// The stable reason code of the audit record.
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoWorkload => "unknown_workload",
            Self::NoDns => "dns_not_allowed",
            Self::NameNotAllowed => "dns_name_not_allowed",
            Self::TypeNotAllowed => "dns_type_not_allowed",
        }
    }
}

/// The decision on one DNS question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsDecision {
    /// Forward it; the answer goes back to the workload.
    Allow,
    /// Answer REFUSED.
    Deny(DnsDeny),
}

/// The canonical form of a query name: lowercase, without one trailing dot; None when it
/// is not a plausible host name (non-ASCII, empty or over-long labels, bytes other than
/// letters, digits, `-` and `_`), which no policy can allow.
pub fn canonical_qname(qname: &str) -> Option<String> {
    let name = qname.strip_suffix('.').unwrap_or(qname);
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    let plausible = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    plausible.then(|| name.to_ascii_lowercase())
}

/// Decides one DNS question (`qname` as asked, `qtype` its type number) of `workload`.
/// Pure: no I/O.
pub fn allowed(workload: Option<&Workload>, qname: &str, qtype: u16) -> DnsDecision {
    let Some(workload) = workload else {
        return DnsDecision::Deny(DnsDeny::NoWorkload);
    };
    let Some(dns) = &workload.dns else {
        return DnsDecision::Deny(DnsDeny::NoDns);
    };
    let Some(name) = canonical_qname(qname) else {
        return DnsDecision::Deny(DnsDeny::NameNotAllowed);
    };
    let destination = workload
        .destinations
        .iter()
        .any(|d| matches!(&d.host, Host::Name(host) if *host == name));
    if !destination && !dns.names.iter().any(|p| p.matches(&name)) {
        return DnsDecision::Deny(DnsDeny::NameNotAllowed);
    }
    if qtype == TYPE_A || qtype == TYPE_AAAA || dns.types.contains(&qtype) {
        DnsDecision::Allow
    } else {
        DnsDecision::Deny(DnsDeny::TypeNotAllowed)
    }
}

/// Validates one `dns.names` pattern.
pub fn parse_pattern(text: &str) -> Result<NamePattern, &'static str> {
    let name = text.strip_suffix('.').unwrap_or(text);
    let (wildcard, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    if rest.contains('*') || name == "*" {
        return Err(
            "`*` may only be the whole first label, followed by a name: `*.example.com` \
             (it matches exactly one label)",
        );
    }
    if wildcard && !rest.contains('.') {
        return Err("`*.` needs a suffix of at least two labels (`*.example.com`, not `*.com`)");
    }
    match super::model::parse_host(rest)? {
        Host::Name(name) if wildcard => Ok(NamePattern::OneLabel(name)),
        Host::Name(name) => Ok(NamePattern::Exact(name)),
        Host::Ip(_) => Err("a DNS name pattern, not an IP address"),
    }
}

/// Validates one `dns.types` entry (case-insensitive mnemonic).
pub fn parse_type(text: &str) -> Result<u16, &'static str> {
    let upper = text.to_ascii_uppercase();
    TYPES
        .iter()
        .find(|(name, _)| *name == upper)
        .map(|(_, n)| *n)
        .ok_or(
            "unknown DNS type; expected one of A, AAAA, CNAME, TXT, MX, SRV, NS, SOA, PTR, \
             NAPTR, DS, SSHFP, DNSKEY, TLSA, SVCB, HTTPS, CAA, ANY",
        )
}

fn parse_resolvers(list: Vec<String>, path: &str, errors: &mut Vec<PolicyError>) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (i, text) in list.into_iter().enumerate() {
        match text.parse::<IpAddr>() {
            Ok(ip) => out.push(ip),
            Err(_) => errors.push(invalid!(InvalidEgress {
                path: format!("{path}[{i}]"),
                value: text,
                reason: "not an IP address",
            })),
        }
    }
    out
}

/// `dns:` as written → validated; problems are pushed to `errors` (with logical paths).
pub(crate) fn parse(raw: Option<raw::Dns>, errors: &mut Vec<PolicyError>) -> Option<Dns> {
    match raw? {
        raw::Dns::Keyword(k) if k == "system" => Some(Dns::system()),
        raw::Dns::Keyword(k) => {
            errors.push(invalid!(InvalidEgress {
                path: "dns".to_owned(),
                value: k,
                reason: "expected `system`, a list of resolver addresses, or \
                         {names: [...], types: [...], resolvers: [...]}",
            }));
            None
        }
        raw::Dns::Resolvers(list) => Some(Dns {
            upstream: DnsUpstream::Resolvers(parse_resolvers(list, "dns", errors)),
            ..Dns::default()
        }),
        raw::Dns::Rules(rules) => {
            let mut dns = Dns::default();
            if let Some(list) = rules.resolvers {
                if list.is_empty() {
                    errors.push(invalid!(InvalidEgress {
                        path: "dns.resolvers".to_owned(),
                        value: String::new(),
                        reason: "an empty resolver list; leave `resolvers` out for the \
                                 host's resolvers",
                    }));
                }
                dns.upstream =
                    DnsUpstream::Resolvers(parse_resolvers(list, "dns.resolvers", errors));
            }
            for (i, text) in rules.names.into_iter().enumerate() {
                match parse_pattern(&text) {
                    Ok(p) if dns.names.contains(&p) => {}
                    Ok(p) => dns.names.push(p),
                    Err(reason) => errors.push(invalid!(InvalidEgress {
                        path: format!("dns.names[{i}]"),
                        value: text,
                        reason,
                    })),
                }
            }
            for (i, text) in rules.types.into_iter().enumerate() {
                match parse_type(&text) {
                    Ok(t) if t == TYPE_A || t == TYPE_AAAA || dns.types.contains(&t) => {}
                    Ok(t) => dns.types.push(t),
                    Err(reason) => errors.push(invalid!(InvalidEgress {
                        path: format!("dns.types[{i}]"),
                        value: text,
                        reason,
                    })),
                }
            }
            Some(dns)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::policy::Snapshot;

    #[test]
    fn patterns_validate() {
        assert_eq!(
            parse_pattern("API.Example.com.").unwrap(),
            NamePattern::Exact("api.example.com".into())
        );
        assert_eq!(
            parse_pattern("*.Example.com").unwrap(),
            NamePattern::OneLabel("example.com".into())
        );
        for (bad, needle) in [
            ("*", "whole first label"),
            ("*.", "whole first label"),
            ("**.example.com", "whole first label"),
            ("a.*.example.com", "whole first label"),
            ("a*.example.com", "whole first label"),
            ("*a.example.com", "whole first label"),
            ("*.*.example.com", "whole first label"),
            ("*.com", "two labels"),
            ("", "empty"),
            (".", "empty"),
            ("a..example.com", "empty labels"),
            ("example.com..", "empty labels"),
            (".example.com", "empty labels"),
            ("127.0.0.1", "IP address"),
            ("::1", "not an IP"),
            ("0x7f.0x1", "numeric"),
            ("*.10.0.0", "numeric"),
            ("ex ample.com", "letters, digits"),
            ("münchen.de", "punycode"),
            ("a_b.example.com", "letters, digits"),
        ] {
            let err = parse_pattern(bad).expect_err(bad);
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn types_validate() {
        assert_eq!(parse_type("txt"), Ok(16));
        assert_eq!(parse_type("HTTPS"), Ok(65));
        for bad in ["", "TXTX", "TYPE16", "16", "A AAAA", "OPT", "AXFR"] {
            assert!(parse_type(bad).is_err(), "{bad}");
        }
        assert_eq!(type_name(16), "TXT");
        assert_eq!(type_name(4242), "TYPE4242");
    }

    #[test]
    fn one_label_wildcards_match_exactly_one_label() {
        let p = parse_pattern("*.example.com").unwrap();
        assert!(p.matches("a.example.com"));
        assert!(p.matches("x-1.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("a.b.example.com"));
        assert!(!p.matches(".example.com"));
        assert!(!p.matches("aexample.com"));
        assert!(!p.matches("a.example.com.evil"));
        assert!(!p.matches("a.notexample.com"));
    }

    fn snapshot(dns: &str) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("w.yaml"),
            format!(
                "workload: w\nselect:\n  cgroup: /w\negress:\n  - host: api.allowed.test\n    port: 80\n    rules:\n      - id: r\n        methods: [GET]\n        path: /\n  - host: 127.0.0.9\n    port: 80\n    rules:\n      - id: r2\n        methods: [GET]\n        path: /\n{dns}"
            ),
        )
        .unwrap();
        Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn decision_table() {
        use DnsDecision::{Allow, Deny};
        use DnsDeny::*;
        let none = snapshot("");
        let system = snapshot("dns: system\n");
        let rules = snapshot("dns:\n  names: ['*.cdn.test', 'exact.test.']\n  types: [TXT, srv]\n");
        fn w(s: &Snapshot) -> Option<&Workload> {
            s.workloads().first()
        }
        let table: &[(&Snapshot, &str, u16, DnsDecision)] = &[
            (&none, "api.allowed.test", 1, Deny(NoDns)),
            (&system, "api.allowed.test", 1, Allow),
            (&system, "API.Allowed.Test.", 28, Allow),
            (&system, "api.allowed.test", 16, Deny(TypeNotAllowed)),
            (&system, "api.allowed.test", 255, Deny(TypeNotAllowed)),
            (&system, "api.allowed.test", 5, Deny(TypeNotAllowed)),
            (&system, "x.api.allowed.test", 1, Deny(NameNotAllowed)),
            (&system, "allowed.test", 1, Deny(NameNotAllowed)),
            (&system, "127.0.0.9", 1, Deny(NameNotAllowed)),
            (&system, "9.0.0.127.in-addr.arpa", 12, Deny(NameNotAllowed)),
            (&system, "", 1, Deny(NameNotAllowed)),
            (&system, ".", 1, Deny(NameNotAllowed)),
            (&system, "api..allowed.test", 1, Deny(NameNotAllowed)),
            (&system, "api.allowed.test..", 1, Deny(NameNotAllowed)),
            (&system, "api.allowed.test\0", 1, Deny(NameNotAllowed)),
            (&system, "äpi.allowed.test", 1, Deny(NameNotAllowed)),
            (&rules, "api.allowed.test", 16, Allow),
            (&rules, "api.allowed.test", 33, Allow),
            (&rules, "api.allowed.test", 15, Deny(TypeNotAllowed)),
            (&rules, "img.cdn.test", 1, Allow),
            (&rules, "IMG.CDN.TEST.", 16, Allow),
            (&rules, "a.img.cdn.test", 1, Deny(NameNotAllowed)),
            (&rules, "cdn.test", 1, Deny(NameNotAllowed)),
            (&rules, "exact.test", 28, Allow),
            (&rules, "sub.exact.test", 28, Deny(NameNotAllowed)),
            (&rules, "_srv._tcp.cdn.test", 33, Deny(NameNotAllowed)),
            (&rules, "_srv.cdn.test", 33, Allow),
        ];
        for (snap, name, qtype, want) in table {
            assert_eq!(allowed(w(snap), name, *qtype), *want, "{name} {qtype}");
        }
        assert_eq!(allowed(None, "api.allowed.test", 1), Deny(NoWorkload));
    }

    #[test]
    fn many_random_subdomains_of_a_destination_are_refused() {
        let system = snapshot("dns: system\n");
        let w = system.workloads().first();
        for i in 0..1000u32 {
            let name = format!("{:08x}{i}.api.allowed.test", rand::random::<u32>());
            assert_eq!(
                allowed(w, &name, 1),
                DnsDecision::Deny(DnsDeny::NameNotAllowed)
            );
        }
    }

    fn errors(dns: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.yaml"),
            format!("workload: w\nselect:\n  cgroup: /w\negress: []\n{dns}"),
        )
        .unwrap();
        Snapshot::load_dir(dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn hostile_dns_settings_are_refused_with_positions() {
        for (dns, needle) in [
            (
                "dns: sometimes\n",
                "p.yaml:5:6: dns: \"sometimes\": expected `system`",
            ),
            (
                "dns:\n  names: ['a.*.test']\n",
                "p.yaml:6:11: dns.names[0]: \"a.*.test\": `*` may only be",
            ),
            (
                "dns:\n  names: [ok.test, '*']\n",
                "p.yaml:6:20: dns.names[1]: \"*\": `*` may only be",
            ),
            (
                "dns:\n  types: [TXT, BOGUS]\n",
                "p.yaml:6:16: dns.types[1]: \"BOGUS\": unknown DNS type",
            ),
            ("dns:\n  names: x.test\n", "p.yaml:6"),
            ("dns:\n  name: [x.test]\n", "unknown field `name`"),
            ("dns:\n  resolvers: [not-an-ip]\n", "dns.resolvers[0]"),
            ("dns:\n  resolvers: []\n", "empty resolver list"),
            (
                "dns: [192.0.2.1, nope]\n",
                "dns[1]: \"nope\": not an IP address",
            ),
            ("dns: 5\n", "p.yaml:5"),
        ] {
            let err = errors(dns);
            assert!(err.contains(needle), "{dns:?}: {err}");
        }
    }

    #[test]
    fn the_spellings_mean_what_the_docs_say() {
        let w = |s: &Snapshot| s.workloads()[0].dns.clone();
        assert_eq!(w(&snapshot("dns: system\n")), Some(Dns::system()));
        assert_eq!(w(&snapshot("")), None);
        let listed = w(&snapshot("dns: [192.0.2.53]\n")).unwrap();
        assert_eq!(
            listed.upstream,
            DnsUpstream::Resolvers(vec!["192.0.2.53".parse().unwrap()])
        );
        assert!(listed.names.is_empty() && listed.types.is_empty());
        let rules = w(&snapshot(
            "dns:\n  types: [A, TXT, txt]\n  names: [a.test, A.test.]\n",
        ))
        .unwrap();
        assert_eq!(rules.types, vec![16]);
        assert_eq!(rules.names, vec![NamePattern::Exact("a.test".into())]);
        assert_eq!(rules.upstream, DnsUpstream::System);
    }
}
