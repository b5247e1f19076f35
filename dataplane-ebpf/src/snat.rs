//! A new flow: the Maglev pick, the per-service flood limit, and the SNAT tuple, claimed with
//! a no-overwrite insert after the expired holder (if any) is removed; then both entries.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    programs::XdpContext,
};
use network_types::eth::EthHdr;
use xlb_common::{
    flow_expired, flow_state, ring_index, wire_port, BackendOf, FlowState, NextHop, ServiceValue,
    Stat, WireAddr, DIRECTION_FORWARD, DIRECTION_REPLY, HALF_PAIR_GRACE_NS, NO_BACKEND,
    SNAT_WALK_ATTEMPTS,
};

use crate::{
    family::{scratch_key, Family, Key, ScratchKey, Value},
    flows::{now, timeout},
    parse::{ptr_at, Malformed},
    setting,
    steer::Verdict,
    CLOSED_TUPLE, FLOOD_WINDOWS, RINGS, SETTINGS, SNAT_CURSOR,
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
fn flow_hash<F: Family>(key: &Key<F>) -> u32 {
    let ports =
        (u32::from(u16::from_be(key.src_port)) << 16) | u32::from(u16::from_be(key.dst_port));
    let mut hash = mix(F::hash_word(key.src_addr) ^ 0x9e37_79b9);
    hash = mix(hash ^ ports);
    mix(hash ^ u32::from(key.proto))
}

/// The backend Maglev picks for a new flow, from the service's live ring.
#[inline(always)]
fn pick_backend<F: Family>(key: &Key<F>, service: &ServiceValue) -> u32 {
    let ring_size = setting(&SETTINGS.ring_size);
    // `checked_rem`: an unconfigured ring size of 0 means no backend, not a panic path the
    // verifier would refuse.
    let Some(position) = flow_hash::<F>(key).checked_rem(ring_size) else {
        return NO_BACKEND;
    };
    let index = ring_index(service.slot, service.active_ring & 1, ring_size, position);
    RINGS.get(index).copied().unwrap_or(NO_BACKEND)
}

/// What a claim of a SNAT tuple came to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The tuple was free, or its holder expired and was removed: the reply entry is in.
    Claimed { reclaimed: bool },
    /// Held by a live flow, or by a closed one (then recorded in `CLOSED_TUPLE`).
    Held,
    /// Nothing holds it, yet the insert failed: the table is full.
    TableFull,
}

/// `claim`'s `closed` argument that takes a closed holder's tuple rather than recording it.
const TAKE_CLOSED: u32 = u32::MAX;

/// A tuple held by a flow that is over but still held (the one `new_flow` falls back on),
/// recorded in this CPU's `CLOSED_TUPLE` slot: closing (after a RST, or FIN both ways with
/// the client's first: only late segments may still come) or in the backend's TIME_WAIT.
/// Taken only when every other tuple tried is live, a closing one first: a refused SYN costs
/// its client a one-second retransmit, and taking the tuple costs at most that (see
/// `Stat::L4SnatTimeWaitReused`), usually nothing.
///
/// Recorded here rather than returned: after a claim the SNAT walk's state is then the same
/// whatever the holder was, and the verifier, which walks every path through the 16 attempts,
/// can prune all but one.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClosedTuple {
    /// The tuple's number (of addresses × ports).
    pub index: u32,
    /// [`CLOSED_NONE`], [`CLOSED_CLOSING`] or [`CLOSED_TIME_WAIT`].
    pub kind: u32,
}

pub const CLOSED_NONE: u32 = 0;
pub const CLOSED_CLOSING: u32 = 1;
pub const CLOSED_TIME_WAIT: u32 = 2;

/// Records tuple `index`'s closed holder, unless a better one is recorded: any beats none, a
/// closing one beats one in TIME_WAIT (nothing holds it).
#[inline(always)]
fn record_closed(index: u32, time_wait: bool) {
    let Some(record) = CLOSED_TUPLE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU slot, only ever touched by the CPU running this program.
    let record = unsafe { &mut *record };
    let kind = if time_wait {
        CLOSED_TIME_WAIT
    } else {
        CLOSED_CLOSING
    };
    if record.kind == CLOSED_NONE || (record.kind == CLOSED_TIME_WAIT && kind == CLOSED_CLOSING) {
        *record = ClosedTuple { index, kind };
    }
}

/// Tries to put `reply` at `reply_key` (SNAT tuple number `closed`), removing an expired
/// holder first. A closed holder is recorded (see [`ClosedTuple`]), or, when `closed` is
/// [`TAKE_CLOSED`], removed too.
///
/// The insert is `BPF_NOEXIST`: the kernel refuses a key that exists, so two flows never share
/// a SNAT tuple even when two CPUs race for it.
// Not inlined: the SNAT walk calls it up to `Family::SNAT_ATTEMPTS` times, and a BPF-to-BPF call keeps
// each call's locals out of the caller's 512-byte stack frame.
//
// It reads the clock itself rather than take the caller's `now`: the verifier narrows the
// range of a value it compares, in every copy of it, the caller's too; the caller's states
// after each of the 16 claims would then differ by that range, and the walk's paths would
// multiply past the verifier's limit instead of merging.
#[inline(never)]
fn claim<F: Family>(reply_key: &Key<F>, reply: &Value<F>, closed: u32) -> Claim {
    let now = now();
    let flows = F::flows();
    if flows.insert(reply_key, reply, BPF_NOEXIST as u64).is_ok() {
        return Claim::Claimed { reclaimed: false };
    }
    // SAFETY (both lookups): read in place; flow values are plain data.
    let Some(holder) = (unsafe { flows.get(reply_key) }) else {
        // (Or removed by another CPU just now: one SYN dropped, and retransmitted.)
        return Claim::TableFull;
    };
    let Some(forward_key) = scratch_key::<F>(ScratchKey::HolderForward) else {
        return Claim::Held;
    };
    holder.write_peer_key(forward_key, reply_key.proto);
    let forward_key: &Key<F> = forward_key;
    let holder_forward = match unsafe { flows.get(forward_key) } {
        Some(forward) if forward.is_peer_of(reply_key) => Some(forward),
        // Half a pair, or the forward key now belongs to another flow: nothing uses the tuple.
        _ => None,
    };
    if holder_forward.is_none() && now.saturating_sub(holder.last_seen_ns) <= HALF_PAIR_GRACE_NS {
        // A new flow's reply entry goes in a moment before its forward entry: another CPU may
        // be between the two inserts, and the tuple is its flow's.
        return Claim::Held;
    }
    if let Some(forward) = holder_forward {
        if !flow_expired(timeout, reply_key.proto, holder, forward, now) {
            let time_wait = match flow_state(reply_key.proto, holder, forward) {
                FlowState::Closing => false,
                FlowState::TimeWait => true,
                _ => return Claim::Held,
            };
            if closed != TAKE_CLOSED {
                record_closed(closed, time_wait);
                return Claim::Held;
            }
        }
        let _ = flows.remove(forward_key);
    }
    let _ = flows.remove(reply_key);
    if flows.insert(reply_key, reply, BPF_NOEXIST as u64).is_ok() {
        Claim::Claimed { reclaimed: true }
    } else {
        Claim::Held // taken by another CPU in between
    }
}

/// Makes `candidate` the reply key of SNAT tuple number `index` (of addresses × ports)
/// toward `backend`; false when there is no such tuple.
#[inline(always)]
fn set_snat_tuple<F: Family>(
    candidate: &mut Key<F>,
    backend: &BackendOf<F::Addr>,
    index: u32,
    range: u32,
    proto: u8,
) -> bool {
    // `checked_*`: a zero range has been refused already, and no panic path may reach the
    // verifier.
    let first = u32::from(setting(&SETTINGS.snat_port_first));
    let Some(offset) = index.checked_rem(range) else {
        return false;
    };
    let port = wire_port((first + offset) as u16);
    if F::snat_addr_count() == 0 {
        candidate.set(&backend.addr, &backend.snat_addr, backend.port, port, proto);
        return true;
    }
    let Some(addr) = index.checked_div(range).and_then(F::snat_addr) else {
        return false;
    };
    candidate.set(&backend.addr, &addr, backend.port, port, proto);
    true
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
pub fn new_flow<F: Family>(
    ctx: &XdpContext,
    key: &Key<F>,
    service: &ServiceValue,
    reopened: bool,
) -> Result<(*const Value<F>, *const BackendOf<F::Addr>, Option<Stat>), Verdict> {
    // Read here rather than passed: a BPF-to-BPF call takes at most five arguments.
    let now = now();
    let backend_id = pick_backend::<F>(key, service);
    let backend = match F::backends().get(backend_id) {
        Some(backend) if backend_id != NO_BACKEND && backend.addr != F::Addr::UNSPECIFIED => {
            backend
        }
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
    let addresses = match F::snat_addr_count() {
        0 => 1,
        count => count,
    };
    let tuples = range * addresses;
    let (Some(cursor), Some(reply), Some(forward)) = (
        SNAT_CURSOR.get_ptr_mut(0),
        F::flow_scratch().get_ptr_mut(0),
        F::flow_scratch().get_ptr_mut(1),
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
    reply.init(
        now,
        (&key.dst_addr, key.dst_port),
        (&key.src_addr, key.src_port),
        &to_client,
        service.slot,
        backend_id,
        DIRECTION_REPLY,
        backend.generation,
    );
    // Every tuple tried is built in this CPU's scratch key, and the one claimed is left there:
    // on the stack, keys would not fit the 512 bytes the verifier allows a call chain.
    let Some(candidate) = scratch_key::<F>(ScratchKey::Candidate) else {
        return Err(Verdict::drop(Stat::L4DropSnatExhausted));
    };
    let Some(closed) = CLOSED_TUPLE.get_ptr_mut(0) else {
        return Err(Verdict::drop(Stat::L4DropSnatExhausted));
    };
    // SAFETY: a per-CPU slot, as `reply`.
    let closed = unsafe { &mut *closed };
    closed.kind = CLOSED_NONE;
    // Some(event) once a tuple is claimed.
    let mut claimed: Option<Option<Stat>> = None;
    if reopened {
        // This CPU's slot, written by the reopen just before; read in place.
        if let Some(previous) = F::reopened_tuple().get(0) {
            let same_backend =
                previous.src_addr == backend.addr && previous.src_port == backend.port;
            if same_backend {
                candidate.set(
                    &previous.src_addr,
                    &previous.dst_addr,
                    previous.src_port,
                    previous.dst_port,
                    key.proto,
                );
                // Not a tuple of the walk: a closed holder is not recorded (there is none:
                // the reopen removed it).
                if let Claim::Claimed { .. } = claim::<F>(candidate, reply, TAKE_CLOSED) {
                    claimed = Some(None);
                }
            }
        }
    }
    for attempt in 0..F::SNAT_ATTEMPTS {
        if claimed.is_some() {
            break;
        }
        // The walk first: in the steady state the tuples after the cursor are the oldest.
        // Past a run of live ones (a pool's long-lived connections, or tuples another CPU
        // took), random tuples: with a share p of them in use, a flow is then refused with
        // probability about p^(attempts left), however long the run.
        let tried = if attempt < SNAT_WALK_ATTEMPTS {
            cursor.wrapping_add(attempt)
        } else {
            // SAFETY: helper call without arguments.
            unsafe { bpf_get_prandom_u32() }
        };
        let Some(index) = tried.checked_rem(tuples) else {
            break;
        };
        if !set_snat_tuple::<F>(candidate, backend, index, range, key.proto) {
            break;
        }
        match claim::<F>(candidate, reply, index) {
            Claim::Claimed { reclaimed } => {
                *cursor = index.wrapping_add(1);
                claimed = Some(reclaimed.then_some(Stat::L4FlowReclaimed));
                break;
            }
            Claim::Held => {}
            Claim::TableFull => return Err(Verdict::drop(Stat::L4DropFlowTable)),
        }
    }
    if claimed.is_none() {
        if closed.kind != CLOSED_NONE {
            let time_wait = closed.kind == CLOSED_TIME_WAIT;
            let taken = set_snat_tuple::<F>(candidate, backend, closed.index, range, key.proto)
                && matches!(
                    claim::<F>(candidate, reply, TAKE_CLOSED),
                    Claim::Claimed { .. }
                );
            if taken {
                let event = if time_wait {
                    Stat::L4SnatTimeWaitReused
                } else {
                    Stat::L4FlowReclaimed
                };
                claimed = Some(Some(event));
            }
        }
        // SAFETY: helper call without arguments. Leave the run of live tuples behind.
        *cursor = unsafe { bpf_get_prandom_u32() };
    }
    let Some(event) = claimed else {
        return Err(Verdict::drop(Stat::L4DropSnatExhausted));
    };
    let reply_key: &Key<F> = candidate;
    // Its next hop is read from BACKENDS per packet; the one here is only a record.
    forward.init(
        now,
        (&reply_key.dst_addr, reply_key.dst_port),
        (&backend.addr, backend.port),
        &backend.next_hop,
        service.slot,
        backend_id,
        DIRECTION_FORWARD,
        backend.generation,
    );
    if F::flows().insert(key, &*forward, BPF_ANY as u64).is_err() {
        let _ = F::flows().remove(reply_key);
        return Err(Verdict::drop(Stat::L4DropFlowTable));
    }
    Ok((
        forward as *const Value<F>,
        backend as *const BackendOf<F::Addr>,
        event,
    ))
}
