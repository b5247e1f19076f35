//! Edge cases of the L4 fast path end to end, in namespaces on one Ethernet segment (as in
//! `l4_namespaces`): path-MTU discovery through the ICMP translation, a backend's "port
//! unreachable" reaching its UDP client, a backend's MAC changing under a live stream, a SYN
//! flood against a full connection table and against the new-flow limit, and a port scan of a
//! shielded LB. The LB namespace cannot forward (forwarding off, FORWARD policy DROP), so every
//! packet that crosses it was carried by XDP.
//!
//! The tests take turns (one lock): each builds its own namespaces, and a flood or a scan
//! running beside another test's stream would only make that one slower.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

mod l4_support;

use etherparse::PacketBuilder;
use l4_support::{moved, peer_program, print_moved, set_sysctl, LoadBalancer};
use socket2::{Domain, Protocol as SocketProtocol, SockAddr, SockRef, Socket, Type};
use xlb::{
    dataplane::Dataplane,
    l4::{
        maglev::RingSize,
        service::{L4Route, L4RouteTable, Listener, Protocol},
        settings::{L4Settings, SnatPorts, DEFAULT_OPEN_PORTS},
    },
};
use xlb_common::Stat;
use xlb_testbed::{
    create_veth_pair, disable_tx_checksum_offload, in_netns, require_root, run_id, Host, Netns,
    Segment, VethEnd,
};

const SUBNET_OCTET: u8 = 43;
const LB_HOST: u8 = 10;
const BACKEND_HOST: u8 = 20;
const TCP_LISTENER: Listener = Listener {
    port: 5432,
    protocol: Protocol::Tcp,
};
const UDP_LISTENER: Listener = Listener {
    port: 5353,
    protocol: Protocol::Udp,
};
/// Where the backend's TCP server listens.
const BACKEND_TCP_PORT: u16 = 30001;
/// A UDP port nothing listens on at the backend.
const CLOSED_BACKEND_UDP_PORT: u16 = 30099;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The routed client's link: client 10.81.43.2, router 10.81.43.1.
const CLIENT_LINK_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 81, SUBNET_OCTET, 2);
const CLIENT_LINK_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 81, SUBNET_OCTET, 1);
/// The router's MTU toward the client, below the 1500 of everything else.
const NARROW_MTU: &str = "1280";
const DOWNLOAD_BYTES: usize = 1 << 20;
/// A raw socket whose packets carry their own IP header (IP_HDRINCL implied).
const IPPROTO_RAW: i32 = 255;
/// `send` on a raw socket whose device queue is full.
const ENOBUFS: i32 = 105;

static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A TCP server in a namespace: every accepted connection gets its own thread running
/// `handler`, which must return soon after `stop` is set. Stops when dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

type Handler = fn(TcpStream, &AtomicBool);

impl Server {
    fn start(netns: &Netns, port: u16, handler: Handler) -> Server {
        let listener = in_netns(netns, move || {
            TcpListener::bind(("0.0.0.0", port))
                .unwrap_or_else(|error| panic!("port {port}: {error}"))
        })
        .unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accept_stop = stop.clone();
        let thread = thread::spawn(move || {
            let mut connections = Vec::new();
            while !accept_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let stop = accept_stop.clone();
                        connections.push(thread::spawn(move || {
                            stream.set_nonblocking(false).unwrap();
                            handler(stream, &stop);
                        }));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for connection in connections {
                let _ = connection.join();
            }
        });
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn timed_out(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Echoes until the peer closes.
fn echo(mut stream: TcpStream, stop: &AtomicBool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buffer = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(len) => {
                if stream.write_all(&buffer[..len]).is_err() {
                    return;
                }
            }
            Err(error) if timed_out(&error) => {}
            Err(_) => return,
        }
    }
}

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

/// Accepts and hangs up: a port that is served.
fn hang_up(_stream: TcpStream, _stop: &AtomicBool) {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Client {
    /// On the segment, beside the LB.
    OnSegment,
    /// Behind a router whose link to the client has an MTU of [`NARROW_MTU`].
    Routed,
}

/// Client, LB and one backend (and a router when the client is routed). The LB's switch port
/// runs a native XDP_PASS program: XDP_TX out of a veth needs one on the peer.
struct Lab {
    runtime: tokio::runtime::Runtime,
    lb: LoadBalancer,
    lb_host: Host,
    client: Host,
    backend: Host,
    router: Option<Host>,
    // Dropped after the LB: the peer's program, then the namespaces.
    _peer_program: Dataplane,
    _hosts: Vec<Host>,
    _segment: Segment,
}

impl Lab {
    fn settings() -> L4Settings {
        L4Settings {
            ring_size: RingSize::new(65537).unwrap(),
            flow_entries: 16384,
            service_slots: 4,
            ..L4Settings::default()
        }
    }

    fn start(settings: &L4Settings, client: Client) -> Lab {
        require_root().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let segment = Segment::create_on(SUBNET_OCTET).unwrap();
        let lb_host = segment.add_host("lb", LB_HOST).unwrap();
        let backend = segment.add_host("be", BACKEND_HOST).unwrap();
        let (client, router) = match client {
            Client::OnSegment => (segment.add_host("client", 2).unwrap(), None),
            Client::Routed => {
                let router = segment.add_host("router", 1).unwrap();
                (routed_client(&router), Some(router))
            }
        };
        // Spoofed SYNs' SYN-ACKs come back to the client's MAC: dropped, not forwarded.
        set_sysctl(&client.netns, "net.ipv4.ip_forward", "0");
        let peer_program = peer_program(&segment, &[&lb_host]);
        let lb = LoadBalancer::start(&lb_host, &runtime, settings);
        let mut hosts = vec![lb_host.clone(), backend.clone(), client.clone()];
        hosts.extend(router.clone());
        Lab {
            runtime,
            lb,
            lb_host,
            client,
            backend,
            router,
            _peer_program: peer_program,
            _hosts: hosts,
            _segment: segment,
        }
    }

    /// Applies `table`, as a discovery poll does, until its one backend is resolved.
    fn steer(&mut self, table: &L4RouteTable) {
        self.lb.steer(&self.runtime, table, 1);
    }

    fn table(&self, listener: Listener, backend_port: u16) -> L4RouteTable {
        L4RouteTable {
            listeners: vec![L4Route {
                service: "edge".into(),
                listener,
                target_port: listener.port,
                endpoints: vec![SocketAddr::V4(SocketAddrV4::new(
                    self.backend.addr,
                    backend_port,
                ))],
            }],
            rejected: vec![],
        }
    }

    /// A TCP connection from the client namespace to `port` at the LB address.
    fn try_connect(&self, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
        let target = SocketAddr::from((self.lb.addr, port));
        let stream = in_netns(&self.client.netns, move || {
            TcpStream::connect_timeout(&target, timeout)
        })
        .unwrap()?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Ok(stream)
    }

    fn connect(&self, port: u16) -> TcpStream {
        self.try_connect(port, IO_TIMEOUT)
            .unwrap_or_else(|error| panic!("connecting to {}:{port}: {error}", self.lb.addr))
    }
}

/// A client namespace behind `router`: `to-router` (MTU 1500) ↔ the router's `to-client`
/// (MTU [`NARROW_MTU`]), the client's default route via the router, the router forwarding.
fn routed_client(router: &Host) -> Host {
    let netns = Netns::create(&format!("xlb-{}-edge-client", run_id())).unwrap();
    create_veth_pair(
        &VethEnd {
            netns: &netns,
            interface: "to-router",
            address: CLIENT_LINK_CLIENT,
            prefix_len: 24,
        },
        &VethEnd {
            netns: &router.netns,
            interface: "to-client",
            address: CLIENT_LINK_ROUTER,
            prefix_len: 24,
        },
    )
    .unwrap();
    disable_tx_checksum_offload(&netns, "to-router").unwrap();
    disable_tx_checksum_offload(&router.netns, "to-client").unwrap();
    router
        .netns
        .ip(&["link", "set", "dev", "to-client", "mtu", NARROW_MTU])
        .unwrap();
    router
        .netns
        .run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    netns
        .ip(&[
            "route",
            "add",
            "default",
            "via",
            &CLIENT_LINK_ROUTER.to_string(),
        ])
        .unwrap();
    Host {
        netns,
        addr: CLIENT_LINK_CLIENT,
        switch_port: String::new(),
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

/// `/proc/net/snmp`'s Icmp `field` in `netns`.
fn icmp_counter(netns: &Netns, field: &str) -> u64 {
    let snmp = netns.run("cat", &["/proc/net/snmp"]).unwrap();
    let mut rows = snmp.lines().filter(|line| line.starts_with("Icmp:"));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let index = names
        .split_whitespace()
        .position(|name| name == field)
        .unwrap();
    values
        .split_whitespace()
        .nth(index)
        .unwrap()
        .parse()
        .unwrap()
}

fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
}

#[test]
fn a_large_download_crosses_a_smaller_mtu_behind_the_lb() {
    let _turn = one_at_a_time();
    let mut lab = Lab::start(&Lab::settings(), Client::Routed);
    let router = lab.router.clone().unwrap();
    let _server = Server::start(&lab.backend.netns, BACKEND_TCP_PORT, download);
    let table = lab.table(TCP_LISTENER, BACKEND_TCP_PORT);
    lab.steer(&table);

    // Without ICMP from the router, the backend never learns the path's MTU: a black hole.
    router
        .netns
        .run("iptables", &["-A", "OUTPUT", "-p", "icmp", "-j", "DROP"])
        .unwrap();
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
    router
        .netns
        .run("iptables", &["-D", "OUTPUT", "-p", "icmp", "-j", "DROP"])
        .unwrap();

    let sent_by_router = icmp_counter(&router.netns, "OutDestUnreachs");
    let started = Instant::now();
    let mut stream = lab.connect(TCP_LISTENER.port);
    let (received, ended) = read_until(&mut stream, started + Duration::from_secs(20));
    let after = lab.lb.stats();
    eprintln!(
        "downloaded {received} bytes in {:?}; the router sent {} more destination-unreachable",
        started.elapsed(),
        icmp_counter(&router.netns, "OutDestUnreachs") - sent_by_router
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

    let target = SocketAddr::from((lab.lb.addr, UDP_LISTENER.port));
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
    // 4096 flows fit, fewer than the backend's 4536 SNAT tuples: the table fills first.
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
        dataplane.shield(&[lab.lb.addr]).unwrap();
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
