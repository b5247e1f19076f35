//! The L4 fast path, read top to bottom as the packet goes: service lookup → connection table
//! ([`crate::flows`]) → for a new flow, Maglev pick and SNAT tuple ([`crate::snat`]) → rewrite
//! and transmit ([`crate::rewrite`]). Replies from a backend take the flow's reply entry back
//! to the client the same way.
//!
//! Every function here ends a frame's L4 processing with a [`Verdict`]: the XDP action and the
//! `L4*` stat saying why.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use xlb_common::{
    BackendOf, FlowValueOf, ServiceKeyOf, ServiceValue, Stat, TrafficCounters, WireAddr,
    DIRECTION_FORWARD, DIRECTION_REPLY,
};

use crate::{
    family::{scratch_key, Family, Key, ScratchKey, Value},
    flows::{now, remove_pair, tracked_flow, Tracked},
    parse::{IpHeader, Ports, TcpFlags, Transport, TransportKind},
    port_in,
    rewrite::{live_backend, rewrite, transmit},
    setting,
    snat::new_flow,
    BACKEND_STATS, SERVICE_PORTS, SERVICE_STATS, SETTINGS,
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
pub const REWRITE_FAILED: Verdict = Verdict {
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

    pub fn pass(outcome: Stat) -> Verdict {
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

    pub fn with_event(self, event: Option<Stat>) -> Verdict {
        Verdict { event, ..self }
    }
}

/// A TCP or UDP packet that may belong to the L4 path.
pub struct L4Packet<'a, A> {
    pub ip: &'a IpHeader<A>,
    pub ports: Ports,
    /// `None` for UDP.
    pub tcp_flags: Option<TcpFlags>,
    pub bytes: usize,
}

impl<'a, A: WireAddr> L4Packet<'a, A> {
    #[inline(always)]
    pub fn new(ip: &'a IpHeader<A>, transport: &Transport, bytes: usize) -> Option<Self> {
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

    pub fn key(&self) -> xlb_common::FlowKeyOf<A> {
        A::flow_key(
            self.ip.src,
            self.ip.dst,
            self.ports.src,
            self.ports.dst,
            self.ip.proto,
        )
    }

    /// Writes [`L4Packet::key`] into `key`, in place.
    pub fn write_key(&self, key: &mut xlb_common::FlowKeyOf<A>) {
        key.set(
            &self.ip.src,
            &self.ip.dst,
            self.ports.src,
            self.ports.dst,
            self.ip.proto,
        );
    }

    /// A SYN without ACK: the client asks for a new connection.
    pub fn is_connection_request(&self) -> bool {
        matches!(self.tcp_flags, Some(flags) if flags.syn && !flags.ack && !flags.rst)
    }
}

/// The service the packet is addressed to, if any.
#[inline(always)]
pub fn lookup_service<F: Family>(packet: &L4Packet<F::Addr>) -> Option<ServiceValue> {
    let key = ServiceKeyOf {
        addr: packet.ip.dst,
        port: packet.ports.dst,
        proto: packet.ip.proto,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the daemon replaces values whole.
    unsafe { F::services().get(&key).copied() }
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
fn count_traffic<A>(flow: &FlowValueOf<A>, direction: u8, bytes: usize, new_flow: bool) {
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

/// Does an L4 service listen on this packet's destination port (on any LB address)?
#[inline(always)]
pub fn serves_port<A>(packet: &L4Packet<A>) -> bool {
    port_in(
        &SERVICE_PORTS,
        u16::from_be(packet.ports.dst),
        packet.ip.proto,
    )
}

/// A packet to a port an L4 service listens on ([`serves_port`]). Its tracked flow comes
/// first: a packet of an established flow is forwarded after that one lookup, as in Katran,
/// without looking up its service. Every other packet needs the service: `None` when the
/// packet is addressed to none, or is a backend's reply (to a SNAT port a service listens on
/// too): not a service's traffic; else a new flow ([`Family::start_flow`]) or the reason
/// there is none.
///
/// A flow whose service was removed goes on while its backend stays live (until its id is
/// cleared after the drain time, or its timeout), as requests in flight through the L7
/// proxy do.
#[inline(always)]
pub fn steer_to_backend<F: Family>(
    ctx: &XdpContext,
    packet: &L4Packet<F::Addr>,
) -> Option<Verdict> {
    if packet.ip.fragment || packet.ip.ttl <= 1 {
        lookup_service::<F>(packet)?;
        return Some(Verdict::pass(if packet.ip.fragment {
            Stat::L4PassFragment
        } else {
            Stat::L4PassTtl
        }));
    }
    let now = now();
    let key: Key<F> = packet.key();
    let tracked = tracked_flow::<F>(&key, packet, now);
    if let Some(Tracked::Flow(flow)) = tracked {
        // SAFETY: the entry stays mapped while the program runs (RCU).
        let flow = unsafe { &*flow };
        if flow.direction != DIRECTION_FORWARD {
            // A backend's reply to a SNAT port some service listens on too: the reply path's.
            return None;
        }
        if let Some(backend) = live_backend::<F>(flow) {
            return Some(forward::<F>(
                ctx,
                packet,
                flow,
                backend,
                Stat::L4Forwarded,
                None,
            ));
        }
    }
    let service = lookup_service::<F>(packet)?;
    let event = match tracked {
        Some(Tracked::Flow(flow)) => {
            // Its backend left: TCP is passed below (the kernel resets the client), UDP
            // starts over on a live backend.
            // SAFETY: as above.
            let flow = unsafe { &*flow };
            if let Some(peer_key) = scratch_key::<F>(ScratchKey::Peer) {
                flow.write_peer_key(peer_key, key.proto);
                remove_pair::<F>(&key, peer_key);
            }
            Some(Stat::L4FlowBackendGone)
        }
        Some(Tracked::Reopened) => Some(Stat::L4FlowReopened),
        Some(Tracked::Orphaned) => Some(Stat::L4FlowOrphaned),
        Some(Tracked::Lost) => return Some(Verdict::drop(Stat::L4DropFlowLost)),
        None => None,
    };
    let starts_flow = match packet.tcp_flags {
        Some(_) => packet.is_connection_request(),
        None => true,
    };
    if !starts_flow {
        return Some(Verdict::pass(Stat::L4PassNoFlow).with_event(event));
    }
    Some(F::start_flow(ctx, packet, &key, &service, event))
}

/// A new flow for a packet (of flow key `key`) that starts one: its entries, then rewrite and
/// send. `event` is
/// what the table did first (a reopened tuple, a gone backend's flow removed), to be counted
/// with the verdict unless the flow's creation has an event of its own; `reopened`: the tuple
/// was the packet's flow's, just removed.
#[inline(always)]
pub fn start_flow<F: Family>(
    ctx: &XdpContext,
    packet: &L4Packet<F::Addr>,
    key: &Key<F>,
    service: &ServiceValue,
    reopened: bool,
    event: Option<Stat>,
) -> Verdict {
    match new_flow::<F>(ctx, key, service, reopened) {
        Ok((flow, backend, claim_event)) => {
            // SAFETY: this CPU's scratch slot and a backends element, both valid while the
            // program runs.
            let (flow, backend) = unsafe { (&*flow, &*backend) };
            forward::<F>(
                ctx,
                packet,
                flow,
                backend,
                Stat::L4NewFlow,
                event.or(claim_event),
            )
        }
        Err(verdict) => verdict.with_event(event),
    }
}

/// Rewrites a packet of `flow` for `backend`, counts it and sends it.
#[inline(always)]
fn forward<F: Family>(
    ctx: &XdpContext,
    packet: &L4Packet<F::Addr>,
    flow: &Value<F>,
    backend: &BackendOf<F::Addr>,
    outcome: Stat,
    event: Option<Stat>,
) -> Verdict {
    if rewrite::<F>(ctx, packet, flow, &backend.next_hop).is_err() {
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
pub fn reply_to_client<F: Family>(ctx: &XdpContext, packet: &L4Packet<F::Addr>) -> Option<Verdict> {
    let now = now();
    let key: Key<F> = packet.key();
    let flow = match tracked_flow::<F>(&key, packet, now)? {
        // SAFETY: the entry stays mapped while the program runs (RCU).
        Tracked::Flow(flow) => unsafe { &*flow },
        // The packet's entry is a forward one: not a reply.
        Tracked::Reopened | Tracked::Orphaned => return None,
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
    if rewrite::<F>(ctx, packet, flow, &flow.next_hop).is_err() {
        return Some(REWRITE_FAILED);
    }
    count_traffic(flow, DIRECTION_REPLY, packet.bytes, false);
    Some(transmit(ctx, &flow.next_hop, Stat::L4Replied))
}
