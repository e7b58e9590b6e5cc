//! The shared benchmark workload (`rules.txt`, `requests.txt`, `denied.txt`) and the
//! configurations generated from it: the scopegate policy, the nginx upstream and proxy
//! configs, the HAProxy config and the wrk Lua script.

use std::{fmt::Write as _, fs, net::SocketAddr, path::Path};

use anyhow::{Context, Result, bail};

/// The body sent with every POST or PUT of the workload.
pub const POST_BODY: &str = r#"{"bench":"scopegate","items":[1,2,3]}"#;

/// The upstream's fixed response body: exactly 128 bytes.
pub fn upstream_body() -> String {
    let mut body = String::from("scopegate-bench-upstream:");
    while body.len() < 128 {
        body.push('x');
    }
    body
}

/// One allow rule: methods and a path regex (anchored, matched against the path alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `r01`, `r02`, ... in file order.
    pub id: String,
    /// Uppercase methods.
    pub methods: Vec<String>,
    /// The regex as written in `rules.txt` (`^/...$`).
    pub regex: String,
}

/// One request line: method and request target (path plus optional query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Uppercase method.
    pub method: String,
    /// Request target as sent (`/path?query`).
    pub target: String,
}

impl Request {
    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(&self.target)
    }

    /// The body this request carries, if any.
    pub fn body(&self) -> Option<&'static str> {
        matches!(self.method.as_str(), "POST" | "PUT" | "PATCH").then_some(POST_BODY)
    }

    /// `METHOD target`, for messages.
    pub fn show(&self) -> String {
        format!("{} {}", self.method, self.target)
    }
}

/// The whole workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The 20 allow rules.
    pub rules: Vec<Rule>,
    /// Requests that must be allowed (200), cycled by the load generators.
    pub requests: Vec<Request>,
    /// Requests that must be denied (403).
    pub denied: Vec<Request>,
}

impl Workload {
    /// Reads `rules.txt`, `requests.txt` and `denied.txt` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let rules = parse_rules(&read("rules.txt")?).context("rules.txt")?;
        let requests = parse_requests(&read("requests.txt")?).context("requests.txt")?;
        let denied = parse_requests(&read("denied.txt")?).context("denied.txt")?;
        if rules.is_empty() || requests.is_empty() {
            bail!(
                "{}: rules.txt and requests.txt must not be empty",
                dir.display()
            );
        }
        Ok(Self {
            rules,
            requests,
            denied,
        })
    }
}

/// Lines that are neither blank nor comments.
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// Parses `METHODS REGEX` lines.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>> {
    let mut rules = Vec::new();
    for (line_no, line) in content_lines(text) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [methods, regex] = fields.as_slice() else {
            bail!("line {line_no}: expected `METHODS REGEX`, got {line:?}");
        };
        if !regex.starts_with("^/") || !regex.ends_with('$') {
            bail!("line {line_no}: the regex {regex:?} must be anchored: ^/...$");
        }
        let methods: Vec<String> = methods.split('|').map(str::to_owned).collect();
        if methods
            .iter()
            .any(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
        {
            bail!("line {line_no}: methods must be uppercase tokens separated by '|'");
        }
        rules.push(Rule {
            id: format!("r{:02}", rules.len() + 1),
            methods,
            regex: (*regex).to_owned(),
        });
    }
    Ok(rules)
}

/// Parses `METHOD TARGET` lines.
pub fn parse_requests(text: &str) -> Result<Vec<Request>> {
    content_lines(text)
        .map(|(line_no, line)| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [method, target] = fields.as_slice() else {
                bail!("line {line_no}: expected `METHOD TARGET`, got {line:?}");
            };
            if !target.starts_with('/') {
                bail!("line {line_no}: the target {target:?} must start with '/'");
            }
            Ok(Request {
                method: (*method).to_owned(),
                target: (*target).to_owned(),
            })
        })
        .collect()
}

/// How path patterns are written in the generated scopegate policy, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathStyle {
    /// `{pN:SEGMENT_REGEX}` with the segment regex as written.
    Regex,
    /// `{pN:SEGMENT_REGEX}` with `X{n}` quantifiers spelled out (for a parser that does not
    /// accept braces inside a parameter).
    RegexNoBraces,
    /// Plain `{pN}`: any one segment (looser than the rules: the fallback).
    Plain,
}

impl PathStyle {
    /// Every style, best first.
    pub const ALL: [Self; 3] = [Self::Regex, Self::RegexNoBraces, Self::Plain];

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Regex => "{name:REGEX} segments",
            Self::RegexNoBraces => "{name:REGEX} segments, quantifiers expanded",
            Self::Plain => "plain {name} segments (FALLBACK: looser than the regex rules)",
        }
    }
}

/// One segment of a rule's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Matched literally.
    Literal(String),
    /// A regex for the whole segment.
    Pattern(String),
}

/// True if `seg` is a plain literal (no regex metacharacters).
fn is_literal(seg: &str) -> bool {
    !seg.is_empty()
        && seg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '~'))
}

/// Splits an anchored path regex `^/a/[0-9]+$` into segments, splitting only at `/`
/// outside brackets and groups.
fn segments(regex: &str) -> Result<Vec<Segment>> {
    let inner = regex
        .strip_prefix("^/")
        .and_then(|r| r.strip_suffix('$'))
        .with_context(|| format!("{regex:?} is not of the form ^/...$"))?;
    let mut parts = Vec::new();
    let mut current = String::new();
    let (mut bracket, mut paren, mut escaped) = (false, 0usize, false);
    for c in inner.chars() {
        if escaped {
            escaped = false;
            current.push(c);
            continue;
        }
        match c {
            '\\' => escaped = true,
            '[' if !bracket => bracket = true,
            ']' if bracket => bracket = false,
            '(' if !bracket => paren += 1,
            ')' if !bracket => paren = paren.saturating_sub(1),
            '/' if !bracket && paren == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    if parts.iter().any(String::is_empty) {
        bail!("{regex:?} has an empty path segment");
    }
    Ok(parts
        .into_iter()
        .map(|p| {
            if is_literal(&p) {
                Segment::Literal(p)
            } else {
                Segment::Pattern(p)
            }
        })
        .collect())
}

/// Rewrites `X{n}` (X a bracket class, an escape or one character) as X repeated n times;
/// `None` if the pattern has another brace construct.
fn expand_quantifiers(pattern: &str) -> Option<String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::new();
    let mut last_atom = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            let close = chars[i..].iter().position(|&c| c == '}')? + i;
            let count: usize = chars[i + 1..close]
                .iter()
                .collect::<String>()
                .parse()
                .ok()?;
            if last_atom.is_empty() || count == 0 || count > 64 {
                return None;
            }
            for _ in 1..count {
                out.push_str(&last_atom);
            }
            last_atom.clear();
            i = close + 1;
            continue;
        }
        let atom = if c == '[' {
            let close = chars[i + 1..].iter().position(|&c| c == ']')? + i + 1;
            chars[i..=close].iter().collect::<String>()
        } else if c == '\\' {
            chars.get(i..i + 2)?.iter().collect::<String>()
        } else if c == '}' {
            return None;
        } else {
            c.to_string()
        };
        i += atom.chars().count();
        out.push_str(&atom);
        last_atom = atom;
    }
    Some(out)
}

/// The policy path for `rule` in `style`; `None` if the style cannot express it.
fn policy_path(rule: &Rule, style: PathStyle) -> Result<Option<String>> {
    let mut path = String::new();
    let mut param = 0;
    for seg in segments(&rule.regex)? {
        path.push('/');
        match seg {
            Segment::Literal(lit) => path.push_str(&lit),
            Segment::Pattern(pattern) => {
                param += 1;
                match style {
                    PathStyle::Regex => {
                        let _ = write!(path, "{{p{param}:{pattern}}}");
                    }
                    PathStyle::RegexNoBraces => {
                        let Some(expanded) = expand_quantifiers(&pattern) else {
                            return Ok(None);
                        };
                        let _ = write!(path, "{{p{param}:{expanded}}}");
                    }
                    PathStyle::Plain => {
                        let _ = write!(path, "{{p{param}}}");
                    }
                }
            }
        }
    }
    Ok(Some(path))
}

/// The scopegate policy (YAML) for the workload, selecting `cgroup`, allowing the rules on
/// `upstream`; `None` if `style` cannot express a rule.
pub fn policy_yaml(
    rules: &[Rule],
    cgroup: &str,
    upstream: SocketAddr,
    style: PathStyle,
) -> Result<Option<String>> {
    let mut yaml = format!(
        "# Generated by `cargo xtask bench` from rules.txt ({}).\n\
         workload: bench\nselect:\n  cgroup: {cgroup}\n\
         # The idle-connection measurement holds 10,000 (the default cap is 1,024).\n\
         max_connections: 20000\negress:\n  - host: \"{}\"\n    port: {}\n    rules:\n",
        style.name(),
        upstream.ip(),
        upstream.port()
    );
    for rule in rules {
        let Some(path) = policy_path(rule, style)? else {
            return Ok(None);
        };
        let _ = write!(
            yaml,
            "      - id: {}\n        methods: [{}]\n        path: '{}'\n",
            rule.id,
            rule.methods.join(", "),
            path.replace('\'', "''")
        );
    }
    Ok(Some(yaml))
}

/// True if the `Plain`-style policy (any one segment per parameter) allows `req`: such
/// requests cannot be expected to get a 403 from a fallback policy.
pub fn plain_policy_allows(rules: &[Rule], req: &Request) -> Result<bool> {
    let got: Vec<&str> = req
        .path()
        .strip_prefix('/')
        .unwrap_or(req.path())
        .split('/')
        .collect();
    for rule in rules {
        if !rule.methods.contains(&req.method) {
            continue;
        }
        let want = segments(&rule.regex)?;
        let same = want.len() == got.len()
            && want.iter().zip(&got).all(|(w, g)| match w {
                Segment::Literal(lit) => lit == g,
                Segment::Pattern(_) => !g.is_empty(),
            });
        if same {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Temp-path directives so that nginx writes nothing outside `dir`.
fn nginx_temp_paths(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "    client_body_temp_path {d}/tmp/{name}-body;\n\
         \x20   proxy_temp_path {d}/tmp/{name}-proxy;\n\
         \x20   fastcgi_temp_path {d}/tmp/{name}-fastcgi;\n\
         \x20   uwsgi_temp_path {d}/tmp/{name}-uwsgi;\n\
         \x20   scgi_temp_path {d}/tmp/{name}-scgi;\n"
    )
}

/// The nginx origin: one worker, `return 200` with the 128-byte body, no access log;
/// `nofile` is the open-files limit it may use.
pub fn nginx_upstream_conf(dir: &Path, listen: SocketAddr, nofile: u64) -> String {
    let d = dir.display();
    format!(
        "# Generated by `cargo xtask bench`: the origin (fixed 128-byte body).\n\
         worker_processes 1;\n\
         pid {d}/upstream.pid;\n\
         error_log {d}/upstream-error.log warn;\n\
         worker_rlimit_nofile {nofile};\n\
         events {{ worker_connections {conns}; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   keepalive_requests 10000000;\n\
         \x20   keepalive_timeout 75s;\n\
         {temp}\
         \x20   server {{\n\
         \x20       listen {listen} backlog=4096;\n\
         \x20       location / {{\n\
         \x20           default_type text/plain;\n\
         \x20           return 200 \"{body}\";\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        temp = nginx_temp_paths(dir, "upstream"),
        body = upstream_body(),
        conns = nofile / 2,
    )
}

/// nginx as the peer proxy: the rules as regex locations with method checks, 403 for
/// everything else, a JSON access log, keep-alive to the origin; `nofile` is the
/// open-files limit it may use.
pub fn nginx_proxy_conf(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    rules: &[Rule],
    nofile: u64,
) -> String {
    let d = dir.display();
    let mut locations = String::new();
    for rule in rules {
        let _ = write!(
            locations,
            "        # {id}\n        location ~ \"{re}\" {{\n            if ($request_method !~ \"^({m})$\") {{ return 403; }}\n            proxy_pass http://origin;\n        }}\n",
            id = rule.id,
            re = rule.regex,
            m = rule.methods.join("|"),
        );
    }
    format!(
        "# Generated by `cargo xtask bench`: nginx with the 20 rules.\n\
         worker_processes 1;\n\
         pid {d}/nginx-proxy.pid;\n\
         error_log {d}/nginx-proxy-error.log warn;\n\
         worker_rlimit_nofile {nofile};\n\
         events {{ worker_connections {conns}; }}\n\
         http {{\n\
         \x20   log_format bench escape=json '{{\"time\":\"$time_iso8601\",\"remote\":\"$remote_addr\",\"method\":\"$request_method\",\"uri\":\"$request_uri\",\"status\":$status,\"bytes\":$body_bytes_sent,\"request_time\":$request_time,\"upstream_time\":\"$upstream_response_time\"}}';\n\
         \x20   access_log {d}/nginx-access.jsonl bench;\n\
         \x20   keepalive_requests 10000000;\n\
         \x20   keepalive_timeout 75s;\n\
         {temp}\
         \x20   upstream origin {{\n\
         \x20       server {upstream};\n\
         \x20       keepalive 64;\n\
         \x20       keepalive_requests 10000000;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen {listen} backlog=4096;\n\
         \x20       proxy_http_version 1.1;\n\
         \x20       proxy_set_header Connection \"\";\n\
         {locations}\
         \x20       location / {{ return 403; }}\n\
         \x20   }}\n\
         }}\n",
        temp = nginx_temp_paths(dir, "proxy"),
        conns = nofile / 2,
    )
}

/// HAProxy as the peer proxy: one thread, the rules as ACLs, deny (403) otherwise, a JSON
/// log line per request on stdout, connection reuse to the origin. `maxconn` follows the
/// open-files limit `nofile` (HAProxy wants about two descriptors per connection).
pub fn haproxy_conf(
    listen: SocketAddr,
    upstream: SocketAddr,
    rules: &[Rule],
    nofile: u64,
) -> String {
    let maxconn = (nofile.saturating_sub(200) / 2).clamp(256, 20_000);
    let mut acls = String::new();
    for rule in rules {
        let _ = write!(
            acls,
            "    acl {id}_path path_reg '{re}'\n    acl {id}_method method {m}\n    http-request allow if {id}_path {id}_method\n",
            id = rule.id,
            re = rule.regex,
            m = rule.methods.join(" "),
        );
    }
    format!(
        "# Generated by `cargo xtask bench`: HAProxy with the 20 rules.\n\
         global\n\
         \x20   nbthread 1\n\
         \x20   maxconn {maxconn}\n\
         \x20   log stdout format raw local0\n\
         defaults\n\
         \x20   mode http\n\
         \x20   log global\n\
         \x20   log-format '{{\"time\":\"%t\",\"client\":\"%ci\",\"method\":\"%HM\",\"uri\":\"%HU\",\"status\":%ST,\"bytes\":%B,\"tt\":%Tt}}'\n\
         \x20   option http-keep-alive\n\
         \x20   option dontlognull\n\
         \x20   http-reuse always\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 30s\n\
         \x20   timeout server 30s\n\
         \x20   timeout http-keep-alive 75s\n\
         frontend bench\n\
         \x20   bind {listen}\n\
         {acls}\
         \x20   http-request deny deny_status 403\n\
         \x20   default_backend origin\n\
         backend origin\n\
         \x20   server origin {upstream} maxconn 1000\n"
    )
}

/// Quotes `s` as a Lua string literal.
fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The wrk script: cycles the requests (with bodies for POST/PUT) and prints one
/// `SGBENCH {json}` line with the counts and latency percentiles (µs) when done.
pub fn wrk_script(requests: &[Request]) -> String {
    let mut specs = String::new();
    for req in requests {
        let body = req.body().map_or_else(|| "nil".to_owned(), lua_string);
        let _ = writeln!(
            specs,
            "  {{{}, {}, {}}},",
            lua_string(&req.method),
            lua_string(&req.target),
            body
        );
    }
    format!(
        r#"-- Generated by `cargo xtask bench`: cycles the workload's requests.
local specs = {{
{specs}}}
local reqs = {{}}
local n = 0
local i = 0

function init(args)
  for k, s in ipairs(specs) do
    local h = {{}}
    for name, value in pairs(wrk.headers) do h[name] = value end
    if s[3] ~= nil then h["Content-Type"] = "application/json" end
    reqs[k] = wrk.format(s[1], s[2], h, s[3])
  end
  n = #reqs
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'SGBENCH {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"mean_us":%.1f,"max_us":%.1f,"p50_us":%.1f,"p75_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,"p999_us":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(75),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<Rule> {
        parse_rules(
            "# c\nGET|POST ^/api/v1/users$\nGET|PUT|DELETE  ^/api/v1/users/[0-9]+$\n\
             GET ^/api/v1/orders/[0-9a-f-]{36}/items$\nGET ^/api/v2/reports/[0-9]{4}-[0-9]{2}$\n",
        )
        .unwrap_or_default()
    }

    #[test]
    fn parses_rules_and_requests() -> Result<()> {
        let r = rules();
        assert_eq!(r.len(), 4);
        assert_eq!(r[1].id, "r02");
        assert_eq!(r[1].methods, ["GET", "PUT", "DELETE"]);
        let reqs = parse_requests("GET /a?q=1\n\nPOST /b\n")?;
        assert_eq!(reqs[0].path(), "/a");
        assert_eq!(reqs[1].body(), Some(POST_BODY));
        assert!(parse_rules("GET /no-anchor\n").is_err());
        Ok(())
    }

    #[test]
    fn body_is_128_bytes() {
        assert_eq!(upstream_body().len(), 128);
    }

    #[test]
    fn policy_paths_in_every_style() -> Result<()> {
        let r = rules();
        let path = |i: usize, s| policy_path(&r[i], s);
        assert_eq!(path(0, PathStyle::Regex)?.as_deref(), Some("/api/v1/users"));
        assert_eq!(
            path(1, PathStyle::Regex)?.as_deref(),
            Some("/api/v1/users/{p1:[0-9]+}")
        );
        assert_eq!(
            path(2, PathStyle::Plain)?.as_deref(),
            Some("/api/v1/orders/{p1}/items")
        );
        assert_eq!(
            path(3, PathStyle::RegexNoBraces)?.as_deref(),
            Some("/api/v2/reports/{p1:[0-9][0-9][0-9][0-9]-[0-9][0-9]}")
        );
        assert_eq!(expand_quantifiers("a{2,3}"), None);
        assert_eq!(expand_quantifiers(r"\d{3}").as_deref(), Some(r"\d\d\d"));
        Ok(())
    }

    #[test]
    fn plain_policy_simulation() -> Result<()> {
        let r = rules();
        let req = |m: &str, t: &str| Request {
            method: m.into(),
            target: t.into(),
        };
        assert!(plain_policy_allows(&r, &req("GET", "/api/v1/users/abc"))?);
        assert!(!plain_policy_allows(&r, &req("DELETE", "/api/v1/users"))?);
        assert!(plain_policy_allows(
            &r,
            &req("GET", "/api/v2/reports/2024-5")
        )?);
        assert!(!plain_policy_allows(&r, &req("GET", "/admin"))?);
        Ok(())
    }

    #[test]
    fn generated_configs_mention_every_rule() -> Result<()> {
        let r = rules();
        let up: SocketAddr = "127.0.0.2:8080".parse()?;
        let listen: SocketAddr = "127.0.0.1:9000".parse()?;
        let nginx = nginx_proxy_conf(Path::new("/w"), listen, up, &r, 20_000);
        assert_eq!(nginx.matches("location ~").count(), r.len());
        assert!(nginx.contains("location ~ \"^/api/v2/reports/[0-9]{4}-[0-9]{2}$\""));
        let haproxy = haproxy_conf(listen, up, &r, 20_000);
        assert!(haproxy.contains("maxconn 9900"));
        assert_eq!(haproxy.matches("http-request allow").count(), r.len());
        let yaml = policy_yaml(&r, "/x/managed", up, PathStyle::Regex)?.unwrap_or_default();
        assert!(yaml.contains("path: '/api/v1/users/{p1:[0-9]+}'"));
        let lua = wrk_script(&parse_requests("POST /a\nGET /b?x=\"1\"\n")?);
        assert!(lua.contains(r#"{"GET", "/b?x=\"1\"", nil},"#));
        Ok(())
    }
}
