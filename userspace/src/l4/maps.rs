//! The map writer: makes the XDP program's L4 maps hold a [`ServicePlan`] list, changing only
//! what changed.
//!
//! Backends get small stable ids (0 = none), one id space for both address families. Each
//! service (listener) gets a slot per address family it is steered in, with two Maglev rings
//! holding backends of that family only: an update writes the positions of the inactive ring that differ from what it holds,
//! then flips the service's `active_ring` in one `SERVICES` update per LB address, so the
//! datapath sees the old table or the new one, never a mix. The ring written next is the one
//! the datapath left a whole poll interval earlier.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use serde::Serialize;
use xlb_common::{
    ipv4_from_wire, ipv6_from_wire, port_from_wire, ring_index, wire_ipv4, wire_ipv6, wire_port,
    Backend, Backend6, NextHop, ServiceKey, ServiceKey6, ServiceKeyOf, ServiceValue,
    TrafficCounters, MAX_BACKENDS, NO_BACKEND,
};

use super::{
    maglev::{maglev_table, RingSize},
    service::Listener,
};
use crate::{
    dataplane_error::{map_error, DataplaneError},
    port_bitmap::{PortBitmap, PortProto},
};

/// An address family of the L4 path: each has maps of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(addr: IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// One service in one address family as the maps should hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePlan {
    pub listener: Listener,
    pub family: IpFamily,
    /// LB addresses it answers on, all of `family` (others are left out).
    pub addresses: Vec<IpAddr>,
    /// Endpoints of `family` whose next hop is known; the others get no flows until it is.
    pub backends: Vec<BackendPlan>,
}

/// A backend and how to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendPlan {
    pub endpoint: SocketAddr,
    /// This node's address toward the endpoint, of the endpoint's family: the source of
    /// forwarded packets.
    pub snat_addr: IpAddr,
    pub next_hop: NextHop,
}

/// A backend id's value, in the map of its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendValue {
    V4(Backend),
    V6(Backend6),
}

impl BackendPlan {
    /// The map value, or `None` when the SNAT address is not of the endpoint's family.
    fn map_value(&self, generation: u32) -> Option<BackendValue> {
        let port = wire_port(self.endpoint.port());
        Some(match (self.endpoint.ip(), self.snat_addr) {
            (IpAddr::V4(addr), IpAddr::V4(snat_addr)) => BackendValue::V4(Backend {
                addr: wire_ipv4(addr),
                port,
                _pad: 0,
                snat_addr: wire_ipv4(snat_addr),
                generation,
                next_hop: self.next_hop,
            }),
            (IpAddr::V6(addr), IpAddr::V6(snat_addr)) => BackendValue::V6(Backend6 {
                addr: wire_ipv6(addr),
                port,
                _pad: 0,
                snat_addr: wire_ipv6(snat_addr),
                generation,
                next_hop: self.next_hop,
            }),
            _ => return None,
        })
    }
}

impl BackendValue {
    fn generation(&self) -> u32 {
        match self {
            BackendValue::V4(value) => value.generation,
            BackendValue::V6(value) => value.generation,
        }
    }

    /// The free value of the same family.
    fn cleared(&self) -> BackendValue {
        match self {
            BackendValue::V4(_) => BackendValue::V4(Backend::default()),
            BackendValue::V6(_) => BackendValue::V6(Backend6::default()),
        }
    }
}

/// What an [`L4Maps::apply`] changed, for the log and for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Ring positions written, over all services.
    pub ring_positions_written: usize,
    /// Services whose live ring was flipped.
    pub rings_flipped: usize,
    /// Listeners left out because every service slot is taken.
    pub out_of_slots: Vec<Listener>,
    /// Backends left out because their SNAT address is of the other family.
    pub mismatched: Vec<SocketAddr>,
}

/// Traffic of one service or backend, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub forward_packets: u64,
    pub forward_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
}

/// Traffic of every listener and backend written, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L4Traffic {
    /// Both families' slots of a listener together.
    pub services: BTreeMap<Listener, Traffic>,
    pub backends: BTreeMap<SocketAddr, Traffic>,
}

struct SlotState {
    slot: u32,
    active_ring: u32,
    /// The LB addresses written to the family's `SERVICES` map for it.
    addresses: BTreeSet<IpAddr>,
}

/// The L4 maps of a loaded program, and what the writer knows they hold.
pub struct L4Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    rings: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    backends6: Array<MapData, Backend6>,
    service_stats: PerCpuArray<MapData, TrafficCounters>,
    backend_stats: PerCpuArray<MapData, TrafficCounters>,
    service_ports: PortBitmap,
    ring_size: RingSize,
    service_slots: u32,
    /// Contents of both rings of every slot ever used (empty = all `NO_BACKEND`).
    ring_contents: Vec<[Vec<u32>; 2]>,
    listeners: BTreeMap<(Listener, IpFamily), SlotState>,
    backend_ids: BTreeMap<SocketAddr, (u32, BackendValue)>,
    /// Endpoints that left every service, with the moment their id is cleared: until then
    /// their established flows go on (as the L7 proxy's requests do for `DrainTimeout`); after
    /// it, a TCP flow's next segment is reset by the kernel and a UDP flow moves to a live
    /// backend. No new flow reaches them: the rings no longer hold their id.
    draining: BTreeMap<SocketAddr, (u32, BackendValue, Instant)>,
    /// Ports no service listens on any more, with the moment they are unmarked in
    /// `SERVICE_PORTS`: until then the flows of a removed service go on (while their backend
    /// is live), after it their packets go to the kernel. New flows never reach them: the
    /// service's `SERVICES` keys are gone.
    draining_ports: BTreeMap<PortProto, Instant>,
    drain: Duration,
    next_backend_id: u32,
    /// The generation the next endpoint given an id gets (never 0: a free id's).
    next_generation: u32,
}

/// The maps [`L4Maps`] writes, taken from the loaded object.
pub struct L4MapHandles {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub rings: Array<MapData, u32>,
    pub backends: Array<MapData, Backend>,
    pub backends6: Array<MapData, Backend6>,
    pub service_stats: PerCpuArray<MapData, TrafficCounters>,
    pub backend_stats: PerCpuArray<MapData, TrafficCounters>,
    pub service_ports: Array<MapData, u64>,
}

impl L4Maps {
    pub fn new(
        handles: L4MapHandles,
        ring_size: RingSize,
        service_slots: u32,
        drain: Duration,
    ) -> L4Maps {
        L4Maps {
            services: handles.services,
            services6: handles.services6,
            rings: handles.rings,
            backends: handles.backends,
            backends6: handles.backends6,
            service_stats: handles.service_stats,
            backend_stats: handles.backend_stats,
            service_ports: PortBitmap::new("SERVICE_PORTS", handles.service_ports),
            ring_size,
            service_slots,
            ring_contents: Vec::new(),
            listeners: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            draining: BTreeMap::new(),
            draining_ports: BTreeMap::new(),
            drain,
            next_backend_id: 1,
            next_generation: 1,
        }
    }

    /// Takes the backend ids a previous process left in the (pinned, adopted) `BACKENDS`
    /// maps as this writer's own: an endpoint it plans keeps its id and generation, so the
    /// flows that name them go on; one it does not plan drains as if it had just left.
    /// Returns how many were adopted.
    pub fn adopt_backends(&mut self) -> Result<usize, DataplaneError> {
        for id in 1..MAX_BACKENDS {
            let v4 = self
                .backends
                .get(&id, 0)
                .map_err(|source| map_error("BACKENDS", "read", source))?;
            let v6 = self
                .backends6
                .get(&id, 0)
                .map_err(|source| map_error("BACKENDS6", "read", source))?;
            let adopted = if v4.generation != 0 {
                let endpoint =
                    SocketAddr::new(ipv4_from_wire(v4.addr).into(), port_from_wire(v4.port));
                (endpoint, BackendValue::V4(v4))
            } else if v6.generation != 0 {
                let endpoint =
                    SocketAddr::new(ipv6_from_wire(v6.addr).into(), port_from_wire(v6.port));
                (endpoint, BackendValue::V6(v6))
            } else {
                continue;
            };
            let (endpoint, value) = adopted;
            self.next_backend_id = self.next_backend_id.max(id + 1);
            self.next_generation = self
                .next_generation
                .max(value.generation().checked_add(1).unwrap_or(1));
            self.backend_ids.insert(endpoint, (id, value));
        }
        Ok(self.backend_ids.len())
    }

    /// Makes the maps steer exactly `plan`.
    pub fn apply(&mut self, plan: &[ServicePlan]) -> Result<ApplyReport, DataplaneError> {
        let mut report = ApplyReport::default();
        // The ports of new services are marked before their `SERVICES` keys exist, and those
        // of removed ones unmarked after their drain time: a packet to a listed service
        // always finds its port marked, and a removed service's flows go on while it drains.
        let planned_ports: BTreeSet<PortProto> = plan
            .iter()
            .map(|service| service.listener.port_proto())
            .collect();
        self.service_ports.mark(&planned_ports)?;
        self.write_backends(plan, &mut report)?;
        for service in plan {
            self.write_service(service, &mut report)?;
        }
        let planned: BTreeSet<(Listener, IpFamily)> = plan
            .iter()
            .map(|service| (service.listener, service.family))
            .collect();
        let removed: Vec<(Listener, IpFamily)> = self
            .listeners
            .keys()
            .filter(|slot| !planned.contains(slot))
            .copied()
            .collect();
        let now = Instant::now();
        for slot in removed {
            if let Some(state) = self.listeners.remove(&slot) {
                for addr in &state.addresses {
                    self.remove_service_key(*addr, &slot.0)?;
                }
                self.draining_ports
                    .insert(slot.0.port_proto(), now + self.drain);
            }
        }
        self.draining_ports
            .retain(|port, deadline| *deadline > now && !planned_ports.contains(port));
        let mut marked_ports = planned_ports;
        marked_ports.extend(self.draining_ports.keys());
        self.service_ports.write(&marked_ports)?;
        self.forget_unused_backends(plan)?;
        Ok(report)
    }

    /// The backend id of each endpoint currently written.
    pub fn backend_ids(&self) -> BTreeMap<SocketAddr, u32> {
        self.backend_ids
            .iter()
            .map(|(endpoint, (id, _))| (*endpoint, *id))
            .collect()
    }

    /// The slot of each listener and family currently written.
    pub fn service_slots(&self) -> BTreeMap<(Listener, IpFamily), u32> {
        self.listeners
            .iter()
            .map(|(slot, state)| (*slot, state.slot))
            .collect()
    }

    /// Traffic of every listener and every backend, summed over CPUs.
    pub fn traffic(&self) -> Result<L4Traffic, DataplaneError> {
        let mut traffic = L4Traffic::default();
        for ((listener, _), state) in &self.listeners {
            let total = sum(&self.service_stats, state.slot, "SERVICE_STATS")?;
            let listener_total = traffic.services.entry(*listener).or_default();
            *listener_total = listener_total.add(&total);
        }
        for (endpoint, (id, _)) in &self.backend_ids {
            let total = sum(&self.backend_stats, *id, "BACKEND_STATS")?;
            traffic.backends.insert(*endpoint, total);
        }
        Ok(traffic)
    }

    fn write_backends(
        &mut self,
        plan: &[ServicePlan],
        report: &mut ApplyReport,
    ) -> Result<(), DataplaneError> {
        for backend in plan.iter().flat_map(|service| &service.backends) {
            // An endpoint keeps its id and generation while it stays (or comes back while it
            // drains): a changed next hop is written in place and reaches its live flows.
            if let Some((id, written, _)) = self.draining.remove(&backend.endpoint) {
                self.backend_ids.insert(backend.endpoint, (id, written));
            }
            let (id, value) = match self.backend_ids.get(&backend.endpoint) {
                Some((id, written)) => match backend.map_value(written.generation()) {
                    Some(value) if value == *written => continue,
                    Some(value) => (*id, value),
                    None => {
                        report.mismatched.push(backend.endpoint);
                        continue;
                    }
                },
                None => {
                    let generation = self.next_generation;
                    let Some(value) = backend.map_value(generation) else {
                        report.mismatched.push(backend.endpoint);
                        continue;
                    };
                    let id = self.free_backend_id().ok_or(DataplaneError::Full {
                        map: "BACKENDS",
                        capacity: MAX_BACKENDS - 1,
                    })?;
                    self.next_generation = generation.checked_add(1).unwrap_or(1);
                    (id, value)
                }
            };
            self.set_backend(id, value)?;
            self.backend_ids.insert(backend.endpoint, (id, value));
        }
        Ok(())
    }

    /// Writes backend id `id` in the map of its value's family.
    fn set_backend(&mut self, id: u32, value: BackendValue) -> Result<(), DataplaneError> {
        match value {
            BackendValue::V4(value) => self
                .backends
                .set(id, value, 0)
                .map_err(|source| map_error("BACKENDS", "updated", source)),
            BackendValue::V6(value) => self
                .backends6
                .set(id, value, 0)
                .map_err(|source| map_error("BACKENDS6", "updated", source)),
        }
    }

    /// The next unused id after the last one given: ids are reused as late as possible, so a
    /// late packet of a removed backend's flow is not counted for a new one. An id whose slot
    /// in `BACKENDS` is written is in use too, though this writer does not know it: during a
    /// hitless restart the process being replaced may still add backends to the maps both
    /// share, after this one adopted them.
    fn free_backend_id(&mut self) -> Option<u32> {
        let held = self.backend_ids.values().map(|(id, _)| *id);
        let used: BTreeSet<u32> = held
            .chain(self.draining.values().map(|(id, _, _)| *id))
            .collect();
        let candidates = (self.next_backend_id..MAX_BACKENDS).chain(1..self.next_backend_id);
        let id = candidates
            .into_iter()
            .find(|&id| !used.contains(&id) && self.slot_is_empty(id))?;
        self.next_backend_id = id + 1;
        Some(id)
    }

    /// Whether neither `BACKENDS` map holds a backend at `id`; a slot that cannot be read
    /// counts as taken.
    fn slot_is_empty(&self, id: u32) -> bool {
        let v4 = self.backends.get(&id, 0).map(|value| value.generation == 0);
        let v6 = self
            .backends6
            .get(&id, 0)
            .map(|value| value.generation == 0);
        matches!((v4, v6), (Ok(true), Ok(true)))
    }

    fn forget_unused_backends(&mut self, plan: &[ServicePlan]) -> Result<(), DataplaneError> {
        let planned: BTreeSet<SocketAddr> = plan
            .iter()
            .flat_map(|service| service.backends.iter().map(|backend| backend.endpoint))
            .collect();
        let unused: Vec<SocketAddr> = self
            .backend_ids
            .keys()
            .filter(|endpoint| !planned.contains(endpoint))
            .copied()
            .collect();
        let now = Instant::now();
        for endpoint in unused {
            if let Some((id, written)) = self.backend_ids.remove(&endpoint) {
                self.draining
                    .insert(endpoint, (id, written, now + self.drain));
            }
        }
        let drained: Vec<SocketAddr> = self
            .draining
            .iter()
            .filter(|(_, (_, _, deadline))| *deadline <= now)
            .map(|(endpoint, _)| *endpoint)
            .collect();
        for endpoint in drained {
            if let Some((id, written, _)) = self.draining.remove(&endpoint) {
                self.set_backend(id, written.cleared())?;
            }
        }
        Ok(())
    }

    fn allocate_slot(&mut self) -> Option<u32> {
        let used: BTreeSet<u32> = self.listeners.values().map(|state| state.slot).collect();
        (0..self.service_slots).find(|slot| !used.contains(slot))
    }

    fn write_service(
        &mut self,
        service: &ServicePlan,
        report: &mut ApplyReport,
    ) -> Result<(), DataplaneError> {
        let slot_key = (service.listener, service.family);
        let (slot, active_ring, old_addresses) = match self.listeners.get(&slot_key) {
            Some(state) => (state.slot, state.active_ring, state.addresses.clone()),
            None => match self.allocate_slot() {
                Some(slot) => (slot, 0, BTreeSet::new()),
                None => {
                    report.out_of_slots.push(service.listener);
                    return Ok(());
                }
            },
        };
        let endpoints: Vec<(SocketAddr, u32)> = service
            .backends
            .iter()
            .filter_map(|backend| {
                let (id, _) = self.backend_ids.get(&backend.endpoint)?;
                Some((backend.endpoint, *id))
            })
            .collect();
        let table = maglev_table(&endpoints, self.ring_size);
        let size = self.ring_size.get() as usize;
        let wanted: Vec<u32> = if table.is_empty() {
            vec![NO_BACKEND; size]
        } else {
            table
        };
        while self.ring_contents.len() <= slot as usize {
            self.ring_contents.push([Vec::new(), Vec::new()]);
        }
        let live = &self.ring_contents[slot as usize][active_ring as usize];
        let live_matches = ring_equals(live, &wanted);
        let addresses: BTreeSet<IpAddr> = service
            .addresses
            .iter()
            .copied()
            .filter(|addr| IpFamily::of(*addr) == service.family)
            .collect();
        let new_active = if live_matches {
            active_ring
        } else {
            let inactive = 1 - active_ring;
            report.ring_positions_written += self.write_ring(slot, inactive, &wanted)?;
            report.rings_flipped += 1;
            inactive
        };
        let value = ServiceValue {
            slot,
            active_ring: new_active,
        };
        for addr in &addresses {
            if new_active != active_ring || !old_addresses.contains(addr) {
                self.insert_service_key(*addr, &service.listener, value)?;
            }
        }
        for addr in old_addresses.difference(&addresses) {
            self.remove_service_key(*addr, &service.listener)?;
        }
        self.listeners.insert(
            slot_key,
            SlotState {
                slot,
                active_ring: new_active,
                addresses,
            },
        );
        Ok(())
    }

    /// Points (`addr`, `listener`) at `value` in its family's `SERVICES` map.
    fn insert_service_key(
        &mut self,
        addr: IpAddr,
        listener: &Listener,
        value: ServiceValue,
    ) -> Result<(), DataplaneError> {
        match addr {
            IpAddr::V4(addr) => self
                .services
                .insert(service_key(wire_ipv4(addr), listener), value, 0)
                .map_err(|source| map_error("SERVICES", "updated", source)),
            IpAddr::V6(addr) => self
                .services6
                .insert(service_key(wire_ipv6(addr), listener), value, 0)
                .map_err(|source| map_error("SERVICES6", "updated", source)),
        }
    }

    fn remove_service_key(
        &mut self,
        addr: IpAddr,
        listener: &Listener,
    ) -> Result<(), DataplaneError> {
        match addr {
            IpAddr::V4(addr) => remove_key(
                &mut self.services,
                &service_key(wire_ipv4(addr), listener),
                "SERVICES",
            ),
            IpAddr::V6(addr) => remove_key(
                &mut self.services6,
                &service_key(wire_ipv6(addr), listener),
                "SERVICES6",
            ),
        }
    }

    /// Writes the positions of ring `ring` of `slot` that differ from `wanted`.
    fn write_ring(
        &mut self,
        slot: u32,
        ring: u32,
        wanted: &[u32],
    ) -> Result<usize, DataplaneError> {
        let ring_size = self.ring_size.get();
        let held = std::mem::take(&mut self.ring_contents[slot as usize][ring as usize]);
        let mut written = 0;
        for (position, id) in wanted.iter().enumerate() {
            let current = held.get(position).copied().unwrap_or(NO_BACKEND);
            if current != *id {
                let index = ring_index(slot, ring, ring_size, position as u32);
                self.rings
                    .set(index, *id, 0)
                    .map_err(|source| map_error("RINGS", "updated", source))?;
                written += 1;
            }
        }
        self.ring_contents[slot as usize][ring as usize] = wanted.to_vec();
        Ok(written)
    }
}

/// The `SERVICES`/`SERVICES6` key of `listener` on LB address `addr` (wire order).
fn service_key<A>(addr: A, listener: &Listener) -> ServiceKeyOf<A> {
    ServiceKeyOf {
        addr,
        port: wire_port(listener.port),
        proto: listener.protocol.number(),
        _pad: 0,
    }
}

/// An empty ring stands for one of `NO_BACKEND` only.
fn ring_equals(held: &[u32], wanted: &[u32]) -> bool {
    if held.is_empty() {
        wanted.iter().all(|id| *id == NO_BACKEND)
    } else {
        held == wanted
    }
}

fn remove_key<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<(), DataplaneError> {
    match map.remove(key) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(map_error(name, "updated", source)),
    }
}

impl Traffic {
    fn add(&self, other: &Traffic) -> Traffic {
        Traffic {
            forward_packets: self.forward_packets + other.forward_packets,
            forward_bytes: self.forward_bytes + other.forward_bytes,
            reply_packets: self.reply_packets + other.reply_packets,
            reply_bytes: self.reply_bytes + other.reply_bytes,
            new_flows: self.new_flows + other.new_flows,
        }
    }
}

fn sum(
    map: &PerCpuArray<MapData, TrafficCounters>,
    index: u32,
    name: &'static str,
) -> Result<Traffic, DataplaneError> {
    let per_cpu = map
        .get(&index, 0)
        .map_err(|source| map_error(name, "read", source))?;
    Ok(per_cpu
        .iter()
        .fold(Traffic::default(), |total, cpu| Traffic {
            forward_packets: total.forward_packets + cpu.forward_packets,
            forward_bytes: total.forward_bytes + cpu.forward_bytes,
            reply_packets: total.reply_packets + cpu.reply_packets,
            reply_bytes: total.reply_bytes + cpu.reply_bytes,
            new_flows: total.new_flows + cpu.new_flows,
        }))
}
