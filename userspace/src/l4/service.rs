//! L4 services from Swarm: the `xlb.l4.ports` label and the L4 part of the route table.
//!
//! [`l4_route_table`] is pure, like [`crate::routes::route_table`], and reads the same snapshot:
//! each claimed listener's endpoints are the node `Status.Addr` + host-mode `PublishedPort` of
//! the claim's target port and protocol on every running task. A service whose label is
//! malformed, or which claims a listener an older service or the L7 proxy holds, loses its
//! whole claim, with the reason (logged by the daemon when it appears); every other service
//! keeps its listeners.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, SocketAddr},
};

use bollard::models::{
    EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum, Service, Task,
};
use serde::{Deserialize, Serialize};

use crate::{
    routes::{is_running, label, node_addresses, service_name, RejectedService},
    swarm::SwarmSnapshot,
};

/// Comma-separated `LISTEN[:TARGET][/tcp|/udp]`: which LB ports lead to which container ports.
pub const LABEL_L4_PORTS: &str = "xlb.l4.ports";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => xlb_common::IPPROTO_TCP,
            Protocol::Udp => xlb_common::IPPROTO_UDP,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What clients address on the LB: a port and protocol (on every LB address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Listener {
    pub port: u16,
    pub protocol: Protocol,
}

impl Listener {
    /// Its port and IP protocol number.
    pub fn port_proto(&self) -> (u16, u8) {
        (self.port, self.protocol.number())
    }
}

impl Listener {
    /// `PORT[/tcp|/udp]`, TCP by default: how the config writes a port the shield leaves open.
    pub fn parse(text: &str) -> Option<Listener> {
        let (port, protocol) = match text.split_once('/') {
            None => (text, Protocol::Tcp),
            Some((port, "tcp")) => (port, Protocol::Tcp),
            Some((port, "udp")) => (port, Protocol::Udp),
            Some(_) => return None,
        };
        let digits = !port.is_empty() && port.bytes().all(|byte| byte.is_ascii_digit());
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|port| digits && *port > 0)?;
        Some(Listener { port, protocol })
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol.name())
    }
}

/// One item of the label: LB `listener` → container port `target` of the same protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortClaim {
    pub listener: Listener,
    pub target: u16,
}

/// A listener and where its flows go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4Route {
    pub service: String,
    pub listener: Listener,
    pub target_port: u16,
    /// Node address + published port of each running task, sorted.
    pub endpoints: Vec<SocketAddr>,
}

/// The L4 part of the route table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct L4RouteTable {
    /// Sorted by listener.
    pub listeners: Vec<L4Route>,
    /// Services whose `xlb.l4.ports` claim was refused, with the reason.
    pub rejected: Vec<RejectedService>,
}

/// Parses the label's value; the first bad item is the error.
pub fn parse_l4_ports(value: &str) -> Result<Vec<PortClaim>, String> {
    let mut claims: Vec<PortClaim> = Vec::new();
    for item in value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        let claim = parse_claim(item).ok_or_else(|| {
            format!(
                "label {LABEL_L4_PORTS} holds {item:?}, not LISTEN[:TARGET][/tcp|/udp] \
                 with ports 1-65535"
            )
        })?;
        if claims.iter().any(|other| other.listener == claim.listener) {
            return Err(format!(
                "label {LABEL_L4_PORTS} claims {} twice",
                claim.listener
            ));
        }
        claims.push(claim);
    }
    if claims.is_empty() {
        return Err(format!("label {LABEL_L4_PORTS} names no port"));
    }
    Ok(claims)
}

fn parse_claim(item: &str) -> Option<PortClaim> {
    let (ports, protocol) = match item.split_once('/') {
        None => (item, Protocol::Tcp),
        Some((ports, "tcp")) => (ports, Protocol::Tcp),
        Some((ports, "udp")) => (ports, Protocol::Udp),
        Some(_) => return None,
    };
    let (listen, target) = match ports.split_once(':') {
        None => (ports, ports),
        Some((listen, target)) => (listen, target),
    };
    let port = |text: &str| {
        let valid = !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit());
        text.parse::<u16>().ok().filter(|port| valid && *port > 0)
    };
    Some(PortClaim {
        listener: Listener {
            port: port(listen)?,
            protocol,
        },
        target: port(target)?,
    })
}

/// The listeners of every service labelled `xlb.l4.ports`, oldest service first, none on
/// `l7_ports` (where the L7 proxy listens).
pub fn l4_route_table(snapshot: &SwarmSnapshot, l7_ports: &[u16]) -> L4RouteTable {
    let node_addrs = node_addresses(&snapshot.nodes);
    let tasks_by_service = snapshot.tasks_by_service();
    let mut services: Vec<&Service> = snapshot
        .services
        .iter()
        .filter(|service| label(service, LABEL_L4_PORTS).is_some())
        .collect();
    services.sort_by_key(|service| (service.created_at.clone(), service_name(service)));

    let mut listeners: BTreeMap<Listener, L4Route> = BTreeMap::new();
    let mut rejected = Vec::new();
    for service in services {
        let name = service_name(service);
        let tasks: Vec<&Task> = tasks_by_service
            .of(service)
            .iter()
            .copied()
            .filter(|task| is_running(task))
            .collect();
        let routes = parse_l4_ports(label(service, LABEL_L4_PORTS).unwrap_or_default())
            .and_then(|claims| check_free(&claims, &listeners, l7_ports).map(|()| claims))
            .and_then(|claims| {
                claims
                    .iter()
                    .map(|claim| route(&name, claim, &tasks, &node_addrs))
                    .collect::<Result<Vec<_>, _>>()
            });
        match routes {
            Ok(routes) => {
                listeners.extend(routes.into_iter().map(|route| (route.listener, route)));
            }
            Err(reason) => {
                rejected.push(RejectedService {
                    service: name,
                    reason,
                });
            }
        }
    }
    rejected.sort_by(|a, b| a.service.cmp(&b.service));
    L4RouteTable {
        listeners: listeners.into_values().collect(),
        rejected,
    }
}

fn check_free(
    claims: &[PortClaim],
    taken: &BTreeMap<Listener, L4Route>,
    l7_ports: &[u16],
) -> Result<(), String> {
    for claim in claims {
        if l7_ports.contains(&claim.listener.port) {
            return Err(format!(
                "label {LABEL_L4_PORTS} claims port {}, where the L7 proxy listens",
                claim.listener.port
            ));
        }
        if let Some(owner) = taken.get(&claim.listener) {
            return Err(format!(
                "L4 port {} is already claimed by service {}",
                claim.listener, owner.service
            ));
        }
    }
    Ok(())
}

fn route(
    service: &str,
    claim: &PortClaim,
    tasks: &[&Task],
    node_addrs: &HashMap<&str, IpAddr>,
) -> Result<L4Route, String> {
    let mut endpoints = BTreeSet::new();
    let mut running_without_port = 0;
    for task in tasks {
        let published = host_published_ports(task, claim.target, claim.listener.protocol);
        if published.is_empty() {
            running_without_port += 1;
        }
        if let Some(addr) = task.node_id.as_deref().and_then(|id| node_addrs.get(id)) {
            endpoints.extend(
                published
                    .into_iter()
                    .map(|port| SocketAddr::new(*addr, port)),
            );
        }
    }
    if endpoints.is_empty() && running_without_port > 0 {
        let protocol = claim.listener.protocol.name();
        let target = claim.target;
        return Err(format!(
            "its running tasks publish no host-mode {protocol} port for target port {target} \
             (create it with --publish mode=host,target={target},protocol={protocol})"
        ));
    }
    Ok(L4Route {
        service: service.to_owned(),
        listener: claim.listener,
        target_port: claim.target,
        endpoints: endpoints.into_iter().collect(),
    })
}

/// The host ports a task publishes for `target` over `protocol` (Docker omits the protocol
/// for TCP in some versions).
fn host_published_ports(task: &Task, target: u16, protocol: Protocol) -> Vec<u16> {
    let ports = task
        .status
        .as_ref()
        .and_then(|status| status.port_status.as_ref())
        .and_then(|port_status| port_status.ports.as_ref());
    let wanted = match protocol {
        Protocol::Tcp => EndpointPortConfigProtocolEnum::TCP,
        Protocol::Udp => EndpointPortConfigProtocolEnum::UDP,
    };
    ports
        .into_iter()
        .flatten()
        .filter(|port| port.target_port == Some(i64::from(target)))
        .filter(|port| port.protocol.unwrap_or(EndpointPortConfigProtocolEnum::TCP) == wanted)
        .filter(|port| port.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST))
        .filter_map(|port| port.published_port.and_then(|p| u16::try_from(p).ok()))
        .filter(|published| *published > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use bollard::models::{EndpointPortConfig, PortStatus, TaskState, TaskStatus};

    use super::*;
    use crate::swarm::fixtures::{node, service};

    fn claim(listen: u16, target: u16, protocol: Protocol) -> PortClaim {
        PortClaim {
            listener: Listener {
                port: listen,
                protocol,
            },
            target,
        }
    }

    #[test]
    fn open_ports_parse_as_the_label_writes_them() {
        let udp = Listener {
            port: 7946,
            protocol: Protocol::Udp,
        };
        assert_eq!(Listener::parse("7946/udp"), Some(udp));
        assert_eq!(Listener::parse("22").unwrap().protocol, Protocol::Tcp);
        for bad in ["", "0", "22/sctp", "+22", "70000", "22/"] {
            assert_eq!(Listener::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn label_values_parse_with_defaults() {
        assert_eq!(
            parse_l4_ports("5432"),
            Ok(vec![claim(5432, 5432, Protocol::Tcp)])
        );
        assert_eq!(
            parse_l4_ports(" 8443:443/tcp , 53/udp,"),
            Ok(vec![
                claim(8443, 443, Protocol::Tcp),
                claim(53, 53, Protocol::Udp)
            ])
        );
        assert_eq!(
            parse_l4_ports("53/tcp,53/udp"),
            Ok(vec![
                claim(53, 53, Protocol::Tcp),
                claim(53, 53, Protocol::Udp)
            ])
        );
    }

    #[test]
    fn malformed_label_values_are_refused_precisely() {
        for bad in [
            "0",
            "65536",
            "-1",
            "+53",
            "http",
            "53/sctp",
            "53/TCP",
            "53:",
            ":53",
            "1:2:3",
            "53/udp/tcp",
            "5 3",
            "53:0/udp",
        ] {
            let error = parse_l4_ports(bad).unwrap_err();
            assert!(
                error.contains("not LISTEN[:TARGET][/tcp|/udp]"),
                "{bad:?}: {error}"
            );
            assert!(
                error.contains(&format!("{:?}", bad.trim())),
                "{bad:?}: {error}"
            );
        }
        assert_eq!(
            parse_l4_ports(" , "),
            Err("label xlb.l4.ports names no port".into())
        );
        assert_eq!(
            parse_l4_ports("53,53:54"),
            Err("label xlb.l4.ports claims 53/tcp twice".into())
        );
    }

    /// A running task publishing (target, published, protocol) in host mode, each twice as
    /// Docker lists them (IPv4 and IPv6 binds).
    fn task(
        service: &str,
        node: &str,
        ports: &[(i64, i64, EndpointPortConfigProtocolEnum)],
    ) -> Task {
        let ports = ports
            .iter()
            .flat_map(|(target, published, protocol)| {
                let port = EndpointPortConfig {
                    target_port: Some(*target),
                    published_port: Some(*published),
                    protocol: Some(*protocol),
                    publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                    ..Default::default()
                };
                [port.clone(), port]
            })
            .collect();
        Task {
            service_id: Some(service.to_owned()),
            node_id: Some(node.to_owned()),
            desired_state: Some(TaskState::RUNNING),
            status: Some(TaskStatus {
                state: Some(TaskState::RUNNING),
                port_status: Some(PortStatus { ports: Some(ports) }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const TCP: EndpointPortConfigProtocolEnum = EndpointPortConfigProtocolEnum::TCP;
    const UDP: EndpointPortConfigProtocolEnum = EndpointPortConfigProtocolEnum::UDP;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn endpoints_are_node_address_and_published_port_of_the_claims_protocol() {
        let snapshot = SwarmSnapshot {
            services: vec![service("dns", "1", &[(LABEL_L4_PORTS, "8443:443,53/udp")])],
            tasks: vec![
                task(
                    "dns",
                    "n1",
                    &[(443, 30443, TCP), (53, 30053, UDP), (53, 31053, TCP)],
                ),
                task("dns", "n2", &[(443, 30443, TCP), (53, 30053, UDP)]),
            ],
            nodes: vec![node("n1", "10.0.0.1"), node("n2", "10.0.0.2")],
        };
        let table = l4_route_table(&snapshot, &[80]);
        assert_eq!(table.rejected, vec![]);
        assert_eq!(
            table.listeners,
            vec![
                L4Route {
                    service: "dns".into(),
                    listener: Listener {
                        port: 53,
                        protocol: Protocol::Udp
                    },
                    target_port: 53,
                    endpoints: vec![addr("10.0.0.1:30053"), addr("10.0.0.2:30053")],
                },
                L4Route {
                    service: "dns".into(),
                    listener: Listener {
                        port: 8443,
                        protocol: Protocol::Tcp
                    },
                    target_port: 443,
                    endpoints: vec![addr("10.0.0.1:30443"), addr("10.0.0.2:30443")],
                },
            ]
        );
    }

    #[test]
    fn conflicting_and_malformed_claims_reject_only_their_service() {
        let snapshot = SwarmSnapshot {
            services: vec![
                service("newer", "2026-02-01", &[(LABEL_L4_PORTS, "6000,5432")]),
                service("older", "2026-01-01", &[(LABEL_L4_PORTS, "5432")]),
                service("web", "2026-01-02", &[(LABEL_L4_PORTS, "443")]),
                service("bad", "2026-01-03", &[(LABEL_L4_PORTS, "53/icmp")]),
                service("unpublished", "2026-01-04", &[(LABEL_L4_PORTS, "7000")]),
                service("udp-twin", "2026-03-01", &[(LABEL_L4_PORTS, "5432/udp")]),
            ],
            tasks: vec![
                task("older", "n1", &[(5432, 30001, TCP)]),
                task("unpublished", "n1", &[(7001, 30002, TCP)]),
            ],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = l4_route_table(&snapshot, &[80, 443]);
        let owners: Vec<(String, &str)> = table
            .listeners
            .iter()
            .map(|route| (route.listener.to_string(), route.service.as_str()))
            .collect();
        assert_eq!(
            owners,
            [
                ("5432/tcp".to_owned(), "older"),
                ("5432/udp".to_owned(), "udp-twin")
            ]
        );
        let reasons: BTreeMap<&str, &str> = table
            .rejected
            .iter()
            .map(|rejected| (rejected.service.as_str(), rejected.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert_eq!(
            reasons["newer"],
            "L4 port 5432/tcp is already claimed by service older"
        );
        assert_eq!(
            reasons["web"],
            "label xlb.l4.ports claims port 443, where the L7 proxy listens"
        );
        assert!(reasons["bad"].contains("\"53/icmp\""));
        assert!(reasons["unpublished"].contains("--publish mode=host,target=7000,protocol=tcp"));
    }

    #[test]
    fn a_service_without_running_tasks_keeps_its_listener_without_endpoints() {
        let snapshot = SwarmSnapshot {
            services: vec![service("db", "1", &[(LABEL_L4_PORTS, "5432")])],
            tasks: vec![],
            nodes: vec![],
        };
        let table = l4_route_table(&snapshot, &[]);
        assert_eq!(table.listeners.len(), 1);
        assert!(table.listeners[0].endpoints.is_empty());
    }
}
