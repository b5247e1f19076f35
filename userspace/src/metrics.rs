//! `GET /metrics` on the admin address: what xlb counts, in the Prometheus text format
//! (prometheus-client's encoder), read at scrape time from where it is counted: the proxy's
//! route metrics ([`crate::proxy::request_metrics`]) and workers, the XDP program's per-CPU
//! counters and L4 maps, and the route snapshot. Nothing is registered on the request path.
//!
//! Names follow Prometheus' conventions (`xlb_` prefix, base units, `_total` on counters), and
//! every label value comes from the route table or a fixed set: hosts and services as
//! configured, endpoints as discovered, never a client's address or a request's path or Host.

use std::{fmt, net::SocketAddr, sync::Mutex, time::Instant};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};

use crate::{
    dataplane::{Dataplane, Stats},
    l4::maps::{L4Traffic, Traffic},
    proxy::{request_metrics::HistogramSample, HealthReport, Router, WorkerReport},
};

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Label names and values of one sample.
type Labels = Vec<(&'static str, String)>;

/// One metric family as gathered for a scrape.
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    samples: Samples,
}

enum Samples {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, f64)>),
    Histogram(Vec<(Labels, HistogramSample)>),
}

/// Everything one scrape shows, gathered first (under each source's own lock, briefly) and
/// encoded after.
#[derive(Default)]
struct Scrape {
    families: Vec<Family>,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrape({} families)", self.families.len())
    }
}

impl Scrape {
    fn counter(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) {
        self.families.push(Family {
            name,
            help,
            unit: None,
            samples: Samples::Counter(samples),
        });
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, f64)>) {
        self.families.push(Family {
            name,
            help,
            unit: None,
            samples: Samples::Gauge(samples),
        });
    }

    fn seconds_histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        samples: Vec<(Labels, HistogramSample)>,
    ) {
        self.families.push(Family {
            name,
            help,
            unit: Some(Unit::Seconds),
            samples: Samples::Histogram(samples),
        });
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for family in &self.families {
            let metric_type = match family.samples {
                Samples::Counter(_) => MetricType::Counter,
                Samples::Gauge(_) => MetricType::Gauge,
                Samples::Histogram(_) => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(
                family.name,
                family.help,
                family.unit.as_ref(),
                metric_type,
            )?;
            match &family.samples {
                Samples::Counter(samples) => {
                    for (labels, value) in samples {
                        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
                    }
                }
                Samples::Gauge(samples) => {
                    for (labels, value) in samples {
                        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
                    }
                }
                Samples::Histogram(samples) => {
                    for (labels, sample) in samples {
                        metric
                            .encode_family(labels)?
                            .encode_histogram::<NoLabelSet>(
                                sample.sum_seconds,
                                sample.count,
                                &sample.buckets,
                                None,
                            )?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Where a scrape reads from.
pub struct Sources<'a> {
    pub router: &'a Router,
    pub workers: &'a [WorkerReport],
    pub health: &'a HealthReport,
    /// The version of the route snapshot served, and when it was first applied.
    pub snapshot: Option<(u64, Instant)>,
    /// Discovery's reads that succeeded and failed, when this process reads the engine.
    pub discovery_reads: Option<(u64, u64)>,
    /// The SSL port's handshakes by outcome, when there is one.
    pub tls_handshakes: Option<[(&'static str, u64); 4]>,
    /// The XDP program, unless running proxy-only.
    pub dataplane: Option<&'a Mutex<Dataplane>>,
}

/// The text `/metrics` answers with.
pub fn render(sources: &Sources<'_>) -> Result<String, fmt::Error> {
    let mut scrape = Scrape::default();
    gather_requests(sources.router, &mut scrape);
    gather_workers(sources.workers, &mut scrape);
    gather_health(sources.health, &mut scrape);
    gather_snapshot(sources.snapshot, &mut scrape);
    if let Some(handshakes) = sources.tls_handshakes {
        let samples = handshakes
            .iter()
            .map(|(outcome, count)| (labels([("outcome", outcome)]), *count))
            .collect();
        scrape.counter(
            "tls_handshakes",
            "Connections of the SSL port by their handshake's outcome (ok, failed, timeout, \
             passthrough: relayed untouched)",
            samples,
        );
    }
    if let Some((succeeded, failed)) = sources.discovery_reads {
        let reads = vec![
            (labels([("outcome", "ok")]), succeeded),
            (labels([("outcome", "failed")]), failed),
        ];
        scrape.counter(
            "discovery_reads",
            "Reads of the engine (Swarm, or a plain engine's containers), by outcome; a failed \
             one keeps the last route tables",
            reads,
        );
    }
    if let Some(dataplane) = sources.dataplane {
        gather_dataplane(dataplane, &mut scrape);
    }
    let mut registry = Registry::with_prefix("xlb");
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs
        .into_iter()
        .map(|(name, value)| (name, value.to_owned()))
        .collect()
}

fn upstream_label(addr: Option<SocketAddr>) -> String {
    addr.map(|addr| addr.to_string()).unwrap_or_default()
}

/// The proxy's requests, per route, upstream and status class.
fn gather_requests(router: &Router, scrape: &mut Scrape) {
    let routes = router.route_metrics();
    let mut requests = Vec::new();
    let mut tries = Vec::new();
    let mut retries = Vec::new();
    let mut durations = Vec::new();
    let mut response_times = Vec::new();
    for route in &routes {
        let (host, service) = (route.host.as_str(), route.service.as_str());
        let mut upstreams: Vec<_> = route.upstreams.iter().collect();
        upstreams.sort_by_key(|(addr, _)| **addr);
        for (addr, cells) in upstreams {
            let upstream = upstream_label(Some(*addr));
            for (class, count) in cells.responses.read() {
                let labels = labels([
                    ("host", host),
                    ("service", service),
                    ("upstream", &upstream),
                    ("code", class),
                ]);
                requests.push((labels, count));
            }
            let route_upstream = labels([
                ("host", host),
                ("service", service),
                ("upstream", &upstream),
            ]);
            tries.push((route_upstream.clone(), cells.tries.load(RELAXED)));
            response_times.push((route_upstream, cells.response_time.sample()));
        }
        for (class, count) in route.cells.answered_locally.read() {
            let labels = labels([
                ("host", host),
                ("service", service),
                ("upstream", ""),
                ("code", class),
            ]);
            requests.push((labels, count));
        }
        let route_labels = labels([("host", host), ("service", service)]);
        retries.push((route_labels.clone(), route.cells.retries.load(RELAXED)));
        durations.push((route_labels, route.cells.duration.sample()));
    }
    for (class, count) in router.unrouted().read() {
        let labels = labels([
            ("host", ""),
            ("service", ""),
            ("upstream", ""),
            ("code", class),
        ]);
        requests.push((labels, count));
    }
    scrape.counter(
        "http_requests",
        "HTTP requests answered, by route (host as configured, service), the upstream that \
         answered (empty: the proxy did) and status class",
        requests,
    );
    scrape.seconds_histogram(
        "http_request_duration",
        "From a request's arrival to its response head, by route",
        durations,
    );
    scrape.counter(
        "upstream_tries",
        "Requests sent to an upstream, retries included, by route and upstream",
        tries,
    );
    scrape.counter(
        "upstream_retries",
        "Tries after a request's first, by route",
        retries,
    );
    scrape.seconds_histogram(
        "upstream_response_time",
        "From sending a try to its response head or its failure, by route and upstream",
        response_times,
    );
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

/// The proxy's workers: connections by listener, and held request bodies.
fn gather_workers(workers: &[WorkerReport], scrape: &mut Scrape) {
    let by_listener = |plain: fn(&WorkerReport) -> u64, https: fn(&WorkerReport) -> u64| {
        let mut samples = Vec::new();
        for (index, report) in workers.iter().enumerate() {
            let worker = index.to_string();
            let (all, tls) = (plain(report), https(report));
            for (listener, value) in [("http", all - tls), ("https", tls)] {
                let labels = labels([("worker", &worker), ("listener", listener)]);
                samples.push((labels, value));
            }
        }
        samples
    };
    scrape.counter(
        "proxy_connections_accepted",
        "Client connections accepted, by proxy worker and listener (the plain port, http, or \
         the SSL port, https)",
        by_listener(
            |report| report.connections_accepted,
            |report| report.https_connections_accepted,
        ),
    );
    let open = by_listener(
        |report| report.connections_open,
        |report| report.https_connections_open,
    );
    scrape.gauge(
        "proxy_connections_open",
        "Client connections open, by proxy worker and listener",
        open.into_iter()
            .map(|(labels, value)| (labels, value as f64))
            .collect(),
    );
    let held = workers
        .iter()
        .enumerate()
        .map(|(index, report)| {
            let labels = labels([("worker", &index.to_string())]);
            (labels, report.held_body_bytes as f64)
        })
        .collect();
    scrape.gauge(
        "proxy_held_body_bytes",
        "Bytes of request bodies held for a retry, by proxy worker",
        held,
    );
}

/// Passive health: ejections, and the endpoints ejected now.
fn gather_health(health: &HealthReport, scrape: &mut Scrape) {
    scrape.counter(
        "upstream_ejections",
        "Endpoints ejected after failing (passive health), since the start",
        vec![(Vec::new(), health.ejections_begun)],
    );
    let ejected = health
        .ejected
        .iter()
        .map(|addr| (labels([("upstream", &addr.to_string())]), 1.0))
        .collect();
    scrape.gauge(
        "upstream_ejected",
        "1 for each endpoint ejected now: tried last, after the healthy ones",
        ejected,
    );
}

/// The route snapshot served: its version and age.
fn gather_snapshot(served: Option<(u64, Instant)>, scrape: &mut Scrape) {
    let (version, age) = served.map_or((0.0, 0.0), |(version, since)| {
        (version as f64, since.elapsed().as_secs_f64())
    });
    scrape.gauge(
        "route_table_version",
        "Version of the route snapshot served (0: none yet)",
        vec![(Vec::new(), version)],
    );
    scrape.gauge(
        "route_table_age_seconds",
        "Seconds since the route snapshot served was first applied",
        vec![(Vec::new(), age)],
    );
}

/// The XDP program's counters, L4 traffic and connection table, when it runs.
fn gather_dataplane(dataplane: &Mutex<Dataplane>, scrape: &mut Scrape) {
    let mut dataplane = dataplane.lock().unwrap_or_else(|p| p.into_inner());
    let stats = dataplane.stats();
    let traffic = dataplane.l4_traffic();
    let backend_names: std::collections::BTreeMap<u32, String> = dataplane
        .l4()
        .backend_ids()
        .into_iter()
        .map(|(endpoint, id)| (id, endpoint.to_string()))
        .collect();
    let table = dataplane.connection_table();
    let (entries, capacity) = (table.table.entries, table.table.capacity);
    let flows: Vec<(Labels, f64)> = table
        .table
        .flows
        .iter()
        .map(|(state, count)| (labels([("state", state)]), *count as f64))
        .collect();
    let expired = table.sweeps.expired_flows;
    let snat_in_use: Vec<(Labels, f64)> = table
        .table
        .snat_tuples_in_use
        .iter()
        .map(|(id, count)| {
            let backend = backend_names.get(id).cloned();
            let backend = backend.unwrap_or_else(|| format!("id {id}"));
            (vec![("backend", backend)], *count as f64)
        })
        .collect();
    let snat_per_backend = table.snat_tuples_per_backend;
    drop(dataplane);

    if let Ok(stats) = stats {
        gather_xdp_counters(&stats, scrape);
    }
    if let Ok(traffic) = traffic {
        gather_l4_traffic(&traffic, scrape);
    }
    scrape.gauge(
        "conntrack_entries",
        "Entries in the L4 connection tables at the last sweep",
        vec![(Vec::new(), entries as f64)],
    );
    scrape.gauge(
        "conntrack_capacity",
        "Entries each family's L4 connection table holds at most",
        vec![(Vec::new(), f64::from(capacity))],
    );
    scrape.gauge(
        "conntrack_flows",
        "L4 flows at the last sweep, by state",
        flows,
    );
    scrape.counter(
        "conntrack_expired_flows",
        "L4 flows the sweeps removed as expired",
        vec![(Vec::new(), expired)],
    );
    scrape.gauge(
        "snat_tuples_in_use",
        "SNAT tuples held by L4 flows, by backend",
        snat_in_use,
    );
    scrape.gauge(
        "snat_tuples_per_backend",
        "SNAT tuples one IPv4 backend can hold at once (addresses x ports)",
        vec![(Vec::new(), snat_per_backend as f64)],
    );
}

/// The program's per-CPU counters, summed, as families by what they count: packets by class,
/// by verdict, dropped by the shield, and the L4 path's events.
fn gather_xdp_counters(stats: &Stats, scrape: &mut Scrape) {
    let mut received = Vec::new();
    let mut classes = Vec::new();
    let mut verdicts = Vec::new();
    let mut shield = Vec::new();
    let mut l4_events = Vec::new();
    for (&name, totals) in &stats.0 {
        if name == "received" {
            received.push((Vec::new(), totals.packets));
        } else if let Some(class) = name.strip_prefix("class_") {
            classes.push((labels([("class", class)]), totals.packets));
        } else if let Some(verdict) = name.strip_prefix("verdict_") {
            verdicts.push((labels([("verdict", verdict)]), totals.packets));
        } else if let Some(protocol) = name.strip_prefix("shield_drop_") {
            shield.push((labels([("protocol", protocol)]), totals.packets));
        } else if let Some(event) = name.strip_prefix("l4_") {
            l4_events.push((labels([("event", event)]), totals.packets));
        }
    }
    scrape.counter(
        "xdp_received_packets",
        "Packets the XDP program saw",
        received,
    );
    scrape.counter(
        "xdp_class_packets",
        "Packets by what the XDP program found them to be",
        classes,
    );
    scrape.counter(
        "xdp_verdict_packets",
        "Packets by the XDP program's verdict",
        verdicts,
    );
    scrape.counter(
        "xdp_shield_dropped_packets",
        "Packets to the LB's addresses on ports nothing serves, dropped, by protocol",
        shield,
    );
    scrape.counter(
        "xdp_l4_events",
        "The XDP L4 path's outcomes and events (new flows, forwards, drops by reason)",
        l4_events,
    );
}

/// Packets and bytes per L4 listener and per backend, both directions, and flows created.
fn gather_l4_traffic(traffic: &L4Traffic, scrape: &mut Scrape) {
    let services = traffic
        .services
        .iter()
        .map(|(listener, traffic)| (listener.to_string(), traffic));
    let (packets, bytes, flows) = traffic_samples("listener", services);
    scrape.counter(
        "l4_service_packets",
        "Packets through the XDP L4 path, by listener (port/protocol) and direction",
        packets,
    );
    scrape.counter(
        "l4_service_bytes",
        "Bytes through the XDP L4 path, by listener and direction",
        bytes,
    );
    scrape.counter("l4_service_flows", "L4 flows created, by listener", flows);
    let backends = traffic
        .backends
        .iter()
        .map(|(endpoint, traffic)| (endpoint.to_string(), traffic));
    let (packets, bytes, flows) = traffic_samples("backend", backends);
    scrape.counter(
        "l4_backend_packets",
        "Packets through the XDP L4 path, by backend endpoint and direction",
        packets,
    );
    scrape.counter(
        "l4_backend_bytes",
        "Bytes through the XDP L4 path, by backend endpoint and direction",
        bytes,
    );
    scrape.counter("l4_backend_flows", "L4 flows created, by backend", flows);
}

type CounterSamples = Vec<(Labels, u64)>;

/// Packets and bytes by `label` and direction, and new flows by `label`.
fn traffic_samples<'a>(
    label: &'static str,
    traffic: impl Iterator<Item = (String, &'a Traffic)>,
) -> (CounterSamples, CounterSamples, CounterSamples) {
    let (mut packets, mut bytes, mut flows) = (Vec::new(), Vec::new(), Vec::new());
    for (name, traffic) in traffic {
        for (direction, packet_count, byte_count) in [
            ("forward", traffic.forward_packets, traffic.forward_bytes),
            ("reply", traffic.reply_packets, traffic.reply_bytes),
        ] {
            let labels = labels([(label, &name), ("direction", direction)]);
            packets.push((labels.clone(), packet_count));
            bytes.push((labels, byte_count));
        }
        flows.push((labels([(label, &name)]), traffic.new_flows));
    }
    (packets, bytes, flows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap()
    }

    fn value(scrape: &prometheus_parse::Scrape, metric: &str, label: Option<(&str, &str)>) -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|sample| {
                sample.metric == metric
                    && label.is_none_or(|(name, value)| sample.labels.get(name) == Some(value))
            })
            .unwrap_or_else(|| panic!("no {metric} {label:?}"));
        match sample.value {
            prometheus_parse::Value::Counter(value) | prometheus_parse::Value::Gauge(value) => {
                value
            }
            ref other => panic!("{metric}: {other:?}"),
        }
    }

    /// Workers, health and the snapshot as a Prometheus parser reads them; no XDP families
    /// when running proxy-only.
    #[test]
    fn workers_health_and_the_snapshot_are_exposed_with_prometheus_names() {
        let router = Router::new();
        let workers = [
            WorkerReport {
                connections_accepted: 7,
                connections_open: 2,
                https_connections_accepted: 0,
                https_connections_open: 0,
                held_body_bytes: 0,
            },
            WorkerReport {
                connections_accepted: 3,
                connections_open: 1,
                https_connections_accepted: 2,
                https_connections_open: 1,
                held_body_bytes: 512,
            },
        ];
        let ejected: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        let health = HealthReport {
            ejections_begun: 4,
            ejected: vec![ejected],
        };
        let text = render(&Sources {
            router: &router,
            workers: &workers,
            health: &health,
            snapshot: Some((12, Instant::now())),
            discovery_reads: Some((30, 2)),
            tls_handshakes: Some([("ok", 5), ("failed", 1), ("timeout", 0), ("passthrough", 0)]),
            dataplane: None,
        })
        .unwrap();
        let scrape = parse(&text);
        let accepted = "xlb_proxy_connections_accepted_total";
        let samples = |metric: &str, worker: &str, listener: &str| -> f64 {
            let sample = scrape.samples.iter().find(|sample| {
                sample.metric == metric
                    && sample.labels.get("worker") == Some(worker)
                    && sample.labels.get("listener") == Some(listener)
            });
            match sample.map(|sample| &sample.value) {
                Some(prometheus_parse::Value::Counter(value))
                | Some(prometheus_parse::Value::Gauge(value)) => *value,
                other => panic!("{metric} {worker} {listener}: {other:?}"),
            }
        };
        assert_eq!(samples(accepted, "1", "http"), 1.0);
        assert_eq!(samples(accepted, "1", "https"), 2.0);
        assert_eq!(samples("xlb_proxy_connections_open", "1", "https"), 1.0);
        assert_eq!(samples("xlb_proxy_connections_open", "1", "http"), 0.0);
        let held = "xlb_proxy_held_body_bytes";
        assert_eq!(value(&scrape, held, Some(("worker", "1"))), 512.0);
        assert_eq!(value(&scrape, "xlb_upstream_ejections_total", None), 4.0);
        let upstream = ("upstream", "10.0.0.9:8080");
        assert_eq!(value(&scrape, "xlb_upstream_ejected", Some(upstream)), 1.0);
        assert_eq!(value(&scrape, "xlb_route_table_version", None), 12.0);
        let failed = Some(("outcome", "failed"));
        assert_eq!(value(&scrape, "xlb_discovery_reads_total", failed), 2.0);
        assert_eq!(value(&scrape, "xlb_tls_handshakes_total", failed), 1.0);
        assert!(!text.contains("xlb_xdp_"), "{text}");
        for line in text.lines().filter(|line| line.starts_with("# TYPE")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(name.starts_with("xlb_"), "{line}");
            if line.ends_with(" counter") {
                assert!(name.ends_with("_total"), "{line}");
            }
        }
    }
}
