//! A timer for deadlines that move later far more often than they are reached: a connection's
//! idle and read timeouts start again with every request, and are almost never reached.
//!
//! Re-arming tokio's timer for each new deadline takes it out of the timer wheel and puts it
//! back, two or three times per request; under callgrind that was most of the cost of the head
//! guard's and the upstream connection's timeouts. So a deadline later than the armed one
//! leaves the timer as it is, as nginx leaves a timer that moves by less than its lazy delay: when
//! the armed one passes, the timer is armed again for the deadline as it is then. A busy
//! connection's timer fires a few spurious times a second instead of being re-armed on every
//! request. A deadline earlier than the armed one re-arms it at once, so none is reached late.

use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::time::{Instant, Sleep};

/// One timer, for one deadline at a time.
#[derive(Debug)]
pub struct LazyDeadline {
    /// At or before the deadline last polled for.
    armed: Pin<Box<Sleep>>,
}

impl LazyDeadline {
    /// Armed for `first`: a deadline polled for later only re-arms it if it is earlier.
    pub fn new(first: Instant) -> Self {
        Self {
            armed: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    /// `Ready` once `deadline` has passed; until then `cx` is woken at or before it.
    pub fn poll_reached(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if deadline < self.armed.deadline() {
            self.armed.as_mut().reset(deadline);
        }
        loop {
            ready!(self.armed.as_mut().poll(cx));
            if self.armed.deadline() >= deadline {
                return Poll::Ready(());
            }
            // What passed was an earlier deadline, since moved on.
            self.armed.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{future::poll_fn, time::Duration};

    use super::*;

    async fn reached(timer: &mut LazyDeadline, deadline: Instant) -> bool {
        poll_fn(|cx| Poll::Ready(timer.poll_reached(deadline, cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_moved_later_is_reached_at_its_new_time_not_the_armed_one() {
        let start = Instant::now();
        let mut timer = LazyDeadline::new(start + Duration::from_secs(1));
        assert!(!reached(&mut timer, start + Duration::from_secs(1)).await);
        let later = start + Duration::from_secs(5);
        assert!(!reached(&mut timer, later).await);
        tokio::time::sleep_until(start + Duration::from_secs(2)).await;
        assert!(
            !reached(&mut timer, later).await,
            "the armed second passed, not the deadline"
        );
        tokio::time::sleep_until(later).await;
        assert!(reached(&mut timer, later).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_earlier_than_the_armed_one_is_not_reached_late() {
        let start = Instant::now();
        let mut timer = LazyDeadline::new(start + Duration::from_secs(60));
        let sooner = start + Duration::from_millis(50);
        let fired = poll_fn(|cx| timer.poll_reached(sooner, cx));
        tokio::time::timeout(Duration::from_millis(60), fired)
            .await
            .expect("the earlier deadline wakes its task");
    }
}
