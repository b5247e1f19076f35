//! What can go wrong with the XDP program and its maps: one error type for the dataplane
//! ([`crate::dataplane`]) and the map writers beside it ([`crate::l4`], [`crate::port_bitmap`]),
//! in a module of its own so that they depend on it, not on each other.

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
    #[error("interface {interface} not found")]
    NoInterface {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("forwarding the XDP program's log failed")]
    Log(#[source] std::io::Error),
    #[error("XDP map {map} is full ({capacity} entries)")]
    Full { map: &'static str, capacity: u32 },
    #[error("the L4 settings need {0} Maglev ring entries, more than a BPF array holds")]
    RingsTooLarge(u64),
    #[error("counting this machine's CPUs failed")]
    Cpus(#[source] std::io::Error),
    #[error("the connection table could not be {action}")]
    Sweep {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("running the sweep's removals (BPF_PROG_TEST_RUN of the sweep programs) failed")]
    SweepRun(#[source] Box<aya::programs::ProgramError>),
    #[error("the XDP link on {interface} could not be {action} ({path})")]
    Link {
        interface: String,
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A map operation that failed, naming the map and what was done to it.
pub(crate) fn map_error(
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
