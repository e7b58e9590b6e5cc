//! `cargo xtask`: scopegate's developer tasks.
//!
//! * `setup` checks the host (root, cgroup v2, BTF, the bpf syscall) and installs what the
//!   build and the tests need: the pinned nightly with `rust-src`, `bpf-linker` in
//!   `<root>/.tools`, and a few Debian packages.
//! * `build` builds the release agent, `run` builds and execs it.
//! * `test` is the one command CI runs: fmt, clippy, unit tests, release build and the
//!   privileged end-to-end tests.
//! * `package` builds the Debian package from the release build and checks it.
//! * `demo` runs the agent against a tiny local upstream and shows an allowed and a denied
//!   request.
//! * `bench` benchmarks scopegate side by side with direct, nginx and HAProxy.
//! * `soak` runs the agent for N minutes under mixed load, fd pressure, policy churn and
//!   kill -9, and reports bypasses and missing audit records (outside CI).
//! * `fuzz` runs the cargo-fuzz targets of `fuzz/` (outside CI).
//!
//! xtask depends on no other workspace crate, so it builds while they are broken.

#![deny(unsafe_code)]

mod bench;
mod ci;
mod ctx;
mod demo;
mod fuzz;
mod package;
mod setup;
mod soak;
mod sys;
mod upstream;

use std::{ffi::OsString, net::SocketAddr, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::ctx::Ctx;

/// Command line of `cargo xtask`.
#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "scopegate developer tasks",
    version
)]
struct Cli {
    /// The task to run.
    #[command(subcommand)]
    cmd: Cmd,
}

/// The tasks.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Check the host and install the toolchain, bpf-linker and test packages (idempotent).
    Setup,
    /// Run setup, then build the release agent and print its path.
    Build,
    /// Build, then exec `scopegate run --policies <root>/policies ARGS...`.
    Run {
        /// Arguments for `scopegate run` (after `--`); `--policies` here replaces the default.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Everything CI checks: setup, fmt, clippy, unit tests, release build, privileged e2e.
    Test {
        /// Skip `cargo fmt --check` and clippy (quick local iteration).
        #[arg(long)]
        skip_lint: bool,
        /// Only run end-to-end tests whose name contains NAME.
        #[arg(long, value_name = "NAME")]
        filter: Option<String>,
    },
    /// Build the Debian package (cargo-deb) from the release build, then inspect and
    /// check it as CI does; prints the .deb's path.
    Package,
    /// Run the agent against a local demo upstream; show an allowed and a denied request.
    Demo {
        /// Leave the agent and the upstream running afterwards and print how to stop them.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmark scopegate side by side with direct, nginx and HAProxy; writes
    /// target/bench/REPORT.md and results.json.
    Bench(bench::BenchArgs),
    /// Soak the release agent: mixed load, fd pressure, policy churn every 10 s, kill -9
    /// every 2 min; fails if a forbidden request reached an upstream or a forwarded one has
    /// no audit record. Not part of `test`.
    Soak(soak::SoakArgs),
    /// Run the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer; installs cargo-fuzz into .tools
    /// if missing), one or all, each for --time, on the corpus kept in the repository.
    /// Not part of `test`.
    Fuzz(fuzz::FuzzArgs),
    /// The benchmark's load clients (started by `bench`, inside cgroups).
    #[command(hide = true)]
    BenchHelper {
        /// Which client.
        #[command(subcommand)]
        helper: bench::Helper,
    },
    /// The demo's HTTP/1.1 upstream (started by `demo` as a separate process).
    #[command(hide = true)]
    DemoUpstream {
        /// Address to listen on.
        #[arg(long, default_value = demo::UPSTREAM_ADDR)]
        listen: SocketAddr,
    },
}

/// Parses the command line and runs the task; an error prints as one line, exit status 1.
fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.cmd) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one task.
fn dispatch(cmd: Cmd) -> anyhow::Result<ExitCode> {
    if let Cmd::DemoUpstream { listen } = cmd {
        upstream::serve(listen)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::BenchHelper { helper } = cmd {
        bench::run_helper(helper)?;
        return Ok(ExitCode::SUCCESS);
    }
    let ctx = Ctx::new()?;
    match cmd {
        Cmd::Setup => {
            setup::setup(&ctx)?;
        }
        Cmd::Build => {
            let bin = ci::build_release(&ctx)?;
            println!("{}", bin.display());
        }
        Cmd::Run { args } => ci::run_agent(&ctx, &args)?,
        Cmd::Test { skip_lint, filter } => ci::test(&ctx, skip_lint, filter.as_deref())?,
        Cmd::Package => {
            let bin = ci::build_release(&ctx)?;
            let deb = package::build(&ctx, &bin)?;
            package::check(&ctx, &deb)?;
            println!("{}", deb.display());
        }
        Cmd::Demo { keep } => demo::demo(&ctx, keep)?,
        Cmd::Bench(args) => bench::bench(&ctx, &args)?,
        Cmd::Soak(args) => {
            if !soak::soak(&ctx, &args)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Fuzz(args) => fuzz::fuzz(&ctx, &args)?,
        Cmd::DemoUpstream { .. } | Cmd::BenchHelper { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_args_after_double_dash() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["xtask", "run", "--", "--policies", "/x", "-v"])?;
        let Cmd::Run { args } = cli.cmd else {
            anyhow::bail!("not a run command");
        };
        assert_eq!(args, ["--policies", "/x", "-v"]);
        Ok(())
    }

    #[test]
    fn test_flags() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["xtask", "test", "--skip-lint", "--filter", "deny"])?;
        let Cmd::Test { skip_lint, filter } = cli.cmd else {
            anyhow::bail!("not a test command");
        };
        assert!(skip_lint);
        assert_eq!(filter.as_deref(), Some("deny"));
        Ok(())
    }
}
