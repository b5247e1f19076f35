//! `xlb run` as a user meets it without a Swarm: XDP falls back to generic mode on a driver
//! without native XDP, the proxy (with several workers) and admin endpoint serve while Docker
//! is unreachable, SIGTERM ends it cleanly, and a bad config is refused with its position.

use std::{process::Stdio, time::Duration};

use xlb_testbed::{seed::xlb_binary, wait_until, Netns, Process, ScratchDir};

const CONFIG_WITHOUT_DOCKER: &str = r#"ListenAddr = "127.0.0.1:9000"
DockerURL = "unix:///nonexistent/docker.sock"
PollInterval = "500ms"

[Extensions.default]
PublishMode = "host"
PublishedPort = 8000

[Extensions.default.Config]
WorkerProcesses = 3
"#;

#[test]
fn runs_without_docker_falls_back_to_generic_xdp_and_stops_on_sigterm() {
    let scratch = ScratchDir::create("xlb-run").unwrap();
    let config = scratch.path().join("config.toml");
    std::fs::write(&config, CONFIG_WITHOUT_DOCKER).unwrap();
    let log = scratch.path().join("xlb.log");
    let netns = Netns::create(&format!("xlb-{}-run", xlb_testbed::run_id())).unwrap();
    netns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    netns.ip(&["link", "set", "br0", "up"]).unwrap();

    let log_file = std::fs::File::create(&log).unwrap();
    let mut command = netns.command(xlb_binary());
    command
        .args(["run", "--interface", "br0", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    let mut xlb = Process::spawn(command).unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let health = wait_until("the admin endpoint", Duration::from_secs(10), || {
        Ok(netns
            .run("curl", &["-sf", "http://127.0.0.1:9000/health"])
            .ok())
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", read_log()));
    assert_eq!(health.trim(), "ok");

    let unknown = netns
        .run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Host: a.local",
                "http://127.0.0.1:8000/",
            ],
        )
        .unwrap();
    assert_eq!(unknown, "503");

    // WorkerProcesses = 3: three workers share the port, each counting its own connections.
    for _ in 0..20 {
        netns
            .run(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-H",
                    "Host: a.local",
                    "http://127.0.0.1:8000/",
                ],
            )
            .unwrap();
    }
    let stats = netns
        .run("curl", &["-sf", "http://127.0.0.1:9000/stats"])
        .unwrap();
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let workers = stats["proxy"]["workers"].as_array().expect("proxy.workers");
    assert_eq!(workers.len(), 3, "{stats}");
    let accepted: u64 = workers
        .iter()
        .map(|worker| worker["connections_accepted"].as_u64().unwrap())
        .sum();
    assert_eq!(accepted, 21, "{stats}");

    let routes = netns
        .run("curl", &["-sf", "http://127.0.0.1:9000/routes"])
        .unwrap();
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(
        routes,
        serde_json::json!({
            "routes": {},
            "default_backend": null,
            "rejected": [],
            "l4": { "listeners": [], "rejected": [] },
            // Docker never read: no snapshot served.
            "snapshot": { "version": null },
        })
    );

    wait_until(
        "a discovery warning naming the Docker URL",
        Duration::from_secs(5),
        || {
            Ok(read_log()
                .contains("unix:///nonexistent/docker.sock")
                .then_some(()))
        },
    )
    .unwrap_or_else(|error| panic!("{error}\n{}", read_log()));

    let status = xlb.stop().unwrap();
    let log = read_log();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(log.contains("falling back to generic mode"), "{log}");
    assert!(log.contains("mode=Generic"), "{log}");
    let link = netns.ip(&["link", "show", "dev", "br0"]).unwrap();
    assert!(!link.contains("xdp"), "XDP detached on exit: {link}");
}

#[test]
fn a_bad_config_is_refused_with_file_line_and_column() {
    let scratch = ScratchDir::create("bad-config").unwrap();
    let config = scratch.path().join("config.toml");
    std::fs::write(&config, "ListenAddr = \":8080\"\nPollInterval = 3\n").unwrap();
    let output = std::process::Command::new(xlb_binary())
        .args(["run", "--no-xdp", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let position = format!("{}:2:16: PollInterval", config.display());
    assert!(stderr.contains(&position), "{stderr}");
}

#[test]
fn check_config_reports_a_good_config_and_fails_a_bad_one_at_its_line() {
    let scratch = ScratchDir::create("check-config").unwrap();
    let check = |text: &str| {
        let config = scratch.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        let output = std::process::Command::new(xlb_binary())
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), stdout, stderr, config)
    };
    let (ok, stdout, _, config) = check("ListenAddr = \":8080\"\n[Extensions.default]\n");
    assert!(ok);
    assert!(
        stdout.starts_with(&format!("{}: ok\n", config.display())),
        "{stdout}"
    );
    let (ok, _, stderr, config) = check("ListenAddr = \":8080\"\nPollInterval = 3\n");
    assert!(!ok);
    assert!(
        stderr.contains(&format!("{}:2:16", config.display())),
        "{stderr}"
    );
}

/// Under a systemd unit of `Type=notify`: once it serves, xlb says so and names itself the
/// main process (what lets `systemctl reload`'s newcomer take the service over, see
/// `deploy/systemd/xlb-proxy.service`). The service manager's socket here is the test's own.
#[test]
fn tells_the_service_manager_it_is_ready_and_its_main_process() {
    let scratch = ScratchDir::create("xlb-notify").unwrap();
    let config = scratch.path().join("config.toml");
    std::fs::write(&config, CONFIG_WITHOUT_DOCKER).unwrap();
    let notify_path = scratch.path().join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let netns = Netns::create(&format!("xlb-{}-notify", xlb_testbed::run_id())).unwrap();

    let mut command = netns.command(xlb_binary());
    command
        .args(["run", "--no-xdp", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut xlb = Process::spawn(command).unwrap();

    let mut message = [0; 256];
    let length = manager
        .recv(&mut message)
        .expect("a notification from xlb within 10 s");
    let message = String::from_utf8_lossy(&message[..length]).into_owned();
    let lines: Vec<&str> = message.lines().collect();
    assert!(lines.contains(&"READY=1"), "{message:?}");
    assert!(
        lines.contains(&format!("MAINPID={}", xlb.pid()).as_str()),
        "{message:?}"
    );
    // It serves when it says so.
    let health = netns
        .run("curl", &["-sf", "http://127.0.0.1:9000/health"])
        .unwrap();
    assert_eq!(health.trim(), "ok");
    assert!(xlb.stop().unwrap().success());
}
