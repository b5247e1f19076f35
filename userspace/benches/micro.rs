//! Micro-benchmarks of what xlb does per request and per packet, through the real functions
//! and, for packets, the real XDP program in the kernel (BPF_PROG_TEST_RUN): nothing is mocked.
//!
//! - `route_lookup`: the proxy's router finding a request's route among 1 000 services, by an
//!   exact host (`exact_host`) and by a wildcard host whose service has a context root
//!   (`wildcard_host_context_root`), with the router built from `route_table` as the daemon does.
//! - `response_decoration/interlock_headers`: an upstream's response head made the client's
//!   (hop-by-hop headers removed, Interlock's five `x-*` headers stamped).
//! - `request_id/new`: one request id, as the proxy makes for every request.
//! - `maglev`: one service's Maglev table with the default ring size, for 10 and 100 backends.
//! - `xdp_packet`: one frame through the XDP program: a SYN for the L7 proxy, passed
//!   (`l7_pass`); a SYN for an L4 service, NATed with a new conntrack entry (`l4_new_flow`); an
//!   ACK of an established L4 flow (`l4_established`); the same two over IPv6, through the
//!   tail calls (`l4_new_flow_ipv6`, `l4_established_ipv6`). Needs root; skipped without it.
//!
//! `cargo xtask bench` reads each `target/criterion/<group>/<id>/new/estimates.json`, so the
//! group and bench names are an interface: renaming one breaks it.

mod support;

use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use etherparse::{PacketBuilder, PacketBuilderStep, TcpHeader};
use http::{header, uri::PathAndQuery, HeaderMap, HeaderValue};
use support::{can_load_xdp, exact_host, l7_service_name, swarm_snapshot, SwarmShape, L7_PORTS};
use xlb::{
    build_info,
    dataplane::Dataplane,
    l4::{
        maglev::{maglev_table, RingSize},
        maps::{BackendPlan, IpFamily, ServicePlan},
        service::{Listener, Protocol},
        settings::{L4Settings, SnatPorts},
    },
    proxy::{
        headers::{prepare_client_response, ProxyIdentity, RequestId, UpstreamAnswer},
        NormalPath, Routed, Router, Scheme,
    },
    routes::{route_table, RouteSettings},
};
use xlb_common::{NextHop, Stat};

fn route_lookup(c: &mut Criterion) {
    let snapshot = swarm_snapshot(SwarmShape {
        l7_services: 1_000,
        l4_services: 0,
        tasks_per_service: 3,
        nodes: 8,
    });
    let table = route_table(&snapshot, &RouteSettings::default());
    assert!(table.rejected.is_empty(), "{:?}", table.rejected);
    let router = Router::new();
    router.update(&table);

    // Service 504 has a host of its own; services 500 and 501 share `*.tenants-50`, at `/` and
    // at `/api`: the lookup misses the exact hosts, finds the wildcard, then the context root.
    let exact = (exact_host(504), "/index.html", l7_service_name(504));
    let wildcard = (
        "shop.tenants-50.example.org".to_owned(),
        "/api/orders/17?page=2",
        l7_service_name(501),
    );
    let mut group = c.benchmark_group("route_lookup");
    for (id, (host, target, service)) in [
        ("exact_host", exact),
        ("wildcard_host_context_root", wildcard),
    ] {
        let target = PathAndQuery::from_static(target);
        let path = NormalPath::parse(target.path()).unwrap();
        assert_eq!(routed_service(&router, &host, &target, &path), service);
        group.bench_function(id, |b| {
            b.iter(|| {
                router.route(
                    Scheme::Http,
                    black_box(&host),
                    black_box(&target),
                    black_box(&path),
                )
            })
        });
    }
    group.finish();
}

/// The service a request is forwarded to, checked before measuring so that a typo in a host
/// cannot turn the benchmark into one of a miss.
fn routed_service(
    router: &Router,
    host: &str,
    target: &PathAndQuery,
    path: &NormalPath<'_>,
) -> String {
    match router.route(Scheme::Http, host, target, path) {
        Ok(Routed::Forward { route, .. }) => route.service().to_owned(),
        other => panic!("{host}{target} is not forwarded: {other:?}"),
    }
}

fn response_decoration(c: &mut Criterion) {
    let identity = ProxyIdentity::new("lb-00", &build_info::server_info()).unwrap();
    let request_id = RequestId::fresh();
    let upstream = UpstreamAnswer {
        addr: "10.1.0.3:10042".parse().unwrap(),
        response_time: Duration::from_micros(4_400),
    };
    // A typical upstream head, hop-by-hop headers included since the proxy removes them too.
    let mut head = HeaderMap::new();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_LENGTH, "5120"),
        (header::DATE, "Mon, 02 Jun 2025 10:00:00 GMT"),
        (header::CACHE_CONTROL, "no-cache"),
        (header::CONNECTION, "keep-alive"),
        (header::HeaderName::from_static("keep-alive"), "timeout=5"),
    ] {
        head.insert(name, HeaderValue::from_static(value));
    }
    let mut group = c.benchmark_group("response_decoration");
    group.bench_function("interlock_headers", |b| {
        b.iter_batched_ref(
            || head.clone(),
            |headers| prepare_client_response(headers, &request_id, &identity, upstream),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn request_id(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_id");
    group.bench_function("new", |b| b.iter(RequestId::fresh));
    group.finish();
}

fn maglev(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev");
    for count in [10, 100] {
        let endpoints: Vec<(SocketAddr, u32)> = (0..count)
            .map(|index| {
                let node = Ipv4Addr::new(10, 1, 0, 1 + (index % 8) as u8);
                let endpoint = SocketAddr::from((node, 10_000 + index as u16));
                (endpoint, index + 1)
            })
            .collect();
        group.bench_function(format!("build_ring_{count}_backends"), |b| {
            b.iter(|| maglev_table(black_box(&endpoints), RingSize::DEFAULT))
        });
    }
    group.finish();
}

/// The kernel's XDP verdicts (`enum xdp_action`).
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x1b];
const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbe];
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const SNAT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 78, 1, 1);
const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd77, 1, 0, 0, 0, 0, 0, 1);
const SNAT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd78, 1, 0, 0, 0, 0, 0, 1);
const L4_SERVICE: Listener = Listener {
    port: 5432,
    protocol: Protocol::Tcp,
};
/// BPF_PROG_TEST_RUN runs the program as if the frame arrived on loopback; a next hop on the
/// same interface makes forwarded frames `XDP_TX`, which a test run never transmits.
const TEST_RUN_IFINDEX: u32 = 1;
/// Backends of the L4 service the L7 frame's program holds, as a daemon's would.
const L4_BACKENDS: u16 = 100;
/// New flows per loaded program: 20 000 take 40 000 of the connection table's 262 144 entries
/// and 20 000 of the default 31 744 SNAT ports. A fuller table makes each insert dearer (cache
/// misses; a full one refuses new flows), so without a bound the result would depend on how
/// many iterations criterion chose.
const NEW_FLOWS_PER_LOAD: u32 = 20_000;
/// Frames per `BPF_PROG_TEST_RUN` call when the frame can be run again as it is.
const REPEAT: u32 = 10_000;

/// The program with the defaults the daemon loads it with, the proxy on 80 and 443, and one
/// L4 service of `family` with [`L4_BACKENDS`] backends.
fn loaded_dataplane(family: IpFamily) -> Dataplane {
    let mut dataplane = Dataplane::load().expect("load the XDP program");
    dataplane.set_l7_ports(&L7_PORTS).unwrap();
    let backends = (0..L4_BACKENDS)
        .map(|index| {
            let (endpoint, snat_addr): (IpAddr, IpAddr) = match family {
                IpFamily::V4 => (
                    Ipv4Addr::new(10, 78, 2, 1 + index as u8).into(),
                    SNAT_ADDR.into(),
                ),
                IpFamily::V6 => (
                    Ipv6Addr::new(0xfd78, 2, 0, 0, 0, 0, 0, 1 + index).into(),
                    SNAT_ADDR6.into(),
                ),
            };
            BackendPlan {
                endpoint: SocketAddr::new(endpoint, 30_000 + index),
                snat_addr,
                next_hop: NextHop {
                    ifindex: TEST_RUN_IFINDEX,
                    src_mac: LB_MAC,
                    dst_mac: BACKEND_MAC,
                },
            }
        })
        .collect();
    let service = ServicePlan {
        listener: L4_SERVICE,
        family,
        addresses: vec![lb_addr(family)],
        backends,
    };
    dataplane.l4().apply(&[service]).unwrap();
    dataplane
}

fn lb_addr(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => LB_ADDR.into(),
        IpFamily::V6 => LB_ADDR6.into(),
    }
}

/// Runs of the established flow per call: each takes one off the TTL of 255.
const FIXED_POINT_REPEAT: u32 = 250;

/// The program with one L4 flow whose NAT is the identity: the service's backend is the
/// service's own address and port, and the SNAT address and only SNAT port are `client`'s.
/// The forward rewrite of a segment of `client` is then that same segment (its TTL one lower,
/// its MACs the next hop's), which the program takes for the same flow on the next run: the
/// whole established path, every lookup and write of it, run after run.
fn fixed_point_dataplane(client: SocketAddr) -> Dataplane {
    let settings = L4Settings {
        snat_ports: SnatPorts::new(client.port(), client.port()).unwrap(),
        ..L4Settings::default()
    };
    let mut dataplane = Dataplane::load_with(&settings).expect("load the XDP program");
    serve_itself(&mut dataplane, IpFamily::of(client.ip()), client.ip());
    dataplane
}

/// Gives `dataplane` one L4 service of `family` whose only backend is the service's own
/// address and port, reached from `snat_addr`: the NAT of a packet to it yields a packet to
/// it again (see [`fixed_point_dataplane`] and [`new_flow_chain_dataplane`]).
fn serve_itself(dataplane: &mut Dataplane, family: IpFamily, snat_addr: IpAddr) {
    let service = ServicePlan {
        listener: L4_SERVICE,
        family,
        addresses: vec![lb_addr(family)],
        backends: vec![BackendPlan {
            endpoint: SocketAddr::new(lb_addr(family), L4_SERVICE.port),
            snat_addr,
            next_hop: NextHop {
                ifindex: TEST_RUN_IFINDEX,
                src_mac: LB_MAC,
                dst_mac: BACKEND_MAC,
            },
        }],
    };
    dataplane.l4().apply(&[service]).unwrap();
}

type TcpFlags = fn(PacketBuilderStep<TcpHeader>) -> PacketBuilderStep<TcpHeader>;

fn syn(step: PacketBuilderStep<TcpHeader>) -> PacketBuilderStep<TcpHeader> {
    step.syn()
}

fn ack(step: PacketBuilderStep<TcpHeader>) -> PacketBuilderStep<TcpHeader> {
    step.ack(1)
}

/// A client's TCP segment to the LB (of the client's family), no payload; TTL 255, so that the
/// established flow can be run [`FIXED_POINT_REPEAT`] times on it.
fn tcp_to_lb(client: SocketAddr, port: u16, flags: TcpFlags) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC);
    let builder = match (client.ip(), lb_addr(IpFamily::of(client.ip()))) {
        (IpAddr::V4(from), IpAddr::V4(to)) => builder.ipv4(from.octets(), to.octets(), 255),
        (IpAddr::V6(from), IpAddr::V6(to)) => builder.ipv6(from.octets(), to.octets(), 255),
        _ => unreachable!("lb_addr is of the client's family"),
    };
    let builder = builder.tcp(client.port(), port, 1000, 64240);
    let mut frame = Vec::new();
    flags(builder).write(&mut frame, &[]).unwrap();
    frame
}

/// The `index`-th of 2^24 distinct clients (address and port) of `family`.
fn client(family: IpFamily, index: u32) -> SocketAddr {
    let [_, hi, lo, port_bits] = index.to_be_bytes();
    let addr: IpAddr = match family {
        IpFamily::V4 => Ipv4Addr::new(10, 79, hi, lo).into(),
        IpFamily::V6 => Ipv6Addr::new(0xfd79, 0, 0, 0, 0, 0, hi.into(), lo.into()).into(),
    };
    SocketAddr::new(addr, 40_000 + u16::from(port_bits))
}

/// Runs `frame` `repeat` times in one call; returns the kernel's time per run.
fn run(dataplane: &mut Dataplane, frame: &[u8], repeat: u32, verdict: u32) -> Duration {
    let result = dataplane
        .program()
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, verdict, "verdict of {frame:02x?}");
    result.duration
}

/// Runs `frame` once and checks that it took the path the benchmark is named after.
fn assert_counted(dataplane: &mut Dataplane, frame: &[u8], verdict: u32, stat: Stat) {
    let before = dataplane.stats().unwrap().get(stat).packets;
    run(dataplane, frame, 1, verdict);
    let after = dataplane.stats().unwrap().get(stat).packets;
    assert_eq!(
        after - before,
        1,
        "{frame:02x?} is not counted as {}",
        stat.name()
    );
}

/// Per-packet times are the kernel's own (`TestRunResult::duration`, its mean time per run in
/// one call), handed to criterion through `iter_custom`: copying the frame in and out and the
/// syscall itself are not what a packet costs on the wire.
fn xdp_packet(c: &mut Criterion) {
    if !can_load_xdp("xdp_packet") {
        return;
    }
    let mut group = c.benchmark_group("xdp_packet");

    let mut dataplane = loaded_dataplane(IpFamily::V4);
    let l7_syn = tcp_to_lb(client(IpFamily::V4, 0), 80, syn);
    assert_counted(&mut dataplane, &l7_syn, XDP_PASS, Stat::ClassL7);
    // A passed frame is left as it came in, so one call can run it REPEAT times; the kernel
    // reports the mean time per run, truncated to whole nanoseconds.
    group.bench_function("l7_pass", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let repeat = left.min(u64::from(REPEAT)) as u32;
                total += run(&mut dataplane, &l7_syn, repeat, XDP_PASS) * repeat;
                left -= u64::from(repeat);
            }
            total
        })
    });

    for (family, suffix) in [(IpFamily::V4, ""), (IpFamily::V6, "_ipv6")] {
        // A new flow's frame is rewritten in place (NAT), and with `repeat` the kernel runs
        // the program again on the rewritten frame: a service whose backend is itself makes
        // that frame the next new flow's (see `new_flow_chain_dataplane`).
        let mut new_flows = NewFlows::start(family);
        group.bench_function(format!("l4_new_flow{suffix}"), |b| {
            b.iter_custom(|iters| new_flows.time(iters))
        });

        // An established flow runs with `repeat`, as l7_pass does, on a flow whose rewrite
        // gives back the frame it was given (see `fixed_point_dataplane`).
        let established = client(family, 0);
        let mut fixed_point = fixed_point_dataplane(established);
        let first_syn = tcp_to_lb(established, L4_SERVICE.port, syn);
        assert_counted(&mut fixed_point, &first_syn, XDP_TX, Stat::L4NewFlow);
        let l4_ack = tcp_to_lb(established, L4_SERVICE.port, ack);
        assert_counted(&mut fixed_point, &l4_ack, XDP_TX, Stat::L4Forwarded);
        group.bench_function(format!("l4_established{suffix}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let repeat = left.min(u64::from(FIXED_POINT_REPEAT)) as u32;
                    total += run(&mut fixed_point, &l4_ack, repeat, XDP_TX) * repeat;
                    left -= u64::from(repeat);
                }
                total
            })
        });
    }
    group.finish();
}

/// Runs of the new-flow chain per call (see [`new_flow_chain_dataplane`]): each takes one off
/// the TTL of 255.
const CHAIN_REPEAT: u32 = 250;

/// The program with one L4 service of `family` whose only backend is the service's own address
/// and port. A client's SYN leaves as a SYN from the SNAT address and the new flow's SNAT port
/// to the service, which the next run takes for another client's SYN: every run of a call is a
/// new flow (Maglev pick, SNAT claim, both inserts, rewrite), and the kernel's mean per run
/// leaves out the fixed cost of a call, as for the established flow.
fn new_flow_chain_dataplane(family: IpFamily) -> Dataplane {
    let mut dataplane = Dataplane::load().expect("load the XDP program");
    let snat_addr = match family {
        IpFamily::V4 => IpAddr::from(SNAT_ADDR),
        IpFamily::V6 => IpAddr::from(SNAT_ADDR6),
    };
    serve_itself(&mut dataplane, family, snat_addr);
    dataplane
}

/// Chains of new flows, each chain started by another client's SYN, on a program reloaded
/// (untimed) every [`NEW_FLOWS_PER_LOAD`] flows so that the connection table never fills.
struct NewFlows {
    dataplane: Dataplane,
    family: IpFamily,
    flows: u32,
    chains: u32,
}

impl NewFlows {
    fn start(family: IpFamily) -> NewFlows {
        let mut new_flows = NewFlows {
            dataplane: new_flow_chain_dataplane(family),
            family,
            flows: 0,
            chains: 0,
        };
        let before = new_flows.new_flows_counted();
        new_flows.run_chain(CHAIN_REPEAT);
        let counted = new_flows.new_flows_counted() - before;
        assert_eq!(
            counted,
            u64::from(CHAIN_REPEAT),
            "every run of a chain is a new flow"
        );
        new_flows
    }

    fn new_flows_counted(&mut self) -> u64 {
        self.dataplane.stats().unwrap().get(Stat::L4NewFlow).packets
    }

    /// The kernel's mean time per new flow over a chain of `repeat`.
    fn run_chain(&mut self, repeat: u32) -> Duration {
        if self.flows + repeat > NEW_FLOWS_PER_LOAD {
            *self = NewFlows::start(self.family);
        }
        let frame = tcp_to_lb(client(self.family, self.chains), L4_SERVICE.port, syn);
        self.chains += 1;
        self.flows += repeat;
        run(&mut self.dataplane, &frame, repeat, XDP_TX)
    }

    /// The kernel's time for `iters` new flows.
    fn time(&mut self, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let repeat = left.min(u64::from(CHAIN_REPEAT)) as u32;
            total += self.run_chain(repeat) * repeat;
            left -= u64::from(repeat);
        }
        total
    }
}

criterion_group!(
    benches,
    route_lookup,
    response_decoration,
    request_id,
    maglev,
    xdp_packet
);
criterion_main!(benches);
