//! The xlb XDP program, attached to a load-balancer node's interfaces.
//!
//! The packet path reads top to bottom, as in Katran's balancer: parse ([`parse`]) → is it for
//! an L4 service, or a backend's reply to a tracked flow? → connection table, Maglev pick, SNAT,
//! rewrite and transmit ([`steer`]) → otherwise classify (L7 proxy port or other) and pass to
//! the kernel. Every frame is counted on entry, by class, by final verdict and, on the L4 path,
//! by outcome and by the table event it caused, in this CPU's `STATS` block (one lookup per
//! frame); the daemon sums the CPUs.
#![no_std]
#![no_main]

mod checksum;
mod family;
mod flows;
mod icmp;
mod icmp6;
mod parse;
mod rewrite;
mod snat;
mod steer;
mod sweep;

use aya_ebpf::{
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use xlb_common::{
    port_bit, Backend, Backend6, FloodWindow, FlowKey, FlowKey6, FlowValue, FlowValue6, Ipv6Wire,
    ListenPort, ServiceKey, ServiceKey6, ServiceValue, Settings, Stat, StatsBlock, Timeouts,
    TrafficCounters, DEFAULT_FLOW_ENTRIES, DEFAULT_RING_SIZE, DEFAULT_SERVICE_SLOTS, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, MAX_BACKENDS, MAX_EGRESS_INTERFACES, MAX_OPEN_PORTS,
    MAX_SERVICE_KEYS, MAX_SHIELDED_ADDRS, MAX_SNAT_ADDRS, PORT_BITMAP_WORDS, PROGRAM_IPV6,
    PROGRAM_IPV6_ICMP, PROGRAM_SLOTS,
};

use crate::{
    family::{Family, ScratchKey, SCRATCH_KEYS, V4, V6},
    parse::{frame_len, parse, Frame, IpHeader, Malformed, NetworkKind, Transport, TransportKind},
    steer::{
        is_snat_port, lookup_service, reply_to_client, serves_port, steer_to_backend, L4Packet,
        Verdict,
    },
};

/// One element: this CPU's counters (see [`Tally`]).
#[map]
static STATS: PerCpuArray<StatsBlock> = PerCpuArray::with_max_entries(1, 0);

/// The TCP ports the userspace L7 proxy listens on, a port bitmap (see
/// `xlb_common::port_bit`); filled by the daemon.
#[map]
static L7_PORTS: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);

/// The LB addresses (wire order) the shield guards; empty = no shield.
#[map]
static SHIELDED: HashMap<u32, u32> = HashMap::with_max_entries(MAX_SHIELDED_ADDRS, 0);

/// The same for IPv6 addresses.
#[map]
static SHIELDED6: HashMap<Ipv6Wire, u32> = HashMap::with_max_entries(MAX_SHIELDED_ADDRS, 0);

/// (port, protocol) pairs the shield lets through to a shielded address, besides L4 services,
/// L7 ports and ephemeral ports.
#[map]
static OPEN_PORTS: HashMap<ListenPort, u32> = HashMap::with_max_entries(MAX_OPEN_PORTS, 0);

/// The (port, protocol) pairs some L4 service listens on, on any LB address of either family,
/// a port bitmap (see `xlb_common::port_bit`): the packets that may belong to a tracked flow,
/// looked up in the connection table before `SERVICES` (see `steer::steer_to_backend`).
#[map]
static SERVICE_PORTS: Array<u64> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);

/// (LB address, port, protocol) → service slot and live ring.
#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::with_max_entries(MAX_SERVICE_KEYS, 0);

/// The same for IPv6 LB addresses; a service's IPv6 listener has a slot of its own, whose
/// rings hold only IPv6 backends.
#[map]
static SERVICES6: HashMap<ServiceKey6, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICE_KEYS, 0);

/// Two Maglev rings per service slot, of backend ids (see `xlb_common::ring_index`). The daemon
/// sizes it from its ring size and slot count before loading.
#[map]
static RINGS: Array<u32> =
    Array::with_max_entries(DEFAULT_SERVICE_SLOTS * 2 * DEFAULT_RING_SIZE, 0);

/// Backend id → address, SNAT address and next hop. Id 0 is never filled: "no backend".
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The same for IPv6 backends, in the same id space (an id is filled in one of the two).
#[map]
static BACKENDS6: Array<Backend6> = Array::with_max_entries(MAX_BACKENDS, 0);

/// The connection table: forward and reply entries of every tracked flow.
///
/// A plain hash, not an LRU: nothing a flood creates can push a live flow out. Entries leave
/// when their flow has expired: taken over where a new flow's SNAT tuple collides with them
/// ([`steer`]), reopened by a SYN, or removed by the daemon's sweep. A full table refuses new
/// flows (`l4_drop_flow_table`) and keeps every established one.
#[map]
static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// The IPv6 connection table, as `FLOWS`, of the same capacity. Preallocated like it: without,
/// every new flow's two inserts allocate, which more than doubles its cost (1.4 µs against
/// 0.66 µs through `BPF_PROG_TEST_RUN`), and a full table is then a failed allocation.
#[map]
static FLOWS6: HashMap<FlowKey6, FlowValue6> = HashMap::with_max_entries(DEFAULT_FLOW_ENTRIES, 0);

/// The interfaces a rewritten frame may be redirected to, by ifindex: those the program is
/// attached to that the daemon found able to transmit XDP frames (`ndo_xdp_xmit`). A redirect
/// anywhere else is refused here and counted (`l4_drop_redirect`), where a plain
/// `bpf_redirect` would be dropped by the kernel after the program returned, counted nowhere.
#[map]
static EGRESS: DevMapHash = DevMapHash::with_max_entries(MAX_EGRESS_INTERFACES, 0);

/// Where the walk over the SNAT tuples goes on: each new flow takes the next tuple, so a tuple
/// is reused only after all the others, the longest possible after its last flow.
///
/// One cursor for all CPUs, not one per CPU: per-CPU walks run into the tuples the other CPUs
/// just took, live ones in a row. Its read-modify-write is not atomic; two CPUs that read the
/// same value try the same tuple, and the no-overwrite insert gives it to one of them.
#[map]
static SNAT_CURSOR: Array<u32> = Array::with_max_entries(1, 0);

/// The SNAT tuple (reply key) of the flow a SYN just reopened, for the new flow to take again.
#[map]
static REOPENED_TUPLE: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);

#[map]
static REOPENED_TUPLE6: PerCpuArray<FlowKey6> = PerCpuArray::with_max_entries(1, 0);

/// Where a new flow's two entries are built before they are inserted: [reply, forward].
#[map]
static FLOW_SCRATCH: PerCpuArray<FlowValue> = PerCpuArray::with_max_entries(2, 0);

#[map]
static FLOW_SCRATCH6: PerCpuArray<FlowValue6> = PerCpuArray::with_max_entries(2, 0);

/// The programs tail-called for IPv6: `xlb_ipv6` and `xlb_ipv6_icmp` from `xlb`,
/// `xlb_ipv6_new_flow` from `xlb_ipv6` (at `PROGRAM_*`); the daemon fills it when it loads
/// them.
#[map]
static PROGRAMS: ProgramArray = ProgramArray::with_max_entries(PROGRAM_SLOTS, 0);

/// What the connection table did to a packet before `xlb_ipv6` tail-called
/// `xlb_ipv6_new_flow` for it (see `family::NewFlowEvent`).
#[map]
static NEW_FLOW_EVENT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The closed holder's tuple a new flow falls back on (see `snat::ClosedTuple`).
#[map]
static CLOSED_TUPLE: PerCpuArray<snat::ClosedTuple> = PerCpuArray::with_max_entries(1, 0);

/// The addresses an ICMPv6 error carries, off the stack (see `icmp6::copy_addresses`).
#[map]
static ICMP6_ADDRESSES: PerCpuArray<[Ipv6Wire; 4]> = PerCpuArray::with_max_entries(1, 0);

/// Keys the packet path builds, off the stack (see `family::ScratchKey`).
#[map]
static KEY_SCRATCH: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(SCRATCH_KEYS, 0);

#[map]
static KEY_SCRATCH6: PerCpuArray<FlowKey6> = PerCpuArray::with_max_entries(SCRATCH_KEYS, 0);

/// Limits and timeouts, set by the daemon when it loads the program: read-only data the
/// verifier knows as constants, read with [`setting`].
#[unsafe(no_mangle)]
static SETTINGS: Settings = Settings {
    ring_size: 0,
    snat_port_first: 0,
    snat_port_last: 0,
    snat_addrs: [0; MAX_SNAT_ADDRS],
    snat_addr_count: 0,
    local_port_first: 0,
    local_port_last: 0,
    _pad: 0,
    new_flows_per_cpu_second: 0,
    timeouts: Timeouts {
        tcp_handshake_ns: 0,
        tcp_established_ns: 0,
        tcp_closing_ns: 0,
        tcp_time_wait_ns: 0,
        udp_ns: 0,
    },
    snat_addrs6: [[0; 4]; MAX_SNAT_ADDRS],
    snat_addr6_count: 0,
    _pad6: 0,
};

/// A field of [`SETTINGS`], read from the loaded data rather than the compile-time zeros.
#[inline(always)]
fn setting<T: Copy>(field: &T) -> T {
    // SAFETY: a reference to a field of a static is valid for reads.
    unsafe { core::ptr::read_volatile(field) }
}

/// This CPU's new flows per service slot in the current second (the flood limit).
#[map]
static FLOOD_WINDOWS: PerCpuArray<FloodWindow> =
    PerCpuArray::with_max_entries(DEFAULT_SERVICE_SLOTS, 0);

/// Traffic per service slot.
#[map]
static SERVICE_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_SERVICE_SLOTS, 0);

/// Traffic per backend id.
#[map]
static BACKEND_STATS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// This CPU's counters, looked up once per frame.
struct Tally {
    block: Option<*mut StatsBlock>,
    bytes: u64,
}

impl Tally {
    #[inline(always)]
    fn new(bytes: usize) -> Tally {
        Tally {
            block: STATS.get_ptr_mut(0),
            bytes: bytes as u64,
        }
    }

    /// Counts a frame's class, its L4 outcome and event, and its verdict; returns the action.
    #[inline(always)]
    fn finish(&self, class: Stat, verdict: Verdict) -> u32 {
        self.count(class);
        if let Some(outcome) = verdict.outcome {
            self.count(outcome);
        }
        if let Some(event) = verdict.event {
            self.count(event);
        }
        self.count(Stat::for_verdict(verdict.action));
        verdict.action
    }

    #[inline(always)]
    fn count(&self, stat: Stat) {
        let Some(block) = self.block else {
            return;
        };
        // SAFETY: a per-CPU slot is only ever touched by the CPU running this program.
        let counters = unsafe { &mut (*block).counters };
        // Laundered through memory: LLVM knows a `Stat` is in range and would drop the bounds
        // check, but a value that crossed a BPF-to-BPF call is unbounded to the verifier.
        // SAFETY: a read of a local.
        let index = unsafe { core::ptr::read_volatile(&(stat as u32)) } as usize;
        if let Some(counter) = counters.get_mut(index) {
            counter.packets += 1;
            counter.bytes += self.bytes;
        }
    }
}

/// Is `port` (host byte order) of `proto` set in a port bitmap? One array read, which the
/// verifier inlines: no call.
#[inline(always)]
pub fn port_in(bitmap: &Array<u64>, port: u16, proto: u8) -> bool {
    let Some((word, bit)) = port_bit(port, proto) else {
        return false;
    };
    bitmap.get(word).is_some_and(|bits| bits & bit != 0)
}

/// Is this a TCP segment for the L7 proxy? Such frames are passed at once: the shield and
/// the L4 path have nothing to say about them.
#[inline(always)]
fn for_l7_proxy(transport: &Transport) -> bool {
    transport.kind == TransportKind::Tcp
        && port_in(&L7_PORTS, u16::from_be(transport.ports.dst), IPPROTO_TCP)
}

/// The L4 path's verdict and class for a packet of a service or of a tracked reply; `None`
/// for every other frame.
#[inline(always)]
fn l4_verdict(ctx: &XdpContext, frame: &Frame, bytes: usize) -> Option<(Stat, Verdict)> {
    match frame.network {
        NetworkKind::Ipv4 => {
            if frame.ipv4.proto == IPPROTO_ICMP {
                return icmp::translate_error(ctx, &frame.ipv4)
                    .map(|verdict| (Stat::ClassL4Icmp, verdict));
            }
            l4_family::<V4>(ctx, &frame.ipv4, &frame.transport, bytes)
        }
        // IPv6 is `xlb_ipv6`'s: here only when the tail call to it failed.
        NetworkKind::Ipv6
        | NetworkKind::TaggedIpv4
        | NetworkKind::TaggedIpv6
        | NetworkKind::Other => None,
    }
}

/// The L4 path for a TCP or UDP packet of family `F`.
#[inline(always)]
fn l4_family<F: Family>(
    ctx: &XdpContext,
    ip: &IpHeader<F::Addr>,
    transport: &Transport,
    bytes: usize,
) -> Option<(Stat, Verdict)> {
    let packet = L4Packet::new(ip, transport, bytes)?;
    if serves_port(&packet) {
        if let Some(verdict) = steer_to_backend::<F>(ctx, &packet) {
            return Some((Stat::ClassL4Service, verdict));
        }
    }
    if is_snat_port(packet.ports.dst) {
        return reply_to_client::<F>(ctx, &packet).map(|verdict| (Stat::ClassL4Reply, verdict));
    }
    None
}

/// The shield, Cilium's prefilter in spirit: a TCP or UDP packet to a shielded LB address on a
/// port nothing here serves is dropped, with its reason; `None` lets the frame through. It
/// runs after the L4 path and the L7 ports' check, so services, tracked replies and the
/// proxy's traffic never reach it.
#[inline(always)]
fn shield(frame: &Frame) -> Option<Stat> {
    if frame.network != NetworkKind::Ipv4 {
        return None;
    }
    // SAFETY: the value is only tested for presence.
    unsafe { SHIELDED.get(&frame.ipv4.dst) }?;
    shielded_port(&frame.transport, frame.ipv4.proto)
}

/// The shield's verdict for a packet to a shielded address (see [`shield`]).
#[inline(always)]
fn shielded_port(transport: &Transport, proto: u8) -> Option<Stat> {
    let reason = match transport.kind {
        TransportKind::Tcp => Stat::ShieldDropTcp,
        TransportKind::Udp => Stat::ShieldDropUdp,
        TransportKind::Other => return None,
    };
    let port = u16::from_be(transport.ports.dst);
    if setting(&SETTINGS.local_port_first) <= port && port <= setting(&SETTINGS.local_port_last) {
        return None;
    }
    let open = ListenPort {
        port,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { OPEN_PORTS.get(&open) }.is_some() {
        return None;
    }
    Some(reason)
}

/// The class and verdict of a frame the L4 path does not handle: a segment for the L7 proxy
/// is passed; any other frame is passed unless the shield drops it.
#[inline(always)]
fn not_l4(frame: &Frame, shield_drop: impl FnOnce() -> Option<Stat>) -> (Stat, Verdict) {
    if for_l7_proxy(&frame.transport) {
        return (Stat::ClassL7, Verdict::PASS);
    }
    match shield_drop() {
        Some(reason) => (Stat::ClassOther, Verdict::drop(reason)),
        None => (Stat::ClassOther, Verdict::PASS),
    }
}

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let bytes = frame_len(&ctx);
    let tally = Tally::new(bytes);
    tally.count(Stat::Received);
    let (class, verdict) = match parse(&ctx) {
        Ok(frame) => {
            if frame.network == NetworkKind::Ipv6 {
                let program = if frame.ipv6.proto == IPPROTO_ICMPV6 {
                    PROGRAM_IPV6_ICMP
                } else {
                    PROGRAM_IPV6
                };
                // SAFETY: returns only if it failed (no program at the index); the frame is
                // then classified here, as no L4 traffic.
                unsafe { PROGRAMS.tail_call(&ctx, program) };
            }
            l4_verdict(&ctx, &frame, bytes).unwrap_or_else(|| not_l4(&frame, || shield(&frame)))
        }
        Err(Malformed) => {
            debug!(&ctx, "xdp: malformed frame of {} bytes passed", bytes);
            (Stat::ClassMalformed, Verdict::PASS)
        }
    };
    tally.finish(class, verdict)
}

/// Untagged IPv6 frames, tail-called from `xlb` (which counted them as received): a program
/// of its own, with a 512-byte stack of its own, which the IPv6 path's 40-byte keys need.
#[xdp]
pub fn xlb_ipv6(ctx: XdpContext) -> u32 {
    let bytes = frame_len(&ctx);
    let tally = Tally::new(bytes);
    let (class, verdict) = match parse(&ctx) {
        Ok(frame) => {
            l4_ipv6(&ctx, &frame, bytes).unwrap_or_else(|| not_l4(&frame, || shield6(&ctx, &frame)))
        }
        Err(Malformed) => (Stat::ClassMalformed, Verdict::PASS),
    };
    tally.finish(class, verdict)
}

/// The IPv6 L4 path; `None` for every frame it does not handle.
#[inline(always)]
fn l4_ipv6(ctx: &XdpContext, frame: &Frame, bytes: usize) -> Option<(Stat, Verdict)> {
    if frame.network != NetworkKind::Ipv6 {
        return None;
    }
    let ip = frame.ipv6.with_addresses(ctx).ok()?;
    l4_family::<V6>(ctx, &ip, &frame.transport, bytes)
}

/// [`shield`] for IPv6.
#[inline(always)]
fn shield6(ctx: &XdpContext, frame: &Frame) -> Option<Stat> {
    if frame.network != NetworkKind::Ipv6 {
        return None;
    }
    let ip = frame.ipv6.with_addresses(ctx).ok()?;
    // SAFETY: the value is only tested for presence.
    unsafe { SHIELDED6.get(&ip.dst) }?;
    shielded_port(&frame.transport, ip.proto)
}

/// Untagged ICMPv6, tail-called from `xlb` as `xlb_ipv6` is: errors about tracked flows are
/// translated ([`icmp6`]), the rest (neighbour discovery among it) passed.
#[xdp]
pub fn xlb_ipv6_icmp(ctx: XdpContext) -> u32 {
    let bytes = frame_len(&ctx);
    let tally = Tally::new(bytes);
    let (class, verdict) = match parse(&ctx) {
        Ok(frame) => icmp_ipv6(&ctx, &frame)
            .map(|verdict| (Stat::ClassL4Icmp, verdict))
            .unwrap_or((Stat::ClassOther, Verdict::PASS)),
        Err(Malformed) => (Stat::ClassMalformed, Verdict::PASS),
    };
    tally.finish(class, verdict)
}

#[inline(always)]
fn icmp_ipv6(ctx: &XdpContext, frame: &Frame) -> Option<Verdict> {
    if frame.network != NetworkKind::Ipv6 {
        return None;
    }
    icmp6::translate_error(ctx, &frame.ipv6)
}

/// A new IPv6 flow, tail-called from `xlb_ipv6` once its packet is known to start one: the
/// flow's creation needs a stack of its own too. What the connection table did first comes
/// in this CPU's `NEW_FLOW_EVENT`.
#[xdp]
pub fn xlb_ipv6_new_flow(ctx: XdpContext) -> u32 {
    let bytes = frame_len(&ctx);
    let tally = Tally::new(bytes);
    // Counted here rather than with the verdict: carried through the flow's creation, each of
    // its values would be a state of its own for the verifier, tripling its walk.
    let event = family::take_new_flow_event();
    if let Some(event) = event {
        tally.count(event);
    }
    let reopened = event == Some(Stat::L4FlowReopened);
    let verdict = match parse(&ctx) {
        Ok(frame) => start_ipv6_flow(&ctx, &frame, bytes, reopened),
        Err(Malformed) => None,
    };
    // `None`: the frame is no longer what `xlb_ipv6` saw, which cannot be.
    tally.finish(Stat::ClassL4Service, verdict.unwrap_or(Verdict::ABORTED))
}

#[inline(always)]
fn start_ipv6_flow(
    ctx: &XdpContext,
    frame: &Frame,
    bytes: usize,
    reopened: bool,
) -> Option<Verdict> {
    if frame.network != NetworkKind::Ipv6 {
        return None;
    }
    let ip = frame.ipv6.with_addresses(ctx).ok()?;
    let packet = L4Packet::new(&ip, &frame.transport, bytes)?;
    let service = lookup_service::<V6>(&packet)?;
    // Off the stack: this program's frame and the flow's creation share 512 bytes.
    let key = family::scratch_key::<V6>(ScratchKey::Packet)?;
    packet.write_key(key);
    Some(steer::start_flow::<V6>(
        ctx, &packet, key, &service, reopened, None,
    ))
}

/// The daemon's sweep of the connection table ([`sweep`]), run through `BPF_PROG_TEST_RUN`;
/// never attached.
#[xdp]
pub fn xlb_sweep(ctx: XdpContext) -> u32 {
    sweep::sweep::<V4>(&ctx)
}

/// The same for the IPv6 connection table.
#[xdp]
pub fn xlb_sweep6(ctx: XdpContext) -> u32 {
    sweep::sweep::<V6>(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
