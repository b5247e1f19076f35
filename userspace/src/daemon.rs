//! `xlb run` and `xlb proxy`: load the config, then run the L7 proxy, the admin endpoint and the
//! XDP dataplane, fed by discovery in the same process (`run`) or by controllers (`proxy`),
//! until SIGINT or SIGTERM, and detach XDP on the way out.

use std::{
    net::SocketAddr,
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
    controller_feed::{self, ControllerFeed, ControllerUrl},
    dataplane::{Attachment, Dataplane},
    discovery::Discovery,
    extension::{l7_ports, proxy_settings, route_settings, select_extension},
    handover::{self, Instance},
    l4::{
        conntrack::MIN_SWEEP_INTERVAL,
        service::{Listener, Protocol},
        settings::{check_snat_ports, parse_local_ports, L4Settings},
        steering::Steering,
    },
    logging,
    node::Node,
    pins::Pins,
    privileges,
    proxy::{self, BoundWorkers, CertificateStore, ProxyPorts, Router, TlsTermination},
    snapshot,
    tls_policy::TlsPolicy,
};

/// Where the kernel says which source ports its own connections use.
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// `WorkerProcesses` when the config has none: Interlock's nginx template writes 1.
const DEFAULT_WORKER_PROCESSES: WorkerProcesses = WorkerProcesses::Count(NonZeroUsize::MIN);
/// How long a process taking over waits for its first route snapshot before giving up (and
/// leaving the running one in place).
const TAKEOVER_ROUTES_WAIT: Duration = Duration::from_secs(60);
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
    let urls = if args.controllers_on_managers {
        controller_feed::controllers_on_managers(&args.node.config)?
    } else {
        args.controller.clone()
    };
    let controllers = urls
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
    runtime.block_on(serve(args, &config, (&name, &extension), source))
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
    (extension_name, extension): (&str, &Extension),
    source: SnapshotSource,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let instance = Instance::new(&args.config, &args.interface, extension_name)?;
    let predecessor = instance.running_owner();
    if let Some(pid) = predecessor {
        tracing::info!(
            pid,
            "taking over from the running xlb once routes are applied"
        );
    }
    if let Err(error) = handover::migrate_queued_connections() {
        tracing::warn!(
            error = format!("{error:#}"),
            "connections queued on this process's listeners when it hands over will be reset"
        );
    }

    let l7_ports = l7_ports(extension);
    let (dataplane, steering, pins) = match (args.interface.as_slice(), args.no_xdp) {
        (interfaces, false) if !interfaces.is_empty() => {
            let pins = Pins::open(&args.bpf_dir, instance.name())?;
            let admin_port = config.listen_addr.map(|addr| addr.port());
            let dataplane = start_dataplane(
                interfaces, &pins, &l7_ports, admin_port, &config.l4, &tasks, &shutdown,
            )?;
            let steering = Steering::start(dataplane.clone(), interfaces, &config.l4.addresses)
                .await
                .context("starting the L4 fast path")?;
            let shielded = steering.addresses();
            lock(&dataplane).shield(shielded)?;
            if config.l4.shield && !shielded.is_empty() {
                tracing::info!(
                    addresses = ?shielded,
                    "shield: TCP and UDP to these addresses on ports nothing serves are dropped"
                );
            }
            (Some(dataplane), Some(steering), Some(pins))
        }
        _ => {
            tracing::info!("running proxy-only: no XDP program attached (--no-xdp)");
            (None, None, None)
        }
    };
    let taking_over = predecessor.is_some()
        || dataplane
            .as_ref()
            .is_some_and(|dataplane| lock(dataplane).is_taking_over());

    let proxy_addr = proxy::any_address(extension.published_port);
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
    let router = match extension.published_ssl_port {
        Some(port) => Router::with_https_port(port),
        None => Router::new(),
    };

    let (publish, snapshots) = snapshot::channel();
    let takes_user = matches!(source, SnapshotSource::Controllers { .. });
    let (feed, controllers, discovery): (BoxFuture<'static, ()>, _, _) = match source {
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
                reads: Arc::default(),
            };
            let reads = Arc::clone(&discovery.reads);
            (
                Box::pin(discovery.run(publish, shutdown.clone())),
                None,
                Some(reads),
            )
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
            (
                Box::pin(feed.run(publish, shutdown.clone())),
                Some(status),
                None,
            )
        }
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
    // Bound before routes are read, so that a port in use fails the start at once. During a
    // handover the listeners join the running process's (SO_REUSEPORT) here: the connections
    // the kernel gives them wait in their queues until the workers start, and move to the
    // running process's listeners if this one gives up (tcp_migrate_req).
    let proxy_workers = BoundWorkers::bind(&ports, workers)?;
    let state = Arc::new(AdminState {
        routes: ArcSwap::default(),
        l4_routes: ArcSwap::default(),
        dataplane: dataplane.clone(),
        router: router.clone(),
        proxy_workers: proxy_workers.stats(),
        snapshot: Mutex::default(),
        controllers,
        discovery,
        tls_handshakes: ports
            .https
            .as_ref()
            .map(|(_, termination)| termination.handshakes()),
    });
    tasks.spawn(feed);
    let (applied, mut applied_version) = tokio::sync::watch::channel(0);
    let node = Node {
        router: router.clone(),
        certificates,
        state: state.clone(),
        steering,
        refresh: config.poll_interval,
        applied,
    };
    tasks.spawn(node.run(snapshots, shutdown.clone()));

    if taking_over {
        // The running process serves until this one has routes: a newcomer without them
        // would answer its share of requests with 503 and drop its share of new flows.
        tokio::time::timeout(
            TAKEOVER_ROUTES_WAIT,
            applied_version.wait_for(|version| *version > 0),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "no route snapshot within {TAKEOVER_ROUTES_WAIT:?}: not taking over, the \
                     running xlb goes on serving"
            )
        })?
        .context("the node stopped before applying routes")?;
        if let (Some(dataplane), Some(pins)) = (&dataplane, &pins) {
            lock(dataplane).take_over(pins)?;
            tracing::info!("XDP program replaced on every interface; connection tables kept");
        }
    }

    let settings = proxy_settings(&extension.proxy, proxy_id())?;
    tracing::info!(
        addr = %proxy_addr,
        ssl_addr = ?ports.https.as_ref().map(|(addr, _)| addr),
        workers,
        proxy_id = %settings.proxy_id,
        "L7 proxy listening"
    );
    let proxy_running = proxy_workers.start(router, settings, shutdown.clone())?;
    tasks.spawn(log_failure("proxy", proxy_running.wait()));
    if let Some(addr) = config.listen_addr {
        let listener = bind_admin(addr)?;
        tracing::info!(%addr, "admin endpoint listening: /health /routes /stats");
        tasks.spawn(admin::serve(listener, state, shutdown.clone()));
    }
    instance.claim()?;
    handover::notify_service_manager();
    // Everything that needs root is done: XDP attached, ports bound, files open.
    match &extension.proxy.user {
        Some(user) if takes_user => {
            let mut owned = vec![instance.owner_file()];
            owned.extend(pins.as_ref().map(Pins::dir));
            privileges::give_to(user, &owned)?;
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

    let successor = tokio::select! {
        terminated = wait_for_termination() => {
            terminated?;
            None
        }
        successor = instance.superseded() => Some(successor),
    };
    match successor {
        Some(pid) => tracing::info!(pid, "replaced by a new xlb: draining connections"),
        None => tracing::info!("shutting down: draining connections"),
    }
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    if successor.is_none() {
        if let Some(pins) = &pins {
            pins.remove();
        }
        instance.release();
        tracing::info!("stopped; XDP program detached");
    } else {
        tracing::info!("stopped; the XDP program and connection tables are the new xlb's");
    }
    Ok(())
}

fn lock(dataplane: &Mutex<Dataplane>) -> std::sync::MutexGuard<'_, Dataplane> {
    dataplane
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Loads and attaches the XDP program. The shield leaves the admin port (`admin_port`) and
/// the node's ephemeral ports open besides the configured ones.
fn start_dataplane(
    interfaces: &[String],
    pins: &Pins,
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
    let mut dataplane = Dataplane::load_pinned(&l4, Some(pins))?;
    let forwarder = dataplane.forward_logs(log::logger())?;
    tasks.spawn(
        shutdown
            .clone()
            .run_until_cancelled_owned(log_failure("XDP log forwarding", forwarder.run())),
    );
    for interface in interfaces {
        match dataplane
            .attach_pinned(interface, pins)
            .with_context(|| format!("attaching the XDP program to {interface}"))?
        {
            Attachment::Attached(mode) => tracing::info!(interface, ?mode, "XDP program attached"),
            Attachment::TakingOver => tracing::info!(
                interface,
                "the previous xlb's XDP program runs here: replaced once routes are applied"
            ),
        }
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
    let addr = proxy::any_address(port);
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

/// The admin endpoint's listener, beside a running process's during a handover
/// (`SO_REUSEPORT`, as the proxy's).
fn bind_admin(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = proxy::bind_reuseport(addr)
        .with_context(|| format!("binding the admin endpoint (ListenAddr) on {addr}"))?;
    Ok(TcpListener::from_std(listener)?)
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
