//! Hitless restart: a second `xlb run` or `xlb proxy` started with the same arguments on the
//! same node takes over from the running one, as HAProxy's `-sf` and nginx's binary upgrade
//! do, with no signal between the two:
//!
//! 1. The newcomer adopts the connection tables and backend ids the running one pinned (see
//!    [`crate::pins`]), so that its program finds every established flow and its backend.
//! 2. It fills its own maps from its first route snapshot, then replaces the program on each
//!    interface through the pinned XDP link (`bpf_link_update`: atomic, every packet meets
//!    one program or the other).
//! 3. It listens beside the running one (`SO_REUSEPORT`) and writes its pid to the instance's
//!    owner file ([`Instance::claim`]).
//! 4. The running one finds another pid there ([`Instance::superseded`]), stops accepting,
//!    drains as on SIGTERM and exits, leaving the pins. The kernel hands the connections still
//!    queued on its listeners to the newcomer's (`net.ipv4.tcp_migrate_req`, set at start).
//!
//! A stop with no successor detaches the program and removes the pins, as a reboot would.

use std::{
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use xxhash_rust::xxh3::xxh3_64;

/// Where owner files live: a tmpfs, so that none outlives a reboot.
const OWNER_DIR: &str = "/run/xlb";
/// How often a running process reads its owner file for a successor.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Lets a listener's queued connections move to another listener of its `SO_REUSEPORT` group
/// when it closes, instead of being reset (Linux 5.14).
const TCP_MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// One xlb on one node: the same network namespace, config file, interfaces and extension.
/// Two processes of one instance hand over; two instances never see each other.
#[derive(Debug, Clone)]
pub struct Instance {
    name: String,
    owner_file: PathBuf,
}

impl Instance {
    pub fn new(config: &Path, interfaces: &[String], extension: &str) -> anyhow::Result<Self> {
        let netns = std::fs::metadata("/proc/self/ns/net")
            .context("reading this process's network namespace")?
            .ino();
        let config = std::fs::canonicalize(config)
            .with_context(|| format!("resolving {}", config.display()))?;
        let mut interfaces = interfaces.to_vec();
        interfaces.sort();
        let mut identity = config.as_os_str().as_bytes().to_vec();
        for part in interfaces.iter().map(String::as_str).chain([extension]) {
            identity.push(0);
            identity.extend_from_slice(part.as_bytes());
        }
        // xxh3, a specified hash: a newer binary computes the same name as the running one
        // (std's `DefaultHasher` may change with the Rust release that built it).
        let name = format!("net{netns}-{:016x}", xxh3_64(&identity));
        let owner_file = Path::new(OWNER_DIR).join(format!("{name}.owner"));
        Ok(Self { name, owner_file })
    }

    /// The instance's name: its pins' directory under `--bpf-dir`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process that owns the instance now, if it runs and is not this one.
    pub fn running_owner(&self) -> Option<u32> {
        let owner = self.owner()?;
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(owner as i32), None).is_ok();
        (alive && owner != std::process::id()).then_some(owner)
    }

    fn owner(&self) -> Option<u32> {
        std::fs::read_to_string(&self.owner_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Makes this process the owner: the running one, if any, sees it and leaves.
    pub fn claim(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(OWNER_DIR).with_context(|| format!("creating {OWNER_DIR}"))?;
        // Written aside and renamed: a reader sees the old pid or the new one, never half.
        let partial = self.owner_file.with_extension("owner.partial");
        std::fs::write(&partial, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &self.owner_file)
            .with_context(|| format!("writing {}", self.owner_file.display()))
    }

    /// Resolves when another process has claimed the instance; returns its pid.
    pub async fn superseded(&self) -> u32 {
        let me = std::process::id();
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            match self.owner() {
                Some(owner) if owner != me => return owner,
                _ => {}
            }
        }
    }

    /// The owner file (handed to `User` with the process, so that a stop can release it).
    pub fn owner_file(&self) -> &Path {
        &self.owner_file
    }

    /// On a stop: gives the instance up, unless a successor claimed it. (Emptied rather than
    /// removed when the process runs as `User`: the directory is root's.)
    pub fn release(&self) {
        if self.owner() == Some(std::process::id())
            && std::fs::remove_file(&self.owner_file).is_err()
        {
            let _ = std::fs::write(&self.owner_file, "");
        }
    }
}

/// Tells the service manager, if one started this process (`NOTIFY_SOCKET`, a systemd unit of
/// `Type=notify`), that it serves now and is the service's main process: after a handover,
/// systemd then follows the newcomer rather than the process that leaves (the unit needs
/// `NotifyAccess=all`, since the newcomer was started by `ExecReload`).
pub fn notify_service_manager() {
    let states = [
        sd_notify::NotifyState::MainPid(std::process::id()),
        sd_notify::NotifyState::Ready,
    ];
    if let Err(error) = sd_notify::notify(false, &states) {
        tracing::warn!(%error, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Sets `tcp_migrate_req` in this network namespace (see the module's step 4).
pub fn migrate_queued_connections() -> anyhow::Result<()> {
    std::fs::write(TCP_MIGRATE_REQ, "1").with_context(|| format!("writing 1 to {TCP_MIGRATE_REQ}"))
}
