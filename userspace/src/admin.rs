//! The admin endpoint on Interlock's `ListenAddr`: `GET /health`, `GET /routes`, `GET /stats`.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{dataplane::Dataplane, routes::RouteTable};

/// What the admin endpoint reports on.
pub struct AdminState {
    /// The route table currently served.
    pub routes: ArcSwap<RouteTable>,
    /// The XDP program, unless running proxy-only.
    pub dataplane: Option<Arc<Mutex<Dataplane>>>,
}

/// Serves admin requests on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin endpoint: accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&state, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

fn respond(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/health" => text(StatusCode::OK, "ok\n"),
        "/routes" => {
            json_response(&serde_json::to_value(&**state.routes.load()).unwrap_or_default())
        }
        "/stats" => stats(state),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /health, /routes or /stats\n",
        ),
    }
}

fn stats(state: &AdminState) -> Response<Full<Bytes>> {
    let Some(dataplane) = &state.dataplane else {
        return json_response(&json!({ "xdp": null }));
    };
    let stats = dataplane
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .stats();
    match stats {
        Ok(stats) => json_response(&json!({ "xdp": stats })),
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reading XDP counters: {error}\n"),
        ),
    }
}

fn json_response(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    response(StatusCode::OK, "application/json", body)
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    response(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

fn response(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}
