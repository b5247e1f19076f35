//! A client's HTTP/1 connection handed over after its request switched protocols (`101`).
//!
//! hyper serves each HTTP/1 client connection only while it has requests (see
//! [`super::client_connection`]), so it cannot hand the connection over itself as
//! `hyper::upgrade::on` would: the connection task does, once hyper has written the `101` and
//! given the connection back. A request that may switch protocols carries a [`ClientUpgrade`]
//! in its extensions; the task sends the connection to it.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http::Request;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
};

/// What a client connection is to the relay after an upgrade.
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<IO: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for IO {}

/// The client's connection after `101`: the bytes it sent that were read already, then the
/// connection itself.
pub struct UpgradedClient {
    read_ahead: Bytes,
    io: Box<dyn ClientIo>,
}

impl UpgradedClient {
    pub fn new(io: impl ClientIo + 'static, read_ahead: Bytes) -> Self {
        Self {
            read_ahead,
            io: Box::new(io),
        }
    }
}

impl std::fmt::Debug for UpgradedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpgradedClient")
            .field("read_ahead", &self.read_ahead.len())
            .finish_non_exhaustive()
    }
}

impl AsyncRead for UpgradedClient {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read_ahead.is_empty() {
            let length = self.read_ahead.len().min(out.remaining());
            out.put_slice(&self.read_ahead[..length]);
            self.read_ahead.advance(length);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, out)
    }
}

impl AsyncWrite for UpgradedClient {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The connection task's side: where to send the connection if the response is a `101`.
#[derive(Debug, Default)]
pub struct UpgradeSlot(Mutex<Option<oneshot::Sender<UpgradedClient>>>);

impl UpgradeSlot {
    /// Puts a [`ClientUpgrade`] into `request`, replacing the previous request's.
    pub fn offer<B>(&self, request: &mut Request<B>) {
        let (sender, receiver) = oneshot::channel();
        *self.lock() = Some(sender);
        request
            .extensions_mut()
            .insert(ClientUpgrade(Arc::new(Mutex::new(Some(receiver)))));
    }

    /// Hands `client` to the request that switched protocols; dropped if it no longer waits.
    pub fn hand_over(&self, client: UpgradedClient) {
        if let Some(sender) = self.lock().take() {
            let _ = sender.send(client);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<oneshot::Sender<UpgradedClient>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The request's side. Extensions must be `Clone`, hence the shared receiver; the first
/// [`ClientUpgrade::take`] gets it.
#[derive(Clone)]
pub struct ClientUpgrade(Arc<Mutex<Option<oneshot::Receiver<UpgradedClient>>>>);

/// The client connection, once the `101` is written; an error if it never is.
pub type PendingClient = oneshot::Receiver<UpgradedClient>;

impl ClientUpgrade {
    /// The client connection of `request`, if it came on an HTTP/1 connection that may switch.
    pub fn take<B>(request: &mut Request<B>) -> Option<PendingClient> {
        let upgrade = request.extensions_mut().remove::<Self>()?;
        let receiver = upgrade
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        receiver
    }
}
