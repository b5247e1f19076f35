//! The Vagrantfile, which no machine here can boot (see README, *The seed's cluster*): Vagrant
//! itself checks it, and every provisioning script it runs exists and parses. The scripts that
//! build the Swarm also run in the namespaces' cluster (`xlb_testbed::cluster`), for real.
//! The systemd units they install pass `systemd-analyze verify`.

use std::{path::Path, process::Command};

use xlb_testbed::{seed::xlb_binary, ScratchDir};

fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn vagrant_validates_the_vagrantfile() {
    let output = Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(repository())
        .output()
        .expect("vagrant (Debian's package; `cargo xtask test` installs it)");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    assert!(report.contains("validated successfully"), "{report}");
}

#[test]
fn every_provisioning_script_the_vagrantfile_names_exists_and_parses() {
    let vagrantfile = std::fs::read_to_string(repository().join("Vagrantfile")).unwrap();
    let scripts: Vec<&str> = vagrantfile
        .split(|c: char| c == '"' || c == '/' || c.is_whitespace())
        .filter(|word| word.ends_with(".sh"))
        .collect();
    for expected in [
        "install-docker.sh",
        "swarm-init.sh",
        "swarm-join.sh",
        "install-xlb.sh",
        "fetch-join-tokens.sh",
        "label-load-balancers.sh",
        "demo-service.sh",
    ] {
        assert!(scripts.contains(&expected), "{expected} in {scripts:?}");
    }
    for script in scripts {
        let path = repository().join("deploy/provision").join(script);
        let status = Command::new("sh").arg("-n").arg(&path).status().unwrap();
        assert!(status.success(), "sh -n {}", path.display());
    }
}

#[test]
fn the_systemd_units_verify() {
    let scratch = ScratchDir::create("units").unwrap();
    let units = repository().join("deploy/systemd");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        // The installed binary's path, pointed at the one built here: verify checks that
        // every command exists.
        let unit = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/bin/xlb", &xlb_binary().display().to_string());
        let copy = scratch.path().join(path.file_name().unwrap());
        std::fs::write(&copy, unit).unwrap();
        checked.push(copy);
    }
    assert!(
        checked.len() >= 2,
        "units in {}: {checked:?}",
        units.display()
    );
    let output = Command::new("systemd-analyze")
        .arg("verify")
        // `Documentation=man:xlb(1)`: the page comes with the package (see tests/package.rs).
        .arg("--man=no")
        .args(&checked)
        .output()
        .expect("systemd-analyze (Debian's systemd)");
    // verify reports what it ignores on stderr and still exits 0.
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && report.trim().is_empty(),
        "{report}"
    );
}
