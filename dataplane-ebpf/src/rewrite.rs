//! Writing a frame for its next hop: addresses, ports and TTL with incremental checksums,
//! Ethernet addresses, and the transmit (back out of the ingress interface, or redirected).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::{eth::EthHdr, tcp::TcpHdr, udp::UdpHdr};
use xlb_common::{copy_mac, BackendOf, NextHop, Stat, WireAddr, IPPROTO_TCP};

use crate::{
    checksum::Update,
    family::{Family, Value},
    parse::{ptr_at, Malformed},
    steer::{L4Packet, Verdict},
    EGRESS,
};

/// The backend a flow was created for, if it still holds its id.
#[inline(always)]
pub fn live_backend<F: Family>(flow: &Value<F>) -> Option<&'static BackendOf<F::Addr>> {
    F::backends().get(flow.backend_id).filter(|backend| {
        backend.generation == flow.backend_generation && backend.addr != F::Addr::UNSPECIFIED
    })
}

/// Rewrites addresses, ports, TTL and MACs as `flow` and `next_hop` say, fixing checksums incrementally.
#[inline(always)]
pub fn rewrite<F: Family>(
    ctx: &XdpContext,
    packet: &L4Packet<F::Addr>,
    flow: &Value<F>,
    next_hop: &NextHop,
) -> Result<(), Malformed> {
    let ip = packet.ip;
    F::rewrite_ip_header(ctx, ip, flow.new_src_addr, flow.new_dst_addr)?;
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
            let update = Update::new(old_check);
            let update = F::replace_addr(update, &ip.src, &flow.new_src_addr);
            let update = F::replace_addr(update, &ip.dst, &flow.new_dst_addr);
            let mut l4_check = update
                .replace16(packet.ports.src, flow.new_src_port)
                .replace16(packet.ports.dst, flow.new_dst_port)
                .finish();
            if ip.proto != IPPROTO_TCP && l4_check == 0 {
                l4_check = 0xffff;
            }
            check.write_unaligned(l4_check.to_ne_bytes());
        }
        ports.write_unaligned([flow.new_src_port, flow.new_dst_port]);
    }
    write_macs(ctx, next_hop)
}

/// Writes the Ethernet addresses of `next_hop`.
#[inline(always)]
pub fn write_macs(ctx: &XdpContext, next_hop: &NextHop) -> Result<(), Malformed> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: checked inside the frame; EthHdr fields are byte arrays (alignment 1).
    let eth = unsafe { &mut *eth };
    copy_mac(&mut eth.dst_addr, &next_hop.dst_mac);
    copy_mac(&mut eth.src_addr, &next_hop.src_mac);
    Ok(())
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
