//! The two address families the L4 path NATs. Each has maps of its own (IPv4 keys stay 16
//! bytes), its header layout and its checksum arithmetic; the connection table, SNAT and
//! steering are written once, generic over [`Family`], and compiled once per family.

use aya_ebpf::{
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use xlb_common::{
    BackendOf, FlowKeyOf, FlowValueOf, Ipv6Wire, ServiceKeyOf, ServiceValue, Stat, WireAddr,
    PROGRAM_IPV6_NEW_FLOW, SNAT_ATTEMPTS, SNAT_ATTEMPTS6,
};

use crate::{
    checksum::{self, Update},
    parse::{ptr_at, IpHeader, Malformed},
    setting,
    steer::{self, L4Packet, Verdict},
    BACKENDS, BACKENDS6, FLOWS, FLOWS6, FLOW_SCRATCH, FLOW_SCRATCH6, KEY_SCRATCH, KEY_SCRATCH6,
    NEW_FLOW_EVENT, PROGRAMS, REOPENED_TUPLE, REOPENED_TUPLE6, SERVICES, SERVICES6, SETTINGS,
};

pub type Key<F> = FlowKeyOf<<F as Family>::Addr>;
pub type Value<F> = FlowValueOf<<F as Family>::Addr>;

pub trait Family: 'static {
    type Addr: WireAddr;

    /// SNAT tuples a new flow tries (see `xlb_common::SNAT_ATTEMPTS`).
    const SNAT_ATTEMPTS: u32;

    /// The connection table.
    fn flows() -> &'static HashMap<Key<Self>, Value<Self>>;
    fn services() -> &'static HashMap<ServiceKeyOf<Self::Addr>, ServiceValue>;
    fn backends() -> &'static Array<BackendOf<Self::Addr>>;
    /// Where a reopened flow's SNAT tuple is left for the new flow (see `Tracked::Reopened`).
    fn reopened_tuple() -> &'static PerCpuArray<Key<Self>>;
    /// Where a new flow's two entries are built: [reply, forward].
    fn flow_scratch() -> &'static PerCpuArray<Value<Self>>;
    /// Where keys built on the way are kept (see [`ScratchKey`]).
    fn key_scratch() -> &'static PerCpuArray<Key<Self>>;

    /// How many SNAT addresses are configured; 0 = each backend's own.
    fn snat_addr_count() -> u32;
    /// The configured SNAT address `index`.
    fn snat_addr(index: u32) -> Option<Self::Addr>;

    /// The address folded into the 32 bits the Maglev hash mixes.
    fn hash_word(addr: Self::Addr) -> u32;

    /// A TCP/UDP (or ICMPv6) checksum update for an address of its pseudo-header changed from
    /// `old` to `new`.
    fn replace_addr(update: Update, old: &Self::Addr, new: &Self::Addr) -> Update;

    /// Creates a flow for a packet that starts one, rewrites and sends it
    /// ([`steer::start_flow`]): inline for IPv4; for IPv6 in `xlb_ipv6_new_flow`, tail-called
    /// with a stack of its own.
    fn start_flow(
        ctx: &XdpContext,
        packet: &L4Packet<Self::Addr>,
        key: &Key<Self>,
        service: &ServiceValue,
        event: Option<Stat>,
    ) -> Verdict;

    /// Rewrites the IP header at `ip` to `new_src` → `new_dst` and takes one off its TTL or
    /// hop limit (with the IPv4 header checksum updated incrementally).
    fn rewrite_ip_header(
        ctx: &XdpContext,
        ip: &IpHeader<Self::Addr>,
        new_src: Self::Addr,
        new_dst: Self::Addr,
    ) -> Result<(), Malformed>;
}

/// The slots of a family's `KEY_SCRATCH`: keys the packet path builds, kept in this CPU's
/// map memory rather than on the stack, where the verifier allows 512 bytes for a whole call
/// chain and an IPv6 key takes 40. Each slot has one user at a time: the calls that use them
/// do not nest into another user of the same slot.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum ScratchKey {
    /// The SNAT tuple a new flow tries (and, once claimed, its reply key).
    Candidate = 0,
    /// The forward key of a tuple's current holder, in a claim.
    HolderForward = 1,
    /// The peer of the entry a packet found.
    Peer = 2,
    /// The packet's own key, for a new flow.
    Packet = 3,
}

/// Slots in each `KEY_SCRATCH` map.
pub const SCRATCH_KEYS: u32 = 4;

/// This CPU's scratch key `slot`, to be written in place (`FlowKeyOf::set`).
#[inline(always)]
pub fn scratch_key<F: Family>(slot: ScratchKey) -> Option<&'static mut Key<F>> {
    let entry = F::key_scratch().get_ptr_mut(slot as u32)?;
    // SAFETY: a per-CPU slot, only ever touched by the CPU running this program, which XDP
    // runs to completion; no other user of the slot is live (see `ScratchKey`).
    Some(unsafe { &mut *entry })
}

/// What the connection table did to a packet before it starts a new IPv6 flow, as it crosses
/// the tail call in `NEW_FLOW_EVENT`.
#[repr(u32)]
enum NewFlowEvent {
    None = 0,
    Reopened = 1,
    BackendGone = 2,
}

impl NewFlowEvent {
    #[inline(always)]
    fn from_stat(event: Option<Stat>) -> NewFlowEvent {
        match event {
            Some(Stat::L4FlowReopened) => NewFlowEvent::Reopened,
            Some(Stat::L4FlowBackendGone) => NewFlowEvent::BackendGone,
            _ => NewFlowEvent::None,
        }
    }
}

/// The event `V6::start_flow` left for `xlb_ipv6_new_flow`, cleared.
#[inline(always)]
pub fn take_new_flow_event() -> Option<Stat> {
    let slot = NEW_FLOW_EVENT.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot, only ever touched by the CPU running this program; the tail
    // call that led here ran on this CPU.
    let value = unsafe { core::mem::replace(&mut *slot, NewFlowEvent::None as u32) };
    match value {
        1 => Some(Stat::L4FlowReopened),
        2 => Some(Stat::L4FlowBackendGone),
        _ => None,
    }
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    const SNAT_ATTEMPTS: u32 = SNAT_ATTEMPTS;

    #[inline(always)]
    fn start_flow(
        ctx: &XdpContext,
        packet: &L4Packet<u32>,
        key: &Key<Self>,
        service: &ServiceValue,
        event: Option<Stat>,
    ) -> Verdict {
        let reopened = event == Some(Stat::L4FlowReopened);
        steer::start_flow::<V4>(ctx, packet, key, service, reopened, event)
    }

    #[inline(always)]
    fn flows() -> &'static HashMap<Key<Self>, Value<Self>> {
        &FLOWS
    }

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<u32>, ServiceValue> {
        &SERVICES
    }

    #[inline(always)]
    fn backends() -> &'static Array<BackendOf<u32>> {
        &BACKENDS
    }

    #[inline(always)]
    fn reopened_tuple() -> &'static PerCpuArray<Key<Self>> {
        &REOPENED_TUPLE
    }

    #[inline(always)]
    fn flow_scratch() -> &'static PerCpuArray<Value<Self>> {
        &FLOW_SCRATCH
    }

    #[inline(always)]
    fn key_scratch() -> &'static PerCpuArray<Key<Self>> {
        &KEY_SCRATCH
    }

    #[inline(always)]
    fn snat_addr_count() -> u32 {
        setting(&SETTINGS.snat_addr_count)
    }

    #[inline(always)]
    fn snat_addr(index: u32) -> Option<u32> {
        SETTINGS.snat_addrs.get(index as usize).map(setting)
    }

    #[inline(always)]
    fn hash_word(addr: u32) -> u32 {
        u32::from_be(addr)
    }

    #[inline(always)]
    fn replace_addr(update: Update, old: &u32, new: &u32) -> Update {
        update.replace32(*old, *new)
    }

    #[inline(always)]
    fn rewrite_ip_header(
        ctx: &XdpContext,
        ip: &IpHeader<u32>,
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
}

impl Family for V6 {
    type Addr = Ipv6Wire;
    const SNAT_ATTEMPTS: u32 = SNAT_ATTEMPTS6;

    /// The event goes in this CPU's `NEW_FLOW_EVENT`; the packet itself is parsed again.
    #[inline(always)]
    fn start_flow(
        ctx: &XdpContext,
        _packet: &L4Packet<Ipv6Wire>,
        _key: &Key<Self>,
        _service: &ServiceValue,
        event: Option<Stat>,
    ) -> Verdict {
        if let Some(slot) = NEW_FLOW_EVENT.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot, only ever touched by the CPU running this program.
            unsafe { *slot = NewFlowEvent::from_stat(event) as u32 };
        }
        // SAFETY: returns only if it failed (no program at the index).
        unsafe { PROGRAMS.tail_call(ctx, PROGRAM_IPV6_NEW_FLOW) };
        Verdict::ABORTED
    }

    #[inline(always)]
    fn flows() -> &'static HashMap<Key<Self>, Value<Self>> {
        &FLOWS6
    }

    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyOf<Ipv6Wire>, ServiceValue> {
        &SERVICES6
    }

    #[inline(always)]
    fn backends() -> &'static Array<BackendOf<Ipv6Wire>> {
        &BACKENDS6
    }

    #[inline(always)]
    fn reopened_tuple() -> &'static PerCpuArray<Key<Self>> {
        &REOPENED_TUPLE6
    }

    #[inline(always)]
    fn flow_scratch() -> &'static PerCpuArray<Value<Self>> {
        &FLOW_SCRATCH6
    }

    #[inline(always)]
    fn key_scratch() -> &'static PerCpuArray<Key<Self>> {
        &KEY_SCRATCH6
    }

    #[inline(always)]
    fn snat_addr_count() -> u32 {
        setting(&SETTINGS.snat_addr6_count)
    }

    #[inline(always)]
    fn snat_addr(index: u32) -> Option<Ipv6Wire> {
        SETTINGS.snat_addrs6.get(index as usize).map(setting)
    }

    /// All four words, so that clients of one /64 still spread over the backends.
    #[inline(always)]
    fn hash_word(addr: Ipv6Wire) -> u32 {
        let [a, b, c, d] = addr.map(u32::from_be);
        a ^ b.rotate_left(8) ^ c.rotate_left(16) ^ d.rotate_left(24)
    }

    #[inline(always)]
    fn replace_addr(update: Update, old: &Ipv6Wire, new: &Ipv6Wire) -> Update {
        update
            .replace32(old[0], new[0])
            .replace32(old[1], new[1])
            .replace32(old[2], new[2])
            .replace32(old[3], new[3])
    }

    /// IPv6 has no header checksum: the addresses and the hop limit are written as they are.
    #[inline(always)]
    fn rewrite_ip_header(
        ctx: &XdpContext,
        ip: &IpHeader<Ipv6Wire>,
        new_src: Ipv6Wire,
        new_dst: Ipv6Wire,
    ) -> Result<(), Malformed> {
        let ip_header: *mut Ipv6Hdr = ptr_at(ctx, ip.offset)?;
        // SAFETY: `ptr_at` checked the header lies inside the frame, the source and
        // destination addresses (eight words) included; unaligned stores, word by word so
        // that no `memcpy` call is emitted.
        unsafe {
            (*ip_header).hop_limit -= 1;
            let words = (&raw mut (*ip_header).src_addr).cast::<u32>();
            for index in 0..4 {
                words.add(index).write_unaligned(new_src[index]);
                words.add(4 + index).write_unaligned(new_dst[index]);
            }
        }
        Ok(())
    }
}
