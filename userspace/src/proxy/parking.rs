//! Parked keep-alive connections of one worker, waiting together in one task: the *lot*.
//!
//! A connection's task is sized for serving requests: tokio's task cell for a plain HTTP/1
//! connection is 384 bytes, however little the connection is doing, and a task cannot shrink.
//! Most of a busy proxy's client connections are idle keep-alive connections, waiting for a
//! next request that may come in a second or never. So once the head guard has parked a
//! connection (see [`super::client_connection`]), its task ends and the connection waits in
//! its worker's lot, where it costs one node of a [`FuturesUnordered`] (about 100 bytes)
//! beside its guard. When the client sends again, the connection idles out, or the proxy
//! shuts down, the lot hands the connection to `resume`, which gives it a task again. nginx
//! keeps its idle connections in one event loop the same way.
//!
//! The lot asks the guard only whether there is something to do
//! ([`HeadGuard::poll_next_request`]), and the resumed connection asks again: the guard answers
//! the same (bytes it holds, its end, or that it is closing), so what the lot saw is not lost.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use futures_util::{stream::FuturesUnordered, StreamExt as _};
use tokio::{
    io::AsyncRead,
    sync::mpsc::{self, UnboundedReceiver, UnboundedSender},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::head_guard::HeadGuard;

/// A parked connection: its guard, and its place under `MaxConnections`.
pub struct Parked<IO, Slot> {
    pub guard: Box<HeadGuard<IO>>,
    pub slot: Slot,
}

/// Where a connection task leaves its connection when the guard parks it.
pub struct Parking<IO, Slot> {
    // Unbounded: every connection in it holds a `MaxConnections` slot, which bounds it.
    sender: UnboundedSender<Parked<IO, Slot>>,
}

impl<IO, Slot> Clone for Parking<IO, Slot> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
        }
    }
}

impl<IO, Slot> Parking<IO, Slot> {
    /// Leaves the connection in the lot; gives it back once the lot has closed (shutdown).
    pub fn park(&self, parked: Parked<IO, Slot>) -> Result<(), Parked<IO, Slot>> {
        self.sender.send(parked).map_err(|refused| refused.0)
    }
}

/// The lot: the parked connections of one worker and one listener type.
pub struct Lot<IO, Slot> {
    arrivals: UnboundedReceiver<Parked<IO, Slot>>,
}

/// A new lot, and where connections are left in it.
pub fn lot<IO, Slot>() -> (Parking<IO, Slot>, Lot<IO, Slot>) {
    let (sender, arrivals) = mpsc::unbounded_channel();
    (Parking { sender }, Lot { arrivals })
}

impl<IO: AsyncRead + Unpin, Slot: Unpin> Lot<IO, Slot> {
    /// Holds parked connections, giving each to `resume` as soon as it has something to do,
    /// until `shutdown`; then gives every connection still parked to `resume` (it finds the
    /// proxy shutting down and closes it) and returns.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        mut resume: impl FnMut(Parked<IO, Slot>),
    ) {
        let mut parked = FuturesUnordered::new();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(arrival) = self.arrivals.recv() => parked.push(Waiting(Some(arrival))),
                Some(ready) = parked.next(), if !parked.is_empty() => resume(ready),
            }
        }
        // No more arrivals: a connection parked from now on is given back to its task.
        self.arrivals.close();
        while let Ok(arrival) = self.arrivals.try_recv() {
            resume(arrival);
        }
        debug!(connections = parked.len(), "closing parked connections");
        for waiting in parked {
            if let Some(parked) = waiting.0 {
                resume(parked);
            }
        }
    }
}

/// A parked connection until its guard has something to do.
struct Waiting<IO, Slot>(Option<Parked<IO, Slot>>);

impl<IO: AsyncRead + Unpin, Slot: Unpin> Future for Waiting<IO, Slot> {
    type Output = Parked<IO, Slot>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let parked = this
            .0
            .as_mut()
            .expect("a parked connection polled after it left");
        if let Err(error) = ready!(parked.guard.poll_next_request(cx)) {
            debug!(client = %parked.guard.client(), %error, "reading from a parked client failed");
        }
        Poll::Ready(this.0.take().expect("checked above"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::proxy::{
        head_guard::PARK_AFTER,
        test_support::{EchoBackend, RawConnection, RunningProxy},
    };

    /// Long enough for an idle connection to be parked and in its lot.
    const PARKED: Duration = Duration::from_millis(4 * PARK_AFTER.as_millis() as u64);

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n";

    /// The second client is seen still waiting in the accept queue once the parked client has
    /// been served again: had parking released the slot, the proxy would have accepted the
    /// second client as it connected, before that request came.
    #[tokio::test]
    async fn a_parked_connection_keeps_its_slot_and_is_served_again() {
        let backend = EchoBackend::start().await;
        let (proxy, accept_queue) =
            RunningProxy::start_watching_accepts(&[("app", &[backend.addr])], 1).await;
        let mut parked = proxy.client().await;
        assert_eq!(parked.get("app", "/first").await.status, 200);
        tokio::time::sleep(PARKED).await;

        let mut second = proxy.client().await;
        let waiting = tokio::spawn(async move { second.get("app", "/").await });
        let again = parked.get("app", "/again").await;
        assert_eq!(again.status, 200);
        assert_eq!(again.echo()["path"], "/again");
        assert_eq!(
            accept_queue.waiting(),
            1,
            "a second client was accepted beyond MaxConnections 1 while the first was parked"
        );
        assert!(!waiting.is_finished());

        drop(parked);
        let answered = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the second client is served once the first has left");
        assert_eq!(answered.unwrap().status, 200);
    }

    /// Each connection leaves the lot with its own next request, whichever order they come in.
    #[tokio::test]
    async fn connections_parked_together_each_get_their_own_answer() {
        let backend = EchoBackend::start().await;
        let proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let mut clients = Vec::new();
        for _ in 0..40 {
            let mut client = proxy.client().await;
            assert_eq!(client.get("app", "/").await.status, 200);
            clients.push(client);
        }
        tokio::time::sleep(PARKED).await;
        for (index, client) in clients.iter_mut().enumerate().rev() {
            let path = format!("/client-{index}");
            let response = client.get("app", &path).await;
            assert_eq!(response.status, 200);
            assert_eq!(response.echo()["path"], path.as_str());
        }
        assert_eq!(backend.connections_accepted(), 1);
    }

    #[tokio::test]
    async fn shutdown_closes_parked_connections_and_returns() {
        let backend = EchoBackend::start().await;
        let mut proxy = RunningProxy::start(&[("app", &[backend.addr])]).await;
        let mut parked = Vec::new();
        for _ in 0..3 {
            let mut connection = RawConnection::connect(proxy.addr).await;
            connection.send(GET).await;
            assert_eq!(connection.read_response().await.status, 200);
            parked.push(connection);
        }
        tokio::time::sleep(PARKED).await;

        proxy.shutdown.cancel();
        let served = tokio::time::timeout(Duration::from_secs(5), &mut proxy.served)
            .await
            .expect("serve returns after shutdown with connections parked");
        served.unwrap().unwrap();
        for connection in parked {
            let exchange = connection.read_until_closed().await;
            assert!(exchange.closed, "a parked connection left open");
            assert!(exchange.received.is_empty(), "{:?}", exchange.received);
        }
    }
}
