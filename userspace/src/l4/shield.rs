//! What the shield must leave open because the route tables say so: the published ports of
//! tasks that run on this LB node itself. A Swarm task published in host mode is reached at
//! its node's address, so when the node is also a load balancer, those ports are served here
//! even though no xlb listener holds them.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
};

use super::service::{L4RouteTable, Listener, Protocol};
use crate::routes::RouteTable;

/// The ports of every endpoint, L7 or L4, whose address is one of `addresses`.
pub fn local_endpoint_ports(
    routes: &RouteTable,
    l4: &L4RouteTable,
    addresses: &[IpAddr],
) -> BTreeSet<Listener> {
    let local = |endpoint: &SocketAddr| addresses.contains(&endpoint.ip());
    let l7 = routes
        .routes
        .values()
        .flatten()
        .chain(&routes.default_backend)
        .flat_map(|route| &route.endpoints)
        .filter(|endpoint| local(endpoint))
        .map(|endpoint| Listener {
            port: endpoint.port(),
            protocol: Protocol::Tcp,
        });
    let l4 = l4.listeners.iter().flat_map(|route| {
        route
            .endpoints
            .iter()
            .filter(|endpoint| local(endpoint))
            .map(|endpoint| Listener {
                port: endpoint.port(),
                protocol: route.listener.protocol,
            })
    });
    l7.chain(l4).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l4::service::L4Route;

    #[test]
    fn only_endpoints_on_this_nodes_addresses_are_opened() {
        let here = IpAddr::from([10, 0, 0, 10]);
        let elsewhere = IpAddr::from([10, 0, 0, 20]);
        let routes = RouteTable::default();
        let l4 = L4RouteTable {
            listeners: vec![L4Route {
                service: "dns".into(),
                listener: Listener {
                    port: 53,
                    protocol: Protocol::Udp,
                },
                target_port: 53,
                endpoints: vec![
                    SocketAddr::from((here, 31053)),
                    SocketAddr::from((elsewhere, 31054)),
                ],
            }],
            rejected: vec![],
        };
        let open = local_endpoint_ports(&routes, &l4, &[here]);
        assert_eq!(
            open,
            BTreeSet::from([Listener {
                port: 31053,
                protocol: Protocol::Udp
            }])
        );
    }
}
