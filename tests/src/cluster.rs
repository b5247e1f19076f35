//! The seed's cluster on one machine: 3 managers (a Raft of three) and 5 workers, two of them
//! lb-00 and lb-01 labelled `nodetype=loadbalancer` with the seed's own command; each node its
//! own namespace and engine, all on one segment, with a `client` namespace to send requests
//! from. `xlb controller` runs on the managers, `xlb proxy` on lb-00 and lb-01, and the seed's
//! `demo` service on the Swarm.
//!
//! ```text
//!   client 10.79.X.2      manager-0..2 .10-.12     lb-00 .20  lb-01 .21     worker-0..2 .30-.32
//! ```
//!
//! Used by the controller/proxy tests and by `cargo xtask cluster`, which leaves a cluster
//! running and describes it in a [`ClusterState`] for `status` and `down`. Dropping a
//! [`SeedCluster`] leaves the Swarm, stops the engines and removes the namespaces.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::{
    build_docker_demo_binary,
    dockerd::{command_line_names, stop_left_engine},
    netns::delete_netns,
    process::terminate_pid,
    require_root,
    seed::{HttpResponse, HOST, IMAGE, SERVICE, TARGET_PORT},
    wait_until, Dockerd, Host, NodeRole, Process, ScratchDir, Segment, Swarm,
};

pub const MANAGERS: [&str; 3] = ["manager-0", "manager-1", "manager-2"];
pub const LOAD_BALANCERS: [&str; 2] = ["lb-00", "lb-01"];
pub const WORKERS: [&str; 3] = ["worker-0", "worker-1", "worker-2"];
/// The controllers' and the proxies' admin `ListenAddr` port.
pub const ADMIN_PORT: u16 = 2376;
/// The proxies' `PublishedPort`.
pub const PROXY_PORT: u16 = 80;
const CONVERGE: Duration = Duration::from_secs(30);
/// How long an xlb process left running gets to drain before SIGKILL.
const XLB_STOP_GRACE: Duration = Duration::from_secs(15);

/// The cluster's config (`deploy/cluster/config.toml`, which the Vagrantfile's VMs install
/// too): the seed's extension, in host mode. The controllers here are given their engine on
/// the command line; the proxies never read Docker.
pub const CONFIG: &str = include_str!("../../deploy/cluster/config.toml");

/// Fields drop in declaration order: the Swarm (and its engines) first, the switch last.
pub struct SeedCluster {
    pub swarm: Swarm,
    pub client: Host,
    pub managers: [Host; 3],
    pub lbs: [Host; 2],
    pub workers: [Host; 3],
    pub scratch: ScratchDir,
    pub config: PathBuf,
    pub token_file: PathBuf,
    pub segment: Segment,
}

impl SeedCluster {
    /// Builds the cluster with `config` (see [`CONFIG`]) and `token`, and runs the seed's
    /// service on it, waiting for its task.
    pub fn start(config: &str, token: &str) -> Result<SeedCluster> {
        require_root()?;
        let docker_demo = build_docker_demo_binary()?;
        let segment = Segment::create()?;
        let client = segment.add_host("client", 2)?;
        let hosts = |names: &[&str], first: u8| -> Result<Vec<Host>> {
            names
                .iter()
                .zip(first..)
                .map(|(name, number)| segment.add_host(name, number))
                .collect()
        };
        let managers: [Host; 3] = to_array(hosts(&MANAGERS, 10)?);
        let lbs: [Host; 2] = to_array(hosts(&LOAD_BALANCERS, 20)?);
        let workers: [Host; 3] = to_array(hosts(&WORKERS, 30)?);
        let engine = |host: &Host, name: &str| Dockerd::start_named(&host.netns, name);
        let mut swarm = Swarm::init(engine(&managers[0], MANAGERS[0])?, managers[0].addr)?;
        let joins = managers[1..]
            .iter()
            .zip(&MANAGERS[1..])
            .map(|(host, name)| (host, *name, NodeRole::Manager))
            .chain(
                lbs.iter()
                    .zip(LOAD_BALANCERS)
                    .chain(workers.iter().zip(WORKERS))
                    .map(|(host, name)| (host, name, NodeRole::Worker)),
            );
        for (host, name, role) in joins {
            swarm
                .join(engine(host, name)?, host.addr, role)
                .with_context(|| format!("joining {name}"))?;
        }
        // The seed's own commands, through the Vagrantfile's provisioning scripts.
        swarm.dockerd().run_script("label-load-balancers.sh", &[])?;
        swarm.build_image(IMAGE, &docker_demo)?;
        swarm
            .dockerd()
            .run_script("demo-service.sh", &["--detach", "--no-resolve-image"])?;
        swarm.wait_for_task_endpoints(SERVICE, TARGET_PORT, 1, CONVERGE)?;
        let scratch = ScratchDir::create("cluster")?;
        let config_path = scratch.path().join("config.toml");
        std::fs::write(&config_path, config)?;
        let token_file = scratch.path().join("token");
        std::fs::write(&token_file, format!("{token}\n"))?;
        Ok(SeedCluster {
            swarm,
            client,
            managers,
            lbs,
            workers,
            scratch,
            config: config_path,
            token_file,
            segment,
        })
    }

    /// The engine of node `name`.
    pub fn engine(&self, name: &str) -> &Dockerd {
        let members = std::iter::once(self.swarm.dockerd()).chain(self.swarm.members());
        let names = MANAGERS.iter().chain(&LOAD_BALANCERS).chain(&WORKERS);
        names
            .zip(members)
            .find(|(node, _)| **node == name)
            .map(|(_, engine)| engine)
            .unwrap_or_else(|| panic!("no node {name} in the cluster"))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.scratch.path().join(format!("{name}.log"))
    }

    /// Runs `xlb ARGS --config CONFIG --token-file TOKEN` on node `name` (its `host`), logging
    /// to [`SeedCluster::log_path`]`(name)`. It runs in a UTS namespace whose host name is the
    /// node's, as on a node of its own: a proxy's `x-proxy-id` is its host name.
    pub fn spawn(&self, host: &Host, name: &str, args: &[&str], config: &Path) -> Result<Process> {
        let log = File::create(self.log_path(name))?;
        // `unshare` and `sh` exec: the PID held is xlb's.
        let mut command = host.netns.command("unshare");
        command
            .args([
                "--uts",
                "sh",
                "-c",
                &format!("hostname {name} && exec \"$@\""),
                "sh",
            ])
            .arg(crate::seed::xlb_binary())
            .args(args)
            .arg("--config")
            .arg(config)
            .arg("--token-file")
            .arg(&self.token_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Process::spawn(command)
    }

    /// `xlb controller` on manager `index`, reading its own engine.
    pub fn controller(&self, index: usize) -> Result<Process> {
        let docker_url = self.engine(MANAGERS[index]).host_url();
        self.spawn(
            &self.managers[index],
            MANAGERS[index],
            &["controller", "--docker-url", &docker_url],
            &self.config,
        )
    }

    /// The controllers' URLs, in the managers' order.
    pub fn controller_urls(&self) -> Vec<String> {
        self.managers
            .iter()
            .map(|host| format!("http://{}:{ADMIN_PORT}", host.addr))
            .collect()
    }

    /// `xlb proxy` on lb-0`lb`, fed by every controller; XDP attached to its `to-switch` when
    /// `xdp`.
    pub fn proxy(&self, lb: usize, xdp: bool) -> Result<Process> {
        let mut args = vec!["proxy".to_owned()];
        match xdp {
            true => args.extend(["--interface".to_owned(), Segment::HOST_INTERFACE.to_owned()]),
            false => args.push("--no-xdp".to_owned()),
        }
        for url in self.controller_urls() {
            args.extend(["--controller".to_owned(), url]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&self.lbs[lb], LOAD_BALANCERS[lb], &args, &self.config)
    }

    /// `xlb proxy --controllers-on-managers` on lb-0`lb`, without XDP: it finds the
    /// controllers' addresses by asking its own (worker) engine for the managers', as a proxy
    /// run as a Swarm service does.
    pub fn proxy_finding_controllers(&self, lb: usize) -> Result<Process> {
        let name = LOAD_BALANCERS[lb];
        let config = std::fs::read_to_string(&self.config)?.replace(
            "DockerURL = \"unix:///var/run/docker.sock\"",
            &format!("DockerURL = \"{}\"", self.engine(name).host_url()),
        );
        let path = self.scratch.path().join(format!("config-{name}.toml"));
        std::fs::write(&path, config)?;
        let args = ["proxy", "--no-xdp", "--controllers-on-managers"];
        self.spawn(&self.lbs[lb], name, &args, &path)
    }

    /// The logs of the xlb processes named `names`.
    pub fn logs(&self, names: &[&str]) -> String {
        names
            .iter()
            .map(|name| {
                let log = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
                format!("--- {name}:\n{log}")
            })
            .collect()
    }

    /// `curl -si` from the client namespace, with extra curl arguments.
    pub fn curl(&self, url: &str, extra: &[&str]) -> Result<HttpResponse> {
        let mut args = vec!["-si", "--max-time", "5"];
        args.extend_from_slice(extra);
        args.push(url);
        let output = self.client.netns.run("curl", &args)?;
        HttpResponse::parse(&output)
    }

    /// The seed's request through lb-0`lb`.
    pub fn get(&self, lb: usize) -> Result<HttpResponse> {
        let url = format!("http://{}:{PROXY_PORT}/ping", self.lbs[lb].addr);
        self.curl(&url, &["-H", &format!("Host: {HOST}")])
    }

    /// lb-0`lb`'s `/routes` (its admin endpoint on ListenAddr).
    pub fn routes(&self, lb: usize) -> Result<Value> {
        let url = format!("http://{}:{ADMIN_PORT}/routes", self.lbs[lb].addr);
        let response = self.curl(&url, &[])?;
        serde_json::from_str(&response.body).context("/routes is not JSON")
    }

    /// How many endpoints lb-0`lb` routes the seed's host to (0 when it cannot tell).
    pub fn routed_endpoints(&self, lb: usize) -> usize {
        self.routes(lb).ok().map_or(0, |routes| {
            routes["routes"][HOST][0]["endpoints"]
                .as_array()
                .map_or(0, Vec::len)
        })
    }

    /// Waits until both proxies route the seed's service to `count` endpoints and answer
    /// the seed's request with 200 through them.
    pub fn wait_for_both(&self, count: usize, timeout: Duration) -> Result<()> {
        for lb in 0..2 {
            wait_until(
                &format!("lb-0{lb} to route {HOST} to {count} endpoint(s)"),
                timeout,
                || Ok((self.routed_endpoints(lb) == count).then_some(())),
            )?;
            let response = self.get(lb)?;
            anyhow::ensure!(response.status == 200, "lb-0{lb}: {response:?}");
        }
        Ok(())
    }

    /// What `cargo xtask cluster down` needs to stop the cluster once this process is gone:
    /// the xlb processes `processes` (name, PID), the engines, the namespaces, the directory.
    pub fn state(&self, processes: &[(&str, &Process)]) -> ClusterState {
        let engines = MANAGERS
            .iter()
            .chain(&LOAD_BALANCERS)
            .chain(&WORKERS)
            .map(|name| {
                let engine = self.engine(name);
                json!({"node": name, "pid": engine.pid(), "dir": engine.scratch_path(),
                       "url": engine.host_url()})
            })
            .collect::<Vec<_>>();
        let hosts = std::iter::once(&self.client)
            .chain(&self.managers)
            .chain(&self.lbs)
            .chain(&self.workers);
        let namespaces: Vec<&str> = hosts
            .map(|host| host.netns.name())
            .chain(std::iter::once(self.segment.switch.name()))
            .collect();
        let lbs: Vec<String> = self.lbs.iter().map(|host| host.addr.to_string()).collect();
        ClusterState(json!({
            "xlb": processes.iter().map(|(name, process)| json!({"name": name, "pid": process.pid()})).collect::<Vec<_>>(),
            "engines": engines,
            "namespaces": namespaces,
            "client_namespace": self.client.netns.name(),
            "load_balancers": lbs,
            "dir": self.scratch.path(),
        }))
    }
}

fn to_array<const N: usize>(hosts: Vec<Host>) -> [Host; N] {
    hosts
        .try_into()
        .unwrap_or_else(|hosts: Vec<Host>| panic!("{} hosts, not {N}", hosts.len()))
}

/// A cluster left running, as JSON: written by `cargo xtask cluster up`, read by `status`
/// and `down`.
pub struct ClusterState(pub Value);

impl ClusterState {
    pub fn client_namespace(&self) -> &str {
        self.0["client_namespace"].as_str().unwrap_or_default()
    }

    pub fn load_balancers(&self) -> Vec<String> {
        strings(&self.0["load_balancers"])
    }

    /// The engine URL of manager-0, for `docker -H`.
    pub fn manager_url(&self) -> Option<&str> {
        self.0["engines"][0]["url"].as_str()
    }

    /// (name, PID, alive) of each xlb process.
    pub fn processes(&self) -> Vec<(String, u32, bool)> {
        let dir = Path::new(self.0["dir"].as_str().unwrap_or("/nonexistent"));
        items(&self.0["xlb"])
            .map(|process| {
                let pid = process["pid"].as_u64().unwrap_or(0) as u32;
                let name = process["name"].as_str().unwrap_or("?").to_owned();
                (name, pid, command_line_names(pid, dir))
            })
            .collect()
    }

    /// Stops everything the state names, each part only if it is still what was started (a
    /// PID whose command line no longer names the cluster's directories is left alone).
    pub fn tear_down(&self) -> Result<()> {
        for (name, pid, alive) in self.processes() {
            if alive {
                eprintln!("stopping {name} (pid {pid})");
                terminate_pid(pid, XLB_STOP_GRACE)?;
            }
        }
        for engine in items(&self.0["engines"]) {
            let (Some(pid), Some(dir)) = (engine["pid"].as_u64(), engine["dir"].as_str()) else {
                continue;
            };
            eprintln!("stopping the engine of {}", engine["node"]);
            if Path::new(dir).exists() {
                stop_left_engine(pid as u32, Path::new(dir))?;
            }
        }
        let existing = crate::list_netns()?;
        for name in strings(&self.0["namespaces"]) {
            if existing.contains(&name) {
                delete_netns(&name)?;
            }
        }
        if let Some(dir) = self.0["dir"].as_str().filter(|dir| Path::new(dir).exists()) {
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {dir}"))?;
        }
        Ok(())
    }
}

fn items(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

fn strings(value: &Value) -> Vec<String> {
    items(value)
        .filter_map(|item| item.as_str().map(str::to_owned))
        .collect()
}
