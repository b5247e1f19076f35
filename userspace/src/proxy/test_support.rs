//! Test fixtures on real sockets: the proxy serving on 127.0.0.1 (also with its access log to
//! read back), an echo backend that reports
//! what it received as JSON, misbehaving backends, a keep-alive test client (from any
//! 127.0.0.0/8 address), a raw TCP client, and addresses that refuse or never answer
//! connections.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
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
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    task::{JoinHandle, JoinSet},
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

/// An HTTP/1.1 backend answering every request with JSON describing it: its own port, the
/// proxy-set headers, every header name, and the body. `?delay_ms=N` delays the answer.
/// Dropping it kills it: the listener and every connection close at once.
pub struct EchoBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    accept_loop: JoinHandle<()>,
}

impl EchoBackend {
    pub async fn start() -> Self {
        Self::start_answering(StatusCode::OK).await
    }

    /// A backend that answers every request with `status` (and the JSON report).
    pub async fn start_answering(status: StatusCode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (accepted_count, open_count) = (Arc::clone(&accepted), Arc::clone(&open));
        let accept_loop = tokio::spawn(async move {
            // Owned by this task, so aborting it aborts every connection too.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                accepted_count.fetch_add(1, Ordering::SeqCst);
                let service = service_fn(move |request| echo(addr.port(), status, request));
                let open = OpenConnection::count(&open_count);
                connections.spawn(async move {
                    let _open = open;
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            accepted,
            open,
            accept_loop,
        }
    }

    /// TCP connections this backend has accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// TCP connections to this backend that are still open.
    pub fn connections_open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Counts an open connection until dropped, also when its task is aborted.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(open))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub async fn echo(
    port: u16,
    status: StatusCode,
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
        "forwarded_proto": header("x-forwarded-proto"),
        "header_names": parts.headers.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
        "body": String::from_utf8_lossy(&body),
    });
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        // Connection-scoped headers a proxy must not pass on to its client.
        .header("connection", "x-backend-private")
        .header("x-backend-private", "1")
        .header("keep-alive", "timeout=60")
        .body(Full::new(Bytes::from(report.to_string())))
        .unwrap();
    Ok(response)
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

/// A backend answering every request with `length` bytes of `x`, in one body frame.
pub async fn bulk_backend(length: usize) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = Bytes::from(vec![b'x'; length]);
    let accept_loop = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let body = body.clone();
            let service = service_fn(move |_| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            connections.spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
            while connections.try_join_next().is_some() {}
        }
    });
    (addr, accept_loop)
}

/// A backend that reads each request head and hangs up without answering, counting the
/// connections it accepted.
pub async fn hanging_up_backend() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let accept_loop = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted, accept_loop)
}

/// How [`keep_alive_ending_backend`] hangs up on a request it does not answer.
#[derive(Debug, Clone, Copy)]
pub enum Hangup {
    /// A FIN, as a server whose keep-alive timeout ended.
    Close,
    /// A RST, as a server that closes with SO_LINGER 0 or has crashed.
    Reset,
    /// A FIN after the start of a status line: the upstream did answer something.
    AfterPartialHead,
}

/// A backend whose keep-alive ends just as the next request arrives: on each connection it
/// answers the first request (200, body `ok`, kept alive), then reads the next request's head
/// and hangs up without answering it. A proxy pools the connection, picks it for its next
/// request as a live one, and meets the close only once that request is sent. Counts the
/// connections it accepted.
pub async fn keep_alive_ending_backend(
    hangup: Hangup,
) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    async fn read_head(stream: &mut TcpStream) -> bool {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        true
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let accept_loop = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            connections.spawn(async move {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if !read_head(&mut stream).await || stream.write_all(answer).await.is_err() {
                    return;
                }
                if !read_head(&mut stream).await {
                    return;
                }
                match hangup {
                    Hangup::Close => {}
                    Hangup::Reset => socket2::SockRef::from(&stream)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap(),
                    Hangup::AfterPartialHead => {
                        let _ = stream.write_all(b"HTTP/1.1 200").await;
                    }
                }
            });
            while connections.try_join_next().is_some() {}
        }
    });
    (addr, accepted, accept_loop)
}

/// A backend that accepts connections and reads requests but never answers.
pub async fn silent_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept_loop = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            connections.push(tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while let Ok(1..) = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {}
            }));
        }
    });
    (addr, accept_loop)
}

/// A backend that accepts connections and then neither reads nor answers.
pub async fn unread_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accept_loop = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.push(stream);
        }
    });
    (addr, accept_loop)
}

/// A listening socket whose accept queue is full, so that a further connect attempt gets no
/// answer at all, like a host that has gone away. Keep the returned values alive.
pub async fn unanswering_addr() -> (
    SocketAddr,
    tokio::net::TcpListener,
    Vec<tokio::net::TcpStream>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    // Fill the accept queue: once a connect stays pending, the queue is full.
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => queued.push(stream),
            _ => return (addr, listener, queued),
        }
    }
    panic!("the accept queue of {addr} never filled up");
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
        let local = match addr {
            SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
            SocketAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        };
        Self::connect_from(addr, local).await
    }

    /// A connection from `local` (any address of 127.0.0.0/8 works on Linux' loopback).
    pub async fn connect_from(addr: SocketAddr, local: IpAddr) -> Self {
        let socket = match local {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .unwrap();
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

/// One raw TCP connection to the proxy, for requests no HTTP client library would send.
pub struct RawConnection {
    stream: TcpStream,
}

impl RawConnection {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.unwrap(),
        }
    }

    /// A connection whose receive buffer is `bytes` (as the kernel rounds it): the proxy's
    /// writes block as soon as the client stops reading.
    pub async fn with_receive_buffer(addr: SocketAddr, bytes: u32) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        Self {
            stream: socket.connect(addr).await.unwrap(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Closes the sending side, as a client does that has nothing more to send.
    pub async fn finish_sending(&mut self) {
        self.stream.shutdown().await.unwrap();
    }

    /// Everything the proxy sends until it closes the connection (at most ten seconds).
    pub async fn read_until_closed(mut self) -> RawExchange {
        let mut received = Vec::new();
        let reading = self.stream.read_to_end(&mut received);
        let closed = match tokio::time::timeout(Duration::from_secs(10), reading).await {
            Ok(Ok(_)) => true,
            // A reset after the answer was sent still counts as closed.
            Ok(Err(_)) => true,
            Err(_) => false,
        };
        RawExchange { received, closed }
    }

    /// The next response, read without waiting for the connection to close.
    pub async fn read_response(&mut self) -> RawResponse {
        self.read_response_pausing(usize::MAX, Duration::ZERO).await
    }

    /// The next response, read as [`RawConnection::read_response`] does, but pausing for
    /// `pause` once `after` bytes of it have arrived: a client that stops reading mid-way.
    pub async fn read_response_pausing(&mut self, after: usize, pause: Duration) -> RawResponse {
        let mut received = Vec::new();
        let mut buf = [0u8; 8192];
        let mut paused = false;
        loop {
            if let Some((response, _)) = RawResponse::parse(&received) {
                return response;
            }
            if !paused && received.len() >= after {
                paused = true;
                tokio::time::sleep(pause).await;
            }
            let read = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf));
            match read.await {
                Ok(Ok(0)) => panic!("closed before a full response: {}", excerpt(&received)),
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
                Ok(Err(error)) => panic!("reading a response: {error}"),
                Err(_) => panic!("no full response within 10 s: {}", excerpt(&received)),
            }
        }
    }
}

/// The start of `received` and its length, for a failure message that stays readable.
fn excerpt(received: &[u8]) -> String {
    let start = &received[..received.len().min(300)];
    format!(
        "{} bytes: {:?}",
        received.len(),
        String::from_utf8_lossy(start)
    )
}

/// What the proxy sent on one raw connection before closing it.
#[derive(Debug)]
pub struct RawExchange {
    pub received: Vec<u8>,
    /// Whether the proxy closed the connection (within ten seconds).
    pub closed: bool,
}

impl RawExchange {
    pub async fn run(addr: SocketAddr, request: &[u8]) -> Self {
        let mut connection = RawConnection::connect(addr).await;
        connection.send(request).await;
        connection.read_until_closed().await
    }

    /// Every complete response received, in order.
    pub fn responses(&self) -> Vec<RawResponse> {
        let mut responses = Vec::new();
        let mut rest = self.received.as_slice();
        while let Some((response, length)) = RawResponse::parse(rest) {
            responses.push(response);
            rest = &rest[length..];
        }
        responses
    }

    /// The status of the only response.
    pub fn status(&self) -> u16 {
        match self.responses().as_slice() {
            [response] => response.status,
            other => panic!(
                "expected one response, got {}: {:?}",
                other.len(),
                String::from_utf8_lossy(&self.received)
            ),
        }
    }
}

/// A response parsed from raw bytes (bodies delimited by `content-length` only).
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first response in `bytes` and its length, if complete.
    fn parse(bytes: &[u8]) -> Option<(Self, usize)> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let head_length = match response.parse(bytes).ok()? {
            httparse::Status::Complete(length) => length,
            httparse::Status::Partial => return None,
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|header| {
                let value = String::from_utf8_lossy(header.value).into_owned();
                (header.name.to_ascii_lowercase(), value)
            })
            .collect();
        let body_length: usize = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .map_or(0, |(_, value)| value.parse().unwrap());
        let body = bytes.get(head_length..head_length + body_length)?.to_vec();
        let status = response.code?;
        Some((
            Self {
                status,
                headers,
                body,
            },
            head_length + body_length,
        ))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}
