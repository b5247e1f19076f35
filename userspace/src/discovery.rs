//! Discovery: reads Swarm every `PollInterval` ([`crate::swarm`]), builds the route tables
//! from it (pure functions: [`route_table`], [`l4_route_table`]) and publishes them as the next
//! [`Snapshot`] when they changed. The only part of xlb that talks to Docker; when Docker
//! cannot be reached the last snapshot stays published.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{
    l4::service::{l4_route_table, L4RouteTable},
    routes::{route_table, Route, RouteSettings, RouteTable},
    snapshot::{publish_if_changed, SnapshotSender},
    swarm::{Swarm, SwarmSnapshot},
};

pub struct Discovery {
    pub docker_url: String,
    pub interval: Duration,
    pub route_settings: RouteSettings,
    /// The L7 proxy's ports, which L4 listeners may not claim.
    pub reserved_ports: Vec<u16>,
}

impl Discovery {
    /// Polls Swarm until `shutdown`, publishing each change to `snapshots`.
    pub async fn run(self, snapshots: SnapshotSender, shutdown: CancellationToken) {
        let mut swarm: Option<Swarm> = None;
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
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
                        continue;
                    }
                },
            };
            match connected.snapshot().await {
                Ok(swarm_snapshot) => {
                    self.publish(&swarm_snapshot, &snapshots);
                    swarm = Some(connected);
                }
                Err(error) => {
                    let error = format!("{:#}", anyhow::Error::from(error));
                    tracing::warn!(error, "discovery failed: keeping the last route tables");
                }
            }
        }
    }

    /// Builds the tables of one Swarm snapshot and publishes them if they changed.
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
