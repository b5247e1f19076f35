//! The Vagrantfile, which no machine here can boot (see README, *The seed's cluster*): Vagrant
//! itself checks it, and every provisioning script it runs exists and parses. The scripts that
//! build the Swarm also run in the namespaces' cluster (`xlb_testbed::cluster`), for real.

use std::{path::Path, process::Command};

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
