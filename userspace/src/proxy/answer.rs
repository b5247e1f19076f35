//! What the proxy answers with: the body type of every response it gives its clients, and the
//! errors it answers itself (with their status), shared by the handler and the WebSocket relay.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::combinators::BoxBody;

use super::{
    limits::{ClientBodyError, HostError},
    path::PathError,
    upstream::{Stall, UpstreamError},
};

/// The body of every response the proxy gives its clients.
pub type ProxyBody = BoxBody<Bytes, BodyError>;

/// Why a response body failed: the upstream's exchange, or hyper's for a WebSocket answer.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Why the proxy answers a request itself instead of relaying an upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    InvalidHost(HostError),
    #[error("no Host header")]
    MissingHost,
    /// A path nginx refuses to normalise (see [`super::path`]), answered 400 as nginx does.
    #[error("invalid request path {path:?}: {problem}")]
    InvalidPath { path: String, problem: PathError },
    #[error("no service for host {0:?}")]
    UnknownHost(String),
    #[error("no service for path {path:?} on host {host:?}")]
    NoContextRoot { host: String, path: String },
    #[error("service {service:?} for host {host:?} has no running tasks")]
    NoEndpoints { host: String, service: String },
    #[error("no endpoint of service {service:?} accepted a connection ({tried} tried)")]
    NoEndpointReachable { service: String, tried: usize },
    #[error("upstream {addr} failed before completing its response head")]
    UpstreamFailed {
        addr: SocketAddr,
        source: UpstreamError,
    },
    #[error("upstream {addr} timed out: {stall}")]
    UpstreamTimeout { addr: SocketAddr, stall: Stall },
    #[error(transparent)]
    ClientBody(#[from] ClientBodyError),
    /// CONNECT (xlb is no forward proxy) and TRACE (it would echo to a script the cookies and
    /// credentials the proxy and the upstream saw), answered 405 as nginx answers them.
    #[error("method {0} is not allowed")]
    MethodNotAllowed(Method),
    #[error("redirect location {0:?} is not a valid header value")]
    UnencodableLocation(String),
    #[error("service {service:?} cannot use TLS to its tasks: {problem}")]
    BackendTls { service: String, problem: String },
}

impl ProxyError {
    /// Whether the connection is closed after this answer, as nginx does after refusing a
    /// request as malformed or too large: what follows on the connection cannot be trusted.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::InvalidHost(_) | Self::InvalidPath { .. } | Self::ClientBody(_)
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidHost(_) | Self::InvalidPath { .. } => StatusCode::BAD_REQUEST,
            Self::MissingHost | Self::UnknownHost(_) | Self::NoEndpoints { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::NoEndpointReachable { .. }
            | Self::UpstreamFailed { .. }
            | Self::BackendTls { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::NoContextRoot { .. } => StatusCode::NOT_FOUND,
            Self::ClientBody(error) => error.status(),
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnencodableLocation(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}
