//! An upstream stream with nginx's upstream timeouts and the drain abort: it fails with a
//! [`Stall`] when the upstream stops reading (`SendTimeout`) or answering (`ReadTimeout`), and
//! with [`Aborted`] once its endpoint's drain timeout has run out.
//!
//! Exchanges are driven by the request that uses the connection, not by a task of the
//! connection's own, so a connection that must end is told through its [`DrainAbort`]: the
//! signal wakes whichever task is waiting on the connection, and the connection's next poll
//! fails.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError, Weak,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Stall;
use crate::proxy::deadline::LazyDeadline;

/// The drain timeout of an endpoint that left the routes ran out while this connection was
/// still busy.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("aborted: the endpoint left the routes and its drain timeout ran out")]
pub struct Aborted;

/// Aborts every connection of one endpoint generation at once.
#[derive(Default)]
pub struct DrainAbort {
    aborted: AtomicBool,
    /// The connections' wakers; a dropped connection leaves a dead entry, pruned as they grow.
    connections: Mutex<Vec<Weak<AtomicWaker>>>,
}

impl DrainAbort {
    /// A connection's own signal, woken when this generation is aborted.
    pub fn signal(self: &Arc<Self>) -> AbortSignal {
        let waker = Arc::new(AtomicWaker::new());
        let mut connections = self.lock_connections();
        if connections.len() == connections.capacity() {
            connections.retain(|waker| waker.strong_count() > 0);
        }
        connections.push(Arc::downgrade(&waker));
        AbortSignal {
            generation: Arc::clone(self),
            waker,
        }
    }

    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        for waker in self.lock_connections().iter().filter_map(Weak::upgrade) {
            waker.wake();
        }
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, Vec<Weak<AtomicWaker>>> {
        // A list of weak references stays consistent whatever a panicking holder did.
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection's view of its generation's [`DrainAbort`].
pub struct AbortSignal {
    generation: Arc<DrainAbort>,
    waker: Arc<AtomicWaker>,
}

impl AbortSignal {
    /// Whether the connection must end; if not, `cx` is woken when it must. Registering first
    /// and reading the flag after cannot miss an abort in between.
    fn poll_aborted(&self, cx: &mut Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.is_aborted()
    }

    fn is_aborted(&self) -> bool {
        self.generation.aborted.load(Ordering::Acquire)
    }
}

fn aborted<T>() -> Poll<io::Result<T>> {
    Poll::Ready(Err(io::Error::other(Aborted)))
}

/// An upstream stream that fails with a [`Stall`] when the upstream stops reading
/// (`SendTimeout`) or answering (`ReadTimeout`), like nginx's timeouts between two successive
/// writes or reads. The read timeout runs from the last progress either way, and not while a
/// write is blocked.
pub struct TimedStream<S> {
    stream: S,
    abort: AbortSignal,
    read_timeout: Duration,
    send_timeout: Duration,
    /// The last read or write that made progress: an upstream is only expected to answer after
    /// being written to.
    last_progress: tokio::time::Instant,
    read_deadline: LazyDeadline,
    write_blocked_since: Option<tokio::time::Instant>,
    write_deadline: LazyDeadline,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TimedStream<S> {
    pub fn new(
        stream: S,
        abort: AbortSignal,
        read_timeout: Duration,
        send_timeout: Duration,
    ) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            stream,
            abort,
            read_timeout,
            send_timeout,
            last_progress: now,
            read_deadline: LazyDeadline::new(now + read_timeout),
            write_blocked_since: None,
            write_deadline: LazyDeadline::new(now + send_timeout),
        }
    }

    /// Whether an idle connection can take a request: not aborted, and the upstream has neither
    /// closed it nor sent anything unasked (which could only be a stray answer). Nobody waits on
    /// an idle connection, so it is asked without a waker: a read that would block leaves the
    /// connection as it was.
    pub fn is_reusable_idle(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !self.abort.is_aborted()
            && Pin::new(&mut self.stream)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
    }

    /// `made_progress` tells whether a completed call moved bytes: a flush does not, and must
    /// not restart the read timeout, or a connection woken by its own read timer would push the
    /// deadline back on every wake and never time out.
    fn poll_write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
        made_progress: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        if self.abort.is_aborted() {
            return aborted();
        }
        match write(Pin::new(&mut self.stream), cx) {
            Poll::Ready(result) => {
                self.write_blocked_since = None;
                if result.as_ref().is_ok_and(made_progress) {
                    self.last_progress = tokio::time::Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.abort.poll_aborted(cx) => aborted(),
            Poll::Pending => {
                let since = *self
                    .write_blocked_since
                    .get_or_insert_with(tokio::time::Instant::now);
                let timeout = self.send_timeout;
                poll_deadline(
                    &mut self.write_deadline,
                    since + timeout,
                    cx,
                    Stall::Write(timeout),
                )
            }
        }
    }
}

/// `Pending` until `deadline`, then the stall as an I/O error.
fn poll_deadline<T>(
    timer: &mut LazyDeadline,
    deadline: tokio::time::Instant,
    cx: &mut Context<'_>,
    stall: Stall,
) -> Poll<io::Result<T>> {
    ready!(timer.poll_reached(deadline, cx));
    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, stall)))
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TimedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.abort.is_aborted() {
            return aborted();
        }
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.last_progress = tokio::time::Instant::now();
                Poll::Ready(result)
            }
            Poll::Pending if this.abort.poll_aborted(cx) => aborted(),
            // While the request is still being sent, `SendTimeout` applies, as in nginx.
            Poll::Pending if this.write_blocked_since.is_some() => Poll::Pending,
            Poll::Pending => {
                let timeout = this.read_timeout;
                let deadline = this.last_progress + timeout;
                poll_deadline(&mut this.read_deadline, deadline, cx, Stall::Read(timeout))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TimedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |stream, cx| stream.poll_write(cx, data), |&n| n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(
            cx,
            |stream, cx| stream.poll_write_vectored(cx, data),
            |&n| n > 0,
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_with(cx, |stream, cx| stream.poll_flush(cx), |()| false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
