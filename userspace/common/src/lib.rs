//! Map key and value types shared by the XDP program (`dataplane-ebpf`) and the `xlb` daemon.
//!
//! Both sides compile these exact definitions, so the kernel and userspace cannot disagree about
//! a map's layout. Every type is `#[repr(C)]` with no implicit padding.
//!
//! Byte order: addresses and ports that the XDP program compares with or writes into packet
//! headers are kept as they are on the wire (network byte order, stored in memory byte by byte),
//! so the datapath never converts them; [`wire_ipv4`] and [`wire_port`] make them from
//! userspace values. Ports used only as map keys for classification (`L7_PORTS`, `L4_PORTS`) are
//! in host byte order.
#![no_std]

use core::net::Ipv4Addr;

/// Capacity of the `L7_PORTS` map: the TCP ports the userspace proxy listens on.
pub const MAX_L7_PORTS: u32 = 64;

/// Capacity of the `L4_PORTS` map: the (port, protocol) pairs L4 services listen on.
pub const MAX_L4_PORTS: u32 = 1024;

/// Capacity of the `SHIELDED` map: the LB addresses the shield guards.
pub const MAX_SHIELDED_ADDRS: u32 = 64;

/// Capacity of the `OPEN_PORTS` map: (port, protocol) pairs the shield lets through.
pub const MAX_OPEN_PORTS: u32 = 256;

/// Value of the `SHIELDED` and `OPEN_PORTS` maps.
pub const SHIELD_ENTRY: u32 = 1;

/// Capacity of the `SERVICES` map: (LB address, port, protocol) keys. Several keys (one per LB
/// address) share one service slot.
pub const MAX_SERVICE_KEYS: u32 = 4096;

/// Default number of service slots: each has two Maglev rings (a double buffer) in `RINGS` and
/// a counter slot in `SERVICE_STATS`. The daemon sizes `RINGS` as slots × 2 × ring size.
pub const DEFAULT_SERVICE_SLOTS: u32 = 32;

/// Capacity of `BACKENDS` and `BACKEND_STATS`, id 0 included (it means "no backend").
pub const MAX_BACKENDS: u32 = 4096;

/// Backend id 0: an empty ring position, or a service without endpoints.
pub const NO_BACKEND: u32 = 0;

/// Maglev lookup table size: a prime, so every skip is coprime with it.
pub const DEFAULT_RING_SIZE: u32 = 65537;

/// Default connection-table capacity, in entries (each flow takes two: forward and reply).
pub const DEFAULT_FLOW_ENTRIES: u32 = 262_144;

/// SNAT tuples tried for a new flow before it is dropped: the free one, or the first whose
/// holder has expired, is taken; failing both, the oldest TIME_WAIT hold seen (see
/// [`FlowState::TimeWait`]).
pub const SNAT_ATTEMPTS: u32 = 16;

/// Of those, how many follow this CPU's walk over the tuples; the rest are picked at random.
pub const SNAT_WALK_ATTEMPTS: u32 = 4;

/// Most SNAT addresses a node can use (`[L4] SNATAddresses`).
pub const MAX_SNAT_ADDRS: usize = 16;

/// An entry whose peer is missing is taken for an orphan (and removed, by a colliding new
/// flow or by the sweep) only once it is this old: a new flow's reply entry goes in a moment
/// before its forward entry, and another CPU may look at it in between.
pub const HALF_PAIR_GRACE_NS: u64 = 2_000_000_000;

/// A flow entry's `last_seen_ns` is rewritten only when it is older than this: an established
/// flow's packets then write nothing to the shared table but once a second (timeouts are
/// seconds long, so the coarser age costs nothing).
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// An IPv4 address as the datapath stores it: the header's four bytes, read as a native `u32`.
pub const fn wire_ipv4(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The address a [`wire_ipv4`] value stands for.
pub const fn ipv4_from_wire(wire: u32) -> Ipv4Addr {
    let [a, b, c, d] = wire.to_ne_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// A port as the datapath stores it: the header's two bytes, read as a native `u16`.
pub const fn wire_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The port a [`wire_port`] value stands for.
pub const fn port_from_wire(wire: u16) -> u16 {
    u16::from_be_bytes(wire.to_ne_bytes())
}

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
    /// An IPv4 TCP/UDP packet to an L4 service's (LB address, port, protocol).
    ClassL4Service = 9,
    /// An IPv4 TCP/UDP packet from a backend to an LB address and SNAT port of a tracked flow.
    ClassL4Reply = 10,
    /// An IPv6 TCP/UDP packet to an L4 service's port: passed untouched (IPv4-only NAT).
    ClassL4Ipv6 = 11,
    /// A new flow was steered to a backend (TCP SYN or first UDP datagram).
    L4NewFlow = 12,
    /// A packet of a tracked flow was forwarded to its backend.
    L4Forwarded = 13,
    /// A backend's reply was forwarded to its client.
    L4Replied = 14,
    /// Passed: a TCP segment without SYN for a service, with no tracked flow (the kernel answers).
    L4PassNoFlow = 15,
    /// Passed: an IP fragment for a service (ports cannot be rewritten in later fragments).
    L4PassFragment = 16,
    /// Passed: TTL would expire; the kernel answers with ICMP.
    L4PassTtl = 17,
    /// Dropped: the service has no backend (empty ring or id 0 at the hashed position).
    L4DropNoBackend = 18,
    /// Dropped: no free SNAT source port after `SNAT_ATTEMPTS` tries.
    L4DropSnatExhausted = 19,
    /// Dropped: the connection table refused the entries.
    L4DropFlowTable = 20,
    /// Dropped: a tracked flow whose other entry vanished (evicted); both are removed.
    L4DropFlowLost = 21,
    /// An event: a SYN on the tuple of a flow that is over (closed, or idle past its timeout)
    /// removed its entries and started a new flow (the client reused its port).
    L4FlowReopened = 22,
    /// Dropped: `bpf_redirect` refused the egress interface.
    L4DropRedirect = 23,
    /// An event, counted besides `L4NewFlow`: the new flow took the SNAT tuple of an expired
    /// flow, whose entries were removed.
    L4FlowReclaimed = 24,
    /// An event, counted besides `L4NewFlow`: every SNAT tuple tried was live, so the new flow
    /// took one the backend may still hold in TIME_WAIT (it accepts the new SYN when it is
    /// newer, RFC 6191, and otherwise frees it on the client's RST: a one-second retry).
    L4SnatTimeWaitReused = 25,
    /// An event: a packet's flow led to a backend that is gone (removed from the service, its
    /// id free or given to another endpoint); its entries were removed. A TCP segment is then
    /// passed, and the kernel, which has no socket for it, resets the client; a UDP datagram
    /// starts a new flow to a live backend.
    L4FlowBackendGone = 26,
    /// Dropped: the service's new-flow limit for this second is spent (a SYN flood, or more
    /// clients than `[L4] NewFlowsPerSecond` allows); established flows are not affected.
    L4DropFlood = 27,
    /// Dropped by the shield: TCP to an LB address on a port nothing here serves (no L4
    /// service, no L7 port, not open, not an ephemeral port of this node's own connections).
    ShieldDropTcp = 28,
    /// Dropped by the shield: the same for UDP.
    ShieldDropUdp = 29,
    /// An ICMP error (unreachable, time exceeded, parameter problem) quoting a packet of a
    /// tracked flow.
    ClassL4Icmp = 30,
    /// Such an error from the backend's side, translated and sent to the client.
    L4IcmpToClient = 31,
    /// Such an error from the client's side, translated and sent to the backend.
    L4IcmpToBackend = 32,
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
        Stat::ClassL4Ipv6,
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
            Stat::ClassL4Ipv6 => "class_l4_ipv6",
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

/// Key of the `L4_PORTS` map: a port (host byte order) and protocol some L4 service listens on,
/// whatever the address. Only IPv6 classification uses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenPort {
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the `L4_PORTS` map.
pub const L4_PORT_ENABLED: u32 = 1;

/// Key of the `SERVICES` map: what a client addresses (wire byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the `SERVICES` map.
///
/// A hash-map update replaces the whole value at once, so flipping `active_ring` after the
/// inactive ring was written is the atomic table swap: a packet sees either table, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// The service slot: its counters in `SERVICE_STATS` and its ring pair in `RINGS`.
    pub slot: u32,
    /// Which of the slot's two rings is live (0 or 1).
    pub active_ring: u32,
}

/// Index into `RINGS` of `position` in ring `ring` (0 or 1) of service `slot`.
pub const fn ring_index(slot: u32, ring: u32, ring_size: u32, position: u32) -> u32 {
    (slot * 2 + ring) * ring_size + position
}

/// An element of `BACKENDS`, indexed by backend id (1.., 0 = none): where a new flow is sent
/// and how to reach it. Filled by the daemon once the next hop is resolved; every forwarded
/// packet reads its next hop here, so a neighbour or route change reaches live flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Wire order.
    pub addr: u32,
    /// Wire order.
    pub port: u16,
    pub _pad: u16,
    /// This LB's address toward the backend: the source of forwarded packets (wire order).
    pub snat_addr: u32,
    /// Which endpoint holds the id: a new number each time the id is given to an endpoint, 0
    /// when the id is free. A flow remembers the generation it was created with; when they
    /// differ its backend is gone.
    pub generation: u32,
    pub next_hop: NextHop,
}

/// How a rewritten frame leaves: the egress interface and the Ethernet addresses to write.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// The program's read-only global `SETTINGS`, set by the daemon when it loads the program (the
/// verifier then knows them as constants): limits and timeouts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Maglev ring size (prime); 0 until the daemon configures the program.
    pub ring_size: u32,
    /// SNAT source ports, inclusive, host byte order.
    pub snat_port_first: u16,
    pub snat_port_last: u16,
    /// SNAT addresses (wire order) shared by every backend; when `snat_addr_count` is 0 each
    /// backend's own `Backend::snat_addr` (this node's route source toward it) is used.
    pub snat_addrs: [u32; MAX_SNAT_ADDRS],
    pub snat_addr_count: u32,
    /// This node's ephemeral ports (`ip_local_port_range`, host order), which the shield
    /// leaves open: replies to the node's own connections arrive on them.
    pub local_port_first: u16,
    pub local_port_last: u16,
    pub _pad: u32,
    /// New flows one CPU lets into one service per second (the configured per-service limit
    /// shared out over the CPUs, as Katran counts its flood threshold per CPU); 0 = no limit.
    pub new_flows_per_cpu_second: u32,
    pub timeouts: Timeouts,
}

/// How long a flow in each [`FlowState`] may stay idle before its entries may be removed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_handshake_ns: u64,
    pub tcp_established_ns: u64,
    pub tcp_closing_ns: u64,
    pub tcp_time_wait_ns: u64,
    pub udp_ns: u64,
}

impl Timeouts {
    pub const fn for_state(&self, state: FlowState) -> u64 {
        match state {
            FlowState::Handshake => self.tcp_handshake_ns,
            FlowState::Established => self.tcp_established_ns,
            FlowState::Closing => self.tcp_closing_ns,
            FlowState::TimeWait => self.tcp_time_wait_ns,
            FlowState::Udp => self.udp_ns,
        }
    }
}

/// Where a tracked flow is in its life, from the latches of its two entries (see
/// [`FlowValue`]). The XDP program and the daemon's sweep read it through the same function,
/// so they agree on when a flow may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowState {
    /// TCP, until the client ACKs the backend's SYN-ACK: a spoofed SYN never gets further, so
    /// it is held only briefly.
    Handshake,
    Established,
    /// TCP after a RST, or FIN both ways with the client's first: the backend closed passively
    /// and holds no TIME_WAIT, so only late segments are waited for.
    Closing,
    /// TCP after FIN both ways with the backend's first: the backend's socket sits in
    /// TIME_WAIT on the SNAT tuple, which is not reused until it is over (unless every other
    /// tuple is live, see `Stat::L4SnatTimeWaitReused`).
    TimeWait,
    Udp,
}

impl FlowState {
    pub const ALL: [FlowState; 5] = [
        FlowState::Handshake,
        FlowState::Established,
        FlowState::Closing,
        FlowState::TimeWait,
        FlowState::Udp,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FlowState::Handshake => "handshake",
            FlowState::Established => "established",
            FlowState::Closing => "closing",
            FlowState::TimeWait => "time_wait",
            FlowState::Udp => "udp",
        }
    }
}

/// Key of the `FLOWS` connection table: a packet's 5-tuple as received (wire order).
///
/// A flow has two entries: the forward one keyed by (client → LB address:service port) and
/// the reply one keyed by (backend → LB SNAT address:SNAT port). Each one's peer key is the
/// tuple it rewrites to, reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key of a 5-tuple (wire order), padding zeroed.
    ///
    /// Built as four 32-bit words: written field by field, the XDP program would fill the
    /// 3-byte padding with a call to `memset` on every packet.
    #[inline(always)]
    pub const fn new(
        src_addr: u32,
        dst_addr: u32,
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> FlowKey {
        let [s0, s1] = src_port.to_ne_bytes();
        let [d0, d1] = dst_port.to_ne_bytes();
        let words = [
            src_addr,
            dst_addr,
            u32::from_ne_bytes([s0, s1, d0, d1]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: FlowKey is `repr(C)`, 16 bytes of integers without implicit padding, the
        // fields laid out as the words are; every bit pattern is a valid FlowKey.
        unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
    }

    /// The key of packets travelling the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> FlowKey {
        FlowKey::new(
            self.dst_addr,
            self.src_addr,
            self.dst_port,
            self.src_port,
            self.proto,
        )
    }
}

/// `FlowValue::direction` of an entry for client → backend packets.
pub const DIRECTION_FORWARD: u8 = 0;
/// `FlowValue::direction` of an entry for backend → client packets.
pub const DIRECTION_REPLY: u8 = 1;

/// Value of the `FLOWS` connection table: how to rewrite and send packets of one direction.
///
/// The TCP progress is kept as one-way latches, one byte each, written with plain stores
/// (from 0 to 1) into both entries: two CPUs updating a flow at once can each only set what was seen, so
/// no atomic read-modify-write is needed. The one exception is `rst`, cleared again when the
/// backend keeps talking after it (a blind RST from outside, which the backend answers with a
/// challenge ACK, RFC 5961, does not close the flow). A SYN on a closed flow's tuple clears
/// them all (the client reopened it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC to within a tick) of this direction's last
    /// packet, to within
    /// [`LAST_SEEN_GRANULARITY_NS`]. A flow is idle since the later of its two entries'.
    pub last_seen_ns: u64,
    /// The packet's new 4-tuple (wire order); reversed, it is the peer entry's key.
    pub new_src_addr: u32,
    pub new_dst_addr: u32,
    pub new_src_port: u16,
    pub new_dst_port: u16,
    /// Reply entries: toward the client. Forward entries read theirs from `BACKENDS`.
    pub next_hop: NextHop,
    pub service_slot: u32,
    pub backend_id: u32,
    /// [`DIRECTION_FORWARD`] or [`DIRECTION_REPLY`].
    pub direction: u8,
    /// TCP: the backend answered the SYN (SYN-ACK seen).
    pub answered: u8,
    /// TCP: the client ACKed after the backend's SYN-ACK.
    pub established: u8,
    pub fin_from_client: u8,
    pub fin_from_backend: u8,
    /// TCP: the backend's FIN came while the client had sent none.
    pub backend_closed_first: u8,
    /// TCP: a RST was seen and the backend has not sent anything since.
    pub rst: u8,
    pub _pad: u8,
    /// `Backend::generation` of `backend_id` when the flow was created.
    pub backend_generation: u32,
}

impl FlowValue {
    /// A new flow's entry for one direction: every latch clear, last seen at `last_seen_ns`.
    ///
    /// Built as fourteen 32-bit words, like [`FlowKey::new`]: field by field, the XDP program
    /// would clear the latches with a call to a byte-looping `memset` on every new flow.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub const fn new(
        last_seen_ns: u64,
        (new_src_addr, new_src_port): (u32, u16),
        (new_dst_addr, new_dst_port): (u32, u16),
        next_hop: &NextHop,
        service_slot: u32,
        backend_id: u32,
        direction: u8,
        backend_generation: u32,
    ) -> FlowValue {
        let [s0, s1] = new_src_port.to_ne_bytes();
        let [d0, d1] = new_dst_port.to_ne_bytes();
        let [m0, m1, m2, m3, m4, m5] = next_hop.src_mac;
        let [n0, n1, n2, n3, n4, n5] = next_hop.dst_mac;
        let [t0, t1, t2, t3, t4, t5, t6, t7] = last_seen_ns.to_ne_bytes();
        let words: [u32; 14] = [
            u32::from_ne_bytes([t0, t1, t2, t3]),
            u32::from_ne_bytes([t4, t5, t6, t7]),
            new_src_addr,
            new_dst_addr,
            u32::from_ne_bytes([s0, s1, d0, d1]),
            next_hop.ifindex,
            u32::from_ne_bytes([m0, m1, m2, m3]),
            u32::from_ne_bytes([m4, m5, n0, n1]),
            u32::from_ne_bytes([n2, n3, n4, n5]),
            service_slot,
            backend_id,
            u32::from_ne_bytes([direction, 0, 0, 0]),
            0,
            backend_generation,
        ];
        // SAFETY: FlowValue is `repr(C)`, 56 bytes of integers and byte arrays without
        // implicit padding, laid out as the words are; every bit pattern is valid.
        unsafe { core::mem::transmute::<[u32; 14], FlowValue>(words) }
    }

    /// The key of the entry for the other direction.
    #[inline(always)]
    pub const fn peer_key(&self, proto: u8) -> FlowKey {
        FlowKey::new(
            self.new_dst_addr,
            self.new_src_addr,
            self.new_dst_port,
            self.new_src_port,
            proto,
        )
    }
}

/// The state of the flow whose entries are `entry` and `peer` (either order), for a packet
/// or entry of protocol `proto`. Latches are read from both: a CPU that set one entry's and
/// not yet the other's has still seen it.
#[inline(always)]
pub const fn flow_state(proto: u8, entry: &FlowValue, peer: &FlowValue) -> FlowState {
    if proto != IPPROTO_TCP {
        return FlowState::Udp;
    }
    if either(entry.rst, peer.rst) {
        return FlowState::Closing;
    }
    let fins = either(entry.fin_from_client, peer.fin_from_client)
        && either(entry.fin_from_backend, peer.fin_from_backend);
    if fins {
        return if either(entry.backend_closed_first, peer.backend_closed_first) {
            FlowState::TimeWait
        } else {
            FlowState::Closing
        };
    }
    if either(entry.established, peer.established) {
        FlowState::Established
    } else {
        FlowState::Handshake
    }
}

/// Is a latch set in either entry?
#[inline(always)]
const fn either(entry_latch: u8, peer_latch: u8) -> bool {
    entry_latch | peer_latch != 0
}

/// When the flow of `entry` and `peer` last carried a packet.
#[inline(always)]
pub const fn flow_last_seen(entry: &FlowValue, peer: &FlowValue) -> u64 {
    if entry.last_seen_ns > peer.last_seen_ns {
        entry.last_seen_ns
    } else {
        peer.last_seen_ns
    }
}

/// Has the flow of `entry` and `peer` been idle past its state's timeout at `now`?
/// `timeout` gives a state's timeout (the XDP program reads each from its global settings,
/// userspace from [`Timeouts::for_state`]).
#[inline(always)]
pub fn flow_expired(
    timeout: impl Fn(FlowState) -> u64,
    proto: u8,
    entry: &FlowValue,
    peer: &FlowValue,
    now: u64,
) -> bool {
    let timeout = timeout(flow_state(proto, entry, peer));
    now.saturating_sub(flow_last_seen(entry, peer)) > timeout
}

/// An element of the per-CPU `FLOOD_WINDOWS` array, one per service slot: this CPU's new flows
/// in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodWindow {
    pub start_ns: u64,
    pub new_flows: u64,
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

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY (all): `#[repr(C)]` structs of integers and byte arrays without padding, for which
    // every bit pattern is valid.
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for StatsBlock {}
    unsafe impl aya::Pod for ListenPort {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for FloodWindow {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<ListenPort>(), 4);
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<NextHop>(), 16);
        assert_eq!(size_of::<Backend>(), 32);
        assert_eq!(size_of::<Settings>(), 128);
        assert_eq!(size_of::<Timeouts>(), 40);
        assert_eq!(size_of::<StatsBlock>(), 16 * Stat::COUNT as usize);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<FlowValue>(), 56);
        assert_eq!(size_of::<TrafficCounters>(), 40);
    }

    #[test]
    fn a_tcp_flow_goes_through_its_states() {
        let tcp = |configure: fn(&mut FlowValue)| {
            let mut entry = FlowValue::default();
            configure(&mut entry);
            flow_state(IPPROTO_TCP, &entry, &FlowValue::default())
        };
        assert_eq!(tcp(|_| {}), FlowState::Handshake);
        assert_eq!(tcp(|f| f.answered = 1), FlowState::Handshake);
        assert_eq!(tcp(|f| f.established = 1), FlowState::Established);
        let one_fin = |f: &mut FlowValue| {
            f.established = 1;
            f.fin_from_client = 1;
        };
        assert_eq!(tcp(one_fin), FlowState::Established, "a half-close is open");
        let client_first = |f: &mut FlowValue| {
            f.established = 1;
            f.fin_from_client = 1;
            f.fin_from_backend = 1;
        };
        assert_eq!(tcp(client_first), FlowState::Closing);
        let backend_first = |f: &mut FlowValue| {
            f.established = 1;
            f.fin_from_client = 1;
            f.fin_from_backend = 1;
            f.backend_closed_first = 1;
        };
        assert_eq!(tcp(backend_first), FlowState::TimeWait);
        assert_eq!(tcp(|f| f.rst = 1), FlowState::Closing);
        assert_eq!(
            flow_state(IPPROTO_UDP, &FlowValue::default(), &FlowValue::default()),
            FlowState::Udp
        );
    }

    #[test]
    fn latches_count_from_either_entry_and_age_from_the_later() {
        let forward = FlowValue {
            last_seen_ns: 100,
            established: 1,
            fin_from_client: 1,
            ..FlowValue::default()
        };
        let reply = FlowValue {
            last_seen_ns: 250,
            fin_from_backend: 1,
            ..FlowValue::default()
        };
        assert_eq!(
            flow_state(IPPROTO_TCP, &forward, &reply),
            FlowState::Closing
        );
        assert_eq!(
            flow_state(IPPROTO_TCP, &reply, &forward),
            FlowState::Closing
        );
        assert_eq!(flow_last_seen(&forward, &reply), 250);
        let timeouts = Timeouts {
            tcp_closing_ns: 50,
            ..Timeouts::default()
        };
        let timeout = |state| timeouts.for_state(state);
        assert!(!flow_expired(timeout, IPPROTO_TCP, &forward, &reply, 300));
        assert!(flow_expired(timeout, IPPROTO_TCP, &reply, &forward, 301));
    }

    #[test]
    fn stat_names_are_unique_and_in_index_order() {
        for (index, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, index);
        }
        let mut names: [&str; Stat::COUNT as usize] = [""; Stat::COUNT as usize];
        for (slot, stat) in names.iter_mut().zip(Stat::ALL) {
            *slot = stat.name();
        }
        names.sort_unstable();
        assert!(names.windows(2).all(|pair| pair[0] != pair[1]));
    }

    #[test]
    fn wire_values_are_header_bytes() {
        let addr = Ipv4Addr::new(10, 1, 2, 3);
        assert_eq!(wire_ipv4(addr).to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(ipv4_from_wire(wire_ipv4(addr)), addr);
        assert_eq!(wire_port(0x1234).to_ne_bytes(), [0x12, 0x34]);
        assert_eq!(port_from_wire(wire_port(5432)), 5432);
    }

    #[test]
    fn a_key_built_from_words_is_the_key_built_from_fields() {
        let fields = FlowKey {
            src_addr: 0x0102_0304,
            dst_addr: 0x0506_0708,
            src_port: 0x090a,
            dst_port: 0x0b0c,
            proto: IPPROTO_UDP,
            _pad: [0; 3],
        };
        assert_eq!(
            FlowKey::new(0x0102_0304, 0x0506_0708, 0x090a, 0x0b0c, IPPROTO_UDP),
            fields
        );
    }

    #[test]
    fn a_value_built_from_words_is_the_value_built_from_fields() {
        let next_hop = NextHop {
            ifindex: 7,
            src_mac: [1, 2, 3, 4, 5, 6],
            dst_mac: [7, 8, 9, 10, 11, 12],
        };
        let fields = FlowValue {
            last_seen_ns: 0x0102_0304_0506_0708,
            new_src_addr: 11,
            new_dst_addr: 12,
            new_src_port: 13,
            new_dst_port: 14,
            next_hop,
            service_slot: 15,
            backend_id: 16,
            direction: DIRECTION_REPLY,
            backend_generation: 17,
            ..FlowValue::default()
        };
        let words = FlowValue::new(
            0x0102_0304_0506_0708,
            (11, 13),
            (12, 14),
            &next_hop,
            15,
            16,
            DIRECTION_REPLY,
            17,
        );
        assert_eq!(words, fields);
    }

    #[test]
    fn a_reply_entrys_peer_is_the_forward_key() {
        let forward = FlowKey {
            src_addr: 1,
            dst_addr: 2,
            src_port: 3,
            dst_port: 4,
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let reply = FlowValue {
            new_src_addr: 2,
            new_dst_addr: 1,
            new_src_port: 4,
            new_dst_port: 3,
            ..FlowValue::default()
        };
        assert_eq!(reply.peer_key(IPPROTO_TCP), forward);
        assert_eq!(forward.reversed().reversed(), forward);
    }
}
