//! The connection table from userspace: the sweep, and what the table holds.
//!
//! The XDP program removes a flow only when something needs its place: a new flow whose SNAT
//! tuple it holds, or a SYN reopening its 5-tuple. Everything else that is over (a client that
//! vanished, a closed flow nobody collides with) is removed by the sweep (see [`SweepSchedule`] for when), by the
//! same rule the program applies (`xlb_common::flow_expired`), so the table does not fill with
//! the dead. The table is read in batches ([`super::batch`]) and judged here; the removals are
//! the kernel's: the keys go to the program's `xlb_sweep` through `BPF_PROG_TEST_RUN`, which
//! judges each flow again as it removes it (why: `dataplane-ebpf/src/sweep.rs`).
//!
//! [`plan_sweep`] decides from a snapshot of the entries and is pure; [`judge`] runs it on the
//! kernel's map, and [`remove_judged`] has the program carry out what it decided. The IPv4 and
//! IPv6 tables are swept alike, each by the program's sweep of its family ([`Sweep`]).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use serde::Serialize;
use xlb_common::{
    flow_expired, flow_state, sweep_keys_per_run, FlowKeyOf, FlowState, FlowValueOf, Ipv6Wire,
    Timeouts, WireAddr, DIRECTION_FORWARD, HALF_PAIR_GRACE_NS, SWEEP_HALF_PAIRS_UNIT,
};

use super::batch;
use crate::dataplane_error::DataplaneError;

/// The shortest time between two of the daemon's sweeps.
pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The longest: what `/stats` shows of the table is at most about this old.
pub const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// What the table holds, by state; flows are counted once, by their forward entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TableSummary {
    pub entries: u64,
    /// Entries each family's table holds at most (the IPv4 and IPv6 tables are as large).
    pub capacity: u32,
    pub flows: BTreeMap<&'static str, u64>,
    /// Entries without their peer (half a pair, briefly, while a flow is being created).
    pub half_pairs: u64,
    /// SNAT tuples in use per backend id: how close each backend is to exhaustion.
    pub snat_tuples_in_use: BTreeMap<u32, u64>,
}

impl TableSummary {
    /// Both families' tables as one (backend ids are one space, so their tuples add up).
    fn merge(&self, other: &TableSummary) -> TableSummary {
        let mut merged = self.clone();
        merged.entries += other.entries;
        merged.half_pairs += other.half_pairs;
        for (state, count) in &other.flows {
            *merged.flows.entry(state).or_default() += count;
        }
        for (id, count) in &other.snat_tuples_in_use {
            *merged.snat_tuples_in_use.entry(*id).or_default() += count;
        }
        merged
    }
}

/// What one sweep of one family's table found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepPlan<A> {
    /// The forward keys of expired flows (the program removes the forward entry first, so
    /// that nothing forwards into a freed tuple).
    pub expired: Vec<FlowKeyOf<A>>,
    /// Entries whose peer has been missing for longer than [`HALF_PAIR_GRACE_NS`].
    pub stale: Vec<FlowKeyOf<A>>,
    pub expired_flows: u64,
    pub stale_half_pairs: u64,
    /// Entries in the snapshot judged.
    pub read: u64,
    /// The table as it will be once the plan is applied.
    pub summary: TableSummary,
}

/// One sweep of both tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    pub ipv4: SweepPlan<u32>,
    pub ipv6: SweepPlan<Ipv6Wire>,
}

impl Sweep {
    pub fn expired_flows(&self) -> u64 {
        self.ipv4.expired_flows + self.ipv6.expired_flows
    }

    pub fn stale_half_pairs(&self) -> u64 {
        self.ipv4.stale_half_pairs + self.ipv6.stale_half_pairs
    }

    /// Both tables as they will be once the plans are applied.
    pub fn summary(&self) -> TableSummary {
        self.ipv4.summary.merge(&self.ipv6.summary)
    }
}

/// Sweep totals since the program was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SweepTotals {
    pub sweeps: u64,
    pub expired_flows: u64,
    pub stale_half_pairs: u64,
}

/// Which entries of `entries` to remove at `now` (CLOCK_MONOTONIC nanoseconds, the program's
/// clock), and what stays.
pub fn plan_sweep<A: WireAddr>(
    entries: &[(FlowKeyOf<A>, FlowValueOf<A>)],
    timeouts: &Timeouts,
    capacity: u32,
    now: u64,
) -> SweepPlan<A> {
    // foldhash, not SipHash: the keys are the kernel's, and hashing a full table's with SipHash
    // was over a quarter of the sweep's userspace time (perf).
    let table: foldhash::HashMap<FlowKeyOf<A>, &FlowValueOf<A>> =
        entries.iter().map(|(key, value)| (*key, value)).collect();
    let timeout = |state: FlowState| timeouts.for_state(state);
    let mut plan = SweepPlan {
        expired: Vec::new(),
        stale: Vec::new(),
        expired_flows: 0,
        stale_half_pairs: 0,
        read: entries.len() as u64,
        summary: TableSummary::default(),
    };
    plan.summary.capacity = capacity;
    for (key, value) in entries {
        let peer = table
            .get(&value.peer_key(key.proto))
            .filter(|peer| peer.is_peer_of(key));
        let Some(peer) = peer else {
            if now.saturating_sub(value.last_seen_ns) > HALF_PAIR_GRACE_NS {
                plan.stale_half_pairs += 1;
                plan.stale.push(*key);
            } else {
                plan.summary.entries += 1;
                plan.summary.half_pairs += 1;
            }
            continue;
        };
        let expired = flow_expired(timeout, key.proto, value, peer, now);
        match (value.direction, expired) {
            (DIRECTION_FORWARD, true) => {
                plan.expired_flows += 1;
                plan.expired.push(*key);
            }
            (_, true) => {}
            (DIRECTION_FORWARD, false) => {
                plan.summary.entries += 1;
                let state = flow_state(key.proto, value, peer).name();
                *plan.summary.flows.entry(state).or_default() += 1;
            }
            (_, false) => {
                plan.summary.entries += 1;
                *plan
                    .summary
                    .snat_tuples_in_use
                    .entry(value.backend_id)
                    .or_default() += 1;
            }
        }
    }
    plan
}

/// How one family's table moved over the time between two sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableGrowth {
    /// Entries the previous sweep left.
    pub left_before: u64,
    /// Entries this sweep read.
    pub read: u64,
    /// Entries this sweep left.
    pub left: u64,
    pub capacity: u64,
    /// Since the previous sweep.
    pub elapsed: Duration,
}

/// When to sweep a table next. A sweep reads the table whole, so it costs in proportion to the
/// entries held, whatever it removes: sweeping every second the ~140 000 entries a
/// new-connection load had left took 3.5% of the bench machine's time during the keep-alive
/// load that followed (perf), four times what the XDP program took. Nothing needs the dead
/// entries gone until the table would fill (a new flow reclaims an expired flow's SNAT tuple
/// itself where it needs it), so the next sweep is due in half the time the table would take
/// to fill at the rate it grew since the previous sweep, within [`MIN_SWEEP_INTERVAL`] and
/// [`MAX_SWEEP_INTERVAL`]. (The kernel's conntrack garbage collection, and Cilium's, likewise
/// scan less often when a scan finds little to do.)
pub fn next_sweep_interval(growth: TableGrowth) -> Duration {
    let grown = growth.read.saturating_sub(growth.left_before);
    let room = growth.capacity.saturating_sub(growth.left);
    if grown == 0 {
        return MAX_SWEEP_INTERVAL;
    }
    // room / (grown / elapsed) / 2, in floating point: the counts fit f64 exactly.
    let fill_time = growth.elapsed.as_secs_f64() * room as f64 / grown as f64;
    Duration::from_secs_f64(fill_time / 2.0).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL)
}

/// The daemon's sweep timing: what the previous sweep left of each table, and when it ran.
#[derive(Debug, Clone, Default)]
pub struct SweepSchedule {
    previous: Option<(Instant, [u64; 2])>,
    next: Option<Duration>,
}

impl SweepSchedule {
    /// Records `sweep`, run at `now`; the wait until the next is then [`SweepSchedule::next`].
    pub fn record(&mut self, sweep: &Sweep, now: Instant) {
        let left = [sweep.ipv4.summary.entries, sweep.ipv6.summary.entries];
        // The first sweep has no growth to go by: the next one is a second later.
        self.next = self.previous.map(|(then, left_before)| {
            let growth = |family: usize, read: u64, capacity: u32| TableGrowth {
                left_before: left_before[family],
                read,
                left: left[family],
                capacity: u64::from(capacity),
                elapsed: now.saturating_duration_since(then),
            };
            next_sweep_interval(growth(0, sweep.ipv4.read, sweep.ipv4.summary.capacity)).min(
                next_sweep_interval(growth(1, sweep.ipv6.read, sweep.ipv6.summary.capacity)),
            )
        });
        self.previous = Some((now, left));
    }

    /// How long to wait for the next sweep.
    pub fn next(&self) -> Duration {
        self.next.unwrap_or(MIN_SWEEP_INTERVAL)
    }
}

/// Reads `flows` and judges it at `now` (see [`plan_sweep`]).
pub fn judge<A: WireAddr>(
    flows: &HashMap<MapData, FlowKeyOf<A>, FlowValueOf<A>>,
    timeouts: &Timeouts,
    capacity: u32,
    now: u64,
) -> Result<SweepPlan<A>, DataplaneError>
where
    FlowKeyOf<A>: aya::Pod,
    FlowValueOf<A>: aya::Pod,
{
    use aya::maps::IterableMap;
    let entries: Vec<(FlowKeyOf<A>, FlowValueOf<A>)> =
        batch::read_all(flows.map()).map_err(|source| DataplaneError::Sweep {
            action: "read",
            source,
        })?;
    Ok(plan_sweep(&entries, timeouts, capacity, now))
}

/// Has `remover` (the program's `xlb_sweep` or `xlb_sweep6`, for the family's keys) remove
/// what `plan` judged over, unless it has carried a packet since, and counts in `plan` what
/// was removed.
pub fn remove_judged<A: WireAddr>(
    remover: &Xdp,
    plan: &mut SweepPlan<A>,
) -> Result<(), DataplaneError> {
    let candidates: Vec<FlowKeyOf<A>> = plan.expired.iter().chain(&plan.stale).copied().collect();
    let (mut flows_removed, mut halves_removed) = (0, 0);
    let keys_per_run = sweep_keys_per_run(std::mem::size_of::<FlowKeyOf<A>>());
    for chunk in candidates.chunks(keys_per_run) {
        let removed = remover
            .test_run(TestRunOptions {
                data_in: Some(key_bytes(chunk)),
                ..TestRunOptions::default()
            })
            .map_err(|error| DataplaneError::SweepRun(Box::new(error)))?
            .return_value;
        flows_removed += u64::from(removed % SWEEP_HALF_PAIRS_UNIT);
        halves_removed += u64::from(removed / SWEEP_HALF_PAIRS_UNIT);
    }
    // A flow the program found young again stays; the next sweep judges it anew.
    plan.expired_flows = flows_removed;
    plan.stale_half_pairs = halves_removed;
    Ok(())
}

/// The keys as the bytes of a frame for the program's sweep.
fn key_bytes<A: WireAddr>(keys: &[FlowKeyOf<A>]) -> &[u8] {
    // SAFETY: a flow key is `repr(C)` plain data without padding bytes left uninitialised
    // (its padding is an explicit zeroed field, and both address types are whole words), so
    // its bytes may be read as `u8`s.
    unsafe { std::slice::from_raw_parts(keys.as_ptr().cast(), std::mem::size_of_val(keys)) }
}

/// The clock the XDP program stamps flows with (`bpf_ktime_get_coarse_ns` is the same clock,
/// a tick behind at most), in nanoseconds.
pub fn monotonic_now() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use xlb_common::{FlowKey, FlowValue, DIRECTION_REPLY, IPPROTO_TCP, IPPROTO_UDP};

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn timeouts() -> Timeouts {
        Timeouts {
            tcp_handshake_ns: 10 * SECOND,
            tcp_established_ns: 3600 * SECOND,
            tcp_closing_ns: 10 * SECOND,
            tcp_time_wait_ns: 60 * SECOND,
            udp_ns: 30 * SECOND,
        }
    }

    /// A flow's forward and reply entries, client port `port`, last seen at `last_seen`.
    fn flow(
        proto: u8,
        port: u16,
        last_seen: u64,
        latch: fn(&mut FlowValue),
    ) -> [(FlowKey, FlowValue); 2] {
        let forward_key = FlowKey {
            src_addr: 1,
            dst_addr: 2,
            src_port: port,
            dst_port: 80,
            proto,
            _pad: [0; 3],
        };
        let reply_key = FlowKey {
            src_addr: 3,
            dst_addr: 4,
            src_port: 30000,
            dst_port: port + 1000,
            proto,
            _pad: [0; 3],
        };
        let mut forward = FlowValue {
            last_seen_ns: last_seen,
            new_src_addr: reply_key.dst_addr,
            new_dst_addr: reply_key.src_addr,
            new_src_port: reply_key.dst_port,
            new_dst_port: reply_key.src_port,
            backend_id: 7,
            direction: DIRECTION_FORWARD,
            ..FlowValue::default()
        };
        let mut reply = FlowValue {
            last_seen_ns: last_seen,
            new_src_addr: forward_key.dst_addr,
            new_dst_addr: forward_key.src_addr,
            new_src_port: forward_key.dst_port,
            new_dst_port: forward_key.src_port,
            backend_id: 7,
            direction: DIRECTION_REPLY,
            ..FlowValue::default()
        };
        latch(&mut forward);
        latch(&mut reply);
        [(forward_key, forward), (reply_key, reply)]
    }

    fn established(value: &mut FlowValue) {
        value.established = 1;
    }

    #[test]
    fn each_state_expires_after_its_own_timeout() {
        let now = 4000 * SECOND;
        let entries: Vec<_> = [
            flow(IPPROTO_TCP, 1, now - 11 * SECOND, |_| {}), // handshake: expired
            flow(IPPROTO_TCP, 2, now - 11 * SECOND, established), // live
            flow(IPPROTO_TCP, 3, now - 11 * SECOND, |v| {
                v.established = 1;
                v.fin_from_client = 1;
                v.fin_from_backend = 1;
            }), // closing: expired
            flow(IPPROTO_TCP, 4, now - 11 * SECOND, |v| {
                v.fin_from_client = 1;
                v.fin_from_backend = 1;
                v.backend_closed_first = 1;
            }), // TIME_WAIT: held
            flow(IPPROTO_UDP, 5, now - 31 * SECOND, |_| {}), // expired
            flow(IPPROTO_UDP, 6, now - 29 * SECOND, |_| {}), // live
        ]
        .into_iter()
        .flatten()
        .collect();
        let plan = plan_sweep(&entries, &timeouts(), 1024, now);
        let ports: Vec<u16> = plan
            .expired
            .iter()
            .map(|forward| forward.src_port)
            .collect();
        assert_eq!(ports, [1, 3, 5]);
        assert_eq!(plan.expired_flows, 3);
        assert_eq!(plan.summary.entries, 6);
        assert_eq!(
            plan.summary.flows,
            BTreeMap::from([("established", 1), ("time_wait", 1), ("udp", 1)])
        );
        assert_eq!(plan.summary.snat_tuples_in_use, BTreeMap::from([(7, 3)]));
    }

    #[test]
    fn a_flow_is_as_young_as_its_later_entry() {
        let now = 100 * SECOND;
        let [forward, (reply_key, mut reply)] = flow(IPPROTO_UDP, 1, now - 40 * SECOND, |_| {});
        reply.last_seen_ns = now - SECOND;
        let plan = plan_sweep(&[forward, (reply_key, reply)], &timeouts(), 16, now);
        assert!(plan.expired.is_empty() && plan.stale.is_empty());
        assert_eq!(plan.summary.flows, BTreeMap::from([("udp", 1)]));
    }

    #[test]
    fn half_pairs_go_once_they_are_past_the_grace() {
        let now = 100 * SECOND;
        let [(young_key, young), _] = flow(IPPROTO_TCP, 1, now - SECOND, established);
        let [_, (old_key, old)] = flow(IPPROTO_TCP, 2, now - 3 * SECOND, established);
        let plan = plan_sweep(&[(young_key, young), (old_key, old)], &timeouts(), 16, now);
        assert_eq!(
            plan.stale,
            [old_key],
            "the old one alone: a young one may be mid-creation"
        );
        assert_eq!(plan.stale_half_pairs, 1);
        assert_eq!(plan.summary.half_pairs, 1);
    }

    fn growth(left_before: u64, read: u64, left: u64, elapsed_secs: u64) -> TableGrowth {
        TableGrowth {
            left_before,
            read,
            left,
            capacity: 262_144,
            elapsed: Duration::from_secs(elapsed_secs),
        }
    }

    #[test]
    fn a_table_that_does_not_grow_is_swept_at_the_longest_interval() {
        // 140 000 entries left by an earlier load, none added since, some of them expiring.
        assert_eq!(
            next_sweep_interval(growth(140_000, 140_000, 120_000, 1)),
            MAX_SWEEP_INTERVAL
        );
        assert_eq!(
            next_sweep_interval(growth(140_000, 90_000, 80_000, 1)),
            MAX_SWEEP_INTERVAL
        );
    }

    #[test]
    fn the_next_sweep_comes_at_half_the_time_the_table_would_take_to_fill() {
        // 10 000 entries a second with 122 144 free: full in 12.2 s, swept again in 6.1 s.
        let interval = next_sweep_interval(growth(130_000, 150_000, 140_000, 2));
        assert_eq!(interval.as_millis(), 6_107);
        // Filling fast and nearly full: at once, that is at the shortest interval.
        assert_eq!(
            next_sweep_interval(growth(200_000, 250_000, 250_000, 1)),
            MIN_SWEEP_INTERVAL
        );
        assert_eq!(
            next_sweep_interval(growth(0, 262_144, 262_144, 1)),
            MIN_SWEEP_INTERVAL
        );
    }

    #[test]
    fn the_schedule_follows_the_faster_growing_family() {
        fn plan<A: WireAddr>(read: u64, left: u64) -> SweepPlan<A> {
            SweepPlan {
                read,
                summary: TableSummary {
                    entries: left,
                    capacity: 262_144,
                    ..TableSummary::default()
                },
                ..SweepPlan::default()
            }
        }
        let sweep = |ipv4: (u64, u64), ipv6: (u64, u64)| Sweep {
            ipv4: plan(ipv4.0, ipv4.1),
            ipv6: plan(ipv6.0, ipv6.1),
        };
        let start = Instant::now();
        let mut schedule = SweepSchedule::default();
        assert_eq!(schedule.next(), MIN_SWEEP_INTERVAL);
        schedule.record(&sweep((1_000, 1_000), (0, 0)), start);
        assert_eq!(schedule.next(), MIN_SWEEP_INTERVAL, "no growth known yet");
        schedule.record(
            &sweep((1_000, 1_000), (0, 0)),
            start + Duration::from_secs(1),
        );
        assert_eq!(schedule.next(), MAX_SWEEP_INTERVAL, "neither table grew");
        schedule.record(
            &sweep((1_000, 1_000), (200_000, 200_000)),
            start + Duration::from_secs(2),
        );
        assert_eq!(schedule.next(), MIN_SWEEP_INTERVAL, "IPv6 filling fast");
    }
}
