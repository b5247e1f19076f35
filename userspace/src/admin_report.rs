//! What `xlb status` and `xlb routes` print: the admin endpoint's `/routes` and `/stats` as
//! read ([`crate::admin`]), formatted as aligned tables. Pure: the answers in, the text out.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Deserialize;
use xlb_common::Stat;

use crate::{
    l4::service::L4RouteTable,
    routes::{Balance, Route, RouteTable},
};

/// The XDP counters `xlb status` shows, of the many `/stats` has.
const MAIN_XDP_COUNTERS: [Stat; 10] = [
    Stat::Received,
    Stat::ClassL7,
    Stat::ClassL4Service,
    Stat::VerdictPass,
    Stat::VerdictDrop,
    Stat::VerdictTx,
    Stat::VerdictRedirect,
    Stat::VerdictAborted,
    Stat::L4NewFlow,
    Stat::ClassMalformed,
];

/// `/routes`: the route tables, the L4 listeners and the snapshot served.
#[derive(Debug, Deserialize)]
pub struct RoutesReport {
    #[serde(flatten)]
    table: RouteTable,
    l4: L4RouteTable,
    snapshot: SnapshotReport,
}

/// Only the snapshot of `/routes`, for `xlb status`.
#[derive(Debug, Deserialize)]
pub struct SnapshotOnly {
    pub snapshot: SnapshotReport,
}

/// The snapshot served; `version` is `None` before the first.
#[derive(Debug, Deserialize)]
pub struct SnapshotReport {
    version: Option<u64>,
    #[serde(default)]
    age_ms: Option<u64>,
    /// The controllers feeding an `xlb proxy`.
    #[serde(default)]
    controllers: Option<Vec<ControllerReport>>,
}

#[derive(Debug, Deserialize)]
struct ControllerReport {
    url: String,
    state: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    last_answer_ms_ago: Option<u64>,
}

/// `/stats`, what `xlb status` shows of it.
#[derive(Debug, Deserialize)]
pub struct StatsReport {
    proxy: ProxyReport,
    /// The XDP counters by name; `None` when running proxy-only.
    xdp: Option<BTreeMap<String, Counter>>,
    #[serde(default)]
    l4: Option<L4Report>,
}

#[derive(Debug, Deserialize)]
struct ProxyReport {
    workers: Vec<WorkerReport>,
}

#[derive(Debug, Deserialize)]
struct WorkerReport {
    connections_accepted: u64,
    connections_open: u64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct Counter {
    packets: u64,
    bytes: u64,
}

#[derive(Debug, Deserialize)]
struct L4Report {
    connections: ConnectionsReport,
}

#[derive(Debug, Deserialize)]
struct ConnectionsReport {
    entries: u64,
    capacity: u64,
    /// Flows by state.
    #[serde(default)]
    flows: BTreeMap<String, u64>,
    /// By backend endpoint.
    #[serde(default)]
    snat_tuples_in_use: BTreeMap<String, u64>,
}

/// `xlb routes`' text: the snapshot, the L7 routes, the default backend, the disabled
/// services, the L4 listeners.
pub fn format_routes(report: &RoutesReport) -> String {
    let mut text = format_snapshot(&report.snapshot);
    if let Some(controllers) = &report.snapshot.controllers {
        text.push_str("\ncontrollers:\n");
        let rows = controllers.iter().map(|controller| {
            vec![
                controller.url.clone(),
                controller.state.clone(),
                controller
                    .last_answer_ms_ago
                    .map_or_else(|| "-".to_owned(), |ms| format!("{} ago", age(ms))),
                controller.error.clone().unwrap_or_default(),
            ]
        });
        text.push_str(&table(&["URL", "STATE", "LAST ANSWER", "ERROR"], rows));
    }

    let l7: Vec<(&str, &Route)> = report
        .table
        .routes
        .iter()
        .flat_map(|(host, routes)| routes.iter().map(move |route| (host.as_str(), route)))
        .collect();
    if l7.is_empty() {
        text.push_str("\nL7 routes: none\n");
    } else {
        text.push_str("\nL7 routes:\n");
        let rows = l7.iter().map(|(host, route)| {
            let mut row = vec![(*host).to_owned()];
            row.extend(route_columns(route));
            row
        });
        text.push_str(&table(
            &["HOST", "CONTEXT ROOT", "SERVICE", "BALANCE", "ENDPOINTS"],
            rows,
        ));
    }

    match &report.table.default_backend {
        None => text.push_str("\ndefault backend: none\n"),
        Some(route) => {
            text.push_str("\ndefault backend:\n");
            text.push_str(&table(
                &["CONTEXT ROOT", "SERVICE", "BALANCE", "ENDPOINTS"],
                [route_columns(route)],
            ));
        }
    }

    if !report.table.rejected.is_empty() {
        text.push_str("\ndisabled services:\n");
        let rows = report
            .table
            .rejected
            .iter()
            .map(|rejected| vec![rejected.service.clone(), rejected.reason.clone()]);
        text.push_str(&table(&["SERVICE", "REASON"], rows));
    }

    if report.l4.listeners.is_empty() {
        text.push_str("\nL4 listeners: none\n");
    } else {
        text.push_str("\nL4 listeners:\n");
        let rows = report.l4.listeners.iter().map(|route| {
            vec![
                route.listener.to_string(),
                route.service.clone(),
                route.target_port.to_string(),
                endpoints(&route.endpoints),
            ]
        });
        text.push_str(&table(
            &["LISTENER", "SERVICE", "TARGET PORT", "ENDPOINTS"],
            rows,
        ));
    }
    if !report.l4.rejected.is_empty() {
        text.push_str("\nL4 claims refused:\n");
        let rows = report
            .l4
            .rejected
            .iter()
            .map(|rejected| vec![rejected.service.clone(), rejected.reason.clone()]);
        text.push_str(&table(&["SERVICE", "REASON"], rows));
    }
    text
}

/// `xlb status`' text: the snapshot, the proxy's workers, XDP's counters and the L4
/// connection table.
pub fn format_status(snapshot: &SnapshotReport, stats: &StatsReport) -> String {
    let mut text = format_snapshot(snapshot);

    let workers = &stats.proxy.workers;
    let accepted: u64 = workers.iter().map(|w| w.connections_accepted).sum();
    let open: u64 = workers.iter().map(|w| w.connections_open).sum();
    text.push_str(&format!(
        "\nproxy: {} worker(s), {accepted} connection(s) accepted, {open} open\n",
        workers.len()
    ));
    let rows = workers.iter().enumerate().map(|(index, worker)| {
        vec![
            index.to_string(),
            worker.connections_accepted.to_string(),
            worker.connections_open.to_string(),
        ]
    });
    text.push_str(&table(&["WORKER", "ACCEPTED", "OPEN"], rows));

    let Some(counters) = &stats.xdp else {
        text.push_str("\nXDP: proxy-only (no XDP)\n");
        return text;
    };
    text.push_str("\nXDP: attached\n");
    let rows = MAIN_XDP_COUNTERS.iter().filter_map(|stat| {
        let counter = counters.get(stat.name())?;
        Some(vec![
            stat.name().to_owned(),
            counter.packets.to_string(),
            counter.bytes.to_string(),
        ])
    });
    text.push_str(&table(&["COUNTER", "PACKETS", "BYTES"], rows));

    if let Some(l4) = &stats.l4 {
        let connections = &l4.connections;
        text.push_str(&format!(
            "\nL4 connection table: {} of {} entries\n",
            connections.entries, connections.capacity
        ));
        if !connections.flows.is_empty() {
            let flows: Vec<String> = connections
                .flows
                .iter()
                .map(|(state, count)| format!("{state} {count}"))
                .collect();
            text.push_str(&format!("flows: {}\n", flows.join(", ")));
        }
        let in_use: u64 = connections.snat_tuples_in_use.values().sum();
        text.push_str(&format!("SNAT tuples in use: {in_use}\n"));
        if !connections.snat_tuples_in_use.is_empty() {
            let rows = connections
                .snat_tuples_in_use
                .iter()
                .map(|(backend, count)| vec![backend.clone(), count.to_string()]);
            text.push_str(&table(&["BACKEND", "SNAT TUPLES"], rows));
        }
    }
    text
}

fn format_snapshot(snapshot: &SnapshotReport) -> String {
    match (snapshot.version, snapshot.age_ms) {
        (Some(version), Some(ms)) => {
            format!("snapshot: version {version}, served for {}\n", age(ms))
        }
        (Some(version), None) => format!("snapshot: version {version}\n"),
        (None, _) => "snapshot: none served yet\n".to_owned(),
    }
}

/// A route's CONTEXT ROOT, SERVICE, BALANCE and ENDPOINTS.
fn route_columns(route: &Route) -> Vec<String> {
    let balance = match &route.balance {
        Balance::RoundRobin => "round_robin".to_owned(),
        Balance::LeastConn => "least_conn".to_owned(),
        Balance::IpHash => "ip_hash".to_owned(),
        Balance::StickyCookie { cookie } => format!("sticky_cookie({cookie})"),
    };
    vec![
        route.context_root.clone(),
        route.service.clone(),
        balance,
        endpoints(&route.endpoints),
    ]
}

fn endpoints(endpoints: &[SocketAddr]) -> String {
    if endpoints.is_empty() {
        return "-".to_owned();
    }
    let texts: Vec<String> = endpoints.iter().map(SocketAddr::to_string).collect();
    texts.join(",")
}

/// `850 ms`, `12.3 s`, `4 min 5 s`, `3 h 12 min`.
fn age(ms: u64) -> String {
    let seconds = ms / 1000;
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{}.{} s", seconds, ms % 1000 / 100),
        60_000..3_600_000 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

/// Left-aligned columns, two spaces apart, under their headers; no trailing spaces.
fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(headers.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![0; headers.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            line.push_str(&format!("{cell:<width$}  "));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = r#"{
      "routes": {
        "demo.local": [
          {"service": "demo-api", "context_root": "/api", "context_root_rewrite": true,
           "endpoints": ["10.0.0.3:30001"], "balance": {"method": "least_conn"},
           "ssl_only": false, "redirects": [], "transport": {"ssl_passthrough": false}},
          {"service": "demo", "context_root": "/", "context_root_rewrite": false,
           "endpoints": ["10.0.0.2:30000", "10.0.0.3:30000"], "balance": {"method": "round_robin"},
           "ssl_only": false, "redirects": [], "transport": {"ssl_passthrough": false}}
        ],
        "shop.example.com": [
          {"service": "shop", "context_root": "/", "context_root_rewrite": false,
           "endpoints": [], "balance": {"method": "sticky_cookie", "cookie": "session"},
           "ssl_only": true, "redirects": [], "transport": {"ssl_passthrough": false}}
        ]
      },
      "default_backend": {"service": "fallback", "context_root": "/",
        "context_root_rewrite": false, "endpoints": ["10.0.0.4:30002"],
        "balance": {"method": "ip_hash"}, "ssl_only": false, "redirects": [],
        "transport": {"ssl_passthrough": false}},
      "rejected": [{"service": "legacy", "reason": "com.docker.lb.port is missing"}],
      "l4": {
        "listeners": [{"service": "dns", "listener": {"port": 53, "protocol": "udp"},
                       "target_port": 5353, "endpoints": ["10.0.0.2:31053"]}],
        "rejected": [{"service": "ssh", "reason": "port 22 is the proxy's"}]
      },
      "snapshot": {"version": 7, "age_ms": 12345,
        "controllers": [{"url": "http://manager-0:8080", "state": "up", "last_answer_ms_ago": 80},
                        {"url": "http://manager-1:8080", "state": "down", "error": "refused"}]}
    }"#;

    #[test]
    fn routes_are_tables_of_hosts_defaults_disabled_services_and_l4_listeners() {
        let report: RoutesReport = serde_json::from_str(ROUTES).unwrap();
        let text = format_routes(&report);
        let expected = "\
snapshot: version 7, served for 12.3 s

controllers:
URL                    STATE  LAST ANSWER  ERROR
http://manager-0:8080  up     80 ms ago
http://manager-1:8080  down   -            refused

L7 routes:
HOST              CONTEXT ROOT  SERVICE   BALANCE                 ENDPOINTS
demo.local        /api          demo-api  least_conn              10.0.0.3:30001
demo.local        /             demo      round_robin             10.0.0.2:30000,10.0.0.3:30000
shop.example.com  /             shop      sticky_cookie(session)  -

default backend:
CONTEXT ROOT  SERVICE   BALANCE  ENDPOINTS
/             fallback  ip_hash  10.0.0.4:30002

disabled services:
SERVICE  REASON
legacy   com.docker.lb.port is missing

L4 listeners:
LISTENER  SERVICE  TARGET PORT  ENDPOINTS
53/udp    dns      5353         10.0.0.2:31053

L4 claims refused:
SERVICE  REASON
ssh      port 22 is the proxy's
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn empty_tables_say_none() {
        let report: RoutesReport = serde_json::from_str(
            r#"{"routes": {}, "default_backend": null, "rejected": [],
                "l4": {"listeners": [], "rejected": []}, "snapshot": {"version": null}}"#,
        )
        .unwrap();
        assert_eq!(
            format_routes(&report),
            "snapshot: none served yet\n\nL7 routes: none\n\ndefault backend: none\n\n\
             L4 listeners: none\n"
        );
    }

    #[test]
    fn status_shows_workers_xdp_counters_and_the_connection_table() {
        let snapshot: SnapshotReport =
            serde_json::from_str(r#"{"version": 3, "age_ms": 125000}"#).unwrap();
        let stats: StatsReport = serde_json::from_str(
            r#"{
              "proxy": {"workers": [
                {"connections_accepted": 120, "connections_open": 2, "held_body_bytes": 0},
                {"connections_accepted": 7, "connections_open": 1, "held_body_bytes": 512}]},
              "xdp": {"received": {"packets": 1000, "bytes": 64000},
                      "class_l7": {"packets": 900, "bytes": 60000},
                      "verdict_pass": {"packets": 990, "bytes": 63000},
                      "verdict_drop": {"packets": 10, "bytes": 1000},
                      "l4_drop_flood": {"packets": 0, "bytes": 0}},
              "l4": {"services": {}, "backends": {},
                     "connections": {"entries": 4, "capacity": 65536,
                       "flows": {"established": 2}, "half_pairs": 0,
                       "snat_tuples_per_backend": 64512,
                       "snat_tuples_in_use": {"10.0.0.2:31053": 2}}}
            }"#,
        )
        .unwrap();
        let expected = "\
snapshot: version 3, served for 2 min 5 s

proxy: 2 worker(s), 127 connection(s) accepted, 3 open
WORKER  ACCEPTED  OPEN
0       120       2
1       7         1

XDP: attached
COUNTER       PACKETS  BYTES
received      1000     64000
class_l7      900      60000
verdict_pass  990      63000
verdict_drop  10       1000

L4 connection table: 4 of 65536 entries
flows: established 2
SNAT tuples in use: 2
BACKEND         SNAT TUPLES
10.0.0.2:31053  2
";
        let text = format_status(&snapshot, &stats);
        assert_eq!(text, expected, "\n{text}");

        let proxy_only: StatsReport = serde_json::from_str(
            r#"{"proxy": {"workers": [{"connections_accepted": 0, "connections_open": 0,
                "held_body_bytes": 0}]}, "xdp": null}"#,
        )
        .unwrap();
        let text = format_status(&snapshot, &proxy_only);
        assert!(text.ends_with("\nXDP: proxy-only (no XDP)\n"), "\n{text}");
    }

    #[test]
    fn ages_read_as_their_largest_units() {
        assert_eq!(age(850), "850 ms");
        assert_eq!(age(12_345), "12.3 s");
        assert_eq!(age(245_000), "4 min 5 s");
        assert_eq!(age(11_520_000), "3 h 12 min");
    }
}
