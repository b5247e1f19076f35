//! The shield through the real kernel (BPF_PROG_TEST_RUN): what reaches the LB's addresses
//! when a port scan sweeps them, and what always stays open.

mod xdp_support;

use std::{collections::BTreeMap, net::SocketAddrV4};

use etherparse::PacketBuilder;
use xdp_support::*;
use xlb::{
    dataplane::Dataplane,
    l4::{
        service::{Listener, Protocol},
        settings::L4Settings,
    },
};

const ADMIN_PORT: u16 = 8080;
const L7_PORTS: [u16; 2] = [80, 443];

fn shielded(shield: bool) -> Dataplane {
    let mut settings: L4Settings = settings(one_snat_port());
    settings.shield = shield;
    settings.local_ports = Some(32768..=60999);
    settings.open_ports.push(Listener {
        port: ADMIN_PORT,
        protocol: Protocol::Tcp,
    });
    let mut dataplane = dataplane(
        &settings,
        &[service(
            TCP_SERVICE,
            vec![backend(BACKEND_A, INGRESS_IFINDEX)],
        )],
    );
    dataplane.set_l7_ports(&L7_PORTS).unwrap();
    dataplane.shield(&[LB_ADDR.into()]).unwrap();
    dataplane
}

fn syn_to(addr: std::net::Ipv4Addr, port: u16) -> Vec<u8> {
    tcp(TO_LB, client(), SocketAddrV4::new(addr, port), 64, syn, &[])
}

fn udp_to(port: u16) -> Vec<u8> {
    udp(TO_LB, client(), lb(port), 64, b"probe")
}

/// The verdict of every frame, with the counters that moved over all of them.
fn sweep(dataplane: &mut Dataplane, frames: &[Vec<u8>]) -> (Vec<u32>, BTreeMap<&'static str, u64>) {
    let before = dataplane.stats().unwrap();
    let verdicts = frames.iter().map(|frame| run(dataplane, frame).0).collect();
    let moved = moved(&before, &dataplane.stats().unwrap())
        .into_iter()
        .collect();
    (verdicts, moved)
}

#[test]
fn a_port_scan_of_the_lb_address_is_dropped_except_what_is_served_or_open() {
    let mut dataplane = shielded(true);
    let scan: Vec<Vec<u8>> = (1..=1024).map(|port| syn_to(LB_ADDR, port)).collect();
    let (verdicts, moved) = sweep(&mut dataplane, &scan);
    let through: Vec<u16> = (1..=1024)
        .zip(&verdicts)
        .filter(|(_, verdict)| **verdict != XDP_DROP)
        .map(|(port, _)| port)
        .collect();
    assert_eq!(through, [22, 80, 443], "SSH and the L7 ports");
    assert_eq!(moved["shield_drop_tcp"], 1021);
    assert_eq!(moved["class_l7"], 2);

    for (port, why) in [
        (5432, "the L4 service"),
        (ADMIN_PORT, "the admin ListenAddr"),
        (2377, "Swarm's cluster management"),
        (7946, "Swarm's gossip"),
        (
            40000,
            "an ephemeral port: replies to this node's own connections",
        ),
    ] {
        let (verdict, _) = run(&mut dataplane, &syn_to(LB_ADDR, port));
        assert_ne!(verdict, XDP_DROP, "{port}: {why}");
    }
    let (verdict, _) = run(&mut dataplane, &syn_to(CLIENT, 1234));
    assert_eq!(verdict, XDP_PASS, "an address that is not shielded");
}

#[test]
fn udp_is_shielded_by_port_and_protocol_and_other_protocols_pass() {
    let mut dataplane = shielded(true);
    let frames = [
        udp_to(161),
        udp_to(22),
        udp_to(7946),
        udp_to(4789),
        udp_to(68),
    ];
    let (verdicts, moved) = sweep(&mut dataplane, &frames);
    assert_eq!(
        verdicts,
        [XDP_DROP, XDP_DROP, XDP_PASS, XDP_PASS, XDP_PASS],
        "SNMP and UDP 22 are closed; gossip, VXLAN and DHCP open"
    );
    assert_eq!(moved["shield_drop_udp"], 2);

    let mut ping = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_FRONT_MAC)
        .ipv4(CLIENT.octets(), LB_ADDR.octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, b"ping")
        .unwrap();
    assert_eq!(
        run(&mut dataplane, &ping).0,
        XDP_PASS,
        "ICMP is not shielded"
    );
}

#[test]
fn with_the_shield_off_nothing_is_dropped_for_its_port() {
    let mut dataplane = shielded(false);
    let (verdicts, moved) = sweep(&mut dataplane, &[syn_to(LB_ADDR, 1234), udp_to(161)]);
    assert_eq!(verdicts, [XDP_PASS, XDP_PASS]);
    assert!(!moved.contains_key("shield_drop_tcp") && !moved.contains_key("shield_drop_udp"));
}

#[test]
fn the_published_ports_of_tasks_on_this_node_are_opened_and_closed_with_the_routes() {
    let mut dataplane = shielded(true);
    let task_port = Listener {
        port: 1500,
        protocol: Protocol::Tcp,
    };
    let ssh = Listener {
        port: 22,
        protocol: Protocol::Tcp,
    };
    assert_eq!(run(&mut dataplane, &syn_to(LB_ADDR, 1500)).0, XDP_DROP);
    dataplane
        .open_endpoint_ports(&[task_port, ssh].into())
        .unwrap();
    assert_eq!(run(&mut dataplane, &syn_to(LB_ADDR, 1500)).0, XDP_PASS);
    dataplane.open_endpoint_ports(&[].into()).unwrap();
    assert_eq!(
        run(&mut dataplane, &syn_to(LB_ADDR, 1500)).0,
        XDP_DROP,
        "closed again when the task leaves"
    );
    assert_eq!(
        run(&mut dataplane, &syn_to(LB_ADDR, 22)).0,
        XDP_PASS,
        "a configured port stays open when a task on it leaves"
    );
}
