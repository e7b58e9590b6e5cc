//! Outbound: build the ONE request that will be sent upstream, before anything decides on
//! it.
//!
//! [`build`] turns what the client sent into an [`Outbound`]: the canonical request target,
//! the hop-by-hop headers removed (including every header that `Connection` names), the
//! Host header derived from the HTTP/1 Host or the HTTP/2 `:authority` in canonical form,
//! and, when a rule inspects it, the body buffered and parsed. Only this module can make an
//! `Outbound`, and it exposes its parts read-only: the [`enforce`](crate::enforce) stage
//! decides on exactly this value (and adds the credential, the one header the decision
//! never sees), and the [`forward`](crate::forward) stage sends exactly what that stage
//! returns. Deciding one view of a request and forwarding another cannot be written.
//!
//! Refused here, each with one audit record (see the README's "Request integrity"):
//! - `CONNECT` (405 `connect_not_allowed`): a transparent proxy cannot grant a tunnel;
//! - a `Connection` header that names Host, a framing header, the credential header, a
//!   header that a rule of the destination constrains, or a method-override header (400
//!   `connection_names_protected_header`): stripping it would change what was decided;
//! - header names with `_` (400 `header_name_invalid`, unless the destination sets
//!   `allow_underscore_headers`): WSGI and CGI servers fold `X_Role` and `X-Role` into one;
//! - a Content-Encoding other than `identity` on a route whose rules inspect the body (415
//!   `content_encoding_unsupported`): the upstream would decode what the policy read raw;
//! - everything [`policy::normalize_with`] and [`policy::parse_json_body`] refuse.
#![forbid(unsafe_code)]

use crate::policy::JsonBody;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::{
    audit::{Fault, Record},
    identify::Identity,
    policy::{self, CanonicalPath, Destination, Mode, OVERRIDE_HEADERS, WorkloadId},
    state::{Body, Enforcement, Refused},
};

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the common non-standard ones), removed from
/// requests here and from responses by [`forward::strip_hop_by_hop`](crate::forward::strip_hop_by_hop).
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers that `Connection` may never name: removing them would change how the request is
/// framed, addressed or read (`content-type` decides how a JSON body is parsed).
const FRAMING_HEADERS: [&str; 5] = [
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "transfer-encoding",
];

/// The request as it will be sent upstream (but for the credential, which
/// [`enforce`](crate::enforce) adds once a rule has allowed it). Only [`build`] makes one.
#[derive(Debug)]
pub struct Outbound {
    workload: WorkloadId,
    mode: Mode,
    destination: Option<usize>,
    method: Method,
    host: String,
    port: u16,
    path: CanonicalPath,
    headers: HeaderMap,
    json: Option<JsonBody>,
    body: Body,
}

impl Outbound {
    /// The calling workload.
    pub fn workload(&self) -> WorkloadId {
        self.workload
    }

    /// The workload's mode (audit mode forwards what enforce mode would refuse).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Index of the policy destination the request names (host and original port), if any.
    pub fn destination(&self) -> Option<usize> {
        self.destination
    }

    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The canonical host (lowercase, no trailing dot, IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port the authority names (the scheme's default when it names none).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The canonical path and query: matched and forwarded.
    pub fn path(&self) -> &CanonicalPath {
        &self.path
    }

    /// The headers that go upstream: hop-by-hop removed, Host canonical.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The parsed body, when a candidate rule inspects it.
    pub fn json(&self) -> Option<&JsonBody> {
        self.json.as_ref()
    }

    /// The body's length, when known before it is sent (Content-Length, or buffered).
    pub fn body_len(&self) -> Option<u64> {
        http_body::Body::size_hint(&self.body).exact()
    }

    /// Sets the credential header (replacing whatever the workload sent under that name).
    /// Only the enforce stage calls it, after a rule allowed the request.
    pub(crate) fn inject(&mut self, name: HeaderName, mut value: HeaderValue) {
        value.set_sensitive(true);
        self.headers.insert(name, value);
    }

    /// The parts to send: method, origin-form target, headers, body.
    pub(crate) fn into_parts(self) -> (Method, String, HeaderMap, Body) {
        (
            self.method,
            self.path.as_request_target(),
            self.headers,
            self.body,
        )
    }
}

/// Where the request came in: the scheme's default port and, inside intercepted TLS, the
/// server name of the handshake.
#[derive(Clone, Copy, Debug)]
pub struct Arrival<'a> {
    /// 80 for plain HTTP, 443 inside TLS.
    pub default_port: u16,
    /// The TLS server name, for intercepted TLS.
    pub sni: Option<&'a str>,
    /// How long reading a body that a rule inspects may take.
    pub body_timeout: std::time::Duration,
}

/// Builds the outbound request from what the client sent. Fills the audit record (workload,
/// cgroup, method, host, canonical path) as it goes, so a refusal is recorded with what was
/// known.
pub async fn build(
    enforcement: &Enforcement,
    identity: &Identity,
    arrival: Arrival<'_>,
    req: http::Request<hyper::body::Incoming>,
    record: &mut Record,
) -> Result<Outbound, Refused> {
    let (parts, body) = req.into_parts();
    let head = head(enforcement, identity, arrival, parts, record)?;
    let destination = head.destination.and_then(|i| {
        enforcement
            .policy
            .workload(head.workload)
            .and_then(|w| w.destinations.get(i))
    });
    let needs_body = destination.is_some_and(|d| d.needs_body(head.method.as_str(), &head.path));
    let (json, body) = if needs_body {
        identity_encoding(&head.headers)?;
        let read = read_json_body(&head.headers, body, head.body_cap);
        let (json, bytes) = tokio::time::timeout(arrival.body_timeout, read)
            .await
            .map_err(|_| {
                Refused::status(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!(
                        "the request body did not arrive within {:?}",
                        arrival.body_timeout
                    ),
                    Fault::Client,
                )
            })??;
        (Some(json), full_body(bytes))
    } else {
        (None, Stalling::new(body, arrival.body_timeout).boxed())
    };
    Ok(Outbound {
        workload: head.workload,
        mode: head.mode,
        destination: head.destination,
        method: head.method,
        host: head.host,
        port: head.port,
        path: head.path,
        headers: head.headers,
        json,
        body,
    })
}

/// Everything but the body.
struct Head {
    workload: WorkloadId,
    mode: Mode,
    destination: Option<usize>,
    method: Method,
    host: String,
    port: u16,
    path: CanonicalPath,
    headers: HeaderMap,
    body_cap: usize,
}

fn head(
    enforcement: &Enforcement,
    identity: &Identity,
    arrival: Arrival<'_>,
    parts: http::request::Parts,
    record: &mut Record,
) -> Result<Head, Refused> {
    let (workload_id, cgroup) = identity.workload(&enforcement.cgroups);
    record.cgroup = cgroup;
    record.method = Some(parts.method.as_str().to_owned());
    let workload_id = workload_id.ok_or_else(|| {
        Refused::policy(
            "unmanaged_cgroup",
            format!("cgroup id {} has no policy", identity.cgroup_id),
        )
    })?;
    let workload = enforcement
        .policy
        .workload(workload_id)
        .ok_or_else(|| Refused::policy("unknown_workload", "workload not in snapshot".into()))?;
    record.workload = Some(workload.name.clone());
    if parts.method == Method::CONNECT {
        return Err(connect_refused());
    }
    let authority = authority(&parts, arrival.default_port)?;
    record.dst.host = Some(authority.host.clone());
    if let Some(sni) = arrival.sni
        && !authority
            .host
            .eq_ignore_ascii_case(sni.trim_end_matches('.'))
    {
        return Err(Refused::policy(
            "host_sni_mismatch",
            format!(
                "Host {} does not match the TLS server name {sni}",
                authority.host
            ),
        ));
    }
    let found = workload.destination_for(&authority.host, identity.original_dst.port());
    let raw_target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let options = found
        .map(|(_, d)| d.normalize_options())
        .unwrap_or_default();
    let path = policy::normalize_with(raw_target, options).map_err(|e| {
        record.path = Some(raw_target.to_owned());
        Refused::client(e.code(), e.to_string())
    })?;
    record.path = Some(path.path().to_owned());
    if let Some(query) = path.query() {
        let (names, clipped) = policy::recorded_query_names(query);
        record.query_names = Some(names);
        record.query_names_clipped = clipped.then_some(true);
    }
    let mut headers = parts.headers;
    hop_by_hop(&mut headers, found.map(|(_, d)| d))?;
    check_names(&headers, found.map(|(_, d)| d))?;
    headers.insert(header::HOST, authority.header_value(arrival.default_port)?);
    // Where a credential may be injected, the response must come back scannable for it
    // (see `respond`): ask for no content coding, before the decision sees the headers.
    if found.is_some_and(|(_, d)| d.credential_headers().next().is_some()) {
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    Ok(Head {
        workload: workload_id,
        mode: workload.mode(),
        destination: found.map(|(i, _)| i),
        method: parts.method,
        host: authority.host,
        port: authority.port,
        path,
        headers,
        body_cap: workload.body_cap(),
    })
}

/// The refusal of every `CONNECT` (HTTP/1 ones are stopped by the framing guard already).
pub fn connect_refused() -> Refused {
    Refused::status(
        StatusCode::METHOD_NOT_ALLOWED,
        "connect_not_allowed",
        "CONNECT opens a tunnel that no rule can inspect; scopegate never grants it".into(),
        Fault::Policy,
    )
}

/// The authority a request names, canonical.
#[derive(Debug, PartialEq, Eq)]
struct Authority {
    /// Lowercase, one trailing dot removed, IPv6 without brackets.
    host: String,
    port: u16,
}

impl Authority {
    /// The Host header to forward: the canonical host, `[v6]` bracketed, and the port only
    /// when it is not the scheme's default.
    fn header_value(&self, default_port: u16) -> Result<HeaderValue, Refused> {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let text = if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        };
        HeaderValue::try_from(text).map_err(|_| {
            Refused::client(
                "invalid_host",
                "the Host is not a valid header value".into(),
            )
        })
    }
}

/// The host and port the request names: the Host header (exactly one) or, in HTTP/2, the
/// `:authority`; when both are present (or the HTTP/1 target is in absolute form) they
/// must agree.
fn authority(parts: &http::request::Parts, default_port: u16) -> Result<Authority, Refused> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let named = match (hosts.next(), hosts.next(), parts.uri.authority()) {
        (Some(_), Some(_), _) => {
            return Err(Refused::client(
                "duplicate_host",
                "more than one Host header".into(),
            ));
        }
        (Some(h), None, _) => h
            .to_str()
            .ok()
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .filter(|a| !a.as_str().contains('@'))
            .ok_or_else(|| {
                Refused::client(
                    "invalid_host",
                    format!("Host header {h:?} is not a valid authority"),
                )
            })?,
        // HTTP/2 carries the authority in :authority (the request URI), not in Host.
        (None, _, Some(authority)) if parts.version == http::Version::HTTP_2 => authority.clone(),
        (None, _, _) => return Err(Refused::client("missing_host", "no Host header".into())),
    };
    if named.as_str().contains('@') {
        return Err(Refused::client(
            "invalid_host",
            format!("authority {:?} carries user information", named.as_str()),
        ));
    }
    if let Some(uri_authority) = parts.uri.authority()
        && !uri_authority.as_str().eq_ignore_ascii_case(named.as_str())
    {
        return Err(Refused::client(
            "absolute_form_mismatch",
            format!(
                "request target names {uri_authority} but Host is {}",
                named.as_str()
            ),
        ));
    }
    let raw = named.host();
    let host = raw
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(raw);
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.is_empty() || host.ends_with('.') {
        return Err(Refused::client(
            "invalid_host",
            format!("Host {:?} names no host", named.as_str()),
        ));
    }
    if let Some(label) = host.split('.').find(|l| !policy::valid_idna_label(l)) {
        return Err(Refused::client(
            "invalid_host",
            format!(
                "Host {:?}: the label {label:?} is not valid IDNA punycode",
                named.as_str()
            ),
        ));
    }
    // `Authority::port_u16` accepts an empty port (`host:`); treat it as absent, as
    // browsers and servers do.
    Ok(Authority {
        host,
        port: named.port_u16().unwrap_or(default_port),
    })
}

/// Removes the hop-by-hop headers, and every header that `Connection` names, refusing a
/// nomination that would change what the policy decides or the upstream reads.
fn hop_by_hop(headers: &mut HeaderMap, destination: Option<&Destination>) -> Result<(), Refused> {
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let text = value.to_str().map_err(|_| {
            Refused::client(
                "connection_header_invalid",
                "the Connection header is not ASCII".into(),
            )
        })?;
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let name = HeaderName::from_bytes(token.as_bytes()).map_err(|_| {
                Refused::client(
                    "connection_header_invalid",
                    format!("Connection names {token:?}, which is not a header name"),
                )
            })?;
            if let Some(why) = protected(&name, destination) {
                return Err(Refused::client(
                    "connection_names_protected_header",
                    format!("Connection names {name}, {why}"),
                ));
            }
            named.push(name);
        }
    }
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    Ok(())
}

/// Why `Connection` may not name `name`, if it may not.
fn protected(name: &HeaderName, destination: Option<&Destination>) -> Option<&'static str> {
    let n = name.as_str();
    if FRAMING_HEADERS.contains(&n) {
        return Some("which frames or addresses the request");
    }
    if OVERRIDE_HEADERS.contains(&n) {
        return Some("a method-override header");
    }
    let destination = destination?;
    if destination.credential_headers().any(|h| h == name) {
        return Some("the header the credential is injected into");
    }
    if destination.constrains_header(n) {
        return Some("which a rule of this destination constrains");
    }
    None
}

/// Header names: no `_`, unless the destination opts in. (Method-override headers are
/// decided by the policy: see [`policy::OVERRIDE_HEADERS`].)
fn check_names(headers: &HeaderMap, destination: Option<&Destination>) -> Result<(), Refused> {
    if destination.is_some_and(Destination::allows_underscore_headers) {
        return Ok(());
    }
    for name in headers.keys() {
        let n = name.as_str();
        if n.contains('_') {
            return Err(Refused::client(
                "header_name_invalid",
                format!(
                    "header name {n:?} contains '_', which servers may read as '-' \
                     (set allow_underscore_headers on the destination to allow it)"
                ),
            ));
        }
    }
    Ok(())
}

/// On routes whose rules read the body, the body must be the bytes the upstream acts on.
fn identity_encoding(headers: &HeaderMap) -> Result<(), Refused> {
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let ok = value.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .all(|c| c.is_empty() || c.eq_ignore_ascii_case("identity"))
        });
        if !ok {
            return Err(Refused::status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_encoding_unsupported",
                format!(
                    "Content-Encoding {value:?} on a route whose rules inspect the body; \
                     only identity is accepted there"
                ),
                Fault::Client,
            ));
        }
    }
    Ok(())
}

/// Buffers the request body up to `cap` bytes and parses it as JSON.
async fn read_json_body(
    headers: &HeaderMap,
    body: hyper::body::Incoming,
    cap: usize,
) -> Result<(JsonBody, Bytes), Refused> {
    let bytes = match http_body_util::Limited::new(body, cap).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Refused::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the request body exceeds the {cap}-byte cap"),
                Fault::Client,
            ));
        }
        Err(e) => {
            return Err(Refused::client(
                "body_read_failed",
                format!("reading the request body: {e}"),
            ));
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    match policy::parse_json_body(&bytes, content_type) {
        Ok(json) => Ok((json, bytes)),
        Err(e) => Err(Refused::status(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            e.code(),
            e.to_string(),
            Fault::Client,
        )),
    }
}

/// A body of bytes already in memory.
pub fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Errors of this stage's bodies.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// A streamed request body sent nothing for the body timeout.
    #[error("the request body stalled: nothing arrived for {timeout:?}")]
    BodyStalled {
        /// The body timeout.
        timeout: std::time::Duration,
    },
}

/// Whether `error` (or an error it wraps, such as the upstream client's) is a stalled
/// request body ([`OutboundError::BodyStalled`]).
pub fn is_body_stalled(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if matches!(
            e.downcast_ref::<OutboundError>(),
            Some(OutboundError::BodyStalled { .. })
        ) {
            return true;
        }
        source = e.source();
    }
    false
}

/// A streamed request body (relayed upstream as it arrives) whose reads may not stall:
/// once no frame arrived for `timeout`, it fails with [`OutboundError::BodyStalled`], which
/// aborts the upstream request. One timer per body, created on its first wait and re-armed
/// after each frame.
struct Stalling<B> {
    inner: B,
    timeout: std::time::Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl<B> Stalling<B> {
    fn new(inner: B, timeout: std::time::Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: None,
            waiting: false,
        }
    }
}

impl<B> http_body::Body for Stalling<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<crate::state::BodyError>,
{
    type Data = Bytes;
    type Error = crate::state::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = tokio::time::Instant::now() + this.timeout;
        let sleep = match &mut this.sleep {
            Some(sleep) if this.waiting => sleep,
            Some(sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => this
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        this.waiting = true;
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(OutboundError::BodyStalled {
                timeout: this.timeout,
            }))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn parts(version: http::Version, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri).version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn authority_is_canonical() {
        let p = parts(
            http::Version::HTTP_11,
            "/x",
            &[("host", "Api.Allowed.Test:0080")],
        );
        let a = authority(&p, 80).unwrap();
        assert_eq!(
            a,
            Authority {
                host: "api.allowed.test".into(),
                port: 80
            }
        );
        assert_eq!(a.header_value(80).unwrap(), "api.allowed.test");
        let p = parts(
            http::Version::HTTP_11,
            "/x",
            &[("host", "API.ALLOWED.TEST.")],
        );
        assert_eq!(authority(&p, 80).unwrap().host, "api.allowed.test");
        let p = parts(http::Version::HTTP_11, "/x", &[("host", "[::1]:8080")]);
        let a = authority(&p, 80).unwrap();
        assert_eq!(a.host, "::1");
        assert_eq!(a.header_value(80).unwrap(), "[::1]:8080");
        for bad in ["a..", "user@host", ".", "xn--a.test", "api.XN--0.test:80"] {
            let p = parts(http::Version::HTTP_11, "/x", &[("host", bad)]);
            assert!(authority(&p, 80).is_err(), "{bad}");
        }
        let p = parts(
            http::Version::HTTP_11,
            "/x",
            &[("host", "a"), ("host", "a")],
        );
        assert_eq!(authority(&p, 80).unwrap_err().reason, "duplicate_host");
    }

    #[test]
    fn http2_authority_becomes_host() {
        let p = parts(http::Version::HTTP_2, "https://api.test/x", &[]);
        let a = authority(&p, 443).unwrap();
        assert_eq!(a.header_value(443).unwrap(), "api.test");
        let p = parts(http::Version::HTTP_11, "/x", &[]);
        assert_eq!(authority(&p, 80).unwrap_err().reason, "missing_host");
        let p = parts(
            http::Version::HTTP_2,
            "https://api.test/x",
            &[("host", "other.test")],
        );
        assert_eq!(
            authority(&p, 443).unwrap_err().reason,
            "absolute_form_mismatch"
        );
    }

    #[test]
    fn connection_nominations() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Basic x".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        hop_by_hop(&mut h, None).unwrap();
        let names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(names, ["x-kept"]);
        for named in [
            "Host",
            "content-length",
            "Content-Type",
            "transfer-encoding",
            "x-http-method-override",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, named.parse().unwrap());
            let e = hop_by_hop(&mut h, None).unwrap_err();
            assert_eq!(e.reason, "connection_names_protected_header", "{named}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "a b".parse().unwrap());
        assert_eq!(
            hop_by_hop(&mut h, None).unwrap_err().reason,
            "connection_header_invalid"
        );
    }

    #[test]
    fn header_names() {
        let mut h = HeaderMap::new();
        h.insert("x_role", "admin".parse().unwrap());
        assert_eq!(
            check_names(&h, None).unwrap_err().reason,
            "header_name_invalid"
        );
        let mut h = HeaderMap::new();
        h.insert("x-role", "user".parse().unwrap());
        check_names(&h, None).unwrap();
    }

    #[test]
    fn content_encoding_on_body_routes() {
        let mut h = HeaderMap::new();
        identity_encoding(&h).unwrap();
        h.insert(header::CONTENT_ENCODING, "identity".parse().unwrap());
        identity_encoding(&h).unwrap();
        h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
        let e = identity_encoding(&h).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.reason),
            (415, "content_encoding_unsupported")
        );
        h.insert(header::CONTENT_ENCODING, "identity, br".parse().unwrap());
        assert!(identity_encoding(&h).is_err());
    }
}
