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

/// The upstream HTTP clients (pooled): one for plain HTTP, one per TLS server name.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<MarkedConnector, Body>,
    mark: u32,
    tls: Option<UpstreamTls>,
    tls_clients: Arc<Mutex<HashMap<String, Client<TlsConnector, Body>>>>,
}

impl Upstream {
    /// A client whose sockets carry `mark` (0: no mark), verifying upstream TLS with
    /// `tls` (None: no trust roots could be loaded; TLS upstreams then fail with 502).
    pub fn new(mark: u32, tls: Option<UpstreamTls>) -> Self {
        let client = builder().build(MarkedConnector { mark });
        Self {
            client,
            mark,
            tls,
            tls_clients: Arc::default(),
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
                            builder().build(TlsConnector {
                                mark: self.mark,
                                name: name.into(),
                                tls,
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

/// Whether an upstream failure was a certificate that did not verify.
pub fn bad_certificate(error: &ForwardError) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(UpstreamTlsError::BadCertificate { host, reason }) = e.downcast_ref() {
            return Some(format!("{host}: {reason}"));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(UpstreamTlsError::BadCertificate { host, reason }) =
                io.get_ref().and_then(|inner| inner.downcast_ref())
        {
            return Some(format!("{host}: {reason}"));
        }
        source = e.source();
    }
    None
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
