//! Interlock's `config.toml`, accepted as it is.
//!
//! This module owns reading that file into [`Config`]: matching keys case-insensitively (Interlock's
//! Go decoder does, so real files spell them every which way), checking the values xlb acts on, and
//! reporting any problem as `file:line:col: what is wrong`. Keys xlb does not act on are accepted
//! whatever their type and listed in [`Config::ignored_keys`], so an Interlock file works unchanged.

use std::{
    collections::{BTreeMap, HashMap},
    fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use toml::{
    de::{DeInteger, DeString, DeTable, DeValue},
    Spanned,
};

use crate::l4::{
    maglev::RingSize,
    service::Listener,
    settings::{L4Settings, SnatPorts},
};
use crate::tls_policy;
use xlb_common::MAX_SNAT_ADDRS;

pub const DEFAULT_DOCKER_URL: &str = "unix:///var/run/docker.sock";
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(3);

/// The longest nginx-style timeout accepted (see `timeout`).
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
pub const DEFAULT_PUBLISHED_PORT: u16 = 80;

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
    /// `[L4]`: xlb's own table for the XDP L4 fast path (Interlock has none).
    pub l4: L4Settings,
    /// Keys present in the file that xlb does not act on, as dotted paths in file order
    /// (`Extensions.default.Image`).
    pub ignored_keys: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_addr: None,
            docker_url: DEFAULT_DOCKER_URL.to_owned(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            extensions: BTreeMap::new(),
            l4: L4Settings::default(),
            ignored_keys: Vec::new(),
        }
    }
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
    /// `ServiceCluster`: serve only the services labelled `com.docker.lb.service_cluster` with
    /// this name; unset serves every service.
    pub service_cluster: Option<String>,
    /// `[Extensions.<name>.Config]`.
    pub proxy: ProxyConfig,
}

impl Default for Extension {
    fn default() -> Self {
        Extension {
            publish_mode: PublishMode::Host,
            published_port: DEFAULT_PUBLISHED_PORT,
            published_ssl_port: None,
            service_cluster: None,
            proxy: ProxyConfig::default(),
        }
    }
}

/// `[Extensions.<name>.Config]`: the proxy's own settings. `None` means the key is absent and
/// the proxy's default applies.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProxyConfig {
    /// `WorkerProcesses` (nginx `worker_processes`): how many proxy workers serve the ports.
    pub worker_processes: Option<WorkerProcesses>,
    pub user: Option<String>,
    pub pid_path: Option<PathBuf>,
    pub rlimit_nofile: Option<u64>,
    pub max_connections: Option<usize>,
    /// `ConnectTimeout` (nginx `proxy_connect_timeout`).
    pub connect_timeout: Option<Duration>,
    /// `SendTimeout` (nginx `proxy_send_timeout`): longest stall writing to an upstream.
    pub send_timeout: Option<Duration>,
    /// `ReadTimeout` (nginx `proxy_read_timeout`): longest stall reading from an upstream.
    pub read_timeout: Option<Duration>,
    /// `KeepaliveTimeout` (nginx `keepalive_timeout`): idle client connections are closed after
    /// this; zero disables client keep-alive.
    pub keepalive_timeout: Option<Duration>,
    /// `ClientSendTimeout` (xlb's own key; nginx `send_timeout`): longest stall writing to a
    /// client.
    pub client_send_timeout: Option<Duration>,
    /// `ClientMaxBodySize` (nginx `client_max_body_size`) in bytes; `Some(0)` means unlimited,
    /// as in nginx.
    pub client_max_body_size: Option<u64>,
    /// `UnderscoresInHeaders` (nginx `underscores_in_headers`).
    pub underscores_in_headers: Option<bool>,
    /// `AccessLogPath`: where a line per request is appended.
    pub access_log_path: Option<PathBuf>,
    /// `ErrorLogPath`: where warnings and errors are appended.
    pub error_log_path: Option<PathBuf>,
    /// `DrainTimeout` (xlb's own key): how long requests to an endpoint that left the routes may
    /// still run.
    pub drain_timeout: Option<Duration>,
    /// `IPHash`: balance every service by client address unless its labels choose otherwise.
    pub ip_hash: bool,
    /// `SSLProtocols`: TLS versions offered on `PublishedSSLPort` (default: TLS 1.2 and 1.3).
    pub ssl_protocols: Option<tls_policy::Protocols>,
    /// `SSLCiphers`: cipher suites offered on `PublishedSSLPort` (default: all rustls has).
    pub ssl_ciphers: Option<tls_policy::Ciphers>,
    /// `SecretsDir`: where the Docker secrets named by `com.docker.lb.ssl_cert`/`ssl_key` are
    /// read from (default: `/run/secrets`).
    pub secrets_dir: Option<PathBuf>,
    /// `SSLBackendCAFile`: PEM certificates that `ssl_backend_tls_verify=required` trusts
    /// instead of the built-in web PKI roots.
    pub ssl_backend_ca_file: Option<PathBuf>,
}

/// `WorkerProcesses`: a count, or `"auto"` for one worker per CPU this process may run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerProcesses {
    Count(std::num::NonZeroUsize),
    Auto,
}

impl WorkerProcesses {
    /// The number of workers to start; `auto` counts the CPUs in this process's affinity mask,
    /// as nginx does.
    pub fn resolve(self) -> usize {
        match self {
            Self::Count(count) => count.get(),
            Self::Auto => std::thread::available_parallelism().map_or(1, Into::into),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the configuration", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A TOML syntax error, or a value xlb cannot use; `line` and `column` are 1-based.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Reads and parses the configuration file at `path`, naming it as given in errors.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let source = fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    parse(&source, &path.display().to_string())
}

/// Parses configuration text; `origin` names it in error messages.
pub fn parse(source: &str, origin: &str) -> Result<Config, ConfigError> {
    let reader = Reader {
        source,
        origin,
        ignored: Vec::new(),
    };
    let document = DeTable::parse(source).map_err(|error| {
        let offset = error.span().map_or(source.len(), |span| span.start);
        let message = error.message().lines().map(str::trim).collect::<Vec<_>>();
        reader.error_at(offset, message.join(" "))
    })?;
    reader.config(document.get_ref())
}

type Key<'i> = Spanned<DeString<'i>>;
type Value<'i> = Spanned<DeValue<'i>>;

/// One TOML table as written, with its dotted path. Case-insensitive matching makes one logical
/// table of all spellings (`[Extensions.a]` and `[extensions.b]`), so readers take a slice of these.
struct Section<'d, 'i> {
    path: String,
    table: &'d DeTable<'i>,
}

struct Entry<'d, 'i> {
    path: String,
    key: &'d Key<'i>,
    value: &'d Value<'i>,
}

impl Entry<'_, '_> {
    fn lowercase_name(&self) -> String {
        self.key.get_ref().to_ascii_lowercase()
    }
}

struct Reader<'s> {
    source: &'s str,
    origin: &'s str,
    /// Dotted paths of ignored keys with their offsets, since sections are read out of file order.
    ignored: Vec<(usize, String)>,
}

impl Reader<'_> {
    fn config(mut self, document: &DeTable) -> Result<Config, ConfigError> {
        let root = Section {
            path: String::new(),
            table: document,
        };
        let mut config = Config::default();
        let mut extension_sections = Vec::new();
        let mut l4_sections = Vec::new();
        for entry in self.entries(&[root])? {
            match entry.lowercase_name().as_str() {
                "listenaddr" => config.listen_addr = Some(self.listen_addr(&entry)?),
                "dockerurl" => config.docker_url = self.docker_url(&entry)?,
                "pollinterval" => config.poll_interval = self.poll_interval(&entry)?,
                "extensions" => extension_sections.push(self.section(&entry)?),
                "l4" => l4_sections.push(self.section(&entry)?),
                _ => self.ignore(&entry),
            }
        }
        config.extensions = self.extensions(&extension_sections)?;
        config.l4 = self.l4(&l4_sections)?;
        self.ignored.sort_by_key(|(offset, _)| *offset);
        config.ignored_keys = self.ignored.into_iter().map(|(_, path)| path).collect();
        Ok(config)
    }

    fn extensions(
        &mut self,
        sections: &[Section],
    ) -> Result<BTreeMap<String, Extension>, ConfigError> {
        let mut sections_by_name: BTreeMap<String, Vec<Section>> = BTreeMap::new();
        for entry in self.entries(sections)? {
            let section = self.section(&entry)?;
            let name = entry.key.get_ref().to_string();
            sections_by_name.entry(name).or_default().push(section);
        }
        sections_by_name
            .into_iter()
            .map(|(name, sections)| Ok((name, self.extension(&sections)?)))
            .collect()
    }

    fn extension(&mut self, sections: &[Section]) -> Result<Extension, ConfigError> {
        let mut extension = Extension::default();
        let mut proxy_sections = Vec::new();
        for entry in self.entries(sections)? {
            match entry.lowercase_name().as_str() {
                "publishmode" => extension.publish_mode = self.publish_mode(&entry)?,
                "publishedport" => extension.published_port = self.port(&entry)?,
                "publishedsslport" => extension.published_ssl_port = Some(self.port(&entry)?),
                "servicecluster" => {
                    extension.service_cluster = self
                        .optional_string(&entry, "a service cluster name")?
                        .map(Into::into)
                }
                "config" => proxy_sections.push(self.section(&entry)?),
                _ => self.ignore(&entry),
            }
        }
        extension.proxy = self.proxy(&proxy_sections)?;
        Ok(extension)
    }

    fn proxy(&mut self, sections: &[Section]) -> Result<ProxyConfig, ConfigError> {
        let mut proxy = ProxyConfig::default();
        for entry in self.entries(sections)? {
            match entry.lowercase_name().as_str() {
                "workerprocesses" => proxy.worker_processes = Some(self.worker_processes(&entry)?),
                "user" => proxy.user = self.optional_string(&entry, "a user name")?.map(Into::into),
                "pidpath" => {
                    proxy.pid_path = self.optional_string(&entry, "a path")?.map(Into::into)
                }
                "rlimitnofile" => proxy.rlimit_nofile = Some(self.positive_integer(&entry)?),
                "maxconnections" => proxy.max_connections = Some(self.positive_integer(&entry)?),
                "connecttimeout" => proxy.connect_timeout = Some(self.positive_timeout(&entry)?),
                "sendtimeout" => proxy.send_timeout = Some(self.positive_timeout(&entry)?),
                "readtimeout" => proxy.read_timeout = Some(self.positive_timeout(&entry)?),
                "keepalivetimeout" => proxy.keepalive_timeout = Some(self.timeout(&entry)?),
                "clientsendtimeout" => {
                    proxy.client_send_timeout = Some(self.positive_timeout(&entry)?)
                }
                "clientmaxbodysize" => proxy.client_max_body_size = Some(self.size(&entry)?),
                "underscoresinheaders" => {
                    proxy.underscores_in_headers = Some(self.boolean(&entry)?)
                }
                "accesslogpath" => {
                    proxy.access_log_path = self.optional_string(&entry, "a path")?.map(Into::into)
                }
                "errorlogpath" => {
                    proxy.error_log_path = self.optional_string(&entry, "a path")?.map(Into::into)
                }
                "draintimeout" => proxy.drain_timeout = Some(self.timeout(&entry)?),
                "iphash" => proxy.ip_hash = self.boolean(&entry)?,
                "sslprotocols" => {
                    proxy.ssl_protocols = Some(self.tls_list(&entry, tls_policy::parse_protocols)?)
                }
                "sslciphers" => {
                    proxy.ssl_ciphers = Some(self.tls_list(&entry, tls_policy::parse_ciphers)?)
                }
                "secretsdir" => {
                    proxy.secrets_dir = self.optional_string(&entry, "a path")?.map(Into::into)
                }
                "sslbackendcafile" => {
                    proxy.ssl_backend_ca_file =
                        self.optional_string(&entry, "a path")?.map(Into::into)
                }
                _ => self.ignore(&entry),
            }
        }
        Ok(proxy)
    }

    fn l4(&mut self, sections: &[Section]) -> Result<L4Settings, ConfigError> {
        let mut l4 = L4Settings::default();
        for entry in self.entries(sections)? {
            match entry.lowercase_name().as_str() {
                "addresses" => l4.addresses = self.ip_addresses(&entry)?,
                "snatports" => l4.snat_ports = self.port_range(&entry)?,
                "maglevringsize" => l4.ring_size = self.ring_size(&entry)?,
                "connectiontablesize" => l4.flow_entries = self.positive_integer(&entry)?,
                "maxservices" => l4.service_slots = self.positive_integer(&entry)?,
                "tcpidletimeout" => l4.tcp_idle = self.positive_duration(&entry)?,
                "tcphandshaketimeout" => l4.tcp_handshake = self.positive_duration(&entry)?,
                "tcpclosingtimeout" => l4.tcp_closing = self.positive_duration(&entry)?,
                "tcptimewaittimeout" => l4.tcp_time_wait = self.positive_duration(&entry)?,
                "udpidletimeout" => l4.udp_idle = self.positive_duration(&entry)?,
                "draintimeout" => l4.backend_drain = self.timeout(&entry)?,
                "shield" => l4.shield = self.boolean(&entry)?,
                "shieldopenports" => l4.open_ports = self.open_ports(&entry)?,
                "newflowspersecond" => {
                    l4.new_flows_per_second = Some(self.positive_integer(&entry)?)
                }
                "snataddresses" => l4.snat_addresses = self.snat_addresses(&entry)?,
                _ => self.ignore(&entry),
            }
        }
        Ok(l4)
    }

    /// The entries of one logical table in file order. The same key in two spellings is refused
    /// unless both are tables, which merge, because which one Interlock would use is unclear.
    fn entries<'d, 'i>(
        &self,
        sections: &[Section<'d, 'i>],
    ) -> Result<Vec<Entry<'d, 'i>>, ConfigError> {
        let mut entries: Vec<Entry> = sections
            .iter()
            .flat_map(|section| {
                section.table.iter().map(|(key, value)| Entry {
                    path: match section.path.as_str() {
                        "" => key.get_ref().to_string(),
                        parent => format!("{parent}.{}", key.get_ref()),
                    },
                    key,
                    value,
                })
            })
            .collect();
        entries.sort_by_key(|entry| entry.key.span().start);
        let mut first_offsets = HashMap::new();
        let values = entries
            .iter()
            .filter(|entry| !matches!(entry.value.get_ref(), DeValue::Table(_)));
        for entry in values {
            let offset = entry.key.span().start;
            if let Some(first) = first_offsets.insert(entry.lowercase_name(), offset) {
                let (line, column) = line_and_column(self.source, first);
                let message = format!(
                    "{}: set twice (keys are case-insensitive), first at {line}:{column}",
                    entry.path
                );
                return Err(self.error_at(offset, message));
            }
        }
        Ok(entries)
    }

    fn ignore(&mut self, entry: &Entry) {
        self.ignored
            .push((entry.key.span().start, entry.path.clone()));
    }

    fn section<'d, 'i>(&self, entry: &Entry<'d, 'i>) -> Result<Section<'d, 'i>, ConfigError> {
        match entry.value.get_ref() {
            DeValue::Table(table) => Ok(Section {
                path: entry.path.clone(),
                table,
            }),
            _ => Err(self.expected(entry, "a table")),
        }
    }

    fn listen_addr(&self, entry: &Entry) -> Result<SocketAddr, ConfigError> {
        const EXPECTED: &str = r#"a listen address like ":8080" or "127.0.0.1:8080""#;
        let text = self.string(entry, EXPECTED)?;
        parse_listen_addr(text).ok_or_else(|| self.expected(entry, EXPECTED))
    }

    fn docker_url(&self, entry: &Entry) -> Result<String, ConfigError> {
        const EXPECTED: &str = "a URL starting with unix:// or tcp://";
        let text = self.string(entry, EXPECTED)?;
        let has_address = ["unix://", "tcp://"].iter().any(|scheme| {
            text.strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty())
        });
        if has_address {
            Ok(text.to_owned())
        } else {
            Err(self.expected(entry, EXPECTED))
        }
    }

    fn poll_interval(&self, entry: &Entry) -> Result<Duration, ConfigError> {
        const EXPECTED: &str = r#"a duration like "3s""#;
        match parse_go_duration(self.string(entry, EXPECTED)?) {
            Ok(interval) if !interval.is_zero() => Ok(interval),
            Ok(_) | Err(DurationError::Negative) => {
                Err(self.expected(entry, "a duration greater than zero"))
            }
            Err(DurationError::Malformed) => Err(self.expected(entry, EXPECTED)),
        }
    }

    fn ip_addresses(&self, entry: &Entry) -> Result<Vec<IpAddr>, ConfigError> {
        const EXPECTED: &str = r#"a list of IP addresses like ["10.0.0.1"]"#;
        let DeValue::Array(items) = entry.value.get_ref() else {
            return Err(self.expected(entry, EXPECTED));
        };
        items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                match item.get_ref() {
                    DeValue::String(text) => text.parse().ok(),
                    _ => None,
                }
                .ok_or_else(|| {
                    let written = self.source.get(item.span()).unwrap_or("a multi-line value");
                    let message = format!(
                        "{}[{index}]: expected an IP address, found {written}",
                        entry.path
                    );
                    self.error_at(item.span().start, message)
                })
            })
            .collect()
    }

    /// `[L4] ShieldOpenPorts`: `["22/tcp", "7946/udp", ...]`.
    fn open_ports(&self, entry: &Entry) -> Result<Vec<Listener>, ConfigError> {
        const EXPECTED: &str = r#"a list of ports like ["22/tcp", "7946/udp"]"#;
        let DeValue::Array(items) = entry.value.get_ref() else {
            return Err(self.expected(entry, EXPECTED));
        };
        items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                match item.get_ref() {
                    DeValue::String(text) => Listener::parse(text),
                    _ => None,
                }
                .ok_or_else(|| {
                    let written = self.source.get(item.span()).unwrap_or("a multi-line value");
                    let message = format!(
                        "{}[{index}]: expected a port like \"22/tcp\" or \"7946/udp\", found {written}",
                        entry.path
                    );
                    self.error_at(item.span().start, message)
                })
            })
            .collect()
    }

    /// `[L4] SNATAddresses`: IPv4 and IPv6 (each family's backends take the addresses of
    /// theirs), at most what the program holds of each.
    fn snat_addresses(&self, entry: &Entry) -> Result<Vec<IpAddr>, ConfigError> {
        let addresses = self.ip_addresses(entry)?;
        let ipv6 = addresses.iter().filter(|addr| addr.is_ipv6()).count();
        for (family, count) in [("IPv4", addresses.len() - ipv6), ("IPv6", ipv6)] {
            if count > MAX_SNAT_ADDRS {
                let message = format!(
                    "{}: at most {MAX_SNAT_ADDRS} {family} SNAT addresses, found {count}",
                    entry.path
                );
                return Err(self.error_at(entry.value.span().start, message));
            }
        }
        Ok(addresses)
    }

    fn port_range(&self, entry: &Entry) -> Result<SnatPorts, ConfigError> {
        const EXPECTED: &str = r#"a port range like "61000-65535""#;
        let text = self.string(entry, EXPECTED)?;
        text.split_once('-')
            .and_then(|(first, last)| {
                SnatPorts::new(first.trim().parse().ok()?, last.trim().parse().ok()?)
            })
            .ok_or_else(|| self.expected(entry, EXPECTED))
    }

    fn ring_size(&self, entry: &Entry) -> Result<RingSize, ConfigError> {
        let expected = format!(
            "a prime between 3 and {} (65537 by default)",
            crate::l4::maglev::MAX_RING_SIZE
        );
        let integer = self.integer(entry, &expected)?;
        u64::from_str_radix(integer.as_str(), integer.radix())
            .ok()
            .and_then(|size| RingSize::new(size).ok())
            .ok_or_else(|| self.expected(entry, &expected))
    }

    fn positive_duration(&self, entry: &Entry) -> Result<Duration, ConfigError> {
        const EXPECTED: &str = r#"a duration like "1h""#;
        match parse_go_duration(self.string(entry, EXPECTED)?) {
            Ok(duration) if !duration.is_zero() => Ok(duration),
            Ok(_) | Err(DurationError::Negative) => {
                Err(self.expected(entry, "a duration greater than zero"))
            }
            Err(DurationError::Malformed) => Err(self.expected(entry, EXPECTED)),
        }
    }

    fn publish_mode(&self, entry: &Entry) -> Result<PublishMode, ConfigError> {
        const EXPECTED: &str = r#""host" or "ingress""#;
        let text = self.string(entry, EXPECTED)?;
        match text.to_ascii_lowercase().as_str() {
            "host" => Ok(PublishMode::Host),
            "ingress" => Ok(PublishMode::Ingress),
            _ => Err(self.expected(entry, EXPECTED)),
        }
    }

    fn port(&self, entry: &Entry) -> Result<u16, ConfigError> {
        const EXPECTED: &str = "a port number (1..=65535)";
        let integer = self.integer(entry, EXPECTED)?;
        u16::from_str_radix(integer.as_str(), integer.radix())
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| self.expected(entry, EXPECTED))
    }

    /// `SSLProtocols` or `SSLCiphers`: a string whose names must all be known.
    fn tls_list<T>(
        &self,
        entry: &Entry,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let text = self.string(entry, "a string")?;
        parse(text).map_err(|problem| {
            self.error_at(
                entry.value.span().start,
                format!("{}: {problem}", entry.path),
            )
        })
    }

    fn positive_integer<T: TryFrom<u64>>(&self, entry: &Entry) -> Result<T, ConfigError> {
        const EXPECTED: &str = "a positive integer";
        let integer = self.integer(entry, EXPECTED)?;
        u64::from_str_radix(integer.as_str(), integer.radix())
            .ok()
            .filter(|&number| number > 0)
            .and_then(|number| T::try_from(number).ok())
            .ok_or_else(|| self.expected(entry, EXPECTED))
    }

    /// A positive integer, or the string `"auto"` (any case), as nginx's `worker_processes`.
    fn worker_processes(&self, entry: &Entry) -> Result<WorkerProcesses, ConfigError> {
        const EXPECTED: &str = r#"a positive integer or "auto""#;
        match entry.value.get_ref() {
            DeValue::String(text) if text.eq_ignore_ascii_case("auto") => Ok(WorkerProcesses::Auto),
            DeValue::Integer(integer) => u64::from_str_radix(integer.as_str(), integer.radix())
                .ok()
                .and_then(|count| usize::try_from(count).ok())
                .and_then(std::num::NonZeroUsize::new)
                .map(WorkerProcesses::Count)
                .ok_or_else(|| self.expected(entry, EXPECTED)),
            _ => Err(self.expected(entry, EXPECTED)),
        }
    }

    /// nginx's time syntax, as Interlock writes it into nginx.conf: whole seconds as an integer
    /// (`600`), or a string such as `"600s"`, `"75s"`, `"1m30s"`, `"500ms"` or `"600"`.
    ///
    /// At most [`MAX_TIMEOUT`]: a deadline is the time now plus the timeout, and a timeout near
    /// `u64::MAX` seconds would overflow that sum in every connection that waits on it.
    fn timeout(&self, entry: &Entry) -> Result<Duration, ConfigError> {
        const EXPECTED: &str = r#"seconds (600) or an nginx time like "600s""#;
        let timeout = match entry.value.get_ref() {
            DeValue::Integer(integer) => u64::from_str_radix(integer.as_str(), integer.radix())
                .ok()
                .map(Duration::from_secs),
            DeValue::String(text) => parse_nginx_time(text),
            _ => None,
        };
        match timeout {
            None => Err(self.expected(entry, EXPECTED)),
            Some(timeout) if timeout > MAX_TIMEOUT => {
                Err(self.expected(entry, "a time of at most 365 days"))
            }
            Some(timeout) => Ok(timeout),
        }
    }

    fn positive_timeout(&self, entry: &Entry) -> Result<Duration, ConfigError> {
        match self.timeout(entry)? {
            timeout if timeout.is_zero() => Err(self.expected(entry, "a time greater than zero")),
            timeout => Ok(timeout),
        }
    }

    /// nginx's size syntax: bytes as an integer, or a string such as `"1m"`, `"512k"`, `"1g"`,
    /// `"1024"`.
    fn size(&self, entry: &Entry) -> Result<u64, ConfigError> {
        const EXPECTED: &str = r#"a size in bytes or like "1m", "512k""#;
        match entry.value.get_ref() {
            DeValue::Integer(integer) => u64::from_str_radix(integer.as_str(), integer.radix())
                .map_err(|_| self.expected(entry, EXPECTED)),
            DeValue::String(text) => {
                parse_nginx_size(text).ok_or_else(|| self.expected(entry, EXPECTED))
            }
            _ => Err(self.expected(entry, EXPECTED)),
        }
    }

    fn boolean(&self, entry: &Entry) -> Result<bool, ConfigError> {
        match entry.value.get_ref() {
            DeValue::Boolean(value) => Ok(*value),
            _ => Err(self.expected(entry, "true or false")),
        }
    }

    /// Go decodes `""` as its zero value, which Interlock reads as "not set"; so does xlb.
    fn optional_string<'d>(
        &self,
        entry: &Entry<'d, '_>,
        expected: &str,
    ) -> Result<Option<&'d str>, ConfigError> {
        let text = self.string(entry, expected)?;
        Ok(Some(text).filter(|text| !text.is_empty()))
    }

    fn string<'d>(&self, entry: &Entry<'d, '_>, expected: &str) -> Result<&'d str, ConfigError> {
        match entry.value.get_ref() {
            DeValue::String(text) => Ok(text),
            _ => Err(self.expected(entry, expected)),
        }
    }

    fn integer<'d, 'i>(
        &self,
        entry: &Entry<'d, 'i>,
        expected: &str,
    ) -> Result<&'d DeInteger<'i>, ConfigError> {
        match entry.value.get_ref() {
            DeValue::Integer(integer) => Ok(integer),
            _ => Err(self.expected(entry, expected)),
        }
    }

    /// `PATH: expected EXPECTED, found VALUE`, at the value, showing it as written.
    fn expected(&self, entry: &Entry, expected: &str) -> ConfigError {
        let span = entry.value.span();
        let found = match entry.value.get_ref() {
            DeValue::Array(_) => "an array",
            DeValue::Table(_) => "a table",
            _ => match self.source.get(span.clone()) {
                Some(written) if !written.contains('\n') => written,
                _ => "a multi-line value",
            },
        };
        let message = format!("{}: expected {expected}, found {found}", entry.path);
        self.error_at(span.start, message)
    }

    fn error_at(&self, offset: usize, message: String) -> ConfigError {
        let (line, column) = line_and_column(self.source, offset);
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            line,
            column,
            message,
        }
    }
}

/// 1-based line and column of a byte offset; columns count characters, as editors show them.
fn line_and_column(source: &str, offset: usize) -> (usize, usize) {
    let before = &source.as_bytes()[..offset.min(source.len())];
    let line_start = before
        .iter()
        .rposition(|&byte| byte == b'\n')
        .map_or(0, |newline| newline + 1);
    let line = 1 + before.iter().filter(|&&byte| byte == b'\n').count();
    let is_char_start = |byte: &&u8| **byte & 0b1100_0000 != 0b1000_0000;
    let column = 1 + before[line_start..].iter().filter(is_char_start).count();
    (line, column)
}

/// Go's `net.Listen` address for an IP literal: an empty host means every IPv4 address.
fn parse_listen_addr(text: &str) -> Option<SocketAddr> {
    match text.strip_prefix(':') {
        Some(port) if port.bytes().all(|byte| byte.is_ascii_digit()) => Some(SocketAddr::new(
            Ipv4Addr::UNSPECIFIED.into(),
            port.parse().ok()?,
        )),
        Some(_) => None,
        None => text.parse().ok(),
    }
}

#[derive(Debug, PartialEq)]
enum DurationError {
    Malformed,
    /// Valid for Go, but a `Duration` cannot hold it.
    Negative,
}

/// Go's `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or a bare `0`, with units ns, us
/// (µs, μs), ms, s, m and h, fractions truncated to the nanosecond. No crate does exactly this:
/// `humantime` also takes days and spaces, and `go-parse-duration` slices at character indices.
fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    // Go's time.Duration is an int64 of nanoseconds, so larger values are errors there too.
    const MAX_NANOS: u128 = i64::MAX as u128;
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(DurationError::Malformed);
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let (whole, after_whole) = split_leading_digits(rest);
        let (fraction, after_number) = match after_whole.strip_prefix('.') {
            Some(after_point) => split_leading_digits(after_point),
            None => ("", after_whole),
        };
        let unit_length = after_number
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after_number.len());
        let (unit, after_unit) = after_number.split_at(unit_length);
        if whole.is_empty() && fraction.is_empty() {
            return Err(DurationError::Malformed);
        }
        total_nanos = nanos_of(whole, fraction, unit)
            .and_then(|nanos| total_nanos.checked_add(nanos))
            .filter(|&nanos| nanos <= MAX_NANOS)
            .ok_or(DurationError::Malformed)?;
        rest = after_unit;
    }
    match (negative, total_nanos) {
        (true, 1..) => Err(DurationError::Negative),
        _ => Ok(Duration::from_nanos(total_nanos as u64)),
    }
}

/// nginx's time values (`ngx_parse_time`): one or more `<number><unit>` parts, optionally
/// separated by spaces, with units ms, s, m, h, d, w; a bare number means seconds.
fn parse_nginx_time(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if text.bytes().all(|byte| byte.is_ascii_digit()) {
        return text.parse().ok().map(Duration::from_secs);
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let (digits, after_digits) = split_leading_digits(rest);
        let unit_length = after_digits
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after_digits.len());
        let (unit, after_unit) = after_digits.split_at(unit_length);
        let number: u64 = digits.parse().ok()?;
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            _ => return None,
        };
        total = total.checked_add(Duration::from_millis(number.checked_mul(millis_per_unit)?))?;
        rest = after_unit.trim_start_matches(' ');
    }
    Some(total)
}

/// nginx's size values (`ngx_parse_size`): a number of bytes, optionally suffixed k, m or g
/// (either case).
fn parse_nginx_size(text: &str) -> Option<u64> {
    let (digits, unit) = split_leading_digits(text.trim());
    let multiplier: u64 = match unit {
        "" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(multiplier)
}

fn split_leading_digits(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text.split_at(end)
}

fn nanos_of(whole: &str, fraction: &str, unit: &str) -> Option<u128> {
    let unit_nanos: u128 = match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    };
    let whole_nanos = match whole {
        "" => 0,
        digits => digits.parse::<u128>().ok()?.checked_mul(unit_nanos)?,
    };
    // Go likewise stops reading fraction digits where an int64 would overflow.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_nanos = match fraction {
        "" => 0,
        digits => digits.parse::<u128>().ok()? * unit_nanos / 10u128.pow(digits.len() as u32),
    };
    whole_nanos.checked_add(fraction_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(source: &str) -> String {
        parse(source, "config.toml").unwrap_err().to_string()
    }

    #[test]
    fn seed_file_loads_verbatim() {
        let config = parse(include_str!("../../examples/config.toml"), "config.toml").unwrap();
        assert_eq!(config.listen_addr, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(config.docker_url, "unix:///var/run/docker.sock");
        assert_eq!(config.poll_interval, Duration::from_secs(3));
        assert_eq!(config.extensions.len(), 1);
        let extension = &config.extensions["default"];
        assert_eq!(extension.publish_mode, PublishMode::Host);
        assert_eq!(extension.published_port, 80);
        assert_eq!(extension.published_ssl_port, Some(443));
        let proxy = &extension.proxy;
        assert_eq!(proxy.user.as_deref(), Some("nginx"));
        assert_eq!(proxy.pid_path, Some(PathBuf::from("/var/run/proxy.pid")));
        assert_eq!(proxy.rlimit_nofile, Some(65535));
        assert_eq!(proxy.max_connections, Some(2048));
        assert_eq!(
            proxy.worker_processes,
            Some(WorkerProcesses::Count(1.try_into().unwrap()))
        );
        let extension_keys = "Image Args ServiceName ProxyImage ProxyArgs ProxyServiceName \
            ProxyConfigPath ProxyReplicas TargetPort TargetSSLPort";
        let ignored = extension_keys
            .split_whitespace()
            .map(|key| format!("Extensions.default.{key}"))
            .collect::<Vec<_>>();
        assert_eq!(config.ignored_keys, ignored);
    }

    #[test]
    fn absent_keys_take_defaults() {
        assert_eq!(parse("", "config.toml").unwrap(), Config::default());
        let config = parse("[Extensions.bare]", "config.toml").unwrap();
        assert_eq!(config.poll_interval, Duration::from_secs(3));
        assert_eq!(config.docker_url, DEFAULT_DOCKER_URL);
        assert_eq!(config.extensions["bare"], Extension::default());
    }

    #[test]
    fn keys_match_case_insensitively() {
        let source = r#"
            dockerurl = "tcp://10.0.0.1:2375"
            LISTENADDR = "[::1]:9000"
            [Extensions.one]
            publishmode = "Ingress"
            [extensions.one.config]
            RLimitNoFile = 1024
            [EXTENSIONS.Two.CONFIG]
            maxconnections = 10
            [extensions.Two]
            PUBLISHEDSSLPORT = 8443
        "#;
        let config = parse(source, "config.toml").unwrap();
        assert_eq!(config.docker_url, "tcp://10.0.0.1:2375");
        assert_eq!(config.listen_addr, Some("[::1]:9000".parse().unwrap()));
        let one = &config.extensions["one"];
        assert_eq!(one.publish_mode, PublishMode::Ingress);
        assert_eq!(one.proxy.rlimit_nofile, Some(1024));
        let two = &config.extensions["Two"];
        assert_eq!(two.proxy.max_connections, Some(10));
        assert_eq!(two.published_ssl_port, Some(8443));
        assert!(config.ignored_keys.is_empty());
    }

    #[test]
    fn service_cluster_and_ip_hash_are_read_case_insensitively() {
        let source = r#"
            [Extensions.east]
            servicecluster = "us-east"
            [Extensions.east.Config]
            iphash = true
            [Extensions.west]
            SERVICECLUSTER = ""
            [Extensions.west.Config]
            IPHash = false
        "#;
        let config = parse(source, "config.toml").unwrap();
        let east = &config.extensions["east"];
        assert_eq!(east.service_cluster.as_deref(), Some("us-east"));
        assert!(east.proxy.ip_hash);
        let west = &config.extensions["west"];
        assert_eq!(
            west.service_cluster, None,
            "an empty name is unset, as in Go"
        );
        assert!(!west.proxy.ip_hash);
        assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);
        let defaults = parse("[Extensions.d]", "config.toml").unwrap();
        assert_eq!(defaults.extensions["d"].service_cluster, None);
        assert!(!defaults.extensions["d"].proxy.ip_hash);
    }

    #[test]
    fn service_cluster_and_ip_hash_type_errors_point_at_the_value() {
        assert_eq!(
            error("[Extensions.e]\nServiceCluster = 1"),
            "config.toml:2:18: Extensions.e.ServiceCluster: expected a service cluster name, found 1"
        );
        assert_eq!(
            error("[Extensions.e.Config]\nIPHash = \"yes\""),
            r#"config.toml:2:10: Extensions.e.Config.IPHash: expected true or false, found "yes""#
        );
    }

    #[test]
    fn unknown_keys_and_tables_are_ignored_in_file_order() {
        let source = r#"
            TLSCert = 1
            [Metrics]
            On = true
            [Extensions.e]
            Constraints = ["node.platform.os==linux"]
            [Extensions.e.Labels]
            "com.docker.ucp.InstanceID" = "abc"
            [Extensions.e.Config]
            User = ""
            ServerNamesHashBucketSize = 128
        "#;
        let config = parse(source, "config.toml").unwrap();
        let ignored = [
            "TLSCert",
            "Metrics",
            "Extensions.e.Constraints",
            "Extensions.e.Labels",
            "Extensions.e.Config.ServerNamesHashBucketSize",
        ];
        assert_eq!(config.ignored_keys, ignored);
        assert_eq!(config.extensions["e"].proxy.user, None);
    }

    fn proxy_config(table: &str) -> ProxyConfig {
        let source = format!("[Extensions.e.Config]\n{table}");
        let config = parse(&source, "config.toml").unwrap();
        assert!(config.ignored_keys.is_empty(), "{:?}", config.ignored_keys);
        config.extensions["e"].proxy.clone()
    }

    #[test]
    fn proxy_timeouts_take_seconds_or_nginx_times() {
        let proxy = proxy_config(
            "ConnectTimeout = 600\nsendtimeout = \"30s\"\nREADTIMEOUT = \"1m 30s\"\n\
             KeepaliveTimeout = \"75s\"",
        );
        assert_eq!(proxy.connect_timeout, Some(Duration::from_secs(600)));
        assert_eq!(proxy.send_timeout, Some(Duration::from_secs(30)));
        assert_eq!(proxy.read_timeout, Some(Duration::from_secs(90)));
        assert_eq!(proxy.keepalive_timeout, Some(Duration::from_secs(75)));

        let proxy = proxy_config(
            "ConnectTimeout = \"500ms\"\nKeepaliveTimeout = 0\nDrainTimeout = \"45s\"\n\
             ClientSendTimeout = \"20s\"",
        );
        assert_eq!(proxy.client_send_timeout, Some(Duration::from_secs(20)));
        assert_eq!(proxy.connect_timeout, Some(Duration::from_millis(500)));
        assert_eq!(proxy.keepalive_timeout, Some(Duration::ZERO));
        assert_eq!(proxy.drain_timeout, Some(Duration::from_secs(45)));
    }

    #[test]
    fn bad_proxy_timeouts_are_reported_at_the_value() {
        assert_eq!(
            error("[Extensions.e.Config]\nReadTimeout = \"10 parsecs\""),
            r#"config.toml:2:15: Extensions.e.Config.ReadTimeout: expected seconds (600) or an nginx time like "600s", found "10 parsecs""#
        );
        assert_eq!(
            error("[Extensions.e.Config]\nConnectTimeout = 0"),
            "config.toml:2:18: Extensions.e.Config.ConnectTimeout: expected a time greater than zero, found 0"
        );
        assert_eq!(
            error("[Extensions.e.Config]\nSendTimeout = -5"),
            r#"config.toml:2:15: Extensions.e.Config.SendTimeout: expected seconds (600) or an nginx time like "600s", found -5"#
        );
        assert_eq!(
            error("[Extensions.e.Config]\nKeepaliveTimeout = 9223372036854775807"),
            "config.toml:2:20: Extensions.e.Config.KeepaliveTimeout: expected a time of at most 365 days, found 9223372036854775807"
        );
        assert_eq!(
            error("[Extensions.e.Config]\nReadTimeout = \"366d\""),
            r#"config.toml:2:15: Extensions.e.Config.ReadTimeout: expected a time of at most 365 days, found "366d""#
        );
        assert_eq!(
            error("[Extensions.e.Config]\nKeepaliveTimeout = true"),
            r#"config.toml:2:20: Extensions.e.Config.KeepaliveTimeout: expected seconds (600) or an nginx time like "600s", found true"#
        );
    }

    #[test]
    fn client_max_body_size_takes_nginx_sizes() {
        let size = |value: &str| proxy_config(&format!("ClientMaxBodySize = {value}"));
        assert_eq!(size("\"1m\"").client_max_body_size, Some(1 << 20));
        assert_eq!(size("\"512k\"").client_max_body_size, Some(512 << 10));
        assert_eq!(size("\"2G\"").client_max_body_size, Some(2 << 30));
        assert_eq!(size("\"1000\"").client_max_body_size, Some(1000));
        assert_eq!(size("4096").client_max_body_size, Some(4096));
        assert_eq!(size("\"0\"").client_max_body_size, Some(0));
        assert_eq!(
            error("[Extensions.e.Config]\nClientMaxBodySize = \"1 m\""),
            r#"config.toml:2:21: Extensions.e.Config.ClientMaxBodySize: expected a size in bytes or like "1m", "512k", found "1 m""#
        );
        assert_eq!(
            error("[Extensions.e.Config]\nclientmaxbodysize = \"5t\""),
            r#"config.toml:2:21: Extensions.e.Config.clientmaxbodysize: expected a size in bytes or like "1m", "512k", found "5t""#
        );
    }

    #[test]
    fn header_and_log_keys_are_read() {
        let proxy = proxy_config(
            "UnderscoresInHeaders = true\nAccessLogPath = \"/var/log/xlb/access.log\"\n\
             errorlogpath = \"/var/log/xlb/error.log\"",
        );
        assert_eq!(proxy.underscores_in_headers, Some(true));
        assert_eq!(
            proxy.access_log_path,
            Some(PathBuf::from("/var/log/xlb/access.log"))
        );
        assert_eq!(
            proxy.error_log_path,
            Some(PathBuf::from("/var/log/xlb/error.log"))
        );
        let unset = proxy_config("AccessLogPath = \"\"\nUnderscoresInHeaders = false");
        assert_eq!(unset.access_log_path, None);
        assert_eq!(unset.underscores_in_headers, Some(false));
        assert_eq!(
            error("[Extensions.e.Config]\nUnderscoresInHeaders = \"yes\""),
            r#"config.toml:2:24: Extensions.e.Config.UnderscoresInHeaders: expected true or false, found "yes""#
        );
    }

    #[test]
    fn nginx_times_and_sizes() {
        let millis = |text| parse_nginx_time(text).map(|time| time.as_millis());
        assert_eq!(millis("600"), Some(600_000));
        assert_eq!(millis("600s"), Some(600_000));
        assert_eq!(millis("1h30m"), Some(5_400_000));
        assert_eq!(millis("1d 1ms"), Some(86_400_001));
        assert_eq!(millis("2w"), Some(1_209_600_000));
        for rejected in ["", "s", "1x", "1.5s", "-1s", "1s-", "99999999999999999999w"] {
            assert_eq!(parse_nginx_time(rejected), None, "{rejected:?}");
        }
        assert_eq!(parse_nginx_size("10k"), Some(10_240));
        for rejected in ["", "k", "1.5m", "-1", "1kb", "99999999999g"] {
            assert_eq!(parse_nginx_size(rejected), None, "{rejected:?}");
        }
    }

    #[test]
    fn syntax_error_reports_tomls_message_at_its_position() {
        assert_eq!(
            error("PollInterval = \"3s\"\nListenAddr = \n"),
            "config.toml:2:14: string values must be quoted, expected literal string"
        );
    }

    #[test]
    fn tls_keys_are_read_and_mapped_to_rustls() {
        let source = r#"
            [Extensions.default.Config]
            SSLProtocols = "TLSv1.1 TLSv1.2"
            SSLCiphers = "ECDHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-GCM-SHA256"
            SecretsDir = "/var/lib/xlb/secrets"
            SSLBackendCAFile = "/etc/xlb/backend-ca.pem"
        "#;
        let config = parse(source, "config.toml").unwrap();
        let proxy = &config.extensions["default"].proxy;
        let protocols = proxy.ssl_protocols.as_ref().unwrap();
        assert_eq!(protocols.versions, [tls_policy::TlsVersion::Tls12]);
        assert_eq!(protocols.unavailable, ["TLSv1.1"]);
        let ciphers = proxy.ssl_ciphers.as_ref().unwrap();
        assert!(ciphers
            .suites
            .contains(&rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256));
        assert_eq!(ciphers.unavailable, ["DHE-RSA-AES128-GCM-SHA256"]);
        assert_eq!(
            proxy.secrets_dir.as_deref(),
            Some(Path::new("/var/lib/xlb/secrets"))
        );
        assert_eq!(
            proxy.ssl_backend_ca_file.as_deref(),
            Some(Path::new("/etc/xlb/backend-ca.pem"))
        );
        assert!(config.ignored_keys.is_empty());
    }

    #[test]
    fn unknown_tls_names_are_errors_at_the_value_naming_them() {
        assert_eq!(
            error("[Extensions.default.Config]\nSSLCiphers = \"HIGH:ECDHE-RSA-AES512-GCM:!aNULL\""),
            "config.toml:2:14: Extensions.default.Config.SSLCiphers: \
             unknown cipher name: ECDHE-RSA-AES512-GCM"
        );
        assert_eq!(
            error("[Extensions.default.Config]\nsslprotocols = \"TLSv1.2 TLSv2\""),
            "config.toml:2:16: Extensions.default.Config.sslprotocols: unknown protocol name: \
             TLSv2 (known: SSLv2 SSLv3 TLSv1 TLSv1.1 TLSv1.2 TLSv1.3)"
        );
        assert_eq!(
            error("[Extensions.default.Config]\nSSLCiphers = 1"),
            "config.toml:2:14: Extensions.default.Config.SSLCiphers: expected a string, found 1"
        );
    }

    #[test]
    fn worker_processes_is_a_count_or_auto() {
        let workers = |value: &str| {
            let source = format!("[Extensions.x.Config]\nWorkerProcesses = {value}");
            parse(&source, "config.toml").unwrap().extensions["x"]
                .proxy
                .worker_processes
        };
        let count = |n: usize| Some(WorkerProcesses::Count(n.try_into().unwrap()));
        assert_eq!(workers("1"), count(1));
        assert_eq!(workers("4"), count(4));
        assert_eq!(workers("\"auto\""), Some(WorkerProcesses::Auto));
        assert_eq!(workers("\"AUTO\""), Some(WorkerProcesses::Auto));
        assert!(WorkerProcesses::Auto.resolve() >= 1);
        assert_eq!(count(4).unwrap().resolve(), 4);
        for (value, found) in [
            ("0", "0"),
            ("-2", "-2"),
            ("\"four\"", "\"four\""),
            ("1.5", "1.5"),
        ] {
            assert_eq!(
                error(&format!("[Extensions.x.Config]\nWorkerProcesses = {value}")),
                format!(
                    "config.toml:2:19: Extensions.x.Config.WorkerProcesses: expected a positive \
                     integer or \"auto\", found {found}"
                )
            );
        }
    }

    #[test]
    fn wrong_types_are_reported_at_the_value() {
        assert_eq!(
            error("[Extensions.default]\n  PublishedPort = \"80\""),
            r#"config.toml:2:19: Extensions.default.PublishedPort: expected a port number (1..=65535), found "80""#
        );
        assert_eq!(
            error("[Extensions.x.Config]\nMaxConnections = -1"),
            "config.toml:2:18: Extensions.x.Config.MaxConnections: expected a positive integer, found -1"
        );
        assert_eq!(
            error("Extensions = [1]"),
            "config.toml:1:14: Extensions: expected a table, found an array"
        );
    }

    #[test]
    fn bad_values_are_reported_at_the_value() {
        assert_eq!(
            error("ListenAddr = \":8080\"\n# é\nPollInterval = \"abc\""),
            r#"config.toml:3:16: PollInterval: expected a duration like "3s", found "abc""#
        );
        assert_eq!(
            error("PollInterval = '-1s'"),
            "config.toml:1:16: PollInterval: expected a duration greater than zero, found '-1s'"
        );
        assert_eq!(
            error("ListenAddr = \"localhost:80\""),
            r#"config.toml:1:14: ListenAddr: expected a listen address like ":8080" or "127.0.0.1:8080", found "localhost:80""#
        );
        assert_eq!(
            error("DockerURL = \"http://docker:2375\""),
            r#"config.toml:1:13: DockerURL: expected a URL starting with unix:// or tcp://, found "http://docker:2375""#
        );
        assert_eq!(
            error("[Extensions.e]\nPublishedSSLPort = 70000"),
            "config.toml:2:20: Extensions.e.PublishedSSLPort: expected a port number (1..=65535), found 70000"
        );
        assert_eq!(
            error("[Extensions.e]\nPublishMode = \"vip\""),
            r#"config.toml:2:15: Extensions.e.PublishMode: expected "host" or "ingress", found "vip""#
        );
    }

    #[test]
    fn the_l4_table_sets_the_fast_paths_limits() {
        let source = r#"
            [l4]
            Addresses = ["10.0.0.1", "fd00::1"]
            SNATPorts = "62000-63000"
            maglevRingSize = 251
            ConnectionTableSize = 1024
            MaxServices = 8
            TCPIdleTimeout = "90s"
            TCPHandshakeTimeout = "3s"
            TCPClosingTimeout = "2s"
            TCPTimeWaitTimeout = "30s"
            UDPIdleTimeout = "5s"
            DrainTimeout = "0s"
            NewFlowsPerSecond = 20000
            Shield = false
            ShieldOpenPorts = ["2222", "53/udp"]
            SNATAddresses = ["10.0.0.21", "10.0.0.22"]
        "#;
        let l4 = parse(source, "config.toml").unwrap().l4;
        assert_eq!(l4.tcp_handshake, Duration::from_secs(3));
        assert_eq!(l4.tcp_closing, Duration::from_secs(2));
        assert_eq!(l4.tcp_time_wait, Duration::from_secs(30));
        assert_eq!(l4.udp_idle, Duration::from_secs(5));
        assert_eq!(l4.backend_drain, Duration::ZERO);
        assert_eq!(l4.new_flows_per_second, Some(20000));
        assert!(!l4.shield);
        assert_eq!(
            l4.open_ports,
            [
                Listener::parse("2222/tcp").unwrap(),
                Listener::parse("53/udp").unwrap()
            ]
        );
        assert_eq!(
            l4.snat_addresses,
            [Ipv4Addr::new(10, 0, 0, 21), Ipv4Addr::new(10, 0, 0, 22)]
        );
        assert_eq!(
            l4.addresses,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(l4.snat_ports, SnatPorts::new(62000, 63000).unwrap());
        assert_eq!(l4.ring_size, RingSize::new(251).unwrap());
        assert_eq!(l4.flow_entries, 1024);
        assert_eq!(l4.service_slots, 8);
        assert_eq!(l4.tcp_idle, Duration::from_secs(90));
        assert_eq!(parse("", "config.toml").unwrap().l4, L4Settings::default());
    }

    #[test]
    fn bad_l4_values_are_reported_at_the_value() {
        assert_eq!(
            error("[L4]\nAddresses = [\"10.0.0.1\", \"lb-00\"]"),
            r#"config.toml:2:26: L4.Addresses[1]: expected an IP address, found "lb-00""#
        );
        assert_eq!(
            error("[L4]\nSNATPorts = \"65535-61000\""),
            r#"config.toml:2:13: L4.SNATPorts: expected a port range like "61000-65535", found "65535-61000""#
        );
        assert_eq!(
            error("[L4]\nMaglevRingSize = 65536"),
            "config.toml:2:18: L4.MaglevRingSize: expected a prime between 3 and 16777216 (65537 by default), found 65536"
        );
        assert_eq!(
            error("[L4]\nTCPIdleTimeout = \"0s\""),
            r#"config.toml:2:18: L4.TCPIdleTimeout: expected a duration greater than zero, found "0s""#
        );
        assert_eq!(
            error("[L4]\nShieldOpenPorts = [\"22/tcp\", \"ssh\"]"),
            r#"config.toml:2:30: L4.ShieldOpenPorts[1]: expected a port like "22/tcp" or "7946/udp", found "ssh""#
        );
        let seventeen: Vec<String> = (1..=17).map(|i| format!("\"10.0.0.{i}\"")).collect();
        assert_eq!(
            error(&format!("[L4]\nSNATAddresses = [{}]", seventeen.join(","))),
            "config.toml:2:17: L4.SNATAddresses: at most 16 IPv4 SNAT addresses, found 17"
        );
    }

    #[test]
    fn a_key_set_twice_in_different_case_is_an_error() {
        assert_eq!(
            error("DockerURL = \"unix:///a\"\ndockerurl = \"unix:///b\""),
            "config.toml:2:1: dockerurl: set twice (keys are case-insensitive), first at 1:1"
        );
    }

    #[test]
    fn load_names_the_file_in_errors() {
        let missing = Path::new("/nonexistent/xlb/config.toml");
        let message = load(missing).unwrap_err().to_string();
        assert!(
            message.starts_with("/nonexistent/xlb/config.toml: "),
            "{message}"
        );

        let path = std::env::temp_dir().join(format!("xlb-config-{}.toml", std::process::id()));
        fs::write(&path, "PollInterval = 3").unwrap();
        let message = load(&path).unwrap_err().to_string();
        fs::remove_file(&path).unwrap();
        let expected = r#"PollInterval: expected a duration like "3s", found 3"#;
        assert_eq!(message, format!("{}:1:16: {expected}", path.display()));
    }

    #[test]
    fn line_and_column_count_characters_from_one() {
        let source = "ab\nçé = 1\r\nx";
        assert_eq!(line_and_column(source, 0), (1, 1));
        assert_eq!(line_and_column(source, 2), (1, 3));
        assert_eq!(line_and_column(source, 3), (2, 1));
        assert_eq!(line_and_column(source, 8), (2, 4));
        assert_eq!(line_and_column(source, source.len()), (3, 2));
    }

    #[test]
    fn listen_addresses_follow_go() {
        let parsed = |text| parse_listen_addr(text).map(|addr| addr.to_string());
        assert_eq!(parsed(":8080").as_deref(), Some("0.0.0.0:8080"));
        assert_eq!(parsed("127.0.0.1:9000").as_deref(), Some("127.0.0.1:9000"));
        assert_eq!(parsed("[::1]:9000").as_deref(), Some("[::1]:9000"));
        for rejected in ["", ":", "8080", ":+80", ":65536", "localhost:80", "::1:80"] {
            assert_eq!(parsed(rejected), None, "{rejected:?}");
        }
    }

    #[test]
    fn durations_follow_go() {
        let millis = |text| parse_go_duration(text).map(|duration| duration.as_millis());
        assert_eq!(millis("3s"), Ok(3_000));
        assert_eq!(millis("500ms"), Ok(500));
        assert_eq!(millis("1m30s"), Ok(90_000));
        assert_eq!(millis("1.5s"), Ok(1_500));
        assert_eq!(millis("+.5s"), Ok(500));
        assert_eq!(millis("1.s"), Ok(1_000));
        assert_eq!(millis("1h2m3.25s"), Ok(3_723_250));
        assert_eq!(millis("0"), Ok(0));
        assert_eq!(millis("-0s"), Ok(0));
        let nanos = |text| parse_go_duration(text).map(|duration| duration.as_nanos());
        assert_eq!(nanos("1.5µs"), Ok(1_500));
        assert_eq!(nanos("2μs"), Ok(2_000));
        assert_eq!(nanos("7ns"), Ok(7));
        assert_eq!(nanos("0.1234567891h"), Ok(444_444_440_760));
        assert_eq!(nanos("2562047h47m16.854775807s"), Ok(i64::MAX as u128));
        assert_eq!(parse_go_duration("-1s"), Err(DurationError::Negative));
        let too_long = "2562047h47m16.854775808s";
        let malformed = [
            "", "3", "abc", "-", "s", ".s", "1.5.5s", "3 s", " 3s", "1d", "3S", "00",
        ];
        for text in malformed
            .into_iter()
            .chain([too_long, "99999999999999999999999h"])
        {
            assert_eq!(
                parse_go_duration(text),
                Err(DurationError::Malformed),
                "{text:?}"
            );
        }
    }
}
