//! The hot pieces, measured by criterion (`userspace/benches/micro.rs` and `control.rs`, run
//! by `cargo xtask bench` before this program): their mean times, read from criterion's
//! `<group>/<id>/new/estimates.json`. A bench that did not run this time shows as missing.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

/// Every criterion bench the report shows: (group, id, what it measures).
pub const BENCHES: &[(&str, &str, &str)] = &[
    (
        "route_lookup",
        "exact_host",
        "route lookup, exact host (1 000 services)",
    ),
    (
        "route_lookup",
        "wildcard_host_context_root",
        "route lookup, wildcard host + context root",
    ),
    (
        "response_decoration",
        "interlock_headers",
        "Interlock's five response headers",
    ),
    ("request_id", "new", "one request id"),
    (
        "maglev",
        "build_ring_10_backends",
        "Maglev table, 10 backends",
    ),
    (
        "maglev",
        "build_ring_100_backends",
        "Maglev table, 100 backends",
    ),
    (
        "xdp_packet",
        "l7_pass",
        "XDP, a packet passed to the L7 proxy",
    ),
    (
        "xdp_packet",
        "l4_new_flow",
        "XDP, the first packet of an L4 flow (NAT + conntrack insert)",
    ),
    (
        "xdp_packet",
        "l4_established",
        "XDP, a packet of an established L4 flow",
    ),
    (
        "xdp_packet",
        "l4_new_flow_ipv6",
        "XDP, the first packet of an IPv6 L4 flow (two tail calls)",
    ),
    (
        "xdp_packet",
        "l4_established_ipv6",
        "XDP, a packet of an established IPv6 L4 flow (one tail call)",
    ),
    (
        "control",
        "route_table_10k_services_100k_tasks",
        "route table for 10 000 services / 100 000 tasks",
    ),
    (
        "control",
        "bpf_map_update_10k_services_100k_tasks",
        "BPF map update for that snapshot",
    ),
];

#[derive(Debug, Clone, Serialize)]
pub struct Micro {
    pub group: String,
    pub id: String,
    pub what: String,
    pub mean_ns: Option<f64>,
}

pub fn read(criterion_dir: &Path) -> Vec<Micro> {
    BENCHES
        .iter()
        .map(|&(group, id, what)| Micro {
            group: group.to_owned(),
            id: id.to_owned(),
            what: what.to_owned(),
            mean_ns: mean_ns(
                &criterion_dir
                    .join(group)
                    .join(id)
                    .join("new/estimates.json"),
            ),
        })
        .collect()
}

fn mean_ns(estimates: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(estimates).ok()?;
    let estimates: Value = serde_json::from_str(&text).ok()?;
    estimates["mean"]["point_estimate"].as_f64()
}
