//! ICMP errors about NATed flows through the real kernel (BPF_PROG_TEST_RUN): each translated
//! frame is compared byte for byte with one etherparse builds for the other side, so the outer,
//! inner and ICMP checksums must all be what a fresh computation gives.

mod xdp_support;

use std::net::{Ipv4Addr, SocketAddrV4};

use etherparse::{
    icmpv4::{DestUnreachableHeader, TimeExceededCode},
    Icmpv4Type, PacketBuilder,
};
use xdp_support::*;
use xlb::dataplane::Dataplane;

/// A router between the LB and the backends, and one between the LB and the client.
const BACKEND_SIDE_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 254);
const CLIENT_SIDE_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 254);
const FRAGMENTATION_NEEDED: Icmpv4Type =
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: 1400,
    });

fn icmp_dataplane() -> Dataplane {
    dataplane(
        &settings(one_snat_port()),
        &[
            service(TCP_SERVICE, vec![backend(BACKEND_A, INGRESS_IFINDEX)]),
            service(UDP_SERVICE, vec![backend(BACKEND_B, INGRESS_IFINDEX)]),
        ],
    )
}

/// The IP packet of an Ethernet frame: what an ICMP error quotes.
fn ip_packet(frame: &[u8]) -> Vec<u8> {
    frame[14..].to_vec()
}

/// An ICMP error of `kind` from `from` to `to`, quoting `quoted`.
fn icmp_error(
    macs: ([u8; 6], [u8; 6]),
    from: Ipv4Addr,
    to: Ipv4Addr,
    ttl: u8,
    kind: Icmpv4Type,
    quoted: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(from.octets(), to.octets(), ttl)
        .icmpv4(kind)
        .write(&mut frame, quoted)
        .unwrap();
    frame
}

fn counted(dataplane: &mut Dataplane, frame: &[u8]) -> (u32, Vec<u8>, Vec<&'static str>) {
    let before = dataplane.stats().unwrap();
    let (verdict, out) = run(dataplane, frame);
    let stats = moved(&before, &dataplane.stats().unwrap())
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    (verdict, out, stats)
}

#[test]
fn fragmentation_needed_from_the_backends_side_reaches_the_client() {
    let mut dataplane = icmp_dataplane();
    let syn_in = tcp(TO_LB, client(), lb(5432), 64, syn, &[]);
    let (_, forwarded) = run(&mut dataplane, &syn_in);
    let error = icmp_error(
        FROM_BACKEND,
        BACKEND_SIDE_ROUTER,
        SNAT_ADDR,
        64,
        FRAGMENTATION_NEEDED,
        &ip_packet(&forwarded),
    );
    // The quoted packet as the client sent it (with the TTL the router saw).
    let as_sent = tcp(TO_LB, client(), lb(5432), 63, syn, &[]);
    let expected = icmp_error(
        TO_CLIENT,
        LB_ADDR,
        CLIENT,
        63,
        FRAGMENTATION_NEEDED,
        &ip_packet(&as_sent),
    );
    let (verdict, out, stats) = counted(&mut dataplane, &error);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, expected, "outer, quoted and ICMP checksums all fresh");
    assert_eq!(
        stats,
        [
            "class_l4_icmp",
            "l4_icmp_to_client",
            "received",
            "verdict_tx"
        ]
    );
}

#[test]
fn an_error_quoting_only_eight_bytes_of_tcp_is_translated_too() {
    let mut dataplane = icmp_dataplane();
    let (_, forwarded) = run(
        &mut dataplane,
        &tcp(TO_LB, client(), lb(5432), 64, syn, &[]),
    );
    let short_quote = &ip_packet(&forwarded)[..28];
    let error = icmp_error(
        FROM_BACKEND,
        BACKEND_SIDE_ROUTER,
        SNAT_ADDR,
        64,
        FRAGMENTATION_NEEDED,
        short_quote,
    );
    let as_sent = tcp(TO_LB, client(), lb(5432), 63, syn, &[]);
    let expected = icmp_error(
        TO_CLIENT,
        LB_ADDR,
        CLIENT,
        63,
        FRAGMENTATION_NEEDED,
        &ip_packet(&as_sent)[..28],
    );
    let (verdict, out, _) = counted(&mut dataplane, &error);
    assert_eq!((verdict, out), (XDP_TX, expected));
}

#[test]
fn time_exceeded_from_the_clients_side_reaches_the_backend() {
    let mut dataplane = icmp_dataplane();
    run(
        &mut dataplane,
        &tcp(TO_LB, client(), lb(5432), 64, syn, &[]),
    );
    let answer = tcp(FROM_BACKEND, BACKEND_A, snat(), 64, syn_ack, &[]);
    let (_, replied) = run(&mut dataplane, &answer);
    let ttl_exceeded = Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit);
    let error = icmp_error(
        TO_LB,
        CLIENT_SIDE_ROUTER,
        LB_ADDR,
        64,
        ttl_exceeded.clone(),
        &ip_packet(&replied),
    );
    let as_sent = tcp(FROM_BACKEND, BACKEND_A, snat(), 63, syn_ack, &[]);
    let expected = icmp_error(
        TO_BACKEND,
        SNAT_ADDR,
        *BACKEND_A.ip(),
        63,
        ttl_exceeded,
        &ip_packet(&as_sent),
    );
    let (verdict, out, stats) = counted(&mut dataplane, &error);
    assert_eq!((verdict, out), (XDP_TX, expected));
    assert!(stats.contains(&"l4_icmp_to_backend"), "{stats:?}");
}

#[test]
fn a_backends_port_unreachable_reaches_the_udp_client() {
    let mut dataplane = icmp_dataplane();
    let (_, forwarded) = run(&mut dataplane, &udp(TO_LB, client(), lb(53), 64, b"q"));
    let port_unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let error = icmp_error(
        FROM_BACKEND,
        *BACKEND_B.ip(),
        SNAT_ADDR,
        64,
        port_unreachable.clone(),
        &ip_packet(&forwarded),
    );
    let as_sent = udp(TO_LB, client(), lb(53), 63, b"q");
    let expected = icmp_error(
        TO_CLIENT,
        LB_ADDR,
        CLIENT,
        63,
        port_unreachable,
        &ip_packet(&as_sent),
    );
    let (verdict, out, _) = counted(&mut dataplane, &error);
    assert_eq!((verdict, out), (XDP_TX, expected));
}

#[test]
fn icmp_that_quotes_no_tracked_flow_or_is_no_error_goes_to_the_kernel_untouched() {
    let mut dataplane = icmp_dataplane();
    let stranger = tcp(
        TO_LB,
        SocketAddrV4::new(SNAT_ADDR, 61000),
        SocketAddrV4::new(Ipv4Addr::new(10, 78, 9, 9), 80),
        64,
        syn,
        &[],
    );
    let error = icmp_error(
        FROM_BACKEND,
        BACKEND_SIDE_ROUTER,
        SNAT_ADDR,
        64,
        FRAGMENTATION_NEEDED,
        &ip_packet(&stranger),
    );
    let mut ping = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_FRONT_MAC)
        .ipv4(CLIENT.octets(), LB_ADDR.octets(), 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut ping, b"ping")
        .unwrap();
    for frame in [error, ping] {
        let (verdict, out, stats) = counted(&mut dataplane, &frame);
        assert_eq!((verdict, out), (XDP_PASS, frame.clone()));
        assert_eq!(stats, ["class_other", "received", "verdict_pass"]);
    }
}
