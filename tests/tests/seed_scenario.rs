//! End to end, as a user of Interlock's host-mode setup would check it: a real dockerd and
//! Swarm, the seed's service and config, xlb in the lb-00 namespace with XDP attached, and the
//! documentation's curl from a client namespace.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;
use xlb_testbed::{
    list_netns,
    seed::{xlb_binary, HttpResponse, SeedScenario, HOST, POLL_INTERVAL, SERVICE, TARGET_PORT},
};

/// How long a Swarm change may take to show in xlb's routing: one poll, plus slack.
const ROUTE_CONVERGENCE: Duration = POLL_INTERVAL.saturating_add(Duration::from_secs(2));

fn seed_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/config.toml")
}

fn is_lower_hex(value: &str, len: usize) -> bool {
    value.len() == len
        && value
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

fn upstream_addr(response: &HttpResponse) -> SocketAddr {
    let value = response.header("x-upstream-addr").expect("x-upstream-addr");
    value
        .parse()
        .unwrap_or_else(|_| panic!("x-upstream-addr {value:?} is not IP:PORT"))
}

/// Sends requests until responses have come from `count` distinct endpoints, or `within` passes.
fn distinct_upstreams(
    scenario: &SeedScenario,
    count: usize,
    within: Duration,
) -> BTreeSet<SocketAddr> {
    let deadline = Instant::now() + within;
    let mut seen = BTreeSet::new();
    while Instant::now() < deadline {
        let response = scenario.get(HOST, "/ping").unwrap();
        assert_eq!(response.status, 200, "{response:?}");
        seen.insert(upstream_addr(&response));
        if seen.len() == count {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    seen
}

fn assert_seed_response(scenario: &SeedScenario, response: &HttpResponse) {
    assert_eq!(response.status, 200, "{response:?}");
    let body: Value = serde_json::from_str(&response.body).expect("JSON body");
    assert_eq!(body["metadata"], "demo");
    assert_eq!(body["version"], "0.1");
    assert!(body["instance"]
        .as_str()
        .is_some_and(|instance| !instance.is_empty()));

    let request_id = response.header("x-request-id").expect("x-request-id");
    assert!(is_lower_hex(request_id, 32), "x-request-id {request_id:?}");
    assert_eq!(
        body["request_id"], request_id,
        "the backend saw the same request id"
    );

    let proxy_id = response.header("x-proxy-id").expect("x-proxy-id");
    assert_eq!(
        proxy_id,
        nix_hostname(),
        "x-proxy-id is the proxy's host name"
    );

    let server_info = response.header("x-server-info").expect("x-server-info");
    let (name, rest) = server_info
        .split_once(' ')
        .expect("xlb/<version> (<sha>) linux/<arch>");
    assert_eq!(name, format!("xlb/{}", env!("CARGO_PKG_VERSION")));
    let (sha, platform) = rest.split_once(' ').expect("(<sha>) linux/<arch>");
    assert!(sha.starts_with('(') && sha.ends_with(')'), "{server_info}");
    assert!(platform.starts_with("linux/"), "{server_info}");

    let tasks = scenario
        .swarm
        .running_task_endpoints(SERVICE, TARGET_PORT)
        .unwrap();
    assert!(
        tasks.contains(&upstream_addr(response)),
        "{:?} not in {tasks:?}",
        upstream_addr(response)
    );

    let time = response
        .header("x-upstream-response-time")
        .expect("x-upstream-response-time");
    let (seconds, millis) = time.split_once('.').expect("seconds with three decimals");
    assert!(
        seconds.chars().all(|c| c.is_ascii_digit()) && !seconds.is_empty(),
        "{time}"
    );
    assert!(
        millis.len() == 3 && millis.chars().all(|c| c.is_ascii_digit()),
        "{time}"
    );
}

fn nix_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

fn xdp_stat(stats: &Value, name: &str) -> u64 {
    stats["xdp"][name]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
}

/// A frame cut inside its IPv4 header, sent raw from the client namespace onto the veth that
/// carries lb-00's XDP program.
fn send_truncated_frame(scenario: &SeedScenario) {
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
        s.bind((sys.argv[1],0))\n\
        s.send(b'\\xff'*6+b'\\x02'+b'\\x00'*5+b'\\x08\\x00'+b'\\x45\\x00\\x00\\x28\\x00\\x00')\n";
    scenario
        .topology
        .client
        .run(
            "python3",
            &["-c", script, xlb_testbed::Topology::CLIENT_INTERFACE],
        )
        .expect("send a raw frame");
}

/// `/metrics`, parsed as Prometheus parses it.
fn scrape_metrics(scenario: &SeedScenario) -> prometheus_parse::Scrape {
    let text = scenario.admin_text("/metrics").unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).unwrap()
}

/// The sum of `metric`'s counter or gauge samples whose labels include `wanted`.
fn metric_sum(scrape: &prometheus_parse::Scrape, metric: &str, wanted: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == metric)
        .filter(|sample| {
            wanted
                .iter()
                .all(|(name, value)| sample.labels.get(name) == Some(*value))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(value) | prometheus_parse::Value::Gauge(value) => {
                value
            }
            ref other => panic!("{metric} is neither a counter nor a gauge: {other:?}"),
        })
        .sum()
}

#[test]
fn seed_scenario_end_to_end() {
    let mut scenario =
        SeedScenario::start(&xlb_binary(), &seed_config()).expect("seed scenario up");
    assert!(
        scenario.lb_interface_details().unwrap().contains("xdp"),
        "XDP attached to lb-00's veth"
    );
    let stats_before = scenario.admin("/stats").unwrap();

    // The documentation's check.
    let curl = scenario.seed_curl().unwrap();
    let verbose = String::from_utf8_lossy(&curl.stderr);
    assert!(curl.status.success(), "{verbose}");
    assert!(verbose.contains("< HTTP/1.1 200 OK"), "{verbose}");
    let body: Value = serde_json::from_slice(&curl.stdout).expect("JSON body");
    assert_eq!(body["metadata"], "demo");

    let response = scenario.get(HOST, "/ping").unwrap();
    assert_seed_response(&scenario, &response);
    let mixed_case = scenario.get("Demo.Local:80", "/ping").unwrap();
    assert_eq!(
        mixed_case.status, 200,
        "Host is matched case-insensitively, port ignored"
    );

    let unknown = scenario.get("nobody.local", "/ping").unwrap();
    assert_eq!(unknown.status, 503, "{unknown:?}");

    // An IPv6 client, as Interlock's nginx also listens on [::]:80: served, and logged as
    // itself.
    scenario.topology.add_client_ipv6().unwrap();
    let lb6 = scenario.topology.lb_client_addr6();
    let over_ipv6 = scenario.get_at(lb6.into(), HOST, "/ping").unwrap();
    assert_seed_response(&scenario, &over_ipv6);
    let client6 = scenario.topology.client_addr6();
    xlb_testbed::wait_until(
        "the IPv6 client's access log line",
        Duration::from_secs(5),
        || {
            Ok(scenario
                .xlb_log()
                .lines()
                .any(|line| line.starts_with(&format!("{client6} ")))
                .then_some(()))
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", scenario.xlb_log()));

    // Prometheus' view: a parser reads /metrics, and the requests sent between two scrapes
    // are counted for the seed's route and answered by its one task.
    let before = scrape_metrics(&scenario);
    for _ in 0..5 {
        assert_eq!(scenario.get(HOST, "/ping").unwrap().status, 200);
    }
    let after = scrape_metrics(&scenario);
    let answered = [("host", HOST), ("service", SERVICE), ("code", "2xx")];
    let sent = metric_sum(&after, "xlb_http_requests_total", &answered)
        - metric_sum(&before, "xlb_http_requests_total", &answered);
    assert_eq!(sent, 5.0, "requests counted between the scrapes");
    for (metric, labels) in [
        ("xlb_xdp_received_packets_total", &[][..]),
        ("xlb_xdp_class_packets_total", &[("class", "l7")][..]),
        ("xlb_route_table_version", &[][..]),
        ("xlb_proxy_connections_accepted_total", &[][..]),
        ("xlb_discovery_reads_total", &[("outcome", "ok")][..]),
    ] {
        assert!(
            metric_sum(&after, metric, labels) > 0.0,
            "{metric} {labels:?} is not counted"
        );
    }

    // Scale out: within one poll (plus slack) the proxy spreads over three tasks.
    scenario.swarm.service_scale(SERVICE, 3).unwrap();
    let tasks: BTreeSet<SocketAddr> = scenario
        .swarm
        .wait_for_task_endpoints(SERVICE, TARGET_PORT, 3, Duration::from_secs(30))
        .unwrap()
        .into_iter()
        .collect();
    let seen = distinct_upstreams(&scenario, 3, ROUTE_CONVERGENCE);
    assert_eq!(
        seen, tasks,
        "responses within {ROUTE_CONVERGENCE:?} come from the 3 running tasks"
    );

    // The XDP program saw the client's traffic to the proxy port.
    let stats = scenario.admin("/stats").unwrap();
    for counter in ["received", "class_l7", "verdict_pass"] {
        assert!(
            xdp_stat(&stats, counter) > xdp_stat(&stats_before, counter),
            "{counter} did not grow: {stats}"
        );
    }

    // aya-log records from the XDP program reach xlb's log.
    send_truncated_frame(&scenario);
    xlb_testbed::wait_until(
        "the XDP log record in xlb's log",
        Duration::from_secs(5),
        || {
            Ok(scenario
                .xlb_log()
                .contains("malformed frame of 20 bytes")
                .then_some(()))
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", scenario.xlb_log()));
    let stats_after_frame = scenario.admin("/stats").unwrap();
    assert!(xdp_stat(&stats_after_frame, "class_malformed") > xdp_stat(&stats, "class_malformed"));

    // Remove the service: its host answers 503 within one poll.
    scenario.swarm.service_rm(SERVICE).unwrap();
    let removed = xlb_testbed::wait_until("demo.local to answer 503", ROUTE_CONVERGENCE, || {
        let response = scenario.get(HOST, "/ping")?;
        Ok((response.status == 503).then_some(response))
    });
    assert!(removed.is_ok(), "{removed:?}\n{}", scenario.xlb_log());

    let log = scenario.xlb_log();
    assert!(
        log.contains("Extensions.default.Image"),
        "ignored keys are logged by name:\n{log}"
    );
    assert!(log.contains("XDP program attached"), "{log}");

    // SIGTERM: xlb drains, detaches XDP and exits by itself (no SIGKILL).
    let status = scenario.stop_xlb().unwrap();
    assert!(
        status.success(),
        "xlb exited with {status}:\n{}",
        scenario.xlb_log()
    );
    let link = scenario.lb_interface_details().unwrap();
    assert!(
        !link.contains("xdp"),
        "XDP still attached after exit: {link}"
    );

    // Nothing is left behind: namespaces, the engine.
    let namespaces = scenario.topology.netns_names();
    let dockerd = scenario.swarm.dockerd().pid();
    drop(scenario);
    let leftover: Vec<String> = list_netns()
        .unwrap()
        .into_iter()
        .filter(|name| namespaces.contains(name))
        .collect();
    assert!(leftover.is_empty(), "namespaces left behind: {leftover:?}");
    assert!(
        !Path::new(&format!("/proc/{dockerd}")).exists(),
        "dockerd {dockerd} still runs"
    );
}
