//! Keeps the XDP program's L4 maps in step with Swarm: on every discovery poll, the L4 route
//! table's endpoints get their next hops resolved, the plan is built and written.
//!
//! It runs every poll, not only when the route table changes, because next hops resolve after
//! their endpoints appear and neighbour entries need refreshing while XDP uses them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{
    egress::{require_attached_egress, EgressChecker, EgressError},
    neighbours::{NeighbourError, NeighbourResolver, Resolution},
    plan::{backend_addresses, plan},
    service::L4RouteTable,
};
use crate::dataplane::{Dataplane, DataplaneError};

/// How long to wait once for neighbours just asked for, before leaving them to the next poll.
const RESOLUTION_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("resolving next hops")]
    Neighbours(#[from] NeighbourError),
    #[error("writing the L4 maps")]
    Maps(#[from] DataplaneError),
    #[error("checking which interfaces take redirected XDP frames")]
    Egress(#[from] EgressError),
}

pub struct Steering {
    dataplane: Arc<Mutex<Dataplane>>,
    resolver: NeighbourResolver,
    egress: EgressChecker,
    /// The interfaces the program is attached to, by ifindex.
    attached: BTreeMap<u32, String>,
    /// Those found unable to take redirected frames at the last poll.
    cannot_take_redirects: BTreeSet<u32>,
    addresses: Vec<IpAddr>,
    left_out: BTreeMap<SocketAddr, String>,
}

impl Steering {
    /// Steers on `configured` LB addresses, or on the IPv4 and global IPv6 addresses of the
    /// `interfaces` the program is attached to.
    pub async fn start(
        dataplane: Arc<Mutex<Dataplane>>,
        interfaces: &[String],
        configured: &[IpAddr],
    ) -> Result<Steering, SteeringError> {
        let resolver = NeighbourResolver::connect()?;
        let mut addresses: Vec<IpAddr> = if configured.is_empty() {
            let mut addresses = Vec::new();
            for interface in interfaces {
                addresses.extend(resolver.interface_addresses(interface).await?);
            }
            addresses
        } else {
            configured.to_vec()
        };
        if !lock(&dataplane).steers_ipv6() {
            addresses.retain(IpAddr::is_ipv4);
        }
        if addresses.is_empty() {
            tracing::warn!(
                ?interfaces,
                "no address to answer L4 services on: none is steered (set [L4] Addresses)"
            );
        } else {
            tracing::info!(?addresses, "L4 services answer on these addresses");
        }
        let attached = lock(&dataplane).attached().clone();
        Ok(Steering {
            dataplane,
            resolver,
            egress: EgressChecker::connect()?,
            attached,
            cannot_take_redirects: BTreeSet::new(),
            addresses,
            left_out: BTreeMap::new(),
        })
    }

    /// The addresses L4 services answer on.
    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    /// Resolves next hops and writes what changed.
    pub async fn update(&mut self, table: &L4RouteTable) -> Result<(), SteeringError> {
        let backends = backend_addresses(table);
        let mut resolutions = self.resolver.resolve(&backends).await?;
        if resolutions.values().any(|r| *r == Resolution::Pending) {
            tokio::time::sleep(RESOLUTION_GRACE).await;
            resolutions = self.resolver.resolve(&backends).await?;
        }
        require_attached_egress(&mut resolutions, &self.attached, interface_name);
        let egress = tokio::task::block_in_place(|| self.check_egress())?;
        let plan = plan(table, &self.addresses, &resolutions);
        let dataplane = self.dataplane.clone();
        let services = plan.services.clone();
        let report = tokio::task::block_in_place(move || {
            let mut dataplane = lock(&dataplane);
            dataplane.set_egress(&egress)?;
            dataplane.l4().apply(&services)
        })?;
        if report.rings_flipped > 0 {
            tracing::info!(
                rings = report.rings_flipped,
                positions = report.ring_positions_written,
                "L4 Maglev tables updated"
            );
        }
        for listener in &report.out_of_slots {
            tracing::warn!(%listener, "L4 service not steered: every service slot is taken ([L4] MaxServices)");
        }
        for endpoint in &report.mismatched {
            tracing::warn!(%endpoint, "L4 endpoint gets no flows: its source address is of the other family");
        }
        for (endpoint, reason) in &plan.left_out {
            if self.left_out.get(endpoint) != Some(reason) {
                tracing::warn!(%endpoint, %reason, "L4 endpoint gets no flows");
            }
        }
        for endpoint in self
            .left_out
            .keys()
            .filter(|e| !plan.left_out.contains_key(e))
        {
            tracing::info!(%endpoint, "L4 endpoint steered");
        }
        self.left_out = plan.left_out;
        Ok(())
    }

    /// The attached interfaces that can take frames redirected to them now (see
    /// [`super::egress`]), warning when that changes and it matters: with one interface every
    /// frame leaves by the one it came in on, with no redirect.
    fn check_egress(&mut self) -> Result<BTreeSet<u32>, SteeringError> {
        let mut able = BTreeSet::new();
        let mut unable = BTreeSet::new();
        for &ifindex in self.attached.keys() {
            if self.egress.takes_xdp_frames(ifindex)? {
                able.insert(ifindex);
            } else {
                unable.insert(ifindex);
            }
        }
        if self.attached.len() > 1 {
            for ifindex in unable.difference(&self.cannot_take_redirects) {
                tracing::warn!(
                    interface = self.attached[ifindex],
                    "interface cannot transmit frames redirected from XDP (on a veth: its peer \
                     needs an XDP program or GRO): L4 packets that enter by another interface and \
                     leave by it are dropped (l4_drop_redirect)"
                );
            }
            for ifindex in self.cannot_take_redirects.difference(&unable) {
                tracing::info!(
                    interface = self.attached[ifindex],
                    "interface takes frames redirected from XDP again"
                );
            }
        }
        self.cannot_take_redirects = unable;
        Ok(able)
    }
}

fn lock(dataplane: &Mutex<Dataplane>) -> std::sync::MutexGuard<'_, Dataplane> {
    dataplane
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An interface's name for a message, or its index when it has none (any more).
fn interface_name(ifindex: u32) -> String {
    nix::net::if_::if_indextoname(ifindex)
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| format!("ifindex {ifindex}"))
}
