//! Requests written by hand, decided offline: `'METHOD URL'`, `'Name: value'` headers, a
//! JSON body, a time and a uid, as `policy explain` and `policy test` cases write them,
//! turned into exactly what the proxy's [`decide`](super::decide) takes: the canonical
//! path (with the destination's normalisation options), the parsed JSON body (refused as
//! the proxy would refuse it), the request time.
#![forbid(unsafe_code)]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header};
use jiff::Timestamp;

use super::{
    BodyError, CanonicalPath, JsonBody, PathError, Request, Snapshot, Workload, WorkloadId,
    normalize_with, parse_json_body,
};

/// Why a hand-written request cannot be decided.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The workload name is not in the policy directory.
    #[error("--workload {name:?}: no such workload in the policy directory (known: {known})")]
    UnknownWorkload {
        /// The name given.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// The request cannot be parsed.
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
    /// A header cannot be parsed.
    #[error("--header {value:?}: {reason}")]
    InvalidHeader {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The body is refused by the body parser.
    #[error("{label}: {source} (the proxy answers {} {})", source.status(), source.code())]
    Body {
        /// Where the body came from (`--body FILE`, `body`).
        label: String,
        /// Why.
        source: BodyError,
    },
    /// The time is not an RFC 3339 time.
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
}

/// A request as written.
#[derive(Clone, Debug, Default)]
pub struct Spec<'a> {
    /// `'METHOD URL'`.
    pub request: &'a str,
    /// `'Name: value'` headers, in order.
    pub headers: &'a [String],
    /// The JSON body, and where it came from (for errors).
    pub body: Option<(&'a [u8], String)>,
    /// RFC 3339 time (default: now).
    pub at: Option<&'a str>,
    /// The caller's uid (default: the workload's `select.uid`, or 0).
    pub uid: Option<u32>,
}

/// A request ready for [`decide`](super::decide): build the borrowed [`Request`] with
/// [`Prepared::request`].
#[derive(Debug)]
pub struct Prepared {
    /// The workload.
    pub workload: WorkloadId,
    /// Method, host, port, path and query as written.
    pub target: Target,
    /// The canonical path (what the proxy matches and forwards).
    pub path: CanonicalPath,
    /// The headers.
    pub headers: HeaderMap,
    /// The parsed body.
    pub body: Option<JsonBody>,
    /// The request time.
    pub at: Timestamp,
    /// The caller's uid.
    pub uid: u32,
}

impl Prepared {
    /// The request as `decide` takes it.
    pub fn request(&self) -> Request<'_> {
        Request {
            workload: self.workload,
            uid: self.uid,
            method: &self.target.method,
            host: &self.target.host,
            port: self.target.port,
            path: &self.path,
            headers: &self.headers,
            body: self.body.as_ref(),
            at: self.at,
        }
    }
}

/// The workload named `name` in `snapshot`.
pub fn workload<'s>(
    snapshot: &'s Snapshot,
    name: &str,
) -> Result<(WorkloadId, &'s Workload), RequestError> {
    let unknown = || {
        let known: Vec<&str> = snapshot
            .workloads()
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        RequestError::UnknownWorkload {
            name: name.to_owned(),
            known: if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            },
        }
    };
    let id = snapshot.workload_by_name(name).ok_or_else(unknown)?;
    let w = snapshot.workload(id).ok_or_else(unknown)?;
    Ok((id, w))
}

/// Parses `spec` for workload `w` (id `id`) as the proxy would see it.
pub fn prepare(id: WorkloadId, w: &Workload, spec: &Spec<'_>) -> Result<Prepared, RequestError> {
    let target = parse_request(spec.request)?;
    let options = w
        .destination_for(&target.host, target.port)
        .map(|(_, d)| d.normalize_options())
        .unwrap_or_default();
    let path = normalize_with(&target.path_and_query, options).map_err(|source| {
        RequestError::InvalidPath {
            value: spec.request.to_owned(),
            source,
        }
    })?;
    let mut headers = HeaderMap::new();
    for h in spec.headers {
        let (name, value) = parse_header(h)?;
        headers.append(name, value);
    }
    let body = match &spec.body {
        None => None,
        Some((bytes, label)) => {
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
                parse_json_body(bytes, content_type).map_err(|source| RequestError::Body {
                    label: label.clone(),
                    source,
                })?,
            )
        }
    };
    let at = match spec.at {
        None => Timestamp::now(),
        Some(text) => text
            .parse::<Timestamp>()
            .map_err(|e| RequestError::InvalidTime {
                value: text.to_owned(),
                reason: e.to_string(),
            })?,
    };
    Ok(Prepared {
        workload: id,
        uid: spec.uid.or(w.uid).unwrap_or(0),
        target,
        path,
        headers,
        body,
        at,
    })
}

/// The parts of `'METHOD URL'` the policy needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The method.
    pub method: String,
    /// The host, lowercase, without brackets.
    pub host: String,
    /// The port (default 80 for http, 443 for https).
    pub port: u16,
    /// Path and query as written.
    pub path_and_query: String,
}

/// Parses `'METHOD URL'`.
pub fn parse_request(value: &str) -> Result<Target, RequestError> {
    let fail = |reason: &str| RequestError::InvalidRequest {
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

/// Parses `'Name: value'`.
pub fn parse_header(value: &str) -> Result<(HeaderName, HeaderValue), RequestError> {
    let fail = |reason: String| RequestError::InvalidHeader {
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
