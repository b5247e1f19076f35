//! Polling with a deadline, for everything in Docker that converges
//! asynchronously (engine start-up, task scheduling, container removal).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Calls `check` until it returns `Some`, an error, or `timeout` passes.
/// `what` completes "timed out after Ns waiting for ...".
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value() {
        let mut calls = 0;
        let value = wait_until("three calls", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .unwrap();
        assert_eq!(value, 3);
    }

    #[test]
    fn times_out_with_a_description() {
        let error =
            wait_until("nothing", Duration::from_millis(10), || Ok(None::<()>)).unwrap_err();
        assert!(error.to_string().contains("waiting for nothing"));
    }
}
