//! The `[Extensions.<name>]` a process serves, and what its keys become: the L7 proxy's
//! settings, the route tables' settings and the ports the L7 proxy holds. `xlb run`, `xlb proxy`
//! and `xlb controller` read the same config file the same way.

use anyhow::bail;

use crate::{
    config::{Config, Extension, ProxyConfig},
    proxy::{BackendTlsClients, ProxySettings},
    routes::RouteSettings,
};

/// Where the access log goes without `AccessLogPath`: standard output, as Interlock's proxy
/// container logs it.
const DEFAULT_ACCESS_LOG: &str = "/dev/stdout";
/// `AccessLogPath = "off"`: no access log, as nginx's `access_log off`.
const ACCESS_LOG_OFF: &str = "off";

/// The `[Extensions.<name>]` to serve: the one asked for, else the only one, else `default`.
pub fn select_extension(
    config: &Config,
    wanted: Option<&str>,
) -> anyhow::Result<(String, Extension)> {
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

/// The L7 proxy's ports: `PublishedPort` and `PublishedSSLPort`.
pub fn l7_ports(extension: &Extension) -> Vec<u16> {
    [Some(extension.published_port), extension.published_ssl_port]
        .into_iter()
        .flatten()
        .collect()
}

/// The proxy's settings: the config's values where given, Interlock's defaults otherwise.
pub fn proxy_settings(config: &ProxyConfig, proxy_id: String) -> anyhow::Result<ProxySettings> {
    let defaults = ProxySettings::default();
    let limits = &defaults.handler.limits;
    let upstream = &defaults.upstream;
    let mut settings = ProxySettings {
        proxy_id,
        max_connections: config.max_connections.unwrap_or(defaults.max_connections),
        backend_tls: BackendTlsClients::new(config.ssl_backend_ca_file.as_deref())?,
        drain_timeout: config.drain_timeout.unwrap_or(defaults.drain_timeout),
        access_log_path: match &config.access_log_path {
            Some(path) if path.as_os_str() == ACCESS_LOG_OFF => None,
            Some(path) => Some(path.clone()),
            None => Some(DEFAULT_ACCESS_LOG.into()),
        },
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
    settings.handler.limits.send_timeout =
        config.client_send_timeout.unwrap_or(limits.send_timeout);
    settings.handler.underscores_in_headers = config
        .underscores_in_headers
        .unwrap_or(defaults.handler.underscores_in_headers);
    settings.upstream.connect_timeout = config.connect_timeout.unwrap_or(upstream.connect_timeout);
    settings.upstream.send_timeout = config.send_timeout.unwrap_or(upstream.send_timeout);
    settings.upstream.read_timeout = config.read_timeout.unwrap_or(upstream.read_timeout);
    Ok(settings)
}

/// What the extension's config changes in routing: `ServiceCluster` and `IPHash`.
pub fn route_settings(extension: &Extension) -> RouteSettings {
    RouteSettings {
        service_cluster: extension.service_cluster.clone(),
        ip_hash: extension.proxy.ip_hash,
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::config;

    #[test]
    fn absent_proxy_keys_take_interlock_defaults() {
        let settings = proxy_settings(&ProxyConfig::default(), "lb-1".to_owned()).unwrap();
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
    fn access_log_off_writes_no_access_log() {
        let config = ProxyConfig {
            access_log_path: Some("off".into()),
            ..ProxyConfig::default()
        };
        let settings = proxy_settings(&config, "lb-1".to_owned()).unwrap();
        assert_eq!(settings.access_log_path, None);
    }

    #[test]
    fn proxy_keys_reach_the_proxy_settings() {
        let config = ProxyConfig {
            max_connections: Some(10),
            connect_timeout: Some(Duration::from_secs(1)),
            send_timeout: Some(Duration::from_secs(2)),
            read_timeout: Some(Duration::from_secs(3)),
            keepalive_timeout: Some(Duration::from_secs(4)),
            client_send_timeout: Some(Duration::from_secs(6)),
            client_max_body_size: Some(512 << 10),
            underscores_in_headers: Some(true),
            access_log_path: Some("/var/log/xlb/access.log".into()),
            drain_timeout: Some(Duration::from_secs(5)),
            ..ProxyConfig::default()
        };
        let settings = proxy_settings(&config, "lb-1".to_owned()).unwrap();
        assert_eq!(settings.max_connections, 10);
        assert_eq!(settings.upstream.connect_timeout, Duration::from_secs(1));
        assert_eq!(settings.upstream.send_timeout, Duration::from_secs(2));
        assert_eq!(settings.upstream.read_timeout, Duration::from_secs(3));
        let limits = &settings.handler.limits;
        assert_eq!(limits.keepalive_timeout, Duration::from_secs(4));
        assert_eq!(limits.send_timeout, Duration::from_secs(6));
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
        let settings = proxy_settings(&config, "lb-1".to_owned()).unwrap();
        assert_eq!(settings.handler.limits.max_body_size, None);
    }

    #[test]
    fn service_cluster_and_ip_hash_reach_the_route_table() {
        let source = "[Extensions.east]\nServiceCluster = \"east\"\n\
                      [Extensions.east.Config]\nIPHash = true\n";
        let config = config::parse(source, "config.toml").unwrap();
        let (_, extension) = select_extension(&config, None).unwrap();
        assert_eq!(
            route_settings(&extension),
            RouteSettings {
                service_cluster: Some("east".into()),
                ip_hash: true,
            }
        );
        assert_eq!(
            route_settings(&Extension::default()),
            RouteSettings::default()
        );
    }
}
