//! The XDP dataplane: loads the embedded program, attaches it to one interface, fills its maps
//! and reads its counters. The L4 maps are written through [`L4Maps`].
//!
//! The object is built by `cargo xtask build-ebpf` and embedded at compile time, so the `xlb`
//! binary runs without the source tree. Dropping a [`Dataplane`] detaches the program, unless
//! it is attached through links pinned for the next process (see [`crate::handover`]).

mod links;

pub use links::Attachment;

use std::collections::BTreeMap;

use aya::{
    maps::{xdp::XdpMapError, Array, DevMapHash, HashMap, MapData, PerCpuArray, ProgramArray},
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};
use tokio::io::unix::AsyncFd;

use xlb_common::{
    wire_ipv4, wire_ipv6, FlowKeyOf, FlowValueOf, Ipv6Wire, ListenPort, Stat, StatsBlock, Timeouts,
    WireAddr, IPPROTO_TCP, PROGRAM_IPV6, PROGRAM_IPV6_ICMP, PROGRAM_IPV6_NEW_FLOW, SHIELD_ENTRY,
};

use crate::l4::{
    conntrack::{self, Sweep, SweepPlan, SweepSchedule, SweepTotals, TableSummary},
    maps::{L4MapHandles, L4Maps, L4Traffic},
    service::Listener,
    settings::L4Settings,
};
use crate::{pins::Pins, port_bitmap::PortBitmap};

use crate::dataplane_error::map_error;
pub use crate::dataplane_error::DataplaneError;

/// The XDP object, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_EBPF_OBJECT"));

const PROGRAM: &str = "xlb";
/// The IPv6 path, its new flows and its ICMPv6 errors, tail-called (`PROGRAMS`) with stacks
/// of their own.
const IPV6_PROGRAMS: [(u32, &str); 3] = [
    (PROGRAM_IPV6, "xlb_ipv6"),
    (PROGRAM_IPV6_NEW_FLOW, "xlb_ipv6_new_flow"),
    (PROGRAM_IPV6_ICMP, "xlb_ipv6_icmp"),
];
/// The connection tables' sweep removals (`conntrack::remove_judged`), run, never attached.
const SWEEP_PROGRAM: &str = "xlb_sweep";
const SWEEP6_PROGRAM: &str = "xlb_sweep6";

/// How the program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver, before any socket buffer is allocated.
    Native,
    /// In the kernel's generic path: correct but slower; the driver lacks native XDP.
    Generic,
}

/// The program's counters, summed over CPUs, by stat name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats(pub BTreeMap<&'static str, CounterTotals>);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterTotals {
    pub packets: u64,
    pub bytes: u64,
}

impl Stats {
    pub fn get(&self, stat: Stat) -> CounterTotals {
        self.0.get(stat.name()).copied().unwrap_or_default()
    }
}

/// The loaded XDP program and the maps the daemon owns.
pub struct Dataplane {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, StatsBlock>,
    l7_ports: PortBitmap,
    l4: L4Maps,
    flows: ConnectionTable,
    /// The LB addresses the shield guards (left empty when `[L4] Shield` is off: the map is
    /// kept open all the same, the program refers to it).
    shielded: HashMap<MapData, u32, u32>,
    shielded6: HashMap<MapData, Ipv6Wire, u32>,
    shield: bool,
    open_ports: OpenPorts,
    /// The interfaces the program is attached to, by ifindex (those it is taking over from
    /// the previous process included).
    attached: BTreeMap<u32, String>,
    /// Interfaces whose pinned link still runs the previous process's program, until
    /// [`Dataplane::take_over`].
    taking_over: Vec<String>,
    /// `EGRESS`: those of them frames may be redirected to, as last written.
    egress: DevMapHash<MapData>,
    egress_written: BTreeSet<u32>,
    /// `PROGRAMS`, held open: the kernel empties a program array when userspace closes it.
    _tail_calls: ProgramArray<MapData>,
    /// Whether the IPv6 programs loaded (see [`Dataplane::steers_ipv6`]).
    ipv6: bool,
}

/// The shield's `OPEN_PORTS`: the configured ports, and those of tasks on this node.
struct OpenPorts {
    map: HashMap<MapData, ListenPort, u32>,
    configured: BTreeSet<ListenPort>,
    endpoints: BTreeSet<ListenPort>,
}

fn listen_port(listener: &Listener) -> ListenPort {
    ListenPort {
        port: listener.port,
        proto: listener.protocol.number(),
        _pad: 0,
    }
}

/// What `/stats` shows of the connection table.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionTableReport<'a> {
    /// As the last sweep left it.
    pub table: &'a TableSummary,
    pub sweeps: SweepTotals,
    /// How long after the last sweep the next is due (see [`SweepSchedule`]).
    pub next_sweep_in: Duration,
    /// Flows one IPv4 backend endpoint can have at once: SNAT addresses × ports.
    pub snat_tuples_per_backend: u64,
    /// The same for an IPv6 backend.
    pub snat_tuples_per_backend6: u64,
}

/// The `FLOWS` and `FLOWS6` maps, the timeouts the program applies to them, and what the
/// sweeps found (both tables together).
struct ConnectionTable {
    ipv4: HashMap<MapData, FlowKeyOf<u32>, FlowValueOf<u32>>,
    ipv6: HashMap<MapData, FlowKeyOf<Ipv6Wire>, FlowValueOf<Ipv6Wire>>,
    capacity: u32,
    timeouts: Timeouts,
    snat_tuples_per_backend: u64,
    snat_tuples_per_backend6: u64,
    last: TableSummary,
    totals: SweepTotals,
    schedule: SweepSchedule,
}

impl ConnectionTable {
    /// Judges `map` at `now` (see [`conntrack::judge`]).
    fn judge<A: WireAddr>(
        &self,
        map: &HashMap<MapData, FlowKeyOf<A>, FlowValueOf<A>>,
        now: u64,
    ) -> Result<SweepPlan<A>, DataplaneError>
    where
        FlowKeyOf<A>: aya::Pod,
        FlowValueOf<A>: aya::Pod,
    {
        conntrack::judge(map, &self.timeouts, self.capacity, now)
    }
}

impl Dataplane {
    /// Loads the embedded program with the default L4 settings, not attached anywhere yet.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::load_with(&L4Settings::default())
    }

    /// Loads the embedded program into the kernel, its L4 maps sized and configured by
    /// `settings`, not attached anywhere yet.
    pub fn load_with(settings: &L4Settings) -> Result<Self, DataplaneError> {
        Self::load_pinned(settings, None)
    }

    /// As [`Dataplane::load_with`], its connection tables and backends pinned in `pins`: those
    /// a previous process left there are adopted, with its backends' ids.
    pub fn load_pinned(settings: &L4Settings, pins: Option<&Pins>) -> Result<Self, DataplaneError> {
        let ring_entries = u32::try_from(settings.ring_entries())
            .map_err(|_| DataplaneError::RingsTooLarge(settings.ring_entries()))?;
        // Online, not possible, CPUs: only those receive packets to share the limit over.
        let cpus = aya::util::online_cpus().map_err(|(_, error)| DataplaneError::Cpus(error))?;
        let program_settings = settings.to_program_settings(cpus.len() as u32);
        let adopts_backends = pins.is_some_and(Pins::has_backends);
        let pinned_maps = pins.map(|pins| pins.maps(settings)).unwrap_or_default();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pinned_maps {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .map_max_entries("RINGS", ring_entries)
            .map_max_entries("FLOWS", settings.flow_entries)
            .map_max_entries("FLOWS6", settings.flow_entries)
            .map_max_entries("SERVICE_STATS", settings.service_slots)
            .map_max_entries("FLOOD_WINDOWS", settings.service_slots)
            .override_global("SETTINGS", &program_settings, true)
            .load(OBJECT)
            .map_err(|error| DataplaneError::Load(Box::new(error)))?;
        let stats = open(&mut ebpf, "STATS", PerCpuArray::try_from)?;
        let l7_ports = PortBitmap::new("L7_PORTS", open(&mut ebpf, "L7_PORTS", Array::try_from)?);
        let mut open_ports = OpenPorts {
            map: open(&mut ebpf, "OPEN_PORTS", HashMap::try_from)?,
            configured: settings.open_ports.iter().map(listen_port).collect(),
            endpoints: BTreeSet::new(),
        };
        for port in &open_ports.configured {
            open_ports
                .map
                .insert(port, SHIELD_ENTRY, 0)
                .map_err(|source| map_error("OPEN_PORTS", "written", source))?;
        }
        let shielded = open(&mut ebpf, "SHIELDED", HashMap::try_from)?;
        let shielded6 = open(&mut ebpf, "SHIELDED6", HashMap::try_from)?;
        let egress = open(&mut ebpf, "EGRESS", DevMapHash::try_from)?;
        let mut tail_calls = open(&mut ebpf, "PROGRAMS", ProgramArray::try_from)?;
        let ipv6 = match load_ipv6_programs(&mut ebpf, &mut tail_calls) {
            Ok(()) => true,
            Err(error) => {
                let error = format!("{:#}", anyhow::Error::from(error));
                tracing::warn!(
                    error,
                    "the IPv6 L4 path was not loaded: IPv6 packets go to the kernel, IPv4 is \
                     steered as usual"
                );
                false
            }
        };
        let handles = L4MapHandles {
            services: open(&mut ebpf, "SERVICES", HashMap::try_from)?,
            services6: open(&mut ebpf, "SERVICES6", HashMap::try_from)?,
            rings: open(&mut ebpf, "RINGS", Array::try_from)?,
            backends: open(&mut ebpf, "BACKENDS", Array::try_from)?,
            backends6: open(&mut ebpf, "BACKENDS6", Array::try_from)?,
            service_stats: open(&mut ebpf, "SERVICE_STATS", PerCpuArray::try_from)?,
            backend_stats: open(&mut ebpf, "BACKEND_STATS", PerCpuArray::try_from)?,
            service_ports: open(&mut ebpf, "SERVICE_PORTS", Array::try_from)?,
        };
        let flows = ConnectionTable {
            ipv4: open(&mut ebpf, "FLOWS", HashMap::try_from)?,
            ipv6: open(&mut ebpf, "FLOWS6", HashMap::try_from)?,
            capacity: settings.flow_entries,
            timeouts: settings.timeouts(),
            snat_tuples_per_backend: settings.snat_tuples_per_backend(),
            snat_tuples_per_backend6: settings.snat_tuples_per_backend6(),
            last: TableSummary {
                capacity: settings.flow_entries,
                ..TableSummary::default()
            },
            totals: SweepTotals::default(),
            schedule: SweepSchedule::default(),
        };
        let mut dataplane = Self {
            ebpf,
            stats,
            l7_ports,
            l4: L4Maps::new(
                handles,
                settings.ring_size,
                settings.service_slots,
                settings.backend_drain,
            ),
            flows,
            shielded,
            shielded6,
            shield: settings.shield,
            open_ports,
            attached: BTreeMap::new(),
            taking_over: Vec::new(),
            egress,
            egress_written: BTreeSet::new(),
            _tail_calls: tail_calls,
            ipv6,
        };
        for name in [PROGRAM, SWEEP_PROGRAM, SWEEP6_PROGRAM] {
            xdp_program(&mut dataplane.ebpf, name)?
                .load()
                .map_err(|error| DataplaneError::Program(Box::new(error)))?;
        }
        if adopts_backends {
            let adopted = dataplane.l4.adopt_backends()?;
            tracing::info!(
                backends = adopted,
                "adopted the pinned connection tables and backend ids"
            );
        }
        Ok(dataplane)
    }

    /// Whether IPv6 is steered: the IPv6 programs loaded. Where a kernel's verifier refuses them
    /// (their new-flow program is the most complex of all), IPv6 is left to the kernel rather
    /// than the whole dataplane failing.
    pub fn steers_ipv6(&self) -> bool {
        self.ipv6
    }

    /// How many instructions the kernel's verifier walked to accept each loaded program, by
    /// name: how close each is to its limit (one million).
    pub fn verified_instructions(&self) -> Result<BTreeMap<&'static str, u32>, DataplaneError> {
        let mut counts = BTreeMap::new();
        for name in [PROGRAM, SWEEP_PROGRAM, SWEEP6_PROGRAM]
            .into_iter()
            .chain(IPV6_PROGRAMS.map(|(_, name)| name))
        {
            let missing = DataplaneError::Missing {
                kind: "program",
                name,
            };
            let program = self.ebpf.program(name).ok_or(missing)?;
            let info = program
                .info()
                .map_err(|error| DataplaneError::Program(Box::new(error)))?;
            counts.insert(name, info.verified_instruction_count().unwrap_or(0));
        }
        Ok(counts)
    }

    /// The XDP program itself (for attaching, or for `BPF_PROG_TEST_RUN` in tests).
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        xdp_program(&mut self.ebpf, PROGRAM)
    }

    /// Attaches in native mode, falling back to generic mode (with a warning) when the
    /// interface's driver has no native XDP.
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, DataplaneError> {
        self.attach_link(interface).map(|(mode, _)| mode)
    }

    fn attach_link(
        &mut self,
        interface: &str,
    ) -> Result<(AttachMode, aya::programs::xdp::XdpLinkId), DataplaneError> {
        let ifindex = ifindex(interface)?;
        let program = self.program()?;
        let (mode, link) = match program.attach(interface, XdpMode::Driver) {
            Ok(link) => (AttachMode::Native, link),
            Err(native) => {
                tracing::warn!(interface, error = %native, "native XDP unavailable, falling back to generic mode");
                match program.attach(interface, XdpMode::Skb) {
                    Ok(link) => (AttachMode::Generic, link),
                    Err(generic) => {
                        return Err(DataplaneError::Attach {
                            interface: interface.to_owned(),
                            native: Box::new(native),
                            generic: Box::new(generic),
                        })
                    }
                }
            }
        };
        self.attached.insert(ifindex, interface.to_owned());
        Ok((mode, link))
    }

    /// The interfaces the program is attached to, by ifindex.
    pub fn attached(&self) -> &BTreeMap<u32, String> {
        &self.attached
    }

    /// Makes `ifindexes` exactly the interfaces frames may be redirected to (`EGRESS`).
    pub fn set_egress(&mut self, ifindexes: &BTreeSet<u32>) -> Result<(), DataplaneError> {
        for stale in self.egress_written.difference(ifindexes) {
            self.egress
                .remove(*stale)
                .map_err(|source| map_error("EGRESS", "updated", source))?;
        }
        for ifindex in ifindexes.difference(&self.egress_written) {
            self.egress
                .insert(*ifindex, *ifindex, None, 0)
                .map_err(|error| match error {
                    XdpMapError::MapError(source) => map_error("EGRESS", "updated", source),
                    // Only inserts with a program for the device map entry can fail so.
                    XdpMapError::ChainedProgramNotSupported => {
                        unreachable!("EGRESS entries carry no program")
                    }
                })?;
        }
        self.egress_written = ifindexes.clone();
        Ok(())
    }

    /// Makes `ports` exactly the set of TCP ports the program classifies as L7 traffic.
    pub fn set_l7_ports(&mut self, ports: &[u16]) -> Result<(), DataplaneError> {
        let ports = ports.iter().map(|&port| (port, IPPROTO_TCP)).collect();
        self.l7_ports.write(&ports)
    }

    /// Puts `addresses` under the shield (see `[L4] Shield`); nothing when it is off.
    pub fn shield(&mut self, addresses: &[IpAddr]) -> Result<(), DataplaneError> {
        if !self.shield {
            return Ok(());
        }
        for addr in addresses {
            match addr {
                IpAddr::V4(v4) => self
                    .shielded
                    .insert(wire_ipv4(*v4), SHIELD_ENTRY, 0)
                    .map_err(|source| map_error("SHIELDED", "written", source))?,
                IpAddr::V6(v6) => self
                    .shielded6
                    .insert(wire_ipv6(*v6), SHIELD_ENTRY, 0)
                    .map_err(|source| map_error("SHIELDED6", "written", source))?,
            }
        }
        Ok(())
    }

    /// Makes `ports`, the published ports of tasks on this node, exactly the ones the shield
    /// leaves open besides the configured ones.
    pub fn open_endpoint_ports(
        &mut self,
        ports: &BTreeSet<Listener>,
    ) -> Result<(), DataplaneError> {
        let open = &mut self.open_ports;
        let wanted: BTreeSet<ListenPort> = ports.iter().map(listen_port).collect();
        for stale in open.endpoints.difference(&wanted) {
            if !open.configured.contains(stale) {
                open.map
                    .remove(stale)
                    .map_err(|source| map_error("OPEN_PORTS", "updated", source))?;
            }
        }
        for port in wanted.difference(&open.endpoints) {
            open.map
                .insert(port, SHIELD_ENTRY, 0)
                .map_err(|source| map_error("OPEN_PORTS", "updated", source))?;
        }
        open.endpoints = wanted;
        Ok(())
    }

    /// The L4 maps: services, rings, backends.
    pub fn l4(&mut self) -> &mut L4Maps {
        &mut self.l4
    }

    /// Per-service and per-backend L4 traffic, summed over CPUs.
    pub fn l4_traffic(&self) -> Result<L4Traffic, DataplaneError> {
        self.l4.traffic()
    }

    /// Removes the flows that are over from the connection tables (see [`conntrack`]).
    pub fn sweep_flows(&mut self) -> Result<Sweep, DataplaneError> {
        let sweep = self.judge_flows()?;
        self.remove_judged_flows(sweep)
    }

    /// The first half of [`Dataplane::sweep_flows`]: which flows are over now, by a snapshot
    /// of each table.
    pub fn judge_flows(&self) -> Result<Sweep, DataplaneError> {
        let table = &self.flows;
        let now = conntrack::monotonic_now();
        Ok(Sweep {
            ipv4: table.judge(&table.ipv4, now)?,
            ipv6: table.judge(&table.ipv6, now)?,
        })
    }

    /// The second half of [`Dataplane::sweep_flows`]: removes what `sweep` judged over and is
    /// still over, and returns `sweep` with what was removed.
    pub fn remove_judged_flows(&mut self, mut sweep: Sweep) -> Result<Sweep, DataplaneError> {
        conntrack::remove_judged(xdp_program(&mut self.ebpf, SWEEP_PROGRAM)?, &mut sweep.ipv4)?;
        conntrack::remove_judged(
            xdp_program(&mut self.ebpf, SWEEP6_PROGRAM)?,
            &mut sweep.ipv6,
        )?;
        let table = &mut self.flows;
        table.last = sweep.summary();
        table.totals.sweeps += 1;
        table.totals.expired_flows += sweep.expired_flows();
        table.totals.stale_half_pairs += sweep.stale_half_pairs();
        table.schedule.record(&sweep, Instant::now());
        Ok(sweep)
    }

    /// The connection table as the last sweep left it, and the sweeps' totals.
    pub fn connection_table(&self) -> ConnectionTableReport<'_> {
        ConnectionTableReport {
            table: &self.flows.last,
            sweeps: self.flows.totals,
            next_sweep_in: self.flows.schedule.next(),
            snat_tuples_per_backend: self.flows.snat_tuples_per_backend,
            snat_tuples_per_backend6: self.flows.snat_tuples_per_backend6,
        }
    }

    /// Every counter, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, DataplaneError> {
        let per_cpu = self
            .stats
            .get(&0, 0)
            .map_err(|source| map_error("STATS", "read", source))?;
        let totals = Stat::ALL
            .iter()
            .map(|&stat| {
                let total = per_cpu.iter().fold(CounterTotals::default(), |sum, cpu| {
                    let counter = cpu.counters[stat as usize];
                    CounterTotals {
                        packets: sum.packets + counter.packets,
                        bytes: sum.bytes + counter.bytes,
                    }
                });
                (stat.name(), total)
            })
            .collect();
        Ok(Stats(totals))
    }

    /// Forwards the program's aya-log records to `logger` (in the daemon: the process's log).
    pub fn forward_logs<L: log::Log + Send + 'static>(
        &mut self,
        logger: L,
    ) -> Result<LogForwarder<L>, DataplaneError> {
        let logger = aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .map_err(|error| DataplaneError::Log(std::io::Error::other(error)))?;
        Ok(LogForwarder { logger })
    }
}

/// Reads the program's log ring buffer; [`LogForwarder::run`] drives it on tokio.
pub struct LogForwarder<L> {
    logger: aya_log::EbpfLogger<L>,
}

impl<L: log::Log> LogForwarder<L> {
    /// Emits every record already in the ring buffer.
    pub fn flush(&mut self) {
        self.logger.flush();
    }

    /// Emits records as they arrive, until the task is dropped.
    pub async fn run(self) -> Result<(), DataplaneError> {
        // SAFETY: the descriptor is the logger's ring buffer map, owned by the logger that the
        // `AsyncFd` owns from here on, so it stays open and the same for the AsyncFd's lifetime.
        let registered =
            unsafe { AsyncFd::register_with_interest(self.logger, tokio::io::Interest::READABLE) };
        let mut readable = registered.map_err(|error| DataplaneError::Log(error.into()))?;
        loop {
            let mut guard = readable.readable_mut().await.map_err(DataplaneError::Log)?;
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }
}

/// Loads the IPv6 programs and puts them in `PROGRAMS`, where `xlb` tail-calls them.
fn load_ipv6_programs(
    ebpf: &mut Ebpf,
    tail_calls: &mut ProgramArray<MapData>,
) -> Result<(), DataplaneError> {
    for (index, name) in IPV6_PROGRAMS {
        let program = xdp_program(ebpf, name)?;
        program
            .load()
            .map_err(|error| DataplaneError::Program(Box::new(error)))?;
        let fd = program
            .fd()
            .map_err(|error| DataplaneError::Program(Box::new(error)))?;
        tail_calls
            .set(index, fd, 0)
            .map_err(|source| map_error("PROGRAMS", "written", source))?;
    }
    Ok(())
}

/// Takes map `name` out of the object as a `T`.
fn open<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    convert: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, DataplaneError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })?;
    convert(map).map_err(|source| map_error(name, "opened", source))
}

fn ifindex(interface: &str) -> Result<u32, DataplaneError> {
    nix::net::if_::if_nametoindex(interface).map_err(|errno| DataplaneError::NoInterface {
        interface: interface.to_owned(),
        source: std::io::Error::from(errno),
    })
}

/// The loaded object's XDP program `name`.
fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    let missing = DataplaneError::Missing {
        kind: "program",
        name,
    };
    let program = ebpf.program_mut(name).ok_or(missing)?;
    program
        .try_into()
        .map_err(|error| DataplaneError::Program(Box::new(error)))
}
