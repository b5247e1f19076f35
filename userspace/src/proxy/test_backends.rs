//! Backends on real sockets for the proxy's tests: an echo backend that reports what it
//! received as JSON, misbehaving backends (bulk, hanging up, silent, unread, ending keep-alive
//! connections), and addresses that refuse or never answer connections.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

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

/// A WebSocket server echoing every message; a plain HTTP request is refused (the handshake
/// fails and the connection is closed).
pub async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt as _, StreamExt as _};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_close() || socket.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}
