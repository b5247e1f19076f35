//! Re-creating the host's cgroup mounts for a process started with
//! `ip netns exec`. That command gives the process a private mount namespace
//! and mounts a fresh sysfs on /sys (so /sys/class/net shows the namespace's
//! interfaces), which hides /sys/fs/cgroup; dockerd then refuses to start
//! ("Devices cgroup isn't mounted"). Mounting the same hierarchies again inside
//! that private namespace restores the host's view without touching the host.

use anyhow::{Context, Result};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One mount from /proc/self/mountinfo, as needed to repeat it.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    mount_point: String,
    fs_type: String,
    source: String,
    super_options: String,
}

/// Shell commands that repeat this process's cgroup mounts, parents first.
/// Run them after `ip netns exec` has set up its mount namespace.
pub fn restore_cgroup_mounts_commands() -> Result<Vec<String>> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    Ok(commands_for(&cgroup_mounts(&mountinfo)))
}

/// Mounts at or below /sys/fs/cgroup, in mountinfo order (parents first).
fn cgroup_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .filter(|mount| {
            mount.mount_point == CGROUP_ROOT
                || mount.mount_point.starts_with(&format!("{CGROUP_ROOT}/"))
        })
        .collect()
}

/// `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let mount_point = before.split_whitespace().nth(4)?;
    let mut after = after.split_whitespace();
    Some(Mount {
        mount_point: mount_point.to_string(),
        fs_type: after.next()?.to_string(),
        source: after.next()?.to_string(),
        super_options: after.next()?.to_string(),
    })
}

fn commands_for(mounts: &[Mount]) -> Vec<String> {
    mounts
        .iter()
        .map(|mount| {
            format!(
                "mkdir -p {point} && mount -t {fs_type} -o {options} {source} {point}",
                point = shell_quote(&mount.mount_point),
                fs_type = shell_quote(&mount.fs_type),
                options = shell_quote(&mount.super_options),
                source = shell_quote(&mount.source),
            )
        })
        .collect()
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_HOST: &str = "\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 1 0:40 / /sys/fs/cgroupfoo rw - tmpfs tmpfs rw
";

    #[test]
    fn only_cgroup_mounts_are_kept_in_order() {
        let mounts = cgroup_mounts(HYBRID_HOST);
        let points: Vec<&str> = mounts.iter().map(|m| m.mount_point.as_str()).collect();
        assert_eq!(
            points,
            [
                "/sys/fs/cgroup",
                "/sys/fs/cgroup/devices",
                "/sys/fs/cgroup/unified"
            ]
        );
        assert_eq!(mounts[1].fs_type, "cgroup");
        assert_eq!(mounts[1].super_options, "rw,devices");
    }

    #[test]
    fn optional_fields_do_not_shift_the_parse() {
        let line =
            "30 23 0:26 / /sys/fs/cgroup rw shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate";
        let mount = parse_mountinfo_line(line).unwrap();
        assert_eq!(mount.fs_type, "cgroup2");
        assert_eq!(mount.super_options, "rw,nsdelegate");
    }

    #[test]
    fn commands_mount_each_hierarchy() {
        let commands = commands_for(&cgroup_mounts(HYBRID_HOST));
        assert_eq!(commands.len(), 3);
        assert_eq!(
            commands[0],
            "mkdir -p '/sys/fs/cgroup' && mount -t 'tmpfs' -o 'rw,mode=755' 'tmpfs' '/sys/fs/cgroup'"
        );
        assert!(commands[1]
            .ends_with("mount -t 'cgroup' -o 'rw,devices' 'cgroup' '/sys/fs/cgroup/devices'"));
    }

    #[test]
    fn quotes_survive_the_shell() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
