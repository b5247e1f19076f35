//! Hitless restart: a second `xlb run` with the same arguments takes over from the running one
//! under load. A client opens a new L7 connection per request without pause, and a long-lived
//! L4 connection (through XDP only: the LB's kernel cannot forward) sends a request every few
//! milliseconds; the second xlb adopts the pinned connection table, replaces the program
//! through the pinned link and joins the listeners, the first one drains and exits by itself.
//! Not one request may fail, and the L4 connection must go on. A stop, then, detaches XDP and
//! removes the pins.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use xlb_testbed::{
    in_netns, require_root, seed::xlb_binary, wait_until, Process, ScratchDir, Segment,
};

mod l4_support;

use l4_support::swarm_lb::SwarmLb;

const SERVICE: &str = "restartdemo";
const IMAGE: &str = "xlb-restart-demo:test";
const HOST: &str = "app.restart.local";
const L4_PORT: u16 = 9000;
const TARGET_PORT: u16 = 8080;
const CONVERGE: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the load runs before the second xlb starts, and after the first one has left.
const STEADY_LOAD: Duration = Duration::from_secs(2);

const CONFIG: &str = r#"
ListenAddr = ":8081"
PollInterval = "1s"

[Extensions.default]
PublishMode = "host"
PublishedPort = 80
"#;

/// The BPF filesystem the test mounts for its xlbs' pins (`ip netns exec` gives each process
/// a /sys of its own, without one), unmounted when the test ends.
struct BpfMount(std::path::PathBuf);

impl BpfMount {
    fn at(dir: &Path) -> BpfMount {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a BPF filesystem on {}",
            dir.display()
        );
        BpfMount(dir.to_owned())
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// What a load loop saw.
#[derive(Default)]
struct Tally {
    answered: AtomicU64,
    failed: AtomicU64,
    first_failure: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn record(&self, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                self.answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.first_failure.lock().unwrap().get_or_insert(error);
            }
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} answered, {} failed (first: {:?})",
            self.answered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.first_failure.lock().unwrap()
        )
    }
}

/// One GET on its own connection through the L7 proxy.
fn l7_request(lb: SocketAddr) -> Result<(), String> {
    let mut stream =
        TcpStream::connect_timeout(&lb, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(
        stream,
        "GET /ping HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    match response.lines().next() {
        Some(status) if status.starts_with("HTTP/1.1 200") => Ok(()),
        status => Err(format!("answered {status:?}")),
    }
}

/// A keep-alive HTTP connection through the L4 path, one request at a time.
struct L4Stream {
    reader: BufReader<TcpStream>,
}

impl L4Stream {
    fn open(lb: SocketAddr) -> L4Stream {
        let stream = TcpStream::connect_timeout(&lb, IO_TIMEOUT).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        L4Stream {
            reader: BufReader::new(stream),
        }
    }

    fn request(&mut self) -> Result<(), String> {
        write!(
            self.reader.get_mut(),
            "GET /ping HTTP/1.1\r\nHost: l4\r\n\r\n"
        )
        .map_err(|e| format!("write: {e}"))?;
        let mut length = None;
        let mut status = String::new();
        self.reader
            .read_line(&mut status)
            .map_err(|e| format!("read: {e}"))?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("answered {status:?}"));
        }
        loop {
            let mut line = String::new();
            self.reader
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0; length.ok_or("no Content-Length")?];
        self.reader
            .read_exact(&mut body)
            .map_err(|e| format!("read body: {e}"))
    }
}

#[test]
fn a_second_xlb_takes_over_under_load_without_failing_a_request_or_an_l4_connection() {
    require_root().unwrap();
    let xlb = xlb_binary();
    assert!(
        xlb.is_file(),
        "no xlb binary at {}: build it first",
        xlb.display()
    );
    // The L4 connection can only go through XDP: the LB's kernel forwards nothing.
    let bed = SwarmLb::start(IMAGE);
    let SwarmLb {
        swarm, client, lb, ..
    } = &bed;
    swarm
        .service_create(&[
            "--name",
            SERVICE,
            "--label",
            &format!("com.docker.lb.hosts={HOST}"),
            "--label",
            &format!("com.docker.lb.port={TARGET_PORT}"),
            "--label",
            &format!("xlb.l4.ports={L4_PORT}:{TARGET_PORT}"),
            "--publish",
            &format!("mode=host,target={TARGET_PORT}"),
            IMAGE,
        ])
        .unwrap();
    swarm
        .wait_for_task_endpoints(SERVICE, TARGET_PORT, 1, CONVERGE)
        .unwrap();

    let scratch = ScratchDir::create("hitless-restart").unwrap();
    let config = scratch.path().join("config.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let bpf = BpfMount::at(&scratch.path().join("bpf"));
    let bpf_dir = bpf.0.join("xlb");
    let start_xlb = |name: &str| {
        let log_path = scratch.path().join(format!("{name}.log"));
        let log = File::create(&log_path).unwrap();
        let mut command = lb.netns.command(&xlb);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--interface", Segment::HOST_INTERFACE])
            .args(["--docker-url", &swarm.dockerd().host_url()])
            .arg("--bpf-dir")
            .arg(&bpf_dir)
            .env("XLB_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        (Process::spawn(command).unwrap(), log_path)
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();

    let (mut first, first_log) = start_xlb("first");
    let l7_addr = SocketAddr::from((lb.addr, 80));
    let l4_addr = SocketAddr::from((lb.addr, L4_PORT));
    wait_until("the first xlb to serve L7 and L4", CONVERGE, || {
        in_netns(&client.netns, || {
            (l7_request(l7_addr).is_ok() && L4Stream::open(l4_addr).request().is_ok()).then_some(())
        })
    })
    .unwrap_or_else(|error| panic!("{error:#}\nfirst xlb's log:\n{}", read(&first_log)));

    let stop = AtomicBool::new(false);
    let l7 = Tally::default();
    let l4 = Tally::default();
    let (second, second_log) = std::thread::scope(|scope| {
        scope.spawn(|| {
            in_netns(&client.netns, || {
                while !stop.load(Ordering::Relaxed) {
                    l7.record(l7_request(l7_addr));
                }
            })
            .unwrap()
        });
        scope.spawn(|| {
            in_netns(&client.netns, || {
                let mut stream = L4Stream::open(l4_addr);
                while !stop.load(Ordering::Relaxed) {
                    let outcome = stream.request();
                    let failed = outcome.is_err();
                    l4.record(outcome);
                    if failed {
                        return; // the connection is gone: nothing more to learn from it
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .unwrap()
        });

        std::thread::sleep(STEADY_LOAD);
        let (second, second_log) = start_xlb("second");
        let deadline = Instant::now() + CONVERGE;
        let exited = loop {
            if let Some(status) = first.exit_status().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the first xlb did not leave by itself\nfirst:\n{}\nsecond:\n{}",
                read(&first_log),
                read(&second_log)
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(STEADY_LOAD);
        stop.store(true, Ordering::Relaxed);
        assert!(exited.success(), "the first xlb exited with {exited}");
        (second, second_log)
    });
    let logs = || {
        format!(
            "first:\n{}\nsecond:\n{}",
            read(&first_log),
            read(&second_log)
        )
    };
    eprintln!(
        "through the handover: L7 {}; L4 {}",
        l7.summary(),
        l4.summary()
    );
    assert!(
        read(&first_log).contains("replaced by a new xlb"),
        "{}",
        logs()
    );
    assert_eq!(
        l7.failed.load(Ordering::Relaxed),
        0,
        "L7: {}\n{}",
        l7.summary(),
        logs()
    );
    assert_eq!(
        l4.failed.load(Ordering::Relaxed),
        0,
        "L4: {}\n{}",
        l4.summary(),
        logs()
    );
    assert!(
        l7.answered.load(Ordering::Relaxed) > 100,
        "L7: {}",
        l7.summary()
    );
    assert!(
        l4.answered.load(Ordering::Relaxed) > 100,
        "L4: {}",
        l4.summary()
    );

    // The second one serves alone now, and a stop leaves nothing behind.
    let mut second = second;
    in_netns(&client.netns, || l7_request(l7_addr))
        .unwrap()
        .unwrap_or_else(|error| panic!("{error}\n{}", logs()));
    let stopped = second.stop().unwrap();
    assert!(
        stopped.success(),
        "the second xlb exited with {stopped}\n{}",
        logs()
    );
    let link = lb
        .netns
        .ip(&["-d", "link", "show", Segment::HOST_INTERFACE])
        .unwrap();
    assert!(
        !link.contains("prog/xdp"),
        "XDP still attached after a stop: {link}"
    );
    let left: Vec<_> = walk(&bpf_dir);
    assert!(left.is_empty(), "pins left after a stop: {left:?}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}
