//! Bounds-checked header access and the parse: Ethernet (one VLAN tag) → IPv4 / IPv6 (extension
//! headers walked) → TCP / UDP. A header that is cut short or contradicts itself makes the whole
//! frame [`Malformed`].

use core::mem;

use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use xlb_common::{Ipv6Wire, IPPROTO_TCP, IPPROTO_UDP};

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_IPV6_EXT_HEADERS: usize = 6;

/// The IPv4 "more fragments" bit, in `frag_flags()`.
const IPV4_MORE_FRAGMENTS: u8 = 0b001;

/// A header was cut short or contradicts itself: the frame is counted as malformed.
pub struct Malformed;

/// Source and destination ports, as on the wire (see `xlb_common::wire_port`).
#[derive(Clone, Copy, Default)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// TCP flags the connection table acts on.
#[derive(Clone, Copy, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

// The parse results are plain structs with a kind field rather than Rust enums with payloads:
// LLVM leaves an unused payload uninitialised and may copy it as a whole, and the verifier
// refuses any read of an uninitialised register or stack slot.

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Tcp,
    Udp,
    /// No transport header to read: another protocol, or a non-first fragment.
    Other,
}

/// What the transport layer of a well-formed frame turned out to be; `ports` and `flags` are
/// zero unless they were read.
#[derive(Clone, Copy)]
pub struct Transport {
    pub kind: TransportKind,
    pub ports: Ports,
    pub flags: TcpFlags,
}

impl Transport {
    const OTHER: Transport = Transport {
        kind: TransportKind::Other,
        ports: Ports { src: 0, dst: 0 },
        flags: TcpFlags {
            syn: false,
            ack: false,
            fin: false,
            rst: false,
        },
    };
}

/// The parts of an IP header the L4 path reads; addresses as on the wire.
#[derive(Clone, Copy, Default)]
pub struct IpHeader<A> {
    pub offset: usize,
    pub src: A,
    pub dst: A,
    /// The transport protocol (for IPv6, the header the extension headers lead to).
    pub proto: u8,
    /// The TTL, or IPv6's hop limit.
    pub ttl: u8,
    /// A fragment, first or later: its ports cannot be rewritten consistently.
    pub fragment: bool,
    /// Where the transport header starts.
    pub transport_offset: usize,
}

pub type Ipv4 = IpHeader<u32>;
pub type Ipv6 = IpHeader<Ipv6Wire>;

/// An IPv6 header as the parse leaves it: all but the addresses, which only the L4 path reads
/// (in a stack frame of its own: 32 more bytes in the program's first frame would not fit).
pub type Ipv6Parsed = IpHeader<()>;

impl Ipv6Parsed {
    /// The header with its addresses, read from the frame.
    #[inline(always)]
    pub fn with_addresses(&self, ctx: &XdpContext) -> Result<Ipv6, Malformed> {
        Ok(Ipv6 {
            offset: self.offset,
            src: read_at(ctx, self.offset + mem::offset_of!(Ipv6Hdr, src_addr))?,
            dst: read_at(ctx, self.offset + mem::offset_of!(Ipv6Hdr, dst_addr))?,
            proto: self.proto,
            ttl: self.ttl,
            fragment: self.fragment,
            transport_offset: self.transport_offset,
        })
    }
}

/// The first eight bytes of an IPv6 header: all the parse reads of it.
const IPV6_FIXED_LEN: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NetworkKind {
    /// IPv4 in an untagged frame: the L4 path may rewrite it.
    Ipv4,
    /// IPv4 inside a VLAN tag: classified, never rewritten.
    TaggedIpv4,
    /// IPv6 in an untagged frame: the L4 path may rewrite it.
    Ipv6,
    /// IPv6 inside a VLAN tag: classified, never rewritten.
    TaggedIpv6,
    Other,
}

pub struct Frame {
    pub network: NetworkKind,
    /// Zeroed unless `network` is an IPv4 kind.
    pub ipv4: Ipv4,
    /// Zeroed unless `network` is an IPv6 kind.
    pub ipv6: Ipv6Parsed,
    pub transport: Transport,
}

/// A pointer to a `T` at `offset` bytes into the frame, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// Reads a `T` at `offset`; `T` must be a plain byte-array header (alignment 1).
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, Malformed> {
    // SAFETY: `ptr_at` checked that the bytes are inside the frame; the read is unaligned.
    ptr_at::<T>(ctx, offset).map(|ptr| unsafe { ptr.read_unaligned() })
}

/// The frame's length from its start, as the bound for an IP packet's declared length.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// A TCP header at `offset` that must end by `ip_end`, the end of its IP packet.
#[inline(always)]
fn parse_tcp(ctx: &XdpContext, offset: usize, ip_end: usize) -> Result<Transport, Malformed> {
    let tcp: TcpHdr = read_at(ctx, offset)?;
    let header_len = tcp.doff() as usize * 4;
    if header_len < TcpHdr::LEN || offset + header_len > ip_end {
        return Err(Malformed);
    }
    Ok(Transport {
        kind: TransportKind::Tcp,
        ports: Ports {
            src: u16::from_ne_bytes(tcp.source),
            dst: u16::from_ne_bytes(tcp.dest),
        },
        flags: TcpFlags {
            syn: tcp.syn() != 0,
            ack: tcp.ack() != 0,
            fin: tcp.fin() != 0,
            rst: tcp.rst() != 0,
        },
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
    Ok(Transport {
        kind: TransportKind::Udp,
        ports: Ports {
            src: u16::from_ne_bytes(udp.src),
            dst: u16::from_ne_bytes(udp.dst),
        },
        flags: TcpFlags::default(),
    })
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
        _ => Ok(Transport::OTHER),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<(Ipv4, Transport), Malformed> {
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
    let later_fragment = ip.frag_offset() != 0;
    let header = Ipv4 {
        offset,
        src: u32::from_ne_bytes(ip.src_addr),
        dst: u32::from_ne_bytes(ip.dst_addr),
        proto: ip.proto,
        ttl: ip.ttl,
        fragment: later_fragment || ip.frag_flags() & IPV4_MORE_FRAGMENTS != 0,
        transport_offset: offset + header_len,
    };
    if later_fragment {
        return Ok((header, Transport::OTHER));
    }
    let transport = parse_transport(ctx, ip.proto, offset + header_len, offset + total_len)?;
    Ok((header, transport))
}

/// The header, with the transport protocol its extension headers lead to, and the transport
/// header.
#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<(Ipv6Parsed, Transport), Malformed> {
    let [version_class, _, _, _, len_high, len_low, next_header, hop_limit]: [u8; IPV6_FIXED_LEN] =
        read_at(ctx, offset)?;
    let ip_end = offset + Ipv6Hdr::LEN + usize::from(u16::from_be_bytes([len_high, len_low]));
    if version_class >> 4 != 6 || ip_end > frame_len(ctx) {
        return Err(Malformed);
    }
    let mut header = Ipv6Parsed {
        offset,
        src: (),
        dst: (),
        proto: next_header,
        ttl: hop_limit,
        fragment: false,
        transport_offset: offset + Ipv6Hdr::LEN,
    };
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        // Every extension header starts with (next header, length); only the unit differs.
        let [following, len] = match header.proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT => {
                read_at::<[u8; 2]>(ctx, header.transport_offset)?
            }
            _ => {
                let transport =
                    parse_transport(ctx, header.proto, header.transport_offset, ip_end)?;
                return Ok((header, transport));
            }
        };
        let header_len = match header.proto {
            IPPROTO_FRAGMENT => {
                let fragment: [u8; 8] = read_at(ctx, header.transport_offset)?;
                header.fragment = true;
                if u16::from_be_bytes([fragment[2], fragment[3]]) >> 3 != 0 {
                    header.proto = following;
                    return Ok((header, Transport::OTHER));
                }
                8
            }
            IPPROTO_AH => (len as usize + 2) * 4,
            _ => (len as usize + 1) * 8,
        };
        header.proto = following;
        header.transport_offset += header_len;
        if header.transport_offset > ip_end {
            return Err(Malformed);
        }
    }
    Ok((header, Transport::OTHER))
}

/// Parses the frame down to its transport header.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Frame, Malformed> {
    let eth: EthHdr = read_at(ctx, 0)?;
    let mut offset = EthHdr::LEN;
    let mut ether_type = u16::from_be(eth.ether_type);
    let tagged = ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD;
    if tagged {
        let vlan: VlanHdr = read_at(ctx, offset)?;
        ether_type = u16::from_be(vlan.ether_type);
        offset += VlanHdr::LEN;
    }
    let mut frame = Frame {
        network: NetworkKind::Other,
        ipv4: Ipv4::default(),
        ipv6: Ipv6Parsed::default(),
        transport: Transport::OTHER,
    };
    match ether_type {
        ETH_P_IPV4 => {
            let (ip, transport) = parse_ipv4(ctx, offset)?;
            frame.network = if tagged {
                NetworkKind::TaggedIpv4
            } else {
                NetworkKind::Ipv4
            };
            frame.ipv4 = ip;
            frame.transport = transport;
        }
        ETH_P_IPV6 => {
            let (ip, transport) = parse_ipv6(ctx, offset)?;
            frame.network = if tagged {
                NetworkKind::TaggedIpv6
            } else {
                NetworkKind::Ipv6
            };
            frame.ipv6 = ip;
            frame.transport = transport;
        }
        _ => {}
    }
    Ok(frame)
}
