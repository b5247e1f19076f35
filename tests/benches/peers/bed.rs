//! The bench bed: one Ethernet segment with a load-generator namespace (`client`), the load
//! balancer (`lb-00`) and a Swarm node (`node`, a private dockerd), and one backend service
//! published `mode=host`, labelled for both xlb's L7 proxy and its L4 path.
//!
//! ```text
//!   client 10.79.X.2 ──┐
//!   lb-00  10.79.X.10 ─┼── br0 (switch)   lb-00's switch port carries a native XDP_PASS
//!   node   10.79.X.30 ─┘                  program, tx checksum offload is off everywhere
//! ```
//!
//! Every row runs on this same bed, so the settings XDP needs (the peer program, offload off)
//! are in place for every row, not only xlb's. lb-00 forwards nothing unless a row turns
//! forwarding on (kernel NAT) and off again: every sysctl it depends on is set, never assumed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use xlb::{
    dataplane::{AttachMode, Dataplane},
    l4::{maglev::RingSize, settings::L4Settings},
};
use xlb_testbed::{
    build_docker_demo_binary, in_netns, require_root, Dockerd, Host, Netns, ScratchDir, Segment,
    Swarm,
};

pub const SERVICE: &str = "bench";
pub const HOST: &str = "bench.local";
pub const IMAGE: &str = "xlb-bench-backend:latest";
pub const TARGET_PORT: u16 = 8080;
/// The L7 proxies' port on lb-00 (the seed config's `PublishedPort`).
pub const L7_PORT: u16 = 80;
/// xlb's admin endpoint on lb-00 (`ListenAddr`).
pub const ADMIN_PORT: u16 = 8080;
/// The L4 listener on lb-00, for every L4 row (`xlb.l4.ports=9000:8080`).
pub const L4_PORT: u16 = 9000;
pub const PATH: &str = "/ping";
const CONVERGE: Duration = Duration::from_secs(60);

/// Fields drop in declaration order: the Swarm (and its engine) first, the switch last.
pub struct Bed {
    pub swarm: Swarm,
    pub client: Host,
    pub lb: Host,
    pub node: Host,
    /// The task endpoint every row ends at.
    pub backend: SocketAddr,
    pub scratch: ScratchDir,
    _peer_program: Dataplane,
    _segment: Segment,
}

impl Bed {
    pub fn create() -> Result<Bed> {
        require_root()?;
        let docker_demo = build_docker_demo_binary()?;
        let segment = Segment::create()?;
        let client = segment.add_host("client", 2)?;
        let lb = segment.add_host("lb-00", 10)?;
        let node = segment.add_host("node", 30)?;
        let peer_program = attach_peer_program(&segment, &lb)?;
        set_router_off(&lb.netns)?;
        set_load_generator(&client.netns)?;

        let swarm = Swarm::init(Dockerd::start(&node.netns)?, node.addr)?;
        swarm.build_image(IMAGE, &docker_demo)?;
        swarm.service_create(&[
            "--name",
            SERVICE,
            "--label",
            &format!("com.docker.lb.hosts={HOST}"),
            "--label",
            &format!("com.docker.lb.port={TARGET_PORT}"),
            "--label",
            &format!("xlb.l4.ports={L4_PORT}:{TARGET_PORT}"),
            "--publish",
            &format!("mode=host,target={TARGET_PORT}"),
            "--env",
            "METADATA=bench",
            IMAGE,
        ])?;
        let backend = swarm.wait_for_task_endpoints(SERVICE, TARGET_PORT, 1, CONVERGE)?[0];
        Ok(Bed {
            swarm,
            client,
            lb,
            node,
            backend,
            scratch: ScratchDir::create("bench")?,
            _peer_program: peer_program,
            _segment: segment,
        })
    }

    /// How the bed is built, for the report.
    pub fn describe(&self) -> String {
        format!(
            "Topology: namespaces client ({}), lb-00 ({}) and node ({}, a private dockerd + Swarm) \
             on one bridge; the backend is the Swarm service `{SERVICE}` (tests/docker-demo, \
             FROM scratch) published mode=host at {}. lb-00's bridge port has a native XDP_PASS \
             program and tx checksum offload is off on every veth, for every row; lb-00 has \
             forwarding off (but for kernel NAT's rows) and tcp_tw_reuse=1; the client has \
             tcp_tw_reuse=1 and ports 1024-65000. Kernel NAT's second row has an XDP_PASS \
             program on lb-00's own veth too, as xlb's row has its program there.",
            self.client.addr, self.lb.addr, self.node.addr, self.backend
        )
    }

    /// Where the L7 proxies listen.
    pub fn l7_addr(&self) -> SocketAddr {
        SocketAddr::new(self.lb.addr.into(), L7_PORT)
    }

    /// Where the L4 rows listen.
    pub fn l4_addr(&self) -> SocketAddr {
        SocketAddr::new(self.lb.addr.into(), L4_PORT)
    }

    /// An XDP_PASS program on lb-00's own veth while the result lives, which puts the veth
    /// in the receive mode xlb's program puts it in.
    pub fn lb_interface_in_xdp_mode(&self) -> Result<Dataplane> {
        in_netns(&self.lb.netns, || {
            attach_pass_program(Segment::HOST_INTERFACE)
        })?
        .context("attaching an XDP_PASS program to lb-00's veth")
    }

    /// xlb's admin endpoint.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.lb.addr.into(), ADMIN_PORT)
    }
}

/// XDP_TX out of lb-00's veth is delivered only when the peer end (the bridge port) has a
/// native XDP program.
fn attach_peer_program(segment: &Segment, lb: &Host) -> Result<Dataplane> {
    in_netns(&segment.switch, || attach_pass_program(&lb.switch_port))?
        .context("attaching the XDP_PASS program to lb-00's bridge port")
}

/// xlb's own program with no service, natively on `interface`: it passes everything.
fn attach_pass_program(interface: &str) -> Result<Dataplane> {
    let mut program = Dataplane::load_with(&L4Settings {
        ring_size: RingSize::new(3).expect("3 is prime"),
        flow_entries: 16,
        service_slots: 1,
        ..L4Settings::default()
    })?;
    let mode = program.attach(interface)?;
    anyhow::ensure!(
        mode == AttachMode::Native,
        "the XDP_PASS program attached in {mode:?} mode on {interface}; XDP_TX needs native"
    );
    Ok(program)
}

/// lb-00 as a host, not a router: no forwarding, no redirects, FORWARD dropped. A namespace
/// inherits the host's IPv4 settings (`ip_forward=1` where Docker runs), so each is set.
///
/// `tcp_tw_reuse=1`, as on a production proxy node: a proxy holding fewer idle upstream
/// connections than its clients use (nginx's `keepalive 32`, xlb's 32 per endpoint, against 64
/// client connections) opens and closes upstream connections all the time, and without reuse
/// their TIME_WAIT ports pile up until every connect scans a nearly full port range, which
/// would make each row pay for the rows before it.
pub fn set_router_off(lb: &Netns) -> Result<()> {
    write_sysctls(
        lb,
        &[
            ("net/ipv4/ip_forward", "0"),
            ("net/ipv4/conf/all/send_redirects", "0"),
            ("net/ipv4/conf/default/send_redirects", "0"),
            ("net/ipv4/tcp_tw_reuse", "1"),
        ],
    )?;
    lb.run("iptables", &["-P", "FORWARD", "DROP"])?;
    Ok(())
}

/// The client as a load generator is set up: a wide ephemeral port range and
/// `tcp_tw_reuse=1`, so that a new connection per request at thousands a second measures the
/// path, not the client's search for a port (the inherited defaults: 28 232 ports, reuse on
/// loopback only).
fn set_load_generator(client: &Netns) -> Result<()> {
    write_sysctls(
        client,
        &[
            ("net/ipv4/ip_local_port_range", "1024 65000"),
            ("net/ipv4/tcp_tw_reuse", "1"),
        ],
    )
}

/// Writes `/proc/sys/<key>` inside `netns` (no procps needed).
pub fn write_sysctls(netns: &Netns, settings: &[(&str, &str)]) -> Result<()> {
    let script = settings
        .iter()
        .map(|(key, value)| format!("echo {value} > /proc/sys/{key}"))
        .collect::<Vec<_>>()
        .join(" && ");
    netns.run("sh", &["-c", &script])?;
    Ok(())
}
