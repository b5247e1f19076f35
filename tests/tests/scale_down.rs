//! A Swarm service scaled down while clients keep requesting: not one request fails. Tasks that
//! Swarm stops leave the route table at the next poll; until then the proxy's connect failover
//! (and retries for idempotent requests) keeps every request on a live task.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use xlb_testbed::seed::{xlb_binary, SeedScenario, HOST, PROXY_PORT, SERVICE, TARGET_PORT};

/// Requests per curl run, sequential on one keep-alive connection.
const BATCH: usize = 50;

#[test]
fn scaling_down_during_load_fails_no_request() {
    let config =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/config.toml");
    let scenario = SeedScenario::start(&xlb_binary(), &config).expect("seed scenario up");
    scenario.swarm.service_scale(SERVICE, 3).unwrap();
    scenario
        .swarm
        .wait_for_task_endpoints(SERVICE, TARGET_PORT, 3, Duration::from_secs(30))
        .unwrap();
    scenario.wait_for_endpoints(3).unwrap();

    let url = format!("http://{}:{PROXY_PORT}/ping", scenario.lb_addr());
    let client = scenario.topology.client.clone();
    let done = Arc::new(AtomicBool::new(false));
    let load = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut codes = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let mut curl = client.command("curl");
                curl.args(["-s", "-w", "%{http_code}\n", "--max-time", "10"]);
                curl.args(["-H", &format!("Host: {HOST}")]);
                for _ in 0..BATCH {
                    curl.args(["-o", "/dev/null", &url]);
                }
                let output = curl.output().expect("run a curl batch");
                let batch = String::from_utf8_lossy(&output.stdout).into_owned();
                codes.extend(batch.lines().map(str::to_owned));
            }
            codes
        })
    };

    thread::sleep(Duration::from_millis(500));
    scenario.swarm.service_scale(SERVICE, 1).unwrap();
    scenario.wait_for_endpoints(1).unwrap();
    thread::sleep(Duration::from_secs(1));
    done.store(true, Ordering::Relaxed);
    let codes = load.join().unwrap();

    assert!(
        codes.len() >= BATCH,
        "the load ran: {} requests",
        codes.len()
    );
    let failed: Vec<(usize, &String)> = codes
        .iter()
        .enumerate()
        .filter(|(_, code)| *code != "200")
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, the first: {:?}\n{}",
        failed.len(),
        codes.len(),
        &failed[..failed.len().min(10)],
        scenario.xlb_log()
    );
}
