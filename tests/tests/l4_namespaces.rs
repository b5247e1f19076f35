//! The L4 fast path end to end, in namespaces on one Ethernet segment: a client, two load
//! balancers (lb-00, lb-01) and backends, with the XDP program, the map writer and the next-hop
//! resolver of the daemon running in each LB namespace. The LB namespaces cannot forward or NAT
//! anything (forwarding off, FORWARD policy DROP, no NAT rules, nothing listening on the L4
//! ports), so every connection that works was carried by XDP in both directions. Every case
//! runs over IPv4 and over IPv6.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

mod l4_support;

use l4_support::{greet_and_echo, peer_program, LoadBalancer};
use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};
use xlb::{
    dataplane::Dataplane,
    l4::{
        maglev::RingSize,
        maps::IpFamily,
        service::{L4Route, L4RouteTable, Listener, Protocol},
        settings::L4Settings,
    },
};
use xlb_common::Stat;
use xlb_testbed::{in_netns, require_root, Host, Segment};

const TCP_LISTENER: Listener = Listener {
    port: 5432,
    protocol: Protocol::Tcp,
};
const UDP_LISTENER: Listener = Listener {
    port: 5353,
    protocol: Protocol::Udp,
};
/// Where each backend host's servers listen (its "published ports").
const BACKEND_TCP_PORT: u16 = 30001;
const BACKEND_UDP_PORT: u16 = 30053;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const SUBNET_OCTET: u8 = 42;

/// A TCP server that greets each connection with its name, then echoes; a UDP server that
/// answers `name:payload`. Both stop when dropped.
struct Backend {
    name: String,
    addr: IpAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    fn start(host: &Host, addr: IpAddr, name: &str) -> Backend {
        let (tcp, udp) = in_netns(&host.netns, || {
            let tcp = TcpListener::bind((addr, BACKEND_TCP_PORT)).unwrap();
            let udp = UdpSocket::bind((addr, BACKEND_UDP_PORT)).unwrap();
            (tcp, udp)
        })
        .unwrap();
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let greeting = format!("{name}\n");
        let tcp_stop = stop.clone();
        let tcp_thread = thread::spawn(move || {
            while !tcp_stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((stream, _)) => {
                        let greeting = greeting.clone();
                        thread::spawn(move || echo(stream, &greeting));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let udp_stop = stop.clone();
        let udp_name = name.to_owned();
        let udp_thread = thread::spawn(move || {
            let mut buffer = [0u8; 1500];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((len, peer)) = udp.recv_from(&mut buffer) {
                    let mut answer = format!("{udp_name}:").into_bytes();
                    answer.extend_from_slice(&buffer[..len]);
                    let _ = udp.send_to(&answer, peer);
                }
            }
        });
        Backend {
            name: name.to_owned(),
            addr,
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

fn echo(stream: TcpStream, greeting: &str) {
    stream.set_nonblocking(false).unwrap();
    greet_and_echo(stream, greeting.as_bytes());
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The segment: client, lb-00, lb-01, be-0..be-3, the LBs' switch ports with a native
/// XDP_PASS program (XDP_TX out of a veth needs one on the peer).
struct Lab {
    runtime: tokio::runtime::Runtime,
    client: Host,
    /// The client's address in the lab's family, and each LB's.
    client_addr: IpAddr,
    lb_addrs: Vec<IpAddr>,
    lbs: Vec<LoadBalancer>,
    backends: Vec<Backend>,
    // Dropped after the LBs: the peers' programs, then the namespaces.
    _peer_programs: Dataplane,
    _hosts: Vec<Host>,
    _segment: Segment,
}

impl Lab {
    /// The lab with `backend_count` backends, its client, LBs and backends talking `family`
    /// (IPv6: each host gets an address of it besides its IPv4 one).
    fn start(backend_count: usize, family: IpFamily) -> Lab {
        require_root().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Fixed addresses and client ports make the Maglev spread the same on every run.
        let segment = Segment::create_on(SUBNET_OCTET).unwrap();
        let client = segment.add_host("client", 2).unwrap();
        let lb_hosts: Vec<Host> = (0..2)
            .map(|i| segment.add_host(&format!("lb-0{i}"), 10 + i).unwrap())
            .collect();
        let backend_hosts: Vec<Host> = (0..4)
            .map(|i| segment.add_host(&format!("be-{i}"), 20 + i).unwrap())
            .collect();
        let address = |host: &Host, number: u8| -> IpAddr {
            match family {
                IpFamily::V4 => host.addr.into(),
                IpFamily::V6 => segment.add_ipv6(host, number).unwrap().into(),
            }
        };
        let client_addr = address(&client, 2);
        let lb_addrs: Vec<IpAddr> = (0..2)
            .map(|i| address(&lb_hosts[i], 10 + i as u8))
            .collect();
        let backend_addrs: Vec<IpAddr> = (0..4)
            .map(|i| address(&backend_hosts[i], 20 + i as u8))
            .collect();
        let peer_programs = peer_program(&segment, &lb_hosts.iter().collect::<Vec<_>>());
        let lb_settings = L4Settings {
            ring_size: RingSize::new(65537).unwrap(),
            flow_entries: 16384,
            service_slots: 4,
            ..L4Settings::default()
        };
        let lbs = lb_hosts
            .iter()
            .map(|host| LoadBalancer::start(host, &runtime, &lb_settings))
            .collect();
        let backends = backend_hosts
            .iter()
            .take(backend_count)
            .enumerate()
            .map(|(i, host)| Backend::start(host, backend_addrs[i], &format!("be-{i}")))
            .collect();
        let hosts = lb_hosts.into_iter().chain(backend_hosts).collect();
        Lab {
            runtime,
            client,
            client_addr,
            lb_addrs,
            lbs,
            backends,
            _peer_programs: peer_programs,
            _hosts: hosts,
            _segment: segment,
        }
    }

    fn table(&self, backends: &[&Backend]) -> L4RouteTable {
        let endpoints = |port| {
            backends
                .iter()
                .map(|backend| SocketAddr::new(backend.addr, port))
                .collect::<Vec<_>>()
        };
        L4RouteTable {
            listeners: vec![
                L4Route {
                    service: "db".into(),
                    listener: TCP_LISTENER,
                    target_port: 5432,
                    endpoints: endpoints(BACKEND_TCP_PORT),
                },
                L4Route {
                    service: "dns".into(),
                    listener: UDP_LISTENER,
                    target_port: 53,
                    endpoints: endpoints(BACKEND_UDP_PORT),
                },
            ],
            rejected: vec![],
        }
    }

    fn steer_all(&mut self, table: &L4RouteTable) {
        let endpoints: BTreeSet<_> = table
            .listeners
            .iter()
            .flat_map(|route| &route.endpoints)
            .collect();
        for lb in &mut self.lbs {
            lb.steer(&self.runtime, table, endpoints.len());
        }
    }

    /// A TCP connection from the client namespace, from `source_port` (0: any) to `lb`.
    fn connect(&self, lb: usize, source_port: u16) -> TcpStream {
        let target = SocketAddr::new(self.lb_addrs[lb], TCP_LISTENER.port);
        let client = self.client_addr;
        let socket = in_netns(&self.client.netns, move || {
            let domain = Domain::for_address(target);
            let socket = Socket::new(domain, Type::STREAM, Some(SocketProtocol::TCP)).unwrap();
            socket.set_reuse_address(true).unwrap();
            socket
                .bind(&SocketAddr::from((client, source_port)).into())
                .unwrap();
            socket
                .connect_timeout(&target.into(), IO_TIMEOUT)
                .unwrap_or_else(|error| panic!("connecting to {target}: {error}"));
            socket
        })
        .unwrap();
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
    }

    fn udp_socket(&self) -> UdpSocket {
        let client = self.client_addr;
        let socket = in_netns(&self.client.netns, move || {
            UdpSocket::bind((client, 0)).unwrap()
        })
        .unwrap();
        socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        socket
    }
}

/// The backend's greeting: which backend the connection landed on.
fn greeting(stream: &TcpStream) -> String {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line.trim().to_owned()
}

fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
}

#[test]
fn tcp_connections_spread_evenly_and_land_on_the_same_backend_via_either_lb() {
    tcp_connections_spread_evenly(IpFamily::V4);
}

#[test]
fn ipv6_tcp_connections_spread_evenly_and_land_on_the_same_backend_via_either_lb() {
    tcp_connections_spread_evenly(IpFamily::V6);
}

fn tcp_connections_spread_evenly(family: IpFamily) {
    let mut lab = Lab::start(3, family);
    let backends: Vec<&Backend> = lab.backends.iter().collect();
    let table = lab.table(&backends);
    lab.steer_all(&table);

    for lb in 0..2 {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for source_port in 42000..42300 {
            let stream = lab.connect(lb, source_port);
            *counts.entry(greeting(&stream)).or_default() += 1;
        }
        eprintln!("lb-0{lb}: 300 connections spread {counts:?}");
        assert_eq!(counts.len(), 3, "lb-0{lb}: {counts:?}");
        for (backend, count) in &counts {
            assert!(
                (75..=125).contains(count),
                "lb-0{lb}: {backend} got {count} of 300 connections, not within ±25% of 100: {counts:?}"
            );
        }
    }

    for source_port in [41000, 41001, 41002, 41003, 41004, 41005] {
        let via_lb0 = greeting(&lab.connect(0, source_port));
        let via_lb1 = greeting(&lab.connect(1, source_port));
        assert_eq!(via_lb0, via_lb1, "client port {source_port}");
    }
}

#[test]
fn adding_and_removing_backends_moves_no_established_flow() {
    backend_changes_move_no_flow(IpFamily::V4);
}

#[test]
fn ipv6_adding_and_removing_backends_moves_no_established_flow() {
    backend_changes_move_no_flow(IpFamily::V6);
}

fn backend_changes_move_no_flow(family: IpFamily) {
    let mut lab = Lab::start(4, family);
    let first_three: Vec<&Backend> = lab.backends.iter().take(3).collect();
    let table = lab.table(&first_three);
    lab.steer_all(&table);

    let mut streams: Vec<(TcpStream, String)> = (0..50)
        .map(|_| {
            let stream = lab.connect(0, 0);
            let backend = greeting(&stream);
            (stream, backend)
        })
        .collect();
    let stream_all = |streams: &mut Vec<(TcpStream, String)>, round: usize| {
        for (index, (stream, _)) in streams.iter_mut().enumerate() {
            echo_round_trip(stream, format!("round {round} stream {index}\n").as_bytes());
        }
    };
    stream_all(&mut streams, 0);

    let all_four: Vec<&Backend> = lab.backends.iter().collect();
    let table = lab.table(&all_four);
    lab.steer_all(&table);
    for round in 1..5 {
        stream_all(&mut streams, round);
    }
    let fourth = &lab.backends[3].name;
    let new_counts = (0..40).fold(BTreeMap::<String, usize>::new(), |mut counts, _| {
        *counts.entry(greeting(&lab.connect(0, 0))).or_default() += 1;
        counts
    });
    assert!(
        new_counts.contains_key(fourth),
        "new flows reach the new backend: {new_counts:?}"
    );

    let removed = lab.backends[1].name.clone();
    let kept: Vec<&Backend> = lab.backends.iter().filter(|b| b.name != removed).collect();
    let table = lab.table(&kept);
    lab.steer_all(&table);
    for round in 5..10 {
        stream_all(&mut streams, round);
    }
    for _ in 0..40 {
        let backend = greeting(&lab.connect(0, 0));
        assert_ne!(backend, removed, "a removed backend gets no new flows");
    }
    // A flow moved to another backend would meet a server without that connection (a RST or
    // silence), so every echo above coming back whole means no flow moved.
    assert!(streams.iter().any(|(_, backend)| *backend == removed));
}

#[test]
fn udp_requests_are_answered_and_counted_exactly() {
    udp_requests_are_answered(IpFamily::V4);
}

#[test]
fn ipv6_udp_requests_are_answered_and_counted_exactly() {
    udp_requests_are_answered(IpFamily::V6);
}

fn udp_requests_are_answered(family: IpFamily) {
    let mut lab = Lab::start(3, family);
    let backends: Vec<&Backend> = lab.backends.iter().collect();
    let table = lab.table(&backends);
    lab.steer_all(&table);

    let socket = lab.udp_socket();
    let target = SocketAddr::new(lab.lb_addrs[0], UDP_LISTENER.port);
    let before = lab.lbs[0].dataplane.lock().unwrap().stats().unwrap();
    let traffic_before = lab.lbs[0].dataplane.lock().unwrap().l4_traffic().unwrap();
    let mut answered_by = Vec::new();
    for i in 0..10 {
        let request = format!("query {i}");
        socket.send_to(request.as_bytes(), target).unwrap();
        let mut buffer = [0u8; 1500];
        let (len, from) = socket.recv_from(&mut buffer).unwrap();
        assert_eq!(
            from, target,
            "the answer comes from the LB address and port"
        );
        let answer = String::from_utf8_lossy(&buffer[..len]).into_owned();
        let (backend, echoed) = answer.split_once(':').unwrap();
        assert_eq!(echoed, request);
        answered_by.push(backend.to_owned());
    }
    answered_by.dedup();
    assert_eq!(
        answered_by.len(),
        1,
        "one flow, one backend: {answered_by:?}"
    );

    let after = lab.lbs[0].dataplane.lock().unwrap().stats().unwrap();
    let traffic_after = lab.lbs[0].dataplane.lock().unwrap().l4_traffic().unwrap();
    let moved = |stat: Stat| after.get(stat).packets - before.get(stat).packets;
    assert_eq!(moved(Stat::L4NewFlow), 1);
    assert_eq!(moved(Stat::L4Forwarded), 9);
    assert_eq!(moved(Stat::L4Replied), 10);
    let service = |traffic: &xlb::l4::maps::L4Traffic| traffic.services[&UDP_LISTENER];
    let (b, a) = (service(&traffic_before), service(&traffic_after));
    assert_eq!(a.forward_packets - b.forward_packets, 10);
    assert_eq!(a.reply_packets - b.reply_packets, 10);
    assert_eq!(a.new_flows - b.new_flows, 1);
}
