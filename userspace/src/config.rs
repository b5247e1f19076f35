//! Interlock's `config.toml`, accepted as it is (skeleton: interface only, parser to come).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

/// The parts of an Interlock configuration xlb acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `ListenAddr`: where the admin endpoint listens (`":8080"` means all addresses, port 8080).
    pub listen_addr: Option<SocketAddr>,
    /// `DockerURL`: `unix:///path` or `tcp://host:port`.
    pub docker_url: String,
    /// `PollInterval`: how often Swarm is polled.
    pub poll_interval: Duration,
    /// `[Extensions.<name>]`, by name.
    pub extensions: BTreeMap<String, Extension>,
    /// Keys present in the file that xlb does not act on, as dotted paths in file order
    /// (`Extensions.default.Image`).
    pub ignored_keys: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    Host,
    Ingress,
}

/// One `[Extensions.<name>]` table: a proxy deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct Extension {
    pub publish_mode: PublishMode,
    /// `PublishedPort`: the proxy's HTTP port on the load-balancer node.
    pub published_port: u16,
    /// `PublishedSSLPort`.
    pub published_ssl_port: Option<u16>,
    /// `[Extensions.<name>.Config]`.
    pub proxy: ProxyConfig,
}

/// `[Extensions.<name>.Config]`: the proxy's own settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProxyConfig {
    pub user: Option<String>,
    pub pid_path: Option<PathBuf>,
    pub rlimit_nofile: Option<u64>,
    pub max_connections: Option<usize>,
}
