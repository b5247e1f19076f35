//! A Docker Swarm on testbed [`Dockerd`]s (one node, or more joined to it), and the service
//! operations the end-to-end tests drive: create, scale, remove, and finding
//! the `address:port` each running task publishes in host mode, which is what
//! xlb discovers and balances across. Every node leaves the swarm on Drop.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::dockerd::Dockerd;
use crate::image::build_scratch_image;
use crate::wait::wait_until;

#[derive(Debug)]
pub struct Swarm {
    dockerd: Dockerd,
    advertise_addr: Ipv4Addr,
    /// Nodes joined to the first one, which the swarm's commands go to.
    members: Vec<Dockerd>,
}

/// What a node joins a swarm as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    Manager,
    Worker,
}

/// A running task as a load balancer sees it: where it answers, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningTask {
    /// The task's ID (`docker inspect --type task`).
    pub id: String,
    pub endpoint: SocketAddr,
    pub running_since: SystemTime,
}

impl Swarm {
    /// `docker swarm init --advertise-addr ADDR` (provisioning script `swarm-init.sh`, as the
    /// Vagrantfile's VMs run it); takes the engine so that it outlives the swarm (leaving
    /// needs it running).
    pub fn init(dockerd: Dockerd, advertise_addr: Ipv4Addr) -> Result<Swarm> {
        dockerd.run_script("swarm-init.sh", &[&advertise_addr.to_string()])?;
        Ok(Swarm {
            dockerd,
            advertise_addr,
            members: Vec::new(),
        })
    }

    /// `docker swarm join` of `dockerd`, advertising `advertise_addr`, as `role`, with the
    /// token the first node hands out. The swarm keeps the engine and it leaves on Drop.
    pub fn join(
        &mut self,
        dockerd: Dockerd,
        advertise_addr: Ipv4Addr,
        role: NodeRole,
    ) -> Result<()> {
        let role_name = match role {
            NodeRole::Manager => "manager",
            NodeRole::Worker => "worker",
        };
        let token = self.docker(&["swarm", "join-token", "--quiet", role_name])?;
        dockerd.run_script(
            "swarm-join.sh",
            &[
                token.trim(),
                &advertise_addr.to_string(),
                &self.advertise_addr.to_string(),
            ],
        )?;
        self.members.push(dockerd);
        Ok(())
    }

    /// The engines joined to the first node.
    pub fn members(&self) -> &[Dockerd] {
        &self.members
    }

    pub fn dockerd(&self) -> &Dockerd {
        &self.dockerd
    }

    pub fn advertise_addr(&self) -> Ipv4Addr {
        self.advertise_addr
    }

    /// Runs `docker ARGS` against the swarm's engine and returns stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        self.dockerd.docker(args)
    }

    /// The engine socket of the node the swarm's commands go to (a manager).
    pub fn manager_socket(&self) -> &Path {
        self.dockerd.socket_path()
    }

    /// See [`build_scratch_image`]; on every node, since no registry serves the image to
    /// them.
    pub fn build_image(&self, tag: &str, static_binary: &Path) -> Result<()> {
        for dockerd in std::iter::once(&self.dockerd).chain(&self.members) {
            build_scratch_image(dockerd, tag, static_binary)?;
        }
        Ok(())
    }

    /// `docker service create --detach --no-resolve-image ARGS`; returns the
    /// service ID without waiting for tasks (see the `wait_for_*` helpers).
    /// Every image here is local, so asking a registry for digests only costs time.
    pub fn service_create(&self, args: &[&str]) -> Result<String> {
        let mut full_args = vec!["service", "create", "--detach", "--no-resolve-image"];
        full_args.extend_from_slice(args);
        Ok(self.docker(&full_args)?.trim().to_string())
    }

    /// Sets the replica count without waiting for convergence.
    pub fn service_scale(&self, service: &str, replicas: u32) -> Result<()> {
        self.docker(&[
            "service",
            "scale",
            "--detach",
            &format!("{service}={replicas}"),
        ])?;
        Ok(())
    }

    pub fn service_rm(&self, service: &str) -> Result<()> {
        self.docker(&["service", "rm", service])?;
        Ok(())
    }

    /// `node address:published port` for every running task of `service`
    /// that publishes TCP `target_port` in host mode, sorted and deduplicated
    /// (the engine lists each binding once for IPv4 and once for IPv6).
    pub fn running_task_endpoints(
        &self,
        service: &str,
        target_port: u16,
    ) -> Result<Vec<SocketAddr>> {
        let endpoints: BTreeSet<SocketAddr> = self
            .running_tasks(service, target_port)?
            .into_iter()
            .map(|task| task.endpoint)
            .collect();
        Ok(endpoints.into_iter().collect())
    }

    /// Every running task of `service` publishing TCP `target_port` in host mode, with the
    /// time Swarm recorded it entering the running state (its `Status.Timestamp`).
    pub fn running_tasks(&self, service: &str, target_port: u16) -> Result<Vec<RunningTask>> {
        let task_ids = self.docker(&[
            "service",
            "ps",
            "--quiet",
            "--no-trunc",
            "--filter",
            "desired-state=running",
            service,
        ])?;
        let task_ids: Vec<&str> = task_ids.split_whitespace().collect();
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut inspect_args = vec!["inspect", "--type", "task"];
        inspect_args.extend_from_slice(&task_ids);
        let tasks: Vec<Value> = serde_json::from_str(&self.docker(&inspect_args)?)
            .context("cannot parse `docker inspect` of tasks")?;
        let mut running = Vec::new();
        for task in &tasks {
            if task["Status"]["State"] != "running" {
                continue;
            }
            let timestamp = task["Status"]["Timestamp"].as_str().unwrap_or_default();
            let running_since: SystemTime = chrono::DateTime::parse_from_rfc3339(timestamp)
                .with_context(|| format!("task status timestamp {timestamp:?}"))?
                .into();
            let node_addr = self.node_addr(task["NodeID"].as_str().unwrap_or_default())?;
            let mut published_ports = BTreeSet::new();
            for port in task["Status"]["PortStatus"]["Ports"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if published_target_matches(port, target_port) {
                    if let Some(published) = port["PublishedPort"].as_u64() {
                        let published = u16::try_from(published)
                            .with_context(|| format!("published port {published} out of range"))?;
                        published_ports.insert(published);
                    }
                }
            }
            let id = task["ID"].as_str().unwrap_or_default();
            running.extend(published_ports.into_iter().map(|port| RunningTask {
                id: id.to_owned(),
                endpoint: SocketAddr::new(node_addr, port),
                running_since,
            }));
        }
        Ok(running)
    }

    /// The address a node advertises (`Status.Addr`), where its host-mode
    /// ports are reachable.
    fn node_addr(&self, node_id: &str) -> Result<IpAddr> {
        let addr = self.docker(&["node", "inspect", "--format", "{{.Status.Addr}}", node_id])?;
        addr.trim()
            .parse()
            .with_context(|| format!("node {node_id} has no usable address: {addr:?}"))
    }

    /// Waits until exactly `count` distinct endpoints are running; on timeout
    /// the error includes `docker service ps`, which shows why tasks failed.
    pub fn wait_for_task_endpoints(
        &self,
        service: &str,
        target_port: u16,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>> {
        wait_until(
            &format!("{count} running task endpoint(s) of service {service}"),
            timeout,
            || {
                let endpoints = self.running_task_endpoints(service, target_port)?;
                Ok((endpoints.len() == count).then_some(endpoints))
            },
        )
        .with_context(|| self.service_ps_report(service))
    }

    /// Waits until no container of `service` exists any more, e.g. after
    /// [`Swarm::service_rm`], so nothing still answers on its ports.
    pub fn wait_for_service_containers_gone(&self, service: &str, timeout: Duration) -> Result<()> {
        let label = format!("label=com.docker.swarm.service.name={service}");
        wait_until(
            &format!("the containers of service {service} to go away"),
            timeout,
            || {
                let containers = self.docker(&["ps", "--all", "--quiet", "--filter", &label])?;
                Ok(containers.trim().is_empty().then_some(()))
            },
        )
    }

    fn service_ps_report(&self, service: &str) -> String {
        match self.docker(&["service", "ps", "--no-trunc", service]) {
            Ok(table) => format!("docker service ps {service}:\n{table}"),
            Err(error) => format!("(docker service ps failed: {error:#})"),
        }
    }
}

fn published_target_matches(port: &Value, target_port: u16) -> bool {
    port["TargetPort"].as_u64() == Some(u64::from(target_port))
        && port["Protocol"].as_str().unwrap_or("tcp") == "tcp"
        && port["PublishMode"] == "host"
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for dockerd in self.members.iter().chain(std::iter::once(&self.dockerd)) {
            if let Err(error) = dockerd.docker(&["swarm", "leave", "--force"]) {
                eprintln!("xlb-testbed: leaving the swarm: {error:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_host_mode_tcp_bindings_of_the_target_count() {
        let port = |json: &str| serde_json::from_str::<Value>(json).unwrap();
        let host_tcp = port(
            r#"{"Protocol":"tcp","TargetPort":8080,"PublishedPort":30001,"PublishMode":"host"}"#,
        );
        assert!(published_target_matches(&host_tcp, 8080));
        assert!(!published_target_matches(&host_tcp, 9090));
        let ingress = port(
            r#"{"Protocol":"tcp","TargetPort":8080,"PublishedPort":30001,"PublishMode":"ingress"}"#,
        );
        assert!(!published_target_matches(&ingress, 8080));
        let udp = port(
            r#"{"Protocol":"udp","TargetPort":8080,"PublishedPort":30001,"PublishMode":"host"}"#,
        );
        assert!(!published_target_matches(&udp, 8080));
    }
}
