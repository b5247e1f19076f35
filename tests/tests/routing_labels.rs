//! Interlock's routing labels end to end, through a real Swarm: a second service on the seed's
//! host under a context root (rewritten), a default backend for unknown hosts, and a service
//! with a label host mode cannot honour, disabled alone with its reason in `GET /routes` while
//! every other service keeps routing. The config sets `IPHash`, which `/routes` reflects.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;
use xlb_testbed::{
    seed::{xlb_binary, HttpResponse, SeedScenario, HOST, IMAGE, TARGET_PORT},
    wait_until, ScratchDir,
};

const TASK_START: Duration = Duration::from_secs(60);
const ROUTE_CONVERGENCE: Duration = Duration::from_secs(30);

/// The seed's config with `IPHash = true` added to its proxy settings.
fn config_with_ip_hash(scratch: &ScratchDir) -> PathBuf {
    let seed = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/config.toml"),
    )
    .unwrap();
    let section = "[Extensions.default.Config]\n";
    assert!(seed.contains(section), "the seed config has {section}");
    let config = seed.replace(section, &format!("{section}      IPHash = true\n"));
    let path = scratch.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn metadata(response: &HttpResponse) -> String {
    assert_eq!(response.status, 200, "{response:?}");
    let body: Value = serde_json::from_str(&response.body).expect("JSON body");
    body["metadata"].as_str().unwrap_or_default().to_owned()
}

/// Whether `/routes` shows the api route on the seed's host, the default backend, and the
/// broken service among the rejected.
fn converged(routes: &Value) -> bool {
    let on_host = routes["routes"][HOST].as_array().map_or(0, Vec::len);
    let has_default = routes["default_backend"]["endpoints"]
        .as_array()
        .is_some_and(|endpoints| !endpoints.is_empty());
    let broken_rejected = routes["rejected"]
        .as_array()
        .is_some_and(|rejected| rejected.iter().any(|r| r["service"] == "broken"));
    on_host == 2 && has_default && broken_rejected
}

#[test]
fn context_root_default_backend_and_a_rejected_label_through_swarm() {
    let scratch = ScratchDir::create("routing-labels").unwrap();
    let scenario =
        SeedScenario::start(&xlb_binary(), &config_with_ip_hash(&scratch)).expect("seed up");
    let swarm = &scenario.swarm;
    let publish = format!("mode=host,target={TARGET_PORT}");
    let port_label = format!("com.docker.lb.port={TARGET_PORT}");
    swarm
        .service_create(&[
            "--name",
            "api",
            "--label",
            &format!("com.docker.lb.hosts={HOST}"),
            "--label",
            &port_label,
            "--label",
            "com.docker.lb.context_root=/api",
            "--label",
            "com.docker.lb.context_root_rewrite=true",
            "--publish",
            &publish,
            "--env",
            "METADATA=api",
            IMAGE,
        ])
        .unwrap();
    swarm
        .service_create(&[
            "--name",
            "fallback",
            "--label",
            "com.docker.lb.default_backend=true",
            "--label",
            &port_label,
            "--publish",
            &publish,
            "--env",
            "METADATA=fallback",
            IMAGE,
        ])
        .unwrap();
    swarm
        .service_create(&[
            "--name",
            "broken",
            "--replicas",
            "0",
            "--label",
            "com.docker.lb.hosts=broken.local",
            "--label",
            &port_label,
            "--label",
            "com.docker.lb.backend_mode=vip",
            IMAGE,
        ])
        .unwrap();
    for service in ["api", "fallback"] {
        swarm
            .wait_for_task_endpoints(service, TARGET_PORT, 1, TASK_START)
            .unwrap();
    }
    let routes = wait_until("xlb to pick up the new services", ROUTE_CONVERGENCE, || {
        let routes = scenario.admin("/routes")?;
        Ok(converged(&routes).then_some(routes))
    })
    .unwrap_or_else(|error| panic!("{error:#}\n{}", scenario.xlb_log()));

    // The context root routes to the api service, its prefix stripped: the demo backend only
    // serves /ping.
    let api = scenario.get(HOST, "/api/ping").unwrap();
    assert_eq!(metadata(&api), "api");
    assert_eq!(metadata(&scenario.get(HOST, "/ping").unwrap()), "demo");
    let beside = scenario.get(HOST, "/apiping").unwrap();
    assert_eq!(beside.status, 404, "{beside:?}");
    assert!(
        beside.header("x-upstream-addr").is_some(),
        "/apiping is not under /api: the seed's service answers it"
    );

    // Unknown hosts, and the host of the disabled service, reach the default backend.
    assert_eq!(
        metadata(&scenario.get("nobody.local", "/ping").unwrap()),
        "fallback"
    );
    assert_eq!(
        metadata(&scenario.get("broken.local", "/ping").unwrap()),
        "fallback"
    );

    let broken = routes["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|rejected| rejected["service"] == "broken")
        .unwrap();
    let reason = broken["reason"].as_str().unwrap();
    assert!(
        reason.contains("com.docker.lb.backend_mode=vip") && reason.contains("host mode"),
        "{reason}"
    );
    assert_eq!(routes["rejected"].as_array().unwrap().len(), 1, "{routes}");

    let on_host = routes["routes"][HOST].as_array().unwrap();
    let roots: Vec<&str> = on_host
        .iter()
        .map(|route| route["context_root"].as_str().unwrap())
        .collect();
    assert_eq!(roots, ["/api", "/"], "longest context root first");
    for route in on_host {
        assert_eq!(
            route["balance"]["method"], "ip_hash",
            "IPHash = true: {route}"
        );
    }
}
