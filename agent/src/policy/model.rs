//! Validated policy: domain types built from the raw file types with `TryFrom`.
//!
//! Validation reports every problem it finds, not just the first. Errors carry a logical
//! path relative to the value being converted; see `error` for how they get positions.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;

use super::canonical;
use super::error::PolicyError;
use super::raw;
use super::routes::RouteTable;

/// Builds a validation error whose file and position the loader fills in later.
macro_rules! invalid {
    ($variant:ident { $($fields:tt)* }) => {
        PolicyError::$variant { file: PathBuf::new(), line: 0, col: 0, $($fields)* }
    };
}

/// Identifies a workload within one [`Snapshot`](super::Snapshot): an index into
/// [`Snapshot::workloads`](super::Snapshot::workloads). Not stable across reloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadId(pub u32);

/// One workload: who it is and where it may connect.
#[derive(Debug)]
pub struct Workload {
    /// The unique name (`workload:`).
    pub name: String,
    /// How the kernel identifies it.
    pub selector: Selector,
    /// The policy file it was defined in.
    pub source: PathBuf,
    /// Allowed destinations, in file order; empty denies everything.
    pub destinations: Vec<Destination>,
}

/// The workload's kernel-attested identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// A cgroup v2 path relative to the cgroup2 mount, e.g. `/system.slice/a.service`.
    Cgroup(String),
    /// A systemd unit name, e.g. `a.service`.
    SystemdUnit(String),
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Cgroup(p) => write!(f, "cgroup {p}"),
            Selector::SystemdUnit(u) => write!(f, "systemd_unit {u}"),
        }
    }
}

/// One allowed destination and its compiled rules.
#[derive(Debug)]
pub struct Destination {
    /// The host, as policy names it.
    pub host: Host,
    /// The original destination port.
    pub port: u16,
    rules: Vec<Rule>,
    routes: RouteTable,
}

impl Destination {
    /// The rules, in file order; [`RuleRef::index`](super::RuleRef::index) indexes this.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub(crate) fn routes(&self) -> &RouteTable {
        &self.routes
    }
}

/// A destination host: a DNS name (lowercase) or an IP address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A lowercase DNS name of letter-digit-hyphen labels, without a trailing dot.
    Name(String),
    /// An IP address; IPv4-mapped IPv6 addresses are stored as IPv4.
    Ip(IpAddr),
}

impl Host {
    /// Whether `host`, the host part of a request's authority (port already stripped),
    /// names this host. Names compare case-insensitively and exactly (no trailing-dot
    /// folding); IP literals compare as addresses, and IPv6 may be written `[::1]` or `::1`.
    pub fn matches_authority(&self, host: &str) -> bool {
        match self {
            Host::Name(name) => name.eq_ignore_ascii_case(host),
            Host::Ip(ip) => parse_ip_literal(host).is_some_and(|h| h == *ip),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// An IPv4 literal, or an IPv6 literal with or without brackets, canonicalised.
fn parse_ip_literal(s: &str) -> Option<IpAddr> {
    let ip = match s.strip_prefix('[') {
        Some(rest) => IpAddr::V6(rest.strip_suffix(']')?.parse::<Ipv6Addr>().ok()?),
        None => s.parse::<IpAddr>().ok()?,
    };
    Some(ip.to_canonical())
}

/// One L7 rule: a request passes if its method is listed and its path matches.
#[derive(Debug)]
pub struct Rule {
    id: Arc<str>,
    methods: Box<[Box<str>]>,
    path: PathPattern,
}

impl Rule {
    /// The rule id, as recorded in audit records.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn id_arc(&self) -> &Arc<str> {
        &self.id
    }

    /// The allowed methods, uppercase, in file order.
    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.methods.iter().map(|m| &**m)
    }

    /// Whether `method` (compared exactly) is allowed.
    pub fn allows_method(&self, method: &str) -> bool {
        self.methods.iter().any(|m| **m == *method)
    }

    /// The path pattern.
    pub fn path(&self) -> &PathPattern {
        &self.path
    }
}

/// A compiled path pattern such as `/v1/customers/{id}` or `/files/**`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<PatternSegment>,
}

/// One segment of a [`PathPattern`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatternSegment {
    /// Matches exactly this canonical segment (case-sensitive).
    Literal(String),
    /// `{name}`: matches exactly one (non-empty) segment.
    Param(String),
    /// `**`: the last segment; matches the remaining tail, zero or more segments.
    Tail,
}

impl PathPattern {
    /// The pattern as written in the policy.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The segments; `/` has none.
    pub fn segments(&self) -> &[PatternSegment] {
        &self.segments
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

// ---------------------------------------------------------------------------------------
// Conversions from the raw file types.
// ---------------------------------------------------------------------------------------

impl TryFrom<raw::Workload> for Workload {
    type Error = Vec<PolicyError>;

    /// Validates one workload document. `source` is left empty for the loader to set.
    fn try_from(raw: raw::Workload) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();
        if !is_workload_name(&raw.workload) {
            errors.push(invalid!(InvalidWorkloadName {
                path: "workload".to_owned(),
                value: raw.workload.clone(),
            }));
        }
        let selector = Selector::try_from(raw.select)
            .map_err(|e| errors.push(e.nested("select")))
            .ok();

        // Duplicates are found on the raw values so that they are reported even when the
        // destination or rule has other problems.
        let mut rule_ids: HashMap<&str, String> = HashMap::new();
        let mut hosts: HashMap<(Host, i64), String> = HashMap::new();
        for (d, dest) in raw.egress.iter().enumerate() {
            if let Ok(host) = parse_host(&dest.host) {
                match hosts.entry((host, dest.port)) {
                    Entry::Occupied(first) => errors.push(invalid!(DuplicateDestination {
                        path: format!("egress[{d}].host"),
                        host: dest.host.clone(),
                        port: u16::try_from(dest.port).unwrap_or_default(),
                        first: first.get().clone(),
                    })),
                    Entry::Vacant(v) => {
                        v.insert(format!("egress[{d}]"));
                    }
                }
            }
            for (r, rule) in dest.rules.iter().enumerate() {
                let path = format!("egress[{d}].rules[{r}].id");
                match rule_ids.entry(&rule.id) {
                    Entry::Occupied(first) => errors.push(invalid!(DuplicateRuleId {
                        path,
                        id: rule.id.clone(),
                        first: first.get().clone(),
                    })),
                    Entry::Vacant(v) => {
                        v.insert(path);
                    }
                }
            }
        }

        let mut destinations = Vec::with_capacity(raw.egress.len());
        for (d, dest) in raw.egress.into_iter().enumerate() {
            match Destination::try_from(dest) {
                Ok(dest) => destinations.push(dest),
                Err(errs) => {
                    let prefix = format!("egress[{d}]");
                    errors.extend(errs.into_iter().map(|e| e.nested(&prefix)));
                }
            }
        }

        match selector {
            Some(selector) if errors.is_empty() => Ok(Workload {
                name: raw.workload,
                selector,
                source: PathBuf::new(),
                destinations,
            }),
            _ => Err(errors),
        }
    }
}

impl TryFrom<raw::Select> for Selector {
    type Error = PolicyError;

    fn try_from(raw: raw::Select) -> Result<Self, Self::Error> {
        match (raw.cgroup, raw.systemd_unit) {
            (Some(path), None) => match cgroup_problem(&path) {
                None => Ok(Selector::Cgroup(path)),
                Some(reason) => Err(invalid!(InvalidCgroup {
                    path: "cgroup".to_owned(),
                    value: path,
                    reason,
                })),
            },
            (None, Some(unit)) => match systemd_unit_problem(&unit) {
                None => Ok(Selector::SystemdUnit(unit)),
                Some(reason) => Err(invalid!(InvalidSystemdUnit {
                    path: "systemd_unit".to_owned(),
                    value: unit,
                    reason,
                })),
            },
            (Some(_), Some(_)) => Err(invalid!(InvalidSelector {
                path: "systemd_unit".to_owned(),
                reason: "select exactly one of `cgroup` or `systemd_unit`, not both",
            })),
            (None, None) => Err(invalid!(InvalidSelector {
                path: String::new(),
                reason: "select needs one of `cgroup` or `systemd_unit`",
            })),
        }
    }
}

impl TryFrom<raw::Destination> for Destination {
    type Error = Vec<PolicyError>;

    fn try_from(raw: raw::Destination) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();
        let host = parse_host(&raw.host)
            .map_err(|reason| {
                errors.push(invalid!(InvalidHost {
                    path: "host".to_owned(),
                    value: raw.host.clone(),
                    reason,
                }));
            })
            .ok();
        let port = u16::try_from(raw.port)
            .ok()
            .filter(|p| *p != 0)
            .or_else(|| {
                errors.push(invalid!(InvalidPort {
                    path: "port".to_owned(),
                    value: raw.port,
                }));
                None
            });
        if raw.rules.is_empty() {
            errors.push(invalid!(NoRules {
                path: "rules".to_owned(),
            }));
        }
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (r, rule) in raw.rules.into_iter().enumerate() {
            match Rule::try_from(rule) {
                Ok(rule) => rules.push(rule),
                Err(errs) => {
                    let prefix = format!("rules[{r}]");
                    errors.extend(errs.into_iter().map(|e| e.nested(&prefix)));
                }
            }
        }
        match (host, port) {
            (Some(host), Some(port)) if errors.is_empty() => {
                let routes = RouteTable::build(rules.iter().map(Rule::path));
                Ok(Destination {
                    host,
                    port,
                    rules,
                    routes,
                })
            }
            _ => Err(errors),
        }
    }
}

impl TryFrom<raw::Rule> for Rule {
    type Error = Vec<PolicyError>;

    fn try_from(raw: raw::Rule) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();
        if !is_rule_id(&raw.id) {
            errors.push(invalid!(InvalidRuleId {
                path: "id".to_owned(),
                value: raw.id.clone(),
            }));
        }
        if raw.methods.is_empty() {
            errors.push(invalid!(NoMethods {
                path: "methods".to_owned(),
            }));
        }
        for (i, m) in raw.methods.iter().enumerate() {
            let reason = if m == "*" {
                Some("is not allowed: list the methods explicitly")
            } else if !is_uppercase_method(m) {
                Some("is not an uppercase HTTP method")
            } else if raw.methods[..i].contains(m) {
                Some("is listed twice")
            } else {
                None
            };
            if let Some(reason) = reason {
                errors.push(invalid!(InvalidMethod {
                    path: format!("methods[{i}]"),
                    value: m.clone(),
                    reason,
                }));
            }
        }
        let path = PathPattern::try_from(raw.path)
            .map_err(|e| errors.push(e.nested("path")))
            .ok();
        match path {
            Some(path) if errors.is_empty() => Ok(Rule {
                id: raw.id.into(),
                methods: raw
                    .methods
                    .into_iter()
                    .map(String::into_boxed_str)
                    .collect(),
                path,
            }),
            _ => Err(errors),
        }
    }
}

impl TryFrom<String> for PathPattern {
    type Error = PolicyError;

    /// Parses a pattern. Literal segments must already be canonical: a literal that
    /// request normalisation would change could never match as written.
    fn try_from(source: String) -> Result<Self, Self::Error> {
        let fail = |reason: String| {
            invalid!(InvalidPathPattern {
                path: String::new(),
                value: source.clone(),
                reason,
            })
        };
        let Some(rest) = source.strip_prefix('/') else {
            return Err(fail("must start with '/'".to_owned()));
        };
        if source.contains('?') {
            return Err(fail("a query ('?') is not part of the path".to_owned()));
        }
        if source.contains('#') {
            return Err(fail("a fragment ('#') is not allowed".to_owned()));
        }
        let raw_segments: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let last = raw_segments.len().saturating_sub(1);
        let mut segments = Vec::with_capacity(raw_segments.len());
        // The canonical spelling, in case some literal is not canonical.
        let mut canonical = String::new();
        let mut changed = false;
        for (i, seg) in raw_segments.iter().copied().enumerate() {
            if seg.is_empty() {
                if i == last {
                    changed = true; // trailing '/', which normalisation removes
                    continue;
                }
                return Err(fail(
                    "empty segment ('//'): requests with empty segments are always rejected"
                        .to_owned(),
                ));
            }
            let segment = if seg == "**" {
                if i != last {
                    return Err(fail("'**' is allowed only as the last segment".to_owned()));
                }
                PatternSegment::Tail
            } else if seg.starts_with('{') || seg.ends_with('}') {
                let name = seg
                    .strip_prefix('{')
                    .and_then(|s| s.strip_suffix('}'))
                    .filter(|n| is_param_name(n))
                    .ok_or_else(|| {
                        fail(format!(
                            "segment {seg:?}: a parameter is written {{name}}, with a name of \
                             [A-Za-z_][A-Za-z0-9_]*, and spans a whole segment"
                        ))
                    })?;
                let dup = segments
                    .iter()
                    .any(|s| matches!(s, PatternSegment::Param(p) if p == name));
                if dup {
                    return Err(fail(format!("parameter {{{name}}} appears twice")));
                }
                PatternSegment::Param(name.to_owned())
            } else if seg.contains(['*', '{', '}']) {
                return Err(fail(format!(
                    "segment {seg:?}: '*', '{{' and '}}' are only allowed in '**' and '{{name}}' \
                     segments"
                )));
            } else {
                // Normalised below a dummy parent, so that a '..' shows as a dot-segment
                // rather than as climbing above the root.
                let normal = canonical::normalize(&format!("/x/{seg}"))
                    .map_err(|e| fail(format!("segment {seg:?}: {}", e.problem())))?;
                let Some(literal) = normal.path().strip_prefix("/x/") else {
                    return Err(fail(format!(
                        "segment {seg:?}: dot-segments ('.' and '..') are not allowed"
                    )));
                };
                changed |= literal != seg;
                PatternSegment::Literal(literal.to_owned())
            };
            canonical.push('/');
            canonical.push_str(match &segment {
                PatternSegment::Literal(l) => l,
                _ => seg,
            });
            segments.push(segment);
        }
        if changed {
            if canonical.is_empty() {
                canonical.push('/');
            }
            return Err(invalid!(NonCanonicalPath {
                path: String::new(),
                value: source,
                canonical,
            }));
        }
        Ok(PathPattern { source, segments })
    }
}

// ---------------------------------------------------------------------------------------
// Field validators.
// ---------------------------------------------------------------------------------------

/// `[a-z0-9][a-z0-9_-]*`
fn is_workload_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// `[A-Za-z0-9_.-]+`
fn is_rule_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `[A-Za-z_][A-Za-z0-9_]*`
fn is_param_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An RFC 9110 token without lowercase letters.
fn is_uppercase_method(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

fn cgroup_problem(p: &str) -> Option<&'static str> {
    if !p.starts_with('/') {
        Some("must be an absolute path starting with '/'")
    } else if p == "/" {
        Some("the root cgroup cannot be a workload")
    } else if p.ends_with('/') {
        Some("must not end with '/'")
    } else if p.contains("//") {
        Some("must not contain empty segments ('//')")
    } else if p.split('/').any(|s| s == "." || s == "..") {
        Some("must not contain '.' or '..' segments")
    } else if p.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else if p.contains(['*', '?', '[', ']']) {
        Some("glob patterns are not supported")
    } else {
        None
    }
}

fn systemd_unit_problem(u: &str) -> Option<&'static str> {
    let stem = [".service", ".scope", ".slice"]
        .iter()
        .find_map(|suffix| u.strip_suffix(suffix));
    if u.contains('/') {
        Some("must be a unit name, not a path")
    } else if !u
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":_.\\@-".contains(&b))
    {
        Some("may contain only ASCII letters, digits and ':', '_', '.', '\\', '@', '-'")
    } else {
        match stem {
            None => Some("must end in .service, .scope or .slice"),
            Some("") => Some("has no name before the suffix"),
            Some(_) => None,
        }
    }
}

/// Parses a policy host: an IP literal (IPv6 with or without brackets) or a DNS name,
/// which is lowercased.
fn parse_host(s: &str) -> Result<Host, &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if let Some(ip) = parse_ip_literal(s) {
        return Ok(Host::Ip(ip));
    }
    if s.starts_with('[') {
        return Err("is not a valid bracketed IPv6 address");
    }
    if s.contains("://") || s.contains('/') {
        return Err("must be a host name, not a URL");
    }
    if s.contains(':') {
        return Err("is neither a DNS name nor an IP address (write the port in `port:`)");
    }
    if s.contains('*') {
        return Err("wildcard hosts are not supported");
    }
    let name = s.to_ascii_lowercase();
    if name.len() > 253 {
        return Err("a DNS name has at most 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("a DNS name has no empty labels (and no trailing '.')");
        }
        if label.len() > 63 {
            return Err("a DNS label has at most 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("a DNS label has only letters, digits and '-'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a DNS label does not start or end with '-'");
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label of a DNS name is not all digits (not an IP address?)");
    }
    Ok(Host::Name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let ok: &[(&str, &str)] = &[
            ("api.example.com", "api.example.com"),
            ("API.Example.COM", "api.example.com"),
            ("localhost", "localhost"),
            ("a-b.c1", "a-b.c1"),
            ("127.0.0.1", "127.0.0.1"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("[2001:DB8::1]", "2001:db8::1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
        ];
        for (input, shown) in ok {
            let host = parse_host(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(host.to_string(), *shown, "{input}");
        }
        let bad = [
            "",
            "-a.com",
            "a-.com",
            "a..com",
            "a.com.",
            "a_b.com",
            "*.example.com",
            "api.example.com:443",
            "https://api.example.com",
            "api.example.com/v1",
            "[::1",
            "[127.0.0.1]",
            "fe80::1%eth0",
            "127.1",
            "1.2.3.4.5",
            "0x7f.0.0.1",
            "exämple.com",
            "a b",
        ];
        for input in bad {
            assert!(parse_host(input).is_err(), "{input:?} should be rejected");
        }
    }

    #[test]
    fn authority_matching() {
        let name = Host::Name("api.example.com".to_owned());
        assert!(name.matches_authority("api.example.com"));
        assert!(name.matches_authority("API.example.COM"));
        assert!(!name.matches_authority("api.example.com."));
        assert!(!name.matches_authority("api.example.co"));
        assert!(!name.matches_authority("xapi.example.com"));
        let v6 = Host::Ip("::1".parse().unwrap_or(IpAddr::from([0u8; 4])));
        assert!(v6.matches_authority("[::1]"));
        assert!(v6.matches_authority("::1"));
        assert!(v6.matches_authority("[0:0::1]"));
        assert!(!v6.matches_authority("[::2]"));
        assert!(!v6.matches_authority("localhost"));
        let v4 = Host::Ip(IpAddr::from([192, 0, 2, 1]));
        assert!(v4.matches_authority("192.0.2.1"));
        assert!(v4.matches_authority("[::ffff:192.0.2.1]"));
        assert!(!v4.matches_authority("[192.0.2.1]"));
        assert!(!v4.matches_authority("192.000.2.1"));
    }

    #[test]
    fn selectors() {
        for ok in ["/system.slice/a.service", "/a", "/user.slice/x\\x2dy.scope"] {
            assert_eq!(cgroup_problem(ok), None, "{ok}");
        }
        for bad in ["a", "/", "/a/", "//a", "/a/../b", "/a/./b", "/a/*", "/a\n"] {
            assert!(cgroup_problem(bad).is_some(), "{bad:?}");
        }
        for ok in [
            "a.service",
            "a@1.service",
            "x.scope",
            "system.slice",
            "a\\x2db.service",
        ] {
            assert_eq!(systemd_unit_problem(ok), None, "{ok}");
        }
        for bad in [
            "a",
            ".service",
            "a/b.service",
            "a.socket",
            "a b.service",
            "a*.service",
        ] {
            assert!(systemd_unit_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn methods_and_names() {
        for ok in ["GET", "POST", "PROPFIND", "M-SEARCH", "X_1"] {
            assert!(is_uppercase_method(ok), "{ok}");
        }
        for bad in ["get", "Get", "", "GE T", "GET\r", "(GET)", "GÉT"] {
            assert!(!is_uppercase_method(bad), "{bad:?}");
        }
        assert!(is_workload_name("billing-2_x"));
        assert!(!is_workload_name("Billing"));
        assert!(!is_workload_name("_x"));
        assert!(!is_workload_name(""));
        assert!(is_rule_id("Create.charge-1_x"));
        assert!(!is_rule_id("a b"));
        assert!(!is_rule_id(""));
    }

    fn pattern(s: &str) -> Result<Vec<PatternSegment>, String> {
        PathPattern::try_from(s.to_owned())
            .map(|p| p.segments)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn path_patterns() {
        use PatternSegment::{Literal, Param, Tail};
        let lit = |s: &str| Literal(s.to_owned());
        assert_eq!(pattern("/"), Ok(vec![]));
        assert_eq!(pattern("/**"), Ok(vec![Tail]));
        assert_eq!(
            pattern("/v1/customers/{id}"),
            Ok(vec![lit("v1"), lit("customers"), Param("id".to_owned())])
        );
        assert_eq!(pattern("/a/**"), Ok(vec![lit("a"), Tail]));
        assert_eq!(pattern("/caf%C3%A9"), Ok(vec![lit("caf%C3%A9")]));
        assert_eq!(pattern("/a:b@c"), Ok(vec![lit("a:b@c")]));
        for bad in [
            "", "v1", "/a//b", "/**/a", "/a/**/**", "/{id", "/id}", "/{}", "/{1x}", "/v{n}",
            "/{a}/{a}", "/a*", "/*", "/a?x=1", "/a#f", "/a/./b", "/a/../b", "/%2e", "/a%2fb",
            "/a;b", "/a b", "/café", "/%c3",
        ] {
            assert!(pattern(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn non_canonical_literals_name_the_canonical_form() {
        for (input, canonical) in [
            ("/a/", "/a"),
            ("/%61", "/a"),
            ("/v1/%7Eme/{id}", "/v1/~me/{id}"),
            ("/caf%c3%a9/**", "/caf%C3%A9/**"),
        ] {
            match PathPattern::try_from(input.to_owned()) {
                Err(PolicyError::NonCanonicalPath { canonical: c, .. }) => {
                    assert_eq!(c, canonical, "{input}");
                }
                other => panic!("{input}: {other:?}"),
            }
        }
    }
}
