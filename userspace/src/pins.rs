//! What outlives a process on the BPF filesystem (`--bpf-dir`, one directory per
//! [`crate::handover::Instance`]): the maps the next process's program adopts, and each
//! interface's XDP link, through which the next process replaces the program.
//!
//! Only the state a restart must not lose is pinned: the connection tables, and the backends
//! their flows name by id and generation. Everything else (services, rings, ports, egress,
//! counters) the next process writes afresh from its first route snapshot before its program
//! replaces the running one.

use std::{
    mem::size_of,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use aya::maps::{MapInfo, MapType};
use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};
use xlb_common::{Backend, Backend6, FlowKey, FlowKey6, FlowValue, FlowValue6, MAX_BACKENDS};

use crate::l4::settings::L4Settings;

/// Where the BPF filesystem is mounted on a systemd host, and where xlb mounts it if not.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// A map the next process adopts, and the shape it must have to be adopted.
struct PinnedMap {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: fn(&L4Settings) -> u32,
}

const PINNED_MAPS: [PinnedMap; 4] = [
    PinnedMap {
        name: "FLOWS",
        map_type: MapType::Hash,
        key_size: size_of::<FlowKey>(),
        value_size: size_of::<FlowValue>(),
        max_entries: |settings| settings.flow_entries,
    },
    PinnedMap {
        name: "FLOWS6",
        map_type: MapType::Hash,
        key_size: size_of::<FlowKey6>(),
        value_size: size_of::<FlowValue6>(),
        max_entries: |settings| settings.flow_entries,
    },
    PinnedMap {
        name: "BACKENDS",
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<Backend>(),
        max_entries: |_| MAX_BACKENDS,
    },
    PinnedMap {
        name: "BACKENDS6",
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<Backend6>(),
        max_entries: |_| MAX_BACKENDS,
    },
];

/// One instance's directory on the BPF filesystem.
#[derive(Debug, Clone)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    /// `bpf_dir/instance`, created; the BPF filesystem is mounted at `/sys/fs/bpf` first if
    /// `bpf_dir` is under it and nothing is (systemd mounts it at boot; a bare host may not).
    pub fn open(bpf_dir: &Path, instance: &str) -> anyhow::Result<Self> {
        let existing = bpf_dir
            .ancestors()
            .find(|dir| dir.exists())
            .unwrap_or(Path::new("/"));
        let on_bpf_fs =
            |dir: &Path| statfs(dir).is_ok_and(|stat| stat.filesystem_type() == BPF_FS_MAGIC);
        if !on_bpf_fs(existing) {
            if !bpf_dir.starts_with(BPF_FS_ROOT) {
                bail!(
                    "--bpf-dir {}: not on a BPF filesystem (mount one there: mount -t bpf bpf DIR)",
                    bpf_dir.display()
                );
            }
            mount(
                Some("bpf"),
                BPF_FS_ROOT,
                Some("bpf"),
                MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("mounting the BPF filesystem on {BPF_FS_ROOT}"))?;
            tracing::info!(path = BPF_FS_ROOT, "BPF filesystem mounted");
        }
        let dir = bpf_dir.join(instance);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Each adoptable map's name and pin path, after removing the pins this build cannot
    /// adopt (another layout or size: a binary upgrade that changed them, or a new
    /// `FlowEntries`). Their flows are lost to the new program; the running one keeps its own
    /// until it exits.
    pub fn maps(&self, settings: &L4Settings) -> Vec<(&'static str, PathBuf)> {
        PINNED_MAPS
            .iter()
            .map(|map| {
                let path = self.dir.join(map.name);
                if path.exists() {
                    if let Err(reason) = adoptable(map, &path, settings) {
                        tracing::warn!(
                            map = map.name,
                            reason = format!("{reason:#}"),
                            "pinned map not adopted: its entries are lost to this process"
                        );
                        let _ = std::fs::remove_file(&path);
                    }
                }
                (map.name, path)
            })
            .collect()
    }

    /// Whether the previous process left the backends' ids (then they are adopted).
    pub fn has_backends(&self) -> bool {
        self.dir.join("BACKENDS").exists()
    }

    pub fn link(&self, interface: &str) -> PathBuf {
        self.dir.join(format!("link-{interface}"))
    }

    /// The instance's directory (handed to `User` with the process, so that a stop can
    /// still unpin).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// On a stop: unpins everything. The program is detached when the last descriptor of
    /// its links closes, and the maps go with the program. (The directory itself stays when
    /// the process runs as `User`: its parent is root's.)
    pub fn remove(&self) {
        let entries = std::fs::read_dir(&self.dir).into_iter().flatten().flatten();
        for entry in entries {
            if let Err(error) = std::fs::remove_file(entry.path()) {
                tracing::warn!(pin = %entry.path().display(), %error, "not unpinned");
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn adoptable(map: &PinnedMap, path: &Path, settings: &L4Settings) -> anyhow::Result<()> {
    let info = MapInfo::from_pin(path).context("reading the pinned map")?;
    let found = (
        info.map_type().ok(),
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    );
    let wanted = (
        Some(map.map_type),
        map.key_size,
        map.value_size,
        (map.max_entries)(settings),
    );
    if found != wanted {
        bail!("(type, key size, value size, entries) is {found:?}, this build needs {wanted:?}");
    }
    Ok(())
}
