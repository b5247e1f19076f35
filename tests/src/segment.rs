//! One Ethernet segment for the L4 tests: a bridge in a `switch` namespace, and hosts (client,
//! load balancers, backends, a Swarm node), each in its own namespace, plugged into it by a veth.
//!
//! ```text
//!   client ── p-client ┐
//!   lb-00  ── p-lb-00  ├── br0 (switch)      every host: to-switch 10.79.X.H/24
//!                                            (and fd79:X::H/64, for the IPv6 tests)
//!   be-0   ── p-be-0   ┘
//! ```
//!
//! Checksum offload is off on both ends of every veth: a frame an XDP program rewrites must
//! carry finished checksums. Whoever attaches XDP to a host's `to-switch` and transmits from it
//! must also put a native XDP program on the host's switch port (see [`Host::switch_port`]).

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context, Result};

use crate::{
    netns::Netns,
    unique::{run_id, RunId},
    veth::disable_tx_checksum_offload,
};

const BRIDGE: &str = "br0";
const PREFIX_LEN: u8 = 24;

#[derive(Debug)]
pub struct Segment {
    run: RunId,
    pub switch: Netns,
    subnet_octet: u8,
}

/// A host on the segment.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: Netns,
    pub addr: Ipv4Addr,
    /// The host's veth end in the switch namespace (a bridge port).
    pub switch_port: String,
}

impl Segment {
    /// The interface name inside every host namespace.
    pub const HOST_INTERFACE: &'static str = "to-switch";

    /// A segment on 10.79.X.0/24, X varying per run (to tell runs apart in captures).
    pub fn create() -> Result<Segment> {
        let run = run_id();
        let spread = run.pid.wrapping_mul(17).wrapping_add(run.sequence);
        Self::create_on((spread % 250) as u8 + 1)
    }

    /// A segment on 10.79.`subnet_octet`.0/24: fixed addresses make address-hashing tests
    /// deterministic (namespaces keep concurrent runs apart anyway).
    pub fn create_on(subnet_octet: u8) -> Result<Segment> {
        let run = run_id();
        let switch = Netns::create(&format!("xlb-{run}-switch"))?;
        switch.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        switch.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(Segment {
            run,
            switch,
            subnet_octet,
        })
    }

    /// The address of host number `host` on the segment: 10.79.X.host.
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 79, self.subnet_octet, host)
    }

    /// The IPv6 address of host number `host` on the segment: fd79:X::host.
    pub fn addr6(&self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd79, self.subnet_octet.into(), 0, 0, 0, 0, 0, host.into())
    }

    /// Gives `host` [`Segment::addr6`]`(number)` as well, usable at once (no duplicate address
    /// detection: the segment is the test's own).
    pub fn add_ipv6(&self, host: &Host, number: u8) -> Result<Ipv6Addr> {
        let addr = self.addr6(number);
        host.netns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            Self::HOST_INTERFACE,
            "nodad",
        ])?;
        Ok(addr)
    }

    /// Creates namespace `xlb-<run>-<role>` with `to-switch` at [`Segment::addr`]`(host)`,
    /// plugged into the bridge through port `p-<role>` (role: at most 13 characters).
    pub fn add_host(&self, role: &str, host: u8) -> Result<Host> {
        let netns = Netns::create(&format!("xlb-{}-{role}", self.run))?;
        let switch_port = format!("p-{role}");
        netns.ip(&[
            "link",
            "add",
            Self::HOST_INTERFACE,
            "type",
            "veth",
            "peer",
            "name",
            &switch_port,
            "netns",
            self.switch.name(),
        ])?;
        let addr = self.addr(host);
        netns.ip(&[
            "addr",
            "add",
            &format!("{addr}/{PREFIX_LEN}"),
            "dev",
            Self::HOST_INTERFACE,
        ])?;
        netns.ip(&["link", "set", Self::HOST_INTERFACE, "up"])?;
        self.switch
            .ip(&["link", "set", &switch_port, "master", BRIDGE, "up"])?;
        disable_tx_checksum_offload(&netns, Self::HOST_INTERFACE)?;
        disable_tx_checksum_offload(&self.switch, &switch_port)?;
        Ok(Host {
            netns,
            addr,
            switch_port,
        })
    }
}

/// Runs `work` on a thread that joined `netns`: sockets it opens, interfaces it names and
/// netlink requests it makes belong to that namespace, wherever they are used afterwards.
pub fn in_netns<T: Send>(netns: &Netns, work: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{}", netns.name());
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("joining network namespace {path}"))?;
                Ok(work())
            })
            .join()
            .expect("the thread inside the namespace panicked")
    })
}
