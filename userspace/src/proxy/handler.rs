//! One request's trip through the proxy, as explicit phases: check (Host, declared body size) →
//! route by Host and path (or answer with a redirect) → build the upstream request → forward it
//! → decorate the response. Failures become the proxy's own one-line text answers, and every
//! answer ends with an access log line.
//!
//! Forwarding tries the route's endpoints in the order the service's balancing method gives,
//! passively healthy ones first (see [`super::health`]). A request moves on to the next endpoint
//! when no connection could be made, and, when it may be replayed (see [`super::retry`]), also
//! when the exchange failed or timed out or the upstream answered 502, 503 or 504; at most
//! `upstream_tries` upstreams receive it, each endpoint at most once. WebSocket upgrades go to
//! the first endpoint that accepts a connection of their own (see [`super::websocket`]).

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    header, uri::PathAndQuery, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::{
    access_log::{AccessEntry, AccessLog, RequestLine, UpstreamAttempt},
    answer::{BodyError, ProxyBody, ProxyError},
    backend_tls::BackendTlsPools,
    headers::{self, ClientFacts, ProxyIdentity, RequestId, UpstreamAnswer},
    health::PassiveHealth,
    held_bodies::HeldBodies,
    http2,
    limits::{self, ClientBody, ClientBodyError, ClientLimits},
    log_budget::LogBudget,
    observed::ObservedBody,
    path::NormalPath,
    request_metrics::RouteMetrics,
    retry::{self, OutgoingRequest},
    router::{Endpoint, InFlight, RouteMiss, Routed, Router, ServiceRoute},
    upstream::{SendError, UpstreamPool, UpstreamResponse},
    websocket, Scheme,
};

/// The warnings of failed upstream tries, at most [`super::log_budget::PER_SECOND`] a second: an
/// outage must not become a log storm (`suppressed` says how many were held back).
static UPSTREAM_WARNINGS: LogBudget = LogBudget::new();

/// How requests are checked and forwarded.
#[derive(Debug, Clone)]
pub struct HandlerSettings {
    pub limits: ClientLimits,
    /// `UnderscoresInHeaders`.
    pub underscores_in_headers: bool,
    /// How many upstreams may receive one request; endpoints that could not be connected to do
    /// not count.
    pub upstream_tries: usize,
    /// Bytes of request bodies a worker may hold for replay at once (see [`HeldBodies`]).
    pub held_body_budget: usize,
}

impl Default for HandlerSettings {
    fn default() -> Self {
        Self {
            limits: ClientLimits::default(),
            underscores_in_headers: false,
            upstream_tries: 3,
            // A thousand bodies of the largest size held.
            held_body_budget: 64 << 20,
        }
    }
}

/// Everything a request needs from the proxy: routes, upstream connections (plain and TLS) and
/// their health, identity, settings, the access log.
pub struct RequestHandler {
    router: Arc<Router>,
    upstreams: UpstreamPool,
    backend_tls: BackendTlsPools,
    health: Arc<PassiveHealth>,
    identity: ProxyIdentity,
    settings: HandlerSettings,
    access_log: Option<AccessLog>,
    held_bodies: Arc<HeldBodies>,
}

/// The client side of one request, as the upstream request is built from it.
struct ClientSide<'a> {
    request_id: &'a RequestId,
    addr: IpAddr,
    scheme: Scheme,
}

impl RequestHandler {
    pub fn new(
        router: Arc<Router>,
        upstreams: UpstreamPool,
        backend_tls: BackendTlsPools,
        health: Arc<PassiveHealth>,
        identity: ProxyIdentity,
        settings: HandlerSettings,
        access_log: Option<AccessLog>,
    ) -> Self {
        Self {
            router,
            upstreams,
            backend_tls,
            health,
            identity,
            held_bodies: HeldBodies::new(settings.held_body_budget),
            settings,
            access_log,
        }
    }

    /// Closes upstream connections idle for too long, plain and TLS, and forgets stale
    /// ejections.
    pub fn evict_idle_upstreams(&self, now: Instant) {
        self.upstreams.evict_expired();
        self.backend_tls.evict_expired();
        self.health.forget_stale(now);
    }

    /// Drains the endpoints not in `current` from every upstream pool, plain and TLS.
    pub fn drain_removed_endpoints(&self, current: &HashSet<SocketAddr>, drain_timeout: Duration) {
        self.upstreams.retain_endpoints(current, drain_timeout);
        self.backend_tls.retain_endpoints(current, drain_timeout);
    }

    /// Proxies one client request that came on a `scheme` port; every outcome is a response,
    /// never an error.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
        scheme: Scheme,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let request_id = RequestId::fresh();
        // IPv4 clients of a dual-stack listener appear as `::ffff:a.b.c.d`; report them as IPv4.
        let client_side = ClientSide {
            request_id: &request_id,
            addr: client.ip().to_canonical(),
            scheme,
        };
        let mut entry = AccessEntry {
            client: client_side.addr,
            request_line: RequestLine::Parsed {
                method: request.method().clone(),
                target: request.uri().clone(),
                version: request.version(),
            },
            status: StatusCode::OK,
            referer: request.headers().get(header::REFERER).cloned(),
            user_agent: request.headers().get(header::USER_AGENT).cloned(),
            request_id: request_id.clone(),
            upstreams: Vec::new(),
        };
        // Only the debug line below needs the host as its own string.
        let host = tracing::enabled!(tracing::Level::DEBUG)
            .then(|| request_host(&request).map(str::to_owned))
            .flatten();

        let mut route_metrics = None;
        let outcome = self
            .proxy(
                request,
                &client_side,
                &mut entry.upstreams,
                &mut route_metrics,
            )
            .await;
        let (response, upstream) = match outcome {
            Ok((response, answer)) => (response, answer.map(|answer| answer.addr)),
            Err(error) => {
                if let ProxyError::UpstreamFailed { source, .. } = &error {
                    if let Some(suppressed) = UPSTREAM_WARNINGS.admit() {
                        warn!(
                            request_id = request_id.as_str(),
                            error = %source,
                            suppressed,
                            "upstream failed"
                        );
                    }
                }
                (self.local_answer(&error, &request_id), None)
            }
        };
        entry.status = response.status();
        let elapsed = started.elapsed();
        match &route_metrics {
            Some(metrics) => metrics.record(&entry.upstreams, upstream, entry.status, elapsed),
            None => self.router.count_unrouted(entry.status),
        }
        debug!(
            request_id = request_id.as_str(),
            %client,
            ?scheme,
            request = %entry.request_line,
            host = host.as_deref().unwrap_or("-"),
            status = entry.status.as_u16(),
            upstream = ?upstream,
            elapsed_ms = elapsed.as_millis() as u64,
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
        client: &ClientSide<'_>,
        attempts: &mut Vec<UpstreamAttempt>,
        route_metrics: &mut Option<Arc<RouteMetrics>>,
    ) -> Result<(Response<ProxyBody>, Option<UpstreamAnswer>), ProxyError> {
        self.check_phase(&request)?;
        let (routed, path) = self.route_phase(&request, client.scheme)?;
        let (route, upstream_target) = match routed {
            Routed::Forward {
                route,
                upstream_target,
                metrics,
            } => {
                *route_metrics = Some(metrics);
                (route, upstream_target)
            }
            Routed::Redirect { status, location } => {
                let answer = self.redirect_answer(status, location, client.request_id)?;
                return Ok((answer, None));
            }
        };
        if websocket::is_upgrade(&request, &path, route.transport()) {
            // Boxed: connecting on its own makes it KiBs larger than the rest, and every
            // request's future would carry that room, moved into its box.
            let upgrade = self.websocket_phase(&route, request, client, upstream_target);
            let (response, answer) = Box::pin(upgrade).await?;
            return Ok((response, Some(answer)));
        }
        let endpoints = route.endpoint_order(request.headers(), client.addr);
        let upstream_request = self
            .upstream_request_phase(request, client, upstream_target)
            .map(|body| ClientBody::new(body, &self.settings.limits));
        let outgoing = OutgoingRequest::prepare(upstream_request, &self.held_bodies).await?;
        let (upstream, answer, in_flight) = self
            .forward_phase(&route, endpoints, outgoing, attempts)
            .await?;
        let response = self.response_phase(upstream, client.request_id, answer, in_flight);
        Ok((response, Some(answer)))
    }

    /// Check: the request is well-formed enough to route, and its declared body allowed.
    fn check_phase(&self, request: &Request<Incoming>) -> Result<(), ProxyError> {
        limits::check_host(request.version(), request.headers())
            .map_err(ProxyError::InvalidHost)?;
        limits::check_declared_length(request.headers(), self.settings.limits.max_body_size)?;
        Ok(())
    }

    /// Route: by Host and normalised path to a service with at least one endpoint, or to a
    /// redirect; the normalised path is returned for the WebSocket endpoints to hold.
    fn route_phase<'r>(
        &self,
        request: &'r Request<Incoming>,
        scheme: Scheme,
    ) -> Result<(Routed, NormalPath<'r>), ProxyError> {
        if [Method::CONNECT, Method::TRACE].contains(request.method()) {
            return Err(ProxyError::MethodNotAllowed(request.method().clone()));
        }
        // Before the host and any route, as nginx refuses such a request line before it
        // reads the headers, whatever the server's locations and redirects.
        let sent_path = request
            .uri()
            .path_and_query()
            .map_or("/", PathAndQuery::path);
        let path = NormalPath::parse(sent_path).map_err(|problem| ProxyError::InvalidPath {
            path: sent_path.to_owned(),
            problem,
        })?;
        let host = request_host(request).ok_or(ProxyError::MissingHost)?;
        let target = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let routed =
            self.router
                .route(scheme, host, &target, &path)
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
        Ok((routed, path))
    }

    /// Build the upstream request: same method, headers and streaming body, the routed
    /// origin-form target, HTTP/1.1 (upstream connections are kept alive even for HTTP/1.0
    /// clients).
    fn upstream_request_phase(
        &self,
        request: Request<Incoming>,
        client: &ClientSide<'_>,
        target: PathAndQuery,
    ) -> Request<Incoming> {
        let (mut parts, body) = request.into_parts();
        http2::adapt_for_http1(&mut parts);
        if let Some(host) = routed_host(&parts.uri) {
            parts.headers.insert(header::HOST, host);
        }
        parts.uri = Uri::from(target);
        parts.version = Version::HTTP_11;
        parts.extensions.clear();
        let facts = ClientFacts {
            request_id: client.request_id,
            addr: client.addr,
            scheme: forwarded_proto(client.scheme),
            underscores_in_headers: self.settings.underscores_in_headers,
        };
        headers::prepare_upstream_request(&mut parts.headers, facts);
        Request::from_parts(parts, body)
    }

    /// Forward: each of `endpoints` in turn, passively healthy ones first, for as long as the
    /// request may go on to the next one; over TLS for `ssl_backend` services. Every try is
    /// recorded in `attempts` and counted as in flight on its endpoint; the endpoint whose
    /// answer is relayed keeps counting it.
    async fn forward_phase(
        &self,
        route: &ServiceRoute,
        endpoints: Vec<Endpoint>,
        mut outgoing: OutgoingRequest,
        attempts: &mut Vec<UpstreamAttempt>,
    ) -> Result<(UpstreamResponse, UpstreamAnswer, InFlight), ProxyError> {
        let upstreams = self.pool_for(route)?;
        let forward_started = Instant::now();
        let candidates = self
            .health
            .healthy_first(endpoints, Endpoint::addr, forward_started);
        let tries = self.settings.upstream_tries.max(1);
        let replayable = outgoing.is_replayable();
        let mut received = 0;
        // A 502/503/504 answer held back while another endpoint is tried, and the last failure.
        let mut held_answer = None;
        let mut last_failure = None;
        for (index, endpoint) in candidates.iter().enumerate() {
            if received >= tries {
                break;
            }
            let Some(request) = outgoing.next_try(index + 1 == candidates.len()) else {
                break;
            };
            let addr = endpoint.addr();
            let in_flight = endpoint.start_request();
            let started = match index {
                0 => forward_started,
                _ => Instant::now(),
            };
            let may_retry =
                |received: usize| replayable && received < tries && index + 1 < candidates.len();
            match upstreams.send(addr, request).await {
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
                        if let Some(suppressed) = UPSTREAM_WARNINGS.admit() {
                            warn!(
                                service = route.service(),
                                %addr,
                                %status,
                                suppressed,
                                "upstream answered with a gateway error; trying the next endpoint"
                            );
                        }
                        held_answer = Some((upstream, answer, in_flight));
                        continue;
                    }
                    return Ok((upstream, answer, in_flight));
                }
                Err(SendError::NotSent { request, error }) => {
                    if error.is_unreachable() {
                        self.health.record_failure(addr, Instant::now());
                    }
                    if let Some(suppressed) = UPSTREAM_WARNINGS.admit() {
                        warn!(
                            service = route.service(),
                            %error,
                            suppressed,
                            "upstream unavailable; trying the next endpoint"
                        );
                    }
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
                    if let Some(suppressed) = UPSTREAM_WARNINGS.admit() {
                        warn!(
                            service = route.service(),
                            error = %failure,
                            suppressed,
                            "upstream exchange failed; trying the next endpoint"
                        );
                    }
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

    /// WebSocket: the upgrade relayed on a connection of its own, spliced after `101`.
    async fn websocket_phase(
        &self,
        route: &ServiceRoute,
        mut request: Request<Incoming>,
        client: &ClientSide<'_>,
        upstream_target: PathAndQuery,
    ) -> Result<(Response<ProxyBody>, UpstreamAnswer), ProxyError> {
        let endpoints = self.health.healthy_first(
            route.endpoint_order(request.headers(), client.addr),
            Endpoint::addr,
            Instant::now(),
        );
        let upgrade = websocket::Upgrade::take(&mut request);
        let pool = self.pool_for(route)?;
        let upstream_request = self.upstream_request_phase(request, client, upstream_target);
        let target = websocket::UpgradeTarget {
            route,
            endpoints: &endpoints,
            pool,
        };
        upgrade
            .forward(target, upstream_request, client.request_id, &self.identity)
            .await
    }

    /// The budget of request bodies held for replay.
    pub fn held_bodies(&self) -> Arc<HeldBodies> {
        Arc::clone(&self.held_bodies)
    }

    /// `ConnectTimeout`, for connections made outside the pools (TLS passthrough).
    pub fn connect_timeout(&self) -> Duration {
        self.upstreams.connect_timeout()
    }

    /// The upstream pool of the route's tasks: plain, or with its `ssl_backend` TLS.
    fn pool_for(&self, route: &ServiceRoute) -> Result<UpstreamPool, ProxyError> {
        match &route.transport().backend_tls {
            None => Ok(self.upstreams.clone()),
            Some(backend) => {
                self.backend_tls
                    .pool(backend)
                    .map_err(|problem| ProxyError::BackendTls {
                        service: route.service().to_owned(),
                        problem,
                    })
            }
        }
    }

    /// Decorate: the upstream's answer, hop-by-hop removed and the proxy headers stamped.
    fn response_phase(
        &self,
        upstream: UpstreamResponse,
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
            .map_err(BodyError::from)
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
        let mut response = self.text_answer(error.status(), format!("{error}\n"), request_id);
        if error.closes_connection() {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
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

fn attempt(addr: SocketAddr, status: StatusCode, response_time: Duration) -> UpstreamAttempt {
    UpstreamAttempt {
        addr,
        status,
        response_time,
    }
}

/// `X-Forwarded-Proto`: how the client reached the proxy.
fn forwarded_proto(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    }
}

/// The `Host` an upstream gets when the request was routed by its target's authority (an
/// absolute-form target, or HTTP/2's `:authority`): that authority, as RFC 9112 §3.2.2 asks of
/// a proxy, so that the router and the upstream never see two different hosts.
fn routed_host(uri: &Uri) -> Option<HeaderValue> {
    let authority = uri.authority()?;
    let host = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    };
    HeaderValue::from_str(&host).ok()
}

/// The host a request is for: the authority of an absolute-form target, which RFC 9112 §3.2.2
/// says wins over `Host`, else the `Host` header.
fn request_host<B>(request: &Request<B>) -> Option<&str> {
    match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request.headers().get(header::HOST)?.to_str().ok(),
    }
}
