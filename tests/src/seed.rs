//! The scenario of Interlock's host-mode documentation, on one machine: a private Swarm in the
//! `node` namespace runs the seed's `demo` service, and `xlb run` with the seed's config runs in
//! `lb-00`, its XDP program attached to the veth facing the `client` namespace.
//!
//! Used by `cargo xtask demo` and by the end-to-end tests. Dropping a [`SeedScenario`] stops
//! xlb, then the Swarm and its engine, then removes the namespaces.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{ExitStatus, Output, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    build_docker_demo_binary, command_line, require_root, wait_until, Dockerd, Process, ScratchDir,
    Swarm, Topology,
};

pub const SERVICE: &str = "demo";
pub const HOST: &str = "demo.local";
pub const TARGET_PORT: u16 = 8080;
/// The image name of the documentation, built locally from `tests/docker-demo`.
pub const IMAGE: &str = "ehazlett/docker-demo";
/// The seed config's `PublishedPort` and `ListenAddr` ports.
pub const PROXY_PORT: u16 = 80;
pub const ADMIN_PORT: u16 = 8080;
/// The seed config's `PollInterval`.
pub const POLL_INTERVAL: Duration = Duration::from_secs(3);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// `docker service create` exactly as the documentation runs it (the image is local, so the
/// registry lookup is skipped by [`Swarm::service_create`]).
pub const SERVICE_CREATE_ARGS: &[&str] = &[
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
    IMAGE,
];

/// Fields drop in declaration order: xlb stops before the Swarm, the Swarm before the network.
pub struct SeedScenario {
    xlb: Process,
    pub swarm: Swarm,
    pub topology: Topology,
    xlb_log: PathBuf,
    _scratch: ScratchDir,
}

/// What `curl -si` saw.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl SeedScenario {
    /// Builds everything and waits until xlb routes `demo.local` to the service's task.
    pub fn start(xlb_binary: &Path, config: &Path) -> Result<SeedScenario> {
        require_root()?;
        if !xlb_binary.is_file() {
            bail!(
                "no xlb binary at {}: build it first (cargo build -p xlb)",
                xlb_binary.display()
            );
        }
        let docker_demo = build_docker_demo_binary()?;
        let topology = Topology::create()?;
        let swarm = Swarm::init(Dockerd::start(&topology.node)?, topology.node_addr())?;
        swarm.build_image(IMAGE, &docker_demo)?;
        swarm.service_create(SERVICE_CREATE_ARGS)?;
        swarm.wait_for_task_endpoints(SERVICE, TARGET_PORT, 1, CONVERGE_TIMEOUT)?;

        let scratch = ScratchDir::create("seed")?;
        let xlb_log = scratch.path().join("xlb.log");
        let xlb = start_xlb(&topology, &swarm, xlb_binary, config, &xlb_log)?;
        let scenario = SeedScenario {
            xlb,
            swarm,
            topology,
            xlb_log,
            _scratch: scratch,
        };
        scenario.wait_for_endpoints(1)?;
        Ok(scenario)
    }

    /// The load balancer's address as the client sees it.
    pub fn lb_addr(&self) -> Ipv4Addr {
        self.topology.lb_client_addr()
    }

    pub fn xlb_pid(&self) -> u32 {
        self.xlb.pid()
    }

    /// Stops xlb with SIGTERM (SIGKILL only if it outlives the grace period).
    pub fn stop_xlb(&mut self) -> Result<ExitStatus> {
        self.xlb.stop()
    }

    /// `ip link show` of the XDP interface in lb-00.
    pub fn lb_interface_details(&self) -> Result<String> {
        self.topology
            .lb
            .ip(&["link", "show", "dev", Topology::LB_CLIENT_INTERFACE])
    }

    pub fn xlb_log_path(&self) -> &Path {
        &self.xlb_log
    }

    /// Everything xlb has logged so far.
    pub fn xlb_log(&self) -> String {
        std::fs::read_to_string(&self.xlb_log).unwrap_or_default()
    }

    /// The documentation's check, `curl -vs -H "Host: demo.local" http://<lb-00>/ping`, run in
    /// the client namespace.
    pub fn seed_curl(&self) -> Result<Output> {
        let url = format!("http://{}/ping", self.lb_addr());
        let mut curl = self.topology.client.command("curl");
        curl.args([
            "-vs",
            "--max-time",
            "10",
            "-H",
            &format!("Host: {HOST}"),
            &url,
        ]);
        curl.output()
            .with_context(|| format!("running {}", command_line(&curl)))
    }

    /// `GET path` with `Host: host` on the proxy port, from the client namespace.
    pub fn get(&self, host: &str, path: &str) -> Result<HttpResponse> {
        self.get_at(self.lb_addr().into(), host, path)
    }

    /// `GET path` with `Host: host` on the proxy port of lb-00's address `lb`, from the client
    /// namespace.
    pub fn get_at(&self, lb: IpAddr, host: &str, path: &str) -> Result<HttpResponse> {
        let url = format!("http://{}{path}", SocketAddr::new(lb, PROXY_PORT));
        let output = self.topology.client.run(
            "curl",
            &[
                "-gsi",
                "--max-time",
                "10",
                "-H",
                &format!("Host: {host}"),
                &url,
            ],
        )?;
        HttpResponse::parse(&output)
    }

    /// `GET path` on the admin endpoint (`ListenAddr`), as JSON.
    pub fn admin(&self, path: &str) -> Result<Value> {
        let body = self.admin_text(path)?;
        serde_json::from_str(&body).with_context(|| format!("{path} answered non-JSON: {body:?}"))
    }

    /// `GET path` on the admin endpoint, as text.
    pub fn admin_text(&self, path: &str) -> Result<String> {
        let url = format!("http://{}:{ADMIN_PORT}{path}", self.lb_addr());
        self.topology
            .client
            .run("curl", &["-sf", "--max-time", "5", &url])
    }

    /// The endpoints xlb's `/routes` lists for `demo.local` (its route on every path, `/`).
    pub fn routed_endpoints(&self) -> Result<Vec<SocketAddr>> {
        let table = self.admin("/routes")?;
        let routes = table["routes"][HOST]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let endpoints = routes
            .iter()
            .find(|route| route["context_root"] == "/")
            .and_then(|route| route["endpoints"].as_array())
            .cloned()
            .unwrap_or_default();
        endpoints
            .iter()
            .map(|endpoint| {
                let text = endpoint.as_str().context("an endpoint is not a string")?;
                text.parse()
                    .with_context(|| format!("bad endpoint {text:?}"))
            })
            .collect()
    }

    /// Waits until xlb routes `demo.local` to `count` endpoints.
    pub fn wait_for_endpoints(&self, count: usize) -> Result<Vec<SocketAddr>> {
        let what = format!("xlb to route {HOST} to {count} endpoint(s)");
        let mut last = String::new();
        wait_until(&what, CONVERGE_TIMEOUT, || match self.routed_endpoints() {
            Ok(endpoints) if endpoints.len() == count => Ok(Some(endpoints)),
            Ok(endpoints) => {
                last = format!("routed to {endpoints:?}");
                Ok(None)
            }
            Err(error) => {
                last = format!("{error:#}");
                Ok(None)
            }
        })
        .with_context(|| format!("last seen: {last}\nxlb's log:\n{}", self.xlb_log()))
    }
}

/// The `xlb` binary for tests: `$XLB_BIN`, else the one cargo built in the target directory the
/// running test executable sits in (`target/<profile>/deps/..`); `cargo xtask test` builds it.
pub fn xlb_binary() -> PathBuf {
    std::env::var_os("XLB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let test_exe = std::env::current_exe().expect("the running executable's path");
            let profile_dir = test_exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>/deps");
            profile_dir.join("xlb")
        })
}

fn start_xlb(
    topology: &Topology,
    swarm: &Swarm,
    xlb_binary: &Path,
    config: &Path,
    log: &Path,
) -> Result<Process> {
    let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut xlb = topology.lb.command(xlb_binary);
    xlb.arg("run")
        .arg("--config")
        .arg(config)
        .args(["--interface", Topology::LB_CLIENT_INTERFACE])
        .args(["--docker-url", &swarm.dockerd().host_url()])
        .env("XLB_LOG", "info,xlb_dataplane=debug")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    Process::spawn(xlb)
}

impl HttpResponse {
    /// Parses `curl -si` output: a status line, headers, a blank line, the body.
    pub fn parse(raw: &str) -> Result<HttpResponse> {
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .with_context(|| format!("no end of headers in {raw:?}"))?;
        let mut lines = head.lines();
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        Ok(HttpResponse {
            status,
            headers,
            body: body.to_owned(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}
