//! The proxy against real processes: docker-demo backends on 127.0.0.1, one of them killed with
//! SIGKILL in the middle of a load of GET requests (none may fail), and the `xlb run` daemon
//! applying `[Extensions.<name>.Config]` keys (ClientMaxBodySize, KeepaliveTimeout,
//! AccessLogPath, ErrorLogPath).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use xlb::{
    proxy::{self, PoolSettings, ProxySettings, Router},
    routes::{Balance, Route, RouteTable, Transport, ROOT_CONTEXT},
};
use xlb_testbed::{
    build_docker_demo_binary, seed::xlb_binary, wait_until, Netns, Process, ScratchDir,
};

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A docker-demo process listening on `port`, answering `GET /ping` with `metadata`.
fn start_docker_demo(binary: &Path, port: u16, metadata: &str) -> Process {
    let mut command = Command::new(binary);
    command
        .env("PORT", port.to_string())
        .env("METADATA", metadata)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let process = Process::spawn(command).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until("docker-demo listening", Duration::from_secs(10), || {
        Ok(TcpStream::connect(addr).ok().map(drop))
    })
    .unwrap();
    process
}

fn route_table(endpoints: &[SocketAddr]) -> RouteTable {
    let route = Route {
        service: "demo".to_owned(),
        context_root: ROOT_CONTEXT.to_owned(),
        context_root_rewrite: false,
        endpoints: endpoints.to_vec(),
        balance: Balance::RoundRobin,
        ssl_only: false,
        redirects: Vec::new(),
        transport: Transport::default(),
    };
    RouteTable {
        routes: BTreeMap::from([("demo.local".to_owned(), vec![route])]),
        ..RouteTable::default()
    }
}

/// `requests` keep-alive GETs of `/ping` through the proxy at `proxy`; the failures, described.
async fn ping_repeatedly(
    proxy: SocketAddr,
    requests: usize,
    answered: Arc<AtomicUsize>,
) -> Vec<String> {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut failures = Vec::new();
    for _ in 0..requests {
        let request = Request::get("/ping")
            .header("host", "demo.local")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let outcome = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        match outcome.await {
            Ok((status, body)) if status == 200 && body.starts_with(b"{\"instance\"") => {}
            Ok((status, body)) => failures.push(format!("{status}: {body:?}")),
            Err(error) => failures.push(format!("client error: {error}")),
        }
        answered.fetch_add(1, Ordering::SeqCst);
    }
    failures
}

#[test]
fn a_backend_killed_with_sigkill_under_load_fails_no_request() {
    let binary = build_docker_demo_binary().unwrap();
    let ports = [free_port(), free_port(), free_port()];
    let mut backends: Vec<Process> = ports
        .iter()
        .enumerate()
        .map(|(index, &port)| start_docker_demo(&binary, port, &format!("backend-{index}")))
        .collect();
    let endpoints: Vec<SocketAddr> = ports
        .iter()
        .map(|&port| SocketAddr::from(([127, 0, 0, 1], port)))
        .collect();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let failures = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = listener.local_addr().unwrap();
        let router = Router::new();
        router.update(&route_table(&endpoints));
        let settings = ProxySettings {
            upstream: PoolSettings {
                connect_timeout: Duration::from_secs(1),
                ..PoolSettings::default()
            },
            ..ProxySettings::default()
        };
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(proxy::serve(listener, router, settings, shutdown.clone()));

        const CLIENTS: usize = 8;
        const REQUESTS: usize = 150;
        let answered = Arc::new(AtomicUsize::new(0));
        let load: Vec<_> = (0..CLIENTS)
            .map(|_| tokio::spawn(ping_repeatedly(proxy_addr, REQUESTS, Arc::clone(&answered))))
            .collect();
        let third = CLIENTS * REQUESTS / 3;
        for _ in 0..2_000 {
            if answered.load(Ordering::SeqCst) >= third {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            answered.load(Ordering::SeqCst) >= third,
            "the load never got going"
        );
        let status = backends[1].kill().unwrap();
        assert!(!status.success());
        let answered_at_kill = answered.load(Ordering::SeqCst);

        let mut failures = Vec::new();
        for client in load {
            let client = tokio::time::timeout(Duration::from_secs(60), client)
                .await
                .expect("the load finished");
            failures.extend(client.unwrap());
        }
        assert!(
            answered_at_kill < CLIENTS * REQUESTS,
            "the whole load was done before the kill"
        );
        shutdown.cancel();
        served.await.unwrap().unwrap();
        failures
    });
    assert_eq!(failures, Vec::<String>::new());
}

/// `curl` inside `netns` with `args`; its stdout.
fn curl(netns: &Netns, args: &[&str]) -> String {
    netns.run("curl", args).unwrap()
}

#[test]
fn xlb_run_applies_the_proxy_config_keys() {
    let scratch = ScratchDir::create("xlb-proxy-keys").unwrap();
    let access_log = scratch.path().join("access.log");
    let error_log = scratch.path().join("error.log");
    let config = scratch.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"DockerURL = "unix:///nonexistent/docker.sock"
PollInterval = "500ms"

[Extensions.default]
PublishMode = "host"
PublishedPort = 8000

[Extensions.default.Config]
ClientMaxBodySize = "1k"
KeepaliveTimeout = "1s"
ConnectTimeout = 5
SendTimeout = "10s"
ReadTimeout = "10s"
UnderscoresInHeaders = false
AccessLogPath = "{}"
ErrorLogPath = "{}"
"#,
            access_log.display(),
            error_log.display()
        ),
    )
    .unwrap();
    let log = scratch.path().join("xlb.log");
    let netns = Netns::create(&format!("xlb-{}-keys", xlb_testbed::run_id())).unwrap();
    let log_file = std::fs::File::create(&log).unwrap();
    let mut command = netns.command(xlb_binary());
    command
        .args(["run", "--no-xdp", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    let mut xlb = Process::spawn(command).unwrap();
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();

    // curl's status code, or its failure (the proxy may not listen yet).
    let status_of = |extra: &[&str]| {
        let mut args = vec!["-s", "-o", "/dev/null", "-w", "%{http_code}"];
        args.extend_from_slice(extra);
        args.push("http://127.0.0.1:8000/");
        netns
            .run("curl", &args)
            .unwrap_or_else(|error| error.to_string())
    };
    wait_until("the proxy answering", Duration::from_secs(10), || {
        Ok((status_of(&["-H", "Host: a.local"]) == "503").then_some(()))
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", read(&log)));

    let too_large = status_of(&["-H", "Host: a.local", "--data-binary", &"x".repeat(2048)]);
    assert_eq!(too_large, "413", "ClientMaxBodySize");
    let within = status_of(&["-H", "Host: a.local", "--data-binary", &"x".repeat(1024)]);
    assert_eq!(
        within, "503",
        "a body within ClientMaxBodySize reaches routing"
    );

    // KeepaliveTimeout: a second request after the idle timeout needs a new connection.
    let reuse = curl(
        &netns,
        &[
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{num_connects}\n",
            "-H",
            "Host: a.local",
            "http://127.0.0.1:8000/one",
            "http://127.0.0.1:8000/two",
        ],
    );
    assert_eq!(reuse, "1\n0\n", "keep-alive within KeepaliveTimeout");
    let after_idle = netns
        .run(
            "bash",
            &[
                "-c",
                "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET / HTTP/1.1\\r\\nHost: a.local\\r\\n\\r\\n' >&3 \
                 && timeout 10 cat <&3",
            ],
        )
        .unwrap_or_else(|error| panic!("the idle connection was not closed: {error}"));
    assert!(after_idle.starts_with("HTTP/1.1 503"), "{after_idle}");

    wait_until("the access log lines", Duration::from_secs(10), || {
        Ok((read(&access_log).lines().count() >= 6).then_some(()))
    })
    .unwrap_or_else(|error| panic!("{error}\n{}", read(&access_log)));
    let access = read(&access_log);
    assert!(access.contains("\"POST / HTTP/1.1\" 413 "), "{access}");
    assert!(access.contains("\"GET /two HTTP/1.1\" 503 "), "{access}");

    wait_until(
        "a discovery warning in ErrorLogPath",
        Duration::from_secs(10),
        || {
            Ok(read(&error_log)
                .contains("unix:///nonexistent/docker.sock")
                .then_some(()))
        },
    )
    .unwrap_or_else(|error| {
        panic!(
            "{error}\nerror log: {}\nxlb log: {}",
            read(&error_log),
            read(&log)
        )
    });
    let errors = read(&error_log);
    assert!(
        errors
            .lines()
            .all(|line| line.contains("WARN") || line.contains("ERROR")),
        "{errors}"
    );

    let status = xlb.stop().unwrap();
    assert!(status.success(), "{status}\n{}", read(&log));
}
