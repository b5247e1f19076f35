//! The seed's split, end to end on a real multi-node Swarm: two managers (manager-0, manager-1),
//! lb-00 and lb-01 joined as workers and labelled `nodetype=loadbalancer` with the seed's own
//! command, and worker-0; each node its own namespace and engine. `xlb controller` on manager-0
//! reads Docker and serves snapshots; `xlb proxy` on lb-00 and lb-01, whose worker engines
//! cannot list services and whose DockerURL leads nowhere, route the seed's service from the
//! snapshots alone. Requests without the token are refused; scaling reaches both proxies; with
//! the controller killed the proxies keep serving, and manager-1's controller takes over.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context as _;
use serde_json::Value;
use xlb_testbed::{
    build_docker_demo_binary,
    seed::{xlb_binary, HttpResponse, HOST, IMAGE, SERVICE, SERVICE_CREATE_ARGS, TARGET_PORT},
    wait_until, Dockerd, Host, NodeRole, Process, ScratchDir, Segment, Swarm,
};

const CONTROLLER_PORT: u16 = 2376;
const PROXY_PORT: u16 = 80;
const TOKEN: &str = "a-test-token-of-the-controllers";
/// A minute between resyncs: every change the test waits for must come from the engine's
/// events (and the reads while tasks settle), as the test's deadlines are far shorter.
const CONFIG: &str = r#"ListenAddr = "0.0.0.0:2376"
DockerURL = "unix:///nonexistent/docker.sock"
PollInterval = "60s"

[Extensions.default]
PublishMode = "host"
PublishedPort = 80

[Extensions.default.Config]
AccessLogPath = "off"
"#;
const CONVERGE: Duration = Duration::from_secs(20);

/// Fields drop in declaration order: the Swarm (and its engine) first, the switch last.
struct Cluster {
    swarm: Swarm,
    client: Host,
    manager: Host,
    standby: Host,
    lbs: [Host; 2],
    _worker: Host,
    scratch: ScratchDir,
    config: PathBuf,
    token_file: PathBuf,
    _segment: Segment,
}

impl Cluster {
    fn start() -> Cluster {
        xlb_testbed::require_root().unwrap();
        let docker_demo = build_docker_demo_binary().unwrap();
        let segment = Segment::create().unwrap();
        let client = segment.add_host("client", 2).unwrap();
        let manager = segment.add_host("manager-0", 10).unwrap();
        let standby = segment.add_host("manager-1", 11).unwrap();
        let lbs = [
            segment.add_host("lb-00", 20).unwrap(),
            segment.add_host("lb-01", 21).unwrap(),
        ];
        let worker = segment.add_host("worker-0", 30).unwrap();
        let engine = |host: &Host, name: &str| Dockerd::start_named(&host.netns, name).unwrap();
        let mut swarm = Swarm::init(engine(&manager, "manager-0"), manager.addr).unwrap();
        let joins = [
            (&standby, "manager-1", NodeRole::Manager),
            (&lbs[0], "lb-00", NodeRole::Worker),
            (&lbs[1], "lb-01", NodeRole::Worker),
            (&worker, "worker-0", NodeRole::Worker),
        ];
        for (host, name, role) in joins {
            swarm.join(engine(host, name), host.addr, role).unwrap();
        }
        // The seed's own commands.
        for lb in ["lb-00", "lb-01"] {
            swarm
                .docker(&["node", "update", "--label-add", "nodetype=loadbalancer", lb])
                .unwrap();
        }
        swarm.build_image(IMAGE, &docker_demo).unwrap();
        swarm.service_create(SERVICE_CREATE_ARGS).unwrap();
        swarm
            .wait_for_task_endpoints(SERVICE, TARGET_PORT, 1, CONVERGE)
            .unwrap();
        let scratch = ScratchDir::create("controller-split").unwrap();
        let config = scratch.path().join("config.toml");
        std::fs::write(&config, CONFIG).unwrap();
        let token_file = scratch.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        Cluster {
            swarm,
            client,
            manager,
            standby,
            lbs,
            _worker: worker,
            scratch,
            config,
            token_file,
            _segment: segment,
        }
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(format!("{name}.log"))
    }

    fn spawn(&self, host: &Host, name: &str, args: &[&str]) -> Process {
        self.spawn_with_config(host, name, args, &self.config)
    }

    fn spawn_with_config(&self, host: &Host, name: &str, args: &[&str], config: &Path) -> Process {
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        let mut command = host.netns.command(xlb_binary());
        command
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--token-file")
            .arg(&self.token_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        Process::spawn(command).unwrap()
    }

    /// `xlb controller` on manager-0 (`standby`: on manager-1), reading its own engine.
    fn controller(&self, standby: bool, name: &str) -> Process {
        let (host, engine) = match standby {
            false => (&self.manager, self.swarm.dockerd()),
            true => (&self.standby, &self.swarm.members()[0]),
        };
        let docker_url = engine.host_url();
        self.spawn(host, name, &["controller", "--docker-url", &docker_url])
    }

    fn proxy(&self, lb: usize) -> Process {
        let controllers = [&self.manager, &self.standby]
            .map(|host| format!("http://{}:{CONTROLLER_PORT}", host.addr));
        self.spawn(
            &self.lbs[lb],
            &format!("proxy-{lb}"),
            &[
                "proxy",
                "--no-xdp",
                "--controller",
                &controllers[0],
                "--controller",
                &controllers[1],
            ],
        )
    }

    fn logs(&self) -> String {
        ["controller", "standby", "proxy-0", "proxy-1"]
            .iter()
            .map(|name| {
                let log = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
                format!("--- {name}:\n{log}")
            })
            .collect()
    }

    /// `curl -si` from the client namespace, with extra curl arguments.
    fn curl(&self, url: &str, extra: &[&str]) -> anyhow::Result<HttpResponse> {
        let mut args = vec!["-si", "--max-time", "5"];
        args.extend_from_slice(extra);
        args.push(url);
        let output = self.client.netns.run("curl", &args)?;
        HttpResponse::parse(&output)
    }

    /// The seed's request through lb-`lb`.
    fn get(&self, lb: usize) -> anyhow::Result<HttpResponse> {
        let url = format!("http://{}:{PROXY_PORT}/ping", self.lbs[lb].addr);
        self.curl(&url, &["-H", &format!("Host: {HOST}")])
    }

    /// lb-`lb`'s `/routes` (its admin endpoint on ListenAddr).
    fn routes(&self, lb: usize) -> anyhow::Result<Value> {
        let url = format!("http://{}:{CONTROLLER_PORT}/routes", self.lbs[lb].addr);
        let response = self.curl(&url, &[])?;
        serde_json::from_str(&response.body).context("/routes is not JSON")
    }

    fn routed_endpoints(&self, lb: usize) -> usize {
        self.routes(lb).ok().map_or(0, |routes| {
            routes["routes"][HOST][0]["endpoints"]
                .as_array()
                .map_or(0, Vec::len)
        })
    }

    /// Waits until both proxies route the service to `count` endpoints and answer through them.
    fn wait_for_both(&self, count: usize) {
        for lb in 0..2 {
            wait_until(
                &format!("lb-0{lb} to route {HOST} to {count} endpoint(s)"),
                CONVERGE,
                || Ok((self.routed_endpoints(lb) == count).then_some(())),
            )
            .unwrap_or_else(|error| panic!("{error:#}\n{}", self.logs()));
            let response = self.get(lb).unwrap();
            assert_eq!(
                response.status,
                200,
                "lb-0{lb}: {response:?}\n{}",
                self.logs()
            );
        }
    }
}

#[test]
fn proxies_route_from_the_controllers_alone_and_survive_the_controller() {
    let cluster = Cluster::start();
    let mut controller = cluster.controller(false, "controller");
    let _proxies = [cluster.proxy(0), cluster.proxy(1)];
    cluster.wait_for_both(1);

    // lb-00's and lb-01's engines are workers, which cannot list services (why the proxies
    // read snapshots, not Docker; their DockerURL leads nowhere anyway).
    for (index, lb) in ["lb-00", "lb-01"].iter().enumerate() {
        let refused = cluster.swarm.members()[1 + index]
            .docker(&["service", "ls"])
            .unwrap_err();
        assert!(
            format!("{refused:#}").contains("not a swarm manager"),
            "{lb}: {refused:#}"
        );
    }

    // The token guards everything but /health.
    let controller_url = format!("http://{}:{CONTROLLER_PORT}", cluster.manager.addr);
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
    cluster.wait_for_both(2);
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
    let _standby = cluster.controller(true, "standby");
    cluster.swarm.service_scale(SERVICE, 3).unwrap();
    cluster.wait_for_both(3);
    let routes = cluster.routes(1).unwrap();
    let controllers = &routes["snapshot"]["controllers"];
    assert_eq!(controllers[0]["state"], "down", "{routes}");
    assert_eq!(controllers[1]["state"], "up", "{routes}");
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
    let cluster = Cluster::start();
    let config = cluster.scratch.path().join("config-user.toml");
    std::fs::write(
        &config,
        CONFIG.replace(
            "[Extensions.default.Config]",
            "[Extensions.default.Config]\nUser = \"nobody\"",
        ),
    )
    .unwrap();
    let _controller = cluster.controller(false, "controller");
    let controller = format!("http://{}:{CONTROLLER_PORT}", cluster.manager.addr);
    let lb = &cluster.lbs[0];
    let mut proxy = cluster.spawn_with_config(
        lb,
        "proxy-0",
        &[
            "proxy",
            "--interface",
            Segment::HOST_INTERFACE,
            "--controller",
            &controller,
        ],
        &config,
    );
    wait_until("lb-00 to route the service", CONVERGE, || {
        Ok((cluster.routed_endpoints(0) == 1).then_some(()))
    })
    .unwrap_or_else(|error| panic!("{error:#}\n{}", cluster.logs()));

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
    assert_eq!(response.status, 200, "{response:?}\n{}", cluster.logs());
    let stats_url = format!("http://{}:{CONTROLLER_PORT}/stats", lb.addr);
    wait_until("a sweep run as nobody", CONVERGE, || {
        let stats = cluster.curl(&stats_url, &[])?;
        let stats: Value = serde_json::from_str(&stats.body)?;
        let sweeps = stats["l4"]["connections"]["sweeps"]["sweeps"].as_u64();
        Ok(sweeps.is_some_and(|sweeps| sweeps >= 2).then_some(()))
    })
    .unwrap_or_else(|error| panic!("{error:#}\n{}", cluster.logs()));

    // SIGTERM: it drains and exits, and XDP goes with it (its link closed, no root needed).
    let status = proxy.stop().unwrap();
    let log = cluster.logs();
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
