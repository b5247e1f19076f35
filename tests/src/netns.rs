//! Named network namespaces owned by the testbed: created with `ip netns add`,
//! used through `ip netns exec`, and deleted when the last handle drops, after
//! killing whatever still runs inside (everything in there was started by the
//! testbed, since nobody else knows the namespace's name).

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::command::{run, run_program};
use crate::process::Process;

/// A handle to a namespace; clones share it, so a dockerd or xlb process can
/// hold the namespace it runs in alive regardless of drop order.
#[derive(Clone, Debug)]
pub struct Netns {
    owned: Arc<OwnedNetns>,
}

#[derive(Debug)]
struct OwnedNetns {
    name: String,
}

impl Netns {
    /// Fails if a namespace of that name exists: it would belong to someone else.
    pub fn create(name: &str) -> Result<Netns> {
        if name.is_empty() || name.contains('/') || name.contains(char::is_whitespace) {
            bail!("invalid network namespace name {name:?}");
        }
        run_program("ip", &["netns", "add", name])?;
        let netns = Netns {
            owned: Arc::new(OwnedNetns {
                name: name.to_string(),
            }),
        };
        // Loopback is down in a new namespace; every use here wants it up.
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.owned.name
    }

    /// A `Command` that runs `program` inside the namespace; add arguments,
    /// environment and stdio as usual.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.name()]).arg(program);
        command
    }

    /// Runs `program` inside the namespace to completion and returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(program).args(args))
    }

    /// `ip -n <netns> ...`: configures the namespace without entering it.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", self.name()]).args(args))
    }

    /// Starts a long-running `program` inside the namespace; its output goes
    /// to this process's stdout/stderr. `ip netns exec` execs the program, so
    /// the returned PID is the program's own.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Result<Process> {
        let mut command = self.command(program);
        command.args(args).stdin(Stdio::null());
        Process::spawn(command)
    }

    /// PIDs of the processes whose network namespace this is.
    pub fn pids(&self) -> Result<Vec<u32>> {
        pids_in(self.name())
    }
}

fn pids_in(name: &str) -> Result<Vec<u32>> {
    let output = run_program("ip", &["netns", "pids", name])?;
    Ok(output
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

/// Names of all named network namespaces on the machine.
pub fn list_netns() -> Result<Vec<String>> {
    let output = run_program("ip", &["netns", "list"])?;
    Ok(output
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

impl Drop for OwnedNetns {
    fn drop(&mut self) {
        if let Err(error) = delete_netns(&self.name) {
            eprintln!("xlb-testbed: {error:#}");
        }
    }
}

/// Deletes namespace `name` after killing whatever still runs inside: `ip netns del` only
/// removes the name, and a process still inside would keep the namespace, its veths and
/// their addresses alive. For namespaces this crate created (a dropped [`Netns`], or one of a
/// cluster left running by `cargo xtask cluster up`).
pub fn delete_netns(name: &str) -> Result<()> {
    for pid in pids_in(name)? {
        eprintln!("xlb-testbed: killing pid {pid} left in namespace {name}");
        run_program("kill", &["-KILL", &pid.to_string()])?;
    }
    run_program("ip", &["netns", "del", name])?;
    Ok(())
}
