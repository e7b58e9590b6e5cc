//! Accept: the proxy's listeners on 127.0.0.1:P and [::1]:P, where the kernel programs send
//! every managed connect.
#![forbid(unsafe_code)]

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accepted connections not yet admitted (given a connection slot, or refused and closed)
/// at most at once, over both listeners (plus one waiting stream per listener). A burst of
/// connects is accepted this many at a time, so it cannot take the descriptors kept for
/// the control plane ([`FD_RESERVE`](crate::state::FD_RESERVE)); the rest waits in the
/// listen backlog.
pub const MAX_PENDING: usize = 32;

/// One accepted connection's place among the [`MAX_PENDING`]: held until the pipeline has
/// admitted or refused it, then released (dropped).
#[derive(Debug)]
pub struct Pending(
    #[allow(dead_code, reason = "held for its Drop, which returns the place")]
    Option<OwnedSemaphorePermit>,
);

impl Pending {
    /// A connection accepted outside [`Listeners::serve`] (in-process tests).
    pub fn none() -> Self {
        Self(None)
    }

    /// Releases the place: the connection holds a slot, or is gone.
    pub fn release(self) {}
}

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
        F: Fn(TcpStream, SocketAddr, Pending) + Clone + Send + 'static,
    {
        let pending = Arc::new(Semaphore::new(MAX_PENDING));
        let v4 = tokio::spawn(accept_loop(self.v4, serve.clone(), pending.clone()));
        if let Some(v6) = self.v6 {
            tokio::spawn(accept_loop(v6, serve, pending));
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

async fn accept_loop<F>(listener: TcpListener, serve: F, pending: Arc<Semaphore>)
where
    F: Fn(TcpStream, SocketAddr, Pending),
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // The next accept waits until this one has a place (one accepted stream per
                // listener may wait here).
                let Ok(permit) = pending.clone().acquire_owned().await else {
                    return; // never: the semaphore is not closed
                };
                let _ = stream.set_nodelay(true);
                serve(stream, peer, Pending(Some(permit)));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Polls `f` until it holds (at most 5 s).
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_is_accepted_at_most_max_pending_at_a_time() {
        let listeners = Listeners::bind(0).unwrap();
        let port = listeners.port();
        let held: Arc<Mutex<Vec<(TcpStream, Pending)>>> = Arc::default();
        let sink = held.clone();
        tokio::spawn(listeners.serve(move |stream, _, pending| {
            sink.lock().unwrap().push((stream, pending));
        }));
        let mut clients = Vec::new();
        for _ in 0..MAX_PENDING + 8 {
            clients.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        let count = || held.lock().unwrap().len();
        eventually("MAX_PENDING accepted", || count() == MAX_PENDING).await;
        // No more while every place is held (one more stream waits for a place, the rest in
        // the backlog).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(count(), MAX_PENDING);
        // Releasing places lets the next ones in, one each.
        for _ in 0..3 {
            let (_stream, pending) = held.lock().unwrap().remove(0);
            pending.release();
        }
        eventually("three more accepted", || count() == MAX_PENDING).await;
        let (_, pending) = held.lock().unwrap().pop().unwrap();
        drop(pending);
        eventually("one more accepted", || count() == MAX_PENDING).await;
        drop(clients);
    }
}
