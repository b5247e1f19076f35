//! Discovery: reads Swarm ([`crate::swarm`]), builds the route tables from it (pure functions:
//! [`route_table`], [`l4_route_table`]) and publishes them as the next
//! [`crate::snapshot::Snapshot`] when they changed. The only part of xlb that talks to Docker;
//! when Docker cannot be reached the last snapshot stays published.
//!
//! When it reads: at once after each event of the engine's that can change the tables (a
//! service, node, secret or config changed, a container here started or died), then every
//! [`SETTLING_POLL`] while tasks are settling (Swarm raises no event when a task starts on
//! another node), and every `PollInterval` in any case, as a resync.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bollard::models::EventMessage;
use futures_util::{stream::BoxStream, FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    l4::service::{l4_route_table, L4RouteTable},
    routes::{route_table, Route, RouteSettings, RouteTable},
    snapshot::{publish_if_changed, SnapshotSender},
    standalone::snapshot_of_containers,
    swarm::{EngineMode, Swarm, SwarmSnapshot},
};

/// How often Swarm is read while tasks are settling after an event: a task that Swarm reports
/// running is routed within about this much (plus a read and the proxies' long poll).
pub const SETTLING_POLL: Duration = Duration::from_millis(50);
/// How long after an event reads keep coming every [`SETTLING_POLL`] even though no task is
/// settling yet (Swarm's orchestrator creates a service's tasks a moment after the event), and
/// the longest they keep coming for tasks that never settle (a task that keeps failing to
/// start, which the `PollInterval` resync still follows).
const SETTLING_AFTER_EVENT: Duration = Duration::from_secs(3);
const SETTLING_AT_MOST: Duration = Duration::from_secs(30);
/// The wait before the event stream is opened again after it failed.
const EVENTS_RETRY: Duration = Duration::from_secs(1);

type Events = BoxStream<'static, Result<EventMessage, bollard::errors::Error>>;

pub struct Discovery {
    pub docker_url: String,
    pub interval: Duration,
    pub route_settings: RouteSettings,
    /// The L7 proxy's ports, which L4 listeners may not claim.
    pub reserved_ports: Vec<u16>,
    /// What it counts of its reads, for `/metrics`.
    pub reads: Arc<DiscoveryReads>,
}

/// Reads of the engine, by outcome.
#[derive(Debug, Default)]
pub struct DiscoveryReads {
    succeeded: AtomicU64,
    /// Reads that failed, connecting included: the last route tables stayed.
    failed: AtomicU64,
}

impl DiscoveryReads {
    /// Reads that succeeded and failed.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.succeeded.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn count(&self, succeeded: bool) {
        let counter = if succeeded {
            &self.succeeded
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Discovery {
    /// Reads Swarm until `shutdown` (see the module's doc for when), publishing each change to
    /// `snapshots`.
    pub async fn run(self, snapshots: SnapshotSender, shutdown: CancellationToken) {
        let mut swarm: Option<Swarm> = None;
        let mut mode: Option<EngineMode> = None;
        let mut events: Option<Events> = None;
        let mut events_retry = Instant::now();
        let mut schedule = ReadSchedule::new(self.interval);
        loop {
            let mut wake = schedule.next_read();
            if events.is_none() && swarm.is_some() {
                // The event stream is reopened (with a read) once its retry delay is over.
                wake = wake.min(events_retry);
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {}
                event = next_event(&mut events) => match event {
                    Some(Ok(event)) => {
                        tracing::debug!(kind = ?event.typ, action = ?event.action, "Docker event: reading Swarm");
                        // A burst of events (a service update moves several tasks) is one read.
                        while let Some(Some(Ok(_))) = events.as_mut().and_then(|events| events.next().now_or_never()) {}
                        schedule.event(Instant::now());
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "the Docker event stream failed: reopened in a second, reading every PollInterval meanwhile");
                        events = None;
                        events_retry = Instant::now() + EVENTS_RETRY;
                        continue;
                    }
                    None => {
                        events = None;
                        events_retry = Instant::now() + EVENTS_RETRY;
                        continue;
                    }
                },
            }
            let connected = match swarm.take() {
                Some(connected) => connected,
                None => match Swarm::connect(&self.docker_url).await {
                    Ok(connected) => {
                        tracing::info!(url = %self.docker_url, "connected to the Docker API");
                        connected
                    }
                    Err(error) => {
                        let error = format!("{:#}", anyhow::Error::from(error));
                        tracing::warn!(error, "discovery");
                        self.reads.count(false);
                        schedule.failed(Instant::now());
                        continue;
                    }
                },
            };
            if events.is_none() && Instant::now() >= events_retry {
                // Opened before the read: what changes after it is an event, not lost. What
                // changed while no stream was open (at start, or after it failed) went by
                // unseen, so the read is taken for an event's: tasks it finds settling are
                // followed at once, not at the next resync.
                events = Some(connected.events());
                schedule.event(Instant::now());
            }
            match read_engine(&connected, &mut mode).await {
                Ok(swarm_snapshot) => {
                    self.reads.count(true);
                    self.publish(&swarm_snapshot, &snapshots);
                    schedule.read(Instant::now(), swarm_snapshot.settling());
                    swarm = Some(connected);
                }
                Err(error) => {
                    let error = format!("{:#}", anyhow::Error::from(error));
                    tracing::warn!(error, "discovery failed: keeping the last route tables");
                    self.reads.count(false);
                    schedule.failed(Instant::now());
                    events = None;
                }
            }
        }
    }

    /// Builds the tables of one Swarm snapshot and publishes them if they changed.
    ///
    /// (A plain engine's containers come as a snapshot of one-task services.)
    fn publish(&self, swarm: &SwarmSnapshot, snapshots: &SnapshotSender) {
        let l7 = route_table(swarm, &self.route_settings);
        let l4 = l4_route_table(swarm, &self.reserved_ports);
        let current = snapshots.borrow().clone();
        if l7 != current.l7 {
            log_changes(&current.l7, &l7);
        }
        if l4 != current.l4 {
            log_l4_changes(&current.l4, &l4);
        }
        publish_if_changed(snapshots, l7, l4);
    }
}

fn log_changes(old: &RouteTable, new: &RouteTable) {
    for (host, routes) in &new.routes {
        for route in routes {
            if !old.routes.get(host).is_some_and(|old| old.contains(route)) {
                log_route(host, route);
            }
        }
    }
    if let Some(route) = &new.default_backend {
        if old.default_backend.as_ref() != Some(route) {
            log_route("(default backend)", route);
        }
    }
    for (host, routes) in &old.routes {
        for route in routes {
            let kept = new
                .routes
                .get(host)
                .is_some_and(|new| new.iter().any(|new| new.context_root == route.context_root));
            if !kept {
                tracing::info!(host = %host, context_root = %route.context_root, "route removed");
            }
        }
    }
    if old.default_backend.is_some() && new.default_backend.is_none() {
        tracing::info!("default backend removed");
    }
    for rejected in new
        .rejected
        .iter()
        .filter(|rejected| !old.rejected.contains(rejected))
    {
        tracing::warn!(service = %rejected.service, reason = %rejected.reason, "service disabled");
    }
}

fn log_route(host: &str, route: &Route) {
    let endpoints: Vec<String> = route.endpoints.iter().map(ToString::to_string).collect();
    tracing::info!(
        host = %host,
        context_root = %route.context_root,
        service = %route.service,
        endpoints = %endpoints.join(","),
        "route"
    );
}

fn log_l4_changes(old: &L4RouteTable, new: &L4RouteTable) {
    for route in new
        .listeners
        .iter()
        .filter(|route| !old.listeners.contains(route))
    {
        let endpoints: Vec<String> = route.endpoints.iter().map(ToString::to_string).collect();
        tracing::info!(listener = %route.listener, service = %route.service, endpoints = %endpoints.join(","), "L4 route");
    }
    for rejected in new
        .rejected
        .iter()
        .filter(|rejected| !old.rejected.contains(rejected))
    {
        tracing::warn!(service = %rejected.service, reason = %rejected.reason, "L4 ports not steered");
    }
}

/// The next event, or never when there is no stream.
async fn next_event(
    events: &mut Option<Events>,
) -> Option<Result<EventMessage, bollard::errors::Error>> {
    match events {
        Some(events) => events.next().await,
        None => std::future::pending().await,
    }
}

/// When discovery reads Swarm next (see the module's doc): pure, so that the rule is testable
/// without an engine.
#[derive(Debug, Clone)]
struct ReadSchedule {
    interval: Duration,
    /// The next resync, `interval` after the last read (at once before the first).
    resync: Instant,
    /// The last event, while its settling reads go on.
    event: Option<Instant>,
    /// Whether the last read saw tasks settling.
    settling: bool,
}

impl ReadSchedule {
    fn new(interval: Duration) -> ReadSchedule {
        ReadSchedule {
            interval,
            resync: Instant::now(),
            event: None,
            settling: false,
        }
    }

    /// An event arrived at `now`: read at once, then keep reading while tasks settle.
    fn event(&mut self, now: Instant) {
        self.event = Some(now);
        self.resync = now;
    }

    /// A read finished at `now`, having seen tasks `settling` or not.
    fn read(&mut self, now: Instant, settling: bool) {
        self.resync = now + self.interval;
        self.settling = settling;
        if let Some(event) = self.event {
            let since = now.saturating_duration_since(event);
            let settled = !settling && since >= SETTLING_AFTER_EVENT;
            if settled || since >= SETTLING_AT_MOST {
                self.event = None;
            }
        }
    }

    /// A read failed at `now`: try again at the next resync.
    fn failed(&mut self, now: Instant) {
        self.resync = now + self.interval;
        self.event = None;
    }

    /// When to read next.
    fn next_read(&self) -> Instant {
        match self.event {
            Some(_) => self.resync.min(Instant::now() + SETTLING_POLL),
            None => self.resync,
        }
    }
}

/// Reads the engine: Swarm's services, tasks and nodes, or a plain engine's containers as
/// services of one task each; says so when what the engine is changes (`mode`, the last).
async fn read_engine(
    engine: &Swarm,
    mode: &mut Option<EngineMode>,
) -> Result<SwarmSnapshot, crate::swarm::SwarmError> {
    let now = engine.mode().await?;
    if *mode != Some(now) {
        match now {
            EngineMode::Swarm => {
                tracing::info!("the engine is in Swarm mode: routing its services")
            }
            EngineMode::Standalone => tracing::info!(
                address = %engine.engine_addr(),
                "the engine is not in Swarm mode: routing its containers (docker run -p), \
                 their published ports on this address"
            ),
        }
        *mode = Some(now);
    }
    match now {
        EngineMode::Swarm => engine.snapshot().await,
        EngineMode::Standalone => {
            let containers = engine.running_containers().await?;
            Ok(snapshot_of_containers(&containers, engine.engine_addr()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL_INTERVAL: Duration = Duration::from_secs(3);

    #[tokio::test(start_paused = true)]
    async fn without_events_swarm_is_read_every_poll_interval() {
        let mut schedule = ReadSchedule::new(POLL_INTERVAL);
        let start = Instant::now();
        assert_eq!(schedule.next_read(), start, "the first read at once");
        schedule.read(start, false);
        assert_eq!(schedule.next_read(), start + POLL_INTERVAL);
        // Settling tasks without an event (a task rescheduled on another node) wait for the
        // resync: nothing says when to look sooner.
        schedule.read(start, true);
        assert_eq!(schedule.next_read(), start + POLL_INTERVAL);
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_is_read_at_once_then_every_settling_poll_while_tasks_settle() {
        let mut schedule = ReadSchedule::new(POLL_INTERVAL);
        let start = Instant::now();
        schedule.read(start, false);
        schedule.event(start);
        assert_eq!(schedule.next_read(), start, "at once");
        schedule.read(start, false);
        assert_eq!(
            schedule.next_read(),
            start + SETTLING_POLL,
            "no task settling yet: the orchestrator has not created them"
        );
        tokio::time::advance(SETTLING_AFTER_EVENT).await;
        schedule.read(Instant::now(), true);
        assert_eq!(
            schedule.next_read(),
            Instant::now() + SETTLING_POLL,
            "settling"
        );
        schedule.read(Instant::now(), false);
        assert_eq!(
            schedule.next_read(),
            Instant::now() + POLL_INTERVAL,
            "settled: back to the resync"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tasks_that_never_settle_are_polled_fast_for_a_bounded_time() {
        let mut schedule = ReadSchedule::new(POLL_INTERVAL);
        let start = Instant::now();
        schedule.event(start);
        tokio::time::advance(SETTLING_AT_MOST).await;
        schedule.read(Instant::now(), true);
        assert_eq!(schedule.next_read(), Instant::now() + POLL_INTERVAL);
    }
}
