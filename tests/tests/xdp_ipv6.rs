//! The IPv6 L4 path frame by frame through the real kernel (BPF_PROG_TEST_RUN): `xlb` hands
//! IPv6 frames to `xlb_ipv6` and new flows to `xlb_ipv6_new_flow` by tail call, and the NAT,
//! the connection table's life cycle and the sweep work as they do for IPv4. Output bytes are
//! built independently with etherparse, whose checksums must match the program's incremental
//! updates byte for byte.

mod xdp_support;

use std::{
    net::{Ipv6Addr, SocketAddrV6},
    thread,
    time::Duration,
};

use etherparse::{icmpv6::DestUnreachableCode, Icmpv6Type, PacketBuilder};
use xdp_support::*;
use xlb::{dataplane::Dataplane, l4::settings::L4Settings};

/// Long enough for a few test runs to happen inside it, short enough to wait out.
const SHORT: Duration = Duration::from_millis(200);

fn client6(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(CLIENT6, port, 0, 0)
}

fn lb6(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(LB_ADDR6, port, 0, 0)
}

fn snat6() -> SocketAddrV6 {
    SocketAddrV6::new(SNAT_ADDR6, SNAT_PORT, 0, 0)
}

/// One SNAT port: every rewritten source port is predictable, and a second flow must take the
/// first one's tuple or be refused.
fn ipv6_dataplane(tweak: impl FnOnce(&mut L4Settings)) -> Dataplane {
    let mut settings = settings(one_snat_port());
    tweak(&mut settings);
    dataplane(
        &settings,
        &[
            service6(TCP_SERVICE, vec![backend6(BACKEND6_A, INGRESS_IFINDEX)]),
            service6(UDP_SERVICE, vec![backend6(BACKEND6_A, INGRESS_IFINDEX)]),
        ],
    )
}

#[test]
fn a_tcp_flow_is_steered_both_ways() {
    let mut dataplane = ipv6_dataplane(|_| {});
    let syn_in = tcp6(TO_LB, client6(40000), lb6(5432), 64, syn as Flags, &[]);
    let syn_out = tcp6(TO_BACKEND, snat6(), BACKEND6_A, 63, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "SYN of a new flow",
        &syn_in,
        XDP_TX,
        Some(&syn_out),
        &["class_l4_service", "l4_new_flow", "verdict_tx"],
    );

    let syn_ack_in = tcp6(FROM_BACKEND, BACKEND6_A, snat6(), 64, syn_ack as Flags, &[]);
    let syn_ack_out = tcp6(
        TO_CLIENT,
        lb6(5432),
        client6(40000),
        63,
        syn_ack as Flags,
        &[],
    );
    expect(
        &mut dataplane,
        "the backend's reply",
        &syn_ack_in,
        XDP_TX,
        Some(&syn_ack_out),
        &["class_l4_reply", "l4_replied", "verdict_tx"],
    );

    let data_in = tcp6(
        TO_LB,
        client6(40000),
        lb6(5432),
        64,
        ack as Flags,
        b"SELECT 1;",
    );
    let data_out = tcp6(
        TO_BACKEND,
        snat6(),
        BACKEND6_A,
        63,
        ack as Flags,
        b"SELECT 1;",
    );
    expect(
        &mut dataplane,
        "a later segment",
        &data_in,
        XDP_TX,
        Some(&data_out),
        &["class_l4_service", "l4_forwarded", "verdict_tx"],
    );

    let traffic = dataplane.l4().traffic().unwrap();
    let service = traffic.services[&TCP_SERVICE];
    assert_eq!(
        (
            service.forward_packets,
            service.reply_packets,
            service.new_flows
        ),
        (2, 1, 1)
    );
    assert_eq!(
        traffic.backends[&BACKEND6_A.into()].reply_bytes,
        syn_ack_in.len() as u64
    );

    let other_client = tcp6(TO_LB, client6(40001), lb6(5432), 64, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "a second flow while the only SNAT tuple is held",
        &other_client,
        XDP_DROP,
        None,
        &["class_l4_service", "l4_drop_snat_exhausted", "verdict_drop"],
    );
}

#[test]
fn udp_datagrams_are_steered_both_ways() {
    let mut dataplane = ipv6_dataplane(|_| {});
    let query = udp6(TO_LB, client6(5353), lb6(53), 64, b"query");
    let query_out = udp6(TO_BACKEND, snat6(), BACKEND6_A, 63, b"query");
    expect(
        &mut dataplane,
        "a first datagram",
        &query,
        XDP_TX,
        Some(&query_out),
        &["class_l4_service", "l4_new_flow", "verdict_tx"],
    );
    let answer = udp6(FROM_BACKEND, BACKEND6_A, snat6(), 64, b"answer");
    let answer_out = udp6(TO_CLIENT, lb6(53), client6(5353), 63, b"answer");
    expect(
        &mut dataplane,
        "the answer",
        &answer,
        XDP_TX,
        Some(&answer_out),
        &["class_l4_reply", "l4_replied", "verdict_tx"],
    );
}

#[test]
fn a_closed_flow_is_reopened_on_its_tuple_and_swept_once_over() {
    let mut dataplane = ipv6_dataplane(|settings| {
        settings.tcp_closing = SHORT;
        settings.tcp_handshake = SHORT;
    });
    let from_client = |flags: Flags| tcp6(TO_LB, client6(40000), lb6(5432), 64, flags, &[]);
    let from_backend = |flags: Flags| tcp6(FROM_BACKEND, BACKEND6_A, snat6(), 64, flags, &[]);
    for frame in [
        from_client(syn),
        from_backend(syn_ack),
        from_client(ack),
        from_client(fin_ack),
        from_backend(fin_ack),
    ] {
        let (verdict, _) = run(&mut dataplane, &frame);
        assert_eq!(verdict, XDP_TX);
    }
    let syn_out = tcp6(TO_BACKEND, snat6(), BACKEND6_A, 63, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "the client reuses its port on the closed flow's tuple",
        &from_client(syn),
        XDP_TX,
        Some(&syn_out),
        &[
            "class_l4_service",
            "l4_flow_reopened",
            "l4_new_flow",
            "verdict_tx",
        ],
    );

    let other_client = tcp6(TO_LB, client6(40001), lb6(5432), 64, syn as Flags, &[]);
    let (verdict, _) = run(&mut dataplane, &other_client);
    assert_eq!(verdict, XDP_DROP, "the only tuple is the reopened flow's");
    let sweep = dataplane.sweep_flows().unwrap();
    assert_eq!(sweep.expired_flows(), 0);
    assert_eq!(
        sweep.summary().entries,
        2,
        "the reopened flow's two entries"
    );
    assert_eq!(sweep.summary().flows["handshake"], 1);

    thread::sleep(SHORT * 3 / 2);
    let sweep = dataplane.sweep_flows().unwrap();
    assert_eq!(
        sweep.ipv6.expired_flows, 1,
        "the unanswered SYN's flow is over after the handshake timeout"
    );
    assert_eq!(sweep.summary().entries, 0);
    assert_eq!(dataplane.connection_table().sweeps.expired_flows, 1);
    let other_out = tcp6(TO_BACKEND, snat6(), BACKEND6_A, 63, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "a new flow on the tuple the sweep freed",
        &other_client,
        XDP_TX,
        Some(&other_out),
        &["class_l4_service", "l4_new_flow", "verdict_tx"],
    );
}

#[test]
fn ipv6_frames_no_service_claims_are_passed() {
    let mut dataplane = ipv6_dataplane(|_| {});
    dataplane.set_l7_ports(&[80]).unwrap();
    let to_proxy = tcp6(TO_LB, client6(40000), lb6(80), 64, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "to the L7 proxy",
        &to_proxy,
        XDP_PASS,
        None,
        &["class_l7", "verdict_pass"],
    );
    let elsewhere = tcp6(TO_LB, client6(40000), lb6(22), 64, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "to a port no service claims",
        &elsewhere,
        XDP_PASS,
        None,
        &["class_other", "verdict_pass"],
    );
    let last_hop = tcp6(TO_LB, client6(40000), lb6(5432), 1, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "a hop limit of 1, for the kernel to answer",
        &last_hop,
        XDP_PASS,
        None,
        &["class_l4_service", "l4_pass_ttl", "verdict_pass"],
    );
    let stray = tcp6(FROM_BACKEND, BACKEND6_A, snat6(), 64, ack as Flags, &[]);
    expect(
        &mut dataplane,
        "to a SNAT port without a flow",
        &stray,
        XDP_PASS,
        None,
        &["class_other", "verdict_pass"],
    );
}

/// A router between the LB and the backends, and one between the LB and the client.
const BACKEND_SIDE_ROUTER: Ipv6Addr = Ipv6Addr::new(0xfd78, 0x21, 0, 0, 0, 0, 0, 0xfe);
const CLIENT_SIDE_ROUTER: Ipv6Addr = Ipv6Addr::new(0xfd77, 0x11, 0, 0, 0, 0, 0, 0xfe);
const PACKET_TOO_BIG: Icmpv6Type = Icmpv6Type::PacketTooBig { mtu: 1280 };

/// An ICMPv6 message of `kind` from `from` to `to`, carrying `quoted` (etherparse computes
/// its checksum, pseudo-header included).
fn icmp6_error(
    macs: ([u8; 6], [u8; 6]),
    (from, to): (Ipv6Addr, Ipv6Addr),
    hop_limit: u8,
    kind: Icmpv6Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv6(from.octets(), to.octets(), hop_limit)
        .icmpv6(kind)
        .write(&mut frame, quoted)
        .unwrap();
    frame
}

/// The IP packet of an Ethernet frame: what an ICMPv6 error quotes.
fn ip_packet(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

#[test]
fn packet_too_big_from_the_backends_side_reaches_the_client() {
    let mut dataplane = ipv6_dataplane(|_| {});
    let data_in = tcp6(
        TO_LB,
        client6(40000),
        lb6(5432),
        64,
        syn as Flags,
        &[7; 1400],
    );
    let (verdict, forwarded) = run(&mut dataplane, &data_in);
    assert_eq!(verdict, XDP_TX);
    let error = icmp6_error(
        FROM_BACKEND,
        (BACKEND_SIDE_ROUTER, SNAT_ADDR6),
        64,
        PACKET_TOO_BIG,
        &ip_packet(&forwarded)[..1232],
    );
    // The quoted packet as the client sent it (with the hop limit the router saw).
    let as_sent = tcp6(
        TO_LB,
        client6(40000),
        lb6(5432),
        63,
        syn as Flags,
        &[7; 1400],
    );
    let expected = icmp6_error(
        TO_CLIENT,
        (LB_ADDR6, CLIENT6),
        63,
        PACKET_TOO_BIG,
        &ip_packet(&as_sent)[..1232],
    );
    expect(
        &mut dataplane,
        "packet too big, quoting the SNAT side",
        &error,
        XDP_TX,
        Some(&expected),
        &["class_l4_icmp", "l4_icmp_to_client", "verdict_tx"],
    );
}

#[test]
fn an_unreachable_client_is_reported_to_the_backend() {
    let mut dataplane = ipv6_dataplane(|_| {});
    let query = udp6(TO_LB, client6(5353), lb6(53), 64, b"query");
    run(&mut dataplane, &query);
    let answer = udp6(FROM_BACKEND, BACKEND6_A, snat6(), 64, b"answer");
    let (_, to_client) = run(&mut dataplane, &answer);
    let unreachable = Icmpv6Type::DestinationUnreachable(DestUnreachableCode::Port);
    let error = icmp6_error(
        TO_LB,
        (CLIENT_SIDE_ROUTER, LB_ADDR6),
        64,
        unreachable,
        &ip_packet(&to_client),
    );
    let as_sent = udp6(FROM_BACKEND, BACKEND6_A, snat6(), 63, b"answer");
    let expected = icmp6_error(
        TO_BACKEND,
        (SNAT_ADDR6, *BACKEND6_A.ip()),
        63,
        unreachable,
        &ip_packet(&as_sent),
    );
    expect(
        &mut dataplane,
        "port unreachable, quoting the client side",
        &error,
        XDP_TX,
        Some(&expected),
        &["class_l4_icmp", "l4_icmp_to_backend", "verdict_tx"],
    );

    let untracked = udp6(TO_CLIENT, lb6(53), client6(6000), 63, b"answer");
    let error = icmp6_error(
        TO_LB,
        (CLIENT_SIDE_ROUTER, LB_ADDR6),
        64,
        unreachable,
        &ip_packet(&untracked),
    );
    expect(
        &mut dataplane,
        "an error about no tracked flow",
        &error,
        XDP_PASS,
        None,
        &["class_other", "verdict_pass"],
    );
    let mut solicitation = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, [0x33, 0x33, 0xff, 0, 0, 1])
        .ipv6(CLIENT6.octets(), LB_ADDR6.octets(), 255)
        .icmpv6(Icmpv6Type::NeighborSolicitation)
        .write(&mut solicitation, &[0; 20])
        .unwrap();
    expect(
        &mut dataplane,
        "neighbour discovery",
        &solicitation,
        XDP_PASS,
        None,
        &["class_other", "verdict_pass"],
    );
}

#[test]
fn a_port_scan_of_the_lb_ipv6_address_is_dropped_except_what_is_served_or_open() {
    let mut dataplane = ipv6_dataplane(|settings| settings.local_ports = Some(32768..=60999));
    dataplane.set_l7_ports(&[80]).unwrap();
    dataplane.shield(&[LB_ADDR6.into()]).unwrap();
    let syn_to = |port| tcp6(TO_LB, client6(40000), lb6(port), 64, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "a port nothing serves",
        &syn_to(23),
        XDP_DROP,
        None,
        &["class_other", "shield_drop_tcp", "verdict_drop"],
    );
    let probe = udp6(TO_LB, client6(40000), lb6(9999), 64, b"probe");
    expect(
        &mut dataplane,
        "a UDP port nothing serves",
        &probe,
        XDP_DROP,
        None,
        &["class_other", "shield_drop_udp", "verdict_drop"],
    );
    for (port, class) in [
        (22, "class_other"),
        (80, "class_l7"),
        (40000, "class_other"),
    ] {
        expect(
            &mut dataplane,
            &format!("port {port}: SSH, the L7 proxy, an ephemeral port"),
            &syn_to(port),
            XDP_PASS,
            None,
            &[class, "verdict_pass"],
        );
    }
    let syn_out = tcp6(TO_BACKEND, snat6(), BACKEND6_A, 63, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "the L4 service",
        &syn_to(5432),
        XDP_TX,
        Some(&syn_out),
        &["class_l4_service", "l4_new_flow", "verdict_tx"],
    );
    let elsewhere = tcp6(
        TO_LB,
        client6(40000),
        SocketAddrV6::new(CLIENT_SIDE_ROUTER, 23, 0, 0),
        64,
        syn as Flags,
        &[],
    );
    expect(
        &mut dataplane,
        "an address the shield does not guard",
        &elsewhere,
        XDP_PASS,
        None,
        &["class_other", "verdict_pass"],
    );
}
