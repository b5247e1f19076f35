//! The XDP dataplane: loads the embedded program, attaches it to one interface, fills its maps
//! and reads its counters.
//!
//! The object is built by `cargo xtask build-ebpf` and embedded at compile time, so the `xlb`
//! binary runs without the source tree. Dropping a [`Dataplane`] detaches the program.

use std::collections::BTreeMap;

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use xlb_common::{Counter, Stat, L7_PORT_ENABLED};

/// The XDP object, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("XLB_EBPF_OBJECT"));

const PROGRAM: &str = "xlb";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the XDP object into the kernel failed (is this root on Linux ≥ 5.15?)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the XDP object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("the XDP program was rejected by the kernel")]
    Program(#[source] Box<aya::programs::ProgramError>),
    #[error("attaching XDP to {interface} failed in native mode ({native}) and in generic mode")]
    Attach {
        interface: String,
        native: Box<aya::programs::ProgramError>,
        #[source]
        generic: Box<aya::programs::ProgramError>,
    },
    #[error("XDP map {map} could not be {action}")]
    Map {
        map: &'static str,
        action: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("forwarding the XDP program's log failed")]
    Log(#[source] std::io::Error),
}

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
    stats: PerCpuArray<MapData, Counter>,
    l7_ports: HashMap<MapData, u16, u32>,
}

impl Dataplane {
    /// Loads the embedded program into the kernel, not attached anywhere yet.
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|error| DataplaneError::Load(Box::new(error)))?;
        let stats = take_map(&mut ebpf, "STATS")?;
        let stats =
            PerCpuArray::try_from(stats).map_err(|source| map_error("STATS", "opened", source))?;
        let l7_ports = take_map(&mut ebpf, "L7_PORTS")?;
        let l7_ports = HashMap::try_from(l7_ports)
            .map_err(|source| map_error("L7_PORTS", "opened", source))?;
        let mut dataplane = Self {
            ebpf,
            stats,
            l7_ports,
        };
        dataplane
            .program()?
            .load()
            .map_err(|error| DataplaneError::Program(Box::new(error)))?;
        Ok(dataplane)
    }

    /// The XDP program itself (for attaching, or for `BPF_PROG_TEST_RUN` in tests).
    pub fn program(&mut self) -> Result<&mut Xdp, DataplaneError> {
        let missing = DataplaneError::Missing {
            kind: "program",
            name: PROGRAM,
        };
        let program = self.ebpf.program_mut(PROGRAM).ok_or(missing)?;
        program
            .try_into()
            .map_err(|error| DataplaneError::Program(Box::new(error)))
    }

    /// Attaches in native mode, falling back to generic mode (with a warning) when the
    /// interface's driver has no native XDP.
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, DataplaneError> {
        let program = self.program()?;
        let native = match program.attach(interface, XdpMode::Driver) {
            Ok(_) => return Ok(AttachMode::Native),
            Err(error) => error,
        };
        tracing::warn!(interface, error = %native, "native XDP unavailable, falling back to generic mode");
        match program.attach(interface, XdpMode::Skb) {
            Ok(_) => Ok(AttachMode::Generic),
            Err(generic) => Err(DataplaneError::Attach {
                interface: interface.to_owned(),
                native: Box::new(native),
                generic: Box::new(generic),
            }),
        }
    }

    /// Makes `ports` exactly the set of TCP ports the program classifies as L7 traffic.
    pub fn set_l7_ports(&mut self, ports: &[u16]) -> Result<(), DataplaneError> {
        let stale: Vec<u16> = self
            .l7_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|port| !ports.contains(port))
            .collect();
        for port in stale {
            self.l7_ports
                .remove(&port)
                .map_err(|source| map_error("L7_PORTS", "updated", source))?;
        }
        for &port in ports {
            self.l7_ports
                .insert(port, L7_PORT_ENABLED, 0)
                .map_err(|source| map_error("L7_PORTS", "updated", source))?;
        }
        Ok(())
    }

    /// Every counter, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, DataplaneError> {
        let mut totals = BTreeMap::new();
        for stat in Stat::ALL {
            let per_cpu = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(|source| map_error("STATS", "read", source))?;
            let total = per_cpu
                .iter()
                .fold(CounterTotals::default(), |sum, cpu| CounterTotals {
                    packets: sum.packets + cpu.packets,
                    bytes: sum.bytes + cpu.bytes,
                });
            totals.insert(stat.name(), total);
        }
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

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DataplaneError> {
    ebpf.take_map(name)
        .ok_or(DataplaneError::Missing { kind: "map", name })
}

fn map_error(
    map: &'static str,
    action: &'static str,
    source: aya::maps::MapError,
) -> DataplaneError {
    DataplaneError::Map {
        map,
        action,
        source: Box::new(source),
    }
}
