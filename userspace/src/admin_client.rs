//! `xlb status` and `xlb routes`: a running xlb's admin endpoint ([`crate::admin`]) asked over
//! HTTP and its answers printed as aligned tables, or as the JSON received (`--json`).
//!
//! The endpoint is `--admin URL`, else the `ListenAddr` of the config, an unspecified address
//! (`:8080`, `[::]:8080`) meaning this machine's loopback. Formatting is pure: the answers in,
//! the text out.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::{net::TcpStream, runtime::Runtime};

use crate::{
    admin_report::{format_routes, format_status, SnapshotOnly},
    config,
};

/// The config read for its `ListenAddr` when neither `--admin` nor `--config` is given.
pub const DEFAULT_CONFIG: &str = "/etc/xlb/config.toml";
/// How long connecting and reading one answer may take, together.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read: `/routes` of 10 000 services is a few MiB.
const MAX_ANSWER_BYTES: usize = 64 << 20;
/// Where the admin endpoint is: `http://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    authority: String,
}

impl fmt::Display for AdminUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

impl AdminUrl {
    /// `admin` (`http://HOST[:PORT]` or `HOST:PORT`) if given, else the `ListenAddr` of the
    /// config at `config`.
    pub fn locate(admin: Option<&str>, config: &Path) -> anyhow::Result<AdminUrl> {
        match admin {
            Some(text) => AdminUrl::parse(text),
            None => {
                let loaded = config::load(config).with_context(|| {
                    format!(
                        "finding the admin endpoint in {} (or give its URL with --admin)",
                        config.display()
                    )
                })?;
                match loaded.listen_addr {
                    Some(addr) => Ok(AdminUrl::of_listen_addr(addr)),
                    None => bail!(
                        "{} has no ListenAddr, so it names no admin endpoint: give its URL \
                         with --admin http://HOST:PORT",
                        config.display()
                    ),
                }
            }
        }
    }

    fn parse(text: &str) -> anyhow::Result<AdminUrl> {
        let uri: Uri = text
            .parse()
            .with_context(|| format!("--admin {text:?} is not a URL"))?;
        match uri.scheme_str() {
            None | Some("http") => {}
            Some(other) => bail!("--admin {text:?}: {other}:// is not served, only http://"),
        }
        if !matches!(uri.path(), "" | "/") {
            bail!("--admin {text:?}: give the endpoint's http://HOST:PORT, without a path");
        }
        let Some(authority) = uri.authority() else {
            bail!("--admin {text:?} names no host");
        };
        let authority = match authority.port_u16() {
            Some(_) => authority.as_str().to_owned(),
            None => format!("{}:80", authority.host()),
        };
        Ok(AdminUrl { authority })
    }

    /// Where a client on this machine reaches an endpoint listening on `addr`.
    fn of_listen_addr(addr: SocketAddr) -> AdminUrl {
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        AdminUrl {
            authority: SocketAddr::new(ip, addr.port()).to_string(),
        }
    }
}

/// `xlb routes`: the route tables served, as tables or as `/routes`' JSON.
pub fn routes(url: &AdminUrl, json: bool) -> anyhow::Result<String> {
    let client = AdminClient::new(url)?;
    let answer = client.get("/routes")?;
    if json {
        return client.json_text("/routes", &answer);
    }
    Ok(format_routes(&client.parse("/routes", &answer)?))
}

/// `xlb status`: the snapshot served, the proxy's workers, XDP and the L4 connection table, as
/// tables or as `/stats`' JSON.
pub fn status(url: &AdminUrl, json: bool) -> anyhow::Result<String> {
    let client = AdminClient::new(url)?;
    let stats = client.get("/stats")?;
    if json {
        return client.json_text("/stats", &stats);
    }
    let routes: SnapshotOnly = client.parse("/routes", &client.get("/routes")?)?;
    Ok(format_status(
        &routes.snapshot,
        &client.parse("/stats", &stats)?,
    ))
}

/// An HTTP/1.1 client of one admin endpoint, on a runtime of its own.
struct AdminClient<'a> {
    url: &'a AdminUrl,
    runtime: Runtime,
}

impl<'a> AdminClient<'a> {
    fn new(url: &'a AdminUrl) -> anyhow::Result<AdminClient<'a>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the HTTP client's runtime")?;
        Ok(AdminClient { url, runtime })
    }

    /// `GET path`'s body; an error unless it answers 2xx within [`TIMEOUT`].
    fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        let (status, body) = self
            .runtime
            .block_on(async { tokio::time::timeout(TIMEOUT, self.exchange(path)).await })
            .map_err(|_| anyhow!("no answer within {} s", TIMEOUT.as_secs()))
            .and_then(|answer| answer)
            .with_context(|| format!("cannot reach the admin endpoint at {}", self.url))?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&body);
            let body = body.trim();
            let detail = if body.is_empty() {
                String::new()
            } else {
                format!(": {body}")
            };
            bail!(
                "the admin endpoint at {} answered GET {path} with {status}{detail}",
                self.url
            );
        }
        Ok(body)
    }

    async fn exchange(&self, path: &str) -> anyhow::Result<(http::StatusCode, Bytes)> {
        let authority = &self.url.authority;
        let stream = TcpStream::connect(authority.as_str())
            .await
            .with_context(|| format!("connecting to {authority}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .context("HTTP handshake")?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, authority)
            .body(Empty::new())
            .context("building the request")?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|error| anyhow!("reading the answer to GET {path}: {error}"))?
            .to_bytes();
        Ok((status, body))
    }

    fn parse<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> anyhow::Result<T> {
        serde_json::from_slice(body).with_context(|| {
            format!(
                "the admin endpoint at {} answered GET {path} with what this xlb cannot read \
                 (not xlb's admin endpoint, or another version's?)",
                self.url
            )
        })
    }

    /// The JSON as received, checked to be JSON, ending in a newline.
    fn json_text(&self, path: &str, body: &[u8]) -> anyhow::Result<String> {
        self.parse::<serde_json::Value>(path, body)?;
        let mut text = String::from_utf8_lossy(body).into_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_url_is_the_flag_else_the_configs_listen_addr_on_loopback() {
        let url = |addr: &str| AdminUrl::of_listen_addr(addr.parse().unwrap()).to_string();
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("10.1.2.3:9000"), "http://10.1.2.3:9000");
        assert_eq!(url("[::]:80"), "http://[::1]:80");
        assert_eq!(url("[fd00::2]:8080"), "http://[fd00::2]:8080");

        let dir = std::env::temp_dir().join(format!("xlb-admin-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(&config, "ListenAddr = \":8080\"\n").unwrap();
        let located = |admin| AdminUrl::locate(admin, &config).unwrap().to_string();
        assert_eq!(located(None), "http://127.0.0.1:8080");
        assert_eq!(
            located(Some("http://10.0.0.2:9000")),
            "http://10.0.0.2:9000",
            "--admin wins over the config"
        );
        assert_eq!(located(Some("10.0.0.2:9000")), "http://10.0.0.2:9000");
        assert_eq!(located(Some("http://lb-00/")), "http://lb-00:80");
        for bad in [
            "https://10.0.0.2:9000",
            "http://10.0.0.2:9000/routes",
            "a b",
        ] {
            assert!(AdminUrl::locate(Some(bad), &config).is_err(), "{bad}");
        }

        let bare = dir.join("bare.toml");
        std::fs::write(&bare, "PollInterval = \"3s\"\n").unwrap();
        let error = format!("{:#}", AdminUrl::locate(None, &bare).unwrap_err());
        assert!(
            error.contains("has no ListenAddr") && error.contains("--admin"),
            "{error}"
        );
        let missing = dir.join("missing.toml");
        let error = format!("{:#}", AdminUrl::locate(None, &missing).unwrap_err());
        assert!(
            error.contains("missing.toml") && error.contains("--admin"),
            "{error}"
        );
    }
}
