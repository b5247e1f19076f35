//! The testbed's topology: client, lb-00 and node namespaces wired in a line, checksum offload
//! off, and nothing left behind. (The Swarm part is exercised by `seed_scenario`.)

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use xlb_testbed::{
    build_docker_demo_binary, list_netns, require_root, wait_until, Netns, Process, Topology,
};

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
