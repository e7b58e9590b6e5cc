//! Forward: send an admitted request to its upstream, unchanged, and hand back the response.
//!
//! The only input is an [`Admitted`] request, which only the
//! [`enforce`](crate::enforce) stage makes, and only once its decision record is durable
//! (record before forward): what was decided, and recorded, is what is sent. A TLS
//! passthrough splice ([`splice`]) likewise takes the [`Recorded`] proof of its decision. The upstream
//! address is the original destination the kernel recorded (already bound to the policy's
//! destination by that stage); this module never resolves names and edits no request
//! header (the [`outbound`](crate::outbound) stage already removed the hop-by-hop ones and
//! set Host). Connections are
//! pooled per address. Every upstream socket carries the agent's SO_MARK, so the hooks can
//! recognise the agent's own traffic and never loop it back.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpStream;

use crate::state::connect_marked;

use crate::{
    audit::Recorded,
    enforce::Admitted,
    state::Body,
    tls::{UpstreamTls, UpstreamTlsError},
};

/// Errors of this stage.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The upstream could not be reached or failed mid-request.
    #[error("upstream {addr}: {source}")]
    Upstream {
        /// The upstream address.
        addr: SocketAddr,
        /// The error.
        source: hyper_util::client::legacy::Error,
    },
    /// No trust roots are loaded, so no upstream TLS can be verified.
    #[error("no trust roots for upstream TLS (system roots missing and no --upstream-ca)")]
    NoTrustRoots,
    /// The request could not be rebuilt for the upstream.
    #[error("building the upstream request for {target}: {source}")]
    Build {
        /// The target.
        target: String,
        /// The error.
        source: http::Error,
    },
}

/// The pooled client of one TLS server name.
type TlsClient = Client<Budgeted<TlsConnector>, Body>;

/// The upstream HTTP clients (pooled): one for plain HTTP, one per TLS server name.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<Budgeted<MarkedConnector>, Body>,
    mark: u32,
    tls: Option<UpstreamTls>,
    tls_clients: Arc<Mutex<HashMap<String, TlsClient>>>,
    sockets: UpstreamSockets,
}

impl Upstream {
    /// A client whose sockets carry `mark` (0: no mark), verifying upstream TLS with
    /// `tls` (None: no trust roots could be loaded; TLS upstreams then fail with 502),
    /// holding at most what `sockets` allows open at once (pooled idle ones included).
    pub fn new(mark: u32, tls: Option<UpstreamTls>, sockets: UpstreamSockets) -> Self {
        let client = builder().build(Budgeted {
            inner: MarkedConnector { mark },
            sockets: sockets.clone(),
        });
        Self {
            client,
            mark,
            tls,
            tls_clients: Arc::default(),
            sockets,
        }
    }

    /// Sends the admitted request to its address (the kernel's original destination),
    /// over verified TLS with the policy host as server name when the destination says so.
    /// The request goes exactly as admitted: origin-form canonical target, the built
    /// headers, HTTP/1.1 (the Host header carries the authority).
    pub async fn send(&self, admitted: Admitted) -> Result<Response<Incoming>, ForwardError> {
        let sendable = admitted.into_request();
        let (addr, target) = (sendable.addr, sendable.target);
        let tls_name = sendable.tls_name.as_deref();
        let scheme = if tls_name.is_some() { "https" } else { "http" };
        // The URI's authority is the dialled address (the connector reads it, the pool keys
        // on it); hyper sends the origin-form target and our Host header.
        let uri = Uri::try_from(format!("{scheme}://{addr}{target}")).map_err(|e| {
            ForwardError::Build {
                target: target.clone(),
                source: e.into(),
            }
        })?;
        let mut request = Request::new(sendable.body);
        *request.method_mut() = sendable.method;
        *request.uri_mut() = uri;
        *request.version_mut() = http::Version::HTTP_11;
        *request.headers_mut() = sendable.headers;
        let mut response = match tls_name {
            None => self.client.request(request).await,
            Some(name) => {
                let tls = self.tls.clone().ok_or(ForwardError::NoTrustRoots)?;
                let client = {
                    let mut clients = self.tls_clients.lock().unwrap_or_else(|p| p.into_inner());
                    clients
                        .entry(name.to_owned())
                        .or_insert_with(|| {
                            builder().build(Budgeted {
                                inner: TlsConnector {
                                    mark: self.mark,
                                    name: name.into(),
                                    tls,
                                },
                                sockets: self.sockets.clone(),
                            })
                        })
                        .clone()
                };
                client.request(request).await
            }
        }
        .map_err(|source| ForwardError::Upstream { addr, source })?;
        strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }
}

fn builder() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .set_host(false);
    builder
}

/// The first error of type `E` in `error`'s chain, also inside an `io::Error`.
fn find_cause<E: std::error::Error + 'static>(error: &ForwardError) -> Option<&E> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<E>())
        {
            return Some(found);
        }
        source = e.source();
    }
    None
}

/// Whether an upstream failure was a certificate that did not verify.
pub fn bad_certificate(error: &ForwardError) -> Option<String> {
    match find_cause::<UpstreamTlsError>(error)? {
        UpstreamTlsError::BadCertificate { host, reason } => Some(format!("{host}: {reason}")),
        _ => None,
    }
}

/// Whether an upstream failure was the upstream socket budget, all in use (nothing was
/// dialled).
pub fn sockets_exhausted(error: &ForwardError) -> Option<&SocketsExhausted> {
    find_cause::<SocketsExhausted>(error)
}

/// How many upstream sockets the proxy may hold open at once, pooled idle ones included:
/// with the downstream connections' own budget
/// ([`ConnectionCounts`](crate::state::ConnectionCounts)), what keeps the descriptors of
/// the control plane free (see [`descriptor_budget`](crate::state::descriptor_budget)),
/// however many upstream connections one downstream connection fans out to (HTTP/2
/// streams, keep-alive connections left idle in the pool).
#[derive(Clone, Debug)]
pub struct UpstreamSockets {
    permits: Arc<tokio::sync::Semaphore>,
    budget: usize,
}

impl UpstreamSockets {
    /// At most `budget` upstream sockets at once.
    pub fn with_budget(budget: usize) -> Self {
        let budget = budget.min(tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(budget)),
            budget,
        }
    }

    /// No limit beyond the semaphore's own (for tests and embedding).
    pub fn unlimited() -> Self {
        Self::with_budget(tokio::sync::Semaphore::MAX_PERMITS)
    }

    /// Upstream sockets open now.
    pub fn in_use(&self) -> usize {
        self.budget - self.permits.available_permits()
    }
}

/// Every upstream socket of the budget is open: the request is refused, not dialled.
#[derive(Debug, thiserror::Error)]
#[error("all {budget} upstream sockets of the descriptor budget are in use")]
pub struct SocketsExhausted {
    /// The budget.
    pub budget: usize,
}

/// A connector that dials only with a permit of the [`UpstreamSockets`] budget; the
/// connection holds the permit until it is closed (also while idle in the pool).
#[derive(Clone, Debug)]
pub struct Budgeted<C> {
    inner: C,
    sockets: UpstreamSockets,
}

impl<C> tower_service::Service<Uri> for Budgeted<C>
where
    C: tower_service::Service<Uri, Error = std::io::Error>,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
{
    type Response = Permitted<C::Response>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let Ok(permit) = Arc::clone(&self.sockets.permits).try_acquire_owned() else {
            let budget = self.sockets.budget;
            return Box::pin(
                async move { Err(std::io::Error::other(SocketsExhausted { budget })) },
            );
        };
        let connect = self.inner.call(uri);
        Box::pin(async move {
            Ok(Permitted {
                inner: connect.await?,
                _permit: permit,
            })
        })
    }
}

/// An upstream connection holding its [`UpstreamSockets`] permit.
#[derive(Debug)]
pub struct Permitted<T> {
    inner: T,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<T: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for Permitted<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Permitted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Permitted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects like [`MarkedConnector`], then speaks verified TLS with a fixed server name.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    mark: u32,
    name: Arc<str>,
    tls: UpstreamTls,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TlsConnection;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut plain = MarkedConnector { mark: self.mark };
        let (name, tls) = (self.name.clone(), self.tls.clone());
        Box::pin(async move {
            let stream = plain.call(uri).await?.into_inner();
            let stream = tokio::time::timeout(Duration::from_secs(10), tls.connect(stream, &name))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "upstream TLS handshake timed out",
                    )
                })?
                .map_err(std::io::Error::other)?;
            Ok(TlsConnection(TokioIo::new(stream)))
        })
    }
}

/// A verified TLS connection to an upstream, for the pooled client.
#[derive(Debug)]
pub struct TlsConnection(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl hyper_util::client::legacy::connect::Connection for TlsConnection {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

impl hyper::rt::Read for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) from a response, including those named by
/// Connection. (Requests are built without them by [`outbound`](crate::outbound).)
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in crate::outbound::HOP_BY_HOP {
        headers.remove(name);
    }
}

/// How long dialling a passthrough upstream may take.
const SPLICE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a [`splice`] ended: the bytes copied each way, and whether it was cut idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes read from the client (and sent up).
    pub up: u64,
    /// Bytes read from the upstream (and sent down).
    pub down: u64,
    /// No byte moved either way for the idle timeout: the splice was closed.
    pub idle: bool,
}

/// Splices a passthrough TLS connection to `addr` (dialled with SO_MARK `mark`), copying
/// both ways until both sides are done, or until no byte moved in either direction for
/// `idle` (checked once per `idle`, so a silent splice closes between one and two idle
/// timeouts after its last byte). Takes the [`Recorded`] proof of its allow decision:
/// nothing is dialled before that record is durable. The byte counts are what was read
/// from each side, also when the splice ends with an error.
pub async fn splice(
    _recorded: Recorded,
    mut client: TcpStream,
    addr: SocketAddr,
    mark: u32,
    idle: Duration,
) -> std::io::Result<Spliced> {
    let mut server = tokio::time::timeout(SPLICE_CONNECT_TIMEOUT, connect_marked(addr, mark))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })??;
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let moved = || up.load(Relaxed) + down.load(Relaxed);
    let mut from_client = Counted {
        inner: &mut client,
        count: &up,
    };
    let mut from_server = Counted {
        inner: &mut server,
        count: &down,
    };
    let copy = tokio::io::copy_bidirectional(&mut from_client, &mut from_server);
    tokio::pin!(copy);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
    let mut seen = 0;
    let idle = loop {
        tokio::select! {
            _ = &mut copy => break false,
            _ = ticks.tick() => {
                let now = moved();
                if now == seen {
                    break true;
                }
                seen = now;
            }
        }
    };
    Ok(Spliced {
        up: up.load(Relaxed),
        down: down.load(Relaxed),
        idle,
    })
}

/// A stream that counts the bytes read from it.
struct Counted<'a, S> {
    inner: S,
    count: &'a AtomicU64,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        self.count.fetch_add(read as u64, Relaxed);
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connects to the socket address in the URI (never resolving a name), with SO_MARK set.
#[derive(Clone, Copy, Debug)]
pub struct MarkedConnector {
    mark: u32,
}

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mark = self.mark;
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("upstream URI {uri} does not name a socket address"),
                    )
                })?;
            Ok(TokioIo::new(connect_marked(addr, mark).await?))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// An HTTP/1.1 origin on 127.0.0.1:0 that answers every request 200 and keeps the
    /// connection open.
    async fn origin() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<
                            bytes::Bytes,
                        >::new(
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn pooled_idle_upstream_sockets_count_against_the_budget() {
        let (a, b) = (origin().await, origin().await);
        let sockets = UpstreamSockets::with_budget(1);
        let client: Client<_, http_body_util::Empty<bytes::Bytes>> = builder().build(Budgeted {
            inner: MarkedConnector { mark: 0 },
            sockets: sockets.clone(),
        });
        let get = |addr: SocketAddr| {
            Request::get(format!("http://{addr}/"))
                .body(http_body_util::Empty::new())
                .unwrap()
        };
        let response = client.request(get(a)).await.unwrap();
        assert_eq!(response.status(), 200);
        drop(response);
        // The connection to `a` is idle in the pool now, and still holds the one permit.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(sockets.in_use(), 1);
        // Another upstream is refused without dialling, and the error says why.
        let error = client.request(get(b)).await.unwrap_err();
        let error = ForwardError::Upstream {
            addr: b,
            source: error,
        };
        assert_eq!(
            sockets_exhausted(&error).map(|e| e.budget),
            Some(1),
            "{error}"
        );
        assert!(bad_certificate(&error).is_none());
        // The pooled connection to `a` is reused within the budget.
        assert_eq!(client.request(get(a)).await.unwrap().status(), 200);
        // Once the pool lets its connections go, the permit is free again.
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(sockets.in_use(), 0);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::PROXY_AUTHORIZATION, "Basic x".parse().unwrap());
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        h.insert(header::HOST, "api.example.com".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(h.contains_key("x-kept") && h.contains_key(header::HOST));
    }
}
