//! Respond: the last stage of a request, what goes back to the client and when.
//!
//! Every response leaves only once the record of its decision is written (write before
//! respond): a refusal's JSON body. A forwarded request's decision record was written
//! before anything went upstream (record before forward, see [`crate::audit`]); its
//! response (the upstream's, or a 502) leaves only once the linked *outcome* record is
//! written. On routes where a
//! credential was injected, the upstream's response passes through the reflection guard:
//! the secret is redacted from headers and the streamed body, and a `credential_reflected`
//! record says so.
#![forbid(unsafe_code)]

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::{
    audit::{AUDIT_UNAVAILABLE, AuditGuard, Auditor, Decision, Fault, Record, Written},
    forward::{self, ForwardError},
    outbound::full_body,
    reflect::{Needles, RedactingBody},
    state::{Body, Refused},
};

/// How the response goes back: the request id for refusals, and whether the client speaks
/// HTTP/1 (a refused HTTP/1 connection is closed after the refusal).
#[derive(Clone, Copy, Debug)]
pub struct Reply<'a> {
    /// The request id, also in the record.
    pub request_id: &'a str,
    /// HTTP/1.x: `Connection: close` may be set.
    pub http1: bool,
}

/// Records a refusal and builds its response, returned once the record is written.
pub async fn refuse(mut guard: AuditGuard, refused: &Refused, reply: Reply<'_>) -> Response<Body> {
    let record = guard.record_mut();
    record.error_kind = refused.error_kind.map(str::to_owned);
    let workload = record.workload.clone();
    let written = guard.finish_written(
        Decision::Deny,
        Some(refused.status.as_u16()),
        Some(refused.reason),
        Some(refused.fault),
    );
    let mut response = json_response(refused, workload.as_deref(), reply.request_id);
    if reply.http1 && refused.closes_connection() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    when_written(written, response, workload.as_deref(), reply.request_id).await
}

/// The 503 `audit_unavailable` answer while the audit sink cannot write: recorded without
/// blocking, nothing forwarded.
pub fn unavailable(mut guard: AuditGuard, reply: Reply<'_>) -> Response<Body> {
    let workload = guard.record_mut().workload.clone();
    guard.finish_unavailable();
    let refused = Refused::status(
        StatusCode::SERVICE_UNAVAILABLE,
        AUDIT_UNAVAILABLE,
        "the audit log cannot be written; nothing is forwarded until it can".into(),
        Fault::Agent,
    );
    json_response(&refused, workload.as_deref(), reply.request_id)
}

/// The upstream could not be reached or failed: 502, the outcome recorded as `error`.
pub async fn upstream_failed(
    mut guard: AuditGuard,
    error: &ForwardError,
    bytes_up: Option<u64>,
    reply: Reply<'_>,
) -> Response<Body> {
    tracing::warn!(error = %error, "upstream request failed");
    let refused = match forward::bad_certificate(error) {
        // Every upstream socket of the descriptor budget is open: nothing was dialled.
        None if forward::sockets_exhausted(error).is_some() => Refused::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "descriptor_limit",
            error.to_string(),
            Fault::Agent,
        ),
        // The client's body stopped arriving: the upstream request was aborted.
        None if crate::outbound::is_body_stalled(error) => Refused::status(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            error.to_string(),
            Fault::Client,
        ),
        Some(reason) => Refused::status(
            StatusCode::BAD_GATEWAY,
            "upstream_certificate_invalid",
            reason,
            Fault::Upstream,
        ),
        None => Refused::status(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            error.to_string(),
            Fault::Upstream,
        ),
    };
    let record = guard.record_mut();
    record.bytes_up = bytes_up;
    let workload = record.workload.clone();
    let written = guard.finish_written(
        Decision::Error,
        Some(refused.status.as_u16()),
        Some(refused.reason),
        Some(refused.fault),
    );
    let response = json_response(&refused, workload.as_deref(), reply.request_id);
    when_written(written, response, workload.as_deref(), reply.request_id).await
}

/// What the decision said about a forwarded request.
#[derive(Debug)]
pub struct Forwarded {
    /// Audit mode: the refusal enforce mode would have made.
    pub would_deny: Option<Refused>,
    /// The injected secret, when a credential was injected: the response is scanned.
    pub secret: Option<String>,
    /// The request body's length, when known before it was sent.
    pub bytes_up: Option<u64>,
}

/// Relays the upstream's response once the outcome record (`guard`, linked to the allow or
/// would-deny decision written before forwarding) is written, with the reflection guard on
/// credential routes.
pub async fn relay(
    auditor: &Auditor,
    mut guard: AuditGuard,
    response: Response<Incoming>,
    forwarded: Forwarded,
    reply: Reply<'_>,
) -> Response<Body> {
    let status = response.status().as_u16();
    let record = guard.record_mut();
    record.bytes_up = forwarded.bytes_up;
    record.bytes_down = http_body::Body::size_hint(response.body()).exact();
    let workload = record.workload.clone();
    if forwarded.secret.is_some() && !identity_coded(response.headers()) {
        // A compressed body cannot be scanned for the secret: nothing of it goes back.
        let refused = Refused::status(
            StatusCode::BAD_GATEWAY,
            "upstream_encoding_unscannable",
            "the upstream answered a credential route with a content coding the reflection \
             guard cannot scan (scopegate asked for identity)"
                .into(),
            Fault::Upstream,
        );
        let written = guard.finish_written(
            Decision::Error,
            Some(refused.status.as_u16()),
            Some(refused.reason),
            Some(refused.fault),
        );
        let response = json_response(&refused, workload.as_deref(), reply.request_id);
        return when_written(written, response, workload.as_deref(), reply.request_id).await;
    }
    let response = match &forwarded.secret {
        None => response.map(|body| body.map_err(Into::into).boxed()),
        Some(secret) => {
            let mut base = guard.record_mut().clone();
            base.status = Some(status);
            // An event of its own (as before outcome records existed), not the outcome.
            base.outcome_of = None;
            guard_reflection(auditor, base, response, secret)
        }
    };
    let written = match forwarded.would_deny {
        None => guard.finish_written(Decision::Allow, Some(status), None, None),
        Some(refused) => guard.finish_written(
            Decision::WouldDeny,
            Some(status),
            Some(refused.reason),
            Some(Fault::Policy),
        ),
    };
    when_written(written, response, workload.as_deref(), reply.request_id).await
}

/// Redacts `secret` from the response headers and body; the first redaction writes one
/// `credential_reflected` record (decision `error`, origin `upstream`).
fn guard_reflection(
    auditor: &Auditor,
    base: Record,
    response: Response<Incoming>,
    secret: &str,
) -> Response<Body> {
    let needles = Needles::new([secret]);
    if needles.skipped() > 0 {
        tracing::warn!(
            min_len = crate::reflect::MIN_SECRET_LEN,
            "an injected secret is too short to scan responses for; it is not guarded"
        );
    }
    let (mut parts, body) = response.into_parts();
    let reported = Arc::new(AtomicBool::new(false));
    let report = {
        let auditor = auditor.clone();
        let reported = reported.clone();
        move |_bytes: u64| {
            if !reported.swap(true, Ordering::SeqCst) {
                let mut record = base;
                record.ts = crate::audit::now_rfc3339();
                record.decision = Decision::Error;
                record.reason = Some(CREDENTIAL_REFLECTED.into());
                record.origin = Some(Fault::Upstream);
                tracing::warn!(
                    request_id = record.request_id.as_deref().unwrap_or(""),
                    "the upstream echoed the injected credential; redacted"
                );
                auditor.record(record);
            }
        }
    };
    if needles.redact_headers(&mut parts.headers) {
        report.clone()(0);
    }
    let body = RedactingBody::new(body, needles, Box::new(report))
        .map_err(Into::into)
        .boxed();
    Response::from_parts(parts, body)
}

/// Whether a response body is sent without a content coding (absent or `identity`).
fn identity_coded(headers: &http::HeaderMap) -> bool {
    headers.get_all(header::CONTENT_ENCODING).iter().all(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .all(|c| c.is_empty() || c.eq_ignore_ascii_case("identity"))
        })
    })
}

/// Reason of the record written when an upstream's response contained the injected secret.
pub const CREDENTIAL_REFLECTED: &str = "credential_reflected";

/// Returns `response` once its record is written (write before respond). If the writer
/// stopped first, the record may be lost, so the client gets a 503 `audit_unavailable`
/// instead of an answer nobody can account for.
async fn when_written(
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
                AUDIT_UNAVAILABLE,
                "the audit record of this request could not be written, so its response is withheld".into(),
                Fault::Agent,
            );
            json_response(&refused, workload, request_id)
        }
    }
}

/// `{"error":…,"workload":…,"reason":…,"detail":…,"request_id":…}`
pub fn json_response(
    refused: &Refused,
    workload: Option<&str>,
    request_id: &str,
) -> Response<Body> {
    let mut response = Response::new(full_body(json_body(refused, workload, request_id)));
    *response.status_mut() = refused.status;
    if let Some(retry) = refused.retry_after {
        let secs = retry.as_secs() + u64::from(retry.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The JSON body of a refusal.
pub fn json_body(refused: &Refused, workload: Option<&str>, request_id: &str) -> Bytes {
    let error = match refused.status {
        StatusCode::FORBIDDEN => "denied",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::BAD_GATEWAY => "upstream_error",
        _ => "bad_request",
    };
    let mut body = serde_json::json!({
        "error": error,
        "workload": workload,
        "reason": refused.reason,
        "detail": refused.detail,
        "request_id": request_id,
    });
    if let (Some(kind), Some(map)) = (refused.error_kind, body.as_object_mut()) {
        map.insert("error_kind".into(), kind.into());
    }
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// A complete HTTP/1.1 refusal, for connections the HTTP server no longer owns (the
/// framing guard stopped them): status line, JSON body, `Connection: close`.
pub fn raw_http1_refusal(refused: &Refused, workload: Option<&str>, request_id: &str) -> Vec<u8> {
    let body = json_body(refused, workload, request_id);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        refused.status.as_u16(),
        refused.status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}
