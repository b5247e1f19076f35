//! Interlock's routing labels through a running proxy, over real sockets on 127.0.0.0/8:
//! context roots and their rewrite, by the normalised path (dot segments, escapes, repeated
//! slashes), wildcards, redirects, `ssl_only`, the default backend, and each balancing method's
//! choice of endpoint, including fallbacks when one refuses.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use http::{uri::PathAndQuery, HeaderMap, Request};
use http_body_util::Full;

use super::{
    test_support::{
        eventually, refused_addr, route, table_of, EchoBackend, LoggingProxy, RunningProxy,
        TestClient, TestResponse,
    },
    EjectionPeriods, NormalPath, ProxySettings, Routed,
};
use crate::routes::{Balance, Redirect, Route, Scheme};

fn balanced(service: &str, endpoints: &[SocketAddr], balance: Balance) -> Route {
    Route {
        balance,
        ..route(service, endpoints)
    }
}

fn sticky(service: &str, endpoints: &[SocketAddr]) -> Route {
    let cookie = "session".to_owned();
    balanced(service, endpoints, Balance::StickyCookie { cookie })
}

fn port_of(response: &TestResponse) -> u16 {
    assert_eq!(response.status, 200, "{response:?}");
    response.echo()["port"].as_u64().unwrap() as u16
}

async fn get_with_cookie(client: &mut TestClient, cookie: &str) -> TestResponse {
    let request = Request::get("/")
        .header("host", "app")
        .header("cookie", cookie)
        .body(Full::<Bytes>::default())
        .unwrap();
    client.send(request).await
}

async fn backends(count: usize) -> Vec<EchoBackend> {
    let mut started = Vec::new();
    for _ in 0..count {
        started.push(EchoBackend::start().await);
    }
    started
}

fn addrs(backends: &[EchoBackend]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.addr).collect()
}

#[tokio::test]
async fn the_longest_context_root_wins_and_rewrite_strips_it() {
    let [web, api, v2] = [
        EchoBackend::start().await,
        EchoBackend::start().await,
        EchoBackend::start().await,
    ];
    let mut api_route = route("api", &[api.addr]);
    api_route.context_root = "/api".into();
    api_route.context_root_rewrite = true;
    let mut v2_route = route("v2", &[v2.addr]);
    v2_route.context_root = "/api/v2".into();
    let proxy = RunningProxy::start_with_table(&table_of(
        vec![("app", vec![v2_route, api_route, route("web", &[web.addr])])],
        None,
    ))
    .await;

    let mut client = proxy.client().await;
    let cases = [
        ("/api/v2/users?id=1", v2.addr, "/api/v2/users?id=1"),
        ("/api/users?id=1", api.addr, "/users?id=1"),
        ("/api", api.addr, "/"),
        ("/apiary", web.addr, "/apiary"),
        ("/", web.addr, "/"),
    ];
    for (path, backend, upstream_path) in cases {
        let response = client.get("app", path).await;
        assert_eq!(port_of(&response), backend.port(), "{path}");
        assert_eq!(response.echo()["path"], upstream_path, "{path}");
    }
}

/// `api` at `/api` (rewritten when `rewrite`) and `web` at `/`, on host `app`.
async fn api_and_web(rewrite: bool) -> (RunningProxy, EchoBackend, EchoBackend) {
    let [api, web] = [EchoBackend::start().await, EchoBackend::start().await];
    let mut api_route = route("api", &[api.addr]);
    api_route.context_root = "/api".into();
    api_route.context_root_rewrite = rewrite;
    let proxy = RunningProxy::start_with_table(&table_of(
        vec![("app", vec![api_route, route("web", &[web.addr])])],
        None,
    ))
    .await;
    (proxy, api, web)
}

/// Context roots hold the path nginx would match `location`s against; without the rewrite the
/// upstream gets the target as the client sent it, as from nginx's `proxy_pass` without a URI.
#[tokio::test]
async fn context_roots_hold_the_normalised_path_and_the_target_goes_upstream_as_sent() {
    let (proxy, api, web) = api_and_web(false).await;
    let mut client = proxy.client().await;
    let cases = [
        ("//api/x", &api),
        ("/api//x", &api),
        ("/%61pi/x", &api),
        ("/%61%70%69", &api),
        ("/api%2Fx", &api),
        ("/web/../api/x?q=1", &api),
        ("/./api/x", &api),
        ("/api/../web", &web),
        ("/api/%2e%2e/web", &web),
        ("/apix/../apiary", &web),
        ("/%2561pi/x", &web),
    ];
    for (target, backend) in cases {
        let response = client.get("app", target).await;
        assert_eq!(port_of(&response), backend.addr.port(), "{target}");
        assert_eq!(response.echo()["path"], target, "{target}");
    }
}

/// With the rewrite, the upstream gets the normalised path below the context root, re-encoded,
/// as from nginx's `proxy_pass` with a URI: never the client's `..` after the root is cut.
#[tokio::test]
async fn context_root_rewrite_sends_the_normalised_path_below_the_root() {
    let (proxy, api, web) = api_and_web(true).await;
    let mut client = proxy.client().await;
    let cases = [
        ("/api/../admin", &web, "/api/../admin"),
        ("/api/x/../../admin?q=1", &web, "/api/x/../../admin?q=1"),
        ("/api/x/../y?q=1", &api, "/y?q=1"),
        ("/api/./x/.", &api, "/x/"),
        ("/api/..", &web, "/api/.."),
        ("//api//x", &api, "/x"),
        ("/%61pi/%78?q=%2e%2e", &api, "/x?q=%2e%2e"),
        ("/api/a%2Fb", &api, "/a/b"),
        ("/api/a%20b%3Fc%25d", &api, "/a%20b%3Fc%25d"),
        ("/api/caf%c3%a9", &api, "/caf%C3%A9"),
    ];
    for (target, backend, upstream) in cases {
        let response = client.get("app", target).await;
        assert_eq!(port_of(&response), backend.addr.port(), "{target}");
        assert_eq!(response.echo()["path"], upstream, "{target}");
    }

    // With no service at `/`, a `..` out of the rewritten root finds no service at all.
    let only_api = EchoBackend::start().await;
    let mut api_route = route("api", &[only_api.addr]);
    api_route.context_root = "/api".into();
    api_route.context_root_rewrite = true;
    let proxy =
        RunningProxy::start_with_table(&table_of(vec![("app", vec![api_route])], None)).await;
    let response = proxy.get("app", "/api/../admin").await;
    assert_eq!(response.status, 404);
    assert_eq!(
        response.text(),
        "no service for path \"/api/../admin\" on host \"app\"\n"
    );
    assert_eq!(only_api.connections_accepted(), 0);
}

/// What nginx refuses to normalise it answers 400 and closes: a `..` above the root, a bad or
/// NUL escape, a target that is no path. Nothing reaches a service, rewritten or not.
#[tokio::test]
async fn paths_without_a_normal_form_are_400_and_close_the_connection() {
    for rewrite in [false, true] {
        let (proxy, api, web) = api_and_web(rewrite).await;
        let cases = [
            ("GET /../api/x", "a .. segment climbs above the root"),
            ("GET /api/../../x", "a .. segment climbs above the root"),
            (
                "GET /api/%2e%2e/%2E%2E/x",
                "a .. segment climbs above the root",
            ),
            (
                "GET /api%2F..%2F..%2Fx",
                "a .. segment climbs above the root",
            ),
            ("GET /api/%zz", "a % is not followed by two hex digits"),
            ("GET /api/x%4", "a % is not followed by two hex digits"),
            ("GET /api/a%00b", "it encodes a NUL byte (%00)"),
            ("OPTIONS *", "it does not start with /"),
        ];
        for (line, problem) in cases {
            let request = format!("{line} HTTP/1.1\r\nHost: app\r\n\r\n");
            let exchange = proxy.raw(request.as_bytes()).await;
            assert_eq!(exchange.status(), 400, "{line}");
            assert!(exchange.closed, "{line}: connection left open");
            let response = &exchange.responses()[0];
            assert_eq!(response.header("connection"), Some("close"), "{line}");
            let path = line.split_once(' ').unwrap().1;
            assert_eq!(
                response.text(),
                format!("invalid request path {path:?}: {problem}\n"),
                "{line}"
            );
        }
        assert_eq!(api.connections_accepted() + web.connections_accepted(), 0);
    }
}

#[tokio::test]
async fn a_path_outside_every_context_root_of_a_host_is_404() {
    let backend = EchoBackend::start().await;
    let mut api = route("api", &[backend.addr]);
    api.context_root = "/api".into();
    let proxy = RunningProxy::start_with_table(&table_of(vec![("app", vec![api])], None)).await;
    let response = proxy.get("app", "/other").await;
    assert_eq!(response.status, 404);
    assert_eq!(
        response.text(),
        "no service for path \"/other\" on host \"app\"\n"
    );
    assert!(!response.header("x-request-id").is_empty());
    assert_eq!(backend.connections_accepted(), 0);
}

#[tokio::test]
async fn wildcard_hosts_route_subdomains_exact_names_first() {
    let [any, exact] = [EchoBackend::start().await, EchoBackend::start().await];
    let proxy = RunningProxy::start_with_table(&table_of(
        vec![
            ("*.example.org", vec![route("any", &[any.addr])]),
            ("www.example.org", vec![route("exact", &[exact.addr])]),
        ],
        None,
    ))
    .await;
    assert_eq!(
        port_of(&proxy.get("api.example.org", "/").await),
        any.addr.port()
    );
    assert_eq!(
        port_of(&proxy.get("a.b.Example.org:80", "/").await),
        any.addr.port()
    );
    assert_eq!(
        port_of(&proxy.get("www.example.org", "/").await),
        exact.addr.port()
    );
    assert_eq!(proxy.get("example.org", "/").await.status, 503);
}

#[tokio::test]
async fn redirects_answer_302_to_the_target_with_the_request_uri() {
    let backend = EchoBackend::start().await;
    let mut web = route("web", &[backend.addr]);
    web.redirects = vec![Redirect {
        source_scheme: Scheme::Http,
        source_host: "old.local".into(),
        target: "http://new.local".into(),
    }];
    let proxy = RunningProxy::start_with_table(&table_of(
        vec![("old.local", vec![web.clone()]), ("new.local", vec![web])],
        None,
    ))
    .await;

    let response = proxy.get("old.local", "/a/b?c=d").await;
    assert_eq!(response.status, 302);
    assert_eq!(response.header("location"), "http://new.local/a/b?c=d");
    assert!(!response.header("x-request-id").is_empty());
    assert_eq!(response.header("x-proxy-id"), "lb-test-1");
    assert_eq!(
        backend.connections_accepted(),
        0,
        "a redirect is answered locally"
    );

    assert_eq!(
        port_of(&proxy.get("new.local", "/a").await),
        backend.addr.port()
    );
}

#[tokio::test]
async fn ssl_only_answers_plain_http_with_301_to_https() {
    let backend = EchoBackend::start().await;
    let mut secure = route("secure", &[backend.addr]);
    secure.ssl_only = true;
    let proxy = RunningProxy::start_with_table(&table_of(vec![("app", vec![secure])], None)).await;
    let response = proxy.get("App:80", "/x?y=1").await;
    assert_eq!(response.status, 301);
    assert_eq!(response.header("location"), "https://app/x?y=1");
    assert_eq!(backend.connections_accepted(), 0);
}

#[tokio::test]
async fn the_default_backend_serves_unknown_hosts_instead_of_503() {
    let [app, fallback] = [EchoBackend::start().await, EchoBackend::start().await];
    let proxy = RunningProxy::start_with_table(&table_of(
        vec![("app", vec![route("app", &[app.addr])])],
        Some(route("fallback", &[fallback.addr])),
    ))
    .await;
    assert_eq!(port_of(&proxy.get("app", "/").await), app.addr.port());
    let unknown = proxy.get("nobody.example", "/ping").await;
    assert_eq!(port_of(&unknown), fallback.addr.port());
    assert_eq!(unknown.echo()["host"], "nobody.example");
    assert_eq!(
        port_of(&proxy.get("127.0.0.1", "/").await),
        fallback.addr.port()
    );
}

#[tokio::test]
async fn sticky_sessions_stay_put_and_move_only_to_an_added_endpoint() {
    let mut started = backends(4).await;
    let newcomer = started.pop().unwrap();
    let three = addrs(&started);
    let proxy =
        RunningProxy::start_with_table(&table_of(vec![("app", vec![sticky("app", &three)])], None))
            .await;
    let mut client = proxy.client().await;

    let mut assigned = BTreeMap::new();
    for session in 0..24 {
        let cookie = format!("theme=dark; session=user-{session}");
        let first = port_of(&get_with_cookie(&mut client, &cookie).await);
        for _ in 0..3 {
            let again = port_of(&get_with_cookie(&mut client, &cookie).await);
            assert_eq!(again, first, "session {session} changed endpoint");
        }
        assigned.insert(session, first);
    }
    let used: BTreeSet<u16> = assigned.values().copied().collect();
    assert_eq!(
        used.len(),
        3,
        "24 sessions spread over the 3 endpoints: {assigned:?}"
    );

    let mut four = three.clone();
    four.push(newcomer.addr);
    proxy
        .router
        .update(&table_of(vec![("app", vec![sticky("app", &four)])], None));
    let mut moved = 0;
    for (session, before) in &assigned {
        let cookie = format!("session=user-{session}");
        let now = port_of(&get_with_cookie(&mut client, &cookie).await);
        if now != *before {
            assert_eq!(
                now,
                newcomer.addr.port(),
                "session {session} moved between old endpoints"
            );
            moved += 1;
        }
    }
    assert!(
        moved < assigned.len() / 2,
        "{moved} of {} sessions moved",
        assigned.len()
    );

    let without_cookie: BTreeSet<u16> = {
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            seen.insert(port_of(&client.get("app", "/").await));
        }
        seen
    };
    assert_eq!(
        without_cookie.len(),
        4,
        "requests without the cookie go round robin"
    );
}

#[tokio::test]
async fn ip_hash_keeps_each_client_network_on_one_endpoint() {
    let started = backends(3).await;
    let proxy = RunningProxy::start_with_table(&table_of(
        vec![(
            "app",
            vec![balanced("app", &addrs(&started), Balance::IpHash)],
        )],
        None,
    ))
    .await;
    let mut used = BTreeSet::new();
    // One client per /24 (nginx's ip_hash keys IPv4 clients by their first three octets).
    for third_octet in 2..=25u8 {
        let client_ip = IpAddr::from([127, 0, third_octet, 2]);
        let mut endpoint = None;
        for _ in 0..3 {
            // A new connection each time: the address, not the connection, decides.
            let mut client = TestClient::connect_from(proxy.addr, client_ip).await;
            let response = client.get("app", "/").await;
            assert_eq!(response.echo()["real_ip"], client_ip.to_string());
            let port = port_of(&response);
            assert_eq!(
                *endpoint.get_or_insert(port),
                port,
                "{client_ip} changed endpoint"
            );
        }
        used.insert(endpoint.unwrap());
    }
    assert!(used.len() >= 2, "24 client networks all hashed to {used:?}");
}

#[tokio::test]
async fn least_outstanding_avoids_the_endpoint_busy_with_a_slow_request() {
    let started = backends(2).await;
    let proxy = RunningProxy::start_with_table(&table_of(
        vec![(
            "app",
            vec![balanced("app", &addrs(&started), Balance::LeastConn)],
        )],
        None,
    ))
    .await;
    let mut slow_client = proxy.client().await;
    let slow = tokio::spawn(async move { slow_client.get("app", "/slow?delay_ms=1500").await });
    // Counted in flight before its connection was made.
    eventually("the slow request reached an endpoint", || {
        started
            .iter()
            .any(|backend| backend.connections_open() == 1)
    })
    .await;

    let mut client = proxy.client().await;
    let mut quick = BTreeSet::new();
    for _ in 0..4 {
        quick.insert(port_of(&client.get("app", "/").await));
    }
    let slow_port = port_of(&slow.await.unwrap());
    assert_eq!(quick.len(), 1, "round robin would alternate: {quick:?}");
    assert!(
        !quick.contains(&slow_port),
        "sent to the busy endpoint {slow_port}"
    );

    // Once the slow response has been relayed, both are idle again and alternate.
    let mut after = BTreeSet::new();
    for _ in 0..2 {
        after.insert(port_of(&client.get("app", "/").await));
    }
    assert_eq!(after.len(), 2, "{after:?}");
}

/// Each balancing method's order, not passive health, sends a request on past an endpoint that
/// refuses: ejection is off, so every request whose method picks the refusing endpoint first
/// must fall back by itself. Every request of the hashing methods is keyed to pick it first;
/// round robin (and least outstanding, all idle) picks it for every other request. The access
/// log shows each fallback: the refused try, then the live endpoint's answer.
#[tokio::test]
async fn every_balancing_method_falls_back_to_the_next_endpoint_on_refusal() {
    const REQUESTS: usize = 6;
    let live = EchoBackend::start().await;
    let refused = refused_addr().await;
    let endpoints = [refused, live.addr];
    let settings = ProxySettings {
        ejection: EjectionPeriods {
            first: Duration::ZERO,
            max: Duration::ZERO,
        },
        ..ProxySettings::default()
    };
    let sticky_cookie = Balance::StickyCookie {
        cookie: "session".into(),
    };
    let methods = [
        (Balance::RoundRobin, REQUESTS / 2),
        (Balance::LeastConn, REQUESTS / 2),
        (Balance::IpHash, REQUESTS),
        (sticky_cookie, REQUESTS),
    ];
    for (balance, fallbacks) in methods {
        let table = table_of(
            vec![("app", vec![balanced("app", &endpoints, balance.clone())])],
            None,
        );
        let logging = LoggingProxy::start(&table, settings.clone()).await;
        let proxy = &logging.proxy;
        // The endpoint the method tries first for a request: how the hashing methods' keys
        // are picked. (Asking round robin would move it on.)
        let first_choice = |headers: &HeaderMap, client: IpAddr| {
            let path = NormalPath::parse("/").unwrap();
            let target = PathAndQuery::from_static("/");
            match proxy.router.route(Scheme::Http, "app", &target, &path) {
                Ok(Routed::Forward { route, .. }) => {
                    route.endpoint_order(headers, client)[0].addr()
                }
                _ => panic!("app is not forwarded"),
            }
        };
        let mut client = proxy.client().await;
        let (mut cookies, mut networks) = (0.., 0..=u8::MAX);
        for _ in 0..REQUESTS {
            let response = match balance {
                Balance::RoundRobin | Balance::LeastConn => client.get("app", "/").await,
                Balance::IpHash => {
                    let client_ip = networks
                        .by_ref()
                        .map(|third_octet| IpAddr::from([127, 0, third_octet, 2]))
                        .find(|&ip| first_choice(&HeaderMap::new(), ip) == refused)
                        .expect("a client network that picks the refusing endpoint");
                    let mut from_network = TestClient::connect_from(proxy.addr, client_ip).await;
                    from_network.get("app", "/").await
                }
                Balance::StickyCookie { .. } => {
                    let cookie = cookies
                        .by_ref()
                        .map(|session: u32| format!("session=s{session}"))
                        .find(|cookie| {
                            let headers = HeaderMap::from_iter([(
                                http::header::COOKIE,
                                cookie.parse().unwrap(),
                            )]);
                            first_choice(&headers, IpAddr::from([127, 0, 0, 1])) == refused
                        })
                        .expect("a session that picks the refusing endpoint");
                    get_with_cookie(&mut client, &cookie).await
                }
            };
            assert_eq!(port_of(&response), live.addr.port(), "{balance:?}");
        }
        let lines = logging.lines().await;
        assert_eq!(lines.len(), REQUESTS, "{balance:?}: {lines:#?}");
        let fell_back = format!("\"{refused}, {}\" \"502, 200\"", live.addr);
        let fallbacks_logged = lines
            .iter()
            .filter(|line| line.contains(&fell_back))
            .count();
        assert_eq!(fallbacks_logged, fallbacks, "{balance:?}: {lines:#?}");
    }
}
