//! `cargo xtask test`: every test of the project, the command CI runs.

use std::process::Command;

use crate::{
    build_ebpf,
    exec::{exec, workspace_root},
    toolchain,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    toolchain::require_root("`cargo xtask test`")?;
    toolchain::ensure_packages(toolchain::RUNTIME_PACKAGES)?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    // The end-to-end tests run the real `xlb` binary, found next to their own directory.
    exec(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["build", "-p", "xlb", "--bins"]),
    )?;
    exec(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(&options.cargo_test_args),
    )
}
