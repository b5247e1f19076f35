//! What the maps should hold, from the L4 route table, this node's LB addresses and the next
//! hops resolved so far. Pure: an endpoint without a usable next hop is left out of its
//! service's ring (it gets no flows, so no first packet waits for ARP), with the reason.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
};

use super::{
    maps::{BackendPlan, ServicePlan},
    neighbours::Resolution,
    service::L4RouteTable,
};

/// The plan for the map writer, and the endpoints it leaves out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub services: Vec<ServicePlan>,
    /// Endpoints that get no flows yet, with why.
    pub left_out: BTreeMap<SocketAddr, String>,
}

/// The IPv4 backend addresses whose next hops the plan needs.
pub fn backend_addresses(table: &L4RouteTable) -> Vec<Ipv4Addr> {
    let mut addresses: Vec<Ipv4Addr> = table
        .listeners
        .iter()
        .flat_map(|route| &route.endpoints)
        .filter_map(|endpoint| match endpoint {
            SocketAddr::V4(v4) => Some(*v4.ip()),
            SocketAddr::V6(_) => None,
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

pub fn plan(
    table: &L4RouteTable,
    lb_addresses: &[Ipv4Addr],
    resolutions: &BTreeMap<Ipv4Addr, Resolution>,
) -> Plan {
    let mut plan = Plan::default();
    for route in &table.listeners {
        let mut backends = Vec::new();
        for endpoint in &route.endpoints {
            let SocketAddr::V4(endpoint_v4) = endpoint else {
                plan.left_out.insert(
                    *endpoint,
                    "IPv6 endpoints are not steered by XDP (IPv4 NAT only)".to_owned(),
                );
                continue;
            };
            match resolutions.get(endpoint_v4.ip()) {
                Some(Resolution::Ready {
                    snat_addr,
                    next_hop,
                }) => backends.push(BackendPlan {
                    endpoint: *endpoint_v4,
                    snat_addr: *snat_addr,
                    next_hop: *next_hop,
                }),
                Some(Resolution::Unreachable(reason)) => {
                    plan.left_out.insert(*endpoint, reason.clone());
                }
                Some(Resolution::Pending) | None => {
                    plan.left_out
                        .insert(*endpoint, "its next hop is being resolved".to_owned());
                }
            }
        }
        plan.services.push(ServicePlan {
            listener: route.listener,
            addresses: lb_addresses.to_vec(),
            backends,
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use xlb_common::NextHop;

    use super::*;
    use crate::l4::service::{L4Route, Listener, Protocol};

    #[test]
    fn only_endpoints_with_a_next_hop_get_flows() {
        let endpoint = |text: &str| text.parse::<SocketAddr>().unwrap();
        let table = L4RouteTable {
            listeners: vec![L4Route {
                service: "db".into(),
                listener: Listener {
                    port: 5432,
                    protocol: Protocol::Tcp,
                },
                target_port: 5432,
                endpoints: vec![
                    endpoint("10.0.0.1:30001"),
                    endpoint("10.0.0.2:30001"),
                    endpoint("10.0.0.3:30001"),
                    endpoint("[fd00::4]:30001"),
                ],
            }],
            rejected: vec![],
        };
        assert_eq!(
            backend_addresses(&table),
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map(|a| a.parse::<Ipv4Addr>().unwrap())
        );
        let next_hop = NextHop {
            ifindex: 2,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
        };
        let snat_addr: Ipv4Addr = "10.0.0.254".parse().unwrap();
        let resolutions = BTreeMap::from([
            (
                "10.0.0.1".parse().unwrap(),
                Resolution::Ready {
                    snat_addr,
                    next_hop,
                },
            ),
            ("10.0.0.2".parse().unwrap(), Resolution::Pending),
            (
                "10.0.0.3".parse().unwrap(),
                Resolution::Unreachable("no route to 10.0.0.3".into()),
            ),
        ]);
        let lb: Ipv4Addr = "10.0.1.1".parse().unwrap();
        let plan = plan(&table, &[lb], &resolutions);
        assert_eq!(plan.services.len(), 1);
        assert_eq!(plan.services[0].addresses, [lb]);
        assert_eq!(
            plan.services[0].backends,
            [BackendPlan {
                endpoint: "10.0.0.1:30001".parse().unwrap(),
                snat_addr,
                next_hop
            }]
        );
        let reasons: Vec<(String, &str)> = plan
            .left_out
            .iter()
            .map(|(endpoint, reason)| (endpoint.to_string(), reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    "10.0.0.2:30001".to_owned(),
                    "its next hop is being resolved"
                ),
                ("10.0.0.3:30001".to_owned(), "no route to 10.0.0.3"),
                (
                    "[fd00::4]:30001".to_owned(),
                    "IPv6 endpoints are not steered by XDP (IPv4 NAT only)"
                ),
            ]
        );
    }
}
