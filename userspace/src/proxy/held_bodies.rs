//! The budget for request bodies held in memory for replay (see [`super::retry`]): one per
//! worker, as `MaxConnections` is. Each held body is at most [`super::retry::HELD_BODY_LIMIT`],
//! but a worker serves up to `MaxConnections` connections of up to 128 HTTP/2 streams each, so
//! without a budget its held bodies could reach gigabytes. A request that finds the budget
//! spent streams its body instead, as a larger one does: it is served all the same, only not
//! replayed on another endpoint should its first one fail.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

/// Bytes of request bodies a worker may hold at once, and how many it holds.
#[derive(Debug)]
pub struct HeldBodies {
    limit: usize,
    held: AtomicUsize,
}

impl HeldBodies {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: AtomicUsize::new(0),
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// An empty reservation, to grow as a body arrives.
    pub fn reserve(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }
}

/// One request's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<HeldBodies>,
    bytes: usize,
}

impl Reservation {
    /// Takes `bytes` more from the budget; `false`, taking nothing, if that would overspend it.
    pub fn grow(&mut self, bytes: usize) -> bool {
        let limit = self.budget.limit;
        let taken = self
            .budget
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes).filter(|&total| total <= limit)
            })
            .is_ok();
        if taken {
            self.bytes += bytes;
        }
        taken
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_overspend_and_give_back_when_dropped() {
        let budget = HeldBodies::new(100);
        let mut first = budget.reserve();
        assert!(first.grow(60));
        let mut second = budget.reserve();
        assert!(!second.grow(41), "overspent");
        assert!(second.grow(40));
        assert_eq!(budget.held(), 100);
        drop(first);
        assert_eq!(budget.held(), 40);
        assert!(second.grow(60));
        drop(second);
        assert_eq!(budget.held(), 0);
    }
}
