//! Benchmarks of the control plane on a large Swarm: what one discovery poll of 10 000
//! services with 100 000 running tasks on 8 nodes costs the daemon, through the real functions
//! and, for the maps, the real kernel.
//!
//! - `control/route_table_10k_services_100k_tasks`: the route table built from the snapshot
//!   (`routes::route_table`, the pure function the daemon runs on every poll).
//! - `control/bpf_map_update_10k_services_100k_tasks`: the snapshot's L4 services, as many as
//!   the maps hold by default (one per service slot) with their tasks, planned (`l4::plan`) and
//!   written into a loaded program's maps (`L4Maps::apply`). The writer writes only what
//!   changed, so an unchanged poll costs next to nothing: this measures the full write, into a
//!   freshly loaded program (the load itself is not timed), as after a restart. Needs root;
//!   skipped without it.
//!
//! An iteration takes from a fraction of a second to seconds, so each bench runs criterion's
//! fewest samples, 10, of one iteration each (flat sampling); with `--quick` it stops after the
//! first iterations that agree, or the first one past the measurement time.
//!
//! `cargo xtask bench` reads each `target/criterion/control/<id>/new/estimates.json`, so the
//! group and bench names are an interface: renaming one breaks it.

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use criterion::{
    criterion_group, criterion_main, measurement::WallTime, BenchmarkGroup, Criterion, SamplingMode,
};
use support::{can_load_xdp, swarm_snapshot, SwarmShape, L7_PORTS};
use xlb::{
    dataplane::Dataplane,
    l4::{
        maglev::RingSize,
        neighbours::Resolution,
        plan::{backend_addresses, plan},
        service::l4_route_table,
    },
    routes::{route_table, RouteSettings},
    swarm::SwarmSnapshot,
};
use xlb_common::{NextHop, DEFAULT_SERVICE_SLOTS};

const SERVICES: usize = 10_000;
const TASKS: usize = 100_000;

/// The LB address L4 services answer on, and its address toward the nodes.
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 200);

fn control(c: &mut Criterion) {
    let l4_services = DEFAULT_SERVICE_SLOTS as usize;
    let shape = SwarmShape {
        l7_services: SERVICES - l4_services,
        l4_services,
        tasks_per_service: TASKS / SERVICES,
        nodes: 8,
    };
    let snapshot = swarm_snapshot(shape);
    assert_eq!(
        (snapshot.services.len(), snapshot.tasks.len()),
        (SERVICES, TASKS)
    );

    let mut group = c.benchmark_group("control");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(10));
    // Unlike the L4 table, not checked before measuring, since one build takes seconds:
    // `route_lookup` (micro.rs) checks that this generator's services are all routed.
    let settings = RouteSettings::default();
    group.bench_function("route_table_10k_services_100k_tasks", |b| {
        b.iter(|| route_table(&snapshot, &settings))
    });
    if can_load_xdp("control (bpf_map_update_10k_services_100k_tasks)") {
        map_update_bench(&mut group, &snapshot, shape);
    }
    group.finish();
}

fn map_update_bench(
    group: &mut BenchmarkGroup<'_, WallTime>,
    snapshot: &SwarmSnapshot,
    shape: SwarmShape,
) {
    let l4_table = l4_route_table(snapshot, &L7_PORTS);
    assert!(l4_table.rejected.is_empty(), "{:?}", l4_table.rejected);
    assert_eq!(l4_table.listeners.len(), shape.l4_services);
    // Every node's next hop already resolved, as on a poll after the first: this is what the
    // neighbour resolver hands the plan, without asking a kernel that knows no such nodes.
    let resolutions: BTreeMap<IpAddr, Resolution> = backend_addresses(&l4_table)
        .into_iter()
        .map(|node| {
            let IpAddr::V4(node_v4) = node else {
                panic!("the benched Swarm's nodes are IPv4: {node}");
            };
            let ready = Resolution::Ready {
                snat_addr: LB_ADDR.into(),
                next_hop: NextHop {
                    ifindex: 2,
                    src_mac: [0x02, 0, 0, 0, 0, 0xc8],
                    dst_mac: [0x02, 0, 0, 0, 0, node_v4.octets()[3]],
                },
            };
            (node, ready)
        })
        .collect();
    group.bench_function("bpf_map_update_10k_services_100k_tasks", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut dataplane = Dataplane::load().expect("load the XDP program");
                let started = Instant::now();
                let plan = plan(&l4_table, &[LB_ADDR.into()], &resolutions);
                let report = dataplane
                    .l4()
                    .apply(&plan.services)
                    .expect("write the maps");
                total += started.elapsed();
                assert!(plan.left_out.is_empty(), "{:?}", plan.left_out);
                assert!(report.out_of_slots.is_empty(), "{report:?}");
                let every_position = shape.l4_services * RingSize::DEFAULT.get() as usize;
                assert_eq!(
                    report.ring_positions_written, every_position,
                    "a full write"
                );
                // The program is unloaded here, outside the timed part.
            }
            total
        })
    });
}

criterion_group!(benches, control);
criterion_main!(benches);
