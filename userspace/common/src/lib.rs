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

/// Ports tried for a new flow's SNAT source port before the flow is dropped.
pub const SNAT_ATTEMPTS: u32 = 16;

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

/// One slot of the per-CPU `STATS` array: how many frames, and how many bytes, were counted.
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
    /// An event, counted besides the frame's outcome: a tracked flow had been idle past its
    /// timeout and its entries were removed.
    L4FlowExpired = 22,
    /// Dropped: `bpf_redirect` refused the egress interface.
    L4DropRedirect = 23,
}

impl Stat {
    /// Number of slots in the `STATS` array.
    pub const COUNT: u32 = 24;

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
        Stat::L4FlowExpired,
        Stat::L4DropRedirect,
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
            Stat::L4FlowExpired => "l4_flow_expired",
            Stat::L4DropRedirect => "l4_drop_redirect",
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
/// and how to reach it. Filled by the daemon once the next hop is resolved.
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

/// The single element of the `SETTINGS` array: limits and timeouts chosen by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Maglev ring size (prime); 0 until the daemon configures the program.
    pub ring_size: u32,
    /// SNAT source ports, inclusive, host byte order.
    pub snat_port_first: u16,
    pub snat_port_last: u16,
    pub tcp_idle_ns: u64,
    pub udp_idle_ns: u64,
    /// Timeout once a TCP flow saw FIN both ways, or a RST.
    pub tcp_closing_ns: u64,
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
    /// The key of packets travelling the other way.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// `FlowValue::direction` of an entry for client → backend packets.
pub const DIRECTION_FORWARD: u32 = 0;
/// `FlowValue::direction` of an entry for backend → client packets.
pub const DIRECTION_REPLY: u32 = 1;

/// `FlowValue::close_flags`: the client sent FIN.
pub const CLOSE_FIN_FROM_CLIENT: u32 = 1;
/// `FlowValue::close_flags`: the backend sent FIN.
pub const CLOSE_FIN_FROM_BACKEND: u32 = 2;
/// `FlowValue::close_flags`: either side sent RST.
pub const CLOSE_RST: u32 = 4;

/// Value of the `FLOWS` connection table: how to rewrite and send packets of one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last packet either way.
    pub last_seen_ns: u64,
    /// The packet's new 4-tuple (wire order); reversed, it is the peer entry's key.
    pub new_src_addr: u32,
    pub new_dst_addr: u32,
    pub new_src_port: u16,
    pub new_dst_port: u16,
    pub next_hop: NextHop,
    pub service_slot: u32,
    pub backend_id: u32,
    /// [`DIRECTION_FORWARD`] or [`DIRECTION_REPLY`].
    pub direction: u32,
    /// `CLOSE_*` bits seen so far, kept equal in both entries.
    pub close_flags: u32,
    pub _pad: u32,
}

impl FlowValue {
    /// The key of the entry for the other direction.
    pub const fn peer_key(&self, proto: u8) -> FlowKey {
        FlowKey {
            src_addr: self.new_dst_addr,
            dst_addr: self.new_src_addr,
            src_port: self.new_dst_port,
            dst_port: self.new_src_port,
            proto,
            _pad: [0; 3],
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

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY (all): `#[repr(C)]` structs of integers and byte arrays without padding, for which
    // every bit pattern is valid.
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for ListenPort {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for TrafficCounters {}
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
        assert_eq!(size_of::<Backend>(), 28);
        assert_eq!(size_of::<Settings>(), 32);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<FlowValue>(), 56);
        assert_eq!(size_of::<TrafficCounters>(), 40);
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
