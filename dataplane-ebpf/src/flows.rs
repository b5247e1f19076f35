//! The connection table on the packet path: finding a packet's flow, moving its state on the
//! packets that change it (SYN, FIN, RST, the handshake's last ACK; every other packet costs one
//! lookup and, once a second, a last-seen write), and removing a flow's two entries.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use xlb_common::{
    flow_expired, flow_state, FlowState, FlowValueOf, DIRECTION_FORWARD, LAST_SEEN_GRANULARITY_NS,
};

use crate::{
    family::{scratch_key, Family, Key, ScratchKey, Value},
    parse::TcpFlags,
    setting,
    steer::L4Packet,
    SETTINGS,
};

/// The timeout of a flow in `state`, from the global settings (one field read, no copy of
/// the whole table onto the 512-byte stack).
#[inline(always)]
pub fn timeout(state: FlowState) -> u64 {
    let timeouts = &SETTINGS.timeouts;
    setting(match state {
        FlowState::Handshake => &timeouts.tcp_handshake_ns,
        FlowState::Established => &timeouts.tcp_established_ns,
        FlowState::Closing => &timeouts.tcp_closing_ns,
        FlowState::TimeWait => &timeouts.tcp_time_wait_ns,
        FlowState::Udp => &timeouts.udp_ns,
    })
}

/// What the connection table says about a packet whose 5-tuple has an entry.
pub enum Tracked<F: Family> {
    /// Forward it as the entry says (the entry in the table: read in place, not copied).
    Flow(*const Value<F>),
    /// A connection request on a tuple whose flow is over (closed or expired): its entries
    /// were removed and the packet starts a new flow; its SNAT tuple (the reply key) is left
    /// in this CPU's `REOPENED_TUPLE` slot for the new flow to take again.
    Reopened,
    /// The entry's peer is gone or belongs to another flow (half of a pair removed, or a
    /// tuple taken over): the entry was removed and the packet dropped.
    Lost,
    /// As `Lost`, for a connection request: the packet starts a new flow (see
    /// [`without_peer`]).
    Orphaned,
}

/// CLOCK_MONOTONIC to within a tick (a few milliseconds): timeouts are seconds long, and the
/// coarse clock costs a fraction of the precise one on every packet.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Records `now` as the entry's last use, at most once per [`LAST_SEEN_GRANULARITY_NS`]: an
/// established flow's packets otherwise write nothing to the table.
#[inline(always)]
fn touch<A>(entry: &mut FlowValueOf<A>, now: u64) {
    if now.wrapping_sub(entry.last_seen_ns) >= LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
}

/// Does this packet change what the flow's latches say? Only those packets look up the peer
/// entry; every other packet of a tracked flow is forwarded after one table lookup.
#[inline(always)]
fn changes_latches<A>(entry: &FlowValueOf<A>, flags: Option<TcpFlags>) -> bool {
    let Some(flags) = flags else {
        return false;
    };
    if flags.syn || flags.fin || flags.rst {
        return true;
    }
    if entry.direction == DIRECTION_FORWARD {
        entry.established == 0 && entry.answered != 0
    } else {
        entry.rst != 0
    }
}

/// Sets a latch in both entries of a flow (see `FlowValue`).
macro_rules! latch {
    ($entry:expr, $peer:expr, $field:ident, $value:expr) => {
        $entry.$field = $value;
        $peer.$field = $value;
    };
}

/// Applies a flag-carrying packet to the latches of its flow, in both entries.
#[inline(always)]
fn advance<F: Family>(
    key: &Key<F>,
    entry: &mut Value<F>,
    packet: &L4Packet<F::Addr>,
    flags: TcpFlags,
    now: u64,
) -> Tracked<F> {
    let Some(peer_key) = scratch_key::<F>(ScratchKey::Peer) else {
        return Tracked::Lost;
    };
    entry.write_peer_key(peer_key, key.proto);
    let peer_key: &Key<F> = peer_key;
    let Some(peer) = F::flows().get_ptr_mut(peer_key) else {
        return without_peer::<F>(key, entry, packet);
    };
    // SAFETY: flow values are plain data; concurrent writers only ever set latches.
    let peer = unsafe { &mut *peer };
    if !peer.is_peer_of(key) {
        return without_peer::<F>(key, entry, packet);
    }
    if entry.direction == DIRECTION_FORWARD {
        if packet.is_connection_request() {
            let state = flow_state(key.proto, entry, peer);
            let over = matches!(state, FlowState::Closing | FlowState::TimeWait)
                || flow_expired(timeout, key.proto, entry, peer, now);
            if over {
                remove_pair::<F>(key, peer_key);
                if let Some(slot) = F::reopened_tuple().get_ptr_mut(0) {
                    // SAFETY: a per-CPU slot, only ever touched by the CPU running this program.
                    unsafe { *slot = *peer_key };
                }
                return Tracked::Reopened;
            }
        }
        if flags.rst {
            latch!(entry, peer, rst, 1);
        }
        if flags.fin {
            latch!(entry, peer, fin_from_client, 1);
        }
        if flags.ack && !flags.syn && (entry.answered | peer.answered) != 0 {
            latch!(entry, peer, established, 1);
        }
    } else {
        if flags.syn && flags.ack {
            latch!(entry, peer, answered, 1);
        }
        if flags.fin {
            if (entry.fin_from_client | peer.fin_from_client) == 0 {
                latch!(entry, peer, backend_closed_first, 1);
            }
            latch!(entry, peer, fin_from_backend, 1);
        }
        if flags.rst {
            latch!(entry, peer, rst, 1);
        } else if (entry.rst | peer.rst) != 0 {
            // The backend still talks after a RST: it did not take it (a blind RST answered
            // with a challenge ACK), so the flow is not closing.
            latch!(entry, peer, rst, 0);
        }
    }
    touch(entry, now);
    Tracked::Flow(entry)
}

/// An entry whose peer is gone or another flow's is removed. Most often its flow was over and
/// another CPU (a new flow reclaiming the tuple, or the sweep) was removing the pair between
/// this packet's two lookups: a connection request then starts a new flow, as on the tuple of
/// any flow that is over, where a drop would cost the client a second's retransmission. Any
/// other packet is dropped.
#[inline(always)]
fn without_peer<F: Family>(
    key: &Key<F>,
    entry: &Value<F>,
    packet: &L4Packet<F::Addr>,
) -> Tracked<F> {
    let orphaned = entry.direction == DIRECTION_FORWARD && packet.is_connection_request();
    let _ = F::flows().remove(key);
    if orphaned {
        Tracked::Orphaned
    } else {
        Tracked::Lost
    }
}

/// Removes both entries of a flow: the forward one first, so that its SNAT tuple (the reply
/// key) is free only once nothing forwards into it.
#[inline(always)]
pub fn remove_pair<F: Family>(forward_key: &Key<F>, reply_key: &Key<F>) {
    let _ = F::flows().remove(forward_key);
    let _ = F::flows().remove(reply_key);
}

/// The entry for `key`, if any, after this packet.
#[inline(always)]
pub fn tracked_flow<F: Family>(
    key: &Key<F>,
    packet: &L4Packet<F::Addr>,
    now: u64,
) -> Option<Tracked<F>> {
    let entry = F::flows().get_ptr_mut(key)?;
    // SAFETY: flow values are plain data; concurrent writers only ever set latches and
    // `last_seen_ns`, and a torn read of either is harmless.
    let entry = unsafe { &mut *entry };
    if changes_latches(entry, packet.tcp_flags) {
        let flags = packet.tcp_flags.unwrap_or_default();
        return Some(advance::<F>(key, entry, packet, flags, now));
    }
    touch(entry, now);
    Some(Tracked::Flow(entry))
}
