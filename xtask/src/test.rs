//! `cargo xtask test`: every test of the project, the command CI runs: cargo's tests, then a
//! `--quick` bench run checked for a complete report (never for speed).

use std::process::Command;

use anyhow::Context as _;

use crate::{
    bench, build_ebpf,
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
    toolchain::ensure_packages(toolchain::TEST_PACKAGES)?;
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
    )?;
    if options.cargo_test_args.is_empty() {
        let quick_dir = workspace_root().join("target/bench/quick");
        // A previous run's files must not stand in for this run's.
        if quick_dir.exists() {
            std::fs::remove_dir_all(&quick_dir)
                .with_context(|| format!("removing {}", quick_dir.display()))?;
        }
        let quick = bench::Options {
            section: bench::Section::All,
            duration: 1,
            rates: Vec::new(),
            quick: true,
            out: Some(quick_dir),
            only: Vec::new(),
            // Two, so that the paired rounds are checked too.
            rounds: 2,
            profile: true,
            callgrind: true,
        };
        let out = bench::run(&quick)?;
        bench::check_report(&out, &[bench::QUICK_RATE], quick.rounds as usize)?;
        bench::check_profiles(&out)?;
        bench::check_instructions(&out)?;
        eprintln!(
            "xtask: the --quick bench produced every row and file ({})",
            out.display()
        );
    }
    Ok(())
}
