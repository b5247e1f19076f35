//! The xlb XDP program, attached to a load-balancer node's interface.
//!
//! The packet path reads top to bottom: bounds-checked header access → Ethernet (one VLAN tag)
//! → IPv4 / IPv6 (extension headers walked) → TCP / UDP → class → verdict. Every frame is
//! counted on entry, by class and by verdict in the per-CPU `STATS` array; the daemon sums it.
//!
//! This stage classifies and passes every frame: steering (Maglev, NAT, connection tracking)
//! builds on the same parse.
#![no_std]
#![no_main]

use core::mem;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use xlb_common::{Counter, Stat, MAX_L7_PORTS};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXT_HEADERS: usize = 6;

#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// TCP ports (host byte order) the userspace L7 proxy listens on; filled by the daemon.
#[map]
static L7_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(MAX_L7_PORTS, 0);

/// A header was cut short or contradicts itself: the frame is counted as malformed.
struct Malformed;

/// What the transport layer of a well-formed frame turned out to be.
enum Transport {
    Tcp { dst_port: u16 },
    Udp,
    /// No transport header to read: another protocol, or a non-first fragment.
    Other,
}

/// The frame's class, counted in `STATS`.
enum Class {
    L7,
    Other,
    Malformed,
}

impl Class {
    fn stat(&self) -> Stat {
        match self {
            Class::L7 => Stat::ClassL7,
            Class::Other => Stat::ClassOther,
            Class::Malformed => Stat::ClassMalformed,
        }
    }
}

#[inline(always)]
fn count(stat: Stat, bytes: usize) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot is only ever touched by the CPU running this program.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

/// Reads a `T` at `offset`; `T` must be a plain byte-array header (alignment 1).
#[inline(always)]
fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Malformed> {
    // SAFETY: `ptr_at` checked that the bytes are inside the frame; the read is unaligned.
    ptr_at::<T>(ctx, offset).map(|ptr| unsafe { ptr.read_unaligned() })
}

/// A TCP header at `offset` that must end by `ip_end`, the end of its IP packet.
#[inline(always)]
fn parse_tcp(ctx: &XdpContext, offset: usize, ip_end: usize) -> Result<Transport, Malformed> {
    let tcp: TcpHdr = read_at(ctx, offset)?;
    let header_len = tcp.doff() as usize * 4;
    if header_len < TcpHdr::LEN || offset + header_len > ip_end {
        return Err(Malformed);
    }
    Ok(Transport::Tcp {
        dst_port: u16::from_be_bytes(tcp.dest),
    })
}

/// A UDP header at `offset` whose datagram must fit in its IP packet, ending at `ip_end`.
#[inline(always)]
fn parse_udp(ctx: &XdpContext, offset: usize, ip_end: usize) -> Result<Transport, Malformed> {
    let udp: UdpHdr = read_at(ctx, offset)?;
    let datagram_len = udp.len() as usize;
    if datagram_len < UdpHdr::LEN || offset + datagram_len > ip_end {
        return Err(Malformed);
    }
    Ok(Transport::Udp)
}

#[inline(always)]
fn parse_transport(
    ctx: &XdpContext,
    proto: u8,
    offset: usize,
    ip_end: usize,
) -> Result<Transport, Malformed> {
    match proto {
        IPPROTO_TCP => parse_tcp(ctx, offset, ip_end),
        IPPROTO_UDP => parse_udp(ctx, offset, ip_end),
        _ => Ok(Transport::Other),
    }
}

/// The frame's length from its start, as the bound for an IP packet's declared length.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<Transport, Malformed> {
    let ip: Ipv4Hdr = read_at(ctx, offset)?;
    let header_len = ip.ihl() as usize;
    let total_len = ip.tot_len() as usize;
    if ip.version() != 4
        || header_len < Ipv4Hdr::LEN
        || total_len < header_len
        || offset + total_len > frame_len(ctx)
    {
        return Err(Malformed);
    }
    if ip.frag_offset() != 0 {
        return Ok(Transport::Other);
    }
    parse_transport(ctx, ip.proto, offset + header_len, offset + total_len)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<Transport, Malformed> {
    let ip: Ipv6Hdr = read_at(ctx, offset)?;
    let ip_end = offset + Ipv6Hdr::LEN + ip.payload_len() as usize;
    if ip.version() != 6 || ip_end > frame_len(ctx) {
        return Err(Malformed);
    }
    let mut next_header = ip.next_hdr;
    let mut header_start = offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        // Every extension header starts with (next header, length); only the unit differs.
        let [following, len] = match next_header {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
                read_at::<[u8; 2]>(ctx, header_start)?
            }
            _ => return parse_transport(ctx, next_header, header_start, ip_end),
        };
        let header_len = match next_header {
            IPPROTO_FRAGMENT => {
                let fragment: [u8; 8] = read_at(ctx, header_start)?;
                if u16::from_be_bytes([fragment[2], fragment[3]]) >> 3 != 0 {
                    return Ok(Transport::Other);
                }
                8
            }
            IPPROTO_AH => (len as usize + 2) * 4,
            _ => (len as usize + 1) * 8,
        };
        next_header = following;
        header_start += header_len;
        if header_start > ip_end {
            return Err(Malformed);
        }
    }
    Ok(Transport::Other)
}

#[inline(always)]
fn is_l7_port(port: u16) -> bool {
    // SAFETY: the value is only tested for presence.
    unsafe { L7_PORTS.get(&port).is_some() }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<Class, Malformed> {
    let eth: EthHdr = read_at(ctx, 0)?;
    let mut offset = EthHdr::LEN;
    let mut ether_type = u16::from_be(eth.ether_type);
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let vlan: VlanHdr = read_at(ctx, offset)?;
        ether_type = u16::from_be(vlan.ether_type);
        offset += VlanHdr::LEN;
    }
    let transport = match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, offset)?,
        ETH_P_IPV6 => parse_ipv6(ctx, offset)?,
        _ => Transport::Other,
    };
    Ok(match transport {
        Transport::Tcp { dst_port } if is_l7_port(dst_port) => Class::L7,
        Transport::Tcp { .. } | Transport::Udp | Transport::Other => Class::Other,
    })
}

#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    let bytes = frame_len(&ctx);
    count(Stat::Received, bytes);
    let class = classify(&ctx).unwrap_or_else(|Malformed| {
        debug!(&ctx, "xdp: malformed frame of {} bytes passed", bytes);
        Class::Malformed
    });
    count(class.stat(), bytes);
    let verdict = xdp_action::XDP_PASS;
    count(Stat::for_verdict(verdict), bytes);
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
