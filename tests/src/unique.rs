//! Per-run uniqueness: run identifiers for namespace names, and private
//! scratch directories removed on Drop. Several runs (test threads, other
//! worktrees' tests) share this machine, so nothing may use a fixed name.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

static NEXT_RUN: AtomicU32 = AtomicU32::new(0);

/// A fresh identifier for one run, unique on this machine while this process
/// lives: the PID tells processes apart, the counter tells runs in one apart.
pub fn run_id() -> RunId {
    RunId {
        pid: std::process::id(),
        sequence: NEXT_RUN.fetch_add(1, Ordering::Relaxed),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunId {
    pub pid: u32,
    pub sequence: u32,
}

impl std::fmt::Display for RunId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}-{}", self.pid, self.sequence)
    }
}

/// A directory under the system temp dir, removed with its contents on Drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn create(purpose: &str) -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!("xlb-{purpose}-{}", run_id()));
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create scratch dir {}", path.display()))?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!(
                "xlb-testbed: cannot remove {}: {error}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_differ_within_a_process() {
        assert_ne!(run_id(), run_id());
    }

    #[test]
    fn scratch_dirs_are_removed() {
        let dir = ScratchDir::create("unit").unwrap();
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("file"), "x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }
}
