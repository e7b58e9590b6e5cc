//! The `scopegate` binary: argument parsing and error reporting around the library.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use scopegate::{bpf, exec, exit, run};

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
    /// Remove the pinned hooks and maps: enforcement stops.
    Uninstall {
        /// bpffs directory given to `run --pin-dir`.
        #[arg(long, default_value = "/sys/fs/bpf/scopegate")]
        pin_dir: PathBuf,
    },
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
            let (verdict, snapshot) = scopegate::policy::cli::check(
                &path,
                secrets,
                strict,
                expiring_within,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr().lock(),
            );
            // Notes only (exit code unchanged): how the valid policy meets this host.
            if let Some(snapshot) = snapshot {
                for note in scopegate::workloads::host_warnings(&snapshot) {
                    eprintln!("scopegate: note: {note}");
                }
            }
            Ok(ExitCode::from(verdict.code()))
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
