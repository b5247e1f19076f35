//! One request's trip through the proxy, as explicit phases: route by Host → build the upstream
//! request → forward it (round-robin start, failover on connect errors) → decorate the response.
//! Failures become the proxy's own one-line text answers (502/503).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use http::{
    header, request::Parts, uri::PathAndQuery, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::{
    backend_tls::BackendTlsPools,
    headers::{self, ProxyIdentity, RequestId, UpstreamAnswer},
    http2,
    router::{Router, ServiceRoute},
    upstream::{SendError, UpstreamError, UpstreamPool, UpstreamResponse},
    websocket, Scheme,
};

/// The body of every response the proxy gives its clients.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Why the proxy answers a request itself instead of relaying an upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no Host header")]
    MissingHost,
    #[error("no service for host {0:?}")]
    UnknownHost(String),
    #[error("service {service:?} for host {host:?} has no running tasks")]
    NoEndpoints { host: String, service: String },
    #[error("no endpoint of service {service:?} accepted a connection ({tried} tried)")]
    NoEndpointReachable { service: String, tried: usize },
    #[error("upstream {addr} failed before completing its response head")]
    UpstreamFailed {
        addr: SocketAddr,
        source: UpstreamError,
    },
    #[error("method CONNECT is not supported")]
    ConnectMethod,
    #[error("service {service:?} cannot use TLS to its tasks: {problem}")]
    BackendTls { service: String, problem: String },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingHost | Self::UnknownHost(_) | Self::NoEndpoints { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::NoEndpointReachable { .. }
            | Self::UpstreamFailed { .. }
            | Self::BackendTls { .. } => StatusCode::BAD_GATEWAY,
            Self::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

/// Everything a request needs from the proxy: routes, upstream connections, identity.
pub struct RequestHandler {
    router: Arc<Router>,
    upstreams: UpstreamPool<Incoming>,
    backend_tls: BackendTlsPools,
    identity: ProxyIdentity,
}

impl RequestHandler {
    pub fn new(
        router: Arc<Router>,
        upstreams: UpstreamPool<Incoming>,
        backend_tls: BackendTlsPools,
        identity: ProxyIdentity,
    ) -> Self {
        Self {
            router,
            upstreams,
            backend_tls,
            identity,
        }
    }

    /// Closes upstream connections idle for too long, plain and TLS.
    pub fn evict_idle_upstreams(&self) {
        self.upstreams.evict_expired();
        self.backend_tls.evict_expired();
    }

    /// Proxies one client request; every outcome is a response, never an error.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = RequestId::fresh();
        let method = request.method().clone();
        let host = request_host(&request).map(str::to_owned);
        let path = request.uri().path().to_owned();
        let scheme = request.extensions().get::<Scheme>().copied();

        // IPv4 clients of a dual-stack listener appear as `::ffff:a.b.c.d`; report them as IPv4.
        let outcome = self
            .proxy(request, &request_id, client.ip().to_canonical())
            .await;
        let (response, upstream) = match outcome {
            Ok((response, answer)) => (response, Some(answer.addr)),
            Err(error) => {
                if let ProxyError::UpstreamFailed { source, .. } = &error {
                    warn!(request_id = request_id.as_str(), error = %source, "upstream failed");
                }
                (self.local_answer(&error, &request_id), None)
            }
        };
        debug!(
            request_id = request_id.as_str(),
            %client,
            %method,
            ?scheme,
            host = host.as_deref().unwrap_or("-"),
            path,
            status = response.status().as_u16(),
            upstream = ?upstream,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        response
    }

    async fn proxy(
        &self,
        request: Request<Incoming>,
        request_id: &RequestId,
        client: IpAddr,
    ) -> Result<(Response<ProxyBody>, UpstreamAnswer), ProxyError> {
        let route = self.route_phase(&request)?;
        if websocket::is_upgrade(&request, route.transport()) {
            return self
                .websocket_phase(&route, request, request_id, client)
                .await;
        }
        let upstream_request = upstream_request_phase(request, request_id, client);
        let (upstream, answer) = self.forward_phase(&route, upstream_request).await?;
        Ok((self.response_phase(upstream, request_id, answer), answer))
    }

    /// Route: the Host's service, which must have at least one endpoint.
    fn route_phase(&self, request: &Request<Incoming>) -> Result<Arc<ServiceRoute>, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectMethod);
        }
        let host = request_host(request).ok_or(ProxyError::MissingHost)?;
        let route = self
            .router
            .route(host)
            .ok_or_else(|| ProxyError::UnknownHost(host.to_owned()))?;
        if route.endpoints().is_empty() {
            return Err(ProxyError::NoEndpoints {
                host: host.to_owned(),
                service: route.service().to_owned(),
            });
        }
        Ok(route)
    }

    /// Forward: the round-robin endpoint first, then each other endpoint once, for as long as
    /// connecting fails; the request body is only streamed once a connection stands.
    async fn forward_phase(
        &self,
        route: &ServiceRoute,
        mut request: Request<Incoming>,
    ) -> Result<(UpstreamResponse<Incoming>, UpstreamAnswer), ProxyError> {
        let upstreams = match &route.transport().backend_tls {
            None => self.upstreams.clone(),
            Some(backend) => {
                self.backend_tls
                    .pool(backend)
                    .map_err(|problem| ProxyError::BackendTls {
                        service: route.service().to_owned(),
                        problem,
                    })?
            }
        };
        for addr in route.failover_order() {
            match upstreams.send(addr, request).await {
                Ok(upstream) => {
                    let answer = UpstreamAnswer {
                        addr,
                        response_time: upstream.response_time,
                    };
                    return Ok((upstream, answer));
                }
                Err(SendError::NotSent {
                    request: unsent,
                    error,
                }) => {
                    warn!(service = route.service(), %error, "upstream unavailable; trying the next endpoint");
                    request = *unsent;
                }
                Err(SendError::Failed(source)) => {
                    return Err(ProxyError::UpstreamFailed { addr, source });
                }
            }
        }
        Err(ProxyError::NoEndpointReachable {
            service: route.service().to_owned(),
            tried: route.endpoints().len(),
        })
    }

    /// WebSocket: the upgrade relayed on a connection of its own, spliced after `101`.
    async fn websocket_phase(
        &self,
        route: &ServiceRoute,
        mut request: Request<Incoming>,
        request_id: &RequestId,
        client: IpAddr,
    ) -> Result<(Response<ProxyBody>, UpstreamAnswer), ProxyError> {
        let upgrade = websocket::Upgrade::take(&mut request);
        let tls = match &route.transport().backend_tls {
            None => None,
            Some(backend) => Some(self.backend_tls.upstream_tls(backend).map_err(|problem| {
                ProxyError::BackendTls {
                    service: route.service().to_owned(),
                    problem,
                }
            })?),
        };
        let upstream_request = upstream_request_phase(request, request_id, client);
        upgrade
            .forward(route, upstream_request, tls, request_id, &self.identity)
            .await
    }

    /// Decorate: the upstream's answer, hop-by-hop removed and the proxy headers stamped.
    fn response_phase(
        &self,
        upstream: UpstreamResponse<Incoming>,
        request_id: &RequestId,
        answer: UpstreamAnswer,
    ) -> Response<ProxyBody> {
        let mut response = upstream.response.map(BodyExt::boxed);
        headers::prepare_client_response(
            response.headers_mut(),
            request_id,
            &self.identity,
            answer,
        );
        response
    }

    /// The proxy's own answer: the error as one line of text, with the identity headers.
    fn local_answer(&self, error: &ProxyError, request_id: &RequestId) -> Response<ProxyBody> {
        let body = Full::new(Bytes::from(format!("{error}\n")))
            .map_err(|never| match never {})
            .boxed();
        let mut response = Response::new(body);
        *response.status_mut() = error.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers::stamp_identity(headers, request_id, &self.identity);
        response
    }
}

/// The host a request is for: the authority of an absolute-form target, which RFC 9112 §3.2.2
/// says wins over `Host`, else the `Host` header.
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request.headers().get(header::HOST)?.to_str().ok(),
    }
}

/// Build the upstream request: same method, headers and streaming body, origin-form target,
/// HTTP/1.1 (upstream connections are kept alive even for HTTP/1.0 clients).
fn upstream_request_phase(
    request: Request<Incoming>,
    request_id: &RequestId,
    client: IpAddr,
) -> Request<Incoming> {
    let (mut parts, body) = request.into_parts();
    http2::adapt_for_http1(&mut parts);
    parts.uri = origin_form(&parts);
    parts.version = Version::HTTP_11;
    parts.extensions.clear();
    headers::prepare_upstream_request(&mut parts.headers, request_id, client);
    Request::from_parts(parts, body)
}

fn origin_form(parts: &Parts) -> Uri {
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path_and_query)
}
