//! The `scopegate` binary: argument parsing and error reporting around the library.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use scopegate::{
    audit::{Fsync, Rotation, Sinks},
    bpf, exec,
    run::{self, RunOptions},
};

/// Host-level least-privilege enforcement for workloads' outbound API calls.
#[derive(Debug, Parser)]
#[command(name = "scopegate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: attach the hooks, serve the proxy, enforce the policies.
    Run {
        /// Directory of policy files (*.yaml).
        #[arg(long, default_value = "/etc/scopegate/policies")]
        policies: PathBuf,
        /// Proxy port on 127.0.0.1 and [::1].
        #[arg(long, default_value_t = 15001)]
        proxy_port: u16,
        /// bpffs directory for pinned links and maps (a layout version is appended).
        #[arg(long, default_value = "/sys/fs/bpf/scopegate")]
        pin_dir: PathBuf,
        /// cgroup v2 directory to attach the hooks to (default: the cgroup2 mount).
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Also append audit records to this file.
        #[arg(long)]
        audit_file: Option<PathBuf>,
        /// Do not write audit records to stdout.
        #[arg(long)]
        no_audit_stdout: bool,
        /// Rotate the audit file before it exceeds this many bytes.
        #[arg(long, value_name = "BYTES")]
        audit_max_bytes: Option<u64>,
        /// Rotate the audit file when its first record is older than this many seconds.
        #[arg(long, value_name = "SECS")]
        audit_max_age_secs: Option<u64>,
        /// Keep this many rotated audit files (default: all).
        #[arg(long, value_name = "N")]
        audit_keep: Option<usize>,
        /// fsync the audit file after every write instead of in batches (at most 4096
        /// records or 100 ms unsynced).
        #[arg(long)]
        audit_fsync_every_record: bool,
        /// ed25519 key (PKCS#8 PEM; generated if missing) for signed checkpoints in the
        /// audit stream; verify with `scopegate audit verify --pubkey KEY.pub`.
        #[arg(long, value_name = "FILE")]
        audit_signing_key: Option<PathBuf>,
        /// State directory (created 0700): holds the host CA for TLS interception.
        #[arg(long, default_value = "/var/lib/scopegate")]
        state_dir: PathBuf,
        /// PEM bundle of trust roots for upstream TLS (default: the system's roots).
        #[arg(long, value_name = "FILE")]
        upstream_ca: Option<PathBuf>,
        /// Serve Prometheus metrics (/metrics) and health (/healthz) on this loopback
        /// address.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Seconds between cgroup rescans (the kernel already applies a managed parent's
        /// policy to new children; the rescan refreshes names and paths for the audit).
        #[arg(long, default_value_t = 1.0)]
        rescan_secs: f64,
        /// A managed slice (cgroup path relative to the cgroup2 mount, repeatable): every
        /// cgroup below it without a policy of its own is denied everything, recorded.
        #[arg(long = "managed-subtree", value_name = "PATH")]
        managed_subtrees: Vec<String>,
        /// Start deny-all when the policy directory is invalid, instead of refusing.
        #[arg(long)]
        allow_empty: bool,
        /// Resolver configuration for the agent's own DNS (destination binding) and for
        /// the resolvers that `dns: system` allows.
        #[arg(long, value_name = "PATH", default_value = "/etc/resolv.conf")]
        resolv_conf: PathBuf,
        /// Floor of the DNS TTLs honoured for destination binding, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 5)]
        dns_min_ttl: u64,
        /// Ceiling of the DNS TTLs honoured for destination binding, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        dns_max_ttl: u64,
        /// Create the host CA with X.509 name constraints: it can only issue for these DNS
        /// suffixes (comma-separated, e.g. example.com,internal.test). An existing CA
        /// with other constraints is refused.
        #[arg(long, value_name = "SUFFIX,...", value_delimiter = ',')]
        ca_name_constraints: Vec<String>,
    },
    /// Run a command inside a cgroup (created if needed).
    Exec {
        /// cgroup path relative to the cgroup2 mount, e.g. /scopegate-demo/app.
        #[arg(long)]
        cgroup: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Policy tools: check, explain.
    Policy {
        #[command(subcommand)]
        command: scopegate::policy::cli::PolicyCommand,
    },
    /// Audit tools: verify, tail, query.
    Audit {
        #[command(subcommand)]
        command: scopegate::audit::cli::AuditCommand,
    },
    /// The host CA used for TLS interception.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Remove the pinned hooks and maps: enforcement stops.
    Uninstall {
        /// bpffs directory given to `run --pin-dir`.
        #[arg(long, default_value = "/sys/fs/bpf/scopegate")]
        pin_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the host CA certificate (PEM) for the system trust store; creates the CA if
    /// it does not exist yet.
    Export {
        /// The agent's state directory.
        #[arg(long, default_value = "/var/lib/scopegate")]
        state_dir: PathBuf,
        /// Name constraints for a CA created now, and checked against an existing one
        /// (as `run --ca-name-constraints`); without it, an existing CA is exported as is.
        #[arg(long, value_name = "SUFFIX,...", value_delimiter = ',')]
        ca_name_constraints: Option<Vec<String>>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SCOPEGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line per error; policy errors are one `file:line:col: message` per line.
            for line in format!("{e:#}").lines() {
                eprintln!("scopegate: error: {line}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            policies,
            proxy_port,
            pin_dir,
            cgroup_root,
            audit_file,
            no_audit_stdout,
            audit_max_bytes,
            audit_max_age_secs,
            audit_keep,
            audit_fsync_every_record,
            audit_signing_key,
            metrics_addr,
            state_dir,
            upstream_ca,
            rescan_secs,
            managed_subtrees,
            allow_empty,
            resolv_conf,
            dns_min_ttl,
            dns_max_ttl,
            ca_name_constraints,
        } => {
            let opts = RunOptions {
                policies,
                proxy_port,
                pin_dir,
                cgroup_root,
                audit: Sinks {
                    stdout: !no_audit_stdout,
                    file: audit_file,
                    rotation: Rotation {
                        max_bytes: audit_max_bytes,
                        max_age: audit_max_age_secs.map(Duration::from_secs),
                        keep: audit_keep,
                    },
                    fsync: if audit_fsync_every_record {
                        Fsync::EveryRecord
                    } else {
                        Fsync::default()
                    },
                    signing_key: audit_signing_key,
                    ..Sinks::default()
                },
                metrics_addr,
                state_dir,
                upstream_ca,
                rescan: Duration::from_secs_f64(rescan_secs.max(0.05)),
                managed_subtrees,
                allow_empty,
                resolv_conf,
                dns_ttl: scopegate::resolve::TtlBounds::new(
                    Duration::from_secs(dns_min_ttl),
                    Duration::from_secs(dns_max_ttl),
                )?,
                ca_name_constraints,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(run::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec { cgroup, command } => match exec::exec(&cgroup, &command) {
            Ok(never) => match never {},
            Err(e) => Err(e.into()),
        },
        Command::Policy { command } => Ok(exit(scopegate::policy::cli::run(command)?)),
        Command::Audit { command } => Ok(exit(scopegate::audit::cli::run(command)?)),
        Command::Ca {
            command:
                CaCommand::Export {
                    state_dir,
                    ca_name_constraints,
                },
        } => {
            let ca =
                scopegate::tls::HostCa::load_or_create(&state_dir, ca_name_constraints.as_deref())?;
            print!("{}", ca.cert_pem());
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall { pin_dir } => {
            let removed = bpf::uninstall(&pin_dir)?;
            println!(
                "removed {removed} pin(s) under {}; scopegate enforcement is off",
                pin_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Maps a subcommand's verdict (true: success) to the process exit code.
fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
