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
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::{
    audit::{Auditor, Decision, Fault, Record},
    decide::{self, Refused, Resolver, Verdict},
    detect::{self, Protocol},
    forward::Upstream,
    identify::{self, Identity, OriginTable},
    policy::{self, RateLimiter},
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
        Ok(Protocol::Http1) => {}
        Ok(other) => {
            connection_refused(&shared, &identity, other.refusal(), Fault::Client);
            return;
        }
        Err(detect::DetectError::Timeout { .. }) => {
            connection_refused(&shared, &identity, "detect_timeout", Fault::Client);
            return;
        }
        Err(detect::DetectError::Io { .. }) => {
            connection_refused(&shared, &identity, "client_closed", Fault::Client);
            return;
        }
    }
    // decide → forward → audit, per request
    let service = service_fn(move |req| {
        let shared = shared.clone();
        let identity = identity.clone();
        async move { Ok::<_, Infallible>(handle_request(&shared, &identity, req).await) }
    });
    if let Err(e) = http1::Builder::new()
        .keep_alive(true)
        .half_close(false)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
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
    req: Request<Incoming>,
) -> Response<Body> {
    let enforcement = shared.enforcement.load_full();
    let request_id = new_request_id();
    let mut record = identity_record(&enforcement, identity, "http");
    record.request_id = Some(request_id.clone());
    let mut guard = shared.auditor.guard(record);

    // decide, phase 1: identity, destination, canonical path
    let (parts, body) = req.into_parts();
    let prepared = match decide::prepare(&enforcement, identity, &parts, guard.record_mut()) {
        Ok(prepared) => prepared,
        Err(refused) => return refuse(guard, &refused, &request_id),
    };
    // the body, buffered and parsed only when a rule inspects it
    let (json, body) = if prepared.needs_body {
        match read_json_body(&parts, body, prepared.body_cap).await {
            Ok((json, bytes)) => (Some(json), full_body(bytes)),
            Err(refused) => return refuse(guard, &refused, &request_id),
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
        Verdict::Deny(refused) => return refuse(guard, &refused, &request_id),
        Verdict::Allow(allowed) => {
            if let Err(refused) = decide::confirm_address(&shared.resolver, &allowed).await {
                return refuse(guard, &refused, &request_id);
            }
            (allowed, None)
        }
        Verdict::WouldDeny(allowed, refused) => (allowed, Some(refused)),
    };

    // forward
    let req = Request::from_parts(parts, body);
    match shared
        .upstream
        .send(req, allowed.upstream, &allowed.target)
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            // audit
            match would_deny {
                None => guard.finish(Decision::Allow, Some(status), None, None),
                Some(refused) => guard.finish(
                    Decision::WouldDeny,
                    Some(status),
                    Some(refused.reason),
                    Some(Fault::Policy),
                ),
            }
            response.map(BodyExt::boxed)
        }
        Err(e) => {
            tracing::warn!(error = %e, "upstream request failed");
            let refused = Refused::status(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                e.to_string(),
                Fault::Upstream,
            );
            let workload = guard.record_mut().workload.clone();
            guard.finish(
                Decision::Error,
                Some(refused.status.as_u16()),
                Some(refused.reason),
                Some(refused.fault),
            );
            json_response(&refused, workload.as_deref(), &request_id, "upstream_error")
        }
    }
}

/// Buffers the request body up to `cap` bytes and parses it as JSON.
async fn read_json_body(
    parts: &http::request::Parts,
    body: Incoming,
    cap: usize,
) -> Result<(serde_json::Value, Bytes), Refused> {
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

/// Records a refusal and builds its response.
fn refuse(
    mut guard: crate::audit::AuditGuard,
    refused: &Refused,
    request_id: &str,
) -> Response<Body> {
    let workload = guard.record_mut().workload.clone();
    guard.finish(
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
    json_response(refused, workload.as_deref(), request_id, error)
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
