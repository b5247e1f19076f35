//! The control plane: how long after Swarm reports a new task running the proxy routes to it,
//! through `xlb run` (discovery in the proxy's process) and through `xlb controller` on the
//! Swarm node feeding `xlb proxy` on lb-00 (the cluster's path: one more hop, a long poll).
//! Each event scales the service from one task to two; the new task's `Status.Timestamp` (when
//! Swarm saw it enter `running`) is compared with the moment the proxy's `/routes` first lists
//! its endpoint, polled every [`POLL`]. The service is scaled back to one between events, then
//! left alone for a random part of the poll interval: events that always followed the
//! previous one's detection would fall at the same phase of a resync and all measure alike.
//!
//! Swarm's own share is measured beside it: when the manager's API first lists the task
//! running ([`ApiWatch`]). The worker stamps `Status.Timestamp` as the task starts, but
//! swarmkit's dispatcher commits the workers' status reports to the managers' store in
//! batches, at most every 100 ms; until then no client of the API can see the task. What
//! follows is xlb's share: its read of the API, the route table, the proxies' long poll.
//!
//! The route-table build and BPF map update for a large synthetic snapshot are criterion
//! benches (`userspace/benches/control.rs`), reported by [`crate::micro`].

use std::{
    collections::{BTreeSet, HashMap},
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::Value;
use xlb_testbed::in_netns;

use crate::{
    bed::{Bed, HOST, SERVICE, TARGET_PORT},
    progress::Progress,
    proxies::{self, AccessLog, ProxyInputs},
    Options, Plan,
};

/// How often `/routes` is read while a new task is awaited: the resolution of the latencies.
const POLL: Duration = Duration::from_millis(5);
/// The bench config's `PollInterval` (see [`crate::proxies::xlb_config`]).
const XLB_POLL_INTERVAL: Duration = Duration::from_secs(3);
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize)]
pub struct Control {
    /// How the routes reached the proxy.
    pub path: String,
    /// The config's `PollInterval` (a resync: changes are read on the engine's events).
    pub poll_interval: String,
    /// Task running (its `Status.Timestamp`) → routable: what a user waits.
    pub routable: Latencies,
    /// Task running → the manager's API first lists it running: Swarm's own share, which no
    /// client of the API can beat. A worker stamps the time when its task starts, but the
    /// status reaches the managers' store in batches (swarmkit's dispatcher commits them at
    /// most every 100 ms).
    pub listed: Latencies,
    /// The manager's API lists the task running → routable: xlb's share.
    pub routable_after_listed: Latencies,
    /// Scaling back: the manager's API no longer lists a task running → xlb no longer routes
    /// it (xlb's share; until then the proxy's failover covers requests to it).
    pub unrouted_after_unlisted: Latencies,
    pub error: Option<String>,
}

/// One latency per scale event, in milliseconds, and their percentiles.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latencies {
    pub samples_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latencies {
    fn of(samples_ms: Vec<f64>) -> Latencies {
        let mut sorted = samples_ms.clone();
        sorted.sort_by(f64::total_cmp);
        Latencies {
            p50_ms: percentile(&sorted, 50.0),
            p99_ms: percentile(&sorted, 99.0),
            max_ms: sorted.last().copied().unwrap_or(0.0),
            samples_ms,
        }
    }
}

/// What one scale event measured, in milliseconds.
struct ScaleEvent {
    routable: f64,
    listed: f64,
    /// The task scaled away: the manager's API no longer lists it running → not routed.
    unrouted_after_unlisted: f64,
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
    let mut events = Vec::new();
    let outcome = started.and_then(|_running| {
        let api = ApiWatch::start(bed.swarm.manager_socket());
        for event in 0..plan.scale_events {
            progress.step(&format!(
                "control ({path}): scale event {} of {}",
                event + 1,
                plan.scale_events
            ));
            let measured = one_scale_event(bed, &api)?;
            progress.done(&format!(
                "control ({path}): task running → routable in {:.0} ms (listed by the \
                 manager's API after {:.0} ms)",
                measured.routable, measured.listed
            ));
            events.push(measured);
        }
        Ok(())
    });
    let series = |of: fn(&ScaleEvent) -> f64| Latencies::of(events.iter().map(of).collect());
    Control {
        path: path.to_owned(),
        poll_interval: format!("{XLB_POLL_INTERVAL:?}"),
        routable: series(|event| event.routable),
        listed: series(|event| event.listed),
        routable_after_listed: series(|event| event.routable - event.listed),
        unrouted_after_unlisted: series(|event| event.unrouted_after_unlisted),
        error: outcome.err().map(|error| format!("{error:#}")),
    }
}

/// Scales 1 → 2, measures the new task, scales back and waits for the routes to follow.
fn one_scale_event(bed: &Bed, api: &ApiWatch) -> Result<ScaleEvent> {
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
    let since_running = |at: SystemTime| {
        let latency = at.duration_since(task.running_since).unwrap_or_default();
        latency.as_secs_f64() * 1e3
    };
    let listed_at = api
        .first_listed(&task.id)
        .with_context(|| format!("the manager's API never listed task {} running", task.id))?;
    let measured = ScaleEvent {
        routable: since_running(routable_at),
        listed: since_running(listed_at),
        unrouted_after_unlisted: 0.0,
    };

    let running = bed.swarm.running_tasks(SERVICE, TARGET_PORT)?;
    bed.swarm.service_scale(SERVICE, 1)?;
    let started = Instant::now();
    let (kept, unrouted_at) = loop {
        let routed = routed_endpoints(bed)?;
        if let [kept] = routed[..] {
            break (kept, SystemTime::now());
        }
        if started.elapsed() > EVENT_TIMEOUT {
            bail!(
                "still {} endpoints routed {EVENT_TIMEOUT:?} after scaling to 1",
                routed.len()
            );
        }
        std::thread::sleep(POLL);
    };
    let removed = running
        .iter()
        .find(|task| task.endpoint != kept)
        .context("Swarm ran one task only before scaling to 1")?;
    let unlisted_at = api
        .first_unlisted(&removed.id)
        .with_context(|| format!("the manager's API still lists task {} running", removed.id))?;
    let unrouted_after_unlisted = unrouted_at
        .duration_since(unlisted_at)
        .unwrap_or_default()
        .as_secs_f64()
        * 1e3;
    Ok(ScaleEvent {
        unrouted_after_unlisted,
        ..measured
    })
}

/// How often [`ApiWatch`] asks the manager for the service's tasks.
const API_POLL: Duration = Duration::from_millis(5);
/// How long a measurement waits for [`ApiWatch`] to record a change xlb has already acted on.
const API_RECORD_WAIT: Duration = Duration::from_secs(2);

/// When the manager's API first listed each task of the bench service running, and first
/// left it out again, read by a thread of its own every [`API_POLL`] (`GET /tasks` over the
/// engine's socket, as any client of the API reads it) while the bench runs.
struct ApiWatch {
    listing: Arc<Mutex<Listing>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Listing {
    running: BTreeSet<String>,
    first_listed: HashMap<String, SystemTime>,
    first_unlisted: HashMap<String, SystemTime>,
}

impl Listing {
    fn update(&mut self, running: BTreeSet<String>, now: SystemTime) {
        for gone in self.running.difference(&running) {
            self.first_unlisted.entry(gone.clone()).or_insert(now);
        }
        for id in &running {
            self.first_listed.entry(id.clone()).or_insert(now);
        }
        self.running = running;
    }
}

impl ApiWatch {
    fn start(socket: &Path) -> ApiWatch {
        let listing = Arc::new(Mutex::new(Listing::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listing, stop, socket) = (listing.clone(), stop.clone(), socket.to_owned());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A failed read is one sample less; the event that needs it says so.
                    if let Ok(running) = running_task_ids(&socket) {
                        listing.lock().unwrap().update(running, SystemTime::now());
                    }
                    std::thread::sleep(API_POLL);
                }
            })
        };
        ApiWatch {
            listing,
            stop,
            thread: Some(thread),
        }
    }

    fn first_listed(&self, task_id: &str) -> Option<SystemTime> {
        self.recorded(|listing| listing.first_listed.get(task_id).copied())
    }

    fn first_unlisted(&self, task_id: &str) -> Option<SystemTime> {
        self.recorded(|listing| listing.first_unlisted.get(task_id).copied())
    }

    /// What `read` finds in the listing, waiting a moment for the watcher's next reads: xlb
    /// may act on a change (its own read of the API) before the watcher's read sees it, and
    /// that change then measures zero.
    fn recorded(&self, read: impl Fn(&Listing) -> Option<SystemTime>) -> Option<SystemTime> {
        let deadline = Instant::now() + API_RECORD_WAIT;
        loop {
            if let Some(at) = read(&self.listing.lock().unwrap()) {
                return Some(at);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(API_POLL);
        }
    }
}

impl Drop for ApiWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The IDs of the bench service's tasks the engine at `socket` lists as running.
fn running_task_ids(socket: &Path) -> Result<BTreeSet<String>> {
    // `{"service":["SERVICE"],"desired-state":["running"]}`, percent-encoded.
    let filters = format!(
        "%7B%22service%22%3A%5B%22{SERVICE}%22%5D%2C%22desired-state%22%3A%5B%22running%22%5D%7D"
    );
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET /tasks?filters={filters} HTTP/1.0\r\nHost: docker\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (_, body) = response
        .split_once("\r\n\r\n")
        .context("a response without a head")?;
    let tasks: Vec<Value> = serde_json::from_str(body).context("GET /tasks is not JSON")?;
    Ok(tasks
        .iter()
        .filter(|task| task["Status"]["State"] == "running")
        .filter_map(|task| Some(task["ID"].as_str()?.to_owned()))
        .collect())
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
