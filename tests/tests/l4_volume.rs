//! Volume through the L4 fast path, through the real kernel over veth in namespaces: a client,
//! one load balancer and one backend on one Ethernet segment. 200 000 short TCP connections
//! and 100 000 UDP exchanges (each from a fresh socket, so each is a new flow) must all
//! succeed; then, with every timeout set to 2 s (instead of waiting out the defaults), the
//! sweep must bring the connection table back to about empty. Over IPv4, then over IPv6.
//!
//! The LB namespace cannot forward anything itself (forwarding off, FORWARD policy DROP,
//! nothing listening), so every exchange that works was carried by XDP both ways.
//!
//! The client reuses its ports while they are in TIME_WAIT (`tcp_tw_reuse`): 200 000
//! connections from one address to one service need it, and through xlb a SYN on a closed
//! flow's tuple reopens it.
//!
//! The clients open at most [`DEFAULT_RATE`] new flows a second, half of what the SNAT tuples
//! of one backend sustain at these timeouts. `XLB_L4_VOLUME_CONNECTIONS` and
//! `XLB_L4_VOLUME_EXCHANGES` set smaller counts for a quick run, `XLB_L4_VOLUME_RATE` another
//! rate (0: as fast as the clients go). Besides xlb's counters, the test prints the client's
//! and the backend's kernel counters (SYN retransmissions, resets, listen overflows).

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

mod l4_support;

use l4_support::{greet_and_echo, peer_program, set_sysctl, LoadBalancer};
use socket2::{Domain, Protocol as SocketProtocol, Socket, Type};
use xlb::{
    dataplane::Dataplane,
    l4::{
        maps::IpFamily,
        service::{L4Route, L4RouteTable, Listener, Protocol},
        settings::{check_snat_ports, L4Settings, SnatPorts},
    },
};
use xlb_common::Stat;
use xlb_testbed::{in_netns, require_root, Host, Netns, Segment};

const TCP_LISTENER: Listener = Listener {
    port: 5432,
    protocol: Protocol::Tcp,
};
const UDP_LISTENER: Listener = Listener {
    port: 5353,
    protocol: Protocol::Udp,
};
const BACKEND_TCP_PORT: u16 = 30001;
const BACKEND_UDP_PORT: u16 = 30053;
const SUBNET_OCTET: u8 = 43;

const DEFAULT_CONNECTIONS: usize = 200_000;
const DEFAULT_EXCHANGES: usize = 100_000;
/// Client threads, each running its share of the connections (or exchanges) one after another.
const CLIENT_THREADS: usize = 4;
/// Backend threads accepting (each serves one connection at a time): enough that a few
/// connections broken mid-way (each holding its thread for [`IO_TIMEOUT`]) do not starve the
/// others.
const BACKEND_TCP_THREADS: usize = 32;
const BACKEND_UDP_THREADS: usize = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const UDP_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
const UDP_ATTEMPTS: usize = 3;
/// A broken path would otherwise take 200 000 timeouts to report.
const GIVE_UP_AFTER_FAILURES: usize = 100;
/// Every timeout the table applies to this load (established flows keep the default: one left
/// established would be a flow whose close the table missed).
const SHORT_TIMEOUT: Duration = Duration::from_secs(2);
/// SNAT ports, and the LB kernel's own ephemeral ports, kept apart.
const SNAT_PORTS: (u16, u16) = (10000, 59999);
/// New flows per second the clients open (`XLB_L4_VOLUME_RATE`; 0: unpaced): half of what one
/// backend's SNAT tuples sustain when each flow holds its tuple for [`SHORT_TIMEOUT`] after its
/// last packet (50 000 tuples / 2 s = 25 000 flows a second). Unpaced, the UDP clients here
/// open over 50 000 flows a second and would exhaust the tuples by design.
const DEFAULT_RATE: f64 =
    (SNAT_PORTS.1 - SNAT_PORTS.0 + 1) as f64 / SHORT_TIMEOUT.as_secs_f64() / 2.0;
const LB_LOCAL_PORT_RANGE: &str = "60000 60999";
/// Entries the table may keep once everything has timed out and been swept.
const SETTLED_ENTRIES: u64 = 16;
const SETTLE_DEADLINE: Duration = Duration::from_secs(15);

const GREETING: &[u8] = b"be\n";
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

fn count_from_env(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a count")),
        Err(_) => default,
    }
}

/// A pool of threads accepting on one TCP listener: each greets a connection, echoes until the
/// client closes, then closes (passively: the backend holds no TIME_WAIT). A UDP server
/// answers `be:payload`. Both stop when dropped.
struct Backend {
    addr: IpAddr,
    netns: Netns,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    fn start(host: &Host, addr: IpAddr) -> Backend {
        let (tcp, udp) = in_netns(&host.netns, || {
            let listen = SocketAddr::new(addr, BACKEND_TCP_PORT);
            let domain = Domain::for_address(listen);
            let tcp = Socket::new(domain, Type::STREAM, Some(SocketProtocol::TCP)).unwrap();
            tcp.set_reuse_address(true).unwrap();
            tcp.bind(&listen.into()).unwrap();
            tcp.listen(4096).unwrap();
            // A blocking accept that gives up now and then, to see the stop flag.
            tcp.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let udp = UdpSocket::bind((addr, BACKEND_UDP_PORT)).unwrap();
            udp.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            (TcpListener::from(tcp), udp)
        })
        .unwrap();
        let tcp = Arc::new(tcp);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..BACKEND_TCP_THREADS {
            let (tcp, stop) = (tcp.clone(), stop.clone());
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((stream, _)) = tcp.accept() {
                        echo(stream);
                    }
                }
            }));
        }
        for _ in 0..BACKEND_UDP_THREADS {
            let (udp, stop) = (udp.try_clone().unwrap(), stop.clone());
            threads.push(thread::spawn(move || {
                let mut buffer = [0u8; 1500];
                let mut answer = Vec::with_capacity(1500);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((len, peer)) = udp.recv_from(&mut buffer) {
                        answer.clear();
                        answer.extend_from_slice(b"be:");
                        answer.extend_from_slice(&buffer[..len]);
                        let _ = udp.send_to(&answer, peer);
                    }
                }
            }));
        }
        Backend {
            addr,
            netns: host.netns.clone(),
            stop,
            threads,
        }
    }
}

fn echo(stream: TcpStream) {
    // Accepted sockets do not inherit the listener's timeout; a client that vanished must not
    // hold a thread of the pool forever.
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    greet_and_echo(stream, GREETING);
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Sweeps the connection table once a second, as the daemon does, until dropped.
struct Sweeper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The most entries a sweep left.
    peak_entries: Arc<AtomicUsize>,
}

impl Sweeper {
    fn start(dataplane: Arc<Mutex<Dataplane>>) -> Sweeper {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_entries = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, peak_entries) = (stop.clone(), peak_entries.clone());
            thread::spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        next += Duration::from_secs(1);
                        let plan = dataplane.lock().unwrap().sweep_flows().unwrap();
                        peak_entries.fetch_max(plan.summary().entries as usize, Ordering::Relaxed);
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Sweeper {
            stop,
            thread: Some(thread),
            peak_entries,
        }
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panic in there (a failed sweep) fails the test, unless it is failing already.
            if thread.join().is_err() && !thread::panicking() {
                panic!("the sweep failed");
            }
        }
    }
}

/// The segment: client, one LB with the XDP program natively on its `to-switch` and the
/// daemon's `Steering`, one backend; a native XDP_PASS program on the LB's switch port (XDP_TX
/// out of a veth needs one on the peer).
struct Lab {
    client: Host,
    lb_addr: IpAddr,
    backend: Backend,
    sweeper: Sweeper,
    lb: LoadBalancer,
    runtime: tokio::runtime::Runtime,
    // Dropped after the LB: the peer's program, then the namespaces.
    _peer_program: Dataplane,
    _hosts: Vec<Host>,
    _segment: Segment,
}

impl Lab {
    /// The lab, talking `family` (IPv6: each host gets an address of it as well).
    fn start(family: IpFamily) -> Lab {
        require_root().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let segment = Segment::create_on(SUBNET_OCTET).unwrap();
        let client = segment.add_host("client", 2).unwrap();
        let lb = segment.add_host("lb", 10).unwrap();
        let backend_host = segment.add_host("be", 20).unwrap();
        let address = |host: &Host, number: u8| -> IpAddr {
            match family {
                IpFamily::V4 => host.addr.into(),
                IpFamily::V6 => segment.add_ipv6(host, number).unwrap().into(),
            }
        };
        address(&client, 2);
        let lb_addr = address(&lb, 10);
        let backend_addr = address(&backend_host, 20);
        let peer_program = peer_program(&segment, &[&lb]);

        // The LB's own ephemeral ports stay off the SNAT ones.
        set_sysctl(
            &lb.netns,
            "net.ipv4.ip_local_port_range",
            LB_LOCAL_PORT_RANGE,
        );
        let snat_ports = SnatPorts::new(SNAT_PORTS.0, SNAT_PORTS.1).unwrap();
        check_snat_ports(snat_ports, LB_LOCAL_PORT_RANGE).unwrap();
        // One client address, one service, 200 000 connections in a row: ports are reused
        // while in TIME_WAIT (both settings apply to IPv6 too).
        set_sysctl(&client.netns, "net.ipv4.tcp_tw_reuse", "1");
        set_sysctl(&client.netns, "net.ipv4.ip_local_port_range", "1024 65000");

        let settings = L4Settings {
            snat_ports,
            flow_entries: 262_144,
            service_slots: 4,
            tcp_handshake: SHORT_TIMEOUT,
            tcp_closing: SHORT_TIMEOUT,
            tcp_time_wait: SHORT_TIMEOUT,
            udp_idle: SHORT_TIMEOUT,
            ..L4Settings::default()
        };
        let load_balancer = LoadBalancer::start(&lb, &runtime, &settings);
        let backend = Backend::start(&backend_host, backend_addr);
        let sweeper = Sweeper::start(load_balancer.dataplane.clone());
        let mut lab = Lab {
            client,
            lb_addr,
            backend,
            sweeper,
            lb: load_balancer,
            runtime,
            _peer_program: peer_program,
            _hosts: vec![lb, backend_host],
            _segment: segment,
        };
        lab.steer();
        lab
    }

    /// Steers both listeners to the backend, as a discovery poll does, until its next hop is
    /// resolved (two backend ids: one per endpoint, address and port).
    fn steer(&mut self) {
        let endpoint = |port| vec![SocketAddr::new(self.backend.addr, port)];
        let table = L4RouteTable {
            listeners: vec![
                L4Route {
                    service: "db".into(),
                    listener: TCP_LISTENER,
                    target_port: 5432,
                    endpoints: endpoint(BACKEND_TCP_PORT),
                },
                L4Route {
                    service: "dns".into(),
                    listener: UDP_LISTENER,
                    target_port: 53,
                    endpoints: endpoint(BACKEND_UDP_PORT),
                },
            ],
            rejected: vec![],
        };
        self.lb.steer(&self.runtime, &table, 2);
    }

    fn stat(&self, stat: Stat) -> u64 {
        self.lb.stat(stat)
    }
}

/// What a client thread pool did.
#[derive(Default)]
struct Outcome {
    failures: usize,
    /// Exchanges that needed more than one attempt (UDP).
    retried: usize,
    first_errors: Vec<String>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.failures += other.failures;
        self.retried += other.retried;
        let room = 10usize.saturating_sub(self.first_errors.len());
        self.first_errors
            .extend(other.first_errors.into_iter().take(room));
    }
}

/// Runs `count` calls of `exchange(index)` on [`CLIENT_THREADS`] threads in the client
/// namespace, at most `rate` a second (0: unpaced), printing progress; stops early once
/// [`GIVE_UP_AFTER_FAILURES`] have failed.
/// `exchange` returns whether it needed a retry.
fn run_clients(
    lab: &Lab,
    what: &str,
    count: usize,
    rate: f64,
    exchange: impl Fn(usize) -> io::Result<bool> + Sync,
) -> Outcome {
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let outcome = in_netns(&lab.client.netns, || {
        // Threads started from a thread inside the namespace are inside it too.
        thread::scope(|scope| {
            let workers: Vec<_> = (0..CLIENT_THREADS)
                .map(|_| {
                    scope.spawn(|| {
                        let mut outcome = Outcome::default();
                        // Each thread's share of the rate; one that falls behind does not
                        // catch up in a burst.
                        let interval = (rate > 0.0)
                            .then(|| Duration::from_secs_f64(CLIENT_THREADS as f64 / rate));
                        let mut due = Instant::now();
                        loop {
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            if index >= count
                                || failed.load(Ordering::Relaxed) >= GIVE_UP_AFTER_FAILURES
                            {
                                return outcome;
                            }
                            if let Some(interval) = interval {
                                let now = Instant::now();
                                thread::sleep(due.saturating_duration_since(now));
                                due = due.max(now) + interval;
                            }
                            match exchange(index) {
                                Ok(retried) => outcome.retried += usize::from(retried),
                                Err(error) => {
                                    outcome.failures += 1;
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    if outcome.first_errors.len() < 10 {
                                        outcome.first_errors.push(format!("#{index}: {error}"));
                                    }
                                }
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            let mut last_report = Instant::now();
            while !workers.iter().all(|worker| worker.is_finished()) {
                thread::sleep(Duration::from_millis(50));
                if last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = Instant::now();
                    eprintln!(
                        "{what}: {} of {count} after {:.1} s, {} failed",
                        done.load(Ordering::Relaxed),
                        started.elapsed().as_secs_f64(),
                        failed.load(Ordering::Relaxed),
                    );
                    report_stats(lab, "so far");
                    let dataplane = lab.lb.dataplane.lock().unwrap();
                    let table = dataplane.connection_table().table;
                    eprintln!(
                        "table so far: {} entries {:?}, SNAT tuples in use {:?}",
                        table.entries, table.flows, table.snat_tuples_in_use
                    );
                }
            }
            workers
                .into_iter()
                .fold(Outcome::default(), |mut total, worker| {
                    total.merge(worker.join().unwrap());
                    total
                })
        })
    })
    .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "{what}: {} done in {elapsed:.1} s ({:.0}/s), {} failed, {} retried",
        done.load(Ordering::Relaxed),
        done.load(Ordering::Relaxed) as f64 / elapsed,
        outcome.failures,
        outcome.retried,
    );
    outcome
}

/// One short connection: connect, read the greeting, echo a message, close (the client
/// first).
fn tcp_exchange(target: SocketAddr, index: usize) -> io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut greeting = [0u8; GREETING.len()];
    stream.read_exact(&mut greeting)?;
    if greeting != GREETING {
        return Err(io::Error::other(format!("greeting {greeting:?}")));
    }
    let message = format!("connection {index}\n");
    stream.write_all(message.as_bytes())?;
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed)?;
    if echoed != message.as_bytes() {
        return Err(io::Error::other(format!("echo {echoed:?}")));
    }
    Ok(false)
}

/// One request from a fresh socket (a new flow), answered by the backend through the LB;
/// retried on the same socket when a datagram is lost.
fn udp_exchange(target: SocketAddr, index: usize) -> io::Result<bool> {
    let any: IpAddr = match target {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0))?;
    socket.set_read_timeout(Some(UDP_ANSWER_TIMEOUT))?;
    let request = format!("query {index}");
    let expected = format!("be:{request}");
    let mut buffer = [0u8; 1500];
    let mut last_error = None;
    for attempt in 0..UDP_ATTEMPTS {
        socket.send_to(request.as_bytes(), target)?;
        let deadline = Instant::now() + UDP_ANSWER_TIMEOUT;
        // A late answer to an earlier attempt is the same answer; anything else is skipped.
        loop {
            match socket.recv_from(&mut buffer) {
                Ok((len, from)) if from == target && buffer[..len] == *expected.as_bytes() => {
                    return Ok(attempt > 0);
                }
                Ok((len, from)) => {
                    last_error = Some(io::Error::other(format!(
                        "{from} answered {:?}",
                        String::from_utf8_lossy(&buffer[..len])
                    )));
                }
                Err(error) => {
                    last_error = Some(error);
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no answer")))
}

const REPORTED_STATS: [Stat; 16] = [
    Stat::L4NewFlow,
    Stat::L4Forwarded,
    Stat::L4Replied,
    Stat::L4FlowReopened,
    Stat::L4FlowReclaimed,
    Stat::L4FlowOrphaned,
    Stat::L4SnatTimeWaitReused,
    Stat::L4PassNoFlow,
    Stat::L4DropNoBackend,
    Stat::L4DropSnatExhausted,
    Stat::L4DropFlowTable,
    Stat::L4DropFlowLost,
    Stat::L4DropRedirect,
    Stat::L4DropFlood,
    Stat::VerdictAborted,
    Stat::ClassMalformed,
];

/// The kernel's counters that tell a lost or refused packet from a slow peer.
const KERNEL_COUNTERS: [&str; 16] = [
    "TcpActiveOpens",
    "TcpAttemptFails",
    "TcpEstabResets",
    "TcpRetransSegs",
    "TcpOutRsts",
    "TcpExtListenOverflows",
    "TcpExtListenDrops",
    "TcpExtTCPSynRetrans",
    "TcpExtTCPTimeouts",
    "TcpExtTCPAbortOnData",
    "TcpExtTCPAbortOnTimeout",
    "TcpExtTW",
    "TcpExtTWRecycled",
    "UdpNoPorts",
    "UdpInErrors",
    "UdpRcvbufErrors",
];

fn report_kernel_counters(netns: &Netns, role: &str) {
    let Ok(output) = netns.run("nstat", &["-asz"]) else {
        return;
    };
    let counters: Vec<String> = output
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (name, value) = (fields.next()?, fields.next()?);
            (KERNEL_COUNTERS.contains(&name) && value != "0").then(|| format!("{name}={value}"))
        })
        .collect();
    eprintln!("kernel {role}: {}", counters.join(" "));
}

fn report_stats(lab: &Lab, when: &str) {
    let stats = lab.lb.dataplane.lock().unwrap().stats().unwrap();
    let line: Vec<String> = REPORTED_STATS
        .iter()
        .map(|&stat| format!("{}={}", stat.name(), stats.get(stat).packets))
        .collect();
    eprintln!("stats {when}: {}", line.join(" "));
}

/// One volume run at a time: two at once would share the machine's two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn short_tcp_connections_and_udp_exchanges_by_the_hundred_thousand_then_the_table_empties() {
    volume(IpFamily::V4);
}

#[test]
fn ipv6_short_tcp_connections_and_udp_exchanges_by_the_hundred_thousand_then_the_table_empties() {
    volume(IpFamily::V6);
}

fn volume(family: IpFamily) {
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let connections = count_from_env("XLB_L4_VOLUME_CONNECTIONS", DEFAULT_CONNECTIONS);
    let exchanges = count_from_env("XLB_L4_VOLUME_EXCHANGES", DEFAULT_EXCHANGES);
    let lab = Lab::start(family);

    let tcp_target = SocketAddr::new(lab.lb_addr, TCP_LISTENER.port);
    let rate = match std::env::var("XLB_L4_VOLUME_RATE") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("XLB_L4_VOLUME_RATE={value:?} is not a rate")),
        Err(_) => DEFAULT_RATE,
    };
    eprintln!("{rate} new flows per second (0: as fast as the clients go)");
    let tcp = run_clients(&lab, "tcp connections", connections, rate, |index| {
        tcp_exchange(tcp_target, index)
    });
    report_stats(&lab, "after tcp");

    let udp_target = SocketAddr::new(lab.lb_addr, UDP_LISTENER.port);
    let udp = run_clients(&lab, "udp exchanges", exchanges, rate, |index| {
        udp_exchange(udp_target, index)
    });
    report_stats(&lab, "after udp");

    // Every flow is closed (TCP, the client first) or idle (UDP): 2 s, then a sweep.
    // Only a sweep that started after the load tells what the load left.
    let settle_started = Instant::now();
    let sweeps_before = lab
        .lb
        .dataplane
        .lock()
        .unwrap()
        .connection_table()
        .sweeps
        .sweeps;
    let (summary, sweeps) = loop {
        let (summary, sweeps) = {
            let dataplane = lab.lb.dataplane.lock().unwrap();
            let report = dataplane.connection_table();
            (report.table.clone(), report.sweeps)
        };
        let settled = sweeps.sweeps > sweeps_before + 1 && summary.entries <= SETTLED_ENTRIES;
        if settled || settle_started.elapsed() >= SETTLE_DEADLINE {
            break (summary, sweeps);
        }
        thread::sleep(Duration::from_millis(250));
    };
    eprintln!(
        "table after {:.1} s: {} entries {:?} (peak {} during the load); sweeps {sweeps:?}",
        settle_started.elapsed().as_secs_f64(),
        summary.entries,
        summary.flows,
        lab.sweeper.peak_entries.load(Ordering::Relaxed),
    );
    report_stats(&lab, "at the end");
    report_kernel_counters(&lab.client.netns, "client");
    report_kernel_counters(&lab.backend.netns, "backend");
    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(
        tcp.failures, 0,
        "TCP connections failed: {:?}",
        tcp.first_errors
    );
    assert_eq!(
        udp.failures, 0,
        "UDP exchanges failed (each after {UDP_ATTEMPTS} attempts): {:?}",
        udp.first_errors
    );
    for stat in [
        Stat::L4DropSnatExhausted,
        Stat::L4DropFlowTable,
        Stat::L4DropFlowLost,
    ] {
        assert_eq!(lab.stat(stat), 0, "{}", stat.name());
    }
    assert!(
        summary.entries <= SETTLED_ENTRIES,
        "the table kept {} entries: {summary:?}",
        summary.entries
    );
}
