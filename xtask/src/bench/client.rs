//! Small load clients the benchmark runs as separate processes (`cargo xtask bench-helper
//! ...`), so that they can be put into a cgroup with `scopegate exec` and pinned with
//! `taskset`:
//!
//! * `paced`: an open-loop client at a fixed request rate; latency is measured from each
//!   request's *scheduled* send time, so a slow response delays the next ones and is
//!   counted against them too (no coordinated omission);
//! * `connect`: times `connect()` to a local listener (or to a redirected destination), a
//!   bounded number of times;
//! * `hold`: opens connections, sends one request on each, and keeps them idle until its
//!   stdin closes (or a time limit).
//!
//! Each prints one JSON line on stdout. All loops are bounded in count and in time.

use std::{
    io::{self, BufRead as _, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use super::workload::{self, Request};

/// Longest response head or body accepted.
const MAX_RESPONSE: usize = 1 << 20;

/// The helper clients.
#[derive(Debug, Subcommand)]
pub enum Helper {
    /// Open-loop client at a fixed rate; prints `{"sent":..,"p50_us":..,...}`.
    Paced {
        /// Address to connect to.
        #[arg(long)]
        addr: SocketAddr,
        /// Host header.
        #[arg(long)]
        host: String,
        /// requests.txt (cycled).
        #[arg(long)]
        requests: PathBuf,
        /// Requests per second.
        #[arg(long)]
        rate: u32,
        /// How long to send, in milliseconds.
        #[arg(long)]
        duration_ms: u64,
        /// Connections (one thread each; slots are dealt round-robin).
        #[arg(long, default_value_t = 8)]
        conns: usize,
        /// A new connection per request (`Connection: close`).
        #[arg(long)]
        close: bool,
    },
    /// Times `count` connects to a listener it opens on `listen` (or to `to`); prints ns
    /// statistics.
    Connect {
        /// IP to listen on (port chosen by the kernel).
        #[arg(long)]
        listen: IpAddr,
        /// Connect here instead of to the listener (a destination the hooks redirect).
        #[arg(long)]
        to: Option<SocketAddr>,
        /// Timed connects (after 10% untimed warm-up ones).
        #[arg(long)]
        count: usize,
    },
    /// Opens `count` connections to `addr`, one request each, and holds them idle.
    Hold {
        /// Address to connect to.
        #[arg(long)]
        addr: SocketAddr,
        /// Host header.
        #[arg(long)]
        host: String,
        /// Request target sent on each connection.
        #[arg(long)]
        target: String,
        /// Connections.
        #[arg(long)]
        count: usize,
        /// Longest time to hold them.
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
    },
}

/// Runs one helper.
pub fn run(helper: Helper) -> Result<()> {
    match helper {
        Helper::Paced {
            addr,
            host,
            requests,
            rate,
            duration_ms,
            conns,
            close,
        } => {
            let text = std::fs::read_to_string(&requests)
                .with_context(|| format!("reading {}", requests.display()))?;
            let requests = workload::parse_requests(&text)?;
            let plan = Plan {
                addr,
                rate,
                duration: Duration::from_millis(duration_ms),
                conns: conns.clamp(1, 64),
                close,
            };
            let raw: Vec<Vec<u8>> = requests
                .iter()
                .map(|r| raw_request(r, &host, close))
                .collect();
            let stats = paced(&plan, &raw)?;
            println!("{stats}");
        }
        Helper::Connect { listen, to, count } => {
            println!("{}", connect_loop(listen, to, count.min(200_000))?);
        }
        Helper::Hold {
            addr,
            host,
            target,
            count,
            max_secs,
        } => hold(addr, &host, &target, count.min(60_000), max_secs.min(600))?,
    }
    Ok(())
}

/// The bytes of one HTTP/1.1 request.
fn raw_request(req: &Request, host: &str, close: bool) -> Vec<u8> {
    let mut head = format!("{} {} HTTP/1.1\r\nHost: {host}\r\n", req.method, req.target);
    if close {
        head.push_str("Connection: close\r\n");
    }
    let body = req.body().unwrap_or("");
    if req.body().is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body);
    head.into_bytes()
}

/// A response's status and whether the connection may be reused.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    /// Status code.
    status: u16,
    /// False if the server closes (or asked to close) the connection.
    reusable: bool,
}

/// Index of the end of the head (`\r\n\r\n`), past it.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads more bytes into `buf`; fails at EOF.
fn fill(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-response",
        ));
    }
    if buf.len() + n > MAX_RESPONSE {
        return Err(io::Error::other("response too large"));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Reads one complete response (Content-Length, chunked, or until EOF).
fn read_response(stream: &mut impl Read) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        fill(stream, &mut buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut reusable = version == "HTTP/1.1";
    let (mut length, mut chunked) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                reusable = false;
            } else if value.contains("keep-alive") {
                reusable = true;
            }
        }
    }
    let mut body = buf.split_off(end);
    if chunked {
        let mut at = 0;
        loop {
            let line_end = loop {
                if let Some(p) = body[at..].windows(2).position(|w| w == b"\r\n") {
                    break at + p;
                }
                fill(stream, &mut body)?;
            };
            let size_text = String::from_utf8_lossy(&body[at..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            at = line_end + 2;
            if size == 0 {
                // Trailer lines (none expected), then an empty line.
                loop {
                    match body[at..].windows(2).position(|w| w == b"\r\n") {
                        Some(0) => break,
                        Some(p) => at += p + 2,
                        None => fill(stream, &mut body)?,
                    }
                }
                break;
            }
            while body.len() < at + size + 2 {
                fill(stream, &mut body)?;
            }
            at += size + 2;
        }
    } else if let Some(length) = length {
        while body.len() < length {
            fill(stream, &mut body)?;
        }
    } else {
        stream.read_to_end(&mut body)?;
        reusable = false;
    }
    Ok(Response { status, reusable })
}

/// The paced run's parameters.
#[derive(Debug, Clone)]
struct Plan {
    /// Where to connect.
    addr: SocketAddr,
    /// Requests per second.
    rate: u32,
    /// How long to send.
    duration: Duration,
    /// Connections (threads).
    conns: usize,
    /// New connection per request.
    close: bool,
}

/// What one paced thread saw.
#[derive(Debug, Default)]
struct ThreadStats {
    /// Latencies from the scheduled send time to the end of the response, in ns.
    latencies: Vec<u64>,
    /// Responses with a status outside 2xx.
    non2xx: u64,
    /// Requests that failed (connect, I/O, parse, timeout).
    errors: u64,
}

/// Runs the paced client; returns the JSON summary.
fn paced(plan: &Plan, requests: &[Vec<u8>]) -> Result<serde_json::Value> {
    if plan.rate == 0 || requests.is_empty() {
        bail!("paced: the rate and the request list must not be empty");
    }
    let interval_ns = 1_000_000_000u64 / u64::from(plan.rate);
    let slots = (plan.duration.as_nanos() / u128::from(interval_ns)) as u64;
    // Everything starts a little in the future so that every thread is ready.
    let start = Instant::now() + Duration::from_millis(50);
    let hard_stop = start + plan.duration + Duration::from_secs(10);
    let mut handles = Vec::new();
    for t in 0..plan.conns {
        let plan = plan.clone();
        let requests = requests.to_vec();
        handles.push(thread::spawn(move || {
            paced_thread(&plan, &requests, t, start, interval_ns, slots, hard_stop)
        }));
    }
    let mut all = ThreadStats::default();
    for h in handles {
        let s = h
            .join()
            .map_err(|_| anyhow::anyhow!("a paced thread panicked"))?;
        all.latencies.extend(s.latencies);
        all.non2xx += s.non2xx;
        all.errors += s.errors;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latencies.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let pct = |p: f64| us(percentile(&all.latencies, p));
    let mean = if all.latencies.is_empty() {
        0.0
    } else {
        us(all.latencies.iter().sum::<u64>() / all.latencies.len() as u64)
    };
    Ok(serde_json::json!({
        "scheduled": slots,
        "completed": all.latencies.len(),
        "non2xx": all.non2xx,
        "errors": all.errors,
        "elapsed_s": elapsed,
        "rps": all.latencies.len() as f64 / plan.duration.as_secs_f64().max(1e-9),
        "mean_us": mean,
        "p50_us": pct(50.0),
        "p90_us": pct(90.0),
        "p99_us": pct(99.0),
        "p999_us": pct(99.9),
        "max_us": all.latencies.last().map_or(0.0, |&ns| us(ns)),
    }))
}

/// The `p`-th percentile (nearest rank) of sorted values; 0 if empty.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // The epsilon keeps 99.9% of 1000 at rank 999 despite floating-point error.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One paced connection: slots `t`, `t + conns`, ... at `start + slot * interval`.
fn paced_thread(
    plan: &Plan,
    requests: &[Vec<u8>],
    t: usize,
    start: Instant,
    interval_ns: u64,
    slots: u64,
    hard_stop: Instant,
) -> ThreadStats {
    let mut stats = ThreadStats::default();
    let mut conn: Option<TcpStream> = None;
    let mut slot = t as u64;
    while slot < slots {
        let scheduled = start + Duration::from_nanos(slot * interval_ns);
        // Sleep to just before the slot, then spin (yielding) to it: sleeping alone
        // overshoots by tens of µs, and that would count as latency.
        let now = Instant::now();
        if now > hard_stop {
            break;
        }
        if scheduled > now {
            let wait = scheduled - now;
            if wait > Duration::from_micros(200) {
                thread::sleep(wait - Duration::from_micros(150));
            }
            while Instant::now() < scheduled {
                thread::yield_now();
            }
        }
        let request = &requests[(slot as usize) % requests.len()];
        match one_request(plan, &mut conn, request) {
            Ok(status) => {
                stats
                    .latencies
                    .push(scheduled.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64);
                if !(200..300).contains(&status) {
                    stats.non2xx += 1;
                }
            }
            Err(_) => {
                stats.errors += 1;
                conn = None;
            }
        }
        slot += plan.conns as u64;
    }
    stats
}

/// Sends one request on the kept connection (opening one if needed); returns the status.
fn one_request(plan: &Plan, conn: &mut Option<TcpStream>, request: &[u8]) -> io::Result<u16> {
    let mut stream = match conn.take() {
        Some(s) => s,
        None => {
            let s = TcpStream::connect_timeout(&plan.addr, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s
        }
    };
    stream.write_all(request)?;
    let response = read_response(&mut stream)?;
    if response.reusable && !plan.close {
        *conn = Some(stream);
    }
    Ok(response.status)
}

/// Connects per batch: each batch is timed, then accepted and closed.
pub const CONNECT_BATCH: usize = 64;

/// Times `count` connects (plus 10% untimed warm-up ones) to a listener on `ip`, or to
/// `to` if given (a destination the hooks redirect to the proxy).
///
/// Single-threaded, in batches: the connects of a batch are timed back to back while the
/// listener only queues them, then the listener accepts and closes them (the server side
/// closes first, so the client's ports do not pile up in TIME_WAIT) and the client closes
/// its ends. Nothing else wakes up on this CPU while a connect is timed.
fn connect_loop(ip: IpAddr, to: Option<SocketAddr>, count: usize) -> Result<serde_json::Value> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    listener.set_nonblocking(true)?;
    let addr = match to {
        Some(to) => to,
        None => listener.local_addr()?,
    };
    let warmup = count / 10;
    let total = warmup + count;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut times = Vec::with_capacity(count);
    let mut open = Vec::with_capacity(CONNECT_BATCH);
    let mut errors = 0u64;
    for i in 0..total {
        if Instant::now() > deadline {
            bail!("connect loop: still running after 120 s ({i} connects)");
        }
        let t0 = Instant::now();
        let conn = TcpStream::connect(addr);
        let ns = t0.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        match conn {
            Ok(stream) => {
                if i >= warmup {
                    times.push(ns);
                }
                open.push(stream);
            }
            Err(_) => errors += 1,
        }
        if open.len() == CONNECT_BATCH || i + 1 == total {
            // Accept and close what queued up (nothing, if the connects were redirected).
            while let Ok((conn, _)) = listener.accept() {
                drop(conn);
            }
            open.clear();
            if to.is_some() {
                // Let the proxy (on another CPU) accept and close its side.
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
    let mean = if times.is_empty() {
        0
    } else {
        times.iter().sum::<u64>() / times.len() as u64
    };
    times.sort_unstable();
    Ok(serde_json::json!({
        "target": addr.to_string(),
        "count": times.len(),
        "errors": errors,
        "mean_ns": mean,
        "median_ns": percentile(&times, 50.0),
        "p99_ns": percentile(&times, 99.0),
    }))
}

/// Opens `count` connections with one request each, reports, and holds them idle until
/// stdin closes or `max_secs` pass.
fn hold(addr: SocketAddr, host: &str, target: &str, count: usize, max_secs: u64) -> Result<()> {
    let request = raw_request(
        &Request {
            method: "GET".into(),
            target: target.into(),
        },
        host,
        false,
    );
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let mut held = Vec::with_capacity(count);
    let (mut errors, mut non2xx) = (0u64, 0u64);
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let result = (|| -> io::Result<(TcpStream, u16)> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&request)?;
            let response = read_response(&mut s)?;
            Ok((s, response.status))
        })();
        match result {
            Ok((stream, status)) => {
                if !(200..300).contains(&status) {
                    non2xx += 1;
                }
                held.push(stream);
            }
            Err(_) => errors += 1,
        }
    }
    println!(
        "{}",
        serde_json::json!({"held": held.len(), "errors": errors, "non2xx": non2xx})
    );
    io::stdout().flush()?;
    // Hold until stdin closes (the benchmark is done measuring) or the time limit.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        while io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
            line.clear();
        }
        let _ = tx.send(());
    });
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = rx.recv_timeout(left);
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_framed_responses() -> io::Result<()> {
        let mut cl = &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"[..];
        assert_eq!(
            read_response(&mut cl)?,
            Response {
                status: 200,
                reusable: true
            }
        );
        let mut chunked =
            &b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..];
        assert_eq!(read_response(&mut chunked)?.status, 403);
        assert!(chunked.is_empty());
        let mut close = &b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until eof"[..];
        assert!(!read_response(&mut close)?.reusable);
        let mut cut = &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"[..];
        assert!(read_response(&mut cut).is_err());
        Ok(())
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn builds_requests_with_bodies() {
        let req = Request {
            method: "POST".into(),
            target: "/a".into(),
        };
        let raw = String::from_utf8(raw_request(&req, "h:1", true)).unwrap_or_default();
        assert!(raw.starts_with("POST /a HTTP/1.1\r\nHost: h:1\r\nConnection: close\r\n"));
        assert!(raw.ends_with(&format!("\r\n\r\n{}", workload::POST_BODY)));
    }

    #[test]
    fn connect_loop_counts() -> Result<()> {
        let stats = connect_loop("127.0.0.1".parse()?, None, 200)?;
        assert_eq!(stats["count"], 200);
        assert_eq!(stats["errors"], 0);
        assert!(stats["median_ns"].as_u64().unwrap_or(0) > 0);
        Ok(())
    }

    #[test]
    fn paced_against_a_local_server() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    }
                });
            }
        });
        let plan = Plan {
            addr,
            rate: 500,
            duration: Duration::from_millis(200),
            conns: 2,
            close: false,
        };
        let req = Request {
            method: "GET".into(),
            target: "/".into(),
        };
        let stats = paced(&plan, &[raw_request(&req, "x", false)])?;
        assert_eq!(stats["completed"], 100);
        assert_eq!(stats["errors"], 0);
        Ok(())
    }
}
