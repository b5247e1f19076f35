//! The L4 fast path through a real Swarm service: `docker service create --label
//! xlb.l4.ports=9000:8080 --publish mode=host,target=8080` on a private dockerd, and the real
//! `xlb run` daemon on a load balancer on the same segment, its XDP program attached to the
//! LB's interface. The LB kernel cannot forward, and nothing listens on port 9000 there, so the
//! client's HTTP request reaches the task only through XDP, both ways.

use std::{fs::File, process::Stdio, time::Duration};

use serde_json::Value;
use xlb_testbed::{require_root, seed::xlb_binary, wait_until, Process, ScratchDir, Segment};

mod l4_support;

use l4_support::swarm_lb::SwarmLb;

const SERVICE: &str = "l4demo";
const IMAGE: &str = "xlb-l4-demo:test";
const LISTEN_PORT: u16 = 9000;
const TARGET_PORT: u16 = 8080;
const ADMIN_PORT: u16 = 8081;
const CONVERGE: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
ListenAddr = ":8081"
PollInterval = "1s"

[Extensions.default]
PublishMode = "host"
PublishedPort = 80

[L4]
TCPIdleTimeout = "5m"
"#;

#[test]
fn a_swarm_service_labelled_xlb_l4_ports_is_reached_through_xdp() {
    require_root().unwrap();
    let xlb = xlb_binary();
    assert!(
        xlb.is_file(),
        "no xlb binary at {}: build it first",
        xlb.display()
    );
    let bed = SwarmLb::start(IMAGE);
    let SwarmLb {
        swarm, client, lb, ..
    } = &bed;
    let label = format!("xlb.l4.ports={LISTEN_PORT}:{TARGET_PORT}");
    let publish = format!("mode=host,target={TARGET_PORT}");
    swarm
        .service_create(&[
            "--name",
            SERVICE,
            "--label",
            &label,
            "--publish",
            &publish,
            "--env",
            "METADATA=l4",
            IMAGE,
        ])
        .unwrap();
    let endpoints = swarm
        .wait_for_task_endpoints(SERVICE, TARGET_PORT, 1, CONVERGE)
        .unwrap();

    let scratch = ScratchDir::create("l4-swarm").unwrap();
    let config = scratch.path().join("config.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let log_path = scratch.path().join("xlb.log");
    let log = File::create(&log_path).unwrap();
    let mut command = lb.netns.command(&xlb);
    command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--interface", Segment::HOST_INTERFACE])
        .args(["--docker-url", &swarm.dockerd().host_url()])
        .env("XLB_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _xlb = Process::spawn(command).unwrap();
    let xlb_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let admin = |path: &str| -> Option<Value> {
        let url = format!("http://{}:{ADMIN_PORT}{path}", lb.addr);
        let body = client
            .netns
            .run("curl", &["-sf", "--max-time", "5", &url])
            .ok()?;
        serde_json::from_str(&body).ok()
    };
    let routes = wait_until("xlb to steer the L4 listener", CONVERGE, || {
        Ok(admin("/routes").filter(|routes| {
            routes["l4"]["listeners"][0]["endpoints"]
                .as_array()
                .is_some_and(|e| !e.is_empty())
        }))
    })
    .unwrap_or_else(|error| panic!("{error:#}\nxlb's log:\n{}", xlb_log()));
    let listener = &routes["l4"]["listeners"][0];
    assert_eq!(listener["service"], SERVICE);
    assert_eq!(listener["listener"]["port"], LISTEN_PORT);
    assert_eq!(listener["endpoints"][0], endpoints[0].to_string());

    let url = format!("http://{}:{LISTEN_PORT}/ping", lb.addr);
    let body = wait_until("GET /ping through the L4 path", CONVERGE, || {
        Ok(client
            .netns
            .run("curl", &["-sf", "--max-time", "3", &url])
            .ok())
    })
    .unwrap_or_else(|error| panic!("{error:#}\nxlb's log:\n{}", xlb_log()));
    let ping: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ping["metadata"], "l4", "{body}");

    let stats = admin("/stats").unwrap();
    let service = &stats["l4"]["services"][format!("{LISTEN_PORT}/tcp")];
    assert!(service["new_flows"].as_u64().unwrap() >= 1, "{stats:#}");
    assert!(
        service["forward_packets"].as_u64().unwrap() >= 3,
        "{stats:#}"
    );
    assert!(service["reply_packets"].as_u64().unwrap() >= 3, "{stats:#}");
    let backend = &stats["l4"]["backends"][endpoints[0].to_string()];
    assert_eq!(backend["new_flows"], service["new_flows"], "{stats:#}");
    assert!(
        stats["xdp"]["l4_replied"]["packets"].as_u64().unwrap() >= 3,
        "{stats:#}"
    );
}
