//! The path of one connection, top to bottom:
//!
//! ```text
//! accept → identify → detect → [tls] → framing → outbound → enforce → forward → respond
//!             └─ original port 53 → dns (DNS over TCP)                 (audit throughout)
//! ```
//!
//! [`serve_connection`] runs identify and detect once per connection; HTTP/1 connections
//! then pass through the [framing guard](crate::framing), which refuses ambiguous framing
//! before hyper parses it. [`handle_request`] runs once per HTTP request: it builds the
//! ONE outbound request, decides on exactly that value, records the decision and waits
//! until the record is durable (record before forward), forwards exactly what the decision
//! admitted, and responds once the linked outcome record is written. Each request reads the current
//! [`Enforcement`] snapshot once, so it is decided entirely by one snapshot, and the next
//! request on a live keep-alive connection sees a newly published one.
//!
//! This module only composes the stages; they never import it.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::{
    accept::Pending,
    audit::{Auditor, Decision, Fault, Record},
    detect::{self, Protocol},
    enforce,
    forward::Upstream,
    framing,
    identify::{self, Identity, OriginTable},
    metrics::{self, RequestPath},
    outbound::{self, Arrival},
    policy::{RateLimiter, TlsMode},
    resolve::Resolver,
    respond::{self, Forwarded, Reply},
    secrets::Secrets,
    state::{AGENT_MARK, Body, ConnectionCounts, Enforcement, Refused, Timeouts},
    tls::LeafCache,
};

/// State shared by every connection: what the stages need, composed here.
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
    /// Limits of the HTTP/1 framing guard.
    pub framing: framing::Limits,
    /// Header and body timeouts.
    pub timeouts: Timeouts,
    /// Live connections per workload (`max_connections`).
    pub connections: ConnectionCounts,
    /// The DNS proxy (UDP listener and DNS-over-TCP connections).
    pub dns: crate::dns::DnsProxy,
}

impl crate::dns::DnsEnv for Shared {
    fn enforcement(&self) -> &ArcSwap<Enforcement> {
        &self.enforcement
    }
    fn auditor(&self) -> &Auditor {
        &self.auditor
    }
    fn resolver(&self) -> &Resolver {
        &self.resolver
    }
    fn dns(&self) -> &crate::dns::DnsProxy {
        &self.dns
    }
}

/// What every request on one connection shares: who is calling, and how they arrived.
#[derive(Debug)]
struct Conn {
    identity: Identity,
    /// The TLS server name, for intercepted TLS.
    sni: Option<Arc<str>>,
}

impl Conn {
    fn arrival(&self, timeouts: Timeouts) -> Arrival<'_> {
        Arrival {
            default_port: if self.sni.is_some() { 443 } else { 80 },
            sni: self.sni.as_deref(),
            body_timeout: timeouts.body,
        }
    }
}

/// Serves one accepted connection.
pub async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    serve_pending(shared, stream, peer, Pending::none()).await;
}

/// Serves one accepted connection; `pending` is released once it holds a connection slot
/// or has been refused (see [`crate::accept::MAX_PENDING`]).
pub async fn serve_pending(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    pending: Pending,
) {
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
    // Each workload holds at most `max_connections` at once; the excess is refused.
    let Some(_slot) = connection_slot(&shared, &identity, &stream) else {
        return;
    };
    pending.release();
    // DNS over TCP (redirected port 53) has its own stage, before protocol detection.
    if identity.original_dst.port() == crate::dns::upstream::DNS_PORT {
        return crate::dns::serve_tcp(shared.as_ref(), stream, &identity).await;
    }
    // detect
    match detect::detect(&stream, shared.detect_timeout).await {
        Ok(Protocol::Http1) => {
            let conn = Arc::new(Conn {
                identity,
                sni: None,
            });
            serve_http1(shared, TokioIo::new(stream), conn).await;
        }
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

/// Takes a connection slot of the caller's workload (callers the policy does not know take
/// none: every request of theirs is refused anyway). Over the limit: one record, and the
/// connection is reset.
fn connection_slot(
    shared: &Shared,
    identity: &Identity,
    stream: &TcpStream,
) -> Option<Option<crate::state::ConnectionSlot>> {
    let enforcement = shared.enforcement.load();
    let Some(workload) = identity
        .workload(&enforcement.cgroups)
        .0
        .and_then(|w| enforcement.policy.workload(w))
    else {
        return Some(None);
    };
    let limit = workload.max_connections();
    let reason = match shared.connections.acquire(&workload.name, limit) {
        Ok(slot) => return Some(Some(slot)),
        Err(crate::state::Exhausted::Workload) => "connection_limit",
        // The descriptors left are the control plane's (scan, reload, audit).
        Err(crate::state::Exhausted::Descriptors) => "descriptor_limit",
    };
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    tracing::warn!(workload = %workload.name, limit, reason, "connection refused");
    connection_refused(shared, identity, reason, Fault::Client);
    None
}

/// Requests of one HTTP/2 connection, for its idle timeout: in flight, and started in all.
#[derive(Debug, Default)]
struct Streams {
    active: std::sync::atomic::AtomicUsize,
    started: std::sync::atomic::AtomicU64,
}

/// Counts one request of [`Streams`] in flight until dropped.
struct InFlight(Arc<Streams>);

impl InFlight {
    fn new(streams: &Arc<Streams>) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        streams.started.fetch_add(1, Relaxed);
        streams.active.fetch_add(1, Relaxed);
        Self(streams.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn service(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    streams: Option<Arc<Streams>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone {
    service_fn(move |req| {
        let shared = shared.clone();
        let conn = conn.clone();
        let in_flight = streams.as_ref().map(InFlight::new);
        async move {
            let response = handle_request(&shared, &conn, req).await;
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    })
}

/// HTTP/1.x, behind the framing guard: a request whose framing is ambiguous never reaches
/// hyper; it is recorded and answered here, and the connection closed.
async fn serve_http1<S>(shared: Arc<Shared>, io: S, conn: Arc<Conn>)
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (io, watch) = framing::guard(io, shared.framing);
    // Two timers per connection, none per request: hyper's header timer runs whenever
    // hyper waits for a head (on a new connection and after each response) and is the
    // idle timeout; the guard's runs from a head's first bytes and is the header timeout.
    let io = io.with_header_timeout(shared.timeouts.header);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .half_close(false)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(shared.timeouts.idle);
    let violation = {
        let connection = builder.serve_connection(io, service(shared.clone(), conn.clone(), None));
        tokio::pin!(connection);
        tokio::select! {
            result = &mut connection => {
                if watch.head_timed_out() {
                    header_timeout(&shared, &conn);
                } else if let Err(e) = result {
                    connection_error(&shared, &conn, &e, !watch.idle());
                }
                return;
            }
            violation = watch.violated() => violation,
        }
        // hyper's connection is dropped here: nothing more of it is parsed or answered.
    };
    refuse_malformed(&shared, &conn, violation, watch.take_io()).await;
}

/// HTTP/2 inside intercepted TLS: the h2 framing layer is strict by construction. A
/// connection with no request in flight and none started for the idle timeout is shut
/// down gracefully (GOAWAY; a response still streaming finishes), so it closes between
/// one and two idle timeouts after its last request; a peer that stops answering pings
/// (sent every idle timeout) for the header timeout is closed by hyper.
async fn serve_http2<S>(shared: Arc<Shared>, io: S, conn: Arc<Conn>)
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let idle = shared.timeouts.idle;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(idle)
        .keep_alive_timeout(shared.timeouts.header);
    let streams = Arc::new(Streams::default());
    let connection = builder.serve_connection(
        io,
        service(shared.clone(), conn.clone(), Some(streams.clone())),
    );
    tokio::pin!(connection);
    let mut seen = 0;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
    let result = loop {
        tokio::select! {
            result = &mut connection => break result,
            _ = ticks.tick() => {
                use std::sync::atomic::Ordering::Relaxed;
                let started = streams.started.load(Relaxed);
                if streams.active.load(Relaxed) == 0 && started == seen {
                    connection.as_mut().graceful_shutdown();
                    break connection.await;
                }
                seen = started;
            }
        }
    };
    if let Err(e) = result {
        connection_error(&shared, &conn, &e, false);
    }
}

/// A request the framing guard stopped: one record, then a 4xx with `Connection: close`
/// written once the record is, then the connection closes.
async fn refuse_malformed<S>(
    shared: &Shared,
    conn: &Conn,
    violation: framing::Violation,
    io: Option<S>,
) where
    S: hyper::rt::Write + Unpin,
{
    let enforcement = shared.enforcement.load();
    let request_id = new_request_id();
    let mut record = request_record(&enforcement, &conn.identity, &request_id);
    record.method = violation.method.clone();
    record.path = violation.target.clone();
    let refused = match violation.kind {
        // Not malformed: refused by design, with the same reason as over HTTP/2.
        framing::ViolationKind::ConnectRefused => outbound::connect_refused(),
        kind => Refused::malformed(
            StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::BAD_REQUEST),
            kind.code(),
            violation.detail.clone(),
        ),
    };
    record.error_kind = refused.error_kind.map(str::to_owned);
    let workload = record.workload.clone();
    let written = shared.auditor.guard(record).finish_written(
        Decision::Deny,
        Some(refused.status.as_u16()),
        Some(refused.reason),
        Some(refused.fault),
    );
    if written.wait().await.is_err() {
        return; // the writer stopped: no answer that nobody can account for
    }
    if let Some(mut io) = io {
        let bytes = respond::raw_http1_refusal(&refused, workload.as_deref(), &request_id);
        let _ = write_all(&mut io, &bytes).await;
        let _ = std::future::poll_fn(|cx| std::pin::Pin::new(&mut io).poll_shutdown(cx)).await;
    }
}

async fn write_all<S: hyper::rt::Write + Unpin>(
    io: &mut S,
    mut bytes: &[u8],
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n =
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut *io).poll_write(cx, bytes)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
    }
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *io).poll_flush(cx)).await
}

/// An error hyper returned for the connection. The ones that refuse what the client sent
/// (the parser's, the size limits) are one `malformed_request` record each; a client that
/// went away is not a decision.
fn connection_error(shared: &Shared, conn: &Conn, error: &hyper::Error, mid_request: bool) {
    if error.is_timeout() || framing::is_header_timeout(error) {
        // hyper's header timer (the idle timeout) or the guard's header timeout: a head
        // still partial is refused; an idle keep-alive connection simply closes.
        if mid_request {
            header_timeout(shared, conn);
        }
        return;
    }
    let Some(kind) = parser_error_kind(error, mid_request) else {
        tracing::debug!(error = %error, "client connection ended with an error");
        return;
    };
    let enforcement = shared.enforcement.load();
    let mut record = request_record(&enforcement, &conn.identity, &new_request_id());
    record.error_kind = Some(kind.into());
    let status = if error.is_parse_too_large() { 431 } else { 400 };
    shared.auditor.guard(record).finish(
        Decision::Deny,
        Some(status),
        Some(crate::state::MALFORMED_REQUEST),
        Some(Fault::Client),
    );
}

/// A request head still partial at the header (or idle) timeout: one record.
fn header_timeout(shared: &Shared, conn: &Conn) {
    let enforcement = shared.enforcement.load();
    let record = request_record(&enforcement, &conn.identity, &new_request_id());
    shared.auditor.guard(record).finish(
        Decision::Deny,
        Some(408),
        Some("header_timeout"),
        Some(Fault::Client),
    );
}

/// The error kind of a refusal hyper made itself, or None when the error refuses nothing.
fn parser_error_kind(error: &hyper::Error, mid_request: bool) -> Option<&'static str> {
    if error.is_parse_too_large() {
        Some("headers_too_large")
    } else if error.is_parse_status() {
        Some("status_invalid")
    } else if error.is_parse() {
        Some("parse_error")
    } else if error.is_incomplete_message() && mid_request {
        Some("incomplete_message")
    } else if error.is_user() || error.is_canceled() || error.is_closed() || error.is_timeout() {
        None
    } else if error.to_string().contains("http2") {
        Some("http2_protocol_error")
    } else {
        None
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
        .map(|(_, d)| (d.tls(), d.binding()));
    let Some((mode, host)) = destination else {
        return refuse(record, "sni_not_allowed", Fault::Policy);
    };
    if let Err(refused) =
        enforce::confirm_address(&shared.resolver, &host, identity.original_dst).await
    {
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
            let h2 = tls.get_ref().1.alpn_protocol() == Some(crate::tls::upstream::ALPN_H2);
            let conn = Arc::new(Conn {
                identity,
                sni: Some(sni.into()),
            });
            if h2 {
                serve_http2(shared.clone(), TokioIo::new(tls), conn).await;
            } else {
                serve_http1(shared.clone(), TokioIo::new(tls), conn).await;
            }
        }
    }
}

/// Splices a passthrough TLS connection to its original destination: the allow decision
/// is recorded (durably) before the upstream is dialled, and a linked outcome record with
/// bytes and duration when the splice ends (`idle_timeout` when it was cut idle).
async fn passthrough(shared: &Shared, client: TcpStream, upstream: SocketAddr, mut record: Record) {
    record.rule = None;
    let guard = shared.auditor.guard(record);
    if !shared.auditor.healthy() {
        return guard.finish_unavailable();
    }
    let (recorded, mut outcome) = match guard.record_decision(Decision::Allow, None, None).await {
        Ok(recorded) => recorded,
        Err(outcome) => return outcome.finish_unavailable(),
    };
    let idle = shared.timeouts.idle;
    match crate::forward::splice(recorded, client, upstream, AGENT_MARK, idle).await {
        Ok(spliced) => {
            let record = outcome.record_mut();
            record.bytes_up = Some(spliced.up);
            record.bytes_down = Some(spliced.down);
            // An idle splice was closed: its outcome says so.
            let (reason, origin) = match spliced.idle {
                true => (Some("idle_timeout"), Some(Fault::Client)),
                false => (None, None),
            };
            outcome.finish(Decision::Allow, None, reason, origin);
        }
        Err(_) => outcome.finish(
            Decision::Error,
            None,
            Some("upstream_unreachable"),
            Some(Fault::Upstream),
        ),
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

fn request_record(enforcement: &Enforcement, identity: &Identity, request_id: &str) -> Record {
    let mut record = identity_record(enforcement, identity, "http");
    record.request_id = Some(request_id.to_owned());
    record
}

/// One request: build → enforce → forward → respond, with exactly one record. The agent's
/// own time is observed in `scopegate_request_overhead_seconds` (see [`crate::metrics`]):
/// from here (hyper has parsed the head) to the handover to the upstream client or to the
/// refusal being ready, plus from the upstream's response head to the relayed response
/// being ready. It includes reading a body a rule inspects, the decision, DNS
/// confirmation and waiting for the decision and outcome records to be durable; it
/// excludes the upstream's time and streaming the response body.
async fn handle_request(shared: &Shared, conn: &Conn, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let refused = |response: Response<Body>| {
        metrics::global().overhead(RequestPath::Refused, started.elapsed());
        response
    };
    let enforcement = shared.enforcement.load_full();
    let request_id = new_request_id();
    let reply = Reply {
        request_id: &request_id,
        http1: req.version() != http::Version::HTTP_2,
    };
    let mut guard = shared
        .auditor
        .guard(request_record(&enforcement, &conn.identity, &request_id));

    // build: the one request that will go upstream
    let arrival = conn.arrival(shared.timeouts);
    let outbound = match outbound::build(
        &enforcement,
        &conn.identity,
        arrival,
        req,
        guard.record_mut(),
    )
    .await
    {
        Ok(outbound) => outbound,
        Err(why) => return refused(respond::refuse(guard, &why, reply).await),
    };
    // enforce: decided on exactly that request
    let cx = enforce::Context {
        enforcement: &enforcement,
        identity: &conn.identity,
        limiter: &shared.limiter,
        resolver: &shared.resolver,
        secrets: &shared.secrets,
    };
    let decided = match enforce::admit(cx, outbound, guard.record_mut()).await {
        Ok(decided) => decided,
        Err(why) => return refused(respond::refuse(guard, &why, reply).await),
    };
    // Nothing is forwarded that cannot be recorded.
    if !shared.auditor.healthy() {
        return refused(respond::unavailable(guard, reply));
    }
    let forwarded = Forwarded {
        would_deny: decided.would_deny().cloned(),
        secret: decided.secret().map(str::to_owned),
        bytes_up: decided.body_len(),
    };
    // record before forward: the decision record is durable, or nothing goes upstream
    let (admitted, outcome) = match decided.record(guard).await {
        Ok(recorded) => recorded,
        Err(outcome) => return refused(respond::unavailable(outcome, reply)),
    };
    // forward: exactly what was admitted; the outcome record is written before responding
    let before_upstream = started.elapsed();
    let result = shared.upstream.send(admitted).await;
    let answered = Instant::now();
    let response = match result {
        Ok(response) => respond::relay(&shared.auditor, outcome, response, forwarded, reply).await,
        Err(e) => respond::upstream_failed(outcome, &e, forwarded.bytes_up, reply).await,
    };
    metrics::global().overhead(RequestPath::Forwarded, before_upstream + answered.elapsed());
    response
}

/// A fresh 128-bit request id, hex.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
