//! Detect: what protocol the client speaks, from the first bytes, without consuming them.
//!
//! This stage peeks at the connection. HTTP/1.x is served; a TLS ClientHello and anything
//! else are refused (closed, with an audit record) until their handling exists. A client
//! that sends nothing within the timeout is refused too: a parser that cannot decide denies.
#![forbid(unsafe_code)]

use std::time::Duration;

use tokio::net::TcpStream;

/// What the first bytes look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// A TLS handshake record.
    Tls,
    /// HTTP/2 with prior knowledge ("PRI * HTTP/2.0").
    Http2PriorKnowledge,
    /// Anything else.
    Unknown,
}

impl Protocol {
    /// A stable reason code for refusing this protocol.
    pub fn refusal(self) -> &'static str {
        match self {
            Self::Http1 => "",
            Self::Tls => "tls_not_supported",
            Self::Http2PriorKnowledge => "http2_not_supported",
            Self::Unknown => "not_http",
        }
    }
}

/// Errors of this stage.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The client sent too little within the timeout.
    #[error("client sent {got} byte(s) within {timeout:?}; cannot tell the protocol")]
    Timeout {
        /// Bytes seen.
        got: usize,
        /// The timeout.
        timeout: Duration,
    },
    /// The connection closed or failed before anything could be read.
    #[error("reading the first bytes failed: {source}")]
    Io {
        /// The error.
        #[from]
        source: std::io::Error,
    },
}

/// How many bytes classification needs at most.
const NEED: usize = 16;

/// Peeks at the first bytes of `stream` and classifies them.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Result<Protocol, DetectError> {
    let mut buf = [0u8; NEED];
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify(&buf[..got]) {
            Some(protocol) => return Ok(protocol),
            None if got == NEED => return Ok(Protocol::Unknown),
            None => {}
        }
        let peeked = tokio::time::timeout_at(deadline, async {
            loop {
                stream.readable().await?;
                match stream.peek(&mut buf).await {
                    // The client closed: nothing more will come.
                    Ok(0) => return Ok(0),
                    // Peek returns immediately with what is buffered; wait for more.
                    Ok(n) if n == got && n < NEED => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    other => return other,
                }
            }
        })
        .await;
        match peeked {
            Ok(Ok(0)) => {
                return Err(DetectError::Io {
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            Ok(Ok(n)) => got = n,
            Ok(Err(source)) => return Err(DetectError::Io { source }),
            Err(_) => return Err(DetectError::Timeout { got, timeout }),
        }
    }
}

/// Classifies a prefix; `None` when more bytes are needed.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    let first = *prefix.first()?;
    if first == 0x16 {
        return Some(Protocol::Tls);
    }
    const PRI: &[u8] = b"PRI * HTTP/2.0";
    if PRI.starts_with(prefix) && prefix.len() < PRI.len() {
        return None;
    }
    if prefix.starts_with(PRI) {
        return Some(Protocol::Http2PriorKnowledge);
    }
    // An HTTP/1 request line starts with a method token (RFC 9110 tchar) and a space.
    for (i, &b) in prefix.iter().enumerate() {
        if b == b' ' {
            return Some(if i > 0 {
                Protocol::Http1
            } else {
                Protocol::Unknown
            });
        }
        if !is_tchar(b) {
            return Some(Protocol::Unknown);
        }
    }
    None
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"GE", None),
            (b"GET / HTTP/1.1\r\n", Some(Protocol::Http1)),
            (b"DELETE /x", Some(Protocol::Http1)),
            (b"\x16\x03\x01\x02\x00", Some(Protocol::Tls)),
            (b"PRI * HTTP/2.0\r\n", Some(Protocol::Http2PriorKnowledge)),
            (b"PRI", None),
            (b"SSH-2.0-OpenSSH\r\n", Some(Protocol::Unknown)),
            (b"SSH-2.0-OpenSSH_9", None),
            (b" GET", Some(Protocol::Unknown)),
            (b"\x00\x01", Some(Protocol::Unknown)),
            (b"\r\nGET", Some(Protocol::Unknown)),
        ];
        for (input, want) in cases {
            assert_eq!(
                classify(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
