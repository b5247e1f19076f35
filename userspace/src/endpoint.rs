//! What xlb's two small HTTP endpoints share, the admin endpoint ([`crate::admin`]) and the
//! controller's ([`crate::controller`]): serving HTTP/1.1 connections until shutdown, a bounded
//! number at once and each under a head timeout, and plain-text and JSON answers.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;

/// How much of the machine one endpoint's clients may take.
#[derive(Debug, Clone, Copy)]
pub struct EndpointLimits {
    /// Connections served at once; further clients wait in the kernel's backlog. An endpoint's
    /// clients are a few monitors, operators' tools and proxies, not the public.
    pub max_connections: usize,
    /// A request head must be complete this long after the connection opened or its previous
    /// response was sent, or the connection is closed: an idle or slow client lets its slot go.
    pub head_timeout: Duration,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            head_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `respond` on `listener` (`what` names it in the log) until `shutdown`, which also
/// ends the connections still open (a waiting long poll must not hold the shutdown up).
pub async fn serve<F, R>(
    listener: TcpListener,
    limits: EndpointLimits,
    shutdown: CancellationToken,
    what: &'static str,
    respond: F,
) where
    F: Fn(Request<Incoming>) -> R + Clone + Send + Sync + 'static,
    R: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // A slot first, so that clients beyond the limit wait in the backlog, not in memory.
        let slot = tokio::select! {
            () = shutdown.cancelled() => return,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_closed) => return,
            },
        };
        let Some(stream) = accept(&listener, &shutdown, what).await else {
            return;
        };
        let (respond, shutdown) = (respond.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let answer = respond(request);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => if let Err(error) = served {
                    tracing::debug!(%error, "{what}: connection ended with an error");
                },
                () = shutdown.cancelled() => {}
            }
        });
    }
}

/// The pause after a failed accept (out of descriptors, most often), so that a persistent
/// failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The next connection on `listener` (`what` names it in the log), or `None` once `shutdown`
/// is cancelled.
async fn accept(
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// An endpoint answering every request with `ok`, under `limits`.
    async fn ok_endpoint(limits: EndpointLimits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let answer = |_request| async { text(StatusCode::OK, "ok\n") };
        tokio::spawn(serve(listener, limits, shutdown.clone(), "test", answer));
        (addr, shutdown)
    }

    async fn get(addr: std::net::SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn silent_clients_are_closed_at_the_head_timeout_and_free_their_slot() {
        let limits = EndpointLimits {
            max_connections: 1,
            head_timeout: Duration::from_millis(300),
        };
        let (addr, _shutdown) = ok_endpoint(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // The only slot is the silent client's until its head times out; then this one's.
        let served = tokio::time::timeout(Duration::from_secs(5), get(addr)).await;
        assert!(served
            .expect("a silent client holds the only slot")
            .starts_with("HTTP/1.1 200"));
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(1), silent.read_to_end(&mut rest));
        assert!(closed.await.is_ok(), "the silent client is still connected");
    }

    #[tokio::test]
    async fn clients_beyond_the_limit_wait_for_a_slot() {
        let limits = EndpointLimits {
            max_connections: 2,
            head_timeout: Duration::from_secs(60),
        };
        let (addr, _shutdown) = ok_endpoint(limits).await;
        let mut held = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        let waiting = tokio::spawn(get(addr));
        // Both held connections are served (a request on each is answered) while the third,
        // which connected before those requests were sent, still waits.
        for connection in &mut held {
            connection
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = [0u8; 12];
            connection.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"HTTP/1.1 200");
        }
        assert!(!waiting.is_finished(), "served beyond max_connections");
        drop(held);
        let served = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(served
            .expect("served once a slot is free")
            .unwrap()
            .starts_with("HTTP/1.1 200"));
    }
}
