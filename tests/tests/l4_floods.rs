//! Floods and scans against the L4 fast path end to end, in namespaces on one Ethernet segment
//! (as in `l4_edges`): 100 000 spoofed SYNs against established flows, the new-flow limit, a
//! new flow past a run of live SNAT tuples, a port scan of a shielded LB. The LB namespace
//! cannot forward (forwarding off, FORWARD policy DROP), so every packet that crosses it was
//! carried by XDP.

mod l4_support;

use std::{
    io::ErrorKind,
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use l4_support::{moved, one_backend::*, print_moved};
use socket2::{Domain, Protocol as SocketProtocol, SockAddr, SockRef, Socket, Type};
use xlb::l4::{
    service::{Listener, Protocol},
    settings::{L4Settings, SnatPorts, DEFAULT_OPEN_PORTS},
};
use xlb_common::Stat;
use xlb_testbed::{in_netns, Netns};

/// A raw socket whose packets carry their own IP header (IP_HDRINCL implied).
const IPPROTO_RAW: i32 = 255;
/// `send` on a raw socket whose device queue is full.
const ENOBUFS: i32 = 105;

/// Sends `count` SYNs to `target` from random spoofed sources in 10.200.0.0/16, through a raw
/// socket in `netns`, paced so the veths' queues keep up; returns how many the kernel took.
fn spoofed_syns(netns: &Netns, target: SocketAddrV4, count: usize) -> usize {
    in_netns(netns, move || {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(SocketProtocol::from(IPPROTO_RAW)),
        )
        .unwrap();
        let to = SockAddr::from(target);
        let mut random = fastrand::Rng::with_seed(5508);
        let mut packet = Vec::with_capacity(64);
        let mut sent = 0;
        for i in 0..count {
            let source = [10, 200, random.u8(..), random.u8(1..255)];
            packet.clear();
            PacketBuilder::ipv4(source, target.ip().octets(), 64)
                .tcp(random.u16(1024..), target.port(), random.u32(..), 64240)
                .syn()
                .write(&mut packet, &[])
                .unwrap();
            match socket.send_to(&packet, &to) {
                Ok(_) => sent += 1,
                Err(error) if error.raw_os_error() == Some(ENOBUFS) => {
                    // Let the queue drain.
                    thread::sleep(Duration::from_millis(1));
                }
                Err(error) => panic!("raw send: {error}"),
            }
            if i % 64 == 63 {
                thread::sleep(Duration::from_micros(200));
            }
        }
        sent
    })
    .unwrap()
}

/// Opens `count` connections to the TCP service and checks each echoes.
fn established(lab: &Lab, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|index| {
            let mut stream = lab.connect(TCP_LISTENER.port);
            echo_round_trip(&mut stream, format!("hello {index}\n").as_bytes());
            stream
        })
        .collect()
}

fn all_echo(streams: &mut [TcpStream], round: &str) {
    for (index, stream) in streams.iter_mut().enumerate() {
        echo_round_trip(stream, format!("{round} {index}\n").as_bytes());
    }
}

#[test]
fn a_syn_flood_leaves_established_flows_working() {
    let _turn = one_at_a_time();
    // 4096 flows fit, fewer than the backend's 31 744 SNAT tuples: the table fills first.
    let settings = L4Settings {
        flow_entries: 8192,
        ..Lab::settings()
    };
    let mut lab = Lab::start(&settings, Client::OnSegment);
    let _server = Server::start(&lab.backend.netns, BACKEND_TCP_PORT, echo);
    let table = lab.table(TCP_LISTENER, BACKEND_TCP_PORT);
    lab.steer(&table);
    let mut streams = established(&lab, 20);

    let before = lab.lb.stats();
    let started = Instant::now();
    let target = SocketAddrV4::new(lab.lb.addr, TCP_LISTENER.port);
    let sent = spoofed_syns(&lab.client.netns, target, 100_000);
    let flooded = lab.lb.stats();
    eprintln!("{sent} spoofed SYNs sent in {:?}", started.elapsed());
    print_moved("SYN flood", &before, &flooded);
    let refused = moved(&before, &flooded, Stat::L4DropFlowTable)
        + moved(&before, &flooded, Stat::L4DropSnatExhausted);
    assert!(refused > 0, "the flood was never refused");
    assert!(moved(&before, &flooded, Stat::L4NewFlow) <= 4096 - 20);

    // Every one comes back whole: their entries stayed while the table was full. (Replies
    // also count the backend's SYN-ACK retransmissions to spoofed clients.)
    all_echo(&mut streams, "after the flood");
    let after = lab.lb.stats();
    print_moved("20 echoes after the flood", &flooded, &after);
    assert!(moved(&flooded, &after, Stat::L4Forwarded) >= 20);
    assert_eq!(moved(&before, &after, Stat::L4DropFlowLost), 0);
}

#[test]
fn a_syn_flood_is_cut_by_the_new_flow_limit() {
    let _turn = one_at_a_time();
    let settings = L4Settings {
        flow_entries: 65536,
        new_flows_per_second: Some(1000),
        // The flood's half-open flows expire by the new client's second retransmission: a
        // CPU whose SNAT cursor came round to the other CPU's run of them would refuse its
        // SYNs until then (see `a_new_flow_gets_a_free_snat_tuple_past_a_run_of_live_ones`).
        tcp_handshake: Duration::from_secs(2),
        ..Lab::settings()
    };
    let mut lab = Lab::start(&settings, Client::OnSegment);
    let _server = Server::start(&lab.backend.netns, BACKEND_TCP_PORT, echo);
    let table = lab.table(TCP_LISTENER, BACKEND_TCP_PORT);
    lab.steer(&table);
    let mut streams = established(&lab, 20);

    let before = lab.lb.stats();
    let started = Instant::now();
    let target = SocketAddrV4::new(lab.lb.addr, TCP_LISTENER.port);
    let sent = spoofed_syns(&lab.client.netns, target, 20_000);
    let elapsed = started.elapsed();
    let flooded = lab.lb.stats();
    eprintln!("{sent} spoofed SYNs sent in {elapsed:?}");
    print_moved("SYN flood, 1000 new flows/s", &before, &flooded);
    let new_flows = moved(&before, &flooded, Stat::L4NewFlow);
    // 500 per CPU and second: at most one window per CPU per second started, plus the first.
    let windows = elapsed.as_secs() + 2;
    assert!(
        new_flows <= 1000 * windows,
        "{new_flows} new flows in {elapsed:?}"
    );
    assert!(moved(&before, &flooded, Stat::L4DropFlood) >= sent as u64 / 2);

    all_echo(&mut streams, "after the flood");
    // The limit renews: a new client gets in once this second's is no longer spent.
    thread::sleep(Duration::from_millis(1100));
    let quiet = lab.lb.stats();
    let connected = lab.try_connect(TCP_LISTENER.port, IO_TIMEOUT);
    let later = lab.lb.stats();
    print_moved("a new client", &quiet, &later);
    let mut stream = connected.unwrap();
    echo_round_trip(&mut stream, b"a new client\n");
}

/// Runs `work` in `netns` on CPU 0: the SYNs it sends are steered by CPU 0's XDP (veth
/// delivers on the sender's CPU), so they walk one CPU's SNAT cursor.
fn on_cpu0<T: Send>(netns: &Netns, work: impl FnOnce() -> T + Send) -> T {
    in_netns(netns, || {
        let mut cpus = nix::sched::CpuSet::new();
        cpus.set(0).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
        work()
    })
    .unwrap()
}

/// 32 SNAT tuples: 16 held by long-lived flows, 16 free again (their flows were reset and
/// have expired). A new client must get one of the free ones at its first SYN, even when its
/// CPU's walk over the tuples comes round to the run of 16 live ones: past the walk's first
/// attempts the program tries random tuples. (With a walk alone, that SYN was dropped as
/// `l4_drop_snat_exhausted` although half the tuples were free.)
#[test]
fn a_new_flow_gets_a_free_snat_tuple_past_a_run_of_live_ones() {
    let _turn = one_at_a_time();
    let settings = L4Settings {
        snat_ports: SnatPorts::new(61000, 61031).unwrap(),
        tcp_closing: Duration::from_millis(500),
        ..Lab::settings()
    };
    let mut lab = Lab::start(&settings, Client::OnSegment);
    let _server = Server::start(&lab.backend.netns, BACKEND_TCP_PORT, echo);
    let table = lab.table(TCP_LISTENER, BACKEND_TCP_PORT);
    lab.steer(&table);
    let target = SocketAddr::from((lab.lb.addr, TCP_LISTENER.port));

    let before = lab.lb.stats();
    let mut kept = on_cpu0(&lab.client.netns, move || {
        let streams: Vec<TcpStream> = (0..32)
            .map(|_| TcpStream::connect_timeout(&target, IO_TIMEOUT).unwrap())
            .collect();
        let (kept, reset) = streams.split_at(16);
        for stream in reset {
            SockRef::from(stream)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        kept.iter()
            .map(|stream| stream.try_clone().unwrap())
            .collect::<Vec<_>>()
    });
    let opened = lab.lb.stats();
    print_moved("32 flows opened, 16 reset", &before, &opened);
    assert_eq!(moved(&before, &opened, Stat::L4NewFlow), 32);
    // Past the closing timeout: the reset flows' tuples are free to reclaim.
    thread::sleep(Duration::from_millis(1500));

    let connected = on_cpu0(&lab.client.netns, move || {
        TcpStream::connect_timeout(&target, Duration::from_millis(800))
    });
    let after = lab.lb.stats();
    print_moved("one more client", &opened, &after);
    assert_eq!(moved(&opened, &after, Stat::L4DropSnatExhausted), 0);
    let mut stream = connected.expect("the first SYN of a new client is steered");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    echo_round_trip(&mut stream, b"a free tuple\n");
    all_echo(&mut kept, "still held");
}

#[test]
fn a_port_scan_of_the_lb_is_dropped_and_served_ports_still_answer() {
    let _turn = one_at_a_time();
    const ADMIN_PORT: u16 = 8080;
    const L7_PORT: u16 = 80;
    const CLOSED_PORT: u16 = 1234;
    let mut open_ports = DEFAULT_OPEN_PORTS.to_vec();
    open_ports.push(Listener {
        port: ADMIN_PORT,
        protocol: Protocol::Tcp,
    });
    let settings = L4Settings {
        open_ports,
        local_ports: Some(32768..=60999),
        ..Lab::settings()
    };
    let mut lab = Lab::start(&settings, Client::OnSegment);
    let _backend = Server::start(&lab.backend.netns, BACKEND_TCP_PORT, echo);
    let lb_netns = lab.lb_host.netns.clone();
    let _servers: Vec<Server> = [22, ADMIN_PORT, L7_PORT]
        .into_iter()
        .map(|port| Server::start(&lb_netns, port, hang_up))
        .collect();
    let table = lab.table(TCP_LISTENER, BACKEND_TCP_PORT);
    lab.steer(&table);

    // Unshielded, the LB's kernel refuses a closed port (RST).
    let refused = lab.try_connect(CLOSED_PORT, Duration::from_secs(1));
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    {
        let mut dataplane = lab.lb.dataplane.lock().unwrap();
        dataplane.set_l7_ports(&[L7_PORT]).unwrap();
        dataplane.shield(&[lab.lb.addr.into()]).unwrap();
    }
    for port in [22, ADMIN_PORT, L7_PORT] {
        lab.connect(port);
    }
    let mut stream = lab.connect(TCP_LISTENER.port);
    echo_round_trip(&mut stream, b"through the shield\n");

    let before = lab.lb.stats();
    let lb = lab.lb.addr;
    let answered = in_netns(&lab.client.netns, move || {
        let mut answered = Vec::new();
        let ports: Vec<u16> = (1..=1024).collect();
        for batch in ports.chunks(256) {
            let sockets: Vec<(u16, Socket)> = batch
                .iter()
                .map(|&port| {
                    let socket =
                        Socket::new(Domain::IPV4, Type::STREAM, Some(SocketProtocol::TCP)).unwrap();
                    socket.set_nonblocking(true).unwrap();
                    let _ = socket.connect(&SocketAddr::from((lb, port)).into());
                    (port, socket)
                })
                .collect();
            thread::sleep(Duration::from_millis(200));
            for (port, socket) in sockets {
                if socket.peer_addr().is_ok() {
                    answered.push(port);
                }
            }
        }
        answered
    })
    .unwrap();
    let scanned = lab.lb.stats();
    print_moved("scan of ports 1-1024", &before, &scanned);
    eprintln!("ports that answered the scan: {answered:?}");
    assert_eq!(answered, vec![22, L7_PORT]);
    assert!(moved(&before, &scanned, Stat::ShieldDropTcp) >= 1000);

    let silent = lab.try_connect(CLOSED_PORT, Duration::from_secs(1));
    assert_eq!(
        silent.map(|_| ()).unwrap_err().kind(),
        ErrorKind::TimedOut,
        "a closed port behind the shield must not answer"
    );
    let client = lab.client.addr;
    let udp = in_netns(&lab.client.netns, move || {
        UdpSocket::bind((client, 0)).unwrap()
    })
    .unwrap();
    udp.send_to(b"probe", (lb, 9999)).unwrap();
    thread::sleep(Duration::from_millis(100));
    let after = lab.lb.stats();
    assert!(moved(&scanned, &after, Stat::ShieldDropTcp) >= 1);
    assert_eq!(moved(&scanned, &after, Stat::ShieldDropUdp), 1);
    for port in [22, ADMIN_PORT, L7_PORT] {
        lab.connect(port);
    }
    echo_round_trip(&mut stream, b"after the scan\n");
}
