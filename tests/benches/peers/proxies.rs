//! The programs under test, each started in lb-00 from a config rendered from the same Swarm
//! endpoint, pinned to [`PROXY_CPU`], and stopped by PID when dropped:
//!
//! - nginx, one worker, configured as Interlock renders its proxy: upstream keepalive,
//!   `proxy_next_upstream`, X-Request-Id / X-Real-IP / X-Forwarded-For, the five `add_header`
//!   response headers;
//! - HAProxy, one thread, the same headers (`mode http`), or `mode tcp` for L4;
//! - kernel NAT: iptables DNAT + MASQUERADE in lb-00, forwarding on for that row only;
//! - xlb, `xlb run` with the seed's config.toml, XDP attached to lb-00's interface.
//!
//! The config renderers are pure functions of [`ProxyInputs`].

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result};
use xlb_testbed::{seed::HttpResponse, wait_until, Netns, Process, Segment};

use crate::{
    bed::{set_router_off, write_sysctls, Bed, HOST, L4_PORT, PATH},
    callgrind,
};

/// The CPU the proxies are pinned to; the load generators get the other one.
pub const PROXY_CPU: &str = "1";
/// Client connections every proxy may hold: the seed's `MaxConnections` (2048) would refuse
/// most of the idle-connection measurement, so every proxy gets the same, larger limit.
pub const MAX_CONNECTIONS: u32 = 16_384;
const READY: Duration = Duration::from_secs(30);

/// Whether and where the proxy writes a line per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessLog {
    Off,
    File,
}

impl AccessLog {
    pub fn label(self) -> &'static str {
        match self {
            AccessLog::Off => "access log off",
            AccessLog::File => "access log to a file",
        }
    }
}

/// What every proxy's config is rendered from.
#[derive(Debug, Clone)]
pub struct ProxyInputs {
    pub listen: SocketAddr,
    pub backend: SocketAddr,
    /// Where logs, pid files and temporary files go.
    pub dir: PathBuf,
    pub access_log: AccessLog,
    /// Run under callgrind, its counts written into this directory (see [`crate::callgrind`]).
    pub callgrind: Option<PathBuf>,
}

/// The open-file limit every proxy runs with (inherited from this process): HAProxy is told it
/// explicitly, since it otherwise asks for twice `maxconn` and refuses to start without it.
pub fn open_file_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft)
}

/// HAProxy reserves two descriptors per connection (client and server side) and refuses to
/// start when `ulimit-n` cannot hold `maxconn` of them, so its limit may be lower than the
/// others' where the open-file limit cannot be raised (the report shows how many it held).
fn haproxy_maxconn(open_files: u64) -> u64 {
    u64::from(MAX_CONNECTIONS).min(open_files.saturating_sub(100) / 2)
}

impl ProxyInputs {
    fn access_log_path(&self) -> PathBuf {
        self.dir.join("access.log")
    }
}

/// A proxy's processes, stopped on drop.
pub struct Running {
    processes: Vec<Process>,
    /// Worker processes the main one forked (nginx), measured with it.
    children: Vec<u32>,
}

impl Running {
    /// Every process whose CPU time and memory count as the proxy's.
    pub fn pids(&self) -> Vec<u32> {
        self.processes
            .iter()
            .map(Process::pid)
            .chain(self.children.iter().copied())
            .collect()
    }
}

fn pinned(
    netns: &Netns,
    inputs: &ProxyInputs,
    program: impl AsRef<std::ffi::OsStr>,
) -> std::process::Command {
    let mut command = netns.command("taskset");
    command.args(["-c", PROXY_CPU]);
    if let Some(dir) = &inputs.callgrind {
        command.args(callgrind::wrapper(dir));
    }
    command.arg(program);
    command
}

fn spawn_logged(mut command: std::process::Command, log: &Path) -> Result<Process> {
    let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    Process::spawn(command)
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until a GET through `to`, from the client namespace, is answered 200.
pub fn wait_for_200(bed: &Bed, to: SocketAddr, what: &str, log: &Path) -> Result<()> {
    let url = format!("http://{to}{PATH}");
    wait_until(&format!("{what} to answer 200"), READY, || {
        let status = bed.client.netns.run(
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
                "-H",
                &format!("Host: {HOST}"),
                &url,
            ],
        );
        Ok(status.ok().filter(|code| code == "200").map(|_| ()))
    })
    .with_context(|| format!("{what}'s log:\n{}", read_log(log)))
}

/// The response headers Interlock's proxy adds: every L7 row must pay for the same work.
const INTERLOCK_HEADERS: [&str; 5] = [
    "x-request-id",
    "x-proxy-id",
    "x-server-info",
    "x-upstream-addr",
    "x-upstream-response-time",
];

/// Fails unless a GET through `to` carries all of [`INTERLOCK_HEADERS`].
pub fn check_interlock_headers(bed: &Bed, to: SocketAddr, what: &str) -> Result<()> {
    let url = format!("http://{to}{PATH}");
    let output = bed.client.netns.run(
        "curl",
        &[
            "-si",
            "--max-time",
            "5",
            "-H",
            &format!("Host: {HOST}"),
            &url,
        ],
    )?;
    let response = HttpResponse::parse(&output)?;
    let missing: Vec<&str> = INTERLOCK_HEADERS
        .into_iter()
        .filter(|name| response.header(name).is_none())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{what}'s responses lack {missing:?}: the rows would not compare\n{output}"
    );
    Ok(())
}

pub fn start_nginx(bed: &Bed, inputs: &ProxyInputs) -> Result<Running> {
    std::fs::create_dir_all(&inputs.dir)?;
    let config = inputs.dir.join("nginx.conf");
    std::fs::write(&config, nginx_config(inputs))?;
    let log = inputs.dir.join("nginx.out");
    let mut command = pinned(&bed.lb.netns, inputs, "nginx");
    command.arg("-c").arg(&config);
    let master = spawn_logged(command, &log)?;
    wait_for_200(bed, inputs.listen, "nginx", &log)?;
    let children = match inputs.callgrind {
        // One process (see `nginx_config`).
        Some(_) => Vec::new(),
        None => child_pids(master.pid())?,
    };
    Ok(Running {
        processes: vec![master],
        children,
    })
}

pub fn start_haproxy_http(bed: &Bed, inputs: &ProxyInputs) -> Result<Running> {
    start_haproxy(bed, inputs, &haproxy_http_config(inputs), inputs.listen)
}

pub fn start_haproxy_tcp(bed: &Bed, inputs: &ProxyInputs) -> Result<Running> {
    start_haproxy(bed, inputs, &haproxy_tcp_config(inputs), inputs.listen)
}

fn start_haproxy(
    bed: &Bed,
    inputs: &ProxyInputs,
    text: &str,
    ready_at: SocketAddr,
) -> Result<Running> {
    std::fs::create_dir_all(&inputs.dir)?;
    let config = inputs.dir.join("haproxy.cfg");
    std::fs::write(&config, text)?;
    // HAProxy logs to its standard output (`log stdout`): that is the access log file.
    let log = match inputs.access_log {
        AccessLog::File => inputs.access_log_path(),
        AccessLog::Off => inputs.dir.join("haproxy.out"),
    };
    let mut command = pinned(&bed.lb.netns, inputs, "haproxy");
    command.arg("-db").arg("-f").arg(&config);
    let process = spawn_logged(command, &log)?;
    wait_for_200(bed, ready_at, "haproxy", &log)?;
    Ok(Running {
        processes: vec![process],
        children: Vec::new(),
    })
}

/// `xlb run` with the seed's config, XDP on lb-00's interface; ready once it routes the
/// service at `ready_at` (its L7 port, or the L4 listener).
pub fn start_xlb(
    bed: &Bed,
    xlb: &Path,
    inputs: &ProxyInputs,
    ready_at: SocketAddr,
) -> Result<Running> {
    std::fs::create_dir_all(&inputs.dir)?;
    let config = inputs.dir.join("config.toml");
    std::fs::write(&config, xlb_config(inputs))?;
    let log = inputs.dir.join("xlb.out");
    let mut command = pinned(&bed.lb.netns, inputs, xlb);
    command
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--interface", Segment::HOST_INTERFACE])
        .args(["--docker-url", &bed.swarm.dockerd().host_url()])
        .env("XLB_LOG", "warn");
    let process = spawn_logged(command, &log)?;
    wait_for_200(bed, ready_at, "xlb", &log)?;
    Ok(Running {
        processes: vec![process],
        children: Vec::new(),
    })
}

/// `xlb controller` on the Swarm node, reading its engine, and `xlb proxy` on lb-00 with XDP,
/// fed by it over the segment with a token: the cluster's path, on the bed.
pub fn start_xlb_split(
    bed: &Bed,
    xlb: &Path,
    inputs: &ProxyInputs,
    ready_at: SocketAddr,
) -> Result<Running> {
    std::fs::create_dir_all(&inputs.dir)?;
    let config = inputs.dir.join("config.toml");
    // `xlb proxy` applies `User`, and the seed's `nginx` has no account on a Debian host.
    let without_user: Vec<String> = xlb_config(inputs)
        .lines()
        .filter(|line| !line.trim_start().starts_with("User ="))
        .map(str::to_owned)
        .collect();
    std::fs::write(&config, without_user.join("\n"))?;
    let token = inputs.dir.join("token");
    std::fs::write(&token, "bench-controller-token\n")?;
    let controller_log = inputs.dir.join("controller.out");
    let mut controller = bed.node.netns.command(xlb);
    controller
        .arg("controller")
        .arg("--config")
        .arg(&config)
        .arg("--token-file")
        .arg(&token)
        .args(["--docker-url", &bed.swarm.dockerd().host_url()])
        .env("XLB_LOG", "warn");
    let controller = spawn_logged(controller, &controller_log)?;
    let log = inputs.dir.join("xlb.out");
    let mut command = pinned(&bed.lb.netns, inputs, xlb);
    command
        .arg("proxy")
        .arg("--config")
        .arg(&config)
        .args(["--interface", Segment::HOST_INTERFACE])
        .args([
            "--controller",
            &format!("http://{}:{}", bed.node.addr, crate::bed::ADMIN_PORT),
        ])
        .arg("--token-file")
        .arg(&token)
        .env("XLB_LOG", "warn");
    let proxy = spawn_logged(command, &log)?;
    wait_for_200(bed, ready_at, "xlb proxy", &log)?;
    Ok(Running {
        processes: vec![proxy, controller],
        children: Vec::new(),
    })
}

/// Kernel NAT in lb-00 while it lives: DNAT of the L4 port to the backend, MASQUERADE
/// towards it, forwarding on. Dropping it puts lb-00 back to a host that forwards nothing.
pub struct KernelNat<'a> {
    lb: &'a Netns,
}

impl<'a> KernelNat<'a> {
    pub fn start(bed: &'a Bed) -> Result<KernelNat<'a>> {
        let lb = &bed.lb.netns;
        let nat = KernelNat { lb };
        let listen = bed.l4_addr();
        let backend = bed.backend;
        let destination = backend.to_string();
        let backend_ip = backend.ip().to_string();
        let backend_port = backend.port().to_string();
        let listen_port = L4_PORT.to_string();
        let rules: [&[&str]; 2] = [
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                &listen.ip().to_string(),
                "-p",
                "tcp",
                "--dport",
                &listen_port,
                "-j",
                "DNAT",
                "--to-destination",
                &destination,
            ],
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-d",
                &backend_ip,
                "-p",
                "tcp",
                "--dport",
                &backend_port,
                "-j",
                "MASQUERADE",
            ],
        ];
        for rule in rules {
            lb.run("iptables", rule)?;
        }
        lb.run("iptables", &["-P", "FORWARD", "ACCEPT"])?;
        write_sysctls(lb, &[("net/ipv4/ip_forward", "1")])?;
        wait_for_200(bed, listen, "kernel NAT", Path::new("/dev/null"))?;
        Ok(nat)
    }
}

impl Drop for KernelNat<'_> {
    fn drop(&mut self) {
        let result = self
            .lb
            .run("iptables", &["-t", "nat", "-F"])
            .and_then(|_| set_router_off(self.lb));
        if let Err(error) = result {
            eprintln!("bench: removing the kernel NAT rules: {error:#}");
        }
    }
}

/// PIDs of `pid`'s children (nginx's workers), once they exist.
fn child_pids(pid: u32) -> Result<Vec<u32>> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    wait_until("nginx's worker to start", READY, || {
        let children: Vec<u32> = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {path}"))?
            .split_whitespace()
            .filter_map(|child| child.parse().ok())
            .collect();
        Ok((!children.is_empty()).then_some(children))
    })
}

/// nginx as Interlock's extension renders it for one service with one task: one worker, the
/// seed's rlimit, the headers Interlock sets upstream and the five it adds to responses.
pub fn nginx_config(inputs: &ProxyInputs) -> String {
    let dir = inputs.dir.display();
    let access_log = match inputs.access_log {
        AccessLog::Off => "access_log off;".to_owned(),
        AccessLog::File => format!("access_log {} main;", inputs.access_log_path().display()),
    };
    let listen = inputs.listen;
    let backend = inputs.backend;
    // Under callgrind nginx runs as one process: the one whose counters are zeroed and dumped
    // is then the one that serves.
    let master_process = match inputs.callgrind {
        Some(_) => "master_process off;\n",
        None => "",
    };
    format!(
        r#"daemon off;
{master_process}worker_processes 1;
worker_rlimit_nofile 65535;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{
    worker_connections {MAX_CONNECTIONS};
}}
http {{
    client_body_temp_path {dir}/client-body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    server_names_hash_bucket_size 128;
    client_max_body_size 1m;
    large_client_header_buffers 4 8k;
    log_format main '$remote_addr - $remote_user [$time_local] "$request" $status '
                    '$body_bytes_sent "$http_referer" "$http_user_agent" $request_id '
                    '"$upstream_addr" "$upstream_status" "$upstream_response_time"';
    {access_log}
    keepalive_timeout 75s;
    proxy_connect_timeout 600s;
    proxy_send_timeout 600s;
    proxy_read_timeout 600s;

    upstream up-{HOST} {{
        server {backend};
        keepalive 32;
    }}
    server {{
        listen {listen} default_server;
        return 503;
    }}
    server {{
        listen {listen};
        server_name {HOST};
        location / {{
            proxy_pass http://up-{HOST};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            add_header x-request-id $request_id always;
            add_header x-proxy-id $hostname always;
            add_header x-server-info "nginx/interlock-style" always;
            add_header x-upstream-addr $upstream_addr always;
            add_header x-upstream-response-time $upstream_response_time always;
        }}
    }}
}}
"#
    )
}

/// Descriptors valgrind keeps at the top of the open-file limit (12 in valgrind 3.19), with
/// room to spare.
const VALGRIND_RESERVED_FDS: u64 = 32;

/// HAProxy's `global` section, the same for both modes: one thread, the connection and file
/// limits, and the log (to standard output) when there is one; and the `maxconn` it sets.
fn haproxy_global(inputs: &ProxyInputs, access_log: AccessLog) -> (String, u64) {
    // valgrind keeps the top few descriptors of the limit for itself, and HAProxy refuses to
    // start when it cannot have all it asks for.
    let valgrinds = match inputs.callgrind {
        Some(_) => VALGRIND_RESERVED_FDS,
        None => 0,
    };
    let open_files = open_file_limit() - valgrinds;
    let maxconn = haproxy_maxconn(open_files);
    let log = match access_log {
        AccessLog::Off => "",
        AccessLog::File => "    log stdout format raw local0\n",
    };
    let global =
        format!("global\n    nbthread 1\n    maxconn {maxconn}\n    ulimit-n {open_files}\n{log}");
    (global, maxconn)
}

/// HAProxy in `mode http` with the same headers as nginx's config.
pub fn haproxy_http_config(inputs: &ProxyInputs) -> String {
    let (global, maxconn) = haproxy_global(inputs, inputs.access_log);
    let defaults_log = match inputs.access_log {
        AccessLog::Off => "",
        AccessLog::File => "    log global\n    option httplog\n",
    };
    let listen = inputs.listen;
    let backend = inputs.backend;
    format!(
        r#"{global}
defaults
    mode http
{defaults_log}    option http-keep-alive
    timeout connect 600s
    timeout client 75s
    timeout server 600s
    timeout http-keep-alive 75s
    timeout http-request 60s
    retries 2
    retry-on conn-failure empty-response response-timeout 502 503 504
    option redispatch

frontend http
    bind {listen}
    maxconn {maxconn}
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
    option forwardfor
    http-request set-header X-Real-IP %[src]
    http-request set-header X-Forwarded-Proto http
    http-response set-header x-request-id %[unique-id]
    http-response set-header x-proxy-id %[hostname]
    http-response set-header x-server-info haproxy/interlock-style
    http-response set-header x-upstream-addr %si:%sp
    http-response set-header x-upstream-response-time %Tr
    use_backend up-{HOST} if {{ req.hdr(host),field(1,:) -i {HOST} }}

backend up-{HOST}
    http-reuse safe
    server task-0 {backend}
"#
    )
}

/// HAProxy in `mode tcp` relaying the L4 port to the backend.
pub fn haproxy_tcp_config(inputs: &ProxyInputs) -> String {
    let (global, maxconn) = haproxy_global(inputs, AccessLog::Off);
    let listen = inputs.listen;
    let backend = inputs.backend;
    format!(
        r#"{global}
defaults
    mode tcp
    timeout connect 5s
    timeout client 75s
    timeout server 75s

listen l4
    bind {listen}
    maxconn {maxconn}
    server task-0 {backend}
"#
    )
}

/// The seed's config.toml, with what a bench run must change: the connection limit (see
/// [`MAX_CONNECTIONS`]), the access log, and the pid file kept out of the host's /var/run.
pub fn xlb_config(inputs: &ProxyInputs) -> String {
    let dir = inputs.dir.display();
    let access_log = match inputs.access_log {
        AccessLog::Off => PathBuf::from("off"),
        AccessLog::File => inputs.access_log_path(),
    };
    format!(
        r#"ListenAddr = ":{admin}"
DockerURL = "unix:///var/run/docker.sock"
PollInterval = "3s"

[Extensions]
  [Extensions.default]
    Image = "docker/ucp-interlock-extension:3.1.7"
    Args = []
    ServiceName = "interlock-ext"
    ProxyImage = "docker/ucp-interlock-proxy:3.1.7"
    ProxyArgs = []
    ProxyServiceName = "interlock-proxy"
    ProxyConfigPath = "/etc/nginx/nginx.conf"
    ProxyReplicas = 1
    PublishMode = "host"
    PublishedPort = {port}
    TargetPort = 80
    PublishedSSLPort = 443
    TargetSSLPort = 443
    [Extensions.default.Config]
      User = "nginx"
      PidPath = "{dir}/proxy.pid"
      WorkerProcesses = 1
      RlimitNoFile = 65535
      MaxConnections = {MAX_CONNECTIONS}
      AccessLogPath = "{access_log}"
"#,
        admin = crate::bed::ADMIN_PORT,
        port = inputs.listen.port(),
        access_log = access_log.display(),
    )
}
