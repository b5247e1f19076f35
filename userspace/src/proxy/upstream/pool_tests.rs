//! The pool against live backends: connection reuse and when a connection goes back, the
//! keep-alive race (a pooled connection the upstream closes as a request goes out on it),
//! expiry, the drain of endpoints that leave the routes, and the upstream timeouts.

use std::{
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
};

use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame};

use super::*;
use crate::proxy::test_support::{
    eventually, keep_alive_ending_backend, refused_addr, silent_backend, unanswering_addr,
    unread_backend, EchoBackend, Hangup,
};

// The test bodies: the ones at hand can be sent again; a streaming one cannot.
impl ReplayBody for Empty<Bytes> {
    fn replay(&self) -> Option<Self> {
        Some(Self::new())
    }
}

impl ReplayBody for http_body_util::Full<Bytes> {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayBody for ZeroBody {
    fn replay(&self) -> Option<Self> {
        None
    }
}

fn get(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::new())
        .unwrap()
}

async fn read_to_end(upstream: UpstreamResponse) -> Bytes {
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

/// The keep-alive race: the pooled connection is picked as a live one and the upstream
/// closes it only once the GET is on it. The GET goes out again on a new connection, which
/// the backend's second accepted connection shows; without the replay it fails.
#[tokio::test]
async fn a_get_on_a_pooled_connection_closed_unanswered_is_replayed_on_a_new_one() {
    for hangup in [Hangup::Close, Hangup::Reset] {
        let (addr, accepted, _backend) = keep_alive_ending_backend(hangup).await;
        let pool = UpstreamPool::new(PoolSettings::default());
        let first = pool.send(addr, get(addr, "/")).await.unwrap();
        assert_eq!(read_to_end(first).await, "ok");
        assert_eq!(pool.idle_count(addr), 1, "{hangup:?}");

        let replayed = match pool.send(addr, get(addr, "/")).await {
            Ok(replayed) => replayed,
            Err(error) => panic!("{hangup:?}: {error:?}"),
        };
        assert_eq!(replayed.response.status(), 200, "{hangup:?}");
        assert_eq!(read_to_end(replayed).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "{hangup:?}");
    }
}

#[tokio::test]
async fn a_request_on_a_closed_pooled_connection_is_not_replayed_when_it_cannot_be() {
    let (addr, accepted, _backend) = keep_alive_ending_backend(Hangup::Close).await;
    let pool = UpstreamPool::new(PoolSettings::default());
    read_to_end(pool.send(addr, get(addr, "/")).await.unwrap()).await;
    // Not idempotent: sending it again could do twice what the upstream did once.
    let post = Request::post("/")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let outcome = pool.send(addr, post).await;
    assert!(matches!(outcome, Err(SendError::Failed(_))), "{outcome:?}");

    // Idempotent, but streaming: nothing to send again.
    read_to_end(pool.send(addr, get(addr, "/")).await.unwrap()).await;
    let streamed = Request::put("/")
        .header(http::header::HOST, addr.to_string())
        .body(ZeroBody { remaining: 1 })
        .unwrap();
    let outcome = pool.send(addr, streamed).await;
    assert!(matches!(outcome, Err(SendError::Failed(_))), "{outcome:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// The upstream answered something before closing: it saw the request, and whatever it
/// did with it, it is not the keep-alive race.
#[tokio::test]
async fn a_pooled_connection_closed_after_part_of_an_answer_is_not_replayed() {
    let (addr, accepted, _backend) = keep_alive_ending_backend(Hangup::AfterPartialHead).await;
    let pool = UpstreamPool::new(PoolSettings::default());
    read_to_end(pool.send(addr, get(addr, "/")).await.unwrap()).await;
    let outcome = pool.send(addr, get(addr, "/")).await;
    assert!(matches!(outcome, Err(SendError::Failed(_))), "{outcome:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
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

fn with_timeouts(read: Duration, send: Duration, connect: Duration) -> PoolSettings {
    PoolSettings {
        read_timeout: read,
        send_timeout: send,
        connect_timeout: connect,
        ..PoolSettings::default()
    }
}

#[tokio::test]
async fn retain_endpoints_closes_idle_connections_of_removed_endpoints() {
    let kept = EchoBackend::start().await;
    let removed = EchoBackend::start().await;
    let pool = UpstreamPool::new(PoolSettings::default());
    for backend in [&kept, &removed] {
        let response = pool
            .send(backend.addr, get(backend.addr, "/"))
            .await
            .unwrap();
        read_to_end(response).await;
    }
    pool.retain_endpoints(&HashSet::from([kept.addr]), Duration::from_secs(30));
    assert_eq!(pool.idle_count(removed.addr), 0);
    assert_eq!(pool.idle_count(kept.addr), 1);
    eventually("idle connection to the removed endpoint closed", || {
        removed.connections_open() == 0
    })
    .await;
    assert_eq!(kept.connections_open(), 1);
}

#[tokio::test]
async fn busy_connection_of_a_drained_endpoint_finishes_then_closes() {
    let backend = EchoBackend::start().await;
    let pool = UpstreamPool::new(PoolSettings::default());
    let in_flight = {
        let pool = pool.clone();
        let addr = backend.addr;
        tokio::spawn(async move { pool.send(addr, get(addr, "/?delay_ms=300")).await })
    };
    eventually("request reached the backend", || {
        backend.connections_open() == 1
    })
    .await;
    pool.retain_endpoints(&HashSet::new(), Duration::from_secs(30));

    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.response.status(), 200);
    read_to_end(response).await;
    assert_eq!(pool.idle_count(backend.addr), 0);
    eventually("drained connection closed after its exchange", || {
        backend.connections_open() == 0
    })
    .await;
}

#[tokio::test]
async fn drain_timeout_aborts_exchanges_still_running() {
    let backend = EchoBackend::start().await;
    let pool = UpstreamPool::new(PoolSettings::default());
    let in_flight = {
        let pool = pool.clone();
        let addr = backend.addr;
        tokio::spawn(async move { pool.send(addr, get(addr, "/?delay_ms=10000")).await })
    };
    eventually("request reached the backend", || {
        backend.connections_open() == 1
    })
    .await;
    pool.retain_endpoints(&HashSet::new(), Duration::from_millis(100));
    let outcome = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("aborted by the drain timeout")
        .unwrap();
    assert!(matches!(outcome, Err(SendError::Failed(_))), "{outcome:?}");
}

#[tokio::test]
async fn an_endpoint_back_in_the_routes_gets_a_fresh_pool() {
    let backend = EchoBackend::start().await;
    let pool = UpstreamPool::new(PoolSettings::default());
    let response = pool
        .send(backend.addr, get(backend.addr, "/"))
        .await
        .unwrap();
    pool.retain_endpoints(&HashSet::new(), Duration::from_secs(30));
    read_to_end(response).await;
    assert_eq!(pool.idle_count(backend.addr), 0, "old generation pooled");

    let response = pool
        .send(backend.addr, get(backend.addr, "/"))
        .await
        .unwrap();
    read_to_end(response).await;
    assert_eq!(pool.idle_count(backend.addr), 1);
}

#[tokio::test]
async fn read_timeout_fails_an_upstream_that_never_answers() {
    let (addr, _backend) = silent_backend().await;
    let timeout = Duration::from_millis(200);
    let pool = UpstreamPool::new(with_timeouts(timeout, Duration::from_secs(60), timeout));
    match pool.send(addr, get(addr, "/")).await {
        Err(SendError::Failed(error)) => {
            assert_eq!(error.stall(), Some(Stall::Read(timeout)), "{error}");
            assert!(!error.is_unreachable());
        }
        other => panic!("expected a read timeout, got {other:?}"),
    }
}

/// A request body of `remaining` zero bytes, sent in 1 MiB frames.
#[derive(Debug)]
struct ZeroBody {
    remaining: usize,
}

impl Body for ZeroBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        const FRAME: usize = 1 << 20;
        let size = self.remaining.min(FRAME);
        if size == 0 {
            return Poll::Ready(None);
        }
        self.remaining -= size;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![0; size])))))
    }
}

#[tokio::test]
async fn send_timeout_fails_an_upstream_that_stops_reading() {
    let (addr, _backend) = unread_backend().await;
    let timeout = Duration::from_millis(200);
    let pool = UpstreamPool::new(with_timeouts(Duration::from_secs(60), timeout, timeout));
    let request = Request::post("/upload")
        .header(http::header::HOST, addr.to_string())
        .body(ZeroBody {
            remaining: 256 << 20,
        })
        .unwrap();
    match pool.send(addr, request).await {
        Err(SendError::Failed(error)) => {
            assert_eq!(error.stall(), Some(Stall::Write(timeout)), "{error}");
        }
        Err(SendError::NotSent { error, .. }) => panic!("expected a send timeout: {error}"),
        Ok(response) => panic!(
            "expected a send timeout, got {}",
            response.response.status()
        ),
    }
}

#[tokio::test]
async fn connect_timeout_hands_the_request_back() {
    let (addr, _listener, _queued) = unanswering_addr().await;
    let timeout = Duration::from_millis(200);
    let pool = UpstreamPool::new(with_timeouts(timeout, timeout, timeout));
    match pool.send(addr, get(addr, "/kept")).await {
        Err(SendError::NotSent { request, error }) => {
            assert_eq!(request.uri(), "/kept");
            assert!(
                matches!(error, UpstreamError::ConnectTimeout { .. }),
                "{error}"
            );
            assert!(error.is_unreachable());
        }
        other => panic!("expected a connect timeout, got {other:?}"),
    }
}
