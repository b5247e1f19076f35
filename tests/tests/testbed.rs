//! End-to-end checks of the testbed itself: the topology's wiring, and the
//! seed scenario (a docker-demo service in a private single-node Swarm,
//! reached from the load balancer's namespace through the ports its tasks
//! publish in host mode), with nothing (namespaces, dockerd) left behind.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use xlb_testbed::{
    build_docker_demo_binary, list_netns, require_root, wait_until, Dockerd, Netns, Process, Swarm,
    Topology,
};

const SERVICE: &str = "demo";
const IMAGE: &str = "xlb-testbed/docker-demo:latest";
const TARGET_PORT: u16 = 8080;
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The seed's service, as an operator would create it for Interlock/xlb.
fn seed_service_args() -> Vec<&'static str> {
    vec![
        "--name",
        SERVICE,
        "--label",
        "com.docker.lb.hosts=demo.local",
        "--label",
        "com.docker.lb.port=8080",
        "--publish",
        "mode=host,target=8080",
        "--env",
        "METADATA=demo",
        "--no-resolve-image",
        IMAGE,
    ]
}

/// `GET /ping` with curl from inside `netns`, parsed as JSON.
fn ping_from(netns: &Netns, backend: SocketAddr, request_id: &str) -> Result<Value> {
    let body = netns.run(
        "curl",
        &[
            "--silent",
            "--show-error",
            "--fail",
            "--max-time",
            "5",
            "--header",
            &format!("X-Request-Id: {request_id}"),
            &format!("http://{backend}/ping"),
        ],
    )?;
    serde_json::from_str(&body).with_context(|| format!("/ping answered non-JSON: {body:?}"))
}

fn assert_netns_gone(names: &[String]) -> Result<()> {
    let leftover: Vec<String> = list_netns()?
        .into_iter()
        .filter(|name| names.contains(name))
        .collect();
    assert!(leftover.is_empty(), "namespaces left behind: {leftover:?}");
    Ok(())
}

fn is_dockerd_running(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("dockerd"))
        .unwrap_or(false)
}

#[test]
fn seed_service_is_reachable_from_lb_namespace_and_cleaned_up() -> Result<()> {
    require_root()?;
    let started = Instant::now();
    let lap = |what: &str| eprintln!("{:>6.1}s {what}", started.elapsed().as_secs_f64());

    let docker_demo = build_docker_demo_binary()?;
    lap("docker-demo binary built");
    let topology = Topology::create()?;
    let netns_names = topology.netns_names();
    let swarm = Swarm::init(Dockerd::start(&topology.node)?, topology.node_addr())?;
    let dockerd_pid = swarm.dockerd().pid();
    lap("topology, dockerd and swarm up");
    swarm.build_image(IMAGE, &docker_demo)?;
    lap("image built");

    swarm.service_create(&seed_service_args())?;
    let endpoints = swarm.wait_for_task_endpoints(SERVICE, TARGET_PORT, 1, CONVERGE_TIMEOUT)?;
    lap("service running");
    assert_eq!(endpoints[0].ip(), IpAddr::V4(topology.node_addr()));
    let ping = ping_from(&topology.lb, endpoints[0], "abc")?;
    assert_eq!(ping["metadata"], "demo", "{ping}");
    assert_eq!(ping["request_id"], "abc", "{ping}");
    assert_eq!(ping["version"], "0.1", "{ping}");
    assert!(
        ping["instance"]
            .as_str()
            .is_some_and(|name| !name.is_empty()),
        "{ping}"
    );

    swarm.service_scale(SERVICE, 3)?;
    let endpoints = swarm.wait_for_task_endpoints(SERVICE, TARGET_PORT, 3, CONVERGE_TIMEOUT)?;
    lap("scaled to 3");
    let mut instances = BTreeSet::new();
    for endpoint in &endpoints {
        let ping = ping_from(&topology.lb, *endpoint, "scaled")?;
        instances.insert(ping["instance"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(
        instances.len(),
        3,
        "each endpoint is its own task: {instances:?}"
    );

    swarm.service_rm(SERVICE)?;
    swarm.wait_for_service_containers_gone(SERVICE, CONVERGE_TIMEOUT)?;
    lap("service removed");

    drop(swarm);
    drop(topology);
    lap("torn down");
    assert_netns_gone(&netns_names)?;
    assert!(
        !is_dockerd_running(dockerd_pid),
        "dockerd {dockerd_pid} still runs"
    );
    Ok(())
}

#[test]
fn topology_links_neighbours_only() -> Result<()> {
    require_root()?;
    let docker_demo = build_docker_demo_binary()?;
    let topology = Topology::create()?;
    let netns_names = topology.netns_names();

    // A backend inside lb-00, started the way an xlb instance would be.
    let mut command = topology.lb.command(&docker_demo);
    command.env("PORT", "8080");
    let backend = Process::spawn(command)?;
    let lb_backend = SocketAddr::new(IpAddr::V4(topology.lb_client_addr()), 8080);
    let ping = wait_until("docker-demo in lb-00", Duration::from_secs(10), || {
        Ok(ping_from(&topology.client, lb_backend, "wired").ok())
    })?;
    assert_eq!(ping["request_id"], "wired", "{ping}");

    // No route from the client to the node: only the load balancer joins them.
    let node_addr = topology.node_addr().to_string();
    let no_route = topology
        .client
        .ip(&["route", "get", &node_addr])
        .unwrap_err();
    assert!(
        format!("{no_route:#}").contains("unreachable"),
        "{no_route:#}"
    );

    for (netns, interface) in [
        (&topology.client, Topology::CLIENT_INTERFACE),
        (&topology.lb, Topology::LB_CLIENT_INTERFACE),
        (&topology.lb, Topology::LB_NODE_INTERFACE),
        (&topology.node, Topology::NODE_INTERFACE),
    ] {
        let features = netns.run("ethtool", &["--show-features", interface])?;
        assert!(
            features.contains("tx-checksumming: off"),
            "{} {interface}: {features}",
            netns.name()
        );
    }

    drop(backend);
    drop(topology);
    assert_netns_gone(&netns_names)
}
