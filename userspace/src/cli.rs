//! The `xlb` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{daemon, logging};

#[derive(Debug, Parser)]
#[command(
    name = "xlb",
    version,
    about = "eBPF/XDP-accelerated load balancer for Docker Swarm host-mode services"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the load balancer: discovery, L7 proxy, XDP dataplane (as root).
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Interlock's config.toml.
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// An interface to attach the XDP program to (never chosen implicitly); repeat it for a
    /// node whose clients or backends are behind several. L4 backends whose route leaves by
    /// an interface not named here get no flows.
    #[arg(long, short = 'i', required_unless_present = "no_xdp")]
    pub interface: Vec<String>,
    /// Run the L7 proxy only, without the XDP program.
    #[arg(long, conflicts_with = "interface")]
    pub no_xdp: bool,
    /// Which `[Extensions.<name>]` of the config to serve (default: the only one, or `default`).
    #[arg(long)]
    pub extension: Option<String>,
    /// Overrides the config's DockerURL (e.g. a private engine's socket).
    #[arg(long)]
    pub docker_url: Option<String>,
}

impl Cli {
    pub fn exec(self) -> anyhow::Result<()> {
        logging::init();
        match self.command {
            Command::Run(args) => daemon::run(args),
        }
    }
}
