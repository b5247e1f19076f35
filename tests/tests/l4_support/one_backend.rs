//! One load balancer, one backend and a client (on the segment, or behind a router whose link
//! to it has a smaller MTU), shared by `l4_edges` and `l4_floods`. The tests of one binary
//! take turns (one lock): each builds its own namespaces, and a flood or a scan running beside
//! another test's stream would only make that one slower.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use xlb::{
    dataplane::Dataplane,
    l4::{
        maglev::RingSize,
        service::{L4Route, L4RouteTable, Listener, Protocol},
        settings::L4Settings,
    },
};
use xlb_testbed::{
    create_veth_pair, disable_tx_checksum_offload, in_netns, require_root, run_id, Host, Netns,
    Segment, VethEnd,
};

use super::{peer_program, set_sysctl, LoadBalancer};

pub const SUBNET_OCTET: u8 = 43;
pub const LB_HOST: u8 = 10;
pub const BACKEND_HOST: u8 = 20;
pub const TCP_LISTENER: Listener = Listener {
    port: 5432,
    protocol: Protocol::Tcp,
};
pub const UDP_LISTENER: Listener = Listener {
    port: 5353,
    protocol: Protocol::Udp,
};
/// Where the backend's TCP server listens.
pub const BACKEND_TCP_PORT: u16 = 30001;
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The routed client's link: client 10.81.43.2, router 10.81.43.1.
pub const CLIENT_LINK_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 81, SUBNET_OCTET, 2);
pub const CLIENT_LINK_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 81, SUBNET_OCTET, 1);
/// The same link's IPv6 addresses, for [`Client::RoutedIpv6`].
pub const CLIENT_LINK_CLIENT6: Ipv6Addr =
    Ipv6Addr::new(0xfd81, SUBNET_OCTET as u16, 0, 0, 0, 0, 0, 2);
pub const CLIENT_LINK_ROUTER6: Ipv6Addr =
    Ipv6Addr::new(0xfd81, SUBNET_OCTET as u16, 0, 0, 0, 0, 0, 1);
/// The router's MTU toward the client, below the 1500 of everything else.
pub const NARROW_MTU: &str = "1280";
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A TCP server in a namespace, for IPv4 and IPv6: every accepted connection gets its own thread running
/// `handler`, which must return soon after `stop` is set. Stops when dropped.
pub struct Server {
    pub stop: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<()>>,
}

pub type Handler = fn(TcpStream, &AtomicBool);

impl Server {
    pub fn start(netns: &Netns, port: u16, handler: Handler) -> Server {
        // `[::]` takes IPv4 connections too (Linux's default `bindv6only` is 0).
        let listener = in_netns(netns, move || {
            TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
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

pub fn timed_out(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Echoes until the peer closes.
pub fn echo(mut stream: TcpStream, stop: &AtomicBool) {
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

/// Accepts and hangs up: a port that is served.
pub fn hang_up(_stream: TcpStream, _stop: &AtomicBool) {}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// On the segment, beside the LB.
    OnSegment,
    /// Behind a router whose link to the client has an MTU of [`NARROW_MTU`].
    Routed,
    /// The same, talking IPv6 (every host gets an IPv6 address as well).
    RoutedIpv6,
}

/// Client, LB and one backend (and a router when the client is routed). The LB's switch port
/// runs a native XDP_PASS program: XDP_TX out of a veth needs one on the peer.
pub struct Lab {
    pub runtime: tokio::runtime::Runtime,
    pub lb: LoadBalancer,
    pub lb_host: Host,
    pub client: Host,
    pub backend: Host,
    pub router: Option<Host>,
    /// The addresses the client talks to, of its family.
    pub lb_addr: IpAddr,
    pub backend_addr: IpAddr,
    // Dropped after the LB: the peer's program, then the namespaces.
    _peer_program: Dataplane,
    _hosts: Vec<Host>,
    _segment: Segment,
}

impl Lab {
    pub fn settings() -> L4Settings {
        L4Settings {
            ring_size: RingSize::new(65537).unwrap(),
            flow_entries: 16384,
            service_slots: 4,
            ..L4Settings::default()
        }
    }

    pub fn start(settings: &L4Settings, client: Client) -> Lab {
        require_root().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let segment = Segment::create_on(SUBNET_OCTET).unwrap();
        let lb_host = segment.add_host("lb", LB_HOST).unwrap();
        let backend = segment.add_host("be", BACKEND_HOST).unwrap();
        let (mut lb_addr, mut backend_addr): (IpAddr, IpAddr) =
            (lb_host.addr.into(), backend.addr.into());
        let (client, router) = match client {
            Client::OnSegment => (segment.add_host("client", 2).unwrap(), None),
            Client::Routed => {
                let router = segment.add_host("router", 1).unwrap();
                (routed_client(&router), Some(router))
            }
            Client::RoutedIpv6 => {
                let router = segment.add_host("router", 1).unwrap();
                let client = routed_client(&router);
                segment.add_ipv6(&router, 1).unwrap();
                lb_addr = segment.add_ipv6(&lb_host, LB_HOST).unwrap().into();
                backend_addr = segment.add_ipv6(&backend, BACKEND_HOST).unwrap().into();
                route_ipv6(&client, &router);
                (client, Some(router))
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
            lb_addr,
            backend_addr,
            _peer_program: peer_program,
            _hosts: hosts,
            _segment: segment,
        }
    }

    /// Applies `table`, as a discovery poll does, until its one backend is resolved.
    pub fn steer(&mut self, table: &L4RouteTable) {
        self.lb.steer(&self.runtime, table, 1);
    }

    pub fn table(&self, listener: Listener, backend_port: u16) -> L4RouteTable {
        L4RouteTable {
            listeners: vec![L4Route {
                service: "edge".into(),
                listener,
                target_port: listener.port,
                endpoints: vec![SocketAddr::new(self.backend_addr, backend_port)],
            }],
            rejected: vec![],
        }
    }

    /// A TCP connection from the client namespace to `port` at the LB address.
    pub fn try_connect(&self, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
        let target = SocketAddr::new(self.lb_addr, port);
        let stream = in_netns(&self.client.netns, move || {
            TcpStream::connect_timeout(&target, timeout)
        })
        .unwrap()?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Ok(stream)
    }

    pub fn connect(&self, port: u16) -> TcpStream {
        self.try_connect(port, IO_TIMEOUT)
            .unwrap_or_else(|error| panic!("connecting to {}:{port}: {error}", self.lb_addr))
    }
}

/// A client namespace behind `router`: `to-router` (MTU 1500) ↔ the router's `to-client`
/// (MTU [`NARROW_MTU`]), the client's default route via the router, the router forwarding.
pub fn routed_client(router: &Host) -> Host {
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

/// IPv6 on the routed client's link too ([`CLIENT_LINK_CLIENT6`], [`CLIENT_LINK_ROUTER6`]),
/// the router forwarding IPv6, the client's default IPv6 route via it.
fn route_ipv6(client: &Host, router: &Host) {
    for (netns, interface, addr) in [
        (&client.netns, "to-router", CLIENT_LINK_CLIENT6),
        (&router.netns, "to-client", CLIENT_LINK_ROUTER6),
    ] {
        netns
            .ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                interface,
                "nodad",
            ])
            .unwrap();
    }
    set_sysctl(&router.netns, "net.ipv6.conf.all.forwarding", "1");
    client
        .netns
        .ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &CLIENT_LINK_ROUTER6.to_string(),
        ])
        .unwrap();
}

pub fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, message);
}
