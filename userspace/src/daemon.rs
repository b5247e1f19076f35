//! `xlb run` and `xlb proxy`: load the config, then run the L7 proxy, the admin endpoint and the
//! XDP dataplane, fed by discovery in the same process (`run`) or by controllers (`proxy`),
//! until SIGINT or SIGTERM, and detach XDP on the way out.

use std::{
    net::{Ipv4Addr, SocketAddr},
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use tokio::{net::TcpListener, signal::unix::SignalKind};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState},
    cli::{NodeArgs, ProxyArgs, RunArgs},
    config::{self, Config, Extension, ProxyConfig, WorkerProcesses},
    controller_feed::{ControllerFeed, ControllerUrl},
    dataplane::Dataplane,
    discovery::Discovery,
    extension::{l7_ports, proxy_settings, route_settings, select_extension},
    l4::{
        conntrack::MIN_SWEEP_INTERVAL,
        service::{Listener, Protocol},
        settings::{check_snat_ports, parse_local_ports, L4Settings},
        steering::Steering,
    },
    logging,
    node::Node,
    privileges,
    proxy::{self, BoundWorkers, CertificateStore, ProxyPorts, Router, TlsTermination},
    snapshot,
    tls_policy::TlsPolicy,
};

/// Where the kernel says which source ports its own connections use.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// `WorkerProcesses` when the config has none: Interlock's nginx template writes 1.
const DEFAULT_WORKER_PROCESSES: WorkerProcesses = WorkerProcesses::Count(NonZeroUsize::MIN);
/// How often certificate secrets are checked for changes.
const CERTIFICATE_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Where a node's snapshots come from.
enum SnapshotSource {
    /// Discovery in this process (`xlb run`), from the config's or this Docker URL.
    Docker { docker_url: Option<String> },
    /// Controllers (`xlb proxy`).
    Controllers {
        controllers: Vec<ControllerUrl>,
        token_file: Option<PathBuf>,
    },
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    run_node(
        &args.node,
        SnapshotSource::Docker {
            docker_url: args.docker_url,
        },
    )
}

pub fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let controllers = args
        .controller
        .iter()
        .map(|url| ControllerUrl::parse(url))
        .collect::<anyhow::Result<Vec<_>>>()?;
    run_node(
        &args.node,
        SnapshotSource::Controllers {
            controllers,
            token_file: args.token_file,
        },
    )
}

fn run_node(args: &NodeArgs, source: SnapshotSource) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    let (name, extension) = select_extension(&config, args.extension.as_deref())?;
    if let Some(path) = &extension.proxy.error_log_path {
        logging::log_errors_to(path)?;
    }
    for key in &config.ignored_keys {
        tracing::info!(key = %key, "config key not used by xlb: ignored");
    }
    log_unavailable_tls_names(&extension.proxy);
    tracing::info!(extension = %name, config = %args.config.display(), "configuration loaded");
    apply_process_limits(&extension.proxy)?;
    let _pid_file = extension
        .proxy
        .pid_path
        .as_deref()
        .map(PidFile::create)
        .transpose()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, &config, &extension, source))
}

fn apply_process_limits(proxy: &ProxyConfig) -> anyhow::Result<()> {
    if let Some(limit) = proxy.rlimit_nofile {
        raise_open_file_limit(limit)?;
    }
    Ok(())
}

/// `RlimitNoFile`: like nginx's `worker_rlimit_nofile`, both limits when allowed; without
/// CAP_SYS_RESOURCE the hard limit cannot be raised, so the soft one goes as high as it allows.
fn raise_open_file_limit(limit: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if setrlimit(Resource::RLIMIT_NOFILE, limit, limit).is_ok() {
        tracing::info!(limit, "open-file limit set (RlimitNoFile)");
        return Ok(());
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    let soft = limit.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).with_context(|| {
        format!("RlimitNoFile = {limit}: setrlimit(RLIMIT_NOFILE, {soft}) failed")
    })?;
    tracing::warn!(
        requested = limit,
        soft,
        hard,
        "RlimitNoFile above the hard limit, which this process may not raise: using the hard limit"
    );
    Ok(())
}

async fn serve(
    args: &NodeArgs,
    config: &Config,
    extension: &Extension,
    source: SnapshotSource,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let l7_ports = l7_ports(extension);
    let (dataplane, steering) = match (args.interface.as_slice(), args.no_xdp) {
        (interfaces, false) if !interfaces.is_empty() => {
            let admin_port = config.listen_addr.map(|addr| addr.port());
            let dataplane = start_dataplane(
                interfaces, &l7_ports, admin_port, &config.l4, &tasks, &shutdown,
            )?;
            let steering = Steering::start(dataplane.clone(), interfaces, &config.l4.addresses)
                .await
                .context("starting the L4 fast path")?;
            let shielded = steering.addresses();
            dataplane
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .shield(shielded)?;
            if config.l4.shield && !shielded.is_empty() {
                tracing::info!(
                    addresses = ?shielded,
                    "shield: TCP and UDP to these addresses on ports nothing serves are dropped"
                );
            }
            (Some(dataplane), Some(steering))
        }
        _ => {
            tracing::info!("running proxy-only: no XDP program attached (--no-xdp)");
            (None, None)
        }
    };

    let proxy_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, extension.published_port));
    let (https, certificates) = match extension.published_ssl_port {
        Some(port) => {
            let (https, certificates) = tls_termination(port, &extension.proxy)?;
            tasks.spawn(
                Arc::clone(&certificates).watch(CERTIFICATE_POLL_INTERVAL, shutdown.clone()),
            );
            (Some(https), Some(certificates))
        }
        None => (None, None),
    };
    let workers = extension
        .proxy
        .worker_processes
        .unwrap_or(DEFAULT_WORKER_PROCESSES)
        .resolve();
    let ports = ProxyPorts {
        http: proxy_addr,
        https,
    };
    let proxy_workers = BoundWorkers::bind(&ports, workers)?;
    let worker_stats = proxy_workers.stats();
    let router = match extension.published_ssl_port {
        Some(port) => Router::with_https_port(port),
        None => Router::new(),
    };
    let settings = proxy_settings(&extension.proxy, proxy_id())?;
    tracing::info!(
        addr = %proxy_addr,
        ssl_addr = ?ports.https.as_ref().map(|(addr, _)| addr),
        workers,
        proxy_id = %settings.proxy_id,
        "L7 proxy listening"
    );
    let proxy_running = proxy_workers.start(router.clone(), settings, shutdown.clone())?;
    tasks.spawn(log_failure("proxy", proxy_running.wait()));

    let (publish, snapshots) = snapshot::channel();
    let takes_user = matches!(source, SnapshotSource::Controllers { .. });
    let (feed, controllers): (BoxFuture<'static, ()>, _) = match source {
        SnapshotSource::Docker { docker_url } => {
            let route_settings = route_settings(extension);
            if let Some(cluster) = &route_settings.service_cluster {
                tracing::info!(%cluster, "serving only the services of this cluster (ServiceCluster)");
            }
            let discovery = Discovery {
                docker_url: docker_url.unwrap_or_else(|| config.docker_url.clone()),
                interval: config.poll_interval,
                route_settings,
                reserved_ports: l7_ports,
            };
            (Box::pin(discovery.run(publish, shutdown.clone())), None)
        }
        SnapshotSource::Controllers {
            controllers,
            token_file,
        } => {
            let token = token_file.as_deref().map(read_token).transpose()?;
            let urls: Vec<&str> = controllers.iter().map(|url| url.text.as_str()).collect();
            tracing::info!(controllers = ?urls, "route snapshots from the controllers");
            let feed = ControllerFeed::new(controllers, token);
            let status = feed.status();
            (Box::pin(feed.run(publish, shutdown.clone())), Some(status))
        }
    };

    let state = Arc::new(AdminState {
        routes: ArcSwap::default(),
        l4_routes: ArcSwap::default(),
        dataplane,
        proxy_workers: worker_stats,
        snapshot: Mutex::default(),
        controllers,
    });
    if let Some(addr) = config.listen_addr {
        let listener = bind(addr, "the admin endpoint (ListenAddr)").await?;
        tracing::info!(%addr, "admin endpoint listening: /health /routes /stats");
        tasks.spawn(admin::serve(listener, state.clone(), shutdown.clone()));
    }
    // Everything that needs root is done: XDP attached, ports bound, files open.
    match &extension.proxy.user {
        Some(user) if takes_user => {
            let dropped = privileges::drop_to(user)?;
            tracing::info!(
                user = %dropped.user,
                uid = dropped.uid,
                gid = dropped.gid,
                "running as User, without capabilities"
            );
        }
        Some(user) => tracing::info!(
            user = %user,
            "User is applied by `xlb proxy`; `xlb run` keeps root, as it reads the Docker socket"
        ),
        None => {}
    }
    tasks.spawn(feed);
    let node = Node {
        router,
        certificates,
        state,
        steering,
        refresh: config.poll_interval,
    };
    tasks.spawn(node.run(snapshots, shutdown.clone()));

    wait_for_termination().await?;
    tracing::info!("shutting down: draining connections");
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    tracing::info!("stopped; XDP program detached");
    Ok(())
}

/// Loads and attaches the XDP program. The shield leaves the admin port (`admin_port`) and
/// the node's ephemeral ports open besides the configured ones.
fn start_dataplane(
    interfaces: &[String],
    l7_ports: &[u16],
    admin_port: Option<u16>,
    l4: &L4Settings,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Mutex<Dataplane>>> {
    let local_ports = std::fs::read_to_string(LOCAL_PORT_RANGE)
        .with_context(|| format!("reading {LOCAL_PORT_RANGE}"))?;
    check_snat_ports(l4.snat_ports, &local_ports).map_err(anyhow::Error::msg)?;
    let mut l4 = l4.clone();
    l4.local_ports = Some(parse_local_ports(&local_ports).map_err(anyhow::Error::msg)?);
    l4.open_ports.extend(admin_port.map(|port| Listener {
        port,
        protocol: Protocol::Tcp,
    }));
    let mut dataplane = Dataplane::load_with(&l4)?;
    let forwarder = dataplane.forward_logs(log::logger())?;
    tasks.spawn(
        shutdown
            .clone()
            .run_until_cancelled_owned(log_failure("XDP log forwarding", forwarder.run())),
    );
    for interface in interfaces {
        let mode = dataplane
            .attach(interface)
            .with_context(|| format!("attaching the XDP program to {interface}"))?;
        tracing::info!(interface, ?mode, "XDP program attached");
    }
    dataplane.set_l7_ports(l7_ports)?;
    tracing::info!(?l7_ports, "L7 ports passed to the proxy");
    let dataplane = Arc::new(Mutex::new(dataplane));
    tasks.spawn(
        shutdown
            .clone()
            .run_until_cancelled_owned(sweep_connection_table(dataplane.clone())),
    );
    Ok(dataplane)
}

/// Sweeps the connection table when its schedule says (`conntrack::SweepSchedule`: as often
/// as the table's growth needs), off the async workers (a full table takes milliseconds to
/// read).
async fn sweep_connection_table(dataplane: Arc<Mutex<Dataplane>>) {
    let mut wait = MIN_SWEEP_INTERVAL;
    loop {
        tokio::time::sleep(wait).await;
        let dataplane = dataplane.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let mut dataplane = dataplane
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let sweep = dataplane.sweep_flows();
            (sweep, dataplane.connection_table().next_sweep_in)
        })
        .await;
        wait = match &swept {
            Ok((Ok(_), next)) => *next,
            _ => MIN_SWEEP_INTERVAL,
        };
        match swept {
            Ok((Ok(sweep), _)) if sweep.expired_flows() + sweep.stale_half_pairs() > 0 => {
                tracing::debug!(
                    expired_flows = sweep.expired_flows(),
                    stale_half_pairs = sweep.stale_half_pairs(),
                    entries = sweep.summary().entries,
                    next_in_ms = wait.as_millis() as u64,
                    "connection tables swept"
                )
            }
            Ok((Ok(_), _)) => {}
            Ok((Err(error), _)) => {
                tracing::warn!(error = %error, "sweeping the connection table failed")
            }
            Err(error) => tracing::warn!(error = %error, "the connection-table sweep panicked"),
        }
    }
}

/// The controllers' token in `path`, without surrounding whitespace (a secret file often ends
/// in a newline).
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        path.display()
    );
    Ok(token.to_owned())
}

/// The SSL port (`PublishedSSLPort`): TLS as `SSLProtocols`/`SSLCiphers` say, certificates from
/// the secrets directory.
fn tls_termination(
    port: u16,
    proxy_config: &ProxyConfig,
) -> anyhow::Result<((SocketAddr, TlsTermination), Arc<CertificateStore>)> {
    let policy = TlsPolicy::new(
        proxy_config.ssl_protocols.as_ref(),
        proxy_config.ssl_ciphers.as_ref(),
    );
    let secrets_dir = proxy_config
        .secrets_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(proxy::DEFAULT_SECRETS_DIR));
    let certificates = CertificateStore::new(&secrets_dir, policy.crypto_provider());
    let termination = TlsTermination::new(&policy, Arc::clone(&certificates))
        .context("SSLProtocols and SSLCiphers leave no usable TLS configuration")?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    tracing::info!(%addr, secrets_dir = %secrets_dir.display(), "TLS termination configured");
    Ok(((addr, termination), certificates))
}

/// Names in `SSLProtocols`/`SSLCiphers` that OpenSSL knows and rustls does not implement.
fn log_unavailable_tls_names(proxy_config: &ProxyConfig) {
    let protocols = proxy_config
        .ssl_protocols
        .iter()
        .flat_map(|p| &p.unavailable);
    for name in protocols {
        tracing::warn!(protocol = %name, "SSLProtocols: not implemented by rustls, not offered");
    }
    let ciphers = proxy_config.ssl_ciphers.iter().flat_map(|c| &c.unavailable);
    for name in ciphers {
        tracing::warn!(cipher = %name, "SSLCiphers: not implemented by rustls, not offered");
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} on {addr}"))
}

async fn log_failure(
    what: &'static str,
    task: impl std::future::Future<Output = Result<(), impl Into<anyhow::Error>>>,
) {
    if let Err(error) = task.await {
        tracing::error!(error = format!("{:#}", error.into()), "{what} stopped");
    }
}

pub async fn wait_for_termination() -> anyhow::Result<()> {
    let mut interrupt = tokio::signal::unix::signal(SignalKind::interrupt())
        .context("installing SIGINT handler")?;
    let mut terminate = tokio::signal::unix::signal(SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// `x-proxy-id`: the host name, as Interlock's proxy reports it.
fn proxy_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "xlb".to_owned())
}

/// `PidPath`: holds this process's id while it runs.
struct PidFile {
    path: PathBuf,
}

impl PidFile {
    fn create(path: &Path) -> anyhow::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing the pid file {} (PidPath)", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|content| content.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
