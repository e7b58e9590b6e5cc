//! Workspace layout and helpers to spawn commands.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context, Result, bail};

/// Where things are, and the environment child commands get.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Workspace root (the parent of xtask's manifest directory).
    pub root: PathBuf,
    /// Absolute cargo target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
    pub target_dir: PathBuf,
    /// True if `$CARGO_TARGET_DIR` was set (then children get its absolute form).
    target_dir_from_env: bool,
    /// Project-local tools: `<root>/.tools`.
    pub tools: PathBuf,
    /// `PATH` for child commands: `<root>/.tools/bin` first, then the inherited `PATH`.
    pub path: OsString,
}

impl Ctx {
    /// Works out the layout from xtask's own manifest directory and the environment.
    pub fn new() -> Result<Self> {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .with_context(|| format!("{} has no parent directory", manifest_dir.display()))?
            .to_path_buf();
        let cwd = env::current_dir().context("current directory")?;
        let (target_dir, target_dir_from_env) = match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => (cwd.join(dir), true),
            _ => (root.join("target"), false),
        };
        let tools = root.join(".tools");
        let tools_bin = tools.join("bin");
        let inherited = env::var_os("PATH").unwrap_or_default();
        let mut parts = vec![tools_bin.clone()];
        parts.extend(env::split_paths(&inherited).filter(|p| *p != tools_bin));
        let path = env::join_paths(parts).context("building PATH with .tools/bin")?;
        Ok(Self {
            root,
            target_dir,
            target_dir_from_env,
            tools,
            path,
        })
    }

    /// `<root>/.tools/bin`.
    pub fn tools_bin(&self) -> PathBuf {
        self.tools.join("bin")
    }

    /// The release agent binary: `<target>/release/scopegate`.
    pub fn release_bin(&self) -> PathBuf {
        self.target_dir.join("release").join("scopegate")
    }

    /// A command run from the workspace root with [`Ctx::path`] as `PATH`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", &self.path);
        // `cargo xtask` is `cargo run`, which gives this process the variables of the
        // xtask package (CARGO_MANIFEST_DIR=…/xtask, CARGO_PKG_NAME=xtask, …). A cargo
        // child that inherits them fingerprints build scripts and crates that read them
        // differently from a cargo run from the shell, so the two rebuild each other's
        // artefacts; children get the shell's environment instead.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(is_cargo_run_variable) {
                cmd.env_remove(&key);
            }
        }
        if self.target_dir_from_env {
            // The child runs from the root; keep a relative CARGO_TARGET_DIR meaning the same.
            cmd.env("CARGO_TARGET_DIR", &self.target_dir);
        }
        cmd
    }

    /// `cargo` (the rustup proxy found on [`Ctx::path`]) with the given arguments.
    pub fn cargo<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = self.command("cargo");
        cmd.args(args);
        cmd
    }
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            format!("'{a}'")
        } else {
            a.into_owned()
        }
    }));
    words.join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it exits with status 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    check(cmd, status)
}

/// Runs `cmd` with inherited stdio and returns its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))
}

/// Fails unless `status` is success, naming `cmd`.
pub fn check(cmd: &Command, status: ExitStatus) -> Result<()> {
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd`, captures its stdout, and fails (with its stderr) unless it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            stderr.trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}`: output not UTF-8", describe(cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_starts_with_tools_bin() -> Result<()> {
        let ctx = Ctx::new()?;
        let first = env::split_paths(&ctx.path).next();
        assert_eq!(first, Some(ctx.tools_bin()));
        assert!(ctx.root.join("xtask").join("Cargo.toml").is_file());
        Ok(())
    }

    #[test]
    fn describe_quotes_spaces() {
        let mut cmd = Command::new("echo");
        cmd.args(["a b", "c"]);
        assert_eq!(describe(&cmd), "echo 'a b' c");
    }
}

/// Whether `key` is one of the variables `cargo run` sets for the program it runs
/// (<https://doc.rust-lang.org/cargo/reference/environment-variables.html>), as opposed to
/// the user's own (CARGO_HOME, CARGO_TARGET_DIR, …).
fn is_cargo_run_variable(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
        )
}

#[cfg(test)]
mod cargo_run_variable_tests {
    use super::is_cargo_run_variable;

    #[test]
    fn only_the_variables_cargo_run_sets_are_dropped() {
        for key in [
            "CARGO_MANIFEST_DIR",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
        ] {
            assert!(is_cargo_run_variable(key), "{key}");
        }
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS",
            "PATH",
        ] {
            assert!(!is_cargo_run_variable(key), "{key}");
        }
    }
}
