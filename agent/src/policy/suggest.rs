//! `policy suggest`: a least-privilege policy for what one workload's audit records show.
//! Pure: the caller reads the records ([`super::trail`]) and feeds them to an
//! [`Observer`]; [`Observer::finish`] renders the policy text.
//!
//! **Observed demand.** Decision records (not outcome records) of the workload whose
//! decision is `allow` or `would_deny` (audit mode: everything the workload did). A `deny`
//! refused by policy (`origin: policy`) counts only with `include_denied`: in enforce mode
//! it is what the current policy refused, which may be an attack rather than a need.
//! Client errors (malformed requests), agent and upstream errors never count. From them:
//!
//! - `http` records (method, canonical path, Host, original port): one HTTP destination per
//!   host and port, one rule per path template with the methods seen. A segment that is
//!   numeric, a UUID, hex of at least 8 characters with a digit, or a long (≥ 16) opaque
//!   token of letters and digits becomes a constrained parameter (`{id:[0-9]+}`, …);
//!   every other segment stays literal, so paths that differ only in a parameterised
//!   segment share one rule. A path that is not canonical, holds characters the path
//!   language reserves (`*`, `{`, `}`), a control character, or is longer than
//!   [`MAX_PATH`] is skipped (and counted in the header), never widened.
//! - `tls` records (passthrough: the SNI and the port): `tls: passthrough`. The records do
//!   not say whether an HTTP destination was reached through TLS interception, so HTTP
//!   destinations get `tls: none` (the default); the header says so.
//! - A name destination whose recorded address class is internal (loopback, private, …)
//!   gets `allow_internal` with exactly the addresses seen.
//! - `tcp`/`udp` records without a method (kernel level): an L4 exception per address,
//!   protocol and port; port 53 counts as DNS instead.
//! - `dns` records: `dns:`; names that are not a destination's host go to `dns.names`,
//!   types other than A and AAAA to `dns.types`.
//! - A rate per destination: the busiest minute seen × [`HEADROOM`], at least
//!   [`MIN_RATE`] per minute.
//!
//! Query parameters: an HTTP record carries the names of its query's parameters
//! (`query_names`, never values; see [`super::recorded_query_names`]). A rule lists
//! exactly the names seen, each `any`, with `query_repeat` for names seen repeated in one
//! request, and `query: {}` when no request of the rule had a query; when some request's
//! names were not all recorded (`query_names_clipped`) the rule has no `query:` (any
//! query) and a comment says why. Records carry neither headers nor bodies: header and
//! JSON field constraints are not suggested (the header says so). Every rule
//! and destination carries a comment with its count and first/last seen. The output is
//! sorted (deterministic). Untrusted text (hosts, paths, cgroups, names) is written only as
//! YAML scalars by the YAML serializer; comments hold only numbers, times and validated
//! tokens, or text escaped to one line.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use jiff::Timestamp;

use super::model::{Host, Selector, cgroup_selector, is_uppercase_method, parse_host};
use super::{NormalizeOptions, dns, normalize_with};
use crate::audit::Decision;
use crate::audit::chain::StoredRecord;

/// The longest path taken from a record; longer ones are skipped.
pub const MAX_PATH: usize = 2048;
/// A suggested rate is the busiest minute times this.
pub const HEADROOM: u64 = 2;
/// The smallest suggested rate per minute.
pub const MIN_RATE: u64 = 10;

/// Why no policy can be suggested.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SuggestError {
    /// The files have no record of the workload.
    #[error("--workload {workload:?}: no records of this workload in the audit files ({seen})")]
    UnknownWorkload {
        /// The workload asked for.
        workload: String,
        /// The workloads that have records, with counts, or why there are none.
        seen: String,
    },
    /// The workload has records, but none shows demand.
    #[error(
        "--workload {workload:?}: {records} record(s), none of them observed demand (allow or \
         would_deny{denied}): {skipped}"
    )]
    NoDemand {
        /// The workload.
        workload: String,
        /// Its records.
        records: u64,
        /// A hint about denials.
        denied: &'static str,
        /// What was skipped, and why.
        skipped: String,
    },
    /// The recorded cgroup cannot be a selector.
    #[error(
        "--workload {workload:?}: recorded cgroup {cgroup:?} cannot be selected exactly: {reason}"
    )]
    Cgroup {
        /// The workload.
        workload: String,
        /// The cgroup path.
        cgroup: String,
        /// Why.
        reason: &'static str,
    },
    /// The workload has no recorded cgroup.
    #[error("--workload {workload:?}: no record names the workload's cgroup")]
    NoCgroup {
        /// The workload.
        workload: String,
    },
}

/// `--mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SuggestMode {
    /// `mode: enforce`.
    #[default]
    Enforce,
    /// `mode: audit`.
    Audit,
}

/// What to suggest for.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The workload.
    pub workload: String,
    /// The mode written.
    pub mode: SuggestMode,
    /// Count `deny` records refused by policy as demand.
    pub include_denied: bool,
}

/// Where the records came from, for the header.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// The files read.
    pub files: Vec<String>,
    /// `all records` or `since …`.
    pub window: String,
    /// Notes for the header (torn lines, …), one line each.
    pub notes: Vec<String>,
}

/// How often, and when first and last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    count: u64,
    first: Timestamp,
    last: Timestamp,
}

impl Seen {
    fn new(at: Timestamp) -> Self {
        Seen {
            count: 1,
            first: at,
            last: at,
        }
    }

    fn add(&mut self, at: Timestamp) {
        self.count += 1;
        self.first = self.first.min(at);
        self.last = self.last.max(at);
    }

    /// All of `seen` together.
    fn total<'a>(seen: impl IntoIterator<Item = &'a Seen>) -> Option<Seen> {
        seen.into_iter().fold(None, |acc: Option<Seen>, s| {
            Some(acc.map_or(*s, |mut t| {
                t.merge(*s);
                t
            }))
        })
    }

    fn merge(&mut self, other: Seen) {
        self.count += other.count;
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }

    fn describe(&self, what: &str) -> String {
        format!(
            "{} {what}, first {}, last {}",
            self.count,
            self.first.strftime("%Y-%m-%dT%H:%M:%SZ"),
            self.last.strftime("%Y-%m-%dT%H:%M:%SZ")
        )
    }
}

/// Counts one more sighting at `at` in `slot`.
fn see(slot: &mut Option<Seen>, at: Timestamp) {
    match slot {
        Some(s) => s.add(at),
        None => *slot = Some(Seen::new(at)),
    }
}

fn bump<K: Ord>(map: &mut BTreeMap<K, Seen>, key: K, at: Timestamp) {
    map.entry(key)
        .and_modify(|s| s.add(at))
        .or_insert_with(|| Seen::new(at));
}

/// One segment of a path template.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Segment {
    /// Kept as written.
    Literal(String),
    /// A parameter matching this kind of value.
    Param(Kind),
}

/// The kinds of value a parameterised segment holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Digits.
    Numeric,
    /// `8-4-4-4-12` hex digits.
    Uuid,
    /// At least 8 hex digits, at least one a digit.
    Hex,
    /// At least 16 letters, digits, `_` or `-`, with letters and digits.
    Opaque,
}

impl Kind {
    /// The regular expression of the parameter (matched against the whole segment).
    pub fn regex(self) -> &'static str {
        match self {
            Kind::Numeric => "[0-9]+",
            Kind::Uuid => {
                "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
            }
            Kind::Hex => "[0-9a-fA-F]{8,}",
            Kind::Opaque => "[A-Za-z0-9_-]{16,}",
        }
    }
}

/// The kind of a canonical path segment, if it is an identifier rather than a name.
pub fn classify(seg: &str) -> Option<Kind> {
    let b = seg.as_bytes();
    let hex = |b: &[u8]| b.iter().all(u8::is_ascii_hexdigit);
    let digit = b.iter().any(u8::is_ascii_digit);
    if !b.is_empty() && b.iter().all(u8::is_ascii_digit) {
        return Some(Kind::Numeric);
    }
    if b.len() == 36 {
        let groups: Vec<&str> = seg.split('-').collect();
        if groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
            && groups.iter().all(|g| hex(g.as_bytes()))
        {
            return Some(Kind::Uuid);
        }
    }
    if b.len() >= 8 && hex(b) && digit {
        return Some(Kind::Hex);
    }
    if b.len() >= 16
        && digit
        && b.iter().any(u8::is_ascii_alphabetic)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
    {
        return Some(Kind::Opaque);
    }
    None
}

/// A path template: segments and whether the path ends with `/`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Template {
    /// The segments (none for `/`).
    pub segments: Vec<Segment>,
    /// Whether the path ends with `/` after a segment.
    pub trailing_slash: bool,
}

impl Template {
    /// The template of a canonical path, or why the path is skipped.
    pub fn of(path: &str) -> Result<Self, &'static str> {
        if path.len() > MAX_PATH {
            return Err("path longer than 2048 bytes");
        }
        if !path.is_ascii() || path.chars().any(|c| c.is_ascii_control()) {
            return Err("path with control or non-ASCII characters");
        }
        if path.contains(['*', '{', '}']) {
            return Err("path with '*', '{' or '}' (reserved by the path language)");
        }
        match normalize_with(path, NormalizeOptions::default()) {
            Ok(c) if c.path() == path && c.query().is_none() => {}
            _ => return Err("path not canonical"),
        }
        let rest = path.strip_prefix('/').unwrap_or(path);
        let trailing_slash = rest.ends_with('/');
        let segments = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| classify(s).map_or_else(|| Segment::Literal(s.to_owned()), Segment::Param))
            .collect();
        Ok(Template {
            segments,
            trailing_slash,
        })
    }

    /// The pattern in the policy language, e.g. `/v1/customers/{id:[0-9]+}`.
    pub fn pattern(&self) -> String {
        let mut out = String::new();
        let mut params = 0;
        for s in &self.segments {
            out.push('/');
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::Param(kind) => {
                    params += 1;
                    let name = if params == 1 {
                        "id".to_owned()
                    } else {
                        format!("id{params}")
                    };
                    let _ = write!(out, "{{{name}:{}}}", kind.regex());
                }
            }
        }
        if out.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }

    /// A rule id: the literal segments and `id` for parameters, `[A-Za-z0-9_.-]`.
    fn slug(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for s in &self.segments {
            let part = match s {
                Segment::Literal(l) => l
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '_' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect::<String>()
                    .trim_matches('-')
                    .to_owned(),
                Segment::Param(_) => "id".to_owned(),
            };
            if !part.is_empty() {
                parts.push(part);
            }
        }
        let mut slug = parts.join("-");
        slug.truncate(48);
        let slug = slug.trim_end_matches('-').to_owned();
        if slug.is_empty() {
            "root".to_owned()
        } else {
            slug
        }
    }
}

/// The query parameters seen on one route.
#[derive(Debug, Default)]
struct Query {
    /// Names seen.
    names: BTreeSet<String>,
    /// Names seen more than once in one request.
    repeated: BTreeSet<String>,
    /// Some request's names are not all known (clipped in the record, or empty).
    incomplete: bool,
}

/// One path template as observed.
#[derive(Debug, Default)]
struct Route {
    /// Requests per method.
    methods: BTreeMap<String, Seen>,
    /// Query parameter names.
    query: Query,
}

/// One HTTP destination as observed.
#[derive(Debug, Default)]
struct Http {
    /// Requests per template.
    routes: BTreeMap<Template, Route>,
    /// TLS passthrough connections.
    passthrough: Option<Seen>,
    /// Internal addresses a name was bound to.
    internal: BTreeSet<IpAddr>,
    /// Requests (or connections) per minute since the epoch.
    minutes: BTreeMap<i64, u64>,
}

/// Collects one workload's records.
#[derive(Debug)]
pub struct Observer {
    options: Options,
    /// Records per workload (all workloads).
    workloads: BTreeMap<String, u64>,
    /// Demand records counted, per decision.
    counted: BTreeMap<&'static str, u64>,
    /// Records of the workload not counted, per reason.
    skipped: BTreeMap<String, u64>,
    http: BTreeMap<(String, u16), Http>,
    /// (protocol, address, port) → connections.
    l4: BTreeMap<(&'static str, IpAddr, u16), Seen>,
    /// Queries per (name, type).
    dns: BTreeMap<(String, String), Seen>,
    /// DNS seen only as kernel-level port-53 traffic.
    dns_kernel: Option<Seen>,
    cgroups: BTreeMap<String, u64>,
    uids: BTreeMap<u32, u64>,
    span: Option<Seen>,
}

impl Observer {
    /// An observer for `options.workload`.
    pub fn new(options: Options) -> Self {
        Observer {
            options,
            workloads: BTreeMap::new(),
            counted: BTreeMap::new(),
            skipped: BTreeMap::new(),
            http: BTreeMap::new(),
            l4: BTreeMap::new(),
            dns: BTreeMap::new(),
            dns_kernel: None,
            cgroups: BTreeMap::new(),
            uids: BTreeMap::new(),
            span: None,
        }
    }

    fn skip(&mut self, why: &str) {
        *self.skipped.entry(why.to_owned()).or_default() += 1;
    }

    /// Takes one record into account.
    pub fn add(&mut self, r: &StoredRecord) {
        let Some(workload) = &r.workload else {
            return;
        };
        // Outcome records complete a decision record; records of the audit subsystem
        // decide nothing.
        if r.proto == "audit" || !r.is_decision() {
            return;
        }
        *self.workloads.entry(workload.clone()).or_default() += 1;
        if *workload != self.options.workload {
            return;
        }
        let decision = match r.decision {
            Decision::Allow => "allow",
            Decision::WouldDeny => "would_deny",
            Decision::Deny
                if self.options.include_denied && r.origin == Some(crate::audit::Fault::Policy) =>
            {
                "deny"
            }
            Decision::Deny if r.origin == Some(crate::audit::Fault::Policy) => {
                return self.skip("deny (refused by policy; --include-denied counts them)");
            }
            other => return self.skip(&format!("{} (not refused by policy)", other.as_str())),
        };
        let Ok(at) = r.ts.parse::<Timestamp>() else {
            return self.skip("time not RFC 3339");
        };
        let taken = match (r.proto.as_str(), r.method.as_deref()) {
            ("http", Some(method)) => self.add_http(r, method, at),
            ("http", None) => Err("http record without a method"),
            ("tls", _) => self.add_tls(r, at),
            ("tcp" | "udp", None) => self.add_l4(r, at),
            ("dns", _) => self.add_dns(r, at),
            _ => Err("protocol not suggested"),
        };
        if let Err(why) = taken {
            return self.skip(why);
        }
        *self.counted.entry(decision).or_default() += 1;
        if let Some(c) = &r.cgroup {
            *self.cgroups.entry(c.clone()).or_default() += 1;
        }
        if let Some(uid) = r.uid {
            *self.uids.entry(uid).or_default() += 1;
        }
        see(&mut self.span, at);
    }

    /// The destination of an HTTP or TLS record.
    fn destination(&mut self, r: &StoredRecord, at: Timestamp) -> Result<&mut Http, &'static str> {
        let host = r.dst.host.as_deref().ok_or("no destination host")?;
        let port = r
            .dst
            .port
            .filter(|p| *p != 0)
            .ok_or("no destination port")?;
        let parsed = parse_host(host).map_err(|_| "destination host not a DNS name or IP")?;
        let internal = match (&parsed, &r.dst.ip, r.dst.class.as_deref()) {
            (Host::Name(_), Some(ip), Some(class))
                if !matches!(class, "global" | "documentation") =>
            {
                Some(
                    ip.parse::<IpAddr>()
                        .map_err(|_| "destination address not an IP")?
                        .to_canonical(),
                )
            }
            _ => None,
        };
        let http = self.http.entry((parsed.to_string(), port)).or_default();
        http.internal.extend(internal);
        *http
            .minutes
            .entry(at.as_second().div_euclid(60))
            .or_default() += 1;
        Ok(http)
    }

    fn add_http(
        &mut self,
        r: &StoredRecord,
        method: &str,
        at: Timestamp,
    ) -> Result<(), &'static str> {
        if !is_uppercase_method(method) {
            return Err("method not an uppercase token");
        }
        let template = Template::of(r.path.as_deref().ok_or("http record without a path")?)?;
        let http = self.destination(r, at)?;
        let route = http.routes.entry(template).or_default();
        bump(&mut route.methods, method.to_owned(), at);
        if let Some(names) = &r.query_names {
            let q = &mut route.query;
            q.incomplete |= r.query_names_clipped == Some(true);
            let mut once = BTreeSet::new();
            for name in names {
                if name.is_empty() {
                    q.incomplete = true;
                    continue;
                }
                if !once.insert(name) {
                    q.repeated.insert(name.clone());
                }
                q.names.insert(name.clone());
            }
        }
        Ok(())
    }

    fn add_tls(&mut self, r: &StoredRecord, at: Timestamp) -> Result<(), &'static str> {
        let http = self.destination(r, at)?;
        see(&mut http.passthrough, at);
        Ok(())
    }

    fn add_l4(&mut self, r: &StoredRecord, at: Timestamp) -> Result<(), &'static str> {
        let ip = r
            .dst
            .ip
            .as_deref()
            .ok_or("no destination address")?
            .parse::<IpAddr>()
            .map_err(|_| "destination address not an IP")?
            .to_canonical();
        let port = r
            .dst
            .port
            .filter(|p| *p != 0)
            .ok_or("no destination port")?;
        if port == 53 {
            see(&mut self.dns_kernel, at);
            return Ok(());
        }
        let proto = if r.proto == "udp" { "udp" } else { "tcp" };
        bump(&mut self.l4, (proto, ip, port), at);
        Ok(())
    }

    fn add_dns(&mut self, r: &StoredRecord, at: Timestamp) -> Result<(), &'static str> {
        let q = r.dns.as_ref().ok_or("dns record without a question")?;
        let name = q.qname.as_deref().ok_or("dns record without a name")?;
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match parse_host(&name) {
            Ok(Host::Name(_)) => {}
            _ => return Err("dns name not a DNS name"),
        }
        let qtype = q.qtype.as_deref().unwrap_or("A");
        let code = dns::parse_type(qtype).map_err(|_| "dns type unknown")?;
        bump(&mut self.dns, (name, dns::type_name(code)), at);
        Ok(())
    }

    /// The suggested policy, as YAML text with comments.
    pub fn finish(self, sources: &Sources) -> Result<String, SuggestError> {
        let name = self.options.workload.clone();
        let Some(&records) = self.workloads.get(&name).filter(|n| **n > 0) else {
            let seen = if self.workloads.is_empty() {
                "the files hold no record of any workload".to_owned()
            } else {
                let list: Vec<String> = self
                    .workloads
                    .iter()
                    .map(|(w, n)| format!("{w:?} ({n})"))
                    .collect();
                format!("workloads with records: {}", list.join(", "))
            };
            return Err(SuggestError::UnknownWorkload {
                workload: name,
                seen,
            });
        };
        if self.counted.is_empty() {
            return Err(SuggestError::NoDemand {
                workload: name,
                records,
                denied: if self.options.include_denied {
                    ", or deny by policy"
                } else {
                    ""
                },
                skipped: self.skipped_text(),
            });
        }
        let (cgroup, _) = self
            .cgroups
            .iter()
            .max_by_key(|(c, n)| (**n, std::cmp::Reverse(*c)))
            .ok_or_else(|| SuggestError::NoCgroup {
                workload: name.clone(),
            })?;
        match cgroup_selector(cgroup) {
            Ok(Selector::Cgroup(_)) => {}
            Ok(_) => {
                return Err(SuggestError::Cgroup {
                    workload: name,
                    cgroup: cgroup.clone(),
                    reason: "it contains '*', which the policy reads as a glob",
                });
            }
            Err(reason) => {
                return Err(SuggestError::Cgroup {
                    workload: name,
                    cgroup: cgroup.clone(),
                    reason,
                });
            }
        }
        Ok(self.render(sources, cgroup))
    }

    fn skipped_text(&self) -> String {
        if self.skipped.is_empty() {
            return "nothing skipped".to_owned();
        }
        let list: Vec<String> = self
            .skipped
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        format!("skipped {}", list.join(", "))
    }

    fn render(&self, sources: &Sources, cgroup: &str) -> String {
        let mut out = String::new();
        let line = |out: &mut String, text: &str| {
            out.push_str(text);
            out.push('\n');
        };
        // Header: one-line comments, untrusted text escaped.
        line(
            &mut out,
            "# Suggested by `scopegate policy suggest`: review it, then `policy check`.",
        );
        let files: Vec<String> = sources.files.iter().map(|f| escape(f)).collect();
        line(
            &mut out,
            &format!("# from {} file(s): {}", files.len(), files.join(", ")),
        );
        let span = self
            .span
            .map(|s| s.describe("demand record(s)"))
            .unwrap_or_default();
        line(
            &mut out,
            &format!("# window: {}; {span}", escape(&sources.window)),
        );
        let counted: Vec<String> = self
            .counted
            .iter()
            .map(|(d, n)| format!("{n} {d}"))
            .collect();
        line(&mut out, &format!("# counted: {}", counted.join(", ")));
        line(&mut out, &format!("# {}", self.skipped_text()));
        let others: Vec<String> = self
            .workloads
            .iter()
            .filter(|(w, _)| **w != self.options.workload)
            .map(|(w, n)| format!("{} ({n})", escape(w)))
            .collect();
        if !others.is_empty() {
            line(
                &mut out,
                &format!(
                    "# other workloads in the files (not used): {}",
                    others.join(", ")
                ),
            );
        }
        if self.cgroups.len() > 1 {
            let list: Vec<String> = self
                .cgroups
                .iter()
                .map(|(c, n)| format!("{} ({n})", escape(c)))
                .collect();
            line(
                &mut out,
                &format!(
                    "# several cgroups seen, selecting the most frequent: {}",
                    list.join(", ")
                ),
            );
        }
        for note in &sources.notes {
            line(&mut out, &format!("# note: {}", escape(note)));
        }
        for text in [
            "# query: the parameter names seen, any value (`query: {}`: no query seen).",
            "# not in the records, so not suggested: headers, JSON body fields, and whether an",
            "#   HTTP destination was reached through TLS interception (add `tls: intercept`).",
        ] {
            line(&mut out, text);
        }
        line(
            &mut out,
            &format!("# rates: the busiest minute x {HEADROOM}, at least {MIN_RATE}/minute."),
        );

        line(
            &mut out,
            &format!("workload: {}", scalar(&self.options.workload)),
        );
        line(&mut out, "select:");
        line(&mut out, &format!("  cgroup: {}", scalar(cgroup)));
        if let [(uid, _)] = self.uids.iter().collect::<Vec<_>>()[..] {
            line(&mut out, &format!("  uid: {uid}"));
        }
        line(
            &mut out,
            match self.options.mode {
                SuggestMode::Enforce => "mode: enforce",
                SuggestMode::Audit => "mode: audit",
            },
        );
        if self.http.is_empty() && self.l4.is_empty() {
            line(&mut out, "egress: []");
        } else {
            line(&mut out, "egress:");
        }
        let mut ids: BTreeSet<String> = BTreeSet::new();
        for ((host, port), http) in &self.http {
            let total = Seen::total(
                http.passthrough
                    .iter()
                    .chain(http.routes.values().flat_map(|r| r.methods.values())),
            );
            let peak = http.minutes.values().copied().max().unwrap_or(0);
            if let Some(t) = total {
                line(
                    &mut out,
                    &format!(
                        "  # {}; busiest minute {peak}",
                        t.describe("request(s)/connection(s)")
                    ),
                );
            }
            line(&mut out, &format!("  - host: {}", scalar(host)));
            line(&mut out, &format!("    port: {port}"));
            if !http.internal.is_empty() {
                let cidrs: Vec<String> = http
                    .internal
                    .iter()
                    .map(|ip| match ip {
                        IpAddr::V4(_) => format!("{ip}/32"),
                        IpAddr::V6(_) => format!("{ip}/128"),
                    })
                    .collect();
                line(
                    &mut out,
                    &format!("    allow_internal: [{}]", cidrs.join(", ")),
                );
            }
            let rate = (peak * HEADROOM).max(MIN_RATE);
            line(&mut out, &format!("    rate: {rate}/minute"));
            if http.routes.is_empty() {
                line(&mut out, "    tls: passthrough");
                continue;
            }
            if http.passthrough.is_some() {
                line(
                    &mut out,
                    "    tls: intercept    # TLS seen, and requests decided in it",
                );
            }
            line(&mut out, "    rules:");
            for (template, route) in &http.routes {
                let methods = &route.methods;
                let seen = Seen::total(methods.values());
                let per_method: Vec<String> = methods
                    .iter()
                    .map(|(m, s)| format!("{m} {}", s.count))
                    .collect();
                if let Some(s) = seen {
                    line(
                        &mut out,
                        &format!(
                            "      # {} ({})",
                            s.describe("request(s)"),
                            per_method.join(", ")
                        ),
                    );
                }
                let slug = template.slug();
                let mut id = slug.clone();
                let mut n = 1;
                while ids.contains(&id) {
                    n += 1;
                    id = format!("{slug}-{n}");
                }
                ids.insert(id.clone());
                line(&mut out, &format!("      - id: {}", scalar(&id)));
                let list: Vec<String> = methods.keys().map(|m| scalar(m)).collect();
                line(&mut out, &format!("        methods: [{}]", list.join(", ")));
                line(
                    &mut out,
                    &format!("        path: {}", scalar(&template.pattern())),
                );
                render_query(&mut out, &route.query);
            }
        }
        for ((proto, ip, port), s) in &self.l4 {
            line(&mut out, &format!("  # {}", s.describe("connection(s)")));
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            line(&mut out, &format!("  - cidr: {ip}/{prefix}"));
            line(&mut out, &format!("    ports: [{port}]"));
            line(&mut out, &format!("    protocol: {proto}"));
        }
        self.render_dns(&mut out);
        out
    }

    fn render_dns(&self, out: &mut String) {
        if self.dns.is_empty() && self.dns_kernel.is_none() {
            return;
        }
        let all = Seen::total(self.dns_kernel.iter().chain(self.dns.values()));
        let mut names: BTreeSet<&str> = BTreeSet::new();
        let mut types: BTreeSet<&str> = BTreeSet::new();
        for (name, qtype) in self.dns.keys() {
            if !self.http.keys().any(|(host, _)| host == name) {
                names.insert(name);
            }
            if qtype != "A" && qtype != "AAAA" {
                types.insert(qtype);
            }
        }
        if let Some(s) = all {
            let _ = writeln!(out, "# {}", s.describe("DNS query(ies)"));
        }
        if names.is_empty() && types.is_empty() {
            out.push_str("dns: system\n");
            return;
        }
        out.push_str("dns:\n");
        if !names.is_empty() {
            let list: Vec<String> = names.iter().map(|n| scalar(n)).collect();
            let _ = writeln!(out, "  names: [{}]", list.join(", "));
        }
        if !types.is_empty() {
            let list: Vec<String> = types.iter().map(|t| scalar(t)).collect();
            let _ = writeln!(out, "  types: [{}]", list.join(", "));
        }
    }
}

/// A rule's `query:` (and `query_repeat:`): exactly the names seen, each `any` (absent, or
/// any value); `query: {}` when no request of the route had a query; nothing (any query)
/// when some request's names were not all recorded.
fn render_query(out: &mut String, q: &Query) {
    if q.incomplete {
        out.push_str(
            "        # query: not every parameter name was recorded, so any query is allowed\n",
        );
        return;
    }
    if q.names.is_empty() {
        out.push_str("        query: {}\n");
        return;
    }
    out.push_str("        query:\n");
    for name in &q.names {
        let _ = writeln!(out, "          {}: any", scalar(name));
    }
    if !q.repeated.is_empty() {
        let list: Vec<String> = q.repeated.iter().map(|n| scalar(n)).collect();
        let _ = writeln!(out, "        query_repeat: [{}]", list.join(", "));
    }
}

/// `s` as one YAML scalar, by the YAML serializer (quoted where YAML needs it). Only ever
/// given text without control characters (checked where it is taken from a record), so
/// the scalar is one line; a string the serializer would spread over lines is written as
/// a JSON string (valid YAML) instead.
fn scalar(s: &str) -> String {
    match serde_yaml::to_string(s) {
        Ok(text) if text.trim_end_matches('\n').lines().count() == 1 => {
            text.trim_end_matches('\n').to_owned()
        }
        _ => serde_json::to_string(&s.escape_default().to_string()).unwrap_or_default(),
    }
}

/// Untrusted text for a comment: printable ASCII kept, everything else escaped (`\n`,
/// `\u{2028}`, …), so nothing can end the comment's line.
fn escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                vec![c]
            } else {
                c.escape_default().collect::<Vec<_>>()
            }
        })
        .collect()
}

#[cfg(test)]
#[path = "suggest_tests.rs"]
mod tests;
