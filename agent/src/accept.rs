//! Accept: the proxy's listeners on 127.0.0.1:P and [::1]:P, where the kernel programs send
//! every managed connect.
#![forbid(unsafe_code)]

use std::{io, net::SocketAddr};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Errors of this stage.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The proxy port is taken or cannot be bound.
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
        /// A hint for the common case.
        hint: &'static str,
    },
}

/// The bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// 127.0.0.1:P.
    pub v4: TcpListener,
    /// [::1]:P, when IPv6 is available on the host.
    pub v6: Option<TcpListener>,
}

impl Listeners {
    /// Binds 127.0.0.1:`port` and [::1]:`port` (port 0 picks a free port, the same on both
    /// when possible). A missing IPv6 loopback only warns: IPv6 connects then fail closed.
    pub fn bind(port: u16) -> Result<Self, AcceptError> {
        let v4 = listen(SocketAddr::from(([127, 0, 0, 1], port)))?;
        let port = v4.local_addr().map(|a| a.port()).unwrap_or(port);
        let v6 = match listen(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))) {
            Ok(l) => Some(l),
            Err(AcceptError::Bind { source, .. })
                if source.kind() == io::ErrorKind::AddrNotAvailable
                    || source.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                tracing::warn!(
                    "no IPv6 loopback; IPv6 connects of managed workloads will be refused"
                );
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Self { v4, v6 })
    }

    /// The port both listeners use.
    pub fn port(&self) -> u16 {
        self.v4.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Accepts connections forever, handing each accepted stream and its peer address to
    /// `serve` (which spawns the connection's task; see
    /// [`pipeline::serve_connection`](crate::pipeline::serve_connection)).
    pub async fn serve<F>(self, serve: F)
    where
        F: Fn(TcpStream, SocketAddr) + Clone + Send + 'static,
    {
        let v4 = tokio::spawn(accept_loop(self.v4, serve.clone()));
        if let Some(v6) = self.v6 {
            tokio::spawn(accept_loop(v6, serve));
        }
        let _ = v4.await;
    }
}

fn listen(addr: SocketAddr) -> Result<TcpListener, AcceptError> {
    let err = |source: io::Error| AcceptError::Bind {
        addr,
        hint: if source.kind() == io::ErrorKind::AddrInUse {
            " (another process, perhaps another scopegate, holds the port; choose one with --proxy-port)"
        } else {
            ""
        },
        source,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(1024).map_err(err)
}

async fn accept_loop<F>(listener: TcpListener, serve: F)
where
    F: Fn(TcpStream, SocketAddr),
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                serve(stream, peer);
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
