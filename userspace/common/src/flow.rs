//! The connection table's types and the rules both sides apply to them: a flow's two entries,
//! its state from their latches, and when it may go. The XDP program and the daemon's sweep
//! call the same functions, so they cannot disagree about a flow.

use crate::{NextHop, IPPROTO_TCP};

/// SNAT tuples tried for a new flow before it is dropped: the free one, or the first whose
/// holder has expired, is taken; failing both, the oldest TIME_WAIT hold seen (see
/// [`FlowState::TimeWait`]).
pub const SNAT_ATTEMPTS: u32 = 16;

/// Of those, how many follow this CPU's walk over the tuples; the rest are picked at random.
pub const SNAT_WALK_ATTEMPTS: u32 = 4;

/// Most SNAT addresses a node can use (`[L4] SNATAddresses`).
pub const MAX_SNAT_ADDRS: usize = 16;

/// An entry whose peer is missing is taken for an orphan (and removed, by a colliding new
/// flow or by the sweep) only once it is this old: a new flow's reply entry goes in a moment
/// before its forward entry, and another CPU may look at it in between.
pub const HALF_PAIR_GRACE_NS: u64 = 2_000_000_000;

/// Flow keys the sweep hands the XDP program's `xlb_sweep` in one `BPF_PROG_TEST_RUN`, as the
/// frame's bytes: an XDP test frame holds at most a page less the headroom and the
/// `skb_shared_info` (3 520 bytes), and this many keys take 3 200.
pub const SWEEP_KEYS_PER_RUN: usize = 200;

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

/// Key of the `FLOWS` connection table: a packet's 5-tuple as received (wire order).
///
/// A flow has two entries: the forward one keyed by (client → LB address:service port) and
/// the reply one keyed by (backend → LB SNAT address:SNAT port). Each one's peer key is the
/// tuple it rewrites to, reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

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
        let [s0, s1] = src_port.to_ne_bytes();
        let [d0, d1] = dst_port.to_ne_bytes();
        let words = [
            src_addr,
            dst_addr,
            u32::from_ne_bytes([s0, s1, d0, d1]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: FlowKey is `repr(C)`, 16 bytes of integers without implicit padding, the
        // fields laid out as the words are; every bit pattern is a valid FlowKey.
        unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
    }

    /// The key of packets travelling the other way.
    #[inline(always)]
    pub const fn reversed(&self) -> FlowKey {
        FlowKey::new(
            self.dst_addr,
            self.src_addr,
            self.dst_port,
            self.src_port,
            self.proto,
        )
    }
}

/// `FlowValue::direction` of an entry for client → backend packets.
pub const DIRECTION_FORWARD: u8 = 0;
/// `FlowValue::direction` of an entry for backend → client packets.
pub const DIRECTION_REPLY: u8 = 1;

/// Value of the `FLOWS` connection table: how to rewrite and send packets of one direction.
///
/// The TCP progress is kept as one-way latches, one byte each, written with plain stores
/// (from 0 to 1) into both entries: two CPUs updating a flow at once can each only set what was seen, so
/// no atomic read-modify-write is needed. The one exception is `rst`, cleared again when the
/// backend keeps talking after it (a blind RST from outside, which the backend answers with a
/// challenge ACK, RFC 5961, does not close the flow). A SYN on a closed flow's tuple clears
/// them all (the client reopened it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC to within a tick) of this direction's last
    /// packet, to within
    /// [`LAST_SEEN_GRANULARITY_NS`]. A flow is idle since the later of its two entries'.
    pub last_seen_ns: u64,
    /// The packet's new 4-tuple (wire order); reversed, it is the peer entry's key.
    pub new_src_addr: u32,
    pub new_dst_addr: u32,
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

impl FlowValue {
    /// A new flow's entry for one direction: every latch clear, last seen at `last_seen_ns`.
    ///
    /// Built as fourteen 32-bit words, like [`FlowKey::new`]: field by field, the XDP program
    /// would clear the latches with a call to a byte-looping `memset` on every new flow.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub const fn new(
        last_seen_ns: u64,
        (new_src_addr, new_src_port): (u32, u16),
        (new_dst_addr, new_dst_port): (u32, u16),
        next_hop: &NextHop,
        service_slot: u32,
        backend_id: u32,
        direction: u8,
        backend_generation: u32,
    ) -> FlowValue {
        let [s0, s1] = new_src_port.to_ne_bytes();
        let [d0, d1] = new_dst_port.to_ne_bytes();
        let [m0, m1, m2, m3, m4, m5] = next_hop.src_mac;
        let [n0, n1, n2, n3, n4, n5] = next_hop.dst_mac;
        let [t0, t1, t2, t3, t4, t5, t6, t7] = last_seen_ns.to_ne_bytes();
        let words: [u32; 14] = [
            u32::from_ne_bytes([t0, t1, t2, t3]),
            u32::from_ne_bytes([t4, t5, t6, t7]),
            new_src_addr,
            new_dst_addr,
            u32::from_ne_bytes([s0, s1, d0, d1]),
            next_hop.ifindex,
            u32::from_ne_bytes([m0, m1, m2, m3]),
            u32::from_ne_bytes([m4, m5, n0, n1]),
            u32::from_ne_bytes([n2, n3, n4, n5]),
            service_slot,
            backend_id,
            u32::from_ne_bytes([direction, 0, 0, 0]),
            0,
            backend_generation,
        ];
        // SAFETY: FlowValue is `repr(C)`, 56 bytes of integers and byte arrays without
        // implicit padding, laid out as the words are; every bit pattern is valid.
        unsafe { core::mem::transmute::<[u32; 14], FlowValue>(words) }
    }

    /// The key of the entry for the other direction.
    #[inline(always)]
    pub const fn peer_key(&self, proto: u8) -> FlowKey {
        FlowKey::new(
            self.new_dst_addr,
            self.new_src_addr,
            self.new_dst_port,
            self.new_src_port,
            proto,
        )
    }
}

/// The state of the flow whose entries are `entry` and `peer` (either order), for a packet
/// or entry of protocol `proto`. Latches are read from both: a CPU that set one entry's and
/// not yet the other's has still seen it.
#[inline(always)]
pub const fn flow_state(proto: u8, entry: &FlowValue, peer: &FlowValue) -> FlowState {
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
pub const fn flow_last_seen(entry: &FlowValue, peer: &FlowValue) -> u64 {
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
pub fn flow_expired(
    timeout: impl Fn(FlowState) -> u64,
    proto: u8,
    entry: &FlowValue,
    peer: &FlowValue,
    now: u64,
) -> bool {
    let timeout = timeout(flow_state(proto, entry, peer));
    now.saturating_sub(flow_last_seen(entry, peer)) > timeout
}
