//! veth pairs between two testbed namespaces. Each end is created directly in
//! its namespace (`ip -n A link add ... peer ... netns B`), so no interface
//! ever appears in the host namespace, not even for a moment.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use crate::netns::Netns;

/// Linux rejects longer interface names (IFNAMSIZ is 16 with the NUL).
const MAX_INTERFACE_NAME: usize = 15;

/// One side of a veth pair: where it lives, its name and its address.
#[derive(Clone, Debug)]
pub struct VethEnd<'a> {
    pub netns: &'a Netns,
    pub interface: &'a str,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl VethEnd<'_> {
    fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }

    fn configure(&self) -> Result<()> {
        let cidr = self.cidr();
        self.netns
            .ip(&["addr", "add", &cidr, "dev", self.interface])?;
        self.netns.ip(&["link", "set", self.interface, "up"])?;
        Ok(())
    }
}

/// Creates the pair, addresses both ends (which adds the connected route) and
/// brings them up.
pub fn create_veth_pair(a: &VethEnd, b: &VethEnd) -> Result<()> {
    for end in [a, b] {
        if end.interface.is_empty() || end.interface.len() > MAX_INTERFACE_NAME {
            bail!(
                "interface name {:?} must be 1 to {MAX_INTERFACE_NAME} characters",
                end.interface
            );
        }
    }
    a.netns.ip(&[
        "link",
        "add",
        a.interface,
        "type",
        "veth",
        "peer",
        "name",
        b.interface,
        "netns",
        b.netns.name(),
    ])?;
    a.configure()?;
    b.configure()?;
    Ok(())
}

/// Turns transmit checksum offload off. On a veth the kernel otherwise leaves
/// TCP/UDP checksums unfinished (CHECKSUM_PARTIAL), and an XDP program that
/// rewrites such a packet and updates its checksum incrementally produces a
/// packet the receiver drops.
pub fn disable_tx_checksum_offload(netns: &Netns, interface: &str) -> Result<()> {
    netns.run("ethtool", &["-K", interface, "tx", "off"])?;
    Ok(())
}
