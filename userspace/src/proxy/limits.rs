//! What the proxy accepts from a client, with nginx's defaults: how large and how slow a request
//! head and body may be, and which `Host` headers are valid (RFC 9112 §3.2).
//!
//! The head limits are enforced on the raw bytes by [`super::head_guard`], before hyper parses
//! anything; the body limits by [`ClientBody`], which wraps the body hyper hands the proxy.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use super::router::split_host;
use bytes::Bytes;
use http::{header, HeaderMap, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// Limits on client requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// `ClientMaxBodySize`: larger request bodies are refused with 413; `None` for no limit.
    pub max_body_size: Option<u64>,
    /// nginx's `client_body_timeout`: the longest pause between two reads of a request body.
    pub body_timeout: Duration,
    /// nginx's `client_header_timeout`: a request head must be complete this long after its
    /// first byte (or after the connection opened) or the client gets 408.
    pub header_timeout: Duration,
    /// `KeepaliveTimeout`: how long a client connection may sit idle between requests; zero
    /// turns keep-alive off.
    pub keepalive_timeout: Duration,
    /// `ClientSendTimeout` (nginx's `send_timeout`): a client that accepts no bytes of its
    /// response for this long is cut off, releasing its connection slot and the upstream's.
    pub send_timeout: Duration,
    /// A longer request line is refused with 414 (nginx: `large_client_header_buffers` 8k).
    pub max_request_line: usize,
    /// A longer header line is refused with 431 (nginx: `large_client_header_buffers` 8k, one
    /// line per buffer).
    pub max_header_line: usize,
    /// A larger request head is refused with 431 (nginx: 4 buffers of 8k).
    pub max_head_size: usize,
    /// Header lines in a request head; more are refused with 431 (hyper's own limit).
    pub max_headers: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            max_body_size: Some(1 << 20),
            body_timeout: Duration::from_secs(60),
            header_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            send_timeout: Duration::from_secs(60),
            max_request_line: 8 << 10,
            max_header_line: 8 << 10,
            max_head_size: 32 << 10,
            max_headers: 100,
        }
    }
}

/// Why a request body could not be read in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyError {
    #[error("request body larger than {limit} bytes (ClientMaxBodySize)")]
    TooLarge { limit: u64 },
    #[error("request body stalled for {0:?}")]
    Stalled(Duration),
    #[error("reading the request body: {0}")]
    Unreadable(String),
}

impl ClientBodyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Stalled(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unreadable(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Refuses a body whose declared `Content-Length` is over the limit, before reading any of it.
pub fn check_declared_length(
    headers: &HeaderMap,
    max_body_size: Option<u64>,
) -> Result<(), ClientBodyError> {
    let Some(limit) = max_body_size else {
        return Ok(());
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit => Err(ClientBodyError::TooLarge { limit }),
        _ => Ok(()),
    }
}

/// A client's request body with the body limits applied: it fails once more than
/// `ClientMaxBodySize` bytes arrived (also for chunked bodies, whose size is not declared), or
/// when the client pauses longer than the body timeout.
#[derive(Debug)]
pub struct ClientBody {
    incoming: Incoming,
    max_size: Option<u64>,
    received: u64,
    stall_timeout: Duration,
    /// Runs out `stall_timeout` after the client last sent something.
    stall: Pin<Box<Sleep>>,
    stall_armed: bool,
}

impl ClientBody {
    pub fn new(incoming: Incoming, limits: &ClientLimits) -> Self {
        Self {
            incoming,
            max_size: limits.max_body_size,
            received: 0,
            stall_timeout: limits.body_timeout,
            stall: Box::pin(tokio::time::sleep(limits.body_timeout)),
            stall_armed: false,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.incoming).poll_frame(cx) {
            Poll::Pending => {
                if !this.stall_armed {
                    this.stall_armed = true;
                    this.stall
                        .as_mut()
                        .reset(Instant::now() + this.stall_timeout);
                }
                match this.stall.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(ClientBodyError::Stalled(this.stall_timeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            Poll::Ready(frame) => {
                this.stall_armed = false;
                let frame = match frame {
                    None => return Poll::Ready(None),
                    Some(Err(error)) => {
                        return Poll::Ready(Some(Err(ClientBodyError::Unreadable(
                            error.to_string(),
                        ))))
                    }
                    Some(Ok(frame)) => frame,
                };
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if let Some(limit) = this.max_size.filter(|&limit| this.received > limit) {
                        return Poll::Ready(Some(Err(ClientBodyError::TooLarge { limit })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

/// Why a request's `Host` header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("HTTP/1.1 request without a Host header")]
    Missing,
    #[error("more than one Host header")]
    Repeated,
    #[error("invalid Host header {0:?}")]
    Invalid(String),
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host` header, HTTP/1.0 at most one,
/// and its value is a host with an optional port. HTTP/2 requests carry `:authority` instead.
pub fn check_host(version: Version, headers: &HeaderMap) -> Result<(), HostError> {
    if version != Version::HTTP_10 && version != Version::HTTP_11 {
        return Ok(());
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) if version == Version::HTTP_11 => return Err(HostError::Missing),
        (None, _) => return Ok(()),
        (Some(_), Some(_)) => return Err(HostError::Repeated),
        (Some(host), None) => host,
    };
    let invalid = || HostError::Invalid(String::from_utf8_lossy(host.as_bytes()).into_owned());
    let text = host.to_str().map_err(|_| invalid())?;
    match split_host(text) {
        Some(_) => Ok(()),
        None => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn hosts(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(header::HOST, HeaderValue::from_bytes(value).unwrap());
        }
        headers
    }

    #[test]
    fn one_valid_host_is_accepted() {
        for host in [
            b"app.example.com".as_slice(),
            b"APP.example.com:8080",
            b"10.0.0.1:80",
            b"[::1]:8080",
            b"[2001:db8::1]",
            b"localhost.",
            b"app.example.com:",
        ] {
            assert_eq!(check_host(Version::HTTP_11, &hosts(&[host])), Ok(()));
        }
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        assert_eq!(
            check_host(Version::HTTP_11, &hosts(&[])),
            Err(HostError::Missing)
        );
        assert_eq!(
            check_host(Version::HTTP_11, &hosts(&[b"a", b"b"])),
            Err(HostError::Repeated)
        );
        assert_eq!(check_host(Version::HTTP_10, &hosts(&[])), Ok(()));
        assert_eq!(
            check_host(Version::HTTP_10, &hosts(&[b"a", b"a"])),
            Err(HostError::Repeated)
        );
        assert_eq!(check_host(Version::HTTP_2, &hosts(&[])), Ok(()));
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for host in [
            b"".as_slice(),
            b"a b",
            b"user@app.example.com",
            b"app.example.com:port",
            b"app.example.com:99999",
            b"app.example.com/path",
            b":80",
            b"\xff\xfe",
            b"[::1",
            b"[::1]x",
            b"[::1]:80:80",
            b"[]",
            b"[zz::1]",
            b"a:b:80",
            b"app.example.com?x",
            b"app.example.com#x",
        ] {
            assert_eq!(
                check_host(Version::HTTP_11, &hosts(&[host])),
                Err(HostError::Invalid(
                    String::from_utf8_lossy(host).into_owned()
                )),
                "{:?}",
                String::from_utf8_lossy(host)
            );
        }
    }

    #[test]
    fn declared_length_over_the_limit_is_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1025"));
        assert_eq!(
            check_declared_length(&headers, Some(1024)),
            Err(ClientBodyError::TooLarge { limit: 1024 })
        );
        assert_eq!(check_declared_length(&headers, Some(1025)), Ok(()));
        assert_eq!(check_declared_length(&headers, None), Ok(()));
        assert_eq!(check_declared_length(&HeaderMap::new(), Some(0)), Ok(()));
    }

    #[test]
    fn body_errors_map_to_nginx_statuses() {
        assert_eq!(ClientBodyError::TooLarge { limit: 1 }.status(), 413);
        assert_eq!(ClientBodyError::Stalled(Duration::ZERO).status(), 408);
        assert_eq!(ClientBodyError::Unreadable(String::new()).status(), 400);
    }
}
