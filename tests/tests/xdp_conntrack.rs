//! The connection table's life cycle, frame by frame through the real kernel
//! (BPF_PROG_TEST_RUN): handshake, established, closing, TIME_WAIT and UDP flows, and what
//! each state lets a new flow do with its SNAT tuple. Most cases use a single SNAT port, so the
//! second flow must take the first one's tuple or be refused; timeouts are set short by
//! configuration, and the waits are a few times longer than them.

mod xdp_support;

use std::{net::SocketAddrV4, thread, time::Duration};

use aya::maps::{Map, MapData, MapInfo};
use xdp_support::*;
use xlb::{
    dataplane::Dataplane,
    l4::settings::{L4Settings, SnatPorts},
};
use xlb_common::{FlowKey, FlowValue};

/// Long enough for a few test runs to happen inside it, short enough to wait out.
const SHORT: Duration = Duration::from_millis(200);

fn wait_out(timeout: Duration) {
    thread::sleep(timeout + timeout / 2);
}

fn conntrack(tweak: impl FnOnce(&mut L4Settings)) -> Dataplane {
    let mut settings = settings(one_snat_port());
    tweak(&mut settings);
    dataplane(
        &settings,
        &[
            service(TCP_SERVICE, vec![backend(BACKEND_A, INGRESS_IFINDEX)]),
            service(UDP_SERVICE, vec![backend(BACKEND_B, INGRESS_IFINDEX)]),
        ],
    )
}

fn from_client(port: u16, flags: Flags) -> Vec<u8> {
    tcp(
        TO_LB,
        SocketAddrV4::new(CLIENT, port),
        lb(5432),
        64,
        flags,
        &[],
    )
}

/// From the backend to the SNAT tuple `snat_port`.
fn from_backend(snat_port: u16, flags: Flags) -> Vec<u8> {
    let snat = SocketAddrV4::new(SNAT_ADDR, snat_port);
    tcp(FROM_BACKEND, BACKEND_A, snat, 64, flags, &[])
}

fn rst(step: etherparse::PacketBuilderStep<etherparse::TcpHeader>) -> Tcp {
    step.rst()
}

type Tcp = etherparse::PacketBuilderStep<etherparse::TcpHeader>;

/// Runs one frame: its verdict, the L4 outcome and events it was counted under, and the SNAT
/// port of the output when it went to the backend.
fn step(dataplane: &mut Dataplane, frame: &[u8]) -> (u32, Vec<&'static str>, Option<u16>) {
    let before = dataplane.stats().unwrap();
    let (verdict, out) = run(dataplane, frame);
    let after = dataplane.stats().unwrap();
    let l4: Vec<&'static str> = moved(&before, &after)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("l4_"))
        .collect();
    let snat_port = inspect(&out)
        .ok()
        .filter(|seen| seen.dst == BACKEND_A || seen.dst == BACKEND_B)
        .map(|seen| seen.src.port());
    (verdict, l4, snat_port)
}

/// SYN, SYN-ACK, ACK for client port `port`: an established flow; its SNAT port.
fn handshake(dataplane: &mut Dataplane, port: u16) -> u16 {
    let (verdict, l4, snat_port) = step(dataplane, &from_client(port, syn));
    assert_eq!(
        (verdict, l4),
        (XDP_TX, vec!["l4_new_flow"]),
        "SYN from {port}"
    );
    let snat_port = snat_port.unwrap();
    let (verdict, l4, _) = step(dataplane, &from_backend(snat_port, syn_ack));
    assert_eq!((verdict, l4), (XDP_TX, vec!["l4_replied"]), "SYN-ACK");
    let (verdict, l4, _) = step(dataplane, &from_client(port, ack));
    assert_eq!((verdict, l4), (XDP_TX, vec!["l4_forwarded"]), "ACK");
    snat_port
}

#[test]
fn an_unanswered_handshake_gives_its_tuple_to_the_next_flow_after_its_timeout() {
    let mut dataplane = conntrack(|s| s.tcp_handshake = SHORT);
    let (_, l4, _) = step(&mut dataplane, &from_client(40000, syn));
    assert_eq!(l4, ["l4_new_flow"]);
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40001, syn));
    assert_eq!(
        (verdict, l4),
        (XDP_DROP, vec!["l4_drop_snat_exhausted"]),
        "the only tuple is held while the handshake may still complete"
    );
    wait_out(SHORT);
    let (verdict, l4, snat_port) = step(&mut dataplane, &from_client(40001, syn));
    assert_eq!(
        (verdict, l4, snat_port),
        (
            XDP_TX,
            vec!["l4_flow_reclaimed", "l4_new_flow"],
            Some(SNAT_PORT)
        )
    );
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!(
        (verdict, l4),
        (XDP_PASS, vec!["l4_pass_no_flow"]),
        "the reclaimed flow's entries are gone, both of them"
    );
}

#[test]
fn an_established_flow_outlives_the_handshake_timeout_and_keeps_its_tuple() {
    let mut dataplane = conntrack(|s| s.tcp_handshake = Duration::from_millis(1));
    handshake(&mut dataplane, 40000);
    wait_out(Duration::from_millis(5));
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40001, syn));
    assert_eq!((verdict, l4), (XDP_DROP, vec!["l4_drop_snat_exhausted"]));
    let (verdict, l4, snat_port) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!(
        (verdict, l4, snat_port),
        (XDP_TX, vec!["l4_forwarded"], Some(SNAT_PORT))
    );
}

#[test]
fn a_closed_flows_tuple_waits_for_late_segments_unless_every_other_tuple_is_live() {
    let mut dataplane = conntrack(|s| {
        s.snat_ports = SnatPorts::new(61000, 61001).unwrap();
        s.tcp_closing = Duration::from_secs(3600);
    });
    let first = handshake(&mut dataplane, 40000);
    step(&mut dataplane, &from_client(40000, fin_ack));
    step(&mut dataplane, &from_backend(first, fin_ack));
    let (verdict, l4, late) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!(
        (verdict, l4, late),
        (XDP_TX, vec!["l4_forwarded"], Some(first)),
        "a late segment of a closing flow still goes through"
    );

    let (verdict, l4, second) = step(&mut dataplane, &from_client(40001, syn));
    assert_eq!((verdict, l4), (XDP_TX, vec!["l4_new_flow"]));
    assert_ne!(
        second,
        Some(first),
        "the free tuple is taken, not the closing one"
    );

    let (verdict, l4, third) = step(&mut dataplane, &from_client(40002, syn));
    assert_eq!(
        (verdict, l4, third),
        (
            XDP_TX,
            vec!["l4_flow_reclaimed", "l4_new_flow"],
            Some(first)
        ),
        "with every other tuple live, the closing flow's is taken rather than the SYN refused"
    );
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!(
        (verdict, l4),
        (XDP_PASS, vec!["l4_pass_no_flow"]),
        "the closed flow is gone with its tuple"
    );
}

#[test]
fn a_backends_time_wait_is_held_unless_every_other_tuple_is_live() {
    let mut dataplane = conntrack(|s| {
        s.snat_ports = SnatPorts::new(61000, 61001).unwrap();
        s.tcp_time_wait = Duration::from_secs(3600);
    });
    let first = handshake(&mut dataplane, 40000);
    let (_, l4, _) = step(&mut dataplane, &from_backend(first, fin_ack));
    assert_eq!(l4, ["l4_replied"], "the backend closes first");
    step(&mut dataplane, &from_client(40000, fin_ack));
    wait_out(Duration::from_millis(5));

    let (verdict, l4, second) = step(&mut dataplane, &from_client(40001, syn));
    assert_eq!((verdict, l4), (XDP_TX, vec!["l4_new_flow"]));
    assert_ne!(
        second,
        Some(first),
        "the free tuple is taken, not the TIME_WAIT one"
    );

    let (verdict, l4, third) = step(&mut dataplane, &from_client(40002, syn));
    assert_eq!(
        (verdict, l4, third),
        (
            XDP_TX,
            vec!["l4_new_flow", "l4_snat_time_wait_reused"],
            Some(first)
        ),
        "with every other tuple live, the TIME_WAIT one is reused"
    );
}

#[test]
fn a_syn_on_a_closed_flows_tuple_reopens_it_on_the_same_snat_tuple() {
    let mut dataplane = conntrack(|s| {
        s.snat_ports = SnatPorts::new(61000, 61999).unwrap();
        s.tcp_time_wait = Duration::from_secs(3600);
    });
    let snat_port = handshake(&mut dataplane, 40000);
    // The backend closes first: its socket keeps the SNAT tuple in TIME_WAIT.
    step(&mut dataplane, &from_backend(snat_port, fin_ack));
    step(&mut dataplane, &from_client(40000, fin_ack));
    let (verdict, l4, reopened) = step(&mut dataplane, &from_client(40000, syn));
    assert_eq!(
        (verdict, l4, reopened),
        (
            XDP_TX,
            vec!["l4_flow_reopened", "l4_new_flow"],
            Some(snat_port)
        ),
        "the client reusing its port meets the backend's socket as it left it (its newer \
         timestamp lets the backend accept the SYN), as with the kernel's conntrack"
    );
    let (_, l4, _) = step(&mut dataplane, &from_backend(snat_port, syn_ack));
    assert_eq!(l4, ["l4_replied"], "the new flow's reply entry is in place");
}

/// The program's IPv4 connection table, opened by id: the test's hand in it.
fn flows_table(dataplane: &mut Dataplane) -> aya::maps::HashMap<MapData, FlowKey, FlowValue> {
    let info = dataplane.program().unwrap().info().unwrap();
    let id = info
        .map_ids()
        .unwrap()
        .unwrap()
        .into_iter()
        .find(|id| MapInfo::from_id(*id).unwrap().name_as_str() == Some("FLOWS"))
        .expect("the program uses FLOWS");
    aya::maps::HashMap::try_from(Map::HashMap(MapData::from_id(id).unwrap())).unwrap()
}

/// The reply entry's key of SNAT port `snat_port` toward backend A, as the program keys it.
fn reply_key(snat_port: u16) -> FlowKey {
    FlowKey::new(
        u32::from_ne_bytes(BACKEND_A.ip().octets()),
        u32::from_ne_bytes(SNAT_ADDR.octets()),
        BACKEND_A.port().to_be(),
        snat_port.to_be(),
        6,
    )
}

#[test]
fn a_syn_that_meets_half_a_removed_pair_starts_a_new_flow() {
    let mut dataplane = conntrack(|s| s.snat_ports = SnatPorts::new(61000, 61999).unwrap());
    let snat_port = handshake(&mut dataplane, 40000);
    step(&mut dataplane, &from_client(40000, fin_ack));
    step(&mut dataplane, &from_backend(snat_port, fin_ack));
    // What a packet's two lookups see when another CPU (the sweep, or a new flow reclaiming
    // the closed flow's tuple) removes the pair between them: the forward entry, and no reply
    // entry.
    flows_table(&mut dataplane)
        .remove(&reply_key(snat_port))
        .unwrap();
    let (verdict, l4, new_snat_port) = step(&mut dataplane, &from_client(40000, syn));
    assert_eq!(
        (verdict, l4),
        (XDP_TX, vec!["l4_flow_orphaned", "l4_new_flow"]),
        "the client reusing its port gets its new connection, not a dropped SYN"
    );
    let (_, l4, _) = step(
        &mut dataplane,
        &from_backend(new_snat_port.unwrap(), syn_ack),
    );
    assert_eq!(l4, ["l4_replied"], "the new flow is whole");

    // Any other packet of such a flow is dropped, and the entry left removed.
    let snat_port = handshake(&mut dataplane, 40001);
    flows_table(&mut dataplane)
        .remove(&reply_key(snat_port))
        .unwrap();
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40001, fin_ack));
    assert_eq!((verdict, l4), (XDP_DROP, vec!["l4_drop_flow_lost"]));
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40001, ack));
    assert_eq!((verdict, l4), (XDP_PASS, vec!["l4_pass_no_flow"]));
}

#[test]
fn a_blind_rst_does_not_close_a_flow_the_backend_keeps_answering() {
    let mut dataplane = conntrack(|_| {});
    let snat_port = handshake(&mut dataplane, 40000);
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40000, rst));
    assert_eq!((verdict, l4), (XDP_TX, vec!["l4_forwarded"]));
    let (_, l4, _) = step(&mut dataplane, &from_backend(snat_port, ack));
    assert_eq!(l4, ["l4_replied"], "the backend's challenge ACK");
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40000, syn));
    assert_eq!(
        (verdict, l4),
        (XDP_TX, vec!["l4_forwarded"]),
        "the flow is still established: a SYN is forwarded on it, not a reopen"
    );

    let mut dataplane = conntrack(|_| {});
    handshake(&mut dataplane, 40000);
    step(&mut dataplane, &from_client(40000, rst));
    let (_, l4, _) = step(&mut dataplane, &from_client(40000, syn));
    assert_eq!(
        l4,
        ["l4_flow_reopened", "l4_new_flow"],
        "a RST the backend took closes the flow"
    );
}

#[test]
fn an_idle_udp_flow_gives_its_tuple_to_the_next_flow() {
    let mut dataplane = conntrack(|s| s.udp_idle = SHORT);
    let query = |port| udp(TO_LB, SocketAddrV4::new(CLIENT, port), lb(53), 64, b"q");
    let (_, l4, _) = step(&mut dataplane, &query(40000));
    assert_eq!(l4, ["l4_new_flow"]);
    let (verdict, l4, _) = step(&mut dataplane, &query(40001));
    assert_eq!((verdict, l4), (XDP_DROP, vec!["l4_drop_snat_exhausted"]));
    let (_, l4, _) = step(&mut dataplane, &query(40000));
    assert_eq!(l4, ["l4_forwarded"]);
    wait_out(SHORT);
    let (verdict, l4, _) = step(&mut dataplane, &query(40001));
    assert_eq!(
        (verdict, l4),
        (XDP_TX, vec!["l4_flow_reclaimed", "l4_new_flow"])
    );
    let (verdict, l4, _) = step(&mut dataplane, &query(40000));
    assert_eq!(
        (verdict, l4),
        (XDP_DROP, vec!["l4_drop_snat_exhausted"]),
        "the idle flow's entries went with its tuple"
    );
}

#[test]
fn the_sweep_removes_every_flow_that_is_over_and_keeps_the_live_ones() {
    // Longer than making 20 000 flows takes on a loaded machine (with SHORT, a CI run with
    // other work on both CPUs saw 9 456 of them over before the first sweep).
    const UDP_IDLE: Duration = Duration::from_secs(2);
    let mut dataplane = conntrack(|s| {
        s.snat_ports = SnatPorts::new(20000, 59999).unwrap();
        s.flow_entries = 65536;
        s.udp_idle = UDP_IDLE;
    });
    handshake(&mut dataplane, 40000);
    // More flows than one batch of the sweep's reads and deletes holds.
    const UDP_FLOWS: u16 = 20_000;
    for port in 0..UDP_FLOWS {
        let query = udp(
            TO_LB,
            SocketAddrV4::new(CLIENT, 1024 + port),
            lb(53),
            64,
            b"q",
        );
        // `run`, not `step`: reading every counter per frame would dominate the test.
        let (verdict, _) = run(&mut dataplane, &query);
        assert_eq!(verdict, XDP_TX, "UDP flow {port}");
    }
    let plan = dataplane.sweep_flows().unwrap();
    assert_eq!(plan.expired_flows(), 0, "nothing is over yet");
    let table = dataplane.connection_table().table.clone();
    assert_eq!(table.entries, 2 * (u64::from(UDP_FLOWS) + 1));
    assert_eq!(table.flows["udp"], u64::from(UDP_FLOWS));
    assert_eq!(table.flows["established"], 1);

    wait_out(UDP_IDLE);
    let plan = dataplane.sweep_flows().unwrap();
    assert_eq!(plan.expired_flows(), u64::from(UDP_FLOWS));
    let report = dataplane.connection_table();
    assert_eq!(report.table.entries, 2, "only the established flow is left");
    assert_eq!(report.sweeps.expired_flows, u64::from(UDP_FLOWS));
    assert_eq!(dataplane.sweep_flows().unwrap().summary().entries, 2);

    let (verdict, l4, _) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!((verdict, l4), (XDP_TX, vec!["l4_forwarded"]));
    let query = udp(TO_LB, SocketAddrV4::new(CLIENT, 1024), lb(53), 64, b"q");
    let (_, l4, _) = step(&mut dataplane, &query);
    assert_eq!(
        l4,
        ["l4_new_flow"],
        "a new flow, on a tuple the sweep freed"
    );
}

#[test]
fn the_sweep_spares_a_flow_reopened_after_it_was_judged_over() {
    let mut dataplane = conntrack(|s| {
        s.snat_ports = SnatPorts::new(61000, 61999).unwrap();
        s.tcp_closing = SHORT;
    });
    let snat_port = handshake(&mut dataplane, 40000);
    step(&mut dataplane, &from_client(40000, fin_ack));
    step(&mut dataplane, &from_backend(snat_port, fin_ack));
    wait_out(SHORT);
    let plan = dataplane.judge_flows().unwrap();
    assert_eq!(plan.expired_flows(), 1, "the closed flow is over");
    // Between the sweep's snapshot and its removals, the client reuses its port: the same two
    // keys, a new flow.
    let (_, l4, reopened) = step(&mut dataplane, &from_client(40000, syn));
    assert_eq!(
        (l4, reopened),
        (vec!["l4_flow_reopened", "l4_new_flow"], Some(snat_port))
    );
    let plan = dataplane.remove_judged_flows(plan).unwrap();
    assert_eq!(
        plan.expired_flows(),
        0,
        "the new flow is not the one judged"
    );
    let (_, l4, _) = step(&mut dataplane, &from_backend(snat_port, syn_ack));
    assert_eq!(
        l4,
        ["l4_replied"],
        "the new flow's reply entry is still there"
    );
    let (_, l4, _) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!(l4, ["l4_forwarded"], "and its forward entry");
}

#[test]
fn live_flows_follow_their_backends_next_hop_and_end_when_it_has_drained() {
    const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbf];
    let backend_c = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 78, 1, 4), 30003);
    let mut settings = settings(SnatPorts::new(61000, 61099).unwrap());
    settings.backend_drain = Duration::ZERO;
    let tcp_to = |endpoint, mac| {
        let mut plan = backend(endpoint, INGRESS_IFINDEX);
        plan.next_hop.dst_mac = mac;
        service(TCP_SERVICE, vec![plan])
    };
    let udp_to = |endpoint| service(UDP_SERVICE, vec![backend(endpoint, INGRESS_IFINDEX)]);
    let mut dataplane = dataplane(
        &settings,
        &[tcp_to(BACKEND_A, BACKEND_MAC), udp_to(BACKEND_B)],
    );
    handshake(&mut dataplane, 40000);
    let query = udp(TO_LB, SocketAddrV4::new(CLIENT, 40000), lb(53), 64, b"q");
    let (_, out) = run(&mut dataplane, &query);
    assert_eq!(inspect(&out).unwrap().dst, BACKEND_B);

    dataplane
        .l4()
        .apply(&[tcp_to(BACKEND_A, NEW_MAC), udp_to(BACKEND_B)])
        .unwrap();
    let (verdict, out) = run(&mut dataplane, &from_client(40000, ack));
    assert_eq!(verdict, XDP_TX);
    let seen = inspect(&out).unwrap();
    assert_eq!(
        (seen.dst, seen.dst_mac),
        (BACKEND_A, NEW_MAC),
        "the live flow takes its backend's new MAC"
    );

    // Both backends leave; with no drain time their ids are cleared at once.
    dataplane
        .l4()
        .apply(&[tcp_to(backend_c, BACKEND_MAC), udp_to(backend_c)])
        .unwrap();
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!(
        (verdict, l4),
        (XDP_PASS, vec!["l4_flow_backend_gone", "l4_pass_no_flow"]),
        "a TCP segment of a flow whose backend is gone goes to the kernel, which resets it"
    );
    let (verdict, l4, _) = step(&mut dataplane, &query);
    assert_eq!(
        (verdict, l4),
        (XDP_TX, vec!["l4_flow_backend_gone", "l4_new_flow"]),
        "a UDP flow whose backend is gone starts over"
    );
    let (_, out) = run(&mut dataplane, &query);
    assert_eq!(inspect(&out).unwrap().dst, backend_c, "on a live backend");
}

#[test]
fn a_removed_services_flows_go_on_while_it_drains_and_then_go_to_the_kernel() {
    // The TCP flow's backend stays, serving UDP: only the service's going can end the flow.
    let only_udp = [service(
        UDP_SERVICE,
        vec![backend(BACKEND_A, INGRESS_IFINDEX)],
    )];
    let forwarded = (XDP_TX, vec!["l4_forwarded"]);
    let not_l4 = (XDP_PASS, vec![]);
    for (drain, established_after_removal) in [
        (Duration::from_secs(3600), forwarded),
        (Duration::ZERO, not_l4.clone()),
    ] {
        let mut dataplane = conntrack(|settings| settings.backend_drain = drain);
        handshake(&mut dataplane, 40000);
        dataplane.l4().apply(&only_udp).unwrap();
        let (verdict, l4, _) = step(&mut dataplane, &from_client(40000, ack));
        assert_eq!(
            (verdict, l4),
            established_after_removal,
            "a segment of an established flow after its service left, drain time {drain:?}"
        );
        let (verdict, l4, _) = step(&mut dataplane, &from_client(40001, syn));
        assert_eq!(
            (verdict, l4),
            not_l4,
            "a new connection to the removed service, drain time {drain:?}"
        );
    }
}

#[test]
fn a_backend_that_returns_while_draining_keeps_its_id_and_its_flows() {
    let mut dataplane = conntrack(|_| {});
    handshake(&mut dataplane, 40000);
    let id = dataplane.l4().backend_ids()[&BACKEND_A.into()];
    let backend_c = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 78, 1, 4), 30003);
    let without_a = [
        service(TCP_SERVICE, vec![backend(backend_c, INGRESS_IFINDEX)]),
        service(UDP_SERVICE, vec![backend(BACKEND_B, INGRESS_IFINDEX)]),
    ];
    dataplane.l4().apply(&without_a).unwrap();
    let (verdict, l4, _) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!(
        (verdict, l4),
        (XDP_TX, vec!["l4_forwarded"]),
        "a removed backend's flows go on while it drains"
    );
    let (_, out) = run(&mut dataplane, &from_client(40001, syn));
    assert_eq!(inspect(&out).unwrap().dst, backend_c, "new flows avoid it");
    dataplane
        .l4()
        .apply(&[
            service(TCP_SERVICE, vec![backend(BACKEND_A, INGRESS_IFINDEX)]),
            service(UDP_SERVICE, vec![backend(BACKEND_B, INGRESS_IFINDEX)]),
        ])
        .unwrap();
    assert_eq!(dataplane.l4().backend_ids()[&BACKEND_A.into()], id);
    let (_, l4, _) = step(&mut dataplane, &from_client(40000, ack));
    assert_eq!(l4, ["l4_forwarded"]);
}

/// Runs `work` on a thread pinned to CPU 0: a test run executes on the CPU that asks for it,
/// and per-CPU limits then count every frame in one place.
fn on_one_cpu<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut cpus = nix::sched::CpuSet::new();
                cpus.set(0).unwrap();
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
                work()
            })
            .join()
            .unwrap()
    })
}

#[test]
fn a_syn_flood_is_cut_at_the_services_limit_and_never_displaces_an_established_flow() {
    let cpus = aya::util::online_cpus().unwrap().len() as u32;
    const PER_CPU: u32 = 50;
    let mut settings = settings(SnatPorts::new(20000, 59999).unwrap());
    // Room for the established flow and 99 more: the flood fills the table.
    settings.flow_entries = 200;
    let mut limited = settings.clone();
    limited.new_flows_per_second = Some(PER_CPU * cpus);
    let plan = [service(
        TCP_SERVICE,
        vec![backend(BACKEND_A, INGRESS_IFINDEX)],
    )];
    let spoofed = |index: u32| {
        let source = std::net::Ipv4Addr::from(0x0a50_0000 + index);
        tcp(
            TO_LB,
            SocketAddrV4::new(source, 1024),
            lb(5432),
            64,
            syn,
            &[],
        )
    };
    on_one_cpu(|| {
        let mut flooded = dataplane(&settings, &plan);
        handshake(&mut flooded, 40000);
        let before = flooded.stats().unwrap();
        for index in 0..10_000 {
            run(&mut flooded, &spoofed(index));
        }
        let counts = moved_by_name(&before, &flooded.stats().unwrap());
        assert_eq!(counts["l4_new_flow"], 99, "the table filled up");
        assert_eq!(counts["l4_drop_flow_table"], 10_000 - 99);
        let (verdict, l4, _) = step(&mut flooded, &from_client(40000, ack));
        assert_eq!(
            (verdict, l4),
            (XDP_TX, vec!["l4_forwarded"]),
            "the established flow is still there"
        );

        let mut limited = dataplane(&limited, &plan);
        let before = limited.stats().unwrap();
        for index in 0..(PER_CPU + 20) {
            run(&mut limited, &spoofed(index));
        }
        let counts = moved_by_name(&before, &limited.stats().unwrap());
        assert_eq!(counts["l4_new_flow"], u64::from(PER_CPU));
        assert_eq!(
            counts["l4_drop_flood"], 20,
            "past the limit, within the second"
        );
        wait_out(Duration::from_secs(1));
        let (verdict, l4, _) = step(&mut limited, &spoofed(PER_CPU + 20));
        assert_eq!(
            (verdict, l4),
            (XDP_TX, vec!["l4_new_flow"]),
            "the next second has a new allowance"
        );
    });
}

fn moved_by_name(
    before: &xlb::dataplane::Stats,
    after: &xlb::dataplane::Stats,
) -> std::collections::BTreeMap<&'static str, u64> {
    moved(before, after).into_iter().collect()
}
