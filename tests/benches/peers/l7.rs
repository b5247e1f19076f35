//! The L7 table: keep-alive GETs with `Host: bench.local`, from the client namespace, to the
//! backend directly and through nginx, HAProxy and xlb, each with its access log off and
//! written to a file.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{
    bed::Bed,
    callgrind::{self, Instructions},
    load::{Connections, Target},
    progress::Progress,
    proxies::{self, AccessLog, ProxyInputs, Running},
    row::{self, Row, RowSpec},
    Options, Plan,
};

/// The programs of the L7 table, in the order they are measured and shown.
#[derive(Debug, Clone, Copy)]
enum Proxy {
    Nginx,
    Haproxy,
    Xlb,
}

impl Proxy {
    const ALL: [Proxy; 3] = [Proxy::Nginx, Proxy::Haproxy, Proxy::Xlb];

    fn name(self) -> &'static str {
        match self {
            Proxy::Nginx => "nginx",
            Proxy::Haproxy => "HAProxy",
            Proxy::Xlb => "xlb",
        }
    }

    fn start(self, bed: &Bed, options: &Options, inputs: &ProxyInputs) -> Result<Running> {
        let running = match self {
            Proxy::Nginx => proxies::start_nginx(bed, inputs),
            Proxy::Haproxy => proxies::start_haproxy_http(bed, inputs),
            Proxy::Xlb => proxies::start_xlb(bed, &options.xlb, inputs, bed.l7_addr()),
        }?;
        proxies::check_interlock_headers(bed, bed.l7_addr(), self.name())?;
        Ok(running)
    }
}

pub fn measure(bed: &Bed, options: &Options, plan: &Plan, progress: &Progress) -> Result<Vec<Row>> {
    let scratch = bed.scratch.path().join("l7");
    std::fs::create_dir_all(&scratch)?;
    let mut rows = Vec::new();

    progress.step("L7: direct (client → backend)");
    let direct = row::measure(
        RowSpec {
            name: "direct",
            variant: "no proxy",
            target: Target {
                from: &bed.client.netns,
                to: bed.backend,
                connections: Connections::KeepAlive,
            },
            pids: Vec::new(),
            rates: &plan.rates,
            idle_connections_to: None,
        },
        plan,
        &options.oha,
        &scratch,
    );
    progress.done(&direct.summary());
    rows.push(direct);

    for proxy in Proxy::ALL
        .into_iter()
        .filter(|proxy| options.wants_program(proxy.name()))
    {
        for access_log in [AccessLog::Off, AccessLog::File] {
            progress.step(&format!("L7: {}, {}", proxy.name(), access_log.label()));
            let inputs = inputs(bed, &scratch, proxy, access_log, None);
            let row = match proxy.start(bed, options, &inputs) {
                Ok(running) => row::measure(
                    RowSpec {
                        name: proxy.name(),
                        variant: access_log.label(),
                        target: Target {
                            from: &bed.client.netns,
                            to: bed.l7_addr(),
                            connections: Connections::KeepAlive,
                        },
                        pids: running.pids(),
                        rates: &plan.rates,
                        // Memory per connection does not depend on the access log.
                        idle_connections_to: (access_log == AccessLog::Off).then(|| bed.l7_addr()),
                    },
                    plan,
                    &options.oha,
                    &scratch,
                ),
                Err(error) => Row::failed(
                    proxy.name(),
                    access_log.label(),
                    Connections::KeepAlive,
                    &error,
                ),
            };
            progress.done(&row.summary());
            rows.push(row);
        }
    }
    Ok(rows)
}

/// `--callgrind`: each program of the table again, under callgrind, for a fixed number of
/// keep-alive GETs (see [`callgrind`]).
pub fn count_instructions(
    bed: &Bed,
    options: &Options,
    plan: &Plan,
    root: &Path,
    progress: &Progress,
) -> Result<Vec<Instructions>> {
    let requests = plan.callgrind_requests;
    let scratch = bed.scratch.path().join("l7-callgrind");
    let mut counts = Vec::new();
    for proxy in Proxy::ALL
        .into_iter()
        .filter(|proxy| options.wants_program(proxy.name()))
    {
        for access_log in [AccessLog::Off, AccessLog::File] {
            let (name, variant) = (proxy.name(), access_log.label());
            progress.step(&format!("L7 under callgrind: {name}, {variant}"));
            let dir = root.join(program_dir(proxy, access_log));
            std::fs::create_dir_all(&dir)?;
            let inputs = inputs(bed, &scratch, proxy, access_log, Some(dir.clone()));
            let counted = proxy.start(bed, options, &inputs).and_then(|running| {
                callgrind::zero(&running.pids())?;
                callgrind::load(bed, bed.l7_addr(), requests)?;
                callgrind::dump(&running.pids())?;
                callgrind::per_request(&dir, requests)
            });
            progress.done(&match &counted {
                Ok(per_request) => {
                    format!("{name}, {variant}: {per_request:.0} instructions/request")
                }
                Err(error) => format!("{name}, {variant}: {error:#}"),
            });
            let count = Instructions {
                name: name.to_owned(),
                variant: variant.to_owned(),
                requests,
                per_request: counted.as_ref().ok().copied(),
                error: counted.err().map(|error| format!("{error:#}")),
            };
            counts.push(count);
        }
    }
    Ok(counts)
}

fn inputs(
    bed: &Bed,
    scratch: &Path,
    proxy: Proxy,
    access_log: AccessLog,
    callgrind: Option<PathBuf>,
) -> ProxyInputs {
    ProxyInputs {
        listen: bed.l7_addr(),
        backend: bed.backend,
        dir: scratch.join(program_dir(proxy, access_log)),
        access_log,
        callgrind,
    }
}

/// The directory of one program's row, under the scratch or the callgrind directory.
fn program_dir(proxy: Proxy, access_log: AccessLog) -> String {
    format!("{}-{access_log:?}", proxy.name()).to_lowercase()
}
