//! TLS and credentials end to end: interception with the host CA (HTTP/1.1 and h2),
//! passthrough by SNI, verified upstream TLS, credential injection and rotation. Real
//! curl and openssl against a TLS upstream on loopback with a test CA.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use scopegate_e2e::*;

/// A test CA and a server certificate for `localhost`, made with openssl.
struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=scopegate test upstream CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        fs::write(
            dir.path().join("ext.cnf"),
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        // An unrelated CA, for the bad-certificate case.
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other.crt",
            "-days",
            "2",
            "-subj",
            "/CN=some other CA",
        ]);
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A TLS upstream (python's http.server in an ssl context) on 127.0.0.1 that answers
/// every request with the Authorization header it received, and logs each request line.
struct TlsUpstream {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl TlsUpstream {
    fn start(pki: &TestPki) -> Self {
        let log = pki.path(&format!("upstream-{}.log", unique("u")));
        let script = format!(
            r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_one_request(self):
        super().handle_one_request()
    def do_GET(self):
        with open({log:?}, "a") as f:
            f.write(self.command + " " + self.path + " auth=" + str(self.headers.get_all("Authorization")) + "\n")
        body = ("auth=" + str(self.headers.get_all("Authorization"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain({crt:?}, {key:?})
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#,
            log = log.display().to_string(),
            crt = pki.path("server.crt").display().to_string(),
            key = pki.path("server.key").display().to_string(),
        );
        let mut child = Command::new("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().unwrap();
        Self { child, port, log }
    }

    fn requests(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fixture {
    managed: String,
    agent: Agent,
    secret: PathBuf,
    _policies: tempfile::TempDir,
    _pins: PinDir,
    _tree: CgroupTree,
    _dir: tempfile::TempDir,
}

fn fixture(pki: &TestPki, policy: impl Fn(&str, &Path) -> String, upstream_ca: &Path) -> Fixture {
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("api-key");
    fs::write(&secret, "s3cret-one\n").unwrap();
    let policies = policy_dir(&[("web.yaml", policy(&managed, &secret))]);
    let pins = PinDir::new();
    let mut config = AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        dir.path().join("audit.jsonl"),
    );
    config.extra = vec!["--upstream-ca".into(), upstream_ca.display().to_string()];
    let _ = pki;
    let agent = Agent::start(config);
    Fixture {
        managed,
        agent,
        secret,
        _policies: policies,
        _pins: pins,
        _tree: tree,
        _dir: dir,
    }
}

fn intercept_policy(port: u16) -> impl Fn(&str, &Path) -> String {
    move |managed, secret| {
        format!(
            "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: localhost\n    port: {port}\n    allow_internal: true\n    tls: intercept\n    credential:\n      header: Authorization\n      format: \"Bearer {{secret}}\"\n      secret_file: {}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n",
            secret.display()
        )
    }
}

#[test]
fn interception_decides_every_request_and_injects_the_rotated_credential() {
    privileged_test("interception_decides_every_request_and_injects_the_rotated_credential");
    let pki = TestPki::new();
    let upstream = TlsUpstream::start(&pki);
    let f = fixture(&pki, intercept_policy(upstream.port), &pki.path("ca.crt"));
    let ca = f.agent.state_dir.join("ca.crt");
    let ca = ca.display().to_string();
    let url = |p: &str| format!("https://localhost:{}{p}", upstream.port);
    // Allowed: the workload's own Authorization is replaced by the injected one.
    let out = curl_in(
        &f.managed,
        &[
            "--cacert",
            &ca,
            "-H",
            "Authorization: Bearer workload-fake",
            "-w",
            STATUS,
            &url("/allowed/a"),
        ],
    );
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out.stderr));
    // The upstream echoes the header back: the workload sees the injected secret redacted
    // (same length), the upstream got exactly one, injected.
    assert_eq!(
        body, "auth=['Bearer **********']",
        "the echoed secret is redacted"
    );
    assert!(
        upstream
            .requests()
            .last()
            .is_some_and(|r| r.ends_with("auth=['Bearer s3cret-one']")),
        "exactly one, injected: {:?}",
        upstream.requests()
    );
    // Denied inside TLS: 403 JSON, nothing forwarded.
    let out = curl_in(
        &f.managed,
        &["--cacert", &ca, "-w", STATUS, &url("/forbidden")],
    );
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("path_not_allowed"), "{body}");
    // Rotation: the next request uses the new secret, no restart.
    let tmp = f.secret.with_extension("tmp");
    fs::write(&tmp, "s3cret-two\n").unwrap();
    fs::rename(&tmp, &f.secret).unwrap();
    let out = curl_in(
        &f.managed,
        &["--cacert", &ca, "-w", STATUS, &url("/allowed/b")],
    );
    assert_eq!(
        status_and_body(&out),
        (200, "auth=['Bearer **********']".to_owned())
    );
    assert!(
        upstream
            .requests()
            .last()
            .is_some_and(|r| r.ends_with("auth=['Bearer s3cret-two']")),
        "{:?}",
        upstream.requests()
    );
    // HTTP/2 to the proxy (ALPN h2): the stream is decided like any request.
    let out = curl_in(
        &f.managed,
        &[
            "--http2",
            "--cacert",
            &ca,
            "-w",
            "\n%{http_version} %{http_code}",
            &url("/allowed/h2"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.ends_with("2 200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = curl_in(
        &f.managed,
        &[
            "--http2",
            "--cacert",
            &ca,
            "-w",
            "\n%{http_version} %{http_code}",
            &url("/nope"),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("2 403"));
    // A Host that contradicts the TLS server name is denied.
    let out = curl_in(
        &f.managed,
        &[
            "--cacert",
            &ca,
            "-H",
            "Host: example.org",
            "-w",
            STATUS,
            &url("/allowed/c"),
        ],
    );
    assert_eq!(status_and_body(&out).0, 403);
    let requests = upstream.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    // The secret never appears in the audit log or the agent's log.
    std::thread::sleep(Duration::from_millis(300));
    let audit = fs::read_to_string(&f.agent.audit).unwrap();
    let log = f.agent.stderr().join("\n");
    for needle in ["s3cret-one", "s3cret-two"] {
        assert!(!audit.contains(needle), "secret in the audit log");
        assert!(!log.contains(needle), "secret in the agent's log");
    }
    let records = f.agent.audit_records();
    assert_eq!(
        records.iter().filter(|r| r["decision"] == "allow").count(),
        3
    );
    // Each echo of the secret is one credential_reflected record.
    assert_eq!(
        records
            .iter()
            .filter(|r| r["reason"] == "credential_reflected")
            .count(),
        3,
        "{records:#?}"
    );
}

#[test]
fn a_bad_upstream_certificate_gives_502_and_the_credential_is_never_sent() {
    privileged_test("a_bad_upstream_certificate_gives_502_and_the_credential_is_never_sent");
    let pki = TestPki::new();
    let upstream = TlsUpstream::start(&pki);
    // The agent trusts an unrelated CA: the upstream's certificate does not verify.
    let f = fixture(
        &pki,
        intercept_policy(upstream.port),
        &pki.path("other.crt"),
    );
    let ca = f.agent.state_dir.join("ca.crt").display().to_string();
    let out = curl_in(
        &f.managed,
        &[
            "--cacert",
            &ca,
            "-w",
            STATUS,
            &format!("https://localhost:{}/allowed/x", upstream.port),
        ],
    );
    let (status, body) = status_and_body(&out);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream_certificate_invalid"), "{body}");
    assert!(
        upstream.requests().is_empty(),
        "no request (and so no credential) reached it"
    );
}

fn passthrough_policy(port: u16) -> impl Fn(&str, &Path) -> String {
    move |managed, _| {
        format!(
            "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: localhost\n    port: {port}\n    allow_internal: true\n    tls: passthrough\n"
        )
    }
}

fn s_client(cgroup: &str, port: u16, servername: Option<&str>) -> String {
    let mut args = vec![
        "exec".to_owned(),
        "--cgroup".into(),
        cgroup.into(),
        "--".into(),
        "openssl".into(),
        "s_client".into(),
        "-connect".into(),
        format!("127.0.0.1:{port}"),
    ];
    match servername {
        Some(name) => args.extend(["-servername".into(), name.into()]),
        None => args.push("-noservername".into()),
    }
    let out = Command::new(bin())
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn passthrough_is_decided_by_sni_and_spliced_end_to_end() {
    privileged_test("passthrough_is_decided_by_sni_and_spliced_end_to_end");
    let pki = TestPki::new();
    let upstream = TlsUpstream::start(&pki);
    let f = fixture(&pki, passthrough_policy(upstream.port), &pki.path("ca.crt"));
    // Allowed SNI: the workload's TLS reaches the upstream itself (its own certificate,
    // so certificate pinning keeps working).
    let upstream_ca = pki.path("ca.crt").display().to_string();
    let out = curl_in(
        &f.managed,
        &[
            "--cacert",
            &upstream_ca,
            "-w",
            STATUS,
            &format!("https://localhost:{}/anything", upstream.port),
        ],
    );
    assert_eq!(
        status_and_body(&out).0,
        200,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(upstream.requests().len(), 1);
    // An SNI the policy does not name, and no SNI at all: closed, recorded.
    let other = s_client(&f.managed, upstream.port, Some("other.example"));
    assert!(other.contains("no peer certificate available"), "{other}");
    let none = s_client(&f.managed, upstream.port, None);
    assert!(none.contains("no peer certificate available"), "{none}");
    assert_eq!(upstream.requests().len(), 1);
    std::thread::sleep(Duration::from_millis(300));
    let records = f.agent.audit_records();
    let reasons: Vec<&str> = records
        .iter()
        .filter_map(|r| r["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"sni_not_allowed"), "{records:#?}");
    assert!(reasons.contains(&"tls_no_sni"), "{records:#?}");
    let allowed = records.iter().find(|r| r["decision"] == "allow").unwrap();
    assert_eq!(allowed["proto"], "tls");
    assert_eq!(allowed["dst"]["host"], "localhost");
    assert!(
        allowed["bytes_up"].as_u64().unwrap() > 0 && allowed["bytes_down"].as_u64().unwrap() > 0
    );
}

#[test]
fn a_client_hello_split_into_small_segments_is_handled() {
    privileged_test("a_client_hello_split_into_small_segments_is_handled");
    let pki = TestPki::new();
    let upstream = TlsUpstream::start(&pki);
    let f = fixture(&pki, passthrough_policy(upstream.port), &pki.path("ca.crt"));
    // A hand-pumped TLS client that sends its ClientHello 7 bytes at a time.
    let script = format!(
        r#"
import socket, ssl, time
ctx = ssl.create_default_context(cafile={ca:?})
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
s = socket.create_connection(("127.0.0.1", {port})); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(5)
first = True
while True:
    try:
        obj.do_handshake(); break
    except ssl.SSLWantReadError:
        data = out.read()
        if first:
            for i in range(0, len(data), 7):
                s.sendall(data[i:i+7]); time.sleep(0.003)
            first = False
        elif data:
            s.sendall(data)
        chunk = s.recv(65536)
        if not chunk: raise SystemExit("closed")
        inc.write(chunk)
obj.write(b"GET /fragmented HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
s.sendall(out.read())
resp = b""
while not resp.startswith(b"HTTP/1.1 200"):
    chunk = s.recv(65536)
    if not chunk: break
    inc.write(chunk)
    try: resp += obj.read(65536)
    except ssl.SSLWantReadError: pass
print(resp.split(b"\r\n")[0].decode())
"#,
        ca = pki.path("ca.crt").display().to_string(),
        port = upstream.port
    );
    assert_eq!(python_in(&f.managed, &script), "HTTP/1.1 200 OK");
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn ca_export_prints_the_host_ca_and_its_key_is_root_only() {
    privileged_test("ca_export_prints_the_host_ca_and_its_key_is_root_only");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(bin())
        .args(["ca", "export", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pem = String::from_utf8_lossy(&out.stdout);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = fs::metadata(state.join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // Exporting again prints the same CA.
    let again = Command::new(bin())
        .args(["ca", "export", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(again.stdout, out.stdout);
}

#[test]
fn plain_http_from_the_workload_goes_upstream_over_verified_tls() {
    privileged_test("plain_http_from_the_workload_goes_upstream_over_verified_tls");
    let pki = TestPki::new();
    let upstream = TlsUpstream::start(&pki);
    let port = upstream.port;
    let f = fixture(
        &pki,
        move |managed, secret| {
            format!(
                "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: localhost\n    port: {port}\n    allow_internal: true\n    upstream_tls: true\n    credential:\n      header: Authorization\n      format: \"Token {{secret}}\"\n      secret_file: {}\n    rules:\n      - id: read\n        methods: [GET]\n        path: /allowed/**\n",
                secret.display()
            )
        },
        &pki.path("ca.crt"),
    );
    // The workload speaks plain HTTP and needs no CA; scopegate originates verified TLS.
    let out = curl_in(
        &f.managed,
        &[
            "-w",
            STATUS,
            &format!("http://localhost:{port}/allowed/plain"),
        ],
    );
    assert_eq!(
        status_and_body(&out),
        (200, "auth=['Token **********']".to_owned())
    );
    assert!(
        upstream
            .requests()
            .last()
            .is_some_and(|r| r.ends_with("auth=['Token s3cret-one']")),
        "{:?}",
        upstream.requests()
    );
    let out = curl_in(
        &f.managed,
        &[
            "-X",
            "TRACE",
            "-w",
            STATUS,
            &format!("http://localhost:{port}/allowed/plain"),
        ],
    );
    assert_eq!(
        status_and_body(&out).0,
        403,
        "TRACE is not allowed, and never carries the credential"
    );
    assert_eq!(upstream.requests().len(), 1);
}
