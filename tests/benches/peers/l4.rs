//! The L4 table: GETs to the L4 port of lb-00, both a new TCP connection per request and
//! keep-alive, through HAProxy `mode tcp`, xlb's XDP path (the service's `xlb.l4.ports`
//! label) and kernel NAT (iptables DNAT + MASQUERADE), against `direct` (client → backend)
//! and `the wire` (the load generator inside lb-00 → backend). On this bridged segment the
//! wire crosses as many veths as direct, from lb-00's namespace: it is the path of a balancer's
//! own upstream half. A balancer on lb-00 adds a crossing into lb-00 and out of it, which is
//! what its "over direct" column prices. The machine's busy time is the cost figure here,
//! since XDP and the kernel's forwarding run in softirq, outside any process.
//!
//! A new connection costs the machine about 270 µs here (mostly the load generator's and the
//! backend's TCP work), and one 10 s measurement moves by ±15 µs, as much as the balancers
//! differ by. `--rounds N` runs the whole table N times, its rows interleaved so that the
//! machine's drift reaches every program alike; each row reports its median round, and its
//! cost over direct as the median of the differences with the same round's direct row.

use anyhow::Result;

use crate::{
    bed::Bed,
    load::{Connections, Target},
    progress::Progress,
    proxies::{self, AccessLog, KernelNat, ProxyInputs, Running},
    row::{self, Row, RowSpec},
    Options, Plan,
};

/// A program of the L4 table while it runs: what to aim at and which processes to meter.
struct Setup<'a> {
    from: &'a xlb_testbed::Netns,
    to: std::net::SocketAddr,
    pids: Vec<u32>,
}

/// The client aiming at lb-00's L4 port, once `started` (the program on lb-00) is up.
fn via_lb<'a, T>(
    bed: &'a Bed,
    started: &Result<T>,
    pids: impl FnOnce(&T) -> Vec<u32>,
) -> Result<Setup<'a>> {
    match started {
        Ok(running) => Ok(Setup {
            from: &bed.client.netns,
            to: bed.l4_addr(),
            pids: pids(running),
        }),
        Err(error) => Err(anyhow::anyhow!("{error:#}")),
    }
}

pub fn measure(bed: &Bed, options: &Options, plan: &Plan, progress: &Progress) -> Result<Vec<Row>> {
    let mut rounds = Vec::new();
    for round in 1..=plan.l4_rounds {
        if plan.l4_rounds > 1 {
            progress.done(&format!("L4: round {round} of {}", plan.l4_rounds));
        }
        rounds.push(measure_round(bed, options, plan, progress)?);
    }
    Ok(median_rounds(rounds))
}

/// Rows of several rounds as one table: for each row its round of median machine cost, with
/// every round's cost over that round's direct row (paired, so that the machine's drift
/// between rounds cancels out).
fn median_rounds(rounds: Vec<Vec<Row>>) -> Vec<Row> {
    let machine = |row: &Row| {
        row.cost
            .as_ref()
            .map(|cost| cost.machine_busy_us_per_request)
    };
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    let order: Vec<(String, String)> = first
        .iter()
        .map(|row| (row.name.clone(), row.variant.clone()))
        .collect();
    order
        .into_iter()
        .map(|(name, variant)| {
            let mut runs: Vec<(Row, Option<f64>)> = rounds
                .iter()
                .filter_map(|round| {
                    let row = round
                        .iter()
                        .find(|row| row.name == name && row.variant == variant)?;
                    let direct = round
                        .iter()
                        .find(|other| {
                            other.name == "direct" && other.connections == row.connections
                        })
                        .and_then(machine);
                    let over_direct = machine(row).zip(direct).map(|(row, direct)| row - direct);
                    Some((row.clone(), over_direct))
                })
                .collect();
            let over_direct: Vec<f64> = runs.iter().filter_map(|(_, over)| *over).collect();
            // Failed rounds (no cost) sort last; the median is taken of the measured ones.
            runs.sort_by(|(a, _), (b, _)| {
                let key = |row: &Row| machine(row).unwrap_or(f64::INFINITY);
                key(a).total_cmp(&key(b))
            });
            let measured = runs
                .iter()
                .filter(|(row, _)| machine(row).is_some())
                .count();
            let (mut row, _) = runs.swap_remove(measured.saturating_sub(1) / 2);
            row.over_direct_us_rounds = over_direct;
            row
        })
        .collect()
}

fn measure_round(
    bed: &Bed,
    options: &Options,
    plan: &Plan,
    progress: &Progress,
) -> Result<Vec<Row>> {
    let scratch = bed.scratch.path().join("l4");
    std::fs::create_dir_all(&scratch)?;
    let mut rows = Vec::new();
    let mut measure_both = |name: &str, setup: Result<Setup>| {
        for connections in [Connections::NewPerRequest, Connections::KeepAlive] {
            progress.step(&format!("L4: {name}, {}", connections.label()));
            let row = match &setup {
                Ok(setup) => row::measure(
                    RowSpec {
                        name,
                        variant: connections.label(),
                        target: Target {
                            from: setup.from,
                            to: setup.to,
                            connections,
                        },
                        pids: setup.pids.clone(),
                        // A new connection per request runs far below any open-loop rate.
                        rates: match connections {
                            Connections::KeepAlive => &plan.rates,
                            Connections::NewPerRequest => &[],
                        },
                        idle_connections_to: None,
                    },
                    plan,
                    &options.oha,
                    &scratch,
                ),
                Err(error) => Row::failed(name, connections.label(), connections, error),
            };
            progress.done(&row.summary());
            rows.push(row);
        }
    };

    measure_both(
        "direct",
        Ok(Setup {
            from: &bed.client.netns,
            to: bed.backend,
            pids: Vec::new(),
        }),
    );
    measure_both(
        "the wire (from lb-00)",
        Ok(Setup {
            from: &bed.lb.netns,
            to: bed.backend,
            pids: Vec::new(),
        }),
    );
    {
        // The same with lb-00's veth receiving as it does under any XDP program (see the
        // kernel NAT rows below): the transport floor of an XDP balancer on veth.
        let in_xdp_mode = bed.lb_interface_in_xdp_mode();
        let from_lb = in_xdp_mode.as_ref().map(|_| Setup {
            from: &bed.lb.netns,
            to: bed.backend,
            pids: Vec::new(),
        });
        measure_both(
            "the wire (from lb-00), its veth in XDP mode",
            from_lb.map_err(|error| anyhow::anyhow!("{error:#}")),
        );
    }
    {
        let inputs = ProxyInputs {
            listen: bed.l4_addr(),
            backend: bed.backend,
            dir: scratch.join("haproxy-tcp"),
            access_log: AccessLog::Off,
            callgrind: None,
        };
        let haproxy = proxies::start_haproxy_tcp(bed, &inputs);
        measure_both("HAProxy mode tcp", via_lb(bed, &haproxy, Running::pids));
    }
    {
        let inputs = ProxyInputs {
            listen: bed.l7_addr(),
            backend: bed.backend,
            dir: scratch.join("xlb"),
            access_log: AccessLog::Off,
            callgrind: None,
        };
        let xlb = proxies::start_xlb(bed, &options.xlb, &inputs, bed.l4_addr());
        // The packets are its XDP program's work, charged to the machine; the process is
        // metered for what it adds per connection (the conntrack sweep, route updates).
        measure_both("xlb XDP", via_lb(bed, &xlb, Running::pids));
        if xlb.is_ok() {
            progress.done(&xdp_counters(bed));
        }
    }
    // Kernel NAT runs last: its conntrack entries outlive its rules (the client reuses ports,
    // and a stale DNAT entry would steer a later row's SYN to a forwarding-off kernel).
    {
        let nat = KernelNat::start(bed);
        measure_both("kernel NAT (iptables)", via_lb(bed, &nat, |_| Vec::new()));
        // The same, with lb-00's veth receiving as it does under xlb: a veth with an XDP
        // program runs its own NAPI and hands the kernel skbs rebuilt from XDP buffers (copied
        // when the sender's skb lacks XDP's headroom), which a NIC's driver does not. The
        // difference between the two kernel NAT rows is what the veth's XDP mode costs, not
        // what NAT costs.
        let in_xdp_mode =
            nat.and_then(|nat| bed.lb_interface_in_xdp_mode().map(|mode| (nat, mode)));
        measure_both(
            "kernel NAT, lb-00's veth in XDP mode",
            via_lb(bed, &in_xdp_mode, |_| Vec::new()),
        );
    }
    Ok(rows)
}

/// The L4 counters xlb's XDP program moved over its rows, from its `/stats`: where a row is
/// slow, the verdicts and table events say why (SNAT tuples reused, drops).
fn xdp_counters(bed: &Bed) -> String {
    let stats = xlb_testbed::in_netns(&bed.client.netns, || {
        crate::control::http_get(bed.admin_addr(), "/stats")
    })
    .and_then(|body| body)
    .and_then(|body| Ok(serde_json::from_str::<serde_json::Value>(&body)?));
    let stats = match stats {
        Ok(stats) => stats,
        Err(error) => return format!("xlb XDP counters: /stats failed: {error:#}"),
    };
    let counters: Vec<String> = stats["xdp"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, _)| name.starts_with("l4_"))
        .filter_map(|(name, total)| {
            let packets = total["packets"].as_u64()?;
            (packets > 0).then(|| format!("{name}={packets}"))
        })
        .collect();
    format!("xlb XDP counters over its rows: {}", counters.join(" "))
}
