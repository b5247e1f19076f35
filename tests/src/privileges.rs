//! The testbed needs root: it creates network namespaces and veth pairs and
//! runs dockerd. Checking up front turns a cascade of confusing `ip` errors
//! into one clear message.

use anyhow::{bail, Context, Result};

pub fn require_root() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status to check the user id")?;
    let effective_uid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no effective Uid in /proc/self/status")?;
    if effective_uid != "0" {
        bail!(
            "xlb-testbed must run as root (it creates network namespaces and runs dockerd); \
             effective uid is {effective_uid}"
        );
    }
    Ok(())
}
