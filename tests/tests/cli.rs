//! `xlb routes` and `xlb status` against a running xlb: the seed scenario's, asked over its
//! admin endpoint from the client namespace (`--admin`) and from lb-00 itself (the config's
//! `ListenAddr`, `:8080`, on loopback).

use std::{path::PathBuf, process::Output};

use serde_json::Value;
use xlb_testbed::{
    seed::{xlb_binary, SeedScenario, ADMIN_PORT, HOST, SERVICE},
    Netns,
};

fn seed_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/config.toml")
}

/// `xlb ARGS` run to completion inside `netns`, whatever its exit status.
fn xlb_in(netns: &Netns, args: &[&str]) -> Output {
    netns
        .command(xlb_binary())
        .args(args)
        .output()
        .expect("start xlb")
}

/// `xlb ARGS`'s standard output; panics, with its standard error, if it fails.
fn xlb_ok(scenario: &SeedScenario, netns: &Netns, args: &[&str]) -> String {
    let output = xlb_in(netns, args);
    assert!(
        output.status.success(),
        "xlb {args:?} exited with {}: {}\nxlb's log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        scenario.xlb_log()
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// The packets of a counter row of `xlb status` (`NAME  PACKETS  BYTES`).
fn counter_packets(status: &str, name: &str) -> u64 {
    let row = status
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} row in:\n{status}"));
    row.split_whitespace()
        .nth(1)
        .and_then(|packets| packets.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {row:?}"))
}

#[test]
fn routes_and_status_report_a_running_xlb() {
    let scenario = SeedScenario::start(&xlb_binary(), &seed_config()).expect("seed scenario up");
    let client = &scenario.topology.client;
    let admin = format!("http://{}:{ADMIN_PORT}", scenario.lb_addr());
    // Traffic through the proxy, so that the counters have something to count.
    let response = scenario.get(HOST, "/ping").unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    let endpoints: Vec<String> = scenario
        .routed_endpoints()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(!endpoints.is_empty());

    // The table: demo.local's route on `/` to the demo service's task.
    let routes = xlb_ok(&scenario, client, &["routes", "--admin", &admin]);
    assert!(routes.starts_with("snapshot: version "), "{routes}");
    assert!(routes.contains("\nL7 routes:\nHOST "), "{routes}");
    let row: Vec<&str> = routes
        .lines()
        .find(|line| line.starts_with(HOST))
        .unwrap_or_else(|| panic!("no {HOST} row in:\n{routes}"))
        .split_whitespace()
        .collect();
    let expected_endpoints = endpoints.join(",");
    assert_eq!(
        row,
        [
            HOST,
            "/",
            SERVICE,
            "round_robin",
            expected_endpoints.as_str()
        ],
        "{routes}"
    );

    // The same from lb-00, the endpoint found through the config's `ListenAddr = ":8080"`.
    let config = seed_config();
    let local = xlb_ok(
        &scenario,
        &scenario.topology.lb,
        &["routes", "--config", config.to_str().unwrap()],
    );
    assert!(
        local.lines().any(|line| line.starts_with(HOST)
            && line.contains(SERVICE)
            && line.ends_with(&expected_endpoints)),
        "{local}"
    );

    let json: Value = serde_json::from_str(&xlb_ok(
        &scenario,
        client,
        &["routes", "--admin", &admin, "--json"],
    ))
    .expect("--json prints JSON");
    assert_eq!(json["routes"][HOST][0]["service"], SERVICE, "{json}");
    assert_eq!(
        json["routes"][HOST][0]["endpoints"][0], endpoints[0],
        "{json}"
    );

    // Status: XDP attached and counting the client's traffic; the proxy accepted it.
    let status = xlb_ok(&scenario, client, &["status", "--admin", &admin]);
    assert!(status.starts_with("snapshot: version "), "{status}");
    assert!(status.contains("\nXDP: attached\n"), "{status}");
    assert!(counter_packets(&status, "received") > 0, "{status}");
    assert!(counter_packets(&status, "verdict_pass") > 0, "{status}");
    assert!(status.contains("\nproxy: 1 worker(s), "), "{status}");
    assert!(status.contains("\nL4 connection table: "), "{status}");
    assert!(status.contains("\nSNAT tuples in use: "), "{status}");

    let stats: Value = serde_json::from_str(&xlb_ok(
        &scenario,
        client,
        &["status", "--admin", &admin, "--json"],
    ))
    .expect("--json prints JSON");
    assert!(
        stats["xdp"]["received"]["packets"]
            .as_u64()
            .is_some_and(|packets| packets > 0),
        "{stats}"
    );

    // Nothing listens there: a failure naming the URL.
    let unreachable = "http://127.0.0.1:1";
    let output = xlb_in(client, &["routes", "--admin", unreachable]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot reach the admin endpoint at {unreachable}")),
        "{stderr}"
    );
}
