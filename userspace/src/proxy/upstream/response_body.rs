//! An upstream response's body, read from its connection as the client takes it, framed as
//! RFC 9112 §6.3 says: none (HEAD, 1xx, 204, 304), Content-Length, chunked, or until the
//! upstream closes. The connection goes back to the pool once the body has been read to its
//! end on a connection that may be kept; a body dropped earlier closes it (the rest would
//! still be on the wire).

use std::{
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};

use super::{
    exchange::{Connection, ExchangeError, ResponseHead, MAX_HEAD_BYTES},
    Checkin,
};

/// How the body is delimited, and where reading it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// The body's bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// Bytes left of the current chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
}

/// What the head says about the body and the connection after it.
pub struct BodyPlan {
    framing: Framing,
    /// Whether the connection may take another request once the body is read.
    keep_alive: bool,
}

impl BodyPlan {
    pub fn of(response: &ResponseHead) -> Result<Self, ExchangeError> {
        let head = &response.parts;
        let request_complete = response.request_complete;
        // After a `101` the connection speaks another protocol: never an HTTP/1.1 one again.
        let keep_alive = request_complete
            && head.status != StatusCode::SWITCHING_PROTOCOLS
            && wants_keep_alive(head.version, &head.headers);
        let no_body = response.answers_head
            || head.status.is_informational()
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED;
        if no_body {
            return Ok(Self {
                framing: Framing::Done,
                keep_alive,
            });
        }
        let mut codings = head.headers.get_all(header::TRANSFER_ENCODING).iter();
        if let Some(first) = codings.next() {
            // The last coding decides; a body not chunked last runs until the close (§6.3).
            let last = codings.next_back().unwrap_or(first);
            let chunked = last
                .as_bytes()
                .rsplit(|&byte| byte == b',')
                .next()
                .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            // With Content-Length as well, the message is a smuggling attempt or a broken
            // upstream: read it by its Transfer-Encoding, never reuse the connection.
            let plain = !head.headers.contains_key(header::CONTENT_LENGTH);
            return Ok(match chunked {
                true => Self {
                    framing: Framing::Chunked(Chunk::Size),
                    keep_alive: keep_alive && plain,
                },
                false => Self {
                    framing: Framing::UntilClose,
                    keep_alive: false,
                },
            });
        }
        let mut lengths = head.headers.get_all(header::CONTENT_LENGTH).iter();
        let Some(first) = lengths.next() else {
            return Ok(Self {
                framing: Framing::UntilClose,
                keep_alive: false,
            });
        };
        let length = parse_length(first.as_bytes())?;
        if lengths.any(|other| parse_length(other.as_bytes()).ok() != Some(length)) {
            return Err(ExchangeError::InvalidFraming(
                "differing Content-Length values",
            ));
        }
        Ok(Self {
            framing: match length {
                0 => Framing::Done,
                length => Framing::Length(length),
            },
            keep_alive,
        })
    }
}

fn parse_length(value: &[u8]) -> Result<u64, ExchangeError> {
    let invalid = || ExchangeError::InvalidFraming("invalid Content-Length");
    let text = std::str::from_utf8(value).map_err(|_| invalid())?.trim();
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    text.parse().map_err(|_| invalid())
}

/// HTTP/1.1 keeps the connection unless told `close`; HTTP/1.0 only when told `keep-alive`.
fn wants_keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let has_token = |wanted: &[u8]| {
        headers.get_all(header::CONNECTION).iter().any(|value| {
            value
                .as_bytes()
                .split(|&byte| byte == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(wanted))
        })
    };
    match version {
        Version::HTTP_11 => !has_token(b"close"),
        _ => has_token(b"keep-alive"),
    }
}

/// An upstream response body streaming from its connection.
pub struct UpstreamBody {
    connection: Option<Box<Connection>>,
    framing: Framing,
    /// How the connection returns to the pool; `None` when it is not to be kept.
    checkin: Option<Checkin>,
}

impl UpstreamBody {
    pub fn new(connection: Box<Connection>, plan: BodyPlan, checkin: Checkin) -> Self {
        let mut body = Self {
            connection: Some(connection),
            framing: plan.framing,
            checkin: plan.keep_alive.then_some(checkin),
        };
        // Bodies that are empty by construction (HEAD, 204, 304) may never be polled.
        if body.framing == Framing::Done {
            body.finish();
        }
        body
    }

    /// The body has been read to its end: the connection goes back to the pool if it may be
    /// kept and nothing unasked follows the body.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let connection = self.connection.take();
        if let (Some(checkin), Some(connection)) = (self.checkin.take(), connection) {
            if connection.read_buf.is_empty() {
                checkin.put(connection);
            }
        }
    }

    fn fail(&mut self, error: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.framing = Framing::Done;
        self.checkin = None;
        self.connection = None;
        Poll::Ready(Some(Err(error)))
    }

    /// Up to `limit` body bytes: buffered ones first, else one read's worth from the upstream.
    fn poll_data(
        connection: &mut Connection,
        cx: &mut Context<'_>,
        limit: u64,
    ) -> Poll<Result<Bytes, ExchangeError>> {
        if connection.read_buf.is_empty() {
            let read = ready!(connection.poll_read_more(cx)).map_err(ExchangeError::Read)?;
            if read == 0 {
                return Poll::Ready(Err(ExchangeError::ClosedInBody));
            }
        }
        let take = connection.read_buf.len().min(limit_to_usize(limit));
        Poll::Ready(Ok(connection.read_buf.split_to(take).freeze()))
    }

    /// Reads until `parse` finds what it needs at the front of the buffer, or more than a head's
    /// worth of bytes did not contain it.
    fn poll_parse<T>(
        connection: &mut Connection,
        cx: &mut Context<'_>,
        parse: impl Fn(&BytesMut) -> Result<Option<(usize, T)>, ExchangeError>,
    ) -> Poll<Result<T, ExchangeError>> {
        loop {
            if let Some((used, parsed)) = parse(&connection.read_buf)? {
                let _ = connection.read_buf.split_to(used);
                return Poll::Ready(Ok(parsed));
            }
            if connection.read_buf.len() >= MAX_HEAD_BYTES {
                return Poll::Ready(Err(ExchangeError::InvalidChunk));
            }
            let read = ready!(connection.poll_read_more(cx)).map_err(ExchangeError::Read)?;
            if read == 0 {
                return Poll::Ready(Err(ExchangeError::ClosedInBody));
            }
        }
    }

    /// The next data frame of a chunked body, or `None` after its last chunk and trailers.
    fn poll_chunked(
        connection: &mut Connection,
        cx: &mut Context<'_>,
        chunk: &mut Chunk,
    ) -> Poll<Result<Option<Bytes>, ExchangeError>> {
        loop {
            match *chunk {
                Chunk::Size => {
                    let size = ready!(Self::poll_parse(connection, cx, parse_chunk_size))?;
                    *chunk = match size {
                        0 => Chunk::Trailers,
                        size => Chunk::Data(size),
                    };
                }
                Chunk::Data(left) => {
                    let data = ready!(Self::poll_data(connection, cx, left))?;
                    let left = left - data.len() as u64;
                    *chunk = match left {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data(left),
                    };
                    return Poll::Ready(Ok(Some(data)));
                }
                Chunk::DataEnd => {
                    ready!(Self::poll_parse(connection, cx, parse_crlf))?;
                    *chunk = Chunk::Size;
                }
                // Trailers are read and dropped: a client gets them only if it asked with
                // `TE: trailers`, which the proxy does not pass on.
                Chunk::Trailers => {
                    ready!(Self::poll_parse(connection, cx, parse_trailers))?;
                    return Poll::Ready(Ok(None));
                }
            }
        }
    }
}

fn limit_to_usize(limit: u64) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}

fn parse_chunk_size(buf: &BytesMut) -> Result<Option<(usize, u64)>, ExchangeError> {
    match httparse::parse_chunk_size(buf) {
        Ok(httparse::Status::Complete((used, size))) => Ok(Some((used, size))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(ExchangeError::InvalidChunk),
    }
}

fn parse_crlf(buf: &BytesMut) -> Result<Option<(usize, ())>, ExchangeError> {
    match buf.len() {
        0 => Ok(None),
        1 if buf[0] == b'\r' => Ok(None),
        _ if buf.starts_with(b"\r\n") => Ok(Some((2, ()))),
        _ => Err(ExchangeError::InvalidChunk),
    }
}

fn parse_trailers(buf: &BytesMut) -> Result<Option<(usize, ())>, ExchangeError> {
    let mut lines = [httparse::EMPTY_HEADER; 32];
    match httparse::parse_headers(buf, &mut lines) {
        Ok(httparse::Status::Complete((used, _))) => Ok(Some((used, ()))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(ExchangeError::InvalidChunk),
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("framing", &self.framing)
            .field("reusable", &self.checkin.is_some())
            .finish_non_exhaustive()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = &mut *self;
        let Some(connection) = this.connection.as_deref_mut() else {
            return Poll::Ready(None);
        };
        let polled = match &mut this.framing {
            Framing::Done => return Poll::Ready(None),
            Framing::Length(left) => match ready!(Self::poll_data(connection, cx, *left)) {
                Ok(data) => {
                    *left -= data.len() as u64;
                    Ok(Some(data))
                }
                Err(error) => Err(error),
            },
            Framing::Chunked(chunk) => ready!(Self::poll_chunked(connection, cx, chunk)),
            Framing::UntilClose => match ready!(Self::poll_data(connection, cx, u64::MAX)) {
                Err(ExchangeError::ClosedInBody) => Ok(None),
                other => other.map(Some),
            },
        };
        match polled {
            Err(error) => this.fail(error),
            Ok(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Ok(Some(data)) => {
                // A length-delimited body ends with its last byte: the connection is free now,
                // before the client has even taken the data.
                if this.framing == Framing::Length(0) {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Done => SizeHint::with_exact(0),
            Framing::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}
