//! The L4 fast path, read top to bottom as the packet goes: service lookup → connection table →
//! Maglev pick and SNAT port allocation for a new flow → rewrite → transmit. Replies from a
//! backend take the flow's reply entry back to the client the same way.
//!
//! Every function here ends a frame's L4 processing with a [`Verdict`]: the XDP action and the
//! `L4*` stat saying why.

use aya_ebpf::{
    bindings::{xdp_action, BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect},
    programs::XdpContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use xlb_common::{
    ring_index, wire_port, FlowKey, FlowValue, NextHop, ServiceKey, ServiceValue, Settings, Stat,
    TrafficCounters, CLOSE_FIN_FROM_BACKEND, CLOSE_FIN_FROM_CLIENT, CLOSE_RST, DIRECTION_FORWARD,
    DIRECTION_REPLY, IPPROTO_TCP, NO_BACKEND, SNAT_ATTEMPTS,
};

use crate::{
    checksum,
    parse::{ptr_at, read_at, Ipv4, Malformed, Ports, TcpFlags, Transport, TransportKind},
    BACKENDS, BACKEND_STATS, FLOWS, RINGS, SERVICES, SERVICE_STATS, SETTINGS,
};

/// The XDP action for a frame and the `L4*` outcome it is counted under.
pub struct Verdict {
    pub action: u32,
    pub outcome: Option<Stat>,
}

/// A header the parse accepted could not be re-read for rewriting: impossible unless the parse
/// and the rewrite disagree, so the frame is aborted (visible in `verdict_aborted` and through
/// the kernel's `xdp_exception` tracepoint) rather than sent half-rewritten.
const REWRITE_FAILED: Verdict = Verdict {
    action: xdp_action::XDP_ABORTED,
    outcome: None,
};

impl Verdict {
    fn pass(outcome: Stat) -> Verdict {
        Verdict {
            action: xdp_action::XDP_PASS,
            outcome: Some(outcome),
        }
    }

    fn drop(outcome: Stat) -> Verdict {
        Verdict {
            action: xdp_action::XDP_DROP,
            outcome: Some(outcome),
        }
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
        FlowKey {
            src_addr: self.ip.src,
            dst_addr: self.ip.dst,
            src_port: self.ports.src,
            dst_port: self.ports.dst,
            proto: self.ip.proto,
            _pad: [0; 3],
        }
    }

    fn close_flags(&self, fin_bit: u32) -> u32 {
        match self.tcp_flags {
            Some(flags) if flags.rst => CLOSE_RST,
            Some(flags) if flags.fin => fin_bit,
            _ => 0,
        }
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

#[inline(always)]
fn settings() -> Settings {
    SETTINGS.get(0).copied().unwrap_or_default()
}

/// Could this packet be a backend's reply to a SNAT port? Saves a table lookup for all else.
#[inline(always)]
pub fn is_snat_port(port: u16) -> bool {
    let settings = settings();
    let port = u16::from_be(port);
    settings.snat_port_first <= port && port <= settings.snat_port_last
}

#[inline(always)]
fn add_traffic(
    counters: Option<*mut TrafficCounters>,
    direction: u32,
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
fn count_traffic(flow: &FlowValue, direction: u32, bytes: usize, new_flow: bool) {
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

/// Why a tracked entry cannot be used.
enum Untracked {
    /// Idle past its timeout: both entries were removed, the packet may start a new flow.
    Expired,
    /// Its peer entry is gone or belongs to another flow (LRU eviction): both were removed.
    Lost,
}

#[inline(always)]
fn timeout_ns(settings: &Settings, proto: u8, close_flags: u32) -> u64 {
    let both_fins = CLOSE_FIN_FROM_CLIENT | CLOSE_FIN_FROM_BACKEND;
    if proto != IPPROTO_TCP {
        settings.udp_idle_ns
    } else if close_flags & CLOSE_RST != 0 || close_flags & both_fins == both_fins {
        settings.tcp_closing_ns
    } else {
        settings.tcp_idle_ns
    }
}

/// The entry for `key` if it is live, its peer still pointing back at it. Refreshes its last
/// use and records FIN/RST in both entries.
#[inline(always)]
fn tracked_flow(
    key: &FlowKey,
    packet: &L4Packet,
    settings: &Settings,
    now: u64,
) -> Result<Option<FlowValue>, Untracked> {
    let Some(entry) = FLOWS.get_ptr_mut(key) else {
        return Ok(None);
    };
    // SAFETY: FLOWS values are plain data; a concurrent update can at worst mix two versions of
    // fields that are only ever set to the same values for a live flow.
    let entry = unsafe { &mut *entry };
    let peer_key = entry.peer_key(key.proto);
    let peer = FLOWS.get_ptr_mut(&peer_key);
    let peer = match peer {
        // SAFETY: as above.
        Some(peer) => unsafe { &mut *peer },
        None => {
            let _ = FLOWS.remove(key);
            return Err(Untracked::Lost);
        }
    };
    if peer.peer_key(key.proto) != *key {
        let _ = FLOWS.remove(key);
        return Err(Untracked::Lost);
    }
    let last_seen = if entry.last_seen_ns > peer.last_seen_ns {
        entry.last_seen_ns
    } else {
        peer.last_seen_ns
    };
    let close_flags = entry.close_flags | peer.close_flags;
    if now.saturating_sub(last_seen) > timeout_ns(settings, key.proto, close_flags) {
        let _ = FLOWS.remove(&peer_key);
        let _ = FLOWS.remove(key);
        return Err(Untracked::Expired);
    }
    entry.last_seen_ns = now;
    let fin_bit = if entry.direction == DIRECTION_FORWARD {
        CLOSE_FIN_FROM_CLIENT
    } else {
        CLOSE_FIN_FROM_BACKEND
    };
    let seen = packet.close_flags(fin_bit);
    if seen & !close_flags != 0 {
        entry.close_flags = close_flags | seen;
        peer.close_flags = close_flags | seen;
    }
    Ok(Some(*entry))
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
fn pick_backend(key: &FlowKey, service: &ServiceValue, settings: &Settings) -> u32 {
    // `checked_rem`: an unconfigured ring size of 0 means no backend, not a panic path the
    // verifier would refuse.
    let Some(position) = flow_hash(key).checked_rem(settings.ring_size) else {
        return NO_BACKEND;
    };
    let index = ring_index(
        service.slot,
        service.active_ring & 1,
        settings.ring_size,
        position,
    );
    RINGS.get(index).copied().unwrap_or(NO_BACKEND)
}

/// Creates the reply and forward entries of a new flow, allocating its SNAT source port.
///
/// The reply entry, keyed by (backend, LB SNAT address and port), is inserted first with
/// `BPF_NOEXIST`: the kernel refuses a key that exists, so two flows can never share a
/// (LB address, port, backend) tuple, even when two CPUs race for it.
#[inline(always)]
fn new_flow(
    ctx: &XdpContext,
    key: &FlowKey,
    service: &ServiceValue,
    settings: &Settings,
    now: u64,
) -> Result<FlowValue, Verdict> {
    let backend_id = pick_backend(key, service, settings);
    let backend = match BACKENDS.get(backend_id) {
        Some(backend) if backend_id != NO_BACKEND && backend.addr != 0 => *backend,
        _ => return Err(Verdict::drop(Stat::L4DropNoBackend)),
    };
    let eth: EthHdr = read_at(ctx, 0).map_err(|Malformed| REWRITE_FAILED)?;
    let to_client = NextHop {
        ifindex: ctx.ingress_ifindex() as u32,
        src_mac: eth.dst_addr,
        dst_mac: eth.src_addr,
    };
    let first = u32::from(settings.snat_port_first);
    let last = u32::from(settings.snat_port_last);
    if first == 0 || last < first {
        return Err(Verdict::drop(Stat::L4DropSnatExhausted));
    }
    let range = last - first + 1;
    // SAFETY: helper calls without pointer arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    for attempt in 0..SNAT_ATTEMPTS {
        let offset = start.wrapping_add(attempt).checked_rem(range).unwrap_or(0);
        let snat_port = wire_port((first + offset) as u16);
        let reply_key = FlowKey {
            src_addr: backend.addr,
            dst_addr: backend.snat_addr,
            src_port: backend.port,
            dst_port: snat_port,
            proto: key.proto,
            _pad: [0; 3],
        };
        let reply = FlowValue {
            last_seen_ns: now,
            new_src_addr: key.dst_addr,
            new_dst_addr: key.src_addr,
            new_src_port: key.dst_port,
            new_dst_port: key.src_port,
            next_hop: to_client,
            service_slot: service.slot,
            backend_id,
            direction: DIRECTION_REPLY,
            close_flags: 0,
            _pad: 0,
        };
        if FLOWS
            .insert(&reply_key, &reply, BPF_NOEXIST as u64)
            .is_err()
        {
            continue;
        }
        let forward = FlowValue {
            last_seen_ns: now,
            new_src_addr: backend.snat_addr,
            new_dst_addr: backend.addr,
            new_src_port: snat_port,
            new_dst_port: backend.port,
            next_hop: backend.next_hop,
            service_slot: service.slot,
            backend_id,
            direction: DIRECTION_FORWARD,
            close_flags: 0,
            _pad: 0,
        };
        if FLOWS.insert(key, &forward, BPF_ANY as u64).is_err() {
            let _ = FLOWS.remove(&reply_key);
            return Err(Verdict::drop(Stat::L4DropFlowTable));
        }
        return Ok(forward);
    }
    Err(Verdict::drop(Stat::L4DropSnatExhausted))
}

/// Rewrites addresses, ports, TTL and MACs as `flow` says, fixing checksums incrementally.
#[inline(always)]
fn rewrite(ctx: &XdpContext, packet: &L4Packet, flow: &FlowValue) -> Result<(), Malformed> {
    let ip = packet.ip;
    let ip_header: *mut Ipv4Hdr = ptr_at(ctx, ip.offset)?;
    // SAFETY: `ptr_at` checked the header lies inside the frame; Ipv4Hdr has alignment 1.
    let ip_header = unsafe { &mut *ip_header };
    let mut ip_check = u16::from_ne_bytes(ip_header.check);
    ip_check = checksum::replace32(ip_check, ip.src, flow.new_src_addr);
    ip_check = checksum::replace32(ip_check, ip.dst, flow.new_dst_addr);
    let old_ttl_word = u16::from_ne_bytes([ip_header.ttl, ip_header.proto]);
    ip_header.ttl -= 1;
    let new_ttl_word = u16::from_ne_bytes([ip_header.ttl, ip_header.proto]);
    ip_check = checksum::replace16(ip_check, old_ttl_word, new_ttl_word);
    ip_header.src_addr = flow.new_src_addr.to_ne_bytes();
    ip_header.dst_addr = flow.new_dst_addr.to_ne_bytes();
    ip_header.check = ip_check.to_ne_bytes();

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

    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: checked inside the frame; EthHdr fields are byte arrays.
    unsafe {
        (*eth).src_addr = flow.next_hop.src_mac;
        (*eth).dst_addr = flow.next_hop.dst_mac;
    }
    Ok(())
}

/// Sends the rewritten frame: back out of the interface it came in on, or redirected.
#[inline(always)]
fn transmit(ctx: &XdpContext, next_hop: &NextHop, outcome: Stat) -> Verdict {
    if next_hop.ifindex == ctx.ingress_ifindex() as u32 {
        return Verdict {
            action: xdp_action::XDP_TX,
            outcome: Some(outcome),
        };
    }
    // SAFETY: helper call without pointer arguments.
    let action = unsafe { bpf_redirect(next_hop.ifindex, 0) } as u32;
    if action == xdp_action::XDP_REDIRECT {
        Verdict {
            action,
            outcome: Some(outcome),
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
    let settings = settings();
    // SAFETY: helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = packet.key();
    let tracked = match tracked_flow(&key, packet, &settings, now) {
        Ok(tracked) => tracked,
        Err(Untracked::Expired) => {
            crate::count(Stat::L4FlowExpired, packet.bytes);
            None
        }
        Err(Untracked::Lost) => return Verdict::drop(Stat::L4DropFlowLost),
    };
    let (flow, outcome) = match tracked {
        Some(flow) => (flow, Stat::L4Forwarded),
        None => {
            let starts_flow = match packet.tcp_flags {
                Some(flags) => flags.syn && !flags.rst,
                None => true,
            };
            if !starts_flow {
                return Verdict::pass(Stat::L4PassNoFlow);
            }
            match new_flow(ctx, &key, service, &settings, now) {
                Ok(flow) => (flow, Stat::L4NewFlow),
                Err(verdict) => return verdict,
            }
        }
    };
    if rewrite(ctx, packet, &flow).is_err() {
        return REWRITE_FAILED;
    }
    count_traffic(
        &flow,
        DIRECTION_FORWARD,
        packet.bytes,
        outcome == Stat::L4NewFlow,
    );
    transmit(ctx, &flow.next_hop, outcome)
}

/// A backend's packet to a SNAT port: the tracked flow's reply entry, if any, sends it back to
/// the client. `None` when no flow is tracked for it (the frame is not L4 traffic).
#[inline(always)]
pub fn reply_to_client(ctx: &XdpContext, packet: &L4Packet) -> Option<Verdict> {
    let settings = settings();
    // SAFETY: helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = packet.key();
    let flow = match tracked_flow(&key, packet, &settings, now) {
        Ok(Some(flow)) if flow.direction == DIRECTION_REPLY => flow,
        Ok(_) => return None,
        Err(Untracked::Expired) => {
            crate::count(Stat::L4FlowExpired, packet.bytes);
            return None;
        }
        Err(Untracked::Lost) => return Some(Verdict::drop(Stat::L4DropFlowLost)),
    };
    if packet.ip.fragment {
        return Some(Verdict::pass(Stat::L4PassFragment));
    }
    if packet.ip.ttl <= 1 {
        return Some(Verdict::pass(Stat::L4PassTtl));
    }
    if rewrite(ctx, packet, &flow).is_err() {
        return Some(REWRITE_FAILED);
    }
    count_traffic(&flow, DIRECTION_REPLY, packet.bytes, false);
    Some(transmit(ctx, &flow.next_hop, Stat::L4Replied))
}
