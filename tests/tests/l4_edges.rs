//! Edge cases of the L4 fast path end to end, in namespaces on one Ethernet segment (as in
//! `l4_namespaces`): path-MTU discovery through the ICMP and ICMPv6 translations, a backend's "port
//! unreachable" reaching its UDP client, a backend's MAC changing under a live stream. The LB
//! namespace cannot forward (forwarding off, FORWARD policy DROP), so every packet that crosses
//! it was carried by XDP.

mod l4_support;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use l4_support::{moved, one_backend::*, print_moved};
use socket2::SockRef;
use xlb_common::Stat;
use xlb_testbed::{in_netns, Netns, Segment};

/// A UDP port nothing listens on at the backend.
const CLOSED_BACKEND_UDP_PORT: u16 = 30099;
const DOWNLOAD_BYTES: usize = 1 << 20;
/// Sends [`DOWNLOAD_BYTES`] (byte `i` is `i % 251`), then closes.
fn download(mut stream: TcpStream, stop: &AtomicBool) {
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let data: Vec<u8> = (0..DOWNLOAD_BYTES).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    while sent < data.len() && !stop.load(Ordering::Relaxed) {
        let end = (sent + 65536).min(data.len());
        match stream.write(&data[sent..end]) {
            Ok(len) => sent += len,
            Err(error) if timed_out(&error) => {}
            Err(_) => return,
        }
    }
}

/// Reads from `stream` until EOF or `deadline`: the bytes received, checked against the
/// download's pattern, and whether the download ended.
fn read_until(stream: &mut TcpStream, deadline: Instant) -> (usize, bool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buffer = vec![0u8; 65536];
    let mut received = 0;
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return (received, true),
            Ok(len) => {
                for (i, byte) in buffer[..len].iter().enumerate() {
                    assert_eq!(*byte, ((received + i) % 251) as u8, "byte {}", received + i);
                }
                received += len;
            }
            Err(error) if timed_out(&error) => {}
            Err(error) => panic!("download after {received} bytes: {error}"),
        }
    }
    (received, false)
}

/// The router's ICMP errors sent, from `/proc/net/snmp` and `/proc/net/snmp6`: what it told
/// the backend about the path's MTU.
fn icmp_counters(netns: &Netns) -> String {
    let snmp = netns.run("cat", &["/proc/net/snmp"]).unwrap();
    let mut rows = snmp.lines().filter(|line| line.starts_with("Icmp:"));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let unreachable = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutDestUnreachs")
        .map_or("?", |(_, value)| value);
    let snmp6 = netns.run("cat", &["/proc/net/snmp6"]).unwrap();
    let too_big = snmp6
        .lines()
        .find_map(|line| line.strip_prefix("Icmp6OutPktTooBigs"))
        .map_or("?", str::trim);
    format!("{unreachable} destination unreachable, {too_big} packet too big")
}

#[test]
fn a_large_download_crosses_a_smaller_mtu_behind_the_lb() {
    large_download_crosses_a_smaller_mtu(Client::Routed);
}

#[test]
fn ipv6_a_large_download_crosses_a_smaller_mtu_behind_the_lb() {
    large_download_crosses_a_smaller_mtu(Client::RoutedIpv6);
}

/// The router's rule that drops what path-MTU discovery needs: ICMP, or ICMPv6's "packet
/// too big" (not all of ICMPv6: neighbour discovery must go on).
fn mtu_icmp_rule(client: &Client) -> (&'static str, &'static [&'static str]) {
    match client {
        Client::RoutedIpv6 => (
            "ip6tables",
            &[
                "OUTPUT",
                "-p",
                "icmpv6",
                "--icmpv6-type",
                "packet-too-big",
                "-j",
                "DROP",
            ],
        ),
        _ => ("iptables", &["OUTPUT", "-p", "icmp", "-j", "DROP"]),
    }
}

fn large_download_crosses_a_smaller_mtu(client: Client) {
    let _turn = one_at_a_time();
    let (iptables, rule) = mtu_icmp_rule(&client);
    let mut lab = Lab::start(&Lab::settings(), client);
    let router = lab.router.clone().unwrap();
    let _server = Server::start(&lab.backend.netns, BACKEND_TCP_PORT, download);
    let table = lab.table(TCP_LISTENER, BACKEND_TCP_PORT);
    lab.steer(&table);

    // Without ICMP from the router, the backend never learns the path's MTU: a black hole.
    let with = |action: &'static str| [&[action][..], rule].concat();
    router.netns.run(iptables, &with("-A")).unwrap();
    let before = lab.lb.stats();
    let mut stalled = lab.connect(TCP_LISTENER.port);
    let (received, ended) = read_until(&mut stalled, Instant::now() + Duration::from_secs(3));
    let blackholed = lab.lb.stats();
    print_moved("ICMP dropped by the router, 3 s", &before, &blackholed);
    assert!(
        !ended && received < DOWNLOAD_BYTES,
        "the download went through without ICMP ({received} bytes)"
    );
    assert_eq!(moved(&before, &blackholed, Stat::L4IcmpToBackend), 0);
    // Reset, so the backend stops retransmitting it.
    SockRef::from(&stalled)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stalled);
    router.netns.run(iptables, &with("-D")).unwrap();

    let started = Instant::now();
    let mut stream = lab.connect(TCP_LISTENER.port);
    let (received, ended) = read_until(&mut stream, started + Duration::from_secs(20));
    let after = lab.lb.stats();
    eprintln!(
        "downloaded {received} bytes in {:?}; the router's ICMP: {}",
        started.elapsed(),
        icmp_counters(&router.netns)
    );
    print_moved("ICMP allowed", &blackholed, &after);
    assert_eq!(received, DOWNLOAD_BYTES);
    assert!(ended);
    assert!(moved(&blackholed, &after, Stat::L4IcmpToBackend) > 0);
    assert_eq!(moved(&before, &after, Stat::L4DropFlowLost), 0);
}

#[test]
fn a_backends_port_unreachable_reaches_the_udp_client() {
    let _turn = one_at_a_time();
    let mut lab = Lab::start(&Lab::settings(), Client::OnSegment);
    let table = lab.table(UDP_LISTENER, CLOSED_BACKEND_UDP_PORT);
    lab.steer(&table);

    let target = SocketAddr::new(lab.lb_addr, UDP_LISTENER.port);
    let client = lab.client.addr;
    let socket = in_netns(&lab.client.netns, move || {
        let socket = UdpSocket::bind((client, 0)).unwrap();
        socket.connect(target).unwrap();
        socket
    })
    .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let before = lab.lb.stats();
    let mut refused = false;
    for attempt in 0..5 {
        socket.send(format!("query {attempt}").as_bytes()).unwrap();
        let mut buffer = [0u8; 1500];
        match socket.recv(&mut buffer) {
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            Err(error) if timed_out(&error) => {}
            other => panic!("nothing listens at the backend, yet: {other:?}"),
        }
    }
    let after = lab.lb.stats();
    print_moved("UDP to a closed backend port", &before, &after);
    assert!(refused, "the client's socket never got ECONNREFUSED");
    assert!(moved(&before, &after, Stat::L4IcmpToClient) >= 1);
    assert_eq!(moved(&before, &after, Stat::L4NewFlow), 1);
}

#[test]
fn a_backends_mac_change_under_a_live_stream_keeps_the_stream() {
    let _turn = one_at_a_time();
    let mut lab = Lab::start(&Lab::settings(), Client::OnSegment);
    let _server = Server::start(&lab.backend.netns, BACKEND_TCP_PORT, echo);
    let table = lab.table(TCP_LISTENER, BACKEND_TCP_PORT);
    lab.steer(&table);

    let mut stream = lab.connect(TCP_LISTENER.port);
    for round in 0..10 {
        echo_round_trip(&mut stream, format!("before {round}\n").as_bytes());
        thread::sleep(Duration::from_millis(100));
    }
    let before = lab.lb.stats();

    let new_mac = "02:00:5e:00:43:20";
    lab.backend
        .netns
        .ip(&[
            "link",
            "set",
            "dev",
            Segment::HOST_INTERFACE,
            "address",
            new_mac,
        ])
        .unwrap();
    let backend = lab.backend.addr.to_string();
    // The LB's kernel learns it (as from the backend's gratuitous ARP, or a re-resolution).
    lab.lb_host
        .netns
        .ip(&[
            "neigh",
            "replace",
            &backend,
            "lladdr",
            new_mac,
            "dev",
            Segment::HOST_INTERFACE,
            "nud",
            "reachable",
        ])
        .unwrap();

    // Until the next poll writes it, XDP still sends to the old MAC: the backend ignores it.
    stream.write_all(b"during the change\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut echoed = vec![0u8; b"during the change\n".len()];
    let held = stream.read(&mut echoed);
    assert!(
        matches!(&held, Err(error) if timed_out(error)),
        "an echo came back before the new MAC was written: {held:?}"
    );
    lab.runtime
        .block_on(lab.lb.steering.update(&table))
        .unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, b"during the change\n");
    for round in 0..10 {
        echo_round_trip(&mut stream, format!("after {round}\n").as_bytes());
        thread::sleep(Duration::from_millis(100));
    }
    let after = lab.lb.stats();
    print_moved("across the MAC change", &before, &after);
    assert_eq!(moved(&before, &after, Stat::L4NewFlow), 0);
    assert_eq!(moved(&before, &after, Stat::L4FlowBackendGone), 0);
    assert!(moved(&before, &after, Stat::L4Forwarded) >= 11);
}
