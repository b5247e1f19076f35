//! ICMPv6 errors about NATed IPv6 flows, translated to the side that sent the offending packet,
//! as [`crate::icmp`] does for IPv4. IPv6 routers never fragment, so path-MTU discovery rests
//! on "packet too big" reaching the sender: untranslated, every IPv6 flow through a link of a
//! smaller MTU would stall.
//!
//! The error quotes a packet xlb rewrote; its tuple reversed is the key of the flow entry of
//! the other direction, which says what the packet was before the rewrite and where its sender
//! is (see `icmp.rs`). The ICMPv6 checksum covers a pseudo-header of the outer addresses as
//! well as the whole message, so it is updated for the outer and the inner changes; the inner
//! TCP/UDP checksum too when the quote holds it. Quotes whose transport header follows
//! extension headers are left to the kernel.

use aya_ebpf::programs::XdpContext;
use network_types::ip::Ipv6Hdr;
use xlb_common::{FlowValue6, Ipv6Wire, NextHop, Stat, DIRECTION_REPLY, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    checksum::Update,
    family::{scratch_key, Family, ScratchKey, V6},
    parse::{ptr_at, read_at, Ipv6Parsed, Malformed},
    rewrite::{live_backend, transmit, write_macs},
    steer::Verdict,
    FLOWS6, ICMP6_ADDRESSES,
};

const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
/// Type, code, checksum, and four bytes that depend on the type (the MTU for "packet too
/// big"): the quoted packet follows.
const ICMPV6_HEADER_LEN: usize = 8;
const ICMPV6_CHECKSUM_OFFSET: usize = 2;
const TCP_CHECKSUM_OFFSET: usize = 16;
const UDP_CHECKSUM_OFFSET: usize = 6;
/// Where the next-header field and the addresses are in an IPv6 header.
const NEXT_HEADER_OFFSET: usize = 6;
const HOP_LIMIT_OFFSET: usize = 7;
const SRC_OFFSET: usize = 8;

/// The quoted packet: where it is, its protocol and ports (wire order). Its addresses, and the
/// error's own, are read in the frame where they are used: copies of the four of them would
/// not fit the program's 512-byte stack beside everything else.
struct Quoted {
    offset: usize,
    transport_offset: usize,
    proto: u8,
    src_port: u16,
    dst_port: u16,
}

/// The packet an ICMPv6 error at `ip` quotes, if the error is one a NAT translates (types 1
/// to 4) and the quote is a TCP/UDP packet with its ports.
#[inline(always)]
fn quoted_packet(ctx: &XdpContext, ip: &Ipv6Parsed) -> Result<Option<Quoted>, Malformed> {
    let [kind, _code]: [u8; 2] = read_at(ctx, ip.transport_offset)?;
    if !(ICMPV6_DEST_UNREACHABLE..=ICMPV6_PARAMETER_PROBLEM).contains(&kind) {
        return Ok(None);
    }
    let offset = ip.transport_offset + ICMPV6_HEADER_LEN;
    let [version]: [u8; 1] = read_at(ctx, offset)?;
    let [proto]: [u8; 1] = read_at(ctx, offset + NEXT_HEADER_OFFSET)?;
    if version >> 4 != 6 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return Ok(None);
    }
    let transport_offset = offset + Ipv6Hdr::LEN;
    let [src_port, dst_port]: [u16; 2] = read_at(ctx, transport_offset)?;
    Ok(Some(Quoted {
        offset,
        transport_offset,
        proto,
        src_port,
        dst_port,
    }))
}

/// The error's and the quoted packet's addresses, copied word by word into this CPU's
/// `ICMP6_ADDRESSES` slot: [error source, error destination, quoted source, quoted
/// destination]. Where they are used (checksums, the flow key) they are read from there: on the
/// stack the four would not fit beside the rest, and read in the frame each use would need a
/// bounds check of its own, which the verifier forgets when the compiler computes a pointer
/// again.
#[inline(always)]
fn copy_addresses(
    ctx: &XdpContext,
    ip: &Ipv6Parsed,
    quoted: &Quoted,
) -> Option<&'static [Ipv6Wire; 4]> {
    let slot = ICMP6_ADDRESSES.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot, only ever touched by the CPU running this program.
    let slot = unsafe { &mut *slot };
    for word in 0..4 {
        slot[0][word] = read_at(ctx, ip.offset + SRC_OFFSET + word * 4).ok()?;
        slot[1][word] = read_at(ctx, ip.offset + SRC_OFFSET + 16 + word * 4).ok()?;
        slot[2][word] = read_at(ctx, quoted.offset + SRC_OFFSET + word * 4).ok()?;
        slot[3][word] = read_at(ctx, quoted.offset + SRC_OFFSET + 16 + word * 4).ok()?;
    }
    Some(slot)
}

/// An ICMPv6 error about a tracked flow, translated and sent on; `None` for any other ICMPv6
/// packet (the kernel gets it: neighbour discovery among them).
#[inline(always)]
pub fn translate_error(ctx: &XdpContext, ip: &Ipv6Parsed) -> Option<Verdict> {
    if ip.fragment || ip.ttl <= 1 {
        return None;
    }
    let quoted = quoted_packet(ctx, ip).ok()??;
    let addresses = copy_addresses(ctx, ip, &quoted)?;
    let key = scratch_key::<V6>(ScratchKey::Packet)?;
    key.set(
        &addresses[3],
        &addresses[2],
        quoted.dst_port,
        quoted.src_port,
        quoted.proto,
    );
    // SAFETY: read in place; flow values are plain data.
    let flow = unsafe { FLOWS6.get(&*key) }?;
    let (next_hop, outcome) = if flow.direction == DIRECTION_REPLY {
        (&flow.next_hop, Stat::L4IcmpToClient)
    } else {
        (&live_backend::<V6>(flow)?.next_hop, Stat::L4IcmpToBackend)
    };
    Some(match rewrite(ctx, ip, &quoted, addresses, flow, next_hop) {
        Ok(()) => transmit(ctx, next_hop, outcome),
        Err(Malformed) => Verdict::ABORTED,
    })
}

#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    ip: &Ipv6Parsed,
    quoted: &Quoted,
    [outer_src, outer_dst, quoted_src, quoted_dst]: &[Ipv6Wire; 4],
    flow: &FlowValue6,
    next_hop: &NextHop,
) -> Result<(), Malformed> {
    // The quoted packet as it was before xlb rewrote it: from the flow's sender, to the
    // address it wrote to.
    let (inner_src, inner_src_port) = (&flow.new_dst_addr, flow.new_dst_port);
    let (inner_dst, inner_dst_port) = (&flow.new_src_addr, flow.new_src_port);
    // The pseudo-header: the error will come from the address the sender wrote to, and go to
    // the sender.
    let icmp_check: *mut [u8; 2] = ptr_at(ctx, ip.transport_offset + ICMPV6_CHECKSUM_OFFSET)?;
    // SAFETY: checked inside the frame; unaligned.
    let icmp = Update::new(u16::from_ne_bytes(unsafe { icmp_check.read_unaligned() }));
    let icmp = V6::replace_addr(icmp, outer_src, &flow.new_src_addr);
    let icmp = V6::replace_addr(icmp, outer_dst, &flow.new_dst_addr);
    let icmp = V6::replace_addr(icmp, quoted_src, inner_src);
    let icmp = V6::replace_addr(icmp, quoted_dst, inner_dst);
    let mut icmp = icmp
        .replace16(quoted.src_port, inner_src_port)
        .replace16(quoted.dst_port, inner_dst_port);
    let l4_offset = if quoted.proto == IPPROTO_TCP {
        TCP_CHECKSUM_OFFSET
    } else {
        UDP_CHECKSUM_OFFSET
    };
    // Quoted whenever the router quoted that far (RFC 4443 asks for as much as fits).
    if let Ok(l4_check) = ptr_at::<[u8; 2]>(ctx, quoted.transport_offset + l4_offset) {
        // SAFETY: checked inside the frame; unaligned.
        let old_l4 = u16::from_ne_bytes(unsafe { l4_check.read_unaligned() });
        let l4 = Update::new(old_l4);
        let l4 = V6::replace_addr(l4, quoted_src, inner_src);
        let l4 = V6::replace_addr(l4, quoted_dst, inner_dst);
        let l4 = l4
            .replace16(quoted.src_port, inner_src_port)
            .replace16(quoted.dst_port, inner_dst_port)
            .finish();
        icmp = icmp.replace16(old_l4, l4);
        // SAFETY: as above.
        unsafe { l4_check.write_unaligned(l4.to_ne_bytes()) };
    }
    let icmp_check: *mut [u8; 2] = ptr_at(ctx, ip.transport_offset + ICMPV6_CHECKSUM_OFFSET)?;
    let inner_ports: *mut [u16; 2] = ptr_at(ctx, quoted.transport_offset)?;
    // SAFETY: both checked inside the frame just now; unaligned stores.
    unsafe {
        icmp_check.write_unaligned(icmp.finish().to_ne_bytes());
        inner_ports.write_unaligned([inner_src_port, inner_dst_port]);
    }
    let written = write_address(ctx, quoted.offset + SRC_OFFSET, inner_src)
        && write_address(ctx, quoted.offset + SRC_OFFSET + 16, inner_dst)
        && write_address(ctx, ip.offset + SRC_OFFSET, &flow.new_src_addr)
        && write_address(ctx, ip.offset + SRC_OFFSET + 16, &flow.new_dst_addr);
    if !written {
        return Err(Malformed);
    }
    let hop_limit: *mut u8 = ptr_at(ctx, ip.offset + HOP_LIMIT_OFFSET)?;
    // SAFETY: checked inside the frame.
    unsafe { *hop_limit -= 1 };
    write_macs(ctx, next_hop)
}

/// Writes an IPv6 address at `offset` in the frame, word by word, each store checked where it
/// is made (see [`copy_addresses`]); false when it does not fit.
// Not inlined: four of them inline, with their checks, would not fit the 512-byte stack.
#[inline(never)]
fn write_address(ctx: &XdpContext, offset: usize, addr: &Ipv6Wire) -> bool {
    for (index, word) in addr.iter().enumerate() {
        let Ok(target) = ptr_at::<[u8; 4]>(ctx, offset + index * 4) else {
            return false;
        };
        // SAFETY: checked inside the frame; unaligned.
        unsafe { target.write_unaligned(word.to_ne_bytes()) };
    }
    true
}
