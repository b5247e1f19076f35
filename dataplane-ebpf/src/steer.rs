//! The L4 fast path, read top to bottom as the packet goes: service lookup → connection table →
//! Maglev pick and SNAT port allocation for a new flow → rewrite → transmit. Replies from a
//! backend take the flow's reply entry back to the client the same way.
//!
//! Every function here ends a frame's L4 processing with a [`Verdict`]: the XDP action and the
//! `L4*` stat saying why.

use aya_ebpf::{
    bindings::{xdp_action, BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use xlb_common::{
    flow_expired, flow_last_seen, flow_state, ring_index, wire_port, Backend, FlowKey, FlowState,
    FlowValue, NextHop, ServiceKey, ServiceValue, Stat, TrafficCounters, DIRECTION_FORWARD,
    DIRECTION_REPLY, HALF_PAIR_GRACE_NS, IPPROTO_TCP, LAST_SEEN_GRANULARITY_NS, NO_BACKEND,
    SNAT_ATTEMPTS, SNAT_WALK_ATTEMPTS,
};

use crate::{
    checksum,
    parse::{ptr_at, Ipv4, Malformed, Ports, TcpFlags, Transport, TransportKind},
    setting, BACKENDS, BACKEND_STATS, FLOOD_WINDOWS, FLOWS, FLOW_SCRATCH, RINGS, SERVICES,
    SERVICE_STATS, SETTINGS, SNAT_CURSOR,
};

/// The XDP action for a frame, the `L4*` outcome it is counted under, and the table event it
/// caused, if any (counted besides the outcome).
pub struct Verdict {
    pub action: u32,
    pub outcome: Option<Stat>,
    pub event: Option<Stat>,
}

/// A header the parse accepted could not be re-read for rewriting: impossible unless the parse
/// and the rewrite disagree, so the frame is aborted (visible in `verdict_aborted` and through
/// the kernel's `xdp_exception` tracepoint) rather than sent half-rewritten.
const REWRITE_FAILED: Verdict = Verdict {
    action: xdp_action::XDP_ABORTED,
    outcome: None,
    event: None,
};

impl Verdict {
    /// See [`REWRITE_FAILED`].
    pub const ABORTED: Verdict = REWRITE_FAILED;

    /// Passed to the kernel, not L4 traffic.
    pub const PASS: Verdict = Verdict {
        action: xdp_action::XDP_PASS,
        outcome: None,
        event: None,
    };

    fn pass(outcome: Stat) -> Verdict {
        Verdict {
            action: xdp_action::XDP_PASS,
            outcome: Some(outcome),
            event: None,
        }
    }

    pub fn drop(outcome: Stat) -> Verdict {
        Verdict {
            action: xdp_action::XDP_DROP,
            outcome: Some(outcome),
            event: None,
        }
    }

    fn with_event(self, event: Option<Stat>) -> Verdict {
        Verdict { event, ..self }
    }
}

/// An IPv4 TCP or UDP packet that may belong to the L4 path.
pub struct L4Packet<'a> {
    pub ip: &'a Ipv4,
    pub ports: Ports,
    /// `None` for UDP.
    pub tcp_flags: Option<TcpFlags>,
    pub bytes: usize,
}

impl<'a> L4Packet<'a> {
    #[inline(always)]
    pub fn new(ip: &'a Ipv4, transport: &Transport, bytes: usize) -> Option<L4Packet<'a>> {
        let (ports, tcp_flags) = match transport.kind {
            TransportKind::Tcp => (transport.ports, Some(transport.flags)),
            TransportKind::Udp => (transport.ports, None),
            TransportKind::Other => return None,
        };
        Some(L4Packet {
            ip,
            ports,
            tcp_flags,
            bytes,
        })
    }

    fn key(&self) -> FlowKey {
        FlowKey::new(
            self.ip.src,
            self.ip.dst,
            self.ports.src,
            self.ports.dst,
            self.ip.proto,
        )
    }

    /// A SYN without ACK: the client asks for a new connection.
    fn is_connection_request(&self) -> bool {
        matches!(self.tcp_flags, Some(flags) if flags.syn && !flags.ack && !flags.rst)
    }
}

/// The service the packet is addressed to, if any.
#[inline(always)]
pub fn lookup_service(packet: &L4Packet) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: packet.ip.dst,
        port: packet.ports.dst,
        proto: packet.ip.proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the daemon replaces values whole.
    unsafe { SERVICES.get(&key).copied() }
}

/// Could this packet be a backend's reply to a SNAT port? Saves a table lookup for all else.
#[inline(always)]
pub fn is_snat_port(port: u16) -> bool {
    let port = u16::from_be(port);
    setting(&SETTINGS.snat_port_first) <= port && port <= setting(&SETTINGS.snat_port_last)
}

#[inline(always)]
fn add_traffic(
    counters: Option<*mut TrafficCounters>,
    direction: u8,
    bytes: usize,
    new_flow: bool,
) {
    let Some(counters) = counters else {
        return;
    };
    // SAFETY: a per-CPU slot is only ever touched by the CPU running this program.
    let counters = unsafe { &mut *counters };
    if direction == DIRECTION_FORWARD {
        counters.forward_packets += 1;
        counters.forward_bytes += bytes as u64;
    } else {
        counters.reply_packets += 1;
        counters.reply_bytes += bytes as u64;
    }
    if new_flow {
        counters.new_flows += 1;
    }
}

/// Counts a packet of a flow for its service and its backend.
#[inline(always)]
fn count_traffic(flow: &FlowValue, direction: u8, bytes: usize, new_flow: bool) {
    add_traffic(
        SERVICE_STATS.get_ptr_mut(flow.service_slot),
        direction,
        bytes,
        new_flow,
    );
    add_traffic(
        BACKEND_STATS.get_ptr_mut(flow.backend_id),
        direction,
        bytes,
        new_flow,
    );
}

/// The timeout of a flow in `state`, from the global settings (one field read, no copy of
/// the whole table onto the 512-byte stack).
#[inline(always)]
fn timeout(state: FlowState) -> u64 {
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
enum Tracked {
    /// Forward it as the entry says (the entry in the table: read in place, not copied).
    Flow(*const FlowValue),
    /// A connection request on a tuple whose flow is over (closed or expired): its entries
    /// were removed and the packet starts a new flow.
    Reopened,
    /// The entry's peer is gone or belongs to another flow (half of a pair removed, or a
    /// tuple taken over): the entry was removed and the packet dropped.
    Lost,
}

/// CLOCK_MONOTONIC to within a tick (a few milliseconds): timeouts are seconds long, and the
/// coarse clock costs a fraction of the precise one on every packet.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper call without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Records `now` as the entry's last use, at most once per [`LAST_SEEN_GRANULARITY_NS`]: an
/// established flow's packets otherwise write nothing to the table.
#[inline(always)]
fn touch(entry: &mut FlowValue, now: u64) {
    if now.wrapping_sub(entry.last_seen_ns) >= LAST_SEEN_GRANULARITY_NS {
        entry.last_seen_ns = now;
    }
}

/// Does this packet change what the flow's latches say? Only those packets look up the peer
/// entry; every other packet of a tracked flow is forwarded after one table lookup.
#[inline(always)]
fn changes_latches(entry: &FlowValue, flags: Option<TcpFlags>) -> bool {
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
fn advance(
    key: &FlowKey,
    entry: &mut FlowValue,
    packet: &L4Packet,
    flags: TcpFlags,
    now: u64,
) -> Tracked {
    let peer_key = entry.peer_key(key.proto);
    let Some(peer) = FLOWS.get_ptr_mut(&peer_key) else {
        let _ = FLOWS.remove(key);
        return Tracked::Lost;
    };
    // SAFETY: FLOWS values are plain data; concurrent writers only ever set latches.
    let peer = unsafe { &mut *peer };
    if peer.peer_key(key.proto) != *key {
        let _ = FLOWS.remove(key);
        return Tracked::Lost;
    }
    if entry.direction == DIRECTION_FORWARD {
        if packet.is_connection_request() {
            let state = flow_state(key.proto, entry, peer);
            let over = matches!(state, FlowState::Closing | FlowState::TimeWait)
                || flow_expired(timeout, key.proto, entry, peer, now);
            if over {
                remove_pair(key, &peer_key);
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

/// Removes both entries of a flow: the forward one first, so that its SNAT tuple (the reply
/// key) is free only once nothing forwards into it.
#[inline(always)]
fn remove_pair(forward_key: &FlowKey, reply_key: &FlowKey) {
    let _ = FLOWS.remove(forward_key);
    let _ = FLOWS.remove(reply_key);
}

/// The entry for `key`, if any, after this packet.
#[inline(always)]
fn tracked_flow(key: &FlowKey, packet: &L4Packet, now: u64) -> Option<Tracked> {
    let entry = FLOWS.get_ptr_mut(key)?;
    // SAFETY: FLOWS values are plain data; concurrent writers only ever set latches and
    // `last_seen_ns`, and a torn read of either is harmless.
    let entry = unsafe { &mut *entry };
    if changes_latches(entry, packet.tcp_flags) {
        let flags = packet.tcp_flags.unwrap_or_default();
        return Some(advance(key, entry, packet, flags, now));
    }
    touch(entry, now);
    Some(Tracked::Flow(entry))
}

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
    /// Held by a flow in TIME_WAIT whose closing timeout has passed: taken only when every
    /// other tuple tried is live.
    TimeWait,
    /// Held by a live flow.
    Live,
    /// Nothing holds it, yet the insert failed: the table is full.
    TableFull,
}

/// Tries to put `reply` at `reply_key`, removing an expired holder first, and a holder in
/// TIME_WAIT past its closing timeout too when `take_time_wait`.
///
/// The insert is `BPF_NOEXIST`: the kernel refuses a key that exists, so two flows never share
/// a SNAT tuple even when two CPUs race for it.
// Not inlined: the SNAT walk calls it up to `SNAT_ATTEMPTS` times, and a BPF-to-BPF call keeps
// each call's locals out of the caller's 512-byte stack frame.
#[inline(never)]
fn claim(reply_key: &FlowKey, reply: &FlowValue, now: u64, take_time_wait: bool) -> Holder {
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
            let state = flow_state(reply_key.proto, holder, forward);
            let idle = now.saturating_sub(flow_last_seen(holder, forward));
            if state != FlowState::TimeWait || idle <= timeout(FlowState::Closing) {
                return Holder::Live;
            }
            if !take_time_wait {
                return Holder::TimeWait;
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

/// Creates the reply and forward entries of a new flow, allocating its SNAT tuple: the next
/// ones on this CPU's walk are tried in turn (free, or expired and reclaimed), then the first
/// TIME_WAIT hold met; the event says which.
///
/// The entries are built in this CPU's `FLOW_SCRATCH` slots, not on the stack (the verifier
/// allows 512 bytes for a whole call chain); the forward one is returned from there.
// Not inlined, for the same reason as `claim`: the established path's frame stays small.
#[inline(never)]
fn new_flow(
    ctx: &XdpContext,
    key: &FlowKey,
    service: &ServiceValue,
    now: u64,
) -> Result<(*const FlowValue, *const Backend, Option<Stat>), Verdict> {
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
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|Malformed| REWRITE_FAILED)?;
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
    let mut claimed: Option<(FlowKey, Option<Stat>)> = None;
    let mut time_wait: Option<FlowKey> = None;
    for attempt in 0..SNAT_ATTEMPTS {
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
        let Some((snat_addr, snat_port)) = snat_tuple(index, range, backend.snat_addr) else {
            break;
        };
        let reply_key = FlowKey::new(backend.addr, snat_addr, backend.port, snat_port, key.proto);
        match claim(&reply_key, reply, now, false) {
            Holder::Claimed { reclaimed } => {
                *cursor = index.wrapping_add(1);
                claimed = Some((reply_key, reclaimed.then_some(Stat::L4FlowReclaimed)));
                break;
            }
            Holder::TimeWait if time_wait.is_none() => time_wait = Some(reply_key),
            Holder::TimeWait | Holder::Live => {}
            Holder::TableFull => return Err(Verdict::drop(Stat::L4DropFlowTable)),
        }
    }
    if claimed.is_none() {
        if let Some(reply_key) = time_wait {
            if let Holder::Claimed { .. } = claim(&reply_key, reply, now, true) {
                claimed = Some((reply_key, Some(Stat::L4SnatTimeWaitReused)));
            }
        }
        // SAFETY: helper call without arguments. Leave the run of live tuples behind.
        *cursor = unsafe { bpf_get_prandom_u32() };
    }
    let Some((reply_key, event)) = claimed else {
        return Err(Verdict::drop(Stat::L4DropSnatExhausted));
    };
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

/// The backend a flow was created for, if it still holds its id.
#[inline(always)]
pub fn live_backend(flow: &FlowValue) -> Option<&'static Backend> {
    BACKENDS
        .get(flow.backend_id)
        .filter(|backend| backend.generation == flow.backend_generation && backend.addr != 0)
}

/// Rewrites addresses, ports, TTL and MACs as `flow` and `next_hop` say, fixing checksums incrementally.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    packet: &L4Packet,
    flow: &FlowValue,
    next_hop: &NextHop,
) -> Result<(), Malformed> {
    let ip = packet.ip;
    rewrite_ipv4_addresses(ctx, ip, flow.new_src_addr, flow.new_dst_addr)?;
    let l4_check_offset = if ip.proto == IPPROTO_TCP {
        core::mem::offset_of!(TcpHdr, check)
    } else {
        core::mem::offset_of!(UdpHdr, check)
    };
    let ports: *mut [u16; 2] = ptr_at(ctx, ip.transport_offset)?;
    let check: *mut [u8; 2] = ptr_at(ctx, ip.transport_offset + l4_check_offset)?;
    // SAFETY: both checked inside the frame; unaligned accesses.
    unsafe {
        let old_check = u16::from_ne_bytes(check.read_unaligned());
        // A UDP checksum of 0 means "none": it stays 0.
        if ip.proto == IPPROTO_TCP || old_check != 0 {
            let mut l4_check = old_check;
            l4_check = checksum::replace32(l4_check, ip.src, flow.new_src_addr);
            l4_check = checksum::replace32(l4_check, ip.dst, flow.new_dst_addr);
            l4_check = checksum::replace16(l4_check, packet.ports.src, flow.new_src_port);
            l4_check = checksum::replace16(l4_check, packet.ports.dst, flow.new_dst_port);
            if ip.proto != IPPROTO_TCP && l4_check == 0 {
                l4_check = 0xffff;
            }
            check.write_unaligned(l4_check.to_ne_bytes());
        }
        ports.write_unaligned([flow.new_src_port, flow.new_dst_port]);
    }
    write_macs(ctx, next_hop)
}

/// Rewrites the IPv4 header at `ip` to `new_src` → `new_dst` and takes one off its TTL,
/// updating its checksum incrementally.
#[inline(always)]
pub fn rewrite_ipv4_addresses(
    ctx: &XdpContext,
    ip: &Ipv4,
    new_src: u32,
    new_dst: u32,
) -> Result<(), Malformed> {
    let ip_header: *mut Ipv4Hdr = ptr_at(ctx, ip.offset)?;
    // SAFETY: `ptr_at` checked the header lies inside the frame; Ipv4Hdr has alignment 1.
    let ip_header = unsafe { &mut *ip_header };
    let mut ip_check = u16::from_ne_bytes(ip_header.check);
    ip_check = checksum::replace32(ip_check, ip.src, new_src);
    ip_check = checksum::replace32(ip_check, ip.dst, new_dst);
    let old_ttl_word = u16::from_ne_bytes([ip_header.ttl, ip_header.proto]);
    ip_header.ttl -= 1;
    let new_ttl_word = u16::from_ne_bytes([ip_header.ttl, ip_header.proto]);
    ip_check = checksum::replace16(ip_check, old_ttl_word, new_ttl_word);
    ip_header.src_addr = new_src.to_ne_bytes();
    ip_header.dst_addr = new_dst.to_ne_bytes();
    ip_header.check = ip_check.to_ne_bytes();
    Ok(())
}

/// Writes the Ethernet addresses of `next_hop`.
#[inline(always)]
pub fn write_macs(ctx: &XdpContext, next_hop: &NextHop) -> Result<(), Malformed> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: checked inside the frame; EthHdr fields are byte arrays.
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &next_hop.dst_mac);
        write_mac(&raw mut (*eth).src_addr, &next_hop.src_mac);
    }
    Ok(())
}

/// Copies a MAC address as a 32-bit and a 16-bit store: a 6-byte array assignment would be a
/// call to `memmove` on every packet.
///
/// # Safety
/// `dst` must be valid for writing 6 bytes.
#[inline(always)]
unsafe fn write_mac(dst: *mut [u8; 6], mac: &[u8; 6]) {
    let head = u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]);
    let tail = u16::from_ne_bytes([mac[4], mac[5]]);
    // SAFETY: the caller's promise; unaligned stores.
    unsafe {
        dst.cast::<u32>().write_unaligned(head);
        dst.cast::<u8>().add(4).cast::<u16>().write_unaligned(tail);
    }
}

/// Sends the rewritten frame: back out of the interface it came in on, or redirected.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, next_hop: &NextHop, outcome: Stat) -> Verdict {
    if next_hop.ifindex == ctx.ingress_ifindex() as u32 {
        return Verdict {
            action: xdp_action::XDP_TX,
            outcome: Some(outcome),
            event: None,
        };
    }
    // SAFETY: helper call without pointer arguments.
    let action = unsafe { bpf_redirect(next_hop.ifindex, 0) } as u32;
    if action == xdp_action::XDP_REDIRECT {
        Verdict {
            action,
            outcome: Some(outcome),
            event: None,
        }
    } else {
        Verdict::drop(Stat::L4DropRedirect)
    }
}

/// A packet to an L4 service: its tracked flow, or a new one; then rewrite and send.
#[inline(always)]
pub fn steer_to_backend(ctx: &XdpContext, packet: &L4Packet, service: &ServiceValue) -> Verdict {
    if packet.ip.fragment {
        return Verdict::pass(Stat::L4PassFragment);
    }
    if packet.ip.ttl <= 1 {
        return Verdict::pass(Stat::L4PassTtl);
    }
    let now = now();
    let key = packet.key();
    let mut event = None;
    let tracked = match tracked_flow(&key, packet, now) {
        Some(Tracked::Flow(flow)) => {
            // SAFETY: the entry stays mapped while the program runs (RCU).
            let flow = unsafe { &*flow };
            match live_backend(flow) {
                Some(backend) => Some((flow, backend)),
                None => {
                    // Its backend left: TCP is passed below (the kernel resets the client),
                    // UDP starts over on a live backend.
                    remove_pair(&key, &flow.peer_key(key.proto));
                    event = Some(Stat::L4FlowBackendGone);
                    None
                }
            }
        }
        Some(Tracked::Reopened) => {
            event = Some(Stat::L4FlowReopened);
            None
        }
        Some(Tracked::Lost) => return Verdict::drop(Stat::L4DropFlowLost),
        None => None,
    };
    let (flow, backend, outcome) = match tracked {
        Some((flow, backend)) => (flow, backend, Stat::L4Forwarded),
        None => {
            let starts_flow = match packet.tcp_flags {
                Some(_) => packet.is_connection_request(),
                None => true,
            };
            if !starts_flow {
                return Verdict::pass(Stat::L4PassNoFlow).with_event(event);
            }
            match new_flow(ctx, &key, service, now) {
                Ok((flow, backend, claim_event)) => {
                    event = event.or(claim_event);
                    // SAFETY: this CPU's scratch slot and a BACKENDS element, both valid
                    // while the program runs.
                    (unsafe { &*flow }, unsafe { &*backend }, Stat::L4NewFlow)
                }
                Err(verdict) => return verdict.with_event(event),
            }
        }
    };
    if rewrite(ctx, packet, flow, &backend.next_hop).is_err() {
        return REWRITE_FAILED;
    }
    count_traffic(
        flow,
        DIRECTION_FORWARD,
        packet.bytes,
        outcome == Stat::L4NewFlow,
    );
    transmit(ctx, &backend.next_hop, outcome).with_event(event)
}

/// A backend's packet to a SNAT port: the tracked flow's reply entry, if any, sends it back to
/// the client. `None` when no flow is tracked for it (the frame is not L4 traffic).
#[inline(always)]
pub fn reply_to_client(ctx: &XdpContext, packet: &L4Packet) -> Option<Verdict> {
    let now = now();
    let key = packet.key();
    let flow = match tracked_flow(&key, packet, now)? {
        // SAFETY: the entry stays mapped while the program runs (RCU).
        Tracked::Flow(flow) => unsafe { &*flow },
        Tracked::Reopened => return None,
        Tracked::Lost => return Some(Verdict::drop(Stat::L4DropFlowLost)),
    };
    if flow.direction != DIRECTION_REPLY {
        return None;
    }
    if packet.ip.fragment {
        return Some(Verdict::pass(Stat::L4PassFragment));
    }
    if packet.ip.ttl <= 1 {
        return Some(Verdict::pass(Stat::L4PassTtl));
    }
    if rewrite(ctx, packet, flow, &flow.next_hop).is_err() {
        return Some(REWRITE_FAILED);
    }
    count_traffic(flow, DIRECTION_REPLY, packet.bytes, false);
    Some(transmit(ctx, &flow.next_hop, Stat::L4Replied))
}
