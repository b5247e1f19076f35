//! Seeded fuzzing of the XDP program through BPF_PROG_TEST_RUN: random, structured and mutated
//! frames, some aimed at the L4 services and at the SNAT ports of flows the program is tracking.
//!
//! For every frame: the verdict is PASS, DROP, TX or REDIRECT; a passed or dropped frame is
//! untouched; only frames to an L4 service (and only those may be dropped) or backend replies to
//! a tracked flow are rewritten; a rewritten frame goes to a configured endpoint from the LB's
//! SNAT address, or back to the tracked client from the service's address, and when its input
//! had valid checksums (checked by etherparse) so does the output.
//!
//! `XLB_FUZZ_FRAMES` (default 100 000) and `XLB_FUZZ_SEED` (default fixed) make longer or other
//! runs; `cargo xtask fuzz-xdp --frames N [--seed S]` sets them. A failure names the seed and
//! the frame's index, so it replays exactly.

mod xdp_support;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use fastrand::Rng;
use xdp_support::*;
use xlb::{dataplane::Dataplane, l4::settings::SnatPorts};

const DEFAULT_FRAMES: usize = 100_000;
const DEFAULT_SEED: u64 = 0x0786_1b5e_ed00_0001;

const SNAT_FIRST: u16 = 61000;
const SNAT_LAST: u16 = 61999;
const UNUSED_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 9);
const ENDPOINTS: [SocketAddrV4; 2] = [BACKEND_A, BACKEND_B];

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// What the program was asked to track: a reply to (backend, SNAT port, protocol) goes to
/// (client, service port).
#[derive(Default)]
struct Tracked {
    replies: HashMap<(SocketAddrV4, u16, u8), (SocketAddrV4, u16)>,
}

/// A transport header of the input as etherparse reads it, if the frame is a well-formed
/// untagged IPv4 TCP/UDP packet.
struct Input {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    proto: u8,
    checksums_valid: bool,
}

fn read_input(frame: &[u8]) -> Option<Input> {
    let headers = PacketHeaders::from_ethernet_slice(frame).ok()?;
    if !headers.link_exts.is_empty() {
        return None;
    }
    let Some(NetHeaders::Ipv4(ip, _)) = &headers.net else {
        return None;
    };
    let (src_port, dst_port) = match &headers.transport {
        Some(TransportHeader::Tcp(tcp)) => (tcp.source_port, tcp.destination_port),
        Some(TransportHeader::Udp(udp)) => (udp.source_port, udp.destination_port),
        _ => return None,
    };
    Some(Input {
        src: SocketAddrV4::new(ip.source.into(), src_port),
        dst: SocketAddrV4::new(ip.destination.into(), dst_port),
        proto: ip.protocol.0,
        checksums_valid: inspect(frame).is_ok(),
    })
}

fn is_service(dst: SocketAddrV4, proto: u8) -> bool {
    *dst.ip() == LB_ADDR
        && [TCP_SERVICE, UDP_SERVICE]
            .iter()
            .any(|service| service.port == dst.port() && service.protocol.number() == proto)
}

struct Generator {
    rng: Rng,
    /// Frames the program sent to backends, to answer as the backend would.
    to_backends: Vec<(SocketAddrV4, SocketAddrV4, u8)>,
}

impl Generator {
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.usize(..items.len())]
    }

    fn address(&mut self) -> Ipv4Addr {
        match self.rng.u8(..4) {
            0 => LB_ADDR,
            1 => SNAT_ADDR,
            2 => UNUSED_ADDR,
            _ => Ipv4Addr::from(self.rng.u32(..)),
        }
    }

    fn port(&mut self) -> u16 {
        match self.rng.u8(..5) {
            0 => TCP_SERVICE.port,
            1 => UDP_SERVICE.port,
            2 => self.rng.u16(SNAT_FIRST..=SNAT_LAST),
            _ => self.rng.u16(..),
        }
    }

    /// A well-formed frame: mostly clients of the services (from a few addresses and ports, so
    /// flows recur), sometimes a backend answering a flow the program opened.
    fn structured(&mut self) -> Vec<u8> {
        let payload: Vec<u8> = (0..self.rng.usize(..48)).map(|_| self.rng.u8(..)).collect();
        let ttl = if self.rng.u8(..10) == 0 {
            self.rng.u8(..3)
        } else {
            64
        };
        let (src, dst, udp) = if !self.to_backends.is_empty() && self.rng.bool() {
            let (snat, backend, proto) = self.pick(&self.to_backends.clone());
            (backend, snat, proto == 17)
        } else {
            let client = SocketAddrV4::new(
                Ipv4Addr::new(10, 77, 1, 100 + self.rng.u8(..4)),
                40000 + self.rng.u16(..8),
            );
            let dst = SocketAddrV4::new(self.address(), self.port());
            (client, dst, self.rng.bool())
        };
        let macs = (CLIENT_MAC, LB_FRONT_MAC);
        let ethernet = PacketBuilder::ethernet2(macs.0, macs.1);
        let ip = if self.rng.u8(..20) == 0 {
            ethernet
                .single_vlan(etherparse::VlanId::try_new(5).unwrap())
                .ipv4(src.ip().octets(), dst.ip().octets(), ttl)
        } else {
            ethernet.ipv4(src.ip().octets(), dst.ip().octets(), ttl)
        };
        let mut frame = Vec::new();
        if udp {
            ip.udp(src.port(), dst.port())
                .write(&mut frame, &payload)
                .unwrap();
        } else {
            let mut tcp = ip.tcp(src.port(), dst.port(), self.rng.u32(..), 64240);
            let flags = self.rng.u8(..);
            if flags & 1 != 0 {
                tcp = tcp.syn();
            }
            if flags & 2 != 0 {
                tcp = tcp.ack(self.rng.u32(..));
            }
            if flags & 4 != 0 && self.rng.u8(..8) == 0 {
                tcp = tcp.fin();
            }
            if flags & 8 != 0 && self.rng.u8(..8) == 0 {
                tcp = tcp.rst();
            }
            tcp.write(&mut frame, &payload).unwrap();
        }
        if self.rng.u8(..10) == 0 {
            frame.extend((0..self.rng.usize(1..8)).map(|_| self.rng.u8(..)));
        }
        frame
    }

    /// A structured frame with a few bytes changed, cut short, or pure noise.
    fn frame(&mut self) -> Vec<u8> {
        match self.rng.u8(..10) {
            0..=4 => self.structured(),
            5..=7 => {
                let mut frame = self.structured();
                for _ in 0..self.rng.usize(1..4) {
                    let at = self.rng.usize(..frame.len());
                    frame[at] = self.rng.u8(..);
                }
                frame
            }
            8 => {
                let mut frame = self.structured();
                frame.truncate(self.rng.usize(14..=frame.len()));
                frame
            }
            _ => {
                let len = self.rng.usize(14..128);
                (0..len).map(|_| self.rng.u8(..)).collect()
            }
        }
    }
}

fn fuzz_dataplane() -> Dataplane {
    let endpoints: Vec<_> = ENDPOINTS
        .iter()
        .map(|endpoint| backend(*endpoint, INGRESS_IFINDEX))
        .collect();
    dataplane(
        &settings(SnatPorts::new(SNAT_FIRST, SNAT_LAST).unwrap()),
        &[
            service(TCP_SERVICE, endpoints.clone()),
            service(UDP_SERVICE, endpoints),
        ],
    )
}

#[test]
fn random_and_mutated_frames_keep_the_invariants() {
    let frames = env_number("XLB_FUZZ_FRAMES", DEFAULT_FRAMES as u64) as usize;
    let seed = env_number("XLB_FUZZ_SEED", DEFAULT_SEED);
    eprintln!("xdp fuzz: {frames} frames, seed {seed} (XLB_FUZZ_SEED={seed} replays it)");
    let mut dataplane = fuzz_dataplane();
    let mut generator = Generator {
        rng: Rng::with_seed(seed),
        to_backends: Vec::new(),
    };
    let mut tracked = Tracked::default();
    let mut rewritten = 0;
    for index in 0..frames {
        let frame = generator.frame();
        let (verdict, out) = run(&mut dataplane, &frame);
        let context = || format!("seed {seed}, frame {index}: {frame:02x?}");
        match verdict {
            XDP_PASS | XDP_DROP => {
                assert_eq!(
                    out,
                    frame,
                    "a passed or dropped frame is untouched; {}",
                    context()
                );
                if verdict == XDP_DROP {
                    let input = read_input(&frame);
                    assert!(
                        input.is_some_and(|input| is_service(input.dst, input.proto)),
                        "only frames to a service are dropped; {}",
                        context()
                    );
                }
            }
            XDP_TX | XDP_REDIRECT => {
                rewritten += 1;
                let input = read_input(&frame)
                    .unwrap_or_else(|| panic!("rewrote a frame etherparse rejects; {}", context()));
                let output = match inspect(&out) {
                    Ok(output) => output,
                    Err(error) => {
                        assert!(
                            !input.checksums_valid,
                            "valid checksums in, {error} out; {}",
                            context()
                        );
                        continue;
                    }
                };
                if is_service(input.dst, input.proto) {
                    assert!(
                        ENDPOINTS.contains(&output.dst),
                        "to {} ; {}",
                        output.dst,
                        context()
                    );
                    assert_eq!(*output.src.ip(), SNAT_ADDR, "{}", context());
                    assert!(
                        (SNAT_FIRST..=SNAT_LAST).contains(&output.src.port()),
                        "{}",
                        context()
                    );
                    tracked.replies.insert(
                        (output.dst, output.src.port(), input.proto),
                        (input.src, input.dst.port()),
                    );
                    generator
                        .to_backends
                        .push((output.src, output.dst, input.proto));
                    if generator.to_backends.len() > 64 {
                        generator.to_backends.remove(0);
                    }
                } else {
                    let key = (input.src, input.dst.port(), input.proto);
                    let (client, service_port) =
                        tracked.replies.get(&key).copied().unwrap_or_else(|| {
                            panic!("rewrote an untracked, non-service frame; {}", context())
                        });
                    assert_eq!(*input.dst.ip(), SNAT_ADDR, "{}", context());
                    assert_eq!(output.dst, client, "{}", context());
                    assert_eq!(
                        output.src,
                        SocketAddrV4::new(LB_ADDR, service_port),
                        "{}",
                        context()
                    );
                }
            }
            other => panic!("verdict {other}; {}", context()),
        }
    }
    eprintln!("xdp fuzz: {rewritten} of {frames} frames rewritten");
    assert!(
        rewritten > frames / 20,
        "the generator must reach the L4 path often"
    );
}

/// A seeded churn of TCP and UDP flows over a small table and few SNAT tuples, with time
/// advanced past every timeout now and then and the sweep run in between: flows are created,
/// closed, reset, reopened, expired, reclaimed and refused. Whatever happens:
/// - a TCP segment without SYN is forwarded only on its flow's own tuple and backend, which
///   no other client holds (a tracked flow keeps its backend; no SNAT tuple is shared);
/// - a backend's packet to a SNAT tuple goes only to the client that holds the tuple.
#[test]
fn churning_flows_keep_their_backend_and_never_share_a_snat_tuple() {
    use std::time::Duration;

    let frames = env_number("XLB_FUZZ_FRAMES", DEFAULT_FRAMES as u64) as usize / 2;
    let seed = env_number("XLB_FUZZ_SEED", DEFAULT_SEED);
    let mut rng = Rng::with_seed(seed);
    let mut settings = settings(SnatPorts::new(SNAT_FIRST, SNAT_FIRST + 31).unwrap());
    settings.flow_entries = 128;
    let short = Duration::from_millis(20);
    (
        settings.tcp_handshake,
        settings.tcp_closing,
        settings.udp_idle,
    ) = (short, short, short);
    settings.tcp_time_wait = short * 2;
    let endpoints: Vec<_> = ENDPOINTS
        .iter()
        .map(|endpoint| backend(*endpoint, INGRESS_IFINDEX))
        .collect();
    let mut dataplane = dataplane(
        &settings,
        &[
            service(TCP_SERVICE, endpoints.clone()),
            service(UDP_SERVICE, endpoints),
        ],
    );
    let clients: Vec<SocketAddrV4> = (0..96)
        .map(|index| SocketAddrV4::new(Ipv4Addr::new(10, 77, 2, index as u8 + 1), 40000))
        .collect();
    // (backend, SNAT port, protocol) → the client it was last given to, and the reverse.
    let mut holder: HashMap<(SocketAddrV4, u16, u8), SocketAddrV4> = HashMap::new();
    let mut tuple_of: HashMap<(SocketAddrV4, u8), (SocketAddrV4, u16)> = HashMap::new();
    let mut checked = 0;
    for index in 0..frames {
        if rng.u32(..1000) == 0 {
            std::thread::sleep(short * 3);
        }
        if rng.u32(..200) == 0 {
            dataplane.sweep_flows().unwrap();
        }
        let client = clients[rng.usize(..clients.len())];
        let context = || format!("seed {seed}, step {index}, client {client}");
        let udp_flow = rng.u8(..4) == 0;
        let proto = if udp_flow { 17 } else { 6 };
        let from_backend = rng.bool() && tuple_of.contains_key(&(client, proto));
        let frame = match (udp_flow, from_backend) {
            (true, false) => udp(TO_LB, client, lb(53), 64, b"q"),
            (false, false) => {
                let flags: Flags = match rng.u8(..10) {
                    0..=2 => syn,
                    3 => fin_ack,
                    4 => |step| step.rst(),
                    _ => ack,
                };
                tcp(TO_LB, client, lb(5432), 64, flags, b"")
            }
            (_, true) => {
                let (endpoint, port) = tuple_of[&(client, proto)];
                let snat = SocketAddrV4::new(SNAT_ADDR, port);
                if udp_flow {
                    udp(FROM_BACKEND, endpoint, snat, 64, b"a")
                } else {
                    let flags: Flags = match rng.u8(..6) {
                        0 => syn_ack,
                        1 => fin_ack,
                        2 => |step| step.rst(),
                        _ => ack,
                    };
                    tcp(FROM_BACKEND, endpoint, snat, 64, flags, b"")
                }
            }
        };
        let (verdict, out) = run(&mut dataplane, &frame);
        if verdict != XDP_TX {
            continue;
        }
        let output = inspect(&out).unwrap_or_else(|error| panic!("{error}; {}", context()));
        let is_syn = PacketHeaders::from_ethernet_slice(&frame)
            .ok()
            .and_then(|headers| match headers.transport {
                Some(TransportHeader::Tcp(tcp)) => Some(tcp.syn && !tcp.ack),
                _ => None,
            })
            .unwrap_or(false);
        if from_backend {
            let input = read_input(&frame).unwrap();
            let key = (input.src, input.dst.port(), proto);
            assert_eq!(
                holder.get(&key),
                Some(&output.dst),
                "a reply goes to the tuple's holder; {}",
                context()
            );
            checked += 1;
            continue;
        }
        let tuple = (output.dst, output.src.port(), proto);
        let started = udp_flow || is_syn;
        if !started {
            assert_eq!(
                tuple_of.get(&(client, proto)),
                Some(&(output.dst, output.src.port())),
                "a tracked flow keeps its backend and tuple; {}",
                context()
            );
            assert_eq!(
                holder.get(&tuple),
                Some(&client),
                "no other client holds the tuple; {}",
                context()
            );
            checked += 1;
        }
        if let Some(previous) = holder.insert(tuple, client) {
            if previous != client && tuple_of.get(&(previous, proto)) == Some(&(tuple.0, tuple.1)) {
                tuple_of.remove(&(previous, proto));
            }
        }
        if let Some(old) = tuple_of.insert((client, proto), (output.dst, output.src.port())) {
            if old != (output.dst, output.src.port())
                && holder.get(&(old.0, old.1, proto)) == Some(&client)
            {
                holder.remove(&(old.0, old.1, proto));
            }
        }
    }
    eprintln!("xdp churn: {checked} forwarded segments and replies checked of {frames}");
    let stats = dataplane.stats().unwrap();
    let count = |name: &str| stats.0[name].packets;
    // Which refusal comes first, a full table or every tuple tried live, depends on how much
    // expires meanwhile, that is on the machine's speed: either shows the churn reached it.
    let refused = count("l4_drop_snat_exhausted") + count("l4_drop_flow_table");
    let reached = [
        ("reclaimed", count("l4_flow_reclaimed")),
        ("reopened", count("l4_flow_reopened")),
        ("refused", refused),
    ];
    assert!(
        reached.iter().all(|(_, count)| *count > 0),
        "the churn must reclaim, reopen and refuse flows: {reached:?}"
    );
    assert!(checked > frames / 10, "enough segments of tracked flows");
}
