//! A client's HTTP/1 connection after its request switched protocols (`101`).
//!
//! hyper serves each HTTP/1 client connection only while it has requests (see
//! [`super::client_connection`]), so the relay after `101` cannot run in the request's future:
//! it runs in the connection's task, which holds the connection's `MaxConnections` slot and
//! follows the proxy's shutdown. A request that may switch protocols carries a
//! [`ClientUpgrade`] in its extensions; the request sends the task's side of the exchange to it
//! ([`UpstreamUpgrade`]) before answering `101`, and the connection's task, once hyper has
//! written the `101` and given the connection back, takes it from the [`UpgradeSlot`].

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use http::Request;
use hyper::upgrade::OnUpgrade;
use tokio::sync::oneshot;

use super::{replayed::Replayed, router::InFlight};

/// The client's connection after `101`: the bytes it sent that hyper had read already, then
/// the connection itself.
pub type UpgradedClient<IO> = Replayed<IO>;

/// The task's side of a switched exchange.
#[derive(Debug)]
pub struct UpstreamUpgrade {
    /// The task's connection, once hyper's client has read the `101`.
    pub upgraded: OnUpgrade,
    pub addr: SocketAddr,
    /// The relay counts as a request in flight to the endpoint (least-outstanding balancing).
    pub in_flight: InFlight,
}

/// The connection task's side: where the request that switches protocols leaves the task's
/// side of the exchange.
#[derive(Debug, Default)]
pub struct UpgradeSlot(Mutex<Option<oneshot::Receiver<UpstreamUpgrade>>>);

impl UpgradeSlot {
    /// Puts a [`ClientUpgrade`] into `request`, replacing the previous request's.
    pub fn offer<B>(&self, request: &mut Request<B>) {
        let (sender, receiver) = oneshot::channel();
        *self.lock() = Some(receiver);
        request
            .extensions_mut()
            .insert(ClientUpgrade(Arc::new(Mutex::new(Some(sender)))));
    }

    /// The task's side of the exchange that switched protocols, which its request sent before
    /// answering `101`; `None` if it sent none (the `101` was not one the proxy relays).
    pub fn take(&self) -> Option<UpstreamUpgrade> {
        self.lock().take()?.try_recv().ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<oneshot::Receiver<UpstreamUpgrade>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The request's side. Extensions must be `Clone`, hence the shared sender; the first
/// [`ClientUpgrade::take`] gets it.
#[derive(Clone)]
pub struct ClientUpgrade(Arc<Mutex<Option<oneshot::Sender<UpstreamUpgrade>>>>);

/// Where a request that switches protocols sends the task's side of the exchange.
pub type UpgradeSender = oneshot::Sender<UpstreamUpgrade>;

impl ClientUpgrade {
    /// Where to send the task's side, if `request` came on an HTTP/1 connection that may switch.
    pub fn take<B>(request: &mut Request<B>) -> Option<UpgradeSender> {
        let upgrade = request.extensions_mut().remove::<Self>()?;
        let sender = upgrade
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        sender
    }
}

/// `io` with what hyper had read from it past the `101` request.
pub fn upgraded_client<IO>(io: IO, read_ahead: Bytes) -> UpgradedClient<IO> {
    Replayed::new(read_ahead, io)
}
