//! The program's counters: what every frame is counted under, per CPU, and per service and
//! backend.

/// The single element of the per-CPU `STATS` array: every counter of one CPU, so a frame's
/// counts cost one map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsBlock {
    pub counters: [Counter; Stat::COUNT as usize],
}

impl Default for StatsBlock {
    fn default() -> Self {
        StatsBlock {
            counters: [Counter::default(); Stat::COUNT as usize],
        }
    }
}

/// How many frames, and how many bytes, were counted under one [`Stat`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Indexes into the `STATS` array. Every frame is counted on entry (`Received`), once by class
/// and once by final verdict; frames of L4 services are also counted by what happened to them
/// (the `L4*` outcomes, one per frame that reaches the L4 path).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    Received = 0,
    /// A well-formed TCP segment to one of the userspace proxy's listener ports.
    ClassL7 = 1,
    /// A well-formed frame that is not for a proxy listener or an L4 service.
    ClassOther = 2,
    /// A frame whose headers are truncated or inconsistent.
    ClassMalformed = 3,
    VerdictPass = 4,
    VerdictDrop = 5,
    VerdictTx = 6,
    VerdictRedirect = 7,
    VerdictAborted = 8,
    /// A TCP/UDP packet (IPv4 or IPv6) to an L4 service's (LB address, port, protocol).
    ClassL4Service = 9,
    /// A TCP/UDP packet (IPv4 or IPv6) from a backend to an LB address and SNAT port of a
    /// tracked flow.
    ClassL4Reply = 10,
    /// A new flow was steered to a backend (TCP SYN or first UDP datagram).
    L4NewFlow = 11,
    /// A packet of a tracked flow was forwarded to its backend.
    L4Forwarded = 12,
    /// A backend's reply was forwarded to its client.
    L4Replied = 13,
    /// Passed: a TCP segment without SYN for a service, with no tracked flow (the kernel answers).
    L4PassNoFlow = 14,
    /// Passed: an IP fragment for a service (ports cannot be rewritten in later fragments).
    L4PassFragment = 15,
    /// Passed: TTL would expire; the kernel answers with ICMP.
    L4PassTtl = 16,
    /// Dropped: the service has no backend (empty ring or id 0 at the hashed position).
    L4DropNoBackend = 17,
    /// Dropped: no free SNAT source port after `SNAT_ATTEMPTS` tries.
    L4DropSnatExhausted = 18,
    /// Dropped: the connection table refused the entries.
    L4DropFlowTable = 19,
    /// Dropped: a packet (other than a connection request) of a tracked flow whose other
    /// entry is gone or another flow's; the entry left is removed.
    L4DropFlowLost = 20,
    /// An event: a SYN on the tuple of a flow that is over (closed, or idle past its timeout)
    /// removed its entries and started a new flow (the client reused its port).
    L4FlowReopened = 21,
    /// Dropped: the egress interface is not in `EGRESS` (the program is not attached to it, or
    /// it cannot transmit XDP frames now: a veth whose peer has neither XDP nor GRO).
    L4DropRedirect = 22,
    /// An event, counted besides `L4NewFlow`: the new flow took the SNAT tuple of an expired
    /// flow, or, with every other tuple tried live, of a closing one; its entries were removed.
    L4FlowReclaimed = 23,
    /// An event, counted besides `L4NewFlow`: every SNAT tuple tried was live or in TIME_WAIT,
    /// so the new flow took one the backend may still hold in TIME_WAIT (it accepts the new
    /// SYN when its timestamp is newer, RFC 6191, and otherwise answers with an ACK that has
    /// the client reset it: a one-second retry, what a refused SYN costs anyway).
    L4SnatTimeWaitReused = 24,
    /// An event: a packet's flow led to a backend that is gone (removed from the service, its
    /// id free or given to another endpoint); its entries were removed. A TCP segment is then
    /// passed, and the kernel, which has no socket for it, resets the client; a UDP datagram
    /// starts a new flow to a live backend.
    L4FlowBackendGone = 25,
    /// Dropped: the service's new-flow limit for this second is spent (a SYN flood, or more
    /// clients than `[L4] NewFlowsPerSecond` allows); established flows are not affected.
    L4DropFlood = 26,
    /// Dropped by the shield: TCP to an LB address on a port nothing here serves (no L4
    /// service, no L7 port, not open, not an ephemeral port of this node's own connections).
    ShieldDropTcp = 27,
    /// Dropped by the shield: the same for UDP.
    ShieldDropUdp = 28,
    /// An ICMP error (unreachable, time exceeded, parameter problem) quoting a packet of a
    /// tracked flow.
    ClassL4Icmp = 29,
    /// Such an error from the backend's side, translated and sent to the client.
    L4IcmpToClient = 30,
    /// Such an error from the client's side, translated and sent to the backend.
    L4IcmpToBackend = 31,
    /// An event: a connection request found its tuple's entry without its peer (another CPU,
    /// or the sweep, removing the flow's pair between the packet's two lookups; or a new flow
    /// that took the tuple over); the entry left was removed and the packet started a new flow.
    L4FlowOrphaned = 32,
}

impl Stat {
    /// Number of slots in the `STATS` array.
    pub const COUNT: u32 = 33;

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
        Stat::ClassL4Service,
        Stat::ClassL4Reply,
        Stat::L4NewFlow,
        Stat::L4Forwarded,
        Stat::L4Replied,
        Stat::L4PassNoFlow,
        Stat::L4PassFragment,
        Stat::L4PassTtl,
        Stat::L4DropNoBackend,
        Stat::L4DropSnatExhausted,
        Stat::L4DropFlowTable,
        Stat::L4DropFlowLost,
        Stat::L4FlowReopened,
        Stat::L4DropRedirect,
        Stat::L4FlowReclaimed,
        Stat::L4SnatTimeWaitReused,
        Stat::L4FlowBackendGone,
        Stat::L4DropFlood,
        Stat::ShieldDropTcp,
        Stat::ShieldDropUdp,
        Stat::ClassL4Icmp,
        Stat::L4IcmpToClient,
        Stat::L4IcmpToBackend,
        Stat::L4FlowOrphaned,
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
            Stat::ClassL4Service => "class_l4_service",
            Stat::ClassL4Reply => "class_l4_reply",
            Stat::L4NewFlow => "l4_new_flow",
            Stat::L4Forwarded => "l4_forwarded",
            Stat::L4Replied => "l4_replied",
            Stat::L4PassNoFlow => "l4_pass_no_flow",
            Stat::L4PassFragment => "l4_pass_fragment",
            Stat::L4PassTtl => "l4_pass_ttl",
            Stat::L4DropNoBackend => "l4_drop_no_backend",
            Stat::L4DropSnatExhausted => "l4_drop_snat_exhausted",
            Stat::L4DropFlowTable => "l4_drop_flow_table",
            Stat::L4DropFlowLost => "l4_drop_flow_lost",
            Stat::L4FlowReopened => "l4_flow_reopened",
            Stat::L4DropRedirect => "l4_drop_redirect",
            Stat::L4FlowReclaimed => "l4_flow_reclaimed",
            Stat::L4SnatTimeWaitReused => "l4_snat_time_wait_reused",
            Stat::L4FlowBackendGone => "l4_flow_backend_gone",
            Stat::L4DropFlood => "l4_drop_flood",
            Stat::ShieldDropTcp => "shield_drop_tcp",
            Stat::ShieldDropUdp => "shield_drop_udp",
            Stat::ClassL4Icmp => "class_l4_icmp",
            Stat::L4IcmpToClient => "l4_icmp_to_client",
            Stat::L4IcmpToBackend => "l4_icmp_to_backend",
            Stat::L4FlowOrphaned => "l4_flow_orphaned",
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

/// Per-CPU traffic of one service slot (`SERVICE_STATS`) or backend (`BACKEND_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    /// Client → backend packets and bytes, as received.
    pub forward_packets: u64,
    pub forward_bytes: u64,
    /// Backend → client packets and bytes, as received.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub new_flows: u64,
}
