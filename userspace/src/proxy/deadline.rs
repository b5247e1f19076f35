//! Timeouts that move on every read and write (`ReadTimeout`, `KeepaliveTimeout`, ...) without
//! a timer-wheel update each time, as nginx and HAProxy keep theirs: a deadline that moves
//! later leaves the timer where it is, and when the timer fires early it is set again for the
//! deadline as it stands then. Only a deadline that moves earlier moves the timer at once.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::time::{Instant, Sleep};

/// `Ready` once `deadline` has passed; the caller passes the deadline as it stands at each
/// poll, and `timer` is the one timer that serves it.
pub fn poll_until(
    timer: &mut Pin<Box<Sleep>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if deadline < timer.deadline() {
        timer.as_mut().reset(deadline);
    }
    loop {
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if timer.deadline() >= deadline {
            return Poll::Ready(());
        }
        // Fired for an earlier deadline that has since moved on.
        timer.as_mut().reset(deadline);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn wait(timer: &mut Pin<Box<Sleep>>, deadline: Instant) {
        std::future::poll_fn(|cx| poll_until(timer, deadline, cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_deadline_is_honoured_although_the_timer_was_set_earlier() {
        let start = Instant::now();
        let mut timer = Box::pin(tokio::time::sleep_until(start + Duration::from_secs(1)));
        wait(&mut timer, start + Duration::from_secs(5)).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_moves_the_timer_at_once() {
        let start = Instant::now();
        let mut timer = Box::pin(tokio::time::sleep_until(start + Duration::from_secs(60)));
        wait(&mut timer, start + Duration::from_secs(2)).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_has_passed_is_ready_at_once() {
        let start = Instant::now();
        let mut timer = Box::pin(tokio::time::sleep_until(start + Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(3)).await;
        wait(&mut timer, start + Duration::from_secs(1)).await;
        assert_eq!(Instant::now(), start + Duration::from_secs(3));
    }
}
