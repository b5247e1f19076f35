//! Long-running child processes (dockerd, an xlb instance, ...) that are
//! stopped by their own PID when dropped: SIGTERM, a grace period, SIGKILL.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::command::{command_line, run_program};

const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug)]
pub struct Process {
    child: Child,
    description: String,
    stop_grace: Duration,
}

impl Process {
    pub fn spawn(mut command: Command) -> Result<Process> {
        let description = command_line(&command);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start `{description}`"))?;
        Ok(Process {
            child,
            description,
            stop_grace: DEFAULT_STOP_GRACE,
        })
    }

    /// How long [`Process::stop`] (and Drop) waits after SIGTERM before SIGKILL.
    pub fn with_stop_grace(mut self, grace: Duration) -> Process {
        self.stop_grace = grace;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    /// `Some(status)` once the process has exited (and is reaped).
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("cannot poll `{}`", self.description))
    }

    /// SIGKILL right away, as when a machine or the OOM killer takes a process down; waits
    /// until it is reaped.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.child
            .kill()
            .with_context(|| format!("cannot kill `{}`", self.description))?;
        self.child
            .wait()
            .with_context(|| format!("cannot reap `{}`", self.description))
    }

    /// SIGTERM, then SIGKILL if it outlives the grace period; idempotent.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit_status()? {
            return Ok(status);
        }
        // std only offers SIGKILL; a graceful stop lets dockerd take its
        // containers and containerd down with it.
        run_program("kill", &["-TERM", &self.pid().to_string()])?;
        let deadline = Instant::now() + self.stop_grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status()? {
                return Ok(status);
            }
            std::thread::sleep(EXIT_POLL_INTERVAL);
        }
        eprintln!(
            "xlb-testbed: `{}` (pid {}) ignored SIGTERM for {:?}; killing it",
            self.description,
            self.pid(),
            self.stop_grace
        );
        self.child
            .kill()
            .with_context(|| format!("cannot kill `{}`", self.description))?;
        self.child
            .wait()
            .with_context(|| format!("cannot reap `{}`", self.description))
    }
}

/// SIGTERM to a process that is not our child (one left running by an earlier command), then
/// SIGKILL if it is still there after `grace`.
pub(crate) fn terminate_pid(pid: u32, grace: Duration) -> Result<()> {
    let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists();
    run_program("kill", &["-TERM", &pid.to_string()])?;
    let deadline = Instant::now() + grace;
    while alive() && Instant::now() < deadline {
        std::thread::sleep(EXIT_POLL_INTERVAL);
    }
    if alive() {
        eprintln!("xlb-testbed: pid {pid} ignored SIGTERM for {grace:?}; killing it");
        run_program("kill", &["-KILL", &pid.to_string()])?;
    }
    Ok(())
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("xlb-testbed: stopping `{}`: {error:#}", self.description);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_terminates_with_sigterm() {
        let mut process = Process::spawn({
            let mut command = Command::new("sleep");
            command.arg("30");
            command
        })
        .unwrap();
        let started = Instant::now();
        let status = process.stop().unwrap();
        assert!(!status.success());
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn stop_falls_back_to_sigkill() {
        let mut process = Process::spawn({
            let mut command = Command::new("sh");
            command.args(["-c", "trap '' TERM; exec sleep 30"]);
            command
        })
        .unwrap()
        .with_stop_grace(Duration::from_millis(300));
        // Let the shell install its trap before the signal arrives.
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        process.stop().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(process.stop().is_ok(), "a second stop is a no-op");
    }
}
