//! A client's HTTP/1 connection handed over after its request switched protocols (`101`).
//!
//! hyper serves each HTTP/1 client connection only while it has requests (see
//! [`super::client_connection`]), so it cannot hand the connection over itself as
//! `hyper::upgrade::on` would: the connection task does, once hyper has written the `101` and
//! given the connection back. A request that may switch protocols carries a [`ClientUpgrade`]
//! in its extensions; the task sends the connection to it.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::Request;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::oneshot,
};

use super::replayed::Replayed;

/// What a client connection is to the relay after an upgrade.
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<IO: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for IO {}

/// The client's connection after `101`: the bytes it sent that hyper had read already, then
/// the connection itself.
pub type UpgradedClient = Replayed<Box<dyn ClientIo>>;

/// `io` with what hyper had read from it past the `101` request.
pub fn upgraded_client(io: impl ClientIo + 'static, read_ahead: Bytes) -> UpgradedClient {
    Replayed::new(read_ahead, Box::new(io) as Box<dyn ClientIo>)
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
