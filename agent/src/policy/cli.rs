//! `scopegate policy …`: check and explain.
#![forbid(unsafe_code)]

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::cases::{self, CasesError};
use super::offline::{self, RequestError, Spec};
use super::{
    DnsReport, Mode, PolicyErrors, Resolution, Snapshot, binding_report, dns, dns_report, explain,
    host_dns_report,
};
use super::{diff, suggest, trail, usage};
use crate::resolve::{DnsLookup, Lookup as _, ResolveError, TtlBounds};

/// How `explain` resolves a destination name.
pub trait NameLookup {
    /// The answers for `name` (canonical, no trailing dot); `Err(Ok(text))` when the name
    /// does not resolve (the proxy would answer 502 `resolve_failed`), `Err(Err(e))` when
    /// the resolver itself cannot be set up.
    fn resolve(&self, name: &str) -> Result<Resolution, Result<String, ResolveError>>;
    /// Which resolvers answer, for the report.
    fn describe(&self) -> String;
}

/// The agent's own resolver, as `run` sets it up: hickory with the nameservers and options
/// of a `resolv.conf`, names fully qualified (no search suffix), `/etc/hosts` honoured,
/// answers trusted for their TTL clamped to the bounds. So `explain` sees the addresses
/// the proxy would bind (except those the DNS proxy taught the running agent).
pub struct AgentLookup {
    resolv_conf: PathBuf,
    bounds: TtlBounds,
}

impl NameLookup for AgentLookup {
    fn resolve(&self, name: &str) -> Result<Resolution, Result<String, ResolveError>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| {
                Err(ResolveError::Read {
                    path: self.resolv_conf.clone(),
                    source,
                })
            })?;
        runtime.block_on(async {
            let lookup =
                DnsLookup::from_resolv_conf(&self.resolv_conf, self.bounds, 0).map_err(Err)?;
            match lookup.lookup(name).await {
                Ok(answers) => {
                    let mut addrs: Vec<IpAddr> = Vec::new();
                    for ip in answers.addrs {
                        let ip = ip.to_canonical();
                        if !addrs.contains(&ip) {
                            addrs.push(ip);
                        }
                    }
                    Ok(Resolution {
                        addrs,
                        trusted_for: Some(self.bounds.clamp(answers.ttl)),
                    })
                }
                Err(e) => Err(Ok(format!("resolving {name}: {e}"))),
            }
        })
    }

    fn describe(&self) -> String {
        format!("the nameservers of {}", self.resolv_conf.display())
    }
}

/// Answers already known for one name: what the running agent's resolver holds now, for
/// `policy explain --live` (the admin socket resolves before it explains).
#[derive(Clone, Debug)]
pub struct KnownAnswers {
    /// The name resolved (canonical).
    pub name: String,
    /// Its answers, or why there are none.
    pub answers: Result<Resolution, String>,
}

impl NameLookup for KnownAnswers {
    fn resolve(&self, name: &str) -> Result<Resolution, Result<String, ResolveError>> {
        if name != self.name {
            return Err(Ok(format!("{name} was not resolved by the agent")));
        }
        self.answers.clone().map_err(Ok)
    }

    fn describe(&self) -> String {
        "the running agent's resolver (its current answer set)".to_owned()
    }
}

/// The `policy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory or one policy file, e.g. in CI.
    ///
    /// Prints every error as file:line:col: message (stdout) and each warning (stderr): an
    /// empty directory, entries the agent ignores (other names, hidden and backup files,
    /// subdirectories), a file given by a name the agent would not read. Secret files are
    /// not read unless --secrets is given (each secret is still checked to be named and
    /// well-formed). Exit status: 0 valid, 1 errors, 2 warnings only with --strict.
    Check {
        /// The policy directory, or one policy file.
        path: PathBuf,
        /// Also check that every secret_file can be read, as the agent does at start.
        #[arg(long)]
        secrets: bool,
        /// Exit 2 when there are warnings (and no errors).
        #[arg(long)]
        strict: bool,
        /// Warn about grants (`expires:`) that end within this many days, or have ended.
        #[arg(long, default_value_t = 14, value_name = "DAYS")]
        expiring_within: u32,
    },
    /// Explain the decision for one request: the decision, the rule, and for a denial why
    /// each rule did not allow it; for a name destination, whether the workload may look
    /// the name up through the DNS proxy, and what the name resolves to now (with the
    /// agent's resolver), each address's class and whether a connection to it may be
    /// bound. Or, with --dns-query, the DNS proxy's decision on one question. Exits 0 when
    /// allowed, 1 when denied.
    Explain {
        /// The policy directory (not with --live).
        #[arg(required_unless_present = "live", conflicts_with = "live")]
        dir: Option<PathBuf>,
        /// Ask the running agent (over its admin socket) to explain the request against
        /// the snapshot it enforces now, not the files on disk; destination binding then
        /// uses the agent's own resolver and cache.
        #[arg(long, conflicts_with = "dns_query")]
        live: bool,
        /// The agent's admin socket (with --live).
        #[arg(long, value_name = "PATH", default_value = crate::config::defaults::ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// The calling workload's name.
        #[arg(long)]
        workload: String,
        /// The request to explain, as METHOD and URL.
        #[arg(
            long,
            required_unless_present = "dns_query",
            conflicts_with = "dns_query",
            help = "The request: 'METHOD URL', e.g. 'POST https://api.example.com/v1/charges'; \
                    the port defaults to 80 for http and 443 for https"
        )]
        request: Option<String>,
        /// A DNS question instead of a request: 'NAME [TYPE]' (TYPE defaults to A), as the
        /// workload would ask it through the agent's DNS proxy.
        #[arg(long, value_name = "NAME [TYPE]")]
        dns_query: Option<String>,
        /// The resolv.conf whose nameservers resolve destination names, as `run
        /// --resolv-conf` (the agent's resolver, not getaddrinfo).
        #[arg(long, default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
        /// The TTL floor in seconds, as `run --dns-min-ttl`.
        #[arg(long, default_value_t = 5)]
        dns_min_ttl: u64,
        /// The TTL ceiling in seconds, as `run --dns-max-ttl`.
        #[arg(long, default_value_t = 300)]
        dns_max_ttl: u64,
        /// A request header 'Name: value' (repeatable).
        #[arg(long, short = 'H')]
        header: Vec<String>,
        /// A file with the JSON request body (Content-Type defaults to application/json).
        #[arg(long)]
        body: Option<PathBuf>,
        /// The request time: RFC 3339 with an offset or Z, e.g. 2024-06-03T10:00:00Z
        /// (default: now).
        #[arg(long)]
        at: Option<String>,
        /// The caller's uid (default: the workload's select.uid, or 0).
        #[arg(long)]
        uid: Option<u32>,
        /// Print the explanation as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run test cases against a policy directory, offline: each case names a workload, a
    /// request (optionally headers, a JSON body, a time, a uid) and the expected decision
    /// (allow, optionally by which rule; deny, optionally with which reason). One line per
    /// failing case as file:line:col; exits 0 when every case passes, 1 otherwise.
    Test {
        /// The policy directory.
        dir: PathBuf,
        /// Case files or directories of them (default: DIR/tests/*.yaml, which the policy
        /// loader never reads).
        cases: Vec<PathBuf>,
    },
    /// The permission-creep report: grants (destinations, rules, methods of a rule) that no
    /// allow record in the audit files exercised, per workload. Exits 0, or 1 with
    /// --fail-on-unused when any grant is unused (for a scheduled CI job).
    Unused {
        /// The policy directory.
        dir: PathBuf,
        /// An audit file (its rotated files are read too); repeatable.
        #[arg(long = "from", required = true, value_name = "AUDIT")]
        from: Vec<PathBuf>,
        /// Only records at or after this time: RFC 3339, or a duration before now (30d, 12h).
        #[arg(long)]
        since: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 1 when any grant is unused.
        #[arg(long)]
        fail_on_unused: bool,
    },
    /// A least-privilege policy for what one workload's audit records show: its HTTP
    /// destinations (host, port, TLS passthrough), one rule per path template with the
    /// methods and query parameter names seen (numeric, UUID, hex and long opaque segments
    /// become constrained parameters), a rate from the busiest minute, L4 exceptions for kernel-recorded
    /// TCP/UDP, `dns:` for its DNS queries. Demand is `allow` and `would_deny` decisions
    /// (plus `deny` by policy with --include-denied). Each rule has a comment with its
    /// count and first/last seen; the output is checked with the policy validator before
    /// it is written. A line of an audit file that is not a record is an error (a torn
    /// last line is a warning).
    Suggest {
        /// An audit file (its rotated files are read too); repeatable.
        #[arg(long = "from", required = true, value_name = "AUDIT")]
        from: Vec<PathBuf>,
        /// The workload whose records are read.
        #[arg(long)]
        workload: String,
        /// Write the policy here (default: stdout).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Only records at or after this time: RFC 3339, or a duration before now (30d, 12h).
        #[arg(long)]
        since: Option<String>,
        /// The policy's mode.
        #[arg(long, value_enum, default_value_t)]
        mode: suggest::SuggestMode,
        /// Also count `deny` decisions refused by policy as demand.
        #[arg(long)]
        include_denied: bool,
    },
    /// What a policy change grants and revokes, per workload (conservative: a change that is
    /// not simply narrower counts as a grant). Exits 0, or 1 with --fail-on-grant when the
    /// change grants anything.
    Diff {
        /// The policy directory before the change.
        old: PathBuf,
        /// The policy directory after the change.
        new: PathBuf,
        /// Print a Markdown section (for a pull request comment).
        #[arg(long, conflicts_with = "json")]
        markdown: bool,
        /// Print the changes as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 1 when the change grants anything new.
        #[arg(long)]
        fail_on_grant: bool,
    },
}

/// Errors of the policy command line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyCliError {
    /// The policy directory is invalid.
    #[error("{0}")]
    Policy(#[from] PolicyErrors),
    /// The request cannot be decided as written (workload, request, header, body, time).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// `--body` cannot be read.
    #[error("--body {}: {source}", path.display())]
    ReadBody {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The explanation could not be written as JSON.
    #[error("cannot write the explanation as JSON: {0}")]
    Output(#[from] serde_json::Error),
    /// The test cases cannot be run.
    #[error(transparent)]
    Cases(#[from] CasesError),
    /// The audit files cannot be read.
    #[error(transparent)]
    Trail(#[from] trail::TrailError),
    /// A policy cannot be suggested from the records.
    #[error(transparent)]
    Suggest(#[from] suggest::SuggestError),
    /// An audit file has a line that is not a record (and is not a torn last line).
    #[error(
        "{finding}: the file is damaged or not an audit file (`scopegate audit verify` it); \
         a policy suggested without that line could miss what it recorded"
    )]
    DamagedAudit {
        /// The line, with file and line number.
        finding: String,
    },
    /// The suggested policy does not pass the validator (a bug of `suggest`).
    #[error("the suggested policy does not validate (please report this): {errors}")]
    SuggestionInvalid {
        /// The validator's errors.
        errors: PolicyErrors,
    },
    /// The suggested policy cannot be written.
    #[error("{}: cannot write the policy: {source}", path.display())]
    WriteOut {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// `--since` is not a time.
    #[error("--since {value:?}: {reason}")]
    InvalidSince {
        /// The value given.
        value: String,
        /// Why.
        reason: String,
    },
    /// The resolver cannot be set up (`--resolv-conf`, TTL bounds).
    #[error("{0}")]
    Resolver(#[from] ResolveError),
    /// `--dns-query` cannot be parsed.
    #[error("--dns-query {value:?}: {reason}")]
    InvalidDnsQuery {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// How a policy subcommand ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid, or allowed (exit 0).
    Ok,
    /// Errors, or denied (exit 1).
    Findings,
    /// `check --strict`: warnings and no errors (exit 2).
    Warnings,
}

impl Verdict {
    /// `Ok` when `ok`, else `Findings`.
    pub fn of(ok: bool) -> Self {
        if ok { Self::Ok } else { Self::Findings }
    }

    /// The exit status.
    pub fn code(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::Findings => 1,
            Self::Warnings => 2,
        }
    }
}

/// Runs a policy subcommand.
pub fn run(command: PolicyCommand) -> Result<Verdict, PolicyCliError> {
    match command {
        PolicyCommand::Check {
            path,
            secrets,
            strict,
            expiring_within,
        } => {
            let (verdict, _) = check(
                &path,
                secrets,
                strict,
                expiring_within,
                &mut io::stdout().lock(),
                &mut io::stderr().lock(),
            );
            Ok(verdict)
        }
        PolicyCommand::Unused {
            dir,
            from,
            since,
            json,
            fail_on_unused,
        } => {
            let snapshot = Snapshot::load_dir(&dir)?;
            let since = parse_since(since)?;
            let records = read_allows(&from, since)?;
            let report = usage::unused(&snapshot, records.uses());
            for warning in &records.warnings {
                eprintln!("warning: {warning}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", unused_text(&report, records.files, since));
            }
            Ok(Verdict::of(!fail_on_unused || report.unused.is_empty()))
        }
        PolicyCommand::Suggest {
            from,
            workload,
            out,
            since,
            mode,
            include_denied,
        } => {
            let options = suggest::Options {
                workload,
                mode,
                include_denied,
            };
            let (text, warnings) = suggest_policy(&from, parse_since(since)?, options)?;
            for warning in &warnings {
                eprintln!("scopegate: warning: {warning}");
            }
            match out {
                None => print!("{text}"),
                Some(path) => {
                    write_atomically(&path, text.as_bytes()).map_err(|source| {
                        PolicyCliError::WriteOut {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    eprintln!(
                        "scopegate: wrote the suggested policy to {}",
                        path.display()
                    );
                }
            }
            Ok(Verdict::Ok)
        }
        PolicyCommand::Diff {
            old,
            new,
            markdown,
            json,
            fail_on_grant,
        } => {
            let changes = diff::diff(&Snapshot::load_dir(&old)?, &Snapshot::load_dir(&new)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&changes)?);
            } else if markdown {
                print!("{}", diff::markdown(&changes));
            } else {
                for change in &changes {
                    println!("{change}");
                }
                let grants = changes
                    .iter()
                    .filter(|c| c.effect == diff::Effect::Grant)
                    .count();
                println!("{grants} grant(s), {} revoke(s)", changes.len() - grants);
            }
            let grants = changes.iter().any(|c| c.effect == diff::Effect::Grant);
            Ok(Verdict::of(!(fail_on_grant && grants)))
        }
        PolicyCommand::Test { dir, cases: paths } => {
            let snapshot = Snapshot::load_dir(&dir)?;
            let files = cases::case_files(&dir, &paths)?;
            let outcome = cases::run(&snapshot, &files)?;
            for failure in &outcome.failures {
                println!("{failure}");
            }
            println!(
                "{} case(s) in {} file(s): {} passed, {} failed",
                outcome.cases,
                files.len(),
                outcome.cases - outcome.failures.len(),
                outcome.failures.len()
            );
            Ok(Verdict::of(outcome.failures.is_empty()))
        }
        PolicyCommand::Explain {
            ref resolv_conf,
            dns_min_ttl,
            dns_max_ttl,
            ..
        } => {
            let lookup = AgentLookup {
                resolv_conf: resolv_conf.clone(),
                bounds: TtlBounds::new(
                    Duration::from_secs(dns_min_ttl),
                    Duration::from_secs(dns_max_ttl),
                )?,
            };
            let (allowed, text) = run_explain(command, &lookup)?;
            println!("{text}");
            Ok(if allowed {
                Verdict::Ok
            } else {
                Verdict::Findings
            })
        }
    }
}

/// `check`: errors to `out` (one `file:line:col: message` per line, or `PATH: OK, …`),
/// warnings to `err` (`scopegate: warning: …`); the verdict and, when valid, the snapshot.
pub fn check(
    path: &std::path::Path,
    secrets: bool,
    strict: bool,
    expiring_within_days: u32,
    out: &mut dyn io::Write,
    err: &mut dyn io::Write,
) -> (Verdict, Option<Snapshot>) {
    let no_host = |_: &Snapshot| Vec::new();
    let options = CheckOptions {
        secrets,
        strict,
        expiring_within_days,
        host: &no_host,
    };
    check_with(path, &options, out, err)
}

/// What `check` checks besides the files.
pub struct CheckOptions<'a> {
    /// Read the secret files.
    pub secrets: bool,
    /// Warnings fail (exit 2).
    pub strict: bool,
    /// Warn about grants expiring within this many days.
    pub expiring_within_days: u32,
    /// Warnings about how a valid snapshot meets this host (the binary passes
    /// `workloads::host_warnings`: a selector that matches no cgroup); counted like the
    /// others, so `--strict` fails on them.
    pub host: &'a dyn Fn(&Snapshot) -> Vec<String>,
}

/// [`check`] with the host's warnings too.
pub fn check_with(
    path: &std::path::Path,
    options: &CheckOptions<'_>,
    out: &mut dyn io::Write,
    err: &mut dyn io::Write,
) -> (Verdict, Option<Snapshot>) {
    let (secrets, strict) = (options.secrets, options.strict);
    let expiring_within_days = options.expiring_within_days;
    let checked = Snapshot::check(path, super::LoadOptions { secrets });
    // Reporting is best effort: a closed pipe does not change the verdict.
    for warning in &checked.warnings {
        let _ = writeln!(err, "scopegate: warning: {warning}");
    }
    match checked.result {
        Ok(snapshot) => {
            let expiring = super::expiry::expiring(
                &snapshot,
                jiff::Timestamp::now(),
                jiff::SignedDuration::from_hours(24 * i64::from(expiring_within_days)),
            );
            for grant in &expiring {
                let _ = writeln!(err, "scopegate: warning: {grant}");
            }
            let host = (options.host)(&snapshot);
            for warning in &host {
                let _ = writeln!(err, "scopegate: warning: {warning}");
            }
            let warnings = checked.warnings.len() + expiring.len() + host.len();
            let warned = match warnings {
                0 => String::new(),
                n => format!(", {n} warning(s)"),
            };
            let _ = writeln!(
                out,
                "{}: OK, {} workload(s){warned}{}",
                path.display(),
                snapshot.workloads().len(),
                if secrets {
                    ""
                } else {
                    " (secret files not read; --secrets reads them)"
                }
            );
            let verdict = if strict && warnings > 0 {
                Verdict::Warnings
            } else {
                Verdict::Ok
            };
            (verdict, Some(snapshot))
        }
        Err(errors) => {
            for e in &errors.0 {
                let _ = writeln!(out, "{e}");
            }
            (Verdict::Findings, None)
        }
    }
}

/// `explain`: whether the request (or DNS question) is allowed, and the text to print. A
/// matched name destination is resolved with `lookup` to show destination binding; the
/// request counts as allowed only if some answer may be bound.
fn run_explain(
    command: PolicyCommand,
    lookup: &dyn NameLookup,
) -> Result<(bool, String), PolicyCliError> {
    let PolicyCommand::Explain {
        dir,
        workload,
        request,
        dns_query,
        header,
        body,
        at,
        uid,
        json,
        ..
    } = command
    else {
        return Ok((false, String::new()));
    };
    let Some(dir) = dir else {
        return Err(RequestError::InvalidRequest {
            value: request.unwrap_or_default(),
            reason: "a policy directory (or --live) is needed".into(),
        }
        .into());
    };
    let snapshot = Snapshot::load_dir(&dir)?;
    let Some(request) = request else {
        let (_, w) = offline::workload(&snapshot, &workload)?;
        let query = dns_query.unwrap_or_default();
        return explain_dns_query(w, &query, json);
    };
    let body = match body {
        None => None,
        Some(file) => {
            let bytes = std::fs::read(&file).map_err(|source| PolicyCliError::ReadBody {
                path: file.clone(),
                source,
            })?;
            Some((format!("--body {}", file.display()), bytes))
        }
    };
    let input = ExplainInput {
        workload,
        request,
        headers: header,
        body,
        at,
        uid,
        json,
    };
    explain_in(&snapshot, &input, lookup)
}

/// What `explain` is asked, from the command line or the admin socket (`--live`).
#[derive(Clone, Debug, Default)]
pub struct ExplainInput {
    /// The calling workload's name.
    pub workload: String,
    /// 'METHOD URL'.
    pub request: String,
    /// 'Name: value' headers.
    pub headers: Vec<String>,
    /// The body: where it came from (for errors) and its bytes.
    pub body: Option<(String, Vec<u8>)>,
    /// RFC 3339 request time (default: now).
    pub at: Option<String>,
    /// The caller's uid (default: the workload's select.uid, or 0).
    pub uid: Option<u32>,
    /// Render as JSON.
    pub json: bool,
}

/// The host of `'METHOD URL'` if it is a name (not an IP literal), for resolving before
/// [`explain_in`].
pub fn request_name(request: &str) -> Option<String> {
    offline::parse_request(request)
        .ok()
        .map(|t| t.host)
        .filter(|h| h.parse::<IpAddr>().is_err())
}

/// Explains `input` against `snapshot` (a directory just loaded, or the agent's running
/// snapshot): whether the request is allowed, and the text to print.
pub fn explain_in(
    snapshot: &Snapshot,
    input: &ExplainInput,
    lookup: &dyn NameLookup,
) -> Result<(bool, String), PolicyCliError> {
    let json = input.json;
    let (id, w) = offline::workload(snapshot, &input.workload)?;
    let spec = Spec {
        request: &input.request,
        headers: &input.headers,
        body: input
            .body
            .as_ref()
            .map(|(label, b)| (b.as_slice(), label.clone())),
        at: input.at.as_deref(),
        uid: input.uid,
    };
    let prepared = offline::prepare(id, w, &spec)?;
    let target = &prepared.target;
    let req = prepared.request();
    let mut explanation = explain(snapshot, &req);
    if target.host.parse::<IpAddr>().is_err() {
        explanation.dns = Some(host_dns_report(Some(w), &target.host));
    }
    let destination = w
        .destination_for(&target.host, target.port)
        .filter(|(_, d)| matches!(d.host, super::Host::Name(_)));
    if let Some((_, d)) = destination {
        let answers = match lookup.resolve(&d.host.to_string()) {
            Ok(resolution) => Ok(resolution),
            Err(Ok(no_answer)) => Err(no_answer),
            Err(Err(setup)) => return Err(setup.into()),
        };
        explanation.binding = binding_report(d, answers).map(|mut b| {
            b.resolver = Some(lookup.describe());
            b
        });
    }
    let bindable = explanation
        .binding
        .as_ref()
        .is_none_or(|b| b.any_bindable());
    let allowed = explanation.decision == "allow" && bindable;
    let text = if json {
        serde_json::to_string_pretty(&explanation)?
    } else {
        explanation.to_string().trim_end().to_owned()
    };
    Ok((allowed, text))
}

/// The allow decisions of a set of audit files.
struct Allows {
    /// (workload, rule, method) per allow decision record.
    allows: Vec<(String, String, String)>,
    /// Files read.
    files: usize,
    /// Lines that are not records, and other findings worth a warning.
    warnings: Vec<String>,
}

impl Allows {
    /// The allows as [`usage::unused`] takes them.
    fn uses(&self) -> impl Iterator<Item = usage::Use<'_>> {
        self.allows
            .iter()
            .map(|(workload, rule, method)| usage::Use {
                workload,
                rule,
                method,
            })
    }
}

/// Reads the allow decision records (at or after `since`) of each audit file of `from` and
/// its rotated files ([`trail::read`]). A line that is not a record (a torn tail, garbage)
/// is a warning naming file and line, never silently skipped.
fn read_allows(from: &[PathBuf], since: Option<jiff::Timestamp>) -> Result<Allows, PolicyCliError> {
    use crate::audit::Decision;
    let mut allows = Vec::new();
    let summary = trail::read(from, since, |r| {
        if r.decision != Decision::Allow || !r.is_decision() {
            return;
        }
        if let (Some(w), Some(rule)) = (r.workload, r.rule) {
            allows.push((w, rule, r.method.unwrap_or_default()));
        }
    })?;
    Ok(Allows {
        allows,
        files: summary.files.len(),
        warnings: summary.findings.iter().map(ToString::to_string).collect(),
    })
}

/// `--since`: RFC 3339, or a duration before now.
fn parse_since(since: Option<String>) -> Result<Option<jiff::Timestamp>, PolicyCliError> {
    since
        .map(|value| {
            crate::audit::query::parse_time(&value, jiff::Timestamp::now())
                .map_err(|reason| PolicyCliError::InvalidSince { value, reason })
        })
        .transpose()
}

/// `suggest`: the policy text for the records of `from` (at or after `since`), checked by
/// the policy validator, and the warnings (torn last lines, files without records).
pub fn suggest_policy(
    from: &[PathBuf],
    since: Option<jiff::Timestamp>,
    options: suggest::Options,
) -> Result<(String, Vec<String>), PolicyCliError> {
    let workload = options.workload.clone();
    let mut observer = suggest::Observer::new(options);
    let summary = trail::read(from, since, |r| observer.add(&r))?;
    if let Some(garbage) = summary.garbage() {
        return Err(PolicyCliError::DamagedAudit {
            finding: garbage.to_string(),
        });
    }
    let warnings: Vec<String> = summary.findings.iter().map(ToString::to_string).collect();
    let mut notes = warnings.clone();
    if summary.before_since > 0 {
        notes.push(format!(
            "{} record(s) before the window not read",
            summary.before_since
        ));
    }
    let sources = suggest::Sources {
        files: summary
            .files
            .iter()
            .map(|f| f.display().to_string())
            .collect(),
        window: since.map_or_else(|| "all records".to_owned(), |t| format!("since {t}")),
        notes,
    };
    let text = observer.finish(&sources)?;
    // The validator has the last word: never hand out a policy it would reject.
    let dir = tempfile::tempdir().map_err(|source| PolicyCliError::WriteOut {
        path: std::env::temp_dir(),
        source,
    })?;
    let file = dir.path().join(format!("{workload}.yaml"));
    std::fs::write(&file, &text).map_err(|source| PolicyCliError::WriteOut {
        path: file.clone(),
        source,
    })?;
    Snapshot::load_dir(dir.path())
        .map_err(|errors| PolicyCliError::SuggestionInvalid { errors })?;
    Ok((text, warnings))
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename,
/// so that a reader never sees half a file and a failed write leaves the old one (the
/// suggested policy, the review report).
pub(crate) fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The text form of the unused-grants report.
fn unused_text(report: &usage::Report, files: usize, since: Option<jiff::Timestamp>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let window = since.map_or_else(|| "all records".to_owned(), |t| format!("since {t}"));
    for unused in &report.unused {
        let _ = writeln!(out, "{unused}");
    }
    for (name, n) in &report.other_workloads {
        let _ = writeln!(
            out,
            "note: {n} allow record(s) of workload {name}, which the policy directory does not have"
        );
    }
    if report.unknown_rules > 0 {
        let _ = writeln!(
            out,
            "note: {} allow record(s) name a rule the policy no longer has",
            report.unknown_rules
        );
    }
    let counted: u64 = report.allows.values().sum();
    let _ = writeln!(
        out,
        "{} unused grant(s); {counted} allow record(s) counted from {files} file(s), {window}",
        report.unused.len()
    );
    out
}

/// The DNS question of `--dns-query 'NAME [TYPE]'`, explained: exit 0 when the proxy
/// would answer it, 1 when it would answer REFUSED (in audit mode too: the report says that
/// the query passes as `would_deny`).
fn explain_dns_query(
    w: &super::Workload,
    value: &str,
    json: bool,
) -> Result<(bool, String), PolicyCliError> {
    let fail = |reason: &str| PolicyCliError::InvalidDnsQuery {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let mut parts = value.split_whitespace();
    let name = parts
        .next()
        .ok_or_else(|| fail("expected 'NAME [TYPE]', e.g. 'api.example.com AAAA'"))?;
    let qtype = match parts.next() {
        None => dns::TYPE_A,
        Some(t) => dns::parse_type(&t.to_ascii_uppercase()).map_err(&fail)?,
    };
    if parts.next().is_some() {
        return Err(fail("expected 'NAME [TYPE]', e.g. 'api.example.com AAAA'"));
    }
    let report = dns_report(Some(w), name, &[qtype]);
    let allowed = report.decision == "answer";
    let text = if json {
        #[derive(serde::Serialize)]
        struct DnsExplanation<'a> {
            workload: &'a str,
            mode: Mode,
            dns: &'a DnsReport,
        }
        serde_json::to_string_pretty(&DnsExplanation {
            workload: &w.name,
            mode: w.mode(),
            dns: &report,
        })?
    } else {
        format!(
            "query:     {} {name} (through the agent's DNS proxy)\n\
             workload:  {} (mode {})\n\
             dns:       {report}",
            dns::type_name(qtype),
            w.name,
            w.mode(),
        )
    };
    Ok((allowed, text))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    /// A policy with an injected credential read from `secret`.
    fn with_secret(secret: &str) -> String {
        format!(
            "workload: crm\nselect:\n  cgroup: /crm\negress:\n  - host: api.example.com\n    port: 443\n    tls: intercept\n    credential:\n      header: Authorization\n      secret_file: {secret}\n    rules:\n      - id: r\n        methods: [GET]\n        path: /x\n"
        )
    }

    /// `check` with captured output: (exit code, stdout, stderr).
    fn checked(path: &std::path::Path, secrets: bool, strict: bool) -> (u8, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (verdict, snapshot) = check(path, secrets, strict, 14, &mut out, &mut err);
        assert_eq!(snapshot.is_some(), verdict != Verdict::Findings);
        (
            verdict.code(),
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn check_warns_about_ended_and_ending_grants() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "workload: temp\nselect: {cgroup: /temp}\negress:\n  \
                      - {host: a.example, port: 443, expires: 2100-01-01T00:00:00Z, rules: \
                      [{id: old, methods: [GET], path: /, expires: 2000-01-01T00:00:00Z}]}\n";
        std::fs::write(dir.path().join("temp.yaml"), policy).unwrap();
        let (code, out, err) = checked(dir.path(), false, false);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(
            err,
            "scopegate: warning: workload temp: rule old of a.example:443 expired at \
             2000-01-01T00:00:00Z (grant_expired)\n"
        );
        assert!(out.contains(", 1 warning(s)"), "{out}");
        // A warning: exit 2 under --strict; the 2100 expiry is far outside 14 days.
        assert_eq!(checked(dir.path(), false, true).0, 2);
    }

    #[test]
    fn check_takes_a_file_or_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("billing.yaml"), POLICY).unwrap();
        let (code, out, err) = checked(dir.path(), false, true);
        assert_eq!((code, err.as_str()), (0, ""), "{out}");
        assert!(
            out.contains(": OK, 1 workload(s) (secret files not read"),
            "{out}"
        );
        let file = dir.path().join("billing.yaml");
        let (code, out, _) = checked(&file, false, true);
        assert_eq!(code, 0, "{out}");
        assert!(
            out.starts_with(&format!("{}: OK, 1 workload(s)", file.display())),
            "{out}"
        );
        // A broken file given by name: its errors with line and column, exit 1.
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, "workload: x\nselect: {cgroup: /x}\negress: 5\n").unwrap();
        let (code, out, _) = checked(&broken, false, false);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.starts_with(&format!("{}:3:", broken.display())),
            "{out}"
        );
        // A missing path is an error naming it.
        let (code, out, _) = checked(&dir.path().join("nope.yaml"), false, false);
        assert_eq!(code, 1);
        assert!(out.contains("nope.yaml"), "{out}");
    }

    #[test]
    fn secrets_are_read_only_with_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("crm.yaml"),
            with_secret("/nonexistent/sgobs-secret"),
        )
        .unwrap();
        let (code, out, _) = checked(dir.path(), false, true);
        assert_eq!(code, 0, "{out}");
        let (code, out, _) = checked(dir.path(), true, false);
        assert_eq!(code, 1, "{out}");
        let want = format!(
            "{}:10:20: egress[0].credential.secret_file: \"/nonexistent/sgobs-secret\": cannot be read (missing or not readable)",
            dir.path().join("crm.yaml").display()
        );
        assert_eq!(out.trim_end(), want);
        // A readable secret passes with --secrets; a malformed one fails without it.
        let secrets = tempfile::tempdir().unwrap();
        let secret = secrets.path().join("secret");
        std::fs::write(&secret, "k").unwrap();
        std::fs::write(
            dir.path().join("crm.yaml"),
            with_secret(&secret.display().to_string()),
        )
        .unwrap();
        assert_eq!(checked(dir.path(), true, true).0, 0);
        std::fs::write(dir.path().join("crm.yaml"), with_secret("relative/secret")).unwrap();
        let (code, out, _) = checked(dir.path(), false, false);
        assert_eq!(code, 1);
        assert!(
            out.contains("secret_file: \"relative/secret\": must be an absolute path"),
            "{out}"
        );
        // A rule's own credential is read too.
        let rule_secret = with_secret(&secret.display().to_string()).replace(
            "        path: /x\n",
            "        path: /x\n        credential: {header: X-Key, secret_file: /nonexistent/sgobs-rule}\n",
        );
        std::fs::write(dir.path().join("crm.yaml"), rule_secret).unwrap();
        assert_eq!(checked(dir.path(), false, false).0, 0);
        let (code, out, _) = checked(dir.path(), true, false);
        assert_eq!(code, 1);
        assert!(
            out.contains("egress[0].rules[0].credential.secret_file: \"/nonexistent/sgobs-rule\""),
            "{out}"
        );
    }

    #[test]
    fn empty_directories_and_ignored_entries_warn_and_fail_only_under_strict() {
        let dir = tempfile::tempdir().unwrap();
        let (code, out, err) = checked(dir.path(), false, false);
        assert_eq!(code, 0, "{out}");
        assert!(err.contains("no policy files"), "{err}");
        assert!(out.contains("OK, 0 workload(s), 1 warning(s)"), "{out}");
        assert_eq!(checked(dir.path(), false, true).0, 2);
        std::fs::write(dir.path().join("billing.yaml"), POLICY).unwrap();
        assert_eq!(checked(dir.path(), false, true).0, 0);
        for name in [
            "notes.txt",
            "billing.yaml.bak",
            ".hidden.yaml",
            "billing.yaml~",
        ] {
            std::fs::write(dir.path().join(name), "garbage: [").unwrap();
        }
        std::fs::create_dir(dir.path().join("old")).unwrap();
        let (code, out, err) = checked(dir.path(), false, true);
        assert_eq!(code, 2, "{out}{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 5, "{err}");
        for (name, why) in [
            (".hidden.yaml", "a hidden file"),
            ("billing.yaml.bak", "not named *.yaml or *.yml"),
            ("billing.yaml~", "an editor backup or swap file"),
            ("notes.txt", "not named *.yaml or *.yml"),
            ("old", "a directory"),
        ] {
            let want = format!(
                "scopegate: warning: {}: ignored: {why}",
                dir.path().join(name).display()
            );
            assert!(lines.iter().any(|l| l.starts_with(&want)), "{want}\n{err}");
        }
        assert_eq!(checked(dir.path(), false, false).0, 0);
        // Warnings do not hide errors.
        std::fs::write(dir.path().join("bad.yaml"), "workload: [\n").unwrap();
        assert_eq!(checked(dir.path(), false, true).0, 1);
        // A file given by a name the agent would not read is checked, with a warning.
        let file = dir.path().join("billing.txt");
        std::fs::write(&file, POLICY).unwrap();
        let (code, _, err) = checked(&file, false, true);
        assert_eq!(code, 2);
        assert!(
            err.contains("not named *.yaml or *.yml: an agent loading its directory ignores it"),
            "{err}"
        );
    }

    const POLICY: &str = "\
workload: billing
select:
  systemd_unit: billing.service
  uid: 1001
egress:
  - host: api.example.com
    port: 443
    rate: 100/minute
    rules:
      - id: create-charge
        methods: [POST]
        path: /v1/charges
        json:
          - {field: currency, one_of: [usd, eur]}
          - {field: amount, max: 100000}
      - id: read-customer
        methods: [GET]
        path: /v1/customers/{id:cus_[A-Za-z0-9]+}
        query: {expand: absent}
        when: {days: [mon, tue, wed, thu, fri], hours: '08:00-18:00', timezone: Europe/Berlin}
  - host: \"[::1]\"
    port: 8080
    rules:
      - id: local
        methods: [GET]
        path: /health
";

    /// A test resolver: a table of names and their answers, each trusted for 60 s.
    struct Table(Vec<(&'static str, Vec<&'static str>)>);

    impl NameLookup for Table {
        fn resolve(&self, name: &str) -> Result<Resolution, Result<String, ResolveError>> {
            match self.0.iter().find(|(n, _)| *n == name) {
                Some((_, ips)) => Ok(Resolution {
                    addrs: ips.iter().map(|s| s.parse().unwrap()).collect(),
                    trusted_for: Some(Duration::from_secs(60)),
                }),
                None => Err(Ok(format!("resolving {name}: no such name"))),
            }
        }

        fn describe(&self) -> String {
            "the test table".to_owned()
        }
    }

    /// The test resolver: api.example.com is a documentation address (a public stand-in).
    fn fixed_lookup() -> Table {
        Table(vec![("api.example.com", vec!["198.51.100.7"])])
    }

    /// `explain` of `request` by `workload` with the defaults.
    fn command(dir: PathBuf, workload: &str, request: &str) -> PolicyCommand {
        PolicyCommand::Explain {
            dir: Some(dir),
            live: false,
            admin_socket: PathBuf::new(),
            workload: workload.to_owned(),
            request: Some(request.to_owned()),
            dns_query: None,
            resolv_conf: PathBuf::from("/nonexistent/resolv.conf"),
            dns_min_ttl: 5,
            dns_max_ttl: 300,
            header: Vec::new(),
            body: None,
            at: Some("2024-06-03T10:00:00Z".to_owned()),
            uid: None,
            json: false,
        }
    }

    struct Env {
        dir: tempfile::TempDir,
    }

    fn env() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/billing.yaml"), POLICY).unwrap();
        Env { dir }
    }

    impl Env {
        fn explain(
            &self,
            request: &str,
            header: &[&str],
            body: Option<&str>,
            json: bool,
        ) -> Result<(bool, String), PolicyCliError> {
            let body = body.map(|b| {
                let path = self.dir.path().join("body.json");
                std::fs::write(&path, b).unwrap();
                path
            });
            let mut cmd = command(self.dir.path().join("policies"), "billing", request);
            if let PolicyCommand::Explain {
                header: h,
                body: b,
                json: j,
                ..
            } = &mut cmd
            {
                *h = header.iter().map(|h| (*h).to_owned()).collect();
                *b = body;
                *j = json;
            }
            run_explain(cmd, &fixed_lookup())
        }
    }

    #[test]
    fn parses_requests() {
        let t = |v: &str| offline::parse_request(v).map_err(|e| e.to_string());
        assert_eq!(
            t("POST https://API.example.com/v1/charges?x=1"),
            Ok(offline::Target {
                method: "POST".into(),
                host: "api.example.com".into(),
                port: 443,
                path_and_query: "/v1/charges?x=1".into(),
            })
        );
        assert_eq!(
            t("GET http://a.example").map(|t| (t.port, t.path_and_query)),
            Ok((80, "/".into()))
        );
        assert_eq!(
            t("GET http://[::1]:8080/x").map(|t| (t.host, t.port)),
            Ok(("::1".into(), 8080))
        );
        for (bad, message) in [
            (
                "GET",
                "--request \"GET\": expected 'METHOD URL', e.g. 'GET https://api.example.com/v1/x'",
            ),
            (
                "GET /v1/x",
                "--request \"GET /v1/x\": the URL needs a scheme and a host, e.g. https://api.example.com/",
            ),
            (
                "GET ftp://a/x",
                "--request \"GET ftp://a/x\": scheme \"ftp\" is not http or https",
            ),
            (
                "GET https://u:p@a/x",
                "--request \"GET https://u:p@a/x\": the URL must not contain user information ('@')",
            ),
            (
                "G(T https://a/",
                "--request \"G(T https://a/\": \"G(T\" is not an HTTP method",
            ),
            (
                "GET https://a:0/",
                "--request \"GET https://a:0/\": port 0 is not a port",
            ),
        ] {
            assert_eq!(t(bad), Err(message.to_owned()), "{bad}");
        }
        assert!(t("GET https://a/b c").is_err());
    }

    #[test]
    fn explains_an_allow() {
        let env = env();
        let (allowed, text) = env
            .explain(
                "POST https://api.example.com/v1/charges",
                &[],
                Some(r#"{"currency": "usd", "amount": 100}"#),
                false,
            )
            .unwrap();
        assert!(allowed);
        assert_eq!(
            text,
            "request:   POST api.example.com:443/v1/charges (uid 1001, at 2024-06-03T10:00:00Z, \
             with JSON body)\n\
             workload:  billing (mode enforce)\n\
             decision:  ALLOW by rule create-charge of api.example.com:443\n\
             rate:      100/minute (destination api.example.com:443)\n\
             dns:       A/AAAA api.example.com: REFUSED dns_not_allowed: the policy has no \
             `dns:`: the kernel refuses the workload's UDP (EPERM) and the proxy refuses its \
             DNS over TCP\n\
             binding:   api.example.com resolves to 1 address(es) via the test table, trusted \
             for 60 s (allow_internal: none)\n  \
             198.51.100.7 (documentation): allowed"
        );
        let (_, json) = env
            .explain("GET http://[::1]:8080/health", &[], None, true)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["rule"], "local");
        assert_eq!(v["destination"], "[::1]:8080");
        assert_eq!(v["mode"], "enforce");
        assert_eq!(v["request"]["uid"], 1001);
        assert!(v["rules"].as_array().unwrap().is_empty());
        // An IP-literal destination is bound to exactly its address: no binding report.
        assert!(v.get("binding").is_none());
    }

    #[test]
    fn explains_destination_binding() {
        let env = env();
        let policies = env.dir.path().join("policies");
        std::fs::write(
            policies.join("internal.yaml"),
            "workload: fetcher\nselect: {cgroup: /fetcher}\negress:\n  \
             - {host: mixed.test, port: 80, rules: [{id: m, methods: [GET], path: /**}]}\n  \
             - {host: inside.test, port: 80, allow_internal: [127.0.0.0/8], \
                rules: [{id: i, methods: [GET], path: /**}]}\n  \
             - {host: lo.test, port: 80, rules: [{id: l, methods: [GET], path: /**}]}\n  \
             - {host: gone.test, port: 80, rules: [{id: g, methods: [GET], path: /**}]}\n",
        )
        .unwrap();
        let lookup = Table(vec![
            (
                "mixed.test",
                vec!["198.51.100.7", "127.0.0.1", "::ffff:169.254.169.254"],
            ),
            ("inside.test", vec!["127.0.0.1", "10.0.0.1"]),
            ("lo.test", vec!["64:ff9b::7f00:1"]),
        ]);
        let run = |url: &str, json: bool| {
            let mut cmd = command(policies.clone(), "fetcher", &format!("GET {url}"));
            if let PolicyCommand::Explain { json: j, .. } = &mut cmd {
                *j = json;
            }
            run_explain(cmd, &lookup).unwrap()
        };
        let (allowed, text) = run("http://mixed.test/x", false);
        assert!(allowed, "{text}");
        assert!(
            text.ends_with(
                "decision:  ALLOW by rule m of mixed.test:80\n\
                 dns:       A/AAAA mixed.test: REFUSED dns_not_allowed: the policy has no \
                 `dns:`: the kernel refuses the workload's UDP (EPERM) and the proxy refuses \
                 its DNS over TCP\n\
                 binding:   mixed.test resolves to 3 address(es) via the test table, trusted \
                 for 60 s (allow_internal: none)\n  \
                 198.51.100.7 (documentation): allowed\n  \
                 127.0.0.1 (loopback): internal, denied (destination_internal_address)\n  \
                 169.254.169.254 (link-local, cloud metadata service): internal, denied \
                 (destination_internal_address)"
            ),
            "{text}"
        );
        let (allowed, text) = run("http://inside.test/x", false);
        assert!(allowed, "{text}");
        assert!(
            text.ends_with(
                "binding:   inside.test resolves to 2 address(es) via the test table, trusted \
                 for 60 s (allow_internal: 127.0.0.0/8)\n  \
                 127.0.0.1 (loopback): allowed (allow_internal)\n  \
                 10.0.0.1 (private): internal, denied (destination_internal_address)"
            ),
            "{text}"
        );
        // Every answer internal: the rules allow, the binding does not; exit 1.
        let (allowed, text) = run("http://lo.test/x", false);
        assert!(!allowed, "{text}");
        assert!(
            text.ends_with(
                "  64:ff9b::7f00:1 (loopback, IPv4 127.0.0.1 in NAT64 64:ff9b::/96): internal, \
                 denied (destination_internal_address)\n           \
                 (no answer may be bound: the proxy denies every request to lo.test with \
                 destination_internal_address)"
            ),
            "{text}"
        );
        let (_, json) = run("http://lo.test/x", true);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["binding"]["host"], "lo.test");
        assert_eq!(v["binding"]["addresses"][0]["class"], "loopback");
        assert_eq!(v["binding"]["addresses"][0]["verdict"], "internal_denied");
        let (allowed, text) = run("http://gone.test/x", false);
        assert!(!allowed, "{text}");
        assert!(
            text.ends_with(
                "binding:   resolving gone.test: no such name (the proxy answers 502 \
                 resolve_failed)"
            ),
            "{text}"
        );
    }

    #[test]
    fn explains_dns_decisions() {
        let env = env();
        let policies = env.dir.path().join("policies");
        std::fs::write(
            policies.join("resolver.yaml"),
            "workload: resolver\nselect: {cgroup: /resolver}\n\
             dns: {names: ['*.cdn.example.com'], types: [TXT]}\negress:\n  \
             - {host: api.example.com, port: 443, rules: [{id: r, methods: [GET], path: /**}]}\n",
        )
        .unwrap();
        std::fs::write(
            policies.join("audited.yaml"),
            "workload: audited\nselect: {cgroup: /audited}\nmode: audit\ndns: system\n\
             egress:\n  - {host: api.example.com, port: 443, rules: [{id: a, methods: [GET], path: /**}]}\n",
        )
        .unwrap();
        let query = |workload: &str, q: &str, json: bool| {
            let mut cmd = command(policies.clone(), workload, "GET https://unused/");
            if let PolicyCommand::Explain {
                request,
                dns_query,
                json: j,
                ..
            } = &mut cmd
            {
                *request = None;
                *dns_query = Some(q.to_owned());
                *j = json;
            }
            run_explain(cmd, &fixed_lookup())
        };
        // The request's host: answered through the proxy, as a destination's name.
        let (allowed, text) = run_explain(
            command(
                policies.clone(),
                "resolver",
                "GET https://api.example.com/x",
            ),
            &fixed_lookup(),
        )
        .unwrap();
        assert!(allowed, "{text}");
        assert!(
            text.contains(
                "dns:       A/AAAA api.example.com: answered through the DNS proxy (the name \
                 of a destination; forwarded to the host's resolvers (run --resolv-conf))\n"
            ),
            "{text}"
        );
        let cases: &[(&str, &str, bool, &str)] = &[
            (
                "resolver",
                "a.cdn.example.com",
                true,
                "dns:       A a.cdn.example.com: answered through the DNS proxy (dns.names \
                 pattern *.cdn.example.com; forwarded to the host's resolvers (run \
                 --resolv-conf))",
            ),
            (
                "resolver",
                "API.Example.COM. txt",
                true,
                "answered through the DNS proxy (the name of a destination;",
            ),
            (
                "resolver",
                "a.b.cdn.example.com",
                false,
                "REFUSED dns_name_not_allowed: a.b.cdn.example.com is neither a destination's \
                 host name nor matched by dns.names (*.cdn.example.com)",
            ),
            (
                "resolver",
                "api.example.com MX",
                false,
                "REFUSED dns_type_not_allowed: the name is allowed, the type MX is not (A and \
                 AAAA, plus dns.types: TXT)",
            ),
            (
                "billing",
                "api.example.com",
                false,
                "REFUSED dns_not_allowed: the policy has no `dns:`",
            ),
            (
                "audited",
                "exfil.attacker.example",
                false,
                "REFUSED dns_name_not_allowed: exfil.attacker.example is neither a \
                 destination's host name nor matched by dns.names (none) (audit mode: answered \
                 and recorded as would_deny)",
            ),
        ];
        for (workload, q, want_allowed, want) in cases {
            let (allowed, text) = query(workload, q, false).unwrap();
            assert_eq!(allowed, *want_allowed, "{q}: {text}");
            assert!(text.contains(want), "{q}: {text}");
        }
        let (_, json) = query("resolver", "x.cdn.example.com TXT", true).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["workload"], "resolver");
        assert_eq!(v["dns"]["decision"], "answer");
        assert_eq!(v["dns"]["types"][0], "TXT");
        // Hostile or broken questions: a clear error naming the value.
        for (bad, want) in [
            ("", "--dns-query \"\": expected 'NAME [TYPE]'"),
            (
                "a.example.com A extra",
                "--dns-query \"a.example.com A extra\": expected",
            ),
            (
                "a.example.com BOGUS",
                "--dns-query \"a.example.com BOGUS\": unknown DNS type",
            ),
        ] {
            let e = query("resolver", bad, false).unwrap_err().to_string();
            assert!(e.starts_with(want), "{bad:?}: {e}");
        }
        // A name that is not a DNS name is refused, never forwarded.
        let (allowed, text) = query("resolver", "exa_mple..com", false).unwrap();
        assert!(!allowed, "{text}");
        assert!(text.contains("REFUSED dns_name_not_allowed"), "{text}");
    }

    #[test]
    fn explain_with_an_unusable_resolv_conf_is_an_error() {
        let env = env();
        let lookup = AgentLookup {
            resolv_conf: env.dir.path().join("missing-resolv.conf"),
            bounds: TtlBounds::default(),
        };
        let e = run_explain(
            command(
                env.dir.path().join("policies"),
                "billing",
                "GET https://api.example.com/v1/customers/cus_1",
            ),
            &lookup,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing-resolv.conf"), "{e}");
        // An IP-literal destination needs no resolver.
        let (allowed, _) = run_explain(
            command(
                env.dir.path().join("policies"),
                "billing",
                "GET http://[::1]:8080/health",
            ),
            &lookup,
        )
        .unwrap();
        assert!(allowed);
    }

    /// An audit file of sealed records: (workload, decision, rule, method, ts), then `tail`.
    fn audit_file(
        dir: &std::path::Path,
        records: &[(&str, crate::audit::Decision, Option<&str>, &str, &str)],
        tail: &[u8],
    ) -> PathBuf {
        use crate::audit::{Record, chain};
        let mut out = Vec::new();
        let mut prev = chain::GENESIS;
        for (i, (workload, decision, rule, method, ts)) in records.iter().enumerate() {
            let mut r = Record::new("http");
            r.workload = Some((*workload).to_owned());
            r.decision = *decision;
            r.rule = rule.map(str::to_owned);
            r.method = Some((*method).to_owned());
            r.ts = (*ts).to_owned();
            prev = chain::seal(&mut r, i as u64 + 1, &prev, &mut out);
        }
        out.extend_from_slice(tail);
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, out).unwrap();
        path
    }

    #[test]
    fn unused_grants_from_audit_records() {
        use crate::audit::Decision::{Allow, Deny, WouldDeny};
        let env = env();
        let policies = env.dir.path().join("policies");
        let file = audit_file(
            env.dir.path(),
            &[
                (
                    "billing",
                    Allow,
                    Some("create-charge"),
                    "POST",
                    "2026-11-30T10:00:00.000000Z",
                ),
                // too old for --since
                (
                    "billing",
                    Allow,
                    Some("local"),
                    "GET",
                    "2026-01-01T00:00:00.000000Z",
                ),
                // denials and would-denies exercise nothing
                ("billing", Deny, None, "GET", "2026-11-30T10:00:01.000000Z"),
                (
                    "billing",
                    WouldDeny,
                    None,
                    "GET",
                    "2026-11-30T10:00:02.000000Z",
                ),
                // a workload the directory does not have
                (
                    "payroll",
                    Allow,
                    Some("pay"),
                    "POST",
                    "2026-11-30T10:00:03.000000Z",
                ),
            ],
            b"{\"seq\":6,\"ts\":\"2026-11",
        );
        let run = |since: Option<&str>, json: bool, fail: bool| {
            let records = read_allows(
                std::slice::from_ref(&file),
                since.map(|s| s.parse().unwrap()),
            )
            .unwrap();
            let snapshot = Snapshot::load_dir(&policies).unwrap();
            let report = usage::unused(&snapshot, records.uses());
            let text = if json {
                serde_json::to_string(&report).unwrap()
            } else {
                unused_text(&report, records.files, None)
            };
            (records.warnings, text, !fail || report.unused.is_empty())
        };
        let (warnings, text, ok) = run(Some("2026-11-01T00:00:00Z"), false, true);
        assert!(!ok);
        assert_eq!(
            warnings,
            [format!(
                "{}:6: not an audit record (a torn last line: the agent stopped mid-write), \
                 skipped",
                file.display()
            )]
        );
        assert_eq!(
            text,
            "workload billing: rule read-customer of api.example.com:443 was never used\n\
             workload billing: destination [::1]:8080 was never used (none of its rules allowed \
             a request)\n\
             note: 1 allow record(s) of workload payroll, which the policy directory does not \
             have\n\
             2 unused grant(s); 1 allow record(s) counted from 1 file(s), all records\n"
        );
        // Without --since the old allow counts: [::1]:8080 is used.
        let (_, text, _) = run(None, false, true);
        assert!(!text.contains("[::1]:8080"), "{text}");
        let (_, json, _) = run(None, true, false);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["unused"][0]["kind"], "rule");
        assert_eq!(v["unused"][0]["rule"], "read-customer");
        assert_eq!(v["allows"]["billing"], 2);
        // An empty audit file: a warning, and every destination is unused.
        std::fs::write(&file, b"").unwrap();
        let (warnings, text, _) = run(None, false, false);
        assert_eq!(warnings, [format!("{}: no audit records", file.display())]);
        assert!(
            text.starts_with("workload billing: destination api.example.com:443 was never used"),
            "{text}"
        );
        // A missing file is an error naming it.
        let e = read_allows(&[env.dir.path().join("nope.jsonl")], None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nope.jsonl: cannot read audit records"), "{e}");
    }

    #[test]
    fn explains_a_deny() {
        let env = env();
        let (allowed, text) = env
            .explain(
                "GET https://api.example.com/v1/customers/cus_42?expand=card",
                &[],
                None,
                false,
            )
            .unwrap();
        assert!(!allowed);
        assert_eq!(
            text,
            "request:   GET api.example.com:443/v1/customers/cus_42?expand=card (uid 1001, at \
             2024-06-03T10:00:00Z)\n\
             workload:  billing (mode enforce)\n\
             decision:  DENY query_param_not_allowed: rule read-customer: query parameter \
             \"expand\" is not allowed\n\
             rules of api.example.com:443:\n  \
               create-charge: path_not_allowed: the path does not match /v1/charges\n  \
               read-customer: query_param_not_allowed: query parameter \"expand\" is not allowed\n\
             dns:       A/AAAA api.example.com: REFUSED dns_not_allowed: the policy has no \
             `dns:`: the kernel refuses the workload's UDP (EPERM) and the proxy refuses its \
             DNS over TCP\n\
             binding:   api.example.com resolves to 1 address(es) via the test table, trusted \
             for 60 s (allow_internal: none)\n  \
             198.51.100.7 (documentation): allowed"
        );
        let (allowed, json) = env
            .explain(
                "POST https://api.example.com/v1/charges",
                &[],
                Some(r#"{"currency": "gbp", "amount": 100}"#),
                true,
            )
            .unwrap();
        assert!(!allowed);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["decision"], "deny");
        assert_eq!(v["code"], "json_constraint_failed");
        assert!(v["rule"].is_null(), "{v}");
        assert_eq!(v["nearest_rule"], "create-charge");
        assert_eq!(
            v["reason"],
            "rule create-charge: json field currency must be one of [\"usd\", \"eur\"]"
        );
        assert_eq!(v["rules"][0]["check"], "json");
        assert_eq!(v["rules"][1]["code"], "path_not_allowed");

        // No destination matches: every destination's rules, as if host and port matched.
        let (allowed, text) = env
            .explain(
                "GET https://api.example.com:8443/v1/customers/cus_1",
                &[],
                None,
                false,
            )
            .unwrap();
        assert!(!allowed);
        assert!(
            text.contains(
                "decision:  DENY destination_not_allowed: destination api.example.com:8443 is \
                 not allowed\n\
                 rules of api.example.com:443 (host/port do not match; rules evaluated as if \
                 they did):\n  \
                 create-charge: path_not_allowed: the path does not match /v1/charges\n  \
                 read-customer: allow\n\
                 rules of [::1]:8080 (host/port do not match; rules evaluated as if they did):\n  \
                 local: path_not_allowed: the path does not match /health"
            ),
            "{text}"
        );
    }

    #[test]
    fn explain_errors_name_the_value() {
        let env = env();
        let err = |r: Result<(bool, String), PolicyCliError>| r.unwrap_err().to_string();
        assert_eq!(
            err(env.explain("GET https://api.example.com/a%2fb", &[], None, false)),
            "--request \"GET https://api.example.com/a%2fb\": \"/a%2fb\": an encoded '/' is not \
             allowed (%2f) (the proxy answers 400 encoded_slash)"
        );
        assert_eq!(
            err(env.explain("GET https://api.example.com/", &["X-A"], None, false)),
            "--header \"X-A\": expected 'Name: value'"
        );
        assert_eq!(
            err(env.explain("GET https://api.example.com/", &["X A: 1"], None, false)),
            "--header \"X A: 1\": \"X A\" is not a valid header name"
        );
        let body = env.explain(
            "POST https://api.example.com/v1/charges",
            &[],
            Some(r#"{"amount": 1, "amount": 2}"#),
            false,
        );
        let message = err(body);
        assert!(
            message.ends_with(
                "body.json: the body has the key \"amount\" twice in the object at $ (the proxy \
                 answers 400 duplicate_json_key)"
            ),
            "{message}"
        );
        let wrong_type = env.explain(
            "POST https://api.example.com/v1/charges",
            &["Content-Type: text/plain"],
            Some("{}"),
            false,
        );
        assert!(err(wrong_type).contains("(the proxy answers 415 unsupported_media_type)"));
        let unknown = run_explain(
            command(env.dir.path().join("policies"), "nope", "GET https://a/"),
            &fixed_lookup(),
        );
        assert_eq!(
            err(unknown),
            "--workload \"nope\": no such workload in the policy directory (known: billing)"
        );
        let mut cmd = command(env.dir.path().join("policies"), "billing", "GET https://a/");
        if let PolicyCommand::Explain { at, .. } = &mut cmd {
            *at = Some("2024-06-03 10:00".to_owned());
        }
        let bad_time = run_explain(cmd, &fixed_lookup());
        assert!(err(bad_time).starts_with(
            "--at \"2024-06-03 10:00\": not an RFC 3339 time with an offset or Z, e.g. \
                 2024-06-03T10:00:00Z ("
        ));
    }
}
