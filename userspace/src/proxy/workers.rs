//! `WorkerProcesses`: nginx's worker model, on threads. Each worker is an OS thread running a
//! single-threaded tokio runtime with listening sockets of its own on the proxy's ports
//! (`SO_REUSEPORT`: the kernel spreads new connections over the workers), its own upstream
//! connection pools and its own connection limit (`MaxConnections` counts per worker, as nginx's
//! `worker_connections` does).
//!
//! A request never leaves the worker that accepted its connection, and neither do the upstream
//! connections it uses: no cross-thread hand-off, wake-up or lock on the request path. What the
//! workers share is read-mostly or batched: the router (swapped atomically by discovery),
//! passive health and the access log's buffer.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Instant,
};

use anyhow::Context as _;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{
    health::PassiveHealth, held_bodies::HeldBodies, serve_worker, AccessLogWriter, HttpsListener,
    Listeners, ProxySettings, ProxyShared, Router, TlsTermination,
};

/// Pending connections the kernel queues per worker socket (tokio's own `bind` default).
const LISTEN_BACKLOG: i32 = 1024;

/// Where the proxy listens: the plain HTTP port and, when configured, the SSL port.
#[derive(Clone)]
pub struct ProxyPorts {
    pub http: SocketAddr,
    pub https: Option<(SocketAddr, TlsTermination)>,
}

/// Every worker's sockets, bound and listening, before any worker starts: a port that cannot
/// be bound fails the start, not a worker thread.
pub struct BoundWorkers {
    sockets: Vec<WorkerSockets>,
    https_termination: Option<TlsTermination>,
    stats: Arc<WorkerStats>,
}

struct WorkerSockets {
    http: std::net::TcpListener,
    https: Option<std::net::TcpListener>,
}

/// What each worker has done, for the admin endpoint's `/stats`, and the passive health they
/// share, for `/metrics`.
#[derive(Debug, Default)]
pub struct WorkerStats {
    workers: Vec<Arc<WorkerCounters>>,
    /// Set once the workers start.
    health: OnceLock<Arc<PassiveHealth>>,
}

/// Passive health as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthReport {
    pub ejections_begun: u64,
    /// The endpoints ejected now.
    pub ejected: Vec<SocketAddr>,
}

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// By listener: the plain port's, then the SSL port's.
    accepted: [AtomicU64; 2],
    closed: [AtomicU64; 2],
    /// The worker's budget of request bodies held for replay, once it serves.
    held_bodies: OnceLock<Arc<HeldBodies>>,
}

/// One worker's counters as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WorkerReport {
    pub connections_accepted: u64,
    pub connections_open: u64,
    /// Of those, the SSL port's.
    pub https_connections_accepted: u64,
    pub https_connections_open: u64,
    /// Bytes of request bodies held for replay now.
    pub held_body_bytes: u64,
}

impl WorkerStats {
    fn new(workers: usize) -> Self {
        Self {
            workers: (0..workers).map(|_| Arc::default()).collect(),
            health: OnceLock::new(),
        }
    }

    pub fn health(&self) -> HealthReport {
        self.health
            .get()
            .map(|health| HealthReport {
                ejections_begun: health.ejections_begun(),
                ejected: health.ejected(Instant::now()),
            })
            .unwrap_or_default()
    }

    pub fn report(&self) -> Vec<WorkerReport> {
        self.workers
            .iter()
            .map(|counters| {
                let [plain, https] = [0, 1].map(|listener| {
                    let accepted = counters.accepted[listener].load(Ordering::Relaxed);
                    let closed = counters.closed[listener].load(Ordering::Relaxed);
                    (accepted, accepted.saturating_sub(closed))
                });
                WorkerReport {
                    connections_accepted: plain.0 + https.0,
                    connections_open: plain.1 + https.1,
                    https_connections_accepted: https.0,
                    https_connections_open: https.1,
                    held_body_bytes: counters
                        .held_bodies
                        .get()
                        .map_or(0, |held| held.held() as u64),
                }
            })
            .collect()
    }
}

impl WorkerCounters {
    /// Reports the bytes `held_bodies` holds from now on.
    pub(super) fn report_held_bodies(&self, held_bodies: Arc<HeldBodies>) {
        let _ = self.held_bodies.set(held_bodies);
    }

    /// Counts a connection accepted on the plain port, or the SSL port if `https`; the guard
    /// counts it closed when dropped.
    pub(super) fn connection_opened(self: &Arc<Self>, https: bool) -> OpenConnection {
        let listener = usize::from(https);
        self.accepted[listener].fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            counters: Arc::clone(self),
            listener,
        }
    }
}

/// A connection a worker is serving, counted closed when dropped.
pub(super) struct OpenConnection {
    counters: Arc<WorkerCounters>,
    listener: usize,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.counters.closed[self.listener].fetch_add(1, Ordering::Relaxed);
    }
}

impl BoundWorkers {
    /// Binds `workers` listening sockets on each of `ports`, with `SO_REUSEPORT`. A port 0 is
    /// the kernel's pick for the first worker, and the same port for the others.
    pub fn bind(ports: &ProxyPorts, workers: usize) -> anyhow::Result<Self> {
        let http = bind_group(ports.http, workers)
            .with_context(|| format!("binding the proxy's port {} (PublishedPort)", ports.http))?;
        let mut https = match &ports.https {
            Some((addr, _)) => bind_group(*addr, workers).with_context(|| {
                format!("binding the proxy's SSL port {addr} (PublishedSSLPort)")
            })?,
            None => Vec::new(),
        }
        .into_iter();
        let sockets: Vec<WorkerSockets> = http
            .into_iter()
            .map(|http| WorkerSockets {
                http,
                https: https.next(),
            })
            .collect();
        let stats = Arc::new(WorkerStats::new(sockets.len()));
        Ok(Self {
            sockets,
            https_termination: ports.https.as_ref().map(|(_, tls)| tls.clone()),
            stats,
        })
    }

    /// The workers' counters, shared with whoever reports them.
    pub fn stats(&self) -> Arc<WorkerStats> {
        Arc::clone(&self.stats)
    }

    /// The plain port actually bound (the configured one, or the kernel's pick for port 0).
    pub fn http_addr(&self) -> io::Result<SocketAddr> {
        self.sockets[0].http.local_addr()
    }

    /// Runs every worker until `shutdown` is cancelled and each has finished its requests in
    /// flight; then writes out the access log.
    pub async fn serve(
        self,
        router: Arc<Router>,
        settings: ProxySettings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        self.start(router, settings, shutdown)?.wait().await
    }

    /// Opens the access log and starts every worker thread: once it returns, the proxy holds
    /// every file and socket it will use (so the process may give up its privileges).
    pub fn start(
        self,
        router: Arc<Router>,
        settings: ProxySettings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<RunningWorkers> {
        let (shared, access_log_writer) = ProxyShared::open(settings)?;
        let _ = self.stats.health.set(Arc::clone(&shared.health));
        let shared = Arc::new(shared);
        let mut finished = Vec::new();
        for (index, sockets) in self.sockets.into_iter().enumerate() {
            let (done, result) = tokio::sync::oneshot::channel();
            let worker = Worker {
                index,
                sockets,
                https_termination: self.https_termination.clone(),
                counters: Arc::clone(&self.stats.workers[index]),
                router: Arc::clone(&router),
                shared: Arc::clone(&shared),
                shutdown: shutdown.clone(),
            };
            std::thread::Builder::new()
                .name(format!("xlb-worker-{index}"))
                .spawn(move || {
                    // The receiver only goes away when the whole proxy is being torn down.
                    let _ = done.send(worker.run());
                })
                .context("starting a proxy worker thread")?;
            finished.push(result);
        }
        tracing::info!(workers = finished.len(), "proxy workers started");
        Ok(RunningWorkers {
            finished,
            shared,
            access_log_writer,
        })
    }
}

/// The proxy's workers once started ([`BoundWorkers::start`]).
pub struct RunningWorkers {
    finished: Vec<tokio::sync::oneshot::Receiver<anyhow::Result<()>>>,
    shared: Arc<ProxyShared>,
    access_log_writer: Option<AccessLogWriter>,
}

impl RunningWorkers {
    /// Waits until every worker has finished (after shutdown); then writes out the access log.
    pub async fn wait(self) -> anyhow::Result<()> {
        let mut first_failure = None;
        for (index, result) in self.finished.into_iter().enumerate() {
            let outcome = result
                .await
                .map_err(|_| anyhow::anyhow!("proxy worker {index} panicked"))
                .and_then(|outcome| outcome.with_context(|| format!("proxy worker {index}")));
            if let Err(error) = outcome {
                tracing::error!(error = format!("{error:#}"), "proxy worker failed");
                first_failure.get_or_insert(error);
            }
        }
        let shared = Arc::into_inner(self.shared).context("a proxy worker outlived the proxy")?;
        shared.finish(self.access_log_writer).await?;
        first_failure.map_or(Ok(()), Err)
    }
}

/// One worker thread's share.
struct Worker {
    index: usize,
    sockets: WorkerSockets,
    https_termination: Option<TlsTermination>,
    counters: Arc<WorkerCounters>,
    router: Arc<Router>,
    shared: Arc<ProxyShared>,
    shutdown: CancellationToken,
}

impl Worker {
    fn run(self) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the worker's async runtime")?;
        let index = self.index;
        runtime.block_on(async move {
            let http = TcpListener::from_std(self.sockets.http)?;
            let https = match (self.sockets.https, self.https_termination) {
                (Some(listener), Some(termination)) => Some(HttpsListener {
                    listener: TcpListener::from_std(listener)?,
                    termination,
                }),
                _ => None,
            };
            tracing::debug!(worker = index, "proxy worker serving");
            serve_worker(
                Listeners { http, https },
                self.router,
                &self.shared,
                self.counters,
                self.shutdown,
            )
            .await
        })
    }
}

/// `count` (at least one) listening sockets sharing one port.
fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind_reuseport(addr)?;
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..count.max(1) {
        group.push(bind_reuseport(bound)?);
    }
    Ok(group)
}

/// Every address of this node, both families where the kernel has IPv6 (`[::]`, dual-stack,
/// as nginx's `listen [::]:80` beside `listen 80` in Interlock's template), else `0.0.0.0`.
pub fn any_address(port: u16) -> SocketAddr {
    let ipv6 = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).is_ok();
    match ipv6 {
        true => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        false => SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
    }
}

/// A non-blocking listening socket on `addr` that other sockets may share (`SO_REUSEPORT`).
/// socket2, because std and tokio bind without that option or only inside a runtime.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` takes IPv4 clients too, whatever `net.ipv6.bindv6only` says.
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::task::JoinHandle;

    use super::*;
    use crate::proxy::test_support::{table, EchoBackend, TestClient};

    /// Workers serving on an ephemeral 127.0.0.1 port.
    struct RunningWorkers {
        addr: SocketAddr,
        router: Arc<Router>,
        stats: Arc<WorkerStats>,
        shutdown: CancellationToken,
        served: JoinHandle<anyhow::Result<()>>,
    }

    impl RunningWorkers {
        fn start(workers: usize, routes: &[(&str, &[SocketAddr])]) -> Self {
            Self::start_with(workers, routes, ProxySettings::default())
        }

        fn start_with(
            workers: usize,
            routes: &[(&str, &[SocketAddr])],
            settings: ProxySettings,
        ) -> Self {
            let ports = ProxyPorts {
                http: "127.0.0.1:0".parse().unwrap(),
                https: None,
            };
            let bound = BoundWorkers::bind(&ports, workers).unwrap();
            let addr = bound.http_addr().unwrap();
            let stats = bound.stats();
            let router = Router::new();
            router.update(&table(routes));
            let shutdown = CancellationToken::new();
            let served = tokio::spawn(bound.serve(Arc::clone(&router), settings, shutdown.clone()));
            Self {
                addr,
                router,
                stats,
                shutdown,
                served,
            }
        }

        /// Workers that accepted at least one connection.
        fn workers_used(&self) -> usize {
            self.stats
                .report()
                .iter()
                .filter(|worker| worker.connections_accepted > 0)
                .count()
        }

        fn accepted(&self) -> u64 {
            self.stats
                .report()
                .iter()
                .map(|worker| worker.connections_accepted)
                .sum()
        }

        /// `count` requests, each on a fresh connection, one after another.
        async fn get_on_fresh_connections(&self, count: usize) -> Vec<u64> {
            let mut ports = Vec::new();
            for _ in 0..count {
                let response = TestClient::connect(self.addr).await.get("app", "/").await;
                assert_eq!(response.status, 200);
                ports.push(response.echo()["port"].as_u64().unwrap());
            }
            ports
        }
    }

    #[tokio::test]
    async fn several_workers_serve_one_port_and_connections_spread_over_them() {
        let backend = EchoBackend::start().await;
        let workers = RunningWorkers::start(4, &[("app", &[backend.addr])]);
        assert_eq!(workers.stats.report().len(), 4);
        workers.get_on_fresh_connections(64).await;
        assert_eq!(workers.accepted(), 64);
        // The kernel hashes each connection's addresses to one of the four sockets: 64
        // connections all landing on one worker would mean the port is not shared.
        assert!(workers.workers_used() >= 2, "{:?}", workers.stats.report());
    }

    #[tokio::test]
    async fn each_worker_keeps_its_own_upstream_connections() {
        let backend = EchoBackend::start().await;
        let workers = RunningWorkers::start(2, &[("app", &[backend.addr])]);
        workers.get_on_fresh_connections(40).await;
        // One request at a time: each worker reuses the one upstream connection it opened,
        // and no worker uses another's.
        assert_eq!(backend.connections_accepted(), workers.workers_used());
    }

    #[tokio::test]
    async fn route_updates_reach_every_worker() {
        let before = EchoBackend::start().await;
        let after = EchoBackend::start().await;
        let workers = RunningWorkers::start(4, &[("app", &[before.addr])]);
        let ports = workers.get_on_fresh_connections(32).await;
        assert!(ports
            .iter()
            .all(|&port| port == u64::from(before.addr.port())));

        workers.router.update(&table(&[("app", &[after.addr])]));
        let ports = workers.get_on_fresh_connections(32).await;
        assert!(workers.workers_used() >= 2, "{:?}", workers.stats.report());
        assert!(
            ports
                .iter()
                .all(|&port| port == u64::from(after.addr.port())),
            "{ports:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_drains_every_worker_then_returns() {
        let backend = EchoBackend::start().await;
        let workers = RunningWorkers::start(2, &[("app", &[backend.addr])]);
        let addr = workers.addr;
        let in_flight: Vec<_> = (0..16)
            .map(|_| {
                tokio::spawn(async move {
                    let mut client = TestClient::connect(addr).await;
                    client.get("app", "/slow?delay_ms=500").await
                })
            })
            .collect();
        // Every request has reached the backend (one upstream connection each, as they run at
        // once), so each is in flight, not just accepted: a connection whose request is still
        // unread when shutdown comes is closed, as nginx closes it.
        crate::proxy::test_support::eventually("every request in flight on both workers", || {
            let report = workers.stats.report();
            backend.connections_accepted() == 16 && report.iter().all(|w| w.connections_open > 0)
        })
        .await;
        workers.shutdown.cancel();

        for request in in_flight {
            assert_eq!(request.await.unwrap().status, 200);
        }
        tokio::time::timeout(Duration::from_secs(5), workers.served)
            .await
            .expect("the workers stop after shutdown")
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        assert!(workers
            .stats
            .report()
            .iter()
            .all(|worker| worker.connections_open == 0));
    }

    /// The workers' shared passive health is reported for `/metrics`: an endpoint that
    /// refused a connection is ejected, and the request went on to the other one.
    #[tokio::test]
    async fn the_endpoints_passive_health_ejected_are_reported() {
        let backend = EchoBackend::start().await;
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let workers = RunningWorkers::start(1, &[("app", &[dead, backend.addr])]);
        assert_eq!(workers.stats.health(), HealthReport::default());
        let mut client = TestClient::connect(workers.addr).await;
        for _ in 0..2 {
            assert_eq!(client.get("app", "/").await.status, 200);
        }
        let health = workers.stats.health();
        assert_eq!(health.ejected, vec![dead]);
        assert_eq!(health.ejections_begun, 1);
    }

    /// The shutdown takes no new connections, but those already accepted are not dropped
    /// unanswered: a new one still gets its first request served (a hitless restart moves
    /// the listeners' queues to the new process, but a connection just accepted stays here),
    /// while an idle keep-alive connection and a new one that sends nothing are closed.
    #[tokio::test]
    async fn shutdown_serves_the_first_request_of_a_connection_it_had_accepted() {
        use crate::proxy::test_support::{eventually, RawConnection};

        let backend = EchoBackend::start().await;
        let workers = RunningWorkers::start(1, &[("app", &[backend.addr])]);
        const GET: &[u8] = b"GET /first HTTP/1.1\r\nHost: app\r\n\r\n";
        let mut kept_alive = RawConnection::connect(workers.addr).await;
        kept_alive.send(GET).await;
        assert_eq!(kept_alive.read_response().await.status, 200);
        let mut late = RawConnection::connect(workers.addr).await;
        let silent = RawConnection::connect(workers.addr).await;
        eventually("both new connections accepted", || {
            workers.stats.report()[0].connections_accepted == 3
        })
        .await;

        workers.shutdown.cancel();
        let idle_closed = kept_alive.read_until_closed().await;
        assert!(idle_closed.closed && idle_closed.received.is_empty());
        tokio::time::sleep(Duration::from_millis(200)).await;
        late.send(GET).await;
        let answered = late.read_until_closed().await;
        assert!(answered.closed, "the connection closes after its request");
        let response = &answered.responses()[0];
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.header("connection"), Some("close"));
        let silent = silent.read_until_closed().await;
        assert!(silent.closed && silent.received.is_empty());
        tokio::time::timeout(Duration::from_secs(5), workers.served)
            .await
            .expect("the workers stop after shutdown")
            .unwrap()
            .unwrap();
    }

    /// HTTP/2 clients can make a worker hold many request bodies for replay at once (up to 128
    /// streams per connection): what it holds stays within its budget, and every request is
    /// served all the same.
    #[tokio::test]
    async fn bodies_held_for_replay_stay_within_the_budget_under_many_http2_streams() {
        use http_body_util::{BodyExt as _, Full};
        use hyper_util::rt::{TokioExecutor, TokioIo};

        const STREAMS: usize = 256;
        const BODY: usize = 60 << 10;
        const BUDGET: usize = 1 << 20;
        let backend = EchoBackend::start().await;
        let mut settings = ProxySettings::default();
        settings.handler.held_body_budget = BUDGET;
        settings.handler.limits.max_body_size = None;
        let workers = RunningWorkers::start_with(1, &[("app", &[backend.addr])], settings);
        let stream = tokio::net::TcpStream::connect(workers.addr).await.unwrap();
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let requests: Vec<_> = (0..STREAMS)
            .map(|_| {
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    let request = http::Request::put("http://app/slow?delay_ms=300")
                        .body(Full::new(bytes::Bytes::from(vec![b'b'; BODY])))
                        .unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    let status = response.status();
                    response.into_body().collect().await.unwrap();
                    status
                })
            })
            .collect();
        let mut most_held = 0;
        while !requests.iter().all(JoinHandle::is_finished) {
            most_held = most_held.max(workers.stats.report()[0].held_body_bytes);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for request in requests {
            assert_eq!(request.await.unwrap(), 200);
        }
        assert!(most_held > 0, "no body was held");
        assert!(
            most_held <= BUDGET as u64,
            "{most_held} bytes held, over the budget of {BUDGET}"
        );
        assert_eq!(workers.stats.report()[0].held_body_bytes, 0);
    }

    #[test]
    fn a_taken_port_fails_the_bind_with_its_name() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ports = ProxyPorts {
            http: taken.local_addr().unwrap(),
            https: None,
        };
        let error = BoundWorkers::bind(&ports, 2).err().expect("port in use");
        let message = format!("{error:#}");
        assert!(message.contains("(PublishedPort)"), "{message}");
        assert!(message.contains("in use"), "{message}");
    }
}
