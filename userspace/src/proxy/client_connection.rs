//! One client connection, plain or TLS-terminated, behind the head guard: HTTP/2 (told by its
//! connection preface) on hyper's h2 server, HTTP/1 on hyper's h1 server, until the client
//! leaves or, on shutdown, until its requests in flight have been answered.
//!
//! An HTTP/1 connection holds a hyper connection only while it has a request to serve. hyper's
//! h1 server keeps about 30 KiB per connection (read and write buffers, its state) for the
//! connection's whole life and has no way to shrink them while it waits. So once the connection
//! is idle the guard *parks* it: hyper finishes its connection as for a client that left, that
//! memory is freed, the connection's task ends, and the guard waits for the client's next bytes
//! in the worker's lot of parked connections (see [`super::parking`]). The next request gets a
//! new task and a new hyper connection. nginx keeps idle keep-alive connections cheap the same
//! way, freeing its request buffers between requests.

use std::{
    convert::Infallible,
    future::{poll_fn, Future},
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{header, Response, StatusCode, Version};
use hyper::{
    body::Incoming,
    server::conn::{http1, http1::Parts, http2},
    service::{service_fn, HttpService},
    Request,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    time::{Duration, Instant},
};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFuture},
    task::TaskTracker,
};
use tracing::debug;

use super::{
    answer::ProxyBody,
    connection_state::ConnectionState,
    deadline::LazyDeadline,
    handler::RequestHandler,
    head_guard::{HeadGuard, NextRequest},
    observed::ObservedBody,
    parking::{self, Parked, Parking},
    upgrade::upgraded_client,
    websocket, ConnectionContext, Scheme,
};

/// Serves HTTP/1.1 or HTTP/2 on one client connection, holding `slot` (its place under
/// `MaxConnections`) until it ends; parked, it waits in `parking`'s lot.
pub fn serve_http<IO, Slot>(
    io: IO,
    client: SocketAddr,
    scheme: Scheme,
    context: ConnectionContext,
    slot: Slot,
    parking: Parking<IO, Slot>,
) -> impl Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Slot: Send + 'static,
{
    let state = Arc::new(ConnectionState::new(client, scheme));
    // Boxed, so that moving it in and out of hyper's connections and the lot moves a pointer,
    // and the task does not reserve room for each place it passes through.
    let guard = Box::new(HeadGuard::new(io, context.guard, state));
    let service = request_service(context.handler, guard.state());
    serve(
        guard,
        service,
        context.shutdown,
        context.stop_now,
        slot,
        parking,
    )
}

/// A lot for the parked connections of one worker's listener, run on `tasks` until the
/// shutdown; connections leave it on tasks of their own, as [`serve_http`] serves them.
pub fn open_lot<IO, Slot>(context: &ConnectionContext, tasks: &TaskTracker) -> Parking<IO, Slot>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Slot: Unpin + Send + 'static,
{
    let (parking, lot) = parking::lot();
    let resume = {
        let (context, tasks, parking) = (context.clone(), tasks.clone(), parking.clone());
        move |Parked { guard, slot }: Parked<IO, Slot>| {
            let service = request_service(Arc::clone(&context.handler), guard.state());
            tasks.spawn(serve(
                guard,
                service,
                context.shutdown.clone(),
                context.stop_now.clone(),
                slot,
                parking.clone(),
            ));
        }
    };
    tasks.spawn(lot.run(context.shutdown.clone(), resume));
    parking
}

/// What serves each request of one connection: the handler, told when the response has ended.
fn request_service(
    handler: Arc<RequestHandler>,
    state: &Arc<ConnectionState>,
) -> impl HttpService<Incoming, ResBody = ObservedBody<ProxyBody>, Future: Unpin + Send + 'static>
       + Unpin
       + Send
       + 'static {
    let state = Arc::clone(state);
    service_fn(move |mut request: Request<Incoming>| {
        if request.version() == Version::HTTP_2 {
            // An HTTP/1 request is counted by the guard, which sees its head; an HTTP/2
            // stream here, for the connection's idle timeout.
            state.request_started();
        } else if request.headers().contains_key(header::UPGRADE) {
            // Only HTTP/1 requests can switch protocols: HTTP/2 forbids `Upgrade`.
            state.upgrade.offer(&mut request);
        }
        let handler = Arc::clone(&handler);
        let state = Arc::clone(&state);
        // Boxed: an `Unpin` future, which serving without hyper's shutdown requires, and only
        // a request in flight holds the request's several KiB.
        Box::pin(async move {
            let response = handler.handle(request, state.client, state.scheme).await;
            Ok::<_, Infallible>(tell_guard_when_done(response, state))
        })
    })
}

/// A connection's task: wait for the next request, then serve it, and whatever follows it, on
/// a new hyper connection until the guard parks; then leave the connection in the lot. After
/// `101` it relays the switched connection instead, holding the connection's slot.
///
/// Its steps are awaited one by one and its arguments are exactly what it keeps: whatever it
/// holds across an `.await` takes room in the task. One wait for the shutdown serves all the
/// steps: each step's own would take its room twice over in the task, and register with the
/// shared token (a lock every connection contends for) twice per request.
///
/// Not an `async fn`: rustc keeps an `async fn`'s arguments twice in its future, as captured
/// and as locals (rust-lang/rust#62958), 64 bytes here. The block uses the captured ones in
/// place. With them once, a plain connection's task is 384 bytes instead of 512.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn serve<IO, S, Slot>(
    mut guard: Box<HeadGuard<IO>>,
    service: S,
    shutdown_token: CancellationToken,
    stop_now: CancellationToken,
    slot: Slot,
    parking: Parking<IO, Slot>,
) -> impl Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = ObservedBody<ProxyBody>> + Unpin + Send + 'static,
    S::Future: Unpin + Send + 'static,
    Slot: Send + 'static,
{
    async move {
        let mut shutdown = std::pin::pin!(shutdown_token.cancelled());
        match next_request(&mut guard, shutdown.as_mut()).await {
            Ok(NextRequest::Http1) => {}
            Ok(NextRequest::Http2) => {
                let client = guard.client();
                // Boxed: hyper's h2 connection is several KiB, which every HTTP/1 connection's
                // task would otherwise reserve.
                let served = serve_http2(guard, service, shutdown, &stop_now);
                if let Err(error) = Box::pin(served).await {
                    debug!(%client, %error, "HTTP/2 client connection ended with an error");
                }
                return;
            }
            Ok(NextRequest::None) => return close(&mut guard).await,
            Err(error) => {
                return debug!(client = %guard.client(), %error, "reading from the client failed")
            }
        }
        let state = Arc::clone(guard.state());
        let (connection, served) = until_idle(
            http1_connection(guard, service),
            state,
            shutdown.as_mut(),
            &stop_now,
        )
        .await;
        let Parts { io, read_buf, .. } = connection.into_parts();
        guard = io.into_inner();
        match served {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                return debug!(client = %guard.client(), %error, "client connection ended with an error")
            }
            None => {
                return debug!(client = %guard.client(), "client connection cut: DrainTimeout ran out after the shutdown began")
            }
        }
        if guard.state().is_upgraded() {
            let Some(upstream) = guard.state().upgrade.take() else {
                return close(&mut guard).await;
            };
            let relayed = websocket::relay(upgraded_client(guard, read_buf), upstream);
            if stop_now.run_until_cancelled(relayed).await.is_none() {
                debug!("WebSocket cut: DrainTimeout ran out after the shutdown began");
            }
            return;
        }
        // Bytes hyper read but did not use are a body it did not read to its end: never a
        // next request's head.
        let reusable = guard.is_parked() && read_buf.is_empty();
        drop(read_buf);
        if !reusable {
            return close(&mut guard).await;
        }
        if let Err(Parked { mut guard, .. }) = parking.park(Parked { guard, slot }) {
            close(&mut guard).await;
        }
    }
}

/// What the client sends next, waiting for it (parked). Once the proxy shuts down, a request
/// that has begun to arrive is still served (hyper then closes the connection after it), and
/// a new connection still gets [`FIRST_REQUEST_GRACE`] to send its first one: its client
/// connected while the proxy was accepting and waits for an answer. An idle keep-alive
/// connection is closed, as nginx closes it; its client sends its next request again on a new
/// connection.
async fn next_request<IO: AsyncRead + Unpin>(
    guard: &mut HeadGuard<IO>,
    mut shutdown: Pin<&mut Shutdown<'_>>,
) -> std::io::Result<NextRequest> {
    // Boxed and made only on shutdown: a connection's task does not carry a timer for it.
    let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
    poll_fn(|cx| {
        let next = guard.poll_next_request(cx);
        if next.is_pending() && shutdown_begun(shutdown.as_mut(), cx) {
            let waits_for_first_request = !guard.has_had_requests()
                && grace
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(FIRST_REQUEST_GRACE)))
                    .as_mut()
                    .poll(cx)
                    .is_pending();
            if !waits_for_first_request {
                return Poll::Ready(Ok(NextRequest::None));
            }
        }
        next
    })
    .await
}

type Http1Connection<IO, S> = http1::Connection<TokioIo<Box<HeadGuard<IO>>>, S>;

/// A new hyper h1 connection on `guard`, boxed, so that a parked connection's task does not
/// keep the room for one.
fn http1_connection<IO, S>(guard: Box<HeadGuard<IO>>, service: S) -> Box<Http1Connection<IO, S>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = ObservedBody<ProxyBody>>,
{
    let limits = guard.limits();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(!limits.keepalive_timeout.is_zero())
        // The guard times request heads out, answering 408 where hyper would just close. It
        // also refuses more header lines than `max_headers` (at most hyper's default 100), so
        // hyper keeps its default: with a limit set, it copies two 100-slot arrays per head.
        .header_read_timeout(None);
    Box::new(builder.serve_connection(TokioIo::new(guard), service))
}

/// Serves `connection` until hyper is done with it (the guard parked it, or it closes), or,
/// on shutdown, until its request in flight has been answered; `None` if the hard stop came
/// first.
///
/// hyper closes a connection on which it has read nothing yet at once when asked to shut down
/// gracefully, though the client's request may be on its way: so it is asked only once the
/// guard has shown it a request (`state`'s count in flight). Until then the guard's own limits
/// bound the wait: its head timeout, and parking once idle.
async fn until_idle<IO, S>(
    mut connection: Box<Http1Connection<IO, S>>,
    state: Arc<ConnectionState>,
    mut shutdown: Pin<&mut Shutdown<'_>>,
    stop_now: &CancellationToken,
) -> (
    Box<Http1Connection<IO, S>>,
    Option<Result<(), hyper::Error>>,
)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = ObservedBody<ProxyBody>> + Unpin,
    S::Future: Unpin,
{
    let mut stop = HardStop::new(stop_now);
    let mut keep_alive_ended = false;
    let served = poll_fn(|cx| {
        match stop.poll(shutdown.as_mut(), cx) {
            Stop::Now => return Poll::Ready(None),
            Stop::Begun | Stop::Draining if !keep_alive_ended && state.in_flight() > 0 => {
                Pin::new(&mut *connection).graceful_shutdown();
                keep_alive_ended = true;
            }
            _ => {}
        }
        connection.poll_without_shutdown(cx).map(Some)
    })
    .await;
    (connection, served)
}

/// HTTP/2 for the rest of the connection: at most [`HTTP2_MAX_STREAMS`] streams at once, closed
/// (`GOAWAY`) once it has had none for `KeepaliveTimeout` (the head timeout when keep-alive is
/// off), as nginx closes idle HTTP/2 connections, and cut if the client then does not let it
/// close within [`GOAWAY_GRACE`].
async fn serve_http2<IO, S>(
    guard: Box<HeadGuard<IO>>,
    service: S,
    mut shutdown: Pin<&mut Shutdown<'_>>,
    stop_now: &CancellationToken,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = ObservedBody<ProxyBody>> + Send + 'static,
    S::Future: Send + 'static,
{
    let state = Arc::clone(guard.state());
    let limits = guard.limits();
    let idle_timeout = match limits.keepalive_timeout {
        keepalive if keepalive.is_zero() => limits.header_timeout,
        keepalive => keepalive,
    };
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_MAX_STREAMS)
        .serve_connection(TokioIo::new(guard), service);
    let mut connection = std::pin::pin!(connection);
    let mut stop = HardStop::new(stop_now);
    let mut idle = IdleTimer::new(idle_timeout);
    poll_fn(|cx| {
        match stop.poll(shutdown.as_mut(), cx) {
            Stop::Now => return Poll::Ready(Ok(())),
            Stop::Begun => connection.as_mut().graceful_shutdown(),
            Stop::Draining | Stop::Not => {}
        }
        match idle.poll(&state, cx) {
            Idle::Expired => {
                debug!(client = %state.client, "closing idle HTTP/2 client connection");
                connection.as_mut().graceful_shutdown();
            }
            Idle::GraceOver => return Poll::Ready(Ok(())),
            Idle::Busy | Idle::Waiting => {}
        }
        connection.as_mut().poll(cx)
    })
    .await
}

/// Streams an HTTP/2 client may have open at once: nginx's `http2_max_concurrent_streams`.
/// Each may hold a request body for replay (see [`super::retry`]), so this bounds what one
/// connection can make the proxy hold.
const HTTP2_MAX_STREAMS: u32 = 128;

/// How long an HTTP/2 connection told to go away (idle) may take to close before it is cut:
/// hyper waits for the client to acknowledge the `GOAWAY`, which an idle client that does not
/// read never does.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// An HTTP/2 connection's idle timeout: it runs while the connection has no stream open.
struct IdleTimer {
    timeout: Duration,
    idle_since: Option<Instant>,
    /// When the connection was told to go away for idling.
    expired_at: Option<Instant>,
    timer: LazyDeadline,
}

enum Idle {
    /// Streams are open.
    Busy,
    /// No stream open, the timeout not yet reached.
    Waiting,
    /// Idle for the whole timeout, just now: tell the client to go away.
    Expired,
    /// Told to go away, and still open after [`GOAWAY_GRACE`] without a stream.
    GraceOver,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            timeout,
            idle_since: Some(now),
            expired_at: None,
            timer: LazyDeadline::new(now + timeout),
        }
    }

    /// Where the timeout is; `cx` is woken when it runs out, or when a stream ends.
    fn poll(&mut self, state: &ConnectionState, cx: &mut Context<'_>) -> Idle {
        // Registered before the count is read: a stream ending in between still wakes us.
        state.wait_for_response(cx.waker());
        if state.in_flight() > 0 {
            self.idle_since = None;
            return Idle::Busy;
        }
        let deadline = match self.expired_at {
            Some(expired_at) => expired_at + GOAWAY_GRACE,
            None => *self.idle_since.get_or_insert_with(Instant::now) + self.timeout,
        };
        if self.timer.poll_reached(deadline, cx).is_pending() {
            return Idle::Waiting;
        }
        if self.expired_at.is_some() {
            return Idle::GraceOver;
        }
        self.expired_at = Some(Instant::now());
        // Polled again for the grace deadline, so that the timer wakes the task for it.
        let _ = self.timer.poll_reached(Instant::now() + GOAWAY_GRACE, cx);
        Idle::Expired
    }
}

/// How long a connection accepted before the shutdown began may take to send its first
/// request after it: a client's request is a round trip behind its connect at most, and a
/// connection opened ahead of need (a browser's preconnect) is not kept for long.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// How far the proxy's shutdown has come, as one connection follows it.
enum Stop {
    Not,
    /// It began just now: answer what is in flight, take nothing new.
    Begun,
    /// It began earlier; `DrainTimeout` has not run out yet.
    Draining,
    /// `DrainTimeout` ran out: end the connection now.
    Now,
}

/// The hard stop as one connection waits for it: only once the shutdown has begun, so that
/// serving registers with one token, not two.
struct HardStop<'a> {
    stop_now: &'a CancellationToken,
    waiting: Option<Pin<Box<WaitForCancellationFuture<'a>>>>,
}

impl<'a> HardStop<'a> {
    fn new(stop_now: &'a CancellationToken) -> Self {
        Self {
            stop_now,
            waiting: None,
        }
    }

    fn poll(&mut self, shutdown: Pin<&mut Shutdown<'_>>, cx: &mut Context<'_>) -> Stop {
        let begun = match &mut self.waiting {
            Some(_) => false,
            None if shutdown_begun(shutdown, cx) => {
                self.waiting = Some(Box::pin(self.stop_now.cancelled()));
                true
            }
            None => return Stop::Not,
        };
        match self
            .waiting
            .as_mut()
            .map(|waiting| waiting.as_mut().poll(cx))
        {
            Some(Poll::Ready(())) => Stop::Now,
            _ if begun => Stop::Begun,
            _ => Stop::Draining,
        }
    }
}

/// The proxy's shutdown as one connection waits for it: registered with the token once, for
/// the connection's life. It may be polled again once it has begun: it then stays ready.
type Shutdown<'a> = WaitForCancellationFuture<'a>;

/// Has the shutdown begun? If not, `cx` is woken when it does.
fn shutdown_begun(shutdown: Pin<&mut Shutdown<'_>>, cx: &mut Context<'_>) -> bool {
    shutdown.poll(cx).is_ready()
}

/// Writes the guard's answer to a refused head, if any, and closes the connection.
async fn close<IO: AsyncRead + AsyncWrite + Unpin>(guard: &mut HeadGuard<IO>) {
    if let Err(error) = guard.shutdown().await {
        debug!(%error, "closing the client connection failed");
    }
}

/// Lets the connection's guard know when the response has ended, and whether the connection
/// switched protocols with it.
fn tell_guard_when_done(
    response: Response<ProxyBody>,
    state: Arc<ConnectionState>,
) -> Response<ObservedBody<ProxyBody>> {
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        state.switched_protocols();
    }
    response.map(|body| ObservedBody::new(body, move |_| state.response_ended()))
}
