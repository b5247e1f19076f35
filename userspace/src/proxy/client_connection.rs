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

use http::{header, Response, StatusCode};
use hyper::{
    body::Incoming,
    server::conn::{http1, http1::Parts, http2},
    service::{service_fn, HttpService},
    Request,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFuture},
    task::TaskTracker,
};
use tracing::debug;

use super::{
    handler::{ProxyBody, RequestHandler},
    head_guard::{ConnectionState, HeadGuard, NextRequest},
    observed::ObservedBody,
    parking::{self, Parked, Parking},
    upgrade::upgraded_client,
    ConnectionContext, Scheme,
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
    serve(guard, service, context.shutdown, slot, parking)
}

/// A lot for the parked connections of one worker's listener, run on `tasks` until
/// `shutdown`; connections leave it on tasks of their own, as [`serve_http`] serves them.
pub fn open_lot<IO, Slot>(
    handler: &Arc<RequestHandler>,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Parking<IO, Slot>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Slot: Unpin + Send + 'static,
{
    let (parking, lot) = parking::lot();
    let resume = {
        let (handler, shutdown, tasks, parking) = (
            Arc::clone(handler),
            shutdown.clone(),
            tasks.clone(),
            parking.clone(),
        );
        move |Parked { guard, slot }: Parked<IO, Slot>| {
            let service = request_service(Arc::clone(&handler), guard.state());
            tasks.spawn(serve(
                guard,
                service,
                shutdown.clone(),
                slot,
                parking.clone(),
            ));
        }
    };
    tasks.spawn(lot.run(shutdown.clone(), resume));
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
        // Only HTTP/1 requests can switch protocols: HTTP/2 forbids `Upgrade`.
        if request.headers().contains_key(header::UPGRADE) {
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
/// a new hyper connection until the guard parks; then leave the connection in the lot.
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
                if let Err(error) = Box::pin(serve_http2(guard, service, shutdown)).await {
                    debug!(%client, %error, "HTTP/2 client connection ended with an error");
                }
                return;
            }
            Ok(NextRequest::None) => return close(&mut guard).await,
            Err(error) => {
                return debug!(client = %guard.client(), %error, "reading from the client failed")
            }
        }
        let (connection, served) =
            until_idle(http1_connection(guard, service), shutdown.as_mut()).await;
        let Parts { io, read_buf, .. } = connection.into_parts();
        guard = io.into_inner();
        if let Err(error) = served {
            return debug!(client = %guard.client(), %error, "client connection ended with an error");
        }
        if guard.state().is_upgraded() {
            let state = Arc::clone(guard.state());
            return state.upgrade.hand_over(upgraded_client(guard, read_buf));
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

/// What the client sends next, waiting for it (parked); nothing once the proxy shuts down.
async fn next_request<IO: AsyncRead + Unpin>(
    guard: &mut HeadGuard<IO>,
    mut shutdown: Pin<&mut Shutdown<'_>>,
) -> std::io::Result<NextRequest> {
    poll_fn(|cx| {
        if shutdown_begun(shutdown.as_mut(), cx) {
            return Poll::Ready(Ok(NextRequest::None));
        }
        guard.poll_next_request(cx)
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
/// on shutdown, until its request in flight has been answered.
async fn until_idle<IO, S>(
    mut connection: Box<Http1Connection<IO, S>>,
    mut shutdown: Pin<&mut Shutdown<'_>>,
) -> (Box<Http1Connection<IO, S>>, Result<(), hyper::Error>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = ObservedBody<ProxyBody>> + Unpin,
    S::Future: Unpin,
{
    let mut shutting_down = false;
    let served = poll_fn(|cx| {
        if !shutting_down && shutdown_begun(shutdown.as_mut(), cx) {
            shutting_down = true;
            Pin::new(&mut *connection).graceful_shutdown();
        }
        connection.poll_without_shutdown(cx)
    })
    .await;
    (connection, served)
}

/// HTTP/2 for the rest of the connection.
async fn serve_http2<IO, S>(
    guard: Box<HeadGuard<IO>>,
    service: S,
    mut shutdown: Pin<&mut Shutdown<'_>>,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = ObservedBody<ProxyBody>> + Send + 'static,
    S::Future: Send + 'static,
{
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(guard), service);
    let mut connection = std::pin::pin!(connection);
    let mut shutting_down = false;
    poll_fn(|cx| {
        if !shutting_down && shutdown_begun(shutdown.as_mut(), cx) {
            shutting_down = true;
            connection.as_mut().graceful_shutdown();
        }
        connection.as_mut().poll(cx)
    })
    .await
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
