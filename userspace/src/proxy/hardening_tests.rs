//! Bad clients, over raw TCP: the malformed-request corpus with exact statuses, slow request
//! heads and bodies, the body limit, idle connections; afterwards the proxy still serves other
//! clients and holds no connection of the bad ones.

use std::{net::SocketAddr, time::Duration};

use super::{
    test_support::{bulk_backend, EchoBackend, RawConnection, RunningProxy},
    ClientLimits, HandlerSettings, ProxySettings,
};

const BODY_LIMIT: u64 = 1024;
/// Header and body timeouts of the proxy under test.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(300);

fn limits() -> ClientLimits {
    ClientLimits {
        max_body_size: Some(BODY_LIMIT),
        body_timeout: CLIENT_TIMEOUT,
        header_timeout: CLIENT_TIMEOUT,
        keepalive_timeout: CLIENT_TIMEOUT,
        ..ClientLimits::default()
    }
}

fn settings_with(limits: ClientLimits) -> ProxySettings {
    ProxySettings {
        max_connections: 5,
        handler: HandlerSettings {
            limits,
            ..HandlerSettings::default()
        },
        ..ProxySettings::default()
    }
}

async fn proxy_for(backend: &EchoBackend) -> RunningProxy {
    RunningProxy::start_with(&[("app", &[backend.addr])], settings_with(limits())).await
}

fn request_with_header(name: &str, value: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\nHost: app\r\n{name}: {value}\r\n\r\n").into_bytes()
}

/// Malformed requests and the exact status each gets; every one also closes the connection.
fn corpus() -> Vec<(&'static str, Vec<u8>, u16)> {
    let post = |headers: &str, body: &str| {
        format!("POST / HTTP/1.1\r\nHost: app\r\n{headers}\r\n\r\n{body}").into_bytes()
    };
    let many_headers: String = (0..101).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    vec![
        (
            "Content-Length then Transfer-Encoding",
            post("Content-Length: 5\r\nTransfer-Encoding: chunked", "0\r\n\r\n"),
            400,
        ),
        (
            "Transfer-Encoding then Content-Length",
            post("Transfer-Encoding: chunked\r\nContent-Length: 5", "0\r\n\r\n"),
            400,
        ),
        (
            "Content-Length twice, same value",
            post("Content-Length: 5\r\nContent-Length: 5", "hello"),
            400,
        ),
        (
            "Content-Length twice, different values",
            post("Content-Length: 5\r\nContent-Length: 6", "hello!"),
            400,
        ),
        ("Content-Length list", post("Content-Length: 5, 5", "hello"), 400),
        ("negative Content-Length", post("Content-Length: -1", ""), 400),
        (
            "Transfer-Encoding other than chunked",
            post("Transfer-Encoding: gzip, chunked", "0\r\n\r\n"),
            501,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "request head over the limit, in lines within theirs",
            format!(
                "GET / HTTP/1.1\r\nHost: app\r\n{}\r\n",
                (0..6)
                    .map(|i| format!("x-big-{i}: {}\r\n", "a".repeat(7 << 10)))
                    .collect::<String>()
            )
            .into_bytes(),
            431,
        ),
        (
            "a 16 KiB header line",
            request_with_header("x-long", &"a".repeat(16 << 10)),
            431,
        ),
        (
            "a 16 KiB header line, never ending",
            format!("GET / HTTP/1.1\r\nHost: app\r\nx-long: {}", "a".repeat(16 << 10)).into_bytes(),
            431,
        ),
        (
            "too many header lines",
            format!("GET / HTTP/1.1\r\nHost: app\r\n{many_headers}\r\n").into_bytes(),
            431,
        ),
        (
            "request line over the limit",
            format!("GET /{} HTTP/1.1\r\nHost: app\r\n\r\n", "a".repeat(9 << 10)).into_bytes(),
            414,
        ),
        (
            "request line over the limit, never ending",
            format!("GET /{}", "a".repeat(9 << 10)).into_bytes(),
            414,
        ),
        ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400),
        (
            "two Host headers",
            b"GET / HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n".to_vec(),
            400,
        ),
        (
            "Host with a space",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n".to_vec(),
            400,
        ),
        (
            "Host with user info",
            b"GET / HTTP/1.1\r\nHost: user@app\r\n\r\n".to_vec(),
            400,
        ),
        (
            "Host with a bad port",
            b"GET / HTTP/1.1\r\nHost: app:http\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a TLS ClientHello on the plain port",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(),
            400,
        ),
        ("not HTTP at all", b"hello proxy\r\n\r\n".to_vec(), 400),
        ("HTTP/0.9", b"GET /\r\n\r\n".to_vec(), 400),
        (
            "unknown HTTP version",
            b"GET / HTTP/1.2\r\nHost: app\r\n\r\n".to_vec(),
            400,
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nHost: app\r\nX-A: a\0b\r\n\r\n".to_vec(),
            400,
        ),
        (
            "obsolete line folding",
            b"GET / HTTP/1.1\r\nHost: app\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
            400,
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nHost : app\r\n\r\n".to_vec(),
            400,
        ),
        (
            "invalid chunk size",
            post("Transfer-Encoding: chunked", "zz\r\nhello\r\n0\r\n\r\n"),
            400,
        ),
        (
            "declared body over ClientMaxBodySize",
            post(&format!("Content-Length: {}", BODY_LIMIT + 1), ""),
            413,
        ),
        (
            "held chunked body over ClientMaxBodySize",
            format!(
                "PUT / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
                "a".repeat(0x800)
            )
            .into_bytes(),
            413,
        ),
        (
            "streamed chunked body over ClientMaxBodySize",
            post(
                "Transfer-Encoding: chunked",
                &format!("800\r\n{}\r\n0\r\n\r\n", "a".repeat(0x800)),
            ),
            413,
        ),
    ]
}

/// `count` keep-alive clients served at once: each one holds a connection slot.
async fn serve_at_once(proxy: &RunningProxy, count: usize) {
    let mut clients = Vec::new();
    for _ in 0..count {
        let mut client = proxy.client().await;
        let response = tokio::time::timeout(Duration::from_secs(5), client.get("app", "/"))
            .await
            .expect("a connection slot is free");
        assert_eq!(response.status, 200);
        clients.push(client);
    }
}

#[tokio::test]
async fn malformed_requests_get_exact_statuses_and_the_proxy_keeps_serving() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let mut bystander = proxy.client().await;
    assert_eq!(bystander.get("app", "/").await.status, 200);

    for (what, request, status) in corpus() {
        let exchange = proxy.raw(&request).await;
        assert_eq!(exchange.status(), status, "{what}");
        assert!(exchange.closed, "{what}: connection left open");
        let response = &exchange.responses()[0];
        assert_eq!(response.header("connection"), Some("close"), "{what}");
        assert!(response.header("x-request-id").is_some(), "{what}");
        assert_eq!(response.header("x-proxy-id"), Some("lb-test-1"), "{what}");
    }

    assert_eq!(bystander.get("app", "/").await.status, 200);
    // Five slots: the bystander's and four more. A leaked connection would hold one.
    serve_at_once(&proxy, 4).await;
}

#[tokio::test]
async fn http10_without_host_is_unroutable_not_malformed() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let exchange = proxy.raw(b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(exchange.status(), 503);
    assert_eq!(exchange.responses()[0].text(), "no Host header\n");
}

#[tokio::test]
async fn a_slow_request_head_gets_408_and_is_closed() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let mut connection = RawConnection::connect(proxy.addr).await;
    connection.send(b"GET / HTTP/1.1\r\nHost: app\r\n").await;
    let exchange = connection.read_until_closed().await;
    assert!(exchange.closed);
    assert_eq!(exchange.status(), 408);
}

#[tokio::test]
async fn a_trickling_request_head_gets_408_too() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // One byte every 50 ms: each arrives well within the timeout, the whole head never does.
    let trickle = tokio::spawn(async move {
        for byte in b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if tokio::io::AsyncWriteExt::write_all(&mut writer, &[*byte])
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut received = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut received);
    let _ = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("closed");
    trickle.abort();
    let text = String::from_utf8_lossy(&received);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_truncated_chunked_body_is_400_when_the_client_stops_and_408_when_it_stalls() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let truncated = b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";

    let mut stopped = RawConnection::connect(proxy.addr).await;
    stopped.send(truncated).await;
    stopped.finish_sending().await;
    let exchange = stopped.read_until_closed().await;
    assert!(exchange.closed);
    assert_eq!(exchange.status(), 400);

    let mut stalled = RawConnection::connect(proxy.addr).await;
    stalled.send(truncated).await;
    let exchange = stalled.read_until_closed().await;
    assert!(exchange.closed);
    assert_eq!(exchange.status(), 408);

    let mut short = RawConnection::connect(proxy.addr).await;
    short
        .send(b"PUT / HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nhello")
        .await;
    short.finish_sending().await;
    assert_eq!(short.read_until_closed().await.status(), 400);

    assert_eq!(proxy.get("app", "/").await.status, 200);
}

#[tokio::test]
async fn a_connection_that_never_sends_is_closed_silently() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let exchange = RawConnection::connect(proxy.addr)
        .await
        .read_until_closed()
        .await;
    assert!(exchange.closed);
    assert!(exchange.received.is_empty(), "{:?}", exchange.received);
}

/// With a long header timeout, so that only the keep-alive timer can close the connection; on a
/// multi-threaded runtime and with an access log wrapping the response body too, a response can
/// end while the guard already waits for the next request's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_silently() {
    let backend = EchoBackend::start().await;
    let access_log = std::env::temp_dir().join(format!("xlb-idle-{}.log", uuid::Uuid::new_v4()));
    let settings = ProxySettings {
        access_log_path: Some(access_log.clone()),
        ..settings_with(ClientLimits {
            header_timeout: Duration::from_secs(60),
            ..limits()
        })
    };
    let proxy = RunningProxy::start_with(&[("app", &[backend.addr])], settings).await;
    // After a proxied answer and after one of the proxy's own.
    for (host, status) in [("app", 200), ("unknown.example.com", 503)] {
        let mut kept_alive = RawConnection::connect(proxy.addr).await;
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        kept_alive.send(request.as_bytes()).await;
        assert_eq!(kept_alive.read_response().await.status, status);
        let exchange = kept_alive.read_until_closed().await;
        assert!(
            exchange.closed,
            "KeepaliveTimeout not applied after {status}"
        );
        assert!(exchange.received.is_empty(), "{:?}", exchange.received);
    }
    drop(proxy);
    let _ = std::fs::remove_file(access_log);
}

#[tokio::test]
async fn keepalive_timeout_zero_closes_after_each_response() {
    let backend = EchoBackend::start().await;
    let limits = ClientLimits {
        keepalive_timeout: Duration::ZERO,
        ..limits()
    };
    let proxy = RunningProxy::start_with(&[("app", &[backend.addr])], settings_with(limits)).await;
    let exchange = proxy.raw(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert!(exchange.closed);
    assert_eq!(exchange.status(), 200);
    assert_eq!(exchange.responses()[0].header("connection"), Some("close"));
}

/// hyper's connection is given up once the connection is idle: not before it has written all
/// of a response that the client is slow to take. The client stops reading while hyper still
/// holds the last part of the response (the upstream's body has ended), for longer than a
/// connection takes to park.
#[tokio::test]
async fn a_large_response_to_a_slow_reader_arrives_whole_and_the_connection_serves_on() {
    const LENGTH: usize = 4 << 20;
    let (backend, _backend) = bulk_backend(LENGTH).await;
    let proxy = RunningProxy::start_with_send_buffer(
        &[("app", &[backend])],
        4096,
        ProxySettings::default(),
    )
    .await;
    let mut slow_reader = RawConnection::with_receive_buffer(proxy.addr, 4096).await;
    for path in ["/first", "/second"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n");
        slow_reader.send(request.as_bytes()).await;
        // hyper buffers about 400 KiB of a body: with 200 KiB to go, all of it is in hyper.
        let pause = 6 * crate::proxy::head_guard::PARK_AFTER;
        let response = slow_reader
            .read_response_pausing(LENGTH - (200 << 10), pause)
            .await;
        assert_eq!(response.status, 200);
        assert_eq!(response.body.len(), LENGTH);
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_until_a_bad_one() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let pipelined = b"GET /first HTTP/1.1\r\nHost: app\r\n\r\n\
        PUT /second HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello\
        POST /third HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
        POST /smuggled HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
        GET /never HTTP/1.1\r\nHost: app\r\n\r\n";
    let exchange = proxy.raw(pipelined).await;
    assert!(exchange.closed);
    let responses = exchange.responses();
    let statuses: Vec<u16> = responses.iter().map(|response| response.status).collect();
    assert_eq!(statuses, [200, 200, 200, 400]);
    let echoed: Vec<serde_json::Value> = responses[..3]
        .iter()
        .map(|response| serde_json::from_slice(&response.body).unwrap())
        .collect();
    assert_eq!(echoed[0]["path"], "/first");
    assert_eq!(echoed[1]["body"], "hello");
    assert_eq!(echoed[2]["body"], "abc");
}

#[tokio::test]
async fn expect_100_continue_and_unanswered_upgrades_keep_working() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let mut connection = RawConnection::connect(proxy.addr).await;
    connection
        .send(b"PUT /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(connection.read_response().await.status, 100);
    connection.send(b"hello").await;
    let response = connection.read_response().await;
    assert_eq!(response.status, 200);
    assert!(
        response.text().contains("\"body\":\"hello\""),
        "{}",
        response.text()
    );
    // The expectation was the proxy's to meet, not the upstream's.
    assert!(
        !response.text().contains("\"expect\""),
        "{}",
        response.text()
    );

    connection
        .send(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await;
    assert_eq!(connection.read_response().await.status, 200);
    connection
        .send(b"GET /after HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    assert_eq!(connection.read_response().await.status, 200);
}

#[tokio::test]
async fn the_http2_preface_reaches_hyper_untouched() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let mut connection = RawConnection::connect(proxy.addr).await;
    connection.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    connection.finish_sending().await;
    let exchange = connection.read_until_closed().await;
    assert!(exchange.closed);
    // hyper's HTTP/2 server (h2c with prior knowledge) opens with its SETTINGS frame; the guard
    // must not answer the preface as a malformed HTTP/1 request.
    let settings_frame_type = 0x4;
    assert_eq!(
        exchange.received.get(3),
        Some(&settings_frame_type),
        "{:?}",
        String::from_utf8_lossy(&exchange.received)
    );
}

#[tokio::test]
async fn bodies_within_the_limit_pass_and_zero_means_unlimited() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let at_limit = "a".repeat(BODY_LIMIT as usize);
    let request =
        format!("POST / HTTP/1.1\r\nHost: app\r\nContent-Length: {BODY_LIMIT}\r\n\r\n{at_limit}");
    let mut connection = RawConnection::connect(proxy.addr).await;
    connection.send(request.as_bytes()).await;
    assert_eq!(connection.read_response().await.status, 200);

    let unlimited = RunningProxy::start_with(
        &[("app", &[backend.addr])],
        settings_with(ClientLimits {
            max_body_size: None,
            ..limits()
        }),
    )
    .await;
    let big = "a".repeat(256 << 10);
    let request = format!(
        "POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let mut connection = RawConnection::connect(unlimited.addr).await;
    connection.send(request.as_bytes()).await;
    let response = connection.read_response().await;
    assert_eq!(response.status, 200);
    let echoed: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(echoed["body"].as_str().map(str::len), Some(big.len()));
}

#[tokio::test]
async fn underscored_headers_are_dropped_unless_allowed() {
    let backend = EchoBackend::start().await;
    let header_names = |proxy_addr: SocketAddr| async move {
        let mut connection = RawConnection::connect(proxy_addr).await;
        connection
            .send(b"GET / HTTP/1.1\r\nHost: app\r\nX_Custom_Key: 1\r\nX-Custom-Key: 2\r\n\r\n")
            .await;
        let response = connection.read_response().await;
        let echoed: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        echoed["header_names"].clone()
    };

    let default = proxy_for(&backend).await;
    let names = header_names(default.addr).await;
    assert!(
        !names.as_array().unwrap().contains(&"x_custom_key".into()),
        "{names}"
    );
    assert!(
        names.as_array().unwrap().contains(&"x-custom-key".into()),
        "{names}"
    );

    let mut allowing = settings_with(limits());
    allowing.handler.underscores_in_headers = true;
    let allowing = RunningProxy::start_with(&[("app", &[backend.addr])], allowing).await;
    let names = header_names(allowing.addr).await;
    assert!(
        names.as_array().unwrap().contains(&"x_custom_key".into()),
        "{names}"
    );
}

#[tokio::test]
async fn the_upstream_gets_the_host_the_request_was_routed_by() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    let mut connection = RawConnection::connect(proxy.addr).await;
    // Routed by the absolute-form target's authority (RFC 9112 §3.2.2), not by Host.
    connection
        .send(b"GET http://app/ping HTTP/1.1\r\nHost: other.example\r\n\r\n")
        .await;
    let response = connection.read_response().await;
    assert_eq!(response.status, 200);
    let echoed: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(echoed["host"], "app", "{echoed}");
    assert_eq!(echoed["path"], "/ping", "{echoed}");
}

#[tokio::test]
async fn trace_and_connect_are_refused_with_405() {
    let backend = EchoBackend::start().await;
    let proxy = proxy_for(&backend).await;
    for request in [
        &b"TRACE / HTTP/1.1\r\nHost: app\r\nCookie: session=secret\r\n\r\n"[..],
        &b"CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n"[..],
    ] {
        let mut connection = RawConnection::connect(proxy.addr).await;
        connection.send(request).await;
        let response = connection.read_response().await;
        assert_eq!(response.status, 405, "{}", String::from_utf8_lossy(request));
    }
    assert_eq!(
        backend.connections_accepted(),
        0,
        "nothing reached the upstream"
    );
}
