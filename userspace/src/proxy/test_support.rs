//! Test fixtures on real sockets: the proxy serving on 127.0.0.1 (also with its access log to
//! read back) and its route tables; the backends it is tested against are in
//! [`super::test_backends`], the clients in [`super::test_clients`] (both re-exported here).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{serve, ProxySettings, Router};
use crate::routes::{Balance, Route, RouteTable, Transport, ROOT_CONTEXT};

/// The proxy serving on an ephemeral 127.0.0.1 port, its router open to route updates, until
/// dropped or shut down.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub router: Arc<Router>,
    pub shutdown: CancellationToken,
    pub served: JoinHandle<anyhow::Result<()>>,
}

impl RunningProxy {
    /// One round-robin service per host (see [`table`]).
    pub async fn start(routes: &[(&str, &[SocketAddr])]) -> Self {
        Self::start_with_max_connections(routes, 64).await
    }

    pub async fn start_with_max_connections(
        routes: &[(&str, &[SocketAddr])],
        max_connections: usize,
    ) -> Self {
        let settings = ProxySettings {
            max_connections,
            ..ProxySettings::default()
        };
        Self::start_with(routes, settings).await
    }

    pub async fn start_with_table(table: &RouteTable) -> Self {
        Self::serve(table, ProxySettings::default()).await
    }

    /// The proxy with `settings`, but always with the test proxy id.
    pub async fn start_with(routes: &[(&str, &[SocketAddr])], settings: ProxySettings) -> Self {
        Self::serve(&table(routes), settings).await
    }

    /// The proxy with `settings` (but the test proxy id) serving `table`.
    pub async fn start_with_table_and(table: &RouteTable, settings: ProxySettings) -> Self {
        Self::serve(table, settings).await
    }

    /// The proxy's client sockets with a send buffer of `bytes` (as the kernel rounds it): its
    /// writes to a client block as soon as that client stops reading.
    pub async fn start_with_send_buffer(
        routes: &[(&str, &[SocketAddr])],
        bytes: u32,
        settings: ProxySettings,
    ) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        // Accepted sockets inherit the listener's buffer sizes.
        socket.set_send_buffer_size(bytes).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(64).unwrap();
        Self::serve_on(listener, &table(routes), settings)
    }

    /// Listening on every address of both families, as `xlb run` does ([`super::any_address`]).
    pub async fn start_on_any_address(routes: &[(&str, &[SocketAddr])]) -> Self {
        let listener = super::bind_reuseport(super::any_address(0)).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        Self::serve_on(listener, &table(routes), ProxySettings::default())
    }

    async fn serve(table: &RouteTable, settings: ProxySettings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve_on(listener, table, settings)
    }

    fn serve_on(listener: TcpListener, table: &RouteTable, settings: ProxySettings) -> Self {
        let addr = listener.local_addr().unwrap();
        let router = Router::new();
        router.update(table);
        let settings = ProxySettings {
            proxy_id: "lb-test-1".into(),
            ..settings
        };
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(
            listener,
            Arc::clone(&router),
            settings,
            shutdown.clone(),
        ));
        Self {
            addr,
            router,
            shutdown,
            served,
        }
    }

    /// With `MaxConnections` `max_connections`, and a watch on its accept queue. The watch
    /// holds the listening socket open after the proxy has closed its own.
    pub async fn start_watching_accepts(
        routes: &[(&str, &[SocketAddr])],
        max_connections: usize,
    ) -> (Self, AcceptQueue) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let watch = AcceptQueue(listener.try_clone().unwrap());
        let listener = TcpListener::from_std(listener).unwrap();
        let settings = ProxySettings {
            max_connections,
            ..ProxySettings::default()
        };
        (Self::serve_on(listener, &table(routes), settings), watch)
    }

    pub async fn client(&self) -> TestClient {
        TestClient::connect(self.addr).await
    }

    /// One request on a fresh client connection.
    pub async fn get(&self, host: &str, path: &str) -> TestResponse {
        self.client().await.get(host, path).await
    }

    /// Sends `request` as raw bytes on a fresh connection and reads until the proxy closes it.
    pub async fn raw(&self, request: &[u8]) -> RawExchange {
        RawExchange::run(self.addr, request).await
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The proxy's listening socket, seen from the test.
pub struct AcceptQueue(std::net::TcpListener);

impl AcceptQueue {
    /// Connections the kernel has established and the proxy has not accepted: what a listening
    /// socket reports as `tcpi_unacked` in its TCP_INFO.
    pub fn waiting(&self) -> u32 {
        use std::os::fd::AsRawFd;
        // SAFETY: all zeroes is a valid `tcp_info` (plain integers).
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut length = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` and `length` are valid for writes of `length` bytes, and the
        // descriptor is open for as long as `self`.
        let result = unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut length,
            )
        };
        assert_eq!(result, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_unacked
    }
}

/// A proxy writing its access log to a fresh file: what each request tried, in order.
pub struct LoggingProxy {
    pub proxy: RunningProxy,
    path: PathBuf,
}

impl LoggingProxy {
    /// The proxy with `settings` and an access log, serving `table`.
    pub async fn start(table: &RouteTable, settings: ProxySettings) -> Self {
        let path = std::env::temp_dir().join(format!("xlb-access-{}.log", uuid::Uuid::new_v4()));
        let settings = ProxySettings {
            access_log_path: Some(path.clone()),
            ..settings
        };
        let proxy = RunningProxy::start_with_table_and(table, settings).await;
        Self { proxy, path }
    }

    /// Shuts the proxy down, which flushes the log, and returns its lines.
    pub async fn lines(mut self) -> Vec<String> {
        self.proxy.shutdown.cancel();
        (&mut self.proxy.served).await.unwrap().unwrap();
        let text = std::fs::read_to_string(&self.path).unwrap();
        std::fs::remove_file(&self.path).unwrap();
        text.lines().map(str::to_owned).collect()
    }
}

/// A route table from `(host, routes)` pairs and a default backend.
pub fn table_of(hosts: Vec<(&str, Vec<Route>)>, default_backend: Option<Route>) -> RouteTable {
    RouteTable {
        routes: hosts
            .into_iter()
            .map(|(host, routes)| (host.to_owned(), routes))
            .collect(),
        default_backend,
        rejected: Vec::new(),
    }
}

/// A route table with one round-robin service per host, named `svc-HOST`.
pub fn table(routes: &[(&str, &[SocketAddr])]) -> RouteTable {
    let routes: BTreeMap<_, _> = routes
        .iter()
        .map(|(host, endpoints)| {
            let route = route(&format!("svc-{host}"), endpoints);
            (host.to_string(), vec![route])
        })
        .collect();
    RouteTable {
        routes,
        ..RouteTable::default()
    }
}

/// A plain route of `service`: every path, round robin, no redirect.
pub fn route(service: &str, endpoints: &[SocketAddr]) -> Route {
    Route {
        service: service.to_owned(),
        context_root: ROOT_CONTEXT.to_owned(),
        context_root_rewrite: false,
        endpoints: endpoints.to_vec(),
        balance: Balance::RoundRobin,
        ssl_only: false,
        redirects: Vec::new(),
        transport: Transport::default(),
    }
}

/// Waits (at most five seconds) until `condition` holds.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("still not true after 5 s: {what}");
}

pub use super::{test_backends::*, test_clients::*};
