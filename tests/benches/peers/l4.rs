//! The L4 table: GETs to the L4 port of lb-00, both a new TCP connection per request and
//! keep-alive, through kernel NAT (iptables DNAT + MASQUERADE), HAProxy `mode tcp` and xlb's
//! XDP path (the service's `xlb.l4.ports` label), against `direct` (client → backend) and
//! `the wire` (the load generator inside lb-00 → backend: one crossing of lb-00's veth each
//! way, the transport any balancer on lb-00 adds to direct). The machine's busy time is the
//! cost figure here, since XDP and the kernel's forwarding run in softirq, outside any process.

use anyhow::Result;

use crate::{
    bed::Bed,
    load::{Connections, Target},
    progress::Progress,
    proxies::{self, AccessLog, KernelNat, ProxyInputs},
    row::{self, Row, RowSpec},
    Options, Plan,
};

/// A program of the L4 table while it runs: what to aim at and which processes to meter.
struct Setup<'a> {
    from: &'a xlb_testbed::Netns,
    to: std::net::SocketAddr,
    pids: Vec<u32>,
}

pub fn measure(bed: &Bed, options: &Options, plan: &Plan, progress: &Progress) -> Result<Vec<Row>> {
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
        let nat = KernelNat::start(bed);
        measure_both(
            "kernel NAT (iptables)",
            nat.as_ref()
                .map(|_| Setup {
                    from: &bed.client.netns,
                    to: bed.l4_addr(),
                    pids: Vec::new(),
                })
                .map_err(|error| anyhow::anyhow!("{error:#}")),
        );
    }
    {
        let inputs = ProxyInputs {
            listen: bed.l4_addr(),
            backend: bed.backend,
            dir: scratch.join("haproxy-tcp"),
            access_log: AccessLog::Off,
        };
        let haproxy = proxies::start_haproxy_tcp(bed, &inputs);
        measure_both(
            "HAProxy mode tcp",
            haproxy
                .as_ref()
                .map(|running| Setup {
                    from: &bed.client.netns,
                    to: bed.l4_addr(),
                    pids: running.pids(),
                })
                .map_err(|error| anyhow::anyhow!("{error:#}")),
        );
    }
    {
        let inputs = ProxyInputs {
            listen: bed.l7_addr(),
            backend: bed.backend,
            dir: scratch.join("xlb"),
            access_log: AccessLog::Off,
        };
        let xlb = proxies::start_xlb(bed, &options.xlb, &inputs, bed.l4_addr());
        // xlb's process only programs the maps; the packets are its XDP program's work,
        // charged to the machine, so no process is metered here.
        measure_both(
            "xlb XDP",
            xlb.as_ref()
                .map(|_| Setup {
                    from: &bed.client.netns,
                    to: bed.l4_addr(),
                    pids: Vec::new(),
                })
                .map_err(|error| anyhow::anyhow!("{error:#}")),
        );
    }
    Ok(rows)
}
