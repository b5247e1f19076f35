//! The L4 fast path's limits and timeouts: what the config may change, with their defaults.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ops::RangeInclusive,
    time::Duration,
};

use serde::Serialize;
use xlb_common::{
    wire_ipv4, wire_ipv6, Timeouts, DEFAULT_FLOW_ENTRIES, DEFAULT_SERVICE_SLOTS, MAX_SNAT_ADDRS,
};

use super::{
    maglev::RingSize,
    service::{Listener, Protocol},
};

/// Idle time after which a UDP flow is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(30);
/// Default idle time after which an established TCP flow is forgotten.
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(3600);
/// Time a TCP flow waits for the client's ACK of the backend's SYN-ACK: a spoofed SYN holds
/// its entries and SNAT tuple this long. Linux clients retry a SYN after 1, 3 and 7 s.
pub const TCP_HANDSHAKE: Duration = Duration::from_secs(10);
/// Time a TCP flow is kept after a RST, or FIN both ways with the client's first, for late
/// segments (the backend closed passively and holds no TIME_WAIT).
pub const TCP_CLOSING: Duration = Duration::from_secs(10);
/// Time a TCP flow's SNAT tuple is held after FIN both ways with the backend's first: Linux's
/// TIME_WAIT (`TCP_TIMEWAIT_LEN`), during which the backend's socket still holds the tuple.
pub const TCP_TIME_WAIT: Duration = Duration::from_secs(60);

/// Ports the shield leaves open by default on the LB addresses, besides L4 services, the L7
/// ports, the admin `ListenAddr` and the node's ephemeral ports: SSH, and what an LB node of
/// a Swarm needs to stay one (cluster management, gossip, the overlay's VXLAN) and to keep
/// its address (DHCP).
pub const DEFAULT_OPEN_PORTS: [Listener; 6] = [
    Listener {
        port: 22,
        protocol: Protocol::Tcp,
    },
    Listener {
        port: 2377,
        protocol: Protocol::Tcp,
    },
    Listener {
        port: 7946,
        protocol: Protocol::Tcp,
    },
    Listener {
        port: 7946,
        protocol: Protocol::Udp,
    },
    Listener {
        port: 4789,
        protocol: Protocol::Udp,
    },
    Listener {
        port: 68,
        protocol: Protocol::Udp,
    },
];

/// How long the flows of a backend that left every service go on: the L7 proxy's default
/// `DrainTimeout`.
pub const BACKEND_DRAIN: Duration = Duration::from_secs(30);

/// Default SNAT source ports: below Linux's default `ip_local_port_range` (32768-60999), so
/// the node's own connections never use a port a flow's reply entry claims, and as many as
/// fit there. A tuple's reply key holds the backend's address and port too, so a port that a
/// service of this node listens on is no conflict. Past the tuples a backend's TIME_WAIT holds
/// (tuples / `TCPTimeWaitTimeout` new flows a second), new flows take tuples in TIME_WAIT, and
/// Linux's per-connection timestamp offsets make the backend refuse about half of those SYNs
/// (the client's retransmission then gets through): 31 744 tuples hold 529 new flows a second
/// per backend and SNAT address clear of that, where 61000-65535 held 75.
pub const DEFAULT_SNAT_PORTS: SnatPorts = SnatPorts {
    first: 1024,
    last: 32767,
};

/// An inclusive range of SNAT source ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SnatPorts {
    pub first: u16,
    pub last: u16,
}

impl SnatPorts {
    /// `first..=last`, unless it is empty or starts at port 0.
    pub fn new(first: u16, last: u16) -> Option<SnatPorts> {
        (first > 0 && first <= last).then_some(SnatPorts { first, last })
    }

    pub fn range(self) -> RangeInclusive<u16> {
        self.first..=self.last
    }

    pub fn overlaps(self, other: RangeInclusive<u16>) -> bool {
        self.first <= *other.end() && *other.start() <= self.last
    }
}

impl fmt::Display for SnatPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Refuses a SNAT range that overlaps the kernel's `ip_local_port_range` (its text, as in
/// `/proc/sys/net/ipv4/ip_local_port_range`): a connection of this node to a backend could then
/// use a port a flow's reply entry claims, and its replies would be taken by XDP.
pub fn check_snat_ports(snat_ports: SnatPorts, local_port_range: &str) -> Result<(), String> {
    let (first, last) = parse_local_ports(local_port_range)?.into_inner();
    if snat_ports.overlaps(first..=last) {
        return Err(format!(
            "the SNAT port range {snat_ports} ([L4] SNATPorts) overlaps the kernel's \
             ip_local_port_range {first}-{last}: choose ports outside it"
        ));
    }
    Ok(())
}

/// The kernel's `ip_local_port_range`, from the text of its /proc file.
pub fn parse_local_ports(local_port_range: &str) -> Result<RangeInclusive<u16>, String> {
    let mut bounds = local_port_range
        .split_whitespace()
        .map(|bound| bound.parse::<u16>());
    match (bounds.next(), bounds.next()) {
        (Some(Ok(first)), Some(Ok(last))) => Ok(first..=last),
        _ => Err(format!(
            "cannot read the kernel's ip_local_port_range from {local_port_range:?}"
        )),
    }
}

/// Everything configurable about the L4 path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L4Settings {
    /// Addresses L4 services answer on; empty = the IPv4 addresses of the XDP interface.
    pub addresses: Vec<IpAddr>,
    /// Source addresses toward backends, shared by all of their family; none of a family =
    /// each backend's route source. Each one adds a whole port range of SNAT tuples per
    /// backend of its family.
    pub snat_addresses: Vec<IpAddr>,
    pub snat_ports: SnatPorts,
    pub ring_size: RingSize,
    /// Connection-table entries; each flow takes two.
    pub flow_entries: u32,
    /// Services (listen port + protocol) that can be steered at once.
    pub service_slots: u32,
    /// An established TCP flow's idle timeout.
    pub tcp_idle: Duration,
    pub tcp_handshake: Duration,
    pub tcp_closing: Duration,
    pub tcp_time_wait: Duration,
    pub udp_idle: Duration,
    /// How long a removed backend's established flows go on before they are cut.
    pub backend_drain: Duration,
    /// New flows per second one service accepts on this node; `None` = no limit.
    pub new_flows_per_second: Option<u32>,
    /// Whether TCP and UDP to the LB addresses on ports nothing serves are dropped in XDP.
    pub shield: bool,
    /// What the shield leaves open (the daemon adds the admin port).
    pub open_ports: Vec<Listener>,
    /// The node's ephemeral ports (`ip_local_port_range`), left open by the shield.
    pub local_ports: Option<RangeInclusive<u16>>,
}

impl Default for L4Settings {
    fn default() -> Self {
        L4Settings {
            addresses: Vec::new(),
            snat_addresses: Vec::new(),
            snat_ports: DEFAULT_SNAT_PORTS,
            ring_size: RingSize::DEFAULT,
            flow_entries: DEFAULT_FLOW_ENTRIES,
            service_slots: DEFAULT_SERVICE_SLOTS,
            tcp_idle: DEFAULT_TCP_IDLE,
            tcp_handshake: TCP_HANDSHAKE,
            tcp_closing: TCP_CLOSING,
            tcp_time_wait: TCP_TIME_WAIT,
            udp_idle: UDP_IDLE,
            backend_drain: BACKEND_DRAIN,
            new_flows_per_second: None,
            shield: true,
            open_ports: DEFAULT_OPEN_PORTS.to_vec(),
            local_ports: None,
        }
    }
}

impl L4Settings {
    /// The XDP program's global `SETTINGS`. `snat_addresses` must hold at most
    /// [`MAX_SNAT_ADDRS`] of each family (the config checks it); more are left out.
    pub fn to_program_settings(&self, cpus: u32) -> xlb_common::Settings {
        let (ipv4, ipv6) = self.snat_addresses_by_family();
        let mut snat_addrs = [0; MAX_SNAT_ADDRS];
        for (slot, addr) in snat_addrs.iter_mut().zip(&ipv4) {
            *slot = wire_ipv4(*addr);
        }
        let mut snat_addrs6 = [[0; 4]; MAX_SNAT_ADDRS];
        for (slot, addr) in snat_addrs6.iter_mut().zip(&ipv6) {
            *slot = wire_ipv6(*addr);
        }
        xlb_common::Settings {
            ring_size: self.ring_size.get(),
            snat_port_first: self.snat_ports.first,
            snat_port_last: self.snat_ports.last,
            snat_addrs,
            snat_addr_count: ipv4.len().min(MAX_SNAT_ADDRS) as u32,
            snat_addrs6,
            snat_addr6_count: ipv6.len().min(MAX_SNAT_ADDRS) as u32,
            _pad6: 0,
            local_port_first: self.local_ports.as_ref().map_or(1, |ports| *ports.start()),
            local_port_last: self.local_ports.as_ref().map_or(0, |ports| *ports.end()),
            _pad: 0,
            new_flows_per_cpu_second: self.new_flows_per_cpu_second(cpus),
            timeouts: self.timeouts(),
        }
    }

    /// The per-service limit shared out over `cpus` (each CPU counts its own, as Katran's
    /// flood threshold does), rounded up so the whole limit is reachable; 0 = none.
    fn new_flows_per_cpu_second(&self, cpus: u32) -> u32 {
        self.new_flows_per_second
            .map_or(0, |limit| limit.div_ceil(cpus.max(1)).max(1))
    }

    /// Every state's timeout, in nanoseconds, as the XDP program and the sweep apply them.
    pub fn timeouts(&self) -> Timeouts {
        let nanos = |duration: Duration| u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        Timeouts {
            tcp_handshake_ns: nanos(self.tcp_handshake),
            tcp_established_ns: nanos(self.tcp_idle),
            tcp_closing_ns: nanos(self.tcp_closing),
            tcp_time_wait_ns: nanos(self.tcp_time_wait),
            udp_ns: nanos(self.udp_idle),
        }
    }

    /// The configured SNAT addresses, IPv4 and IPv6.
    fn snat_addresses_by_family(&self) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
        let mut ipv4 = Vec::new();
        let mut ipv6 = Vec::new();
        for addr in &self.snat_addresses {
            match addr {
                IpAddr::V4(v4) => ipv4.push(*v4),
                IpAddr::V6(v6) => ipv6.push(*v6),
            }
        }
        (ipv4, ipv6)
    }

    /// SNAT tuples per IPv4 backend endpoint: IPv4 SNAT addresses (at least its own) × ports.
    /// The table holds at most this many flows to one endpoint at once, and sustains about
    /// this many new flows to it per [`L4Settings::tcp_time_wait`] when backends close first,
    /// per `tcp_closing` otherwise. The same with IPv6 addresses for IPv6 backends
    /// ([`L4Settings::snat_tuples_per_backend6`]).
    pub fn snat_tuples_per_backend(&self) -> u64 {
        self.snat_tuples(self.snat_addresses_by_family().0.len())
    }

    /// SNAT tuples per IPv6 backend endpoint.
    pub fn snat_tuples_per_backend6(&self) -> u64 {
        self.snat_tuples(self.snat_addresses_by_family().1.len())
    }

    fn snat_tuples(&self, addresses: usize) -> u64 {
        let ports = u64::from(self.snat_ports.last - self.snat_ports.first) + 1;
        ports * addresses.max(1) as u64
    }

    /// `RINGS` entries: two rings per service slot.
    pub fn ring_entries(&self) -> u64 {
        u64::from(self.service_slots) * 2 * u64::from(self.ring_size.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_ranges() {
        assert_eq!(SnatPorts::new(0, 10), None);
        assert_eq!(SnatPorts::new(11, 10), None);
        let ports = SnatPorts::new(61000, 61001).unwrap();
        assert!(ports.overlaps(32768..=61000));
        assert!(!ports.overlaps(32768..=60999));
        assert!(ports.overlaps(61001..=61001));
        assert_eq!(ports.to_string(), "61000-61001");
    }

    #[test]
    fn snat_ports_must_stay_out_of_the_local_port_range() {
        assert_eq!(
            check_snat_ports(DEFAULT_SNAT_PORTS, "32768\t60999\n"),
            Ok(())
        );
        let error = check_snat_ports(SnatPorts::new(60000, 61000).unwrap(), "32768\t60999\n");
        assert_eq!(
            error.unwrap_err(),
            "the SNAT port range 60000-61000 ([L4] SNATPorts) overlaps the kernel's \
             ip_local_port_range 32768-60999: choose ports outside it"
        );
        assert!(check_snat_ports(DEFAULT_SNAT_PORTS, "garbage").is_err());
    }

    #[test]
    fn program_settings_in_nanoseconds_and_wire_order() {
        let value = L4Settings::default().to_program_settings(2);
        assert_eq!(value.new_flows_per_cpu_second, 0);
        assert_eq!(value.ring_size, 65537);
        assert_eq!((value.snat_port_first, value.snat_port_last), (1024, 32767));
        assert_eq!(value.snat_addr_count, 0);
        let timeouts = value.timeouts;
        assert_eq!(timeouts.tcp_established_ns, 3_600_000_000_000);
        assert_eq!(timeouts.tcp_handshake_ns, 10_000_000_000);
        assert_eq!(timeouts.tcp_closing_ns, 10_000_000_000);
        assert_eq!(timeouts.tcp_time_wait_ns, 60_000_000_000);
        assert_eq!(timeouts.udp_ns, 30_000_000_000);

        let two = L4Settings {
            snat_addresses: vec![
                Ipv4Addr::new(10, 0, 0, 1).into(),
                "fd00::1".parse().unwrap(),
                Ipv4Addr::new(10, 0, 0, 2).into(),
            ],
            ..L4Settings::default()
        };
        let value = two.to_program_settings(2);
        assert_eq!(value.snat_addr_count, 2);
        assert_eq!(value.snat_addrs[1].to_ne_bytes(), [10, 0, 0, 2]);
        assert_eq!(value.snat_addr6_count, 1);
        assert_eq!(value.snat_addrs6[0][0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(two.snat_tuples_per_backend(), 2 * 31_744);
        assert_eq!(two.snat_tuples_per_backend6(), 31_744);

        let limited = L4Settings {
            new_flows_per_second: Some(1001),
            ..L4Settings::default()
        };
        assert_eq!(limited.to_program_settings(4).new_flows_per_cpu_second, 251);
        assert_eq!(
            limited.to_program_settings(0).new_flows_per_cpu_second,
            1001
        );
    }
}
