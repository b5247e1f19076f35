//! A new flow: the Maglev pick, the per-service flood limit, and the SNAT tuple, claimed with
//! a no-overwrite insert after the expired holder (if any) is removed; then both entries.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    programs::XdpContext,
};
use network_types::eth::EthHdr;
use xlb_common::{
    flow_expired, flow_state, ring_index, wire_port, Backend, FlowKey, FlowState, FlowValue,
    NextHop, ServiceValue, Stat, DIRECTION_FORWARD, DIRECTION_REPLY, HALF_PAIR_GRACE_NS,
    NO_BACKEND, SNAT_ATTEMPTS, SNAT_WALK_ATTEMPTS,
};

use crate::{
    flows::{now, timeout},
    parse::{ptr_at, Malformed},
    setting,
    steer::Verdict,
    BACKENDS, FLOOD_WINDOWS, FLOWS, FLOW_SCRATCH, REOPENED_TUPLE, RINGS, SETTINGS, SNAT_CURSOR,
};

/// 32-bit finaliser of MurmurHash3: spreads every input bit over the whole word.
#[inline(always)]
fn mix(mut hash: u32) -> u32 {
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// The Maglev hash of a flow: the client's address and port, the service port and protocol.
/// The LB address is left out so that every LB address of a service, on every node, sends a
/// client's 5-tuple to the same backend.
#[inline(always)]
fn flow_hash(key: &FlowKey) -> u32 {
    let ports =
        (u32::from(u16::from_be(key.src_port)) << 16) | u32::from(u16::from_be(key.dst_port));
    let mut hash = mix(u32::from_be(key.src_addr) ^ 0x9e37_79b9);
    hash = mix(hash ^ ports);
    mix(hash ^ u32::from(key.proto))
}

/// The backend Maglev picks for a new flow, from the service's live ring.
#[inline(always)]
fn pick_backend(key: &FlowKey, service: &ServiceValue) -> u32 {
    let ring_size = setting(&SETTINGS.ring_size);
    // `checked_rem`: an unconfigured ring size of 0 means no backend, not a panic path the
    // verifier would refuse.
    let Some(position) = flow_hash(key).checked_rem(ring_size) else {
        return NO_BACKEND;
    };
    let index = ring_index(service.slot, service.active_ring & 1, ring_size, position);
    RINGS.get(index).copied().unwrap_or(NO_BACKEND)
}

/// What a SNAT tuple's current holder allows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// The tuple was free, or its holder expired and was removed: the reply entry is in.
    Claimed { reclaimed: bool },
    /// Held by a flow that is over but still held: closing (after a RST, or FIN both ways
    /// with the client's first: only late segments may still come) or in the backend's
    /// TIME_WAIT. Taken only when every other tuple tried is live, a closing one first: a
    /// refused SYN costs its client a one-second retransmit, and taking the tuple costs at
    /// most that (see `Stat::L4SnatTimeWaitReused`), usually nothing.
    Closed { time_wait: bool },
    /// Held by a live flow.
    Live,
    /// Nothing holds it, yet the insert failed: the table is full.
    TableFull,
}

/// Tries to put `reply` at `reply_key`, removing an expired holder first, and a closed one
/// too when `take_closed`.
///
/// The insert is `BPF_NOEXIST`: the kernel refuses a key that exists, so two flows never share
/// a SNAT tuple even when two CPUs race for it.
// Not inlined: the SNAT walk calls it up to `SNAT_ATTEMPTS` times, and a BPF-to-BPF call keeps
// each call's locals out of the caller's 512-byte stack frame.
#[inline(never)]
fn claim(reply_key: &FlowKey, reply: &FlowValue, now: u64, take_closed: bool) -> Holder {
    if FLOWS.insert(reply_key, reply, BPF_NOEXIST as u64).is_ok() {
        return Holder::Claimed { reclaimed: false };
    }
    // SAFETY (both lookups): read in place; FLOWS values are plain data.
    let Some(holder) = (unsafe { FLOWS.get(reply_key) }) else {
        // (Or removed by another CPU just now: one SYN dropped, and retransmitted.)
        return Holder::TableFull;
    };
    let forward_key = holder.peer_key(reply_key.proto);
    let holder_forward = match unsafe { FLOWS.get(&forward_key) } {
        Some(forward) if forward.peer_key(reply_key.proto) == *reply_key => Some(forward),
        // Half a pair, or the forward key now belongs to another flow: nothing uses the tuple.
        _ => None,
    };
    if holder_forward.is_none() && now.saturating_sub(holder.last_seen_ns) <= HALF_PAIR_GRACE_NS {
        // A new flow's reply entry goes in a moment before its forward entry: another CPU may
        // be between the two inserts, and the tuple is its flow's.
        return Holder::Live;
    }
    if let Some(forward) = holder_forward {
        if !flow_expired(timeout, reply_key.proto, holder, forward, now) {
            let time_wait = match flow_state(reply_key.proto, holder, forward) {
                FlowState::Closing => false,
                FlowState::TimeWait => true,
                _ => return Holder::Live,
            };
            if !take_closed {
                return Holder::Closed { time_wait };
            }
        }
        let _ = FLOWS.remove(&forward_key);
    }
    let _ = FLOWS.remove(reply_key);
    if FLOWS.insert(reply_key, reply, BPF_NOEXIST as u64).is_ok() {
        Holder::Claimed { reclaimed: true }
    } else {
        Holder::Live // taken by another CPU in between
    }
}

/// The SNAT tuple number `index` (of addresses × ports) toward `backend_snat_addr`'s backend:
/// its address and port, wire order.
#[inline(always)]
fn snat_tuple(index: u32, range: u32, backend_snat_addr: u32) -> Option<(u32, u16)> {
    // `checked_*`: a zero range has been refused already, and no panic path may reach the
    // verifier.
    let first = u32::from(setting(&SETTINGS.snat_port_first));
    let port = wire_port((first + index.checked_rem(range)?) as u16);
    if setting(&SETTINGS.snat_addr_count) == 0 {
        return Some((backend_snat_addr, port));
    }
    let addr = SETTINGS
        .snat_addrs
        .get(index.checked_div(range)? as usize)?;
    Some((setting(addr), port))
}

/// Counts a new flow against its service's limit for this second on this CPU; true when the
/// limit is spent. Checked before anything is allocated, so a flood costs no table entry or
/// SNAT tuple beyond the limit.
#[inline(always)]
fn flooded(slot: u32, now: u64) -> bool {
    let limit = setting(&SETTINGS.new_flows_per_cpu_second);
    if limit == 0 {
        return false;
    }
    let Some(window) = FLOOD_WINDOWS.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: a per-CPU slot is only ever touched by the CPU running this program.
    let window = unsafe { &mut *window };
    if now.wrapping_sub(window.start_ns) >= 1_000_000_000 {
        window.start_ns = now;
        window.new_flows = 0;
    }
    window.new_flows += 1;
    window.new_flows > u64::from(limit)
}

/// Creates the reply and forward entries of a new flow, allocating its SNAT tuple: the tuple of
/// the flow it reopens (`reopened`: left in `REOPENED_TUPLE`), when it goes to the same backend (a client reusing its port finds the
/// backend's socket as it left it, as with the kernel's conntrack); then the next ones on the
/// walk, then random ones (free, or expired and reclaimed); then the first closed flow's met.
/// The event says which.
///
/// The entries are built in this CPU's `FLOW_SCRATCH` slots, not on the stack (the verifier
/// allows 512 bytes for a whole call chain); the forward one is returned from there.
// Not inlined, for the same reason as `claim`: the established path's frame stays small.
#[inline(never)]
pub fn new_flow(
    ctx: &XdpContext,
    key: &FlowKey,
    service: &ServiceValue,
    reopened: bool,
) -> Result<(*const FlowValue, *const Backend, Option<Stat>), Verdict> {
    // Read here rather than passed: a BPF-to-BPF call takes at most five arguments.
    let now = now();
    let backend_id = pick_backend(key, service);
    let backend = match BACKENDS.get(backend_id) {
        Some(backend) if backend_id != NO_BACKEND && backend.addr != 0 => backend,
        _ => return Err(Verdict::drop(Stat::L4DropNoBackend)),
    };
    if flooded(service.slot, now) {
        return Err(Verdict::drop(Stat::L4DropFlood));
    }
    let first = u32::from(setting(&SETTINGS.snat_port_first));
    let last = u32::from(setting(&SETTINGS.snat_port_last));
    if first == 0 || last < first {
        return Err(Verdict::drop(Stat::L4DropSnatExhausted));
    }
    let range = last - first + 1;
    let addresses = match setting(&SETTINGS.snat_addr_count) {
        0 => 1,
        count => count,
    };
    let tuples = range * addresses;
    let (Some(cursor), Some(reply), Some(forward)) = (
        SNAT_CURSOR.get_ptr_mut(0),
        FLOW_SCRATCH.get_ptr_mut(0),
        FLOW_SCRATCH.get_ptr_mut(1),
    ) else {
        return Err(Verdict::drop(Stat::L4DropSnatExhausted));
    };
    // SAFETY: the scratch slots are per-CPU, touched only by the CPU running this program,
    // which XDP runs to completion; the cursor is shared, and a torn or lost update of it
    // only changes which tuple is tried first.
    let (cursor, reply, forward) = unsafe { (&mut *cursor, &mut *reply, &mut *forward) };
    if *cursor == 0 {
        // SAFETY: helper call without arguments. A random start, then the walk.
        *cursor = unsafe { bpf_get_prandom_u32() } | 1;
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|Malformed| Verdict::ABORTED)?;
    // SAFETY: `ptr_at` checked the header lies inside the frame; byte arrays.
    let (client_mac, our_mac) = unsafe { ((*eth).src_addr, (*eth).dst_addr) };
    let to_client = NextHop {
        ifindex: ctx.ingress_ifindex() as u32,
        src_mac: our_mac,
        dst_mac: client_mac,
    };
    *reply = FlowValue::new(
        now,
        (key.dst_addr, key.dst_port),
        (key.src_addr, key.src_port),
        &to_client,
        service.slot,
        backend_id,
        DIRECTION_REPLY,
        backend.generation,
    );
    // Tuples are kept as (SNAT address, SNAT port) and their keys rebuilt where needed: the
    // keys themselves would not fit the 512 bytes of stack the verifier allows a call chain.
    let tuple_key = |(snat_addr, snat_port): (u32, u16)| {
        FlowKey::new(backend.addr, snat_addr, backend.port, snat_port, key.proto)
    };
    let mut claimed: Option<((u32, u16), Option<Stat>)> = None;
    if reopened {
        // SAFETY: this CPU's scratch slot, written by the reopen just before.
        if let Some(previous) = REOPENED_TUPLE.get(0).copied() {
            let same_backend =
                previous.src_addr == backend.addr && previous.src_port == backend.port;
            if same_backend {
                if let Holder::Claimed { .. } = claim(&previous, reply, now, false) {
                    claimed = Some(((previous.dst_addr, previous.dst_port), None));
                }
            }
        }
    }
    // The first closed flow's tuple met, and whether it is in TIME_WAIT.
    let mut closed: Option<((u32, u16), bool)> = None;
    for attempt in 0..SNAT_ATTEMPTS {
        if claimed.is_some() {
            break;
        }
        // The walk first: in the steady state the tuples after the cursor are the oldest.
        // Past a run of live ones (a pool's long-lived connections, or tuples another CPU
        // took), random tuples: with a share p of them in use, a flow is then refused with
        // probability about p^(attempts left), however long the run.
        let candidate = if attempt < SNAT_WALK_ATTEMPTS {
            cursor.wrapping_add(attempt)
        } else {
            // SAFETY: helper call without arguments.
            unsafe { bpf_get_prandom_u32() }
        };
        let Some(index) = candidate.checked_rem(tuples) else {
            break;
        };
        let Some(tuple) = snat_tuple(index, range, backend.snat_addr) else {
            break;
        };
        match claim(&tuple_key(tuple), reply, now, false) {
            Holder::Claimed { reclaimed } => {
                *cursor = index.wrapping_add(1);
                claimed = Some((tuple, reclaimed.then_some(Stat::L4FlowReclaimed)));
                break;
            }
            // A closing flow's tuple is better than one in TIME_WAIT: nothing holds it.
            Holder::Closed { time_wait } if closed.is_none_or(|(_, held)| held && !time_wait) => {
                closed = Some((tuple, time_wait))
            }
            Holder::Closed { .. } | Holder::Live => {}
            Holder::TableFull => return Err(Verdict::drop(Stat::L4DropFlowTable)),
        }
    }
    if claimed.is_none() {
        if let Some((tuple, time_wait)) = closed {
            if let Holder::Claimed { .. } = claim(&tuple_key(tuple), reply, now, true) {
                let event = if time_wait {
                    Stat::L4SnatTimeWaitReused
                } else {
                    Stat::L4FlowReclaimed
                };
                claimed = Some((tuple, Some(event)));
            }
        }
        // SAFETY: helper call without arguments. Leave the run of live tuples behind.
        *cursor = unsafe { bpf_get_prandom_u32() };
    }
    let Some((tuple, event)) = claimed else {
        return Err(Verdict::drop(Stat::L4DropSnatExhausted));
    };
    let reply_key = tuple_key(tuple);
    // Its next hop is read from BACKENDS per packet; the one here is only a record.
    *forward = FlowValue::new(
        now,
        (reply_key.dst_addr, reply_key.dst_port),
        (backend.addr, backend.port),
        &backend.next_hop,
        service.slot,
        backend_id,
        DIRECTION_FORWARD,
        backend.generation,
    );
    if FLOWS.insert(key, &*forward, BPF_ANY as u64).is_err() {
        let _ = FLOWS.remove(&reply_key);
        return Err(Verdict::drop(Stat::L4DropFlowTable));
    }
    Ok((
        forward as *const FlowValue,
        backend as *const Backend,
        event,
    ))
}
