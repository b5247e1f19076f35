//! Map key and value types shared by the XDP program (`dataplane-ebpf`) and the `xlb` daemon.
//!
//! Both sides compile these exact definitions, so the kernel and userspace cannot disagree about
//! a map's layout. Every type is `#[repr(C)]` with no implicit padding.
//!
//! Byte order: addresses and ports that the XDP program compares with or writes into packet
//! headers are kept as they are on the wire (network byte order, stored in memory byte by byte),
//! so the datapath never converts them; [`wire_ipv4`] and [`wire_port`] make them from
//! userspace values. Ports used only as map keys for classification (`L7_PORTS`, `OPEN_PORTS`)
//! are in host byte order.
#![no_std]

mod flow;
mod stats;

pub use flow::*;
pub use stats::*;

use core::net::{Ipv4Addr, Ipv6Addr};

/// Capacity of the `SHIELDED` map: the LB addresses the shield guards.
pub const MAX_SHIELDED_ADDRS: u32 = 64;

/// Capacity of the `OPEN_PORTS` map: (port, protocol) pairs the shield lets through.
pub const MAX_OPEN_PORTS: u32 = 256;

/// Index in the `PROGRAMS` array of `xlb_ipv6`, which `xlb` tail-calls for IPv6 frames.
pub const PROGRAM_IPV6: u32 = 0;
/// Index of `xlb_ipv6_new_flow`, which `xlb_ipv6` tail-calls to create a flow.
pub const PROGRAM_IPV6_NEW_FLOW: u32 = 1;
/// Index of `xlb_ipv6_icmp`, which `xlb` tail-calls for ICMPv6 frames.
pub const PROGRAM_IPV6_ICMP: u32 = 2;
/// Capacity of the `PROGRAMS` array.
pub const PROGRAM_SLOTS: u32 = 3;

/// Capacity of the `EGRESS` device map: the interfaces frames may be redirected to.
pub const MAX_EGRESS_INTERFACES: u32 = 64;

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

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

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

/// An IPv6 address as the datapath stores it: the header's sixteen bytes, read as four native
/// `u32`s.
pub type Ipv6Wire = [u32; 4];

/// The datapath's form of an IPv6 address (see [`Ipv6Wire`]).
pub const fn wire_ipv6(addr: Ipv6Addr) -> Ipv6Wire {
    let o = addr.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The address a [`wire_ipv6`] value stands for.
pub const fn ipv6_from_wire(wire: Ipv6Wire) -> Ipv6Addr {
    let [a, b, c, d] = wire[0].to_ne_bytes();
    let [e, f, g, h] = wire[1].to_ne_bytes();
    let [i, j, k, l] = wire[2].to_ne_bytes();
    let [m, n, o, p] = wire[3].to_ne_bytes();
    let segment = u16::from_be_bytes;
    Ipv6Addr::new(
        segment([a, b]),
        segment([c, d]),
        segment([e, f]),
        segment([g, h]),
        segment([i, j]),
        segment([k, l]),
        segment([m, n]),
        segment([o, p]),
    )
}

/// The port a [`wire_port`] value stands for.
pub const fn port_from_wire(wire: u16) -> u16 {
    u16::from_be_bytes(wire.to_ne_bytes())
}

/// Key of the shield's `OPEN_PORTS` map: a port (host byte order) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenPort {
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Key of the `SERVICES` and `SERVICES6` maps: what a client addresses (wire byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKeyOf<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

pub type ServiceKey = ServiceKeyOf<u32>;
pub type ServiceKey6 = ServiceKeyOf<Ipv6Wire>;

/// Words of a port bitmap (`SERVICE_PORTS`, `L7_PORTS`): one bit per TCP port, then one per
/// UDP port. An array the verifier inlines the lookup of, where a hash map's costs calls (and
/// with the kernel's return-thunk mitigations each return is dear).
pub const PORT_BITMAP_WORDS: u32 = 2 * 65_536 / 64;

/// Where the bit of `port` (host byte order) for `proto` is in a port bitmap: the word's index
/// and the bit's mask. `None` for a protocol other than TCP and UDP.
pub const fn port_bit(port: u16, proto: u8) -> Option<(u32, u64)> {
    let base = match proto {
        IPPROTO_TCP => 0,
        IPPROTO_UDP => 65_536 / 64,
        _ => return None,
    };
    Some((base + port as u32 / 64, 1 << (port % 64)))
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

/// An element of `BACKENDS` (IPv4) or `BACKENDS6`, indexed by backend id (1.., 0 = none; one
/// id space for both, each id used in one of them): where a new flow is sent and how to reach
/// it. Filled by the daemon once the next hop is resolved; every forwarded packet reads its
/// next hop here, so a neighbour or route change reaches live flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendOf<A> {
    /// Wire order.
    pub addr: A,
    /// Wire order.
    pub port: u16,
    pub _pad: u16,
    /// This LB's address toward the backend: the source of forwarded packets (wire order).
    pub snat_addr: A,
    /// Which endpoint holds the id: a new number each time the id is given to an endpoint, 0
    /// when the id is free. A flow remembers the generation it was created with; when they
    /// differ its backend is gone.
    pub generation: u32,
    pub next_hop: NextHop,
}

pub type Backend = BackendOf<u32>;
pub type Backend6 = BackendOf<Ipv6Wire>;

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
    /// IPv6 SNAT addresses, as `snat_addrs` for IPv4 backends.
    pub snat_addrs6: [Ipv6Wire; MAX_SNAT_ADDRS],
    pub snat_addr6_count: u32,
    pub _pad6: u32,
}

/// An element of the per-CPU `FLOOD_WINDOWS` array, one per service slot: this CPU's new flows
/// in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodWindow {
    pub start_ns: u64,
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
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FlowValue6 {}
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
        assert_eq!(size_of::<ServiceKey6>(), 20);
        assert_eq!(size_of::<Backend6>(), 56);
        assert_eq!(size_of::<FlowKey6>(), 40);
        assert_eq!(size_of::<FlowValue6>(), 80);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!(size_of::<NextHop>(), 16);
        assert_eq!(size_of::<Backend>(), 32);
        assert_eq!(size_of::<Settings>(), 392);
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
        let addr6: Ipv6Addr = "fd00:1:2::3".parse().unwrap();
        let wire = wire_ipv6(addr6);
        assert_eq!(wire[0].to_ne_bytes(), [0xfd, 0, 0, 1]);
        assert_eq!(wire[3].to_ne_bytes(), [0, 0, 0, 3]);
        assert_eq!(ipv6_from_wire(wire), addr6);
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
        let fields6 = FlowKey6 {
            src_addr: [1, 2, 3, 4],
            dst_addr: [5, 6, 7, 8],
            src_port: 0x090a,
            dst_port: 0x0b0c,
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        assert_eq!(
            FlowKey6::new([1, 2, 3, 4], [5, 6, 7, 8], 0x090a, 0x0b0c, IPPROTO_TCP),
            fields6
        );
        let mut set = FlowKey6 {
            src_addr: [u32::MAX; 4],
            dst_addr: [u32::MAX; 4],
            src_port: u16::MAX,
            dst_port: u16::MAX,
            proto: u8::MAX,
            _pad: [u8::MAX; 3],
        };
        set.set(&[1, 2, 3, 4], &[5, 6, 7, 8], 0x090a, 0x0b0c, IPPROTO_TCP);
        assert_eq!(set, fields6, "every byte written, padding zeroed");
    }

    #[test]
    fn a_value_built_in_place_is_the_value_built_from_fields() {
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
        // Over a value with every byte set: `init` must write all of them.
        let mut built = FlowValue {
            last_seen_ns: u64::MAX,
            new_src_addr: u32::MAX,
            new_dst_addr: u32::MAX,
            new_src_port: u16::MAX,
            new_dst_port: u16::MAX,
            next_hop: NextHop {
                ifindex: u32::MAX,
                src_mac: [0xff; 6],
                dst_mac: [0xff; 6],
            },
            service_slot: u32::MAX,
            backend_id: u32::MAX,
            direction: 0xff,
            answered: 0xff,
            established: 0xff,
            fin_from_client: 0xff,
            fin_from_backend: 0xff,
            backend_closed_first: 0xff,
            rst: 0xff,
            _pad: 0xff,
            backend_generation: u32::MAX,
        };
        built.init(
            0x0102_0304_0506_0708,
            (&11, 13),
            (&12, 14),
            &next_hop,
            15,
            16,
            DIRECTION_REPLY,
            17,
        );
        assert_eq!(built, fields);
        let fields6 = FlowValue6 {
            last_seen_ns: fields.last_seen_ns,
            new_src_addr: [11, 21, 31, 41],
            new_dst_addr: [12, 22, 32, 42],
            new_src_port: 13,
            new_dst_port: 14,
            next_hop,
            service_slot: 15,
            backend_id: 16,
            direction: DIRECTION_REPLY,
            backend_generation: 17,
            ..FlowValue6::default()
        };
        let mut built6 = FlowValue6 {
            answered: 1,
            rst: 1,
            ..fields6
        };
        built6.init(
            fields.last_seen_ns,
            (&[11, 21, 31, 41], 13),
            (&[12, 22, 32, 42], 14),
            &next_hop,
            15,
            16,
            DIRECTION_REPLY,
            17,
        );
        assert_eq!(built6, fields6);
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
        assert!(reply.is_peer_of(&forward));
        for other in [
            FlowKey {
                src_addr: 9,
                ..forward
            },
            FlowKey {
                dst_addr: 9,
                ..forward
            },
            FlowKey {
                src_port: 9,
                ..forward
            },
            FlowKey {
                dst_port: 9,
                ..forward
            },
        ] {
            assert!(!reply.is_peer_of(&other), "{other:?}");
        }
        let reply6 = FlowValue6 {
            new_src_addr: [2, 0, 0, 7],
            new_dst_addr: [1, 0, 0, 7],
            new_src_port: 4,
            new_dst_port: 3,
            ..FlowValue6::default()
        };
        let forward6 = FlowKey6::new([1, 0, 0, 7], [2, 0, 0, 7], 3, 4, IPPROTO_TCP);
        assert!(reply6.is_peer_of(&forward6));
        let other6 = FlowKey6::new([1, 0, 0, 8], [2, 0, 0, 7], 3, 4, IPPROTO_TCP);
        assert!(!reply6.is_peer_of(&other6), "the last word differs");
    }
}
