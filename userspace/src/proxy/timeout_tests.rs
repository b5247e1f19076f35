//! No client connection can hang forever: a client that stops reading is cut after the send
//! timeout, idle HTTP/2 connections close at the idle timeout, WebSockets hold their connection
//! slot and close when idle, and the shutdown cuts what still runs `DrainTimeout` after it
//! began. Each test waits at most a few seconds for what the default settings would take
//! minutes, or forever, to do.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest as _, Message};

use super::{
    test_support::{
        eventually, route, table_of, websocket_echo, EchoBackend, RawConnection, RunningProxy,
    },
    ClientLimits, HandlerSettings, PoolSettings, ProxySettings,
};
use crate::routes::{RouteTable, Transport};

/// The timeouts under test: short, so that the tests take a second, not minutes.
const SHORT: Duration = Duration::from_millis(300);

/// How long a test waits for what should happen after [`SHORT`] (and a grace second).
const AT_MOST: Duration = Duration::from_secs(5);

fn settings(max_connections: usize, limits: ClientLimits) -> ProxySettings {
    ProxySettings {
        max_connections,
        handler: HandlerSettings {
            limits,
            ..HandlerSettings::default()
        },
        ..ProxySettings::default()
    }
}

/// A backend whose every response is an endless body; `released` turns true once the proxy
/// closes a connection the backend was writing to.
async fn endless_backend() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let released = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&released);
    let accept_loop = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let flag = Arc::clone(&flag);
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                let chunk = vec![b'x'; 64 << 10];
                let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n".to_vec();
                loop {
                    if stream.write_all(&out).await.is_err() {
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    out.clone_from(&chunk);
                }
            });
        }
    });
    (addr, released, accept_loop)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout_and_its_upstream_released() {
    let (backend, released, _backend) = endless_backend().await;
    let echo = EchoBackend::start().await;
    let limits = ClientLimits {
        send_timeout: SHORT,
        ..ClientLimits::default()
    };
    let routes: [(&str, &[SocketAddr]); 2] = [("app", &[backend]), ("echo", &[echo.addr])];
    let proxy = RunningProxy::start_with_send_buffer(&routes, 4096, settings(1, limits)).await;
    let mut stuck = RawConnection::with_receive_buffer(proxy.addr, 4096).await;
    stuck.send(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;

    let cut = tokio::time::timeout(AT_MOST, async {
        while !released.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "the upstream connection is still held by a client that reads nothing"
    );
    // The only connection slot is free again.
    let served = tokio::time::timeout(AT_MOST, proxy.get("echo", "/")).await;
    assert_eq!(served.expect("the slot was released").status, 200);
    let exchange = stuck.read_until_closed().await;
    assert!(exchange.closed, "the stuck client's connection stays open");
}

/// An HTTP/2 prior-knowledge connection that sends its preface and an empty SETTINGS frame,
/// then nothing, and reads nothing until told to.
async fn idle_h2c(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn idle_http2_connections_are_closed_at_the_idle_timeout_and_others_get_their_slots() {
    let backend = EchoBackend::start().await;
    let limits = ClientLimits {
        keepalive_timeout: SHORT,
        ..ClientLimits::default()
    };
    let proxy = RunningProxy::start_with(&[("app", &[backend.addr])], settings(2, limits)).await;
    let idle = [idle_h2c(proxy.addr).await, idle_h2c(proxy.addr).await];

    // Every slot is taken by an idle HTTP/2 connection until the idle timeout closes them.
    let served = tokio::time::timeout(AT_MOST, proxy.get("app", "/")).await;
    assert_eq!(
        served
            .expect("idle HTTP/2 connections hold every slot")
            .status,
        200
    );
    for mut connection in idle {
        let mut received = Vec::new();
        let closed = tokio::time::timeout(AT_MOST, connection.read_to_end(&mut received)).await;
        assert!(closed.is_ok(), "an idle HTTP/2 connection stays open");
        // A GOAWAY frame (type 7) told the client why.
        assert!(
            frame_types(&received).contains(&7),
            "no GOAWAY: {received:?}"
        );
    }
}

/// The types of the HTTP/2 frames in `bytes`, as far as they are complete.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

#[tokio::test]
async fn an_http2_stream_longer_than_the_idle_timeout_is_not_cut() {
    let backend = EchoBackend::start().await;
    let limits = ClientLimits {
        keepalive_timeout: SHORT,
        ..ClientLimits::default()
    };
    let proxy = RunningProxy::start_with(&[("app", &[backend.addr])], settings(2, limits)).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let slow = format!("http://app/slow?delay_ms={}", 3 * SHORT.as_millis());
    let request = http::Request::get(slow)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.expect("answered");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.is_empty());
}

/// `chat` relays WebSockets on `/ws` to `websocket`; `app` is served by `app`.
fn chat_and_app(websocket: SocketAddr, app: SocketAddr) -> RouteTable {
    let mut chat = route("svc-chat", &[websocket]);
    chat.transport = Transport {
        websocket_endpoints: vec!["/ws".to_owned()],
        ..Transport::default()
    };
    table_of(
        vec![
            ("app", vec![route("svc-app", &[app])]),
            ("chat", vec![chat]),
        ],
        None,
    )
}

async fn open_websocket(proxy: &RunningProxy) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let request = "ws://chat/ws".into_client_request().unwrap();
    let (mut socket, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("the upgrade goes through the proxy");
    assert_eq!(response.status(), 101);
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::text("hello")
    );
    socket
}

#[tokio::test]
async fn a_websocket_holds_its_connection_slot_until_it_closes() {
    let app = EchoBackend::start().await;
    let routes = chat_and_app(websocket_echo().await, app.addr);
    let proxy =
        RunningProxy::start_with_table_and(&routes, settings(1, ClientLimits::default())).await;
    let mut socket = open_websocket(&proxy).await;

    let mut waiting = proxy.client().await;
    let waiting = tokio::spawn(async move { waiting.get("app", "/").await });
    tokio::time::sleep(4 * SHORT).await;
    assert!(
        !waiting.is_finished(),
        "a client was served beyond MaxConnections while a WebSocket was open"
    );
    socket.close(None).await.unwrap();
    while socket.next().await.is_some() {}
    let served = tokio::time::timeout(AT_MOST, waiting).await;
    assert_eq!(served.expect("the slot was released").unwrap().status, 200);
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_the_read_timeout() {
    let app = EchoBackend::start().await;
    let routes = chat_and_app(websocket_echo().await, app.addr);
    let proxy_settings = ProxySettings {
        upstream: PoolSettings {
            read_timeout: SHORT,
            ..PoolSettings::default()
        },
        ..settings(4, ClientLimits::default())
    };
    let proxy = RunningProxy::start_with_table_and(&routes, proxy_settings).await;
    let mut socket = open_websocket(&proxy).await;
    let ended = tokio::time::timeout(AT_MOST, async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "an idle WebSocket stays open");
}

#[tokio::test]
async fn the_shutdown_cuts_what_still_runs_when_the_drain_timeout_has_passed() {
    let backend = EchoBackend::start().await;
    let routes = chat_and_app(websocket_echo().await, backend.addr);
    let proxy_settings = ProxySettings {
        drain_timeout: SHORT,
        ..settings(8, ClientLimits::default())
    };
    let mut proxy = RunningProxy::start_with_table_and(&routes, proxy_settings).await;
    let _websocket = open_websocket(&proxy).await;
    let mut client = proxy.client().await;
    let slow = tokio::spawn(async move { client.get("app", "/slow?delay_ms=60000").await });
    eventually("the slow request reaches the backend", || {
        backend.connections_open() > 0
    })
    .await;

    proxy.shutdown.cancel();
    let served = tokio::time::timeout(AT_MOST, &mut proxy.served).await;
    served
        .expect("serve returns once DrainTimeout has passed")
        .unwrap()
        .unwrap();
    assert!(slow.await.is_err(), "the slow request was not cut");
}
