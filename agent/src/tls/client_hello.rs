//! ClientHello parsing on peeked bytes.
//!
//! The input is attacker-controlled: every length is checked against the data before it is
//! used, nothing is indexed unchecked, and the total is capped at [`MAX_HELLO_BYTES`]. The
//! parser is incremental in the simplest way: it is re-run on the whole peeked prefix and
//! answers [`Parse::NeedMore`] (with the smallest buffer length that can make progress),
//! [`Parse::Hello`] or [`Parse::Invalid`]. A ClientHello may be split across TCP segments
//! and fragmented across several handshake records (RFC 8446 §5.1); the fragments are
//! reassembled. Anything the parser cannot decide is invalid, and the caller denies.
//!
//! What is extracted is what policy needs: the SNI host name (lowercased, validated as an
//! LDH DNS name; IP literals are refused because SNI must not carry them, RFC 6066 §3), the
//! ALPN list, the legacy version, and how many bytes of records carried the hello.
#![forbid(unsafe_code)]

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use tokio::net::TcpStream;

/// The most bytes of records a ClientHello may occupy (headers included).
pub const MAX_HELLO_BYTES: usize = 64 * 1024;
/// The longest DNS name accepted as SNI (without a trailing dot).
pub const MAX_DNS_NAME: usize = 253;

const RECORD_HEADER: usize = 5;
/// RFC 8446 §5.1: a plaintext record fragment is at most 2^14 bytes.
const MAX_FRAGMENT: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_HEADER: usize = 4;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// How much of an offending name an error message shows.
const SHOWN_NAME: usize = 80;
/// The first peek buffer; grown on demand up to [`MAX_HELLO_BYTES`].
const INITIAL_PEEK: usize = 2048;

/// The outcome of parsing a prefix of the client's bytes.
#[derive(Debug)]
pub enum Parse {
    /// The prefix is consistent so far; parsing can progress once the buffer holds at
    /// least this many bytes (never more than [`MAX_HELLO_BYTES`]).
    NeedMore {
        /// The buffer length needed to make progress.
        at_least: usize,
    },
    /// A complete, well-formed ClientHello.
    Hello(ClientHello),
    /// Not a well-formed ClientHello: deny.
    Invalid(HelloError),
}

/// What policy needs from a ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` of the server_name extension: lowercased, a valid DNS name (LDH
    /// labels, no trailing dot, at most 253 bytes), never an IP literal. `None` when the
    /// client sent no SNI (the caller denies).
    pub sni: Option<String>,
    /// The ALPN protocol names the client offers, in its order (empty: no ALPN).
    pub alpn: Vec<String>,
    /// `ClientHello.legacy_version` (0x0303 for TLS 1.2 and 1.3).
    pub legacy_version: u16,
    /// Total bytes of the TLS records (headers included) that carried the hello.
    pub record_bytes: usize,
}

/// Why bytes are not an acceptable ClientHello, or why reading one failed.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// A record before the complete hello is not a handshake record.
    #[error("TLS record of content type {content_type} where a handshake record was expected")]
    NotHandshake {
        /// The record's content type.
        content_type: u8,
    },
    /// A record's legacy version is not 3.x.
    #[error("TLS record version {version:#06x} is not 3.x")]
    RecordVersion {
        /// The version field.
        version: u16,
    },
    /// A record's length is zero or above 2^14.
    #[error("TLS handshake record length {length} is outside 1..=16384")]
    RecordLength {
        /// The length field.
        length: usize,
    },
    /// The first handshake message is not a ClientHello.
    #[error("handshake message type {msg_type} is not ClientHello (1)")]
    NotClientHello {
        /// The message type.
        msg_type: u8,
    },
    /// The hello would exceed the size cap.
    #[error("ClientHello needs {bytes} bytes of records; at most {max} are accepted")]
    TooLarge {
        /// Bytes the records or message declare.
        bytes: usize,
        /// The cap.
        max: usize,
    },
    /// A length field points past the end of its enclosing data.
    #[error("ClientHello field {field} is truncated")]
    Truncated {
        /// The field.
        field: &'static str,
    },
    /// Bytes follow where a structure should end.
    #[error("{extra} unexpected byte(s) after {field}")]
    TrailingBytes {
        /// The structure that should have ended.
        field: &'static str,
        /// How many bytes follow it.
        extra: usize,
    },
    /// A length that the protocol forbids (empty list, odd cipher-suite list, …).
    #[error("ClientHello field {field} has invalid length {length}")]
    BadLength {
        /// The field.
        field: &'static str,
        /// Its length.
        length: usize,
    },
    /// `ClientHello.legacy_version` is not 3.x.
    #[error("ClientHello legacy_version {version:#06x} is not 3.x")]
    HelloVersion {
        /// The version field.
        version: u16,
    },
    /// An extension type occurs twice (this includes a second server_name extension).
    #[error("extension type {ext_type} occurs more than once")]
    DuplicateExtension {
        /// The extension type.
        ext_type: u16,
    },
    /// The server_name list has an entry that is not a host_name.
    #[error("server_name entry of name_type {name_type}; only host_name (0) is accepted")]
    SniNameType {
        /// The entry's name_type.
        name_type: u8,
    },
    /// The server_name list names more than one host.
    #[error("server_name lists {count} host names; exactly one is accepted")]
    MultipleHostNames {
        /// How many host_name entries were seen when the list was refused.
        count: usize,
    },
    /// A field that must be UTF-8 is not.
    #[error("ClientHello field {field} is not valid UTF-8")]
    NonUtf8 {
        /// The field.
        field: &'static str,
    },
    /// The SNI is an IP address literal (or ends in a numeric label that parsers treat as one).
    #[error("SNI {name:?} is an IP address literal")]
    SniIpLiteral {
        /// The name (truncated).
        name: String,
    },
    /// The SNI is not a valid DNS name.
    #[error("SNI {name:?} is not a valid DNS name: {reason}")]
    SniInvalid {
        /// The name (truncated).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The client did not complete its ClientHello in time.
    #[error("client sent {got} byte(s) of its ClientHello within {timeout:?}")]
    Timeout {
        /// Bytes seen.
        got: usize,
        /// The timeout.
        timeout: Duration,
    },
    /// The client closed the connection before completing its ClientHello.
    #[error("client closed the connection after {got} byte(s) of its ClientHello")]
    Closed {
        /// Bytes seen.
        got: usize,
    },
    /// Reading from the socket failed.
    #[error("peeking at the ClientHello failed: {source}")]
    Io {
        /// The error.
        #[from]
        source: std::io::Error,
    },
}

/// Parses the ClientHello at the start of `buf`, reassembling it from as many consecutive
/// handshake records as it spans. Bytes after the records that carried it are ignored.
pub fn parse(buf: &[u8]) -> Parse {
    match reassemble(buf) {
        Ok(Reassembled::NeedMore(at_least)) => Parse::NeedMore { at_least },
        Ok(Reassembled::Message { body, record_bytes }) => match parse_body(&body) {
            Ok(mut hello) => {
                hello.record_bytes = record_bytes;
                Parse::Hello(hello)
            }
            Err(e) => Parse::Invalid(e),
        },
        Err(e) => Parse::Invalid(e),
    }
}

/// Peeks (without consuming) at `stream` until [`parse`] decides, or `timeout` elapses.
///
/// The bytes stay in the socket, so a TLS terminator or a splice can read them afterwards.
/// Memory is bounded by [`MAX_HELLO_BYTES`]; the buffer grows only as far as the records
/// seen so far require.
pub async fn read_client_hello(
    stream: &TcpStream,
    timeout: Duration,
) -> Result<ClientHello, HelloError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; INITIAL_PEEK];
    let mut got = 0;
    loop {
        let at_least = match parse(&buf[..got]) {
            Parse::Hello(hello) => return Ok(hello),
            Parse::Invalid(e) => return Err(e),
            Parse::NeedMore { at_least } => at_least,
        };
        if at_least > buf.len() {
            let grown = at_least
                .max(buf.len().saturating_mul(2))
                .min(MAX_HELLO_BYTES);
            buf.resize(grown.max(at_least), 0);
        }
        let peeked = tokio::time::timeout_at(deadline, async {
            // Peek returns at once with whatever is buffered, so "no new bytes yet" (or a
            // half-close after a partial hello) is only visible as an unchanged count: back
            // off briefly and look again, until the deadline.
            let mut backoff = Duration::from_millis(1);
            loop {
                stream.readable().await?;
                match stream.peek(&mut buf).await {
                    Ok(n) if n == got && n > 0 => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(16));
                    }
                    other => return other,
                }
            }
        })
        .await;
        match peeked {
            Ok(Ok(0)) => return Err(HelloError::Closed { got }),
            Ok(Ok(n)) => got = n,
            Ok(Err(source)) => return Err(HelloError::Io { source }),
            Err(_) => return Err(HelloError::Timeout { got, timeout }),
        }
    }
}

/// Validates and normalises a DNS name as SNI is required to be: ASCII lowercased, LDH
/// labels of 1..=63 bytes not starting or ending with '-', no trailing dot, at most 253
/// bytes, not an IP literal (nor ending in a numeric label, which URL and inet_aton
/// parsers read as IPv4).
pub fn normalize_dns_name(name: &str) -> Result<String, HelloError> {
    let invalid = |reason| HelloError::SniInvalid {
        name: shown(name),
        reason,
    };
    if name.parse::<IpAddr>().is_ok()
        || name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .is_some_and(|n| n.parse::<Ipv6Addr>().is_ok())
    {
        return Err(HelloError::SniIpLiteral { name: shown(name) });
    }
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.ends_with('.') {
        return Err(invalid("trailing dot"));
    }
    if name.len() > MAX_DNS_NAME {
        return Err(invalid("longer than 253 bytes"));
    }
    let lower = name.to_ascii_lowercase();
    let mut last = "";
    for label in lower.split('.') {
        if label.is_empty() {
            return Err(invalid("empty label"));
        }
        if label.len() > 63 {
            return Err(invalid("label longer than 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid("character other than a letter, digit, '-' or '.'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("label starts or ends with '-'"));
        }
        last = label;
    }
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return Err(HelloError::SniIpLiteral { name: shown(name) });
    }
    Ok(lower)
}

/// A name for an error message: at most [`SHOWN_NAME`] characters (it is printed with
/// `{:?}`, which escapes control characters).
fn shown(name: &str) -> String {
    name.chars().take(SHOWN_NAME).collect()
}

enum Reassembled<'a> {
    NeedMore(usize),
    Message {
        /// The ClientHello body (after the 4-byte handshake header).
        body: Cow<'a, [u8]>,
        record_bytes: usize,
    },
}

/// Walks consecutive handshake records from the start of `buf` and returns the first
/// handshake message once complete.
fn reassemble(buf: &[u8]) -> Result<Reassembled<'_>, HelloError> {
    let mut fragments: Vec<&[u8]> = Vec::new();
    let mut have = 0usize; // handshake bytes in complete records
    let mut pos = 0usize;
    loop {
        let Some(header) = buf.get(pos..pos + RECORD_HEADER) else {
            return need(pos + RECORD_HEADER);
        };
        let &[content_type, major, minor, len_hi, len_lo] = header else {
            return need(pos + RECORD_HEADER);
        };
        if content_type != CONTENT_HANDSHAKE {
            return Err(HelloError::NotHandshake { content_type });
        }
        if major != 3 {
            return Err(HelloError::RecordVersion {
                version: u16::from_be_bytes([major, minor]),
            });
        }
        let length = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if length == 0 || length > MAX_FRAGMENT {
            return Err(HelloError::RecordLength { length });
        }
        let start = pos + RECORD_HEADER;
        let end = start + length;
        if end > MAX_HELLO_BYTES {
            return Err(HelloError::TooLarge {
                bytes: end,
                max: MAX_HELLO_BYTES,
            });
        }
        let available = buf.get(start..end.min(buf.len())).unwrap_or_default();
        // Check the handshake header as soon as its bytes are there, even mid-record.
        let mut head = [0u8; HANDSHAKE_HEADER];
        let head_len = copy_prefix(&fragments, available, &mut head);
        if head_len >= 1 && head[0] != CLIENT_HELLO {
            return Err(HelloError::NotClientHello { msg_type: head[0] });
        }
        let total = (head_len == HANDSHAKE_HEADER).then(|| {
            HANDSHAKE_HEADER
                + (usize::from(head[1]) << 16 | usize::from(head[2]) << 8)
                + usize::from(head[3])
        });
        if let Some(total) = total
            && total > MAX_HELLO_BYTES
        {
            return Err(HelloError::TooLarge {
                bytes: total,
                max: MAX_HELLO_BYTES,
            });
        }
        if available.len() < length {
            return need(end);
        }
        fragments.push(available);
        have += length;
        pos = end;
        match total {
            Some(total) if have == total => {
                let body: Cow<'_, [u8]> = match fragments.as_slice() {
                    [only] => {
                        let only: &[u8] = only;
                        Cow::Borrowed(only.get(HANDSHAKE_HEADER..).unwrap_or_default())
                    }
                    many => {
                        let mut joined = many.concat();
                        joined.drain(..HANDSHAKE_HEADER.min(joined.len()));
                        Cow::Owned(joined)
                    }
                };
                return Ok(Reassembled::Message {
                    body,
                    record_bytes: pos,
                });
            }
            Some(total) if have > total => {
                return Err(HelloError::TrailingBytes {
                    field: "ClientHello (more handshake data in its last record)",
                    extra: have - total,
                });
            }
            _ => {}
        }
    }
}

fn need(at_least: usize) -> Result<Reassembled<'static>, HelloError> {
    if at_least > MAX_HELLO_BYTES {
        return Err(HelloError::TooLarge {
            bytes: at_least,
            max: MAX_HELLO_BYTES,
        });
    }
    Ok(Reassembled::NeedMore(at_least))
}

/// Copies the first bytes of `fragments` followed by `tail` into `out`; returns how many.
fn copy_prefix(fragments: &[&[u8]], tail: &[u8], out: &mut [u8]) -> usize {
    let mut n = 0;
    for &b in fragments.iter().copied().flatten().chain(tail) {
        let Some(slot) = out.get_mut(n) else { break };
        *slot = b;
        n += 1;
    }
    n
}

/// A bounds-checked cursor.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], HelloError> {
        let (head, rest) = self
            .buf
            .split_at_checked(n)
            .ok_or(HelloError::Truncated { field })?;
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, HelloError> {
        let [b] = self.take(1, field)? else {
            return Err(HelloError::Truncated { field });
        };
        Ok(*b)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, HelloError> {
        let [hi, lo] = self.take(2, field)? else {
            return Err(HelloError::Truncated { field });
        };
        Ok(u16::from_be_bytes([*hi, *lo]))
    }

    fn vec8(&mut self, field: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(field)?;
        self.take(usize::from(n), field)
    }

    fn vec16(&mut self, field: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(field)?;
        self.take(usize::from(n), field)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn finish(&self, field: &'static str) -> Result<(), HelloError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(HelloError::TrailingBytes {
                field,
                extra: self.buf.len(),
            })
        }
    }
}

/// Parses a ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader { buf: body };
    let legacy_version = r.u16("legacy_version")?;
    if legacy_version >> 8 != 3 {
        return Err(HelloError::HelloVersion {
            version: legacy_version,
        });
    }
    r.take(32, "random")?;
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(HelloError::BadLength {
            field: "legacy_session_id",
            length: session_id.len(),
        });
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::BadLength {
            field: "cipher_suites",
            length: suites.len(),
        });
    }
    let compression = r.vec8("legacy_compression_methods")?;
    if compression.is_empty() {
        return Err(HelloError::BadLength {
            field: "legacy_compression_methods",
            length: 0,
        });
    }
    let mut hello = ClientHello {
        sni: None,
        alpn: Vec::new(),
        legacy_version,
        record_bytes: 0,
    };
    if r.is_empty() {
        // TLS 1.2 and earlier may omit the extensions block entirely.
        return Ok(hello);
    }
    let extensions = r.vec16("extensions")?;
    r.finish("extensions")?;
    let mut ext = Reader { buf: extensions };
    let mut seen: Vec<u16> = Vec::new();
    let mut sni_seen = false;
    let mut alpn_seen = false;
    while !ext.is_empty() {
        let ext_type = ext.u16("extension type")?;
        let data = ext.vec16("extension data")?;
        seen.push(ext_type);
        match ext_type {
            EXT_SERVER_NAME => {
                if sni_seen {
                    return Err(HelloError::DuplicateExtension { ext_type });
                }
                sni_seen = true;
                hello.sni = Some(parse_server_name(data)?);
            }
            EXT_ALPN => {
                if alpn_seen {
                    return Err(HelloError::DuplicateExtension { ext_type });
                }
                alpn_seen = true;
                hello.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    seen.sort_unstable();
    if let Some(pair) = seen.windows(2).find(|w| w[0] == w[1]) {
        return Err(HelloError::DuplicateExtension { ext_type: pair[0] });
    }
    Ok(hello)
}

/// RFC 6066 §3: exactly one host_name entry; no other name types.
fn parse_server_name(data: &[u8]) -> Result<String, HelloError> {
    let mut r = Reader { buf: data };
    let list = r.vec16("server_name_list")?;
    r.finish("server_name extension")?;
    if list.is_empty() {
        return Err(HelloError::BadLength {
            field: "server_name_list",
            length: 0,
        });
    }
    let mut entries = Reader { buf: list };
    let mut host: Option<&[u8]> = None;
    let mut count = 0;
    while !entries.is_empty() {
        let name_type = entries.u8("server_name.name_type")?;
        if name_type != NAME_TYPE_HOST_NAME {
            return Err(HelloError::SniNameType { name_type });
        }
        let name = entries.vec16("server_name.host_name")?;
        count += 1;
        if host.is_some() {
            return Err(HelloError::MultipleHostNames { count });
        }
        host = Some(name);
    }
    let host = host.unwrap_or_default();
    let host = std::str::from_utf8(host).map_err(|_| HelloError::NonUtf8 {
        field: "server_name.host_name",
    })?;
    normalize_dns_name(host)
}

/// RFC 7301 §3.1: a non-empty list of non-empty protocol names.
fn parse_alpn(data: &[u8]) -> Result<Vec<String>, HelloError> {
    let mut r = Reader { buf: data };
    let list = r.vec16("protocol_name_list")?;
    r.finish("application_layer_protocol_negotiation extension")?;
    if list.is_empty() {
        return Err(HelloError::BadLength {
            field: "protocol_name_list",
            length: 0,
        });
    }
    let mut names = Reader { buf: list };
    let mut out = Vec::new();
    while !names.is_empty() {
        let name = names.vec8("protocol_name")?;
        if name.is_empty() {
            return Err(HelloError::BadLength {
                field: "protocol_name",
                length: 0,
            });
        }
        let name = std::str::from_utf8(name).map_err(|_| HelloError::NonUtf8 {
            field: "protocol_name",
        })?;
        out.push(name.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::cast_possible_truncation,
    reason = "tests"
)]
mod tests {
    use std::{path::PathBuf, sync::Arc};

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The first flight of a real rustls client.
    fn rustls_hello(sni: Option<&str>, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        config.enable_sni = sni.is_some();
        let name = ServerName::try_from(sni.unwrap_or("no-sni.example").to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// The handshake bytes carried by the leading handshake records of `records`.
    fn handshake_bytes(records: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = records;
        while rest.len() >= RECORD_HEADER && rest[0] == CONTENT_HANDSHAKE {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            out.extend_from_slice(&rest[RECORD_HEADER..RECORD_HEADER + len]);
            rest = &rest[RECORD_HEADER + len..];
        }
        out
    }

    fn record(content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, 3, 1];
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// `handshake` re-framed into records of at most `size` bytes.
    fn reframe(handshake: &[u8], size: usize) -> Vec<u8> {
        handshake
            .chunks(size)
            .flat_map(|chunk| record(CONTENT_HANDSHAKE, chunk))
            .collect()
    }

    fn handshake_message(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let len = body.len() as u32;
        let mut out = vec![msg_type, (len >> 16) as u8, (len >> 8) as u8, len as u8];
        out.extend_from_slice(body);
        out
    }

    /// A minimal ClientHello body with these extensions.
    fn hello_body(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut ext = Vec::new();
        for (ext_type, data) in extensions {
            ext.extend_from_slice(&ext_type.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        body
    }

    /// A ClientHello in one record.
    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        record(
            CONTENT_HANDSHAKE,
            &handshake_message(CLIENT_HELLO, &hello_body(extensions)),
        )
    }

    fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&list);
        out
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        (EXT_SERVER_NAME, sni_ext(&[(0, name)]))
    }

    fn alpn_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for name in names {
            list.push(name.len() as u8);
            list.extend_from_slice(name);
        }
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&list);
        (EXT_ALPN, out)
    }

    fn hello(buf: &[u8]) -> ClientHello {
        match parse(buf) {
            Parse::Hello(h) => h,
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    fn invalid(buf: &[u8]) -> HelloError {
        match parse(buf) {
            Parse::Invalid(e) => e,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    /// Every strict prefix asks for more, with a sane `at_least`.
    fn assert_prefixes_need_more(buf: &[u8]) {
        for i in 0..buf.len() {
            match parse(&buf[..i]) {
                Parse::NeedMore { at_least } => {
                    assert!(
                        at_least > i && at_least <= buf.len(),
                        "prefix {i}: {at_least}"
                    );
                }
                other => panic!("prefix {i} of {}: {other:?}", buf.len()),
            }
        }
    }

    #[test]
    fn real_rustls_hellos() {
        type Case<'a> = (
            Option<&'a str>,
            &'a [&'a [u8]],
            Option<&'a str>,
            &'a [&'a str],
        );
        let cases: &[Case<'_>] = &[
            (
                Some("api.example.com"),
                &[b"h2", b"http/1.1"],
                Some("api.example.com"),
                &["h2", "http/1.1"],
            ),
            (
                Some("API.Example.COM"),
                &[b"http/1.1"],
                Some("api.example.com"),
                &["http/1.1"],
            ),
            (Some("api.example.com"), &[], Some("api.example.com"), &[]),
            (None, &[b"h2"], None, &["h2"]),
            (None, &[], None, &[]),
        ];
        for (name, offer, want_sni, want_alpn) in cases {
            let bytes = rustls_hello(*name, offer);
            let h = hello(&bytes);
            assert_eq!(h.sni.as_deref(), *want_sni, "{name:?}");
            assert_eq!(h.alpn, *want_alpn, "{name:?}");
            assert_eq!(h.legacy_version, 0x0303);
            assert_eq!(h.record_bytes, bytes.len());
            assert_prefixes_need_more(&bytes);
        }
    }

    #[test]
    fn refragmented_across_many_records() {
        for (name, offer) in [
            (Some("api.example.com"), &[&b"h2"[..], b"http/1.1"][..]),
            (None, &[][..]),
        ] {
            let original = rustls_hello(name, offer);
            let want = hello(&original);
            let handshake = handshake_bytes(&original);
            for size in [1, 2, 3, 4, 5, 7, 33, 100, 255, handshake.len() - 1] {
                let records = reframe(&handshake, size);
                let got = hello(&records);
                assert_eq!(got.sni, want.sni, "size {size}");
                assert_eq!(got.alpn, want.alpn, "size {size}");
                assert_eq!(got.record_bytes, records.len(), "size {size}");
                if size <= 7 {
                    assert_prefixes_need_more(&records);
                }
            }
        }
    }

    #[test]
    fn bytes_after_the_hello_records_are_ignored() {
        let mut bytes = rustls_hello(Some("api.example.com"), &[b"h2"]);
        let len = bytes.len();
        bytes.extend_from_slice(&record(20, &[1])); // change_cipher_spec
        bytes.extend_from_slice(&record(23, b"early data"));
        let h = hello(&bytes);
        assert_eq!(h.record_bytes, len);
    }

    #[test]
    fn hand_built_hellos() {
        let h = hello(&hello_with(&[sni(b"Api.Test.Example"), alpn_ext(&[b"h2"])]));
        assert_eq!(h.sni.as_deref(), Some("api.test.example"));
        assert_eq!(h.alpn, ["h2"]);
        // No extensions block at all (TLS 1.2 and earlier).
        let mut body = hello_body(&[]);
        body.truncate(body.len() - 2);
        let h = hello(&record(
            CONTENT_HANDSHAKE,
            &handshake_message(CLIENT_HELLO, &body),
        ));
        assert_eq!((h.sni, h.alpn.len()), (None, 0));
        // Unknown and GREASE extensions are fine when distinct.
        let h = hello(&hello_with(&[
            (0x0a0a, vec![]),
            sni(b"a.example"),
            (0x1a1a, vec![0]),
        ]));
        assert_eq!(h.sni.as_deref(), Some("a.example"));
    }

    #[test]
    fn malformed_hellos_are_invalid() {
        use HelloError as E;
        let long_label = [b'a'; 64];
        let long_name: Vec<u8> = std::iter::repeat_n(&b"abcdefghi."[..], 26)
            .flatten()
            .copied()
            .chain(*b"com")
            .collect();
        let good = hello_with(&[sni(b"a.example")]);
        let mut trailing_handshake = handshake_message(CLIENT_HELLO, &hello_body(&[]));
        trailing_handshake.extend_from_slice(&handshake_message(CLIENT_HELLO, &[]));
        let mut body_trailing = hello_body(&[sni(b"a.example")]);
        body_trailing.push(0);
        let mut odd_suites = hello_body(&[]);
        odd_suites[35..37].copy_from_slice(&[0, 3]);
        let mut interleaved = reframe(&handshake_bytes(&good)[..10], 10);
        interleaved.extend_from_slice(&record(21, &[2, 40]));
        type Check = fn(&HelloError) -> bool;
        let cases: Vec<(&str, Vec<u8>, Check)> = vec![
            ("application data", record(23, b"x"), |e| {
                matches!(e, E::NotHandshake { content_type: 23 })
            }),
            ("alert", vec![21, 3, 3, 0, 2, 2, 40], |e| {
                matches!(e, E::NotHandshake { content_type: 21 })
            }),
            ("record version 2.0", vec![22, 2, 0, 0, 1, 1], |e| {
                matches!(e, E::RecordVersion { version: 0x0200 })
            }),
            ("empty record", vec![22, 3, 1, 0, 0], |e| {
                matches!(e, E::RecordLength { length: 0 })
            }),
            ("record over 2^14", vec![22, 3, 1, 0x40, 1], |e| {
                matches!(e, E::RecordLength { length: 16385 })
            }),
            ("server hello (early)", vec![22, 3, 3, 0, 60, 2], |e| {
                matches!(e, E::NotClientHello { msg_type: 2 })
            }),
            (
                "16 MiB hello (early)",
                vec![22, 3, 1, 0, 60, 1, 0xff, 0, 0],
                |e| matches!(e, E::TooLarge { .. }),
            ),
            ("interleaved alert", interleaved, |e| {
                matches!(e, E::NotHandshake { content_type: 21 })
            }),
            (
                "second message in the record",
                record(CONTENT_HANDSHAKE, &trailing_handshake),
                |e| matches!(e, E::TrailingBytes { extra: 4, .. }),
            ),
            (
                "bytes after extensions",
                record(
                    CONTENT_HANDSHAKE,
                    &handshake_message(CLIENT_HELLO, &body_trailing),
                ),
                |e| matches!(e, E::TrailingBytes { .. }),
            ),
            (
                "odd cipher suites",
                record(
                    CONTENT_HANDSHAKE,
                    &handshake_message(CLIENT_HELLO, &odd_suites),
                ),
                |e| matches!(e, E::Truncated { .. } | E::BadLength { .. }),
            ),
            (
                "truncated body",
                record(
                    CONTENT_HANDSHAKE,
                    &handshake_message(CLIENT_HELLO, &[3, 3, 0]),
                ),
                |e| matches!(e, E::Truncated { field: "random" }),
            ),
            (
                "legacy_version 2.0",
                {
                    let mut b = hello_body(&[]);
                    b[0] = 2;
                    record(CONTENT_HANDSHAKE, &handshake_message(CLIENT_HELLO, &b))
                },
                |e| matches!(e, E::HelloVersion { version: 0x0203 }),
            ),
            (
                "extension overruns",
                hello_with(&[(EXT_SERVER_NAME, vec![0, 9, 0, 0, 3])]),
                |e| matches!(e, E::Truncated { .. }),
            ),
            (
                "SNI twice",
                hello_with(&[sni(b"a.example"), sni(b"a.example")]),
                |e| matches!(e, E::DuplicateExtension { ext_type: 0 }),
            ),
            (
                "other extension twice",
                hello_with(&[(10, vec![0, 2, 0, 29]), sni(b"a.example"), (10, vec![])]),
                |e| matches!(e, E::DuplicateExtension { ext_type: 10 }),
            ),
            (
                "ALPN twice",
                hello_with(&[alpn_ext(&[b"h2"]), alpn_ext(&[b"h2"])]),
                |e| matches!(e, E::DuplicateExtension { ext_type: 16 }),
            ),
            (
                "two host names",
                hello_with(&[(
                    EXT_SERVER_NAME,
                    sni_ext(&[(0, b"a.example"), (0, b"b.example")]),
                )]),
                |e| matches!(e, E::MultipleHostNames { count: 2 }),
            ),
            (
                "non-host_name type",
                hello_with(&[(EXT_SERVER_NAME, sni_ext(&[(0, b"a.example"), (1, b"x")]))]),
                |e| matches!(e, E::SniNameType { name_type: 1 }),
            ),
            (
                "empty server_name list",
                hello_with(&[(EXT_SERVER_NAME, vec![0, 0])]),
                |e| matches!(e, E::BadLength { .. }),
            ),
            ("empty host name", hello_with(&[sni(b"")]), |e| {
                matches!(
                    e,
                    E::SniInvalid {
                        reason: "empty",
                        ..
                    }
                )
            }),
            ("IPv4 SNI", hello_with(&[sni(b"192.0.2.1")]), |e| {
                matches!(e, E::SniIpLiteral { .. })
            }),
            ("IPv6 SNI", hello_with(&[sni(b"::1")]), |e| {
                matches!(e, E::SniIpLiteral { .. })
            }),
            (
                "bracketed IPv6 SNI",
                hello_with(&[sni(b"[2001:db8::1]")]),
                |e| matches!(e, E::SniIpLiteral { .. }),
            ),
            ("short IPv4 form", hello_with(&[sni(b"127.1")]), |e| {
                matches!(e, E::SniIpLiteral { .. })
            }),
            ("hex IPv4 form", hello_with(&[sni(b"0x7f.0x1")]), |e| {
                matches!(e, E::SniIpLiteral { .. })
            }),
            ("non-UTF-8 SNI", hello_with(&[sni(b"a\xff.example")]), |e| {
                matches!(e, E::NonUtf8 { .. })
            }),
            (
                "U-label SNI",
                hello_with(&[sni("bücher.de".as_bytes())]),
                |e| matches!(e, E::SniInvalid { .. }),
            ),
            ("underscore", hello_with(&[sni(b"a_b.example")]), |e| {
                matches!(e, E::SniInvalid { .. })
            }),
            ("trailing dot", hello_with(&[sni(b"a.example.")]), |e| {
                matches!(
                    e,
                    E::SniInvalid {
                        reason: "trailing dot",
                        ..
                    }
                )
            }),
            ("empty label", hello_with(&[sni(b"a..example")]), |e| {
                matches!(
                    e,
                    E::SniInvalid {
                        reason: "empty label",
                        ..
                    }
                )
            }),
            ("leading hyphen", hello_with(&[sni(b"-a.example")]), |e| {
                matches!(e, E::SniInvalid { .. })
            }),
            ("NUL in SNI", hello_with(&[sni(b"a.example\0.evil")]), |e| {
                matches!(e, E::SniInvalid { .. })
            }),
            ("64-byte label", hello_with(&[sni(&long_label)]), |e| {
                matches!(e, E::SniInvalid { .. })
            }),
            ("263-byte name", hello_with(&[sni(&long_name)]), |e| {
                matches!(e, E::SniInvalid { .. })
            }),
            (
                "empty ALPN list",
                hello_with(&[(EXT_ALPN, vec![0, 0])]),
                |e| matches!(e, E::BadLength { .. }),
            ),
            (
                "empty ALPN name",
                hello_with(&[alpn_ext(&[b"h2", b""])]),
                |e| matches!(e, E::BadLength { .. }),
            ),
            ("non-UTF-8 ALPN", hello_with(&[alpn_ext(&[b"\xff"])]), |e| {
                matches!(e, E::NonUtf8 { .. })
            }),
        ];
        for (what, bytes, check) in cases {
            let e = invalid(&bytes);
            assert!(check(&e), "{what}: {e:?}");
            // Display never panics and stays short even for hostile names.
            assert!(e.to_string().len() < 300, "{what}: {e}");
        }
    }

    #[test]
    fn size_cap_is_enforced_without_unbounded_need_more() {
        // A hello declaring 60 KiB, in 1-byte records: the records exceed the cap first.
        let mut handshake = handshake_message(CLIENT_HELLO, &vec![0; 60 * 1024]);
        handshake.truncate(20_000);
        let records = reframe(&handshake, 1);
        let mut saw_too_large = false;
        for end in (0..records.len()).step_by(997) {
            match parse(&records[..end]) {
                Parse::NeedMore { at_least } => assert!(at_least <= MAX_HELLO_BYTES),
                Parse::Invalid(HelloError::TooLarge { .. }) => saw_too_large = true,
                other => panic!("{end}: {other:?}"),
            }
        }
        assert!(saw_too_large);
        // A single record just over the cap is refused from its header.
        let mut big = Vec::new();
        for _ in 0..4 {
            big.extend_from_slice(&[22, 3, 1, 0x40, 0]);
            big.extend_from_slice(&[1; 16384]);
        }
        big[5] = CLIENT_HELLO;
        big[6..9].copy_from_slice(&[0, 0xff, 0xf0]);
        assert!(matches!(
            invalid(&big),
            HelloError::TooLarge { bytes: 65556, .. }
        ));
    }

    #[test]
    fn dns_names() {
        let ok = [
            ("a", "a"),
            ("API.example.com", "api.example.com"),
            ("xn--bcher-kva.de", "xn--bcher-kva.de"),
            ("a-b.c0", "a-b.c0"),
            ("0.example", "0.example"),
            ("123.example.0a", "123.example.0a"),
        ];
        for (input, want) in ok {
            assert_eq!(normalize_dns_name(input).unwrap(), want);
        }
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a b",
            "a/b",
            "a:443",
            "1.2.3.4",
            "10",
            "x.0x1f",
            "example.123",
            "-a",
            "a-",
            "a.-b",
        ] {
            assert!(normalize_dns_name(bad).is_err(), "{bad:?}");
        }
        let exactly_253 = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(exactly_253.len(), 253);
        let exactly_253 = exactly_253.as_str();
        assert!(normalize_dns_name(exactly_253).is_ok());
        assert!(normalize_dns_name(&format!("a{exactly_253}")).is_err());
    }

    /// A small deterministic PRNG (xorshift64*), enough for mutation fuzzing.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    #[test]
    fn hostile_bytes_never_panic() {
        let seeds = [
            rustls_hello(Some("api.example.com"), &[b"h2", b"http/1.1"]),
            reframe(&handshake_bytes(&rustls_hello(Some("a.example"), &[])), 9),
            hello_with(&[sni(b"a.example"), alpn_ext(&[b"h2"])]),
        ];
        let mut rng = Rng(0x5eed_cafe_f00d_0001);
        for round in 0..20_000 {
            let mut bytes = seeds[round % seeds.len()].clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(bytes.len());
                match rng.below(4) {
                    0 => bytes[at] = rng.next() as u8,
                    1 => bytes[at] ^= 1 << rng.below(8),
                    2 => bytes.truncate(at),
                    _ => bytes.insert(at, rng.next() as u8),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            if let Parse::NeedMore { at_least } = parse(&bytes) {
                assert!(at_least > bytes.len() && at_least <= MAX_HELLO_BYTES);
            }
        }
        for _ in 0..5_000 {
            let mut bytes = vec![22, 3, 1];
            let len = rng.below(300);
            bytes.extend((0..len).map(|_| rng.next() as u8));
            let _ = parse(&bytes);
        }
    }

    fn corpus_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/tls/testdata/client_hello")
    }

    /// Every corpus file parses without panicking; the manifest says what the listed
    /// ones must give.
    #[test]
    fn seed_corpus_regression() {
        let dir = corpus_dir();
        let manifest = std::fs::read_to_string(dir.join("expected.txt")).unwrap();
        let mut listed = 0;
        for line in manifest.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let file = words.next().unwrap();
            let want = words.next().unwrap();
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let got = parse(&bytes);
            match (want, &got) {
                ("hello", Parse::Hello(h)) => {
                    for expectation in words {
                        let (key, value) = expectation.split_once('=').unwrap();
                        match key {
                            "sni" if value == "-" => assert_eq!(h.sni, None, "{file}"),
                            "sni" => assert_eq!(h.sni.as_deref(), Some(value), "{file}"),
                            "alpn" if value == "-" => assert!(h.alpn.is_empty(), "{file}"),
                            "alpn" => assert_eq!(h.alpn.join(","), value, "{file}"),
                            other => panic!("{file}: unknown expectation {other}"),
                        }
                    }
                }
                ("invalid", Parse::Invalid(_)) | ("needmore", Parse::NeedMore { .. }) => {}
                _ => panic!("{file}: expected {want}, got {got:?}"),
            }
            listed += 1;
        }
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "bin") {
                let bytes = std::fs::read(&path).unwrap();
                let _ = parse(&bytes);
                for cut in 0..bytes.len() {
                    let _ = parse(&bytes[..cut]);
                }
                files += 1;
            }
        }
        assert!(
            listed >= 10 && files >= listed,
            "{listed} listed, {files} files"
        );
    }

    /// Writes the generated part of the seed corpus (run with `--ignored` to refresh).
    #[test]
    #[ignore = "regenerates testdata"]
    fn write_seed_corpus() {
        let dir = corpus_dir();
        let good = hello_with(&[sni(b"a.example")]);
        let files: Vec<(&str, Vec<u8>)> = vec![
            (
                "rustls_sni_alpn.bin",
                rustls_hello(Some("api.example.com"), &[b"h2", b"http/1.1"]),
            ),
            ("rustls_nosni.bin", rustls_hello(None, &[])),
            (
                "rustls_fragmented_7.bin",
                reframe(
                    &handshake_bytes(&rustls_hello(Some("api.example.com"), &[b"h2"])),
                    7,
                ),
            ),
            (
                "short_half.bin",
                rustls_hello(Some("api.example.com"), &[])[..100].to_vec(),
            ),
            (
                "bad_duplicate_sni.bin",
                hello_with(&[sni(b"a.example"), sni(b"b.example")]),
            ),
            (
                "bad_two_host_names.bin",
                hello_with(&[(
                    EXT_SERVER_NAME,
                    sni_ext(&[(0, b"a.example"), (0, b"b.example")]),
                )]),
            ),
            ("bad_ip_sni.bin", hello_with(&[sni(b"10.0.0.1")])),
            ("bad_not_handshake.bin", record(23, &good[5..])),
            (
                "bad_ext_overrun.bin",
                hello_with(&[(EXT_SERVER_NAME, vec![0, 200, 0, 0, 3])]),
            ),
            (
                "bad_huge_length.bin",
                vec![22, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff],
            ),
            (
                "bad_zero_record.bin",
                vec![22, 3, 1, 0, 0, 22, 3, 1, 0, 1, 1],
            ),
        ];
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    async fn pair() -> (tokio::net::TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn reads_a_hello_split_over_segments_without_consuming_it() {
        let bytes = reframe(
            &handshake_bytes(&rustls_hello(Some("api.example.com"), &[b"h2"])),
            50,
        );
        let (mut client, mut server) = pair().await;
        let sent = bytes.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(37) {
                client.write_all(chunk).await.unwrap();
                client.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            client
        });
        let h = read_client_hello(&server, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(h.sni.as_deref(), Some("api.example.com"));
        assert_eq!(h.record_bytes, bytes.len());
        let _client = writer.await.unwrap();
        let mut again = vec![0; bytes.len()];
        server.read_exact(&mut again).await.unwrap();
        assert_eq!(again, bytes, "peeking must not consume");
    }

    #[tokio::test]
    async fn stalled_invalid_and_closed_clients() {
        let bytes = rustls_hello(Some("api.example.com"), &[]);
        // Stalls after part of the hello.
        let (mut client, server) = pair().await;
        client.write_all(&bytes[..40]).await.unwrap();
        let e = read_client_hello(&server, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, HelloError::Timeout { got: 40, .. }), "{e:?}");
        // Sends nothing.
        let (_client, server) = pair().await;
        let e = read_client_hello(&server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, HelloError::Timeout { got: 0, .. }), "{e:?}");
        // Sends garbage: decided at once, long before the timeout.
        let (mut client, server) = pair().await;
        client
            .write_all(b"\x16\x03\x01\x00\x05\x02xxxx")
            .await
            .unwrap();
        let e = read_client_hello(&server, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(
            matches!(e, HelloError::NotClientHello { msg_type: 2 }),
            "{e:?}"
        );
        // Closes without sending.
        let (client, server) = pair().await;
        drop(client);
        let e = read_client_hello(&server, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(matches!(e, HelloError::Closed { got: 0 }), "{e:?}");
    }
}
