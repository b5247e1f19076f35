//! `--callgrind`: userspace instructions per request of each L7 program, counted by callgrind.
//! Unlike CPU time, the count hardly moves with the machine's noise, so it is the figure to
//! compare between two commits. Each program runs again, under `valgrind --tool=callgrind`,
//! and answers a fixed number of keep-alive GETs from h2load. Its counters are zeroed once it
//! answers and dumped right after the load, so what is divided by the requests is the load
//! alone: not the startup nor the exit, which for HAProxy (its pools sized for every
//! connection it may hold) are worth thousands of requests. Every process and thread of the
//! program counts.

use std::{ffi::OsString, path::Path};

use anyhow::{ensure, Context as _, Result};
use serde::Serialize;

use crate::bed::{Bed, HOST, PATH};

/// Keep-alive GETs per program: enough that startup is a few percent of the count (a
/// `--quick` run sends fewer).
pub const REQUESTS: u64 = 20_000;
/// h2load's connections, all kept alive.
const CLIENTS: u64 = 16;

/// One program's count.
#[derive(Debug, Clone, Serialize)]
pub struct Instructions {
    pub name: String,
    pub variant: String,
    pub requests: u64,
    pub per_request: Option<f64>,
    /// Why there is no count.
    pub error: Option<String>,
}

/// What a program under test is started with, so that callgrind writes one file per process
/// into `dir`.
pub fn wrapper(dir: &Path) -> [OsString; 3] {
    let mut out_file = OsString::from("--callgrind-out-file=");
    out_file.push(dir.join("callgrind.out.%p"));
    ["valgrind".into(), "--tool=callgrind".into(), out_file]
}

/// Zeroes the counters of the programs under callgrind with these PIDs (through valgrind's
/// gdbserver, which `callgrind_control` talks to).
pub fn zero(pids: &[u32]) -> Result<()> {
    control(pids, "--zero")
}

/// Has the programs with these PIDs write their counts so far, as dumps that [`per_request`]
/// reads.
pub fn dump(pids: &[u32]) -> Result<()> {
    control(pids, &format!("--dump={DUMP}"))
}

/// What the dumps of the load are called: callgrind writes `desc: Trigger: dump <name>`.
const DUMP: &str = "load";

fn control(pids: &[u32], command: &str) -> Result<()> {
    for pid in pids {
        xlb_testbed::run_program("callgrind_control", &[command, &pid.to_string()])
            .with_context(|| format!("callgrind_control {command} {pid}"))?;
    }
    Ok(())
}

/// Sends `requests` keep-alive GETs through `to` from the client namespace; fails unless
/// every one was answered 2xx.
pub fn load(bed: &Bed, to: std::net::SocketAddr, requests: u64) -> Result<()> {
    let url = format!("http://{to}{PATH}");
    let output = bed.client.netns.run(
        "h2load",
        &[
            "--h1",
            "-c",
            &CLIENTS.to_string(),
            "-n",
            &requests.to_string(),
            "-H",
            &format!(":authority: {HOST}"),
            &url,
        ],
    )?;
    ensure!(
        output.contains(&format!("status codes: {requests} 2xx")),
        "not every GET through {to} was answered 2xx:\n{output}"
    );
    Ok(())
}

/// The instructions in the dumps of the load in `dir`, per request.
pub fn per_request(dir: &Path, requests: u64) -> Result<f64> {
    let trigger = format!("desc: Trigger: dump {DUMP}");
    let mut total: u64 = 0;
    let mut dumps = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if !text.lines().any(|line| line == trigger) {
            continue;
        }
        let summary = text
            .lines()
            .find_map(|line| line.strip_prefix("summary: "))
            .with_context(|| format!("{} has no summary line", path.display()))?;
        total += summary
            .trim()
            .parse::<u64>()
            .with_context(|| format!("{}: summary {summary:?}", path.display()))?;
        dumps += 1;
    }
    ensure!(dumps > 0, "no dump of the load in {}", dir.display());
    Ok(total as f64 / requests as f64)
}
