//! `xlb controller`: the part of xlb that runs on Swarm managers. It is the only one that talks
//! to Docker ([`crate::discovery`]) and serves the resulting [`Snapshot`]s on the config's
//! `ListenAddr` (Interlock's core address) to the `xlb proxy`s of the load-balancer nodes:
//!
//! - `GET /health`: `ok`, to anyone;
//! - `GET /snapshot[?after=VERSION]`: the current snapshot as JSON, at once when its version is
//!   not `VERSION`, else as soon as a new one exists, or `304 Not Modified` after
//!   [`LONG_POLL`]: a proxy learns of a change as soon as the controller has it;
//! - `GET /routes`: the current snapshot, for people.
//!
//! Every path but `/health` needs `Authorization: Bearer <token>`, the token read from
//! `--token-file` (a Docker secret in a deployment). Without a token file the controller
//! listens on loopback only, whatever `ListenAddr` says.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    cli::ControllerArgs,
    config,
    daemon::{read_token, wait_for_termination},
    discovery::Discovery,
    endpoint::{self, json, text, EndpointLimits},
    extension::{l7_ports, route_settings, select_extension},
    snapshot::{self, SnapshotReceiver},
};

/// How long a `/snapshot` request waits for a change before answering `304 Not Modified`:
/// well under the proxies' read timeout and any idle timeout between them.
pub const LONG_POLL: Duration = Duration::from_secs(25);

pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let config = config::load(&args.config)?;
    let (name, extension) = select_extension(&config, args.extension.as_deref())?;
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let listen_addr = config.listen_addr.with_context(|| {
        format!(
            "{}: the controller serves its snapshots on ListenAddr, which is not set",
            args.config.display()
        )
    })?;
    let listen_addr = match &token {
        Some(_) => listen_addr,
        None if listen_addr.ip().is_loopback() => listen_addr,
        None => {
            let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen_addr.port());
            tracing::warn!(
                %listen_addr,
                %loopback,
                "no --token-file: serving snapshots on loopback only"
            );
            loopback
        }
    };
    let discovery = Discovery {
        docker_url: args.docker_url.unwrap_or_else(|| config.docker_url.clone()),
        interval: config.poll_interval,
        route_settings: route_settings(&extension),
        reserved_ports: l7_ports(&extension),
        reads: Default::default(),
    };
    tracing::info!(extension = %name, config = %args.config.display(), "configuration loaded");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen_addr)
            .await
            .with_context(|| format!("binding the controller's ListenAddr {listen_addr}"))?;
        tracing::info!(addr = %listen_addr, "controller serving snapshots: /health /snapshot /routes");
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (publish, snapshots) = snapshot::channel();
        tasks.spawn(discovery.run(publish, shutdown.clone()));
        let access = Arc::new(Access { token });
        tasks.spawn(serve(listener, snapshots, access, shutdown.clone()));
        wait_for_termination().await?;
        tracing::info!("shutting down");
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        Ok(())
    })
}

/// Who may read snapshots.
struct Access {
    token: Option<String>,
}

impl Access {
    fn allows(&self, request: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true; // loopback only, see `run`
        };
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
        // Compared in constant time: a timing difference would leak the token byte by byte.
        presented.is_some_and(|presented| {
            subtle::ConstantTimeEq::ct_eq(presented, token.as_bytes()).into()
        })
    }
}

/// Serves snapshot requests on `listener` until `shutdown`.
async fn serve(
    listener: TcpListener,
    snapshots: SnapshotReceiver,
    access: Arc<Access>,
    shutdown: CancellationToken,
) {
    let answer = move |request: Request<Incoming>| {
        let (snapshots, access) = (snapshots.clone(), Arc::clone(&access));
        async move { respond(&access, snapshots, &request).await }
    };
    let limits = EndpointLimits::default();
    endpoint::serve(listener, limits, shutdown, "controller", answer).await;
}

async fn respond(
    access: &Access,
    snapshots: SnapshotReceiver,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    let path = request.uri().path();
    if path == "/health" {
        return text(StatusCode::OK, "ok\n");
    }
    if !access.allows(request) {
        let mut response = text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    match path {
        "/snapshot" => match after_version(request.uri().query()) {
            Ok(after) => snapshot_after(snapshots, after).await,
            Err(reason) => text(StatusCode::BAD_REQUEST, &format!("{reason}\n")),
        },
        "/routes" => json(&*snapshots.borrow().clone(), true),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /health, /snapshot or /routes\n",
        ),
    }
}

/// The `after` query parameter: the version the caller already has.
fn after_version(query: Option<&str>) -> Result<Option<u64>, String> {
    let Some(query) = query else {
        return Ok(None);
    };
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("after=") {
            return value
                .parse()
                .map(Some)
                .map_err(|_| format!("after={value:?} is not a version"));
        }
    }
    Ok(None)
}

/// The current snapshot unless its version is `after`; else the next one, or 304 after
/// [`LONG_POLL`]. Any other version is answered at once, not only a newer one: a controller
/// that restarted counts from where its clock is, another controller counts apart.
async fn snapshot_after(
    mut snapshots: SnapshotReceiver,
    after: Option<u64>,
) -> Response<Full<Bytes>> {
    let current = snapshots.borrow_and_update().clone();
    // Version 0: Swarm not read yet; nothing to hand out but a wait.
    if current.version > 0 && after != Some(current.version) {
        return json(&*current, false);
    }
    match tokio::time::timeout(LONG_POLL, snapshots.changed()).await {
        Ok(Ok(())) => json(&*snapshots.borrow().clone(), false),
        Ok(Err(_)) | Err(_) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_is_read_from_the_query() {
        assert_eq!(after_version(None), Ok(None));
        assert_eq!(after_version(Some("after=42")), Ok(Some(42)));
        assert_eq!(after_version(Some("x=1&after=7")), Ok(Some(7)));
        assert!(after_version(Some("after=seven")).is_err());
    }
}
