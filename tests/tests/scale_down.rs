//! A Swarm service scaled down while a client keeps requesting: not one request fails, the
//! tasks being stopped were still answering the load after the scale command was issued, and
//! the load ran on until their containers had exited and beyond. A stopping task leaves the
//! route table as soon as discovery sees that Swarm no longer wants it running (the service
//! update's event, the container's death, else the next poll): requests already on it finish,
//! and one that meets it stopped before that moves on by the proxy's connect failover, or by
//! its retries for idempotent requests.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, SystemTime},
};

use xlb_testbed::{
    seed::{xlb_binary, SeedScenario, HOST, PROXY_PORT, SERVICE, TARGET_PORT},
    wait_until,
};

/// Requests per curl run, sequential on one keep-alive connection.
const BATCH: usize = 50;
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// One answer the load got.
struct Answer {
    status: String,
    /// `x-upstream-addr`: the task that answered.
    upstream: Option<SocketAddr>,
    /// A time at or before the answer ended: its curl run's start plus the total times of the
    /// run's requests up to this one, which leave out curl's work between requests.
    ended_after: SystemTime,
}

#[test]
fn scaling_down_during_load_fails_no_request() {
    let config =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/config.toml");
    let scenario = SeedScenario::start(&xlb_binary(), &config).expect("seed scenario up");
    scenario.swarm.service_scale(SERVICE, 3).unwrap();
    scenario
        .swarm
        .wait_for_task_endpoints(SERVICE, TARGET_PORT, 3, CONVERGE_TIMEOUT)
        .unwrap();
    let all: BTreeSet<SocketAddr> = scenario
        .wait_for_endpoints(3)
        .unwrap()
        .into_iter()
        .collect();

    let url = format!("http://{}:{PROXY_PORT}/ping", scenario.lb_addr());
    let client = scenario.topology.client.clone();
    let done = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let load = {
        let (done, answers) = (Arc::clone(&done), Arc::clone(&answers));
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let mut curl = client.command("curl");
                curl.args(["-s", "--max-time", "10", "-H", &format!("Host: {HOST}")]);
                curl.args([
                    "-w",
                    "%{http_code} %{time_total} %header{x-upstream-addr}\n",
                ]);
                for _ in 0..BATCH {
                    curl.args(["-o", "/dev/null", &url]);
                }
                let started = SystemTime::now();
                let output = curl.output().expect("run a curl batch");
                let mut elapsed = Duration::ZERO;
                let mut answers = answers.lock().unwrap();
                for line in String::from_utf8_lossy(&output.stdout).lines() {
                    let mut fields = line.split(' ');
                    let status = fields.next().unwrap_or_default().to_owned();
                    let total = fields.next().and_then(|total| total.parse().ok());
                    elapsed += Duration::from_secs_f64(total.unwrap_or_default());
                    let upstream = fields.next().and_then(|addr| addr.parse().ok());
                    answers.push(Answer {
                        status,
                        upstream,
                        ended_after: started + elapsed,
                    });
                }
            }
        })
    };
    let answered_by = |tasks: &BTreeSet<SocketAddr>, after: SystemTime| {
        answers
            .lock()
            .unwrap()
            .iter()
            .filter(|answer| answer.ended_after > after)
            .filter_map(|answer| answer.upstream.filter(|addr| tasks.contains(addr)))
            .collect::<BTreeSet<SocketAddr>>()
    };

    let load_started = SystemTime::now();
    wait_until(
        "the load to reach all three tasks",
        CONVERGE_TIMEOUT,
        || Ok((answered_by(&all, load_started) == all).then_some(())),
    )
    .unwrap();
    let scale_issued = SystemTime::now();
    scenario.swarm.service_scale(SERVICE, 1).unwrap();
    let left: BTreeSet<SocketAddr> = scenario
        .wait_for_endpoints(1)
        .unwrap()
        .into_iter()
        .collect();
    let stopped: BTreeSet<SocketAddr> = all.difference(&left).copied().collect();
    let service_label = format!("label=com.docker.swarm.service.name={SERVICE}");
    wait_until(
        "the two stopped tasks' containers to exit",
        CONVERGE_TIMEOUT,
        || {
            let running = scenario.swarm.docker(&[
                "ps",
                "--quiet",
                "--filter",
                &service_label,
                "--filter",
                "status=running",
            ])?;
            Ok((running.split_whitespace().count() == 1).then_some(()))
        },
    )
    .unwrap();
    let containers_exited = SystemTime::now();
    wait_until(
        "the load to go on after the exits",
        CONVERGE_TIMEOUT,
        || Ok((answered_by(&left, containers_exited) == left).then_some(())),
    )
    .unwrap();
    done.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let answers = answers.lock().unwrap();
    let failed: Vec<(usize, &String)> = answers
        .iter()
        .map(|answer| &answer.status)
        .enumerate()
        .filter(|(_, status)| *status != "200")
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, the first: {:?}\n{}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(10)],
        scenario.xlb_log()
    );
    let overlapping = answers
        .iter()
        .filter(|answer| answer.ended_after > scale_issued)
        .filter(|answer| answer.upstream.is_some_and(|addr| stopped.contains(&addr)))
        .count();
    assert!(
        overlapping > 0,
        "no answer from the stopped tasks {stopped:?} ended after the scale command was \
         issued: the scale-down did not overlap the load\n{}",
        scenario.xlb_log()
    );
}
