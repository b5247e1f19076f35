//! What the proxy counts of its requests for `/metrics`: per route (a host and the service
//! answering it), requests by the upstream that answered and the status class, tries and
//! retries, and the request and upstream response-time histograms.
//!
//! The counts are relaxed atomics that the router hands out with each route, kept across route
//! updates while the route and its endpoints stay: recording a request is a handful of atomic
//! adds, with no registry lookup and no label strings on the request path. `/metrics` reads
//! them at scrape time ([`crate::metrics`]).

use foldhash::HashMap as FastMap;
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use http::StatusCode;

use super::access_log::UpstreamAttempt;

/// Upper bounds of the duration histograms' buckets, in seconds: Prometheus' defaults, which
/// span what a proxied request takes from a local service to a slow one.
pub const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A duration histogram over [`DURATION_BUCKETS`] (and one bucket above them).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A histogram as read: per-bucket counts (the encoder accumulates them), their sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSample {
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn sample(&self) -> HistogramSample {
        let bounds = DURATION_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        HistogramSample {
            count: buckets.iter().map(|(_, count)| count).sum(),
            buckets,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// Responses counted by status class, 1xx to 5xx.
#[derive(Debug, Default)]
pub struct StatusClasses([AtomicU64; 5]);

/// The label value of each status class.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl StatusClasses {
    pub fn count(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.0[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Each class's label value and count.
    pub fn read(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        STATUS_CLASSES
            .into_iter()
            .zip(&self.0)
            .map(|(class, count)| (class, count.load(Ordering::Relaxed)))
    }
}

/// What one endpoint of one route counted.
#[derive(Debug, Default)]
pub struct UpstreamCells {
    /// Requests whose response this endpoint gave, by the status relayed.
    pub responses: StatusClasses,
    /// Requests sent to it, a retry's included.
    pub tries: AtomicU64,
    /// From sending a try to the response head, or to the try's failure.
    pub response_time: Histogram,
}

/// What one route counted whatever its endpoints.
#[derive(Debug, Default)]
pub struct RouteCells {
    /// Requests answered by the proxy after no endpoint gave a response, by status.
    pub answered_locally: StatusClasses,
    /// Tries after a request's first.
    pub retries: AtomicU64,
    /// From the request's arrival to its response head.
    pub duration: Histogram,
}

/// The counts of one route: a host (as the route table names it: `*.suffix` for a wildcard,
/// `*` for the default backend) and the service answering it.
#[derive(Debug)]
pub struct RouteMetrics {
    pub host: String,
    pub service: String,
    pub cells: Arc<RouteCells>,
    pub upstreams: FastMap<SocketAddr, Arc<UpstreamCells>>,
}

impl RouteMetrics {
    /// The metrics of a route to `endpoints`, continuing `previous`'s counts (the same host and
    /// service before a route update) for what stays.
    pub fn new(
        host: &str,
        service: &str,
        endpoints: &[SocketAddr],
        previous: Option<&RouteMetrics>,
    ) -> Self {
        let upstreams = endpoints
            .iter()
            .map(|&addr| {
                let cells = previous
                    .and_then(|previous| previous.upstreams.get(&addr))
                    .cloned()
                    .unwrap_or_default();
                (addr, cells)
            })
            .collect();
        Self {
            host: host.to_owned(),
            service: service.to_owned(),
            cells: previous.map(|p| Arc::clone(&p.cells)).unwrap_or_default(),
            upstreams,
        }
    }

    /// Counts one request: its tries (`attempts`), who answered it (`answered_by`, none if the
    /// proxy did), its status and how long it took to the response head.
    pub fn record(
        &self,
        attempts: &[UpstreamAttempt],
        answered_by: Option<SocketAddr>,
        status: StatusCode,
        elapsed: Duration,
    ) {
        for attempt in attempts {
            if let Some(upstream) = self.upstreams.get(&attempt.addr) {
                upstream.tries.fetch_add(1, Ordering::Relaxed);
                upstream.response_time.observe(attempt.response_time);
            }
        }
        if attempts.len() > 1 {
            let retries = attempts.len() as u64 - 1;
            self.cells.retries.fetch_add(retries, Ordering::Relaxed);
        }
        match answered_by.and_then(|addr| self.upstreams.get(&addr)) {
            Some(upstream) => upstream.responses.count(status),
            None => self.cells.answered_locally.count(status),
        }
        self.cells.duration.observe(elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(addr: SocketAddr, millis: u64) -> UpstreamAttempt {
        UpstreamAttempt {
            addr,
            status: StatusCode::OK,
            response_time: Duration::from_millis(millis),
        }
    }

    #[test]
    fn a_request_counts_its_tries_its_answer_and_its_durations() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let metrics = RouteMetrics::new("app.local", "app", &[a, b], None);
        let tries = [attempt(a, 3), attempt(b, 30)];
        metrics.record(&tries, Some(b), StatusCode::OK, Duration::from_millis(40));
        metrics.record(
            &tries[..1],
            None,
            StatusCode::BAD_GATEWAY,
            Duration::from_secs(20),
        );

        assert_eq!(metrics.upstreams[&a].tries.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.upstreams[&b].tries.load(Ordering::Relaxed), 1);
        let b_responses: Vec<_> = metrics.upstreams[&b].responses.read().collect();
        assert_eq!(b_responses[1], ("2xx", 1));
        let local: Vec<_> = metrics.cells.answered_locally.read().collect();
        assert_eq!(local[4], ("5xx", 1));
        assert_eq!(metrics.cells.retries.load(Ordering::Relaxed), 1);

        let duration = metrics.cells.duration.sample();
        assert_eq!(duration.count, 2);
        assert!((duration.sum_seconds - 20.04).abs() < 1e-9);
        // 40 ms falls in the 0.05 s bucket, 20 s above the last bound.
        assert_eq!(duration.buckets[3], (0.05, 1));
        assert_eq!(duration.buckets[DURATION_BUCKETS.len()], (f64::INFINITY, 1));
        assert_eq!(
            metrics.upstreams[&a].response_time.sample().buckets[0],
            (0.005, 2)
        );
    }

    /// The samples of `metric` whose labels include every one of `wanted`.
    fn samples<'s>(
        scrape: &'s prometheus_parse::Scrape,
        metric: &'s str,
        wanted: &'s [(&str, &str)],
    ) -> impl Iterator<Item = &'s prometheus_parse::Sample> + 's {
        scrape.samples.iter().filter(move |sample| {
            sample.metric == metric
                && wanted
                    .iter()
                    .all(|(name, value)| sample.labels.get(name) == Some(*value))
        })
    }

    fn counter_sum(
        scrape: &prometheus_parse::Scrape,
        metric: &str,
        wanted: &[(&str, &str)],
    ) -> f64 {
        samples(scrape, metric, wanted)
            .map(|sample| match sample.value {
                prometheus_parse::Value::Counter(value) => value,
                ref other => panic!("{metric} is not a counter: {other:?}"),
            })
            .sum()
    }

    /// Requests through the running proxy show in `/metrics`' text as parsed by a Prometheus
    /// parser, with the counts the test sent, labelled by route, upstream and status class.
    #[tokio::test]
    async fn requests_through_the_proxy_are_scraped_with_the_counts_sent() {
        use crate::proxy::test_support::{EchoBackend, RunningProxy};

        let (one, two) = (EchoBackend::start().await, EchoBackend::start().await);
        let proxy = RunningProxy::start(&[("app.local", &[one.addr, two.addr])]).await;
        for _ in 0..6 {
            assert_eq!(proxy.get("app.local", "/x").await.status, 200);
        }
        for _ in 0..2 {
            assert_eq!(proxy.get("nobody.local", "/x").await.status, 503);
        }
        let text = crate::metrics::render(&crate::metrics::Sources {
            router: &proxy.router,
            workers: &[],
            health: &Default::default(),
            snapshot: None,
            discovery_reads: None,
            tls_handshakes: None,
            dataplane: None,
        })
        .unwrap();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap();

        let route = [("host", "app.local"), ("service", "svc-app.local")];
        let ok = [route[0], route[1], ("code", "2xx")];
        assert_eq!(
            counter_sum(&scrape, "xlb_http_requests_total", &ok),
            6.0,
            "{text}"
        );
        for backend in [&one, &two] {
            let upstream = backend.addr.to_string();
            let by_upstream = [route[0], route[1], ("upstream", upstream.as_str())];
            // Round robin: three each.
            assert_eq!(
                counter_sum(&scrape, "xlb_upstream_tries_total", &by_upstream),
                3.0
            );
        }
        let unrouted = [("host", ""), ("service", ""), ("code", "5xx")];
        assert_eq!(
            counter_sum(&scrape, "xlb_http_requests_total", &unrouted),
            2.0
        );
        let durations: Vec<_> =
            samples(&scrape, "xlb_http_request_duration_seconds", &route).collect();
        let prometheus_parse::Value::Histogram(buckets) = &durations[0].value else {
            panic!("not a histogram: {durations:?}");
        };
        let all = buckets
            .iter()
            .find(|bucket| bucket.less_than == f64::INFINITY);
        assert_eq!(all.map(|bucket| bucket.count), Some(6.0), "{text}");
        assert!(text.contains("# TYPE xlb_http_request_duration_seconds histogram"));
    }

    #[test]
    fn a_route_update_keeps_the_counts_of_what_stays() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let before = RouteMetrics::new("app.local", "app", &[a, b], None);
        before.record(&[attempt(a, 1)], Some(a), StatusCode::OK, Duration::ZERO);
        before.record(&[attempt(b, 1)], Some(b), StatusCode::OK, Duration::ZERO);
        let after = RouteMetrics::new("app.local", "app", &[a], Some(&before));
        assert_eq!(after.upstreams.len(), 1);
        assert_eq!(after.upstreams[&a].tries.load(Ordering::Relaxed), 1);
        assert_eq!(after.cells.duration.sample().count, 2);
    }
}
