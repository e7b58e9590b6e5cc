//! `cargo xtask setup`: host checks and the tools the build and the tests need.

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    ctx::{self, Ctx},
    sys,
};

/// The bpf-linker release the eBPF build uses.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the end-to-end tests and the demo run (nginx: the TLS origin of the
/// real-client tests; python3-pip: to install [`PY_PACKAGES`]; python3-seccomp: the system call filter of the unit sandbox test; bind9-dnsutils: `dig`, the
/// real DNS client of the DNS tests; chromium-headless-shell: the browser the review
/// report is rendered in).
pub const DEB_PACKAGES: [&str; 14] = [
    // The package checks: systemd-analyze, man -l, readelf, gzip.
    "systemd",
    "man-db",
    "binutils",
    "gzip",
    "curl",
    "iproute2",
    "openssl",
    "ca-certificates",
    "python3",
    "python3-pip",
    "python3-seccomp",
    "nginx-light",
    "bind9-dnsutils",
    "chromium-headless-shell",
];

/// Python packages the real-client end-to-end tests run, as (import name, pip requirement):
/// pypiserver (a PEP 503 index), moto's S3 server and boto3 (the S3 client), dnspython (the
/// test DNS server), prometheus_client (the text-format parser the metrics test scrapes
/// with), jsonschema and PyYAML (the package step validates the shipped policies against the
/// shipped policy schema).
pub const PY_PACKAGES: [(&str, &str); 7] = [
    ("pypiserver", "pypiserver"),
    ("moto.server", "moto[server]"),
    ("boto3", "boto3"),
    ("dns.message", "dnspython"),
    ("prometheus_client.parser", "prometheus-client"),
    ("jsonschema", "jsonschema"),
    ("yaml", "PyYAML"),
];

/// What [`check_host`] found.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// Mount point of the cgroup v2 hierarchy.
    pub cgroup2: PathBuf,
}

/// Fails with one clear line unless this host can run scopegate: root, cgroup v2, BTF and
/// the bpf syscall.
pub fn check_host() -> Result<HostInfo> {
    if sys::geteuid() != 0 {
        bail!("scopegate needs root (or CAP_BPF+CAP_NET_ADMIN+CAP_SYS_ADMIN): run as root");
    }
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let Some(cgroup2) = cgroup2_mount(&mounts) else {
        bail!("no cgroup v2 hierarchy is mounted (no fstype cgroup2 in /proc/self/mounts)");
    };
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    if !btf.exists() {
        bail!(
            "the kernel has no BTF ({} is missing): it needs CONFIG_DEBUG_INFO_BTF=y",
            btf.display()
        );
    }
    if sys::bpf_probe_errno() == libc::ENOSYS {
        bail!("the kernel has no bpf syscall (ENOSYS): it needs CONFIG_BPF_SYSCALL=y");
    }
    Ok(HostInfo { cgroup2 })
}

/// The mount point of the first `cgroup2` filesystem in a `/proc/self/mounts` text.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        (fields.next()? == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

/// Decodes the octal escapes (`\040` for a space, ...) of a `/proc/*/mounts` field.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The nightly pinned in `ebpf/scopegate-ebpf/rust-toolchain.toml`.
pub fn pinned_nightly(root: &Path) -> Result<String> {
    let file = root.join("ebpf/scopegate-ebpf/rust-toolchain.toml");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    parse_channel(&text).with_context(|| format!("{}: no `channel = \"...\"` line", file.display()))
}

/// The value of the `channel = "..."` line of a rust-toolchain.toml.
fn parse_channel(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("channel")?.trim_start();
        let value = rest.strip_prefix('=')?.trim();
        let value = value.split('#').next()?.trim();
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        (!value.is_empty()).then(|| value.to_owned())
    })
}

/// True if a `rustup toolchain list` line names `toolchain` (bare or with a host triple).
fn lists_toolchain(line: &str, toolchain: &str) -> bool {
    let Some(name) = line.split_whitespace().next() else {
        return false;
    };
    if name == toolchain {
        return true;
    }
    // "nightly-2026-05-19-x86_64-unknown-linux-gnu" matches "nightly-2026-05-19", but
    // "nightly-2026-05-19-x86_64-..." must not match a bare "nightly" pin: the rest has to
    // start with an architecture, not a date.
    name.strip_prefix(toolchain)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|triple| triple.split('-').next())
        .is_some_and(|arch| !arch.is_empty() && !arch.chars().all(|c| c.is_ascii_digit()))
}

/// Runs every setup step; returns the host info. Prints one line per step.
pub fn setup(ctx: &Ctx) -> Result<HostInfo> {
    let host = check_host()?;
    eprintln!(
        "setup: host ok (root, cgroup v2 at {}, BTF, bpf syscall)",
        host.cgroup2.display()
    );
    let nightly = ensure_toolchain(ctx)?;
    ensure_bpf_linker(ctx, &nightly)?;
    crate::package::ensure_cargo_deb(ctx)?;
    ensure_deb_packages()?;
    ensure_py_packages()?;
    eprintln!(
        "setup: child commands run with {} first on PATH",
        ctx.tools_bin().display()
    );
    Ok(host)
}

/// Installs the pinned nightly and its `rust-src` if missing; returns the nightly's name.
fn ensure_toolchain(ctx: &Ctx) -> Result<String> {
    let nightly = pinned_nightly(&ctx.root)?;
    let listed = ctx::output(Command::new("rustup").args(["toolchain", "list"]))?;
    let mut notes = Vec::new();
    if !listed.lines().any(|l| lists_toolchain(l, &nightly)) {
        eprintln!("setup: installing toolchain {nightly}");
        ctx::run(Command::new("rustup").args([
            "toolchain",
            "install",
            &nightly,
            "--profile",
            "minimal",
        ]))?;
        notes.push("installed");
    }
    let components = ctx::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        &nightly,
        "--installed",
    ]))?;
    if !components
        .lines()
        .any(|l| l.split_whitespace().next() == Some("rust-src"))
    {
        eprintln!("setup: adding rust-src to {nightly}");
        ctx::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            &nightly,
        ]))?;
        notes.push("rust-src added");
    }
    let how = if notes.is_empty() {
        "ok".to_owned()
    } else {
        notes.join(", ")
    };
    eprintln!("setup: toolchain {nightly} with rust-src: {how}");
    Ok(nightly)
}

/// The nightly's own libLLVM (`lib/libLLVM.so.<ver>-rust-<rustc>`), and its LLVM major.
fn nightly_libllvm(nightly: &str) -> Result<(PathBuf, u32)> {
    let sysroot =
        ctx::output(Command::new("rustup").args(["run", nightly, "rustc", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
        let entry = entry.with_context(|| format!("listing {}", lib.display()))?;
        let name = entry.file_name();
        if let Some(major) = name.to_str().and_then(libllvm_major) {
            found.push((entry.path(), major));
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "{}: no libLLVM.so.<version>-rust-* (the nightly's LLVM) to link bpf-linker against",
            lib.display()
        ),
        more => bail!(
            "{}: several libLLVM.so.*-rust-* files ({}); cannot tell which to use",
            lib.display(),
            more.iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// For a file name like `libLLVM.so.22.1-rust-1.97.0-nightly`, the LLVM major (22).
fn libllvm_major(name: &str) -> Option<u32> {
    let version = name.strip_prefix("libLLVM.so.")?;
    let (llvm, _rustc) = version.split_once("-rust-")?;
    llvm.split('.').next()?.parse().ok()
}

/// Installs bpf-linker into `<root>/.tools` unless a working one linked against this
/// nightly's LLVM is already there.
fn ensure_bpf_linker(ctx: &Ctx, nightly: &str) -> Result<()> {
    let bin = ctx.tools_bin().join("bpf-linker");
    let (libllvm, major) = nightly_libllvm(nightly)?;
    let soname = libllvm
        .file_name()
        .with_context(|| format!("{}: no file name", libllvm.display()))?
        .to_owned();
    let llvm_prefix = ctx.tools.join("llvm");
    let llvm_lib = llvm_prefix.join("lib");

    let version_ok = Command::new(&bin).arg("--version").output().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout)
                .contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    });
    // The binary finds libLLVM through its RUNPATH (<root>/.tools/llvm/lib) by soname; that
    // link must lead to this nightly's LLVM, or the linker's LLVM differs from rustc's.
    let links_ok = [soname.as_os_str(), "libLLVM.so".as_ref()]
        .iter()
        .all(|name| same_file(&llvm_lib.join(name), &libllvm));
    if version_ok && links_ok {
        eprintln!(
            "setup: bpf-linker {BPF_LINKER_VERSION} ok ({}, LLVM {major})",
            bin.display()
        );
        return Ok(());
    }

    eprintln!(
        "setup: installing bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    );
    fs::create_dir_all(&llvm_lib).with_context(|| format!("creating {}", llvm_lib.display()))?;
    for entry in
        fs::read_dir(&llvm_lib).with_context(|| format!("listing {}", llvm_lib.display()))?
    {
        let path = entry
            .with_context(|| format!("listing {}", llvm_lib.display()))?
            .path();
        let stale = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libLLVM"));
        if stale && path.is_symlink() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    for name in [soname.as_os_str(), "libLLVM.so".as_ref()] {
        let link = llvm_lib.join(name);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("symlinking {} -> {}", link.display(), libllvm.display()))?;
    }
    let mut install = ctx.cargo([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
        "--root",
    ]);
    install.arg(&ctx.tools);
    // A throwaway build directory, not the workspace's target dir.
    install
        .env("LLVM_PREFIX", &llvm_prefix)
        .env_remove("CARGO_TARGET_DIR");
    ctx::run(&mut install)?;
    let version = ctx::output(Command::new(&bin).arg("--version"))?;
    if !version.contains(BPF_LINKER_VERSION) {
        bail!(
            "{} --version printed {:?}, expected {BPF_LINKER_VERSION}",
            bin.display(),
            version.trim()
        );
    }
    eprintln!(
        "setup: bpf-linker {BPF_LINKER_VERSION} installed ({})",
        bin.display()
    );
    Ok(())
}

/// True if both paths resolve to the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Installs whichever of [`DEB_PACKAGES`] are missing.
fn ensure_deb_packages() -> Result<()> {
    install_missing_debs("setup", &DEB_PACKAGES)
}

/// Installs whichever of `wanted` dpkg does not list as installed (`who` prefixes the
/// messages): without recommends and with no services started.
pub fn install_missing_debs(who: &str, wanted: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for pkg in wanted {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .context("could not run dpkg-query (is this Debian/Ubuntu?)")?;
        if !String::from_utf8_lossy(&out.stdout).contains("install ok installed") {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        eprintln!("{who}: packages ok ({})", wanted.join(", "));
        return Ok(());
    }
    eprintln!("{who}: installing packages: {}", missing.join(" "));
    // Packages start no services (nginx on :80, say): the tests start their own.
    let _no_services = NoServiceStart::new()?;
    ctx::run(Command::new("apt-get").args(["update", "-qq"]))?;
    // Without recommends: what the tests run needs only the packages' dependencies, and
    // chromium's recommends (udev, upower, avahi, a terminal, …) would upgrade systemd
    // and start daemons on the host.
    ctx::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )?;
    eprintln!("{who}: packages installed ({})", missing.join(", "));
    Ok(())
}

/// Creates `/usr/sbin/policy-rc.d` (`exit 101`: packages start no services) if there is
/// none, and removes it again when dropped.
#[derive(Debug)]
pub struct NoServiceStart {
    /// The file we created, if we did.
    created: Option<PathBuf>,
}

impl NoServiceStart {
    /// Installs the guard file unless one exists.
    pub fn new() -> Result<Self> {
        let path = PathBuf::from("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(Self { created: None });
        }
        let mut file =
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(b"#!/bin/sh\n# Temporary, by cargo xtask: start no services.\nexit 101\n")
            .with_context(|| format!("writing {}", path.display()))?;
        drop(file);
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
        Ok(Self {
            created: Some(path),
        })
    }
}

impl Drop for NoServiceStart {
    fn drop(&mut self) {
        if let Some(path) = self.created.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// Installs whichever of [`PY_PACKAGES`] the `python3` on PATH cannot import, with that
/// interpreter's pip (the tests run that same `python3`).
fn ensure_py_packages() -> Result<()> {
    let mut missing = Vec::new();
    for (module, requirement) in PY_PACKAGES {
        let found = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .context("could not run python3")?
            .status
            .success();
        if !found {
            missing.push(requirement);
        }
    }
    let names: Vec<&str> = PY_PACKAGES.iter().map(|(_, r)| *r).collect();
    if missing.is_empty() {
        eprintln!("setup: python packages ok ({})", names.join(", "));
        return Ok(());
    }
    eprintln!("setup: installing python packages: {}", missing.join(" "));
    let mut pip = Command::new("python3");
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(&missing);
    // Debian's own python3 marks its site-packages as externally managed (PEP 668).
    let managed = ctx::output(Command::new("python3").args([
        "-c",
        "import sysconfig, os; print(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))",
    ]))?;
    if managed.trim() == "True" {
        pip.arg("--break-system-packages");
    }
    ctx::run(&mut pip)?;
    eprintln!("setup: python packages installed ({})", missing.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_cgroup2_mount() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(
            cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
        assert_eq!(
            cgroup2_mount("none /a\\040b cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/a b"))
        );
    }

    #[test]
    fn parses_channel() {
        let text = "# pinned\n[toolchain]\nchannel = \"nightly-2026-05-19\"\ncomponents = [\"rust-src\"]\n";
        assert_eq!(parse_channel(text).as_deref(), Some("nightly-2026-05-19"));
        assert_eq!(
            parse_channel("channel='nightly' # x").as_deref(),
            Some("nightly")
        );
        assert_eq!(parse_channel("[toolchain]\n"), None);
    }

    #[test]
    fn matches_toolchain_list_lines() {
        let pinned = "nightly-2026-05-19";
        assert!(lists_toolchain(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu",
            pinned
        ));
        assert!(lists_toolchain("nightly-2026-05-19 (default)", pinned));
        assert!(!lists_toolchain("nightly-x86_64-unknown-linux-gnu", pinned));
        assert!(!lists_toolchain(
            "nightly-2026-05-19-x86_64-unknown-linux-gnu",
            "nightly"
        ));
        assert!(lists_toolchain(
            "nightly-x86_64-unknown-linux-gnu (active)",
            "nightly"
        ));
    }

    #[test]
    fn libllvm_names() {
        assert_eq!(
            libllvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some(22)
        );
        assert_eq!(libllvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(libllvm_major("libLLVM.so"), None);
    }

    #[test]
    fn this_host_passes_checks() -> Result<()> {
        // The project's machines (and CI) are root with BTF and cgroup v2; skip elsewhere.
        if sys::geteuid() != 0 {
            return Ok(());
        }
        let host = check_host()?;
        assert!(host.cgroup2.is_absolute());
        Ok(())
    }
}
