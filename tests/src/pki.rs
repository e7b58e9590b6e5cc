//! A throwaway test CA and server certificates made with openssl, and a child-process
//! guard for third-party servers (nginx, pypiserver, moto) that stops them by PID.

use std::{
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

/// A test CA plus one server certificate (`server.crt`, `server.key`) for some names.
pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    /// A CA and a server certificate whose subjectAltNames are `dns_names` (DNS) and
    /// `ips` (IP addresses).
    pub fn new(dns_names: &[&str], ips: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=scopegate e2e client-test CA",
        ]);
        run(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        let cn = format!(
            "/CN={}",
            dns_names.first().or(ips.first()).unwrap_or(&"test")
        );
        csr.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", &cn]);
        run(&csr);
        let sans: Vec<String> = dns_names
            .iter()
            .map(|n| format!("DNS:{n}"))
            .chain(ips.iter().map(|i| format!("IP:{i}")))
            .collect();
        fs::write(
            dir.path().join("ext.cnf"),
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth\n",
                sans.join(",")
            ),
        )
        .expect("write ext.cnf");
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
        Self { dir }
    }

    /// A file of the PKI directory (`ca.crt`, `server.crt`, `server.key`).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// A child process stopped by PID on drop (SIGTERM, then SIGKILL after 3 s).
pub struct ChildGuard {
    child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl ChildGuard {
    /// Spawns `cmd`.
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e} (is it installed? `cargo xtask setup`)"));
        Self {
            child,
            name: name.to_owned(),
        }
    }

    /// Waits until `addr` accepts TCP connections (at most `secs`), failing if the child
    /// exits first.
    pub fn wait_listening(&mut self, addr: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_millis(200))
                .is_ok()
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before listening on {addr}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not listening on {addr} after {secs} s",
                self.name
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-15", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
