//! The seed's split, end to end on the seed's cluster (`xlb_testbed::cluster`): three
//! managers, lb-00 and lb-01 joined as workers and labelled `nodetype=loadbalancer` with the
//! seed's own command, and three more workers; each node its own namespace and engine.
//! `xlb controller` on manager-0 reads Docker and serves snapshots; `xlb proxy` on lb-00 and
//! lb-01, whose worker engines cannot list services, route the seed's service from the
//! snapshots alone (lb-00 given the controllers, lb-01 finding them on the managers its engine
//! knows). Requests without the token are refused;
//! scaling reaches both proxies; with the controller killed the proxies keep serving, and
//! manager-1's controller takes over.

use std::time::Duration;

use serde_json::Value;
use xlb_testbed::{
    cluster::{SeedCluster, ADMIN_PORT, CONFIG, LOAD_BALANCERS, MANAGERS},
    seed::{HOST, SERVICE},
    wait_until, Process, Segment,
};

const TOKEN: &str = "a-test-token-of-the-controllers";
const CONVERGE: Duration = Duration::from_secs(20);
/// A manager's loss: Swarm's Raft elects a leader within seconds, and finds the dead node down
/// (and moves its tasks) within its heartbeat grace.
const LEADER_ELECTION: Duration = Duration::from_secs(90);

/// The cluster's config with a minute between resyncs: every change the tests wait for must
/// come from the engine's events (and the reads while tasks settle), as their deadlines are
/// far shorter.
fn start_cluster() -> SeedCluster {
    let config = CONFIG.replace("PollInterval = \"3s\"", "PollInterval = \"60s\"");
    assert!(config.contains("60s"));
    SeedCluster::start(&config, TOKEN).unwrap()
}

/// Every xlb log of the cluster, for a failure's message.
fn logs(cluster: &SeedCluster) -> String {
    cluster.logs(&[
        MANAGERS[0],
        MANAGERS[1],
        LOAD_BALANCERS[0],
        LOAD_BALANCERS[1],
    ])
}

fn wait_for_both(cluster: &SeedCluster, count: usize) {
    cluster
        .wait_for_both(count, CONVERGE)
        .unwrap_or_else(|error| panic!("{error:#}\n{}", logs(cluster)));
}

#[test]
fn proxies_route_from_the_controllers_alone_and_survive_the_controller() {
    let cluster = start_cluster();
    let mut controller = cluster.controller(0).unwrap();
    // lb-01's proxy finds the controllers by itself: the managers its engine knows.
    let _proxies: [Process; 2] = [
        cluster.proxy(0, false).unwrap(),
        cluster.proxy_finding_controllers(1).unwrap(),
    ];
    wait_for_both(&cluster, 1);
    let found = cluster.logs(&[LOAD_BALANCERS[1]]);
    let expected: Vec<String> = cluster.controller_urls();
    assert!(
        found.contains(&format!(
            "controllers on the Swarm's managers controllers={expected:?}"
        )),
        "{found}"
    );
    for (lb, name) in LOAD_BALANCERS.iter().enumerate() {
        let response = cluster.get(lb).unwrap();
        assert_eq!(response.header("x-proxy-id"), Some(*name), "{response:?}");
    }

    // lb-00's and lb-01's engines are workers, which cannot list services (why the proxies
    // read snapshots, not Docker).
    for lb in LOAD_BALANCERS {
        let refused = cluster.engine(lb).docker(&["service", "ls"]).unwrap_err();
        assert!(
            format!("{refused:#}").contains("not a swarm manager"),
            "{lb}: {refused:#}"
        );
    }

    // The token guards everything but /health.
    let controller_url = cluster.controller_urls()[0].clone();
    let refused = cluster
        .curl(&format!("{controller_url}/snapshot"), &[])
        .unwrap();
    assert_eq!(refused.status, 401, "{refused:?}");
    let wrong = cluster
        .curl(
            &format!("{controller_url}/snapshot"),
            &["-H", "Authorization: Bearer not-the-token"],
        )
        .unwrap();
    assert_eq!(wrong.status, 401, "{wrong:?}");
    let health = cluster
        .curl(&format!("{controller_url}/health"), &[])
        .unwrap();
    assert_eq!(health.status, 200);
    let snapshot = cluster
        .curl(
            &format!("{controller_url}/snapshot"),
            &["-H", &format!("Authorization: Bearer {TOKEN}")],
        )
        .unwrap();
    assert_eq!(snapshot.status, 200, "{snapshot:?}");
    let snapshot: Value = serde_json::from_str(&snapshot.body).unwrap();
    assert!(snapshot["version"].as_u64().unwrap() > 0);
    assert_eq!(
        snapshot["l7"]["routes"][HOST][0]["service"], SERVICE,
        "{snapshot}"
    );

    // Scaling reaches both proxies.
    cluster.swarm.service_scale(SERVICE, 2).unwrap();
    wait_for_both(&cluster, 2);
    let routes = cluster.routes(0).unwrap();
    assert_eq!(
        routes["snapshot"]["controllers"][0]["state"], "up",
        "{routes}"
    );

    // The controller dies: the proxies keep serving what they have.
    controller.kill().unwrap();
    for lb in 0..2 {
        for _ in 0..5 {
            let response = cluster.get(lb).unwrap();
            assert_eq!(response.status, 200, "lb-0{lb} without a controller");
        }
    }

    // manager-1's controller takes over: the proxies fail over to it.
    let _standby = cluster.controller(1).unwrap();
    cluster.swarm.service_scale(SERVICE, 3).unwrap();
    wait_for_both(&cluster, 3);
    let routes = cluster.routes(1).unwrap();
    let controllers = &routes["snapshot"]["controllers"];
    assert_eq!(controllers[0]["state"], "down", "{routes}");
    assert_eq!(controllers[1]["state"], "up", "{routes}");
    assert_eq!(
        controllers[2]["state"], "down",
        "manager-2 runs none: {routes}"
    );

    // The leading manager's engine dies (manager-0, where the Swarm began): the Raft of three
    // elects another leader; both proxies keep serving, and follow a change made through it.
    let leader = cluster.engine(MANAGERS[0]).pid();
    xlb_testbed::run_program("kill", &["-KILL", &leader.to_string()]).unwrap();
    for lb in 0..2 {
        for _ in 0..5 {
            let response = cluster.get(lb).unwrap();
            assert_eq!(response.status, 200, "lb-0{lb} without the leader");
        }
    }
    let manager_1 = cluster.engine(MANAGERS[1]);
    wait_until("a new leader to scale the service", LEADER_ELECTION, || {
        let scaled = manager_1.docker(&["service", "scale", "--detach", &format!("{SERVICE}=4")]);
        Ok(scaled.ok().map(|_| ()))
    })
    .unwrap();
    // The tasks manager-0 ran are started again elsewhere once Swarm finds it down.
    cluster
        .wait_for_both(4, LEADER_ELECTION)
        .unwrap_or_else(|error| panic!("{error:#}\n{}", logs(&cluster)));
}

/// `/proc/<pid>/status`'s value for `key` (`Uid`, `CapEff`, ...), whitespace collapsed.
fn proc_status(pid: u32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_proxy_with_a_user_gives_up_root_once_attached_and_bound_and_keeps_working() {
    let cluster = start_cluster();
    let config = cluster.scratch.path().join("config-user.toml");
    let cluster_config = std::fs::read_to_string(&cluster.config).unwrap();
    std::fs::write(
        &config,
        cluster_config.replace(
            "[Extensions.default.Config]",
            "[Extensions.default.Config]\nUser = \"nobody\"",
        ),
    )
    .unwrap();
    let _controller = cluster.controller(0).unwrap();
    let controller = cluster.controller_urls()[0].clone();
    let lb = &cluster.lbs[0];
    let mut proxy = cluster
        .spawn(
            lb,
            LOAD_BALANCERS[0],
            &[
                "proxy",
                "--interface",
                Segment::HOST_INTERFACE,
                "--controller",
                &controller,
            ],
            &config,
        )
        .unwrap();
    wait_until("lb-00 to route the service", CONVERGE, || {
        Ok((cluster.routed_endpoints(0) == 1).then_some(()))
    })
    .unwrap_or_else(|error| panic!("{error:#}\n{}", logs(&cluster)));

    // Port 80 bound and XDP attached as root; running as nobody:nogroup without capabilities.
    let pid = proxy.pid();
    assert_eq!(proc_status(pid, "Uid"), "65534 65534 65534 65534");
    assert_eq!(proc_status(pid, "Gid"), "65534 65534 65534 65534");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(proc_status(pid, set), "0000000000000000", "{set}");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    let link = lb
        .netns
        .ip(&["link", "show", "dev", Segment::HOST_INTERFACE])
        .unwrap();
    assert!(link.contains("xdp"), "XDP attached: {link}");

    // What it does as nobody still works: routing, the maps read through held descriptors,
    // and the connection table's sweep (BPF_PROG_TEST_RUN on the program it holds).
    let response = cluster.get(0).unwrap();
    assert_eq!(response.status, 200, "{response:?}\n{}", logs(&cluster));
    let stats_url = format!("http://{}:{ADMIN_PORT}/stats", lb.addr);
    wait_until("a sweep run as nobody", CONVERGE, || {
        let stats = cluster.curl(&stats_url, &[])?;
        let stats: Value = serde_json::from_str(&stats.body)?;
        let sweeps = stats["l4"]["connections"]["sweeps"]["sweeps"].as_u64();
        Ok(sweeps.is_some_and(|sweeps| sweeps >= 2).then_some(()))
    })
    .unwrap_or_else(|error| panic!("{error:#}\n{}", logs(&cluster)));

    // SIGTERM: it drains and exits, and XDP goes with it (its link closed, no root needed).
    let status = proxy.stop().unwrap();
    let log = logs(&cluster);
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(
        !log.contains("sweeping the connection table failed"),
        "{log}"
    );
    let link = lb
        .netns
        .ip(&["link", "show", "dev", Segment::HOST_INTERFACE])
        .unwrap();
    assert!(!link.contains("xdp"), "XDP detached on exit: {link}");
}
