//! Connections to upstream endpoints: a small pool of HTTP/1.1 keep-alive connections per
//! endpoint address, over plain TCP or, for a pool made `with_tls`, over TLS, with nginx's
//! upstream timeouts. Each exchange is driven by the request that makes it
//! ([`exchange`], [`response_body`]); a connection has no task of its own.
//!
//! A request is handed back to the caller whenever it provably never reached the upstream
//! (connect refused or timed out, or the connection failed before any of the request was
//! written and before its body was read), so the caller can try another endpoint with the
//! same, still unread, request body. A connection goes back to the pool only once its response
//! body has been read to the end, and is checked for a close by the upstream when taken out.
//!
//! An upstream may still close a pooled connection as a request goes out on it: its keep-alive
//! timeout ends while the request is on the wire. As nginx does with a cached connection, an
//! idempotent request whose body can be sent again ([`ReplayBody`]) is then sent once more on a
//! new connection to the same endpoint, provided the upstream answered nothing before closing;
//! the caller sees one try. Idle connections are closed by the pool before the common 5 s
//! server keep-alive runs out (see [`PoolSettings::idle_timeout`]), so that race stays rare.
//!
//! Endpoints that leave the route table are drained ([`UpstreamPool::retain_endpoints`]): their
//! idle connections are closed at once, busy ones finish their exchange and are closed after it,
//! and whatever is still busy when the drain timeout ends is aborted.

mod exchange;
#[cfg(test)]
mod framing_tests;
#[cfg(test)]
mod pool_tests;
mod response_body;
mod timed_stream;

use foldhash::HashMap;
use std::{
    collections::HashSet,
    error::Error as StdError,
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use tracing::{debug, info};

pub use self::{exchange::ExchangeError, response_body::UpstreamBody};
use self::{
    exchange::{Connection, Failure},
    response_body::BodyPlan,
    timed_stream::{DrainAbort, TimedStream},
};
use super::{
    backend_tls::{connect_task, TaskStream, UpstreamTls},
    retry::{is_idempotent, ReplayBody},
};
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// `ConnectTimeout`: give up on an endpoint that neither accepts nor refuses within this.
    pub connect_timeout: Duration,
    /// `SendTimeout`: fail an exchange when the upstream accepts no request bytes for this long.
    pub send_timeout: Duration,
    /// `ReadTimeout`: fail an exchange when the upstream sends nothing for this long after the
    /// proxy last wrote to or read from it.
    pub read_timeout: Duration,
    /// Close pooled connections unused for this long: shorter than the upstream's own
    /// keep-alive timeout, so that the pool, not the upstream, closes idle connections.
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint; the least recently used beyond this are closed.
    pub max_idle_per_upstream: usize,
}

impl Default for PoolSettings {
    /// Interlock's defaults for the three timeouts.
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(600),
            send_timeout: Duration::from_secs(600),
            read_timeout: Duration::from_secs(600),
            // Below the 5 s for which Apache httpd, Node.js and uvicorn keep an idle
            // connection by default: a connection the upstream is about to close is closed
            // here first rather than picked for a request that the close would fail. (nginx's
            // upstream `keepalive_timeout` is 60 s.) The replay on a new connection covers
            // servers that close sooner.
            idle_timeout: Duration::from_secs(4),
            // Enough for a busy worker's concurrency to one endpoint: with fewer, every burst
            // closes connections it will open again a moment later (nginx's `keepalive 32`
            // did that for 6% of requests in the bench), while idle ones still go after
            // `idle_timeout`.
            max_idle_per_upstream: 256,
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
        source: ExchangeError,
    },
    /// A WebSocket upgrade's exchange, made on hyper's client, which does the upgrade.
    #[error("WebSocket upgrade with upstream {addr}: {source}")]
    Upgrade {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Whether the endpoint could not be reached at all, as opposed to one exchange failing.
    pub fn is_unreachable(&self) -> bool {
        !matches!(self, Self::Exchange { .. } | Self::Upgrade { .. })
    }

    /// The timeout that ended the exchange, if one did.
    pub fn stall(&self) -> Option<Stall> {
        self.causes().find_map(|cause| {
            cause
                .downcast_ref::<io::Error>()?
                .get_ref()?
                .downcast_ref::<Stall>()
                .copied()
        })
    }

    /// The request body's own error, when reading the request body is what failed the exchange.
    pub fn body_error<E: StdError + 'static>(&self) -> Option<&E> {
        self.causes().find_map(|cause| cause.downcast_ref::<E>())
    }

    fn causes(&self) -> impl Iterator<Item = &(dyn StdError + 'static)> {
        let first: &(dyn StdError + 'static) = self;
        std::iter::successors(Some(first), |error| (*error).source())
    }
}

/// An upstream that stopped making progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stall {
    #[error("upstream sent nothing for {0:?} (ReadTimeout)")]
    Read(Duration),
    #[error("upstream accepted nothing for {0:?} (SendTimeout)")]
    Write(Duration),
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
pub struct UpstreamResponse {
    pub response: Response<UpstreamBody>,
    /// From handing the request to the connection to receiving the response head.
    pub response_time: Duration,
}

/// Keep-alive connections per upstream address; cheap to clone, clones share the pool.
pub struct UpstreamPool {
    shared: Arc<PoolShared>,
}

impl Clone for UpstreamPool {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct PoolShared {
    settings: PoolSettings,
    /// TLS around every new connection, for `ssl_backend` services.
    tls: Option<UpstreamTls>,
    /// foldhash: endpoint addresses come from the routes, and it is looked up per request.
    endpoints: Mutex<HashMap<SocketAddr, Endpoint>>,
    next_generation: AtomicU64,
}

/// The connections of one endpoint since it (last) entered the pool. A drained endpoint's
/// entry is removed, so connections of an older generation never return to the pool.
struct Endpoint {
    generation: u64,
    idle: Vec<IdleConnection>,
    /// Aborts every connection of this generation.
    abort: Arc<DrainAbort>,
}

struct IdleConnection {
    connection: Box<Connection>,
    idle_since: Instant,
}

/// A connection's place in the pool: which endpoint generation it belongs to.
#[derive(Clone)]
struct Membership {
    addr: SocketAddr,
    generation: u64,
}

impl UpstreamPool {
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
                endpoints: Mutex::new(HashMap::default()),
                next_generation: AtomicU64::new(0),
            }),
        }
    }

    /// Sends `request` to `addr` on a pooled connection, or on a new one when none is usable.
    /// An idempotent request whose pooled connection the upstream closes unanswered is sent
    /// once more on a new connection (see the module's documentation).
    pub async fn send<B>(
        &self,
        addr: SocketAddr,
        mut request: Request<B>,
    ) -> Result<UpstreamResponse, SendError<B>>
    where
        B: ReplayBody<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let mut pool_allowed = true;
        loop {
            let idle = match pool_allowed {
                true => self.shared.take_idle(addr),
                false => None,
            };
            let (mut connection, membership, pooled) = match idle {
                Some((connection, membership)) => (connection, membership, true),
                // Boxed: connecting (TLS included) takes KiBs of future that every request
                // would carry, and move into its box, though a pooled connection is the rule.
                None => match Box::pin(self.connect(addr)).await {
                    Ok((connection, membership)) => (connection, membership, false),
                    Err(error) => {
                        let request = Box::new(request);
                        return Err(SendError::NotSent { request, error });
                    }
                },
            };
            // Taken before the exchange reads the body. Only for a pooled connection: a new one
            // that fails so is an upstream that fails, and nginx would not replay on it either.
            let replay = match pooled && is_idempotent(request.method()) {
                true => request.body().replay(),
                false => None,
            };
            let sent_at = Instant::now();
            let failure = match connection.exchange(request).await {
                Ok(head) => {
                    let response_time = sent_at.elapsed();
                    let plan = BodyPlan::of(&head).map_err(|source| {
                        SendError::Failed(UpstreamError::Exchange { addr, source })
                    })?;
                    let checkin = Checkin {
                        pool: Arc::clone(&self.shared),
                        membership,
                    };
                    let body = UpstreamBody::new(connection, plan, checkin);
                    return Ok(UpstreamResponse {
                        response: Response::from_parts(head.parts, body),
                        response_time,
                    });
                }
                Err(failure) => failure,
            };
            match (failure, replay) {
                // The upstream closed an idle connection just as it was picked: routine for
                // keep-alive, so try the next pooled one or a fresh connection.
                (Failure::NotSent(unsent, error), _) if pooled => {
                    debug!(%addr, %error, "pooled upstream connection closed; retrying");
                    request = *unsent;
                }
                (Failure::NotSent(request, source), _) => {
                    let error = UpstreamError::Exchange { addr, source };
                    return Err(SendError::NotSent { request, error });
                }
                // The keep-alive race: the upstream closed the connection as the request went
                // out on it. Once, and on a new connection: the other idle ones are as old.
                (Failure::Unanswered(head, error), Some(body)) => {
                    debug!(%addr, %error, "pooled upstream connection closed unanswered; replaying");
                    request = Request::from_parts(*head, body);
                    pool_allowed = false;
                }
                (Failure::Unanswered(_, source) | Failure::Failed(source), _) => {
                    return Err(SendError::Failed(UpstreamError::Exchange { addr, source }))
                }
            }
        }
    }

    /// `ConnectTimeout`.
    pub fn connect_timeout(&self) -> Duration {
        self.shared.settings.connect_timeout
    }

    /// Drains every endpoint not in `current`: its idle connections are closed now, its busy
    /// ones after their exchange, and any still busy after `drain_timeout` are aborted.
    pub fn retain_endpoints(&self, current: &HashSet<SocketAddr>, drain_timeout: Duration) {
        let drained: Vec<(SocketAddr, Endpoint)> = {
            let mut endpoints = self.shared.lock_endpoints();
            let gone: Vec<SocketAddr> = endpoints
                .keys()
                .filter(|addr| !current.contains(addr))
                .copied()
                .collect();
            gone.into_iter()
                .filter_map(|addr| Some((addr, endpoints.remove(&addr)?)))
                .collect()
        };
        for (addr, endpoint) in drained {
            info!(
                %addr,
                idle_closed = endpoint.idle.len(),
                ?drain_timeout,
                "upstream endpoint left the routes: draining"
            );
            let abort = endpoint.abort;
            tokio::spawn(async move {
                tokio::time::sleep(drain_timeout).await;
                abort.abort();
            });
        }
    }

    /// Closes connections idle for longer than the idle timeout, for every upstream.
    pub fn evict_expired(&self) {
        let idle_timeout = self.shared.settings.idle_timeout;
        for endpoint in self.shared.lock_endpoints().values_mut() {
            endpoint
                .idle
                .retain_mut(|connection| connection.is_usable(idle_timeout));
        }
    }

    /// Idle connections held for `addr`.
    #[cfg(test)]
    pub fn idle_count(&self, addr: SocketAddr) -> usize {
        self.shared
            .lock_endpoints()
            .get(&addr)
            .map_or(0, |endpoint| endpoint.idle.len())
    }

    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<(Box<Connection>, Membership), UpstreamError> {
        let (stream, membership) = self.connect_timed(addr).await?;
        debug!(%addr, "connected to upstream");
        Ok((Box::new(Connection::new(stream)), membership))
    }

    /// A connection to `addr` of its own, never pooled (a WebSocket's), with the pool's TLS
    /// and timeouts, aborted as the pool's are when its endpoint's drain runs out.
    pub async fn connect_dedicated(
        &self,
        addr: SocketAddr,
    ) -> Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static, UpstreamError> {
        let (stream, _membership) = self.connect_timed(addr).await?;
        Ok(stream)
    }

    async fn connect_timed(
        &self,
        addr: SocketAddr,
    ) -> Result<(TimedStream<TaskStream>, Membership), UpstreamError> {
        let settings = &self.shared.settings;
        let stream = connect_task(addr, self.shared.tls.as_ref(), settings.connect_timeout).await?;
        let (membership, abort) = self.shared.join(addr);
        let stream = TimedStream::new(
            stream,
            abort.signal(),
            settings.read_timeout,
            settings.send_timeout,
        );
        Ok((stream, membership))
    }
}

impl PoolShared {
    fn lock_endpoints(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Endpoint>> {
        // The map stays consistent even if a holder panicked: every update is a single change.
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new connection to `addr` with the endpoint's current generation.
    fn join(&self, addr: SocketAddr) -> (Membership, Arc<DrainAbort>) {
        let mut endpoints = self.lock_endpoints();
        let endpoint = endpoints.entry(addr).or_insert_with(|| Endpoint {
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            idle: Vec::new(),
            abort: Arc::default(),
        });
        let membership = Membership {
            addr,
            generation: endpoint.generation,
        };
        (membership, Arc::clone(&endpoint.abort))
    }

    /// The most recently used idle connection to `addr` that can take a request; the ones
    /// found closed or expired on the way are dropped.
    fn take_idle(&self, addr: SocketAddr) -> Option<(Box<Connection>, Membership)> {
        let idle_timeout = self.settings.idle_timeout;
        let mut endpoints = self.lock_endpoints();
        let endpoint = endpoints.get_mut(&addr)?;
        let membership = Membership {
            addr,
            generation: endpoint.generation,
        };
        while let Some(mut newest) = endpoint.idle.pop() {
            if newest.is_usable(idle_timeout) {
                return Some((newest.connection, membership));
            }
            debug!(%addr, "discarding closed or expired upstream connection");
        }
        None
    }

    fn put(&self, membership: Membership, connection: Box<Connection>) {
        if self.settings.max_idle_per_upstream == 0 {
            return;
        }
        let mut endpoints = self.lock_endpoints();
        let Some(endpoint) = endpoints
            .get_mut(&membership.addr)
            .filter(|endpoint| endpoint.generation == membership.generation)
        else {
            debug!(addr = %membership.addr, "closing connection to a drained upstream endpoint");
            return;
        };
        if endpoint.idle.len() >= self.settings.max_idle_per_upstream {
            endpoint.idle.remove(0);
        }
        endpoint.idle.push(IdleConnection {
            connection,
            idle_since: Instant::now(),
        });
    }
}

impl IdleConnection {
    fn is_usable(&mut self, idle_timeout: Duration) -> bool {
        self.idle_since.elapsed() < idle_timeout && self.connection.stream.is_reusable_idle()
    }
}

/// What a response body needs to hand its connection back to the pool.
pub struct Checkin {
    pool: Arc<PoolShared>,
    membership: Membership,
}

impl Checkin {
    fn put(self, connection: Box<Connection>) {
        self.pool.put(self.membership, connection);
    }
}
