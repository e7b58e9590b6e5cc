//! Forward: send an allowed request to its upstream and relay the response.
//!
//! The upstream address is the original destination the kernel recorded (already confirmed
//! against policy by the decide stage); this module never resolves names. Connections are
//! pooled per address. Every upstream socket carries the agent's SO_MARK, so the hooks can
//! recognise the agent's own traffic and never loop it back.
#![forbid(unsafe_code)]

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, Request, Response, Uri, header};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::{TcpSocket, TcpStream};

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
    /// The request could not be rebuilt for the upstream.
    #[error("building the upstream request for {target}: {source}")]
    Build {
        /// The target.
        target: String,
        /// The error.
        source: http::Error,
    },
}

/// The upstream HTTP client (pooled).
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<MarkedConnector, crate::pipeline::Body>,
}

impl Upstream {
    /// A client whose sockets carry `mark` (0: no mark).
    pub fn new(mark: u32) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .set_host(false)
            .build(MarkedConnector { mark });
        Self { client }
    }

    /// Sends `req` to `addr` with the canonical `target`, relaying the client's headers
    /// minus hop-by-hop ones.
    pub async fn send(
        &self,
        req: Request<crate::pipeline::Body>,
        addr: SocketAddr,
        target: &str,
    ) -> Result<Response<Incoming>, ForwardError> {
        let (mut parts, body) = req.into_parts();
        parts.uri =
            Uri::try_from(format!("http://{addr}{target}")).map_err(|e| ForwardError::Build {
                target: target.into(),
                source: e.into(),
            })?;
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        let mut response = self
            .client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|source| ForwardError::Upstream { addr, source })?;
        strip_hop_by_hop(response.headers_mut());
        Ok(response)
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those named by Connection.
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
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
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
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if mark != 0 {
                socket2::SockRef::from(&socket).set_mark(mark)?;
            }
            socket.set_nodelay(true)?;
            let stream = socket.connect(addr).await?;
            Ok(TokioIo::new(stream))
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
