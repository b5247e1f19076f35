//! The L7 HTTP proxy: accepts client connections on the plain port and the SSL port and serves
//! them with hyper (HTTP/1.1, and HTTP/2 by TLS ALPN or h2c prior knowledge), at most
//! `max_connections` at once, until shut down gracefully.
//!
//! - `client_connection`: one client connection, HTTP/1 parked while idle, or HTTP/2;
//!   `upgrade`: its hand-over after `101`; `replayed`: a stream with bytes read ahead.
//! - `router`: Host and path → service route (or redirect), the endpoint order by balancing
//!   method, atomically swapped tables; `path`: request paths normalised as nginx does, and the
//!   prefix rule of context roots and WebSocket endpoints.
//! - `handler`: a request's phases: check → route → upstream request → forward → decorate;
//!   `answer`: the response body type and the errors the proxy answers itself.
//! - `retry`: which requests may go to another endpoint, and their replayable bodies;
//!   `held_bodies`: the worker's budget for those bodies.
//! - `health`: passive health, ejecting endpoints that cannot be reached.
//! - `upstream`: keep-alive connection pool per upstream endpoint, timeouts, drain.
//! - `head_guard`: the byte-level guard of client connections (smuggling, slow heads, idling);
//!   `request_framing`: where a request's body ends; `connection_state`: what the guard and the
//!   handler share about a connection.
//! - `deadline`: the timer behind the guard's and the upstream connections' timeouts.
//! - `limits`: what the proxy accepts from clients (sizes, timeouts, Host).
//! - `headers`: hop-by-hop stripping and the proxy's request/response headers.
//! - `ascii`: addresses and times written into headers and log lines without `fmt`.
//! - `access_log`: a line per request; `observed`: the body wrapper that ends one.
//! - `websocket`: WebSocket upgrades on `websocket_endpoints`, spliced after `101`.
//! - `backend_tls`: TLS towards the tasks (`ssl_backend`).
//! - `http2`: HTTP/2 requests made fit for the HTTP/1.1 upstream.
//! - `workers`: `WorkerProcesses` threads, each with its own runtime, listeners and pools.
//! - `tls`: the SSL port: passthrough by SNI or TLS termination (`certificates`, `client_hello`,
//!   `passthrough`).

mod access_log;
mod answer;
mod ascii;
mod backend_tls;
mod certificates;
mod client_connection;
mod client_hello;
mod connection_state;
mod deadline;
mod handler;
mod head_guard;
pub mod headers;
mod health;
mod held_bodies;
mod http2;
mod limits;
mod log_budget;
mod observed;
mod parking;
mod passthrough;
mod path;
mod replayed;
mod request_framing;
pub mod request_metrics;
mod retry;
mod router;
mod tls;
mod upgrade;
mod upstream;
mod websocket;
mod workers;

#[cfg(test)]
mod hardening_tests;
#[cfg(test)]
mod resilience_tests;
#[cfg(test)]
mod routing_tests;
#[cfg(test)]
mod test_backends;
#[cfg(test)]
mod test_clients;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod timeout_tests;
#[cfg(test)]
mod tls_test_support;

use std::{collections::HashSet, io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

pub use backend_tls::{BackendTlsClients, BackendTlsError};
pub use certificates::{CertificateStore, DEFAULT_SECRETS_DIR};
pub use handler::HandlerSettings;
pub use health::EjectionPeriods;
pub use limits::ClientLimits;
pub use path::NormalPath;
pub use router::{Routed, Router, ServiceRoute};
pub use tls::{HttpsListener, TlsHandshakes, TlsTermination};
pub use upstream::PoolSettings;
pub use workers::{
    any_address, bind_reuseport, BoundWorkers, HealthReport, ProxyPorts, RunningWorkers,
    WorkerReport, WorkerStats,
};

use access_log::AccessLog;
use backend_tls::BackendTlsPools;
use client_connection::{open_lot, serve_http};
use handler::RequestHandler;
use head_guard::GuardSettings;
use headers::ProxyIdentity;
use health::PassiveHealth;
use upstream::UpstreamPool;
use workers::WorkerCounters;

/// How long to pause accepting after an accept error such as running out of file descriptors,
/// instead of spinning on it.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Per-process proxy settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `x-proxy-id`: this proxy's host name.
    pub proxy_id: String,
    /// `MaxConnections`: client connections served at once (at least one).
    pub max_connections: usize,
    /// How `ssl_backend` services are reached: what `ssl_backend_tls_verify=required` trusts.
    pub backend_tls: BackendTlsClients,
    /// Client limits, header handling and retries.
    pub handler: HandlerSettings,
    /// Upstream timeouts and connection pooling, plain and TLS.
    pub upstream: PoolSettings,
    /// Passive health.
    pub ejection: EjectionPeriods,
    /// `DrainTimeout`: how long exchanges with an endpoint that left the routes may go on.
    pub drain_timeout: Duration,
    /// `AccessLogPath`.
    pub access_log_path: Option<PathBuf>,
}

impl Default for ProxySettings {
    /// Interlock's defaults, the web PKI roots for `ssl_backend`, and no access log.
    fn default() -> Self {
        Self {
            proxy_id: "xlb".to_owned(),
            max_connections: 1024,
            backend_tls: BackendTlsClients::default(),
            handler: HandlerSettings::default(),
            upstream: PoolSettings::default(),
            ejection: EjectionPeriods::default(),
            drain_timeout: Duration::from_secs(30),
            access_log_path: None,
        }
    }
}

/// The proxy's listening sockets: the plain HTTP port and, when configured, the SSL port.
pub struct Listeners {
    pub http: TcpListener,
    pub https: Option<HttpsListener>,
}

impl From<TcpListener> for Listeners {
    fn from(http: TcpListener) -> Self {
        Self { http, https: None }
    }
}

/// Which port a request arrived on; the handler is told with every request.
pub use crate::routes::Scheme;

/// What serving one client connection needs.
#[derive(Clone)]
struct ConnectionContext {
    handler: Arc<RequestHandler>,
    guard: Arc<GuardSettings>,
    router: Arc<Router>,
    /// The graceful shutdown: stop accepting, finish what is in flight.
    shutdown: CancellationToken,
    /// `DrainTimeout` after the shutdown began: whatever is still running is cut.
    stop_now: CancellationToken,
}

/// Serves HTTP on the plain listener, and HTTPS or TLS passthrough on the SSL listener if
/// any, until `shutdown` is cancelled: one worker, on the runtime that calls it (see
/// [`BoundWorkers`] for several).
///
/// On shutdown it stops accepting, closes idle keep-alive connections, and returns once the
/// requests in flight have been answered and the access log written; whatever still runs
/// `DrainTimeout` after the shutdown began (a slow client, an endless stream, a WebSocket) is
/// cut then.
pub async fn serve(
    listeners: impl Into<Listeners>,
    router: Arc<Router>,
    settings: ProxySettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (shared, access_log_writer) = ProxyShared::open(settings)?;
    let counters = Arc::default();
    serve_worker(listeners.into(), router, &shared, counters, shutdown).await?;
    shared.finish(access_log_writer).await
}

/// What every worker shares: the settings, the proxy's identity, passive health (an endpoint
/// one worker cannot reach is skipped by all) and the access log.
struct ProxyShared {
    settings: ProxySettings,
    identity: ProxyIdentity,
    health: Arc<PassiveHealth>,
    access_log: Option<AccessLog>,
}

/// The access log's writer, running until the last handle of the log is gone.
pub(crate) type AccessLogWriter = tokio::task::JoinHandle<()>;

impl ProxyShared {
    /// Checks the identity and opens the access log; its writer runs on the caller's runtime.
    fn open(settings: ProxySettings) -> anyhow::Result<(Self, Option<AccessLogWriter>)> {
        let identity = ProxyIdentity::new(&settings.proxy_id, &crate::build_info::server_info())
            .with_context(|| {
                format!(
                    "proxy id {:?} is not a valid header value",
                    settings.proxy_id
                )
            })?;
        let (access_log, writer) = match &settings.access_log_path {
            Some(path) => {
                let (log, writer) = AccessLog::open(path).with_context(|| {
                    format!("opening the access log {} (AccessLogPath)", path.display())
                })?;
                (Some(log), Some(tokio::spawn(writer)))
            }
            None => (None, None),
        };
        let health = Arc::new(PassiveHealth::new(settings.ejection));
        let shared = Self {
            settings,
            identity,
            health,
            access_log,
        };
        Ok((shared, writer))
    }

    /// Lets go of the access log and waits until its writer has written every line.
    async fn finish(self, writer: Option<AccessLogWriter>) -> anyhow::Result<()> {
        drop(self);
        match writer {
            Some(writer) => writer.await.context("the access log writer failed"),
            None => Ok(()),
        }
    }
}

/// One worker: accepts on its listeners and serves each connection with its own upstream
/// pools, until `shutdown`; then returns once its requests in flight have been answered.
async fn serve_worker(
    listeners: Listeners,
    router: Arc<Router>,
    shared: &ProxyShared,
    counters: Arc<WorkerCounters>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Listeners { http, https } = listeners;
    let settings = &shared.settings;
    let upstreams = UpstreamPool::new(settings.upstream.clone());
    let backend_tls = BackendTlsPools::new(settings.backend_tls.clone(), settings.upstream.clone());
    let handler = Arc::new(RequestHandler::new(
        Arc::clone(&router),
        upstreams,
        backend_tls,
        Arc::clone(&shared.health),
        shared.identity.clone(),
        settings.handler.clone(),
        shared.access_log.clone(),
    ));
    counters.report_held_bodies(handler.held_bodies());
    let tasks = TaskTracker::new();
    tasks.spawn(evict_idle_upstreams(
        Arc::clone(&handler),
        settings.upstream.idle_timeout / 2,
        shutdown.clone(),
    ));
    tasks.spawn(drain_removed_endpoints(
        router.endpoints(),
        Arc::clone(&handler),
        settings.drain_timeout,
        shutdown.clone(),
    ));
    let guard = Arc::new(GuardSettings {
        limits: settings.handler.limits.clone(),
        identity: shared.identity.clone(),
        access_log: shared.access_log.clone(),
    });
    let context = ConnectionContext {
        handler,
        guard,
        router,
        shutdown: shutdown.clone(),
        stop_now: CancellationToken::new(),
    };
    let plain_parking = open_lot(&context, &tasks);
    let tls_parking = open_lot(&context, &tasks);
    let connection_slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    debug!(addr = ?http.local_addr().ok(), "proxy worker listening");

    let mut tls_first = false;
    loop {
        // Waiting for a slot before accepting leaves excess clients in the kernel's backlog.
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&connection_slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        tls_first = !tls_first;
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = accept_next(&http, https.as_ref(), tls_first) => accepted,
        };
        let (stream, client, termination) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "accepting a proxy connection failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%client, %error, "could not disable Nagle on client connection");
        }
        let context = context.clone();
        let slot = (permit, counters.connection_opened(termination.is_some()));
        // Two kinds of task: a plain connection's does not reserve room for TLS state.
        match termination {
            None => tasks.spawn(serve_http(
                stream,
                client,
                Scheme::Http,
                context,
                slot,
                plain_parking.clone(),
            )),
            Some(termination) => tasks.spawn(tls::serve_connection(
                stream,
                client,
                termination,
                context,
                slot,
                tls_parking.clone(),
            )),
        };
    }

    drop((http, https));
    tasks.close();
    debug!(
        tasks = tasks.len(),
        "proxy worker shutting down; finishing requests in flight"
    );
    let drain_timeout = settings.drain_timeout;
    if tokio::time::timeout(drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            connections = tasks.len(),
            ?drain_timeout,
            "connections still busy when DrainTimeout ran out after the shutdown began: cutting them"
        );
        context.stop_now.cancel();
        tasks.wait().await;
    }
    Ok(())
}

/// The next client of either port, `tls_first` saying which one wins when both have clients
/// waiting: the caller alternates it, so that a flood on one port cannot starve the other.
async fn accept_next(
    http: &TcpListener,
    https: Option<&HttpsListener>,
    tls_first: bool,
) -> io::Result<(TcpStream, SocketAddr, Option<TlsTermination>)> {
    let plain = async {
        let (stream, client) = http.accept().await?;
        Ok((stream, client, None))
    };
    let tls = accept_tls(https);
    if tls_first {
        tokio::select! { biased; accepted = tls => accepted, accepted = plain => accepted }
    } else {
        tokio::select! { biased; accepted = plain => accepted, accepted = tls => accepted }
    }
}

/// The next connection on the SSL port, with how to terminate it; never, without one.
async fn accept_tls(
    https: Option<&HttpsListener>,
) -> io::Result<(TcpStream, SocketAddr, Option<TlsTermination>)> {
    match https {
        Some(https) => {
            let (stream, client) = https.listener.accept().await?;
            Ok((stream, client, Some(https.termination.clone())))
        }
        None => std::future::pending().await,
    }
}

/// Closes expired idle upstream connections and forgets stale ejections periodically, so that
/// endpoints no longer requested do not keep connections or records.
async fn evict_idle_upstreams(
    handler: Arc<RequestHandler>,
    period: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shutdown.run_until_cancelled(ticks.tick()).await.is_some() {
        handler.evict_idle_upstreams(std::time::Instant::now());
    }
}

/// Drains the endpoints that leave the routes, as soon as they do, in every upstream pool.
async fn drain_removed_endpoints(
    mut endpoints: watch::Receiver<Arc<HashSet<SocketAddr>>>,
    handler: Arc<RequestHandler>,
    drain_timeout: Duration,
    shutdown: CancellationToken,
) {
    while let Some(Ok(())) = shutdown.run_until_cancelled(endpoints.changed()).await {
        let current = Arc::clone(&endpoints.borrow_and_update());
        handler.drain_removed_endpoints(&current, drain_timeout);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;

    use super::*;
    use std::net::IpAddr;

    use test_support::{refused_addr, table, EchoBackend, RunningProxy, TestClient};

    fn is_lower_hex_id(id: &str) -> bool {
        id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    /// `^\d+\.\d{3}$`
    fn is_seconds_with_millis(text: &str) -> bool {
        text.split_once('.').is_some_and(|(secs, millis)| {
            !secs.is_empty()
                && secs.bytes().all(|b| b.is_ascii_digit())
                && millis.len() == 3
                && millis.bytes().all(|b| b.is_ascii_digit())
        })
    }

    #[tokio::test]
    async fn routes_by_host_ignoring_case_and_port() {
        let a = EchoBackend::start().await;
        let b = EchoBackend::start().await;
        let proxy =
            RunningProxy::start(&[("a.example.com", &[a.addr]), ("b.example.com", &[b.addr])])
                .await;

        let to_a = proxy.get("A.Example.COM:8080", "/x?y=1").await;
        assert_eq!(to_a.status, 200);
        assert_eq!(to_a.echo()["port"], a.addr.port());
        assert_eq!(to_a.echo()["host"], "A.Example.COM:8080");
        assert_eq!(to_a.echo()["path"], "/x?y=1");

        let to_b = proxy.get("b.example.com", "/").await;
        assert_eq!(to_b.echo()["port"], b.addr.port());
    }

    #[tokio::test]
    async fn every_proxied_response_carries_the_proxy_headers() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let response = proxy.get("app", "/").await;
        assert_eq!(response.status, 200);

        let request_id = response.header("x-request-id");
        assert!(is_lower_hex_id(request_id), "{request_id}");
        assert_eq!(response.echo()["request_id"], request_id);
        assert_eq!(response.header("x-proxy-id"), "lb-test-1");
        assert_eq!(
            response.header("x-server-info"),
            crate::build_info::server_info()
        );
        let upstream: SocketAddr = response.header("x-upstream-addr").parse().unwrap();
        assert_eq!(upstream, backend.addr);
        let time = response.header("x-upstream-response-time");
        assert!(is_seconds_with_millis(time), "{time}");
        for name in [
            "x-request-id",
            "x-proxy-id",
            "x-server-info",
            "x-upstream-addr",
            "x-upstream-response-time",
        ] {
            assert_eq!(response.headers.get_all(name).iter().count(), 1, "{name}");
        }
    }

    #[tokio::test]
    async fn upstream_learns_client_address_and_request_id() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let mut client = proxy.client().await;
        let request = Request::get("/")
            .header("host", "app")
            .header("x-forwarded-for", "203.0.113.9")
            .body(Full::default())
            .unwrap();
        let first = client.send(request).await;
        assert_eq!(first.echo()["real_ip"], "127.0.0.1");
        assert_eq!(first.echo()["forwarded_for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(first.echo()["forwarded_proto"], "http");

        let second = client.get("app", "/").await;
        assert_eq!(second.echo()["forwarded_for"], "127.0.0.1");
        assert_ne!(first.header("x-request-id"), second.header("x-request-id"));
        assert_eq!(second.echo()["request_id"], second.header("x-request-id"));
    }

    #[tokio::test]
    async fn request_body_reaches_upstream() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let request = Request::post("/submit")
            .header("host", "app")
            .body(Full::new(Bytes::from_static(b"hello upstream")))
            .unwrap();
        let response = proxy.client().await.send(request).await;
        assert_eq!(response.echo()["method"], "POST");
        assert_eq!(response.echo()["body"], "hello upstream");
    }

    #[tokio::test]
    async fn round_robin_spreads_requests_over_all_endpoints() {
        let backends = [
            EchoBackend::start().await,
            EchoBackend::start().await,
            EchoBackend::start().await,
        ];
        let endpoints = backends.each_ref().map(|b| b.addr);
        let proxy = RunningProxy::start(&[("app", &endpoints)]).await;
        let mut client = proxy.client().await;
        let mut hits = BTreeMap::<u64, usize>::new();
        for _ in 0..9 {
            let port = client.get("app", "/").await.echo()["port"]
                .as_u64()
                .unwrap();
            *hits.entry(port).or_default() += 1;
        }
        let expected: BTreeMap<u64, usize> =
            endpoints.iter().map(|a| (u64::from(a.port()), 3)).collect();
        assert_eq!(hits, expected);
    }

    #[tokio::test]
    async fn unknown_host_is_503_and_missing_host_400() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;

        let unknown = proxy.get("nope.example.com", "/").await;
        assert_eq!(unknown.status, 503);
        assert_eq!(unknown.text(), "no service for host \"nope.example.com\"\n");
        assert!(is_lower_hex_id(unknown.header("x-request-id")));
        assert_eq!(unknown.header("x-proxy-id"), "lb-test-1");
        assert!(!unknown.headers.contains_key("x-upstream-addr"));
        assert!(!unknown.headers.contains_key("x-upstream-response-time"));

        let without_host = Request::get("/").body(Full::default()).unwrap();
        let missing = proxy.client().await.send(without_host).await;
        assert_eq!(missing.status, 400);
        assert_eq!(missing.text(), "HTTP/1.1 request without a Host header\n");
        assert!(is_lower_hex_id(missing.header("x-request-id")));
    }

    #[tokio::test]
    async fn route_without_endpoints_is_503() {
        let proxy = RunningProxy::start(&[("app", &[])]).await;
        let response = proxy.get("app", "/").await;
        assert_eq!(response.status, 503);
        assert_eq!(
            response.text(),
            "service \"svc-app\" for host \"app\" has no running tasks\n"
        );
    }

    #[tokio::test]
    async fn all_endpoints_refusing_is_502_after_trying_each() {
        let endpoints = [refused_addr().await, refused_addr().await];
        let proxy = RunningProxy::start(&[("app", &endpoints)]).await;
        let response = proxy.get("app", "/").await;
        assert_eq!(response.status, 502);
        assert_eq!(
            response.text(),
            "no endpoint of service \"svc-app\" accepted a connection (2 tried)\n"
        );
        assert!(is_lower_hex_id(response.header("x-request-id")));
        assert!(!response.headers.contains_key("x-upstream-addr"));
    }

    #[tokio::test]
    async fn route_update_applies_to_the_next_request_on_a_kept_alive_connection() {
        let before = EchoBackend::start().await;
        let after = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[before.addr])]).await;
        let mut client = proxy.client().await;
        assert_eq!(
            client.get("app", "/").await.echo()["port"],
            before.addr.port()
        );

        proxy.router.update(&table(&[("app", &[after.addr])]));
        let response = client.get("app", "/").await;
        assert_eq!(response.echo()["port"], after.addr.port());

        proxy.router.update(&table(&[]));
        assert_eq!(client.get("app", "/").await.status, 503);
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn upstream_connections_are_reused() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let mut client = proxy.client().await;
        for _ in 0..5 {
            assert_eq!(client.get("app", "/").await.status, 200);
        }
        for _ in 0..3 {
            assert_eq!(proxy.get("app", "/").await.status, 200);
        }
        assert_eq!(backend.connections_accepted(), 1);
    }

    #[tokio::test]
    async fn head_responses_keep_the_upstream_connection() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let mut client = proxy.client().await;
        for _ in 0..3 {
            let head = Request::head("/")
                .header("host", "app")
                .body(Full::default())
                .unwrap();
            let response = client.send(head).await;
            assert_eq!(response.status, 200);
            assert!(response.body.is_empty());
        }
        assert_eq!(client.get("app", "/").await.status, 200);
        assert_eq!(backend.connections_accepted(), 1);
    }

    /// The second client is seen waiting in the accept queue, after the proxy has answered a
    /// request that came after it: a proxy that ignored the limit would have accepted it by
    /// then, however slow the machine.
    #[tokio::test]
    async fn clients_beyond_max_connections_wait_for_a_free_slot() {
        let backend = EchoBackend::start().await;
        let (proxy, accept_queue) =
            RunningProxy::start_watching_accepts(&[("app", &[backend.addr])], 1).await;
        let mut first = proxy.client().await;
        assert_eq!(first.get("app", "/").await.status, 200);

        let mut second = proxy.client().await;
        let waiting = tokio::spawn(async move { second.get("app", "/").await });
        assert_eq!(first.get("app", "/after").await.status, 200);
        assert_eq!(
            accept_queue.waiting(),
            1,
            "second client accepted beyond the limit"
        );
        assert!(!waiting.is_finished());

        drop(first);
        let answered = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("second client served once the first left");
        assert_eq!(answered.unwrap().status, 200);
    }

    #[tokio::test]
    async fn hop_by_hop_headers_stay_on_their_hop_and_connection_strips_nothing_else() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let request = Request::get("/")
            .header("host", "app")
            // A client naming end-to-end headers in Connection strips none of them (as with
            // nginx): not the Host the upstream needs, not a front proxy's chain.
            .header("connection", "host, x-forwarded-for, x-client-private")
            .header("x-forwarded-for", "192.0.2.7")
            .header("x-client-private", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("te", "trailers")
            .header("x-end-to-end", "1")
            .body(Full::default())
            .unwrap();
        let response = proxy.client().await.send(request).await;

        let echo = response.echo();
        let forwarded: Vec<&str> = echo["header_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|name| name.as_str().unwrap())
            .collect();
        for hop in ["connection", "keep-alive", "proxy-connection", "te"] {
            assert!(!forwarded.contains(&hop), "{hop} forwarded: {forwarded:?}");
        }
        for kept in ["x-end-to-end", "x-client-private", "host"] {
            assert!(
                forwarded.contains(&kept),
                "{kept} not forwarded: {forwarded:?}"
            );
        }
        assert_eq!(echo["host"], "app");
        assert_eq!(echo["forwarded_for"], "192.0.2.7, 127.0.0.1");

        for hop in ["connection", "keep-alive"] {
            assert!(!response.headers.contains_key(hop), "{hop} in response");
        }
        assert!(response.headers.contains_key("x-backend-private"));
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_clients_are_served_and_forwarded_as_themselves() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start_on_any_address(&[("app", &[backend.addr])]).await;
        let mut clients = vec![IpAddr::from([127, 0, 0, 1])];
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert!(proxy.addr.is_ipv6(), "IPv4 only on a host with IPv6");
            clients.push(IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
        }
        for client in clients {
            let to = SocketAddr::new(client, proxy.addr.port());
            let response = TestClient::connect(to).await.get("app", "/").await;
            assert_eq!(response.status, 200, "{client}");
            // An IPv4 client reaches a dual-stack listener IPv4-mapped, and is named plainly.
            assert_eq!(response.echo()["real_ip"], client.to_string());
            assert_eq!(response.echo()["forwarded_for"], client.to_string());
        }
    }

    #[tokio::test]
    async fn shutdown_finishes_requests_in_flight_then_returns() {
        let backend = EchoBackend::start().await;
        let mut proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let mut idle_client = proxy.client().await;
        assert_eq!(idle_client.get("app", "/").await.status, 200);

        let mut busy_client = proxy.client().await;
        let in_flight =
            tokio::spawn(async move { busy_client.get("app", "/slow?delay_ms=300").await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        proxy.shutdown.cancel();

        let answered = in_flight.await.unwrap();
        assert_eq!(answered.status, 200);
        let served = tokio::time::timeout(Duration::from_secs(5), &mut proxy.served)
            .await
            .expect("serve returns after shutdown");
        served.unwrap().unwrap();
        assert!(TcpStream::connect(proxy.addr).await.is_err());
    }
}
