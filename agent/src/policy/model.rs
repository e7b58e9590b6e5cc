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

use super::addr::{AllowInternal, Cidr};
use super::body::DEFAULT_BODY_CAP;
use super::canonical::{self, CanonicalPath, NormalizeOptions};
use super::dns::Dns;
use super::error::{PolicyError, invalid};
use super::matchers::{self, HeaderRules, JsonRule, Pattern, QueryRules};
use super::rate::{RateKey, RateLimit};
use super::raw;
use super::routes::RouteTable;
use super::when::TimeWindow;

/// Largest `body_cap`.
const MAX_BODY_CAP: usize = 64 << 20;

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
    /// `select.uid`: if set, only requests from this uid are allowed.
    pub uid: Option<u32>,
    /// The policy file it was defined in.
    pub source: PathBuf,
    /// Allowed destinations, in file order; empty denies everything.
    pub destinations: Vec<Destination>,
    /// L4 exceptions: address ranges and ports passed straight through in the kernel.
    pub l4: Vec<L4Exception>,
    /// `dns:`: which names and types the workload may resolve through the DNS proxy
    /// (None: no DNS at all).
    pub dns: Option<Dns>,
    mode: Mode,
    body_cap: usize,
    max_connections: usize,
}

/// The default `max_connections` of a workload.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// An `egress` entry with `cidr` and `ports`: allowed by the kernel without the proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Exception {
    /// Network address (host bits zero).
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
    /// Allowed ports.
    pub ports: Vec<u16>,
    /// The protocol.
    pub protocol: L4Protocol,
}

impl fmt::Display for L4Exception {
    /// As written in a policy: `cidr: 127.0.0.4/32 ports: [5432] protocol: tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let protocol = match self.protocol {
            L4Protocol::Tcp => "tcp",
            L4Protocol::Udp => "udp",
        };
        write!(
            f,
            "cidr: {}/{} ports: [{}] protocol: {protocol}",
            self.addr,
            self.prefix,
            ports.join(", ")
        )
    }
}

/// Protocol of an [`L4Exception`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// How a destination's TLS is handled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP from the workload (the default).
    #[default]
    None,
    /// TLS decided by its SNI alone and spliced through; requests are not inspected.
    Passthrough,
    /// TLS terminated with a leaf from the host CA; every request is decided.
    Intercept,
}

/// Where a credential's secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// A file (re-read when it changes).
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
    Systemd(String),
}

/// A credential the proxy injects upstream; the workload never holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The header to set (any header of that name the workload sent is replaced).
    pub header: http::HeaderName,
    prefix: String,
    suffix: String,
    /// Where the secret comes from.
    pub source: SecretSource,
}

impl Credential {
    /// The header value for `secret` (`format` with `{secret}` replaced).
    pub fn render(&self, secret: &str) -> String {
        format!("{}{secret}{}", self.prefix, self.suffix)
    }
}

/// Most ports one L4 exception may list (the kernel's per-entry limit).
pub const MAX_L4_PORTS: usize = 8;

impl Workload {
    /// `enforce` (deny what no rule allows) or `audit` (record it, allow it).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Most connections the workload may hold open through the proxy at once
    /// (`max_connections`, default [`DEFAULT_MAX_CONNECTIONS`]); more are refused.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The largest request body the proxy buffers for `json` rules (`body_cap`, default
    /// [`DEFAULT_BODY_CAP`]); a larger body is refused with 413.
    pub fn body_cap(&self) -> usize {
        self.body_cap
    }

    /// The destination a request to `host` (authority host, port stripped) on the
    /// original destination port `port` goes to, with its index.
    pub fn destination_for(&self, host: &str, port: u16) -> Option<(usize, &Destination)> {
        self.destinations
            .iter()
            .enumerate()
            .find(|(_, d)| d.port == port && d.host.matches_authority(host))
    }
}

/// What happens to a request that no rule allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny it (the default).
    #[default]
    Enforce,
    /// Allow it, and record that it would have been denied. [`decide`](super::decide)
    /// still returns the enforce-mode decision; the caller turns a `Deny` into
    /// "would deny".
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

/// The workload's kernel-attested identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// A cgroup v2 path relative to the cgroup2 mount, e.g. `/system.slice/a.service`.
    Cgroup(String),
    /// A systemd unit name, e.g. `a.service`.
    SystemdUnit(String),
    /// A cgroup path glob: `*` matches within one path component (never `/`), `**` (a
    /// whole component) matches any number of components, including none; e.g.
    /// `/system.slice/app-*.service` or `/user.slice/**/build.scope`.
    CgroupGlob(String),
}

impl Selector {
    /// Whether the cgroup at `path` (relative to the cgroup2 mount, starting with `/`) is
    /// selected directly: `Cgroup` is an exact match, `CgroupGlob` a glob match and
    /// `SystemdUnit` matches a path whose last component is the unit name.
    pub fn matches_cgroup_path(&self, path: &str) -> bool {
        match self {
            Selector::Cgroup(want) => path == want,
            Selector::SystemdUnit(unit) => path.rsplit('/').next() == Some(unit.as_str()),
            Selector::CgroupGlob(glob) => {
                let Some(path) = path.strip_prefix('/') else {
                    return false;
                };
                let pattern: Vec<&str> = glob.trim_start_matches('/').split('/').collect();
                let path: Vec<&str> = path.split('/').collect();
                glob_components(&pattern, &path)
            }
        }
    }
}

/// Matches path components against glob components.
fn glob_components(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| glob_components(rest, &path[skip..])),
        Some((first, rest)) => path
            .split_first()
            .is_some_and(|(c, tail)| glob_component(first, c) && glob_components(rest, tail)),
    }
}

/// `*` in one component: any run of characters.
fn glob_component(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Cgroup(p) | Selector::CgroupGlob(p) => write!(f, "cgroup {p}"),
            Selector::SystemdUnit(u) => write!(f, "systemd_unit {u}"),
        }
    }
}

/// The selector as written (before validation), with the relative path of its value; for
/// the directory-wide uniqueness check.
pub(crate) fn written_selector(raw: &raw::Select) -> Option<(Selector, &'static str)> {
    match (&raw.cgroup, &raw.systemd_unit) {
        (Some(c), None) if c.contains('*') => {
            Some((Selector::CgroupGlob(c.clone()), "select.cgroup"))
        }
        (Some(c), None) => Some((Selector::Cgroup(c.clone()), "select.cgroup")),
        (None, Some(u)) => Some((Selector::SystemdUnit(u.clone()), "select.systemd_unit")),
        _ => None,
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
    path_params: bool,
    underscore_headers: bool,
    allow_internal: AllowInternal,
    when: Option<TimeWindow>,
    expires: Option<jiff::Timestamp>,
    rate: Option<(RateKey, RateLimit)>,
    tls: TlsMode,
    upstream_tls: bool,
    credential: Option<Credential>,
}

impl Destination {
    /// How the workload's TLS to this destination is handled.
    pub fn tls(&self) -> TlsMode {
        self.tls
    }

    /// Whether the proxy speaks verified TLS to the upstream (SNI = the policy host).
    pub fn upstream_tls(&self) -> bool {
        self.upstream_tls
    }

    /// The credential for a request allowed by rule `rule` (the rule's, else the
    /// destination's).
    pub fn credential(&self, rule: usize) -> Option<&Credential> {
        self.rules
            .get(rule)
            .and_then(|r| r.credential.as_ref())
            .or(self.credential.as_ref())
    }

    /// The rules, in file order; [`RuleRef::index`](super::RuleRef::index) indexes this.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The headers a credential of this destination (its own or a rule's) is injected
    /// into.
    pub fn credential_headers(&self) -> impl Iterator<Item = &http::HeaderName> {
        self.credential
            .iter()
            .chain(self.rules.iter().filter_map(|r| r.credential.as_ref()))
            .map(|c| &c.header)
    }

    /// Whether a rule of this destination constrains the header `name` (lowercase).
    pub fn constrains_header(&self, name: &str) -> bool {
        self.rules
            .iter()
            .filter_map(Rule::headers)
            .any(|h| h.headers().any(|(n, _)| n == name))
    }

    /// `allow_underscore_headers: true`: request header names may contain `_`.
    pub fn allows_underscore_headers(&self) -> bool {
        self.underscore_headers
    }

    /// `allow_internal`: which internal addresses a name destination may be bound to
    /// (IP-literal destinations are bound to exactly their address, whatever its class).
    pub fn allow_internal(&self) -> &AllowInternal {
        &self.allow_internal
    }

    /// What destination binding needs of this destination, owned.
    pub fn binding(&self) -> Binding {
        Binding {
            host: self.host.clone(),
            allow_internal: self.allow_internal.clone(),
        }
    }

    pub(crate) fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// `path_params: true`: request paths may carry `;` path parameters; normalise them
    /// with [`normalize_with`](super::canonical::normalize_with) and `allow_semicolon`.
    pub fn allows_path_params(&self) -> bool {
        self.path_params
    }

    /// The normalisation options for requests to this destination.
    pub fn normalize_options(&self) -> NormalizeOptions {
        NormalizeOptions {
            allow_semicolon: self.path_params,
        }
    }

    /// The destination's own time window, if any.
    pub fn when(&self) -> Option<&TimeWindow> {
        self.when.as_ref()
    }

    /// When the destination's grant ends, if it does.
    pub fn expires(&self) -> Option<jiff::Timestamp> {
        self.expires
    }

    /// The destination's own rate limit, with its bucket key.
    pub fn rate(&self) -> Option<(&RateKey, RateLimit)> {
        self.rate.as_ref().map(|(k, l)| (k, *l))
    }

    /// The rate limits that apply to a request that rule `rule` (an index into
    /// [`rules`](Self::rules)) allowed: the destination's, then the rule's.
    pub fn rate_limits(
        &self,
        rule: usize,
    ) -> impl Iterator<Item = (&RateKey, RateLimit)> + Clone + '_ {
        let rule = self.rules.get(rule).and_then(|r| r.rate.as_ref());
        self.rate
            .as_ref()
            .into_iter()
            .chain(rule)
            .map(|(k, l)| (k, *l))
    }

    /// Whether a rule that could allow `method` on `path` inspects the body, so that the
    /// caller must buffer and parse it ([`parse_json_body`](super::parse_json_body)).
    pub fn needs_body(&self, method: &str, path: &CanonicalPath) -> bool {
        let mut needed = false;
        self.routes.for_each_match(path.path(), &mut |i| {
            let rule = &self.rules[i];
            needed |= rule.needs_body() && rule.allows_method(method);
        });
        needed
    }

    /// `host:port`, with IPv6 addresses in brackets.
    pub fn label(&self) -> String {
        match self.host {
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }

    /// Builds the rate-limit bucket keys, once the workload name is known.
    fn key_rate_limits(&mut self, workload: &str) {
        let workload: Arc<str> = workload.into();
        let label: Arc<str> = self.label().into();
        if let Some((key, _)) = &mut self.rate {
            *key = RateKey::new(Arc::clone(&workload), Arc::clone(&label), None, "*");
        }
        for rule in &mut self.rules {
            let (id, route) = (Arc::clone(&rule.id), rule.path.as_str());
            if let Some((key, _)) = &mut rule.rate {
                *key = RateKey::new(Arc::clone(&workload), Arc::clone(&label), Some(id), route);
            }
        }
    }
}

/// What destination binding needs of a destination: its host and `allow_internal`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The host, as policy names it.
    pub host: Host,
    /// Which internal addresses a name may be bound to.
    pub allow_internal: AllowInternal,
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

/// One L7 rule: a request passes if every matcher holds.
#[derive(Debug)]
pub struct Rule {
    id: Arc<str>,
    methods: Box<[Box<str>]>,
    path: PathPattern,
    query: Option<QueryRules>,
    headers: Option<HeaderRules>,
    json: Vec<JsonRule>,
    when: Option<TimeWindow>,
    expires: Option<jiff::Timestamp>,
    rate: Option<(RateKey, RateLimit)>,
    credential: Option<Credential>,
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

    /// The query constraints; `None`: any query.
    pub fn query(&self) -> Option<&QueryRules> {
        self.query.as_ref()
    }

    /// The header constraints.
    pub fn headers(&self) -> Option<&HeaderRules> {
        self.headers.as_ref()
    }

    /// The JSON body constraints.
    pub fn json(&self) -> &[JsonRule] {
        &self.json
    }

    /// Whether the rule inspects the body (has `json` constraints).
    pub fn needs_body(&self) -> bool {
        !self.json.is_empty()
    }

    /// The rule's own time window.
    pub fn when(&self) -> Option<&TimeWindow> {
        self.when.as_ref()
    }

    /// When the rule's grant ends, if it does.
    pub fn expires(&self) -> Option<jiff::Timestamp> {
        self.expires
    }

    /// The rule's own rate limit, with its bucket key.
    pub fn rate(&self) -> Option<(&RateKey, RateLimit)> {
        self.rate.as_ref().map(|(k, l)| (k, *l))
    }
}

/// A compiled path pattern such as `/v1/customers/{id:[0-9]+}` or `/files/**`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<PatternSegment>,
    trailing_slash: bool,
}

/// One segment of a [`PathPattern`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PatternSegment {
    /// Matches exactly this canonical segment (case-sensitive).
    Literal(String),
    /// `{name}`: matches exactly one (non-empty) segment.
    Param(String),
    /// `{name:REGEX}`: matches one segment that the whole regex matches (the canonical,
    /// still percent-encoded, segment).
    Constrained {
        /// The parameter name.
        name: String,
        /// The anchored regex.
        pattern: Pattern,
    },
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

    /// Whether the pattern ends with `/` after a segment (`/a/`): it then matches only
    /// paths with the trailing slash. A trailing `**` matches with and without one.
    pub fn has_trailing_slash(&self) -> bool {
        self.trailing_slash
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
        let uid = raw.select.uid.and_then(|value| {
            let uid = u32::try_from(value).ok().filter(|u| *u != u32::MAX);
            if uid.is_none() {
                errors.push(invalid!(InvalidUid {
                    path: "select.uid".to_owned(),
                    value,
                }));
            }
            uid
        });
        let selector = Selector::try_from(raw.select)
            .map_err(|e| errors.push(e.nested("select")))
            .ok();
        let body_cap = match &raw.body_cap {
            None => DEFAULT_BODY_CAP,
            Some(raw::Scalar(text)) => parse_size(text).unwrap_or_else(|reason| {
                errors.push(invalid!(InvalidBodyCap {
                    path: "body_cap".to_owned(),
                    value: text.clone(),
                    reason,
                }));
                DEFAULT_BODY_CAP
            }),
        };

        let max_connections = match raw.max_connections {
            None => DEFAULT_MAX_CONNECTIONS,
            Some(n) => match usize::try_from(n) {
                Ok(n) if (1..=1_000_000).contains(&n) => n,
                _ => {
                    errors.push(invalid!(InvalidMaxConnections {
                        path: "max_connections".to_owned(),
                        value: n,
                    }));
                    DEFAULT_MAX_CONNECTIONS
                }
            },
        };

        // Split the egress list into HTTP destinations and L4 exceptions, keeping each
        // entry's index for error positions.
        let mut http = Vec::new();
        let mut l4 = Vec::new();
        for (d, entry) in raw.egress.into_iter().enumerate() {
            match split_egress(entry) {
                Ok(EgressKind::Http(dest)) => http.push((d, dest)),
                Ok(EgressKind::L4(x)) => l4.push(x),
                Err(errs) => {
                    let prefix = format!("egress[{d}]");
                    errors.extend(errs.into_iter().map(|e| e.nested(&prefix)));
                }
            }
        }
        let dns = super::dns::parse(raw.dns, &mut errors);

        // Duplicates are found on the raw values so that they are reported even when the
        // destination or rule has other problems.
        let mut rule_ids: HashMap<&str, String> = HashMap::new();
        let mut hosts: HashMap<(Host, i64), String> = HashMap::new();
        for (d, dest) in http.iter().map(|(d, dest)| (*d, dest)) {
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

        let mut destinations = Vec::with_capacity(http.len());
        for (d, dest) in http {
            match Destination::try_from(*dest) {
                Ok(dest) => destinations.push(dest),
                Err(errs) => {
                    let prefix = format!("egress[{d}]");
                    errors.extend(errs.into_iter().map(|e| e.nested(&prefix)));
                }
            }
        }

        match selector {
            Some(selector) if errors.is_empty() => {
                for dest in &mut destinations {
                    dest.key_rate_limits(&raw.workload);
                }
                Ok(Workload {
                    name: raw.workload,
                    selector,
                    uid,
                    source: PathBuf::new(),
                    destinations,
                    l4,
                    dns,
                    mode: match raw.mode {
                        Some(raw::Mode::Audit) => Mode::Audit,
                        Some(raw::Mode::Enforce) | None => Mode::Enforce,
                    },
                    body_cap,
                    max_connections,
                })
            }
            _ => Err(errors),
        }
    }
}

enum EgressKind {
    Http(Box<raw::Destination>),
    L4(L4Exception),
}

/// Decides whether an `egress` entry is an HTTP destination or an L4 exception, and
/// validates the L4 kind.
fn split_egress(raw: raw::Egress) -> Result<EgressKind, Vec<PolicyError>> {
    let bad = |path: &str, value: String, reason: &'static str| {
        invalid!(InvalidEgress {
            path: path.to_owned(),
            value,
            reason,
        })
    };
    match raw.cidr {
        None => {
            let mut errors = Vec::new();
            if raw.ports.is_some() || raw.protocol.is_some() {
                errors.push(bad(
                    "ports",
                    String::new(),
                    "`ports` and `protocol` belong to an L4 exception (`cidr`), not to an HTTP destination",
                ));
            }
            let Some(host) = raw.host else {
                errors.push(bad(
                    "",
                    String::new(),
                    "an egress entry needs `host` (HTTP) or `cidr` (L4)",
                ));
                return Err(errors);
            };
            let Some(port) = raw.port else {
                errors.push(bad("host", host, "an HTTP destination needs `port`"));
                return Err(errors);
            };
            let passthrough = raw.tls.as_deref() == Some("passthrough");
            let rules = match raw.rules {
                Some(rules) => rules,
                None if passthrough => Vec::new(),
                None => {
                    errors.push(bad("host", host, "an HTTP destination needs `rules`"));
                    return Err(errors);
                }
            };
            if !errors.is_empty() {
                return Err(errors);
            }
            Ok(EgressKind::Http(Box::new(raw::Destination {
                host,
                port,
                path_params: raw.path_params,
                allow_underscore_headers: raw.allow_underscore_headers,
                allow_internal: raw.allow_internal,
                rate: raw.rate,
                when: raw.when,
                expires: raw.expires,
                rules,
                tls: raw.tls,
                upstream_tls: raw.upstream_tls,
                credential: raw.credential,
            })))
        }
        Some(cidr) => {
            let mut errors = Vec::new();
            if raw.host.is_some()
                || raw.port.is_some()
                || raw.rules.is_some()
                || raw.rate.is_some()
                || raw.when.is_some()
                || raw.expires.is_some()
                || raw.path_params
                || raw.allow_underscore_headers
                || raw.allow_internal.is_some()
                || raw.tls.is_some()
                || raw.upstream_tls.is_some()
                || raw.credential.is_some()
            {
                errors.push(bad(
                    "cidr",
                    cidr.clone(),
                    "an L4 exception has only `cidr`, `ports` and `protocol`; HTTP fields (`host`, `port`, `rules`, …) do not apply",
                ));
            }
            let net = parse_cidr(&cidr)
                .map_err(|reason| errors.push(bad("cidr", cidr.clone(), reason)))
                .ok();
            let protocol = match raw.protocol.as_deref() {
                None | Some("tcp") => L4Protocol::Tcp,
                Some("udp") => L4Protocol::Udp,
                Some(other) => {
                    errors.push(bad("protocol", other.to_owned(), "expected `tcp` or `udp`"));
                    L4Protocol::Tcp
                }
            };
            let mut ports = Vec::new();
            match raw.ports {
                None => errors.push(bad("cidr", cidr.clone(), "an L4 exception needs `ports`")),
                Some(list) if list.is_empty() || list.len() > MAX_L4_PORTS => errors.push(bad(
                    "ports",
                    format!("{list:?}"),
                    "list 1 to 8 ports (use several entries for more)",
                )),
                Some(list) => {
                    for (i, p) in list.into_iter().enumerate() {
                        match u16::try_from(p).ok().filter(|p| *p != 0) {
                            Some(p) => ports.push(p),
                            None => errors.push(invalid!(InvalidPort {
                                path: format!("ports[{i}]"),
                                value: p,
                            })),
                        }
                    }
                }
            }
            match net {
                Some((addr, prefix)) if errors.is_empty() => Ok(EgressKind::L4(L4Exception {
                    addr,
                    prefix,
                    ports,
                    protocol,
                })),
                _ => Err(errors),
            }
        }
    }
}

/// `credential:`; errors are (field, value, reason).
fn parse_credential(
    raw: raw::Credential,
) -> Result<Credential, (&'static str, String, &'static str)> {
    let header = http::HeaderName::from_bytes(raw.header.as_bytes())
        .map_err(|_| ("header", raw.header.clone(), "not a valid header name"))?;
    let format = raw.format.unwrap_or_else(|| "{secret}".to_owned());
    let (prefix, suffix) =
        format
            .split_once("{secret}")
            .ok_or(("format", format.clone(), "must contain {secret}"))?;
    if suffix.contains("{secret}") {
        return Err((
            "format",
            format.clone(),
            "must contain {secret} exactly once",
        ));
    }
    if format.contains(['\r', '\n']) {
        return Err(("format", format.clone(), "must not contain CR or LF"));
    }
    let source = match (raw.secret_file, raw.systemd_credential) {
        (Some(file), None) => {
            let path = PathBuf::from(&file);
            if !path.is_absolute() {
                return Err(("secret_file", file, "must be an absolute path"));
            }
            // Whether it can be read is checked by the loader (`LoadOptions::secrets`).
            SecretSource::File(path)
        }
        (None, Some(name)) => {
            if name.is_empty() || name.contains('/') {
                return Err((
                    "systemd_credential",
                    name,
                    "must be a credential name without '/'",
                ));
            }
            SecretSource::Systemd(name)
        }
        _ => {
            return Err((
                "secret_file",
                String::new(),
                "give exactly one of `secret_file` and `systemd_credential`",
            ));
        }
    };
    Ok(Credential {
        header,
        prefix: prefix.to_owned(),
        suffix: suffix.to_owned(),
        source,
    })
}

/// `a.b.c.d/n` or `x::y/n`; host bits must be zero.
fn parse_cidr(text: &str) -> Result<(IpAddr, u8), &'static str> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or("expected ADDRESS/PREFIX, e.g. 192.0.2.10/32")?;
    let addr: IpAddr = addr.parse().map_err(|_| "not an IP address")?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| "the prefix length is not a number")?;
    let (host_bits_clear, max) = match addr {
        IpAddr::V4(a) => {
            let v = u32::from(a);
            (prefix >= 32 || v & (u32::MAX >> prefix) == 0, 32)
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            (prefix >= 128 || v & (u128::MAX >> prefix) == 0, 128)
        }
    };
    if prefix > max {
        return Err("the prefix length is longer than the address");
    }
    if !host_bits_clear {
        return Err("host bits are set; write the network address");
    }
    Ok((addr, prefix))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod l4_tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("192.0.2.10/32"),
            Ok(("192.0.2.10".parse().unwrap(), 32))
        );
        assert_eq!(
            parse_cidr("192.0.2.0/24"),
            Ok(("192.0.2.0".parse().unwrap(), 24))
        );
        assert_eq!(parse_cidr("0.0.0.0/0"), Ok(("0.0.0.0".parse().unwrap(), 0)));
        assert_eq!(
            parse_cidr("2001:db8::/32"),
            Ok(("2001:db8::".parse().unwrap(), 32))
        );
        for bad in [
            "192.0.2.1/24",
            "192.0.2.0/33",
            "192.0.2.0",
            "nope/8",
            "::1/129",
            "1.2.3.4/x",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }
}

impl TryFrom<raw::Select> for Selector {
    type Error = PolicyError;

    fn try_from(raw: raw::Select) -> Result<Self, Self::Error> {
        match (raw.cgroup, raw.systemd_unit) {
            (Some(path), None) => cgroup_selector(&path).map_err(|reason| {
                invalid!(InvalidCgroup {
                    path: "cgroup".to_owned(),
                    value: path,
                    reason,
                })
            }),
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
        let rate = parse_rate(raw.rate, &mut errors);
        let when = parse_when(raw.when, &mut errors);
        let expires = parse_expires(raw.expires, &mut errors);
        let bad = |path: &str, value: String, reason: &'static str| {
            invalid!(InvalidEgress {
                path: path.to_owned(),
                value,
                reason,
            })
        };
        let tls = match raw.tls.as_deref() {
            None | Some("none") => TlsMode::None,
            Some("passthrough") => TlsMode::Passthrough,
            Some("intercept") => TlsMode::Intercept,
            Some(other) => {
                errors.push(bad(
                    "tls",
                    other.to_owned(),
                    "expected `none`, `passthrough` or `intercept`",
                ));
                TlsMode::None
            }
        };
        let upstream_tls = raw.upstream_tls.unwrap_or(tls == TlsMode::Intercept);
        if tls != TlsMode::None && matches!(host, Some(Host::Ip(_))) {
            errors.push(bad(
                "tls",
                raw.host.clone(),
                "TLS destinations are matched by SNI, which is a DNS name: `host` must be a name",
            ));
        }
        if tls == TlsMode::Passthrough && !raw.rules.is_empty() {
            errors.push(bad(
                "rules",
                raw.host.clone(),
                "`tls: passthrough` cannot inspect requests; remove `rules` or use `tls: intercept`",
            ));
        }
        if tls == TlsMode::Passthrough && raw.upstream_tls == Some(true) {
            errors.push(bad(
                "upstream_tls",
                raw.host.clone(),
                "passthrough splices the workload's own TLS",
            ));
        }
        if raw.rules.is_empty() && tls != TlsMode::Passthrough {
            errors.push(invalid!(NoRules {
                path: "rules".to_owned(),
            }));
        }
        let allow_internal =
            parse_allow_internal(raw.allow_internal, &host, &raw.host, &mut errors);
        let loopback = matches!(host, Some(Host::Ip(ip)) if ip.is_loopback());
        let credential_for = |raw: Option<raw::Credential>,
                              path: &str,
                              errors: &mut Vec<PolicyError>| {
            let raw = raw?;
            if tls == TlsMode::Passthrough {
                errors.push(bad(
                    path,
                    raw.header.clone(),
                    "a credential cannot be injected into passthrough TLS",
                ));
                return None;
            }
            if !upstream_tls && !loopback {
                errors.push(bad(
                    path,
                    raw.header.clone(),
                    "the credential would travel in cleartext: set `upstream_tls: true` (or name a loopback IP as host)",
                ));
                return None;
            }
            match parse_credential(raw) {
                Ok(c) => Some(c),
                Err((field, value, reason)) => {
                    errors.push(bad(&format!("{path}.{field}"), value, reason));
                    None
                }
            }
        };
        let credential = credential_for(raw.credential, "credential", &mut errors);
        let mut rule_credentials = Vec::with_capacity(raw.rules.len());
        let mut raw_rules = raw.rules;
        for (r, rule) in raw_rules.iter_mut().enumerate() {
            rule_credentials.push(credential_for(
                rule.credential.take(),
                &format!("rules[{r}].credential"),
                &mut errors,
            ));
        }
        let mut rules = Vec::with_capacity(raw_rules.len());
        let injected: Vec<http::HeaderName> = credential
            .iter()
            .chain(rule_credentials.iter().flatten())
            .map(|c| c.header.clone())
            .collect();
        for ((r, rule), credential) in raw_rules.into_iter().enumerate().zip(rule_credentials) {
            match Rule::build(rule, raw.path_params) {
                Ok(mut rule) => {
                    // The decision never sees the injected header (it is added after the
                    // decision), so a rule may not constrain it.
                    if let Some(name) = rule
                        .headers()
                        .and_then(|h| h.headers().find(|(n, _)| injected.iter().any(|i| i == n)))
                        .map(|(n, _)| n.to_owned())
                    {
                        errors.push(bad(
                            &format!("rules[{r}].headers.{name}"),
                            name,
                            "a credential is injected into this header; the workload's own value is replaced, so a rule cannot constrain it",
                        ));
                    }
                    rule.credential = credential;
                    rules.push(rule)
                }
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
                    path_params: raw.path_params,
                    underscore_headers: raw.allow_underscore_headers,
                    allow_internal,
                    when,
                    expires,
                    rate,
                    tls,
                    upstream_tls,
                    credential,
                })
            }
            _ => Err(errors),
        }
    }
}

/// `allow_internal:` on a destination whose host is `host` (None if invalid).
fn parse_allow_internal(
    raw: Option<raw::AllowInternal>,
    host: &Option<Host>,
    written: &str,
    errors: &mut Vec<PolicyError>,
) -> AllowInternal {
    let bad = |path: String, value: String, reason: &'static str| {
        invalid!(InvalidEgress {
            path,
            value,
            reason,
        })
    };
    let Some(raw) = raw else {
        return AllowInternal::No;
    };
    if matches!(host, Some(Host::Ip(_))) {
        errors.push(bad(
            "allow_internal".to_owned(),
            written.to_owned(),
            "an IP-literal destination is bound to exactly its address, whatever its class; \
             `allow_internal` applies to DNS names only",
        ));
        return AllowInternal::No;
    }
    match raw {
        raw::AllowInternal::Flag(false) => AllowInternal::No,
        raw::AllowInternal::Flag(true) => AllowInternal::All,
        raw::AllowInternal::Ranges(list) if list.is_empty() => {
            errors.push(bad(
                "allow_internal".to_owned(),
                "[]".to_owned(),
                "an empty list allows nothing; omit `allow_internal` (or write `false`)",
            ));
            AllowInternal::No
        }
        raw::AllowInternal::Ranges(list) => {
            let mut ranges = Vec::with_capacity(list.len());
            for (i, text) in list.into_iter().enumerate() {
                match parse_cidr(&text) {
                    Ok((addr, prefix)) => ranges.push(Cidr::new(addr, prefix)),
                    Err(reason) => errors.push(bad(format!("allow_internal[{i}]"), text, reason)),
                }
            }
            AllowInternal::Ranges(ranges)
        }
    }
}

/// `rate:`, with a placeholder key until the workload is known.
fn parse_rate(raw: Option<String>, errors: &mut Vec<PolicyError>) -> Option<(RateKey, RateLimit)> {
    let text = raw?;
    match RateLimit::parse(&text) {
        Ok(limit) => Some((RateKey::new("", "", None, ""), limit)),
        Err(reason) => {
            errors.push(invalid!(InvalidRate {
                path: "rate".to_owned(),
                value: text,
                reason,
            }));
            None
        }
    }
}

/// `expires:` — an RFC 3339 time with an offset or `Z`.
fn parse_expires(raw: Option<String>, errors: &mut Vec<PolicyError>) -> Option<jiff::Timestamp> {
    let text = raw?;
    match text.parse::<jiff::Timestamp>() {
        Ok(t) => Some(t),
        Err(e) => {
            errors.push(invalid!(InvalidMatcher {
                path: "expires".to_owned(),
                reason: format!(
                    "{text:?} is not an RFC 3339 time with an offset or Z, e.g. \
                     2027-01-31T00:00:00Z ({e})"
                ),
            }));
            None
        }
    }
}

fn parse_when(raw: Option<raw::When>, errors: &mut Vec<PolicyError>) -> Option<TimeWindow> {
    match TimeWindow::try_from(raw?) {
        Ok(w) => Some(w),
        Err(errs) => {
            errors.extend(errs.into_iter().map(|e| e.nested("when")));
            None
        }
    }
}

impl Rule {
    /// Validates one rule; `path_params` is the destination's opt-in for `;`.
    fn build(raw: raw::Rule, path_params: bool) -> Result<Self, Vec<PolicyError>> {
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
            } else if m == "CONNECT" {
                Some(
                    "cannot be granted: CONNECT opens a tunnel that no rule can inspect \
                     (the proxy answers it with 405)",
                )
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
        let options = NormalizeOptions {
            allow_semicolon: path_params,
        };
        let path = PathPattern::parse(raw.path, options)
            .map_err(|e| errors.push(e.nested("path")))
            .ok();
        let query = matchers::query_rules(raw.query, raw.query_repeat, &mut errors);
        let headers = matchers::header_rules(raw.headers, &mut errors);
        let json = matchers::json_rules(raw.json, &mut errors);
        let when = parse_when(raw.when, &mut errors);
        let expires = parse_expires(raw.expires, &mut errors);
        let rate = parse_rate(raw.rate, &mut errors);
        match path {
            Some(path) if errors.is_empty() => Ok(Rule {
                id: raw.id.into(),
                methods: raw
                    .methods
                    .into_iter()
                    .map(String::into_boxed_str)
                    .collect(),
                path,
                query,
                headers,
                json,
                when,
                expires,
                rate,
                credential: None,
            }),
            _ => Err(errors),
        }
    }
}

impl TryFrom<String> for PathPattern {
    type Error = PolicyError;

    /// Parses a pattern for a destination without `path_params`.
    fn try_from(source: String) -> Result<Self, Self::Error> {
        PathPattern::parse(source, NormalizeOptions::default())
    }
}

/// Splits the part of a pattern after the leading '/' into segments; a segment that
/// starts with '{' runs to its matching '}' (so a regex may contain '/' and braces).
fn split_pattern(rest: &str) -> Result<Vec<&str>, String> {
    let bytes = rest.as_bytes();
    let mut segments = Vec::new();
    let mut start = 0;
    while start <= bytes.len() {
        let end = if bytes.get(start) == Some(&b'{') {
            let mut depth = 0usize;
            let mut i = start;
            let mut close = None;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 1,
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            close = Some(i);
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            let close = close.ok_or_else(|| {
                format!(
                    "segment {:?}: unbalanced '{{' (escape braces in a regex as \\{{)",
                    &rest[start..]
                )
            })?;
            match bytes.get(close + 1) {
                None | Some(b'/') => close + 1,
                Some(_) => {
                    let tail = rest[close + 1..].split('/').next().unwrap_or_default();
                    return Err(format!(
                        "segment {:?}: a parameter spans a whole segment",
                        &rest[start..close + 1 + tail.len()]
                    ));
                }
            }
        } else {
            rest[start..].find('/').map_or(bytes.len(), |i| start + i)
        };
        segments.push(&rest[start..end]);
        start = end + 1;
    }
    Ok(segments)
}

impl PathPattern {
    /// Parses a pattern. Literal segments must already be canonical: a literal that
    /// request normalisation (with `options`) would change could never match as written.
    #[allow(
        clippy::result_large_err,
        reason = "built once per policy load, like the TryFrom impls"
    )]
    pub(crate) fn parse(source: String, options: NormalizeOptions) -> Result<Self, PolicyError> {
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
        let raw_segments: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            split_pattern(rest).map_err(fail)?
        };
        let last = raw_segments.len().saturating_sub(1);
        let mut segments = Vec::with_capacity(raw_segments.len());
        // The canonical spelling, in case some literal is not canonical.
        let mut canonical = String::new();
        let mut changed = false;
        let mut names: Vec<&str> = Vec::new();
        let mut trailing_slash = false;
        for (i, seg) in raw_segments.iter().copied().enumerate() {
            if seg.is_empty() {
                if i == last {
                    trailing_slash = true; // `/a/`: part of the path, as in requests
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
                let inner = seg
                    .strip_prefix('{')
                    .and_then(|s| s.strip_suffix('}'))
                    .unwrap_or_default();
                let (name, regex) = match inner.split_once(':') {
                    Some((name, regex)) => (name, Some(regex)),
                    None => (inner, None),
                };
                if !is_param_name(name) {
                    return Err(fail(format!(
                        "segment {seg:?}: a parameter is written {{name}} or {{name:REGEX}}, \
                         with a name of [A-Za-z_][A-Za-z0-9_]*, and spans a whole segment"
                    )));
                }
                if names.contains(&name) {
                    return Err(fail(format!("parameter {{{name}}} appears twice")));
                }
                names.push(name);
                match regex {
                    None => PatternSegment::Param(name.to_owned()),
                    Some(regex) => {
                        let pattern = Pattern::new(regex).map_err(|e| {
                            fail(format!(
                                "parameter {{{name}}}: {regex:?} is not a valid regular \
                                 expression: {e}"
                            ))
                        })?;
                        PatternSegment::Constrained {
                            name: name.to_owned(),
                            pattern,
                        }
                    }
                }
            } else if seg.contains(['*', '{', '}']) {
                return Err(fail(format!(
                    "segment {seg:?}: '*', '{{' and '}}' are only allowed in '**', '{{name}}' \
                     and '{{name:REGEX}}' segments"
                )));
            } else {
                if seg.contains(['?', '#']) {
                    return Err(fail(if seg.contains('?') {
                        "a query ('?') is not part of the path".to_owned()
                    } else {
                        "a fragment ('#') is not allowed".to_owned()
                    }));
                }
                // Normalised below a dummy parent, so that a '..' shows as a dot-segment
                // rather than as climbing above the root.
                let normal =
                    canonical::normalize_with(&format!("/x/{seg}"), options).map_err(|e| {
                        let hint = if seg.contains(';') && !options.allow_semicolon {
                            " (set `path_params: true` on the destination to allow them)"
                        } else {
                            ""
                        };
                        fail(format!("segment {seg:?}: {}{hint}", e.problem()))
                    })?;
                let Some(literal) = normal
                    .path()
                    .strip_prefix("/x/")
                    .filter(|l| !l.is_empty() && !l.contains('/'))
                else {
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
            if canonical.is_empty() || trailing_slash {
                canonical.push('/');
            }
            return Err(invalid!(NonCanonicalPath {
                path: String::new(),
                value: source,
                canonical,
            }));
        }
        if trailing_slash && matches!(segments.last(), Some(PatternSegment::Tail)) {
            return Err(fail(
                "'**' is allowed only as the last segment (it already matches a trailing '/')"
                    .to_owned(),
            ));
        }
        Ok(PathPattern {
            source,
            segments,
            trailing_slash,
        })
    }
}

/// `body_cap`: bytes, or a number with `KiB` or `MiB`.
fn parse_size(s: &str) -> Result<usize, &'static str> {
    const EXPECTED: &str = "expected a number of bytes, optionally with KiB or MiB, e.g. 64KiB";
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, ""),
    };
    let shift = match unit.trim_start() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        _ => return Err(EXPECTED),
    };
    let n: usize = digits.parse().map_err(|_| EXPECTED)?;
    let bytes = n
        .checked_mul(1 << shift)
        .filter(|b| *b <= MAX_BODY_CAP)
        .ok_or("must be at most 64MiB")?;
    if bytes == 0 {
        return Err("must be at least 1 byte");
    }
    Ok(bytes)
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
pub(crate) fn is_uppercase_method(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

/// Validates `select.cgroup`: an exact path, or a glob if it contains `*`.
pub(crate) fn cgroup_selector(p: &str) -> Result<Selector, &'static str> {
    if !p.starts_with('/') {
        Err("must be an absolute path starting with '/'")
    } else if p == "/" {
        Err("the root cgroup cannot be a workload")
    } else if p.ends_with('/') {
        Err("must not end with '/'")
    } else if p.contains("//") {
        Err("must not contain empty segments ('//')")
    } else if p.split('/').any(|s| s == "." || s == "..") {
        Err("must not contain '.' or '..' segments")
    } else if p.chars().any(char::is_control) {
        Err("must not contain control characters")
    } else if p.contains(['?', '[', ']', '{', '}']) {
        Err("only '*' and '**' globs are supported")
    } else if !p.contains('*') {
        Ok(Selector::Cgroup(p.to_owned()))
    } else if p.split('/').any(|c| c.contains("**") && c != "**") {
        Err("'**' must be a whole path component")
    } else if !p.bytes().any(|b| b != b'/' && b != b'*') {
        Err("a glob needs at least one literal character (it would select every cgroup)")
    } else {
        Ok(Selector::CgroupGlob(p.to_owned()))
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
pub(crate) fn parse_host(s: &str) -> Result<Host, &'static str> {
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
    if !s.is_ascii() {
        return Err(
            "a DNS name is ASCII: write an internationalised name in its IDNA punycode form \
             (labels starting with `xn--`, e.g. xn--mnchen-3ya.de for münchen.de)",
        );
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
        if !valid_idna_label(label) {
            return Err(
                "an `xn--` label is IDNA punycode, and this one does not decode to a valid \
                 internationalised label (or is not its canonical encoding)",
            );
        }
    }
    if name.rsplit('.').next().is_some_and(is_numeric_label) {
        return Err(
            "the last label of a DNS name is never numeric, and resolvers (inet_aton) read \
             this name as an IPv4 address (as in 127.1, 0x7f.0x1, 2130706433, 017700000001); \
             write an IP literal in dotted-decimal form instead",
        );
    }
    Ok(Host::Name(name))
}

/// Whether a lowercase ASCII DNS label is acceptable as IDNA: a label that does not start
/// with `xn--` is (it is plain LDH); an `xn--` label must decode as punycode to a valid
/// UTS 46 label that encodes back to exactly this label (the idna crate), so that the
/// name a policy, a Host and a resolver see is one name.
pub(crate) fn valid_idna_label(label: &str) -> bool {
    if !label.starts_with("xn--") {
        return true;
    }
    let (unicode, checked) = idna::domain_to_unicode(label);
    checked.is_ok()
        && !unicode.is_ascii()
        && idna::domain_to_ascii(&unicode).is_ok_and(|ascii| ascii == label)
}

/// Whether a DNS label reads as a number to inet_aton: all decimal (or octal) digits, or
/// `0x` followed by hex digits.
fn is_numeric_label(label: &str) -> bool {
    let hex = label
        .strip_prefix("0x")
        .or_else(|| label.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.bytes().all(|b| b.is_ascii_hexdigit()),
        None => !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit()),
    }
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
    fn numeric_looking_names_are_refused() {
        // Every form inet_aton (and so getaddrinfo, curl, Python, Go's cgo resolver) reads
        // as an IPv4 address.
        for input in [
            "0x7f.0x21",
            "0x7f000001",
            "0X7F000001",
            "2130706433",
            "017700000001",
            "127.1",
            "127.0.1",
            "10.1",
            "0xa9fea9fe",
            "0xa9.0xfe.0xa9.0xfe",
            "0251.0376.0251.0376",
            "169.254.43518",
            "0x7f.1",
            "a.0x1f",
            "example.123",
            "0x",
        ] {
            let err = parse_host(input).expect_err(input);
            assert!(err.contains("inet_aton"), "{input}: {err}");
        }
        // Numeric labels elsewhere are fine, and so are hex-looking words.
        for ok in [
            "1.2.3.4.nip.io",
            "0x7f.example.com",
            "123.example",
            "0xg",
            "x0x1",
            "deadbeef",
            "a1",
            "xn--mnchen-3ya.de",
        ] {
            assert!(parse_host(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn invalid_dns_names_are_refused() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        for (input, needle) in [
            ("münchen.de", "punycode"),
            ("例え.jp", "xn--"),
            ("a_b.example", "letters, digits and '-'"),
            ("-a.example", "start or end with '-'"),
            ("a-.example", "start or end with '-'"),
            ("xn--.example", "start or end with '-'"),
            // `xn--` labels that are not valid punycode, or decode to no valid label.
            ("xn--a.example", "IDNA punycode"),
            ("xn--zzzzzzzzzzzzzzzzzzzz.example", "IDNA punycode"),
            ("api.xn--99999999", "IDNA punycode"),
            ("xn--0.example", "IDNA punycode"),
            (long_label.as_str(), "63"),
            (long_name.as_str(), "253"),
            ("a..b", "empty labels"),
        ] {
            let err = parse_host(input).expect_err(input);
            assert!(err.contains(needle), "{input}: {err}");
        }
        let max = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61));
        assert_eq!(max.len(), 253);
        assert!(parse_host(&max).is_ok());
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
        // Only canonical dotted-decimal IPv4: none of the forms inet_aton would accept.
        let lo = Host::Ip(IpAddr::from([127, 0, 0, 1]));
        assert!(lo.matches_authority("127.0.0.1"));
        for spelling in [
            "0x7f.0x1",
            "0x7f.0.0.1",
            "0x7f000001",
            "2130706433",
            "017700000001",
            "0177.0.0.1",
            "127.1",
            "127.0.1",
            "127.000.000.001",
            "127.0.0.1.",
            " 127.0.0.1",
            "127.0.0.1 ",
        ] {
            assert!(!lo.matches_authority(spelling), "{spelling}");
        }
        let meta = Host::Ip(IpAddr::from([169, 254, 169, 254]));
        for spelling in [
            "0xa9fea9fe",
            "2852039166",
            "0251.0376.0251.0376",
            "169.254.43518",
        ] {
            assert!(!meta.matches_authority(spelling), "{spelling}");
        }
    }

    #[test]
    fn selectors() {
        for ok in ["/system.slice/a.service", "/a", "/user.slice/x\\x2dy.scope"] {
            assert_eq!(
                cgroup_selector(ok),
                Ok(Selector::Cgroup(ok.to_owned())),
                "{ok}"
            );
        }
        for ok in [
            "/a/*",
            "/system.slice/app-*.service",
            "/user.slice/**/x.scope",
            "/a/**",
        ] {
            assert_eq!(
                cgroup_selector(ok),
                Ok(Selector::CgroupGlob(ok.to_owned())),
                "{ok}"
            );
        }
        for bad in [
            "a", "/", "/a/", "//a", "/a/../b", "/a/./b", "/a\n", "/a/?", "/a/[ab]", "/a/***",
            "/a/b**", "/**", "/*/*", "/*/**",
        ] {
            assert!(cgroup_selector(bad).is_err(), "{bad:?}");
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
    fn cgroup_path_matching() {
        let glob = |g: &str| Selector::CgroupGlob(g.to_owned());
        #[rustfmt::skip]
        let cases: &[(Selector, &str, bool)] = &[
            (Selector::Cgroup("/system.slice/a.service".into()), "/system.slice/a.service", true),
            (Selector::Cgroup("/system.slice/a.service".into()), "/system.slice/a.service/x", false),
            (Selector::Cgroup("/system.slice/a.service".into()), "/system.slice/b.service", false),
            (Selector::SystemdUnit("a.service".into()), "/system.slice/a.service", true),
            (Selector::SystemdUnit("a.service".into()), "/user.slice/u.slice/a.service", true),
            (Selector::SystemdUnit("a.service".into()), "/system.slice/xa.service", false),
            (glob("/system.slice/app-*.service"), "/system.slice/app-1.service", true),
            (glob("/system.slice/app-*.service"), "/system.slice/app-.service", true),
            (glob("/system.slice/app-*.service"), "/system.slice/app-1/x.service", false),
            (glob("/system.slice/app-*.service"), "/system.slice/app-1.service/child", false),
            (glob("/system.slice/app-*.service"), "/system.slice/web.service", false),
            (glob("/a/*"), "/a/b", true),
            (glob("/a/*"), "/a", false),
            (glob("/a/*"), "/a/b/c", false),
            (glob("/a/*/c"), "/a/b/c", true),
            (glob("/a/*/c"), "/a/b/x/c", false),
            (glob("/a/**/c"), "/a/c", true),
            (glob("/a/**/c"), "/a/b/c", true),
            (glob("/a/**/c"), "/a/b/x/c", true),
            (glob("/a/**/c"), "/a/b/x/d", false),
            (glob("/a/**"), "/a", true),
            (glob("/a/**"), "/a/b/c", true),
            (glob("/a/**"), "/ab", false),
            (glob("/**/build.scope"), "/user.slice/u-1.slice/build.scope", true),
            (glob("/**/build.scope"), "/build.scope", true),
            (glob("/**/build.scope"), "/user.slice/build.scopex", false),
            (glob("/a/*x*y"), "/a/1x2x3y", true),
            (glob("/a/*x*y"), "/a/1x2x3", false),
            (glob("/a/b*"), "a/b", false),
        ];
        for (selector, path, expected) in cases {
            assert_eq!(
                selector.matches_cgroup_path(path),
                *expected,
                "{selector:?} {path}"
            );
        }
    }

    #[test]
    fn sizes() {
        for (s, n) in [
            ("1", 1),
            ("65536", 65536),
            ("64KiB", 65536),
            ("1MiB", 1 << 20),
            ("64MiB", 64 << 20),
            ("10 KiB", 10240),
            ("5B", 5),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for bad in [
            "",
            "0",
            "0KiB",
            "65MiB",
            "1GiB",
            "1kb",
            "KiB",
            "-1",
            "1.5MiB",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
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
        use PatternSegment::{Constrained, Literal, Param, Tail};
        let lit = |s: &str| Literal(s.to_owned());
        let re = |name: &str, p: &str| Constrained {
            name: name.to_owned(),
            pattern: Pattern::new(p).unwrap_or_else(|e| panic!("{e}")),
        };
        assert_eq!(
            pattern("/api/v1/users/{id:[0-9]+}"),
            Ok(vec![
                lit("api"),
                lit("v1"),
                lit("users"),
                re("id", "[0-9]+")
            ])
        );
        assert_eq!(
            pattern("/o/{uuid:[0-9a-f-]{36}}/items"),
            Ok(vec![lit("o"), re("uuid", "[0-9a-f-]{36}"), lit("items")])
        );
        assert_eq!(pattern("/{x:a/b|c}"), Ok(vec![re("x", "a/b|c")]));
        assert_eq!(pattern("/{x:\\{}"), Ok(vec![re("x", "\\{")]));
        assert_eq!(
            pattern("/{a}/{b:x}/**"),
            Ok(vec![Param("a".to_owned()), re("b", "x"), Tail])
        );
        assert_eq!(pattern("/"), Ok(vec![]));
        assert_eq!(pattern("/**"), Ok(vec![Tail]));
        assert_eq!(
            pattern("/v1/customers/{id}"),
            Ok(vec![lit("v1"), lit("customers"), Param("id".to_owned())])
        );
        assert_eq!(pattern("/a/**"), Ok(vec![lit("a"), Tail]));
        assert_eq!(pattern("/caf%C3%A9"), Ok(vec![lit("caf%C3%A9")]));
        assert_eq!(pattern("/a:b@c"), Ok(vec![lit("a:b@c")]));
        let semi = PathPattern::parse(
            "/cars;color=red/{x}".to_owned(),
            NormalizeOptions {
                allow_semicolon: true,
            },
        );
        assert_eq!(
            semi.map(|p| p.segments).map_err(|e| e.to_string()),
            Ok(vec![lit("cars;color=red"), Param("x".to_owned())])
        );
        for bad in [
            "",
            "v1",
            "/a//b",
            "/**/a",
            "/a/**/**",
            "/{id",
            "/id}",
            "/{}",
            "/{1x}",
            "/v{n}",
            "/{a}/{a}",
            "/a*",
            "/*",
            "/a?x=1",
            "/a#f",
            "/a/./b",
            "/a/../b",
            "/%2e",
            "/a%2fb",
            "/a;b",
            "/a b",
            "/café",
            "/%c3",
            "/{x:}",
            "/{x:[0-9}",
            "/{x:a)|(b}",
            "/{x:a}b",
            "/{x:{2}",
            "/{id:1}/{id:2}",
            "/{:x}",
            "/a/{x:a{1}}}",
            "/a/{x:a}}",
        ] {
            assert!(pattern(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn non_canonical_literals_name_the_canonical_form() {
        for (input, canonical) in [
            ("/%61/", "/a/"),
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
