//! One request's trip through the proxy, as explicit phases: check (Host, declared body size) →
//! route by Host → build the upstream request → forward it → decorate the response. Failures
//! become the proxy's own one-line text answers, and every answer ends with an access log line.
//!
//! Forwarding tries the route's endpoints in the router's order, passively healthy ones first
//! (see [`super::health`]). A request moves on to the next endpoint when no connection could be
//! made, and, when it may be replayed (see [`super::retry`]), also when the exchange failed or
//! timed out or the upstream answered 502, 503 or 504; at most `upstream_tries` upstreams receive
//! it, each endpoint at most once.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header, request::Parts, uri::PathAndQuery, uri::Scheme, Method, Request, Response, StatusCode,
    Uri, Version,
};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::{
    access_log::{AccessEntry, AccessLog, UpstreamAttempt},
    headers::{self, ClientFacts, ProxyIdentity, RequestId, UpstreamAnswer},
    health::PassiveHealth,
    limits::{self, ClientBody, ClientBodyError, ClientLimits, HostError},
    observed::ObservedBody,
    retry::{self, ForwardBody, OutgoingRequest},
    router::{Router, ServiceRoute},
    upstream::{SendError, Stall, UpstreamError, UpstreamPool, UpstreamResponse},
};

/// The body of every response the proxy gives its clients.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Why the proxy answers a request itself instead of relaying an upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    InvalidHost(HostError),
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
    #[error("upstream {addr} timed out: {stall}")]
    UpstreamTimeout { addr: SocketAddr, stall: Stall },
    #[error(transparent)]
    ClientBody(#[from] ClientBodyError),
    #[error("method CONNECT is not supported")]
    ConnectMethod,
}

impl ProxyError {
    /// Whether the connection is closed after this answer, as nginx does after refusing a
    /// request as malformed or too large: what follows on the connection cannot be trusted.
    fn closes_connection(&self) -> bool {
        matches!(self, Self::InvalidHost(_) | Self::ClientBody(_))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidHost(_) => StatusCode::BAD_REQUEST,
            Self::MissingHost | Self::UnknownHost(_) | Self::NoEndpoints { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::NoEndpointReachable { .. } | Self::UpstreamFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::ClientBody(error) => error.status(),
            Self::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

/// The client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ClientConnection {
    pub addr: SocketAddr,
    /// How the client reached the proxy, told to upstreams as `X-Forwarded-Proto`.
    pub scheme: Scheme,
}

/// How requests are checked and forwarded.
#[derive(Debug, Clone)]
pub struct HandlerSettings {
    pub limits: ClientLimits,
    /// `UnderscoresInHeaders`.
    pub underscores_in_headers: bool,
    /// How many upstreams may receive one request; endpoints that could not be connected to do
    /// not count.
    pub upstream_tries: usize,
}

impl Default for HandlerSettings {
    fn default() -> Self {
        Self {
            limits: ClientLimits::default(),
            underscores_in_headers: false,
            upstream_tries: 3,
        }
    }
}

/// Everything a request needs from the proxy: routes, upstream connections and their health,
/// identity, settings, the access log.
pub struct RequestHandler {
    router: Arc<Router>,
    upstreams: UpstreamPool<ForwardBody>,
    health: Arc<PassiveHealth>,
    identity: ProxyIdentity,
    settings: HandlerSettings,
    access_log: Option<AccessLog>,
}

impl RequestHandler {
    pub fn new(
        router: Arc<Router>,
        upstreams: UpstreamPool<ForwardBody>,
        health: Arc<PassiveHealth>,
        identity: ProxyIdentity,
        settings: HandlerSettings,
        access_log: Option<AccessLog>,
    ) -> Self {
        Self {
            router,
            upstreams,
            health,
            identity,
            settings,
            access_log,
        }
    }

    /// Proxies one client request; every outcome is a response, never an error.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        connection: &ClientConnection,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = RequestId::fresh();
        let mut entry = AccessEntry {
            // IPv4 clients of a dual-stack listener appear as `::ffff:a.b.c.d`: report IPv4.
            client: connection.addr.ip().to_canonical(),
            request_line: request_line(&request),
            status: StatusCode::OK,
            referer: header_text(&request, header::REFERER),
            user_agent: header_text(&request, header::USER_AGENT),
            request_id: request_id.as_str().to_owned(),
            upstreams: Vec::new(),
        };
        let host = request_host(&request).map(str::to_owned);

        let outcome = self
            .proxy(request, &request_id, connection, &mut entry.upstreams)
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
        entry.status = response.status();
        debug!(
            request_id = request_id.as_str(),
            client = %connection.addr,
            request = entry.request_line,
            host = host.as_deref().unwrap_or("-"),
            status = entry.status.as_u16(),
            upstream = ?upstream,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
        match &self.access_log {
            Some(log) => {
                let log = log.clone();
                response.map(|body| {
                    ObservedBody::new(body, move |end| log.record(&entry, end.bytes)).boxed()
                })
            }
            None => response,
        }
    }

    async fn proxy(
        &self,
        request: Request<Incoming>,
        request_id: &RequestId,
        connection: &ClientConnection,
        attempts: &mut Vec<UpstreamAttempt>,
    ) -> Result<(Response<ProxyBody>, UpstreamAnswer), ProxyError> {
        self.check_phase(&request)?;
        let route = self.route_phase(&request)?;
        let upstream_request = self.upstream_request_phase(request, request_id, connection);
        let outgoing = OutgoingRequest::prepare(upstream_request).await?;
        let endpoints = route.failover_order().collect();
        let (upstream, answer) = self
            .forward_phase(&route, endpoints, outgoing, attempts)
            .await?;
        Ok((self.response_phase(upstream, request_id, answer), answer))
    }

    /// Check: the request is well-formed enough to route, and its declared body allowed.
    fn check_phase(&self, request: &Request<Incoming>) -> Result<(), ProxyError> {
        limits::check_host(request.version(), request.headers())
            .map_err(ProxyError::InvalidHost)?;
        limits::check_declared_length(request.headers(), self.settings.limits.max_body_size)?;
        Ok(())
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

    /// Build the upstream request: same method, headers and body (with the client body limits
    /// applied), origin-form target, HTTP/1.1 (upstream connections are kept alive even for
    /// HTTP/1.0 clients).
    fn upstream_request_phase(
        &self,
        request: Request<Incoming>,
        request_id: &RequestId,
        connection: &ClientConnection,
    ) -> Request<ClientBody> {
        let (mut parts, body) = request.into_parts();
        parts.uri = origin_form(&parts);
        parts.version = Version::HTTP_11;
        parts.extensions.clear();
        let client = ClientFacts {
            request_id,
            addr: connection.addr.ip().to_canonical(),
            scheme: connection.scheme.as_str(),
            underscores_in_headers: self.settings.underscores_in_headers,
        };
        headers::prepare_upstream_request(&mut parts.headers, client);
        Request::from_parts(parts, ClientBody::new(body, &self.settings.limits))
    }

    /// Forward: each of `endpoints` in turn, passively healthy ones first, for as long as the
    /// request may go on to the next one. Every try is recorded in `attempts`.
    async fn forward_phase(
        &self,
        route: &ServiceRoute,
        endpoints: Vec<SocketAddr>,
        mut outgoing: OutgoingRequest,
        attempts: &mut Vec<UpstreamAttempt>,
    ) -> Result<(UpstreamResponse<ForwardBody>, UpstreamAnswer), ProxyError> {
        let candidates = self
            .health
            .healthy_first(endpoints, |addr| *addr, Instant::now());
        let tries = self.settings.upstream_tries.max(1);
        let replayable = outgoing.is_replayable();
        let mut received = 0;
        // A 502/503/504 answer held back while another endpoint is tried, and the last failure.
        let mut held_answer: Option<(UpstreamResponse<ForwardBody>, UpstreamAnswer)> = None;
        let mut last_failure = None;
        for (index, &addr) in candidates.iter().enumerate() {
            if received >= tries {
                break;
            }
            let Some(request) = outgoing.next_try() else {
                break;
            };
            let started = Instant::now();
            let may_retry =
                |received: usize| replayable && received < tries && index + 1 < candidates.len();
            match self.upstreams.send(addr, request).await {
                Ok(upstream) => {
                    self.health.record_success(addr);
                    received += 1;
                    let status = upstream.response.status();
                    let answer = UpstreamAnswer {
                        addr,
                        response_time: upstream.response_time,
                    };
                    attempts.push(attempt(addr, status, upstream.response_time));
                    if retry::is_retried_status(status) && may_retry(received) {
                        warn!(
                            service = route.service(),
                            %addr,
                            %status,
                            "upstream answered with a gateway error; trying the next endpoint"
                        );
                        held_answer = Some((upstream, answer));
                        continue;
                    }
                    return Ok((upstream, answer));
                }
                Err(SendError::NotSent { request, error }) => {
                    if error.is_unreachable() {
                        self.health.record_failure(addr, Instant::now());
                    }
                    warn!(
                        service = route.service(),
                        %error,
                        "upstream unavailable; trying the next endpoint"
                    );
                    attempts.push(attempt(addr, StatusCode::BAD_GATEWAY, started.elapsed()));
                    outgoing.give_back(*request);
                }
                Err(SendError::Failed(error)) => {
                    if let Some(body_error) = error.body_error::<ClientBodyError>() {
                        attempts.push(attempt(addr, body_error.status(), started.elapsed()));
                        return Err(ProxyError::ClientBody(body_error.clone()));
                    }
                    received += 1;
                    let failure = match error.stall() {
                        Some(stall) => {
                            self.health.record_failure(addr, Instant::now());
                            ProxyError::UpstreamTimeout { addr, stall }
                        }
                        None => ProxyError::UpstreamFailed {
                            addr,
                            source: error,
                        },
                    };
                    attempts.push(attempt(addr, failure.status(), started.elapsed()));
                    if !may_retry(received) {
                        return Err(failure);
                    }
                    warn!(
                        service = route.service(),
                        error = %failure,
                        "upstream exchange failed; trying the next endpoint"
                    );
                    last_failure = Some(failure);
                }
            }
        }
        if let Some(answer) = held_answer {
            return Ok(answer);
        }
        Err(
            last_failure.unwrap_or_else(|| ProxyError::NoEndpointReachable {
                service: route.service().to_owned(),
                tried: attempts.len(),
            }),
        )
    }

    /// Decorate: the upstream's answer, hop-by-hop removed and the proxy headers stamped.
    fn response_phase(
        &self,
        upstream: UpstreamResponse<ForwardBody>,
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
        if error.closes_connection() {
            headers.insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        headers::stamp_identity(headers, request_id, &self.identity);
        response
    }
}

fn attempt(addr: SocketAddr, status: StatusCode, response_time: Duration) -> UpstreamAttempt {
    UpstreamAttempt {
        addr,
        status,
        response_time,
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

/// nginx's `$request`: `METHOD target VERSION`.
fn request_line<B>(request: &Request<B>) -> String {
    format!(
        "{} {} {:?}",
        request.method(),
        request.uri(),
        request.version()
    )
}

fn header_text<B>(request: &Request<B>, name: header::HeaderName) -> Option<String> {
    let value = request.headers().get(name)?;
    Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
}

fn origin_form(parts: &Parts) -> Uri {
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path_and_query)
}
