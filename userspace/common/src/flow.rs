//! The connection table's types and the rules both sides apply to them: a flow's two entries,
//! its state from their latches, and when it may go. The XDP program and the daemon's sweep
//! call the same functions, so they cannot disagree about a flow.

use crate::{Ipv6Wire, NextHop, IPPROTO_TCP};

/// SNAT tuples tried for a new flow before it is dropped: the free one, or the first whose
/// holder has expired, is taken; failing both, the oldest TIME_WAIT hold seen (see
/// [`FlowState::TimeWait`]).
pub const SNAT_ATTEMPTS: u32 = 16;

/// The same for a new IPv6 flow: the verifier walks every path through the attempts, and
/// with IPv6's keys more than 8 take it past its million-instruction limit. With a share p
/// of a backend's tuples in use, a new flow is then refused with probability about p^4
/// rather than p^12 (a retransmitted SYN, after a second).
pub const SNAT_ATTEMPTS6: u32 = 8;

/// Of those, how many follow this CPU's walk over the tuples; the rest are picked at random.
pub const SNAT_WALK_ATTEMPTS: u32 = 4;

/// Most SNAT addresses a node can use (`[L4] SNATAddresses`).
pub const MAX_SNAT_ADDRS: usize = 16;

/// An entry whose peer is missing is taken for an orphan (and removed, by a colliding new
/// flow or by the sweep) only once it is this old: a new flow's reply entry goes in a moment
/// before its forward entry, and another CPU may look at it in between.
pub const HALF_PAIR_GRACE_NS: u64 = 2_000_000_000;

/// Bytes of flow keys the sweep hands the XDP program's `xlb_sweep` / `xlb_sweep6` in one
/// `BPF_PROG_TEST_RUN`, as the frame: an XDP test frame holds at most a page less the headroom
/// and the `skb_shared_info` (3 520 bytes).
pub const SWEEP_FRAME_BYTES: usize = 3200;

/// Keys of `key_size` bytes in one sweep frame: 200 IPv4 keys, 80 IPv6 ones.
pub const fn sweep_keys_per_run(key_size: usize) -> usize {
    SWEEP_FRAME_BYTES / key_size
}

/// `xlb_sweep`'s return value: flows removed, plus half pairs removed times this.
pub const SWEEP_HALF_PAIRS_UNIT: u32 = 1 << 16;

/// A flow entry's `last_seen_ns` is rewritten only when it is older than this: an established
/// flow's packets then write nothing to the shared table but once a second (timeouts are
/// seconds long, so the coarser age costs nothing).
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// How long a flow in each [`FlowState`] may stay idle before its entries may be removed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_handshake_ns: u64,
    pub tcp_established_ns: u64,
    pub tcp_closing_ns: u64,
    pub tcp_time_wait_ns: u64,
    pub udp_ns: u64,
}

impl Timeouts {
    pub const fn for_state(&self, state: FlowState) -> u64 {
        match state {
            FlowState::Handshake => self.tcp_handshake_ns,
            FlowState::Established => self.tcp_established_ns,
            FlowState::Closing => self.tcp_closing_ns,
            FlowState::TimeWait => self.tcp_time_wait_ns,
            FlowState::Udp => self.udp_ns,
        }
    }
}

/// Where a tracked flow is in its life, from the latches of its two entries (see
/// [`FlowValue`]). The XDP program and the daemon's sweep read it through the same function,
/// so they agree on when a flow may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowState {
    /// TCP, until the client ACKs the backend's SYN-ACK: a spoofed SYN never gets further, so
    /// it is held only briefly.
    Handshake,
    Established,
    /// TCP after a RST, or FIN both ways with the client's first: the backend closed passively
    /// and holds no TIME_WAIT, so only late segments are waited for.
    Closing,
    /// TCP after FIN both ways with the backend's first: the backend's socket sits in
    /// TIME_WAIT on the SNAT tuple, which is not reused until it is over (unless every other
    /// tuple is live, see `Stat::L4SnatTimeWaitReused`).
    TimeWait,
    Udp,
}

impl FlowState {
    pub const ALL: [FlowState; 5] = [
        FlowState::Handshake,
        FlowState::Established,
        FlowState::Closing,
        FlowState::TimeWait,
        FlowState::Udp,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FlowState::Handshake => "handshake",
            FlowState::Established => "established",
            FlowState::Closing => "closing",
            FlowState::TimeWait => "time_wait",
            FlowState::Udp => "udp",
        }
    }
}

/// Key of a connection table (`FLOWS`, `FLOWS6`): a packet's 5-tuple as received (wire order).
///
/// A flow has two entries: the forward one keyed by (client → LB address:service port) and
/// the reply one keyed by (backend → LB SNAT address:SNAT port). Each one's peer key is the
/// tuple it rewrites to, reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyOf<A> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// An IPv4 flow key.
pub type FlowKey = FlowKeyOf<u32>;
/// An IPv6 flow key.
pub type FlowKey6 = FlowKeyOf<Ipv6Wire>;

impl FlowKey {
    /// The key of a 5-tuple (wire order), padding zeroed.
    ///
    /// Built as four 32-bit words: written field by field, the XDP program would fill the
    /// 3-byte padding with a call to `memset` on every packet.
    #[inline(always)]
    pub const fn new(
        src_addr: u32,
        dst_addr: u32,
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> FlowKey {
        let words = [
            src_addr,
            dst_addr,
            port_word(src_port, dst_port),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: FlowKey is `repr(C)`, 16 bytes of integers without implicit padding, the
        // fields laid out as the words are; every bit pattern is a valid FlowKey.
        unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
    }
}

impl FlowKey6 {
    /// The key of a 5-tuple (wire order), padding zeroed; built as words like
    /// [`FlowKey::new`].
    #[inline(always)]
    pub const fn new(
        src_addr: Ipv6Wire,
        dst_addr: Ipv6Wire,
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> FlowKey6 {
        let [s0, s1, s2, s3] = src_addr;
        let [d0, d1, d2, d3] = dst_addr;
        let words = [
            s0,
            s1,
            s2,
            s3,
            d0,
            d1,
            d2,
            d3,
            port_word(src_port, dst_port),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: FlowKey6 is `repr(C)`, 40 bytes of integers without implicit padding, laid
        // out as the words are; every bit pattern is valid.
        unsafe { core::mem::transmute::<[u32; 10], FlowKey6>(words) }
    }
}

impl<A: WireAddr> FlowKeyOf<A> {
    /// Overwrites the key with a 5-tuple (wire order), in place: how the XDP program builds
    /// keys in map memory, where one on its stack would not fit (an IPv6 key is 40 bytes of
    /// the 512 a call chain may use).
    #[inline(always)]
    pub fn set(&mut self, src_addr: &A, dst_addr: &A, src_port: u16, dst_port: u16, proto: u8) {
        src_addr.copy_into(&mut self.src_addr);
        dst_addr.copy_into(&mut self.dst_addr);
        self.src_port = src_port;
        self.dst_port = dst_port;
        let tail = core::ptr::addr_of_mut!(self.proto).cast::<u32>();
        // SAFETY: `proto` and the 3 padding bytes after it are the key's last 4 bytes, written
        // as one word so that no `memset` call fills the padding.
        unsafe { tail.write_unaligned(u32::from_ne_bytes([proto, 0, 0, 0])) }
    }
}

/// Two ports (wire order) as the word they make in a key or value.
#[inline(always)]
const fn port_word(first: u16, second: u16) -> u32 {
    let [a, b] = first.to_ne_bytes();
    let [c, d] = second.to_ne_bytes();
    u32::from_ne_bytes([a, b, c, d])
}

/// An IPv4 flow entry.
pub type FlowValue = FlowValueOf<u32>;
/// An IPv6 flow entry.
pub type FlowValue6 = FlowValueOf<Ipv6Wire>;

/// `FlowValue::direction` of an entry for client → backend packets.
pub const DIRECTION_FORWARD: u8 = 0;
/// `FlowValue::direction` of an entry for backend → client packets.
pub const DIRECTION_REPLY: u8 = 1;

/// Value of a connection table: how to rewrite and send packets of one direction.
///
/// The TCP progress is kept as one-way latches, one byte each, written with plain stores
/// (from 0 to 1) into both entries: two CPUs updating a flow at once can each only set what was seen, so
/// no atomic read-modify-write is needed. The one exception is `rst`, cleared again when the
/// backend keeps talking after it (a blind RST from outside, which the backend answers with a
/// challenge ACK, RFC 5961, does not close the flow). A SYN on a closed flow's tuple clears
/// them all (the client reopened it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValueOf<A> {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC to within a tick) of this direction's last
    /// packet, to within
    /// [`LAST_SEEN_GRANULARITY_NS`]. A flow is idle since the later of its two entries'.
    pub last_seen_ns: u64,
    /// The packet's new 4-tuple (wire order); reversed, it is the peer entry's key.
    pub new_src_addr: A,
    pub new_dst_addr: A,
    pub new_src_port: u16,
    pub new_dst_port: u16,
    /// Reply entries: toward the client. Forward entries read theirs from `BACKENDS`.
    pub next_hop: NextHop,
    pub service_slot: u32,
    pub backend_id: u32,
    /// [`DIRECTION_FORWARD`] or [`DIRECTION_REPLY`].
    pub direction: u8,
    /// TCP: the backend answered the SYN (SYN-ACK seen).
    pub answered: u8,
    /// TCP: the client ACKed after the backend's SYN-ACK.
    pub established: u8,
    pub fin_from_client: u8,
    pub fin_from_backend: u8,
    /// TCP: the backend's FIN came while the client had sent none.
    pub backend_closed_first: u8,
    /// TCP: a RST was seen and the backend has not sent anything since.
    pub rst: u8,
    pub _pad: u8,
    /// `Backend::generation` of `backend_id` when the flow was created.
    pub backend_generation: u32,
}

impl<A: WireAddr> FlowValueOf<A> {
    /// Makes this a new flow's entry for one direction, every latch clear, in place: how the
    /// XDP program builds entries in map memory, off its stack.
    ///
    /// Written word by word: field by field, the latches and the MACs would be filled by
    /// calls to a byte-looping `memset` and to `memmove`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub fn init(
        &mut self,
        last_seen_ns: u64,
        (new_src_addr, new_src_port): (&A, u16),
        (new_dst_addr, new_dst_port): (&A, u16),
        next_hop: &NextHop,
        service_slot: u32,
        backend_id: u32,
        direction: u8,
        backend_generation: u32,
    ) {
        self.last_seen_ns = last_seen_ns;
        new_src_addr.copy_into(&mut self.new_src_addr);
        new_dst_addr.copy_into(&mut self.new_dst_addr);
        self.new_src_port = new_src_port;
        self.new_dst_port = new_dst_port;
        self.next_hop.ifindex = next_hop.ifindex;
        copy_mac(&mut self.next_hop.src_mac, &next_hop.src_mac);
        copy_mac(&mut self.next_hop.dst_mac, &next_hop.dst_mac);
        self.service_slot = service_slot;
        self.backend_id = backend_id;
        let latches = core::ptr::addr_of_mut!(self.direction).cast::<[u32; 2]>();
        // SAFETY: `direction`, the seven latches and `_pad` are eight bytes in a row.
        unsafe { latches.write_unaligned([u32::from_ne_bytes([direction, 0, 0, 0]), 0]) };
        self.backend_generation = backend_generation;
    }

    /// Writes the key of the entry for the other direction into `key`, in place (see
    /// [`FlowKeyOf::set`]).
    #[inline(always)]
    pub fn write_peer_key(&self, key: &mut FlowKeyOf<A>, proto: u8) {
        key.set(
            &self.new_dst_addr,
            &self.new_src_addr,
            self.new_dst_port,
            self.new_src_port,
            proto,
        );
    }

    /// Is `key` (of this entry's protocol) the key of the entry for the other direction? The
    /// same as `self.peer_key(key.proto) == *key`, without building the key or a branch per
    /// word.
    #[inline(always)]
    pub fn is_peer_of(&self, key: &FlowKeyOf<A>) -> bool {
        let diff = self.new_dst_addr.diff(&key.src_addr)
            | self.new_src_addr.diff(&key.dst_addr)
            | u32::from(self.new_dst_port ^ key.src_port)
            | u32::from(self.new_src_port ^ key.dst_port);
        diff == 0
    }

    /// The key of the entry for the other direction.
    #[inline(always)]
    pub fn peer_key(&self, proto: u8) -> FlowKeyOf<A> {
        A::flow_key(
            self.new_dst_addr,
            self.new_src_addr,
            self.new_dst_port,
            self.new_src_port,
            proto,
        )
    }
}

/// An address family's address as the datapath stores it: a `u32` for IPv4, [`Ipv6Wire`] for
/// IPv6. The connection table, services and backends are generic over it, and each family
/// has maps of its own, so IPv4 keys stay 16 bytes.
pub trait WireAddr: Copy + Default + PartialEq + Eq + core::hash::Hash + core::fmt::Debug {
    /// The unspecified address: a free backend id holds it.
    const UNSPECIFIED: Self;

    fn flow_key(src: Self, dst: Self, src_port: u16, dst_port: u16, proto: u8) -> FlowKeyOf<Self>;

    /// Zero when the two addresses are the same; computed without a branch, so that the XDP
    /// verifier walks one path through a key comparison, not one per word.
    fn diff(&self, other: &Self) -> u32;

    /// `*dst = *self`, word by word: as one assignment between two maps' memory, the XDP
    /// program would copy an IPv6 address with a byte-looping `memmove`, which the verifier
    /// walks byte by byte.
    fn copy_into(&self, dst: &mut Self);
}

/// Copies a MAC address as a 32-bit and a 16-bit store: a 6-byte array assignment would be a
/// call to `memmove` in the XDP program.
#[inline(always)]
pub fn copy_mac(dst: &mut [u8; 6], mac: &[u8; 6]) {
    let head = u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]);
    let tail = u16::from_ne_bytes([mac[4], mac[5]]);
    let dst = dst.as_mut_ptr();
    // SAFETY: `dst` is valid for 6 bytes; unaligned stores.
    unsafe {
        dst.cast::<u32>().write_unaligned(head);
        dst.add(4).cast::<u16>().write_unaligned(tail);
    }
}

impl WireAddr for u32 {
    const UNSPECIFIED: u32 = 0;

    #[inline(always)]
    fn flow_key(src: u32, dst: u32, src_port: u16, dst_port: u16, proto: u8) -> FlowKey {
        FlowKey::new(src, dst, src_port, dst_port, proto)
    }

    #[inline(always)]
    fn diff(&self, other: &u32) -> u32 {
        self ^ other
    }

    #[inline(always)]
    fn copy_into(&self, dst: &mut u32) {
        *dst = *self;
    }
}

impl WireAddr for Ipv6Wire {
    const UNSPECIFIED: Ipv6Wire = [0; 4];

    #[inline(always)]
    fn flow_key(src: Ipv6Wire, dst: Ipv6Wire, src_port: u16, dst_port: u16, proto: u8) -> FlowKey6 {
        FlowKey6::new(src, dst, src_port, dst_port, proto)
    }

    #[inline(always)]
    fn diff(&self, other: &Ipv6Wire) -> u32 {
        (self[0] ^ other[0]) | (self[1] ^ other[1]) | (self[2] ^ other[2]) | (self[3] ^ other[3])
    }

    #[inline(always)]
    fn copy_into(&self, dst: &mut Ipv6Wire) {
        dst[0] = self[0];
        dst[1] = self[1];
        dst[2] = self[2];
        dst[3] = self[3];
    }
}

/// The state of the flow whose entries are `entry` and `peer` (either order), for a packet
/// or entry of protocol `proto`. Latches are read from both: a CPU that set one entry's and
/// not yet the other's has still seen it.
#[inline(always)]
pub const fn flow_state<A>(proto: u8, entry: &FlowValueOf<A>, peer: &FlowValueOf<A>) -> FlowState {
    if proto != IPPROTO_TCP {
        return FlowState::Udp;
    }
    if either(entry.rst, peer.rst) {
        return FlowState::Closing;
    }
    let fins = either(entry.fin_from_client, peer.fin_from_client)
        && either(entry.fin_from_backend, peer.fin_from_backend);
    if fins {
        return if either(entry.backend_closed_first, peer.backend_closed_first) {
            FlowState::TimeWait
        } else {
            FlowState::Closing
        };
    }
    if either(entry.established, peer.established) {
        FlowState::Established
    } else {
        FlowState::Handshake
    }
}

/// Is a latch set in either entry?
#[inline(always)]
const fn either(entry_latch: u8, peer_latch: u8) -> bool {
    entry_latch | peer_latch != 0
}

/// When the flow of `entry` and `peer` last carried a packet.
#[inline(always)]
pub const fn flow_last_seen<A>(entry: &FlowValueOf<A>, peer: &FlowValueOf<A>) -> u64 {
    if entry.last_seen_ns > peer.last_seen_ns {
        entry.last_seen_ns
    } else {
        peer.last_seen_ns
    }
}

/// Has the flow of `entry` and `peer` been idle past its state's timeout at `now`?
/// `timeout` gives a state's timeout (the XDP program reads each from its global settings,
/// userspace from [`Timeouts::for_state`]).
#[inline(always)]
pub fn flow_expired<A>(
    timeout: impl Fn(FlowState) -> u64,
    proto: u8,
    entry: &FlowValueOf<A>,
    peer: &FlowValueOf<A>,
    now: u64,
) -> bool {
    let timeout = timeout(flow_state(proto, entry, peer));
    now.saturating_sub(flow_last_seen(entry, peer)) > timeout
}
