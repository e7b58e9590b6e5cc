//! Builds the eBPF programs with the nightly pinned in `ebpf/scopegate-ebpf/rust-toolchain.toml`
//! and leaves the object in OUT_DIR for `include_bytes!`.
use std::{fs, path::Path};

fn main() {
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/scopegate-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let text = fs::read_to_string(&toolchain_file)
        .unwrap_or_else(|e| panic!("{}: {e}", toolchain_file.display()));
    let channel = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .unwrap_or_else(|| panic!("{}: no channel = \"...\" line", toolchain_file.display()))
        .to_owned();

    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR");
    let object = Path::new(&out_dir).join("scopegate");
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // clippy/doc builds: an empty object; the agent refuses to load it with a clear error.
        if !object.exists() {
            fs::write(&object, b"").expect("write placeholder object");
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return;
    }
    let ebpf = aya_build::Package {
        name: "scopegate-ebpf",
        root_dir: ebpf_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&channel)) {
        panic!(
            "building the eBPF programs failed: {e:#}\n\
             hint: run `cargo xtask setup` (it installs {channel}, rust-src and bpf-linker)"
        );
    }
}
