//! The L4 path frame by frame through the real kernel (BPF_PROG_TEST_RUN): for each fixture the
//! verdict, the exact output bytes (built independently with etherparse, whose checksums must
//! match the program's incremental updates byte for byte) and the counters that moved.

mod xdp_support;

use std::net::SocketAddrV4;

use xdp_support::*;
use xlb::{
    dataplane::Dataplane,
    l4::{
        maps::ServicePlan,
        service::{Listener, Protocol},
        settings::SnatPorts,
    },
};

fn one_backend_dataplane(ifindex: u32) -> Dataplane {
    dataplane(
        &settings(one_snat_port()),
        &[
            service(TCP_SERVICE, vec![backend(BACKEND_A, ifindex)]),
            service(UDP_SERVICE, vec![backend(BACKEND_A, ifindex)]),
        ],
    )
}

#[test]
fn a_tcp_flow_is_steered_both_ways() {
    let mut dataplane = one_backend_dataplane(INGRESS_IFINDEX);
    let syn_in = tcp(TO_LB, client(), lb(5432), 64, syn as Flags, &[]);
    let syn_out = tcp(TO_BACKEND, snat(), BACKEND_A, 63, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "SYN of a new flow",
        &syn_in,
        XDP_TX,
        Some(&syn_out),
        &["class_l4_service", "l4_new_flow", "verdict_tx"],
    );

    let syn_ack_in = tcp(FROM_BACKEND, BACKEND_A, snat(), 64, syn_ack as Flags, &[]);
    let syn_ack_out = tcp(TO_CLIENT, lb(5432), client(), 63, syn_ack as Flags, &[]);
    expect(
        &mut dataplane,
        "the backend's reply",
        &syn_ack_in,
        XDP_TX,
        Some(&syn_ack_out),
        &["class_l4_reply", "l4_replied", "verdict_tx"],
    );

    let data_in = tcp(TO_LB, client(), lb(5432), 64, ack as Flags, b"SELECT 1;");
    let data_out = tcp(
        TO_BACKEND,
        snat(),
        BACKEND_A,
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

    let retransmitted = tcp(TO_LB, client(), lb(5432), 64, syn as Flags, &[]);
    expect(
        &mut dataplane,
        "a retransmitted SYN keeps its flow",
        &retransmitted,
        XDP_TX,
        Some(&syn_out),
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
        (3, 1, 1)
    );
    assert_eq!(
        service.forward_bytes,
        (syn_in.len() * 2 + data_in.len()) as u64
    );
    assert_eq!(
        traffic.backends[&BACKEND_A.into()].reply_bytes,
        syn_ack_in.len() as u64
    );
}

#[test]
fn a_backends_reply_to_a_snat_port_that_a_service_also_listens_on_goes_to_the_client() {
    // A second service on the SNAT address, on the SNAT port: the backend's reply below is
    // addressed to a service port, and must still be taken for the reply it is.
    let on_the_snat_port = ServicePlan {
        addresses: vec![SNAT_ADDR.into()],
        ..service(
            Listener {
                port: SNAT_PORT,
                protocol: Protocol::Tcp,
            },
            vec![backend(BACKEND_B, INGRESS_IFINDEX)],
        )
    };
    let mut dataplane = dataplane(
        &settings(one_snat_port()),
        &[
            service(TCP_SERVICE, vec![backend(BACKEND_A, INGRESS_IFINDEX)]),
            on_the_snat_port,
        ],
    );
    let syn_in = tcp(TO_LB, client(), lb(5432), 64, syn as Flags, &[]);
    let (verdict, _) = run(&mut dataplane, &syn_in);
    assert_eq!(verdict, XDP_TX);
    let syn_ack_in = tcp(FROM_BACKEND, BACKEND_A, snat(), 64, syn_ack as Flags, &[]);
    let syn_ack_out = tcp(TO_CLIENT, lb(5432), client(), 63, syn_ack as Flags, &[]);
    expect(
        &mut dataplane,
        "the backend's reply to the SNAT port",
        &syn_ack_in,
        XDP_TX,
        Some(&syn_ack_out),
        &["class_l4_reply", "l4_replied", "verdict_tx"],
    );
}

#[test]
fn udp_datagrams_are_steered_both_ways() {
    let mut dataplane = one_backend_dataplane(INGRESS_IFINDEX);
    let query = udp(TO_LB, client(), lb(53), 64, b"query");
    let forwarded = udp(TO_BACKEND, snat(), BACKEND_A, 63, b"query");
    expect(
        &mut dataplane,
        "first datagram",
        &query,
        XDP_TX,
        Some(&forwarded),
        &["class_l4_service", "l4_new_flow", "verdict_tx"],
    );
    expect(
        &mut dataplane,
        "second datagram",
        &query,
        XDP_TX,
        Some(&forwarded),
        &["class_l4_service", "l4_forwarded", "verdict_tx"],
    );
    let answer = udp(FROM_BACKEND, BACKEND_A, snat(), 64, b"answer");
    let answered = udp(TO_CLIENT, lb(53), client(), 63, b"answer");
    expect(
        &mut dataplane,
        "the backend's answer",
        &answer,
        XDP_TX,
        Some(&answered),
        &["class_l4_reply", "l4_replied", "verdict_tx"],
    );

    let second_flow = udp(
        TO_LB,
        SocketAddrV4::new(CLIENT, 40001),
        lb(53),
        64,
        b"query",
    );
    // The only SNAT port is taken by the first flow to this backend.
    expect(
        &mut dataplane,
        "a second flow with one SNAT port",
        &second_flow,
        XDP_DROP,
        None,
        &["class_l4_service", "l4_drop_snat_exhausted", "verdict_drop"],
    );
}

#[test]
fn a_udp_datagram_without_checksum_keeps_none() {
    let mut dataplane = one_backend_dataplane(INGRESS_IFINDEX);
    let udp_checksum = 14 + 20 + 6;
    let mut query = udp(TO_LB, client(), lb(53), 64, b"query");
    query[udp_checksum..udp_checksum + 2].fill(0);
    let mut forwarded = udp(TO_BACKEND, snat(), BACKEND_A, 63, b"query");
    forwarded[udp_checksum..udp_checksum + 2].fill(0);
    expect(
        &mut dataplane,
        "checksum 0",
        &query,
        XDP_TX,
        Some(&forwarded),
        &["class_l4_service", "l4_new_flow", "verdict_tx"],
    );
}

#[test]
fn everything_else_is_passed_untouched() {
    let mut dataplane = one_backend_dataplane(INGRESS_IFINDEX);
    let pass = |dataplane: &mut Dataplane, name: &str, frame: &[u8], stats: &[&str]| {
        expect(dataplane, name, frame, XDP_PASS, None, stats);
    };
    pass(
        &mut dataplane,
        "a non-service port",
        &tcp(TO_LB, client(), lb(22), 64, syn as Flags, &[]),
        &["class_other", "verdict_pass"],
    );
    pass(
        &mut dataplane,
        "a service port with the wrong protocol",
        &udp(TO_LB, client(), lb(5432), 64, b"x"),
        &["class_other", "verdict_pass"],
    );
    pass(
        &mut dataplane,
        "another address",
        &tcp(
            TO_LB,
            client(),
            SocketAddrV4::new(SNAT_ADDR, 5432),
            64,
            syn as Flags,
            &[],
        ),
        &["class_other", "verdict_pass"],
    );
    pass(
        &mut dataplane,
        "a segment without SYN and without flow",
        &tcp(TO_LB, client(), lb(5432), 64, ack as Flags, b"late"),
        &["class_l4_service", "l4_pass_no_flow", "verdict_pass"],
    );
    pass(
        &mut dataplane,
        "a RST without flow",
        &tcp(TO_LB, client(), lb(5432), 64, |s| s.syn().rst(), &[]),
        &["class_l4_service", "l4_pass_no_flow", "verdict_pass"],
    );
    pass(
        &mut dataplane,
        "TTL 1",
        &tcp(TO_LB, client(), lb(5432), 1, syn as Flags, &[]),
        &["class_l4_service", "l4_pass_ttl", "verdict_pass"],
    );
    let mut fragment = udp(TO_LB, client(), lb(53), 64, b"first part");
    fragment[14 + 6] |= 0x20; // more fragments
    pass(
        &mut dataplane,
        "a first fragment",
        &fragment,
        &["class_l4_service", "l4_pass_fragment", "verdict_pass"],
    );
    pass(
        &mut dataplane,
        "a reply to a SNAT port without flow",
        &tcp(FROM_BACKEND, BACKEND_A, snat(), 64, syn_ack as Flags, &[]),
        &["class_other", "verdict_pass"],
    );

    let mut ipv6 = Vec::new();
    etherparse::PacketBuilder::ethernet2(CLIENT_MAC, LB_FRONT_MAC)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(40000, 5432, 1, 64240)
        .syn()
        .write(&mut ipv6, &[])
        .unwrap();
    pass(
        &mut dataplane,
        "IPv6 to an L4 port of an address without IPv6 services",
        &ipv6,
        &["class_other", "verdict_pass"],
    );

    let syn_in = tcp(TO_LB, client(), lb(5432), 64, syn as Flags, &[]);
    for len in 14..syn_in.len() {
        pass(
            &mut dataplane,
            &format!("SYN cut to {len} bytes"),
            &syn_in[..len],
            &["class_malformed", "verdict_pass"],
        );
    }
    let mut bad_offset = syn_in.clone();
    bad_offset[14 + 20 + 12] = 0xf0;
    pass(
        &mut dataplane,
        "TCP data offset past the packet",
        &bad_offset,
        &["class_malformed", "verdict_pass"],
    );
}

#[test]
fn a_service_without_backends_drops_new_flows() {
    let mut dataplane = dataplane(&settings(one_snat_port()), &[service(TCP_SERVICE, vec![])]);
    expect(
        &mut dataplane,
        "SYN to an empty service",
        &tcp(TO_LB, client(), lb(5432), 64, syn as Flags, &[]),
        XDP_DROP,
        None,
        &["class_l4_service", "l4_drop_no_backend", "verdict_drop"],
    );
}

#[test]
fn tracked_flows_keep_their_backend_when_the_table_changes() {
    let snat_ports = SnatPorts::new(61000, 61999).unwrap();
    let mut dataplane = dataplane(
        &settings(snat_ports),
        &[service(
            TCP_SERVICE,
            vec![backend(BACKEND_A, INGRESS_IFINDEX)],
        )],
    );
    let syn_in = tcp(TO_LB, client(), lb(5432), 64, syn as Flags, &[]);
    let (verdict, out) = run(&mut dataplane, &syn_in);
    assert_eq!(verdict, XDP_TX);
    let first = inspect(&out).unwrap();
    assert_eq!(first.dst, BACKEND_A);
    assert!(snat_ports.range().contains(&first.src.port()));
    assert_eq!(*first.src.ip(), SNAT_ADDR);

    dataplane
        .l4()
        .apply(&[service(
            TCP_SERVICE,
            vec![backend(BACKEND_B, INGRESS_IFINDEX)],
        )])
        .unwrap();
    let data_in = tcp(TO_LB, client(), lb(5432), 64, ack as Flags, b"more");
    let (verdict, out) = run(&mut dataplane, &data_in);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        inspect(&out).unwrap().dst,
        BACKEND_A,
        "the connection table wins"
    );
    assert_eq!(inspect(&out).unwrap().src, first.src);

    let other_client = SocketAddrV4::new(CLIENT, 40001);
    let (_, out) = run(
        &mut dataplane,
        &tcp(TO_LB, other_client, lb(5432), 64, syn as Flags, &[]),
    );
    assert_eq!(
        inspect(&out).unwrap().dst,
        BACKEND_B,
        "a removed backend gets no new flow"
    );
}

#[test]
fn table_updates_write_only_changed_ring_positions() {
    let ring = settings(one_snat_port()).ring_size.get() as usize;
    let endpoint = |i: u8| SocketAddrV4::new(std::net::Ipv4Addr::new(10, 78, 1, 10 + i), 30000);
    let plan = |count: u8| {
        let backends = (0..count)
            .map(|i| backend(endpoint(i), INGRESS_IFINDEX))
            .collect();
        [service(TCP_SERVICE, backends)]
    };
    let mut dataplane = dataplane(&settings(one_snat_port()), &[]);
    let mut apply = |count: u8| dataplane.l4().apply(&plan(count)).unwrap();

    let first = apply(3);
    assert_eq!(
        (first.rings_flipped, first.ring_positions_written),
        (1, ring)
    );
    let unchanged = apply(3);
    assert_eq!(
        (unchanged.rings_flipped, unchanged.ring_positions_written),
        (0, 0)
    );
    let added = apply(4);
    assert_eq!(
        (added.rings_flipped, added.ring_positions_written),
        (1, ring),
        "the other ring was empty"
    );
    let back = apply(3);
    assert_eq!(
        (back.rings_flipped, back.ring_positions_written),
        (1, 0),
        "the inactive ring holds it"
    );
    let fifth = apply(5);
    assert_eq!(fifth.rings_flipped, 1);
    assert!(
        fifth.ring_positions_written > 0 && fifth.ring_positions_written < ring / 2,
        "3 → 5 backends rewrites about 2/5 of the ring, not {}",
        fifth.ring_positions_written
    );
}
