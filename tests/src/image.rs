//! Images for the testbed's engine: `FROM scratch` plus one static binary, and
//! the docker-demo backend binary built so that such an image can run it.
//! No registry is reachable, so every image is built locally.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::command::{command_line, output_of};
use crate::dockerd::Dockerd;
use crate::unique::ScratchDir;

/// glibc targets link statically with this; rustup can't fetch musl here.
/// Passing `--target` keeps these flags off build scripts and host builds.
const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";
const DOCKER_DEMO_PACKAGE: &str = "docker-demo";

/// Builds `tag` as `FROM scratch`, `ENTRYPOINT` = `static_binary`.
pub fn build_scratch_image(dockerd: &Dockerd, tag: &str, static_binary: &Path) -> Result<()> {
    ensure_statically_linked(static_binary)?;
    let file_name = static_binary
        .file_name()
        .and_then(|name| name.to_str())
        .with_context(|| format!("{} has no usable file name", static_binary.display()))?;
    let context = ScratchDir::create("image-context")?;
    std::fs::copy(static_binary, context.path().join(file_name)).with_context(|| {
        format!(
            "cannot copy {} into the build context",
            static_binary.display()
        )
    })?;
    std::fs::write(
        context.path().join("Dockerfile"),
        format!("FROM scratch\nCOPY {file_name} /{file_name}\nENTRYPOINT [\"/{file_name}\"]\n"),
    )
    .context("cannot write the Dockerfile")?;
    let context_path = context.path().to_string_lossy().into_owned();
    dockerd.docker(&["build", "--quiet", "--tag", tag, &context_path])?;
    Ok(())
}

/// A dynamically linked binary fails in a scratch image with a baffling
/// "no such file or directory" (its loader is missing); say so up front.
fn ensure_statically_linked(binary: &Path) -> Result<()> {
    let bytes =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    if elf_interpreter_present(&bytes)
        .with_context(|| format!("{} is not a 64-bit ELF executable", binary.display()))?
    {
        bail!(
            "{} is dynamically linked; a FROM scratch image needs a static binary",
            binary.display()
        );
    }
    Ok(())
}

/// Whether a little-endian ELF64 file has a PT_INTERP program header, i.e.
/// needs a dynamic loader.
fn elf_interpreter_present(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let read_u16 = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let read_u32 = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let read_u64 = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    let is_elf64_le = elf.get(..6) == Some(b"\x7fELF\x02\x01".as_slice());
    if !is_elf64_le {
        return None;
    }
    let header_table = usize::try_from(read_u64(0x20)?).ok()?;
    let header_size = usize::from(read_u16(0x36)?);
    let header_count = usize::from(read_u16(0x38)?);
    let mut found = false;
    for index in 0..header_count {
        found |= read_u32(header_table + index * header_size)? == PT_INTERP;
    }
    Some(found)
}

/// Builds docker-demo as a static release binary and returns its path.
/// Uses the workspace's target dir (or `CARGO_TARGET_DIR`), so it is cached.
pub fn build_docker_demo_binary() -> Result<PathBuf> {
    let workspace_manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the testbed crate has no parent dir")?
        .join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--release", "--package", DOCKER_DEMO_PACKAGE])
        .args(["--target", STATIC_TARGET])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&workspace_manifest)
        // CARGO_ENCODED_RUSTFLAGS would take precedence over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", STATIC_RUSTFLAGS)
        .stdin(Stdio::null());
    let output = output_of(&mut command)?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(executable_of)
        .with_context(|| {
            format!(
                "`{}` reported no docker-demo executable",
                command_line(&command)
            )
        })
}

/// The executable path from one line of cargo's JSON messages, if the line
/// is the docker-demo binary's artifact.
fn executable_of(message_line: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(message_line).ok()?;
    if message["reason"] != "compiler-artifact" || message["target"]["name"] != DOCKER_DEMO_PACKAGE
    {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binaries_are_recognised() {
        // The test binary itself is an ordinary dynamically linked executable.
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_interpreter_present(&own), Some(true));
        assert_eq!(elf_interpreter_present(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn cargo_artifact_messages_are_parsed() {
        let line = r#"{"reason":"compiler-artifact","target":{"name":"docker-demo"},"executable":"/t/docker-demo"}"#;
        assert_eq!(executable_of(line), Some(PathBuf::from("/t/docker-demo")));
        let library =
            r#"{"reason":"compiler-artifact","target":{"name":"httparse"},"executable":null}"#;
        assert_eq!(executable_of(library), None);
        assert_eq!(executable_of("not json"), None);
    }
}
