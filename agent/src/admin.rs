//! Admin: Prometheus metrics and a health endpoint on a loopback address.
//!
//! `GET /metrics` serves the text exposition format; `GET /healthz` answers 200 `ok` while
//! the agent can enforce and record, and 503 with the reason otherwise (while the audit
//! sink cannot write, or while the hooks are gone and could not be re-attached).
#![forbid(unsafe_code)]

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use scopegate_common::counters;
use tokio::net::TcpListener;

use crate::{bpf::Kernel, pipeline::Shared};

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
    /// Only loopback addresses are allowed.
    #[error("metrics address {addr} is not a loopback address")]
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

/// Binds the admin listener (loopback only).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback { addr });
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

/// Serves the admin endpoints forever.
pub async fn serve(listener: TcpListener, sources: Arc<Sources>) {
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
            "text/plain; version=0.0.4",
            metrics(sources),
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

/// The metrics in Prometheus text format.
pub fn metrics(sources: &Sources) -> String {
    let mut out = String::new();
    let kernel = &sources.kernel;
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "scopegate_kernel_redirected_total",
        "Managed TCP connects redirected to the proxy.",
        kernel.counter(counters::REDIRECTED),
    );
    counter(
        "scopegate_kernel_denied_total",
        "Managed connects, sends and sockets denied in the kernel.",
        kernel.counter(counters::DENIED),
    );
    counter(
        "scopegate_kernel_events_lost_total",
        "Kernel deny events not delivered because the ring buffer was full.",
        kernel.counter(counters::EVENTS_LOST),
    );
    counter(
        "scopegate_kernel_origin_store_failed_total",
        "Redirects whose origin could not be stored (denied).",
        kernel.counter(counters::ORIGIN_STORE_FAILED),
    );
    counter(
        "scopegate_cgroup_scan_errors_total",
        "Parts of the cgroup tree a scan could not read (their managed cgroups were kept).",
        crate::workloads::scan_errors(),
    );
    counter(
        "scopegate_cgroup_scan_kept_total",
        "Managed cgroups kept although a scan did not see them.",
        crate::workloads::kept_unseen(),
    );
    let audit = sources.shared.auditor.metrics();
    counter(
        "scopegate_audit_records_written_total",
        "Audit records written to every sink.",
        audit.records_written,
    );
    counter(
        "scopegate_audit_write_errors_total",
        "Failed attempts to write, fsync or rotate the audit log.",
        audit.write_errors,
    );
    counter(
        "scopegate_audit_checkpoints_total",
        "Signed checkpoints written.",
        audit.checkpoints,
    );
    counter(
        "scopegate_audit_unavailable_summarised_total",
        "Refusals during an audit outage recorded in summary records.",
        audit.unavailable_summarised,
    );
    let _ = writeln!(
        out,
        "# HELP scopegate_audit_queue_depth Audit records accepted but not yet written.\n# TYPE scopegate_audit_queue_depth gauge\nscopegate_audit_queue_depth {}\n# HELP scopegate_audit_unavailable 1 while the audit log cannot be written (requests get 503).\n# TYPE scopegate_audit_unavailable gauge\nscopegate_audit_unavailable {}",
        audit.queue_depth,
        u8::from(audit.unhealthy)
    );
    let enforcement = sources.shared.enforcement.load();
    let _ = writeln!(
        out,
        "# HELP scopegate_workloads Workloads in the current policy snapshot.\n# TYPE scopegate_workloads gauge\nscopegate_workloads {}",
        enforcement.policy.workloads().len()
    );
    let _ = writeln!(
        out,
        "# HELP scopegate_managed_cgroups Managed cgroups known to the agent.\n# TYPE scopegate_managed_cgroups gauge\nscopegate_managed_cgroups {}",
        enforcement.cgroups.managed.len()
    );
    out
}
