//! Writing a frame for its next hop: addresses, ports and TTL with incremental checksums,
//! Ethernet addresses, and the transmit (back out of the ingress interface, or redirected).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};
use xlb_common::{Backend, FlowValue, NextHop, Stat, IPPROTO_TCP};

use crate::{
    checksum,
    parse::{ptr_at, Ipv4, Malformed},
    steer::{L4Packet, Verdict},
    BACKENDS, EGRESS,
};

/// The backend a flow was created for, if it still holds its id.
#[inline(always)]
pub fn live_backend(flow: &FlowValue) -> Option<&'static Backend> {
    BACKENDS
        .get(flow.backend_id)
        .filter(|backend| backend.generation == flow.backend_generation && backend.addr != 0)
}

/// Rewrites addresses, ports, TTL and MACs as `flow` and `next_hop` say, fixing checksums incrementally.
#[inline(always)]
pub fn rewrite(
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

/// Sends the rewritten frame: back out of the interface it came in on, or redirected through
/// `EGRESS` to another the program is attached to.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, next_hop: &NextHop, outcome: Stat) -> Verdict {
    if next_hop.ifindex == ctx.ingress_ifindex() as u32 {
        return Verdict {
            action: xdp_action::XDP_TX,
            outcome: Some(outcome),
            event: None,
        };
    }
    match EGRESS.redirect(next_hop.ifindex, 0) {
        Ok(action) => Verdict {
            action,
            outcome: Some(outcome),
            event: None,
        },
        Err(_) => Verdict::drop(Stat::L4DropRedirect),
    }
}
