//! One request's trip through the proxy, as explicit phases: route by Host and path (or answer
//! with a redirect) → build the upstream request → forward it (in the order the service's
//! balancing method gives, failover on connect errors) → decorate the response. Failures become
//! the proxy's own one-line text answers (404/502/503).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use http::{
    header, uri::PathAndQuery, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::{
    backend_tls::BackendTlsPools,
    headers::{self, ProxyIdentity, RequestId, UpstreamAnswer},
    http2,
    router::{Endpoint, InFlight, RouteMiss, Routed, Router, ServiceRoute},
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
    #[error("no service for path {path:?} on host {host:?}")]
    NoContextRoot { host: String, path: String },
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
    #[error("redirect location {0:?} is not a valid header value")]
    UnencodableLocation(String),
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
            Self::NoContextRoot { .. } => StatusCode::NOT_FOUND,
            Self::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnencodableLocation(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
            Ok((response, answer)) => (response, answer.map(|answer| answer.addr)),
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
    ) -> Result<(Response<ProxyBody>, Option<UpstreamAnswer>), ProxyError> {
        let (route, upstream_target) = match self.route_phase(&request)? {
            Routed::Forward {
                route,
                upstream_target,
            } => (route, upstream_target),
            Routed::Redirect { status, location } => {
                return Ok((self.redirect_answer(status, location, request_id)?, None));
            }
        };
        if websocket::is_upgrade(&request, route.transport()) {
            let (response, answer) = self
                .websocket_phase(&route, request, request_id, client, upstream_target)
                .await?;
            return Ok((response, Some(answer)));
        }
        let endpoints = route.endpoint_order(request.headers(), client);
        let upstream_request = upstream_request_phase(request, request_id, client, upstream_target);
        let (upstream, answer, in_flight) = self
            .forward_phase(&route, endpoints, upstream_request)
            .await?;
        let response = self.response_phase(upstream, request_id, answer, in_flight);
        Ok((response, Some(answer)))
    }

    /// Route: by Host and path to a service with at least one endpoint, or to a redirect.
    fn route_phase(&self, request: &Request<Incoming>) -> Result<Routed, ProxyError> {
        if request.method() == Method::CONNECT {
            return Err(ProxyError::ConnectMethod);
        }
        let host = request_host(request).ok_or(ProxyError::MissingHost)?;
        // A listener that terminates TLS marks its requests with `Scheme::Https` in their
        // extensions; a request without the mark came in plain.
        let scheme = request
            .extensions()
            .get::<Scheme>()
            .copied()
            .unwrap_or(Scheme::Http);
        let target = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let routed = self
            .router
            .route(scheme, host, &target)
            .map_err(|miss| match miss {
                RouteMiss::UnknownHost => ProxyError::UnknownHost(host.to_owned()),
                RouteMiss::NoContextRoot => ProxyError::NoContextRoot {
                    host: host.to_owned(),
                    path: target.path().to_owned(),
                },
            })?;
        if let Routed::Forward { route, .. } = &routed {
            if route.endpoint_count() == 0 {
                return Err(ProxyError::NoEndpoints {
                    host: host.to_owned(),
                    service: route.service().to_owned(),
                });
            }
        }
        Ok(routed)
    }

    /// Forward: the endpoints in the order the service's balancing method gives, each tried
    /// once for as long as connecting fails; the request body is only streamed once a
    /// connection stands. The endpoint that answered counts the request as in flight.
    async fn forward_phase(
        &self,
        route: &ServiceRoute,
        endpoints: Vec<Endpoint>,
        mut request: Request<Incoming>,
    ) -> Result<(UpstreamResponse<Incoming>, UpstreamAnswer, InFlight), ProxyError> {
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
        let tried = endpoints.len();
        for endpoint in endpoints {
            let addr = endpoint.addr();
            let in_flight = endpoint.start_request();
            match upstreams.send(addr, request).await {
                Ok(upstream) => {
                    let answer = UpstreamAnswer {
                        addr,
                        response_time: upstream.response_time,
                    };
                    return Ok((upstream, answer, in_flight));
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
            tried,
        })
    }

    /// WebSocket: the upgrade relayed on a connection of its own, spliced after `101`.
    async fn websocket_phase(
        &self,
        route: &ServiceRoute,
        mut request: Request<Incoming>,
        request_id: &RequestId,
        client: IpAddr,
        upstream_target: PathAndQuery,
    ) -> Result<(Response<ProxyBody>, UpstreamAnswer), ProxyError> {
        let endpoints = route.endpoint_order(request.headers(), client);
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
        let upstream_request = upstream_request_phase(request, request_id, client, upstream_target);
        upgrade
            .forward(
                route,
                &endpoints,
                upstream_request,
                tls,
                request_id,
                &self.identity,
            )
            .await
    }

    /// Decorate: the upstream's answer, hop-by-hop removed and the proxy headers stamped.
    fn response_phase(
        &self,
        upstream: UpstreamResponse<Incoming>,
        request_id: &RequestId,
        answer: UpstreamAnswer,
        in_flight: InFlight,
    ) -> Response<ProxyBody> {
        let mut response = upstream.response.map(|body| {
            // The request stays in flight until its body is relayed or dropped.
            body.map_frame(move |frame| {
                let _until_body_ends = &in_flight;
                frame
            })
            .boxed()
        });
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
        self.text_answer(error.status(), format!("{error}\n"), request_id)
    }

    /// A redirect (`com.docker.lb.redirects`, `ssl_only`), with the identity headers.
    fn redirect_answer(
        &self,
        status: StatusCode,
        location: String,
        request_id: &RequestId,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // Built from a request target and a label checked as a URL, so only a bug lands here.
        let value = HeaderValue::try_from(location.as_str())
            .map_err(|_| ProxyError::UnencodableLocation(location.clone()))?;
        let mut response =
            self.text_answer(status, format!("redirecting to {location}\n"), request_id);
        response.headers_mut().insert(header::LOCATION, value);
        Ok(response)
    }

    fn text_answer(
        &self,
        status: StatusCode,
        text: String,
        request_id: &RequestId,
    ) -> Response<ProxyBody> {
        let body = Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed();
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
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

/// Build the upstream request: same method, headers and streaming body, the routed
/// origin-form target, HTTP/1.1 (upstream connections are kept alive even for HTTP/1.0 clients).
fn upstream_request_phase(
    request: Request<Incoming>,
    request_id: &RequestId,
    client: IpAddr,
    target: PathAndQuery,
) -> Request<Incoming> {
    let (mut parts, body) = request.into_parts();
    http2::adapt_for_http1(&mut parts);
    parts.uri = Uri::from(target);
    parts.version = Version::HTTP_11;
    parts.extensions.clear();
    headers::prepare_upstream_request(&mut parts.headers, request_id, client);
    Request::from_parts(parts, body)
}
