//! The `scopegate` binary: argument parsing and error reporting around the library.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use scopegate::{bpf, control, exec, exit, run};
use std::time::Duration;

/// mimalloc instead of glibc's malloc: every request allocates (headers, the audit
/// record), and under the keep-alive benchmark glibc's malloc, free and consolidation
/// were 14 % of the agent's CPU (`cargo xtask bench --profile`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    ///
    /// Options come from the configuration file (--config) and the flags; a flag
    /// overrides the file.
    Run(Box<scopegate::config::RunArgs>),
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
    /// Audit tools: verify, tail, query, report, keygen.
    Audit {
        #[command(subcommand)]
        command: scopegate::audit::cli::AuditCommand,
    },
    /// The host CA used for TLS interception.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Write man pages or shell completions (used by packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Stop enforcing a held cgroup (one a policy selected once and none selects now);
    /// recorded by the running agent as `cgroup_released`.
    Release {
        /// cgroup path relative to the cgroup2 mount, e.g. /system.slice/old.service.
        cgroup: String,
        /// bpffs directory given to `run --pin-dir`.
        #[arg(long, default_value = "/sys/fs/bpf/scopegate")]
        pin_dir: PathBuf,
        /// The agent's state directory (who asked is left there for the agent's record).
        #[arg(long, default_value = "/var/lib/scopegate")]
        state_dir: PathBuf,
        /// Seconds to wait for the running agent to apply and record the release.
        #[arg(long, default_value_t = 10.0)]
        wait_secs: f64,
    },
    /// Remove the pinned hooks and maps: enforcement stops. Refused while an agent runs on
    /// the pin directory, unless --force.
    Uninstall {
        /// bpffs directory given to `run --pin-dir`.
        #[arg(long, default_value = "/sys/fs/bpf/scopegate")]
        pin_dir: PathBuf,
        /// Remove the pins although an agent runs: enforcement stops until that agent's
        /// health check re-attaches the hooks (within its --health-interval-secs).
        #[arg(long)]
        force: bool,
    },
    /// The running agent's state, over its admin socket: version, uptime, policy, last
    /// reload, enforcement health, hooks, managed cgroups, audit, counters.
    Status(AdminArgs),
    /// The running agent's workloads, their managed cgroups and their processes.
    Workloads(AdminArgs),
    /// Reload the running agent's policy directory (as SIGHUP does) and wait for the
    /// result. Exits 0 when it took effect, 78 when the policy is invalid (the last good
    /// policy stays in force), 69 when the agent cannot be reached.
    Reload(AdminArgs),
}

/// How to reach the running agent.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The agent's admin socket (`run --admin-socket`).
    #[arg(long, value_name = "PATH", default_value = scopegate::config::defaults::ADMIN_SOCKET)]
    admin_socket: PathBuf,
    /// Print the agent's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Generate {
    /// Man pages (scopegate.1 and one per subcommand) into DIR.
    Man {
        /// Output directory.
        dir: PathBuf,
    },
    /// A completion script for SHELL on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// The JSON Schema of policy files on stdout (for editors: yaml-language-server).
    PolicySchema,
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
    scopegate::logging::init();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line per error (each message once); policy errors are one
            // `file:line:col: message` per line.
            let err: &(dyn std::error::Error + 'static) = e.as_ref();
            for line in exit::lines(err) {
                eprintln!("scopegate: error: {line}");
            }
            ExitCode::from(exit::code(err))
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let opts = args.resolve()?;
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
        Command::Policy {
            command:
                scopegate::policy::cli::PolicyCommand::Check {
                    path,
                    secrets,
                    strict,
                    expiring_within,
                },
        } => {
            // How the valid policy meets this host (a selector matching no cgroup) is a
            // warning too: `--strict` fails on it.
            let options = scopegate::policy::cli::CheckOptions {
                secrets,
                strict,
                expiring_within_days: expiring_within,
                host: &scopegate::workloads::host_warnings,
            };
            let (verdict, _) = scopegate::policy::cli::check_with(
                &path,
                &options,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            );
            Ok(ExitCode::from(verdict.code()))
        }
        Command::Policy {
            command:
                scopegate::policy::cli::PolicyCommand::Explain {
                    live: true,
                    admin_socket,
                    workload,
                    request,
                    header,
                    body,
                    at,
                    uid,
                    json,
                    ..
                },
        } => {
            let body = match body {
                None => None,
                Some(file) => Some(std::fs::read_to_string(&file).with_context(|| {
                    format!("--body {}: reading it as UTF-8 text", file.display())
                })?),
            };
            let request = control::protocol::Request {
                explain: Some(control::protocol::ExplainRequest {
                    workload,
                    request: request.unwrap_or_default(),
                    headers: header,
                    body,
                    at,
                    uid,
                    json,
                }),
                ..control::protocol::Request::new(control::protocol::Command::Explain)
            };
            let response = admin_call(&admin_socket, &request, ADMIN_TIMEOUT)?;
            let explained = response.explain.unwrap_or_default();
            println!("{}", explained.text);
            Ok(exit(explained.allowed))
        }
        Command::Policy { command } => {
            Ok(ExitCode::from(scopegate::policy::cli::run(command)?.code()))
        }
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
        Command::Generate { what } => {
            generate(what)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Release {
            cgroup,
            pin_dir,
            state_dir,
            wait_secs,
        } => {
            let wait = std::time::Duration::from_secs_f64(wait_secs.clamp(0.0, 3600.0));
            match scopegate::release::release(&cgroup, &pin_dir, &state_dir, wait)? {
                scopegate::release::Outcome::Released => {
                    println!("released {cgroup}: recorded by the agent, no longer enforced");
                    Ok(ExitCode::SUCCESS)
                }
                scopegate::release::Outcome::Pending => {
                    eprintln!(
                        "scopegate: release of {cgroup} is pending: no running agent applied it within {wait_secs} s; the cgroup stays denied until the agent runs, which then records and applies it"
                    );
                    Ok(ExitCode::from(3))
                }
            }
        }
        Command::Uninstall { pin_dir, force } => {
            let running = bpf::agent_running(&pin_dir)?;
            if running && !force {
                return Err(control::ControlError::AgentRunning { pin_dir }.into());
            }
            if running {
                eprintln!(
                    "scopegate: warning: an agent is running on {}: removing its pins anyway (--force); it will re-attach its hooks at its next health check",
                    pin_dir.display()
                );
            }
            let removed = bpf::uninstall(&pin_dir)?;
            if removed == 0 {
                return Err(control::ControlError::NothingPinned { pin_dir }.into());
            }
            println!(
                "removed {removed} pin(s) under {}; scopegate enforcement is off",
                pin_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let response = admin_call(
                &args.admin_socket,
                &control::protocol::Request::new(control::protocol::Command::Status),
                ADMIN_TIMEOUT,
            )?;
            let status = response.status.unwrap_or_default();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("{}", control::format::status(&status));
            }
            let healthy = status.enforcement.healthy && status.audit.healthy;
            Ok(exit(healthy))
        }
        Command::Workloads(args) => {
            let response = admin_call(
                &args.admin_socket,
                &control::protocol::Request::new(control::protocol::Command::Workloads),
                ADMIN_TIMEOUT,
            )?;
            let list = response.workloads.unwrap_or_default();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{}", control::format::workloads(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload(args) => {
            let response = admin_call(
                &args.admin_socket,
                &control::protocol::Request::new(control::protocol::Command::Reload),
                Duration::from_secs(90),
            )?;
            let result = response.reload.unwrap_or_default();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else if result.ok {
                println!("{}", control::format::reload(&result));
            } else {
                eprintln!("{}", control::format::reload(&result));
            }
            Ok(match (result.ok, result.errors.is_empty()) {
                (true, true) => ExitCode::SUCCESS,
                (true, false) => ExitCode::FAILURE,
                (false, _) => ExitCode::from(exit::CONFIG),
            })
        }
    }
}

/// How long the CLI waits for the agent's answer (reload: longer).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One admin socket call; an unreachable agent is exit code 69 (EX_UNAVAILABLE, see
/// `scopegate::exit`), with a message naming the socket.
fn admin_call(
    socket: &std::path::Path,
    request: &control::protocol::Request,
    timeout: Duration,
) -> anyhow::Result<control::protocol::Response> {
    Ok(control::client::call(socket, request, timeout)?)
}

/// `scopegate generate`: man pages from the clap definition (with the exit codes), or a
/// completion script.
fn generate(what: Generate) -> anyhow::Result<()> {
    match what {
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            // scopegate(1) again, with an EXIT STATUS section.
            let man = clap_mangen::Man::new(Cli::command());
            let mut page = Vec::new();
            man.render_title(&mut page)?;
            man.render_name_section(&mut page)?;
            man.render_synopsis_section(&mut page)?;
            man.render_description_section(&mut page)?;
            man.render_options_section(&mut page)?;
            man.render_subcommands_section(&mut page)?;
            page.extend_from_slice(EXIT_STATUS.as_bytes());
            man.render_version_section(&mut page)?;
            let path = dir.join(man.get_filename());
            std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
        }
        Generate::PolicySchema => print!("{}", scopegate::policy::schema::json()),
        Generate::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "scopegate",
                &mut std::io::stdout(),
            );
        }
    }
    Ok(())
}

/// The exit codes (see `scopegate::exit`) as a roff section of scopegate(1).
const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
Any other failure; it may be transient (a port in use, an unwritable audit file), so restarting can help.
.TP
\fB69\fR
A kernel feature is unavailable: no cgroup v2, no bpf filesystem, or the kernel rejected the programs.
.TP
\fB77\fR
Missing privileges: \fBscopegate run\fR needs root or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN.
.TP
\fB78\fR
A configuration or policy error: an invalid policy directory, a bad configuration file (with file:line:column), a non-loopback metrics address without \fB--metrics-allow-non-loopback\fR.
.PP
69, 77 and 78 do not go away by restarting; the systemd unit lists them in \fBRestartPreventExitStatus=\fR.
.PP
\fBscopegate policy check\fR exits 0 when the policies are valid, 1 on errors, and 2 with \fB--strict\fR when there are warnings (an empty directory, ignored files) and no errors.
"#;

/// Maps a subcommand's verdict (true: success) to the process exit code.
fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
