//! What the head guard (see [`super::head_guard`]) and the request handler both know about one
//! client connection: who it is, the requests whose responses are still under way, and whether
//! it switched protocols.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex, PoisonError,
    },
    task::Waker,
};

use super::{upgrade::UpgradeSlot, Scheme};

/// What the guard and the request handler know about one connection.
#[derive(Debug)]
pub struct ConnectionState {
    /// Kept here rather than in the guard and in the request service: the state is the one
    /// allocation both hold anyway, and the connection's task, which the service is part of,
    /// stays under tokio's next task size class.
    pub client: SocketAddr,
    /// The port it came on, told to the handler with every request.
    pub scheme: Scheme,
    /// Requests shown to hyper (HTTP/1) or HTTP/2 streams opened whose response has not ended
    /// yet.
    in_flight: AtomicUsize,
    upgraded: AtomicBool,
    /// The guard's reader, waiting for a response to end.
    waiting_reader: Mutex<Option<Waker>>,
    /// Where the connection goes if a response switches protocols.
    pub upgrade: UpgradeSlot,
}

impl ConnectionState {
    pub fn new(client: SocketAddr, scheme: Scheme) -> Self {
        Self {
            client,
            scheme,
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            waiting_reader: Mutex::new(None),
            upgrade: UpgradeSlot::default(),
        }
    }

    /// A request began: an HTTP/1 head shown to hyper, or an HTTP/2 stream opened. Its
    /// response has not ended yet.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// The response to one request has ended, completely or not.
    pub fn response_ended(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |count| {
                count.checked_sub(1)
            });
        self.wake_reader();
    }

    /// The connection switched protocols: from now on its bytes are not HTTP/1.
    pub fn switched_protocols(&self) {
        self.upgraded.store(true, Ordering::SeqCst);
        self.wake_reader();
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn is_upgraded(&self) -> bool {
        self.upgraded.load(Ordering::SeqCst)
    }

    /// Has `waker` woken when a response ends (one waiter at a time: the connection's task).
    pub fn wait_for_response(&self, waker: &Waker) {
        *self.lock_reader() = Some(waker.clone());
    }

    fn wake_reader(&self) {
        if let Some(waker) = self.lock_reader().take() {
            waker.wake();
        }
    }

    fn lock_reader(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.waiting_reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
