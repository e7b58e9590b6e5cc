//! `cargo xtask build`, `run` and `test`.

use std::{
    ffi::OsString,
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Instant,
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{
    ctx::{self, Ctx},
    package, setup,
};

/// The marker each privileged end-to-end test prints to stderr when it really ran.
pub const PRIVILEGED_MARKER: &str = "PRIVILEGED-TEST-RAN";

/// Runs setup, then builds the release agent; returns the binary's path.
pub fn build_release(ctx: &Ctx) -> Result<PathBuf> {
    setup::setup(ctx)?;
    release_build_only(ctx)
}

/// `cargo build --release -p scopegate` with `.tools/bin` on PATH.
fn release_build_only(ctx: &Ctx) -> Result<PathBuf> {
    ctx::run(&mut ctx.cargo(["build", "--release", "-p", "scopegate"]))?;
    let bin = ctx.release_bin();
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// Builds, then replaces this process with `scopegate run [--policies <root>/policies] ARGS`.
pub fn run_agent(ctx: &Ctx, args: &[OsString]) -> Result<()> {
    let bin = build_release(ctx)?;
    let mut cmd = Command::new(&bin);
    cmd.arg("run");
    if !has_policies_flag(args) {
        cmd.arg("--policies").arg(ctx.root.join("policies"));
    }
    cmd.args(args);
    eprintln!("xtask: exec {}", ctx::describe(&cmd));
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not exec `{}`", ctx::describe(&cmd)))
}

/// True if the user already passed `--policies DIR` or `--policies=DIR`.
fn has_policies_flag(args: &[OsString]) -> bool {
    args.iter().any(|a| {
        a.to_str()
            .is_some_and(|a| a == "--policies" || a.starts_with("--policies="))
    })
}

/// One tier of `cargo xtask test`: prints a header, runs `f`, names the step on failure.
fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("\n==> xtask test: {name}");
    let start = Instant::now();
    let result = f().with_context(|| format!("xtask test: step `{name}` failed"));
    eprintln!(
        "==> xtask test: {name}: {:.0} s",
        start.elapsed().as_secs_f64()
    );
    result
}

/// `cargo xtask test`: everything CI checks (the package included), in order; the first failing step stops it.
pub fn test(ctx: &Ctx, skip_lint: bool, filter: Option<&str>) -> Result<()> {
    step("setup", || setup::setup(ctx).map(drop))?;
    if skip_lint {
        eprintln!("\n==> xtask test: fmt and clippy skipped (--skip-lint)");
    } else {
        step("fmt", || {
            ctx::run(&mut ctx.cargo(["fmt", "--all", "--", "--check"]))
        })?;
        step("clippy", || {
            ctx::run(&mut ctx.cargo([
                "clippy",
                "--workspace",
                "--exclude",
                "scopegate-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
    }
    step("unit tests", || {
        ctx::run(&mut ctx.cargo([
            "test",
            "--workspace",
            "--exclude",
            "scopegate-ebpf",
            "--exclude",
            "scopegate-e2e",
        ]))
    })?;
    let bin = step("release build", || release_build_only(ctx))?;
    step("package", || {
        let deb = package::build(ctx, &bin)?;
        package::check(ctx, &deb)
    })?;
    let ran = step("privileged e2e tests", || e2e(ctx, &bin, filter))?;
    println!("\nxtask test: {ran} privileged tests ran");
    Ok(())
}

/// Runs the privileged end-to-end tests, teeing their output to `<target>/e2e.log`;
/// returns how many privileged tests reported that they ran.
fn e2e(ctx: &Ctx, bin: &Path, filter: Option<&str>) -> Result<usize> {
    let bin = bin
        .canonicalize()
        .with_context(|| format!("resolving {}", bin.display()))?;
    // Every test binary runs even after a failure, so one run shows every failing test.
    let mut cmd = ctx.cargo(["test", "--release", "--no-fail-fast", "-p", "scopegate-e2e"]);
    if let Some(filter) = filter {
        cmd.arg(filter);
    }
    cmd.args(["--", "--nocapture", "--test-threads=2"])
        .env("SCOPEGATE_BIN", &bin);
    fs::create_dir_all(&ctx.target_dir)
        .with_context(|| format!("creating {}", ctx.target_dir.display()))?;
    let log = ctx.target_dir.join("e2e.log");
    eprintln!(
        "SCOPEGATE_BIN={} (output also in {})",
        bin.display(),
        log.display()
    );
    let status = run_tee(&mut cmd, &log, true)?;
    let text = fs::read(&log).with_context(|| format!("reading {}", log.display()))?;
    let ran = count_marker(&String::from_utf8_lossy(&text));
    ctx::check(&cmd, status)?;
    if ran == 0 {
        let what = match filter {
            Some(f) => format!(" matching `{f}`"),
            None => String::new(),
        };
        bail!(
            "no privileged test ran{what}: no `{PRIVILEGED_MARKER}` line in {}",
            log.display()
        );
    }
    Ok(ran)
}

/// Number of lines that report a privileged test ran.
fn count_marker(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(PRIVILEGED_MARKER))
        .count()
}

/// Runs `cmd`, writing its stdout and stderr into the file `log` and, if `echo`, also
/// streaming them to ours.
fn run_tee(cmd: &mut Command, log: &Path, echo: bool) -> Result<ExitStatus> {
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let file = Arc::new(Mutex::new(file));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not start `{}`", ctx::describe(cmd)))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let stderr = child.stderr.take().context("child stderr")?;
    let out_file = Arc::clone(&file);
    let start = Instant::now();
    let out = thread::spawn(move || pump(stdout, echo.then(io::stdout), &out_file, start));
    let err = thread::spawn(move || pump(stderr, echo.then(io::stderr), &file, start));
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{}`", ctx::describe(cmd)))?;
    for pumper in [out, err] {
        pumper
            .join()
            .map_err(|_| anyhow!("output copier panicked"))?
            .with_context(|| format!("writing {}", log.display()))?;
    }
    Ok(status)
}

/// Copies `from` line by line to `term` (if any; best effort) and to `file`. Lines that
/// start or end a test binary are stamped with the time since `start`, so a slow run
/// shows which binary took the time.
fn pump(
    from: impl Read,
    mut term: Option<impl Write>,
    file: &Mutex<File>,
    start: Instant,
) -> io::Result<()> {
    let mut from = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        if from.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        if is_binary_boundary(&line) {
            let mut stamped = format!("[+{:.0} s] ", start.elapsed().as_secs_f64()).into_bytes();
            stamped.extend_from_slice(&line);
            line = stamped;
        }
        // A closed terminal must not stop the log or the tests.
        if let Some(term) = term.as_mut() {
            let _ = term.write_all(&line).and_then(|()| term.flush());
        }
        file.lock()
            .map_err(|_| io::Error::other("log file lock poisoned"))?
            .write_all(&line)?;
    }
}

/// True for cargo's `Running <binary>` line and libtest's `test result:` line.
fn is_binary_boundary(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_start();
    text.starts_with("Running ") || text.starts_with("test result:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_flag_detection() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(has_policies_flag(&args(&["--policies", "/p"])));
        assert!(has_policies_flag(&args(&["-v", "--policies=/p"])));
        assert!(!has_policies_flag(&args(&[
            "--policies-extra",
            "--audit-file",
            "x"
        ])));
    }

    #[test]
    fn counts_marker_lines() {
        let log = "running 2 tests\nPRIVILEGED-TEST-RAN deny_delete\nok\n\
                   PRIVILEGED-TEST-RAN allow_get\ntest result: ok. 2 passed\n";
        assert_eq!(count_marker(log), 2);
        assert_eq!(count_marker("running 0 tests\n"), 0);
    }

    #[test]
    fn tee_copies_both_streams() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-tee-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let log = dir.join("log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo PRIVILEGED-TEST-RAN x >&2; exit 3"]);
        let status = run_tee(&mut cmd, &log, false)?;
        assert_eq!(status.code(), Some(3));
        let text = fs::read_to_string(&log)?;
        assert!(text.contains("out\n"));
        assert_eq!(count_marker(&text), 1);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn binary_boundaries_are_stamped() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-stamp-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let log = dir.join("log");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo '     Running tests/e2e/a.rs' >&2; echo 'test x ... ok'; echo 'test result: ok.'",
        ]);
        run_tee(&mut cmd, &log, false)?;
        let text = fs::read_to_string(&log)?;
        let stamped: Vec<&str> = text.lines().filter(|l| l.starts_with("[+")).collect();
        assert_eq!(stamped.len(), 2, "{text}");
        // stdout and stderr are copied by two threads: their order is not fixed.
        assert!(
            stamped
                .iter()
                .any(|l| l.ends_with(" s]      Running tests/e2e/a.rs")),
            "{text}"
        );
        assert!(
            stamped.iter().any(|l| l.ends_with(" s] test result: ok.")),
            "{text}"
        );
        assert!(text.contains("\ntest x ... ok\n"), "{text}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
