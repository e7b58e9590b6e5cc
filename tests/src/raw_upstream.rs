//! A loopback HTTP/1.1 upstream that records the EXACT bytes of every request it receives.
//!
//! It parses only what it needs to delimit requests on a keep-alive connection (the head,
//! then a `Content-Length` body or a chunked body with trailers), answers each request
//! `200` with a `Content-Length` body `ok <x-seq>` (the value of the request's `X-Seq`
//! header, or `-`), and keeps the connection open. A request it cannot delimit is recorded
//! with `error` set and the connection is closed. No name resolution of any kind.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

/// One request exactly as the upstream received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Every byte of the request: head, framing and body.
    pub raw: Vec<u8>,
    /// The method token.
    pub method: String,
    /// The request-target, byte for byte (lossily decoded as UTF-8).
    pub target: String,
    /// The HTTP version token.
    pub version: String,
    /// Header fields in order: name as received, value with surrounding whitespace
    /// removed.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body after de-chunking.
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
    /// The peer (the proxy).
    pub peer: SocketAddr,
    /// Set when the request could not be delimited.
    pub error: Option<String>,
}

impl Received {
    /// All values of a header (case-insensitive name), as text.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The only value of a header, if it appears exactly once.
    pub fn header(&self, name: &str) -> Option<String> {
        let all = self.header_all(name);
        (all.len() == 1).then(|| all[0].clone())
    }

    /// The path part of the target (before `?`).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// The recording upstream. Dropping it stops accepting.
pub struct RawUpstream {
    /// Its address.
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
}

impl RawUpstream {
    /// Binds `ip:0` and starts serving.
    pub fn start(ip: &str) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind raw upstream");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (received, stop) = (received.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let received = received.clone();
                            let stop = stop.clone();
                            thread::spawn(move || serve(stream, peer, &received, &stop));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            });
        }
        Self {
            addr,
            received,
            stop,
        }
    }

    /// Requests received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A byte reader over a stream that keeps a copy of everything consumed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl Conn {
    /// Makes sure at least `n` unread bytes are buffered; false on EOF/error.
    fn fill(&mut self, n: usize, stop: &AtomicBool) -> bool {
        let mut chunk = [0u8; 16384];
        // Bounded: the read timeout ends a silent connection; at most 30 s of silence.
        let mut idle = 0;
        while self.buf.len() - self.pos < n {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(k) => {
                    idle = 0;
                    self.buf.extend_from_slice(&chunk[..k]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    idle += 1;
                    if idle > 60 {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Reads up to and including the next CRLF; None on EOF. Lines are capped at 64 KiB.
    fn line(&mut self, stop: &AtomicBool) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[self.pos..self.pos + i].to_vec();
                self.pos += i + 2;
                return Some(line);
            }
            if self.buf.len() - self.pos > 65536 {
                return None;
            }
            let want = self.buf.len() - self.pos + 1;
            if !self.fill(want, stop) {
                return None;
            }
        }
    }

    fn take(&mut self, n: usize, stop: &AtomicBool) -> Option<Vec<u8>> {
        if !self.fill(n, stop) {
            return None;
        }
        let out = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Some(out)
    }
}

fn serve(stream: TcpStream, peer: SocketAddr, received: &Mutex<Vec<Received>>, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        pos: 0,
    };
    loop {
        // Drop what earlier requests consumed.
        conn.buf.drain(..conn.pos);
        conn.pos = 0;
        let Some(first) = conn.line(stop) else {
            return;
        };
        let mut req = Received {
            raw: Vec::new(),
            method: String::new(),
            target: String::new(),
            version: String::new(),
            headers: Vec::new(),
            body: Vec::new(),
            chunked: false,
            peer,
            error: None,
        };
        let text = String::from_utf8_lossy(&first).into_owned();
        let mut parts = text.splitn(3, ' ');
        req.method = parts.next().unwrap_or("").to_owned();
        req.target = parts.next().unwrap_or("").to_owned();
        req.version = parts.next().unwrap_or("").to_owned();
        let mut complete = true;
        loop {
            let Some(line) = conn.line(stop) else {
                complete = false;
                break;
            };
            if line.is_empty() {
                break;
            }
            match line.iter().position(|&b| b == b':') {
                Some(i) => {
                    let name = String::from_utf8_lossy(&line[..i]).into_owned();
                    let value = trim(&line[i + 1..]).to_vec();
                    req.headers.push((name, value));
                }
                None => req.error = Some(format!("header line without ':': {line:?}")),
            }
        }
        if !complete {
            req.error = Some("connection ended inside the head".into());
        } else if req.error.is_none() {
            let te = req.header_all("transfer-encoding");
            let cl = req.header_all("content-length");
            if !te.is_empty() {
                req.chunked = true;
                if te.len() != 1 || !te[0].eq_ignore_ascii_case("chunked") || !cl.is_empty() {
                    req.error = Some(format!("unexpected framing: TE {te:?}, CL {cl:?}"));
                } else {
                    match read_chunked(&mut conn, stop) {
                        Ok(body) => req.body = body,
                        Err(e) => req.error = Some(e),
                    }
                }
            } else if cl.len() > 1 {
                req.error = Some(format!("several Content-Length: {cl:?}"));
            } else if let Some(cl) = cl.first() {
                match cl.parse::<usize>() {
                    Ok(n) if n <= 1 << 20 => match conn.take(n, stop) {
                        Some(body) => req.body = body,
                        None => req.error = Some("connection ended inside the body".into()),
                    },
                    _ => req.error = Some(format!("bad Content-Length {cl:?}")),
                }
            }
        }
        req.raw = conn.buf[..conn.pos].to_vec();
        let failed = req.error.is_some();
        let seq = req.header("x-seq").unwrap_or_else(|| "-".into());
        received.lock().expect("lock").push(req);
        if failed {
            return;
        }
        let body = format!("ok {seq}");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn read_chunked(conn: &mut Conn, stop: &AtomicBool) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    for _ in 0..100_000 {
        let line = conn.line(stop).ok_or("connection ended in a chunk size")?;
        let size = line.split(|&b| b == b';').next().unwrap_or(&[]);
        let size = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(|| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            for _ in 0..1000 {
                let t = conn.line(stop).ok_or("connection ended in trailers")?;
                if t.is_empty() {
                    return Ok(body);
                }
            }
            return Err("too many trailers".into());
        }
        let data = conn
            .take(size + 2, stop)
            .ok_or("connection ended in a chunk")?;
        if &data[size..] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        body.extend_from_slice(&data[..size]);
    }
    Err("too many chunks".into())
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &bytes[start..end.max(start)]
}
