//! The byte-level guard between a client's HTTP/1 connection and hyper.
//!
//! hyper parses requests well but leaves some decisions to the application that it cannot take
//! afterwards: a request with both `Content-Length` and `Transfer-Encoding` reaches the service
//! with the `Content-Length` already removed, repeated `Content-Length` headers with one value
//! arrive as one, its header read timeout closes the connection without an answer, and a too long
//! request line is indistinguishable from too many headers. So every request head passes through
//! this guard first: it is held back until it is complete, checked, and only then shown to hyper.
//! Bodies pass through as they arrive, followed just far enough (`Content-Length`, chunked
//! framing) to know where the next head starts.
//!
//! A head the guard refuses never reaches hyper: hyper sees the end of the stream instead, closes
//! the connection as for any client that left, and the guard writes its answer (400, 408, 414,
//! 431 or 501) just before the connection is shut down. The guard also closes connections that
//! stay idle between requests longer than `KeepaliveTimeout`.
//!
//! Once a connection switches protocols (101, or the HTTP/2 connection preface), the guard lets
//! every byte through untouched. Writes to the client go through the guard too, under
//! `ClientSendTimeout`: a client that accepts nothing for that long fails its connection.
//!
//! The guard outlives hyper's connections: when an HTTP/1 connection is idle (its last response
//! written and flushed, nothing more received) it *parks*, at once or, on a connection whose
//! client came back quickly last time, after [`PARK_AFTER`]: hyper reads the end of the stream,
//! finishes its connection as for a client that left, and hands the guard back (see
//! [`super::client_connection`]), which then waits for the client's next bytes with
//! [`HeadGuard::poll_next_request`].

use std::{
    fmt::Write as _,
    io,
    mem::MaybeUninit,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};
use tracing::debug;

use super::{
    access_log::{AccessEntry, AccessLog, RequestLine},
    connection_state::ConnectionState,
    deadline::LazyDeadline,
    headers::{ProxyIdentity, RequestId},
    limits::ClientLimits,
    request_framing::{body_framing, switches_protocols, ChunkedFraming, Framing},
};

/// What an HTTP/2 client sends first (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Header lines the guard can parse in one head: nginx's default limit, and `max_headers`'s.
const HEADER_SLOTS: usize = 100;

/// Bytes read from the client at a time.
const READ_CHUNK: usize = 8 << 10;

/// How long a busy HTTP/1 connection stays idle before it is parked. Parking every connection at
/// once cost a hyper connection per request on busy keep-alive connections (7.6k instructions
/// per request, 12% of the proxy's, under callgrind); a client that pauses longer is idle, and
/// its connection is better without hyper's buffers. A connection is busy when its client sent
/// its last request within this time of the connection going idle; any other connection parks
/// as soon as it is idle, so that a client that may never come back (most keep-alive
/// connections of a browser or a pool) does not keep hyper's 20 KiB for this long. Held by
/// every new connection while it waits, they were a third of the proxy's RSS per idle
/// connection once 10 000 connections were opened one after the other.
pub const PARK_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// What every guard of one listener shares.
#[derive(Debug)]
pub struct GuardSettings {
    pub limits: ClientLimits,
    pub identity: ProxyIdentity,
    pub access_log: Option<AccessLog>,
}

/// Where the client's byte stream is.
#[derive(Debug)]
enum Phase {
    /// Between requests, or collecting a request head.
    Head,
    /// Inside a body of known length: this many bytes to go.
    FixedBody(u64),
    /// Inside a chunked body.
    Chunked(ChunkedFraming),
    /// After a request asking to switch protocols: bytes wait until its response decides.
    AwaitingUpgrade,
    /// Not HTTP/1 (any more), or framing the guard cannot follow: everything passes.
    Transparent,
    /// A head was refused, or the connection idled out: hyper reads the end of the stream.
    Closing,
}

/// The guard; use it as the connection's I/O object.
pub struct HeadGuard<IO> {
    io: IO,
    settings: Arc<GuardSettings>,
    state: Arc<ConnectionState>,
    phase: Phase,
    /// Read from the client, not examined yet.
    unexamined: BytesMut,
    /// Examined, for hyper to read.
    released: BytesMut,
    /// The incomplete request head, which hyper does not see yet.
    head: BytesMut,
    requests: u64,
    /// When the first byte of `head` arrived.
    head_started: Option<Instant>,
    /// When the connection last became idle (no head begun, no response under way).
    idle_since: Option<Instant>,
    timer: LazyDeadline,
    /// The answer to a refused head, and how much of it is written. Boxed: it is rare, and
    /// every idle connection would carry its room.
    answer: Option<Box<BytesMut>>,
    /// Written to since the last completed flush: hyper may still hold bytes of a response.
    unflushed: bool,
    /// A hyper connection reads from the guard. It stops when the guard parks: hyper was shown
    /// the end of the stream because the connection is idle, not because the client left.
    attached: bool,
    /// The connection is due to park (it idled for as long as it may) but hyper still
    /// flushed: it parks once the flush is done.
    park_due: bool,
    /// The client sent its last request within [`PARK_AFTER`] of the connection going idle:
    /// the connection keeps hyper attached that long before it parks.
    busy: bool,
    /// The send timeout, from the first write the client kept waiting. Boxed and made then:
    /// most connections never wait on a write.
    send_stall: Option<Box<SendStall>>,
}

/// Since when the client has accepted no bytes, and the timer of its send timeout.
struct SendStall {
    blocked_since: Option<Instant>,
    timer: LazyDeadline,
}

/// What comes next on a connection waiting with [`HeadGuard::poll_next_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextRequest {
    /// Bytes of an HTTP/1 request.
    Http1,
    /// The HTTP/2 connection preface: every byte from here on is HTTP/2.
    Http2,
    /// Nothing: the client left, idled out, or was refused; close the connection.
    None,
}

/// What the guard decided about the bytes collected so far as a head.
enum HeadCheck {
    Incomplete,
    Complete {
        length: usize,
        body: Framing,
        switches_protocols: bool,
    },
    Refused(StatusCode, String),
}

/// Why the timer ran out.
enum Expiry {
    SlowHead,
    /// Idle for as long as the connection may be with hyper attached (see [`PARK_AFTER`]).
    Park,
    Idle,
}

impl<IO> HeadGuard<IO> {
    pub fn new(io: IO, settings: Arc<GuardSettings>, state: Arc<ConnectionState>) -> Self {
        let now = Instant::now();
        Self {
            io,
            timer: LazyDeadline::new(now),
            settings,
            state,
            phase: Phase::Head,
            unexamined: BytesMut::new(),
            released: BytesMut::new(),
            head: BytesMut::new(),
            requests: 0,
            head_started: None,
            idle_since: Some(now),
            answer: None,
            unflushed: false,
            attached: false,
            park_due: false,
            busy: false,
            send_stall: None,
        }
    }

    /// Waits, without hyper, until the client sends the next request's first bytes (or, on a
    /// new connection, until they show which HTTP it speaks), the connection idles out, or the
    /// client leaves. Asked again, it answers the same: what it read stays held, and after an
    /// end, an idle timeout or a read error it answers [`NextRequest::None`].
    pub fn poll_next_request(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<NextRequest>>
    where
        IO: AsyncRead + Unpin,
    {
        loop {
            if matches!(self.phase, Phase::Closing) {
                return Poll::Ready(Ok(NextRequest::None));
            }
            if !self.unexamined.is_empty() {
                let next = if self.requests > 0 {
                    self.busy = self
                        .idle_since
                        .is_some_and(|since| since.elapsed() < PARK_AFTER);
                    Some(NextRequest::Http1)
                } else if self.unexamined.starts_with(HTTP2_PREFACE) {
                    self.released.unsplit(self.unexamined.split());
                    self.phase = Phase::Transparent;
                    Some(NextRequest::Http2)
                } else if !HTTP2_PREFACE.starts_with(&self.unexamined) {
                    Some(NextRequest::Http1)
                } else {
                    None
                };
                if let Some(next) = next {
                    self.attached = true;
                    return Poll::Ready(Ok(next));
                }
            }
            if self.expire_timer(cx) {
                continue;
            }
            match ready!(self.poll_read_client(cx)) {
                Ok(0) => {
                    self.phase = Phase::Closing;
                    return Poll::Ready(Ok(NextRequest::None));
                }
                Ok(_) => {}
                Err(error) => {
                    self.phase = Phase::Closing;
                    return Poll::Ready(Err(error));
                }
            }
        }
    }

    /// What the guard and the request handler know about the connection.
    pub fn state(&self) -> &Arc<ConnectionState> {
        &self.state
    }

    pub fn limits(&self) -> &ClientLimits {
        &self.settings.limits
    }

    pub fn client(&self) -> SocketAddr {
        self.state.client
    }

    /// Whether the client has sent a request head on this connection yet.
    pub fn has_had_requests(&self) -> bool {
        self.requests > 0
    }

    /// Whether the guard parked the connection: hyper's connection ended because it was idle.
    pub fn is_parked(&self) -> bool {
        !self.attached
    }

    /// Whether hyper has nothing left to do on this HTTP/1 connection until the client sends
    /// more: no head begun, nothing held back, no response under way or unflushed.
    fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Head)
            && self.head.is_empty()
            && self.unexamined.is_empty()
            && self.released.is_empty()
            && self.state.in_flight() == 0
            && !self.unflushed
    }

    /// Shows hyper the end of the stream on an idle connection, and lets go of the buffers.
    fn park(&mut self) -> Poll<io::Result<()>> {
        self.attached = false;
        self.park_due = false;
        // Empty, but they may still share the last request's allocation.
        self.head = BytesMut::new();
        self.unexamined = BytesMut::new();
        self.released = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Reads what the client sent into `unexamined`: how many bytes, 0 at its end.
    fn poll_read_client(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>>
    where
        IO: AsyncRead + Unpin,
    {
        // On the stack, uninitialised: zeroing 8 KiB per read cost more than the copy out of it,
        // and reading into `unexamined` directly would allocate 8 KiB per request.
        let mut chunk = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
        let mut chunk = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut chunk))?;
        self.unexamined.extend_from_slice(chunk.filled());
        Poll::Ready(Ok(chunk.filled().len()))
    }

    /// Acts on the timer that applies now if it ran out: a slow head is refused with 408, an
    /// idle connection closed, parking made due. Says whether it did.
    fn expire_timer(&mut self, cx: &mut Context<'_>) -> bool {
        match self.poll_timer(cx) {
            Some(Expiry::Park) => {
                self.park_due = true;
                true
            }
            Some(Expiry::SlowHead) => {
                let timeout = self.settings.limits.header_timeout;
                self.refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!("request head not received within {timeout:?}"),
                );
                true
            }
            Some(Expiry::Idle) => {
                debug!(client = %self.state.client, "closing idle client connection");
                self.phase = Phase::Closing;
                true
            }
            None => false,
        }
    }

    /// Moves examined bytes from `unexamined` to `released` (or `head`) as far as the phase
    /// allows.
    fn examine(&mut self) {
        while !self.unexamined.is_empty() {
            match &mut self.phase {
                Phase::Head => {
                    if self.head.is_empty() {
                        // RFC 9112 §2.2: empty lines before a request line are ignored.
                        let blank = self
                            .unexamined
                            .iter()
                            .take_while(|&&byte| byte == b'\r' || byte == b'\n')
                            .count();
                        self.unexamined.advance(blank);
                        if self.unexamined.is_empty() {
                            return;
                        }
                        self.head_started = Some(Instant::now());
                        self.idle_since = None;
                    }
                    let new_bytes = self.unexamined.split();
                    let may_be_complete = new_bytes.contains(&b'\n');
                    self.head.unsplit(new_bytes);
                    match self.check_head(may_be_complete) {
                        HeadCheck::Incomplete => return,
                        HeadCheck::Refused(status, reason) => {
                            self.refuse(status, &reason);
                            return;
                        }
                        HeadCheck::Complete {
                            length,
                            body,
                            switches_protocols,
                        } => self.release_head(length, body, switches_protocols),
                    }
                }
                Phase::FixedBody(remaining) => {
                    let length = self
                        .unexamined
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    *remaining -= length as u64;
                    if *remaining == 0 {
                        self.phase = Phase::Head;
                    }
                    self.released.unsplit(self.unexamined.split_to(length));
                }
                Phase::Chunked(framing) => match framing.advance(&self.unexamined) {
                    Ok((length, finished)) => {
                        if finished {
                            self.phase = Phase::Head;
                        }
                        self.released.unsplit(self.unexamined.split_to(length));
                    }
                    // hyper reads the same bytes and fails the body with a precise error.
                    Err(()) => self.phase = Phase::Transparent,
                },
                Phase::AwaitingUpgrade => return,
                Phase::Transparent => self.released.unsplit(self.unexamined.split()),
                Phase::Closing => self.unexamined.clear(),
            }
        }
    }

    /// Shows hyper the first `length` bytes of `head` and continues with the request's body.
    fn release_head(&mut self, length: usize, body: Framing, switches_protocols: bool) {
        let rest = self.head.split_off(length);
        self.released.unsplit(self.head.split());
        // `unexamined` was emptied into `head`, so `rest` is all of it.
        self.unexamined = rest;
        self.head_started = None;
        self.requests += 1;
        self.state.request_started();
        self.phase = match body {
            Framing::Fixed(length) => Phase::FixedBody(length),
            Framing::Chunked => Phase::Chunked(ChunkedFraming::Start { size: 0 }),
            Framing::None if switches_protocols => Phase::AwaitingUpgrade,
            Framing::None => Phase::Head,
        };
    }

    fn check_head(&mut self, may_be_complete: bool) -> HeadCheck {
        let limits = &self.settings.limits;
        let request_line = match self.head.iter().position(|&byte| byte == b'\n') {
            Some(end) => end,
            None => self.head.len(),
        };
        if request_line > limits.max_request_line {
            return HeadCheck::Refused(
                StatusCode::URI_TOO_LONG,
                format!("request line longer than {} bytes", limits.max_request_line),
            );
        }
        let too_large = || {
            HeadCheck::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!(
                    "request head larger than {} bytes or {} header lines",
                    limits.max_head_size, limits.max_headers
                ),
            )
        };
        let line_too_long = || {
            HeadCheck::Refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("header line longer than {} bytes", limits.max_header_line),
            )
        };
        // The line still arriving, as nginx's 8 KiB line buffer would overflow with it.
        let last_line = self
            .head
            .iter()
            .rev()
            .take(limits.max_header_line + 1)
            .take_while(|&&byte| byte != b'\n')
            .count();
        if request_line < self.head.len() && last_line > limits.max_header_line {
            return line_too_long();
        }
        if !may_be_complete {
            return if self.head.len() > limits.max_head_size {
                too_large()
            } else {
                HeadCheck::Incomplete
            };
        }
        // On the stack and uninitialised: a zeroed heap array per head cost a malloc and a
        // 3 KiB memset for every request.
        let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; HEADER_SLOTS];
        let slots = &mut slots[..limits.max_headers.min(HEADER_SLOTS)];
        let mut request = httparse::Request::new(&mut []);
        match request.parse_with_uninit_headers(&self.head, slots) {
            Ok(httparse::Status::Partial) if self.head.len() > limits.max_head_size => too_large(),
            Ok(httparse::Status::Partial) => HeadCheck::Incomplete,
            Ok(httparse::Status::Complete(length)) if length > limits.max_head_size => too_large(),
            Ok(httparse::Status::Complete(_))
                if request.headers.iter().any(|header| {
                    header.name.len() + 2 + header.value.len() > limits.max_header_line
                }) =>
            {
                line_too_long()
            }
            Ok(httparse::Status::Complete(length)) => match body_framing(&request) {
                Ok(body) => HeadCheck::Complete {
                    length,
                    body,
                    switches_protocols: switches_protocols(&request),
                },
                Err((status, reason)) => HeadCheck::Refused(status, reason),
            },
            Err(httparse::Error::TooManyHeaders) => too_large(),
            Err(error) => HeadCheck::Refused(
                StatusCode::BAD_REQUEST,
                format!("malformed request head: {error}"),
            ),
        }
    }

    /// Stops showing hyper anything and prepares `status` as the answer.
    fn refuse(&mut self, status: StatusCode, reason: &str) {
        let request_line = self.head[..]
            .split(|&byte| byte == b'\n')
            .next()
            .filter(|line| line.len() <= self.settings.limits.max_request_line)
            .map(|line| String::from_utf8_lossy(line.trim_ascii()).into_owned());
        let request_id = RequestId::fresh();
        debug!(
            client = %self.state.client,
            status = status.as_u16(),
            reason,
            request_id = request_id.as_str(),
            "request refused"
        );
        let body = format!("{reason}\n");
        if let Some(log) = &self.settings.access_log {
            let entry = AccessEntry {
                client: self.state.client.ip().to_canonical(),
                request_line: RequestLine::Text(request_line.unwrap_or_else(|| "-".to_owned())),
                status,
                referer: None,
                user_agent: None,
                request_id: request_id.clone(),
                upstreams: Vec::new(),
            };
            log.record(&entry, body.len() as u64);
        }
        let mut answer = String::new();
        let _ = write!(
            answer,
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: {length}\r\nconnection: close\r\n",
            status = format_status(status),
            length = body.len(),
        );
        for (name, value) in self.settings.identity.headers(&request_id) {
            let _ = write!(
                answer,
                "{name}: {}\r\n",
                String::from_utf8_lossy(value.as_bytes())
            );
        }
        answer.push_str("\r\n");
        answer.push_str(&body);
        self.answer = Some(Box::new(BytesMut::from(answer.as_bytes())));
        self.head.clear();
        self.unexamined.clear();
        self.phase = Phase::Closing;
    }

    /// Polls the timer that applies now, if any, and says whether it ran out.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Option<Expiry> {
        if !matches!(self.phase, Phase::Head) || self.state.in_flight() > 0 {
            self.idle_since = None;
            self.park_due = false;
            return None;
        }
        let limits = &self.settings.limits;
        let (deadline, expiry) = match self.head_started {
            Some(started) => (started + limits.header_timeout, Expiry::SlowHead),
            None => {
                let idle_since = *self.idle_since.get_or_insert_with(Instant::now);
                let allowed = match self.requests {
                    0 => limits.header_timeout,
                    _ => limits.keepalive_timeout,
                };
                if self.attached && !self.park_due && PARK_AFTER < allowed {
                    if !self.busy {
                        // Nothing says the client comes back soon: park now, no timer needed.
                        return Some(Expiry::Park);
                    }
                    (idle_since + PARK_AFTER, Expiry::Park)
                } else {
                    (idle_since + allowed, Expiry::Idle)
                }
            }
        };
        match self.timer.poll_reached(deadline, cx) {
            Poll::Ready(()) => Some(expiry),
            Poll::Pending => None,
        }
    }

    /// Moves out of a phase whose condition has changed: an upgrade decided, or the connection
    /// switched protocols.
    fn follow_connection_state(&mut self) {
        if self.state.is_upgraded() && !matches!(self.phase, Phase::Transparent | Phase::Closing) {
            self.released.unsplit(self.head.split());
            self.released.unsplit(self.unexamined.split());
            self.phase = Phase::Transparent;
        } else if matches!(self.phase, Phase::AwaitingUpgrade) && self.state.in_flight() == 0 {
            self.phase = Phase::Head;
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.attached {
            return Poll::Ready(Ok(()));
        }
        loop {
            this.follow_connection_state();
            if !this.released.is_empty() {
                let length = this.released.len().min(out.remaining());
                out.put_slice(&this.released.split_to(length));
                return Poll::Ready(Ok(()));
            }
            if matches!(this.phase, Phase::Closing | Phase::AwaitingUpgrade) {
                this.state.wait_for_response(cx.waker());
                if this.state.in_flight() > 0 {
                    return Poll::Pending;
                }
                if matches!(this.phase, Phase::Closing) {
                    // The end of the stream: hyper closes the connection, and the answer (if any)
                    // is written when it shuts the connection down.
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if !this.unexamined.is_empty() {
                this.examine();
                continue;
            }
            if matches!(this.phase, Phase::Head) && this.state.in_flight() > 0 {
                // The idle timer starts when the response ends, which may happen while this
                // reader waits for bytes: have the response's end wake it.
                this.state.wait_for_response(cx.waker());
            }
            if this.expire_timer(cx) {
                continue;
            }
            if this.park_due && this.is_idle() {
                return this.park();
            }
            // The client closed its side: hyper sees the end of the stream as it is.
            if ready!(this.poll_read_client(cx))? == 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> HeadGuard<IO> {
    /// Runs one write operation on the client connection under the send timeout: an error once
    /// the client has accepted nothing for `send_timeout`, as nginx's `send_timeout` between
    /// two successive writes.
    fn poll_send<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut IO>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let written = write(Pin::new(&mut self.io), cx);
        let timeout = self.settings.limits.send_timeout;
        match written {
            Poll::Ready(result) => {
                if let Some(stall) = &mut self.send_stall {
                    stall.blocked_since = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let now = Instant::now();
                let stall = self.send_stall.get_or_insert_with(|| {
                    Box::new(SendStall {
                        blocked_since: None,
                        timer: LazyDeadline::new(now + timeout),
                    })
                });
                let deadline = *stall.blocked_since.get_or_insert(now) + timeout;
                match stall.timer.poll_reached(deadline, cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client accepted no bytes for {timeout:?} (ClientSendTimeout)"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.unflushed = true;
        self.poll_send(cx, |io, cx| io.poll_write(cx, data))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.unflushed = true;
        self.poll_send(cx, |io, cx| io.poll_write_vectored(cx, data))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    /// hyper flushes after writing out everything it holds: once that succeeds on a connection
    /// due to park, hyper has to read once more to park it (it would not read again until the
    /// client sends).
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx, |io, cx| io.poll_flush(cx)))?;
        if std::mem::take(&mut self.unflushed) && self.park_due && self.is_idle() {
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the answer to a refused head, if there is one, then shuts the connection down.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while let Some(mut answer) = this.answer.take().filter(|answer| !answer.is_empty()) {
            let written = this.poll_send(cx, |io, cx| io.poll_write(cx, &answer[..]));
            let written = match written {
                Poll::Ready(written) => written?,
                Poll::Pending => {
                    this.answer = Some(answer);
                    return Poll::Pending;
                }
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            answer.advance(written);
            this.answer = Some(answer);
        }
        ready!(this.poll_send(cx, |io, cx| io.poll_flush(cx)))?;
        this.poll_send(cx, |io, cx| io.poll_shutdown(cx))
    }
}

fn format_status(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
}
