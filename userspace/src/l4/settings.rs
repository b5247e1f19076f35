//! The L4 fast path's limits and timeouts: what the config may change, with their defaults.

use std::{fmt, net::IpAddr, ops::RangeInclusive, time::Duration};

use serde::Serialize;
use xlb_common::{DEFAULT_FLOW_ENTRIES, DEFAULT_SERVICE_SLOTS};

use super::maglev::RingSize;

/// Idle time after which a UDP flow is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(30);
/// Default idle time after which a TCP flow is forgotten.
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(3600);
/// Time a TCP flow is kept after FIN both ways or a RST, for late segments.
pub const TCP_CLOSING: Duration = Duration::from_secs(10);

/// Default SNAT source ports: above Linux's default `ip_local_port_range` (32768-60999), so
/// the node's own connections never use a port a flow's reply entry claims.
pub const DEFAULT_SNAT_PORTS: SnatPorts = SnatPorts {
    first: 61000,
    last: 65535,
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
    let mut bounds = local_port_range
        .split_whitespace()
        .map(|bound| bound.parse::<u16>());
    let (Some(Ok(first)), Some(Ok(last))) = (bounds.next(), bounds.next()) else {
        return Err(format!(
            "cannot read the kernel's ip_local_port_range from {local_port_range:?}"
        ));
    };
    if snat_ports.overlaps(first..=last) {
        return Err(format!(
            "the SNAT port range {snat_ports} ([L4] SNATPorts) overlaps the kernel's \
             ip_local_port_range {first}-{last}: choose ports outside it"
        ));
    }
    Ok(())
}

/// Everything configurable about the L4 path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L4Settings {
    /// Addresses L4 services answer on; empty = the IPv4 addresses of the XDP interface.
    pub addresses: Vec<IpAddr>,
    pub snat_ports: SnatPorts,
    pub ring_size: RingSize,
    /// Connection-table entries; each flow takes two.
    pub flow_entries: u32,
    /// Services (listen port + protocol) that can be steered at once.
    pub service_slots: u32,
    pub tcp_idle: Duration,
    pub udp_idle: Duration,
    pub tcp_closing: Duration,
}

impl Default for L4Settings {
    fn default() -> Self {
        L4Settings {
            addresses: Vec::new(),
            snat_ports: DEFAULT_SNAT_PORTS,
            ring_size: RingSize::DEFAULT,
            flow_entries: DEFAULT_FLOW_ENTRIES,
            service_slots: DEFAULT_SERVICE_SLOTS,
            tcp_idle: DEFAULT_TCP_IDLE,
            udp_idle: UDP_IDLE,
            tcp_closing: TCP_CLOSING,
        }
    }
}

impl L4Settings {
    /// The `SETTINGS` element the XDP program reads.
    pub fn to_map_value(&self) -> xlb_common::Settings {
        let nanos = |duration: Duration| u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        xlb_common::Settings {
            ring_size: self.ring_size.get(),
            snat_port_first: self.snat_ports.first,
            snat_port_last: self.snat_ports.last,
            tcp_idle_ns: nanos(self.tcp_idle),
            udp_idle_ns: nanos(self.udp_idle),
            tcp_closing_ns: nanos(self.tcp_closing),
        }
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
    fn map_value_in_nanoseconds() {
        let value = L4Settings::default().to_map_value();
        assert_eq!(value.ring_size, 65537);
        assert_eq!(
            (value.snat_port_first, value.snat_port_last),
            (61000, 65535)
        );
        assert_eq!(value.tcp_idle_ns, 3_600_000_000_000);
        assert_eq!(value.udp_idle_ns, 30_000_000_000);
        assert_eq!(value.tcp_closing_ns, 10_000_000_000);
    }
}
