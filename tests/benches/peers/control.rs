//! The control plane: how long after Swarm reports a new task running the proxy routes to it,
//! through `xlb run` (discovery in the proxy's process) and through `xlb controller` on the
//! Swarm node feeding `xlb proxy` on lb-00 (the cluster's path: one more hop, a long poll).
//! Each event scales the service from one task to two; the new task's `Status.Timestamp` (when
//! Swarm saw it enter `running`) is compared with the moment the proxy's `/routes` first lists
//! its endpoint, polled every [`POLL`]. The service is scaled back to one between events, then
//! left alone for a random part of the poll interval: events that always followed the
//! previous one's detection would fall at the same phase of a resync and all measure alike.
//!
//! The route-table build and BPF map update for a large synthetic snapshot are criterion
//! benches (`userspace/benches/control.rs`), reported by [`crate::micro`].

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use xlb_testbed::{in_netns, wait_until};

use crate::{
    bed::{Bed, HOST, SERVICE, TARGET_PORT},
    progress::Progress,
    proxies::{self, AccessLog, ProxyInputs},
    Options, Plan,
};

const POLL: Duration = Duration::from_millis(20);
/// The bench config's `PollInterval` (see [`crate::proxies::xlb_config`]).
const XLB_POLL_INTERVAL: Duration = Duration::from_secs(3);
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize)]
pub struct Control {
    /// How the routes reached the proxy.
    pub path: String,
    /// The config's `PollInterval` (a resync: changes are read on the engine's events).
    pub poll_interval: String,
    /// Task running → routable, one per scale event, in milliseconds.
    pub routable_after_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub error: Option<String>,
}

pub fn measure(
    bed: &Bed,
    options: &Options,
    plan: &Plan,
    progress: &Progress,
) -> Result<Vec<Control>> {
    let inputs = |dir: &str| ProxyInputs {
        listen: bed.l7_addr(),
        backend: bed.backend,
        dir: bed.scratch.path().join(dir),
        access_log: AccessLog::Off,
        callgrind: None,
    };
    let run = {
        let xlb = proxies::start_xlb(bed, &options.xlb, &inputs("control"), bed.l7_addr());
        series(bed, "xlb run", xlb, plan, progress)
    };
    let split = {
        let xlb =
            proxies::start_xlb_split(bed, &options.xlb, &inputs("control-split"), bed.l7_addr());
        series(bed, "xlb controller → xlb proxy", xlb, plan, progress)
    };
    Ok(vec![run, split])
}

/// The scale events measured while `started` (the proxy, and its controller) runs.
fn series(
    bed: &Bed,
    path: &str,
    started: Result<proxies::Running>,
    plan: &Plan,
    progress: &Progress,
) -> Control {
    let mut samples = Vec::new();
    let outcome = started.and_then(|_running| {
        for event in 0..plan.scale_events {
            progress.step(&format!(
                "control ({path}): scale event {} of {}",
                event + 1,
                plan.scale_events
            ));
            let ms = one_scale_event(bed)?;
            progress.done(&format!(
                "control ({path}): task running → routable in {ms:.0} ms"
            ));
            samples.push(ms);
        }
        Ok(())
    });
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    Control {
        path: path.to_owned(),
        poll_interval: format!("{XLB_POLL_INTERVAL:?}"),
        p50_ms: percentile(&sorted, 50.0),
        p99_ms: percentile(&sorted, 99.0),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        routable_after_ms: samples,
        error: outcome.err().map(|error| format!("{error:#}")),
    }
}

/// Scales 1 → 2, measures the new task, scales back and waits for the routes to follow.
fn one_scale_event(bed: &Bed) -> Result<f64> {
    std::thread::sleep(XLB_POLL_INTERVAL.mul_f64(fastrand::f64()));
    let before: BTreeSet<SocketAddr> = routed_endpoints(bed)?.into_iter().collect();
    bed.swarm.service_scale(SERVICE, 2)?;
    let started = Instant::now();
    let (new_endpoint, routable_at) = loop {
        let routed = routed_endpoints(bed)?;
        if let Some(&new) = routed.iter().find(|endpoint| !before.contains(endpoint)) {
            break (new, SystemTime::now());
        }
        if started.elapsed() > EVENT_TIMEOUT {
            bail!("no new endpoint routed {EVENT_TIMEOUT:?} after scaling to 2");
        }
        std::thread::sleep(POLL);
    };
    let task = bed
        .swarm
        .running_tasks(SERVICE, TARGET_PORT)?
        .into_iter()
        .find(|task| task.endpoint == new_endpoint)
        .with_context(|| format!("xlb routes {new_endpoint}, which Swarm does not run"))?;
    let latency = routable_at
        .duration_since(task.running_since)
        .unwrap_or(Duration::ZERO);

    bed.swarm.service_scale(SERVICE, 1)?;
    wait_until("xlb to route one endpoint again", EVENT_TIMEOUT, || {
        Ok((routed_endpoints(bed)?.len() == 1).then_some(()))
    })?;
    Ok(latency.as_secs_f64() * 1e3)
}

/// The endpoints xlb's `/routes` lists for the bench host.
fn routed_endpoints(bed: &Bed) -> Result<Vec<SocketAddr>> {
    let body = in_netns(&bed.client.netns, || http_get(bed.admin_addr(), "/routes"))??;
    let routes: Value = serde_json::from_str(&body).context("/routes is not JSON")?;
    Ok(routes["routes"][HOST]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|route| route["context_root"] == "/")
        .flat_map(|route| route["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|endpoint| endpoint.as_str()?.parse().ok())
        .collect())
}

/// A one-shot HTTP/1.0 GET; the body of a 200 answer.
pub fn http_get(to: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("a response without a head")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path} answered {:?}", head.lines().next());
    }
    Ok(body.to_owned())
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], percent: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (percent / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
