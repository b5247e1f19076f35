//! `User`: once everything that needs root is done (XDP attached, ports bound, files opened),
//! `xlb proxy` goes on as the config's user, with that user's groups and no capabilities, as
//! nginx's workers do. What it does afterwards needs none: its BPF maps and programs are used
//! through the file descriptors it already holds (map updates, the sweep's test runs), next
//! hops are read over rtnetlink, and XDP is detached by closing its link.

use std::{ffi::CString, path::Path};

use anyhow::{bail, Context as _};
use nix::unistd::{getuid, initgroups, setgid, setuid, User};

/// What `/proc/self/status` says of the process's credentials after the drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// Becomes `user`: its supplementary groups, its group, then its user id (in that order: once
/// the user id is not root, nothing else may change). Every thread follows (glibc applies
/// `setuid` to the whole process). A root process that becomes another user loses every
/// capability; `no_new_privs` keeps anything it might execute from regaining one.
pub fn drop_to(user: &str) -> anyhow::Result<Dropped> {
    let account = User::from_name(user)
        .with_context(|| format!("looking up User = {user:?}"))?
        .with_context(|| format!("User = {user:?}: no such user on this node"))?;
    if !getuid().is_root() {
        if getuid() == account.uid {
            return Ok(dropped(user, &account));
        }
        bail!("User = {user:?}: only root can become another user, and this process is not root");
    }
    let name = CString::new(user).context("User contains a NUL byte")?;
    initgroups(&name, account.gid).with_context(|| format!("initgroups({user:?})"))?;
    setgid(account.gid).with_context(|| format!("setgid({})", account.gid))?;
    setuid(account.uid).with_context(|| format!("setuid({})", account.uid))?;
    nix::sys::prctl::set_no_new_privs().context("prctl(PR_SET_NO_NEW_PRIVS)")?;
    if getuid() != account.uid {
        bail!("setuid({}) left the process as {}", account.uid, getuid());
    }
    Ok(dropped(user, &account))
}

/// Makes `user` the owner of `paths`: what the process must still change once it runs as
/// that user (at a stop: its pins and its owner file, see [`crate::handover`]).
pub fn give_to(user: &str, paths: &[&Path]) -> anyhow::Result<()> {
    let account = User::from_name(user)
        .with_context(|| format!("looking up User = {user:?}"))?
        .with_context(|| format!("User = {user:?}: no such user on this node"))?;
    for path in paths {
        std::os::unix::fs::chown(path, Some(account.uid.as_raw()), Some(account.gid.as_raw()))
            .with_context(|| format!("giving {} to {user}", path.display()))?;
    }
    Ok(())
}

fn dropped(user: &str, account: &User) -> Dropped {
    Dropped {
        user: user.to_owned(),
        uid: account.uid.as_raw(),
        gid: account.gid.as_raw(),
    }
}
