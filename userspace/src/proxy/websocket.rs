//! `com.docker.lb.websocket_endpoints`: on those paths an HTTP/1.1 `Upgrade: websocket`
//! request keeps its upgrade headers and goes to the task on a connection of its own (never a
//! pooled one, which could not be reused afterwards), under the pool's `ReadTimeout`,
//! `SendTimeout` and drain. After the task's `101 Switching Protocols` the client's
//! connection task relays both connections (see [`super::upgrade`]) until either side closes,
//! neither sends anything for `ReadTimeout` (as nginx's `proxy_read_timeout` closes an idle
//! WebSocket), the task's endpoint is drained, or the proxy's shutdown cuts it.
//!
//! Endpoints hold paths as context roots do, by the one prefix rule of [`super::path`], against
//! the normalised path: `/ws` covers `/ws`, `/ws/chat`, `//ws/chat` and `/%77s`, never `/wsx`
//! (which a bare nginx `location /ws` prefix would also take: an endpoint names a path, not
//! the start of one).

use std::{net::SocketAddr, time::Instant};

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tracing::{debug, warn};

use super::{
    answer::{ProxyBody, ProxyError},
    headers::{self, ProxyIdentity, RequestId, UpstreamAnswer},
    path::NormalPath,
    router::{Endpoint, ServiceRoute},
    upgrade::{ClientUpgrade, UpgradeSender, UpstreamUpgrade},
    upstream::{UpstreamError, UpstreamPool},
};
use crate::routes::Transport;

/// Whether `request`, whose normalised path is `path`, asks for a WebSocket on one of the
/// route's WebSocket endpoints.
pub fn is_upgrade<B>(request: &Request<B>, path: &NormalPath<'_>, transport: &Transport) -> bool {
    // The endpoints first: most services have none, and the header checks hash two names.
    transport
        .websocket_endpoints
        .iter()
        .any(|endpoint| path.is_under(endpoint))
        && request.method() == Method::GET
        && request.version() == Version::HTTP_11
        && has_token(request.headers(), header::UPGRADE, "websocket")
        && has_token(request.headers(), header::CONNECTION, "upgrade")
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

/// A client's WebSocket upgrade, taken from its request before that is rewritten for the task.
pub struct Upgrade {
    /// `None` when the request's connection cannot be handed over.
    client: Option<UpgradeSender>,
    protocol: HeaderValue,
}

impl Upgrade {
    pub fn take(request: &mut Request<Incoming>) -> Self {
        let protocol = request
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("websocket"));
        Self {
            client: ClientUpgrade::take(request),
            protocol,
        }
    }

    /// Sends the upstream request, with its upgrade headers restored, to the first endpoint
    /// that accepts a connection; once the task switches protocols, leaves its connection to
    /// the client's connection task.
    pub async fn forward(
        self,
        target: UpgradeTarget<'_>,
        mut request: Request<Incoming>,
        request_id: &RequestId,
        identity: &ProxyIdentity,
    ) -> Result<(Response<ProxyBody>, UpstreamAnswer), ProxyError> {
        let Self { client, protocol } = self;
        restore_upgrade_headers(request.headers_mut(), &protocol);
        let (endpoint, mut sender) = target.connect_any().await?;
        let addr = endpoint.addr();
        let in_flight = endpoint.start_request();
        let sent_at = Instant::now();
        let mut response =
            sender
                .send_request(request)
                .await
                .map_err(|source| ProxyError::UpstreamFailed {
                    addr,
                    source: UpstreamError::Upgrade { addr, source },
                })?;
        let answer = UpstreamAnswer {
            addr,
            response_time: sent_at.elapsed(),
        };
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let upstream = UpstreamUpgrade {
                upgraded: hyper::upgrade::on(&mut response),
                addr,
                in_flight,
            };
            match client {
                Some(client) => {
                    let _ = client.send(upstream);
                }
                None => {
                    debug!(%addr, "WebSocket upgrade not relayed: the client connection cannot be handed over")
                }
            }
        }
        let mut response = response.map(|body| body.map_err(Into::into).boxed());
        headers::prepare_client_response(response.headers_mut(), request_id, identity, answer);
        if switching {
            restore_upgrade_headers(response.headers_mut(), &protocol);
        }
        Ok((response, answer))
    }
}

/// The upgrade headers that hop-by-hop stripping removed, put back for this one hop pair.
fn restore_upgrade_headers(headers: &mut HeaderMap, protocol: &HeaderValue) {
    headers.insert(header::UPGRADE, protocol.clone());
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Where an upgrade request may go, and how to connect there.
pub struct UpgradeTarget<'a> {
    pub route: &'a ServiceRoute,
    /// The route's endpoints in the order to try them.
    pub endpoints: &'a [Endpoint],
    /// The pool whose settings (TLS, timeouts) and drains the connection follows.
    pub pool: UpstreamPool,
}

impl UpgradeTarget<'_> {
    /// A fresh connection to the first endpoint that accepts one.
    async fn connect_any(&self) -> Result<(&Endpoint, http1::SendRequest<Incoming>), ProxyError> {
        for endpoint in self.endpoints {
            match self.connect(endpoint.addr()).await {
                Ok(sender) => return Ok((endpoint, sender)),
                Err(error) => {
                    warn!(service = self.route.service(), %error, "WebSocket upstream unavailable; trying the next endpoint");
                }
            }
        }
        Err(ProxyError::NoEndpointReachable {
            service: self.route.service().to_owned(),
            tried: self.endpoints.len(),
        })
    }

    /// A connection of its own to the task, which hyper hands over after `101`.
    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<Incoming>, UpstreamError> {
        let stream = self.pool.connect_dedicated(addr).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(%addr, %error, "WebSocket upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Relays bytes both ways between the upgraded client and task connections, until either
/// side closes or fails (the task's connection fails after `ReadTimeout` without traffic).
/// Either side's end ends both, as nginx ends an upgraded connection: a WebSocket peer that has
/// closed its side is done, and waiting for the other could hold the connection forever.
pub async fn relay(client: impl AsyncRead + AsyncWrite + Unpin, upstream: UpstreamUpgrade) {
    let UpstreamUpgrade {
        upgraded,
        addr,
        in_flight,
    } = upstream;
    let upstream = match upgraded.await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(error) => return debug!(%addr, %error, "WebSocket upgrade not completed"),
    };
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (mut from_upstream, mut to_upstream) = tokio::io::split(upstream);
    let sent = async {
        let sent = tokio::io::copy(&mut from_client, &mut to_upstream).await;
        let _ = to_upstream.shutdown().await;
        ("client", sent)
    };
    let received = async {
        let received = tokio::io::copy(&mut from_upstream, &mut to_client).await;
        let _ = to_client.shutdown().await;
        ("task", received)
    };
    let (closed_by, copied) =
        tokio::select! { sent = sent => sent, received = received => received };
    match copied {
        Ok(bytes) => debug!(%addr, closed_by, bytes, "WebSocket closed"),
        Err(error) => debug!(%addr, closed_by, %error, "WebSocket ended with an error"),
    }
    drop(in_flight);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest as _, Message};

    use super::*;
    use crate::{
        proxy::{
            test_backends::websocket_echo,
            tls_test_support::{route, TempDir, TlsProxy},
        },
        routes::Transport,
    };

    const HOST: &str = "chat.example.org";

    async fn proxy_to(backend: SocketAddr, secrets: &TempDir) -> TlsProxy {
        let transport = Transport {
            websocket_endpoints: vec!["/ws".to_owned()],
            ..Transport::default()
        };
        let routes = BTreeMap::from([(HOST.to_owned(), route("chat", &[backend], transport))]);
        TlsProxy::start(routes, secrets.path()).await
    }

    #[tokio::test]
    async fn websocket_echo_through_the_proxy() {
        let secrets = TempDir::create("secrets");
        let proxy = proxy_to(websocket_echo().await, &secrets).await;
        let stream = TcpStream::connect(proxy.http).await.unwrap();
        let request = format!("ws://{HOST}/ws/room-1")
            .into_client_request()
            .unwrap();
        let (mut socket, response) = tokio_tungstenite::client_async(request, stream)
            .await
            .expect("the upgrade goes through the proxy");
        assert_eq!(response.status(), 101);
        assert!(response.headers().contains_key("x-request-id"));
        assert!(response.headers().contains_key("x-upstream-addr"));

        for text in ["hello", "through xlb", &"long ".repeat(20_000)] {
            socket.send(Message::text(text)).await.unwrap();
            assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(text));
        }
        socket
            .send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        assert_eq!(
            socket.next().await.unwrap().unwrap(),
            Message::binary(vec![0u8, 1, 2, 255])
        );
        socket.close(None).await.unwrap();
    }

    /// The second request of a kept-alive connection that idled in between comes to a new hyper
    /// connection (the first one ended when the connection was parked): its upgrade is handed
    /// over all the same.
    #[tokio::test]
    async fn a_websocket_after_a_plain_request_on_the_same_connection() {
        let secrets = TempDir::create("secrets");
        let proxy = proxy_to(websocket_echo().await, &secrets).await;
        let mut stream = TcpStream::connect(proxy.http).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: unknown.example.org\r\n\r\n")
            .await
            .unwrap();
        // The proxy's own 503, whose body ends the first line naming the host.
        let mut answer = Vec::new();
        while !answer.ends_with(b"\"unknown.example.org\"\n") {
            let mut chunk = [0u8; 1024];
            let read = stream.read(&mut chunk).await.unwrap();
            assert!(
                read > 0,
                "closed after {:?}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&chunk[..read]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 503"), "{answer:?}");
        // Idle long enough to be parked.
        tokio::time::sleep(4 * crate::proxy::head_guard::PARK_AFTER).await;

        let request = format!("ws://{HOST}/ws/room-2")
            .into_client_request()
            .unwrap();
        let (mut socket, response) = tokio_tungstenite::client_async(request, stream)
            .await
            .expect("the upgrade goes through on the kept-alive connection");
        assert_eq!(response.status(), 101);
        socket.send(Message::text("second")).await.unwrap();
        assert_eq!(
            socket.next().await.unwrap().unwrap(),
            Message::text("second")
        );
        socket.close(None).await.unwrap();
    }

    /// `/wsx` only starts with the endpoint `/ws`'s text: it is not on it.
    #[tokio::test]
    async fn upgrades_outside_the_websocket_endpoints_are_not_relayed() {
        let secrets = TempDir::create("secrets");
        let proxy = proxy_to(websocket_echo().await, &secrets).await;
        for path in ["/elsewhere", "/wsx", "/wsx/room-1", "/ws/../elsewhere"] {
            let stream = TcpStream::connect(proxy.http).await.unwrap();
            let request = format!("ws://{HOST}{path}").into_client_request().unwrap();
            let refused = tokio_tungstenite::client_async(request, stream).await;
            assert!(
                refused.is_err(),
                "{path}: upgrade relayed outside websocket_endpoints"
            );
        }
    }

    /// The endpoint holds the normalised path, as the context roots do.
    #[tokio::test]
    async fn upgrades_on_an_endpoint_written_otherwise_are_relayed() {
        let secrets = TempDir::create("secrets");
        let proxy = proxy_to(websocket_echo().await, &secrets).await;
        for path in ["//ws/room-1", "/%77s/room-1", "/chat/../ws"] {
            let stream = TcpStream::connect(proxy.http).await.unwrap();
            let request = format!("ws://{HOST}{path}").into_client_request().unwrap();
            let (mut socket, response) = tokio_tungstenite::client_async(request, stream)
                .await
                .unwrap_or_else(|error| panic!("{path}: upgrade not relayed: {error}"));
            assert_eq!(response.status(), 101, "{path}");
            socket.send(Message::text(path)).await.unwrap();
            assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(path));
            socket.close(None).await.unwrap();
        }
    }

    #[test]
    fn only_get_upgrades_on_a_websocket_endpoint_are_relayed() {
        let transport = Transport {
            websocket_endpoints: vec!["/ws".to_owned()],
            ..Transport::default()
        };
        let upgrades = |method: Method, target: &str, connection: &str, transport: &Transport| {
            let request = Request::builder()
                .method(method)
                .uri(target)
                .header("upgrade", "WebSocket")
                .header("connection", connection)
                .body(())
                .unwrap();
            let path = NormalPath::parse(request.uri().path()).unwrap();
            is_upgrade(&request, &path, transport)
        };
        assert!(upgrades(
            Method::GET,
            "/ws",
            "keep-alive, Upgrade",
            &transport
        ));
        assert!(upgrades(Method::GET, "/ws/x?y", "upgrade", &transport));
        assert!(!upgrades(Method::POST, "/ws", "upgrade", &transport));
        assert!(!upgrades(Method::GET, "/api", "upgrade", &transport));
        assert!(!upgrades(Method::GET, "/ws", "keep-alive", &transport));
        assert!(!upgrades(
            Method::GET,
            "/ws",
            "upgrade",
            &Transport::default()
        ));
    }

    /// The endpoint holds the normalised path by the context roots' prefix rule: a path that
    /// only starts with the endpoint's text is not on it.
    #[test]
    fn websocket_endpoints_hold_normalised_paths_at_segment_boundaries() {
        let transport = Transport {
            websocket_endpoints: vec!["/ws".to_owned(), "/live/".to_owned()],
            ..Transport::default()
        };
        let on_endpoint = |target: &str| {
            let request = Request::get(target)
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .body(())
                .unwrap();
            let path = NormalPath::parse(request.uri().path()).unwrap();
            is_upgrade(&request, &path, &transport)
        };
        for target in [
            "/ws",
            "/ws/",
            "/ws/chat",
            "//ws/chat",
            "/%77s",
            "/api/../ws",
            "/live/x",
        ] {
            assert!(on_endpoint(target), "{target} is on an endpoint");
        }
        for target in [
            "/wsx",
            "/ws-chat",
            "/ws%78",
            "/ws/../api",
            "/live",
            "/liver/x",
        ] {
            assert!(!on_endpoint(target), "{target} is on no endpoint");
        }
    }
}
