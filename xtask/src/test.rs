//! `cargo xtask test`: every test of the project, the command CI runs: cargo's tests, then a
//! `--quick` bench run checked for a complete report (never for speed).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::{
    bench, build_ebpf,
    exec::{describe, workspace_root},
    package, toolchain,
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
    // The end-to-end tests run the real `xlb` binary, found next to their own directory, and
    // the package test installs the .deb made of it: packaging builds it first.
    package::run(&package::Options {
        profile: "dev".to_owned(),
    })?;
    run_tests(
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

/// Runs `cargo test`, passing its output through, and when tests fail, prints their failure
/// reports once more at the very end: with `--no-fail-fast` they are otherwise buried under
/// every later test binary's output, and a CI log that keeps only its tail loses them.
fn run_tests(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", describe(command));
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start `cargo test`")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut reports = FailureReports::default();
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading `cargo test`'s output")?;
        writeln!(out, "{line}")?;
        reports.feed(line);
    }
    drop(out);
    let status = child.wait().context("waiting for `cargo test`")?;
    if !status.success() {
        if !reports.blocks.is_empty() {
            eprintln!("\nxtask: the failure reports again:\n");
            for block in &reports.blocks {
                eprintln!("{block}");
            }
        }
        bail!("`cargo test` failed with {status}");
    }
    Ok(())
}

/// libtest's failure reports, collected from its output: from a binary's first `failures:`
/// line to its `test result:` line.
#[derive(Default)]
struct FailureReports {
    current: Option<String>,
    blocks: Vec<String>,
}

impl FailureReports {
    fn feed(&mut self, line: String) {
        if line.starts_with("test result:") {
            if let Some(mut block) = self.current.take() {
                block.push_str(&line);
                self.blocks.push(block);
            }
            return;
        }
        let block = match &mut self.current {
            Some(block) => block,
            None if line == "failures:" => self.current.insert(String::new()),
            None => return,
        };
        block.push_str(&line);
        block.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::FailureReports;

    #[test]
    fn failure_reports_are_collected_from_failures_to_the_result_line() {
        let output = "running 2 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n\
                      ---- b stdout ----\nthread 'b' panicked at x.rs:1:1:\nboom\n\nfailures:\n    b\n\n\
                      test result: FAILED. 1 passed; 1 failed\n\nrunning 1 test\ntest c ... ok\n\n\
                      test result: ok. 1 passed; 0 failed\n";
        let mut reports = FailureReports::default();
        for line in output.lines() {
            reports.feed(line.to_owned());
        }
        assert_eq!(reports.blocks.len(), 1);
        let block = &reports.blocks[0];
        assert!(
            block.starts_with("failures:\n\n---- b stdout ----\n"),
            "{block}"
        );
        assert!(block.contains("boom\n"));
        assert!(block.ends_with("test result: FAILED. 1 passed; 1 failed"));
    }
}
