//! Next-hop resolution for backends, ahead of any flow: the egress interface, its MAC, the next
//! hop's MAC and this node's source address toward each backend, read from the kernel's routing
//! and neighbour tables over rtnetlink, for IPv4 and IPv6 alike.
//!
//! A next hop without a usable neighbour entry is asked for with `NTF_USE` (the kernel sends the
//! ARP request or IPv6 neighbour solicitation; nothing is sent to the backend itself) and reported as pending: its backend gets
//! flows from the next poll on, once the entry is there. Entries that are only `STALE` are
//! refreshed the same way, so MACs stay confirmed while they are used by XDP, which the kernel's
//! neighbour code never sees.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::LinkAttribute,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteType},
        AddressFamily,
    },
    Handle, RouteMessageBuilder,
};
use xlb_common::NextHop;

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("opening an rtnetlink socket failed")]
    Connect(#[source] std::io::Error),
    #[error("rtnetlink: {what} failed")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// How a backend address can be reached right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Ready {
        /// This node's address toward the backend, of the backend's family.
        snat_addr: IpAddr,
        next_hop: NextHop,
    },
    /// The neighbour is being resolved; ask again at the next poll.
    Pending,
    /// No route, or a route XDP cannot use (a local address, an interface without MAC).
    Unreachable(String),
}

/// An rtnetlink connection to the kernel of the network namespace the daemon runs in.
pub struct NeighbourResolver {
    handle: Handle,
}

impl NeighbourResolver {
    /// Opens the socket; its connection task runs on the current tokio runtime.
    pub fn connect() -> Result<NeighbourResolver, NeighbourError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(NeighbourError::Connect)?;
        tokio::spawn(connection);
        Ok(NeighbourResolver { handle })
    }

    /// Resolves every address in `backends`.
    pub async fn resolve(
        &self,
        backends: &[IpAddr],
    ) -> Result<BTreeMap<IpAddr, Resolution>, NeighbourError> {
        let neighbours = self.neighbours().await?;
        let mut resolved = BTreeMap::new();
        for backend in backends {
            let resolution = self.resolve_one(*backend, &neighbours).await?;
            resolved.insert(*backend, resolution);
        }
        Ok(resolved)
    }

    /// The IPv4 and global IPv6 addresses of interface `name`: the default LB addresses.
    /// Link-local IPv6 addresses are left out: a client off the link cannot reach them.
    pub async fn interface_addresses(&self, name: &str) -> Result<Vec<IpAddr>, NeighbourError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let link = links
            .try_next()
            .await
            .map_err(|source| request_error(format!("link get {name}"), source))?;
        let Some(link) = link else {
            return Ok(Vec::new());
        };
        let mut addresses = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.header.index)
            .execute();
        let mut found = Vec::new();
        while let Some(address) = addresses
            .try_next()
            .await
            .map_err(|source| request_error(format!("address get dev {name}"), source))?
        {
            for attribute in &address.attributes {
                if let AddressAttribute::Address(addr) = attribute {
                    if !is_link_local(*addr) {
                        found.push(*addr);
                    }
                }
            }
        }
        Ok(found)
    }

    async fn resolve_one(
        &self,
        backend: IpAddr,
        neighbours: &BTreeMap<(u32, IpAddr), Neighbour>,
    ) -> Result<Resolution, NeighbourError> {
        let Some(route) = self.route_to(backend).await? else {
            return Ok(Resolution::Unreachable(format!("no route to {backend}")));
        };
        if route.local {
            return Ok(Resolution::Unreachable(format!(
                "{backend} is an address of this node: XDP cannot send to itself"
            )));
        }
        let Some(src_mac) = self.link_mac(route.ifindex).await? else {
            return Ok(Resolution::Unreachable(format!(
                "the interface toward {backend} (index {}) has no Ethernet address",
                route.ifindex
            )));
        };
        let Some(snat_addr) = route.source else {
            let family = if backend.is_ipv4() { "IPv4" } else { "IPv6" };
            return Ok(Resolution::Unreachable(format!(
                "the interface toward {backend} (index {}) has no {family} address",
                route.ifindex
            )));
        };
        let next_hop_addr = route.gateway.unwrap_or(backend);
        let neighbour = neighbours.get(&(route.ifindex, next_hop_addr));
        if neighbour.is_none_or(|neighbour| !neighbour.confirmed) {
            self.request_resolution(route.ifindex, next_hop_addr)
                .await?;
        }
        Ok(match neighbour.and_then(|neighbour| neighbour.mac) {
            Some(dst_mac) => Resolution::Ready {
                snat_addr,
                next_hop: NextHop {
                    ifindex: route.ifindex,
                    src_mac,
                    dst_mac,
                },
            },
            None => Resolution::Pending,
        })
    }

    /// `ip route get ADDR`: the egress interface, gateway and preferred source.
    async fn route_to(&self, destination: IpAddr) -> Result<Option<Route>, NeighbourError> {
        let message = match destination {
            IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(v4, 32)
                .build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(v6, 128)
                .build(),
        };
        let mut routes = self.handle.route().get(message).execute();
        let route = match routes.try_next().await {
            Ok(route) => route,
            // ENETUNREACH and friends come back as an error message: no route.
            Err(rtnetlink::Error::NetlinkError(_)) => None,
            Err(source) => return Err(request_error(format!("route get {destination}"), source)),
        };
        let Some(route) = route else {
            return Ok(None);
        };
        let mut found = Route {
            ifindex: 0,
            gateway: None,
            source: None,
            local: route.header.kind == RouteType::Local,
        };
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(index) => found.ifindex = *index,
                RouteAttribute::Gateway(gateway) => found.gateway = route_address(gateway),
                RouteAttribute::PrefSource(source) => found.source = route_address(source),
                _ => {}
            }
        }
        if found.ifindex == 0 {
            return Ok(None);
        }
        if found.source.is_none() {
            found.source = self.first_address(found.ifindex, destination).await?;
        }
        Ok(Some(found))
    }

    /// The interface's first address of `like`'s family (not link-local).
    async fn first_address(
        &self,
        ifindex: u32,
        like: IpAddr,
    ) -> Result<Option<IpAddr>, NeighbourError> {
        let mut addresses = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute();
        while let Some(address) = addresses
            .try_next()
            .await
            .map_err(|source| request_error(format!("address get dev {ifindex}"), source))?
        {
            for attribute in &address.attributes {
                if let AddressAttribute::Address(addr) = attribute {
                    if addr.is_ipv4() == like.is_ipv4() && !is_link_local(*addr) {
                        return Ok(Some(*addr));
                    }
                }
            }
        }
        Ok(None)
    }

    async fn link_mac(&self, ifindex: u32) -> Result<Option<[u8; 6]>, NeighbourError> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let link = links
            .try_next()
            .await
            .map_err(|source| request_error(format!("link get {ifindex}"), source))?;
        Ok(link.and_then(|link| {
            link.attributes
                .iter()
                .find_map(|attribute| match attribute {
                    LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                    _ => None,
                })
        }))
    }

    /// Every IPv4 and IPv6 neighbour entry, by (interface, address).
    async fn neighbours(&self) -> Result<BTreeMap<(u32, IpAddr), Neighbour>, NeighbourError> {
        let mut neighbours = BTreeMap::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            self.dump_neighbours(family, &mut neighbours).await?;
        }
        Ok(neighbours)
    }

    async fn dump_neighbours(
        &self,
        family: AddressFamily,
        neighbours: &mut BTreeMap<(u32, IpAddr), Neighbour>,
    ) -> Result<(), NeighbourError> {
        let mut entries = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(entry) = entries
            .try_next()
            .await
            .map_err(|source| request_error("neighbour dump".to_owned(), source))?
        {
            let state = entry.header.state;
            let mut address = None;
            let mut mac = None;
            for attribute in &entry.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(addr)) => {
                        address = Some(IpAddr::V4(*addr))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(addr)) => {
                        address = Some(IpAddr::V6(*addr))
                    }
                    NeighbourAttribute::LinkLayerAddress(bytes) => {
                        mac = <[u8; 6]>::try_from(bytes.as_slice()).ok()
                    }
                    _ => {}
                }
            }
            let usable = matches!(
                state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
            if let Some(address) = address {
                let neighbour = Neighbour {
                    mac: mac.filter(|_| usable),
                    confirmed: matches!(
                        state,
                        NeighbourState::Reachable
                            | NeighbourState::Permanent
                            | NeighbourState::Noarp
                    ),
                };
                neighbours.insert((entry.header.ifindex, address), neighbour);
            }
        }
        Ok(())
    }

    /// Asks the kernel to resolve (or re-confirm) a neighbour: `ip neigh replace ADDR dev IF
    /// nud none use`. The kernel sends the ARP request; the entry appears in the table.
    async fn request_resolution(&self, ifindex: u32, addr: IpAddr) -> Result<(), NeighbourError> {
        let request = self
            .handle
            .neighbours()
            .add(ifindex, addr)
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            .replace();
        request
            .execute()
            .await
            .map_err(|source| request_error(format!("neighbour use {addr} dev {ifindex}"), source))
    }
}

struct Route {
    ifindex: u32,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    local: bool,
}

fn route_address(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// fe80::/10: reachable only on its own link.
fn is_link_local(addr: IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

struct Neighbour {
    /// Known only in a state where the kernel itself would use it.
    mac: Option<[u8; 6]>,
    /// Recently confirmed: no need to ask again.
    confirmed: bool,
}

fn request_error(what: String, source: rtnetlink::Error) -> NeighbourError {
    NeighbourError::Request { what, source }
}
