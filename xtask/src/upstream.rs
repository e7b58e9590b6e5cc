//! The demo's (and the soak's) upstream: a minimal HTTP/1.1 server (std only, a thread per
//! connection), optionally recording each request's target.
//!
//! It answers every request with `200` and `hello from the demo upstream: <METHOD> <PATH>`,
//! keeps HTTP/1.1 connections alive unless asked not to, and closes on anything it does
//! not understand.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};

/// Longest request line or header line accepted.
const MAX_LINE: u64 = 8 * 1024;
/// Most header lines accepted per request.
const MAX_HEADERS: usize = 100;
/// Largest request body read (and discarded).
const MAX_BODY: u64 = 1024 * 1024;

/// The request targets an upstream received, in order.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// Listens on `addr` and serves until killed.
pub fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    eprintln!("demo upstream listening on http://{addr}");
    accept_loop(&listener, None);
    Ok(())
}

/// Serves `listener` on a thread of its own, recording each request's target in `seen`
/// before answering it (the soak's upstreams).
pub fn serve_recording(listener: TcpListener, seen: Seen) {
    thread::spawn(move || accept_loop(&listener, Some(&seen)));
}

fn accept_loop(listener: &TcpListener, seen: Option<&Seen>) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let seen = seen.cloned();
                thread::spawn(move || {
                    let peer = stream.peer_addr().ok();
                    if let Err(err) = handle(stream, seen.as_deref()) {
                        eprintln!("upstream: connection from {peer:?}: {err}");
                    }
                });
            }
            Err(err) => eprintln!("upstream: accept: {err}"),
        }
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// Request method.
    method: String,
    /// Request target as sent.
    path: String,
    /// Whether the connection stays open after the response.
    keep_alive: bool,
    /// Length of the body to skip.
    content_length: u64,
}

/// Serves requests on one connection until the peer closes or asks to close.
fn handle(stream: TcpStream, seen: Option<&Mutex<Vec<String>>>) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let head = match read_head(&mut reader) {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::InvalidData => {
                respond(&mut writer, "400 Bad Request", "bad request\n", false, true)?;
                return Ok(());
            }
            Err(err) => return Err(err),
        };
        if let Some(seen) = seen {
            seen.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(head.path.clone());
        }
        io::copy(
            &mut (&mut reader).take(head.content_length),
            &mut io::sink(),
        )?;
        let body = format!(
            "hello from the demo upstream: {} {}\n",
            head.method, head.path
        );
        let with_body = head.method != "HEAD";
        respond(&mut writer, "200 OK", &body, head.keep_alive, with_body)?;
        if !head.keep_alive {
            return Ok(());
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes, without the line ending; `None` at EOF.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader.take(MAX_LINE).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "line too long or cut off",
        ));
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_owned()))
}

/// Reads a request line and its headers; `None` if the peer closed between requests.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Head>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let Some(request_line) = read_line(reader)? else {
        return Ok(None);
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(bad("unsupported HTTP version")),
    };
    let mut content_length = 0;
    for _ in 0..=MAX_HEADERS {
        let line = read_line(reader)?.ok_or_else(|| bad("connection closed in headers"))?;
        if line.is_empty() {
            return Ok(Some(Head {
                method: method.to_owned(),
                path: path.to_owned(),
                keep_alive,
                content_length,
            }));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("malformed header"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .ok()
                .filter(|n| *n <= MAX_BODY)
                .ok_or_else(|| bad("bad content-length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("chunked request bodies are not supported"));
        } else if name.eq_ignore_ascii_case("connection") {
            let tokens = value.split(',').map(str::trim);
            for token in tokens {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    Err(bad("too many headers"))
}

/// Writes one response.
fn respond(
    out: &mut impl Write,
    status: &str,
    body: &str,
    keep_alive: bool,
    with_body: bool,
) -> io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    if with_body {
        response.push_str(body);
    }
    out.write_all(response.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads() -> io::Result<()> {
        let raw = b"GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
                    DELETE /x HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut reader = &raw[..];
        let head = read_head(&mut reader)?;
        assert_eq!(
            head,
            Some(Head {
                method: "GET".into(),
                path: "/hello".into(),
                keep_alive: true,
                content_length: 3,
            })
        );
        io::copy(&mut (&mut reader).take(3), &mut io::sink())?;
        let head = read_head(&mut reader)?.ok_or_else(|| io::Error::other("no second head"))?;
        assert_eq!((head.method.as_str(), head.keep_alive), ("DELETE", false));
        assert_eq!(read_head(&mut reader)?, None);
        Ok(())
    }

    #[test]
    fn rejects_garbage() {
        let mut reader = &b"hello\r\n\r\n"[..];
        let err = read_head(&mut reader).err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::InvalidData));
    }

    #[test]
    fn serves_over_tcp() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        thread::spawn(move || {
            if let Ok((stream, _)) = listener.accept() {
                let _ = handle(stream, None);
            }
        });
        let mut conn = TcpStream::connect(addr)?;
        conn.write_all(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n",
        )?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2);
        assert!(text.contains("hello from the demo upstream: GET /a\n"));
        assert!(text.ends_with("hello from the demo upstream: GET /b\n"));
        Ok(())
    }
}
