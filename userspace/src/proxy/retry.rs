//! When a request may be sent to another endpoint: Interlock's nginx runs with
//! `proxy_next_upstream error timeout http_502 http_503 http_504`, and nginx retries a request
//! that already reached an upstream only if its method is idempotent and it still holds the body.
//!
//! A request that never reached an upstream (the connection could not be made) goes to the next
//! endpoint whatever its method. One that did is sent again only if its method is idempotent and
//! its body was held in memory: bodies up to [`HELD_BODY_LIMIT`] are read before the first try
//! while the worker's [`HeldBodies`] budget lasts; larger ones, and any once the budget is
//! spent, stream and are never replayed. A held body also lets the upstream pool replay the
//! request on a new connection when the upstream closed the pooled one unanswered (see
//! [`super::upstream`], which asks the body through [`ReplayBody`]): that is no try of its
//! own, as nginx does not count a failed cached connection as one.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{request::Parts, HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::{
    held_bodies::{HeldBodies, Reservation},
    limits::{ClientBody, ClientBodyError},
};

/// Request bodies up to this size are held in memory so that they can be replayed.
pub const HELD_BODY_LIMIT: usize = 64 << 10;

/// RFC 9110 §9.2.2: sending these twice has the effect of sending them once.
pub fn is_idempotent(method: &Method) -> bool {
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::PUT,
        Method::DELETE,
        Method::TRACE,
    ]
    .contains(method)
}

/// `http_502 http_503 http_504`: upstream answers that send the request to the next endpoint.
pub fn is_retried_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// A request body that can be sent again from its start.
pub trait ReplayBody: Body + Sized {
    /// A copy to send in its place if the upstream closes the pooled connection that this one
    /// went out on; `None` for a body that can be sent only once (one streaming from the
    /// client). Asked before any of this one is read.
    fn replay(&self) -> Option<Self>;
}

/// A request on its way to one or more endpoints.
pub struct OutgoingRequest {
    /// `None` once the last try took it.
    parts: Option<Parts>,
    body: Outgoing,
    /// The budget the held body takes, until the request is done with; none for a request
    /// without a body (most), which takes none.
    _held: Option<Reservation>,
}

enum Outgoing {
    /// Held in full: every try gets a copy.
    Held {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Streaming from the client, so it can be sent once; `None` once it was.
    Streaming(Option<ForwardBody>),
}

impl OutgoingRequest {
    /// Prepares `request` for its tries: an idempotent request's body is read into memory first
    /// if it is small enough and `budget` has room, so that the request can be replayed.
    pub async fn prepare(
        request: Request<ClientBody>,
        budget: &Arc<HeldBodies>,
    ) -> Result<Self, ClientBodyError> {
        let (parts, body) = request.into_parts();
        let declared_small = body
            .size_hint()
            .upper()
            .is_some_and(|upper| upper <= HELD_BODY_LIMIT as u64);
        let may_hold = is_idempotent(&parts.method)
            && (body.is_end_stream() || declared_small || body.size_hint().upper().is_none());
        let (body, held) = if !may_hold {
            let streaming = ForwardBody::streaming(Bytes::new(), body);
            (Outgoing::Streaming(Some(streaming)), None)
        } else if body.is_end_stream() {
            let empty = Outgoing::Held {
                data: Bytes::new(),
                trailers: None,
            };
            (empty, None)
        } else {
            let mut held = budget.reserve();
            (hold(body, &mut held).await?, Some(held))
        };
        Ok(Self {
            parts: Some(parts),
            body,
            _held: held,
        })
    }

    /// Whether a try that reached an upstream may be followed by another.
    pub fn is_replayable(&self) -> bool {
        matches!(self.body, Outgoing::Held { .. })
    }

    /// The request for the next try, if there can be one. The `last` try takes the request's
    /// head instead of a copy: a single-endpoint service's requests are never copied.
    pub fn next_try(&mut self, last: bool) -> Option<Request<ForwardBody>> {
        let parts = match last {
            true => self.parts.take()?,
            false => {
                let parts = self.parts.as_ref()?;
                let mut copy = Request::new(()).into_parts().0;
                copy.method = parts.method.clone();
                copy.uri = parts.uri.clone();
                copy.version = parts.version;
                copy.headers = parts.headers.clone();
                copy
            }
        };
        let body = match &mut self.body {
            Outgoing::Held { data, trailers } => ForwardBody::held(data.clone(), trailers.clone()),
            Outgoing::Streaming(body) => body.take()?,
        };
        Some(Request::from_parts(parts, body))
    }

    /// Takes back a request that never reached its upstream, body unread, for the next try.
    pub fn give_back(&mut self, request: Request<ForwardBody>) {
        if let Outgoing::Streaming(slot) = &mut self.body {
            *slot = Some(request.into_body());
        }
    }
}

/// Reads the body up to [`HELD_BODY_LIMIT`], taking what it reads from `held`: the whole body
/// if it fits, else (too large, or the budget spent) what was read so far followed by the rest,
/// streaming.
async fn hold(mut body: ClientBody, held: &mut Reservation) -> Result<Outgoing, ClientBodyError> {
    let mut data = BytesMut::new();
    loop {
        if body.is_end_stream() {
            break;
        }
        if data.len() > HELD_BODY_LIMIT {
            let streaming = ForwardBody::streaming(data.freeze(), body);
            return Ok(Outgoing::Streaming(Some(streaming)));
        }
        let Some(frame) = body.frame().await.transpose()? else {
            break;
        };
        match frame.into_data() {
            Ok(chunk) if !held.grow(chunk.len()) => {
                data.extend_from_slice(&chunk);
                let streaming = ForwardBody::streaming(data.freeze(), body);
                return Ok(Outgoing::Streaming(Some(streaming)));
            }
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => {
                let trailers = frame.into_trailers().ok();
                return Ok(Outgoing::Held {
                    data: data.freeze(),
                    trailers,
                });
            }
        }
    }
    Ok(Outgoing::Held {
        data: data.freeze(),
        trailers: None,
    })
}

/// A request body as it goes upstream: what the proxy holds, then (when streaming) the rest of
/// the client's body.
#[derive(Debug)]
pub struct ForwardBody {
    held: Bytes,
    trailers: Option<HeaderMap>,
    rest: Option<ClientBody>,
}

impl ForwardBody {
    fn held(held: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            held,
            trailers,
            rest: None,
        }
    }

    fn streaming(held: Bytes, rest: ClientBody) -> Self {
        Self {
            held,
            trailers: None,
            rest: Some(rest),
        }
    }
}

impl ReplayBody for ForwardBody {
    /// A held body, from its start; one streaming from the client cannot be read twice.
    fn replay(&self) -> Option<Self> {
        match self.rest {
            None => Some(Self::held(self.held.clone(), self.trailers.clone())),
            Some(_) => None,
        }
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            return Poll::Ready(Some(Ok(Frame::data(held))));
        }
        if let Some(rest) = &mut self.rest {
            return Pin::new(rest).poll_frame(cx);
        }
        Poll::Ready(
            self.trailers
                .take()
                .map(|trailers| Ok(Frame::trailers(trailers))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(ClientBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.len() as u64;
        match &self.rest {
            None => SizeHint::with_exact(held),
            Some(rest) => {
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + held);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + held);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods_follow_rfc_9110() {
        for method in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(is_idempotent(&method.parse().unwrap()), "{method}");
        }
        for method in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&method.parse().unwrap()), "{method}");
        }
    }

    #[test]
    fn only_gateway_errors_are_retried() {
        let retried: Vec<u16> = (100..600)
            .filter(|&code| is_retried_status(StatusCode::from_u16(code).unwrap()))
            .collect();
        assert_eq!(retried, [502, 503, 504]);
    }

    #[tokio::test]
    async fn held_body_replays_data_and_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "abc".parse().unwrap());
        let body = ForwardBody::held(Bytes::from_static(b"payload"), Some(trailers.clone()));
        assert_eq!(body.size_hint().exact(), Some(7));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "payload");
    }
}
