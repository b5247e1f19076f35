//! ICMP errors about NATed flows, translated to the side that sent the offending packet, as a
//! NAT must (RFC 5508): without it, path-MTU discovery through xlb is a black hole, and a
//! backend's "port unreachable" never reaches its UDP client.
//!
//! An error quotes the packet that caused it. The quoted packet is one xlb rewrote, so its
//! tuple, reversed, is the key of the flow entry of the *other* direction; that entry says
//! what the packet was before the rewrite and where its sender is:
//! - an error from the backend's side quotes (SNAT → backend): the reply entry of that tuple
//!   sends the error to the client, quoting (client → service);
//! - an error from the client's side quotes (service → client): the forward entry of that
//!   tuple sends it to the backend, quoting (backend → SNAT).
//!
//! Outer and inner addresses, inner ports and the inner IP checksum are rewritten; the ICMP
//! checksum is updated incrementally for every inner change, and the inner TCP/UDP checksum
//! too when the router quoted it.

use aya_ebpf::programs::XdpContext;
use network_types::ip::Ipv4Hdr;
use xlb_common::{FlowKey, FlowValue, NextHop, Stat, DIRECTION_REPLY, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    checksum,
    family::{Family, V4},
    parse::{ptr_at, read_at, Ipv4, Malformed},
    rewrite::{live_backend, transmit, write_macs},
    steer::Verdict,
    FLOWS,
};

const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Type, code, checksum, and four bytes that depend on the type (the MTU for "fragmentation
/// needed"): the quoted packet follows.
const ICMP_HEADER_LEN: usize = 8;
const ICMP_CHECKSUM_OFFSET: usize = 2;
const IPV4_CHECKSUM_OFFSET: usize = 10;
const TCP_CHECKSUM_OFFSET: usize = 16;
const UDP_CHECKSUM_OFFSET: usize = 6;

/// The quoted packet's IPv4 header and ports (wire order).
struct Quoted {
    offset: usize,
    transport_offset: usize,
    src: u32,
    dst: u32,
    proto: u8,
    src_port: u16,
    dst_port: u16,
}

/// The packet an ICMP error at `ip` quotes, if the error is one a NAT translates and the
/// quote holds a first (or only) TCP/UDP fragment with its ports.
#[inline(always)]
fn quoted_packet(ctx: &XdpContext, ip: &Ipv4) -> Result<Option<Quoted>, Malformed> {
    let [kind, _code]: [u8; 2] = read_at(ctx, ip.transport_offset)?;
    if !matches!(
        kind,
        ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return Ok(None);
    }
    let offset = ip.transport_offset + ICMP_HEADER_LEN;
    let inner: Ipv4Hdr = read_at(ctx, offset)?;
    let header_len = inner.ihl() as usize;
    if inner.version() != 4 || header_len < Ipv4Hdr::LEN || inner.frag_offset() != 0 {
        return Ok(None);
    }
    if inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP {
        return Ok(None);
    }
    let transport_offset = offset + header_len;
    let [src_port, dst_port]: [u16; 2] = read_at(ctx, transport_offset)?;
    Ok(Some(Quoted {
        offset,
        transport_offset,
        src: u32::from_ne_bytes(inner.src_addr),
        dst: u32::from_ne_bytes(inner.dst_addr),
        proto: inner.proto,
        src_port,
        dst_port,
    }))
}

/// An ICMP error about a tracked flow, translated and sent on; `None` for any other ICMP
/// packet (the kernel gets it).
// Not inlined: its locals get their own frame, off the 512-byte stack of the TCP/UDP path.
#[inline(never)]
pub fn translate_error(ctx: &XdpContext, ip: &Ipv4) -> Option<Verdict> {
    if ip.fragment || ip.ttl <= 1 {
        return None;
    }
    let quoted = quoted_packet(ctx, ip).ok()??;
    let key = FlowKey::new(
        quoted.dst,
        quoted.src,
        quoted.dst_port,
        quoted.src_port,
        quoted.proto,
    );
    // SAFETY: read in place; FLOWS values are plain data.
    let flow = unsafe { FLOWS.get(&key) }?;
    let (next_hop, outcome) = if flow.direction == DIRECTION_REPLY {
        (&flow.next_hop, Stat::L4IcmpToClient)
    } else {
        (&live_backend::<V4>(flow)?.next_hop, Stat::L4IcmpToBackend)
    };
    Some(match rewrite(ctx, ip, &quoted, flow, next_hop) {
        Ok(()) => transmit(ctx, next_hop, outcome),
        Err(Malformed) => Verdict::ABORTED,
    })
}

#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    ip: &Ipv4,
    quoted: &Quoted,
    flow: &FlowValue,
    next_hop: &NextHop,
) -> Result<(), Malformed> {
    // The quoted packet as it was before xlb rewrote it: from the flow's sender, to the
    // address it wrote to.
    let (inner_src, inner_src_port) = (flow.new_dst_addr, flow.new_dst_port);
    let (inner_dst, inner_dst_port) = (flow.new_src_addr, flow.new_src_port);
    let icmp_check: *mut [u8; 2] = ptr_at(ctx, ip.transport_offset + ICMP_CHECKSUM_OFFSET)?;
    let inner_check: *mut [u8; 2] = ptr_at(ctx, quoted.offset + IPV4_CHECKSUM_OFFSET)?;
    let inner_ports: *mut [u16; 2] = ptr_at(ctx, quoted.transport_offset)?;
    // SAFETY: every pointer was checked to lie inside the frame; unaligned accesses.
    unsafe {
        let mut icmp = u16::from_ne_bytes(icmp_check.read_unaligned());
        let old_inner = u16::from_ne_bytes(inner_check.read_unaligned());
        let mut inner = old_inner;
        inner = checksum::replace32(inner, quoted.src, inner_src);
        inner = checksum::replace32(inner, quoted.dst, inner_dst);
        icmp = checksum::replace32(icmp, quoted.src, inner_src);
        icmp = checksum::replace32(icmp, quoted.dst, inner_dst);
        icmp = checksum::replace16(icmp, old_inner, inner);
        icmp = checksum::replace16(icmp, quoted.src_port, inner_src_port);
        icmp = checksum::replace16(icmp, quoted.dst_port, inner_dst_port);
        let l4_offset = if quoted.proto == IPPROTO_TCP {
            TCP_CHECKSUM_OFFSET
        } else {
            UDP_CHECKSUM_OFFSET
        };
        // Quoted only when the router sent more than the 8 bytes RFC 792 asks for (TCP), and
        // absent in UDP when it is 0.
        if let Ok(l4_check) = ptr_at::<[u8; 2]>(ctx, quoted.transport_offset + l4_offset) {
            let old_l4 = u16::from_ne_bytes(l4_check.read_unaligned());
            if quoted.proto == IPPROTO_TCP || old_l4 != 0 {
                let mut l4 = old_l4;
                l4 = checksum::replace32(l4, quoted.src, inner_src);
                l4 = checksum::replace32(l4, quoted.dst, inner_dst);
                l4 = checksum::replace16(l4, quoted.src_port, inner_src_port);
                l4 = checksum::replace16(l4, quoted.dst_port, inner_dst_port);
                if quoted.proto == IPPROTO_UDP && l4 == 0 {
                    l4 = 0xffff;
                }
                icmp = checksum::replace16(icmp, old_l4, l4);
                l4_check.write_unaligned(l4.to_ne_bytes());
            }
        }
        inner_check.write_unaligned(inner.to_ne_bytes());
        icmp_check.write_unaligned(icmp.to_ne_bytes());
        inner_ports.write_unaligned([inner_src_port, inner_dst_port]);
        let inner_addrs: *mut [u32; 2] = ptr_at(ctx, quoted.offset + 12)?;
        inner_addrs.write_unaligned([inner_src, inner_dst]);
    }
    // The error now comes from the address the sender wrote to, and goes to the sender.
    V4::rewrite_ip_header(ctx, ip, flow.new_src_addr, flow.new_dst_addr)?;
    write_macs(ctx, next_hop)
}
