//! Plain Docker engines, not in Swarm mode: containers started with `docker run -p
//! HOST:CONTAINER --label com.docker.lb.hosts=...` are routed as Swarm services are, each one
//! a service of one task: the container's labels are the service's, its published ports the
//! task's host-mode ports, and the engine's address the node's. The route tables then treat
//! them exactly as services ([`crate::routes::route_table`] reads the snapshot this makes).

use std::net::IpAddr;

use bollard::models::{
    ContainerSummary, EndpointPortConfig, EndpointPortConfigProtocolEnum,
    EndpointPortConfigPublishModeEnum, Node, NodeStatus, PortStatus, PortSummaryTypeEnum, Service,
    ServiceSpec, Task, TaskState, TaskStatus,
};

use crate::swarm::SwarmSnapshot;

/// The one node of a plain engine.
const ENGINE_NODE: &str = "engine";

/// The snapshot of a plain engine whose running containers are `containers` and whose
/// published ports are reached on `engine_addr` (a port published on one address only is
/// reached on that one).
pub fn snapshot_of_containers(
    containers: &[ContainerSummary],
    engine_addr: IpAddr,
) -> SwarmSnapshot {
    let mut snapshot = SwarmSnapshot {
        nodes: vec![Node {
            id: Some(ENGINE_NODE.to_owned()),
            status: Some(NodeStatus {
                addr: Some(engine_addr.to_string()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..SwarmSnapshot::default()
    };
    for container in containers {
        let Some(id) = container.id.clone() else {
            continue;
        };
        let name = container
            .names
            .iter()
            .flatten()
            .next()
            .map_or(id.as_str(), |name| name.trim_start_matches('/'))
            .to_owned();
        snapshot.services.push(Service {
            id: Some(id.clone()),
            created_at: container.created.map(|created| created.to_string()),
            spec: Some(ServiceSpec {
                name: Some(name),
                labels: container.labels.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
        let ports = container
            .ports
            .iter()
            .flatten()
            .filter(|port| reached_on(port.ip.as_deref(), engine_addr))
            .filter_map(|port| {
                Some(EndpointPortConfig {
                    target_port: Some(i64::from(port.private_port)),
                    published_port: Some(i64::from(port.public_port?)),
                    publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                    protocol: Some(match port.typ {
                        Some(PortSummaryTypeEnum::UDP) => EndpointPortConfigProtocolEnum::UDP,
                        Some(PortSummaryTypeEnum::SCTP) => EndpointPortConfigProtocolEnum::SCTP,
                        _ => EndpointPortConfigProtocolEnum::TCP,
                    }),
                    ..Default::default()
                })
            })
            .collect();
        snapshot.tasks.push(Task {
            service_id: Some(id),
            node_id: Some(ENGINE_NODE.to_owned()),
            desired_state: Some(TaskState::RUNNING),
            status: Some(TaskStatus {
                state: Some(TaskState::RUNNING),
                port_status: Some(PortStatus { ports: Some(ports) }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    snapshot
}

/// Whether a port bound on `bound` (none, `0.0.0.0` or `::`: every address) is reached on
/// `engine_addr`.
fn reached_on(bound: Option<&str>, engine_addr: IpAddr) -> bool {
    match bound.and_then(|bound| bound.parse::<IpAddr>().ok()) {
        None => true,
        Some(bound) if bound.is_unspecified() => true,
        Some(bound) => bound == engine_addr,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bollard::models::PortSummary;

    use super::*;
    use crate::routes::{route_table, RouteSettings};

    fn container(
        name: &str,
        labels: &[(&str, &str)],
        ports: &[(&str, u16, u16)],
    ) -> ContainerSummary {
        ContainerSummary {
            id: Some(format!("id-{name}")),
            names: Some(vec![format!("/{name}")]),
            created: Some(1_700_000_000),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|&(ip, private, public)| PortSummary {
                        ip: Some(ip.to_owned()),
                        private_port: private,
                        public_port: Some(public),
                        typ: Some(PortSummaryTypeEnum::TCP),
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn a_labelled_container_routes_to_the_engine_address_and_its_published_port() {
        let engine: IpAddr = "10.0.0.5".parse().unwrap();
        let containers = [
            container(
                "web",
                &[
                    ("com.docker.lb.hosts", "web.local"),
                    ("com.docker.lb.port", "80"),
                ],
                // Docker lists a port published on every address once per family.
                &[("0.0.0.0", 80, 8080), ("::", 80, 8080)],
            ),
            container("unlabelled", &[], &[("0.0.0.0", 80, 8081)]),
            container(
                "elsewhere",
                &[
                    ("com.docker.lb.hosts", "other.local"),
                    ("com.docker.lb.port", "80"),
                ],
                // Published on another address only: not reached on the engine's.
                &[("192.168.1.9", 80, 8082)],
            ),
        ];
        let snapshot = snapshot_of_containers(&containers, engine);
        let table = route_table(&snapshot, &RouteSettings::default());
        let web = &table.routes["web.local"][0];
        assert_eq!(web.service, "web");
        assert_eq!(web.endpoints, vec!["10.0.0.5:8080".parse().unwrap()]);
        assert_eq!(table.routes.len(), 1, "{table:?}");
    }
}
