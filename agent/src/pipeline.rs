//! The path of one connection, top to bottom:
//!
//! ```text
//! accept → identify → detect → decide → forward → audit
//! ```
//!
//! [`serve_connection`] runs the first three stages once per connection; [`handle_request`]
//! runs decide → forward → audit once per HTTP request. Each request reads the current
//! [`Enforcement`] snapshot once, so it is decided entirely by one snapshot, and the next
//! request on a live keep-alive connection sees a newly published one.
#![forbid(unsafe_code)]

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::{
    audit::{Auditor, Decision, Fault, Record, Written},
    decide::{self, Refused, Resolver, Verdict},
    detect::{self, Protocol},
    forward::Upstream,
    identify::{self, Identity, OriginTable},
    policy::{self, RateLimiter, TlsMode},
    secrets::Secrets,
    tls::LeafCache,
    workloads::Resolution,
};

/// Everything a decision depends on, published as ONE immutable value and swapped
/// atomically: the policy and the cgroup → workload resolution made from it.
#[derive(Debug)]
pub struct Enforcement {
    /// The validated policy.
    pub policy: Arc<policy::Snapshot>,
    /// Which cgroup belongs to which workload.
    pub cgroups: Arc<Resolution>,
}

impl Enforcement {
    /// Deny-all.
    pub fn empty() -> Self {
        Self {
            policy: Arc::new(policy::Snapshot::empty()),
            cgroups: Arc::new(Resolution::default()),
        }
    }
}

/// State shared by every connection.
pub struct Shared {
    /// The current snapshot.
    pub enforcement: ArcSwap<Enforcement>,
    /// Where connection origins come from (the kernel map, in production).
    pub origins: Arc<dyn OriginTable>,
    /// The audit writer.
    pub auditor: Auditor,
    /// The upstream client.
    pub upstream: Upstream,
    /// DNS cache for confirming destination names.
    pub resolver: Resolver,
    /// Token buckets of the policies' rate limits (kept across reloads).
    pub limiter: RateLimiter,
    /// How long a client may take to send its first bytes.
    pub detect_timeout: Duration,
    /// Leaf certificates for intercepted TLS (None: no host CA, interception refused).
    pub leaves: Option<LeafCache>,
    /// Secrets for credential injection.
    pub secrets: Secrets,
}

/// The body type of requests and responses through the proxy.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// Serves one accepted connection.
pub async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    // identify
    let identity = match identify::identify(shared.origins.as_ref(), peer) {
        Ok(identity) => identity,
        Err(e) => {
            let mut record = Record::new("tcp");
            record.reason = Some(e.to_string());
            shared.auditor.guard(record).finish(
                Decision::Deny,
                None,
                Some("unknown_connection"),
                Some(Fault::Client),
            );
            return;
        }
    };
    // detect
    let protocol = detect::detect(&stream, shared.detect_timeout).await;
    match protocol {
        Ok(Protocol::Http1) => serve_http(shared, TokioIo::new(stream), identity, None).await,
        Ok(Protocol::Tls) => serve_tls(shared, stream, identity).await,
        Ok(other) => connection_refused(&shared, &identity, other.refusal(), Fault::Client),
        Err(detect::DetectError::Timeout { .. }) => {
            connection_refused(&shared, &identity, "detect_timeout", Fault::Client);
        }
        Err(detect::DetectError::Io { .. }) => {
            connection_refused(&shared, &identity, "client_closed", Fault::Client);
        }
    }
}

/// decide → forward → audit, per request, over plain or intercepted TLS connections (HTTP/1.1
/// and, after TLS with ALPN h2, HTTP/2: every stream is one request through the same path).
async fn serve_http<I>(shared: Arc<Shared>, io: I, identity: Identity, sni: Option<Arc<str>>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let identity = identity.clone();
        let sni = sni.clone();
        async move { Ok::<_, Infallible>(handle_request(&shared, &identity, sni.as_deref(), req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).half_close(false);
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// A TLS connection: decided by its SNI, then spliced (`tls: passthrough`) or terminated
/// with a host-CA leaf minted only for the allowed name (`tls: intercept`).
async fn serve_tls(shared: Arc<Shared>, stream: TcpStream, identity: Identity) {
    let enforcement = shared.enforcement.load_full();
    let mut record = identity_record(&enforcement, &identity, "tls");
    let refuse = |record: Record, reason: &str, fault: Fault| {
        shared
            .auditor
            .guard(record)
            .finish(Decision::Deny, None, Some(reason), Some(fault));
    };
    let hello = match crate::tls::read_client_hello(&stream, shared.detect_timeout).await {
        Ok(hello) => hello,
        Err(crate::tls::HelloError::Timeout { .. }) => {
            return refuse(record, "tls_hello_timeout", Fault::Client);
        }
        Err(e) => {
            tracing::debug!(error = %e, "refusing a TLS ClientHello");
            return refuse(record, "tls_hello_invalid", Fault::Client);
        }
    };
    let Some(sni) = hello.sni else {
        return refuse(record, "tls_no_sni", Fault::Client);
    };
    record.dst.host = Some(sni.clone());
    let (workload, _) = identity.workload(&enforcement.cgroups);
    let destination = workload
        .and_then(|w| enforcement.policy.workload(w))
        .and_then(|w| w.destination_for(&sni, identity.original_dst.port()))
        .map(|(_, d)| (d.tls(), d.host.clone()));
    let Some((mode, host)) = destination else {
        return refuse(record, "sni_not_allowed", Fault::Policy);
    };
    let allowed = decide::Allowed {
        rule: None,
        target: String::new(),
        upstream: identity.original_dst,
        host: Some(host),
        tls_name: None,
        credential: None,
    };
    if let Err(refused) = decide::confirm_address(&shared.resolver, &allowed).await {
        return refuse(record, refused.reason, refused.fault);
    }
    match mode {
        TlsMode::None => refuse(record, "tls_not_allowed", Fault::Policy),
        TlsMode::Passthrough => passthrough(&shared, stream, identity.original_dst, record).await,
        TlsMode::Intercept => {
            let Some(config) = shared.leaves.as_ref().map(|l| l.server_config(&sni)) else {
                return refuse(record, "no_host_ca", Fault::Agent);
            };
            let config = match config {
                Ok(config) => config,
                Err(e) => {
                    tracing::error!(error = %e, "minting a leaf certificate failed");
                    return refuse(record, "leaf_mint_failed", Fault::Agent);
                }
            };
            let tls = match tokio::time::timeout(
                shared.detect_timeout,
                tokio_rustls::TlsAcceptor::from(config).accept(stream),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(_)) | Err(_) => {
                    return refuse(record, "tls_handshake_failed", Fault::Client);
                }
            };
            serve_http(
                shared.clone(),
                TokioIo::new(tls),
                identity,
                Some(sni.into()),
            )
            .await;
        }
    }
}

/// Splices a passthrough TLS connection to its original destination; one record when it
/// ends, with bytes and duration.
async fn passthrough(
    shared: &Shared,
    mut client: TcpStream,
    upstream: SocketAddr,
    mut record: Record,
) {
    record.rule = None;
    let guard = shared.auditor.guard(record);
    if !shared.auditor.healthy() {
        return guard.finish_unavailable();
    }
    let mut guard = guard;
    let connect = crate::forward::connect_marked(upstream, crate::run::AGENT_MARK);
    let mut server = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(server)) => server,
        Ok(Err(_)) | Err(_) => {
            return guard.finish(
                Decision::Error,
                None,
                Some("upstream_unreachable"),
                Some(Fault::Upstream),
            );
        }
    };
    let result = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    let (up, down) = result.unwrap_or((0, 0));
    let record = guard.record_mut();
    record.bytes_up = Some(up);
    record.bytes_down = Some(down);
    guard.finish(Decision::Allow, None, None, None);
}

/// One connection-level refusal, recorded with the caller's identity.
fn connection_refused(shared: &Shared, identity: &Identity, reason: &str, fault: Fault) {
    let enforcement = shared.enforcement.load();
    let mut record = identity_record(&enforcement, identity, "tcp");
    record.dst.host = None;
    shared
        .auditor
        .guard(record)
        .finish(Decision::Deny, None, Some(reason), Some(fault));
}

fn identity_record(enforcement: &Enforcement, identity: &Identity, proto: &'static str) -> Record {
    let mut record = Record::new(proto).with_dst_addr(identity.original_dst);
    record.pid = Some(identity.pid);
    record.uid = Some(identity.uid);
    record.exe = identity.exe.clone();
    let (workload, cgroup) = identity.workload(&enforcement.cgroups);
    record.cgroup = cgroup;
    record.workload = workload
        .and_then(|w| enforcement.policy.workload(w))
        .map(|w| w.name.clone());
    record
}

/// Decides, forwards and audits one request.
pub async fn handle_request(
    shared: &Shared,
    identity: &Identity,
    sni: Option<&str>,
    req: Request<Incoming>,
) -> Response<Body> {
    let enforcement = shared.enforcement.load_full();
    let request_id = new_request_id();
    let mut record = identity_record(&enforcement, identity, "http");
    record.request_id = Some(request_id.clone());
    let mut guard = shared.auditor.guard(record);

    // decide, phase 1: identity, destination, canonical path
    let (parts, body) = req.into_parts();
    let default_port = if sni.is_some() { 443 } else { 80 };
    let prepared = match decide::prepare(
        &enforcement,
        identity,
        &parts,
        default_port,
        guard.record_mut(),
    ) {
        Ok(prepared) => prepared,
        Err(refused) => return refuse(guard, &refused, &request_id).await,
    };
    // Inside intercepted TLS, the request must name the host the handshake named.
    if let Some(sni) = sni
        && !prepared.host().eq_ignore_ascii_case(sni)
    {
        let refused = Refused::policy(
            "host_sni_mismatch",
            format!(
                "Host {} does not match the TLS server name {sni}",
                prepared.host()
            ),
        );
        return refuse(guard, &refused, &request_id).await;
    }
    // the body, buffered and parsed only when a rule inspects it
    let (json, body) = if prepared.needs_body {
        match read_json_body(&parts, body, prepared.body_cap).await {
            Ok((json, bytes)) => (Some(json), full_body(bytes)),
            Err(refused) => return refuse(guard, &refused, &request_id).await,
        }
    } else {
        (None, body.boxed())
    };
    // decide, phase 2
    let verdict = decide::decide(
        &enforcement,
        identity,
        &parts,
        &prepared,
        json.as_ref(),
        &shared.limiter,
        guard.record_mut(),
    );
    // Nothing is forwarded that cannot be recorded.
    if !shared.auditor.healthy() {
        let workload = guard.record_mut().workload.clone();
        guard.finish_unavailable();
        let refused = Refused::status(
            StatusCode::SERVICE_UNAVAILABLE,
            crate::audit::AUDIT_UNAVAILABLE,
            "the audit log cannot be written; nothing is forwarded until it can".into(),
            Fault::Agent,
        );
        return json_response(&refused, workload.as_deref(), &request_id, "unavailable");
    }
    let (allowed, would_deny) = match verdict {
        Verdict::Deny(refused) => return refuse(guard, &refused, &request_id).await,
        Verdict::Allow(allowed) => {
            if let Err(refused) = decide::confirm_address(&shared.resolver, &allowed).await {
                return refuse(guard, &refused, &request_id).await;
            }
            (allowed, None)
        }
        Verdict::WouldDeny(allowed, refused) => (allowed, Some(refused)),
    };

    // forward, with the credential the workload never holds
    let mut parts = parts;
    if let Some(credential) = &allowed.credential {
        match shared.secrets.get(&credential.source) {
            Ok(secret) => match header::HeaderValue::from_str(&credential.render(&secret)) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    // Exactly one goes upstream: whatever the workload sent is replaced.
                    parts.headers.insert(credential.header.clone(), value);
                }
                Err(_) => {
                    let refused = Refused::status(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "credential_invalid",
                        format!(
                            "the credential for header {} is not a valid header value",
                            credential.header
                        ),
                        Fault::Agent,
                    );
                    return refuse(guard, &refused, &request_id).await;
                }
            },
            Err(e) => {
                tracing::error!(error = %e, "credential unavailable");
                let refused = Refused::status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "credential_unavailable",
                    e.to_string(),
                    Fault::Agent,
                );
                return refuse(guard, &refused, &request_id).await;
            }
        }
    }
    let req = Request::from_parts(parts, body);
    match shared
        .upstream
        .send(
            req,
            allowed.upstream,
            &allowed.target,
            allowed.tls_name.as_deref(),
        )
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            // audit: the response head goes back only once its record is written
            let workload = guard.record_mut().workload.clone();
            let written = match would_deny {
                None => guard.finish_written(Decision::Allow, Some(status), None, None),
                Some(refused) => guard.finish_written(
                    Decision::WouldDeny,
                    Some(status),
                    Some(refused.reason),
                    Some(Fault::Policy),
                ),
            };
            respond_when_written(
                written,
                response.map(BodyExt::boxed),
                workload.as_deref(),
                &request_id,
            )
            .await
        }
        Err(e) => {
            tracing::warn!(error = %e, "upstream request failed");
            let refused = match crate::forward::bad_certificate(&e) {
                Some(reason) => Refused::status(
                    StatusCode::BAD_GATEWAY,
                    "upstream_certificate_invalid",
                    reason,
                    Fault::Upstream,
                ),
                None => Refused::status(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    e.to_string(),
                    Fault::Upstream,
                ),
            };
            let workload = guard.record_mut().workload.clone();
            let written = guard.finish_written(
                Decision::Error,
                Some(refused.status.as_u16()),
                Some(refused.reason),
                Some(refused.fault),
            );
            let response =
                json_response(&refused, workload.as_deref(), &request_id, "upstream_error");
            respond_when_written(written, response, workload.as_deref(), &request_id).await
        }
    }
}

/// Buffers the request body up to `cap` bytes and parses it as JSON.
async fn read_json_body(
    parts: &http::request::Parts,
    body: Incoming,
    cap: usize,
) -> Result<(policy::JsonBody, Bytes), Refused> {
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
    let content_type = parts
        .headers
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

fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Returns `response` once its record is written (write before respond). If the writer
/// stopped first, the record may be lost, so the client gets a 503 `audit_unavailable`
/// instead of an answer nobody can account for.
async fn respond_when_written(
    written: Written,
    response: Response<Body>,
    workload: Option<&str>,
    request_id: &str,
) -> Response<Body> {
    match written.wait().await {
        Ok(()) => response,
        Err(e) => {
            tracing::error!(
                error = %e,
                request_id,
                "withholding a response whose audit record was not written"
            );
            let refused = Refused::status(
                StatusCode::SERVICE_UNAVAILABLE,
                crate::audit::AUDIT_UNAVAILABLE,
                "the audit record of this request could not be written, so its response is withheld".into(),
                Fault::Agent,
            );
            json_response(&refused, workload, request_id, "unavailable")
        }
    }
}

/// Records a refusal and builds its response, returned once the record is written.
async fn refuse(
    mut guard: crate::audit::AuditGuard,
    refused: &Refused,
    request_id: &str,
) -> Response<Body> {
    let workload = guard.record_mut().workload.clone();
    let written = guard.finish_written(
        Decision::Deny,
        Some(refused.status.as_u16()),
        Some(refused.reason),
        Some(refused.fault),
    );
    let error = match refused.status {
        StatusCode::FORBIDDEN => "denied",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::BAD_GATEWAY => "upstream_error",
        _ => "bad_request",
    };
    let response = json_response(refused, workload.as_deref(), request_id, error);
    respond_when_written(written, response, workload.as_deref(), request_id).await
}

/// `{"error":…,"workload":…,"reason":…,"detail":…,"request_id":…}`
fn json_response(
    refused: &Refused,
    workload: Option<&str>,
    request_id: &str,
    error: &str,
) -> Response<Body> {
    let body = serde_json::json!({
        "error": error,
        "workload": workload,
        "reason": refused.reason,
        "detail": refused.detail,
        "request_id": request_id,
    });
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    bytes.push(b'\n');
    let mut response = Response::new(full_body(Bytes::from(bytes)));
    *response.status_mut() = refused.status;
    if let Some(retry) = refused.retry_after {
        let secs = retry.as_secs() + u64::from(retry.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A fresh 128-bit request id, hex.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
