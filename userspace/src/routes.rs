//! The route table: which endpoints serve which host, derived from one Swarm snapshot.
//!
//! [`route_table`] is a pure function so that every labelling mistake a user can make is
//! tested without Docker. A service that cannot be routed is disabled alone, with its reason
//! in [`RouteTable::rejected`]; every other service keeps routing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use bollard::models::{EndpointPortConfigPublishModeEnum, Node, Service, Task, TaskState};
use serde::Serialize;

use crate::swarm::SwarmSnapshot;

/// Comma-separated host names a service answers for (Interlock's label).
pub const LABEL_HOSTS: &str = "com.docker.lb.hosts";
/// The container port the service listens on (Interlock's label).
pub const LABEL_PORT: &str = "com.docker.lb.port";

/// Everything the proxy and the dataplane need to know, derived from one Swarm snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteTable {
    /// Lower-case host name (no port) → its route.
    pub routes: BTreeMap<String, Route>,
    /// Services that carry xlb/Interlock labels but cannot be routed, with the reason.
    pub rejected: Vec<RejectedService>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// The Swarm service's name.
    pub service: String,
    /// Node address + published port of each running task, sorted.
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedService {
    pub service: String,
    pub reason: String,
}

/// Builds the route table of every service labelled `com.docker.lb.hosts`.
///
/// Services are considered oldest first, so when two claim the same host the one that had it
/// first keeps it and the newcomer is rejected.
pub fn route_table(snapshot: &SwarmSnapshot) -> RouteTable {
    let node_addrs = node_addresses(&snapshot.nodes);
    let mut services: Vec<&Service> = snapshot
        .services
        .iter()
        .filter(|service| label(service, LABEL_HOSTS).is_some())
        .collect();
    services.sort_by_key(|service| (service.created_at.clone(), service_name(service)));

    let mut table = RouteTable::default();
    for service in services {
        let name = service_name(service);
        let tasks = snapshot
            .tasks
            .iter()
            .filter(|task| task.service_id == service.id);
        let routed = service_routes(service, tasks, &node_addrs)
            .and_then(|(hosts, endpoints)| claim_hosts(&table, &name, hosts, endpoints));
        match routed {
            Ok(routes) => table.routes.extend(routes),
            Err(reason) => {
                tracing::warn!(service = %name, %reason, "service not routed");
                table.rejected.push(RejectedService {
                    service: name,
                    reason,
                });
            }
        }
    }
    table.rejected.sort_by(|a, b| a.service.cmp(&b.service));
    table
}

/// The service's hosts and endpoints, or why it cannot be routed.
fn service_routes<'a>(
    service: &Service,
    tasks: impl Iterator<Item = &'a Task>,
    node_addrs: &HashMap<&str, IpAddr>,
) -> Result<(Vec<String>, Vec<SocketAddr>), String> {
    let hosts = parse_hosts(label(service, LABEL_HOSTS).unwrap_or_default())?;
    let port = match label(service, LABEL_PORT) {
        None => return Err(format!("label {LABEL_PORT} is missing")),
        Some(value) => parse_port(value)?,
    };

    let mut endpoints = BTreeSet::new();
    let mut running_without_port = 0;
    for task in tasks.filter(|task| is_running(task)) {
        let node = task.node_id.as_deref().and_then(|id| node_addrs.get(id));
        let published = host_published_ports(task, port);
        if published.is_empty() {
            running_without_port += 1;
        }
        if let Some(addr) = node {
            endpoints.extend(
                published
                    .into_iter()
                    .map(|published| SocketAddr::new(*addr, published)),
            );
        }
    }
    if endpoints.is_empty() && running_without_port > 0 {
        return Err(format!(
            "its running tasks publish no host-mode port for target port {port} \
             (create it with --publish mode=host,target={port})"
        ));
    }
    Ok((hosts, endpoints.into_iter().collect()))
}

/// The routes for `hosts`, unless an older service already serves one of them.
fn claim_hosts(
    table: &RouteTable,
    service: &str,
    hosts: Vec<String>,
    endpoints: Vec<SocketAddr>,
) -> Result<Vec<(String, Route)>, String> {
    if let Some((host, owner)) = hosts
        .iter()
        .find_map(|host| table.routes.get(host).map(|route| (host, &route.service)))
    {
        return Err(format!("host {host} is already served by service {owner}"));
    }
    Ok(hosts
        .into_iter()
        .map(|host| {
            let route = Route {
                service: service.to_owned(),
                endpoints: endpoints.clone(),
            };
            (host, route)
        })
        .collect())
}

fn parse_hosts(value: &str) -> Result<Vec<String>, String> {
    let mut hosts = BTreeSet::new();
    for host in value
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
    {
        let valid = host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            return Err(format!(
                "label {LABEL_HOSTS} holds an invalid host name {host:?}"
            ));
        }
        hosts.insert(host.to_ascii_lowercase());
    }
    if hosts.is_empty() {
        return Err(format!("label {LABEL_HOSTS} names no host"));
    }
    Ok(hosts.into_iter().collect())
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!(
            "label {LABEL_PORT} is {value:?}, not a port number (1-65535)"
        )),
    }
}

/// Running now and meant to keep running: a task Swarm is stopping gets no new requests.
pub(crate) fn is_running(task: &Task) -> bool {
    let state = task.status.as_ref().and_then(|status| status.state);
    state == Some(TaskState::RUNNING) && task.desired_state == Some(TaskState::RUNNING)
}

/// The host ports published for `target_port` in host mode. Docker lists each twice (IPv4 and
/// IPv6 binds): the caller's set dedupes them.
fn host_published_ports(task: &Task, target_port: u16) -> Vec<u16> {
    let ports = task
        .status
        .as_ref()
        .and_then(|status| status.port_status.as_ref())
        .and_then(|port_status| port_status.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .filter(|port| port.target_port == Some(i64::from(target_port)))
        .filter(|port| port.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST))
        .filter_map(|port| {
            port.published_port
                .and_then(|published| u16::try_from(published).ok())
        })
        .filter(|published| *published > 0)
        .collect()
}

/// Node id → the address its tasks are reached on.
///
/// A manager can report `0.0.0.0` as `Status.Addr`; its manager address is the real one then.
pub(crate) fn node_addresses(nodes: &[Node]) -> HashMap<&str, IpAddr> {
    nodes
        .iter()
        .filter_map(|node| {
            let id = node.id.as_deref()?;
            let status_addr = node
                .status
                .as_ref()
                .and_then(|status| status.addr.as_deref())
                .and_then(|addr| addr.parse::<IpAddr>().ok())
                .filter(|addr| !addr.is_unspecified());
            let manager_addr = || {
                let addr = node.manager_status.as_ref()?.addr.as_deref()?;
                addr.parse::<SocketAddr>().ok().map(|addr| addr.ip())
            };
            Some((id, status_addr.or_else(manager_addr)?))
        })
        .collect()
}

pub(crate) fn label<'a>(service: &'a Service, key: &str) -> Option<&'a str> {
    let labels = service.spec.as_ref()?.labels.as_ref()?;
    labels.get(key).map(String::as_str)
}

pub(crate) fn service_name(service: &Service) -> String {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.name.clone())
        .or_else(|| service.id.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use bollard::models::{
        EndpointPortConfig, ManagerStatus, NodeStatus, PortStatus, ServiceSpec, TaskStatus,
    };

    use super::*;

    fn service(id: &str, created: &str, labels: &[(&str, &str)]) -> Service {
        Service {
            id: Some(id.to_owned()),
            created_at: Some(created.to_owned()),
            spec: Some(ServiceSpec {
                name: Some(id.to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn node(id: &str, addr: &str) -> Node {
        Node {
            id: Some(id.to_owned()),
            status: Some(NodeStatus {
                addr: Some(addr.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn port(
        target: i64,
        published: i64,
        mode: EndpointPortConfigPublishModeEnum,
    ) -> EndpointPortConfig {
        EndpointPortConfig {
            target_port: Some(target),
            published_port: Some(published),
            publish_mode: Some(mode),
            ..Default::default()
        }
    }

    /// A task as Docker reports it: each host-mode port twice (IPv4 and IPv6 binds).
    fn task(service: &str, node: &str, state: TaskState, published: i64) -> Task {
        let host = EndpointPortConfigPublishModeEnum::HOST;
        Task {
            service_id: Some(service.to_owned()),
            node_id: Some(node.to_owned()),
            desired_state: Some(TaskState::RUNNING),
            status: Some(TaskStatus {
                state: Some(state),
                port_status: Some(PortStatus {
                    ports: Some(vec![
                        port(8080, published, host),
                        port(8080, published, host),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn demo_labels() -> [(&'static str, &'static str); 2] {
        [(LABEL_HOSTS, "demo.local"), (LABEL_PORT, "8080")]
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn seed_service_routes_to_node_address_and_published_port() {
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![task("demo", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "172.20.0.4")],
        };
        let table = route_table(&snapshot);
        assert_eq!(table.rejected, vec![]);
        assert_eq!(
            table.routes["demo.local"],
            Route {
                service: "demo".into(),
                endpoints: vec![addr("172.20.0.4:32768")]
            }
        );
    }

    #[test]
    fn duplicate_v4_v6_port_entries_become_one_endpoint_and_endpoints_are_sorted() {
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![
                task("demo", "n2", TaskState::RUNNING, 32769),
                task("demo", "n1", TaskState::RUNNING, 32768),
                task("demo", "n1", TaskState::RUNNING, 32770),
            ],
            nodes: vec![node("n1", "10.0.0.1"), node("n2", "10.0.0.2")],
        };
        let endpoints = &route_table(&snapshot).routes["demo.local"].endpoints;
        assert_eq!(
            endpoints,
            &[
                addr("10.0.0.1:32768"),
                addr("10.0.0.1:32770"),
                addr("10.0.0.2:32769")
            ]
        );
    }

    #[test]
    fn only_running_tasks_that_stay_running_are_endpoints() {
        let mut stopping = task("demo", "n1", TaskState::RUNNING, 32771);
        stopping.desired_state = Some(TaskState::SHUTDOWN);
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![
                task("demo", "n1", TaskState::RUNNING, 32768),
                task("demo", "n1", TaskState::STARTING, 32769),
                task("demo", "n1", TaskState::FAILED, 32770),
                stopping,
            ],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        assert_eq!(
            route_table(&snapshot).routes["demo.local"].endpoints,
            vec![addr("10.0.0.1:32768")]
        );
    }

    #[test]
    fn a_service_without_running_tasks_keeps_its_hosts_with_no_endpoints() {
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![task("demo", "n1", TaskState::PENDING, 0)],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = route_table(&snapshot);
        assert_eq!(table.routes["demo.local"].endpoints, vec![]);
        assert_eq!(table.rejected, vec![]);
    }

    #[test]
    fn several_hosts_share_the_service_endpoints_case_and_spaces_ignored() {
        let snapshot = SwarmSnapshot {
            services: vec![service(
                "web",
                "1",
                &[
                    (LABEL_HOSTS, " App.Example.org, www.example.org ,"),
                    (LABEL_PORT, "8080"),
                ],
            )],
            tasks: vec![task("web", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = route_table(&snapshot);
        assert_eq!(
            table.routes.keys().collect::<Vec<_>>(),
            ["app.example.org", "www.example.org"]
        );
        assert_eq!(
            table.routes["www.example.org"].endpoints,
            vec![addr("10.0.0.1:32768")]
        );
    }

    #[test]
    fn bad_labels_disable_only_their_service_with_a_reason() {
        let snapshot = SwarmSnapshot {
            services: vec![
                service("good", "1", &demo_labels()),
                service("no-port", "2", &[(LABEL_HOSTS, "a.local")]),
                service(
                    "bad-port",
                    "3",
                    &[(LABEL_HOSTS, "b.local"), (LABEL_PORT, "http")],
                ),
                service(
                    "zero-port",
                    "4",
                    &[(LABEL_HOSTS, "c.local"), (LABEL_PORT, "0")],
                ),
                service(
                    "no-host",
                    "5",
                    &[(LABEL_HOSTS, " , "), (LABEL_PORT, "8080")],
                ),
                service(
                    "bad-host",
                    "6",
                    &[(LABEL_HOSTS, "d.local/x"), (LABEL_PORT, "8080")],
                ),
                service("unlabelled", "7", &[]),
            ],
            tasks: vec![task("good", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = route_table(&snapshot);
        assert_eq!(table.routes.keys().collect::<Vec<_>>(), ["demo.local"]);
        let reasons: BTreeMap<&str, &str> = table
            .rejected
            .iter()
            .map(|r| (r.service.as_str(), r.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert_eq!(reasons["no-port"], "label com.docker.lb.port is missing");
        assert_eq!(
            reasons["bad-port"],
            "label com.docker.lb.port is \"http\", not a port number (1-65535)"
        );
        assert!(reasons["zero-port"].contains("not a port number"));
        assert_eq!(
            reasons["no-host"],
            "label com.docker.lb.hosts names no host"
        );
        assert!(reasons["bad-host"].contains("invalid host name \"d.local/x\""));
    }

    #[test]
    fn ingress_published_service_is_rejected_with_the_fix() {
        let mut ingress = task("demo", "n1", TaskState::RUNNING, 30000);
        let ports = &mut ingress
            .status
            .as_mut()
            .unwrap()
            .port_status
            .as_mut()
            .unwrap()
            .ports;
        *ports = Some(vec![port(
            8080,
            30000,
            EndpointPortConfigPublishModeEnum::INGRESS,
        )]);
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![ingress],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = route_table(&snapshot);
        assert!(table.routes.is_empty());
        assert!(table.rejected[0]
            .reason
            .contains("--publish mode=host,target=8080"));
    }

    #[test]
    fn the_older_service_keeps_a_contested_host() {
        let snapshot = SwarmSnapshot {
            services: vec![
                service("newer", "2026-02-01T00:00:00Z", &demo_labels()),
                service("older", "2026-01-01T00:00:00Z", &demo_labels()),
            ],
            tasks: vec![],
            nodes: vec![],
        };
        let table = route_table(&snapshot);
        assert_eq!(table.routes["demo.local"].service, "older");
        assert_eq!(table.rejected[0].service, "newer");
        assert_eq!(
            table.rejected[0].reason,
            "host demo.local is already served by service older"
        );
    }

    #[test]
    fn a_manager_reporting_0_0_0_0_is_reached_on_its_manager_address() {
        let mut manager = node("m1", "0.0.0.0");
        manager.manager_status = Some(ManagerStatus {
            addr: Some("10.0.0.9:2377".into()),
            ..Default::default()
        });
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![task("demo", "m1", TaskState::RUNNING, 32768)],
            nodes: vec![manager],
        };
        assert_eq!(
            route_table(&snapshot).routes["demo.local"].endpoints,
            vec![addr("10.0.0.9:32768")]
        );
    }
}
