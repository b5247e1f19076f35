//! One row of a table: a warm-up, then the closed loop with its cost metered, the open loop at
//! each rate, and (for L7 proxies) the memory an idle client connection takes. The same steps
//! for every program, so the rows compare.

use std::{net::SocketAddr, path::Path};

use anyhow::Result;
use serde::Serialize;

use crate::{
    cost::{rss_kib, Cost, Meter, Profile},
    idle::IdleConnections,
    load::{closed_loop, open_loop, Connections, LoadResult, Target},
    Plan,
};

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// What distinguishes rows of the same program: the access log, or connection reuse.
    pub variant: String,
    pub connections: Connections,
    pub closed: Option<LoadResult>,
    pub open: Vec<OpenLoop>,
    pub cost: Option<Cost>,
    pub memory: Option<Memory>,
    /// Machine µs per request over the direct row of the same round, one per round (L4's
    /// `--rounds`; empty where the table does not pair rounds).
    pub over_direct_us_rounds: Vec<f64>,
    /// Why the row has no numbers (the program did not start, the load failed).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpenLoop {
    pub rate: u32,
    pub result: LoadResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// RSS after the warm-up, before the measured load.
    pub idle_kib: u64,
    /// RSS after the load, just before the idle connections are opened.
    pub before_idle_connections_kib: u64,
    /// Connections actually held (a proxy may refuse some; then this says how many).
    pub idle_connections: usize,
    pub with_idle_connections_kib: u64,
    pub per_idle_connection_bytes: f64,
    /// Why fewer connections than asked for were held.
    pub refused: Option<String>,
}

/// What to measure in a row.
pub struct RowSpec<'a> {
    pub name: &'a str,
    pub variant: &'a str,
    pub target: Target<'a>,
    /// The processes under test (empty: no process, e.g. direct or XDP).
    pub pids: Vec<u32>,
    /// Open-loop rates to run (none for a row that only runs the closed loop).
    pub rates: &'a [u32],
    /// Where to open idle client connections, if this row measures them.
    pub idle_connections_to: Option<SocketAddr>,
}

impl Row {
    pub fn failed(
        name: &str,
        variant: &str,
        connections: Connections,
        error: &anyhow::Error,
    ) -> Row {
        Row {
            name: name.to_owned(),
            variant: variant.to_owned(),
            connections,
            closed: None,
            open: Vec::new(),
            cost: None,
            memory: None,
            over_direct_us_rounds: Vec::new(),
            error: Some(format!("{error:#}")),
        }
    }

    /// One line for the progress output.
    pub fn summary(&self) -> String {
        let head = format!("{}, {}", self.name, self.variant);
        match (&self.error, &self.closed) {
            (Some(error), _) => format!("{head}: FAILED: {error}"),
            (None, Some(closed)) => {
                let cpu = self
                    .cost
                    .as_ref()
                    .and_then(|cost| cost.process_cpu_us_per_request)
                    .map(|us| format!(", {us:.1} µs CPU/request"))
                    .unwrap_or_default();
                format!(
                    "{head}: {:.0} rps, p99 {:.2} ms{cpu}",
                    closed.rps, closed.latency.p99_ms
                )
            }
            (None, None) => head,
        }
    }
}

pub fn measure(spec: RowSpec, plan: &Plan, oha: &Path, scratch: &Path) -> Row {
    let connections = spec.target.connections;
    match try_measure(&spec, plan, oha, scratch) {
        Ok(row) => row,
        Err(error) => Row::failed(spec.name, spec.variant, connections, &error),
    }
}

fn try_measure(spec: &RowSpec, plan: &Plan, oha: &Path, scratch: &Path) -> Result<Row> {
    closed_loop(&spec.target, plan.warmup, scratch)?;
    let idle_kib = rss_kib(&spec.pids);

    let profile = match &plan.profile_dir {
        Some(dir) if !spec.pids.is_empty() => Some(Profile::start(
            &spec.pids,
            dir,
            &format!("{}-{}", spec.name, spec.variant),
        )?),
        _ => None,
    };
    let meter = Meter::start(&spec.pids, scratch)?;
    let closed = closed_loop(&spec.target, plan.duration, scratch)?;
    let cost = meter.finish(closed.requests)?;
    if let Some(profile) = profile {
        profile.finish()?;
    }
    anyhow::ensure!(
        closed.requests > 0,
        "no request was answered with a 2xx ({} errors)",
        closed.errors
    );

    let open = spec
        .rates
        .iter()
        .map(|&rate| {
            Ok(OpenLoop {
                rate,
                result: open_loop(oha, &spec.target, rate, plan.duration)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let memory = match spec.idle_connections_to {
        Some(to) => Some(idle_memory(spec, to, plan.idle_connections)?),
        None => None,
    };
    Ok(Row {
        name: spec.name.to_owned(),
        variant: spec.variant.to_owned(),
        connections: spec.target.connections,
        closed: Some(closed),
        open,
        cost: Some(cost),
        memory: memory.map(|idle| Memory {
            idle_kib,
            before_idle_connections_kib: idle.before_kib,
            idle_connections: idle.held,
            with_idle_connections_kib: idle.with_kib,
            per_idle_connection_bytes: (idle.with_kib.saturating_sub(idle.before_kib) * 1024)
                as f64
                / idle.held.max(1) as f64,
            refused: idle.refused,
        }),
        over_direct_us_rounds: Vec::new(),
        error: None,
    })
}

struct IdleMemory {
    before_kib: u64,
    with_kib: u64,
    held: usize,
    refused: Option<String>,
}

/// RSS before and with `count` idle client connections open.
fn idle_memory(spec: &RowSpec, to: SocketAddr, count: usize) -> Result<IdleMemory> {
    let before_kib = rss_kib(&spec.pids);
    let connections = IdleConnections::open(spec.target.from, to, count)?;
    // Let the proxy settle (buffers released after the one request) before reading.
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(IdleMemory {
        before_kib,
        with_kib: rss_kib(&spec.pids),
        held: connections.len(),
        refused: connections.refused.clone(),
    })
}
