//! Failing backends: retries like Interlock's `proxy_next_upstream`, bounded tries, upstream
//! timeouts, passive health, a backend killed under load, and endpoints drained when they leave
//! the routes.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use super::{
    test_support::{
        eventually, hanging_up_backend, keep_alive_ending_backend, refused_addr, silent_backend,
        table, unanswering_addr, unread_backend, EchoBackend, Hangup, LoggingProxy, RawConnection,
        RunningProxy, TestResponse,
    },
    HandlerSettings, PoolSettings, ProxySettings,
};

const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(200);

/// A short `ConnectTimeout`; the other upstream timeouts at their defaults.
fn settings() -> ProxySettings {
    ProxySettings {
        upstream: PoolSettings {
            connect_timeout: UPSTREAM_TIMEOUT,
            ..PoolSettings::default()
        },
        ..ProxySettings::default()
    }
}

/// Short upstream timeouts throughout.
fn impatient_settings() -> ProxySettings {
    ProxySettings {
        upstream: PoolSettings {
            connect_timeout: UPSTREAM_TIMEOUT,
            read_timeout: UPSTREAM_TIMEOUT,
            send_timeout: UPSTREAM_TIMEOUT,
            ..PoolSettings::default()
        },
        ..ProxySettings::default()
    }
}

async fn proxy(endpoints: &[SocketAddr]) -> RunningProxy {
    RunningProxy::start_with(&[("app", endpoints)], settings()).await
}

async fn impatient_proxy(endpoints: &[SocketAddr]) -> RunningProxy {
    RunningProxy::start_with(&[("app", endpoints)], impatient_settings()).await
}

async fn send(
    proxy: &RunningProxy,
    method: Method,
    path: &str,
    body: &'static [u8],
) -> TestResponse {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "app")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        proxy.client().await.send(request).await
    });
    answered.await.expect("answered within 10 s")
}

#[tokio::test]
async fn idempotent_requests_move_on_after_a_gateway_error() {
    let unavailable = EchoBackend::start_answering(StatusCode::SERVICE_UNAVAILABLE).await;
    let live = EchoBackend::start().await;
    let proxy = proxy(&[unavailable.addr, live.addr]).await;
    for method in [
        Method::GET,
        Method::HEAD,
        Method::PUT,
        Method::DELETE,
        Method::OPTIONS,
    ] {
        let response = send(&proxy, method.clone(), "/", b"").await;
        assert_eq!(response.status, 200, "{method}");
        assert_eq!(response.header("x-upstream-addr"), live.addr.to_string());
    }
    assert!(
        unavailable.connections_accepted() > 0,
        "the 503 endpoint was never tried"
    );
}

#[tokio::test]
async fn non_idempotent_requests_keep_the_answer_of_the_upstream_they_reached() {
    let unavailable = EchoBackend::start_answering(StatusCode::SERVICE_UNAVAILABLE).await;
    let live = EchoBackend::start().await;
    // A fresh route starts its round robin at the first endpoint.
    let proxy = proxy(&[unavailable.addr, live.addr]).await;
    let response = send(&proxy, Method::POST, "/", b"once").await;
    assert_eq!(response.status, 503);
    assert_eq!(
        response.header("x-upstream-addr"),
        unavailable.addr.to_string()
    );
    assert_eq!(live.connections_accepted(), 0);
}

#[tokio::test]
async fn when_every_endpoint_fails_the_last_answer_is_passed_on() {
    let unavailable = EchoBackend::start_answering(StatusCode::SERVICE_UNAVAILABLE).await;
    let bad_gateway = EchoBackend::start_answering(StatusCode::BAD_GATEWAY).await;
    let proxy = proxy(&[unavailable.addr, bad_gateway.addr]).await;
    let response = send(&proxy, Method::GET, "/", b"").await;
    assert_eq!(response.status, 502);
    assert_eq!(
        response.header("x-upstream-addr"),
        bad_gateway.addr.to_string()
    );
    assert_eq!(response.echo()["port"], bad_gateway.addr.port());
}

#[tokio::test]
async fn a_failed_exchange_is_retried_for_idempotent_requests_only() {
    let (hanging_up, _accepted, _task) = hanging_up_backend().await;
    let live = EchoBackend::start().await;

    let proxy_for_get = proxy(&[hanging_up, live.addr]).await;
    let response = send(&proxy_for_get, Method::GET, "/", b"").await;
    assert_eq!(response.status, 200);

    let proxy_for_put = proxy(&[hanging_up, live.addr]).await;
    let response = send(&proxy_for_put, Method::PUT, "/", b"replayed body").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.echo()["body"], "replayed body");

    let proxy_for_post = proxy(&[hanging_up, live.addr]).await;
    let response = send(&proxy_for_post, Method::POST, "/", b"sent once").await;
    assert_eq!(response.status, 502);
    assert!(
        response
            .text()
            .starts_with(&format!("upstream {hanging_up} failed")),
        "{}",
        response.text()
    );
}

#[tokio::test]
async fn a_body_too_large_to_hold_is_not_replayed() {
    static BODY: [u8; 100 << 10] = [b'x'; 100 << 10];
    let (hanging_up, _accepted, _task) = hanging_up_backend().await;
    let live = EchoBackend::start().await;
    let proxy = proxy(&[hanging_up, live.addr]).await;
    let response = send(&proxy, Method::PUT, "/", &BODY).await;
    assert_eq!(response.status, 502);
    assert_eq!(live.connections_accepted(), 0);
}

#[tokio::test]
async fn tries_are_bounded() {
    let mut endpoints = Vec::new();
    let mut counters = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let (addr, accepted, task) = hanging_up_backend().await;
        endpoints.push(addr);
        counters.push(accepted);
        tasks.push(task);
    }
    let settings = ProxySettings {
        handler: HandlerSettings {
            upstream_tries: 3,
            ..HandlerSettings::default()
        },
        ..settings()
    };
    let proxy = RunningProxy::start_with(&[("app", &endpoints)], settings).await;
    let response = send(&proxy, Method::GET, "/", b"").await;
    assert_eq!(response.status, 502);
    let tried: usize = counters
        .iter()
        .map(|accepted| accepted.load(Ordering::SeqCst))
        .sum();
    assert_eq!(tried, 3);
}

#[tokio::test]
async fn endpoints_that_refuse_do_not_use_up_tries() {
    let live = EchoBackend::start().await;
    let endpoints = [
        refused_addr().await,
        refused_addr().await,
        refused_addr().await,
        live.addr,
    ];
    let settings = ProxySettings {
        handler: HandlerSettings {
            upstream_tries: 1,
            ..HandlerSettings::default()
        },
        ..settings()
    };
    let proxy = RunningProxy::start_with(&[("app", &endpoints)], settings).await;
    let response = send(&proxy, Method::POST, "/", b"never sent before").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.echo()["body"], "never sent before");
}

#[tokio::test]
async fn read_timeout_answers_504_and_idempotent_requests_try_the_next_endpoint() {
    let (silent, _task) = silent_backend().await;
    let live = EchoBackend::start().await;

    let only_silent = impatient_proxy(&[silent]).await;
    let response = send(&only_silent, Method::GET, "/", b"").await;
    assert_eq!(response.status, 504);
    assert_eq!(
        response.text(),
        format!("upstream {silent} timed out: upstream sent nothing for 200ms (ReadTimeout)\n")
    );

    let with_live = impatient_proxy(&[silent, live.addr]).await;
    assert_eq!(send(&with_live, Method::GET, "/", b"").await.status, 200);

    let post_first_silent = impatient_proxy(&[silent, live.addr]).await;
    assert_eq!(
        send(&post_first_silent, Method::POST, "/", b"x")
            .await
            .status,
        504
    );
}

#[tokio::test]
async fn connect_timeout_moves_on_to_the_next_endpoint() {
    let (unanswering, _listener, _queued) = unanswering_addr().await;
    let live = EchoBackend::start().await;

    let with_live = proxy(&[unanswering, live.addr]).await;
    let response = send(&with_live, Method::POST, "/", b"x").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-upstream-addr"), live.addr.to_string());

    let alone = proxy(&[unanswering]).await;
    let response = send(&alone, Method::GET, "/", b"").await;
    assert_eq!(response.status, 502);
    assert_eq!(
        response.text(),
        "no endpoint of service \"svc-app\" accepted a connection (1 tried)\n"
    );
}

#[tokio::test]
async fn send_timeout_answers_504_when_the_upstream_stops_reading() {
    let (unread, _task) = unread_backend().await;
    let mut settings = impatient_settings();
    settings.handler.limits.max_body_size = None;
    let proxy = RunningProxy::start_with(&[("app", &[unread])], settings).await;
    // Far more than the socket buffers between proxy and upstream hold.
    let body = Bytes::from(vec![b'x'; 64 << 20]);
    let request = Request::post("/")
        .header("host", "app")
        .body(Full::new(body))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), async {
        proxy.client().await.send(request).await
    })
    .await
    .expect("answered within 10 s");
    assert_eq!(response.status, 504);
    assert!(
        response.text().contains("(SendTimeout)"),
        "{}",
        response.text()
    );
}

/// A proxy for `app` on `endpoints` with [`settings`], writing its access log.
async fn logging_proxy(endpoints: &[SocketAddr]) -> LoggingProxy {
    LoggingProxy::start(&table(&[("app", endpoints)]), settings()).await
}

#[tokio::test]
async fn access_log_has_a_line_per_request() {
    let unavailable = EchoBackend::start_answering(StatusCode::SERVICE_UNAVAILABLE).await;
    let live = EchoBackend::start().await;
    let logging = logging_proxy(&[unavailable.addr, live.addr]).await;
    let proxied = logging.proxy.get("app", "/ping?x=1").await;
    let request_id = proxied.header("x-request-id").to_owned();
    assert_eq!(
        logging.proxy.get("unknown.example.com", "/").await.status,
        503
    );
    let refused = logging
        .proxy
        .raw(b"GET / HTTP/1.1\r\nHost: app\r\nHost: app\r\n\r\n")
        .await;
    assert_eq!(refused.status(), 400);
    let smuggled =
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(logging.proxy.raw(smuggled).await.status(), 400);

    let lines = logging.lines().await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let proxied_line = format!(
        "\"GET /ping?x=1 HTTP/1.1\" 200 {} \"-\" \"-\" {request_id} \"{}, {}\" \"503, 200\" ",
        proxied.body.len(),
        unavailable.addr,
        live.addr,
    );
    assert!(lines[0].starts_with("127.0.0.1 - - ["), "{}", lines[0]);
    assert!(
        lines[0].contains(&proxied_line),
        "{}\n{proxied_line}",
        lines[0]
    );
    assert!(lines[1].contains("\"GET / HTTP/1.1\" 503 "), "{}", lines[1]);
    assert!(lines[1].ends_with(" \"-\" \"-\" \"-\""), "{}", lines[1]);
    assert!(lines[2].contains("\"GET / HTTP/1.1\" 400 "), "{}", lines[2]);
    assert!(
        lines[3].contains("\"POST / HTTP/1.1\" 400 "),
        "{}",
        lines[3]
    );
}

/// The keep-alive race on a single-endpoint service: the upstream closes the pooled connection
/// as the next GET arrives on it. As nginx does, the GET goes out again on a new connection to
/// the same endpoint, and that is one try, not a second upstream; a POST is not sent twice.
#[tokio::test]
async fn a_get_on_a_pooled_connection_the_upstream_closed_gets_200() {
    let (closing, accepted, _task) = keep_alive_ending_backend(Hangup::Close).await;
    let logging = logging_proxy(&[closing]).await;
    assert_eq!(
        send(&logging.proxy, Method::GET, "/", b"").await.status,
        200
    );
    let raced = send(&logging.proxy, Method::GET, "/", b"").await;
    assert_eq!(raced.status, 200, "{}", raced.text());
    assert_eq!(raced.text(), "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "no new connection");

    let post = send(&logging.proxy, Method::POST, "/", b"once").await;
    assert_eq!(post.status, 502);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the POST was sent again"
    );

    let lines = logging.lines().await;
    let one_try = format!("\"{closing}\" \"200\" ");
    assert!(lines[1].contains(&one_try), "{}\n{one_try}", lines[1]);
}

#[tokio::test]
async fn an_endpoint_that_failed_to_connect_is_skipped_while_ejected() {
    let (unanswering, _listener, _queued) = unanswering_addr().await;
    let live = EchoBackend::start().await;
    let logging = logging_proxy(&[unanswering, live.addr]).await;
    for _ in 0..6 {
        let response = send(&logging.proxy, Method::GET, "/", b"").await;
        assert_eq!(response.status, 200);
    }
    let lines = logging.lines().await;
    assert_eq!(lines.len(), 6);
    let tried_unanswering = lines
        .iter()
        .filter(|line| line.contains(&unanswering.to_string()))
        .count();
    // Round robin alone would start three of the six requests there.
    assert_eq!(tried_unanswering, 1, "{lines:#?}");
}

/// `clients` keep-alive clients sending `requests` GETs each; `during` runs once a third of them
/// are answered. Returns the statuses that were not 200.
async fn load_with<F: std::future::Future<Output = ()>>(
    proxy: &RunningProxy,
    clients: usize,
    requests: usize,
    path: &'static str,
    during: F,
) -> Vec<String> {
    let answered = Arc::new(AtomicUsize::new(0));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let mut client = proxy.client().await;
        let answered = Arc::clone(&answered);
        load.spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..requests {
                let response = client.get("app", path).await;
                if response.status != 200 {
                    failures.push(format!("{}: {}", response.status, response.text()));
                }
                answered.fetch_add(1, Ordering::SeqCst);
            }
            failures
        });
    }
    let third = clients * requests / 3;
    eventually("a third of the load answered", || {
        answered.load(Ordering::SeqCst) >= third
    })
    .await;
    during.await;
    let mut failures = Vec::new();
    let all_answered = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(client) = load.join_next().await {
            failures.extend(client.unwrap());
        }
    });
    all_answered.await.expect("the load finished");
    failures
}

#[tokio::test]
async fn a_backend_killed_under_load_fails_no_idempotent_request() {
    let survivors = [EchoBackend::start().await, EchoBackend::start().await];
    let doomed = EchoBackend::start().await;
    let endpoints = [survivors[0].addr, doomed.addr, survivors[1].addr];
    let proxy = proxy(&endpoints).await;
    let failures = load_with(&proxy, 8, 60, "/?delay_ms=5", async {
        // Aborting its tasks closes its listener and every connection, requests in flight too.
        drop(doomed);
    })
    .await;
    assert_eq!(failures, Vec::<String>::new());
}

#[tokio::test]
async fn an_endpoint_removed_under_load_drains_without_failures() {
    let kept = EchoBackend::start().await;
    let removed = EchoBackend::start().await;
    let proxy = proxy(&[kept.addr, removed.addr]).await;
    let accepted_before_removal = Arc::new(AtomicUsize::new(0));
    let failures = load_with(&proxy, 8, 60, "/?delay_ms=20", {
        let accepted_before_removal = Arc::clone(&accepted_before_removal);
        let router = Arc::clone(&proxy.router);
        let removed = &removed;
        async move {
            accepted_before_removal.store(removed.connections_accepted(), Ordering::SeqCst);
            router.update(&table(&[("app", &[kept.addr])]));
        }
    })
    .await;
    assert_eq!(failures, Vec::<String>::new());
    assert!(accepted_before_removal.load(Ordering::SeqCst) > 0);
    assert_eq!(
        removed.connections_accepted(),
        accepted_before_removal.load(Ordering::SeqCst),
        "new connections to the removed endpoint"
    );
    eventually("every connection to the removed endpoint closed", || {
        removed.connections_open() == 0
    })
    .await;
}

#[tokio::test]
async fn the_drain_timeout_bounds_requests_on_a_removed_endpoint() {
    let removed = EchoBackend::start().await;
    let kept = EchoBackend::start().await;
    let settings = ProxySettings {
        drain_timeout: Duration::from_millis(200),
        ..settings()
    };
    let mut proxy = RunningProxy::start_with(&[("app", &[removed.addr])], settings).await;
    let mut slow = RawConnection::connect(proxy.addr).await;
    slow.send(b"GET /?delay_ms=10000 HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    eventually("the slow request reached the endpoint", || {
        removed.connections_open() == 1
    })
    .await;
    proxy.router.update(&table(&[("app", &[kept.addr])]));
    let aborted = slow.read_response().await;
    assert_eq!(aborted.status, 502);
    assert_eq!(send(&proxy, Method::GET, "/", b"").await.status, 200);
    eventually("the aborted connection closed", || {
        removed.connections_open() == 0
    })
    .await;
    proxy.shutdown.cancel();
    (&mut proxy.served).await.unwrap().unwrap();
}
