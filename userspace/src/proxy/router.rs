//! Host-based routing: the compiled route table, swapped atomically on every update, and the
//! round-robin order in which a route's endpoints are tried.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use arc_swap::ArcSwap;
use http::uri::Authority;

use crate::routes::{RouteTable, Transport};

/// The proxy's current view of the route table, swapped atomically on every update.
#[derive(Debug, Default)]
pub struct Router {
    routes: ArcSwap<HashMap<String, Arc<ServiceRoute>>>,
}

impl Router {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the routes; requests already in flight finish on the endpoints they picked.
    ///
    /// A host that stays in the table keeps its round-robin position, so that frequent
    /// updates with unchanged endpoints do not keep sending the next request to the first one.
    pub fn update(&self, table: &RouteTable) {
        let previous = self.routes.load();
        let compiled = table
            .routes
            .iter()
            .map(|(host, route)| {
                let next = previous
                    .get(host)
                    .map_or(0, |old| old.next.load(Ordering::Relaxed));
                let compiled = ServiceRoute {
                    service: route.service.clone(),
                    endpoints: route.endpoints.clone(),
                    transport: route.transport.clone(),
                    next: AtomicUsize::new(next),
                };
                (host.clone(), Arc::new(compiled))
            })
            .collect();
        self.routes.store(Arc::new(compiled));
    }

    /// The route for a `Host` header value (or request authority): matched case-insensitively,
    /// with any port and a trailing dot ignored. IPv6 literals keep their brackets (`[::1]`).
    pub fn route(&self, host: &str) -> Option<Arc<ServiceRoute>> {
        let key = route_key(host)?;
        self.routes.load().get(&key).cloned()
    }
}

/// The route-table key for a `Host` value: lower-case host without port or trailing dot.
pub fn route_key(host: &str) -> Option<String> {
    let authority: Authority = host.trim().parse().ok()?;
    let name = authority.host();
    let name = name.strip_suffix('.').unwrap_or(name);
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// One host's service and endpoints, as of the route update the request was routed with.
#[derive(Debug)]
pub struct ServiceRoute {
    service: String,
    endpoints: Vec<SocketAddr>,
    transport: Transport,
    next: AtomicUsize,
}

impl ServiceRoute {
    /// The Swarm service behind this host.
    pub fn service(&self) -> &str {
        &self.service
    }

    pub fn endpoints(&self) -> &[SocketAddr] {
        &self.endpoints
    }

    /// How the service is reached: TLS and WebSocket labels.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Every endpoint exactly once: first the round-robin pick, then the ones after it (wrapping
    /// around), which are the fallbacks when connecting fails.
    pub fn failover_order(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let count = self.endpoints.len();
        let start = match count {
            0 => 0,
            _ => self.next.fetch_add(1, Ordering::Relaxed) % count,
        };
        (0..count).map(move |offset| self.endpoints[(start + offset) % count])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::routes::Route;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn table(entries: &[(&str, &[u16])]) -> RouteTable {
        let routes: BTreeMap<_, _> = entries
            .iter()
            .map(|(host, ports)| {
                let route = Route {
                    service: format!("svc-{host}"),
                    endpoints: ports.iter().copied().map(addr).collect(),
                    transport: Transport::default(),
                };
                (host.to_string(), route)
            })
            .collect();
        RouteTable {
            routes,
            rejected: Vec::new(),
        }
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
        router.update(&table(&[("app.example.com", &[1])]));
        let route = router.route("APP.example.com:443").expect("routed");
        assert_eq!(route.service(), "svc-app.example.com");
        assert!(router.route("other.example.com").is_none());
    }

    #[test]
    fn failover_order_rotates_and_covers_every_endpoint_once() {
        let router = Router::new();
        router.update(&table(&[("a", &[1, 2, 3])]));
        let route = router.route("a").unwrap();
        let orders: Vec<Vec<u16>> = (0..4)
            .map(|_| route.failover_order().map(|a| a.port()).collect())
            .collect();
        assert_eq!(
            orders,
            [[1, 2, 3], [2, 3, 1], [3, 1, 2], [1, 2, 3]].map(Vec::from)
        );
    }

    #[test]
    fn failover_order_of_a_route_without_endpoints_is_empty() {
        let router = Router::new();
        router.update(&table(&[("a", &[])]));
        assert_eq!(router.route("a").unwrap().failover_order().count(), 0);
    }

    #[test]
    fn update_keeps_round_robin_position_and_leaves_routed_requests_alone() {
        let router = Router::new();
        router.update(&table(&[("a", &[1, 2])]));
        let in_flight = router.route("a").unwrap();
        assert_eq!(in_flight.failover_order().next(), Some(addr(1)));

        router.update(&table(&[("a", &[1, 2])]));
        let after_same = router.route("a").unwrap();
        assert_eq!(after_same.failover_order().next(), Some(addr(2)));

        router.update(&table(&[("a", &[7])]));
        assert_eq!(router.route("a").unwrap().endpoints(), [addr(7)]);
        assert_eq!(in_flight.endpoints(), [addr(1), addr(2)]);
    }
}
