//! `cargo xtask demo`: the scenario of Interlock's host-mode documentation, on this machine.
//!
//! Builds xlb (XDP object embedded) and the demo backend, then brings up the seed scenario of
//! `xlb-testbed`: a private dockerd + Swarm in a `node` namespace running the documentation's
//! `demo` service, and `xlb run --config examples/config.toml` in `lb-00` with XDP attached.
//! It runs the documentation's curl from a `client` namespace and prints what it shows.

use std::{path::Path, process::Command};

use anyhow::Context as _;
use xlb_testbed::seed::{SeedScenario, SERVICE_CREATE_ARGS};

use crate::{
    build_ebpf,
    exec::{exec, workspace_root},
    toolchain,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Leave everything running and print how to stop it.
    #[arg(long)]
    pub keep: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    toolchain::require_root("`cargo xtask demo`")?;
    toolchain::ensure_packages(toolchain::RUNTIME_PACKAGES)?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    let root = workspace_root();
    exec(
        Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["build", "--release", "-p", "xlb"]),
    )?;
    let xlb = root.join("target/release/xlb");
    let config = root.join("examples/config.toml");

    step("Creating namespaces client, lb-00 and node; a private dockerd and `docker swarm init` in node;");
    println!("the demo image built FROM scratch; then, as in Interlock's documentation:\n");
    println!(
        "  docker service create --detach=false {}\n",
        SERVICE_CREATE_ARGS.join(" ")
    );
    println!("and in lb-00:\n");
    println!(
        "  xlb run --config {} --interface to-client --docker-url <the private engine>\n",
        config.display()
    );
    let scenario = SeedScenario::start(&xlb, &config).context("bringing up the seed scenario")?;
    let lb = scenario.lb_addr();

    step(&format!(
        "curl -vs -H \"Host: demo.local\" http://{lb}/ping   (from the client namespace)"
    ));
    let curl = scenario.seed_curl()?;
    print!("{}", String::from_utf8_lossy(&curl.stderr));
    println!("{}", String::from_utf8_lossy(&curl.stdout));

    step(&format!(
        "GET http://{lb}:8080/routes   (xlb's admin endpoint, Interlock's ListenAddr)"
    ));
    println!("{:#}", scenario.admin("/routes")?);
    step(&format!(
        "GET http://{lb}:8080/stats   (XDP counters, summed over CPUs)"
    ));
    println!("{:#}", scenario.admin("/stats")?);
    step("xlb's log");
    print!("{}", scenario.xlb_log());

    if options.keep {
        print_how_to_stop(&scenario, &xlb);
        std::mem::forget(scenario);
    } else {
        step("Cleaning up: stopping xlb, the service, the engine; removing the namespaces");
        drop(scenario);
    }
    Ok(())
}

fn step(title: &str) {
    println!("\n==> {title}\n");
}

fn print_how_to_stop(scenario: &SeedScenario, xlb: &Path) {
    let [client, lb, node] = scenario.topology.netns_names();
    let dockerd = scenario.swarm.dockerd();
    step("Left running (--keep)");
    println!(
        "  ip netns exec {client} curl -H 'Host: demo.local' http://{}/ping",
        scenario.lb_addr()
    );
    println!("  docker -H {} service ls", dockerd.host_url());
    println!(
        "  xlb ({}) log: {}",
        xlb.display(),
        scenario.xlb_log_path().display()
    );
    println!("\nTo stop it:\n");
    println!(
        "  kill {}                      # xlb: drains, detaches XDP",
        scenario.xlb_pid()
    );
    println!("  docker -H {} service rm demo", dockerd.host_url());
    println!("  docker -H {} swarm leave --force", dockerd.host_url());
    println!(
        "  kill {}                      # the private dockerd",
        dockerd.pid()
    );
    println!("  ip netns del {client}; ip netns del {lb}; ip netns del {node}");
}
