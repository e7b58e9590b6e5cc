//! Forwarding an allowed DNS question to the workload's resolvers: UDP first (TCP when the
//! answer is truncated), TCP for questions that came over TCP, each resolver in order
//! until one answers, every socket carrying the agent's mark so the hooks let it out.
#![forbid(unsafe_code)]

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_proto::op::Message;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UdpSocket,
};

use crate::{audit::Recorded, state::AGENT_MARK};

/// The port resolvers listen on.
pub const DNS_PORT: u16 = 53;

/// Errors of forwarding.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// There is no resolver to ask.
    #[error("no resolver configured")]
    NoResolvers,
    /// The question could not be encoded.
    #[error("encoding the question: {0}")]
    Encode(String),
    /// Every resolver failed; the last error.
    #[error("{server}: {source}")]
    Failed {
        /// The last resolver tried.
        server: SocketAddr,
        /// What went wrong.
        source: io::Error,
    },
}

/// The `nameserver` addresses of a resolv.conf text (zone-indexed addresses are skipped).
pub fn parse_resolv_conf(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|addr| addr.parse().ok())
        })
        .collect()
}

/// Asks `servers` in order; the first well-formed answer to exactly this question wins.
///
/// **Record before forward:** it takes the [`Recorded`] proof that the decision to ask is
/// in every audit sink ([`AuditGuard::record_decision`](crate::audit::AuditGuard::record_decision)),
/// so no question leaves the agent unrecorded.
pub async fn exchange(
    _recorded: &Recorded,
    query: &Message,
    servers: &[SocketAddr],
    tcp: bool,
    timeout: Duration,
) -> Result<Message, UpstreamError> {
    let wire = query
        .to_vec()
        .map_err(|e| UpstreamError::Encode(e.to_string()))?;
    let mut last = None;
    for server in servers {
        let result = if tcp {
            over_tcp(&wire, query, *server, timeout).await
        } else {
            match over_udp(&wire, query, *server, timeout).await {
                Ok(response) if response.metadata.truncation => {
                    over_tcp(&wire, query, *server, timeout).await
                }
                other => other,
            }
        };
        match result {
            Ok(response) => return Ok(response),
            Err(source) => last = Some((*server, source)),
        }
    }
    match last {
        Some((server, source)) => Err(UpstreamError::Failed { server, source }),
        None => Err(UpstreamError::NoResolvers),
    }
}

/// Whether `response` answers `query` (same id, same question).
fn answers(query: &Message, response: &Message) -> bool {
    response.metadata.id == query.metadata.id && response.queries == query.queries
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

async fn over_udp(
    wire: &[u8],
    query: &Message,
    server: SocketAddr,
    timeout: Duration,
) -> io::Result<Message> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(server),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_mark(AGENT_MARK)?;
    socket.set_nonblocking(true)?;
    let unspecified: SocketAddr = if server.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&unspecified.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(server).await?;
    socket.send(wire).await?;
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
        // Anything that is not the answer to this question (spoofed, stale) is ignored.
        if let Ok(response) = Message::from_vec(&buf[..n])
            && answers(query, &response)
        {
            return Ok(response);
        }
    }
}

async fn over_tcp(
    wire: &[u8],
    query: &Message,
    server: SocketAddr,
    timeout: Duration,
) -> io::Result<Message> {
    let exchange = async {
        let mut stream = crate::state::connect_marked(server, AGENT_MARK).await?;
        let len = u16::try_from(wire.len()).map_err(|_| invalid("question too long"))?;
        let mut framed = Vec::with_capacity(wire.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(wire);
        stream.write_all(&framed).await?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await?;
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(head))];
        stream.read_exact(&mut body).await?;
        let response = Message::from_vec(&body).map_err(|_| invalid("malformed answer"))?;
        if answers(query, &response) {
            Ok(response)
        } else {
            Err(invalid("an answer to another question"))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer over TCP"))?
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nnameserver 192.0.2.53\nsearch example.com\nnameserver 2001:db8::53\nnameserver fe80::1%eth0\nnameserver\nnameserver nope\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "192.0.2.53".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
        assert!(parse_resolv_conf("").is_empty());
        assert!(parse_resolv_conf("\0\u{7f}nameserver\n").is_empty());
    }
}
