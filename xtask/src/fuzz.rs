//! `cargo xtask fuzz [TARGET] [--time 10m]`: runs the cargo-fuzz targets of `fuzz/`
//! (libFuzzer, on the pinned nightly, AddressSanitizer) one after another, each for the
//! given time, on the corpus kept in the repository (`fuzz/corpus/TARGET`, seeded from the
//! test tables and the committed ClientHello samples; new inputs libFuzzer finds are added
//! there). Every input that once crashed is kept in `fuzz/regressions/TARGET` and replayed
//! first. cargo-fuzz is installed into `<root>/.tools` when missing.
#![deny(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{ctx::Ctx, setup};

/// The targets, in the order `fuzz` runs them.
pub const TARGETS: [&str; 5] = [
    "canonical_path",
    "client_hello",
    "json_body",
    "policy_load",
    "audit_chain",
];

/// The cargo-fuzz release installed when missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// One target (default: all of them, one after another).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
    /// How long each target runs: 30s, 10m, 1h.
    #[arg(long, default_value = "60s", value_parser = parse_time)]
    pub time: Duration,
}

fn parse_time(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 30s, 10m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (s, m or h)")),
    };
    if secs == 0 || secs > 24 * 3600 {
        return Err(format!("{text:?}: must be between 1s and 24h"));
    }
    Ok(Duration::from_secs(secs))
}

/// Installs cargo-fuzz if missing, then runs the targets; fails on the first finding,
/// naming the crashing input libFuzzer saved.
pub fn fuzz(ctx: &Ctx, args: &FuzzArgs) -> Result<()> {
    let nightly = setup::pinned_nightly(&ctx.root)?;
    ensure_cargo_fuzz(ctx)?;
    let targets: Vec<&str> = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    let fuzz_dir = ctx.root.join("fuzz");
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let regressions = fuzz_dir.join("regressions").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut dirs: Vec<PathBuf> = vec![corpus];
        if regressions.is_dir() {
            dirs.push(regressions);
        }
        eprintln!(
            "fuzz: {target} for {} s ({})",
            args.time.as_secs(),
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut cmd = ctx.cargo([format!("+{nightly}").as_str(), "fuzz", "run", target]);
        cmd.args(&dirs)
            .arg("--")
            .arg(format!("-max_total_time={}", args.time.as_secs()))
            .arg("-print_final_stats=1")
            // The agent's build script compiles the eBPF programs; the targets need none.
            .env("AYA_BUILD_SKIP", "1");
        let status = crate::ctx::status(&mut cmd)?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed ({status}): the crashing input is under \
                 fuzz/artifacts/{target}/; keep it in fuzz/regressions/{target}/ with the fix"
            );
        }
    }
    Ok(())
}

fn ensure_cargo_fuzz(ctx: &Ctx) -> Result<()> {
    let bin = ctx.tools_bin().join("cargo-fuzz");
    if bin.exists() {
        return Ok(());
    }
    eprintln!(
        "fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {}",
        ctx.tools.display()
    );
    crate::ctx::run(
        ctx.cargo([
            "install",
            "--locked",
            "--root",
            ctx.tools.to_str().context("non-UTF-8 tools path")?,
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        ])
        .env_remove("CARGO_TARGET_DIR"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_time("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_time("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_time("45"), Ok(Duration::from_secs(45)));
        assert!(parse_time("0s").is_err());
        assert!(parse_time("10d").is_err());
        assert!(parse_time("ten").is_err());
    }
}
