//! Shared by the XDP packet tests: one run of a frame through the kernel; for the L4 tests, a
//! loaded program with L4 services configured through the daemon's own map writer, frames built
//! with etherparse, and checksum checks by etherparse (an implementation independent of the
//! program's incremental updates).

#![allow(dead_code)] // each test crate uses a different part

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{NetHeaders, PacketBuilder, PacketBuilderStep, PacketHeaders, TransportHeader};
use xlb::{
    dataplane::{Dataplane, Stats},
    l4::{
        maglev::RingSize,
        maps::{BackendPlan, IpFamily, ServicePlan},
        service::{Listener, Protocol},
        settings::{L4Settings, SnatPorts},
    },
};
use xlb_common::NextHop;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
/// The LB's MAC on the client side: where clients send.
pub const LB_FRONT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];
/// The LB's MAC on the backend side.
pub const LB_BACK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x2b];
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbe];

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
pub const SNAT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 1);
pub const BACKEND_A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 78, 1, 2), 30001);
pub const BACKEND_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 78, 1, 3), 30002);

// Every 16-bit word of the addresses changes differently under NAT, so that a checksum update
// that missed one would not be undone by another's.
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 2, 3, 4, 5, 6, 0x72);
pub const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17);
pub const SNAT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd78, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27);
pub const BACKEND6_A: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0xfd79, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37),
    30001,
    0,
    0,
);

/// BPF_PROG_TEST_RUN runs the program as if the frame arrived on loopback.
pub const INGRESS_IFINDEX: u32 = 1;

pub const TCP_SERVICE: Listener = Listener {
    port: 5432,
    protocol: Protocol::Tcp,
};
pub const UDP_SERVICE: Listener = Listener {
    port: 53,
    protocol: Protocol::Udp,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Small maps: a prime ring of 251, four slots.
pub fn settings(snat_ports: SnatPorts) -> L4Settings {
    L4Settings {
        snat_ports,
        ring_size: RingSize::new(251).unwrap(),
        flow_entries: 4096,
        service_slots: 4,
        ..L4Settings::default()
    }
}

pub fn backend(endpoint: SocketAddrV4, ifindex: u32) -> BackendPlan {
    BackendPlan {
        endpoint: endpoint.into(),
        snat_addr: SNAT_ADDR.into(),
        next_hop: NextHop {
            ifindex,
            src_mac: LB_BACK_MAC,
            dst_mac: BACKEND_MAC,
        },
    }
}

pub fn service(listener: Listener, backends: Vec<BackendPlan>) -> ServicePlan {
    ServicePlan {
        listener,
        family: IpFamily::V4,
        addresses: vec![LB_ADDR.into()],
        backends,
    }
}

pub fn backend6(endpoint: SocketAddrV6, ifindex: u32) -> BackendPlan {
    BackendPlan {
        endpoint: endpoint.into(),
        snat_addr: SNAT_ADDR6.into(),
        ..backend(BACKEND_A, ifindex)
    }
}

pub fn service6(listener: Listener, backends: Vec<BackendPlan>) -> ServicePlan {
    ServicePlan {
        family: IpFamily::V6,
        addresses: vec![LB_ADDR6.into()],
        ..service(listener, backends)
    }
}

/// A loaded program steering `plan` with `settings`.
pub fn dataplane(settings: &L4Settings, plan: &[ServicePlan]) -> Dataplane {
    let mut dataplane =
        Dataplane::load_with(settings).expect("load the XDP program (tests run as root)");
    dataplane.l4().apply(plan).unwrap();
    dataplane
}

/// One run through the kernel: the verdict and the frame as the program left it.
pub fn run(dataplane: &mut Dataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    run_from(dataplane, frame, None)
}

/// [`run`], the frame arriving on interface `ingress` of the calling thread's network
/// namespace (loopback when `None`).
pub fn run_from(dataplane: &mut Dataplane, frame: &[u8], ingress: Option<u32>) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex; the kernel wants data 0 and data_end the frame's length.
    let context: Option<Vec<u8>> = ingress.map(|ifindex| {
        [0, frame.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|word| word.to_ne_bytes())
            .collect()
    });
    let result = dataplane
        .program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: context.as_deref(),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|error| panic!("test run of {} bytes: {error}", frame.len()));
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// How much each stat moved between two readings, by name, only those that moved.
pub fn moved(before: &Stats, after: &Stats) -> Vec<(&'static str, u64)> {
    after
        .0
        .iter()
        .filter_map(|(name, total)| {
            let delta = total.packets - before.0.get(name).map_or(0, |b| b.packets);
            (delta > 0).then_some((*name, delta))
        })
        .collect()
}

/// An Ethernet + IPv4 frame builder step with the given addresses and TTL.
pub fn ipv4(
    macs: ([u8; 6], [u8; 6]),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(macs.0, macs.1).ipv4(src.octets(), dst.octets(), ttl)
}

/// A TCP segment; `flags` picks SYN / ACK / FIN / RST on the builder.
pub fn tcp(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    flags: impl FnOnce(
        etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    ) -> etherparse::PacketBuilderStep<etherparse::TcpHeader>,
    payload: &[u8],
) -> Vec<u8> {
    let builder = ipv4(macs, *src.ip(), *dst.ip(), ttl).tcp(src.port(), dst.port(), 1000, 64240);
    let mut frame = Vec::new();
    flags(builder).write(&mut frame, payload).unwrap();
    frame
}

pub fn udp(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddrV4,
    dst: SocketAddrV4,
    ttl: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    ipv4(macs, *src.ip(), *dst.ip(), ttl)
        .udp(src.port(), dst.port())
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// An IPv6 TCP segment, as [`tcp`].
pub fn tcp6(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddrV6,
    dst: SocketAddrV6,
    hop_limit: u8,
    flags: Flags,
    payload: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src.ip().octets(), dst.ip().octets(), hop_limit)
        .tcp(src.port(), dst.port(), 1000, 64240);
    let mut frame = Vec::new();
    flags(builder).write(&mut frame, payload).unwrap();
    frame
}

pub fn udp6(
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddrV6,
    dst: SocketAddrV6,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(src.ip().octets(), dst.ip().octets(), hop_limit)
        .udp(src.port(), dst.port())
        .write(&mut frame, payload)
        .unwrap();
    frame
}

/// What etherparse reads in an IPv6 frame, with the TCP/UDP/ICMPv6 checksum recomputed by
/// etherparse and compared with the frame's: addresses, ports (0 for ICMPv6) and hop limit.
pub fn inspect6(frame: &[u8]) -> Result<(SocketAddr, SocketAddr, u8), String> {
    let headers = PacketHeaders::from_ethernet_slice(frame).map_err(|e| e.to_string())?;
    let Some(NetHeaders::Ipv6(ip, _)) = headers.net else {
        return Err("no IPv6 header".into());
    };
    let payload = headers.payload.slice();
    let (src_port, dst_port, checksum, expected) = match headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            let expected = tcp.calc_checksum_ipv6(&ip, payload).unwrap();
            (
                tcp.source_port,
                tcp.destination_port,
                tcp.checksum,
                expected,
            )
        }
        Some(TransportHeader::Udp(udp)) => {
            let expected = udp.calc_checksum_ipv6(&ip, payload).unwrap();
            (
                udp.source_port,
                udp.destination_port,
                udp.checksum,
                expected,
            )
        }
        Some(TransportHeader::Icmpv6(icmp)) => {
            let expected = icmp
                .icmp_type
                .calc_checksum(ip.source, ip.destination, payload)
                .unwrap();
            (0, 0, icmp.checksum, expected)
        }
        _ => return Err("no TCP, UDP or ICMPv6 header".into()),
    };
    if checksum != expected {
        return Err(format!(
            "checksum {checksum:#06x}, should be {expected:#06x}"
        ));
    }
    let src = SocketAddr::new(Ipv6Addr::from(ip.source).into(), src_port);
    let dst = SocketAddr::new(Ipv6Addr::from(ip.destination).into(), dst_port);
    Ok((src, dst, ip.hop_limit))
}

/// What etherparse reads in a frame: addresses, ports, TTL; with the IPv4 header checksum and
/// the TCP/UDP checksum recomputed by etherparse and compared with the frame's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub ttl: u8,
    pub proto: u8,
}

pub fn inspect(frame: &[u8]) -> Result<Seen, String> {
    let headers = PacketHeaders::from_ethernet_slice(frame).map_err(|e| e.to_string())?;
    let Some(etherparse::LinkHeader::Ethernet2(eth)) = headers.link else {
        return Err("no Ethernet II header".into());
    };
    let Some(NetHeaders::Ipv4(ip, _)) = headers.net else {
        return Err("no IPv4 header".into());
    };
    if ip.header_checksum != ip.calc_header_checksum() {
        return Err(format!(
            "IPv4 header checksum {:#06x}, should be {:#06x}",
            ip.header_checksum,
            ip.calc_header_checksum()
        ));
    }
    let payload = headers.payload.slice();
    let (src_port, dst_port) = match headers.transport {
        Some(TransportHeader::Tcp(tcp)) => {
            let expected = tcp.calc_checksum_ipv4(&ip, payload).unwrap();
            if tcp.checksum != expected {
                return Err(format!(
                    "TCP checksum {:#06x}, should be {expected:#06x}",
                    tcp.checksum
                ));
            }
            (tcp.source_port, tcp.destination_port)
        }
        Some(TransportHeader::Udp(udp)) => {
            let expected = udp.calc_checksum_ipv4(&ip, payload).unwrap();
            if udp.checksum != 0 && udp.checksum != expected {
                return Err(format!(
                    "UDP checksum {:#06x}, should be {expected:#06x}",
                    udp.checksum
                ));
            }
            (udp.source_port, udp.destination_port)
        }
        _ => return Err("no TCP or UDP header".into()),
    };
    Ok(Seen {
        src_mac: eth.source,
        dst_mac: eth.destination,
        src: SocketAddrV4::new(ip.source.into(), src_port),
        dst: SocketAddrV4::new(ip.destination.into(), dst_port),
        ttl: ip.time_to_live,
        proto: ip.protocol.0,
    })
}

/// A single SNAT port makes every rewritten source port predictable.
pub const SNAT_PORT: u16 = 61000;

pub fn one_snat_port() -> SnatPorts {
    SnatPorts::new(SNAT_PORT, SNAT_PORT).unwrap()
}

pub const CLIENT_PORT: u16 = 40000;

pub fn client() -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT, CLIENT_PORT)
}

pub fn lb(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(LB_ADDR, port)
}

pub fn snat() -> SocketAddrV4 {
    SocketAddrV4::new(SNAT_ADDR, SNAT_PORT)
}

pub const TO_LB: ([u8; 6], [u8; 6]) = (CLIENT_MAC, LB_FRONT_MAC);
pub const TO_BACKEND: ([u8; 6], [u8; 6]) = (LB_BACK_MAC, BACKEND_MAC);
pub const FROM_BACKEND: ([u8; 6], [u8; 6]) = (BACKEND_MAC, LB_BACK_MAC);
pub const TO_CLIENT: ([u8; 6], [u8; 6]) = (LB_FRONT_MAC, CLIENT_MAC);

pub type Flags =
    fn(PacketBuilderStep<etherparse::TcpHeader>) -> PacketBuilderStep<etherparse::TcpHeader>;

pub fn syn(
    step: PacketBuilderStep<etherparse::TcpHeader>,
) -> PacketBuilderStep<etherparse::TcpHeader> {
    step.syn()
}

pub fn ack(
    step: PacketBuilderStep<etherparse::TcpHeader>,
) -> PacketBuilderStep<etherparse::TcpHeader> {
    step.ack(77)
}

pub fn syn_ack(
    step: PacketBuilderStep<etherparse::TcpHeader>,
) -> PacketBuilderStep<etherparse::TcpHeader> {
    step.syn().ack(1001)
}

pub fn fin_ack(
    step: PacketBuilderStep<etherparse::TcpHeader>,
) -> PacketBuilderStep<etherparse::TcpHeader> {
    step.fin().ack(1001)
}

/// Runs `frame`; asserts the verdict, the output (`None`: untouched) and the stats that moved.
pub fn expect(
    dataplane: &mut Dataplane,
    name: &str,
    frame: &[u8],
    verdict: u32,
    output: Option<&[u8]>,
    stats: &[&str],
) {
    expect_from(dataplane, None, name, frame, verdict, output, stats)
}

/// [`expect`] for a frame arriving on interface `ingress` (see [`run_from`]).
pub fn expect_from(
    dataplane: &mut Dataplane,
    ingress: Option<u32>,
    name: &str,
    frame: &[u8],
    verdict: u32,
    output: Option<&[u8]>,
    stats: &[&str],
) {
    let before = dataplane.stats().unwrap();
    let (got_verdict, out) = run_from(dataplane, frame, ingress);
    let after = dataplane.stats().unwrap();
    assert_eq!(got_verdict, verdict, "{name}: verdict");
    let expected_out = output.unwrap_or(frame);
    assert_eq!(out, expected_out, "{name}: output bytes");
    if output.is_some() {
        let checked = match out.get(12..14) {
            Some([0x86, 0xdd]) => inspect6(&out).map(drop),
            _ => inspect(&out).map(drop),
        };
        checked.unwrap_or_else(|error| panic!("{name}: {error}"));
    }
    let mut expected_stats: Vec<&str> = ["received"]
        .into_iter()
        .chain(stats.iter().copied())
        .collect();
    expected_stats.sort();
    let moved: Vec<&str> = moved(&before, &after)
        .iter()
        .map(|(name, n)| {
            assert_eq!(*n, 1, "{name} moved by {n}");
            *name
        })
        .collect();
    assert_eq!(moved, expected_stats, "{name}: counters");
}
