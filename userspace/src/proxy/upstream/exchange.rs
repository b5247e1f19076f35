//! One HTTP/1.1 exchange on an upstream connection, driven by the task of the request that
//! uses it: the request head and body written (head and body in one `writev` when the body is
//! at hand), the response head read and parsed with httparse, its body framed by
//! [`super::response_body`].
//!
//! Written by hand rather than on hyper's client connection: that one is a task of its own,
//! fed requests through a channel and answering through another, and it cost about 14k
//! instructions per request, a quarter of the proxy's, in wake-ups, channel traffic and a
//! second copy of every head. Here the exchange is a plain future of the request, as nginx's
//! upstream module is a state machine of the request.

use std::{
    error::Error as StdError,
    future::poll_fn,
    io::{self, IoSlice},
    mem::MaybeUninit,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{
    header, request, response, HeaderMap, HeaderName, HeaderValue, Method, Request, Response,
    StatusCode, Version,
};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::timed_stream::TimedStream;
use crate::proxy::backend_tls::TaskStream;

/// Header lines accepted in a response head, as hyper's default.
const MAX_HEADERS: usize = 100;
/// The longest response head accepted; nginx's `proxy_buffer_size` is 4–8 KiB, and a head
/// beyond 64 KiB is a broken upstream, not a big response.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Room left in a response's header map for the headers the proxy stamps on it (`x-request-id`
/// and the four others): growing the map for them cost 1.8k instructions per request.
const ROOM_FOR_STAMPED_HEADERS: usize = 6;
/// What one read from the upstream asks for at most.
pub const READ_CHUNK: usize = 16 * 1024;
/// Body segments gathered into one `writev`: a chunk's size line, its data, its end.
const MAX_SEGMENTS: usize = 3;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("writing the request: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] io::Error),
    #[error("reading the request body: {0}")]
    RequestBody(#[source] Box<dyn StdError + Send + Sync>),
    #[error("the request body is longer than its Content-Length")]
    RequestBodyTooLong,
    #[error("the request body ended before its Content-Length")]
    RequestBodyTooShort,
    #[error("the upstream closed the connection before its response head ended")]
    ClosedBeforeHead,
    #[error("invalid response head: {0}")]
    InvalidHead(httparse::Error),
    #[error("response head longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid response framing: {0}")]
    InvalidFraming(&'static str),
    #[error("the upstream closed the connection before the response body ended")]
    ClosedInBody,
    #[error("invalid chunked response body")]
    InvalidChunk,
}

impl ExchangeError {
    /// Whether the upstream ended the connection (a close, a reset), as opposed to a timeout,
    /// the drain abort, the request body failing, or an answer the proxy could not take.
    fn is_closed_by_upstream(&self) -> bool {
        match self {
            Self::ClosedBeforeHead => true,
            Self::Write(error) | Self::Read(error) => matches!(
                error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    // TLS: the upstream closed without close_notify.
                    | io::ErrorKind::UnexpectedEof
            ),
            _ => false,
        }
    }
}

/// A connection to an upstream, between exchanges or in one.
pub struct Connection {
    pub stream: TimedStream<TaskStream>,
    /// Bytes read from the upstream and not used yet.
    pub read_buf: BytesMut,
}

/// A response head, and what its body's framing needs to know.
pub struct ResponseHead {
    pub parts: response::Parts,
    /// The request was written whole before the answer came: the connection may be reused.
    pub request_complete: bool,
    /// It answers a `HEAD` request: no body, whatever its headers say.
    pub answers_head: bool,
}

/// How the request body is delimited on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    Empty,
    Length(u64),
    Chunked,
}

/// How an exchange failed: whether the request may still be sent elsewhere, unchanged.
pub enum Failure<B> {
    /// Nothing was written and the body is untouched.
    NotSent(Box<Request<B>>, ExchangeError),
    /// The request went out, at least in part, and the upstream closed or reset the connection
    /// before a byte of its answer: what a pooled connection does when the upstream's keep-alive
    /// timeout ends as the request is sent. Its head comes back, for a caller that still holds
    /// the body to send it again.
    Unanswered(Box<request::Parts>, ExchangeError),
    Failed(ExchangeError),
}

impl Connection {
    pub fn new(stream: TimedStream<TaskStream>) -> Self {
        Self {
            stream,
            read_buf: BytesMut::new(),
        }
    }

    /// Writes `request` and reads the response head, reading the head while the body is still
    /// being written: an upstream may answer (and stop reading) before the body's end.
    pub async fn exchange<B>(&mut self, request: Request<B>) -> Result<ResponseHead, Failure<B>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let answers_head = request.method() == Method::HEAD;
        let mut writer = RequestWriter::new(request);
        let mut write_error = None;
        let mut interim_answers = false;
        let head = poll_fn(|cx| loop {
            if write_error.is_none() && !writer.is_done() {
                if let Poll::Ready(Err(error)) = writer.poll_write(&mut self.stream, cx) {
                    write_error = Some(error);
                }
            }
            let head = match self.poll_read_head(cx) {
                Poll::Pending if write_error.is_some() => return Poll::Ready(Err(None)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(Some(error))),
                Poll::Ready(Ok(head)) => head,
            };
            // An interim answer (`100 Continue`, `103 Early Hints`) is not the response.
            if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS {
                interim_answers = true;
                continue;
            }
            return Poll::Ready(Ok(head));
        })
        .await;
        match head {
            Ok(parts) => Ok(ResponseHead {
                parts,
                request_complete: writer.is_done() && write_error.is_none(),
                answers_head,
            }),
            Err(read_error) => {
                let error = match write_error {
                    Some(write_error) => write_error,
                    None => read_error.unwrap_or(ExchangeError::ClosedBeforeHead),
                };
                let unanswered = !interim_answers && self.read_buf.is_empty();
                Err(match writer.into_unsent() {
                    Ok(request) => Failure::NotSent(Box::new(request), error),
                    Err(head) if unanswered && error.is_closed_by_upstream() => {
                        Failure::Unanswered(head, error)
                    }
                    Err(_) => Failure::Failed(error),
                })
            }
        }
    }

    /// Parses a response head out of what was read, reading more until it is whole.
    fn poll_read_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<response::Parts, ExchangeError>> {
        loop {
            if !self.read_buf.is_empty() {
                if let Some(parts) = parse_head(&mut self.read_buf)? {
                    return Poll::Ready(Ok(parts));
                }
                if self.read_buf.len() >= MAX_HEAD_BYTES {
                    return Poll::Ready(Err(ExchangeError::HeadTooLarge));
                }
            }
            let read = ready!(self.poll_read_more(cx)).map_err(ExchangeError::Read)?;
            if read == 0 {
                return Poll::Ready(Err(ExchangeError::ClosedBeforeHead));
            }
        }
    }

    /// Reads whatever the upstream has sent into `read_buf`; the number of bytes, 0 at its end.
    pub fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read_buf.reserve(READ_CHUNK);
        let spare = self.read_buf.spare_capacity_mut();
        let room = spare.len().min(READ_CHUNK);
        let spare = &mut spare[..room];
        let mut buf = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf))?;
        let read = buf.filled().len();
        // SAFETY: `poll_read` initialised the first `read` bytes of the spare capacity.
        unsafe { self.read_buf.set_len(self.read_buf.len() + read) };
        Poll::Ready(Ok(read))
    }
}

/// A response head from the front of `read_buf`, taken off it; `None` while it is partial.
fn parse_head(read_buf: &mut BytesMut) -> Result<Option<response::Parts>, ExchangeError> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let buf: &[u8] = read_buf;
    let status = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut parsed, buf, &mut slots)
        .map_err(ExchangeError::InvalidHead)?;
    let httparse::Status::Complete(head_len) = status else {
        return Ok(None);
    };
    let code = parsed.code.unwrap_or_default();
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Where each name and value lies, so that the values can be slices of one shared buffer
    // once the head is taken off `read_buf` (as hyper does): no copy per value.
    let start = buf.as_ptr() as usize;
    let count = parsed.headers.len();
    for (span, line) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = line.name.as_ptr() as usize - start;
        let value = line.value.as_ptr() as usize - start;
        *span = (
            name as u32,
            line.name.len() as u32,
            value as u32,
            line.value.len() as u32,
        );
    }
    let head = read_buf.split_to(head_len).freeze();
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::InvalidHead(httparse::Error::Status))?;
    let mut headers = HeaderMap::with_capacity(count + ROOM_FOR_STAMPED_HEADERS);
    for &(name, name_len, value, value_len) in &spans[..count] {
        let name = &head[name as usize..(name + name_len) as usize];
        let name = HeaderName::from_bytes(name)
            .map_err(|_| ExchangeError::InvalidHead(httparse::Error::HeaderName))?;
        let value = head.slice(value as usize..(value + value_len) as usize);
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| ExchangeError::InvalidHead(httparse::Error::HeaderValue))?;
        headers.append(name, value);
    }
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(parts))
}

/// Writes one request: its head, then its body framed by Content-Length or chunked.
struct RequestWriter<B> {
    /// Kept to hand back: the whole request while nothing is written and the body is
    /// untouched, else the head alone.
    parts: request::Parts,
    /// Whether any of the request was written.
    started: bool,
    body: Option<B>,
    body_polled: bool,
    framing: RequestFraming,
    /// Bytes a Content-Length body may still have.
    remaining: u64,
    /// What is ready to be written, in order.
    queue: Vec<Bytes>,
    body_done: bool,
    flushed: bool,
}

impl<B> RequestWriter<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    fn new(request: Request<B>) -> Self {
        let (parts, body) = request.into_parts();
        let framing = request_framing(&parts.headers, &body);
        let mut head = Vec::with_capacity(512);
        encode_head(&parts, framing, &mut head);
        Self {
            parts,
            started: false,
            body: Some(body),
            body_polled: false,
            framing,
            remaining: match framing {
                RequestFraming::Length(length) => length,
                _ => 0,
            },
            queue: vec![Bytes::from(head)],
            body_done: framing == RequestFraming::Empty,
            flushed: false,
        }
    }

    fn is_done(&self) -> bool {
        self.flushed
    }

    /// The request back if none of it was written nor its body touched; else its head.
    fn into_unsent(self) -> Result<Request<B>, Box<request::Parts>> {
        match self.body {
            Some(body) if !self.started && !self.body_polled => {
                Ok(Request::from_parts(self.parts, body))
            }
            _ => Err(Box::new(self.parts)),
        }
    }

    fn poll_write(
        &mut self,
        stream: &mut TimedStream<TaskStream>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ExchangeError>> {
        loop {
            // Gather what the body has ready, so that it leaves with the head in one write.
            while !self.body_done && self.queue.len() < MAX_SEGMENTS {
                match self.poll_body(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => break,
                }
            }
            if self.queue.is_empty() {
                if !self.body_done {
                    return Poll::Pending;
                }
                ready!(Pin::new(&mut *stream).poll_flush(cx)).map_err(ExchangeError::Write)?;
                self.flushed = true;
                return Poll::Ready(Ok(()));
            }
            let slices: [IoSlice<'_>; MAX_SEGMENTS + 1] =
                std::array::from_fn(|index| IoSlice::new(self.queue.get(index).map_or(&[], |b| b)));
            let written = ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices))
                .map_err(ExchangeError::Write)?;
            if written == 0 {
                return Poll::Ready(Err(ExchangeError::Write(io::ErrorKind::WriteZero.into())));
            }
            self.started = true;
            self.advance(written);
        }
    }

    fn advance(&mut self, mut written: usize) {
        let mut done = 0;
        for segment in &mut self.queue {
            if written < segment.len() {
                segment.advance(written);
                break;
            }
            written -= segment.len();
            done += 1;
        }
        self.queue.drain(..done);
    }

    /// Moves the body's next frame, framed, onto the queue.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        let Some(body) = self.body.as_mut() else {
            self.body_done = true;
            return Poll::Ready(Ok(()));
        };
        self.body_polled = true;
        let frame = ready!(Pin::new(body).poll_frame(cx))
            .transpose()
            .map_err(|error| ExchangeError::RequestBody(error.into()))?;
        match frame.map(Frame::into_data) {
            Some(Ok(data)) if data.is_empty() => {}
            Some(Ok(data)) => match self.framing {
                RequestFraming::Length(_) => {
                    let length = data.len() as u64;
                    if length > self.remaining {
                        return Poll::Ready(Err(ExchangeError::RequestBodyTooLong));
                    }
                    self.remaining -= length;
                    self.queue.push(data);
                }
                RequestFraming::Chunked => {
                    self.queue
                        .push(Bytes::from(format!("{:x}\r\n", data.len())));
                    self.queue.push(data);
                    self.queue.push(Bytes::from_static(b"\r\n"));
                }
                RequestFraming::Empty => {
                    return Poll::Ready(Err(ExchangeError::RequestBodyTooLong))
                }
            },
            // Trailers end the body; only a chunked body can carry them.
            Some(Err(frame)) => {
                let trailers = frame.into_trailers().ok();
                self.finish_body(trailers.as_ref())?;
            }
            None => self.finish_body(None)?,
        }
        Poll::Ready(Ok(()))
    }

    fn finish_body(&mut self, trailers: Option<&HeaderMap>) -> Result<(), ExchangeError> {
        self.body_done = true;
        self.body = None;
        match self.framing {
            RequestFraming::Length(_) if self.remaining > 0 => {
                Err(ExchangeError::RequestBodyTooShort)
            }
            RequestFraming::Chunked => {
                let mut last = b"0\r\n".to_vec();
                for (name, value) in trailers.into_iter().flatten() {
                    push_header(&mut last, name, value);
                }
                last.extend_from_slice(b"\r\n");
                self.queue.push(Bytes::from(last));
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// How the request body goes on the wire, as hyper's client decides it: the client's
/// Content-Length when it sent one, none for a body known to be empty, else the body's exact
/// length when known, else chunked.
fn request_framing<B: Body>(headers: &HeaderMap, body: &B) -> RequestFraming {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) => RequestFraming::Length(length),
        None if body.is_end_stream() => RequestFraming::Empty,
        None => match body.size_hint().exact() {
            Some(length) => RequestFraming::Length(length),
            None => RequestFraming::Chunked,
        },
    }
}

/// The request line and headers, and the framing header the body needs.
fn encode_head(parts: &request::Parts, framing: RequestFraming, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |target| target.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        push_header(out, name, value);
    }
    let declared = parts.headers.contains_key(header::CONTENT_LENGTH);
    match framing {
        RequestFraming::Length(length) if !declared => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Empty if !declared && method_carries_body(&parts.method) => {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Methods whose requests are expected to have a body: an empty one is declared, as hyper
/// does, so that the upstream does not wait for one.
fn method_carries_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

fn push_header(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}
