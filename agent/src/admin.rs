//! Admin: Prometheus metrics and a health endpoint, on a loopback address unless a
//! non-loopback one is explicitly allowed (`--metrics-allow-non-loopback`).
//!
//! `GET /metrics` serves [`crate::metrics::global`] in the Prometheus text format, with
//! the scrape-time values read from [`Sources`]; `GET /healthz` answers 200 `ok` while
//! the agent can enforce and record, and 503 with the reason otherwise (while the audit
//! sink cannot write, or while the hooks are gone and could not be re-attached).
#![forbid(unsafe_code)]

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use scopegate_common::counters;
use tokio::net::TcpListener;

use crate::{
    bpf::Kernel,
    metrics::{self, Live, LiveSource},
    pipeline::Shared,
};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The metrics address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Only loopback addresses are allowed unless explicitly allowed.
    #[error(
        "metrics address {addr} is not a loopback address (allow it with --metrics-allow-non-loopback or `metrics_allow_non_loopback: true`)"
    )]
    NotLoopback {
        /// The address.
        addr: SocketAddr,
    },
}

/// What the endpoints read.
pub struct Sources {
    /// Shared proxy state (audit health, snapshot).
    pub shared: Arc<Shared>,
    /// Kernel counters.
    pub kernel: Arc<Kernel>,
    /// Enforcement health (the `control::health` check).
    pub control: Arc<crate::control::AgentState>,
}

/// Binds the admin listener: loopback only, unless `allow_non_loopback`
/// (`--metrics-allow-non-loopback`).
pub async fn bind(addr: SocketAddr, allow_non_loopback: bool) -> Result<TcpListener, AdminError> {
    if !addr.ip().is_loopback() && !allow_non_loopback {
        return Err(AdminError::NotLoopback { addr });
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves the admin endpoints forever; `/metrics` is [`metrics::global`], whose
/// scrape-time values come from `sources`.
pub async fn serve(listener: TcpListener, sources: Arc<Sources>) {
    metrics::global().attach(sources.clone());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<Incoming>| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(route(&sources, req.uri().path())) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(sources: &Sources, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::global().encode(),
        ),
        "/healthz" => match health(sources) {
            Ok(()) => (
                StatusCode::OK,
                "text/plain",
                match sources.control.enforcement().last_incident {
                    // Healthy again, but the incident stays visible.
                    Some(i) => format!(
                        "ok\nlast incident: {} detected {}\n",
                        i.outcome, i.detected_at
                    ),
                    None => "ok\n".to_owned(),
                },
            ),
            Err(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{reason}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// Why the agent is not healthy, if it is not: the audit sink cannot write, or the hooks
/// are gone and could not be re-attached (`enforcement_lost: …`).
pub fn health(sources: &Sources) -> Result<(), String> {
    if !sources.shared.auditor.healthy() {
        return Err("audit_unavailable".into());
    }
    if let Some(reason) = sources.control.unhealthy() {
        return Err(reason);
    }
    Ok(())
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

impl LiveSource for Sources {
    fn live(&self) -> Live {
        let kernel = &self.kernel;
        let audit = self.shared.auditor.metrics();
        let enforcement = self.shared.enforcement.load();
        Live {
            kernel_redirected: kernel.counter(counters::REDIRECTED),
            kernel_denied: kernel.counter(counters::DENIED),
            kernel_events_lost: kernel.counter(counters::EVENTS_LOST),
            kernel_origin_store_failed: kernel.counter(counters::ORIGIN_STORE_FAILED),
            kernel_dns_redirected: kernel.counter(counters::DNS_REDIRECTED),
            kernel_audit_passed: kernel.counter(counters::AUDIT_PASSED),
            cgroup_scan_errors: crate::workloads::scan_errors(),
            cgroup_scan_kept: crate::workloads::kept_unseen(),
            audit_records_written: audit.records_written,
            audit_write_errors: audit.write_errors,
            audit_checkpoints: audit.checkpoints,
            audit_unavailable_summarised: audit.unavailable_summarised,
            audit_queue_depth: audit.queue_depth,
            audit_unavailable: audit.unhealthy,
            workloads: enforcement.policy.workloads().len() as u64,
            managed_cgroups: enforcement.cgroups.managed.len() as u64,
        }
    }
}
