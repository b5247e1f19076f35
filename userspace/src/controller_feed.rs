//! How an `xlb proxy` gets its [`Snapshot`]s: it long-polls a controller's `/snapshot`
//! ([`crate::controller`]) and publishes each new one to its node ([`crate::node`]). It talks to
//! one controller at a time and moves to the next when that one fails; with every controller
//! down it keeps the last snapshot, so the node keeps serving what it was serving. The
//! controllers are given, or found on the Swarm's managers ([`controllers_on_managers`]).

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    config,
    controller::LONG_POLL,
    snapshot::{Snapshot, SnapshotSender},
    swarm::Swarm,
};

/// How long connecting to a controller may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one poll may take: the controller's long poll and then some.
const POLL_TIMEOUT: Duration = Duration::from_secs(LONG_POLL.as_secs() + 10);
/// The largest snapshot read: 10 000 services are a few MiB of JSON.
const MAX_SNAPSHOT_BYTES: usize = 64 << 20;
/// The wait after every controller failed in turn, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One controller: `http://host:port` as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrl {
    pub text: String,
    authority: String,
}

impl ControllerUrl {
    /// `http://host:port` or `host:port`; TLS is not spoken to controllers.
    pub fn parse(text: &str) -> anyhow::Result<ControllerUrl> {
        let uri: Uri = text
            .parse()
            .with_context(|| format!("--controller {text:?} is not a URL"))?;
        match uri.scheme_str() {
            None | Some("http") => {}
            Some(other) => bail!("--controller {text:?}: {other}:// is not served, only http://"),
        }
        let Some(authority) = uri.authority() else {
            bail!("--controller {text:?} names no host");
        };
        if authority.port_u16().is_none() {
            bail!("--controller {text:?} names no port (the controller's ListenAddr port)");
        }
        Ok(ControllerUrl {
            text: text.to_owned(),
            authority: authority.as_str().to_owned(),
        })
    }
}

/// `http://MANAGER:PORT` for each manager this node's engine knows (`docker info`'s
/// RemoteManagers), PORT being the config's ListenAddr port, where the controllers listen.
pub fn controllers_on_managers(config_path: &Path) -> anyhow::Result<Vec<String>> {
    let config = config::load(config_path)?;
    let port = config
        .listen_addr
        .with_context(|| {
            format!(
                "--controllers-on-managers: {} has no ListenAddr, the controllers' port",
                config_path.display()
            )
        })?
        .port();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let managers = runtime.block_on(async {
        let engine = Swarm::connect(&config.docker_url).await?;
        engine.manager_addresses().await
    })?;
    if managers.is_empty() {
        bail!(
            "--controllers-on-managers: the engine at {} knows no Swarm manager (is this node in a Swarm?)",
            config.docker_url
        );
    }
    let urls: Vec<String> = managers
        .iter()
        .map(|manager| format!("http://{}", SocketAddr::new(*manager, port)))
        .collect();
    tracing::info!(controllers = ?urls, "controllers on the Swarm's managers");
    Ok(urls)
}

/// What the proxy knows of its controllers, for `/routes`.
#[derive(Debug, Default)]
pub struct FeedStatus {
    controllers: Mutex<Vec<ControllerState>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControllerState {
    pub url: String,
    /// `up`, `down` or `unknown` (not asked yet).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds since it last answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_answer_ms_ago: Option<u64>,
    #[serde(skip)]
    last_answer: Option<Instant>,
}

impl FeedStatus {
    fn new(controllers: &[ControllerUrl]) -> FeedStatus {
        let states = controllers
            .iter()
            .map(|controller| ControllerState {
                url: controller.text.clone(),
                state: "unknown",
                error: None,
                last_answer_ms_ago: None,
                last_answer: None,
            })
            .collect();
        FeedStatus {
            controllers: Mutex::new(states),
        }
    }

    pub fn report(&self) -> Vec<ControllerState> {
        let now = Instant::now();
        let states = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        states
            .iter()
            .map(|state| ControllerState {
                last_answer_ms_ago: state
                    .last_answer
                    .map(|at| now.duration_since(at).as_millis() as u64),
                ..state.clone()
            })
            .collect()
    }

    fn set(&self, index: usize, result: Result<(), String>) {
        let mut states = self.controllers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = states.get_mut(index) else {
            return;
        };
        match result {
            Ok(()) => {
                state.state = "up";
                state.error = None;
                state.last_answer = Some(Instant::now());
            }
            Err(error) => {
                state.state = "down";
                state.error = Some(error);
            }
        }
    }
}

pub struct ControllerFeed {
    controllers: Vec<ControllerUrl>,
    /// Sent as `Authorization: Bearer <token>`.
    token: Option<String>,
    status: Arc<FeedStatus>,
}

impl ControllerFeed {
    pub fn new(controllers: Vec<ControllerUrl>, token: Option<String>) -> ControllerFeed {
        let status = Arc::new(FeedStatus::new(&controllers));
        ControllerFeed {
            controllers,
            token,
            status,
        }
    }

    pub fn status(&self) -> Arc<FeedStatus> {
        self.status.clone()
    }

    /// Polls the controllers until `shutdown`, publishing each new snapshot to `snapshots`.
    pub async fn run(self, snapshots: SnapshotSender, shutdown: CancellationToken) {
        let mut index = 0;
        // The version held, as the controller asked numbers it; none after a failover, since
        // another controller counts apart.
        let mut held: Option<u64> = None;
        let mut failures_in_a_row = 0u32;
        loop {
            let controller = &self.controllers[index];
            let polled = tokio::select! {
                () = shutdown.cancelled() => return,
                polled = self.poll(controller, held) => polled,
            };
            match polled {
                Ok(answer) => {
                    failures_in_a_row = 0;
                    self.status.set(index, Ok(()));
                    if let Some(snapshot) = answer {
                        held = Some(snapshot.version);
                        publish(&snapshots, snapshot, controller);
                    }
                }
                Err(error) => {
                    let error = format!("{error:#}");
                    tracing::warn!(controller = %controller.text, error, "controller unreachable: trying the next one, the last snapshot keeps serving");
                    self.status.set(index, Err(error));
                    index = (index + 1) % self.controllers.len();
                    held = None;
                    failures_in_a_row += 1;
                    if failures_in_a_row as usize >= self.controllers.len() {
                        let rounds = failures_in_a_row as usize / self.controllers.len();
                        let backoff = FIRST_BACKOFF
                            .saturating_mul(1u32 << rounds.min(6))
                            .min(MAX_BACKOFF);
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                    }
                }
            }
        }
    }

    /// One long poll: `Some` snapshot when the controller has one other than `held`, `None`
    /// when it had nothing new within its long poll.
    async fn poll(
        &self,
        controller: &ControllerUrl,
        held: Option<u64>,
    ) -> anyhow::Result<Option<Snapshot>> {
        let addr = resolve(&controller.authority).await?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .context("connecting: timed out")?
            .context("connecting")?;
        stream.set_nodelay(true).ok();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .context("HTTP handshake")?;
        tokio::spawn(connection);
        let path = match held {
            Some(version) => format!("/snapshot?after={version}"),
            None => "/snapshot".to_owned(),
        };
        let mut request = Request::get(path).header(header::HOST, &controller.authority);
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Empty::new()).context("building the request")?;
        let exchange = async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_SNAPSHOT_BYTES)
                .collect()
                .await
                .map_err(|error| anyhow::anyhow!("reading the snapshot: {error}"))?
                .to_bytes();
            anyhow::Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(POLL_TIMEOUT, exchange)
            .await
            .context("no answer within the long poll")??;
        match status {
            StatusCode::OK => {
                let snapshot: Snapshot =
                    serde_json::from_slice(&body).context("the snapshot is not valid JSON")?;
                Ok(Some(snapshot))
            }
            StatusCode::NOT_MODIFIED => Ok(None),
            StatusCode::UNAUTHORIZED => bail!("refused: the token is missing or wrong (401)"),
            other => bail!(
                "answered {other}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        }
    }
}

/// Publishes `snapshot` unless its tables are what the node already has (a failover to
/// another controller hands out the same tables under another version).
fn publish(snapshots: &SnapshotSender, snapshot: Snapshot, from: &ControllerUrl) {
    let version = snapshot.version;
    let changed = snapshots.send_if_modified(|current| {
        if current.version > 0 && current.same_tables(&snapshot) {
            return false;
        }
        *current = Arc::new(snapshot);
        true
    });
    if changed {
        tracing::info!(controller = %from.text, version, "new snapshot");
    }
}

async fn resolve(authority: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(authority)
        .await
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_urls_are_http_with_a_port() {
        let url = ControllerUrl::parse("http://10.0.0.1:2376").unwrap();
        assert_eq!(url.authority, "10.0.0.1:2376");
        assert_eq!(
            ControllerUrl::parse("manager-1:2376").unwrap().authority,
            "manager-1:2376"
        );
        assert!(ControllerUrl::parse("https://10.0.0.1:2376").is_err());
        assert!(ControllerUrl::parse("http://10.0.0.1").is_err());
        assert!(ControllerUrl::parse("not a url").is_err());
    }
}
