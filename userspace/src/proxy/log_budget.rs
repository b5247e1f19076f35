//! A budget for the warnings a request can raise: in an outage every request logs its failed
//! tries, and a log written at the request rate buries what matters and costs the proxy a
//! write per request. A budget lets [`PER_SECOND`] warnings through each second and counts
//! the others, whose number the next warning let through reports.
//!
//! Hand-written: `tracing` has no rate limit of its own, and a general limiter (`governor`)
//! would bring a clock abstraction and a dependency tree for three atomics.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::Instant,
};

/// Warnings let through per second, per budget.
pub const PER_SECOND: u64 = 10;

pub struct LogBudget {
    /// The second (since the process's first warning) the count below is for.
    second: AtomicU64,
    used: AtomicU64,
    /// Warnings held back since the last one let through.
    suppressed: AtomicU64,
}

impl LogBudget {
    pub const fn new() -> Self {
        Self {
            second: AtomicU64::new(0),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a warning may be logged now: `Some(held back since the last one)` if so.
    pub fn admit(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let second = START.get_or_init(Instant::now).elapsed().as_secs();
        self.admit_at(second)
    }

    fn admit_at(&self, second: u64) -> Option<u64> {
        let current = self.second.load(Ordering::Relaxed);
        if second != current
            && self
                .second
                .compare_exchange(current, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_a_second_pass_and_the_next_one_through_counts_the_rest() {
        let budget = LogBudget::new();
        for _ in 0..PER_SECOND {
            assert_eq!(budget.admit_at(7), Some(0));
        }
        for _ in 0..500 {
            assert_eq!(budget.admit_at(7), None);
        }
        assert_eq!(budget.admit_at(8), Some(500));
        assert_eq!(budget.admit_at(8), Some(0));
    }
}
