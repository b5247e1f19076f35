//! A plain Docker host: an engine that is not in Swarm mode, a container started with `docker
//! run -p CONTAINER --label com.docker.lb.hosts=...`, and `xlb run` beside it on the same host
//! (the `node` namespace), as Interlock's single-host setups run. xlb finds by itself that the
//! engine is not a Swarm's and routes the container to its published port; when the container
//! is removed, its host answers 503.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use xlb_testbed::{
    build_docker_demo_binary, build_scratch_image, require_root, seed::xlb_binary, wait_until,
    Dockerd, Process, ScratchDir, Topology,
};

const IMAGE: &str = "xlb-plain-demo:test";
const HOST: &str = "plain.local";
const CONVERGE: Duration = Duration::from_secs(30);
const CONFIG: &str = r#"
ListenAddr = ":8081"
PollInterval = "2s"

[Extensions.default]
PublishMode = "host"
PublishedPort = 80
"#;

/// What `curl -si` printed for `GET /ping` with `Host: plain.local` on the node's port 80, from
/// lb-00 (the node's neighbour).
fn get(topology: &Topology) -> String {
    let url = format!(
        "http://{}/ping",
        SocketAddr::from((topology.node_addr(), 80))
    );
    topology
        .lb
        .run(
            "curl",
            &[
                "-si",
                "--max-time",
                "5",
                "-H",
                &format!("Host: {HOST}"),
                &url,
            ],
        )
        .unwrap_or_default()
}

#[test]
fn a_container_run_with_a_published_port_on_a_plain_engine_is_routed() {
    require_root().unwrap();
    let topology = Topology::create().unwrap();
    let dockerd = Dockerd::start(&topology.node).unwrap();
    build_scratch_image(&dockerd, IMAGE, &build_docker_demo_binary().unwrap()).unwrap();
    let published = |container: &str| -> u16 {
        let port = dockerd.docker(&["port", container, "8080/tcp"]).unwrap();
        let first = port.lines().next().unwrap_or_default();
        first.rsplit(':').next().unwrap().trim().parse().unwrap()
    };
    dockerd
        .docker(&[
            "run",
            "--detach",
            "--name",
            "plain",
            "--publish",
            "8080",
            "--label",
            &format!("com.docker.lb.hosts={HOST}"),
            "--label",
            "com.docker.lb.port=8080",
            "--env",
            "METADATA=plain",
            IMAGE,
        ])
        .unwrap();
    let port = published("plain");

    let scratch = ScratchDir::create("plain-docker").unwrap();
    let config = scratch.path().join("config.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let log_path = scratch.path().join("xlb.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = topology.node.command(xlb_binary());
    command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--no-xdp")
        .args(["--docker-url", &dockerd.host_url()])
        .env("XLB_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let _xlb = Process::spawn(command).unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let answer = wait_until("the container to be routed", CONVERGE, || {
        let answer = get(&topology);
        Ok(answer.starts_with("HTTP/1.1 200").then_some(answer))
    })
    .unwrap_or_else(|error| panic!("{error:#}\n{}\n{}", get(&topology), read_log()));
    assert!(answer.contains("\"metadata\":\"plain\""), "{answer}");
    // The engine is this host's: its published port, on loopback.
    let upstream = format!("x-upstream-addr: 127.0.0.1:{port}");
    assert!(answer.to_lowercase().contains(&upstream), "{answer}");
    assert!(read_log().contains("not in Swarm mode"), "{}", read_log());

    dockerd.docker(&["rm", "--force", "plain"]).unwrap();
    wait_until(
        "the removed container's host to answer 503",
        CONVERGE,
        || Ok(get(&topology).starts_with("HTTP/1.1 503").then_some(())),
    )
    .unwrap_or_else(|error| panic!("{error:#}\n{}", read_log()));
}
