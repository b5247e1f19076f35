//! What the maps should hold, from the L4 route table, this node's LB addresses and the next
//! hops resolved so far. Pure: an endpoint without a usable next hop is left out of its
//! service's ring (it gets no flows, so no first packet waits for ARP), with the reason.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use super::{
    maps::{BackendPlan, IpFamily, ServicePlan},
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

/// The backend addresses whose next hops the plan needs.
pub fn backend_addresses(table: &L4RouteTable) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = table
        .listeners
        .iter()
        .flat_map(|route| &route.endpoints)
        .map(SocketAddr::ip)
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Each route in each family the node has LB addresses of, when the route has endpoints of
/// that family, or none at all (its clients are then refused in XDP, `l4_drop_no_backend`,
/// until it has). A family a service has no endpoints in is not steered: its packets go to
/// the kernel, which refuses them (there is no NAT between the families).
pub fn plan(
    table: &L4RouteTable,
    lb_addresses: &[IpAddr],
    resolutions: &BTreeMap<IpAddr, Resolution>,
) -> Plan {
    let mut plan = Plan::default();
    for route in &table.listeners {
        for family in [IpFamily::V4, IpFamily::V6] {
            let addresses: Vec<IpAddr> = lb_addresses
                .iter()
                .copied()
                .filter(|addr| IpFamily::of(*addr) == family)
                .collect();
            let endpoints: Vec<SocketAddr> = route
                .endpoints
                .iter()
                .copied()
                .filter(|endpoint| IpFamily::of(endpoint.ip()) == family)
                .collect();
            if endpoints.is_empty() && !route.endpoints.is_empty() {
                continue;
            }
            if addresses.is_empty() {
                for endpoint in endpoints {
                    let reason = format!(
                        "this node has no {} address to answer on ([L4] Addresses)",
                        family_name(family)
                    );
                    plan.left_out.insert(endpoint, reason);
                }
                continue;
            }
            let mut backends = Vec::new();
            for endpoint in endpoints {
                match resolutions.get(&endpoint.ip()) {
                    Some(Resolution::Ready {
                        snat_addr,
                        next_hop,
                    }) => backends.push(BackendPlan {
                        endpoint,
                        snat_addr: *snat_addr,
                        next_hop: *next_hop,
                    }),
                    Some(Resolution::Unreachable(reason)) => {
                        plan.left_out.insert(endpoint, reason.clone());
                    }
                    Some(Resolution::Pending) | None => {
                        plan.left_out
                            .insert(endpoint, "its next hop is being resolved".to_owned());
                    }
                }
            }
            plan.services.push(ServicePlan {
                listener: route.listener,
                family,
                addresses,
                backends,
            });
        }
    }
    plan
}

fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

#[cfg(test)]
mod tests {
    use xlb_common::NextHop;

    use super::*;
    use crate::l4::service::{L4Route, Listener, Protocol};

    const NEXT_HOP: NextHop = NextHop {
        ifindex: 2,
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
    };

    fn endpoint(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn addr(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn table(endpoints: &[&str]) -> L4RouteTable {
        L4RouteTable {
            listeners: vec![L4Route {
                service: "db".into(),
                listener: Listener {
                    port: 5432,
                    protocol: Protocol::Tcp,
                },
                target_port: 5432,
                endpoints: endpoints.iter().map(|text| endpoint(text)).collect(),
            }],
            rejected: vec![],
        }
    }

    fn ready(snat_addr: &str) -> Resolution {
        Resolution::Ready {
            snat_addr: addr(snat_addr),
            next_hop: NEXT_HOP,
        }
    }

    #[test]
    fn only_endpoints_with_a_next_hop_get_flows() {
        let table = table(&[
            "10.0.0.1:30001",
            "10.0.0.2:30001",
            "10.0.0.3:30001",
            "[fd00::4]:30001",
        ]);
        assert_eq!(
            backend_addresses(&table),
            ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::4"].map(addr)
        );
        let resolutions = BTreeMap::from([
            (addr("10.0.0.1"), ready("10.0.0.254")),
            (addr("10.0.0.2"), Resolution::Pending),
            (
                addr("10.0.0.3"),
                Resolution::Unreachable("no route to 10.0.0.3".into()),
            ),
        ]);
        let lb = addr("10.0.1.1");
        let plan = plan(&table, &[lb], &resolutions);
        assert_eq!(plan.services.len(), 1, "no IPv6 LB address: IPv4 only");
        assert_eq!(plan.services[0].family, IpFamily::V4);
        assert_eq!(plan.services[0].addresses, [lb]);
        assert_eq!(
            plan.services[0].backends,
            [BackendPlan {
                endpoint: endpoint("10.0.0.1:30001"),
                snat_addr: addr("10.0.0.254"),
                next_hop: NEXT_HOP,
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
                    "this node has no IPv6 address to answer on ([L4] Addresses)"
                ),
            ]
        );
    }

    #[test]
    fn each_family_is_steered_with_its_own_addresses_and_backends() {
        let table = table(&["10.0.0.1:30001", "[fd00::4]:30001"]);
        let resolutions = BTreeMap::from([
            (addr("10.0.0.1"), ready("10.0.0.254")),
            (addr("fd00::4"), ready("fd00::fe")),
        ]);
        let lb_addresses = [addr("10.0.1.1"), addr("fd00:1::1")];
        let plan = plan(&table, &lb_addresses, &resolutions);
        let families: Vec<(IpFamily, Vec<IpAddr>, Vec<SocketAddr>)> = plan
            .services
            .iter()
            .map(|service| {
                let backends = service.backends.iter().map(|b| b.endpoint).collect();
                (service.family, service.addresses.clone(), backends)
            })
            .collect();
        assert_eq!(
            families,
            [
                (
                    IpFamily::V4,
                    vec![addr("10.0.1.1")],
                    vec![endpoint("10.0.0.1:30001")]
                ),
                (
                    IpFamily::V6,
                    vec![addr("fd00:1::1")],
                    vec![endpoint("[fd00::4]:30001")]
                ),
            ]
        );
        assert!(plan.left_out.is_empty());
    }

    #[test]
    fn a_family_without_endpoints_is_left_to_the_kernel_unless_none_has_any() {
        let lb_addresses = [addr("10.0.1.1"), addr("fd00:1::1")];
        let resolutions = BTreeMap::from([(addr("10.0.0.1"), ready("10.0.0.254"))]);
        let v4_only = plan(&table(&["10.0.0.1:30001"]), &lb_addresses, &resolutions);
        let families: Vec<IpFamily> = v4_only.services.iter().map(|s| s.family).collect();
        assert_eq!(families, [IpFamily::V4]);
        let scaled_to_zero = plan(&table(&[]), &lb_addresses, &resolutions);
        let families: Vec<IpFamily> = scaled_to_zero.services.iter().map(|s| s.family).collect();
        assert_eq!(
            families,
            [IpFamily::V4, IpFamily::V6],
            "steered in both, refused in XDP until a task runs"
        );
    }
}
