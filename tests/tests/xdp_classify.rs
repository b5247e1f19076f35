//! The XDP program's parser, frame by frame through the real kernel (BPF_PROG_TEST_RUN):
//! every frame is passed untouched and lands in exactly one class counter.
//!
//! Well-formed frames are built with etherparse (an independent implementation); malformed
//! ones are derived from them by truncation and by corrupting one length field at a time.

mod xdp_support;

use std::sync::{Arc, Mutex};

use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep, VlanId};
use xlb::dataplane::Dataplane;
use xlb_common::Stat;

const L7_PORT: u16 = 80;
const OTHER_PORT: u16 = 22;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const CLIENT_V4: [u8; 4] = [10, 77, 1, 2];
const LB_V4: [u8; 4] = [10, 77, 1, 1];
const CLIENT_V6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const LB_V6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    L7,
    Other,
    Malformed,
}

/// A loaded program with the proxy listening on port 80.
fn dataplane() -> Dataplane {
    let mut dataplane = Dataplane::load().expect("load the XDP program (tests run as root)");
    dataplane.set_l7_ports(&[L7_PORT]).unwrap();
    dataplane
}

/// Runs one frame; asserts the verdict is PASS, the frame unchanged and exactly one class
/// counter moved (by one packet of the frame's size). Returns that class.
fn classify(dataplane: &mut Dataplane, frame: &[u8]) -> Class {
    let before = dataplane.stats().unwrap();
    let (verdict, out) = xdp_support::run(dataplane, frame);
    assert_eq!(verdict, 2, "verdict must be XDP_PASS for {frame:02x?}");
    assert_eq!(out, frame, "a passed frame is untouched");

    let after = dataplane.stats().unwrap();
    let moved = |stat: Stat| after.get(stat).packets - before.get(stat).packets;
    assert_eq!(moved(Stat::Received), 1);
    assert_eq!(moved(Stat::VerdictPass), 1);
    assert_eq!(
        after.get(Stat::Received).bytes - before.get(Stat::Received).bytes,
        frame.len() as u64
    );
    let classes = [
        (Stat::ClassL7, Class::L7),
        (Stat::ClassOther, Class::Other),
        (Stat::ClassMalformed, Class::Malformed),
    ];
    let moved_classes: Vec<Class> = classes
        .iter()
        .filter(|(stat, _)| moved(*stat) == 1)
        .map(|(_, class)| *class)
        .collect();
    assert_eq!(
        moved_classes.len(),
        1,
        "exactly one class per frame: {moved_classes:?}"
    );
    moved_classes[0]
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// Ethernet and the IP header of `family`, client to load balancer.
fn ip_headers(family: Family) -> PacketBuilderStep<IpHeaders> {
    let ethernet = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    match family {
        Family::V4 => ethernet.ipv4(CLIENT_V4, LB_V4, 64),
        Family::V6 => ethernet.ipv6(CLIENT_V6, LB_V6, 64),
    }
}

/// A TCP SYN to `dst_port`.
fn tcp(family: Family, dst_port: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    let syn = ip_headers(family).tcp(40000, dst_port, 1, 64240).syn();
    syn.write(&mut frame, &[]).unwrap();
    frame
}

/// A small UDP datagram to `dst_port`.
fn udp(family: Family, dst_port: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    ip_headers(family)
        .udp(40000, dst_port)
        .write(&mut frame, b"query")
        .unwrap();
    frame
}

fn vlan_ipv4_tcp(dst_port: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .single_vlan(VlanId::try_new(7).unwrap())
        .ipv4(CLIENT_V4, LB_V4, 64)
        .tcp(40000, dst_port, 1, 64240)
        .syn()
        .write(&mut frame, &[])
        .unwrap();
    frame
}

fn arp_request() -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&CLIENT_V4);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&LB_V4);
    frame
}

/// Inserts IPv6 extension headers (each given as its protocol number and body, the
/// next-header byte excluded) between the IPv6 header and the transport header.
fn with_ipv6_extensions(frame: &[u8], extensions: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let transport_proto = frame[ETH_LEN + 6];
    let mut out = frame[..ETH_LEN + IPV6_LEN].to_vec();
    out[ETH_LEN + 6] = extensions[0].0;
    for (index, (_, body)) in extensions.iter().enumerate() {
        let next = extensions
            .get(index + 1)
            .map_or(transport_proto, |(proto, _)| *proto);
        out.push(next);
        out.extend_from_slice(body);
    }
    out.extend_from_slice(&frame[ETH_LEN + IPV6_LEN..]);
    let payload_len = (out.len() - ETH_LEN - IPV6_LEN) as u16;
    out[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&payload_len.to_be_bytes());
    out
}

/// An options-style extension header body of one 8-byte unit: length 0 and PadN padding.
fn options_header() -> Vec<u8> {
    vec![0, 1, 4, 0, 0, 0, 0]
}

fn fragment_header(offset_units: u16, more: bool) -> Vec<u8> {
    let field = (offset_units << 3) | u16::from(more);
    let [high, low] = field.to_be_bytes();
    vec![0, high, low, 0, 0, 0, 1]
}

#[test]
fn well_formed_frames_are_classified_by_transport_and_port() {
    let mut dataplane = dataplane();
    let cases = [
        (
            "IPv4 TCP to the proxy port",
            tcp(Family::V4, L7_PORT),
            Class::L7,
        ),
        (
            "IPv4 TCP elsewhere",
            tcp(Family::V4, OTHER_PORT),
            Class::Other,
        ),
        (
            "IPv4 UDP to the proxy port number",
            udp(Family::V4, L7_PORT),
            Class::Other,
        ),
        (
            "IPv6 TCP to the proxy port",
            tcp(Family::V6, L7_PORT),
            Class::L7,
        ),
        (
            "IPv6 TCP elsewhere",
            tcp(Family::V6, OTHER_PORT),
            Class::Other,
        ),
        ("IPv6 UDP", udp(Family::V6, 53), Class::Other),
        (
            "802.1Q-tagged IPv4 TCP to the proxy port",
            vlan_ipv4_tcp(L7_PORT),
            Class::L7,
        ),
        ("ARP", arp_request(), Class::Other),
    ];
    for (name, frame, expected) in cases {
        assert_eq!(classify(&mut dataplane, &frame), expected, "{name}");
    }
}

#[test]
fn ethernet_padding_after_the_ip_packet_is_well_formed() {
    let mut dataplane = dataplane();
    let mut frame = tcp(Family::V4, L7_PORT);
    frame.extend_from_slice(&[0; 6]);
    assert_eq!(classify(&mut dataplane, &frame), Class::L7);
}

#[test]
fn ipv6_extension_headers_are_walked_to_the_transport_header() {
    let mut dataplane = dataplane();
    const HOP_BY_HOP: u8 = 0;
    const DEST_OPTS: u8 = 60;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    let chained = with_ipv6_extensions(
        &tcp(Family::V6, L7_PORT),
        &[
            (HOP_BY_HOP, options_header()),
            (ROUTING, options_header()),
            (DEST_OPTS, options_header()),
        ],
    );
    assert_eq!(classify(&mut dataplane, &chained), Class::L7);

    let first_fragment = with_ipv6_extensions(
        &tcp(Family::V6, L7_PORT),
        &[(FRAGMENT, fragment_header(0, true))],
    );
    assert_eq!(classify(&mut dataplane, &first_fragment), Class::L7);

    let later_fragment = with_ipv6_extensions(
        &tcp(Family::V6, L7_PORT),
        &[(FRAGMENT, fragment_header(185, false))],
    );
    assert_eq!(
        classify(&mut dataplane, &later_fragment),
        Class::Other,
        "a non-first fragment has no transport header: its bytes must not be read as ports"
    );

    let too_many = with_ipv6_extensions(
        &tcp(Family::V6, L7_PORT),
        &vec![(DEST_OPTS, options_header()); 8],
    );
    assert_eq!(
        classify(&mut dataplane, &too_many),
        Class::Other,
        "beyond the walk limit"
    );
}

#[test]
fn ipv4_later_fragments_are_not_read_as_transport() {
    let mut dataplane = dataplane();
    let mut frame = tcp(Family::V4, L7_PORT);
    frame[ETH_LEN + 6..ETH_LEN + 8].copy_from_slice(&185u16.to_be_bytes());
    assert_eq!(classify(&mut dataplane, &frame), Class::Other);
}

#[test]
fn every_truncation_of_an_ip_frame_is_malformed() {
    let mut dataplane = dataplane();
    let frames = [
        tcp(Family::V4, L7_PORT),
        udp(Family::V4, L7_PORT),
        tcp(Family::V6, L7_PORT),
        udp(Family::V6, 53),
        vlan_ipv4_tcp(L7_PORT),
        with_ipv6_extensions(&tcp(Family::V6, L7_PORT), &[(0, options_header())]),
    ];
    for frame in frames {
        // The kernel refuses test input shorter than an Ethernet header.
        for len in ETH_LEN..frame.len() {
            assert_eq!(
                classify(&mut dataplane, &frame[..len]),
                Class::Malformed,
                "{len} of {} bytes: {:02x?}",
                frame.len(),
                &frame[..len]
            );
        }
    }
}

#[test]
fn inconsistent_length_fields_are_malformed() {
    let mut dataplane = dataplane();
    let ipv4 = ETH_LEN;
    let tcp4 = ETH_LEN + IPV4_LEN;
    let udp4 = ETH_LEN + IPV4_LEN;
    let tcp6 = ETH_LEN + IPV6_LEN;
    let corrupt = |mut frame: Vec<u8>, offset: usize, bytes: &[u8]| {
        frame[offset..offset + bytes.len()].copy_from_slice(bytes);
        frame
    };
    let cases = [
        (
            "IHL of 4 words",
            corrupt(tcp(Family::V4, L7_PORT), ipv4, &[0x44]),
        ),
        (
            "IHL past the frame",
            corrupt(tcp(Family::V4, L7_PORT), ipv4, &[0x4f]),
        ),
        (
            "IPv4 ethertype with version 6",
            corrupt(tcp(Family::V4, L7_PORT), ipv4, &[0x65]),
        ),
        (
            "total length below the header",
            corrupt(tcp(Family::V4, L7_PORT), ipv4 + 2, &[0, 19]),
        ),
        (
            "total length past the frame",
            corrupt(tcp(Family::V4, L7_PORT), ipv4 + 2, &[0, 200]),
        ),
        (
            "TCP data offset of 4 words",
            corrupt(tcp(Family::V4, L7_PORT), tcp4 + 12, &[0x40]),
        ),
        (
            "TCP data offset past the packet",
            corrupt(tcp(Family::V4, L7_PORT), tcp4 + 12, &[0xf0]),
        ),
        (
            "UDP length below its header",
            corrupt(udp(Family::V4, L7_PORT), udp4 + 4, &[0, 7]),
        ),
        (
            "UDP length past the packet",
            corrupt(udp(Family::V4, L7_PORT), udp4 + 4, &[0, 200]),
        ),
        (
            "IPv6 payload length past the frame",
            corrupt(tcp(Family::V6, L7_PORT), ETH_LEN + 4, &[0, 200]),
        ),
        (
            "IPv6 ethertype with version 4",
            corrupt(tcp(Family::V6, L7_PORT), ETH_LEN, &[0x40]),
        ),
        (
            "IPv6 TCP data offset of 1 word",
            corrupt(tcp(Family::V6, L7_PORT), tcp6 + 12, &[0x10]),
        ),
        (
            "IPv6 extension header running past the packet",
            corrupt(
                with_ipv6_extensions(&tcp(Family::V6, L7_PORT), &[(60, options_header())]),
                ETH_LEN + IPV6_LEN + 1,
                &[9],
            ),
        ),
    ];
    for (name, frame) in cases {
        assert_eq!(classify(&mut dataplane, &frame), Class::Malformed, "{name}");
    }
}

#[test]
fn l7_ports_follow_the_daemon() {
    let mut dataplane = dataplane();
    assert_eq!(
        classify(&mut dataplane, &tcp(Family::V4, 8080)),
        Class::Other
    );
    dataplane.set_l7_ports(&[8080]).unwrap();
    assert_eq!(classify(&mut dataplane, &tcp(Family::V4, 8080)), Class::L7);
    assert_eq!(
        classify(&mut dataplane, &tcp(Family::V4, L7_PORT)),
        Class::Other,
        "80 was removed"
    );
}

/// Collects log records, as the daemon's logger would print them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

#[test]
fn malformed_frames_are_logged_through_aya_log() {
    let mut dataplane = dataplane();
    let captured = Captured::default();
    let mut forwarder = dataplane.forward_logs(captured.clone()).unwrap();
    let frame = tcp(Family::V4, L7_PORT);
    assert_eq!(classify(&mut dataplane, &frame[..30]), Class::Malformed);
    forwarder.flush();
    let records = captured.0.lock().unwrap();
    assert!(
        records
            .iter()
            .any(|line| line.contains("malformed frame of 30 bytes")),
        "{records:?}"
    );
}
