//! Test fixtures on real sockets: the proxy serving on 127.0.0.1, an echo backend that reports
//! what it received as JSON, a keep-alive test client (from any 127.0.0.0/8 address), and an
//! address that refuses connections.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{serve, BackendTlsClients, ProxySettings, Router};
use crate::routes::{Balance, Route, RouteTable, Transport, ROOT_CONTEXT};

/// The proxy serving on an ephemeral 127.0.0.1 port, its router open to route updates.
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
        Self::serve(&table(routes), max_connections).await
    }

    pub async fn start_with_table(table: &RouteTable) -> Self {
        Self::serve(table, 64).await
    }

    async fn serve(table: &RouteTable, max_connections: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new();
        router.update(table);
        let settings = ProxySettings {
            proxy_id: "lb-test-1".into(),
            max_connections,
            backend_tls: BackendTlsClients::new(None).unwrap(),
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

    pub async fn client(&self) -> TestClient {
        TestClient::connect(self.addr).await
    }

    /// One request on a fresh client connection.
    pub async fn get(&self, host: &str, path: &str) -> TestResponse {
        self.client().await.get(host, path).await
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

/// An HTTP/1.1 backend answering every request with JSON describing it: its own port, the
/// proxy-set headers, every header name, and the body. `?delay_ms=N` delays the answer.
pub struct EchoBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    accept_loop: JoinHandle<()>,
}

impl EchoBackend {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let accept_loop = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(move |request| echo(addr.port(), request));
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self {
            addr,
            accepted,
            accept_loop,
        }
    }

    /// TCP connections this backend has accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

pub async fn echo(
    port: u16,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let delay_ms = parts
        .uri
        .query()
        .and_then(|query| query.strip_prefix("delay_ms="))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let report = json!({
        "port": port,
        "method": parts.method.as_str(),
        "path": parts.uri.to_string(),
        "host": header("host"),
        "request_id": header("x-request-id"),
        "real_ip": header("x-real-ip"),
        "forwarded_for": header("x-forwarded-for"),
        "header_names": parts.headers.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
        "body": String::from_utf8_lossy(&body),
    });
    let response = Response::builder()
        .header("content-type", "application/json")
        // Connection-scoped headers a proxy must not pass on to its client.
        .header("connection", "x-backend-private")
        .header("x-backend-private", "1")
        .header("keep-alive", "timeout=60")
        .body(Full::new(Bytes::from(report.to_string())))
        .unwrap();
    Ok(response)
}

/// An address on 127.0.0.1 that refuses connections: bound once, then released.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// One keep-alive HTTP/1.1 client connection.
pub struct TestClient {
    sender: SendRequest<Full<Bytes>>,
}

impl TestClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_from(addr, IpAddr::from([127, 0, 0, 1])).await
    }

    /// A connection from `local` (any address of 127.0.0.0/8 works on Linux' loopback).
    pub async fn connect_from(addr: SocketAddr, local: IpAddr) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(local, 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        Self { sender }
    }

    pub async fn get(&mut self, host: &str, path: &str) -> TestResponse {
        let request = Request::get(path)
            .header("host", host)
            .body(Full::default())
            .unwrap();
        self.send(request).await
    }

    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> TestResponse {
        self.sender.ready().await.unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// Whether the server has closed this connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    /// The echo backend's report.
    pub fn echo(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}
