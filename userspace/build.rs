//! Embeds the XDP object built by `cargo xtask build-ebpf` and records the git revision.

use std::{path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let object = std::env::var_os("XLB_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target/ebpf/xlb-dataplane.o"));
    println!("cargo:rerun-if-env-changed=XLB_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the XDP object {} is missing: run `cargo xtask build-ebpf --release` first \
             (or set XLB_EBPF_OBJECT to a built object)",
            object.display()
        );
    }
    println!("cargo:rustc-env=XLB_EBPF_OBJECT={}", object.display());

    let sha = Command::new("git")
        .args(["rev-parse", "--short=8", "HEAD"])
        .current_dir(&manifest_dir)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=XLB_GIT_SHA={sha}");
    let git_dir = manifest_dir.join("../.git");
    if git_dir.join("HEAD").exists() {
        println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
        println!(
            "cargo:rerun-if-changed={}",
            git_dir.join("refs/heads").display()
        );
    }
}
