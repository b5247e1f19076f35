//! The seed scenario's network: three namespaces in a line.
//!
//! ```text
//!  client               lb-00                         node
//!  to-lb  10.77.X.2 ─── to-client 10.77.X.1
//!                       to-node   10.78.X.1 ─── to-lb 10.78.X.2  (dockerd, Swarm)
//! ```
//!
//! The client only talks to lb-00 and lb-00 to the node, so no forwarding or
//! extra routes are set up: the load balancer in lb-00 is what connects them.
//! The caller attaches the XDP program to [`Topology::LB_CLIENT_INTERFACE`]
//! inside [`Topology::lb`].

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use crate::netns::Netns;
use crate::unique::{run_id, RunId};
use crate::veth::{create_veth_pair, disable_tx_checksum_offload, VethEnd};

const PREFIX_LEN: u8 = 24;

#[derive(Clone, Debug)]
pub struct Topology {
    run: RunId,
    pub client: Netns,
    pub lb: Netns,
    pub node: Netns,
    subnet_octet: u8,
}

impl Topology {
    /// Interface names only have to be unique inside their namespace, and the
    /// namespaces are per run, so these are fixed and self-describing.
    pub const CLIENT_INTERFACE: &'static str = "to-lb";
    /// The interface in lb-00 facing the client: where XDP is attached.
    pub const LB_CLIENT_INTERFACE: &'static str = "to-client";
    pub const LB_NODE_INTERFACE: &'static str = "to-node";
    pub const NODE_INTERFACE: &'static str = "to-lb";

    pub fn create() -> Result<Topology> {
        let run = run_id();
        let namespace = |role: &str| Netns::create(&format!("xlb-{run}-{role}"));
        let topology = Topology {
            run,
            client: namespace("client")?,
            lb: namespace("lb-00")?,
            node: namespace("node")?,
            subnet_octet: subnet_octet_for(run),
        };
        topology.wire()?;
        Ok(topology)
    }

    fn wire(&self) -> Result<()> {
        let ends = [
            (
                self.end(&self.client, Self::CLIENT_INTERFACE, self.client_addr()),
                self.end(&self.lb, Self::LB_CLIENT_INTERFACE, self.lb_client_addr()),
            ),
            (
                self.end(&self.lb, Self::LB_NODE_INTERFACE, self.lb_node_addr()),
                self.end(&self.node, Self::NODE_INTERFACE, self.node_addr()),
            ),
        ];
        for (a, b) in &ends {
            create_veth_pair(a, b)?;
            // Every end may carry packets an XDP program rewrites (requests
            // one way, replies the other), so none may leave checksums partial.
            for end in [a, b] {
                disable_tx_checksum_offload(end.netns, end.interface)?;
            }
        }
        Ok(())
    }

    fn end<'a>(&self, netns: &'a Netns, interface: &'a str, address: Ipv4Addr) -> VethEnd<'a> {
        VethEnd {
            netns,
            interface,
            address,
            prefix_len: PREFIX_LEN,
        }
    }

    pub fn run_id(&self) -> RunId {
        self.run
    }

    /// The X in 10.77.X.0/24 and 10.78.X.0/24.
    pub fn subnet_octet(&self) -> u8 {
        self.subnet_octet
    }

    pub fn prefix_len(&self) -> u8 {
        PREFIX_LEN
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet_octet, 2)
    }

    /// lb-00's address on the client side: where clients send requests.
    pub fn lb_client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet_octet, 1)
    }

    /// lb-00's address on the node side: the source of traffic to backends.
    pub fn lb_node_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.subnet_octet, 1)
    }

    /// The Swarm node's address, which it advertises and publishes ports on.
    pub fn node_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.subnet_octet, 2)
    }

    /// Gives the client and lb-00 IPv6 addresses on their link as well
    /// ([`Topology::client_addr6`], [`Topology::lb_client_addr6`]), usable at once (no
    /// duplicate address detection: the link is the test's own).
    pub fn add_client_ipv6(&self) -> Result<()> {
        for (netns, interface, addr) in [
            (&self.client, Self::CLIENT_INTERFACE, self.client_addr6()),
            (&self.lb, Self::LB_CLIENT_INTERFACE, self.lb_client_addr6()),
        ] {
            let cidr = format!("{addr}/64");
            netns.ip(&["-6", "addr", "add", &cidr, "dev", interface, "nodad"])?;
        }
        Ok(())
    }

    /// The client's IPv6 address, once added: fd77:X::2.
    pub fn client_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, self.subnet_octet.into(), 0, 0, 0, 0, 0, 2)
    }

    /// lb-00's IPv6 address on the client side, once added: fd77:X::1.
    pub fn lb_client_addr6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd77, self.subnet_octet.into(), 0, 0, 0, 0, 0, 1)
    }

    /// Names of the three namespaces, e.g. to check they are gone after Drop.
    pub fn netns_names(&self) -> [String; 3] {
        [&self.client, &self.lb, &self.node].map(|netns| netns.name().to_string())
    }
}

/// Addresses live inside private namespaces, so runs cannot clash on them;
/// varying X per run still keeps concurrent runs apart in captures and logs.
fn subnet_octet_for(run: RunId) -> u8 {
    let spread = run.pid.wrapping_mul(31).wrapping_add(run.sequence);
    (spread % 250) as u8 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_octet_is_a_usable_host_octet() {
        for pid in [0, 1, 4_194_304, u32::MAX] {
            for sequence in 0..300 {
                let octet = subnet_octet_for(RunId { pid, sequence });
                assert!((1..=250).contains(&octet));
            }
        }
    }
}
