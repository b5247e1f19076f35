//! Passive health: an endpoint that could not be reached (connect refused or timed out, or no
//! response within `ReadTimeout`) is ejected for a short period that doubles with each
//! consecutive failure, up to a ceiling, and is forgotten on its first success.
//!
//! Ejection only reorders the endpoints a request tries: healthy ones first, ejected ones last.
//! When every endpoint is ejected they are all still tried, because Swarm's task state, not this
//! guess, decides which endpoints exist.

use foldhash::HashMap;
use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

/// How long endpoints stay ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionPeriods {
    /// After the first failure.
    pub first: Duration,
    /// The ceiling the doubling stops at.
    pub max: Duration,
}

impl Default for EjectionPeriods {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
pub struct PassiveHealth {
    periods: EjectionPeriods,
    /// foldhash: endpoint addresses come from the routes, and it is looked up per request.
    ejections: Mutex<HashMap<SocketAddr, Ejection>>,
    /// Whether `ejections` has entries, so that requests skip the lock while all is well.
    any_records: AtomicBool,
    /// Ejections begun since the start.
    ejections_begun: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Ejection {
    until: Instant,
    period: Duration,
}

impl PassiveHealth {
    pub fn new(periods: EjectionPeriods) -> Self {
        Self {
            periods,
            ejections: Mutex::new(HashMap::default()),
            any_records: AtomicBool::new(false),
            ejections_begun: AtomicU64::new(0),
        }
    }

    /// Ejects `addr`, for twice as long as last time if it fails again within `max` of its last
    /// ejection ending. Failures of requests that were already under way while it was ejected do
    /// not lengthen the ejection.
    pub fn record_failure(&self, addr: SocketAddr, now: Instant) {
        let mut ejections = self.lock();
        let period = match ejections.get(&addr) {
            Some(current) if now < current.until => return,
            Some(previous) if now < previous.until + self.periods.max => {
                (previous.period * 2).min(self.periods.max)
            }
            _ => self.periods.first,
        };
        ejections.insert(
            addr,
            Ejection {
                until: now + period,
                period,
            },
        );
        self.any_records.store(true, Ordering::Release);
        self.ejections_begun.fetch_add(1, Ordering::Relaxed);
        warn!(%addr, ?period, "upstream endpoint failed: ejected");
    }

    /// Forgets `addr`'s failures.
    pub fn record_success(&self, addr: SocketAddr) {
        if !self.any_records.load(Ordering::Acquire) {
            return;
        }
        let mut ejections = self.lock();
        if ejections.remove(&addr).is_some() {
            info!(%addr, "upstream endpoint answered again: no longer ejected");
        }
        self.any_records
            .store(!ejections.is_empty(), Ordering::Release);
    }

    /// Ejections begun since the start.
    pub fn ejections_begun(&self) -> u64 {
        self.ejections_begun.load(Ordering::Relaxed)
    }

    /// The endpoints ejected at `now`, sorted.
    pub fn ejected(&self, now: Instant) -> Vec<SocketAddr> {
        let mut ejected: Vec<SocketAddr> = self
            .lock()
            .iter()
            .filter(|(_, ejection)| now < ejection.until)
            .map(|(addr, _)| *addr)
            .collect();
        ejected.sort();
        ejected
    }

    #[cfg(test)]
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        self.lock()
            .get(&addr)
            .is_some_and(|ejection| now < ejection.until)
    }

    /// `candidates` with the ejected endpoints moved to the end, each group in its given order;
    /// `addr` tells a candidate's endpoint address.
    pub fn healthy_first<T>(
        &self,
        candidates: Vec<T>,
        addr: impl Fn(&T) -> SocketAddr,
        now: Instant,
    ) -> Vec<T> {
        if !self.any_records.load(Ordering::Acquire) {
            return candidates;
        }
        let ejections = self.lock();
        let (healthy, ejected): (Vec<_>, Vec<_>) = candidates.into_iter().partition(|candidate| {
            ejections
                .get(&addr(candidate))
                .is_none_or(|ejection| now >= ejection.until)
        });
        healthy.into_iter().chain(ejected).collect()
    }

    /// Drops the records of endpoints whose ejection ended so long ago that a new failure would
    /// start from the first period again.
    pub fn forget_stale(&self, now: Instant) {
        let max = self.periods.max;
        self.lock().retain(|_, ejection| now < ejection.until + max);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Ejection>> {
        // Every update is a single insert or remove, so the map is consistent after a panic.
        self.ejections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn health() -> PassiveHealth {
        PassiveHealth::new(EjectionPeriods {
            first: SECOND,
            max: 8 * SECOND,
        })
    }

    #[test]
    fn a_failure_ejects_for_the_first_period() {
        let health = health();
        let start = Instant::now();
        health.record_failure(addr(1), start);
        assert!(health.is_ejected(addr(1), start));
        assert!(health.is_ejected(addr(1), start + SECOND / 2));
        assert!(!health.is_ejected(addr(1), start + SECOND));
        assert!(!health.is_ejected(addr(2), start));
    }

    #[test]
    fn consecutive_failures_double_the_period_up_to_the_ceiling() {
        let health = health();
        let mut now = Instant::now();
        let mut periods = Vec::new();
        for _ in 0..6 {
            health.record_failure(addr(1), now);
            let mut ejected_for = Duration::ZERO;
            while health.is_ejected(addr(1), now + ejected_for) {
                ejected_for += SECOND;
            }
            periods.push(ejected_for.as_secs());
            now += ejected_for;
        }
        assert_eq!(periods, [1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn failures_during_an_ejection_do_not_lengthen_it() {
        let health = health();
        let start = Instant::now();
        health.record_failure(addr(1), start);
        health.record_failure(addr(1), start + SECOND / 2);
        assert!(!health.is_ejected(addr(1), start + SECOND));
    }

    #[test]
    fn success_and_a_quiet_spell_reset_the_period() {
        let health = health();
        let start = Instant::now();
        health.record_failure(addr(1), start);
        health.record_failure(addr(1), start + SECOND);
        health.record_success(addr(1));
        health.record_failure(addr(1), start + 3 * SECOND);
        assert!(!health.is_ejected(addr(1), start + 4 * SECOND));

        let later = start + 100 * SECOND;
        health.record_failure(addr(1), later);
        assert!(!health.is_ejected(addr(1), later + SECOND));
    }

    #[test]
    fn ejected_endpoints_go_last_but_stay_in_the_order() {
        let health = health();
        let now = Instant::now();
        health.record_failure(addr(2), now);
        health.record_failure(addr(4), now);
        let order = health.healthy_first(vec![addr(4), addr(1), addr(2), addr(3)], |a| *a, now);
        assert_eq!(order, [addr(1), addr(3), addr(4), addr(2)]);

        let all_ejected = health.healthy_first(vec![addr(2), addr(4)], |a| *a, now);
        assert_eq!(all_ejected, [addr(2), addr(4)]);

        let after = health.healthy_first(vec![addr(2), addr(1)], |a| *a, now + SECOND);
        assert_eq!(after, [addr(2), addr(1)]);
    }

    #[test]
    fn stale_records_are_forgotten() {
        let health = health();
        let now = Instant::now();
        health.record_failure(addr(1), now);
        health.forget_stale(now + 5 * SECOND);
        assert_eq!(health.lock().len(), 1);
        health.forget_stale(now + 9 * SECOND);
        assert!(health.lock().is_empty());
    }
}
