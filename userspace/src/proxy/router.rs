//! Where a request goes: the compiled route table (exact hosts, `*.suffix` wildcards, the
//! default backend), swapped atomically on every update; the longest context root holding the
//! normalised path (see [`super::path`]); the service's redirects and `ssl_only`; and the order
//! in which the service's endpoints are tried, by its balancing method.

use foldhash::HashMap as FastMap;
use std::{
    borrow::Cow,
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use cookie::Cookie;
use http::{header::COOKIE, uri::PathAndQuery, HeaderMap, StatusCode};
use tokio::sync::watch;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::{
    path::{self, NormalPath},
    request_metrics::{RouteMetrics, StatusClasses},
};
use crate::routes::{Balance, Redirect, Route, RouteTable, Scheme, Transport, ROOT_CONTEXT};

/// The proxy's current view of the route table, swapped atomically on every update.
#[derive(Debug, Default)]
pub struct Router {
    table: ArcSwap<CompiledTable>,
    /// Every endpoint of the current routes, the default backend's included, for draining the
    /// ones that left.
    endpoints: watch::Sender<Arc<HashSet<SocketAddr>>>,
    /// The SSL port `ssl_only` redirects to, when it is not HTTPS's own 443.
    https_port: Option<u16>,
    /// Requests answered without forwarding (no route, a redirect, a refused request).
    unrouted: StatusClasses,
}

/// The route table arranged for lookups; hosts share their service's [`ServiceRoute`]. Its maps
/// hash with foldhash rather than std's SipHash (about 100 instructions a lookup, a few
/// lookups per request): their keys come from the route table, so a client cannot choose
/// keys that collide, whatever Host it sends.
#[derive(Debug, Default)]
struct CompiledTable {
    /// Host name → its service routes, longest context root first.
    exact: FastMap<String, HostRoutes>,
    /// `*.example.org` keyed by its suffix `.example.org`.
    wildcard: FastMap<String, HostRoutes>,
    default_backend: Option<HostRoutes>,
    /// By service name, to carry round-robin positions across updates.
    services: FastMap<String, Arc<ServiceRoute>>,
    /// Requests in flight per endpoint, carried across updates so that requests that started
    /// before one are still counted after it.
    outstanding: FastMap<SocketAddr, Arc<AtomicUsize>>,
}

/// One host's service routes, longest context root first, and each one's metrics (the same
/// position in both).
#[derive(Debug, Default)]
struct HostRoutes {
    routes: Vec<Arc<ServiceRoute>>,
    metrics: Vec<Arc<RouteMetrics>>,
}

/// The host label of the default backend's metrics: it answers any host.
pub const DEFAULT_BACKEND_HOST: &str = "*";

/// Why a request matched no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMiss {
    /// No service answers this host, and there is no default backend.
    UnknownHost,
    /// Services answer this host, but none of their context roots holds the path.
    NoContextRoot,
}

/// What to do with a routed request.
#[derive(Debug)]
pub enum Routed {
    /// Send it to one of the route's endpoints, with this request target.
    Forward {
        route: Arc<ServiceRoute>,
        upstream_target: PathAndQuery,
        /// Where the request is counted.
        metrics: Arc<RouteMetrics>,
    },
    /// Answer it with a redirect.
    Redirect {
        status: StatusCode,
        location: String,
    },
}

impl Router {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A router whose `ssl_only` redirects name `port` (`PublishedSSLPort`) unless it is 443.
    pub fn with_https_port(port: u16) -> Arc<Self> {
        Arc::new(Self {
            https_port: (port != 443).then_some(port),
            ..Self::default()
        })
    }

    /// Replaces the routes; requests already in flight finish on the endpoints they picked.
    ///
    /// A service that stays in the table keeps its round-robin position, so that frequent
    /// updates with unchanged endpoints do not keep sending the next request to the first one.
    pub fn update(&self, table: &RouteTable) {
        let previous = self.table.load();
        let mut compiled = CompiledTable::default();
        let mut compile = |route: &Route| -> Arc<ServiceRoute> {
            if let Some(done) = compiled.services.get(&route.service) {
                return Arc::clone(done);
            }
            let endpoints = route
                .endpoints
                .iter()
                .map(|&addr| {
                    let counter = compiled.outstanding.entry(addr).or_insert_with(|| {
                        previous.outstanding.get(&addr).cloned().unwrap_or_default()
                    });
                    Endpoint {
                        addr,
                        outstanding: Arc::clone(counter),
                    }
                })
                .collect();
            let next = previous
                .services
                .get(&route.service)
                .map_or(0, |old| old.next.load(Ordering::Relaxed));
            let service_route = Arc::new(ServiceRoute {
                route: route.clone(),
                endpoints,
                next: AtomicUsize::new(next),
            });
            compiled
                .services
                .insert(route.service.clone(), Arc::clone(&service_route));
            service_route
        };
        let mut host_routes = |host: &str, routes: &[Route]| HostRoutes {
            metrics: routes
                .iter()
                .map(|route| {
                    let previous = previous.metrics_of(host, &route.service);
                    let metrics =
                        RouteMetrics::new(host, &route.service, &route.endpoints, previous);
                    Arc::new(metrics)
                })
                .collect(),
            routes: routes.iter().map(&mut compile).collect(),
        };
        let mut exact = FastMap::default();
        let mut wildcard = FastMap::default();
        for (host, routes) in &table.routes {
            let routes = host_routes(host, routes);
            match host.strip_prefix('*') {
                Some(suffix) => wildcard.insert(suffix.to_owned(), routes),
                None => exact.insert(host.clone(), routes),
            };
        }
        let default_backend = table
            .default_backend
            .as_ref()
            .map(|route| host_routes(DEFAULT_BACKEND_HOST, std::slice::from_ref(route)));
        compiled.exact = exact;
        compiled.wildcard = wildcard;
        compiled.default_backend = default_backend;
        let endpoints: HashSet<SocketAddr> = compiled.outstanding.keys().copied().collect();
        self.table.store(Arc::new(compiled));
        self.endpoints.send_if_modified(|current| {
            let changed = **current != endpoints;
            if changed {
                *current = Arc::new(endpoints);
            }
            changed
        });
    }

    /// Every endpoint of the current routes, updated with them.
    pub fn endpoints(&self) -> watch::Receiver<Arc<HashSet<SocketAddr>>> {
        self.endpoints.subscribe()
    }

    /// Routes a request by its scheme, `Host` value (or request authority), target as the
    /// client sent it, and that target's path normalised.
    ///
    /// The host is matched case-insensitively, with any port and a trailing dot ignored: an
    /// exact name first, then the most specific wildcard, then the default backend. Among the
    /// host's services, the one with the longest context root holding the normalised path wins.
    pub fn route(
        &self,
        scheme: Scheme,
        host: &str,
        target: &PathAndQuery,
        path: &NormalPath<'_>,
    ) -> Result<Routed, RouteMiss> {
        let key = route_key(host).ok_or(RouteMiss::UnknownHost)?;
        let table = self.table.load();
        let host_routes = table.host_routes(&key).ok_or(RouteMiss::UnknownHost)?;
        let index = host_routes
            .routes
            .iter()
            .position(|route| route.serves_path(path))
            .ok_or(RouteMiss::NoContextRoot)?;
        let (route, metrics) = (&host_routes.routes[index], &host_routes.metrics[index]);
        Ok(route.decide(scheme, &key, target, path, self.https_port, metrics))
    }

    /// Counts a request answered without forwarding.
    pub fn count_unrouted(&self, status: StatusCode) {
        self.unrouted.count(status);
    }

    /// Requests answered without forwarding, by status class.
    pub fn unrouted(&self) -> &StatusClasses {
        &self.unrouted
    }

    /// The metrics of every route now in the table: each host's, and the default backend's.
    pub fn route_metrics(&self) -> Vec<Arc<RouteMetrics>> {
        let table = self.table.load();
        let hosts = table.exact.values().chain(table.wildcard.values());
        hosts
            .chain(&table.default_backend)
            .flat_map(|host| host.metrics.iter().cloned())
            .collect()
    }

    /// The service serving `host` at its root path: where a TLS connection is relayed when that
    /// service asks for passthrough, since there is no HTTP request to route by.
    pub fn host_service(&self, host: &str) -> Option<Arc<ServiceRoute>> {
        let key = route_key(host)?;
        let table = self.table.load();
        let host_routes = table.host_routes(&key)?;
        host_routes
            .routes
            .iter()
            .find(|route| route.serves_path(&NormalPath::ROOT))
            .cloned()
    }
}

impl CompiledTable {
    fn host_routes(&self, key: &str) -> Option<&HostRoutes> {
        if let Some(routes) = self.exact.get(key) {
            return Some(routes);
        }
        // Left to right, the first suffix found is the longest: the most specific wildcard.
        let wildcard = key
            .match_indices('.')
            .find_map(|(dot, _)| self.wildcard.get(&key[dot..]));
        wildcard.or(self.default_backend.as_ref())
    }

    /// The metrics of `service`'s route on `host` (as the table names the host).
    fn metrics_of(&self, host: &str, service: &str) -> Option<&RouteMetrics> {
        let host_routes = match host.strip_prefix('*') {
            Some("") => self.default_backend.as_ref(),
            Some(suffix) => self.wildcard.get(suffix),
            None => self.exact.get(host),
        }?;
        let index = host_routes
            .routes
            .iter()
            .position(|route| route.service() == service)?;
        Some(&host_routes.metrics[index])
    }
}

/// The route-table key for a `Host` value: lower-case host without port or trailing dot,
/// borrowed when the host is lower-case already (it nearly always is).
pub fn route_key(host: &str) -> Option<Cow<'_, str>> {
    let (name, _) = split_host(host.trim())?;
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    Some(match name.bytes().any(|byte| byte.is_ascii_uppercase()) {
        true => Cow::Owned(name.to_ascii_lowercase()),
        false => Cow::Borrowed(name),
    })
}

/// A `Host` value or `:authority` split into its host and its port (RFC 9110 §7.2, RFC 3986
/// §3.2.2), an IPv6 literal kept in its brackets; `None` for what cannot be one: userinfo, a
/// path, spaces, an empty host, a port that is not a number below 65 536 (an empty port is
/// allowed, as RFC 3986 says). Hand-written because `http::uri::Authority`'s parser, run for
/// the Host check and again for the route, cost 1.4k instructions per request.
pub fn split_host(text: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = match text.strip_prefix('[') {
        Some(literal) => {
            let end = literal.find(']')?;
            let address = &literal[..end];
            let is_ip_literal = |byte: u8| byte.is_ascii_hexdigit() || matches!(byte, b':' | b'.');
            if address.is_empty() || !address.bytes().all(is_ip_literal) {
                return None;
            }
            let (host, after) = text.split_at(end + 2);
            let port = match after {
                "" => None,
                after => Some(after.strip_prefix(':')?),
            };
            (host, port)
        }
        None => {
            let (host, port) = match text.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            };
            if host.is_empty() || !host.bytes().all(is_reg_name_byte) {
                return None;
            }
            (host, port)
        }
    };
    let port = match port {
        None | Some("") => None,
        Some(port) if port.bytes().all(|byte| byte.is_ascii_digit()) => Some(port.parse().ok()?),
        Some(_) => return None,
    };
    Some((host, port))
}

/// RFC 3986's `reg-name`: unreserved characters, percent-encodings and sub-delimiters.
fn is_reg_name_byte(byte: u8) -> bool {
    byte == b'%' || path::is_unreserved_or_sub_delim(byte)
}

/// One service's route, as of the route update the request was routed with.
#[derive(Debug)]
pub struct ServiceRoute {
    route: Route,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
}

impl ServiceRoute {
    /// The Swarm service behind this route.
    pub fn service(&self) -> &str {
        &self.route.service
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// How the service is reached: TLS and WebSocket labels.
    pub fn transport(&self) -> &Transport {
        &self.route.transport
    }

    /// Whether the context root holds `path` ([`NormalPath::is_under`]): `/app` serves `/app`
    /// and `/app/x` but not `/apple`.
    fn serves_path(&self, path: &NormalPath<'_>) -> bool {
        let root = self.route.context_root.as_str();
        root == ROOT_CONTEXT || path.is_under(root)
    }

    /// The service's redirects first, then `ssl_only`, else forwarding. Redirects keep the
    /// client's target, as nginx's `$request_uri` does.
    fn decide(
        self: &Arc<Self>,
        scheme: Scheme,
        host: &str,
        target: &PathAndQuery,
        path: &NormalPath<'_>,
        https_port: Option<u16>,
        metrics: &Arc<RouteMetrics>,
    ) -> Routed {
        let redirect = self.route.redirects.iter().find(
            |Redirect {
                 source_scheme,
                 source_host,
                 ..
             }| { *source_scheme == scheme && source_host == host },
        );
        if let Some(redirect) = redirect {
            return Routed::Redirect {
                status: StatusCode::FOUND,
                location: format!("{}{target}", redirect.target),
            };
        }
        if self.route.ssl_only && scheme == Scheme::Http {
            return Routed::Redirect {
                status: StatusCode::MOVED_PERMANENTLY,
                location: match https_port {
                    None => format!("https://{host}{target}"),
                    Some(port) => format!("https://{host}:{port}{target}"),
                },
            };
        }
        Routed::Forward {
            route: Arc::clone(self),
            upstream_target: self.upstream_target(target, path),
            metrics: Arc::clone(metrics),
        }
    }

    /// The request target upstream, as nginx's `proxy_pass` sends it: the client's own target
    /// (a `proxy_pass` without a URI), or, when `context_root_rewrite` is set, the normalised
    /// path below the context root, re-encoded, and the client's query (a `proxy_pass` with a
    /// URI replacing the `location`'s part): `/app/x?q` → `/x?q`, `/app` → `/`,
    /// `/app/a/../b` → `/b`. Never a `..` that would climb out of the root upstream.
    fn upstream_target(&self, target: &PathAndQuery, path: &NormalPath<'_>) -> PathAndQuery {
        let root = self.route.context_root.as_str();
        if !self.route.context_root_rewrite || root == ROOT_CONTEXT {
            return target.clone();
        }
        let below = path
            .below(root)
            .expect("a route is chosen for a path its context root holds");
        let rewritten = match target.query() {
            Some(query) => format!("{below}?{query}"),
            None => below,
        };
        // Path bytes and escapes, and a query that was valid: always a valid target.
        rewritten
            .parse()
            .expect("an encoded path and a valid query are a valid target")
    }

    /// Every endpoint once, in the order to try them: the balancing method's choice first,
    /// then the fallbacks should connecting fail.
    ///
    /// - round robin: the next endpoint in turn, then the ones after it;
    /// - least outstanding: fewest requests in flight first, ties in round-robin order;
    /// - ip hash and sticky cookie: rendezvous hashing of the client address or cookie value,
    ///   so a key keeps its endpoint while that endpoint exists, and adding or removing an
    ///   endpoint moves only the keys that endpoint wins or held. Requests without the cookie
    ///   go round robin.
    pub fn endpoint_order(&self, headers: &HeaderMap, client: IpAddr) -> Vec<Endpoint> {
        match &self.route.balance {
            Balance::RoundRobin => self.round_robin_order(),
            Balance::LeastConn => {
                let mut order: Vec<(usize, Endpoint)> = self
                    .round_robin_order()
                    .into_iter()
                    .map(|endpoint| (endpoint.outstanding(), endpoint))
                    .collect();
                order.sort_by_key(|(outstanding, _)| *outstanding);
                order.into_iter().map(|(_, endpoint)| endpoint).collect()
            }
            Balance::IpHash => self.rendezvous_order(&ip_hash_key(client)),
            Balance::StickyCookie { cookie } => match cookie_value(headers, cookie) {
                Some(value) => self.rendezvous_order(value.as_bytes()),
                None => self.round_robin_order(),
            },
        }
    }

    fn round_robin_order(&self) -> Vec<Endpoint> {
        let count = self.endpoints.len();
        let start = match count {
            0 => 0,
            _ => self.next.fetch_add(1, Ordering::Relaxed) % count,
        };
        (0..count)
            .map(|offset| self.endpoints[(start + offset) % count].clone())
            .collect()
    }

    /// Highest random weight first: each endpoint's weight is a hash of the key and the
    /// endpoint's address, so the order depends on nothing else.
    fn rendezvous_order(&self, key: &[u8]) -> Vec<Endpoint> {
        let seed = xxh3_64(key);
        let mut weighted: Vec<(u64, &Endpoint)> = self
            .endpoints
            .iter()
            .map(|endpoint| {
                (
                    xxh3_64_with_seed(&addr_bytes(endpoint.addr), seed),
                    endpoint,
                )
            })
            .collect();
        weighted.sort_by(|(a_weight, a), (b_weight, b)| {
            b_weight.cmp(a_weight).then_with(|| a.addr.cmp(&b.addr))
        });
        weighted
            .into_iter()
            .map(|(_, endpoint)| endpoint.clone())
            .collect()
    }
}

/// An endpoint as offered to the forward phase: its address, and the count of requests in
/// flight to it that least-outstanding balancing reads.
#[derive(Debug, Clone)]
pub struct Endpoint {
    addr: SocketAddr,
    outstanding: Arc<AtomicUsize>,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counts a request to this endpoint as in flight until the returned guard is dropped:
    /// hold it until the response body has been relayed.
    pub fn start_request(&self) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(&self.outstanding))
    }

    fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// One request in flight to an endpoint; see [`Endpoint::start_request`].
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The first non-empty value of cookie `name` in the request's `Cookie` headers (HTTP/2
/// clients may send several).
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|cookie| cookie.name() == name && !cookie.value().is_empty())
        .map(|cookie| cookie.value().to_owned())
}

/// What `ip_hash` keys a client by, as nginx's `ip_hash` does: an IPv4 client's first three
/// octets (its /24: the clients behind one carrier-grade NAT or proxy farm stay together) and
/// an IPv6 client's whole address.
fn ip_hash_key(ip: IpAddr) -> Vec<u8> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.octets()[..3].to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn addr_bytes(addr: SocketAddr) -> Vec<u8> {
    let mut bytes = ip_bytes(addr.ip());
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use http::HeaderValue;

    use super::*;
    use crate::proxy::test_support::{route, table, table_of};
    use crate::routes::Redirect;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    /// Routes `text` as the handler does: by the target as sent and its normalised path.
    fn route_target(
        router: &Router,
        scheme: Scheme,
        host: &str,
        text: &str,
    ) -> Result<Routed, RouteMiss> {
        let target: PathAndQuery = text.parse().unwrap();
        let path = NormalPath::parse(target.path()).unwrap();
        router.route(scheme, host, &target, &path)
    }

    fn ports(endpoints: &[Endpoint]) -> Vec<u16> {
        endpoints.iter().map(|e| e.addr().port()).collect()
    }

    fn with_root(mut route: Route, root: &str, rewrite: bool) -> Route {
        route.context_root = root.to_owned();
        route.context_root_rewrite = rewrite;
        route
    }

    fn with_balance(mut route: Route, balance: Balance) -> Route {
        route.balance = balance;
        route
    }

    /// The service a plain HTTP request is forwarded to, and the target it is sent with.
    fn forwarded(router: &Router, host: &str, path: &str) -> Result<(String, String), RouteMiss> {
        match route_target(router, Scheme::Http, host, path)? {
            Routed::Forward {
                route,
                upstream_target,
                ..
            } => Ok((route.service().to_owned(), upstream_target.to_string())),
            Routed::Redirect { status, location } => {
                panic!("{host}{path} redirected ({status}) to {location}")
            }
        }
    }

    fn redirected(
        router: &Router,
        scheme: Scheme,
        host: &str,
        path: &str,
    ) -> Option<(u16, String)> {
        match route_target(router, scheme, host, path).unwrap() {
            Routed::Redirect { status, location } => Some((status.as_u16(), location)),
            Routed::Forward { .. } => None,
        }
    }

    fn service_of(router: &Router, host: &str, path: &str) -> Result<String, RouteMiss> {
        forwarded(router, host, path).map(|(service, _)| service)
    }

    fn order(route: &ServiceRoute, headers: &HeaderMap, client: IpAddr) -> Vec<u16> {
        ports(&route.endpoint_order(headers, client))
    }

    fn forward_route(router: &Router, host: &str) -> Arc<ServiceRoute> {
        match route_target(router, Scheme::Http, host, "/").unwrap() {
            Routed::Forward { route, .. } => route,
            Routed::Redirect { .. } => panic!("redirected"),
        }
    }

    fn local() -> IpAddr {
        IpAddr::from([127, 0, 0, 1])
    }

    #[test]
    fn route_key_ignores_case_port_and_trailing_dot() {
        assert_eq!(
            route_key("App.Example.COM").as_deref(),
            Some("app.example.com")
        );
        assert_eq!(
            route_key("app.example.com:8080").as_deref(),
            Some("app.example.com")
        );
        assert_eq!(
            route_key("app.example.com.").as_deref(),
            Some("app.example.com")
        );
        assert_eq!(route_key("10.1.2.3:80").as_deref(), Some("10.1.2.3"));
    }

    #[test]
    fn route_key_keeps_ipv6_literals_whole() {
        assert_eq!(route_key("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(route_key("[2001:DB8::1]").as_deref(), Some("[2001:db8::1]"));
    }

    #[test]
    fn route_key_rejects_garbage() {
        assert_eq!(route_key(""), None);
        assert_eq!(route_key("a b"), None);
        assert_eq!(route_key(":80"), None);
    }

    #[test]
    fn routes_by_normalised_host() {
        let router = Router::new();
        router.update(&table(&[("app.example.com", &[addr(1)])]));
        assert_eq!(
            service_of(&router, "APP.example.com:443", "/").as_deref(),
            Ok("svc-app.example.com")
        );
        assert_eq!(
            service_of(&router, "other.example.com", "/"),
            Err(RouteMiss::UnknownHost)
        );
        assert_eq!(service_of(&router, "a b", "/"), Err(RouteMiss::UnknownHost));
    }

    #[test]
    fn exact_host_beats_wildcards_and_the_most_specific_wildcard_wins() {
        let router = Router::new();
        router.update(&table_of(
            vec![
                ("*.example.org", vec![route("any", &[addr(1)])]),
                ("*.a.example.org", vec![route("under-a", &[addr(2)])]),
                ("x.a.example.org", vec![route("exact", &[addr(3)])]),
            ],
            None,
        ));
        let service = |host| service_of(&router, host, "/");
        assert_eq!(service("x.a.example.org").as_deref(), Ok("exact"));
        assert_eq!(service("y.a.example.org").as_deref(), Ok("under-a"));
        assert_eq!(service("z.y.a.example.org").as_deref(), Ok("under-a"));
        assert_eq!(service("a.example.org").as_deref(), Ok("any"));
        assert_eq!(service("B.Example.Org:80").as_deref(), Ok("any"));
        assert_eq!(service("example.org"), Err(RouteMiss::UnknownHost));
        assert_eq!(service("example.com"), Err(RouteMiss::UnknownHost));
    }

    #[test]
    fn the_longest_context_root_holding_the_path_wins() {
        let router = Router::new();
        // Longest first, as the route table keeps them.
        router.update(&table_of(
            vec![(
                "app",
                vec![
                    with_root(route("v2", &[addr(3)]), "/api/v2", false),
                    with_root(route("api", &[addr(2)]), "/api", true),
                    route("web", &[addr(1)]),
                ],
            )],
            None,
        ));
        let to = |path| forwarded(&router, "app", path).unwrap();
        let pair = |service: &str, target: &str| (service.to_owned(), target.to_owned());
        assert_eq!(to("/api/v2/x?y=1"), pair("v2", "/api/v2/x?y=1"));
        assert_eq!(to("/api/v2"), pair("v2", "/api/v2"));
        assert_eq!(to("/api/v20"), pair("api", "/v20"));
        assert_eq!(to("/api/x?y=1"), pair("api", "/x?y=1"));
        assert_eq!(to("/api"), pair("api", "/"));
        assert_eq!(to("/api/"), pair("api", "/"));
        assert_eq!(to("/api?q=1"), pair("api", "/?q=1"));
        assert_eq!(to("/apiary"), pair("web", "/apiary"));
        assert_eq!(to("/"), pair("web", "/"));
    }

    #[test]
    fn a_known_host_without_a_matching_context_root_is_no_route() {
        let router = Router::new();
        router.update(&table_of(
            vec![(
                "app",
                vec![with_root(route("api", &[addr(1)]), "/api", false)],
            )],
            Some(route("fallback", &[addr(9)])),
        ));
        assert_eq!(
            service_of(&router, "app", "/other"),
            Err(RouteMiss::NoContextRoot)
        );
        assert_eq!(service_of(&router, "app", "/api/x").as_deref(), Ok("api"));
    }

    #[test]
    fn the_default_backend_serves_unknown_hosts_only() {
        let router = Router::new();
        router.update(&table_of(
            vec![("app", vec![route("app", &[addr(1)])])],
            Some(route("fallback", &[addr(9)])),
        ));
        assert_eq!(service_of(&router, "app", "/").as_deref(), Ok("app"));
        assert_eq!(
            service_of(&router, "nobody.example", "/x").as_deref(),
            Ok("fallback")
        );
        assert_eq!(
            service_of(&router, "10.0.0.7:80", "/").as_deref(),
            Ok("fallback")
        );
    }

    #[test]
    fn redirects_match_scheme_and_host_and_keep_the_request_uri() {
        let mut both = route("web", &[addr(1)]);
        both.redirects = vec![Redirect {
            source_scheme: Scheme::Http,
            source_host: "old.local".into(),
            target: "http://new.local".into(),
        }];
        let router = Router::new();
        router.update(&table_of(
            vec![("old.local", vec![both.clone()]), ("new.local", vec![both])],
            None,
        ));
        assert_eq!(
            redirected(&router, Scheme::Http, "Old.Local:80", "/a/b?c=d"),
            Some((302, "http://new.local/a/b?c=d".into()))
        );
        assert_eq!(
            redirected(&router, Scheme::Http, "old.local", "/"),
            Some((302, "http://new.local/".into()))
        );
        assert_eq!(redirected(&router, Scheme::Https, "old.local", "/"), None);
        assert_eq!(redirected(&router, Scheme::Http, "new.local", "/"), None);
    }

    #[test]
    fn ssl_only_sends_plain_http_to_https_on_the_same_host_and_uri() {
        let mut secure = route("secure", &[addr(1)]);
        secure.ssl_only = true;
        let router = Router::new();
        router.update(&table_of(vec![("app", vec![secure])], None));
        assert_eq!(
            redirected(&router, Scheme::Http, "App:8080", "/x?y=1"),
            Some((301, "https://app/x?y=1".into()))
        );
        assert_eq!(redirected(&router, Scheme::Https, "app", "/x"), None);
    }

    #[test]
    fn ssl_only_names_a_published_ssl_port_other_than_443() {
        let mut secure = route("secure", &[addr(1)]);
        secure.ssl_only = true;
        let table = table_of(vec![("app", vec![secure])], None);
        let router = Router::with_https_port(8443);
        router.update(&table);
        assert_eq!(
            redirected(&router, Scheme::Http, "app:8080", "/x"),
            Some((301, "https://app:8443/x".into()))
        );
        let router = Router::with_https_port(443);
        router.update(&table);
        assert_eq!(
            redirected(&router, Scheme::Http, "app", "/x"),
            Some((301, "https://app/x".into()))
        );
    }

    #[test]
    fn round_robin_rotates_and_covers_every_endpoint_once() {
        let router = Router::new();
        router.update(&table(&[("a", &[addr(1), addr(2), addr(3)])]));
        let route = forward_route(&router, "a");
        let orders: Vec<Vec<u16>> = (0..4)
            .map(|_| order(&route, &HeaderMap::new(), local()))
            .collect();
        assert_eq!(
            orders,
            [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]].map(Vec::from)
        );
    }

    #[test]
    fn a_route_without_endpoints_has_an_empty_order() {
        let router = Router::new();
        router.update(&table(&[("a", &[])]));
        let route = forward_route(&router, "a");
        assert_eq!(route.endpoint_count(), 0);
        assert!(route.endpoint_order(&HeaderMap::new(), local()).is_empty());
    }

    #[test]
    fn update_keeps_round_robin_position_and_leaves_routed_requests_alone() {
        let router = Router::new();
        router.update(&table(&[("a", &[addr(1), addr(2)])]));
        let in_flight = forward_route(&router, "a");
        assert_eq!(order(&in_flight, &HeaderMap::new(), local())[0], 1);

        router.update(&table(&[("a", &[addr(1), addr(2)])]));
        let after_same = forward_route(&router, "a");
        assert_eq!(order(&after_same, &HeaderMap::new(), local())[0], 2);

        router.update(&table(&[("a", &[addr(7)])]));
        assert_eq!(
            order(&forward_route(&router, "a"), &HeaderMap::new(), local()),
            [7]
        );
        assert_eq!(in_flight.endpoint_count(), 2);
    }

    #[test]
    fn least_outstanding_prefers_idle_endpoints_and_counts_survive_updates() {
        let endpoints = [addr(1), addr(2), addr(3)];
        let router = Router::new();
        let routes = |endpoints: &[SocketAddr]| {
            table_of(
                vec![(
                    "a",
                    vec![with_balance(route("a", endpoints), Balance::LeastConn)],
                )],
                None,
            )
        };
        router.update(&routes(&endpoints));
        let route = forward_route(&router, "a");
        let none = HeaderMap::new();
        let first = route.endpoint_order(&none, local());
        let busy_one = first[0].start_request();
        let busy_two = first[0].start_request();
        let second = route.endpoint_order(&none, local());
        assert_ne!(second[0].addr(), first[0].addr());
        assert_eq!(second[2].addr(), first[0].addr(), "the busiest goes last");
        let also_busy = second[0].start_request();

        // After an update, the requests started before still count.
        router.update(&routes(&endpoints));
        let after = forward_route(&router, "a").endpoint_order(&none, local());
        let idle: BTreeSet<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(|a| *a != first[0].addr() && *a != second[0].addr())
            .collect();
        assert_eq!(ports(&after[..1]), [idle.first().unwrap().port()]);
        assert_eq!(after[1].addr(), second[0].addr());
        assert_eq!(after[2].addr(), first[0].addr());

        drop((busy_one, busy_two, also_busy));
        let idle_again = forward_route(&router, "a");
        let starts: BTreeSet<u16> = (0..3)
            .map(|_| idle_again.endpoint_order(&none, local())[0].addr().port())
            .collect();
        assert_eq!(starts.len(), 3, "equal loads fall back to round robin");
    }

    #[test]
    fn sticky_cookie_keeps_a_session_on_its_endpoint_without_cookie_round_robin() {
        let router = Router::new();
        let sticky = Balance::StickyCookie {
            cookie: "session".into(),
        };
        router.update(&table_of(
            vec![(
                "a",
                vec![with_balance(
                    route("a", &[addr(1), addr(2), addr(3)]),
                    sticky,
                )],
            )],
            None,
        ));
        let route = forward_route(&router, "a");
        let with_cookies = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(COOKIE, HeaderValue::from_str(value).unwrap());
            }
            headers
        };
        let session = with_cookies(&["theme=dark; session=abc123"]);
        let first = order(&route, &session, local());
        for _ in 0..5 {
            assert_eq!(order(&route, &session, local()), first);
        }
        assert_eq!(
            order(
                &route,
                &with_cookies(&["theme=dark", "session=abc123"]),
                local()
            ),
            first,
            "the cookie is found in a second Cookie header"
        );
        let firsts: BTreeSet<u16> = (0..30)
            .map(|n| order(&route, &with_cookies(&[&format!("session=s{n}")]), local())[0])
            .collect();
        assert_eq!(firsts.len(), 3, "sessions spread over every endpoint");
        for headers in [
            with_cookies(&[]),
            with_cookies(&["session="]),
            with_cookies(&["other=abc123"]),
        ] {
            let starts: BTreeSet<u16> = (0..3)
                .map(|_| order(&route, &headers, local())[0])
                .collect();
            assert_eq!(starts.len(), 3, "no session cookie: round robin");
        }
    }

    #[test]
    fn ip_hash_keeps_a_client_on_its_endpoint() {
        let router = Router::new();
        router.update(&table_of(
            vec![(
                "a",
                vec![with_balance(
                    route("a", &[addr(1), addr(2), addr(3)]),
                    Balance::IpHash,
                )],
            )],
            None,
        ));
        let route = forward_route(&router, "a");
        let none = HeaderMap::new();
        let client = IpAddr::from([192, 0, 2, 7]);
        let first = order(&route, &none, client);
        for _ in 0..5 {
            assert_eq!(order(&route, &none, client), first);
        }
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            order(&route, &none, mapped),
            first,
            "IPv4-mapped is the same client"
        );
        let same_24: BTreeSet<u16> = (0..30u8)
            .map(|n| order(&route, &none, IpAddr::from([192, 0, 2, n]))[0])
            .collect();
        assert_eq!(
            same_24.len(),
            1,
            "a /24 is one client, as in nginx's ip_hash"
        );
        let firsts: BTreeSet<u16> = (0..30u8)
            .map(|n| order(&route, &none, IpAddr::from([192, 0, n, 7]))[0])
            .collect();
        assert_eq!(firsts.len(), 3, "clients spread over every endpoint");
    }

    /// The first choice of 2000 keys over `endpoints`, with rendezvous hashing.
    fn assignment(endpoints: &[SocketAddr]) -> BTreeMap<String, SocketAddr> {
        let router = Router::new();
        let sticky = Balance::StickyCookie { cookie: "s".into() };
        router.update(&table_of(
            vec![("a", vec![with_balance(route("a", endpoints), sticky)])],
            None,
        ));
        let route = forward_route(&router, "a");
        (0..2000)
            .map(|n| {
                let key = format!("key-{n}");
                let mut headers = HeaderMap::new();
                headers.insert(COOKIE, HeaderValue::from_str(&format!("s={key}")).unwrap());
                (key, route.endpoint_order(&headers, local())[0].addr())
            })
            .collect()
    }

    #[test]
    fn adding_or_removing_an_endpoint_moves_only_the_sessions_it_takes_or_held() {
        let four: Vec<SocketAddr> = (1..=4).map(addr).collect();
        let five: Vec<SocketAddr> = (1..=5).map(addr).collect();
        let before = assignment(&four);
        let added = assignment(&five);
        let moved: Vec<&String> = before.keys().filter(|k| before[*k] != added[*k]).collect();
        assert!(
            moved.iter().all(|key| added[*key] == addr(5)),
            "a session moved between two old endpoints"
        );
        // The newcomer takes about a fifth (400 of 2000); a modulo hash would move ~80%.
        assert!((250..=550).contains(&moved.len()), "{} moved", moved.len());

        let without_two: Vec<SocketAddr> = four.iter().copied().filter(|a| *a != addr(2)).collect();
        let removed = assignment(&without_two);
        for (key, endpoint) in &before {
            if *endpoint != addr(2) {
                assert_eq!(
                    removed[key], *endpoint,
                    "{key} moved though its endpoint stayed"
                );
            }
        }
    }
}
