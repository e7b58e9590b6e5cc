//! `cargo xtask package`: the Debian package, built by cargo-deb from the release binary
//! that is already built (`--no-build`), and the checks CI runs on it.
//!
//! The package holds the stripped binary (its debug info in a separate file under
//! `/usr/lib/debug/.build-id`), the hardened unit, the default configuration, tmpfiles.d,
//! example policies, man pages (generated from the clap CLI by `scopegate generate man`) and
//! bash/zsh/fish completions (`scopegate generate completions`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use crate::ctx::{self, Ctx};

/// The cargo-deb release `setup` installs into `<root>/.tools`.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Validates policy files (argv[2:]) against the policy schema (argv[1]) with the Python
/// `jsonschema` package, and checks that a document with a misspelt key is refused.
const SCHEMA_CHECK_PY: &str = r#"
import json, sys, yaml, jsonschema
validator = jsonschema.Draft7Validator(json.load(open(sys.argv[1])))
for path in sys.argv[2:]:
    errors = list(validator.iter_errors(yaml.safe_load(open(path))))
    if errors:
        sys.exit(f"{path}: {errors[0].message}")
typo = yaml.safe_load("workload: x\nselect: {cgroup: /x}\negress:\n  - {host: a.example, port: 80, rulez: []}\n")
if not list(validator.iter_errors(typo)):
    sys.exit("a policy with the misspelt key `rulez` passed the schema")
print(f"schema ok: {len(sys.argv) - 2} policies")
"#;

/// Highest `systemd-analyze security` exposure the unit may have.
pub const MAX_EXPOSURE: f64 = 3.0;

/// Files the package must ship (paths as `dpkg-deb -c` prints them, without `./`).
const EXPECTED: &[&str] = &[
    "usr/bin/scopegate",
    "lib/systemd/system/scopegate.service",
    "etc/scopegate/scopegate.yaml",
    "usr/lib/tmpfiles.d/scopegate.conf",
    "usr/lib/sysusers.d/scopegate.conf",
    "usr/share/doc/scopegate/examples/policies/billing.yaml",
    "usr/share/doc/scopegate/examples/policies/tests/billing.yaml",
    "usr/share/scopegate/policy.schema.json",
    "usr/share/man/man1/scopegate.1.gz",
    "usr/share/man/man1/scopegate-run.1.gz",
    "usr/share/bash-completion/completions/scopegate",
    "usr/share/zsh/vendor-completions/_scopegate",
    "usr/share/fish/vendor_completions.d/scopegate.fish",
];

/// Generates the man pages and completions next to the release binary
/// (`<target>/release/package/`, where the cargo-deb assets point), then builds the .deb
/// from the existing binary; returns its path.
pub fn build(ctx: &Ctx, bin: &Path) -> Result<PathBuf> {
    let generated = ctx.target_dir.join("release").join("package");
    if generated.exists() {
        fs::remove_dir_all(&generated)
            .with_context(|| format!("removing {}", generated.display()))?;
    }
    let man = generated.join("man");
    ctx::run(Command::new(bin).args(["generate", "man"]).arg(&man))?;
    for entry in fs::read_dir(&man).with_context(|| format!("listing {}", man.display()))? {
        let page = entry?.path();
        ctx::run(Command::new("gzip").args(["-9n"]).arg(&page))?;
    }
    let completions = generated.join("completions");
    fs::create_dir_all(&completions)
        .with_context(|| format!("creating {}", completions.display()))?;
    for (shell, file) in [
        ("bash", "scopegate"),
        ("zsh", "_scopegate"),
        ("fish", "scopegate.fish"),
    ] {
        let script = ctx::output(Command::new(bin).args(["generate", "completions", shell]))?;
        fs::write(completions.join(file), script)
            .with_context(|| format!("writing the {shell} completions"))?;
    }
    let out_dir = ctx.target_dir.join("debian");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut deb = ctx.command(ctx.tools_bin().join("cargo-deb"));
    deb.current_dir(&ctx.root)
        .env("CARGO_TARGET_DIR", &ctx.target_dir)
        .args([
            "-p",
            "scopegate",
            "--no-build",
            "--separate-debug-symbols",
            "--output",
        ])
        .arg(&out_dir);
    let printed = ctx::output(&mut deb)?;
    let path = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo-deb printed no .deb path: {printed:?}"))?;
    ensure!(path.is_file(), "{} does not exist", path.display());
    eprintln!("package: {}", path.display());
    Ok(path)
}

/// Inspects the package, installs it with dpkg into a scratch root and checks what was
/// installed:
/// the unit verifies and scores at most [`MAX_EXPOSURE`], the binary is stripped with a
/// separate debug file, the man page renders, the bash completions load.
pub fn check(ctx: &Ctx, deb: &Path) -> Result<()> {
    let info = ctx::output(Command::new("dpkg-deb").arg("-I").arg(deb))?;
    for field in ["Package: scopegate", "Architecture: amd64", "Section: net"] {
        ensure!(info.contains(field), "dpkg-deb -I: no `{field}` in\n{info}");
    }
    let listing = ctx::output(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches("./"))
        .collect();
    for want in EXPECTED {
        ensure!(
            files.contains(want),
            "the package lacks {want}; it has:\n{listing}"
        );
    }
    ensure!(
        files
            .iter()
            .any(|f| f.starts_with("usr/lib/debug/.build-id/") && f.ends_with(".debug")),
        "the package has no separate debug file:\n{listing}"
    );
    let control = scratch(ctx, "control")?;
    ctx::run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control))?;
    let conffiles = fs::read_to_string(control.join("conffiles")).unwrap_or_default();
    ensure!(
        conffiles.contains("/etc/scopegate/scopegate.yaml"),
        "/etc/scopegate/scopegate.yaml is not a conffile: {conffiles:?}"
    );

    // Installed, not only extracted: dpkg into a scratch root with its own database (the
    // root has no libc6 package, hence --force-depends; and no shell to chroot into, hence
    // --force-script-chrootless: the postinst runs here with DPKG_ROOT set, and its
    // systemd-sysusers writes the scratch root's /etc/group).
    let root = scratch(ctx, "root")?;
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::write(root.join("var/lib/dpkg/status"), "")?;
    let admin = format!("--root={}", root.display());
    ctx::run(
        Command::new("dpkg")
            .arg(&admin)
            .args([
                "--force-depends",
                "--force-script-chrootless",
                "--log=/dev/null",
                "--install",
            ])
            .arg(deb),
    )?;
    let state = ctx::output(
        Command::new("dpkg")
            .arg(&admin)
            .args(["--status", "scopegate"]),
    )?;
    ensure!(
        state.contains("Status: install ok installed"),
        "dpkg --root: scopegate is not installed:\n{state}"
    );
    let installed = ctx::output(
        Command::new("dpkg")
            .arg(&admin)
            .args(["--listfiles", "scopegate"]),
    )?;
    for want in EXPECTED {
        ensure!(
            installed.lines().any(|l| l == format!("/{want}")),
            "dpkg --root --listfiles lacks /{want}:\n{installed}"
        );
    }
    // The postinst made the admin socket's group that the unit's SupplementaryGroups=
    // names (without it, systemd refuses to start the unit).
    let group =
        fs::read_to_string(root.join("etc/group")).context("the scratch root's etc/group")?;
    ensure!(
        group.lines().any(|l| l.starts_with("scopegate:")),
        "postinst did not create the group scopegate; etc/group:\n{group}"
    );
    let bin = root.join("usr/bin/scopegate");
    let sections = ctx::output(Command::new("readelf").arg("-S").arg(&bin))?;
    ensure!(
        !sections.contains(".debug_info"),
        "{} is not stripped",
        bin.display()
    );
    let version = ctx::output(Command::new(&bin).arg("--version"))?;
    ensure!(version.starts_with("scopegate "), "{version}");
    // The shipped example policies pass their shipped test cases, with the shipped binary.
    let examples = root.join("usr/share/doc/scopegate/examples/policies");
    let tested = ctx::output(Command::new(&bin).args(["policy", "test"]).arg(&examples))?;
    ensure!(
        tested.contains(", 0 failed"),
        "policy test of the shipped examples: {tested}"
    );
    // The shipped schema accepts the shipped policies and refuses a misspelt key.
    let mut validate = Command::new("python3");
    validate
        .arg("-c")
        .arg(SCHEMA_CHECK_PY)
        .arg(root.join("usr/share/scopegate/policy.schema.json"));
    for entry in fs::read_dir(&examples)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            validate.arg(path);
        }
    }
    let checked = ctx::output(&mut validate)?;
    ensure!(checked.starts_with("schema ok"), "{checked}");

    // systemd-analyze resolves the unit's dependencies and commands inside the root.
    let units = root.join("lib/systemd/system");
    for target in [
        "sysinit.target",
        "basic.target",
        "multi-user.target",
        "shutdown.target",
    ] {
        let host = Path::new("/lib/systemd/system").join(target);
        if host.exists() {
            fs::copy(&host, units.join(target))
                .with_context(|| format!("copying {}", host.display()))?;
        }
    }
    fs::create_dir_all(root.join("bin"))?;
    fs::copy("/bin/kill", root.join("bin/kill")).context("copying /bin/kill")?;
    let unit = units.join("scopegate.service");
    ctx::run(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg("--man=no")
            .arg(&unit),
    )?;
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--root={}", root.display()))
        .arg("scopegate.service")
        .output()
        .context("running systemd-analyze security")?;
    let text = String::from_utf8_lossy(&security.stdout);
    let exposure = exposure(&text)
        .with_context(|| format!("no exposure level in systemd-analyze output:\n{text}"))?;
    ensure!(
        exposure <= MAX_EXPOSURE,
        "scopegate.service exposure {exposure} > {MAX_EXPOSURE}:\n{text}"
    );
    eprintln!("package: unit verified, exposure {exposure}");

    let page = root.join("usr/share/man/man1/scopegate.1.gz");
    let rendered = ctx::output(
        Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
    )?;
    for want in ["EXIT STATUS", "78", "privileges", "run"] {
        ensure!(
            rendered.contains(want),
            "man -l scopegate.1.gz lacks {want:?}:\n{rendered}"
        );
    }
    let run_page = root.join("usr/share/man/man1/scopegate-run.1.gz");
    let rendered = ctx::output(
        Command::new("man")
            .arg("-l")
            .arg(&run_page)
            .env("MANPAGER", "cat"),
    )?;
    ensure!(
        rendered.contains("--config"),
        "scopegate-run(1) lacks --config:\n{rendered}"
    );

    let completion = root.join("usr/share/bash-completion/completions/scopegate");
    let loaded = ctx::output(Command::new("bash").arg("-c").arg(format!(
        "source '{}' && complete -p scopegate",
        completion.display()
    )))?;
    ensure!(
        loaded.contains("scopegate"),
        "bash completion did not register: {loaded:?}"
    );
    eprintln!("package: contents, unit, man pages and completions ok");
    Ok(())
}

/// `Overall exposure level for X: 2.8 OK` → 2.8.
fn exposure(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.contains("Overall exposure level"))?
        .rsplit_once(':')?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A fresh, empty directory under `<target>/package-check/`.
fn scratch(ctx: &Ctx, name: &str) -> Result<PathBuf> {
    let dir = ctx.target_dir.join("package-check").join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Installs cargo-deb into `<root>/.tools` unless that version is there.
pub fn ensure_cargo_deb(ctx: &Ctx) -> Result<()> {
    let bin = ctx.tools_bin().join("cargo-deb");
    let ok = Command::new(&bin).arg("--version").output().is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)
    });
    if ok {
        eprintln!(
            "setup: cargo-deb {CARGO_DEB_VERSION} ok ({})",
            bin.display()
        );
        return Ok(());
    }
    eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION}");
    let mut install = ctx.cargo([
        "install",
        &format!("cargo-deb@{CARGO_DEB_VERSION}"),
        "--locked",
        "--force",
        "--root",
    ]);
    install.arg(&ctx.tools).env_remove("CARGO_TARGET_DIR");
    ctx::run(&mut install)?;
    if !bin.is_file() {
        bail!(
            "cargo install succeeded but {} does not exist",
            bin.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_exposure_level() {
        let text = "✗ PrivateNetwork= ... 0.5\n\n→ Overall exposure level for scopegate.service: 2.8 OK 🙂\n";
        assert_eq!(exposure(text), Some(2.8));
        assert_eq!(exposure("nothing"), None);
    }
}
