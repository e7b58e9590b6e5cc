//! The agent's configuration file (`/etc/scopegate/scopegate.yaml`, another path with
//! `--config`) and the `scopegate run` flags, merged into one [`RunOptions`].
//!
//! Every `run` option has a key: the flag's name with `_` for `-` (`--proxy-port` is
//! `proxy_port`); `--no-audit-stdout` is `audit_stdout: false` and `--managed-subtree` is
//! the list `managed_subtrees`. A flag given on the command line overrides the file; a
//! list flag given at least once replaces the file's list.
//!
//! Like a policy file, the file is parsed into raw serde types with `deny_unknown_fields`
//! and then validated; every error names the file, line and column, the key and the value.
#![forbid(unsafe_code)]

use std::{
    fmt, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    audit::{Fsync, Rotation, Sinks},
    policy::position::{PositionIndex, RootKind},
    run::RunOptions,
};

/// Where `scopegate run` looks for its configuration when `--config` is not given (read
/// only if it exists).
pub const DEFAULT_PATH: &str = "/etc/scopegate/scopegate.yaml";

/// Defaults of the options that have one.
pub mod defaults {
    /// Policy directory.
    pub const POLICIES: &str = "/etc/scopegate/policies";
    /// Proxy port.
    pub const PROXY_PORT: u16 = 15001;
    /// bpffs pin directory.
    pub const PIN_DIR: &str = "/sys/fs/bpf/scopegate";
    /// State directory.
    pub const STATE_DIR: &str = "/var/lib/scopegate";
    /// The host's resolvers.
    pub const RESOLV_CONF: &str = "/etc/resolv.conf";
    /// Floor of the honoured DNS TTLs, seconds.
    pub const DNS_MIN_TTL_SECS: u64 = 5;
    /// Ceiling of the honoured DNS TTLs, seconds.
    pub const DNS_MAX_TTL_SECS: u64 = 300;
    /// Seconds between cgroup rescans.
    pub const RESCAN_SECS: f64 = 1.0;
    /// Seconds a client may take to send a request head.
    pub const HEADER_TIMEOUT_SECS: f64 = 10.0;
    /// Seconds a connection may sit with no request in flight (or a splice with no byte).
    pub const IDLE_TIMEOUT_SECS: f64 = 60.0;
    /// Seconds a request body may stall (per read; the whole of an inspected body).
    pub const BODY_TIMEOUT_SECS: f64 = 30.0;
    /// The admin socket (`scopegate status`, `workloads`, `reload`, `policy explain --live`).
    pub const ADMIN_SOCKET: &str = "/run/scopegate/admin.sock";
    /// Seconds between enforcement health checks (links attached, pins present).
    pub const HEALTH_INTERVAL_SECS: f64 = 5.0;
}

/// Errors of loading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not YAML, not a mapping, an unknown key or a value of the wrong type.
    #[error("{file}:{line}:{col}: {message}")]
    Schema {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        message: String,
    },
    /// The DNS TTL bounds do not make sense (floor above ceiling).
    #[error("{0}")]
    TtlBounds(#[from] crate::resolve::ResolveError),
    /// A value of the right type that is not allowed.
    #[error("{file}:{line}:{col}: {key}: {value}: {reason}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// The file as written: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    policies: Option<PathBuf>,
    proxy_port: Option<u16>,
    dns_port: Option<u16>,
    resolv_conf: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    audit_file: Option<PathBuf>,
    audit_stdout: Option<bool>,
    audit_journal: Option<bool>,
    audit_max_bytes: Option<u64>,
    audit_max_age_secs: Option<u64>,
    audit_keep: Option<usize>,
    audit_fsync_every_record: Option<bool>,
    audit_signing_key: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    upstream_ca: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
    metrics_allow_non_loopback: Option<bool>,
    rescan_secs: Option<f64>,
    managed_subtrees: Option<Vec<String>>,
    allow_empty: Option<bool>,
    header_timeout_secs: Option<f64>,
    idle_timeout_secs: Option<f64>,
    body_timeout_secs: Option<f64>,
    dns_min_ttl: Option<u64>,
    dns_max_ttl: Option<u64>,
    ca_name_constraints: Option<Vec<String>>,
    admin_socket: Option<PathBuf>,
    health_interval_secs: Option<f64>,
}

/// The flags of `scopegate run`. Each one overrides the configuration file's key.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RunArgs {
    /// Configuration file (YAML; every flag below has a key) [default:
    /// /etc/scopegate/scopegate.yaml, read if it exists].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of policy files (*.yaml) [default: /etc/scopegate/policies].
    #[arg(long, value_name = "DIR")]
    pub policies: Option<PathBuf>,
    /// Proxy port on 127.0.0.1 and [::1] [default: 15001].
    #[arg(long, value_name = "PORT")]
    pub proxy_port: Option<u16>,
    /// UDP port of the DNS proxy on 127.0.0.1 and [::1], where managed workloads' DNS is
    /// redirected [default: the proxy port + 1].
    #[arg(long, value_name = "PORT")]
    pub dns_port: Option<u16>,
    /// resolv.conf naming the resolvers the DNS proxy forwards `dns: system` queries to
    /// [default: /etc/resolv.conf].
    #[arg(long, value_name = "FILE")]
    pub resolv_conf: Option<PathBuf>,
    /// bpffs directory for pinned links and maps (a layout version is appended)
    /// [default: /sys/fs/bpf/scopegate].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// cgroup v2 directory to attach the hooks to [default: the cgroup2 mount].
    #[arg(long, value_name = "DIR")]
    pub cgroup_root: Option<PathBuf>,
    /// Also append audit records to this file.
    #[arg(long, value_name = "FILE")]
    pub audit_file: Option<PathBuf>,
    /// Do not write audit records to stdout (key: `audit_stdout: false`).
    #[arg(long)]
    pub no_audit_stdout: bool,
    /// Also send each audit record to the journal as its own entry
    /// (`SYSLOG_IDENTIFIER=scopegate-audit`, the record as MESSAGE), so that
    /// `journalctl -t scopegate-audit -o cat | scopegate audit verify -` checks the chain
    /// (key: `audit_journal: true`).
    #[arg(long)]
    pub audit_journal: bool,
    /// Rotate the audit file before it exceeds this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub audit_max_bytes: Option<u64>,
    /// Rotate the audit file when its first record is older than this many seconds.
    #[arg(long, value_name = "SECS")]
    pub audit_max_age_secs: Option<u64>,
    /// Keep this many rotated audit files [default: all].
    #[arg(long, value_name = "N")]
    pub audit_keep: Option<usize>,
    /// fsync the audit file after every write instead of in batches (at most 4096
    /// records or 100 ms unsynced).
    #[arg(long)]
    pub audit_fsync_every_record: bool,
    /// ed25519 key (PKCS#8 PEM; generated if missing) for signed checkpoints in the
    /// audit stream; verify with `scopegate audit verify --pubkey KEY.pub`.
    #[arg(long, value_name = "FILE")]
    pub audit_signing_key: Option<PathBuf>,
    /// State directory (created 0700): holds the host CA for TLS interception
    /// [default: /var/lib/scopegate].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// PEM bundle of trust roots for upstream TLS [default: the system's roots].
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// Serve Prometheus metrics (/metrics) and health (/healthz) on this loopback
    /// address.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Allow a non-loopback --metrics-addr (for example 0.0.0.0:9464 for a remote
    /// Prometheus). /metrics and /healthz have no authentication: restrict who can reach
    /// the port (firewall, a private interface).
    #[arg(long)]
    pub metrics_allow_non_loopback: bool,
    /// Seconds between cgroup rescans (the kernel already applies a managed parent's
    /// policy to new children; the rescan refreshes names and paths for the audit)
    /// [default: 1].
    #[arg(long, value_name = "SECS")]
    pub rescan_secs: Option<f64>,
    /// A managed slice (cgroup path relative to the cgroup2 mount, repeatable): every
    /// cgroup below it without a policy of its own is denied everything, recorded.
    #[arg(long = "managed-subtree", value_name = "PATH")]
    pub managed_subtrees: Vec<String>,
    /// Start deny-all when the policy directory is invalid, instead of refusing.
    #[arg(long)]
    pub allow_empty: bool,
    /// Seconds a client may take to send a request head (a new connection, or the next
    /// request on a keep-alive one); then the connection is closed, recorded
    /// [default: 10; clamped to 0.1..=3600].
    #[arg(long, value_name = "SECS")]
    pub header_timeout_secs: Option<f64>,
    /// Seconds a connection may sit idle: an HTTP/1 keep-alive connection waiting for its
    /// next request, an HTTP/2 connection with no open stream, a TLS passthrough splice
    /// with no byte either way (its outcome record says `idle_timeout`); then it is closed
    /// [default: 60; clamped to 0.1..=86400].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout_secs: Option<f64>,
    /// Seconds a request body may stall: a body a rule inspects must arrive whole within
    /// it (408 `body_timeout`), a streamed body may not pause longer between reads (cut,
    /// the upstream request aborted, the outcome recorded as `body_timeout`)
    /// [default: 30; clamped to 0.1..=3600].
    #[arg(long, value_name = "SECS")]
    pub body_timeout_secs: Option<f64>,
    /// Floor of the DNS TTLs honoured for destination binding, in seconds [default: 5].
    #[arg(long, value_name = "SECS")]
    pub dns_min_ttl: Option<u64>,
    /// Ceiling of the DNS TTLs honoured for destination binding, in seconds [default: 300].
    #[arg(long, value_name = "SECS")]
    pub dns_max_ttl: Option<u64>,
    /// Create the host CA with X.509 name constraints: it can only issue for these DNS
    /// suffixes (comma-separated, e.g. example.com,internal.test). An existing CA with
    /// other constraints is refused.
    #[arg(long, value_name = "SUFFIX,...", value_delimiter = ',')]
    pub ca_name_constraints: Vec<String>,
    /// Unix socket for `scopegate status`, `workloads`, `reload` and `policy explain
    /// --live` (mode 0660, group `scopegate` if that group exists)
    /// [default: /run/scopegate/admin.sock].
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Seconds between enforcement health checks: programs attached, links and maps
    /// pinned; what is missing is re-attached at once [default: 5].
    #[arg(long, value_name = "SECS")]
    pub health_interval_secs: Option<f64>,
}

impl RunArgs {
    /// Reads the configuration file (`--config`, or [`DEFAULT_PATH`] if it exists) and
    /// lays the flags over it.
    pub fn resolve(self) -> Result<RunOptions, ConfigError> {
        let raw = match &self.config {
            Some(path) => load(path, self.metrics_allow_non_loopback)?,
            None if Path::new(DEFAULT_PATH).exists() => {
                load(Path::new(DEFAULT_PATH), self.metrics_allow_non_loopback)?
            }
            None => Raw::default(),
        };
        let dns_ttl = crate::resolve::TtlBounds::new(
            Duration::from_secs(
                self.dns_min_ttl
                    .or(raw.dns_min_ttl)
                    .unwrap_or(defaults::DNS_MIN_TTL_SECS),
            ),
            Duration::from_secs(
                self.dns_max_ttl
                    .or(raw.dns_max_ttl)
                    .unwrap_or(defaults::DNS_MAX_TTL_SECS),
            ),
        )?;
        Ok(self.over(raw, dns_ttl))
    }

    /// Lays the flags over the file's values, then the defaults under both.
    fn over(self, file: Raw, dns_ttl: crate::resolve::TtlBounds) -> RunOptions {
        let subtrees = if self.managed_subtrees.is_empty() {
            file.managed_subtrees.unwrap_or_default()
        } else {
            self.managed_subtrees
        };
        let rescan = self
            .rescan_secs
            .or(file.rescan_secs)
            .unwrap_or(defaults::RESCAN_SECS);
        let header_timeout = self
            .header_timeout_secs
            .or(file.header_timeout_secs)
            .filter(|s| s.is_finite())
            .unwrap_or(defaults::HEADER_TIMEOUT_SECS);
        let idle_timeout = self
            .idle_timeout_secs
            .or(file.idle_timeout_secs)
            .filter(|s| s.is_finite())
            .unwrap_or(defaults::IDLE_TIMEOUT_SECS);
        let body_timeout = self
            .body_timeout_secs
            .or(file.body_timeout_secs)
            .filter(|s| s.is_finite())
            .unwrap_or(defaults::BODY_TIMEOUT_SECS);
        let health = self
            .health_interval_secs
            .or(file.health_interval_secs)
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(defaults::HEALTH_INTERVAL_SECS);
        let fsync_every =
            self.audit_fsync_every_record || file.audit_fsync_every_record == Some(true);
        let proxy_port = self
            .proxy_port
            .or(file.proxy_port)
            .unwrap_or(defaults::PROXY_PORT);
        RunOptions {
            policies: self
                .policies
                .or(file.policies)
                .unwrap_or_else(|| defaults::POLICIES.into()),
            proxy_port,
            dns_port: self
                .dns_port
                .or(file.dns_port)
                .unwrap_or_else(|| proxy_port.wrapping_add(1)),
            resolv_conf: self
                .resolv_conf
                .or(file.resolv_conf)
                .unwrap_or_else(|| defaults::RESOLV_CONF.into()),
            pin_dir: self
                .pin_dir
                .or(file.pin_dir)
                .unwrap_or_else(|| defaults::PIN_DIR.into()),
            cgroup_root: self.cgroup_root.or(file.cgroup_root),
            audit: Sinks {
                stdout: !self.no_audit_stdout && file.audit_stdout.unwrap_or(true),
                journal: self.audit_journal || file.audit_journal == Some(true),
                file: self.audit_file.or(file.audit_file),
                rotation: Rotation {
                    max_bytes: self.audit_max_bytes.or(file.audit_max_bytes),
                    max_age: self
                        .audit_max_age_secs
                        .or(file.audit_max_age_secs)
                        .map(Duration::from_secs),
                    keep: self.audit_keep.or(file.audit_keep),
                },
                fsync: if fsync_every {
                    Fsync::EveryRecord
                } else {
                    Fsync::default()
                },
                signing_key: self.audit_signing_key.or(file.audit_signing_key),
                ..Sinks::default()
            },
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            metrics_allow_non_loopback: self.metrics_allow_non_loopback
                || file.metrics_allow_non_loopback == Some(true),
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| defaults::STATE_DIR.into()),
            upstream_ca: self.upstream_ca.or(file.upstream_ca),
            rescan: Duration::from_secs_f64(if rescan.is_finite() {
                rescan.max(0.05)
            } else {
                defaults::RESCAN_SECS
            }),
            managed_subtrees: subtrees,
            allow_empty: self.allow_empty || file.allow_empty == Some(true),
            timeouts: crate::state::Timeouts {
                header: Duration::from_secs_f64(header_timeout.clamp(0.1, 3600.0)),
                idle: Duration::from_secs_f64(idle_timeout.clamp(0.1, 86_400.0)),
                body: Duration::from_secs_f64(body_timeout.clamp(0.1, 3600.0)),
            },
            dns_ttl,
            admin_socket: self
                .admin_socket
                .or(file.admin_socket)
                .unwrap_or_else(|| defaults::ADMIN_SOCKET.into()),
            health_interval: Duration::from_secs_f64(health.clamp(0.05, 3600.0)),
            ca_name_constraints: if self.ca_name_constraints.is_empty() {
                file.ca_name_constraints.unwrap_or_default()
            } else {
                self.ca_name_constraints
            },
        }
    }
}

/// Reads and validates a configuration file.
/// `allow_non_loopback`: the `--metrics-allow-non-loopback` flag (the file's key also allows).
fn load(path: &Path, allow_non_loopback: bool) -> Result<Raw, ConfigError> {
    let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })?;
    parse(path, &text, allow_non_loopback)
}

/// Parses and validates the text of a configuration file named `file`.
fn parse(file: &Path, text: &str, allow_non_loopback: bool) -> Result<Raw, ConfigError> {
    let schema = |line: usize, col: usize, message: String| ConfigError::Schema {
        file: file.to_owned(),
        line,
        col,
        message,
    };
    let index = PositionIndex::build(text).map_err(|e| schema(e.pos.line, e.pos.col, e.message))?;
    if let Some(pos) = index.second_document() {
        return Err(schema(
            pos.line,
            pos.col,
            "a configuration file holds one YAML document".into(),
        ));
    }
    let raw: Raw = match index.root() {
        RootKind::Empty => Raw::default(),
        RootKind::Mapping => serde_yaml::from_str(text).map_err(|e| {
            let mut message = e.to_string();
            let (line, col) = match e.location() {
                Some(loc) => {
                    let suffix = format!(" at line {} column {}", loc.line(), loc.column());
                    if let Some(at) = message.find(&suffix) {
                        message.replace_range(at..at + suffix.len(), "");
                    }
                    (loc.line(), loc.column())
                }
                None => (1, 1),
            };
            schema(line, col, message)
        })?,
        RootKind::Scalar | RootKind::Sequence => {
            return Err(schema(
                1,
                1,
                "expected a mapping of option names to values (e.g. `proxy_port: 15001`)".into(),
            ));
        }
    };
    validate(file, &index, &raw, allow_non_loopback)?;
    Ok(raw)
}

/// Checks the values serde accepted by type.
fn validate(
    file: &Path,
    index: &PositionIndex,
    raw: &Raw,
    allow_non_loopback: bool,
) -> Result<(), ConfigError> {
    let invalid = |key: &'static str, value: &dyn fmt::Display, reason: &'static str| {
        let pos = index.locate(key);
        ConfigError::Invalid {
            file: file.to_owned(),
            line: pos.line,
            col: pos.col,
            key,
            value: value.to_string(),
            reason,
        }
    };
    if let Some(secs) = raw.rescan_secs
        && !(secs.is_finite() && secs > 0.0)
    {
        return Err(invalid(
            "rescan_secs",
            &secs,
            "must be a positive number of seconds",
        ));
    }
    for (key, value) in [
        ("health_interval_secs", raw.health_interval_secs),
        ("header_timeout_secs", raw.header_timeout_secs),
        ("idle_timeout_secs", raw.idle_timeout_secs),
        ("body_timeout_secs", raw.body_timeout_secs),
    ] {
        if let Some(secs) = value
            && !(secs.is_finite() && secs > 0.0)
        {
            return Err(invalid(key, &secs, "must be a positive number of seconds"));
        }
    }
    let allow_non_loopback = allow_non_loopback || raw.metrics_allow_non_loopback == Some(true);
    if let Some(addr) = raw.metrics_addr
        && !addr.ip().is_loopback()
        && !allow_non_loopback
    {
        return Err(invalid(
            "metrics_addr",
            &addr,
            "must be a loopback address (127.0.0.0/8 or [::1]) unless metrics_allow_non_loopback: true (or --metrics-allow-non-loopback) is set",
        ));
    }
    for (i, subtree) in raw.managed_subtrees.iter().flatten().enumerate() {
        if !subtree.starts_with('/') || subtree.split('/').any(|c| c == "..") {
            let pos = index.locate(&format!("managed_subtrees[{i}]"));
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                line: pos.line,
                col: pos.col,
                key: "managed_subtrees",
                value: subtree.clone(),
                reason: "must be an absolute cgroup path (relative to the cgroup2 mount) without `..`",
            });
        }
    }
    let paths = [
        ("policies", &raw.policies),
        ("pin_dir", &raw.pin_dir),
        ("cgroup_root", &raw.cgroup_root),
        ("audit_file", &raw.audit_file),
        ("audit_signing_key", &raw.audit_signing_key),
        ("state_dir", &raw.state_dir),
        ("upstream_ca", &raw.upstream_ca),
        ("admin_socket", &raw.admin_socket),
    ];
    for (key, path) in paths {
        if let Some(path) = path
            && !path.is_absolute()
        {
            return Err(invalid(
                key,
                &path.display(),
                "must be an absolute path (the agent's working directory is not defined)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(Path::new("/etc/scopegate/scopegate.yaml"), text, false)
            .unwrap_err()
            .to_string()
    }

    fn opts(text: &str, args: RunArgs) -> RunOptions {
        let allow = args.metrics_allow_non_loopback;
        args.over(
            parse(Path::new("c.yaml"), text, allow).unwrap(),
            crate::resolve::TtlBounds::default(),
        )
    }

    #[test]
    fn every_key_is_read() {
        let text = "\
policies: /srv/policies
proxy_port: 16000
pin_dir: /sys/fs/bpf/sg
cgroup_root: /sys/fs/cgroup/system.slice
audit_file: /var/log/scopegate/audit.jsonl
audit_stdout: false
audit_journal: true
audit_max_bytes: 1000000
audit_max_age_secs: 3600
audit_keep: 5
audit_fsync_every_record: true
audit_signing_key: /var/lib/scopegate/audit.key
state_dir: /var/lib/sg
upstream_ca: /etc/ssl/bundle.pem
metrics_addr: 127.0.0.1:9464
rescan_secs: 2.5
managed_subtrees: [/workloads.slice]
allow_empty: true
admin_socket: /run/sg/admin.sock
health_interval_secs: 2
header_timeout_secs: 4
idle_timeout_secs: 45
body_timeout_secs: 7.5
";
        let o = opts(text, RunArgs::default());
        assert_eq!(o.policies, Path::new("/srv/policies"));
        assert_eq!(o.proxy_port, 16000);
        assert_eq!(o.pin_dir, Path::new("/sys/fs/bpf/sg"));
        assert_eq!(
            o.cgroup_root.as_deref(),
            Some(Path::new("/sys/fs/cgroup/system.slice"))
        );
        assert!(!o.audit.stdout);
        assert!(o.audit.journal);
        assert_eq!(
            o.audit.file.as_deref(),
            Some(Path::new("/var/log/scopegate/audit.jsonl"))
        );
        assert_eq!(o.audit.rotation.max_bytes, Some(1_000_000));
        assert_eq!(o.audit.rotation.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(o.audit.rotation.keep, Some(5));
        assert_eq!(o.audit.fsync, Fsync::EveryRecord);
        assert_eq!(
            o.audit.signing_key.as_deref(),
            Some(Path::new("/var/lib/scopegate/audit.key"))
        );
        assert_eq!(o.state_dir, Path::new("/var/lib/sg"));
        assert_eq!(
            o.upstream_ca.as_deref(),
            Some(Path::new("/etc/ssl/bundle.pem"))
        );
        assert_eq!(o.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(o.rescan, Duration::from_millis(2500));
        assert_eq!(o.managed_subtrees, ["/workloads.slice"]);
        assert!(o.allow_empty);
        assert_eq!(o.admin_socket, Path::new("/run/sg/admin.sock"));
        assert_eq!(o.health_interval, Duration::from_secs(2));
        assert_eq!(o.timeouts.header, Duration::from_secs(4));
        assert_eq!(o.timeouts.idle, Duration::from_secs(45));
        assert_eq!(o.timeouts.body, Duration::from_millis(7500));
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let args = RunArgs {
            proxy_port: Some(17000),
            policies: Some("/tmp/p".into()),
            managed_subtrees: vec!["/a.slice".into()],
            ..RunArgs::default()
        };
        let o = opts(
            "proxy_port: 16000\npolicies: /srv/p\nmanaged_subtrees: [/b.slice]\nrescan_secs: 3\n",
            args,
        );
        assert_eq!(o.proxy_port, 17000);
        assert_eq!(o.policies, Path::new("/tmp/p"));
        assert_eq!(o.managed_subtrees, ["/a.slice"]);
        assert_eq!(o.rescan, Duration::from_secs(3), "from the file");
        assert_eq!(o.pin_dir, Path::new(defaults::PIN_DIR));
        assert_eq!(o.state_dir, Path::new(defaults::STATE_DIR));
        assert_eq!(o.admin_socket, Path::new(defaults::ADMIN_SOCKET));
        assert_eq!(o.health_interval, Duration::from_secs(5));
        assert_eq!(o.timeouts, crate::state::Timeouts::default());
        assert!(o.audit.stdout);
        let t = opts(
            "idle_timeout_secs: 20\nbody_timeout_secs: 9\n",
            RunArgs {
                idle_timeout_secs: Some(2.0),
                body_timeout_secs: Some(1e9),
                ..RunArgs::default()
            },
        )
        .timeouts;
        assert_eq!(t.idle, Duration::from_secs(2), "the flag wins");
        assert_eq!(t.body, Duration::from_secs(3600), "clamped");
        let off = opts(
            "audit_stdout: true\n",
            RunArgs {
                no_audit_stdout: true,
                ..RunArgs::default()
            },
        );
        assert!(!off.audit.stdout, "--no-audit-stdout wins over the file");
        assert!(!off.audit.journal, "the journal sink is off by default");
        let journal = |text: &str, flag: bool| {
            opts(
                text,
                RunArgs {
                    audit_journal: flag,
                    ..RunArgs::default()
                },
            )
            .audit
            .journal
        };
        assert!(journal("", true));
        assert!(journal("audit_journal: true\n", false));
        assert!(!journal("audit_journal: false\n", false));
    }

    #[test]
    fn empty_and_comment_only_files_mean_defaults() {
        for text in ["", "# nothing here\n"] {
            let o = opts(text, RunArgs::default());
            assert_eq!(o.proxy_port, defaults::PROXY_PORT);
            assert_eq!(o.policies, Path::new(defaults::POLICIES));
        }
    }

    #[test]
    fn unknown_keys_are_errors_with_file_line_and_column() {
        let e = err("proxy_port: 15001\n\npolices: /etc/scopegate/policies\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:3:1: "), "{e}");
        assert!(e.contains("unknown field `polices`"), "{e}");
        assert!(e.contains("expected one of"), "{e}");
    }

    #[test]
    fn wrong_types_are_errors_with_position() {
        let e = err("rescan_secs: 1\nproxy_port: fifteen\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:2:13: "), "{e}");
        assert!(e.contains("proxy_port"), "{e}");
        let e = err("proxy_port: 70000\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:1:13: "), "{e}");
        let e = err("allow_empty: maybe\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:1:14: "), "{e}");
        let e = err("metrics_addr: localhost\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:1:15: "), "{e}");
        let e = err("managed_subtrees: /a.slice\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:1:19: "), "{e}");
    }

    #[test]
    fn a_non_loopback_metrics_address_needs_the_explicit_key_or_flag() {
        let text = "metrics_addr: 0.0.0.0:9464\n";
        assert!(
            err(text).contains("must be a loopback address"),
            "{}",
            err(text)
        );
        let o = opts(
            "metrics_addr: 0.0.0.0:9464\nmetrics_allow_non_loopback: true\n",
            RunArgs::default(),
        );
        assert_eq!(o.metrics_addr, Some("0.0.0.0:9464".parse().unwrap()));
        assert!(o.metrics_allow_non_loopback);
        let flag = RunArgs {
            metrics_allow_non_loopback: true,
            ..RunArgs::default()
        };
        let o = opts(text, flag);
        assert_eq!(o.metrics_addr, Some("0.0.0.0:9464".parse().unwrap()));
        assert!(o.metrics_allow_non_loopback);
        // `false` in the file keeps the refusal; a wrong type is an error with position.
        assert!(
            err("metrics_allow_non_loopback: false\nmetrics_addr: 0.0.0.0:9464\n")
                .starts_with("/etc/scopegate/scopegate.yaml:2:15: metrics_addr: 0.0.0.0:9464: ")
        );
        assert!(
            err("metrics_allow_non_loopback: yes please\n")
                .starts_with("/etc/scopegate/scopegate.yaml:1:29: ")
        );
        // Loopback stays allowed without it.
        assert!(
            !opts("metrics_addr: \"[::1]:9464\"\n", RunArgs::default()).metrics_allow_non_loopback
        );
    }

    #[test]
    fn bad_values_are_errors_naming_key_value_and_reason() {
        assert_eq!(
            err("proxy_port: 15001\nrescan_secs: -1\n"),
            "/etc/scopegate/scopegate.yaml:2:14: rescan_secs: -1: must be a positive number of seconds"
        );
        assert_eq!(
            err("metrics_addr: 192.0.2.1:9464\n"),
            "/etc/scopegate/scopegate.yaml:1:15: metrics_addr: 192.0.2.1:9464: must be a loopback address (127.0.0.0/8 or [::1]) unless metrics_allow_non_loopback: true (or --metrics-allow-non-loopback) is set"
        );
        let e = err("managed_subtrees:\n  - /ok.slice\n  - ../etc\n");
        assert!(
            e.starts_with("/etc/scopegate/scopegate.yaml:3:5: managed_subtrees: ../etc: "),
            "{e}"
        );
        assert_eq!(
            err("health_interval_secs: 0\n"),
            "/etc/scopegate/scopegate.yaml:1:23: health_interval_secs: 0: must be a positive number of seconds"
        );
        assert_eq!(
            err("proxy_port: 1\nidle_timeout_secs: -5\n"),
            "/etc/scopegate/scopegate.yaml:2:20: idle_timeout_secs: -5: must be a positive number of seconds"
        );
        assert_eq!(
            err("body_timeout_secs: 0\n"),
            "/etc/scopegate/scopegate.yaml:1:20: body_timeout_secs: 0: must be a positive number of seconds"
        );
        assert_eq!(
            err("header_timeout_secs: .nan\n"),
            "/etc/scopegate/scopegate.yaml:1:22: header_timeout_secs: NaN: must be a positive number of seconds"
        );
        let e = err("body_timeout_secs: soon\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:1:20: "), "{e}");
        let e = err("admin_socket: admin.sock\n");
        assert!(
            e.starts_with("/etc/scopegate/scopegate.yaml:1:15: admin_socket: admin.sock: "),
            "{e}"
        );
        let e = err("state_dir: var/lib/scopegate\n");
        assert!(
            e.starts_with("/etc/scopegate/scopegate.yaml:1:12: state_dir: var/lib/scopegate: "),
            "{e}"
        );
    }

    #[test]
    fn broken_yaml_and_wrong_shapes_are_errors() {
        let e = err("proxy_port: [15001\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:"), "{e}");
        let e = err("- proxy_port: 1\n");
        assert!(e.contains("expected a mapping"), "{e}");
        let e = err("just a string\n");
        assert!(e.contains("expected a mapping"), "{e}");
        let e = err("proxy_port: 1\n---\nproxy_port: 2\n");
        assert!(e.starts_with("/etc/scopegate/scopegate.yaml:2:1: "), "{e}");
        assert!(e.contains("one YAML document"), "{e}");
        let e = err("proxy_port: 1\nproxy_port: 2\n");
        assert!(e.contains("duplicate"), "{e}");
    }

    #[test]
    fn unreadable_files_name_the_file() {
        let e = load(Path::new("/nonexistent/scopegate.yaml"), false).unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/scopegate.yaml: "),
            "{e}"
        );
    }
}
