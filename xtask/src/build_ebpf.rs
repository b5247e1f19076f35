//! `cargo xtask build-ebpf`: builds `dataplane-ebpf` and places the object where the `xlb`
//! build embeds it (`target/ebpf/xlb-dataplane.o`).

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{
    exec::{exec, workspace_root},
    toolchain,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Build with the release profile (both profiles are optimised: the verifier needs it).
    #[arg(long)]
    pub release: bool,
}

/// Builds the XDP object and returns its path.
pub fn run(options: &Options) -> anyhow::Result<PathBuf> {
    toolchain::ensure_packages(toolchain::EBPF_PACKAGES)?;
    let linker_bin = toolchain::ensure_bpf_linker()?;
    let root = workspace_root();
    let target_dir = root.join("target/ebpf");
    let mut cargo = Command::new(toolchain::DEBIAN_CARGO);
    cargo
        .current_dir(root.join("dataplane-ebpf"))
        .args(["build", "--target-dir"])
        .arg(&target_dir)
        .env("PATH", toolchain::ebpf_path(&linker_bin)?)
        // Unlocks `-Z build-std` on Debian's stable compiler, for this build only.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf");
    for inherited in [
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cargo.env_remove(inherited);
    }
    if options.release {
        cargo.arg("--release");
    }
    exec(&mut cargo).context("building the XDP program failed")?;

    let profile = if options.release { "release" } else { "debug" };
    let built = target_dir
        .join("bpfel-unknown-none")
        .join(profile)
        .join("xlb-dataplane");
    let object = target_dir.join("xlb-dataplane.o");
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    eprintln!("xtask: XDP object ({profile}) at {}", object.display());
    Ok(object)
}
