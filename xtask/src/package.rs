//! `cargo xtask package`: the .deb for load-balancer nodes, built by cargo-deb from the
//! metadata in `userspace/Cargo.toml`: the binary, the systemd units, an example config, the
//! man page and bash completions, which the built binary makes first (`xlb manpage`, `xlb
//! completions bash`), as clap_mangen and clap_complete render them.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::{
    build_ebpf,
    exec::{exec, workspace_root},
    toolchain,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The Cargo profile to package (`dev` for a quick package in tests).
    #[arg(long, default_value = "release")]
    pub profile: String,
}

/// Builds the package; returns its path.
pub fn run(options: &Options) -> anyhow::Result<PathBuf> {
    let cargo_deb = toolchain::ensure_cargo_deb()?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let root = workspace_root();
    exec(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--profile",
        &options.profile,
        "-p",
        "xlb",
        "--bins",
    ]))?;
    // cargo-deb finds assets under `target/release/` in the profile's own directory.
    let built = root.join("target").join(match options.profile.as_str() {
        "dev" => "debug",
        profile => profile,
    });
    let xlb = built.join("xlb");
    write_generated(
        &built.join("xlb.1.gz"),
        &gzip(&output(&xlb, &["manpage"])?)?,
    )?;
    let completions = output(&xlb, &["completions", "bash"])?;
    write_generated(&built.join("xlb.bash-completion"), &completions)?;

    let out = root.join("target/debian");
    exec(
        Command::new(cargo_deb)
            .current_dir(&root)
            .args([
                "-p",
                "xlb",
                "--no-build",
                "--strip",
                "--profile",
                &options.profile,
            ])
            .arg("--output")
            .arg(&out),
    )?;
    let version = env!("CARGO_PKG_VERSION");
    let deb = out.join(format!("xlb_{version}-1_amd64.deb"));
    if !deb.is_file() {
        bail!("cargo-deb made no {}", deb.display());
    }
    eprintln!("xtask: {}", deb.display());
    Ok(deb)
}

/// What `program args` prints, or an error with what it said.
fn output(program: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}

/// `bytes` compressed as `gzip -9n` does (no name, no time: the same input makes the same
/// file), which man pages are installed as.
fn gzip(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-9n"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running gzip")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(bytes)
        .context("writing to gzip")?;
    let output = child.wait_with_output().context("waiting for gzip")?;
    if !output.status.success() {
        bail!("gzip failed");
    }
    Ok(output.stdout)
}

fn write_generated(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
