//! A private Docker engine running inside a testbed namespace: its own socket,
//! data-root, exec-root and config under a scratch dir, so its bridges and
//! iptables rules live in that namespace and it shares nothing with any other
//! engine on the machine. Stopped by PID and cleaned up on Drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cgroup_mounts::restore_cgroup_mounts_commands;
use crate::command::{run, run_program};
use crate::netns::Netns;
use crate::process::Process;
use crate::unique::ScratchDir;
use crate::wait::wait_until;

const DOCKERD: &str = "dockerd";
/// The client packaged with Debian's dockerd. A newer client may come first on
/// PATH; the matching one avoids API negotiation and BuildKit surprises.
const PACKAGED_DOCKER_CLI: &str = "/usr/bin/docker";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// dockerd stops running containers on SIGTERM (15 s each at most), and
/// containerd after them; killing it sooner strands both.
const STOP_GRACE: Duration = Duration::from_secs(30);
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug)]
pub struct Dockerd {
    process: Process,
    netns: Netns,
    socket: PathBuf,
    scratch: ScratchDir,
}

impl Dockerd {
    /// Starts dockerd inside `netns` and waits until it answers `/_ping`.
    pub fn start(netns: &Netns) -> Result<Dockerd> {
        Self::start_as(netns, None)
    }

    /// As [`Dockerd::start`], the engine in a UTS namespace of its own whose host name is
    /// `hostname`: a Swarm node takes its name from its host's, and nodes on one machine would
    /// otherwise all share the machine's (the seed's `docker node update ... lb-00` needs
    /// `lb-00`).
    pub fn start_named(netns: &Netns, hostname: &str) -> Result<Dockerd> {
        Self::start_as(netns, Some(hostname))
    }

    fn start_as(netns: &Netns, hostname: Option<&str>) -> Result<Dockerd> {
        let scratch = ScratchDir::create("dockerd")?;
        let dir = scratch.path();
        let socket = dir.join("docker.sock");
        // An empty config file keeps a machine-wide /etc/docker/daemon.json out.
        let config = dir.join("daemon.json");
        std::fs::write(&config, "{}\n")
            .with_context(|| format!("cannot write {}", config.display()))?;
        let log_path = dir.join("dockerd.log");
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        // `sh` execs dockerd, so the PID we hold is dockerd's own.
        let mut launcher = restore_cgroup_mounts_commands()?;
        if let Some(hostname) = hostname {
            launcher.insert(0, format!("hostname {hostname}"));
        }
        launcher.push(format!("exec {DOCKERD} \"$@\""));
        let launcher = launcher.join(" && ");
        // `unshare` execs `sh` in the new UTS namespace (no fork): the PID stays dockerd's.
        let mut command = match hostname {
            Some(_) => {
                let mut command = netns.command("unshare");
                command.args(["--uts", "sh"]);
                command
            }
            None => netns.command("sh"),
        };
        command
            .args(["-c", &launcher, DOCKERD])
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("--config-file")
            .arg(&config)
            .args(["--storage-driver", "overlay2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cannot share the dockerd log")?)
            .stderr(log);
        let process = Process::spawn(command)?.with_stop_grace(STOP_GRACE);
        let mut dockerd = Dockerd {
            process,
            netns: netns.clone(),
            socket,
            scratch,
        };
        dockerd
            .wait_until_ready()
            .with_context(|| format!("dockerd log tail:\n{}", dockerd.log_tail()))?;
        Ok(dockerd)
    }

    fn wait_until_ready(&mut self) -> Result<()> {
        let socket = self.socket.clone();
        wait_until("dockerd to answer /_ping", READY_TIMEOUT, || {
            if let Some(status) = self.process.exit_status()? {
                anyhow::bail!("dockerd exited during start-up ({status})");
            }
            let ping = run(Command::new("curl")
                .args(["--silent", "--max-time", "2", "--unix-socket"])
                .arg(&socket)
                .arg("http://localhost/_ping"));
            Ok(ping.ok().filter(|body| body == "OK").map(|_| ()))
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `unix:///...`, as `DOCKER_HOST` or bollard expect it.
    pub fn host_url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// A `docker` CLI command bound to this engine (and to a private CLI
    /// config dir, so the invoking user's `~/.docker` is neither read nor written).
    pub fn docker_command(&self) -> Command {
        let program = if Path::new(PACKAGED_DOCKER_CLI).exists() {
            PACKAGED_DOCKER_CLI
        } else {
            "docker"
        };
        let mut command = Command::new(program);
        self.docker_environment(&mut command);
        command
    }

    /// What a `docker` client run by `command` needs to use this engine.
    fn docker_environment<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        command
            .env("DOCKER_HOST", self.host_url())
            .env("DOCKER_CONFIG", self.scratch.path().join("cli"))
            // No BuildKit/buildx here: `FROM scratch` images use the classic builder.
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::null())
    }

    /// Runs provisioning script `deploy/provision/NAME ARGS` (the Vagrantfile's) against this
    /// engine: its `docker` is the packaged client, reaching this engine through DOCKER_HOST.
    pub fn run_script(&self, name: &str, args: &[&str]) -> Result<String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/provision")
            .join(name);
        let mut command = Command::new("sh");
        self.docker_environment(&mut command)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .arg(&script)
            .args(args);
        run(&mut command).with_context(|| format!("provisioning script {name}"))
    }

    /// Runs `docker ARGS` against this engine and returns stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        run(self.docker_command().args(args))
    }

    /// The last lines dockerd logged, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.scratch.path().join("dockerd.log"))
            .unwrap_or_else(|error| format!("(no dockerd log: {error})"));
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn clean_up(&mut self) -> Result<()> {
        self.process.stop()?;
        release_engine_dirs(self.scratch.path())
    }

    /// Its private directory (socket, data-root, exec-root, log).
    pub fn scratch_path(&self) -> &Path {
        self.scratch.path()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Err(error) = self.clean_up() {
            eprintln!("xlb-testbed: cleaning up dockerd: {error:#}");
        }
    }
}

/// Stops an engine this crate started and left running (`cargo xtask cluster up`), known only
/// by its PID and private directory: SIGTERM, SIGKILL after the grace period, then what
/// [`Dockerd`]'s Drop does, and the directory removed. A PID whose command line does not name
/// `scratch` is not that engine any more, and is left alone.
pub fn stop_left_engine(pid: u32, scratch: &Path) -> Result<()> {
    if command_line_names(pid, scratch) {
        crate::process::terminate_pid(pid, STOP_GRACE)?;
    }
    release_engine_dirs(scratch)?;
    std::fs::remove_dir_all(scratch).with_context(|| format!("cannot remove {}", scratch.display()))
}

/// Kills what still uses an engine's private directory and unmounts what is left in it.
fn release_engine_dirs(scratch: &Path) -> Result<()> {
    kill_processes_mentioning(scratch)?;
    unmount_everything_under(scratch)
}

/// Does `/proc/<pid>/cmdline` name `dir`?
pub(crate) fn command_line_names(pid: u32, dir: &Path) -> bool {
    let needle = format!("{}/", dir.display());
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&needle))
}

/// containerd and its shims outlive a dockerd that had to be killed; their
/// command lines name our private dirs, which makes them ours to kill.
fn kill_processes_mentioning(dir: &Path) -> Result<()> {
    // The trailing slash keeps run 1's dir from matching run 10's.
    let needle = format!("{}/", dir.display());
    let own_pid = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let entry = entry?;
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|byte| byte.is_ascii_digit()) || pid == own_pid {
            continue;
        }
        // Processes may vanish while we look; that is fine.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            eprintln!("xlb-testbed: killing leftover pid {pid} using {needle}");
            run_program("kill", &["-KILL", &pid])?;
        }
    }
    Ok(())
}

/// dockerd mounts in the private mount namespace `ip netns exec` gives it, so
/// normally nothing is left in ours; this catches the exceptions before the
/// scratch dir is removed (deepest first, lazily, in case something is busy).
fn unmount_everything_under(dir: &Path) -> Result<()> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    let mut mount_points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|mount_point| Path::new(mount_point).starts_with(dir))
        .collect();
    mount_points.sort_by_key(|mount_point| std::cmp::Reverse(mount_point.len()));
    for mount_point in mount_points {
        run_program("umount", &["--lazy", mount_point])?;
    }
    Ok(())
}
