//! Policy: a directory of YAML files → one immutable [`Snapshot`] → [`decide()`].
//!
//! Pure apart from reading the directory: no clock, no network, no global state. The
//! caller shares a snapshot in an `Arc` and swaps it atomically; an invalid directory
//! yields [`PolicyErrors`] and never a partial snapshot.
//!
//! Stages, one module each:
//! - `raw`: the file format as serde types (unknown fields are errors);
//! - `model`: validated domain types, built with `TryFrom<raw::…>`; `matchers` (query,
//!   headers, JSON, regexes) and `when` (time windows) validate and compile their parts;
//! - `routes`: each destination's path patterns compiled into a segment trie;
//! - [`canonical`]: the one request-path normalisation, shared by matching and forwarding;
//! - `decide`: the pure decision; [`explain()`] says why, rule by rule;
//! - `body`: strict JSON body parsing for `json` rules;
//! - `rate`: token buckets, kept by the caller outside the snapshot;
//! - `position` and `error`: errors that name file, line and column;
//! - [`cli`]: `scopegate policy check | explain`.
//!
//! # Policy files
//!
//! Only `*.yaml` and `*.yml` files directly in the directory are read, in sorted order;
//! hidden files and editor leftovers (`*~`, `*.swp`) are ignored. A file holds one
//! workload document or a YAML list of them. Every field, with its default:
//!
//! ```yaml
//! workload: billing                 # [a-z0-9][a-z0-9_-]*, unique across the directory
//! select:                           # exactly one of cgroup and systemd_unit:
//!   cgroup: /system.slice/billing.service   # cgroup v2 path below the cgroup2 mount,
//!                                           # or a glob: /system.slice/billing-*.service
//!   # systemd_unit: billing.service         # .service, .scope or .slice
//!   uid: 1001                       # optional: only this uid may use the grants
//! mode: enforce                     # enforce (default) | audit: allow, record would-deny
//! body_cap: 64KiB                   # optional; bytes, KiB or MiB (default 1MiB, max 64MiB)
//! egress:                           # required; [] denies everything
//!   - host: api.example.com         # DNS name or IP literal ("::1" or "[::1]", quoted)
//!     port: 443
//!     path_params: false            # true: accept ';' path parameters (see below)
//!     allow_internal: false         # names only: true | [CIDR, …] may bind internal answers
//!     rate: 100/minute              # optional: N/second | N/minute | N/hour
//!     when:                         # optional time window for the whole destination
//!       days: [mon, tue, wed, thu, fri]
//!       hours: "07:00-20:00"
//!       timezone: Europe/Berlin
//!     rules:                        # a request passes if ONE rule allows it
//!       - id: create-charge         # [A-Za-z0-9_.-]+, unique within the workload
//!         methods: [POST]           # uppercase method tokens
//!         path: /v1/charges         # literals, {name}, {name:REGEX}, ** (last: the tail)
//!         rate: 10/second           # optional, per rule
//!         headers:                  # optional; names are case-insensitive
//!           content-type: {pattern: "application/json(; ?charset=utf-8)?"}
//!           idempotency-key: required
//!           x-debug: forbidden
//!         json:                     # optional; the body is buffered (body_cap) and parsed
//!           - {field: currency, one_of: [usd, eur]}
//!           - {field: amount, min: 1, max: 100000}
//!           - {field: customer.address.country, pattern: "[A-Z]{2}"}
//!           - {field: items, max_len: 20}
//!           - {field: items.0.sku, max_len: 64}
//!           - {field: admin, absent: true}
//!       - id: read-customer
//!         methods: [GET, HEAD]
//!         path: /v1/customers/{id:cus_[A-Za-z0-9]+}
//!         query:                    # optional; when present, unlisted parameters deny
//!           expand: absent
//!           limit: {pattern: "[0-9]{1,3}"}
//!           sort: {one_of: [asc, desc]}
//!           cursor: any
//!           fields: present
//!         query_repeat: [fields]    # these may appear more than once
//!         when:                     # optional, per rule (both windows must hold)
//!           days: [mon, tue, wed, thu, fri]
//!           hours: "08:00-18:00"
//!           timezone: Europe/Berlin
//! ```
//!
//! An empty directory is valid: its snapshot has no workloads and denies everything.
//! Unknown fields, a key given twice, and every invalid value are errors that name the
//! file, line and column; `scopegate policy check DIR` prints all of them at once.
//!
//! # Semantics
//!
//! **Selection.** `cgroup` is an exact cgroup v2 path, or, when it contains `*`, a glob:
//! `*` matches any characters of one path component (never `/`), `**` (a whole
//! component) any number of components, including none; `?`, `[` and `]` are not
//! supported, and a glob needs a literal character. `systemd_unit` selects the cgroup
//! whose last component is the unit. Two workloads may not name the same cgroup path,
//! glob or unit ([`Selector::matches_cgroup_path`] implements the match). `uid` is an
//! extra condition: a request from another uid is denied (`uid_not_allowed`).
//!
//! **Mode.** [`decide`] always returns the enforce-mode decision. In `audit` mode the
//! proxy forwards a denied request and records it as would-deny ([`Workload::mode`]); the
//! kernel hooks pass a TCP port without a destination and UDP unchanged and report them
//! for a would-deny record (`explain::kernel_report` says which).
//!
//! **Destinations.** The request's authority host (case-insensitive; IP literals as
//! addresses) and the ORIGINAL destination port select one destination; none is
//! `destination_not_allowed`. Names are never numeric: `policy check` refuses a host
//! whose last label a resolver (inet_aton) reads as a number (`127.1`, `0x7f.0x1`,
//! `2130706433`), and an IP-literal destination matches only a canonical literal.
//!
//! **Destination binding** (in the proxy, before any rule; [`addr`]). The connection's
//! original address must equal an IP-literal host, or be among a name's current DNS
//! answers AND be of a class the destination may reach: a name bound to an internal
//! address (loopback, private, link-local and the metadata service, CGNAT, ULA, multicast,
//! reserved, …, and IPv6 forms embedding such an IPv4) is `destination_internal_address`
//! unless `allow_internal` is `true` or lists a range holding it.
//!
//! **Paths.** Requests are matched on their canonical path ([`canonical`]), the form that
//! is also forwarded. Pattern literals are canonical and case-sensitive; `{name}` matches
//! one segment; `{name:REGEX}` matches one segment that the whole regex matches (anchored
//! as `^(?:REGEX)$`, on the canonical, still percent-encoded, segment; braces in the
//! regex must balance); `**`, last, matches zero or more segments. A trailing `/` is
//! part of the path, as it is to servers: `/a` matches only `/a`, `/a/` only `/a/`, and
//! `/a/**` matches `/a`, `/a/` and everything below. Every rule whose
//! pattern matches is a candidate: the trie tries the literal child, then the `{name:REGEX}`
//! children in order, then `{name}`, then `**`, but this order only affects the
//! exploration, never the outcome: the FIRST candidate in file order whose other checks
//! all hold allows the request. `path_params: true` lets request paths contain `;`
//! (refused with 400 otherwise); the parameters stay part of the segment
//! (`/cars;color=red` is the segment `cars;color=red`, which a literal `cars` does not
//! match; use `{c:cars(;.*)?}`), and a segment like `..;` or `;x` is always refused.
//!
//! **Checks.** A rule allows a request when, in this order, its path matches, the method
//! is listed, and the query, header, JSON and time constraints hold:
//! - `query` (when present) lists every allowed parameter; the query is parsed as
//!   `application/x-www-form-urlencoded` (`+` is a space, names and values
//!   percent-decoded once; invalid encoding, non-UTF-8 or a raw `;` is `invalid_query`).
//!   `any`: optional, any value; `absent`: must not appear; `present`: must appear;
//!   `{one_of: [...]}` / `{pattern: REGEX}`: must appear, and every occurrence must
//!   match. A parameter may appear once unless listed in `query_repeat`. Without `query`,
//!   any query is allowed; `query: {}` allows none.
//! - `headers`: `required` (present), `forbidden` (absent), `{one_of}` / `{pattern}`
//!   (present, value matches exactly / wholly). A constrained header that appears more
//!   than once always denies (`duplicate_header`): a duplicated header never lets the
//!   first value win. Unlisted headers are not constrained.
//! - `json`: each entry names a `field` (dot path; numeric segments also index arrays)
//!   and constraints that must all hold: `one_of` (strings, numbers, booleans, null;
//!   numbers compare by value), `min` / `max` (numbers), `pattern` (strings), `max_len`
//!   (characters of a string, elements of an array), `absent: true`. A missing field
//!   fails every constraint except `absent`. The body must be `application/json` or
//!   `application/*+json` (415 otherwise), valid JSON (400 `invalid_json`), without a
//!   duplicate key at any depth (400 `duplicate_json_key`), nested at most 64 deep (400
//!   `json_too_deep`), and at most `body_cap` bytes (413 `body_too_large`).
//! - `when` (destination and rule): `timezone` (required; an IANA zone of the host's
//!   tz database), `days` (`mon`..`sun`; default every day), `hours` (`HH:MM-HH:MM`, end
//!   exclusive, `24:00` allowed as end; a window whose end is before its start crosses
//!   midnight and belongs to the day it starts on). Evaluated on the wall-clock time of
//!   the request in that zone, so DST needs no special case.
//!
//! **Rates.** `rate: N/period` is a token bucket of capacity N refilled continuously at N
//! per period, per workload × destination (destination `rate`) and per workload ×
//! destination × rule (rule `rate`); a request must get a token from both. The buckets
//! are keyed by names, not by the request's path, so no spelling or parameter value of a
//! path escapes them, and they survive reloads ([`RateLimiter`], [`Snapshot::rate_limits`];
//! the proxy answers 429 `rate_limited`).
//!
//! **Denials.** When rules matched the path but none allowed the request, the denial names
//! the nearest rule (the one that got furthest through path → method → query → headers →
//! json → when; ties: the first in file order) and its first failing check. Codes
//! ([`DenyReason::code`]): `unknown_workload`, `uid_not_allowed`,
//! `destination_not_allowed`, `path_not_allowed`, `method_not_allowed`, `invalid_query`,
//! `query_param_not_allowed`, `query_param_repeated`, `query_value_not_allowed`,
//! `query_param_required`, `header_not_allowed`, `header_required`, `header_forbidden`,
//! `duplicate_header`, `body_required`, `json_constraint_failed`, `outside_time_window`.
//! Denial messages never contain header, query or body values.

pub mod addr;
mod body;
pub mod canonical;
mod cases;
pub mod cli;
mod decide;
pub mod diff;
pub mod dns;
mod error;
pub mod expiry;
pub mod explain;
mod matchers;
mod model;
pub(crate) use model::valid_idna_label;
mod offline;
pub(crate) mod position;
mod rate;
mod raw;
mod routes;
pub mod schema;
pub mod suggest;
pub mod trail;
pub mod usage;
mod when;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs;
use std::path::{Path, PathBuf};

pub use addr::{AddrClass, AllowInternal, Cidr, Classified, Embedding, Verdict, classify};
pub use body::{BodyError, DEFAULT_BODY_CAP, Decimal, JsonBody, MAX_JSON_DEPTH, parse_json_body};
pub use canonical::{CanonicalPath, NormalizeOptions, PathError, normalize, normalize_with};
pub use decide::{
    Check, Decision, DenyReason, OVERRIDE_HEADERS, Request, RuleFailure, RuleRef, decide,
};
pub use dns::{Dns, DnsDecision, DnsDeny, DnsUpstream, NamePattern};
pub use error::{PolicyError, PolicyErrors, PolicyWarning};
pub use explain::{
    AddressReport, BindingReport, DnsReport, Explanation, KernelReport, Resolution, binding_report,
    dns_report, explain, host_dns_report, kernel_report,
};
pub use matchers::{
    HeaderConstraint, HeaderRules, JsonRule, MAX_RECORDED_QUERY_NAME, MAX_RECORDED_QUERY_NAMES,
    Pattern, QueryConstraint, QueryRules, ValueMatch, recorded_query_names,
};
pub use model::{
    Binding, Credential, Destination, Host, L4Exception, L4Protocol, MAX_L4_PORTS, Mode,
    PathPattern, PatternSegment, Rule, SecretSource, Selector, TlsMode, Workload, WorkloadId,
};
pub use rate::{RateKey, RateLimit, RateLimited, RateLimiter, RatePeriod, RateScope};
pub use when::TimeWindow;

use position::{Pos, PositionIndex, RootKind, join};

/// One immutable, validated policy: every workload and its compiled rules.
///
/// Cheap to share in an `Arc`; a reload builds a new snapshot and swaps it.
#[derive(Debug, Default)]
pub struct Snapshot {
    workloads: Vec<Workload>,
    by_name: HashMap<String, WorkloadId>,
}

impl Snapshot {
    /// The deny-all snapshot: no workloads.
    pub fn empty() -> Self {
        Snapshot::default()
    }

    /// Loads, validates and compiles every policy file of `dir`.
    ///
    /// Returns all errors of the whole directory at once, sorted by file, line and
    /// column; never a partial snapshot.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyErrors> {
        Self::load_dir_with(dir, LoadOptions::default())
    }

    /// [`Snapshot::load_dir`] with `options`.
    pub fn load_dir_with(dir: &Path, options: LoadOptions) -> Result<Self, PolicyErrors> {
        let files = scan_dir(dir)
            .map_err(|source| {
                PolicyErrors(vec![PolicyError::ReadDir {
                    dir: dir.to_owned(),
                    source,
                }])
            })?
            .files;
        Self::load_files(dir, &files, options)
    }

    /// `policy check`: loads a directory (as the agent does) or one file, and says what a
    /// CI run should hear about besides errors: an empty directory, files the agent would
    /// ignore, a file whose name the agent would not read.
    pub fn check(path: &Path, options: LoadOptions) -> Checked {
        let mut warnings = Vec::new();
        if !path.is_dir() {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if path.exists() && !name.as_deref().is_some_and(is_policy_file) {
                warnings.push(PolicyWarning::NotPolicyName {
                    file: path.to_owned(),
                });
            }
            let result = Self::load_files(path, &[path.to_owned()], options);
            return Checked { result, warnings };
        }
        let scan = match scan_dir(path) {
            Ok(scan) => scan,
            Err(source) => {
                let result = Err(PolicyErrors(vec![PolicyError::ReadDir {
                    dir: path.to_owned(),
                    source,
                }]));
                return Checked { result, warnings };
            }
        };
        warnings.extend(
            scan.ignored
                .into_iter()
                .map(|(path, reason)| PolicyWarning::Ignored { path, reason }),
        );
        if scan.files.is_empty() {
            warnings.push(PolicyWarning::EmptyDirectory {
                dir: path.to_owned(),
            });
        }
        let result = Self::load_files(path, &scan.files, options);
        Checked { result, warnings }
    }

    /// Loads `files` (from `origin`, a directory or the one file) into one snapshot.
    fn load_files(
        origin: &Path,
        files: &[PathBuf],
        options: LoadOptions,
    ) -> Result<Self, PolicyErrors> {
        let dir = origin;
        let mut errors = Vec::new();
        let mut documents = Vec::new();
        for file in files {
            load_file(file, options, &mut documents, &mut errors);
        }
        check_unique(&documents, &mut errors);

        let workloads: Vec<Workload> = documents.into_iter().filter_map(|d| d.workload).collect();
        let mut by_name = HashMap::with_capacity(workloads.len());
        for (i, w) in workloads.iter().enumerate() {
            match u32::try_from(i) {
                Ok(i) => {
                    by_name.insert(w.name.clone(), WorkloadId(i));
                }
                Err(_) => {
                    errors.push(PolicyError::TooManyWorkloads {
                        dir: dir.to_owned(),
                        count: workloads.len(),
                    });
                    break;
                }
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors::sorted(errors));
        }
        Ok(Snapshot { workloads, by_name })
    }

    /// All workloads; a [`WorkloadId`] indexes this slice.
    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    /// The workload with this id.
    pub fn workload(&self, id: WorkloadId) -> Option<&Workload> {
        self.workloads.get(usize::try_from(id.0).ok()?)
    }

    /// The id of the workload with this name.
    pub fn workload_by_name(&self, name: &str) -> Option<WorkloadId> {
        self.by_name.get(name).copied()
    }

    /// The rate limits to charge for a request that [`decide`] allowed with
    /// `Decision::Allow { destination, rule }`: the destination's limit, then the rule's,
    /// each with its bucket key. Pass them to [`RateLimiter::check_all`]. Empty when
    /// neither has a `rate` (or the indices are stale).
    pub fn rate_limits(
        &self,
        workload: WorkloadId,
        destination: usize,
        rule: &RuleRef,
    ) -> impl Iterator<Item = (&RateKey, RateLimit)> + Clone + '_ {
        let rule = rule.index();
        self.workload(workload)
            .and_then(|w| w.destinations.get(destination))
            .into_iter()
            .flat_map(move |d| d.rate_limits(rule))
    }
}

/// How a policy is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Check that every `secret_file` can be opened. The agent does (a credential it
    /// cannot read is an error at load, not at the first request); `policy check` only
    /// with `--secrets`, so that CI runners without the secrets can check policies.
    /// Without it each secret is still checked to be named and well-formed.
    pub secrets: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { secrets: true }
    }
}

/// What [`Snapshot::check`] found.
#[derive(Debug)]
pub struct Checked {
    /// The snapshot, or every error.
    pub result: Result<Snapshot, PolicyErrors>,
    /// Warnings, in directory order.
    pub warnings: Vec<PolicyWarning>,
}

/// A policy directory's entries: the policy files (sorted) and what is ignored, and why.
struct DirScan {
    files: Vec<PathBuf>,
    ignored: Vec<(PathBuf, &'static str)>,
}

fn scan_dir(dir: &Path) -> std::io::Result<DirScan> {
    let mut files = Vec::new();
    let mut ignored = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let path = dir.join(&name);
        let name = name.to_string_lossy();
        if path.is_dir() && name == "tests" {
            // `policy test`'s cases beside the policies: known, not a policy, no warning.
            continue;
        }
        if path.is_dir() {
            ignored.push((
                path,
                "a directory (policy directories are not read recursively)",
            ));
        } else if is_policy_file(&name) {
            files.push(path);
        } else {
            ignored.push((path, ignore_reason(&name)));
        }
    }
    files.sort();
    ignored.sort();
    Ok(DirScan { files, ignored })
}

fn ignore_reason(name: &str) -> &'static str {
    if name.starts_with('.') {
        "a hidden file (the agent reads only *.yaml and *.yml files not starting with '.')"
    } else if name.ends_with('~') || name.ends_with(".swp") {
        "an editor backup or swap file"
    } else {
        "not named *.yaml or *.yml"
    }
}

fn is_policy_file(name: &str) -> bool {
    !name.starts_with('.')
        && !name.ends_with('~')
        && !name.ends_with(".swp")
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// Every `secret_file` of `raw` (absolute, as validation requires) that cannot be opened.
fn unreadable_secrets(raw: &raw::Workload) -> Vec<PolicyError> {
    let mut errors = Vec::new();
    let mut check = |path: String, credential: Option<&raw::Credential>| {
        if let Some(file) = credential.and_then(|c| c.secret_file.as_deref())
            && Path::new(file).is_absolute()
            && fs::File::open(file).is_err()
        {
            errors.push(error::invalid!(InvalidEgress {
                path: format!("{path}.secret_file"),
                value: file.to_owned(),
                reason: "cannot be read (missing or not readable)",
            }));
        }
    };
    for (d, egress) in raw.egress.iter().enumerate() {
        check(
            format!("egress[{d}].credential"),
            egress.credential.as_ref(),
        );
        for (r, rule) in egress.rules.iter().flatten().enumerate() {
            check(
                format!("egress[{d}].rules[{r}].credential"),
                rule.credential.as_ref(),
            );
        }
    }
    errors
}

/// A value's place in the directory, for cross-file errors.
#[derive(Clone)]
struct Place {
    file: PathBuf,
    path: String,
    pos: Pos,
}

/// One workload document of a file, with what the cross-file checks need.
struct Document {
    name: String,
    name_at: Place,
    /// The selector as written, if exactly one was given.
    selector: Option<(Selector, Place)>,
    /// The validated workload, if the document is valid.
    workload: Option<Workload>,
}

/// Reads one file: its documents go to `documents`, its problems to `errors`.
fn load_file(
    file: &Path,
    options: LoadOptions,
    documents: &mut Vec<Document>,
    errors: &mut Vec<PolicyError>,
) {
    let text = match fs::read_to_string(file) {
        Ok(text) => text,
        Err(source) => {
            errors.push(PolicyError::ReadFile {
                file: file.to_owned(),
                source,
            });
            return;
        }
    };
    let index = match PositionIndex::build(&text) {
        Ok(index) => index,
        Err(e) => {
            errors.push(PolicyError::Syntax {
                file: file.to_owned(),
                line: e.pos.line,
                col: e.pos.col,
                message: e.message,
            });
            return;
        }
    };
    if let Some(pos) = index.second_document() {
        errors.push(PolicyError::MultipleDocuments {
            file: file.to_owned(),
            line: pos.line,
            col: pos.col,
        });
        return;
    }
    let raws: Vec<(String, raw::Workload)> = match index.root() {
        RootKind::Empty => {
            errors.push(PolicyError::EmptyFile {
                file: file.to_owned(),
                line: 1,
                col: 1,
            });
            return;
        }
        RootKind::Sequence => match serde_yaml::from_str::<Vec<raw::Workload>>(&text) {
            Ok(list) => list
                .into_iter()
                .enumerate()
                .map(|(i, w)| (format!("[{i}]"), w))
                .collect(),
            Err(e) => return errors.push(schema_error(file, &text, &e)),
        },
        RootKind::Mapping | RootKind::Scalar => match serde_yaml::from_str(&text) {
            Ok(w) => vec![(String::new(), w)],
            Err(e) => return errors.push(schema_error(file, &text, &e)),
        },
    };

    for (prefix, raw) in raws {
        let place = |rel: &str| {
            let path = join(&prefix, rel);
            Place {
                file: file.to_owned(),
                pos: index.locate(&path),
                path,
            }
        };
        let selector = model::written_selector(&raw.select).map(|(s, at)| (s, place(at)));
        let name = raw.workload.clone();
        let name_at = place("workload");
        if options.secrets {
            errors.extend(
                unreadable_secrets(&raw)
                    .into_iter()
                    .map(|e| e.located(file, &prefix, &index)),
            );
        }
        let workload = match Workload::try_from(raw) {
            Ok(mut w) => {
                w.source = file.to_owned();
                Some(w)
            }
            Err(errs) => {
                errors.extend(errs.into_iter().map(|e| e.located(file, &prefix, &index)));
                None
            }
        };
        documents.push(Document {
            name,
            name_at,
            selector,
            workload,
        });
    }
}

/// Workload names and selectors are unique across the directory; the second occurrence
/// is the error, and names the first.
fn check_unique(documents: &[Document], errors: &mut Vec<PolicyError>) {
    let mut names: HashMap<&str, &Place> = HashMap::new();
    let mut selectors: HashMap<&Selector, (&str, &Place)> = HashMap::new();
    for doc in documents {
        match names.entry(&doc.name) {
            Entry::Occupied(first) => {
                let first = *first.get();
                errors.push(PolicyError::DuplicateWorkload {
                    file: doc.name_at.file.clone(),
                    line: doc.name_at.pos.line,
                    col: doc.name_at.pos.col,
                    path: doc.name_at.path.clone(),
                    name: doc.name.clone(),
                    first_file: first.file.clone(),
                    first_line: first.pos.line,
                    first_col: first.pos.col,
                });
            }
            Entry::Vacant(v) => {
                v.insert(&doc.name_at);
            }
        }
        let Some((selector, at)) = &doc.selector else {
            continue;
        };
        match selectors.entry(selector) {
            Entry::Occupied(first) => {
                let (first_workload, first) = *first.get();
                errors.push(PolicyError::DuplicateSelector {
                    file: at.file.clone(),
                    line: at.pos.line,
                    col: at.pos.col,
                    path: at.path.clone(),
                    selector: selector.to_string(),
                    first_workload: first_workload.to_owned(),
                    first_file: first.file.clone(),
                    first_line: first.pos.line,
                    first_col: first.pos.col,
                });
            }
            Entry::Vacant(v) => {
                v.insert((&doc.name, at));
            }
        }
    }
}

/// A serde_yaml error (unknown field, missing field, wrong type, or a YAML problem the
/// indexer accepted) with its own position, and without the position in the message.
fn schema_error(file: &Path, text: &str, e: &serde_yaml::Error) -> PolicyError {
    let mut message = e.to_string();
    let (line, col) = match e.location() {
        Some(loc) => {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(at) = message.find(&suffix) {
                message.replace_range(at..at + suffix.len(), "");
            }
            // Kept inside the file (serde_yaml, too, can point past the end).
            let pos = position::Pos {
                line: loc.line(),
                col: loc.column(),
            }
            .within(text);
            (pos.line, pos.col)
        }
        None => (1, 1),
    };
    // serde_yaml writes the path of a list item as `.[0].field`; we write `[0].field`.
    if message.starts_with(".[") {
        message.remove(0);
    }
    PolicyError::Schema {
        file: file.to_owned(),
        line,
        col,
        message,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    const BASE: &str = "\
workload: billing
select:
  cgroup: /system.slice/billing.service
egress:
  - host: api.example.com
    port: 443
    rules:
      - id: create-charge
        methods: [POST, GET]
        path: /v1/charges
";

    /// Loads `files` from a fresh directory; errors are displayed with the directory
    /// prefix removed.
    fn load(files: &[(&str, &str)]) -> Result<Snapshot, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        let prefix = format!("{}/", dir.path().display());
        Snapshot::load_dir(dir.path()).map_err(|e| {
            e.iter()
                .map(|e| e.to_string().replace(&prefix, ""))
                .collect()
        })
    }

    fn errors(files: &[(&str, &str)]) -> Vec<String> {
        match load(files) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e,
        }
    }

    /// BASE with `from` replaced by `to`, loaded as `p.yaml`: the single error.
    fn error_with(from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from}");
        let errs = errors(&[("p.yaml", &BASE.replacen(from, to, 1))]);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        errs.into_iter().next().unwrap()
    }

    #[test]
    fn max_connections_is_validated() {
        assert_eq!(
            error_with(
                "workload: billing\n",
                "workload: billing\nmax_connections: 0\n"
            ),
            "p.yaml:2:18: max_connections: 0 is not a valid connection limit (1 to 1000000)"
        );
        let snap = load(&[(
            "p.yaml",
            &BASE.replace(
                "workload: billing\n",
                "workload: billing\nmax_connections: 64\n",
            ),
        )])
        .unwrap();
        assert_eq!(snap.workload(WorkloadId(0)).unwrap().max_connections(), 64);
        let snap = load(&[("p.yaml", BASE)]).unwrap();
        assert_eq!(
            snap.workload(WorkloadId(0)).unwrap().max_connections(),
            model::DEFAULT_MAX_CONNECTIONS
        );
    }

    #[test]
    fn request_integrity_rules_in_policy_check() {
        // CONNECT opens a tunnel no rule can inspect: never grantable.
        assert_eq!(
            error_with("[POST, GET]", "[GET, CONNECT]"),
            "p.yaml:9:24: egress[0].rules[0].methods[1]: \"CONNECT\" cannot be granted: \
             CONNECT opens a tunnel that no rule can inspect (the proxy answers it with 405)"
        );
        // A rule cannot constrain the header a credential is injected into.
        let text = BASE.replace(
            "    rules:\n",
            "    upstream_tls: true\n    credential: {header: Authorization, secret_file: /dev/null}\n    rules:\n",
        ) + "        headers:\n          authorization: required\n";
        let errs = errors(&[("p.yaml", &text)]);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].contains("rules[0].headers.authorization")
                && errs[0].contains("a credential is injected into this header"),
            "{errs:#?}"
        );
        // Trailing slashes in patterns are kept; `**/` is refused.
        let snap = load(&[("p.yaml", &BASE.replace("/v1/charges", "/v1/charges/"))]).unwrap();
        let w = snap.workload(WorkloadId(0)).unwrap();
        assert!(w.destinations[0].rules()[0].path().has_trailing_slash());
        let e = error_with("/v1/charges", "/v1/**/");
        assert!(
            e.contains("'**' is allowed only as the last segment"),
            "{e}"
        );
        // Underscore header names: an explicit opt-in per destination.
        let snap = load(&[(
            "p.yaml",
            &BASE.replace(
                "    port: 443\n",
                "    port: 443\n    allow_underscore_headers: true\n",
            ),
        )])
        .unwrap();
        let w = snap.workload(WorkloadId(0)).unwrap();
        assert!(w.destinations[0].allows_underscore_headers());
        let snap = load(&[("p.yaml", BASE)]).unwrap();
        assert!(!snap.workload(WorkloadId(0)).unwrap().destinations[0].allows_underscore_headers());
    }

    #[test]
    fn allow_internal_and_numeric_hosts_in_policy_check() {
        use crate::policy::{AllowInternal, Cidr};
        let with =
            |field: &str| BASE.replace("    port: 443\n", &format!("    port: 443\n{field}"));
        let dest = |text: &str| {
            let snap = load(&[("p.yaml", text)]).unwrap_or_else(|e| panic!("{e:#?}"));
            snap.workload(WorkloadId(0)).unwrap().destinations[0]
                .allow_internal()
                .clone()
        };
        assert_eq!(dest(BASE), AllowInternal::No);
        assert_eq!(
            dest(&with("    allow_internal: false\n")),
            AllowInternal::No
        );
        assert_eq!(
            dest(&with("    allow_internal: true\n")),
            AllowInternal::All
        );
        assert_eq!(
            dest(&with("    allow_internal: [127.0.0.0/8, \"fd00::/8\"]\n")),
            AllowInternal::Ranges(vec![
                Cidr::new("127.0.0.0".parse().unwrap(), 8),
                Cidr::new("fd00::".parse().unwrap(), 8),
            ])
        );
        let one = |text: &str| {
            let errs = errors(&[("p.yaml", text)]);
            assert_eq!(errs.len(), 1, "{errs:#?}");
            errs.into_iter().next().unwrap()
        };
        assert_eq!(
            one(&with("    allow_internal: [127.0.0.0/8, 10.0.0.1/8]\n")),
            "p.yaml:7:35: egress[0].allow_internal[1]: \"10.0.0.1/8\": host bits are set; \
             write the network address"
        );
        assert_eq!(
            one(&with("    allow_internal: [localhost]\n")),
            "p.yaml:7:22: egress[0].allow_internal[0]: \"localhost\": expected ADDRESS/PREFIX, \
             e.g. 192.0.2.10/32"
        );
        assert_eq!(
            one(&with("    allow_internal: []\n")),
            "p.yaml:7:21: egress[0].allow_internal: \"[]\": an empty list allows nothing; omit \
             `allow_internal` (or write `false`)"
        );
        let e = one(&with("    allow_internal: yes\n"));
        assert!(
            e.starts_with("p.yaml:7:21: egress[0].allow_internal: ")
                && e.contains("`true`, `false` or a list of CIDRs"),
            "{e}"
        );
        let e = one(&with("    allow_internal: true\n")
            .replace("host: api.example.com", "host: \"127.0.0.1\""));
        assert!(
            e.starts_with("p.yaml:7:21: egress[0].allow_internal: \"127.0.0.1\": an IP-literal")
                && e.contains("applies to DNS names only"),
            "{e}"
        );
        // An L4 exception has no allow_internal.
        let l4 = "workload: db\nselect:\n  cgroup: /db\negress:\n  - cidr: 10.0.0.0/8\n    ports: [5432]\n    allow_internal: true\n";
        let e = one(l4);
        assert!(
            e.starts_with("p.yaml:5:11: egress[0].cidr: ") && e.contains("HTTP fields"),
            "{e}"
        );
        // Numeric-looking names: refused with the position of the value.
        for host in [
            "0x7f.0x21",
            "2130706433",
            "127.1",
            "0xa9fea9fe",
            "017700000001",
        ] {
            let e = one(&BASE.replace("host: api.example.com", &format!("host: {host}")));
            assert!(
                e.starts_with(&format!(
                    "p.yaml:5:11: egress[0].host: \"{host}\" is not a valid host: the last label"
                )) && e.contains("inet_aton"),
                "{e}"
            );
        }
        let e = one(&BASE.replace("host: api.example.com", "host: bücher.example"));
        assert!(
            e.starts_with("p.yaml:5:11: egress[0].host: \"bücher.example\" is not a valid host: a DNS name is ASCII")
                && e.contains("xn--"),
            "{e}"
        );
    }

    #[test]
    fn tls_credential_l4_and_dns_errors_name_file_line_and_column() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "    port: 443\n",
                "    port: 443\n    tls: maybe\n",
                "p.yaml:7:10: egress[0].tls: \"maybe\": expected `none`, `passthrough` or `intercept`",
            ),
            (
                "  - host: api.example.com\n",
                "  - host: 192.0.2.7\n    tls: intercept\n",
                "p.yaml:6:10: egress[0].tls: \"192.0.2.7\": TLS destinations are matched by SNI, which is a DNS name: `host` must be a name",
            ),
            (
                "    port: 443\n",
                "    port: 443\n    tls: intercept\n    credential:\n      header: Authorization\n      secret_file: /nonexistent/secret\n",
                "p.yaml:10:20: egress[0].credential.secret_file: \"/nonexistent/secret\": cannot be read (missing or not readable)",
            ),
            (
                "    port: 443\n",
                "    port: 443\n    credential:\n      header: Authorization\n      secret_file: /etc/hostname\n",
                "p.yaml:8:7: egress[0].credential: \"Authorization\": the credential would travel in cleartext: set `upstream_tls: true` (or name a loopback IP as host)",
            ),
            (
                "    port: 443\n",
                "    port: 443\n    tls: intercept\n    credential:\n      header: Authorization\n      format: Bearer\n      secret_file: /etc/hostname\n",
                "p.yaml:10:15: egress[0].credential.format: \"Bearer\": must contain {secret}",
            ),
            (
                "egress:\n",
                "dns: sometimes\negress:\n",
                "p.yaml:4:6: dns: \"sometimes\": expected `system`, a list of resolver addresses, or {names: [...], types: [...], resolvers: [...]}",
            ),
            (
                "egress:\n",
                "egress:\n  - cidr: 192.0.2.1/24\n    ports: [5432]\n",
                "p.yaml:5:11: egress[0].cidr: \"192.0.2.1/24\": host bits are set; write the network address",
            ),
            (
                "egress:\n",
                "egress:\n  - cidr: 192.0.2.0/24\n    ports: [0]\n",
                "p.yaml:6:13: egress[0].ports[0]: 0 is not a port (expected 1..=65535)",
            ),
            (
                "egress:\n",
                "egress:\n  - cidr: 192.0.2.0/24\n    ports: [53]\n    protocol: sctp\n",
                "p.yaml:7:15: egress[0].protocol: \"sctp\": expected `tcp` or `udp`",
            ),
        ];
        for (from, to, want) in cases {
            assert_eq!(error_with(from, to), *want);
        }
    }

    #[test]
    fn valid_file_loads() {
        let snap = load(&[("billing.yaml", BASE)]).unwrap();
        assert_eq!(snap.workloads().len(), 1);
        let id = snap.workload_by_name("billing").unwrap();
        assert_eq!(id, WorkloadId(0));
        let w = snap.workload(id).unwrap();
        assert_eq!(w.name, "billing");
        assert_eq!(
            w.selector,
            Selector::Cgroup("/system.slice/billing.service".into())
        );
        assert!(w.source.ends_with("billing.yaml"));
        let d = &w.destinations[0];
        assert_eq!(d.host, Host::Name("api.example.com".into()));
        assert_eq!(d.port, 443);
        assert_eq!(d.rules()[0].id(), "create-charge");
        assert_eq!(d.rules()[0].methods().collect::<Vec<_>>(), ["POST", "GET"]);
        assert_eq!(d.rules()[0].path().as_str(), "/v1/charges");
        assert!(snap.workload(WorkloadId(1)).is_none());
        assert!(snap.workload_by_name("nope").is_none());
    }

    #[test]
    fn empty_directory_is_deny_all() {
        let snap = load(&[]).unwrap();
        assert!(snap.workloads().is_empty());
        assert!(Snapshot::empty().workloads().is_empty());
    }

    #[test]
    fn missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let errs = Snapshot::load_dir(&missing).unwrap_err();
        assert_eq!(errs.len(), 1);
        let msg = errs.to_string();
        assert!(
            msg.starts_with(&format!(
                "{}: cannot read policy directory: ",
                missing.display()
            )),
            "{msg}"
        );
        assert!(matches!(&errs.0[0], PolicyError::ReadDir { dir, .. } if *dir == missing));
    }

    #[test]
    fn only_policy_files_are_read() {
        let snap = load(&[
            ("a.yaml", BASE),
            ("b.yml", &BASE.replace("billing", "b")),
            (".hidden.yaml", "garbage: ["),
            ("c.yaml~", "garbage: ["),
            (".c.yaml.swp", "garbage: ["),
            ("notes.txt", "garbage: ["),
            ("d.json", "{"),
        ])
        .unwrap();
        let names: Vec<_> = snap.workloads().iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["billing", "b"]);
    }

    #[test]
    fn list_file() {
        let text = "\
- workload: a
  select: {systemd_unit: a.service}
  egress: []
- workload: b
  select: {systemd_unit: b.service}
  egress:
    - host: \"::1\"
      port: 8080
      rules: [{id: r, methods: [GET], path: /}]
";
        let snap = load(&[("list.yaml", text)]).unwrap();
        let names: Vec<_> = snap.workloads().iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let b = snap.workload(WorkloadId(1)).unwrap();
        assert_eq!(b.destinations[0].host.to_string(), "::1");

        let bad = text.replace("b.service", "b.socket");
        assert_eq!(
            errors(&[("list.yaml", &bad)]),
            [
                "list.yaml:5:26: [1].select.systemd_unit: \"b.socket\" is not a valid systemd \
                 unit: must end in .service, .scope or .slice"
            ]
        );
    }

    #[test]
    fn malformed_yaml() {
        let errs = errors(&[("p.yaml", "workload: [billing\nselect: x\n")]);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("p.yaml:2:7: malformed YAML: "),
            "{errs:?}"
        );
        let errs = errors(&[("p.yaml", "a: b\n  c: d\n")]);
        assert!(
            errs[0].starts_with("p.yaml:2:4: malformed YAML: "),
            "{errs:?}"
        );
    }

    #[test]
    fn empty_and_multi_document_files() {
        assert_eq!(
            errors(&[("p.yaml", "# nothing yet\n")]),
            ["p.yaml:1:1: the file defines no workload"]
        );
        assert_eq!(
            errors(&[("p.yaml", &format!("{BASE}---\n{BASE}"))]),
            [
                "p.yaml:11:1: a second YAML document; write several workloads as a YAML list \
                 instead"
            ]
        );
    }

    #[test]
    fn unknown_field() {
        assert_eq!(
            error_with(
                "    port: 443\n",
                "    port: 443\n    tls_mode: intercept\n"
            ),
            "p.yaml:7:5: egress[0]: unknown field `tls_mode`, expected one of `host`, `port`, \
             `path_params`, `allow_underscore_headers`, `allow_internal`, `rate`, `when`, `expires`, `rules`, `cidr`, \
             `ports`, `protocol`, `tls`, `upstream_tls`, `credential`"
        );
        assert_eq!(
            error_with("workload: billing\n", "workload: billing\nmodes: audit\n"),
            "p.yaml:2:1: unknown field `modes`, expected one of `workload`, `select`, `mode`, \
             `body_cap`, `max_connections`, `egress`, `dns`"
        );
    }

    #[test]
    fn wrong_type_and_missing_field() {
        assert_eq!(
            error_with("port: 443", "port: \"443\""),
            "p.yaml:6:11: egress[0].port: invalid type: string \"443\", expected i64"
        );
        assert_eq!(
            error_with("methods: [POST, GET]", "methods: POST"),
            "p.yaml:9:18: egress[0].rules[0].methods: invalid type: string \"POST\", \
             expected a sequence"
        );
        assert_eq!(
            error_with("        path: /v1/charges\n", ""),
            "p.yaml:8:9: egress[0].rules[0]: missing field `path`"
        );
    }

    #[test]
    fn one_error_per_kind_with_position() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "workload: billing",
                "workload: Billing",
                "p.yaml:1:11: workload: \"Billing\" is not a valid workload name \
                 (expected [a-z0-9][a-z0-9_-]*)",
            ),
            (
                "  cgroup: /system.slice/billing.service",
                "  cgroup: /system.slice/billing.service\n  systemd_unit: billing.service",
                "p.yaml:4:17: select.systemd_unit: select exactly one of `cgroup` or \
                 `systemd_unit`, not both",
            ),
            (
                "select:\n  cgroup: /system.slice/billing.service",
                "select: {}",
                "p.yaml:2:9: select: select needs one of `cgroup` or `systemd_unit`",
            ),
            (
                "/system.slice/billing.service",
                "/system.slice/../billing.service",
                "p.yaml:3:11: select.cgroup: \"/system.slice/../billing.service\" is not a \
                 valid cgroup path: must not contain '.' or '..' segments",
            ),
            (
                "/system.slice/billing.service",
                "/system.slice//billing.service",
                "p.yaml:3:11: select.cgroup: \"/system.slice//billing.service\" is not a \
                 valid cgroup path: must not contain empty segments ('//')",
            ),
            (
                "/system.slice/billing.service",
                "/system.slice/",
                "p.yaml:3:11: select.cgroup: \"/system.slice/\" is not a valid cgroup path: \
                 must not end with '/'",
            ),
            (
                "/system.slice/billing.service",
                "\"/\"",
                "p.yaml:3:11: select.cgroup: \"/\" is not a valid cgroup path: the root \
                 cgroup cannot be a workload",
            ),
            (
                "/system.slice/billing.service",
                "system.slice/billing.service",
                "p.yaml:3:11: select.cgroup: \"system.slice/billing.service\" is not a valid \
                 cgroup path: must be an absolute path starting with '/'",
            ),
            (
                "cgroup: /system.slice/billing.service",
                "systemd_unit: billing",
                "p.yaml:3:17: select.systemd_unit: \"billing\" is not a valid systemd unit: \
                 must end in .service, .scope or .slice",
            ),
            (
                "cgroup: /system.slice/billing.service",
                "systemd_unit: /x/billing.service",
                "p.yaml:3:17: select.systemd_unit: \"/x/billing.service\" is not a valid \
                 systemd unit: must be a unit name, not a path",
            ),
            (
                "host: api.example.com",
                "host: api.example.com:443",
                "p.yaml:5:11: egress[0].host: \"api.example.com:443\" is not a valid host: is \
                 neither a DNS name nor an IP address (write the port in `port:`)",
            ),
            (
                "host: api.example.com",
                "host: api..example.com",
                "p.yaml:5:11: egress[0].host: \"api..example.com\" is not a valid host: a DNS \
                 name has no empty labels (and no trailing '.')",
            ),
            (
                "host: api.example.com",
                "host: \"[::1\"",
                "p.yaml:5:11: egress[0].host: \"[::1\" is not a valid host: is not a valid \
                 bracketed IPv6 address",
            ),
            (
                "port: 443",
                "port: 0",
                "p.yaml:6:11: egress[0].port: 0 is not a port (expected 1..=65535)",
            ),
            (
                "port: 443",
                "port: 70000",
                "p.yaml:6:11: egress[0].port: 70000 is not a port (expected 1..=65535)",
            ),
            (
                "    rules:\n      - id: create-charge\n        methods: [POST, GET]\n        \
                 path: /v1/charges\n",
                "    rules: []\n",
                "p.yaml:7:12: egress[0].rules: a destination needs at least one rule",
            ),
            (
                "id: create-charge",
                "id: create charge",
                "p.yaml:8:13: egress[0].rules[0].id: \"create charge\" is not a valid rule id \
                 (expected [A-Za-z0-9_.-]+)",
            ),
            (
                "methods: [POST, GET]",
                "methods: []",
                "p.yaml:9:18: egress[0].rules[0].methods: a rule needs at least one method",
            ),
            (
                "methods: [POST, GET]",
                "methods: [POST, get]",
                "p.yaml:9:25: egress[0].rules[0].methods[1]: \"get\" is not an uppercase HTTP \
                 method",
            ),
            (
                "methods: [POST, GET]",
                "methods: [\"*\"]",
                "p.yaml:9:19: egress[0].rules[0].methods[0]: \"*\" is not allowed: list the \
                 methods explicitly",
            ),
            (
                "methods: [POST, GET]",
                "methods: [POST, POST]",
                "p.yaml:9:25: egress[0].rules[0].methods[1]: \"POST\" is listed twice",
            ),
            (
                "path: /v1/charges",
                "path: v1/charges",
                "p.yaml:10:15: egress[0].rules[0].path: \"v1/charges\" is not a valid path \
                 pattern: must start with '/'",
            ),
            (
                "path: /v1/charges",
                "path: /**/charges",
                "p.yaml:10:15: egress[0].rules[0].path: \"/**/charges\" is not a valid path \
                 pattern: '**' is allowed only as the last segment",
            ),
            (
                "path: /v1/charges",
                "path: /v1//charges",
                "p.yaml:10:15: egress[0].rules[0].path: \"/v1//charges\" is not a valid path \
                 pattern: empty segment ('//'): requests with empty segments are always \
                 rejected",
            ),
            (
                "path: /v1/charges",
                "path: /v1/ch{x}",
                "p.yaml:10:15: egress[0].rules[0].path: \"/v1/ch{x}\" is not a valid path \
                 pattern: segment \"ch{x}\": a parameter is written {name} or {name:REGEX}, \
                 with a name of [A-Za-z_][A-Za-z0-9_]*, and spans a whole segment",
            ),
            (
                "path: /v1/charges",
                "path: /v1/a%2fb",
                "p.yaml:10:15: egress[0].rules[0].path: \"/v1/a%2fb\" is not a valid path \
                 pattern: segment \"a%2fb\": an encoded '/' is not allowed",
            ),
            (
                "path: /v1/charges",
                "path: /v1/../charges",
                "p.yaml:10:15: egress[0].rules[0].path: \"/v1/../charges\" is not a valid \
                 path pattern: segment \"..\": dot-segments ('.' and '..') are not allowed",
            ),
            (
                "path: /v1/charges",
                "path: /v1/%63harges/",
                "p.yaml:10:15: egress[0].rules[0].path: \"/v1/%63harges/\" is not in canonical \
                 form (requests are matched as \"/v1/charges/\"); write \"/v1/charges/\"",
            ),
        ];
        for (from, to, expected) in cases {
            assert_eq!(error_with(from, to), *expected, "{from:?} -> {to:?}");
        }
    }

    #[test]
    fn duplicates_within_a_workload() {
        let text = format!(
            "{BASE}      - id: create-charge\n        methods: [GET]\n        path: /x\n  \
             - host: API.example.com\n    port: 443\n    rules:\n      - id: other\n        \
             methods: [GET]\n        path: /\n"
        );
        assert_eq!(
            errors(&[("p.yaml", &text)]),
            [
                "p.yaml:11:13: egress[0].rules[1].id: rule id \"create-charge\" is already used \
                 at egress[0].rules[0].id",
                "p.yaml:14:11: egress[1].host: destination API.example.com:443 is already \
                 defined at egress[0]",
            ]
        );
    }

    #[test]
    fn duplicate_workload_across_files() {
        assert_eq!(
            errors(&[
                ("a.yaml", BASE),
                (
                    "b.yaml",
                    &BASE.replace("cgroup: /system.slice/billing.service", "cgroup: /b")
                ),
            ]),
            ["b.yaml:1:11: workload: workload \"billing\" is already defined at a.yaml:1:11"]
        );
    }

    #[test]
    fn duplicate_selector() {
        assert_eq!(
            errors(&[
                ("a.yaml", BASE),
                ("b.yaml", &BASE.replace("workload: billing", "workload: b"))
            ]),
            [
                "b.yaml:3:11: select.cgroup: cgroup /system.slice/billing.service is already \
                 selected by workload \"billing\" at a.yaml:3:11"
            ]
        );
        let unit = "- workload: x\n  select: {systemd_unit: x.service}\n  egress: []\n\
                    - workload: y\n  select: {systemd_unit: x.service}\n  egress: []\n";
        assert_eq!(
            errors(&[("u.yaml", unit)]),
            [
                "u.yaml:5:26: [1].select.systemd_unit: systemd_unit x.service is already \
                 selected by workload \"x\" at u.yaml:2:26"
            ]
        );
    }

    #[test]
    fn all_errors_at_once_sorted() {
        let bad_b = BASE
            .replace("workload: billing", "workload: B")
            .replace("port: 443", "port: 0")
            .replace("[POST, GET]", "[post, GET]");
        let errs = errors(&[
            ("c.yaml", "workload: [\n"),
            (
                "a.yaml",
                &BASE.replace("api.example.com", "-api.example.com"),
            ),
            ("b.yaml", &bad_b),
            (
                "d.yaml",
                "workload: d\nselect: {cgroup: /d}\negress: []\nextra: 1\n",
            ),
        ]);
        let at: Vec<&str> = errs.iter().map(|e| e.split(": ").next().unwrap()).collect();
        assert_eq!(
            at,
            [
                "a.yaml:5:11",
                "b.yaml:1:11",
                "b.yaml:3:11",
                "b.yaml:6:11",
                "b.yaml:9:19",
                "c.yaml:2:1",
                "d.yaml:4:1"
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn error_accessors() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("p.yaml"),
            BASE.replace("port: 443", "port: 0"),
        )
        .unwrap();
        let errs = Snapshot::load_dir(dir.path()).unwrap_err();
        let e = &errs.0[0];
        assert_eq!(e.file(), Some(dir.path().join("p.yaml").as_path()));
        assert_eq!(e.position(), Some((6, 11)));
        assert_eq!(e.path(), Some("egress[0].port"));
        assert!(matches!(e, PolicyError::InvalidPort { value: 0, .. }));
        assert!(!errs.is_empty());
    }

    /// BASE with `extra` added to the rule (8-space indented lines after `path:`).
    fn rule_error(extra: &str) -> Vec<String> {
        let text = BASE.replace(
            "        path: /v1/charges\n",
            &format!("        path: /v1/charges\n{extra}"),
        );
        errors(&[("p.yaml", &text)])
    }

    #[test]
    fn v1_error_messages_name_file_line_and_column() {
        const CG: &str = "  cgroup: /system.slice/billing.service\n";
        let base_cases: &[(&str, &str)] = &[
            (CG, "  cgroup: /system.slice/billing.service\n  uid: -1\n"),
            (
                CG,
                "  cgroup: /system.slice/billing.service\n  uid: 4294967295\n",
            ),
            ("/system.slice/billing.service", "/system.slice/**x"),
            ("/system.slice/billing.service", "/**"),
            (
                "/system.slice/billing.service",
                "/system.slice/[ab].service",
            ),
            ("workload: billing\n", "workload: billing\nmode: strict\n"),
            ("workload: billing\n", "workload: billing\nbody_cap: 1GiB\n"),
            ("    port: 443\n", "    port: 443\n    rate: 100/min\n"),
            (
                "    port: 443\n",
                "    port: 443\n    path_params: yes please\n",
            ),
            ("path: /v1/charges", "path: /v1/{id:[0-9}"),
            ("path: /v1/charges", "path: /v1/{id:[0-9]+}x"),
            ("path: /v1/charges", "path: /v1/a;b"),
        ];
        let mut got: Vec<String> = base_cases
            .iter()
            .map(|(from, to)| error_with(from, to))
            .collect();
        for extra in [
            "        rate: 0/second\n",
            "        when: {hours: '08:00-18:00', timezone: Mars/Olympus}\n",
            "        when: {days: [mon, funday], timezone: UTC}\n",
            "        when: {hours: '8-18', timezone: UTC}\n",
            "        when: {timezone: UTC}\n",
            "        when: {hours: '08:00-18:00'}\n",
            "        query: {a: nope}\n",
            "        query: {a: [absent]}\n",
            "        query: {a: {pattern: '('}}\n",
            "        query: {a: {one_of: [x], pattern: y}}\n",
            "        query: {a: any, a: absent}\n",
            "        query: {a: any}\n        query_repeat: [b]\n",
            "        headers: {'bad name': required}\n",
            "        headers: {X-A: required, x-a: forbidden}\n",
            "        headers: {x-a: maybe}\n",
            "        headers: {x-a: {pattern: '[a-'}}\n",
            "        json:\n          - {field: amount}\n",
            "        json:\n          - {field: amount, min: 10, max: 1}\n",
            "        json:\n          - {field: 'a..b', max: 1}\n",
            "        json:\n          - {field: a, pattern: '(?P<x'}\n",
            "        json:\n          - {field: a, maxlen: 3}\n",
        ] {
            let errs = rule_error(extra);
            assert_eq!(errs.len(), 1, "{extra}: {errs:#?}");
            got.extend(errs);
        }
        let expected = [
            "p.yaml:4:8: select.uid: -1 is not a uid (expected 0..=4294967294)",
            "p.yaml:4:8: select.uid: 4294967295 is not a uid (expected 0..=4294967294)",
            "p.yaml:3:11: select.cgroup: \"/system.slice/**x\" is not a valid cgroup path: '**' \
             must be a whole path component",
            "p.yaml:3:11: select.cgroup: \"/**\" is not a valid cgroup path: a glob needs at \
             least one literal character (it would select every cgroup)",
            "p.yaml:3:11: select.cgroup: \"/system.slice/[ab].service\" is not a valid cgroup \
             path: only '*' and '**' globs are supported",
            "p.yaml:2:7: mode: unknown variant `strict`, expected `enforce` or `audit`",
            "p.yaml:2:11: body_cap: \"1GiB\" is not a valid body cap: expected a number of \
             bytes, optionally with KiB or MiB, e.g. 64KiB",
            "p.yaml:7:11: egress[0].rate: \"100/min\" is not a valid rate: expected N/second, \
             N/minute or N/hour, e.g. 100/minute",
            "p.yaml:7:18: egress[0].path_params: invalid type: string \"yes please\", expected \
             a boolean",
            "p.yaml:10:15: egress[0].rules[0].path: \"/v1/{id:[0-9}\" is not a valid path \
             pattern: parameter {id}: \"[0-9\" is not a valid regular expression: unclosed \
             character class",
            "p.yaml:10:15: egress[0].rules[0].path: \"/v1/{id:[0-9]+}x\" is not a valid path \
             pattern: segment \"{id:[0-9]+}x\": a parameter spans a whole segment",
            "p.yaml:10:15: egress[0].rules[0].path: \"/v1/a;b\" is not a valid path pattern: \
             segment \"a;b\": path parameters (';') are not allowed (set `path_params: true` \
             on the destination to allow them)",
            "p.yaml:11:15: egress[0].rules[0].rate: \"0/second\" is not a valid rate: the count \
             must be at least 1",
            "p.yaml:11:48: egress[0].rules[0].when.timezone: \"Mars/Olympus\" is not a time \
             zone of the tz database (failed to find time zone `Mars/Olympus` in time zone \
             database)",
            "p.yaml:11:28: egress[0].rules[0].when.days[1]: \"funday\" is not a day (expected \
             mon, tue, wed, thu, fri, sat or sun)",
            "p.yaml:11:23: egress[0].rules[0].when.hours: \"8-18\" is not a time window \
             (expected \"HH:MM-HH:MM\", e.g. \"08:00-18:00\"; 24:00 only as end)",
            "p.yaml:11:15: egress[0].rules[0].when: a `when` needs `days` or `hours` (or both)",
            "p.yaml:11:15: egress[0].rules[0].when: missing field `timezone`",
            "p.yaml:11:20: egress[0].rules[0].query.a: invalid value: string \"nope\", \
             expected any, absent, present, {one_of|pattern|not_one_of|not_pattern, optional}",
            "p.yaml:11:20: egress[0].rules[0].query.a: invalid type: sequence, expected any, \
             absent, present, {one_of|pattern|not_one_of|not_pattern, optional}",
            "p.yaml:11:30: egress[0].rules[0].query.a.pattern: \"(\" is not a valid regular \
             expression: unclosed group",
            "p.yaml:11:43: egress[0].rules[0].query.a.pattern: give either `one_of` or \
             `pattern`, not both",
            "p.yaml:11:16: egress[0].rules[0].query: duplicate key `a`",
            "p.yaml:12:24: egress[0].rules[0].query_repeat[0]: \"b\" is not listed in `query`",
            "p.yaml:11:31: egress[0].rules[0].headers.bad name: \"bad name\" is not a valid \
             header name",
            "p.yaml:11:39: egress[0].rules[0].headers.x-a: header x-a is listed twice (header \
             names are case-insensitive)",
            "p.yaml:11:24: egress[0].rules[0].headers.x-a: invalid value: string \"maybe\", \
             expected required, forbidden, {one_of|pattern|not_one_of|not_pattern, optional}",
            "p.yaml:11:34: egress[0].rules[0].headers.x-a.pattern: \"[a-\" is not a valid \
             regular expression: unclosed character class",
            "p.yaml:12:13: egress[0].rules[0].json[0]: the entry for \"amount\" has no \
             constraint (one_of, min, max, pattern, max_len or absent)",
            "p.yaml:12:34: egress[0].rules[0].json[0].min: min 10 is greater than max 1",
            "p.yaml:12:21: egress[0].rules[0].json[0].field: \"a..b\" is not a field path \
             (dot-separated keys and array indexes, e.g. customer.country or items.0.sku)",
            "p.yaml:12:33: egress[0].rules[0].json[0].pattern: \"(?P<x\" is not a valid \
             regular expression: unclosed capture group name",
            "p.yaml:12:24: egress[0].rules[0].json[0]: unknown field `maxlen`, expected one \
             of `field`, `one_of`, `min`, `max`, `pattern`, `max_len`, `absent`",
        ];
        let mismatches: Vec<String> = got
            .iter()
            .zip(expected.iter())
            .filter(|(g, e)| g != e)
            .map(|(g, e)| format!("got:  {g}\nwant: {e}"))
            .collect();
        assert!(mismatches.is_empty(), "\n{}", mismatches.join("\n\n"));
        assert_eq!(got.len(), expected.len());
    }

    #[test]
    fn duplicate_glob_selector() {
        let glob = BASE.replace(
            "/system.slice/billing.service",
            "/system.slice/app-*.service",
        );
        assert_eq!(
            errors(&[
                ("a.yaml", &glob),
                ("b.yaml", &glob.replace("workload: billing", "workload: b")),
            ]),
            [
                "b.yaml:3:11: select.cgroup: cgroup /system.slice/app-*.service is already \
                 selected by workload \"billing\" at a.yaml:3:11"
            ]
        );
        // A glob and an exact path, or two different globs, may overlap.
        let exact = BASE.replace("workload: billing", "workload: b");
        assert!(load(&[("a.yaml", &glob), ("b.yaml", &exact)]).is_ok());
    }

    #[test]
    fn module_doc_example_is_a_valid_policy() {
        let source = include_str!("mod.rs");
        let mut yaml = String::new();
        let mut inside = false;
        for line in source.lines().take_while(|l| l.starts_with("//!")) {
            let line = line
                .strip_prefix("//!")
                .unwrap()
                .strip_prefix(' ')
                .unwrap_or("");
            match (inside, line) {
                (false, "```yaml") => inside = true,
                (true, "```") => break,
                (true, _) => {
                    yaml.push_str(line);
                    yaml.push('\n');
                }
                _ => {}
            }
        }
        assert!(yaml.contains("workload: billing"), "{yaml}");
        let snap = load(&[("billing.yaml", &yaml)]).unwrap_or_else(|e| panic!("{e:#?}"));
        let w = snap.workload(WorkloadId(0)).unwrap();
        assert_eq!(w.body_cap(), 64 << 10);
        assert_eq!(w.uid, Some(1001));
        let d = &w.destinations[0];
        assert!(d.when().is_some());
        assert_eq!(
            d.rate().map(|(_, l)| l.to_string()).as_deref(),
            Some("100/minute")
        );
        assert_eq!(d.rules()[0].json().len(), 6);
        assert_eq!(d.rules()[1].query().unwrap().params().count(), 5);
        assert_eq!(d.rules()[0].headers().unwrap().headers().count(), 3);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod readme_tests {
    use super::*;

    /// The README's policy reference is real: its YAML block parses and validates, and it
    /// mentions every top-level field the parser accepts.
    #[test]
    fn readme_policy_reference_parses() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("## Policy reference")
            .nth(1)
            .expect("README has a Policy reference section");
        let yaml = section
            .split("```yaml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a yaml block in the Policy reference");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("reference.yaml"), yaml).unwrap();
        let snapshot = Snapshot::load_dir(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let w = &snapshot.workloads()[0];
        assert_eq!(w.name, "billing");
        assert_eq!(w.destinations.len(), 1);
        assert_eq!(w.l4.len(), 1);
        assert_eq!(w.dns, Some(Dns::system()));
        for field in [
            "workload:",
            "select:",
            "mode:",
            "body_cap:",
            "dns:",
            "egress:",
            "host:",
            "port:",
            "path_params:",
            "allow_internal:",
            "rate:",
            "when:",
            "rules:",
            "methods:",
            "path:",
            "headers:",
            "json:",
            "query:",
            "query_repeat:",
            "cidr:",
            "ports:",
            "protocol:",
            "uid:",
        ] {
            assert!(yaml.contains(field), "the reference shows {field}");
        }
    }

    #[test]
    fn the_shipped_example_policies_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let snapshot = Snapshot::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert!(snapshot.workload_by_name("demo").is_some());
        assert!(snapshot.workload_by_name("billing").is_some());
    }
}
