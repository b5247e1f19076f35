//! `xlb check-config FILE`: reads a config as `xlb run` would, without touching the machine,
//! and reports what it found. A problem fails it with the message `xlb run` would stop with
//! (a syntax or value error at its file:line:column).

use std::{fmt::Write as _, path::Path};

use crate::{
    config::{self, Config},
    extension::proxy_settings,
};

/// The report on a valid config: its extensions and what each serves, then the keys xlb
/// ignores. An error for an invalid one.
pub fn check(path: &Path) -> anyhow::Result<String> {
    let config = config::load(path)?;
    for (name, extension) in &config.extensions {
        // What `xlb run` checks before serving: the proxy's settings and the CA file.
        proxy_settings(&extension.proxy, String::new())
            .map_err(|error| error.context(format!("[Extensions.{name}]")))?;
    }
    Ok(report(path, &config))
}

fn report(path: &Path, config: &Config) -> String {
    let mut report = format!("{}: ok\n", path.display());
    match config.listen_addr {
        Some(addr) => {
            let _ = writeln!(report, "admin endpoint (ListenAddr): {addr}");
        }
        None => report.push_str("admin endpoint (ListenAddr): none\n"),
    }
    let _ = writeln!(report, "Docker (DockerURL): {}", config.docker_url);
    for (name, extension) in &config.extensions {
        let ssl = extension
            .published_ssl_port
            .map_or(String::new(), |port| format!(", SSL port {port}"));
        let cluster = extension
            .service_cluster
            .as_deref()
            .map_or(String::new(), |cluster| {
                format!(", service cluster {cluster:?}")
            });
        let _ = writeln!(
            report,
            "[Extensions.{name}]: HTTP port {}{ssl}{cluster}",
            extension.published_port
        );
    }
    for key in &config.ignored_keys {
        let _ = writeln!(report, "ignored (not used by xlb): {key}");
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-check-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_valid_config_is_reported_with_its_extensions_and_ignored_keys() {
        let path = write(
            "good.toml",
            "ListenAddr = \":8080\"\nPollInterval = \"3s\"\n[Extensions.default]\n\
             Image = \"docker/ucp-interlock-extension:3.1.7\"\nPublishedPort = 80\n\
             PublishedSSLPort = 443\n",
        );
        let report = check(&path).unwrap();
        assert!(
            report.starts_with(&format!("{}: ok\n", path.display())),
            "{report}"
        );
        assert!(
            report.contains("admin endpoint (ListenAddr): 0.0.0.0:8080"),
            "{report}"
        );
        assert!(
            report.contains("[Extensions.default]: HTTP port 80, SSL port 443"),
            "{report}"
        );
        assert!(
            report.contains("ignored (not used by xlb): Extensions.default.Image"),
            "{report}"
        );
    }

    #[test]
    fn an_invalid_value_fails_at_its_line_and_column() {
        let path = write(
            "bad.toml",
            "ListenAddr = \":8080\"\n[Extensions.default.Config]\nMaxConnections = \"many\"\n",
        );
        let error = format!("{:#}", check(&path).unwrap_err());
        assert!(error.contains("bad.toml:3:18"), "{error}");
    }

    #[test]
    fn a_missing_backend_ca_file_fails_naming_the_extension() {
        let path = write(
            "ca.toml",
            "[Extensions.edge.Config]\nSSLBackendCAFile = \"/nonexistent/ca.pem\"\n",
        );
        let error = format!("{:#}", check(&path).unwrap_err());
        assert!(error.contains("[Extensions.edge]"), "{error}");
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
