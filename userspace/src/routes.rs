//! The route table: which endpoints serve which host and path, and how, derived from one Swarm
//! snapshot and Interlock's `com.docker.lb.*` service labels.
//!
//! [`route_table`] is a pure function so that every labelling mistake a user can make is
//! tested without Docker. A service with a bad value in any label is disabled alone, with its
//! reason in [`RouteTable::rejected`]; every other service keeps routing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use bollard::models::{EndpointPortConfigPublishModeEnum, Node, Service, Task, TaskState};
use http::Uri;
use serde::{Deserialize, Serialize};

use crate::swarm::SwarmSnapshot;

mod transport_labels;

pub use transport_labels::{
    BackendTls, BackendTlsVerify, CertificateSecrets, Transport, LABEL_SSL_BACKEND,
    LABEL_SSL_BACKEND_TLS_VERIFY, LABEL_SSL_CERT, LABEL_SSL_KEY, LABEL_SSL_PASSTHROUGH,
    LABEL_WEBSOCKET_ENDPOINTS,
};

/// Comma-separated host names a service answers for; `*.example.org` answers every subdomain.
pub const LABEL_HOSTS: &str = "com.docker.lb.hosts";
/// The container port the service listens on.
pub const LABEL_PORT: &str = "com.docker.lb.port";
/// The path prefix the service serves on its hosts.
pub const LABEL_CONTEXT_ROOT: &str = "com.docker.lb.context_root";
/// `true`: strip the context root from the path sent upstream.
pub const LABEL_CONTEXT_ROOT_REWRITE: &str = "com.docker.lb.context_root_rewrite";
/// `source,target;` pairs: requests for `source` (`scheme://host`) get a 302 to `target`.
pub const LABEL_REDIRECTS: &str = "com.docker.lb.redirects";
/// `true`: plain HTTP requests get a 301 to the same URL in HTTPS.
pub const LABEL_SSL_ONLY: &str = "com.docker.lb.ssl_only";
/// `true`: the service answers hosts that no service names.
pub const LABEL_DEFAULT_BACKEND: &str = "com.docker.lb.default_backend";
/// A cookie name: requests with the same value of that cookie go to the same task.
pub const LABEL_STICKY_SESSION_COOKIE: &str = "com.docker.lb.sticky_session_cookie";
/// `true`: requests from the same client address go to the same task.
pub const LABEL_IP_HASH: &str = "com.docker.lb.ip_hash";
/// xlb's own label: `round_robin` (the default) or `least_conn`.
pub const LABEL_LB_METHOD: &str = "com.docker.lb.lb_method";
/// The service cluster whose proxies serve the service (config `ServiceCluster`).
pub const LABEL_SERVICE_CLUSTER: &str = "com.docker.lb.service_cluster";
/// `task` or `vip`; only `task` exists in host mode.
pub const LABEL_BACKEND_MODE: &str = "com.docker.lb.backend_mode";
/// An overlay network for the proxy to join; host mode has none.
pub const LABEL_NETWORK: &str = "com.docker.lb.network";

/// The context root of a service without `com.docker.lb.context_root`: every path.
pub const ROOT_CONTEXT: &str = "/";

/// What the proxy's configuration changes in the route table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSettings {
    /// `ServiceCluster`: route only the services labelled with this cluster; `None` routes all.
    pub service_cluster: Option<String>,
    /// `IPHash`: balance by client address the services whose labels choose no method.
    pub ip_hash: bool,
}

/// Everything the proxy and the dataplane need to know, derived from one Swarm snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Lower-case host name (no port), or a `*.suffix` wildcard → the routes on that host, one
    /// per context root, longest context root first.
    pub routes: BTreeMap<String, Vec<Route>>,
    /// The route for hosts that no entry of `routes` matches (`default_backend=true`).
    pub default_backend: Option<Route>,
    /// Services that carry xlb/Interlock labels but cannot be routed, with the reason.
    pub rejected: Vec<RejectedService>,
}

/// How one service is routed: the same on each of its hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The Swarm service's name.
    pub service: String,
    /// The path prefix served, [`ROOT_CONTEXT`] for all paths; any other ends without `/`.
    pub context_root: String,
    /// Strip `context_root` from the path sent upstream.
    pub context_root_rewrite: bool,
    /// Node address + published port of each running task, sorted.
    pub endpoints: Vec<SocketAddr>,
    /// How a request's endpoint is chosen.
    pub balance: Balance,
    /// Plain HTTP requests are redirected to HTTPS.
    pub ssl_only: bool,
    /// Requests for a redirect's source go to its target instead.
    pub redirects: Vec<Redirect>,
    /// TLS and WebSocket labels.
    pub transport: Transport,
}

/// How a request's endpoint is chosen among a route's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    /// The endpoint with the fewest requests in flight through this proxy.
    LeastConn,
    /// A consistent hash of the client address.
    IpHash,
    /// A consistent hash of the named cookie's value; round robin for requests without it.
    StickyCookie {
        cookie: String,
    },
}

/// The scheme a client used to reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

/// One `source,target` pair of `com.docker.lb.redirects`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redirect {
    pub source_scheme: Scheme,
    /// Lower-case host name, matched against the request's host without its port.
    pub source_host: String,
    /// `scheme://authority[/path]` without a trailing `/`: the request's path and query are
    /// appended to it.
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedService {
    pub service: String,
    pub reason: String,
}

/// What a service's labels ask for, checked.
struct ServiceLabels {
    /// Empty only for a default backend.
    hosts: Vec<String>,
    port: u16,
    default_backend: bool,
    context_root: String,
    context_root_rewrite: bool,
    redirects: Vec<Redirect>,
    ssl_only: bool,
    balance: Balance,
    transport: Transport,
}

/// Builds the route table of every service labelled `com.docker.lb.hosts` or
/// `com.docker.lb.default_backend` that this proxy's service cluster serves.
///
/// Services are considered oldest first, so when two claim the same host and context root, or
/// both want to be the default backend, the one that had it first keeps it and the newcomer is
/// rejected.
pub fn route_table(snapshot: &SwarmSnapshot, settings: &RouteSettings) -> RouteTable {
    let node_addrs = node_addresses(&snapshot.nodes);
    let tasks = snapshot.tasks_by_service();
    let mut services: Vec<&Service> = snapshot
        .services
        .iter()
        .filter(|service| {
            label(service, LABEL_HOSTS).is_some() || label(service, LABEL_DEFAULT_BACKEND).is_some()
        })
        .collect();
    services.sort_by_key(|service| (service.created_at.clone(), service_name(service)));

    let mut table = RouteTable::default();
    for service in services {
        let name = service_name(service);
        let routed = match serves_cluster(service, settings) {
            Ok(false) => continue,
            Ok(true) => service_labels(service, settings).and_then(|labels| {
                let endpoints = endpoints(&labels, tasks.of(service), &node_addrs)?;
                table.claim(&name, labels, endpoints)
            }),
            Err(reason) => Err(reason),
        };
        if let Err(reason) = routed {
            tracing::warn!(service = %name, %reason, "service not routed");
            table.rejected.push(RejectedService {
                service: name,
                reason,
            });
        }
    }
    table.rejected.sort_by(|a, b| a.service.cmp(&b.service));
    table
}

impl RouteTable {
    /// Adds the service's routes, unless an older service already serves one of its host and
    /// context root pairs, or already is the default backend.
    fn claim(
        &mut self,
        service: &str,
        labels: ServiceLabels,
        endpoints: Vec<SocketAddr>,
    ) -> Result<(), String> {
        let context_root = labels.context_root;
        for host in &labels.hosts {
            let owner = self
                .routes
                .get(host)
                .into_iter()
                .flatten()
                .find(|route| route.context_root == context_root);
            if let Some(owner) = owner {
                let place = match context_root.as_str() {
                    ROOT_CONTEXT => format!("host {host}"),
                    path => format!("host {host} with context root {path}"),
                };
                return Err(format!(
                    "{place} is already served by service {}",
                    owner.service
                ));
            }
        }
        if let (true, Some(owner)) = (labels.default_backend, &self.default_backend) {
            return Err(format!(
                "service {} already is the default backend ({LABEL_DEFAULT_BACKEND}), \
                 and there can be only one",
                owner.service
            ));
        }
        let route = Route {
            service: service.to_owned(),
            context_root,
            context_root_rewrite: labels.context_root_rewrite,
            endpoints,
            balance: labels.balance,
            ssl_only: labels.ssl_only,
            redirects: labels.redirects,
            transport: labels.transport,
        };
        if labels.default_backend {
            self.default_backend = Some(route.clone());
        }
        for host in labels.hosts {
            let routes = self.routes.entry(host).or_default();
            routes.push(route.clone());
            routes.sort_by(|a, b| {
                let longest_first = b.context_root.len().cmp(&a.context_root.len());
                longest_first.then_with(|| a.context_root.cmp(&b.context_root))
            });
        }
        Ok(())
    }
}

/// Whether this proxy serves the service: every service when no `ServiceCluster` is
/// configured, else only those labelled with that cluster.
fn serves_cluster(service: &Service, settings: &RouteSettings) -> Result<bool, String> {
    let cluster = match label(service, LABEL_SERVICE_CLUSTER) {
        None => None,
        Some(value) => Some(parse_service_cluster(value)?),
    };
    Ok(match (&settings.service_cluster, cluster) {
        (None, _) => true,
        (Some(ours), Some(theirs)) => *ours == theirs,
        (Some(_), None) => false,
    })
}

/// Every label of the service, checked; the first bad one is the reason it is rejected.
fn service_labels(service: &Service, settings: &RouteSettings) -> Result<ServiceLabels, String> {
    if let Some(mode) = label(service, LABEL_BACKEND_MODE) {
        check_backend_mode(mode)?;
    }
    if label(service, LABEL_NETWORK).is_some() {
        return Err(format!(
            "label {LABEL_NETWORK} names an overlay network for the proxy to join, which host \
             mode does not use: xlb reaches each task on its node's published port (remove the label)"
        ));
    }
    let default_backend = parse_flag(service, LABEL_DEFAULT_BACKEND)?;
    let hosts = match label(service, LABEL_HOSTS) {
        Some(value) => parse_hosts(value)?,
        None if default_backend => Vec::new(),
        None => {
            return Err(format!(
                "label {LABEL_HOSTS} is missing (only a {LABEL_DEFAULT_BACKEND}=true service \
                 may go without)"
            ))
        }
    };
    let port = match label(service, LABEL_PORT) {
        None => return Err(format!("label {LABEL_PORT} is missing")),
        Some(value) => parse_port(value)?,
    };
    let transport = transport_labels::parse(|key| label(service, key), &hosts)?;
    let context_root = match label(service, LABEL_CONTEXT_ROOT) {
        None => ROOT_CONTEXT.to_owned(),
        Some(value) => parse_context_root(value)?,
    };
    let redirects = match label(service, LABEL_REDIRECTS) {
        None => Vec::new(),
        Some(value) => parse_redirects(value, &hosts, default_backend)?,
    };
    Ok(ServiceLabels {
        hosts,
        port,
        default_backend,
        context_root,
        context_root_rewrite: parse_flag(service, LABEL_CONTEXT_ROOT_REWRITE)?,
        redirects,
        ssl_only: parse_flag(service, LABEL_SSL_ONLY)?,
        balance: balance(service, settings)?,
        transport,
    })
}

/// Node address + published port of each running task, or why the service has none.
fn endpoints(
    labels: &ServiceLabels,
    tasks: &[&Task],
    node_addrs: &HashMap<&str, IpAddr>,
) -> Result<Vec<SocketAddr>, String> {
    let port = labels.port;
    let mut endpoints = BTreeSet::new();
    let mut running_without_port = 0;
    for task in tasks.iter().filter(|task| is_running(task)) {
        let node = task.node_id.as_deref().and_then(|id| node_addrs.get(id));
        let published = host_published_ports(task, port);
        if published.is_empty() {
            running_without_port += 1;
        }
        if let Some(addr) = node {
            endpoints.extend(
                published
                    .into_iter()
                    .map(|published| SocketAddr::new(*addr, published)),
            );
        }
    }
    if endpoints.is_empty() && running_without_port > 0 {
        return Err(format!(
            "its running tasks publish no host-mode port for target port {port} \
             (create it with --publish mode=host,target={port})"
        ));
    }
    Ok(endpoints.into_iter().collect())
}

fn check_backend_mode(value: &str) -> Result<(), String> {
    match value.trim() {
        "task" => Ok(()),
        "vip" => Err(format!(
            "label {LABEL_BACKEND_MODE}=vip routes to the service's virtual IP on an overlay \
             network, which host mode does not have: xlb routes to each task's published port \
             (remove the label or set it to task)"
        )),
        _ => Err(format!(
            "label {LABEL_BACKEND_MODE} is {value:?}, not task (vip does not exist in host mode)"
        )),
    }
}

/// The sticky cookie, ip_hash or lb_method label, at most one of them; else `IPHash`'s choice.
fn balance(service: &Service, settings: &RouteSettings) -> Result<Balance, String> {
    let mut chosen = Vec::new();
    if let Some(value) = label(service, LABEL_STICKY_SESSION_COOKIE) {
        let cookie = parse_cookie_name(value)?;
        chosen.push((
            LABEL_STICKY_SESSION_COOKIE,
            Balance::StickyCookie { cookie },
        ));
    }
    let ip_hash = match label(service, LABEL_IP_HASH) {
        None => None,
        Some(value) => Some(parse_bool(LABEL_IP_HASH, value)?),
    };
    if ip_hash == Some(true) {
        chosen.push((LABEL_IP_HASH, Balance::IpHash));
    }
    if let Some(value) = label(service, LABEL_LB_METHOD) {
        chosen.push((LABEL_LB_METHOD, parse_lb_method(value)?));
    }
    match chosen.as_slice() {
        [(_, balance)] => Ok(balance.clone()),
        [] if ip_hash == Some(false) || !settings.ip_hash => Ok(Balance::RoundRobin),
        [] => Ok(Balance::IpHash),
        [(first, _), (second, _), ..] => Err(format!(
            "labels {first} and {second} both choose how requests are balanced: keep one"
        )),
    }
}

fn parse_hosts(value: &str) -> Result<Vec<String>, String> {
    let mut hosts = BTreeSet::new();
    for host in value
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
    {
        let name = host.strip_prefix("*.").unwrap_or(host);
        if !is_host_name(name) {
            return Err(format!(
                "label {LABEL_HOSTS} holds an invalid host name {host:?} \
                 (a wildcard is only allowed as a whole first label: *.example.org)"
            ));
        }
        hosts.insert(host.to_ascii_lowercase());
    }
    if hosts.is_empty() {
        return Err(format!("label {LABEL_HOSTS} names no host"));
    }
    Ok(hosts.into_iter().collect())
}

/// Dot-separated non-empty labels of letters, digits, `-` and `_`.
fn is_host_name(name: &str) -> bool {
    name.split('.').all(|label| {
        !label.is_empty()
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    })
}

/// Whether a wildcard or exact host pattern from [`parse_hosts`] covers a host name.
fn host_pattern_covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

fn parse_port(value: &str) -> Result<u16, String> {
    match value.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!(
            "label {LABEL_PORT} is {value:?}, not a port number (1-65535)"
        )),
    }
}

/// `/app` or `/app/` → `/app`; `/` is every path. Only characters a URL path may hold
/// unencoded, and no empty, `.` or `..` segment, since those would never match a request.
fn parse_context_root(value: &str) -> Result<String, String> {
    let invalid = |why: &str| format!("label {LABEL_CONTEXT_ROOT} is {value:?}: {why}");
    let path = value.trim();
    let Some(segments) = path.strip_prefix('/') else {
        return Err(invalid("it must start with /"));
    };
    let segments = segments.strip_suffix('/').unwrap_or(segments);
    if segments.is_empty() {
        return Ok(ROOT_CONTEXT.to_owned());
    }
    for segment in segments.split('/') {
        if matches!(segment, "" | "." | "..") {
            return Err(invalid("it has an empty, . or .. segment"));
        }
        if !is_path_segment(segment) {
            return Err(invalid(
                "only letters, digits, -._~!$&'()*+,;=:@ and %XX escapes may appear in a path",
            ));
        }
    }
    Ok(format!("/{segments}"))
}

/// RFC 3986 `segment`: unreserved, sub-delims, `:`, `@` and well-formed percent escapes.
fn is_path_segment(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte == b'%' {
            let escape = bytes.get(index + 1..index + 3);
            if !escape.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            index += 3;
            continue;
        }
        if !(byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&byte)) {
            return false;
        }
        index += 1;
    }
    true
}

/// `source,target;source,target;...`: each source a `scheme://host` the service answers for,
/// each target an absolute `http(s)://` URL without query.
fn parse_redirects(
    value: &str,
    hosts: &[String],
    default_backend: bool,
) -> Result<Vec<Redirect>, String> {
    let mut redirects: Vec<Redirect> = Vec::new();
    for pair in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let invalid = |why: String| format!("label {LABEL_REDIRECTS}: {pair:?} {why}");
        let Some((source, target)) = pair.split_once(',') else {
            return Err(invalid("is not a source,target pair".into()));
        };
        let (source_scheme, source_host) =
            parse_redirect_source(source.trim()).map_err(&invalid)?;
        let target = parse_redirect_target(target.trim()).map_err(&invalid)?;
        let answered = default_backend
            || hosts
                .iter()
                .any(|pattern| host_pattern_covers(pattern, &source_host));
        if !answered {
            return Err(invalid(format!(
                "redirects host {source_host}, which is not in {LABEL_HOSTS}, so no request \
                 for it reaches this service"
            )));
        }
        let duplicate = redirects
            .iter()
            .any(|r| r.source_scheme == source_scheme && r.source_host == source_host);
        if duplicate {
            return Err(invalid(
                "repeats a source that an earlier pair already redirects".into(),
            ));
        }
        redirects.push(Redirect {
            source_scheme,
            source_host,
            target,
        });
    }
    if redirects.is_empty() {
        return Err(format!("label {LABEL_REDIRECTS} names no redirect"));
    }
    Ok(redirects)
}

/// `http://host` or `https://host`, optionally with a trailing `/`.
fn parse_redirect_source(source: &str) -> Result<(Scheme, String), String> {
    let (scheme, rest) = match source.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => {
            return Err(format!(
                "has source {source:?}, not http://host or https://host"
            ))
        }
    };
    let host = rest.strip_suffix('/').unwrap_or(rest);
    if !is_host_name(host) {
        return Err(format!(
            "has source {source:?}, not http://host or https://host (no port, path or query)"
        ));
    }
    Ok((scheme, host.to_ascii_lowercase()))
}

/// An absolute `http(s)://` URL without query or fragment; one trailing `/` is dropped since
/// the request's path, which starts with `/`, is appended.
fn parse_redirect_target(target: &str) -> Result<String, String> {
    let not_a_target = || {
        format!("has target {target:?}, not an http:// or https:// URL without query or fragment")
    };
    let uri: Uri = target.parse().map_err(|_| not_a_target())?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    if !scheme_ok || uri.authority().is_none() || uri.query().is_some() || target.contains('#') {
        return Err(not_a_target());
    }
    Ok(target.strip_suffix('/').unwrap_or(target).to_owned())
}

fn parse_service_cluster(value: &str) -> Result<String, String> {
    let cluster = value.trim();
    if cluster.is_empty() || cluster.chars().any(char::is_whitespace) {
        return Err(format!(
            "label {LABEL_SERVICE_CLUSTER} is {value:?}, not a cluster name"
        ));
    }
    Ok(cluster.to_owned())
}

/// An RFC 6265 cookie name: a token, so no separators, spaces or control characters.
fn parse_cookie_name(value: &str) -> Result<String, String> {
    let name = value.trim();
    let is_token = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
    if !is_token {
        return Err(format!(
            "label {LABEL_STICKY_SESSION_COOKIE} is {value:?}, not a cookie name"
        ));
    }
    Ok(name.to_owned())
}

fn parse_lb_method(value: &str) -> Result<Balance, String> {
    match value.trim() {
        "round_robin" => Ok(Balance::RoundRobin),
        "least_conn" => Ok(Balance::LeastConn),
        _ => Err(format!(
            "label {LABEL_LB_METHOD} is {value:?}, not round_robin or least_conn"
        )),
    }
}

/// A boolean label; absent is `false`.
fn parse_flag(service: &Service, key: &str) -> Result<bool, String> {
    label(service, key).map_or(Ok(false), |value| parse_bool(key, value))
}

/// The spellings Go's `strconv.ParseBool` accepts, which is what Interlock reads labels with.
pub(crate) fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("label {key} is {value:?}, not true or false")),
    }
}

/// Running now and meant to keep running: a task Swarm is stopping gets no new requests.
pub(crate) fn is_running(task: &Task) -> bool {
    let state = task.status.as_ref().and_then(|status| status.state);
    state == Some(TaskState::RUNNING) && task.desired_state == Some(TaskState::RUNNING)
}

/// The host ports published for `target_port` in host mode. Docker lists each twice (IPv4 and
/// IPv6 binds): the caller's set dedupes them.
fn host_published_ports(task: &Task, target_port: u16) -> Vec<u16> {
    let ports = task
        .status
        .as_ref()
        .and_then(|status| status.port_status.as_ref())
        .and_then(|port_status| port_status.ports.as_ref());
    ports
        .into_iter()
        .flatten()
        .filter(|port| port.target_port == Some(i64::from(target_port)))
        .filter(|port| port.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST))
        .filter_map(|port| {
            port.published_port
                .and_then(|published| u16::try_from(published).ok())
        })
        .filter(|published| *published > 0)
        .collect()
}

/// Node id → the address its tasks are reached on.
///
/// A manager can report `0.0.0.0` as `Status.Addr`; its manager address is the real one then.
pub(crate) fn node_addresses(nodes: &[Node]) -> HashMap<&str, IpAddr> {
    nodes
        .iter()
        .filter_map(|node| {
            let id = node.id.as_deref()?;
            let status_addr = node
                .status
                .as_ref()
                .and_then(|status| status.addr.as_deref())
                .and_then(|addr| addr.parse::<IpAddr>().ok())
                .filter(|addr| !addr.is_unspecified());
            let manager_addr = || {
                let addr = node.manager_status.as_ref()?.addr.as_deref()?;
                addr.parse::<SocketAddr>().ok().map(|addr| addr.ip())
            };
            Some((id, status_addr.or_else(manager_addr)?))
        })
        .collect()
}

pub(crate) fn label<'a>(service: &'a Service, key: &str) -> Option<&'a str> {
    let labels = service.spec.as_ref()?.labels.as_ref()?;
    labels.get(key).map(String::as_str)
}

pub(crate) fn service_name(service: &Service) -> String {
    service
        .spec
        .as_ref()
        .and_then(|spec| spec.name.clone())
        .or_else(|| service.id.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use bollard::models::{EndpointPortConfig, ManagerStatus, PortStatus, TaskStatus};

    use super::*;
    use crate::swarm::fixtures::{node, service};

    fn port(
        target: i64,
        published: i64,
        mode: EndpointPortConfigPublishModeEnum,
    ) -> EndpointPortConfig {
        EndpointPortConfig {
            target_port: Some(target),
            published_port: Some(published),
            publish_mode: Some(mode),
            ..Default::default()
        }
    }

    /// A task as Docker reports it: each host-mode port twice (IPv4 and IPv6 binds).
    fn task(service: &str, node: &str, state: TaskState, published: i64) -> Task {
        let host = EndpointPortConfigPublishModeEnum::HOST;
        Task {
            service_id: Some(service.to_owned()),
            node_id: Some(node.to_owned()),
            desired_state: Some(TaskState::RUNNING),
            status: Some(TaskStatus {
                state: Some(state),
                port_status: Some(PortStatus {
                    ports: Some(vec![
                        port(8080, published, host),
                        port(8080, published, host),
                    ]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn demo_labels() -> [(&'static str, &'static str); 2] {
        [(LABEL_HOSTS, "demo.local"), (LABEL_PORT, "8080")]
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn routes_of(snapshot: &SwarmSnapshot) -> RouteTable {
        route_table(snapshot, &RouteSettings::default())
    }

    /// The one route on `host`.
    fn only<'t>(table: &'t RouteTable, host: &str) -> &'t Route {
        match table.routes.get(host).map(Vec::as_slice) {
            Some([route]) => route,
            other => panic!("not one route on {host}: {other:?}"),
        }
    }

    /// The demo service's labels plus `extra`, as a snapshot with one running task.
    fn demo_with(extra: &[(&str, &str)]) -> SwarmSnapshot {
        let labels: Vec<(&str, &str)> = demo_labels()
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        SwarmSnapshot {
            services: vec![service("demo", "1", &labels)],
            tasks: vec![task("demo", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "10.0.0.1")],
        }
    }

    /// Why `service` was rejected.
    fn reason<'t>(table: &'t RouteTable, service: &str) -> &'t str {
        table
            .rejected
            .iter()
            .find(|rejected| rejected.service == service)
            .map(|rejected| rejected.reason.as_str())
            .unwrap_or_else(|| panic!("{service} not rejected: {table:?}"))
    }

    /// Why the demo service with `extra` labels is rejected (it must be).
    fn rejection(extra: &[(&str, &str)]) -> String {
        let table = routes_of(&demo_with(extra));
        assert!(table.routes.is_empty(), "{extra:?} routed: {table:?}");
        reason(&table, "demo").to_owned()
    }

    #[test]
    fn seed_service_routes_to_node_address_and_published_port() {
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![task("demo", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "172.20.0.4")],
        };
        let table = routes_of(&snapshot);
        assert_eq!(table.rejected, vec![]);
        assert_eq!(
            table.routes["demo.local"],
            [Route {
                service: "demo".into(),
                context_root: "/".into(),
                context_root_rewrite: false,
                endpoints: vec![addr("172.20.0.4:32768")],
                balance: Balance::RoundRobin,
                ssl_only: false,
                redirects: vec![],
                transport: Transport::default(),
            }]
        );
        assert_eq!(table.default_backend, None);
    }

    #[test]
    fn duplicate_v4_v6_port_entries_become_one_endpoint_and_endpoints_are_sorted() {
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![
                task("demo", "n2", TaskState::RUNNING, 32769),
                task("demo", "n1", TaskState::RUNNING, 32768),
                task("demo", "n1", TaskState::RUNNING, 32770),
            ],
            nodes: vec![node("n1", "10.0.0.1"), node("n2", "10.0.0.2")],
        };
        let table = routes_of(&snapshot);
        let endpoints = &only(&table, "demo.local").endpoints;
        assert_eq!(
            endpoints,
            &[
                addr("10.0.0.1:32768"),
                addr("10.0.0.1:32770"),
                addr("10.0.0.2:32769")
            ]
        );
    }

    #[test]
    fn only_running_tasks_that_stay_running_are_endpoints() {
        let mut stopping = task("demo", "n1", TaskState::RUNNING, 32771);
        stopping.desired_state = Some(TaskState::SHUTDOWN);
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![
                task("demo", "n1", TaskState::RUNNING, 32768),
                task("demo", "n1", TaskState::STARTING, 32769),
                task("demo", "n1", TaskState::FAILED, 32770),
                stopping,
            ],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        assert_eq!(
            only(&routes_of(&snapshot), "demo.local").endpoints,
            vec![addr("10.0.0.1:32768")]
        );
    }

    #[test]
    fn a_service_without_running_tasks_keeps_its_hosts_with_no_endpoints() {
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![task("demo", "n1", TaskState::PENDING, 0)],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = routes_of(&snapshot);
        assert_eq!(only(&table, "demo.local").endpoints, vec![]);
        assert_eq!(table.rejected, vec![]);
    }

    #[test]
    fn several_hosts_share_the_service_endpoints_case_and_spaces_ignored() {
        let snapshot = SwarmSnapshot {
            services: vec![service(
                "web",
                "1",
                &[
                    (LABEL_HOSTS, " App.Example.org, www.example.org ,"),
                    (LABEL_PORT, "8080"),
                ],
            )],
            tasks: vec![task("web", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = routes_of(&snapshot);
        assert_eq!(
            table.routes.keys().collect::<Vec<_>>(),
            ["app.example.org", "www.example.org"]
        );
        assert_eq!(
            only(&table, "www.example.org").endpoints,
            vec![addr("10.0.0.1:32768")]
        );
    }

    #[test]
    fn bad_labels_disable_only_their_service_with_a_reason() {
        let snapshot = SwarmSnapshot {
            services: vec![
                service("good", "1", &demo_labels()),
                service("no-port", "2", &[(LABEL_HOSTS, "a.local")]),
                service(
                    "bad-port",
                    "3",
                    &[(LABEL_HOSTS, "b.local"), (LABEL_PORT, "http")],
                ),
                service(
                    "zero-port",
                    "4",
                    &[(LABEL_HOSTS, "c.local"), (LABEL_PORT, "0")],
                ),
                service(
                    "no-host",
                    "5",
                    &[(LABEL_HOSTS, " , "), (LABEL_PORT, "8080")],
                ),
                service(
                    "bad-host",
                    "6",
                    &[(LABEL_HOSTS, "d.local/x"), (LABEL_PORT, "8080")],
                ),
                service("unlabelled", "7", &[]),
            ],
            tasks: vec![task("good", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = routes_of(&snapshot);
        assert_eq!(table.routes.keys().collect::<Vec<_>>(), ["demo.local"]);
        let reasons: BTreeMap<&str, &str> = table
            .rejected
            .iter()
            .map(|r| (r.service.as_str(), r.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert_eq!(reasons["no-port"], "label com.docker.lb.port is missing");
        assert_eq!(
            reasons["bad-port"],
            "label com.docker.lb.port is \"http\", not a port number (1-65535)"
        );
        assert!(reasons["zero-port"].contains("not a port number"));
        assert_eq!(
            reasons["no-host"],
            "label com.docker.lb.hosts names no host"
        );
        assert!(reasons["bad-host"].contains("invalid host name \"d.local/x\""));
    }

    #[test]
    fn transport_labels_reach_every_host_of_the_service() {
        let labels = [
            (LABEL_HOSTS, "a.example.org,b.example.org"),
            (LABEL_PORT, "8080"),
            (LABEL_SSL_CERT, "web.crt"),
            (LABEL_SSL_KEY, "web.key"),
            (LABEL_WEBSOCKET_ENDPOINTS, "/ws"),
        ];
        let snapshot = SwarmSnapshot {
            services: vec![
                service("web", "1", &labels),
                service(
                    "broken",
                    "2",
                    &[
                        (LABEL_HOSTS, "c.example.org"),
                        (LABEL_PORT, "8080"),
                        (LABEL_SSL_BACKEND, "maybe"),
                    ],
                ),
            ],
            tasks: vec![],
            nodes: vec![],
        };
        let table = route_table(&snapshot, &RouteSettings::default());
        for host in ["a.example.org", "b.example.org"] {
            let transport = &table.routes[host][0].transport;
            let certificate = transport.certificate.as_ref().unwrap();
            assert_eq!(
                (certificate.cert.as_str(), certificate.key.as_str()),
                ("web.crt", "web.key")
            );
            assert_eq!(transport.websocket_endpoints, ["/ws"]);
        }
        assert_eq!(table.routes.len(), 2);
        assert_eq!(
            table.rejected[0].reason,
            "label com.docker.lb.ssl_backend is \"maybe\", not true or false"
        );
    }

    #[test]
    fn ingress_published_service_is_rejected_with_the_fix() {
        let mut ingress = task("demo", "n1", TaskState::RUNNING, 30000);
        let ports = &mut ingress
            .status
            .as_mut()
            .unwrap()
            .port_status
            .as_mut()
            .unwrap()
            .ports;
        *ports = Some(vec![port(
            8080,
            30000,
            EndpointPortConfigPublishModeEnum::INGRESS,
        )]);
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![ingress],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = routes_of(&snapshot);
        assert!(table.routes.is_empty());
        assert!(table.rejected[0]
            .reason
            .contains("--publish mode=host,target=8080"));
    }

    #[test]
    fn the_older_service_keeps_a_contested_host() {
        let snapshot = SwarmSnapshot {
            services: vec![
                service("newer", "2026-02-01T00:00:00Z", &demo_labels()),
                service("older", "2026-01-01T00:00:00Z", &demo_labels()),
            ],
            tasks: vec![],
            nodes: vec![],
        };
        let table = routes_of(&snapshot);
        assert_eq!(only(&table, "demo.local").service, "older");
        assert_eq!(table.rejected[0].service, "newer");
        assert_eq!(
            table.rejected[0].reason,
            "host demo.local is already served by service older"
        );
    }

    #[test]
    fn a_manager_reporting_0_0_0_0_is_reached_on_its_manager_address() {
        let mut manager = node("m1", "0.0.0.0");
        manager.manager_status = Some(ManagerStatus {
            addr: Some("10.0.0.9:2377".into()),
            ..Default::default()
        });
        let snapshot = SwarmSnapshot {
            services: vec![service("demo", "1", &demo_labels())],
            tasks: vec![task("demo", "m1", TaskState::RUNNING, 32768)],
            nodes: vec![manager],
        };
        assert_eq!(
            only(&routes_of(&snapshot), "demo.local").endpoints,
            vec![addr("10.0.0.9:32768")]
        );
    }

    #[test]
    fn wildcard_hosts_are_kept_as_patterns() {
        let table = routes_of(&demo_with(&[(LABEL_HOSTS, "*.Example.org, a.example.org")]));
        assert_eq!(
            table.routes.keys().collect::<Vec<_>>(),
            ["*.example.org", "a.example.org"]
        );
        for bad in [
            "a*.example.org",
            "*",
            "*.",
            "x.*.org",
            "**.org",
            "*example.org",
            "a..b",
        ] {
            let reason = rejection(&[(LABEL_HOSTS, bad)]);
            assert!(
                reason.contains(&format!("invalid host name {bad:?}")),
                "{bad}: {reason}"
            );
        }
    }

    #[test]
    fn services_share_a_host_by_context_root_longest_first() {
        let root = service("web", "1", &demo_labels());
        let api = service(
            "api",
            "2",
            &[
                (LABEL_HOSTS, "demo.local"),
                (LABEL_PORT, "8080"),
                (LABEL_CONTEXT_ROOT, "/api/"),
                (LABEL_CONTEXT_ROOT_REWRITE, "true"),
            ],
        );
        let v2 = service(
            "v2",
            "3",
            &[
                (LABEL_HOSTS, "demo.local"),
                (LABEL_PORT, "8080"),
                (LABEL_CONTEXT_ROOT, "/api/v2"),
            ],
        );
        let same_root = service(
            "api-copy",
            "4",
            &[
                (LABEL_HOSTS, "other.local,demo.local"),
                (LABEL_PORT, "8080"),
                (LABEL_CONTEXT_ROOT, "/api"),
            ],
        );
        let snapshot = SwarmSnapshot {
            services: vec![same_root, v2, api, root],
            tasks: vec![],
            nodes: vec![],
        };
        let table = routes_of(&snapshot);
        let on_host: Vec<(&str, &str, bool)> = table.routes["demo.local"]
            .iter()
            .map(|r| {
                (
                    r.service.as_str(),
                    r.context_root.as_str(),
                    r.context_root_rewrite,
                )
            })
            .collect();
        assert_eq!(
            on_host,
            [
                ("v2", "/api/v2", false),
                ("api", "/api", true),
                ("web", "/", false)
            ]
        );
        assert_eq!(
            reason(&table, "api-copy"),
            "host demo.local with context root /api is already served by service api"
        );
        assert!(
            !table.routes.contains_key("other.local"),
            "a rejected service claims none of its hosts"
        );
    }

    #[test]
    fn bad_context_roots_are_rejected_with_the_rule_broken() {
        let cases = [
            ("app", "it must start with /"),
            ("/a//b", "empty, . or .. segment"),
            ("/a/../b", "empty, . or .. segment"),
            ("/a b", "may appear in a path"),
            ("/a?x=1", "may appear in a path"),
            ("/a#x", "may appear in a path"),
            ("/caf\u{e9}", "may appear in a path"),
            ("/%zz", "may appear in a path"),
        ];
        for (value, why) in cases {
            let reason = rejection(&[(LABEL_CONTEXT_ROOT, value)]);
            let prefix = format!("label {LABEL_CONTEXT_ROOT} is {value:?}: ");
            assert!(reason.starts_with(&prefix), "{reason}");
            assert!(reason.contains(why), "{value}: {reason}");
        }
        for (value, parsed) in [("/", "/"), ("//", "/"), (" /a%2Fb:@x/ ", "/a%2Fb:@x")] {
            let table = routes_of(&demo_with(&[(LABEL_CONTEXT_ROOT, value)]));
            assert_eq!(only(&table, "demo.local").context_root, parsed, "{value:?}");
        }
    }

    #[test]
    fn boolean_labels_take_gos_spellings_and_reject_others() {
        for (value, expected) in [
            ("true", true),
            ("1", true),
            ("T", true),
            ("False", false),
            ("0", false),
        ] {
            let table = routes_of(&demo_with(&[
                (LABEL_SSL_ONLY, value),
                (LABEL_CONTEXT_ROOT_REWRITE, value),
            ]));
            let route = only(&table, "demo.local");
            assert_eq!(
                (route.ssl_only, route.context_root_rewrite),
                (expected, expected)
            );
        }
        for key in [
            LABEL_SSL_ONLY,
            LABEL_CONTEXT_ROOT_REWRITE,
            LABEL_DEFAULT_BACKEND,
            LABEL_IP_HASH,
        ] {
            assert_eq!(
                rejection(&[(key, "yes")]),
                format!("label {key} is \"yes\", not true or false")
            );
        }
    }

    #[test]
    fn redirects_are_source_target_pairs() {
        let table = routes_of(&demo_with(&[
            (LABEL_HOSTS, "old.local,new.local,*.example.org"),
            (
                LABEL_REDIRECTS,
                " http://Old.local , http://new.local ;https://a.example.org/,https://new.local/v2/;",
            ),
        ]));
        assert_eq!(
            only(&table, "old.local").redirects,
            [
                Redirect {
                    source_scheme: Scheme::Http,
                    source_host: "old.local".into(),
                    target: "http://new.local".into(),
                },
                Redirect {
                    source_scheme: Scheme::Https,
                    source_host: "a.example.org".into(),
                    target: "https://new.local/v2".into(),
                },
            ]
        );
    }

    #[test]
    fn bad_redirects_are_rejected_with_the_pair() {
        let hosts = (LABEL_HOSTS, "old.local,new.local");
        let cases = [
            ("http://old.local", "is not a source,target pair"),
            (
                "old.local,http://new.local",
                "not http://host or https://host",
            ),
            (
                "ftp://old.local,http://new.local",
                "not http://host or https://host",
            ),
            (
                "http://old.local:8080,http://new.local",
                "(no port, path or query)",
            ),
            (
                "http://old.local/x,http://new.local",
                "(no port, path or query)",
            ),
            ("http://old.local,/new", "not an http:// or https:// URL"),
            (
                "http://old.local,new.local",
                "not an http:// or https:// URL",
            ),
            (
                "http://old.local,http://new.local/?a=1",
                "not an http:// or https:// URL",
            ),
            (
                "http://old.local,http://new.local/#top",
                "not an http:// or https:// URL",
            ),
            (
                "http://old.local,ftp://new.local",
                "not an http:// or https:// URL",
            ),
            (
                "http://elsewhere.local,http://new.local",
                "which is not in com.docker.lb.hosts",
            ),
            (
                "http://old.local,http://new.local;http://old.local,http://x.local",
                "repeats a source",
            ),
            (" ; ", "names no redirect"),
        ];
        for (value, why) in cases {
            let reason = rejection(&[hosts, (LABEL_REDIRECTS, value)]);
            assert!(
                reason.starts_with("label com.docker.lb.redirects"),
                "{reason}"
            );
            assert!(reason.contains(why), "{value}: {reason}");
        }
    }

    #[test]
    fn one_default_backend_serves_unknown_hosts_later_ones_are_rejected() {
        let fallback = service(
            "fallback",
            "1",
            &[
                (LABEL_DEFAULT_BACKEND, "true"),
                (LABEL_PORT, "8080"),
                (LABEL_REDIRECTS, "http://typo.local,http://demo.local"),
            ],
        );
        let second = service(
            "second",
            "2",
            &[(LABEL_DEFAULT_BACKEND, "true"), (LABEL_PORT, "8080")],
        );
        let not_default = service(
            "not-default",
            "3",
            &[(LABEL_DEFAULT_BACKEND, "false"), (LABEL_PORT, "8080")],
        );
        let snapshot = SwarmSnapshot {
            services: vec![
                second,
                not_default,
                fallback,
                service("demo", "4", &demo_labels()),
            ],
            tasks: vec![task("fallback", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "10.0.0.1")],
        };
        let table = routes_of(&snapshot);
        let default = table.default_backend.as_ref().expect("a default backend");
        assert_eq!(default.service, "fallback");
        assert_eq!(default.endpoints, [addr("10.0.0.1:32768")]);
        assert_eq!(default.redirects[0].source_host, "typo.local");
        assert_eq!(table.routes.keys().collect::<Vec<_>>(), ["demo.local"]);
        assert_eq!(
            reason(&table, "second"),
            "service fallback already is the default backend (com.docker.lb.default_backend), \
             and there can be only one"
        );
        assert!(reason(&table, "not-default").contains("label com.docker.lb.hosts is missing"));
    }

    #[test]
    fn balance_comes_from_one_label_else_the_ip_hash_setting() {
        let balance_of = |labels: &[(&str, &str)], ip_hash: bool| {
            let settings = RouteSettings {
                ip_hash,
                ..RouteSettings::default()
            };
            let table = route_table(&demo_with(labels), &settings);
            only(&table, "demo.local").balance.clone()
        };
        let sticky = Balance::StickyCookie {
            cookie: "session".into(),
        };
        assert_eq!(balance_of(&[], false), Balance::RoundRobin);
        assert_eq!(balance_of(&[], true), Balance::IpHash);
        assert_eq!(
            balance_of(&[(LABEL_STICKY_SESSION_COOKIE, " session ")], true),
            sticky
        );
        assert_eq!(
            balance_of(&[(LABEL_IP_HASH, "true")], false),
            Balance::IpHash
        );
        assert_eq!(
            balance_of(&[(LABEL_IP_HASH, "false")], true),
            Balance::RoundRobin
        );
        assert_eq!(
            balance_of(&[(LABEL_LB_METHOD, "least_conn")], true),
            Balance::LeastConn
        );
        assert_eq!(
            balance_of(&[(LABEL_LB_METHOD, "round_robin")], true),
            Balance::RoundRobin
        );
        assert_eq!(
            balance_of(
                &[
                    (LABEL_STICKY_SESSION_COOKIE, "session"),
                    (LABEL_IP_HASH, "false")
                ],
                false
            ),
            sticky
        );
    }

    #[test]
    fn conflicting_or_bad_balance_labels_are_rejected() {
        assert_eq!(
            rejection(&[(LABEL_STICKY_SESSION_COOKIE, "s"), (LABEL_IP_HASH, "true")]),
            "labels com.docker.lb.sticky_session_cookie and com.docker.lb.ip_hash both choose \
             how requests are balanced: keep one"
        );
        assert!(
            rejection(&[(LABEL_IP_HASH, "1"), (LABEL_LB_METHOD, "least_conn")])
                .contains("both choose")
        );
        for bad in ["", "a b", "a;b", "a=b", "caf\u{e9}"] {
            assert_eq!(
                rejection(&[(LABEL_STICKY_SESSION_COOKIE, bad)]),
                format!("label {LABEL_STICKY_SESSION_COOKIE} is {bad:?}, not a cookie name")
            );
        }
        assert_eq!(
            rejection(&[(LABEL_LB_METHOD, "fastest")]),
            "label com.docker.lb.lb_method is \"fastest\", not round_robin or least_conn"
        );
    }

    #[test]
    fn a_service_cluster_proxy_serves_only_its_cluster() {
        let east = service(
            "east",
            "1",
            &[
                (LABEL_HOSTS, "a.local"),
                (LABEL_PORT, "8080"),
                (LABEL_SERVICE_CLUSTER, "east"),
            ],
        );
        let west = service(
            "west",
            "2",
            &[
                (LABEL_HOSTS, "a.local"),
                (LABEL_PORT, "8080"),
                (LABEL_SERVICE_CLUSTER, "west"),
            ],
        );
        let bad = service(
            "bad",
            "3",
            &[
                (LABEL_HOSTS, "b.local"),
                (LABEL_PORT, "8080"),
                (LABEL_SERVICE_CLUSTER, " "),
            ],
        );
        let unclustered = service(
            "none",
            "4",
            &[(LABEL_HOSTS, "c.local"), (LABEL_PORT, "8080")],
        );
        let snapshot = SwarmSnapshot {
            services: vec![east, west, bad, unclustered],
            tasks: vec![],
            nodes: vec![],
        };
        let served = |cluster: Option<&str>| {
            let settings = RouteSettings {
                service_cluster: cluster.map(Into::into),
                ..RouteSettings::default()
            };
            let table = route_table(&snapshot, &settings);
            let services: BTreeSet<String> = table
                .routes
                .values()
                .flatten()
                .map(|route| route.service.clone())
                .collect();
            let rejected: Vec<String> = table.rejected.iter().map(|r| r.service.clone()).collect();
            (services.into_iter().collect::<Vec<_>>(), rejected)
        };
        assert_eq!(
            served(Some("west")),
            (vec!["west".to_owned()], vec!["bad".to_owned()])
        );
        assert_eq!(
            served(Some("east")),
            (vec!["east".to_owned()], vec!["bad".to_owned()])
        );
        let (all, rejected) = served(None);
        assert_eq!(all, ["east", "none"]);
        assert_eq!(
            rejected,
            ["bad", "west"],
            "west contests a.local when all are served"
        );
        let table = route_table(&snapshot, &RouteSettings::default());
        assert_eq!(
            reason(&table, "bad"),
            "label com.docker.lb.service_cluster is \" \", not a cluster name"
        );
    }

    #[test]
    fn vip_backend_mode_and_overlay_network_are_rejected_for_host_mode() {
        let vip = rejection(&[(LABEL_BACKEND_MODE, "vip")]);
        assert!(
            vip.starts_with(
                "label com.docker.lb.backend_mode=vip routes to the service's virtual IP"
            ),
            "{vip}"
        );
        assert!(vip.contains("host mode does not have"), "{vip}");
        assert!(rejection(&[(LABEL_BACKEND_MODE, "dnsrr")]).contains("not task"));
        let network = rejection(&[(LABEL_NETWORK, "app-net")]);
        assert!(
            network.contains("which host mode does not use"),
            "{network}"
        );
        let task_mode = routes_of(&demo_with(&[(LABEL_BACKEND_MODE, "task")]));
        assert!(task_mode.rejected.is_empty(), "{task_mode:?}");
    }

    #[test]
    fn a_bad_value_in_any_label_disables_only_its_service() {
        let bad_values = [
            (LABEL_HOSTS, "a b"),
            (LABEL_PORT, "x"),
            (LABEL_CONTEXT_ROOT, "x"),
            (LABEL_CONTEXT_ROOT_REWRITE, "x"),
            (LABEL_REDIRECTS, "x"),
            (LABEL_SSL_ONLY, "x"),
            (LABEL_DEFAULT_BACKEND, "x"),
            (LABEL_STICKY_SESSION_COOKIE, "a b"),
            (LABEL_IP_HASH, "x"),
            (LABEL_LB_METHOD, "x"),
            (LABEL_SERVICE_CLUSTER, ""),
            (LABEL_BACKEND_MODE, "vip"),
            (LABEL_NETWORK, "x"),
        ];
        let mut services = vec![service("good", "0", &demo_labels())];
        for (index, (key, value)) in bad_values.iter().enumerate() {
            let host = format!("bad{index}.local");
            let mut labels = vec![(LABEL_HOSTS, host.as_str()), (LABEL_PORT, "8080")];
            labels.retain(|(k, _)| k != key);
            labels.push((key, value));
            services.push(service(
                &format!("bad{index}"),
                &format!("{}", index + 1),
                &labels,
            ));
        }
        let table = routes_of(&SwarmSnapshot {
            services,
            tasks: vec![task("good", "n1", TaskState::RUNNING, 32768)],
            nodes: vec![node("n1", "10.0.0.1")],
        });
        assert_eq!(table.routes.keys().collect::<Vec<_>>(), ["demo.local"]);
        assert_eq!(table.default_backend, None);
        assert_eq!(
            table.rejected.len(),
            bad_values.len(),
            "{:?}",
            table.rejected
        );
        for (index, (key, _)) in bad_values.iter().enumerate() {
            let reason = reason(&table, &format!("bad{index}"));
            assert!(reason.contains(key), "{key}: {reason}");
        }
    }

    #[test]
    fn the_route_table_serialises_for_the_admin_endpoint() {
        let table = routes_of(&demo_with(&[
            (LABEL_STICKY_SESSION_COOKIE, "session"),
            (LABEL_REDIRECTS, "http://demo.local,https://demo.local"),
        ]));
        let json = serde_json::to_value(&table).unwrap();
        let route = &json["routes"]["demo.local"][0];
        assert_eq!(route["endpoints"][0], "10.0.0.1:32768");
        assert_eq!(route["context_root"], "/");
        assert_eq!(route["balance"]["method"], "sticky_cookie");
        assert_eq!(route["balance"]["cookie"], "session");
        assert_eq!(route["redirects"][0]["source_scheme"], "http");
        assert_eq!(json["default_backend"], serde_json::Value::Null);
    }
}
