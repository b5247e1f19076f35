//! What xlb's two small HTTP endpoints share, the admin endpoint ([`crate::admin`]) and the
//! controller's ([`crate::controller`]): accepting connections until shutdown, and plain-text
//! and JSON answers.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The pause after a failed accept (out of descriptors, most often), so that a persistent
/// failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The next connection on `listener` (`what` names it in the log), or `None` once `shutdown`
/// is cancelled.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<TcpStream> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => return Some(stream),
                Err(error) => {
                    tracing::warn!(%error, "{what}: accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
        }
    }
}

/// `value` as JSON, pretty-printed with a final newline for people, compact for programs.
pub fn json(value: &impl serde::Serialize, pretty: bool) -> Response<Full<Bytes>> {
    let body = if pretty {
        serde_json::to_vec_pretty(value).map(|mut body| {
            body.push(b'\n');
            body
        })
    } else {
        serde_json::to_vec(value)
    };
    response(StatusCode::OK, "application/json", body.unwrap_or_default())
}

pub fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
