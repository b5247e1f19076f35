//! Installs what building and testing xlb needs on Debian 12, once, and says what it installs.
//!
//! Rust eBPF needs a compiler whose library sources are installed (for `-Z build-std=core`);
//! rustup cannot fetch `rust-src` here, so the XDP program is built with Debian's `rustc-web`
//! and `rust-web-src`, and a `bpf-linker` built against Debian's LLVM 22. The linker is cached
//! under a stable path (`/var/cache/xlb/tools`, or `$XLB_TOOLS_DIR`) so it is built only once.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context as _};

use crate::exec::exec;

/// Debian packages for building the XDP program.
pub const EBPF_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "llvm-22-dev"];
/// Debian packages the tests and the demo run: a real Docker engine, namespaces, veth tuning,
/// and the HTTP/2 clients the proxy is tested with (curl, h2load).
pub const RUNTIME_PACKAGES: &[&str] = &[
    "docker.io",
    "iproute2",
    "ethtool",
    "iptables",
    "curl",
    "nghttp2-client",
];
/// Debian packages only the test suite needs: `vagrant`, whose `vagrant validate` checks the
/// Vagrantfile (no VM can boot on these machines), `systemd`, whose `systemd-analyze verify`
/// checks the units, and `chromium`, in which the dashboard test loads the admin page,
/// headless.
pub const TEST_PACKAGES: &[&str] = &["systemd", "vagrant", "chromium"];

pub const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian's toolchain, ahead of rustup's proxies for the eBPF build only.
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root (apt packages, network namespaces, XDP): run it as root, e.g. with sudo");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing ones among `packages` with apt.
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    require_root("installing Debian packages")?;
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        exec(Command::new("apt-get").args(["update", "-q"]))
            .context("apt-get update failed: is a Debian package mirror reachable?")?;
    }
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("could not install {}", missing.join(" ")))
}

fn tools_dir() -> PathBuf {
    std::env::var_os("XLB_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/xlb/tools"))
}

/// The directory holding `bpf-linker`, built against LLVM 22 on first use.
pub fn ensure_bpf_linker() -> anyhow::Result<PathBuf> {
    let root = tools_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm22"));
    let bin = root.join("bin");
    if bin.join("bpf-linker").is_file() {
        return Ok(bin);
    }
    ensure_packages(EBPF_PACKAGES)?;
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 into {} (once, about 3 minutes)",
        root.display()
    );
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    exec(
        Command::new("cargo")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"])
            .arg("--root")
            .arg(&root)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
    .context("building bpf-linker failed (it needs llvm-22-dev and crates.io)")?;
    Ok(bin)
}

/// `PATH` for the eBPF build: bpf-linker first, then Debian's cargo and rustc.
pub fn ebpf_path(linker_bin: &Path) -> anyhow::Result<std::ffi::OsString> {
    let inherited = std::env::var_os("PATH").unwrap_or_default();
    let dirs = [linker_bin.to_path_buf(), PathBuf::from("/usr/bin")]
        .into_iter()
        .chain(std::env::split_paths(&inherited));
    std::env::join_paths(dirs).context("PATH holds an unusable entry")
}

/// oha, the open-loop HTTP load generator (none is packaged for Debian 12).
pub const OHA_VERSION: &str = "1.16.0";

/// The `oha` binary, built from crates.io into the tools cache on first use (about 4 minutes).
pub fn ensure_oha() -> anyhow::Result<PathBuf> {
    let root = tools_dir().join(format!("oha-{OHA_VERSION}"));
    let binary = root.join("bin/oha");
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!(
        "xtask: building oha {OHA_VERSION} into {} (once, about 4 minutes)",
        root.display()
    );
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    exec(
        Command::new("cargo")
            .args(["install", &format!("oha@{OHA_VERSION}"), "--locked"])
            .arg("--root")
            .arg(&root),
    )
    .context("building oha failed (it needs crates.io)")?;
    Ok(binary)
}

/// cargo-deb, which `cargo xtask package` builds the .deb with.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// The `cargo-deb` binary, built from crates.io into the tools cache on first use (about 3
/// minutes).
pub fn ensure_cargo_deb() -> anyhow::Result<PathBuf> {
    let root = tools_dir().join(format!("cargo-deb-{CARGO_DEB_VERSION}"));
    let binary = root.join("bin/cargo-deb");
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!(
        "xtask: building cargo-deb {CARGO_DEB_VERSION} into {} (once, about 3 minutes)",
        root.display()
    );
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    exec(
        Command::new("cargo")
            .args([
                "install",
                &format!("cargo-deb@{CARGO_DEB_VERSION}"),
                "--locked",
            ])
            .arg("--root")
            .arg(&root),
    )
    .context("building cargo-deb failed (it needs crates.io)")?;
    Ok(binary)
}
