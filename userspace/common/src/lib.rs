//! Map key and value types shared by the XDP program (`dataplane-ebpf`) and the `xlb` daemon.
//!
//! Both sides compile these exact definitions, so the kernel and userspace cannot disagree about
//! a map's layout. Every type is `#[repr(C)]` with no implicit padding.
#![no_std]

/// Capacity of the `L7_PORTS` map: the TCP ports the userspace proxy listens on.
pub const MAX_L7_PORTS: u32 = 64;

/// One slot of the per-CPU `STATS` array: how many frames, and how many bytes, were counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: two u64 fields, no padding, every bit pattern valid.
unsafe impl aya::Pod for Counter {}

/// Indexes into the `STATS` array. Every frame is counted three times: once on entry
/// (`Received`), once by class and once by final verdict.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Received = 0,
    /// A well-formed TCP segment to one of the userspace proxy's listener ports.
    ClassL7 = 1,
    /// A well-formed frame that is not for a proxy listener (other ports, UDP, ARP, ...).
    ClassOther = 2,
    /// A frame whose headers are truncated or inconsistent.
    ClassMalformed = 3,
    VerdictPass = 4,
    VerdictDrop = 5,
    VerdictTx = 6,
    VerdictRedirect = 7,
    VerdictAborted = 8,
}

impl Stat {
    /// Number of slots in the `STATS` array.
    pub const COUNT: u32 = 9;

    /// All stats, in index order.
    pub const ALL: [Stat; Stat::COUNT as usize] = [
        Stat::Received,
        Stat::ClassL7,
        Stat::ClassOther,
        Stat::ClassMalformed,
        Stat::VerdictPass,
        Stat::VerdictDrop,
        Stat::VerdictTx,
        Stat::VerdictRedirect,
        Stat::VerdictAborted,
    ];

    /// The name userspace reports this stat under.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Received => "received",
            Stat::ClassL7 => "class_l7",
            Stat::ClassOther => "class_other",
            Stat::ClassMalformed => "class_malformed",
            Stat::VerdictPass => "verdict_pass",
            Stat::VerdictDrop => "verdict_drop",
            Stat::VerdictTx => "verdict_tx",
            Stat::VerdictRedirect => "verdict_redirect",
            Stat::VerdictAborted => "verdict_aborted",
        }
    }

    /// The stat that counts an XDP action (`XDP_PASS` = 2, ...).
    pub const fn for_verdict(action: u32) -> Stat {
        match action {
            1 => Stat::VerdictDrop,
            2 => Stat::VerdictPass,
            3 => Stat::VerdictTx,
            4 => Stat::VerdictRedirect,
            _ => Stat::VerdictAborted,
        }
    }
}

/// Value of the `L7_PORTS` hash map, keyed by a TCP port in host byte order.
pub const L7_PORT_ENABLED: u32 = 1;
