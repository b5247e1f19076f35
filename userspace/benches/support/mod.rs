//! Shared by the benchmarks: a synthetic Swarm shaped as the Docker API returns it, and the
//! root check of the groups that load the XDP program.
//!
//! The snapshot is built from bollard's own models, so [`xlb::routes::route_table`] and
//! [`xlb::l4::service::l4_route_table`] read it exactly as they read a real engine's answer.

#![allow(dead_code)] // each bench target uses a different part

use std::collections::HashMap;

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, Node,
    NodeStatus, PortStatus, Service, ServiceSpec, Task, TaskState, TaskStatus,
};
use xlb::{
    l4::service::LABEL_L4_PORTS,
    routes::{LABEL_CONTEXT_ROOT, LABEL_HOSTS, LABEL_PORT},
    swarm::SwarmSnapshot,
};

/// The container port every L7 service listens on (`com.docker.lb.port`).
const L7_TARGET_PORT: u16 = 8080;
/// The container port every L4 service listens on.
const L4_TARGET_PORT: u16 = 5432;
/// L4 service `n` listens on this port + `n` on the LB: clear of the proxy's 80 and 443.
const L4_FIRST_LISTEN_PORT: u16 = 10_000;
/// The proxy's own ports, which no L4 service may claim.
pub const L7_PORTS: [u16; 2] = [80, 443];
/// Host ports are handed out from here on each node, one per task.
const FIRST_PUBLISHED_PORT: u32 = 10_000;

/// How big the synthetic Swarm is. Tasks are spread round-robin over the nodes.
#[derive(Debug, Clone, Copy)]
pub struct SwarmShape {
    /// Services labelled `com.docker.lb.hosts` and `com.docker.lb.port`.
    pub l7_services: usize,
    /// Services labelled `xlb.l4.ports`, created before the L7 ones.
    pub l4_services: usize,
    /// Running tasks of each service, every one publishing its port in host mode.
    pub tasks_per_service: usize,
    pub nodes: usize,
}

impl SwarmShape {
    fn services(&self) -> usize {
        self.l7_services + self.l4_services
    }

    fn tasks(&self) -> usize {
        self.services() * self.tasks_per_service
    }
}

/// The name of L7 service `index` (L7 services are counted apart from L4 ones).
pub fn l7_service_name(index: usize) -> String {
    format!("l7-service-{index}")
}

/// The host of L7 service `index` and the context root it serves it at.
///
/// Services come in groups of ten, as a multi-tenant Swarm has them: a wildcard for the group's
/// tenants with an `/api` service on the same wildcard, a `www` site with its `/static` assets
/// served by another service, and six services on a host of their own.
fn l7_service_hosts(index: usize) -> (String, &'static str) {
    let group = index / 10;
    match index % 10 {
        0 => (wildcard_host(group), "/"),
        1 => (wildcard_host(group), "/api"),
        2 => (format!("www-{group}.example.org"), "/"),
        3 => (format!("www-{group}.example.org"), "/static"),
        _ => (exact_host(index), "/"),
    }
}

/// The host of L7 service `index` when `index % 10` is 4 or more: a name of its own.
pub fn exact_host(index: usize) -> String {
    format!("svc-{index}.example.org")
}

/// The wildcard of group `group` (L7 services `10 × group` and `10 × group + 1`).
fn wildcard_host(group: usize) -> String {
    format!("*.tenants-{group}.example.org")
}

/// A Swarm of `shape`: L4 services first, then L7 services, each with its running tasks.
pub fn swarm_snapshot(shape: SwarmShape) -> SwarmSnapshot {
    let nodes: Vec<Node> = (0..shape.nodes).map(node).collect();
    let mut services = Vec::with_capacity(shape.services());
    let mut tasks = Vec::with_capacity(shape.tasks());
    for index in 0..shape.services() {
        let (name, labels, target_port) = match index.checked_sub(shape.l4_services) {
            None => (
                format!("l4-service-{index}"),
                l4_labels(index),
                L4_TARGET_PORT,
            ),
            Some(l7_index) => (
                l7_service_name(l7_index),
                l7_labels(l7_index),
                L7_TARGET_PORT,
            ),
        };
        let service = service(index, name, labels);
        for _ in 0..shape.tasks_per_service {
            let node_index = tasks.len() % shape.nodes;
            // Each task takes the next free host port on its node, as `mode=host` needs.
            let published = FIRST_PUBLISHED_PORT + (tasks.len() / shape.nodes) as u32;
            tasks.push(task(
                tasks.len(),
                &service,
                &nodes[node_index],
                target_port,
                published,
            ));
        }
        services.push(service);
    }
    SwarmSnapshot {
        services,
        tasks,
        nodes,
    }
}

fn l7_labels(index: usize) -> HashMap<String, String> {
    let (host, context_root) = l7_service_hosts(index);
    let mut labels = HashMap::from([
        (LABEL_HOSTS.to_owned(), host),
        (LABEL_PORT.to_owned(), L7_TARGET_PORT.to_string()),
    ]);
    if context_root != "/" {
        labels.insert(LABEL_CONTEXT_ROOT.to_owned(), context_root.to_owned());
    }
    labels
}

fn l4_labels(index: usize) -> HashMap<String, String> {
    let listen = L4_FIRST_LISTEN_PORT as usize + index;
    HashMap::from([(
        LABEL_L4_PORTS.to_owned(),
        format!("{listen}:{L4_TARGET_PORT}"),
    )])
}

fn service(index: usize, name: String, labels: HashMap<String, String>) -> Service {
    Service {
        id: Some(docker_id("service", index)),
        // The route tables take services oldest first: creation times in index order.
        created_at: Some(format!("2025-01-01T00:00:00.{index:09}Z")),
        spec: Some(ServiceSpec {
            name: Some(name),
            labels: Some(labels),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(index: usize) -> Node {
    Node {
        id: Some(docker_id("node", index)),
        status: Some(NodeStatus {
            addr: Some(format!("10.1.{}.{}", index / 250, index % 250 + 1)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn task(index: usize, service: &Service, node: &Node, target: u16, published: u32) -> Task {
    let port = EndpointPortConfig {
        protocol: Some(EndpointPortConfigProtocolEnum::TCP),
        target_port: Some(i64::from(target)),
        published_port: Some(i64::from(published)),
        publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
        ..Default::default()
    };
    Task {
        id: Some(docker_id("task", index)),
        service_id: service.id.clone(),
        node_id: node.id.clone(),
        desired_state: Some(TaskState::RUNNING),
        status: Some(TaskStatus {
            state: Some(TaskState::RUNNING),
            // Docker lists a host-mode port twice, for its IPv4 and its IPv6 bind.
            port_status: Some(PortStatus {
                ports: Some(vec![port.clone(), port]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A 25-character lower-case id like Swarm's, fixed for (`kind`, `index`): ids of the same
/// kind differ from their first characters on, as random ones do, so comparing them costs what
/// it costs on a real Swarm.
fn docker_id(kind: &str, index: usize) -> String {
    let mut hash = xxhash_rust::xxh3::xxh3_128(format!("{kind}-{index}").as_bytes());
    (0..25)
        .map(|_| {
            let digit = (hash % 36) as u32;
            hash /= 36;
            char::from_digit(digit, 36).expect("a base-36 digit")
        })
        .collect()
}

/// The XDP groups load the program into the kernel, which needs root (CAP_BPF and more).
/// Without it they are skipped with this message rather than failing the whole run.
pub fn can_load_xdp(group: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipping benchmark group {group}: loading the XDP program needs root");
    }
    root
}
