//! Project tasks: `cargo xtask <command>`. The README's two commands are `cargo xtask demo` and
//! `cargo xtask test`; both install what they need on a fresh Debian 12 machine.

mod bench;
mod build_ebpf;
mod cluster;
mod demo;
mod exec;
mod fuzz_xdp;
mod package;
mod test;
mod toolchain;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "xlb project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the XDP program (installs Debian's eBPF toolchain and bpf-linker when missing).
    BuildEbpf(build_ebpf::Options),
    /// Reproduce the Interlock host-mode scenario on this machine, XDP attached.
    Demo(demo::Options),
    /// The seed's 8-node cluster on this machine: `up` (left running), `status`, `down`.
    Cluster(cluster::Options),
    /// Run every test: unit, packet-level (BPF_PROG_TEST_RUN) and end to end (dockerd + Swarm).
    Test(test::Options),
    /// Measure xlb against nginx, HAProxy, kernel NAT and direct, side by side (as root).
    Bench(bench::Options),
    /// Build the .deb for load-balancer nodes into target/debian (cargo-deb).
    Package(package::Options),
    /// Fuzz the XDP program with N seeded random and mutated frames (BPF_PROG_TEST_RUN).
    FuzzXdp(fuzz_xdp::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(options) => build_ebpf::run(&options).map(|_| ()),
        Command::Demo(options) => demo::run(&options),
        Command::Cluster(options) => cluster::run(&options),
        Command::Test(options) => test::run(&options),
        Command::FuzzXdp(options) => fuzz_xdp::run(&options),
        Command::Package(options) => package::run(&options).map(|_| ()),
        Command::Bench(options) => bench::run(&options).map(|_| ()),
    }
}
