//! `xlb run`: loads the config, then runs discovery, the L7 proxy, the admin endpoint and the XDP
//! dataplane until SIGINT or SIGTERM, and detaches XDP on the way out.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use tokio::{net::TcpListener, signal::unix::SignalKind};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState},
    cli::RunArgs,
    config::{self, Config, Extension, ProxyConfig},
    dataplane::Dataplane,
    logging,
    proxy::{self, ProxySettings, Router},
    routes::{route_table, RouteTable},
    swarm::Swarm,
};

/// Where the access log goes without `AccessLogPath`: standard output, as Interlock's proxy
/// container logs it.
const DEFAULT_ACCESS_LOG: &str = "/dev/stdout";

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    let (name, extension) = select_extension(&config, args.extension.as_deref())?;
    if let Some(path) = &extension.proxy.error_log_path {
        logging::log_errors_to(path)?;
    }
    for key in &config.ignored_keys {
        tracing::info!(key = %key, "config key not used by xlb: ignored");
    }
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
    runtime.block_on(serve(&args, &config, &extension))
}

/// The `[Extensions.<name>]` to serve: the one asked for, else the only one, else `default`.
fn select_extension(config: &Config, wanted: Option<&str>) -> anyhow::Result<(String, Extension)> {
    let names = || {
        config
            .extensions
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let name = match wanted {
        Some(name) => name.to_owned(),
        None if config.extensions.len() == 1 => {
            config.extensions.keys().next().cloned().unwrap_or_default()
        }
        None => "default".to_owned(),
    };
    match config.extensions.get(&name) {
        Some(extension) => Ok((name, extension.clone())),
        None if config.extensions.is_empty() => Ok((name, Extension::default())),
        None => bail!(
            "the config has no [Extensions.{name}] (it has: {}); pick one with --extension",
            names()
        ),
    }
}

fn apply_process_limits(proxy: &ProxyConfig) -> anyhow::Result<()> {
    if let Some(limit) = proxy.rlimit_nofile {
        raise_open_file_limit(limit)?;
    }
    if let Some(user) = &proxy.user {
        tracing::info!(
            user = %user,
            "User is parsed but not applied yet: xlb keeps the privileges it needs for XDP"
        );
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

async fn serve(args: &RunArgs, config: &Config, extension: &Extension) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    let l7_ports = [extension.published_port];
    let dataplane = match (&args.interface, args.no_xdp) {
        (Some(interface), false) => Some(start_dataplane(interface, &l7_ports, &tasks, &shutdown)?),
        _ => {
            tracing::info!("running proxy-only: no XDP program attached (--no-xdp)");
            None
        }
    };

    let proxy_addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, extension.published_port));
    let proxy_listener = bind(proxy_addr, "the proxy (PublishedPort)").await?;
    let router = Router::new();
    let settings = proxy_settings(&extension.proxy, proxy_id());
    tracing::info!(addr = %proxy_addr, proxy_id = %settings.proxy_id, "L7 proxy listening");
    tasks.spawn(log_failure(
        "proxy",
        proxy::serve(proxy_listener, router.clone(), settings, shutdown.clone()),
    ));

    let state = Arc::new(AdminState {
        routes: ArcSwap::default(),
        dataplane,
    });
    if let Some(addr) = config.listen_addr {
        let listener = bind(addr, "the admin endpoint (ListenAddr)").await?;
        tracing::info!(%addr, "admin endpoint listening: /health /routes /stats");
        tasks.spawn(admin::serve(listener, state.clone(), shutdown.clone()));
    }

    let docker_url = args
        .docker_url
        .clone()
        .unwrap_or_else(|| config.docker_url.clone());
    tasks.spawn(discover(
        docker_url,
        config.poll_interval,
        router,
        state,
        shutdown.clone(),
    ));

    wait_for_termination().await?;
    tracing::info!("shutting down: draining connections");
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    tracing::info!("stopped; XDP program detached");
    Ok(())
}

/// The proxy's settings: the config's values where given, Interlock's defaults otherwise.
fn proxy_settings(config: &ProxyConfig, proxy_id: String) -> ProxySettings {
    let defaults = ProxySettings::default();
    let limits = &defaults.handler.limits;
    let upstream = &defaults.upstream;
    let mut settings = ProxySettings {
        proxy_id,
        max_connections: config.max_connections.unwrap_or(defaults.max_connections),
        drain_timeout: config.drain_timeout.unwrap_or(defaults.drain_timeout),
        access_log_path: Some(
            config
                .access_log_path
                .clone()
                .unwrap_or_else(|| DEFAULT_ACCESS_LOG.into()),
        ),
        ..defaults.clone()
    };
    settings.handler.limits.max_body_size = match config.client_max_body_size {
        None => limits.max_body_size,
        // nginx: "Setting size to 0 disables checking of client request body size."
        Some(0) => None,
        Some(size) => Some(size),
    };
    settings.handler.limits.keepalive_timeout =
        config.keepalive_timeout.unwrap_or(limits.keepalive_timeout);
    settings.handler.underscores_in_headers = config
        .underscores_in_headers
        .unwrap_or(defaults.handler.underscores_in_headers);
    settings.upstream.connect_timeout = config.connect_timeout.unwrap_or(upstream.connect_timeout);
    settings.upstream.send_timeout = config.send_timeout.unwrap_or(upstream.send_timeout);
    settings.upstream.read_timeout = config.read_timeout.unwrap_or(upstream.read_timeout);
    settings
}

fn start_dataplane(
    interface: &str,
    l7_ports: &[u16],
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<Arc<Mutex<Dataplane>>> {
    let mut dataplane = Dataplane::load()?;
    let forwarder = dataplane.forward_logs(log::logger())?;
    tasks.spawn(
        shutdown
            .clone()
            .run_until_cancelled_owned(log_failure("XDP log forwarding", forwarder.run())),
    );
    let mode = dataplane
        .attach(interface)
        .with_context(|| format!("attaching the XDP program to {interface}"))?;
    dataplane.set_l7_ports(l7_ports)?;
    tracing::info!(interface, ?mode, ?l7_ports, "XDP program attached");
    Ok(Arc::new(Mutex::new(dataplane)))
}

/// Polls Swarm every `interval` and applies route changes. When Docker cannot be reached the
/// last good table keeps serving.
async fn discover(
    docker_url: String,
    interval: Duration,
    router: Arc<Router>,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) {
    let mut swarm: Option<Swarm> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let connected = match swarm.take() {
            Some(connected) => connected,
            None => match Swarm::connect(&docker_url).await {
                Ok(connected) => {
                    tracing::info!(url = %docker_url, "connected to the Docker API");
                    connected
                }
                Err(error) => {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "discovery"
                    );
                    continue;
                }
            },
        };
        match connected.snapshot().await {
            Ok(snapshot) => {
                let table = route_table(&snapshot);
                let current = state.routes.load_full();
                if table != *current {
                    log_changes(&current, &table);
                    router.update(&table);
                    state.routes.store(Arc::new(table));
                }
                swarm = Some(connected);
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "discovery failed: keeping the last route table"
                );
            }
        }
    }
}

fn log_changes(old: &RouteTable, new: &RouteTable) {
    for (host, route) in &new.routes {
        if old.routes.get(host) != Some(route) {
            let endpoints: Vec<String> = route.endpoints.iter().map(ToString::to_string).collect();
            tracing::info!(host = %host, service = %route.service, endpoints = %endpoints.join(","), "route");
        }
    }
    for host in old
        .routes
        .keys()
        .filter(|host| !new.routes.contains_key(*host))
    {
        tracing::info!(host = %host, "route removed");
    }
    for rejected in new
        .rejected
        .iter()
        .filter(|rejected| !old.rejected.contains(rejected))
    {
        tracing::warn!(service = %rejected.service, reason = %rejected.reason, "service disabled");
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

async fn wait_for_termination() -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_proxy_keys_take_interlock_defaults() {
        let settings = proxy_settings(&ProxyConfig::default(), "lb-1".to_owned());
        assert_eq!(settings.proxy_id, "lb-1");
        assert_eq!(settings.max_connections, 1024);
        let limits = &settings.handler.limits;
        assert_eq!(limits.max_body_size, Some(1 << 20));
        assert_eq!(limits.keepalive_timeout, Duration::from_secs(75));
        assert!(!settings.handler.underscores_in_headers);
        assert_eq!(settings.upstream.connect_timeout, Duration::from_secs(600));
        assert_eq!(settings.upstream.send_timeout, Duration::from_secs(600));
        assert_eq!(settings.upstream.read_timeout, Duration::from_secs(600));
        assert_eq!(settings.drain_timeout, Duration::from_secs(30));
        assert_eq!(settings.access_log_path, Some(PathBuf::from("/dev/stdout")));
    }

    #[test]
    fn proxy_keys_reach_the_proxy_settings() {
        let config = ProxyConfig {
            max_connections: Some(10),
            connect_timeout: Some(Duration::from_secs(1)),
            send_timeout: Some(Duration::from_secs(2)),
            read_timeout: Some(Duration::from_secs(3)),
            keepalive_timeout: Some(Duration::from_secs(4)),
            client_max_body_size: Some(512 << 10),
            underscores_in_headers: Some(true),
            access_log_path: Some("/var/log/xlb/access.log".into()),
            drain_timeout: Some(Duration::from_secs(5)),
            ..ProxyConfig::default()
        };
        let settings = proxy_settings(&config, "lb-1".to_owned());
        assert_eq!(settings.max_connections, 10);
        assert_eq!(settings.upstream.connect_timeout, Duration::from_secs(1));
        assert_eq!(settings.upstream.send_timeout, Duration::from_secs(2));
        assert_eq!(settings.upstream.read_timeout, Duration::from_secs(3));
        let limits = &settings.handler.limits;
        assert_eq!(limits.keepalive_timeout, Duration::from_secs(4));
        assert_eq!(limits.max_body_size, Some(512 << 10));
        assert!(settings.handler.underscores_in_headers);
        assert_eq!(
            settings.access_log_path,
            Some(PathBuf::from("/var/log/xlb/access.log"))
        );
        assert_eq!(settings.drain_timeout, Duration::from_secs(5));
    }

    #[test]
    fn client_max_body_size_zero_means_unlimited() {
        let config = ProxyConfig {
            client_max_body_size: Some(0),
            ..ProxyConfig::default()
        };
        let settings = proxy_settings(&config, "lb-1".to_owned());
        assert_eq!(settings.handler.limits.max_body_size, None);
    }
}
