//! Real clients against real servers, through the real eBPF redirect: curl (HTTP/2 and
//! HTTP/1.1 via ALPN) through `tls: intercept` to nginx over TLS; pip against a PEP 503
//! index served by pypiserver; boto3 against moto's S3 with keys that differ only by a
//! trailing slash. Every server is a child process of the test on a loopback address,
//! stopped by PID; none does reverse DNS (`socket.getfqdn` is replaced before the Python
//! servers bind).
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use scopegate_e2e::{
    pki::{ChildGuard, TestPki},
    *,
};
use serde_json::Value;

struct Fixture {
    managed: String,
    agent: Agent,
    _policies: tempfile::TempDir,
    _pins: PinDir,
    _tree: CgroupTree,
    _dir: tempfile::TempDir,
}

fn fixture(policy: impl Fn(&str) -> String, extra: Vec<String>) -> Fixture {
    let tree = CgroupTree::new();
    let managed = tree.child("managed");
    let dir = tempfile::tempdir().unwrap();
    let policies = policy_dir(&[("clients.yaml", policy(&managed))]);
    let pins = PinDir::new();
    let mut config = AgentConfig::new(
        policies.path(),
        &tree,
        &pins,
        dir.path().join("audit.jsonl"),
    );
    config.extra = extra;
    let agent = Agent::start(config);
    Fixture {
        managed,
        agent,
        _policies: policies,
        _pins: pins,
        _tree: tree,
        _dir: dir,
    }
}

/// Python prelude for the test servers: no reverse DNS at bind.
const NO_RDNS: &str = "import socket\nsocket.getfqdn = lambda name='': name or 'localhost'\n";

/// nginx as a child process with its own prefix, config, pid file and logs; TLS on
/// 127.0.0.1 and [::1] (both are `localhost`), answering every request with the Host it
/// got. nginx refuses an HTTP/1.1 request without Host with 400.
struct Nginx {
    guard: ChildGuard,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    fn start(pki: &TestPki) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        for sub in ["tmp", "logs"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let port = free_port();
        let conf = format!(
            r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/logs/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format hostlog '$request_method $request_uri host=[$http_host] proto=$server_protocol status=$status';
    access_log {d}/logs/access.log hostlog;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        listen [::1]:{port} ssl http2;
        server_name localhost;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        location / {{
            default_type text/plain;
            return 200 "nginx saw host=[$http_host] uri=$request_uri\n";
        }}
    }}
}}
"#,
            crt = pki.path("server.crt").display(),
            key = pki.path("server.key").display(),
        );
        fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let mut guard = ChildGuard::spawn(
            "nginx",
            Command::new("nginx")
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .args(["-g", "daemon off;"])
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        );
        guard.wait_listening(&format!("127.0.0.1:{port}"), 10);
        Self { guard, dir, port }
    }

    fn access_log(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("logs/access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// curl's HTTP/2 (forced and ALPN-negotiated) and HTTP/1.1 through `tls: intercept` reach
/// nginx with the Host of the request (`:authority` for h2).
#[test]
fn curl_h2_and_h1_through_interception_reach_nginx_with_a_host() {
    privileged_test("curl_h2_and_h1_through_interception_reach_nginx_with_a_host");
    let pki = TestPki::new(&["localhost"], &["127.0.0.1", "::1"]);
    let nginx = Nginx::start(&pki);
    let port = nginx.port;
    let f = fixture(
        |managed| {
            format!(
                "workload: web\nselect:\n  cgroup: {managed}\negress:\n  - host: localhost\n    port: {port}\n    allow_internal: true\n    tls: intercept\n    rules:\n      - id: nginx-hello\n        methods: [GET]\n        path: /hello/**\n"
            )
        },
        vec![
            "--upstream-ca".into(),
            pki.path("ca.crt").display().to_string(),
        ],
    );
    let ca = f.agent.state_dir.join("ca.crt").display().to_string();
    let mut problems = Vec::new();
    let cases: [(&str, &[&str], &str); 3] = [
        ("h2 forced", &["--http2"], "2"),
        ("curl default (ALPN)", &[], "2"),
        ("http1.1", &["--http1.1"], "1.1"),
    ];
    for (i, (name, flags, version)) in cases.iter().enumerate() {
        let path = format!("/hello/{i}");
        let url = format!("https://localhost:{port}{path}");
        let mut args: Vec<&str> = flags.to_vec();
        args.extend([
            "--cacert",
            ca.as_str(),
            "-w",
            "\n%{http_version} %{http_code}",
            url.as_str(),
        ]);
        let out = curl_in(&f.managed, &args);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
        let want_tail = format!("{version} 200");
        let want_body = format!("nginx saw host=[localhost:{port}] uri={path}");
        if tail != want_tail || body.trim_end() != want_body {
            problems.push(format!(
                "{name}: got {tail:?} body {body:?} (expected {want_tail:?} {want_body:?}); curl: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    thread::sleep(Duration::from_millis(300));
    let log = nginx.access_log();
    eprintln!("nginx access log:\n{}", log.join("\n"));
    for (i, case) in cases.iter().enumerate() {
        let line = log
            .iter()
            .find(|l| l.starts_with(&format!("GET /hello/{i} ")));
        match line {
            Some(l)
                if l.contains(&format!("host=[localhost:{port}]")) && l.ends_with("status=200") => {
            }
            other => problems.push(format!(
                "{}: nginx logged {other:?}, expected host=[localhost:{port}] and status 200",
                case.0
            )),
        }
    }
    let records = f.agent.audit_records();
    for (i, case) in cases.iter().enumerate() {
        let path = format!("/hello/{i}");
        let r = records.iter().find(|r| r["path"] == path.as_str());
        match r {
            Some(r)
                if r["decision"] == "allow" && r["rule"] == "nginx-hello" && r["status"] == 200 => {
            }
            other => problems.push(format!(
                "{}: audit record {other:?}, expected allow by nginx-hello with status 200",
                case.0
            )),
        }
    }
    let _ = nginx.guard.pid();
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Writes a minimal pure-Python wheel `NAME-0.1-py3-none-any.whl` into `dir`.
fn build_wheel(dir: &Path, name: &str) {
    let script = format!(
        r#"
import base64, hashlib, os, zipfile
name, d = {name:?}, {dir:?}
files = {{
    name + "/__init__.py": b"VALUE = 'installed through scopegate'\n",
    name + "-0.1.dist-info/METADATA": ("Metadata-Version: 2.1\nName: " + name + "\nVersion: 0.1\nSummary: scopegate e2e test package\n").encode(),
    name + "-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: scopegate-e2e\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = ""
for path, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record += "%s,sha256=%s,%d\n" % (path, digest, len(data))
record += name + "-0.1.dist-info/RECORD,,\n"
files[name + "-0.1.dist-info/RECORD"] = record.encode()
with zipfile.ZipFile(os.path.join(d, name + "-0.1-py3-none-any.whl"), "w") as z:
    for path, data in files.items():
        z.writestr(path, data)
"#,
        dir = dir.display().to_string()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build wheel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pip install` from a PEP 503 index (pypiserver) through the redirect; the policy allows
/// GET under /simple/ and /packages/ only. pip asks for `/simple/<name>/`: the trailing
/// slash is part of the request's meaning and is forwarded and audited as sent.
#[test]
fn pip_installs_from_a_pep503_index_through_the_proxy() {
    privileged_test("pip_installs_from_a_pep503_index_through_the_proxy");
    let ip = "127.0.0.41";
    let port = free_port();
    let packages = tempfile::tempdir().unwrap();
    let name = "sgdemo";
    build_wheel(packages.path(), name);
    let server = format!(
        "{NO_RDNS}import sys\nfrom pypiserver.__main__ import main\nsys.argv = ['pypi-server', 'run', '-i', {ip:?}, '-p', '{port}', '-a', '.', '-P', '.', '--disable-fallback', '--server', 'wsgiref', {dir:?}]\nmain()\n",
        dir = packages.path().display().to_string()
    );
    let mut pypi = ChildGuard::spawn(
        "pypiserver",
        Command::new("python3")
            .args(["-c", &server])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    pypi.wait_listening(&format!("{ip}:{port}"), 20);
    let f = fixture(
        |managed| {
            format!(
                "workload: pip\nselect:\n  cgroup: {managed}\negress:\n  - host: \"{ip}\"\n    port: {port}\n    rules:\n      - id: index\n        methods: [GET]\n        path: /simple/**\n      - id: files\n        methods: [GET]\n        path: /packages/**\n"
            )
        },
        Vec::new(),
    );
    let target = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["exec", "--cgroup", &f.managed, "--", "timeout", "90"])
        .args(["python3", "-m", "pip", "install", "--no-cache-dir"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--timeout",
            "15",
        ])
        .args(["--retries", "0", "--index-url"])
        .arg(format!("http://{ip}:{port}/simple/"))
        .arg("--target")
        .arg(target.path())
        .arg(name)
        .env_remove("PIP_FIND_LINKS")
        .env_remove("PIP_NO_INDEX")
        .env_remove("PIP_INDEX_URL")
        .env_remove("PIP_EXTRA_INDEX_URL")
        .env("PIP_CONFIG_FILE", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let pip_log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let records = f.agent.audit_records();
    let summary: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {}",
                r["decision"], r["method"], r["path"], r["rule"], r["status"]
            )
        })
        .collect();
    eprintln!("pip audit:\n{}", summary.join("\n"));
    // Repeated lines (a redirect loop) once, with a count.
    let mut counted: Vec<(String, usize)> = Vec::new();
    for line in &summary {
        match counted.iter_mut().find(|(l, _)| l == line) {
            Some((_, n)) => *n += 1,
            None => counted.push((line.clone(), 1)),
        }
    }
    let summary: Vec<String> = counted
        .into_iter()
        .map(|(l, n)| if n > 1 { format!("{l} (×{n})") } else { l })
        .collect();
    let mut problems = Vec::new();
    if !out.status.success() {
        problems.push(format!("pip failed ({}):\n{pip_log}", out.status));
    }
    if !target.path().join(name).join("__init__.py").exists() {
        problems.push("the package is not installed in --target".into());
    }
    let index_path = format!("/simple/{name}/");
    if !records.iter().any(|r| {
        r["path"] == index_path.as_str() && r["decision"] == "allow" && r["rule"] == "index"
    }) {
        problems.push(format!(
            "no allow record for {index_path} (with its trailing slash); audit: {summary:#?}"
        ));
    }
    if !records.iter().any(|r| {
        r["rule"] == "files"
            && r["decision"] == "allow"
            && r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/packages/") && p.ends_with(".whl"))
    }) {
        problems.push("no allow record for the wheel download under /packages/".into());
    }
    if records.iter().any(|r| r["decision"] != "allow") {
        problems.push(format!(
            "pip needed something the policy denies: {summary:#?}"
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// boto3 against moto's S3: the keys `dir` and `dir/` are different objects, and each
/// GET returns its own content through the proxy (the trailing slash is not dropped).
#[test]
fn boto3_gets_s3_keys_that_differ_only_by_a_trailing_slash() {
    privileged_test("boto3_gets_s3_keys_that_differ_only_by_a_trailing_slash");
    let ip = "127.0.0.42";
    let port = free_port();
    let server = format!(
        "{NO_RDNS}import sys\nfrom moto.server import main\nmain(['-H', {ip:?}, '-p', '{port}'])\n"
    );
    let mut moto = ChildGuard::spawn(
        "moto",
        Command::new("python3")
            .args(["-c", &server])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    moto.wait_listening(&format!("{ip}:{port}"), 30);
    let prelude = format!(
        r#"
import os, json
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                  AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
import boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url="http://{ip}:{port}", region_name="us-east-1",
                  config=Config(s3={{"addressing_style": "path"}}, retries={{"max_attempts": 1}},
                                connect_timeout=5, read_timeout=10))
"#
    );
    // Set-up straight against moto, from outside the managed cgroup (not proxied).
    let setup = format!(
        "{prelude}s3.create_bucket(Bucket='sgbucket')\ns3.put_object(Bucket='sgbucket', Key='dir', Body=b'object dir')\ns3.put_object(Bucket='sgbucket', Key='dir/', Body=b'object dir-slash')\nprint('ok')\n"
    );
    let out = Command::new("python3")
        .args(["-c", &setup])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moto set-up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = fixture(
        |managed| {
            format!(
                "workload: s3reader\nselect:\n  cgroup: {managed}\negress:\n  - host: \"{ip}\"\n    port: {port}\n    rules:\n      - id: read-objects\n        methods: [GET]\n        path: /sgbucket/**\n        query:\n          x-id: any\n"
            )
        },
        Vec::new(),
    );
    let get = format!(
        "{prelude}out = {{}}\nfor key in ['dir', 'dir/']:\n    try:\n        out[key] = s3.get_object(Bucket='sgbucket', Key=key)['Body'].read().decode()\n    except Exception as e:\n        out[key] = 'ERROR ' + repr(e)[:300]\nprint(json.dumps(out))\n"
    );
    let got: Value = serde_json::from_str(&python_in(&f.managed, &get)).unwrap();
    let records = f.agent.audit_records();
    let summary: Vec<String> = records
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {} {}",
                r["decision"], r["method"], r["path"], r["rule"], r["status"], r["reason"]
            )
        })
        .collect();
    eprintln!("boto3 results {got}\naudit:\n{}", summary.join("\n"));
    let mut problems = Vec::new();
    if got["dir"] != "object dir" {
        problems.push(format!("key 'dir' returned {}", got["dir"]));
    }
    if got["dir/"] != "object dir-slash" {
        problems.push(format!(
            "key 'dir/' returned {} (expected its own content)",
            got["dir/"]
        ));
    }
    for path in ["/sgbucket/dir", "/sgbucket/dir/"] {
        if !records
            .iter()
            .any(|r| r["path"] == path && r["decision"] == "allow")
        {
            problems.push(format!("no allow record with path {path}: {summary:#?}"));
        }
    }
    let _ = moto.pid();
    assert!(problems.is_empty(), "{problems:#?}");
}
