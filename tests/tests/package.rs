//! The .deb that `cargo xtask package` builds (`cargo xtask test` builds it before the tests
//! run): `dpkg -i` installs the binary, the units, the example config, the man page and the
//! completions where Debian keeps them; the installed xlb runs and reads the installed config;
//! the installed units verify; `dpkg -r` keeps the config files and `dpkg --purge` leaves
//! nothing behind.
//!
//! It installs on this machine: it refuses to run where a package named xlb is installed
//! already, and purges its own install however it ends.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use xlb_testbed::require_root;

const INSTALLED: [&str; 9] = [
    "/usr/bin/xlb",
    "/usr/lib/systemd/system/xlb.service",
    "/usr/lib/systemd/system/xlb-proxy.service",
    "/usr/lib/systemd/system/xlb-controller.service",
    "/usr/share/man/man1/xlb.1.gz",
    "/usr/share/bash-completion/completions/xlb",
    "/etc/xlb/config.toml",
    "/etc/xlb/proxy.env",
    "/etc/default/xlb",
];
const CONFIG_FILES: [&str; 3] = [
    "/etc/xlb/config.toml",
    "/etc/xlb/proxy.env",
    "/etc/default/xlb",
];

fn package() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let mut debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| {
            panic!(
                "{}: {error}: run `cargo xtask package` first",
                dir.display()
            )
        })
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .collect();
    debs.sort_by_key(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok());
    debs.pop()
        .unwrap_or_else(|| panic!("no .deb in {}: run `cargo xtask package`", dir.display()))
}

/// `program args`' output; panics with what it printed if it fails.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{program} {args:?}: {text}");
    text
}

fn is_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "xlb"])
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("installed"))
}

/// Purges the package when the test ends, passed or not.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "xlb"]).status();
    }
}

#[test]
fn the_package_installs_runs_and_is_removed_and_purged_cleanly() {
    require_root().unwrap();
    let deb = package();
    assert!(
        !is_installed(),
        "a package named xlb is installed on this machine: not touching it"
    );
    let _purge = Purge;

    run("dpkg", &["-i", deb.to_str().unwrap()]);
    for path in INSTALLED {
        assert!(Path::new(path).is_file(), "{path} not installed");
    }
    let version = run("/usr/bin/xlb", &["--version"]);
    assert!(version.starts_with("xlb "), "{version}");
    let checked = run("/usr/bin/xlb", &["check-config", "/etc/xlb/config.toml"]);
    assert!(checked.contains("/etc/xlb/config.toml: ok"), "{checked}");
    let page = run("sh", &["-c", "zcat /usr/share/man/man1/xlb.1.gz"]);
    assert!(page.contains(".TH xlb 1"), "{page}");
    // Installed units whose commands, environment files and man page all exist now.
    let units = [
        "/usr/lib/systemd/system/xlb.service",
        "/usr/lib/systemd/system/xlb-proxy.service",
        "/usr/lib/systemd/system/xlb-controller.service",
    ];
    let verified = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verified.stderr);
    assert!(
        verified.status.success() && report.trim().is_empty(),
        "{report}"
    );

    run("dpkg", &["-r", "xlb"]);
    for path in INSTALLED {
        let kept = CONFIG_FILES.contains(&path);
        assert_eq!(
            Path::new(path).exists(),
            kept,
            "{path} after dpkg -r (config files stay)"
        );
    }
    run("dpkg", &["--purge", "xlb"]);
    for path in INSTALLED.iter().chain(&["/etc/xlb"]) {
        assert!(!Path::new(path).exists(), "{path} left after dpkg --purge");
    }
    assert!(!is_installed());
}
