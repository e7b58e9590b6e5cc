//! `scopegate policy …`: check and explain.
#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};
use jiff::Timestamp;

use std::net::{IpAddr, ToSocketAddrs};

use super::{
    BodyError, PathError, PolicyErrors, Request, Snapshot, binding_report, explain, normalize_with,
    parse_json_body,
};

/// How `explain` resolves a destination name: the answers, or the error text.
pub type Lookup<'a> = &'a dyn Fn(&str, u16) -> Result<Vec<IpAddr>, String>;

/// The system resolver (getaddrinfo). The proxy itself resolves with its own resolver
/// (`resolve::DnsLookup`, nameservers from `run --resolv-conf`, TTL-bounded), which reads
/// the same `/etc/resolv.conf` and `/etc/hosts` by default.
pub fn system_lookup(name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for addr in (name, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {name}: {e}"))?
    {
        let ip = addr.ip().to_canonical();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

/// The `policy` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory; prints every error as file:line:col: message.
    Check {
        /// The directory.
        dir: PathBuf,
    },
    /// Explain the decision for one request: the decision, the rule, and for a denial why
    /// each rule did not allow it. Exits 0 when allowed, 1 when denied.
    Explain {
        /// The policy directory (not with --live).
        #[arg(required_unless_present = "live", conflicts_with = "live")]
        dir: Option<PathBuf>,
        /// Ask the running agent (over its admin socket) to explain the request against
        /// the snapshot it enforces now, not the files on disk.
        #[arg(long)]
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
            help = "The request: 'METHOD URL', e.g. 'POST https://api.example.com/v1/charges'; \
                    the port defaults to 80 for http and 443 for https"
        )]
        request: String,
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
}

/// Errors of the policy command line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyCliError {
    /// The policy directory is invalid.
    #[error("{0}")]
    Policy(#[from] PolicyErrors),
    /// `--workload` names no workload of the directory.
    #[error("--workload {name:?}: no such workload in the policy directory (known: {known})")]
    UnknownWorkload {
        /// The name given.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// `--request` cannot be parsed.
    #[error("--request {value:?}: {reason}")]
    InvalidRequest {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The request's path is refused by normalisation (the proxy answers 400).
    #[error("--request {value:?}: {source} (the proxy answers 400 {})", source.code())]
    InvalidPath {
        /// The value given.
        value: String,
        /// The normalisation error.
        source: PathError,
    },
    /// `--header` cannot be parsed.
    #[error("--header {value:?}: {reason}")]
    InvalidHeader {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// `--body` cannot be read.
    #[error("--body {}: {source}", path.display())]
    ReadBody {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// `--body` is refused by the body parser.
    #[error("--body {}: {source} (the proxy answers {} {})", path.display(), source.status(), source.code())]
    Body {
        /// The file.
        path: PathBuf,
        /// Why.
        source: BodyError,
    },
    /// `--at` is not an RFC 3339 time.
    #[error(
        "--at {value:?}: not an RFC 3339 time with an offset or Z, e.g. 2024-06-03T10:00:00Z \
         ({reason})"
    )]
    InvalidTime {
        /// The value given.
        value: String,
        /// The parser's message.
        reason: String,
    },
    /// The explanation could not be written as JSON.
    #[error("cannot write the explanation as JSON: {0}")]
    Output(#[from] serde_json::Error),
}

/// Runs a policy subcommand; `Ok(true)` means success (exit 0), `Ok(false)` a finding (exit 1).
pub fn run(command: PolicyCommand) -> Result<bool, PolicyCliError> {
    match command {
        PolicyCommand::Check { dir } => match Snapshot::load_dir(&dir) {
            Ok(snapshot) => {
                println!(
                    "{}: OK, {} workload(s)",
                    dir.display(),
                    snapshot.workloads().len()
                );
                Ok(true)
            }
            Err(errors) => {
                for e in &errors.0 {
                    println!("{e}");
                }
                Ok(false)
            }
        },
        explain @ PolicyCommand::Explain { .. } => {
            let (allowed, text) = run_explain(explain, &system_lookup)?;
            println!("{text}");
            Ok(allowed)
        }
    }
}

/// `explain`: whether the request is allowed, and the text to print. A matched name
/// destination is resolved with `lookup` to show destination binding; the request counts
/// as allowed only if some answer may be bound.
fn run_explain(
    command: PolicyCommand,
    lookup: Lookup<'_>,
) -> Result<(bool, String), PolicyCliError> {
    let PolicyCommand::Explain {
        dir,
        workload,
        request,
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
        return Err(PolicyCliError::InvalidRequest {
            value: request,
            reason: "a policy directory (or --live) is needed".into(),
        });
    };
    let snapshot = Snapshot::load_dir(&dir)?;
    let body = match body {
        None => None,
        Some(file) => {
            let bytes = std::fs::read(&file).map_err(|source| PolicyCliError::ReadBody {
                path: file.clone(),
                source,
            })?;
            Some((file, bytes))
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
    pub body: Option<(PathBuf, Vec<u8>)>,
    /// RFC 3339 request time (default: now).
    pub at: Option<String>,
    /// The caller's uid (default: the workload's select.uid, or 0).
    pub uid: Option<u32>,
    /// Render as JSON.
    pub json: bool,
}

/// Explains `input` against `snapshot` (a directory just loaded, or the agent's running
/// snapshot): whether the request is allowed, and the text to print.
pub fn explain_in(
    snapshot: &Snapshot,
    input: &ExplainInput,
    lookup: Lookup<'_>,
) -> Result<(bool, String), PolicyCliError> {
    let ExplainInput {
        workload,
        request,
        headers: header,
        body,
        at,
        uid,
        json,
    } = input;
    let (uid, json) = (*uid, *json);
    let id = snapshot.workload_by_name(workload).ok_or_else(|| {
        let known: Vec<&str> = snapshot
            .workloads()
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        PolicyCliError::UnknownWorkload {
            name: workload.clone(),
            known: if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            },
        }
    })?;
    let w = snapshot
        .workload(id)
        .ok_or_else(|| PolicyCliError::UnknownWorkload {
            name: workload.clone(),
            known: String::new(),
        })?;

    let target = parse_request(request)?;
    let options = w
        .destination_for(&target.host, target.port)
        .map(|(_, d)| d.normalize_options())
        .unwrap_or_default();
    let path = normalize_with(&target.path_and_query, options).map_err(|source| {
        PolicyCliError::InvalidPath {
            value: request.clone(),
            source,
        }
    })?;

    let mut headers = HeaderMap::new();
    for h in header {
        let (name, value) = parse_header(h)?;
        headers.append(name, value);
    }
    let parsed_body = match body {
        None => None,
        Some((file, bytes)) => {
            if !headers.contains_key(header::CONTENT_TYPE) {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            Some(
                parse_json_body(bytes, content_type).map_err(|source| PolicyCliError::Body {
                    path: file.clone(),
                    source,
                })?,
            )
        }
    };
    let at = match at {
        None => Timestamp::now(),
        Some(text) => text
            .parse::<Timestamp>()
            .map_err(|e| PolicyCliError::InvalidTime {
                value: text.clone(),
                reason: e.to_string(),
            })?,
    };
    let req = Request {
        workload: id,
        uid: uid.or(w.uid).unwrap_or(0),
        method: &target.method,
        host: &target.host,
        port: target.port,
        path: &path,
        headers: &headers,
        body: parsed_body.as_ref(),
        at,
    };
    let mut explanation = explain(snapshot, &req);
    explanation.binding = w
        .destination_for(&target.host, target.port)
        .filter(|(_, d)| matches!(d.host, super::Host::Name(_)))
        .and_then(|(_, d)| binding_report(d, lookup(&d.host.to_string(), target.port)));
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

/// The parts of `--request` the policy needs.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    method: String,
    host: String,
    port: u16,
    path_and_query: String,
}

/// Parses 'METHOD URL'.
fn parse_request(value: &str) -> Result<Target, PolicyCliError> {
    let fail = |reason: &str| PolicyCliError::InvalidRequest {
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let (method, url) = value
        .trim()
        .split_once(char::is_whitespace)
        .ok_or_else(|| fail("expected 'METHOD URL', e.g. 'GET https://api.example.com/v1/x'"))?;
    let url = url.trim();
    Method::from_bytes(method.as_bytes())
        .map_err(|_| fail(&format!("{method:?} is not an HTTP method")))?;
    let uri: Uri = url
        .parse()
        .map_err(|e| fail(&format!("{url:?} is not a URL: {e}")))?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        Some("http") => 80,
        Some(other) => return Err(fail(&format!("scheme {other:?} is not http or https"))),
        None => {
            return Err(fail(
                "the URL needs a scheme and a host, e.g. https://api.example.com/",
            ));
        }
    };
    let authority = uri.authority().ok_or_else(|| fail("the URL has no host"))?;
    if authority.as_str().contains('@') {
        return Err(fail("the URL must not contain user information ('@')"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err(fail("the URL has no host"));
    }
    let port = match authority.port_u16() {
        Some(0) => return Err(fail("port 0 is not a port")),
        Some(p) => p,
        None if authority.as_str().ends_with(':') => {
            return Err(fail("the URL has an empty port"));
        }
        None => default_port,
    };
    let path_and_query = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    Ok(Target {
        method: method.to_owned(),
        host,
        port,
        path_and_query,
    })
}

/// Parses 'Name: value'.
fn parse_header(value: &str) -> Result<(HeaderName, HeaderValue), PolicyCliError> {
    let fail = |reason: String| PolicyCliError::InvalidHeader {
        value: value.to_owned(),
        reason,
    };
    let (name, v) = value
        .split_once(':')
        .ok_or_else(|| fail("expected 'Name: value'".to_owned()))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| fail(format!("{:?} is not a valid header name", name.trim())))?;
    let v = HeaderValue::from_str(v.trim())
        .map_err(|_| fail("the value has characters not allowed in a header".to_owned()))?;
    Ok((name, v))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

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

    /// The test resolver: api.example.com is a documentation address (a public stand-in).
    fn fixed_lookup(name: &str, _port: u16) -> Result<Vec<IpAddr>, String> {
        match name {
            "api.example.com" => Ok(vec!["198.51.100.7".parse().unwrap()]),
            other => Err(format!("resolving {other}: no such name")),
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
            run_explain(
                PolicyCommand::Explain {
                    dir: Some(self.dir.path().join("policies")),
                    live: false,
                    admin_socket: PathBuf::new(),
                    workload: "billing".to_owned(),
                    request: request.to_owned(),
                    header: header.iter().map(|h| (*h).to_owned()).collect(),
                    body,
                    at: Some("2024-06-03T10:00:00Z".to_owned()),
                    uid: None,
                    json,
                },
                &fixed_lookup,
            )
        }
    }

    #[test]
    fn parses_requests() {
        let t = |v: &str| parse_request(v).map_err(|e| e.to_string());
        assert_eq!(
            t("POST https://API.example.com/v1/charges?x=1"),
            Ok(Target {
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
             binding:   api.example.com resolves to 1 address(es) (allow_internal: none)\n  \
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
        let lookup = |name: &str, _port: u16| -> Result<Vec<IpAddr>, String> {
            let ips = |list: &[&str]| list.iter().map(|s| s.parse().unwrap()).collect();
            match name {
                "mixed.test" => Ok(ips(&[
                    "198.51.100.7",
                    "127.0.0.1",
                    "::ffff:169.254.169.254",
                ])),
                "inside.test" => Ok(ips(&["127.0.0.1", "10.0.0.1"])),
                "lo.test" => Ok(ips(&["64:ff9b::7f00:1"])),
                other => Err(format!("resolving {other}: no such name")),
            }
        };
        let run = |url: &str, json: bool| {
            run_explain(
                PolicyCommand::Explain {
                    dir: Some(policies.clone()),
                    live: false,
                    admin_socket: PathBuf::new(),
                    workload: "fetcher".to_owned(),
                    request: format!("GET {url}"),
                    header: Vec::new(),
                    body: None,
                    at: Some("2024-06-03T10:00:00Z".to_owned()),
                    uid: None,
                    json,
                },
                &lookup,
            )
            .unwrap()
        };
        let (allowed, text) = run("http://mixed.test/x", false);
        assert!(allowed, "{text}");
        assert!(
            text.ends_with(
                "decision:  ALLOW by rule m of mixed.test:80\n\
                 binding:   mixed.test resolves to 3 address(es) (allow_internal: none)\n  \
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
                "binding:   inside.test resolves to 2 address(es) (allow_internal: 127.0.0.0/8)\n  \
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
             binding:   api.example.com resolves to 1 address(es) (allow_internal: none)\n  \
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
        assert_eq!(v["rule"], "create-charge");
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
            PolicyCommand::Explain {
                dir: Some(env.dir.path().join("policies")),
                live: false,
                admin_socket: PathBuf::new(),
                workload: "nope".to_owned(),
                request: "GET https://a/".to_owned(),
                header: Vec::new(),
                body: None,
                at: None,
                uid: None,
                json: false,
            },
            &fixed_lookup,
        );
        assert_eq!(
            err(unknown),
            "--workload \"nope\": no such workload in the policy directory (known: billing)"
        );
        let bad_time = run_explain(
            PolicyCommand::Explain {
                dir: Some(env.dir.path().join("policies")),
                live: false,
                admin_socket: PathBuf::new(),
                workload: "billing".to_owned(),
                request: "GET https://a/".to_owned(),
                header: Vec::new(),
                body: None,
                at: Some("2024-06-03 10:00".to_owned()),
                uid: None,
                json: false,
            },
            &fixed_lookup,
        );
        assert!(err(bad_time).starts_with(
            "--at \"2024-06-03 10:00\": not an RFC 3339 time with an offset or Z, e.g. \
                 2024-06-03T10:00:00Z ("
        ));
    }
}
