//! The load generators: wrk for the closed loop (as many requests as the target answers, a
//! fixed number of connections) and oha for the open loop (a fixed rate, latency measured from
//! when each request was due, so a stalled target cannot hide its stall: coordinated-omission
//! correction). Both run inside a namespace of the bed, pinned to [`LOAD_CPU`].

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use xlb_testbed::Netns;

use crate::bed::{HOST, PATH};

/// The CPU the load generators are pinned to; the proxies get the other one.
pub const LOAD_CPU: &str = "0";
/// Connections of the closed loop, as in the issue's measurements.
pub const CONNECTIONS: u32 = 64;

/// Whether each request opens its own TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Connections {
    KeepAlive,
    NewPerRequest,
}

impl Connections {
    pub fn label(self) -> &'static str {
        match self {
            Connections::KeepAlive => "keep-alive",
            Connections::NewPerRequest => "new connection per request",
        }
    }
}

/// Where a load generator sends its requests from and to.
pub struct Target<'a> {
    pub from: &'a Netns,
    pub to: SocketAddr,
    pub connections: Connections,
}

impl Target<'_> {
    fn url(&self) -> String {
        format!("http://{}{PATH}", self.to)
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// (percentile, milliseconds) points for the plots; `max` is drawn at 100.
    pub fn points(&self) -> [(f64, f64); 5] {
        [
            (50.0, self.p50_ms),
            (90.0, self.p90_ms),
            (99.0, self.p99_ms),
            (99.9, self.p999_ms),
            (100.0, self.max_ms),
        ]
    }
}

/// What one load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// Requests answered with a 2xx.
    pub requests: u64,
    /// Connect, read, write and timeout errors, and non-2xx answers.
    pub errors: u64,
    pub seconds: f64,
    pub rps: f64,
    pub latency: Latency,
}

/// The wrk script's `done` hook prints one JSON line with everything the report needs
/// (wrk's own `--latency` output has no p99.9 and rounds).
const WRK_REPORT_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "XLB-BENCH {\"requests\":%d,\"duration_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d," ..
    "\"status\":%d,\"timeout\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d,\"max\":%d}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"#;

/// Closed loop: wrk, one thread, [`CONNECTIONS`] connections, for `duration`.
pub fn closed_loop(target: &Target, duration: Duration, scratch: &Path) -> Result<LoadResult> {
    let script = scratch.join("wrk-report.lua");
    std::fs::write(&script, WRK_REPORT_SCRIPT)
        .with_context(|| format!("writing {}", script.display()))?;
    let mut wrk = target.from.command("taskset");
    wrk.args(["-c", LOAD_CPU, "wrk", "-t1"])
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .args(["--timeout", "5s", "-H", &format!("Host: {HOST}")]);
    if target.connections == Connections::NewPerRequest {
        wrk.args(["-H", "Connection: close"]);
    }
    wrk.arg("-s").arg(&script).arg(target.url());
    let output = xlb_testbed::run(&mut wrk)?;
    parse_wrk(&output).with_context(|| format!("wrk printed:\n{output}"))
}

fn parse_wrk(output: &str) -> Result<LoadResult> {
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix("XLB-BENCH "))
        .context("no report line from the wrk script")?;
    let report: Value = serde_json::from_str(line).context("the wrk report line")?;
    let count = |key: &str| report[key].as_u64().unwrap_or(0);
    let ms = |key: &str| report[key].as_f64().unwrap_or(0.0) / 1_000.0;
    let seconds = count("duration_us") as f64 / 1e6;
    let errors = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|key| count(key))
        .sum::<u64>();
    let requests = count("requests").saturating_sub(count("status"));
    Ok(LoadResult {
        requests,
        errors,
        seconds,
        rps: requests as f64 / seconds.max(1e-9),
        latency: Latency {
            p50_ms: ms("p50"),
            p90_ms: ms("p90"),
            p99_ms: ms("p99"),
            p999_ms: ms("p999"),
            max_ms: ms("max"),
        },
    })
}

/// Open loop: oha at `rate` requests per second for `duration`, latency corrected for
/// coordinated omission.
pub fn open_loop(oha: &Path, target: &Target, rate: u32, duration: Duration) -> Result<LoadResult> {
    let mut command = target.from.command("taskset");
    command
        .args(["-c", LOAD_CPU])
        .arg(oha)
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
        ])
        .args(["-q", &rate.to_string()])
        .args(["-z", &format!("{}s", duration.as_secs().max(1))])
        .args(["-c", &CONNECTIONS.to_string(), "--worker-threads", "1"])
        .args(["-t", "5s", "-H", &format!("Host: {HOST}")]);
    if target.connections == Connections::NewPerRequest {
        command.arg("--disable-keepalive");
    }
    command.arg(target.url());
    let output = xlb_testbed::run(&mut command)?;
    parse_oha(&output).with_context(|| format!("oha printed:\n{output}"))
}

fn parse_oha(output: &str) -> Result<LoadResult> {
    let report: Value = serde_json::from_str(output).context("oha's JSON report")?;
    let mut requests = 0;
    let mut errors = 0;
    for (status, count) in report["statusCodeDistribution"]
        .as_object()
        .into_iter()
        .flatten()
    {
        let count = count.as_u64().unwrap_or(0);
        if status.starts_with('2') {
            requests += count;
        } else {
            errors += count;
        }
    }
    for (error, count) in report["errorDistribution"]
        .as_object()
        .into_iter()
        .flatten()
    {
        // Requests still in flight when the duration ends are cut off by oha, not failed.
        if !error.contains("aborted due to deadline") {
            errors += count.as_u64().unwrap_or(0);
        }
    }
    let seconds = report["summary"]["total"].as_f64().unwrap_or(0.0);
    if seconds <= 0.0 {
        bail!("oha reports no duration");
    }
    let percentiles = &report["latencyPercentiles"];
    let ms = |value: &Value| value.as_f64().unwrap_or(0.0) * 1_000.0;
    Ok(LoadResult {
        requests,
        errors,
        seconds,
        rps: requests as f64 / seconds,
        latency: Latency {
            p50_ms: ms(&percentiles["p50"]),
            p90_ms: ms(&percentiles["p90"]),
            p99_ms: ms(&percentiles["p99"]),
            p999_ms: ms(&percentiles["p99.9"]),
            max_ms: ms(&report["summary"]["slowest"]),
        },
    })
}
