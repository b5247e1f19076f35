//! `cargo xtask cluster up|down|status`: the seed's 8-node cluster on this machine, left
//! running (see `xlb_testbed::cluster`): 3 managers in one Raft and 5 workers, each its own
//! engine in its own namespace; `xlb controller` on every manager, `xlb proxy` with XDP on
//! lb-00 and lb-01; the seed's `demo` service. `up` prints the seed's curl through both load
//! balancers and writes what it started to a state file, which `status` and `down` read.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};
use xlb_testbed::{
    cluster::{ClusterState, SeedCluster, ADMIN_PORT, CONFIG, LOAD_BALANCERS, MANAGERS},
    seed::HOST,
    Process,
};

use crate::{
    build_ebpf,
    exec::{exec, workspace_root},
    toolchain,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Build xlb, start the cluster, show the seed's curl through lb-00 and lb-01, leave it
    /// running.
    Up,
    /// Show the cluster's nodes, xlb processes and routes.
    Status,
    /// Stop everything `up` started and remove its namespaces.
    Down,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    toolchain::require_root("`cargo xtask cluster`")?;
    match options.action {
        Action::Up => up(),
        Action::Status => status(),
        Action::Down => down(),
    }
}

/// Where `up` leaves its [`ClusterState`].
fn state_path() -> PathBuf {
    workspace_root().join("target/cluster/state.json")
}

fn read_state() -> anyhow::Result<Option<ClusterState>> {
    let path = state_path();
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a cluster state", path.display()))?;
    Ok(Some(ClusterState(value)))
}

fn up() -> anyhow::Result<()> {
    if let Some(state) = read_state()? {
        if state.processes().iter().any(|(_, _, alive)| *alive) {
            bail!(
                "a cluster is already up ({}): `cargo xtask cluster down` first",
                state_path().display()
            );
        }
        state
            .tear_down()
            .context("removing what is left of the last cluster")?;
    }
    toolchain::ensure_packages(toolchain::RUNTIME_PACKAGES)?;
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    exec(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["build", "--release", "-p", "xlb"]),
    )?;
    step(
        "Starting 8 engines (manager-0..2, lb-00, lb-01, worker-0..2), each in its own namespace;",
    );
    println!("docker swarm init on manager-0, join-token manager/worker for the others, then as the seed:\n");
    println!("  docker node update --label-add nodetype=loadbalancer lb-00");
    println!("  docker node update --label-add nodetype=loadbalancer lb-01");
    println!("  docker service create --name demo --label com.docker.lb.hosts=demo.local ...");
    // The controllers and proxies run this build of xlb (`seed::xlb_binary` reads XLB_BIN).
    std::env::set_var("XLB_BIN", workspace_root().join("target/release/xlb"));
    let token = format!("{:032x}", rand_token());
    let cluster = SeedCluster::start(CONFIG, &token).context("starting the cluster")?;
    let controllers: Vec<Process> = (0..MANAGERS.len())
        .map(|index| cluster.controller(index))
        .collect::<anyhow::Result<_>>()?;
    let proxies: Vec<Process> = (0..LOAD_BALANCERS.len())
        .map(|lb| cluster.proxy(lb, true))
        .collect::<anyhow::Result<_>>()?;
    let named: Vec<(&str, &Process)> = MANAGERS
        .iter()
        .copied()
        .zip(&controllers)
        .chain(LOAD_BALANCERS.iter().copied().zip(&proxies))
        .collect();
    let state = cluster.state(&named);
    let path = state_path();
    std::fs::create_dir_all(path.parent().expect("a file in target/cluster"))?;
    std::fs::write(&path, serde_json::to_string_pretty(&state.0)?)?;
    cluster
        .wait_for_both(1, std::time::Duration::from_secs(60))
        .with_context(|| cluster.logs(&[MANAGERS[0], LOAD_BALANCERS[0], LOAD_BALANCERS[1]]))?;

    step("docker node ls   (on manager-0)");
    print!("{}", cluster.swarm.docker(&["node", "ls"])?);
    for (lb, name) in LOAD_BALANCERS.iter().enumerate() {
        let addr = cluster.lbs[lb].addr;
        step(&format!(
            "curl -si -H \"Host: {HOST}\" http://{addr}/ping   (through {name}, from the client namespace)"
        ));
        let response = cluster.get(lb)?;
        println!("HTTP {}", response.status);
        for (name, value) in &response.headers {
            println!("{name}: {value}");
        }
        println!("\n{}", response.body.trim_end());
    }
    println!("\nLeft running; its state is in {}.", path.display());
    print_usage(&state);
    // Everything stays up: `down` stops it from the state file.
    std::mem::forget(proxies);
    std::mem::forget(controllers);
    std::mem::forget(cluster);
    Ok(())
}

fn status() -> anyhow::Result<()> {
    let Some(state) = read_state()? else {
        println!("No cluster is up (no {}).", state_path().display());
        return Ok(());
    };
    step("xlb processes");
    for (name, pid, alive) in state.processes() {
        let role = if name.starts_with("manager") {
            "controller"
        } else {
            "proxy"
        };
        println!(
            "  {name:<10} xlb {role:<10} pid {pid:<8} {}",
            if alive { "running" } else { "gone" }
        );
    }
    if let Some(url) = state.manager_url() {
        step("docker node ls   (on manager-0)");
        let output = Command::new("/usr/bin/docker")
            .args(["-H", url, "node", "ls"])
            .output()?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
    }
    for (name, addr) in LOAD_BALANCERS.iter().zip(state.load_balancers()) {
        step(&format!(
            "{name}: GET http://{addr}:{ADMIN_PORT}/routes (its snapshot, and {HOST})"
        ));
        let output = Command::new("ip")
            .args([
                "netns",
                "exec",
                state.client_namespace(),
                "curl",
                "-s",
                "--max-time",
                "5",
            ])
            .arg(format!("http://{addr}:{ADMIN_PORT}/routes"))
            .output()?;
        match serde_json::from_slice::<serde_json::Value>(&output.stdout) {
            Ok(routes) => {
                println!("{:#}", routes["snapshot"]);
                println!("{:#}", routes["routes"][HOST][0]["endpoints"]);
            }
            Err(_) => println!("no answer: {}", String::from_utf8_lossy(&output.stderr)),
        }
    }
    Ok(())
}

fn down() -> anyhow::Result<()> {
    let Some(state) = read_state()? else {
        println!("No cluster is up (no {}).", state_path().display());
        return Ok(());
    };
    state.tear_down()?;
    std::fs::remove_file(state_path())?;
    println!("The cluster is down.");
    Ok(())
}

fn print_usage(state: &ClusterState) {
    let client = state.client_namespace();
    step("Try");
    for addr in state.load_balancers() {
        println!("  ip netns exec {client} curl -H 'Host: {HOST}' http://{addr}/ping");
    }
    if let Some(url) = state.manager_url() {
        println!("  docker -H {url} service scale demo=3");
    }
    println!("  cargo xtask cluster status");
    println!("  cargo xtask cluster down");
}

/// A bearer token for the controllers, from the kernel's random source.
fn rand_token() -> u128 {
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let hex: String = String::from_utf8_lossy(&bytes)
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect();
    u128::from_str_radix(&hex, 16).unwrap_or(0)
}

fn step(title: &str) {
    println!("\n==> {title}\n");
}
