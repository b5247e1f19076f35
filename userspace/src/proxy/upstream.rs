//! Connections to upstream endpoints: a small pool of HTTP/1.1 keep-alive connections per
//! endpoint address, built on `hyper::client::conn::http1`, over plain TCP or, for a pool made
//! `with_tls`, over TLS.
//!
//! A request is handed back to the caller whenever it provably never reached the upstream
//! (connect refused or timed out, or the connection closed before the request was written), so
//! the caller can try another endpoint with the same, still unread, request body. A connection
//! goes back to the pool only once its response body has been read to the end.

use std::{
    collections::HashMap,
    error::Error as StdError,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::backend_tls::{connect_task, UpstreamTls};

/// How long a pooled connection may take to become ready for its next request: normally
/// microseconds after its previous response ended; longer only while the previous request body
/// is still uploading, and then a fresh connection is the better choice.
const POOLED_READY_WAIT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Give up on an endpoint that neither accepts nor refuses within this time.
    pub connect_timeout: Duration,
    /// Close pooled connections unused for this long.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint; the least recently used beyond this are closed.
    pub max_idle_per_upstream: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_upstream: 32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to upstream {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connecting to upstream {addr}: no answer within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS handshake with upstream {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with upstream {addr}: no answer within {timeout:?}")]
    TlsTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP/1.1 handshake with upstream {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("exchange with upstream {addr}: {source}")]
    Exchange {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// Why [`UpstreamPool::send`] produced no response.
#[derive(Debug)]
pub enum SendError<B> {
    /// Nothing reached the upstream: here is the request back, to try elsewhere.
    NotSent {
        request: Box<Request<B>>,
        error: UpstreamError,
    },
    /// The request was at least partly written, so it cannot be replayed.
    Failed(UpstreamError),
}

/// An upstream's response head, and its body still streaming from the upstream.
#[derive(Debug)]
pub struct UpstreamResponse<B> {
    pub response: Response<UpstreamBody<B>>,
    /// From handing the request to the connection to receiving the response head.
    pub response_time: Duration,
}

/// Keep-alive connections per upstream address; cheap to clone, clones share the pool.
pub struct UpstreamPool<B> {
    shared: Arc<PoolShared<B>>,
}

impl<B> Clone for UpstreamPool<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct PoolShared<B> {
    settings: PoolSettings,
    /// TLS around every new connection, for `ssl_backend` services.
    tls: Option<UpstreamTls>,
    idle: Mutex<HashMap<SocketAddr, Vec<IdleConnection<B>>>>,
}

struct IdleConnection<B> {
    sender: SendRequest<B>,
    idle_since: Instant,
}

impl<B> UpstreamPool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    pub fn new(settings: PoolSettings) -> Self {
        Self::with_transport(settings, None)
    }

    /// A pool whose connections speak TLS to the upstream.
    pub fn with_tls(settings: PoolSettings, tls: UpstreamTls) -> Self {
        Self::with_transport(settings, Some(tls))
    }

    fn with_transport(settings: PoolSettings, tls: Option<UpstreamTls>) -> Self {
        Self {
            shared: Arc::new(PoolShared {
                settings,
                tls,
                idle: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Sends `request` to `addr` on a pooled connection, or on a new one when none is usable.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut request: Request<B>,
    ) -> Result<UpstreamResponse<B>, SendError<B>> {
        loop {
            let (mut sender, pooled) = match self.checkout(addr).await {
                Some(sender) => (sender, true),
                None => match self.connect(addr).await {
                    Ok(sender) => (sender, false),
                    Err(error) => {
                        let request = Box::new(request);
                        return Err(SendError::NotSent { request, error });
                    }
                },
            };
            let sent_at = Instant::now();
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let response_time = sent_at.elapsed();
                    let checkin = Checkin {
                        pool: Arc::clone(&self.shared),
                        addr,
                        sender,
                    };
                    let response = response.map(|body| UpstreamBody::new(body, checkin));
                    return Ok(UpstreamResponse {
                        response,
                        response_time,
                    });
                }
                Err(mut failure) => {
                    let unsent = failure.take_message();
                    let error = UpstreamError::Exchange {
                        addr,
                        source: failure.into_error(),
                    };
                    match unsent {
                        // The upstream closed an idle connection just as it was picked: routine
                        // for keep-alive, so try the next pooled one or a fresh connection.
                        Some(unsent) if pooled => {
                            debug!(%addr, %error, "pooled upstream connection closed; retrying");
                            request = unsent;
                        }
                        Some(request) => {
                            let request = Box::new(request);
                            return Err(SendError::NotSent { request, error });
                        }
                        None => return Err(SendError::Failed(error)),
                    }
                }
            }
        }
    }

    /// Closes connections idle for longer than the idle timeout, for every upstream.
    pub fn evict_expired(&self) {
        let idle_timeout = self.shared.settings.idle_timeout;
        let mut idle = self.shared.lock_idle();
        idle.retain(|_, connections| {
            connections.retain(|connection| connection.is_usable(idle_timeout));
            !connections.is_empty()
        });
    }

    /// Idle connections held for `addr`.
    #[cfg(test)]
    pub fn idle_count(&self, addr: SocketAddr) -> usize {
        self.shared.lock_idle().get(&addr).map_or(0, Vec::len)
    }

    /// The most recently used idle connection to `addr` that is ready for a request.
    async fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<B>> {
        loop {
            let mut sender = self.shared.take_idle(addr)?;
            match tokio::time::timeout(POOLED_READY_WAIT, sender.ready()).await {
                Ok(Ok(())) => return Some(sender),
                Ok(Err(error)) => debug!(%addr, %error, "discarding closed upstream connection"),
                Err(_) => debug!(%addr, "discarding upstream connection that stayed busy"),
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<B>, UpstreamError> {
        let timeout = self.shared.settings.connect_timeout;
        let stream = connect_task(addr, self.shared.tls.as_ref(), timeout).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        // The connection task ends when the upstream closes or the last sender is dropped.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%addr, %error, "upstream connection ended with an error");
            }
        });
        debug!(%addr, "connected to upstream");
        Ok(sender)
    }
}

impl<B> PoolShared<B> {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<IdleConnection<B>>>> {
        // The map stays consistent even if a holder panicked: every update is a single push/pop.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<SendRequest<B>> {
        let idle_timeout = self.settings.idle_timeout;
        let mut idle = self.lock_idle();
        let connections = idle.get_mut(&addr)?;
        connections.retain(|connection| connection.is_usable(idle_timeout));
        let newest = connections.pop();
        if connections.is_empty() {
            idle.remove(&addr);
        }
        newest.map(|connection| connection.sender)
    }

    fn put(&self, addr: SocketAddr, sender: SendRequest<B>) {
        if sender.is_closed() || self.settings.max_idle_per_upstream == 0 {
            return;
        }
        let mut idle = self.lock_idle();
        let connections = idle.entry(addr).or_default();
        if connections.len() >= self.settings.max_idle_per_upstream {
            connections.remove(0);
        }
        connections.push(IdleConnection {
            sender,
            idle_since: Instant::now(),
        });
    }
}

impl<B> IdleConnection<B> {
    fn is_usable(&self, idle_timeout: Duration) -> bool {
        !self.sender.is_closed() && self.idle_since.elapsed() < idle_timeout
    }
}

/// What a response body needs to hand its connection back to the pool.
struct Checkin<B> {
    pool: Arc<PoolShared<B>>,
    addr: SocketAddr,
    sender: SendRequest<B>,
}

/// An upstream response body that returns its connection to the pool once read to the end,
/// and closes it if dropped earlier (the rest of the body would still be on the wire).
pub struct UpstreamBody<B> {
    incoming: Incoming,
    checkin: Option<Checkin<B>>,
    finished: bool,
}

impl<B> UpstreamBody<B> {
    fn new(incoming: Incoming, checkin: Checkin<B>) -> Self {
        // Bodies that are empty by construction (HEAD, 204, 304) may never be polled.
        let finished = incoming.is_end_stream();
        Self {
            incoming,
            checkin: Some(checkin),
            finished,
        }
    }

    fn release_connection(&mut self) {
        if let Some(Checkin { pool, addr, sender }) = self.checkin.take() {
            pool.put(addr, sender);
        }
    }
}

impl<B> std::fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("incoming", &self.incoming)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<B> Body for UpstreamBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.incoming).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                // Trailers are always last; a length-delimited body ends with its last byte.
                if frame.is_trailers() || self.incoming.is_end_stream() {
                    self.finished = true;
                    self.release_connection();
                }
            }
            Some(Err(_)) => self.checkin = None,
            None => {
                self.finished = true;
                self.release_connection();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl<B> Drop for UpstreamBody<B> {
    fn drop(&mut self) {
        if self.finished {
            self.release_connection();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::proxy::test_support::{refused_addr, EchoBackend};

    fn get(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
        Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::new())
            .unwrap()
    }

    async fn read_to_end(upstream: UpstreamResponse<Empty<Bytes>>) -> Bytes {
        let body = upstream.response.into_body().collect().await.unwrap();
        body.to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let backend = EchoBackend::start().await;
        let pool = UpstreamPool::new(PoolSettings::default());
        for _ in 0..5 {
            let response = pool
                .send(backend.addr, get(backend.addr, "/"))
                .await
                .unwrap();
            assert_eq!(response.response.status(), 200);
            read_to_end(response).await;
        }
        assert_eq!(backend.connections_accepted(), 1);
        assert_eq!(pool.idle_count(backend.addr), 1);
    }

    #[tokio::test]
    async fn connection_returns_to_pool_only_after_body_end() {
        let backend = EchoBackend::start().await;
        let pool = UpstreamPool::new(PoolSettings::default());
        let response = pool
            .send(backend.addr, get(backend.addr, "/"))
            .await
            .unwrap();
        assert_eq!(pool.idle_count(backend.addr), 0);
        read_to_end(response).await;
        assert_eq!(pool.idle_count(backend.addr), 1);
    }

    #[tokio::test]
    async fn abandoned_body_closes_its_connection() {
        let backend = EchoBackend::start().await;
        let pool = UpstreamPool::new(PoolSettings::default());
        drop(
            pool.send(backend.addr, get(backend.addr, "/"))
                .await
                .unwrap(),
        );
        assert_eq!(pool.idle_count(backend.addr), 0);
        let response = pool
            .send(backend.addr, get(backend.addr, "/"))
            .await
            .unwrap();
        read_to_end(response).await;
        assert_eq!(backend.connections_accepted(), 2);
    }

    #[tokio::test]
    async fn refused_connect_hands_the_request_back() {
        let pool = UpstreamPool::new(PoolSettings::default());
        let addr = refused_addr().await;
        match pool.send(addr, get(addr, "/kept")).await {
            Err(SendError::NotSent { request, error }) => {
                assert_eq!(request.uri(), "/kept");
                assert!(matches!(error, UpstreamError::Connect { .. }), "{error}");
            }
            other => panic!("expected NotSent, got {other:?}"),
        }
    }

    /// Answers one request per connection, then closes without saying so (no
    /// `Connection: close`), like a backend whose keep-alive timeout just expired.
    async fn silently_closing_backend() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn pooled_connection_closed_by_upstream_is_replaced() {
        let (addr, accepted) = silently_closing_backend().await;
        let pool = UpstreamPool::new(PoolSettings::default());
        for _ in 0..2 {
            let response = pool.send(addr, get(addr, "/")).await.unwrap();
            assert_eq!(read_to_end(response).await, "ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let backend = EchoBackend::start().await;
        let pool = UpstreamPool::new(PoolSettings {
            idle_timeout: Duration::from_millis(50),
            ..PoolSettings::default()
        });
        let response = pool
            .send(backend.addr, get(backend.addr, "/"))
            .await
            .unwrap();
        read_to_end(response).await;
        assert_eq!(pool.idle_count(backend.addr), 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        pool.evict_expired();
        assert_eq!(pool.idle_count(backend.addr), 0);

        let response = pool
            .send(backend.addr, get(backend.addr, "/"))
            .await
            .unwrap();
        read_to_end(response).await;
        assert_eq!(backend.connections_accepted(), 2);
    }
}
