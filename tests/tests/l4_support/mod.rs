//! Shared by the L4 end-to-end tests (`l4_namespaces`, `l4_edges`, `l4_volume`): a load
//! balancer in a segment host's namespace, run by the daemon's own parts (the XDP program, the
//! map writer, the next-hop resolver), a kernel that cannot carry anything itself, and the
//! XDP_PASS program its switch port needs; [`one_backend`], the lab of `l4_edges` and `l4_floods`;
//! [`swarm_lb`], the Swarm behind an `xlb run` of `l4_swarm` and `hitless_restart`.

#![allow(dead_code)] // each test crate uses a different part

pub mod one_backend;
pub mod swarm_lb;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use xlb::{
    dataplane::{AttachMode, Dataplane, Stats},
    l4::{maglev::RingSize, service::L4RouteTable, settings::L4Settings, steering::Steering},
};
use xlb_common::Stat;
use xlb_testbed::{in_netns, Host, Netns, Segment};

/// Sets sysctl `name` to `value` in a namespace this test created (through `/proc/sys` from
/// inside it: no procps needed), and reads it back. A new namespace inherits the host's
/// IPv4 settings (ip_forward=1 where Docker runs): set what the test depends on.
pub fn set_sysctl(netns: &Netns, name: &str, value: &str) {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    netns
        .run("sh", &["-c", &format!("echo '{value}' > {path}")])
        .unwrap();
    let read = netns.run("cat", &[&path]).unwrap();
    assert_eq!(
        read.split_whitespace().collect::<Vec<_>>(),
        value.split_whitespace().collect::<Vec<_>>(),
        "{name} in {}",
        netns.name()
    );
}

/// A native XDP_PASS program (xlb's, with nothing configured) on the switch ports of the LBs:
/// XDP_TX out of a veth is delivered only when its peer runs one.
pub fn peer_program(segment: &Segment, lbs: &[&Host]) -> Dataplane {
    in_netns(&segment.switch, || {
        let mut program = Dataplane::load_with(&L4Settings {
            ring_size: RingSize::new(3).unwrap(),
            flow_entries: 16,
            service_slots: 1,
            ..L4Settings::default()
        })
        .unwrap();
        for lb in lbs {
            assert_eq!(program.attach(&lb.switch_port).unwrap(), AttachMode::Native);
        }
        program
    })
    .unwrap()
}

/// A load balancer: the XDP program attached natively to its host's `to-switch`, steered by
/// the daemon's own `Steering`. Its kernel cannot forward (forwarding off and FORWARD policy
/// DROP, IPv4 and IPv6), so whatever crosses it was carried by XDP. It answers L4 services on
/// the addresses its interface has when it starts.
pub struct LoadBalancer {
    pub addr: Ipv4Addr,
    pub dataplane: Arc<Mutex<Dataplane>>,
    pub steering: Steering,
}

impl LoadBalancer {
    pub fn start(host: &Host, runtime: &tokio::runtime::Runtime, settings: &L4Settings) -> Self {
        set_sysctl(&host.netns, "net.ipv4.ip_forward", "0");
        set_sysctl(&host.netns, "net.ipv6.conf.all.forwarding", "0");
        for iptables in ["iptables", "ip6tables"] {
            host.netns
                .run(iptables, &["-P", "FORWARD", "DROP"])
                .unwrap();
        }
        let (dataplane, steering) = in_netns(&host.netns, || {
            let mut dataplane = Dataplane::load_with(settings).unwrap();
            let mode = dataplane.attach(Segment::HOST_INTERFACE).unwrap();
            assert_eq!(mode, AttachMode::Native);
            let dataplane = Arc::new(Mutex::new(dataplane));
            let interfaces = [Segment::HOST_INTERFACE.to_owned()];
            let steering = runtime
                .block_on(Steering::start(dataplane.clone(), &interfaces, &[]))
                .unwrap();
            (dataplane, steering)
        })
        .unwrap();
        LoadBalancer {
            addr: host.addr,
            dataplane,
            steering,
        }
    }

    /// Applies `table`, as a discovery poll does, until every listener is steered and
    /// `backends` backend ids are in use (one per distinct endpoint, address and port).
    pub fn steer(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        table: &L4RouteTable,
        backends: usize,
    ) {
        for _ in 0..20 {
            runtime.block_on(self.steering.update(table)).unwrap();
            let mut dataplane = self.dataplane.lock().unwrap();
            let steered = dataplane.l4().service_slots().len();
            if steered == table.listeners.len() && dataplane.l4().backend_ids().len() == backends {
                return;
            }
            drop(dataplane);
            thread::sleep(Duration::from_millis(200));
        }
        panic!("the LB at {} did not resolve every backend", self.addr);
    }

    pub fn stats(&self) -> Stats {
        self.dataplane.lock().unwrap().stats().unwrap()
    }

    pub fn stat(&self, stat: Stat) -> u64 {
        self.stats().get(stat).packets
    }
}

/// A backend's connection: `greeting` first (it tells which backend answered), then an echo
/// of whatever comes until the client closes or the socket fails.
pub fn greet_and_echo(mut stream: TcpStream, greeting: &[u8]) {
    if stream.write_all(greeting).is_err() {
        return;
    }
    let mut buffer = [0u8; 4096];
    while let Ok(len) = stream.read(&mut buffer) {
        if len == 0 || stream.write_all(&buffer[..len]).is_err() {
            return;
        }
    }
}

/// How many packets `stat` counted between two snapshots.
pub fn moved(before: &Stats, after: &Stats, stat: Stat) -> u64 {
    after.get(stat).packets - before.get(stat).packets
}

/// Prints every counter that moved between two snapshots.
pub fn print_moved(what: &str, before: &Stats, after: &Stats) {
    let moved: Vec<String> = Stat::ALL
        .iter()
        .filter(|stat| moved(before, after, **stat) > 0)
        .map(|stat| format!("{}={}", stat.name(), moved(before, after, *stat)))
        .collect();
    eprintln!("{what}: {}", moved.join(" "));
}
