//! The sweep's removals, in the kernel: the daemon judges from a snapshot of the table which
//! flows are over (`userspace/src/l4/conntrack.rs`) and hands their keys to `xlb_sweep`
//! through `BPF_PROG_TEST_RUN`, as the bytes of the frame. Each flow is judged again here, at
//! the moment it is removed, by the rule the packet path applies.
//!
//! Removing from userspace cannot be made safe: between a check of an entry and its delete
//! (system calls apart, the sweeping thread preemptible), a SYN can reopen the flow with the
//! very same two keys, and the delete then takes the new flow's entries from under its
//! handshake. Here the check and the removal are nanoseconds apart with preemption off, the
//! same window the packet path's own reclaims leave between CPUs.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use xlb_common::{
    flow_expired, sweep_keys_per_run, DIRECTION_FORWARD, HALF_PAIR_GRACE_NS, SWEEP_HALF_PAIRS_UNIT,
};

use crate::{
    family::{Family, Key},
    flows::{now, remove_pair, timeout},
    parse::read_at,
};

/// Removes `key`'s flow (given by its forward key) if it is over, or `key` alone if it is
/// half a pair past its grace; returns what it removed, in `xlb_sweep`'s units.
// Not inlined: one call frame for every key instead of 200 copies of the body.
#[inline(never)]
fn remove_if_over<F: Family>(key: &Key<F>, now: u64) -> u32 {
    let flows = F::flows();
    // SAFETY (both lookups): read in place; flow values are plain data.
    let Some(entry) = (unsafe { flows.get(key) }) else {
        return 0;
    };
    let peer_key = entry.peer_key(key.proto);
    match unsafe { flows.get(&peer_key) } {
        Some(peer) if peer.is_peer_of(key) => {
            let over = entry.direction == DIRECTION_FORWARD
                && flow_expired(timeout, key.proto, entry, peer, now);
            if over {
                remove_pair::<F>(key, &peer_key);
                return 1;
            }
            0
        }
        _ if now.saturating_sub(entry.last_seen_ns) > HALF_PAIR_GRACE_NS => {
            let _ = flows.remove(key);
            SWEEP_HALF_PAIRS_UNIT
        }
        _ => 0,
    }
}

/// The frame is up to `sweep_keys_per_run` flow keys of family `F`; the return value counts
/// the removals.
#[inline(always)]
pub fn sweep<F: Family>(ctx: &XdpContext) -> u32 {
    let now = now();
    let mut removed = 0;
    let key_size = size_of::<Key<F>>();
    for index in 0..sweep_keys_per_run(key_size) {
        let Ok(key) = read_at::<Key<F>>(ctx, index * key_size) else {
            break;
        };
        removed += remove_if_over::<F>(&key, now);
    }
    removed
}
