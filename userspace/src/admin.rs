//! The admin endpoint on Interlock's `ListenAddr`: `GET /health`, `GET /routes`, `GET /stats`,
//! `GET /metrics` (Prometheus, see [`crate::metrics`]), and at `/` a dashboard that reads them.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    controller_feed::FeedStatus,
    dataplane::Dataplane,
    discovery::DiscoveryReads,
    endpoint::{self, json, text, EndpointLimits},
    l4::service::L4RouteTable,
    metrics,
    proxy::{Router, TlsHandshakes, WorkerStats},
    routes::RouteTable,
};

/// What the admin endpoint reports on.
pub struct AdminState {
    /// The route table currently served.
    pub routes: ArcSwap<RouteTable>,
    /// The L4 listeners currently steered by XDP (`xlb.l4.ports`), shown under `"l4"`.
    pub l4_routes: ArcSwap<L4RouteTable>,
    /// The XDP program, unless running proxy-only.
    pub dataplane: Option<Arc<Mutex<Dataplane>>>,
    /// The L7 proxy's routes, whose request metrics `/metrics` shows.
    pub router: Arc<Router>,
    /// The L7 proxy's workers, shown under `"proxy"`.
    pub proxy_workers: Arc<WorkerStats>,
    /// The version of the snapshot served, and when it was first applied.
    pub snapshot: Mutex<Option<(u64, Instant)>>,
    /// The controllers feeding this node (`xlb proxy`); none under `xlb run`.
    pub controllers: Option<Arc<FeedStatus>>,
    /// Discovery's reads of the engine (`xlb run`); none under `xlb proxy`.
    pub discovery: Option<Arc<DiscoveryReads>>,
    /// The SSL port's handshakes, when there is one.
    pub tls_handshakes: Option<Arc<TlsHandshakes>>,
}

impl AdminState {
    /// Records that the snapshot of `version` is served.
    pub fn record_snapshot(&self, version: u64) {
        let mut served = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        if served.is_none_or(|(served, _)| served != version) {
            *served = Some((version, Instant::now()));
        }
    }

    /// `/routes`' `"snapshot"`: the version served, how long it has been served, and the
    /// controllers' state.
    fn snapshot_report(&self) -> serde_json::Value {
        let served = *self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let mut report = match served {
            Some((version, since)) => json!({
                "version": version,
                "age_ms": since.elapsed().as_millis() as u64,
            }),
            None => json!({ "version": null }),
        };
        if let (Some(controllers), Some(fields)) = (&self.controllers, report.as_object_mut()) {
            fields.insert("controllers".to_owned(), json!(controllers.report()));
        }
        report
    }
}

/// Serves admin requests on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    serve_within(listener, state, EndpointLimits::default(), shutdown).await;
}

async fn serve_within(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: EndpointLimits,
    shutdown: CancellationToken,
) {
    let answer = move |request: Request<Incoming>| {
        let response = respond(&state, &request);
        async move { response }
    };
    endpoint::serve(listener, limits, shutdown, "admin endpoint", answer).await;
}

/// The dashboard: one page, its script and styles inline, polling the endpoints above.
const DASHBOARD: &str = include_str!("dashboard/index.html");

/// The dashboard loads nothing but itself and what it fetches from this endpoint.
const DASHBOARD_POLICY: &str =
    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'";

fn respond(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/" => Response::builder()
            .header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")
            .header(http::header::CONTENT_SECURITY_POLICY, DASHBOARD_POLICY)
            .body(Full::new(Bytes::from_static(DASHBOARD.as_bytes())))
            .expect("static headers are valid"),
        "/health" => text(StatusCode::OK, "ok\n"),
        "/routes" => {
            let mut routes = serde_json::to_value(&**state.routes.load()).unwrap_or_default();
            if let Some(fields) = routes.as_object_mut() {
                let l4 = serde_json::to_value(&**state.l4_routes.load()).unwrap_or_default();
                fields.insert("l4".to_owned(), l4);
                fields.insert("snapshot".to_owned(), state.snapshot_report());
            }
            json(&routes, true)
        }
        "/stats" => stats(state),
        "/metrics" => prometheus_metrics(state),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /health, /routes, /stats or /metrics\n",
        ),
    }
}

fn prometheus_metrics(state: &AdminState) -> Response<Full<Bytes>> {
    let sources = metrics::Sources {
        router: &state.router,
        workers: &state.proxy_workers.report(),
        health: &state.proxy_workers.health(),
        snapshot: *state.snapshot.lock().unwrap_or_else(|p| p.into_inner()),
        discovery_reads: state.discovery.as_ref().map(|reads| reads.counts()),
        tls_handshakes: state.tls_handshakes.as_ref().map(|tls| tls.counts()),
        dataplane: state.dataplane.as_deref(),
    };
    match metrics::render(&sources) {
        Ok(body) => Response::builder()
            .header(http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)
            .body(Full::new(Bytes::from(body)))
            .expect("a static header is valid"),
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the metrics failed: {error}\n"),
        ),
    }
}

fn stats(state: &AdminState) -> Response<Full<Bytes>> {
    let proxy = json!({ "workers": state.proxy_workers.report() });
    let Some(dataplane) = &state.dataplane else {
        return json(&json!({ "proxy": proxy, "xdp": null }), true);
    };
    let mut dataplane = dataplane
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let backend_names: BTreeMap<u32, String> = dataplane
        .l4()
        .backend_ids()
        .into_iter()
        .map(|(endpoint, id)| (id, endpoint.to_string()))
        .collect();
    let stats = dataplane
        .stats()
        .and_then(|stats| Ok((stats, dataplane.l4_traffic()?)));
    match stats {
        Ok((stats, l4)) => {
            let services: BTreeMap<String, _> = l4
                .services
                .iter()
                .map(|(listener, traffic)| (listener.to_string(), traffic))
                .collect();
            let backends: BTreeMap<String, _> = l4
                .backends
                .iter()
                .map(|(endpoint, traffic)| (endpoint.to_string(), traffic))
                .collect();
            let connections = dataplane.connection_table();
            // By endpoint; a removed backend's flows, until they end, under its old id.
            let snat_tuples_in_use: BTreeMap<String, u64> = connections
                .table
                .snat_tuples_in_use
                .iter()
                .map(|(id, count)| {
                    let name = backend_names.get(id).cloned();
                    (name.unwrap_or_else(|| format!("backend id {id}")), *count)
                })
                .collect();
            json(
                &json!({
                    "proxy": proxy,
                    "xdp": stats,
                    "l4": {
                        "services": services,
                        "backends": backends,
                        "connections": {
                            "entries": connections.table.entries,
                            "capacity": connections.table.capacity,
                            "flows": connections.table.flows,
                            "half_pairs": connections.table.half_pairs,
                            "snat_tuples_per_backend": connections.snat_tuples_per_backend,
                            "snat_tuples_in_use": snat_tuples_in_use,
                            "sweeps": connections.sweeps,
                            "next_sweep_in_ms": connections.next_sweep_in.as_millis() as u64,
                        },
                    },
                }),
                true,
            )
        }
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reading XDP counters: {error}\n"),
        ),
    }
}
