//! A programmable authoritative DNS server for the end-to-end tests (dnspython, UDP and TCP).
//!
//! It listens on one loopback address (port 53 by default, since `resolv.conf` cannot name
//! a port), answers from a zone the test rewrites at any time ([`DnsServer::set`]: the file
//! is re-read on every query, so a test can rebind a name between two queries), and logs
//! every query it receives ([`DnsServer::queries`]), so a test can assert what reached it.
//! Names it does not know get NXDOMAIN; names it knows without a record of the asked type
//! get an empty NOERROR answer. It does no recursion and sends nothing anywhere.
//!
//! [`DnsServer::resolv_conf`] writes a `resolv.conf` naming only this server, for the
//! agent's resolver configuration.
#![forbid(unsafe_code)]

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The server program: `python3 -c SERVER IP PORT ZONE LOG`; prints `ready` once bound.
const SERVER: &str = r#"
import json, socket, struct, sys, threading
import dns.message, dns.rcode, dns.rdatatype, dns.rrset, dns.flags

ip, port, zone_path, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
log_lock = threading.Lock()

def load_zone():
    try:
        with open(zone_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}

def answer(wire, transport, src):
    try:
        query = dns.message.from_wire(wire)
    except Exception as e:
        with log_lock, open(log_path, "a") as f:
            f.write(json.dumps({"error": str(e), "transport": transport}) + "\n")
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    zone = load_zone()
    for q in query.question:
        name = q.name.to_text().lower()
        qtype = dns.rdatatype.to_text(q.rdtype)
        with log_lock, open(log_path, "a") as f:
            f.write(json.dumps({"qname": name, "qtype": qtype, "transport": transport,
                                "src": src}) + "\n")
        records = zone.get(name)
        if records is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            continue
        for r in records:
            if r["type"] != qtype:
                continue
            value = r["value"] if r["type"] != "TXT" else '"%s"' % r["value"]
            response.answer.append(
                dns.rrset.from_text(q.name, r.get("ttl", 60), "IN", r["type"], value))
    return response.to_wire()

def serve_udp(sock):
    while True:
        wire, peer = sock.recvfrom(65535)
        out = answer(wire, "udp", "%s:%d" % peer[:2])
        if out is not None:
            sock.sendto(out, peer)

def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data

def serve_tcp_conn(conn, peer):
    with conn:
        conn.settimeout(10)
        while True:
            head = read_exact(conn, 2)
            if head is None:
                return
            wire = read_exact(conn, struct.unpack("!H", head)[0])
            if wire is None:
                return
            out = answer(wire, "tcp", "%s:%d" % peer[:2])
            if out is None:
                return
            conn.sendall(struct.pack("!H", len(out)) + out)

def serve_tcp(sock):
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=serve_tcp_conn, args=(conn, peer), daemon=True).start()

family = socket.AF_INET6 if ":" in ip else socket.AF_INET
udp = socket.socket(family, socket.SOCK_DGRAM)
udp.bind((ip, port))
tcp = socket.socket(family, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((ip, port))
tcp.listen(64)
threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
threading.Thread(target=serve_tcp, args=(tcp,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// One record of the zone.
#[derive(Clone, Debug)]
pub struct Answer {
    /// `A`, `AAAA`, `TXT`, `CNAME`, …
    pub rtype: &'static str,
    /// The record's data in presentation form (an address, a name, a text).
    pub value: String,
    /// Its TTL in seconds.
    pub ttl: u32,
}

impl Answer {
    /// An `A` or `AAAA` record for `addr` (by its form).
    pub fn addr(addr: &str, ttl: u32) -> Self {
        let rtype = if addr.contains(':') { "AAAA" } else { "A" };
        Self {
            rtype,
            value: addr.to_owned(),
            ttl,
        }
    }

    /// A `TXT` record.
    pub fn txt(text: &str, ttl: u32) -> Self {
        Self {
            rtype: "TXT",
            value: text.to_owned(),
            ttl,
        }
    }
}

/// A query the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The query name, lowercase, with its trailing dot.
    pub qname: String,
    /// `A`, `AAAA`, `TXT`, …
    pub qtype: String,
    /// `udp` or `tcp`.
    pub transport: String,
}

/// The running server; stopped (by PID) when dropped.
pub struct DnsServer {
    /// Where it listens (UDP and TCP).
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl DnsServer {
    /// Starts a server on `ip:53` (a loopback address of the test's own, e.g. `127.0.53.7`).
    pub fn start(ip: &str) -> Self {
        Self::start_on(ip, 53)
    }

    /// Starts a server on `ip:port`.
    pub fn start_on(ip: &str, port: u16) -> Self {
        let dir = tempfile::tempdir().expect("dns server dir");
        let zone = dir.path().join("zone.json");
        let log = dir.path().join("queries.jsonl");
        fs::write(&zone, "{}").expect("write zone");
        fs::write(&log, "").expect("write log");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SERVER)
            .arg(ip)
            .arg(port.to_string())
            .arg(&zone)
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the test DNS server (python3 with dnspython)");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the DNS server's ready line");
        assert_eq!(
            line.trim(),
            "ready",
            "the test DNS server on {ip}:{port} did not start (is dnspython installed? \
             `cargo xtask setup` installs it)"
        );
        let addr = SocketAddr::new(ip.parse().expect("dns server ip"), port);
        Self { addr, child, dir }
    }

    /// Replaces the records of `name` (without or with its trailing dot); an empty list
    /// makes the name exist with no records (NOERROR, no answer).
    pub fn set(&self, name: &str, answers: &[Answer]) {
        let records = answers
            .iter()
            .map(|a| serde_json::json!({"type": a.rtype, "value": a.value, "ttl": a.ttl}))
            .collect();
        self.edit_zone(name, Some(serde_json::Value::Array(records)));
    }

    /// Removes `name`: it then gets NXDOMAIN.
    pub fn remove(&self, name: &str) {
        self.edit_zone(name, None);
    }

    /// Sets (or, with `None`, removes) the zone entry of `name`. Written to a temporary file
    /// and renamed, so a query never reads half a zone.
    fn edit_zone(&self, name: &str, records: Option<serde_json::Value>) {
        let zone_path = self.dir.path().join("zone.json");
        let mut zone: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&fs::read_to_string(&zone_path).expect("read zone"))
                .expect("zone json");
        let mut key = name.to_ascii_lowercase();
        if !key.ends_with('.') {
            key.push('.');
        }
        match records {
            Some(records) => zone.insert(key, records),
            None => zone.remove(&key),
        };
        let tmp = self.dir.path().join("zone.json.tmp");
        fs::write(&tmp, serde_json::Value::Object(zone).to_string()).expect("write zone");
        fs::rename(&tmp, &zone_path).expect("swap zone");
    }

    /// Every query received so far, in order. Panics on a message the server could not
    /// parse (the tests send only well-formed DNS unless they say otherwise).
    pub fn queries(&self) -> Vec<Query> {
        read_queries(&self.dir.path().join("queries.jsonl"))
    }

    /// Waits up to `timeout` for at least `n` queries.
    pub fn wait_queries(&self, n: usize, timeout: Duration) -> Vec<Query> {
        let deadline = Instant::now() + timeout;
        loop {
            let queries = self.queries();
            if queries.len() >= n || Instant::now() >= deadline {
                return queries;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes a `resolv.conf` naming only this server (for the agent) and returns its path;
    /// it lives as long as the server.
    pub fn resolv_conf(&self) -> PathBuf {
        let path = self.dir.path().join("resolv.conf");
        fs::write(
            &path,
            format!(
                "nameserver {}\noptions timeout:1 attempts:1\n",
                self.addr.ip()
            ),
        )
        .expect("write resolv.conf");
        path
    }
}

fn read_queries(path: &Path) -> Vec<Query> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("query log line");
            if let Some(error) = v.get("error") {
                panic!("the test DNS server could not parse a message: {error}");
            }
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            Query {
                qname: field("qname"),
                qtype: field("qtype"),
                transport: field("transport"),
            }
        })
        .collect()
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
