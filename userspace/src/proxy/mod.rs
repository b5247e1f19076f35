//! The L7 HTTP proxy (skeleton: interface only).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::routes::RouteTable;

/// Per-process proxy settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// `x-proxy-id`: this proxy's host name.
    pub proxy_id: String,
    /// `MaxConnections`: client connections served at once.
    pub max_connections: usize,
}

/// The proxy's current view of the route table, swapped atomically on every update.
#[derive(Debug, Default)]
pub struct Router {}

impl Router {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Replaces the routes; requests already in flight finish on the endpoints they picked.
    pub fn update(&self, _table: &RouteTable) {}
}

/// Serves HTTP on `listener` until `shutdown` is cancelled.
pub async fn serve(
    _listener: TcpListener,
    _router: Arc<Router>,
    _settings: ProxySettings,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Ok(())
}
