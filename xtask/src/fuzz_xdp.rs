//! `cargo xtask fuzz-xdp --frames N [--seed S]`: the XDP fuzz test (`tests/tests/xdp_fuzz.rs`)
//! with more frames, or another seed, than `cargo xtask test` runs.

use std::process::Command;

use crate::{
    build_ebpf,
    exec::{exec, workspace_root},
    toolchain,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// How many frames to run through the program.
    #[arg(long, default_value_t = 1_000_000)]
    pub frames: u64,
    /// The generator's seed (default: the test's fixed seed); a failure prints the one to replay.
    #[arg(long)]
    pub seed: Option<u64>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    toolchain::require_root("`cargo xtask fuzz-xdp` (BPF_PROG_TEST_RUN)")?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(workspace_root())
        .args([
            "test",
            "-p",
            "xlb-testbed",
            "--test",
            "xdp_fuzz",
            "--",
            "--nocapture",
        ])
        .env("XLB_FUZZ_FRAMES", options.frames.to_string());
    if let Some(seed) = options.seed {
        cargo.env("XLB_FUZZ_SEED", seed.to_string());
    }
    exec(&mut cargo)
}
