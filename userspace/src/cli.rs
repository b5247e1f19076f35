//! The `xlb` command line.

use std::path::PathBuf;

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::{
    admin_client::{self, AdminUrl},
    check_config, controller, daemon, logging,
};

#[derive(Debug, Parser)]
#[command(
    name = "xlb",
    version,
    about = "eBPF/XDP-accelerated load balancer for Docker Swarm host-mode services"
)]
pub struct Cli {
    /// Debug logging, as Interlock's `-D` (`XLB_LOG`, when set, still decides).
    #[arg(short = 'D', long, global = true)]
    debug: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the load balancer on one host: discovery, L7 proxy, XDP dataplane (as root).
    Run(RunArgs),
    /// On a Swarm manager: read Swarm and serve route snapshots to the proxies.
    Controller(ControllerArgs),
    /// On a load-balancer node: the L7 proxy and XDP dataplane, fed by the controllers.
    Proxy(ProxyArgs),
    /// Read a config.toml as `xlb run` would and report it; exits non-zero, naming the line
    /// and column, if it is not valid.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Ask a running xlb's admin endpoint how it is doing: the snapshot served, the proxy's
    /// workers, XDP's counters, the L4 connection table.
    Status(AdminArgs),
    /// Ask a running xlb's admin endpoint what it routes: hosts and context roots to services
    /// and endpoints, the default backend, disabled services, L4 listeners.
    Routes(AdminArgs),
    /// Print a completion script for SHELL to standard output.
    Completions { shell: clap_complete::Shell },
    /// Print the xlb(1) man page (roff) to standard output: how the package makes it.
    #[command(hide = true)]
    Manpage,
}

/// Which xlb `xlb status` and `xlb routes` ask, and how they answer.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The admin endpoint, `http://HOST:PORT`; by default the config's ListenAddr (on
    /// 127.0.0.1 when it names no address).
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// The config whose ListenAddr is the admin endpoint, unless --admin is given.
    #[arg(long, short = 'c', value_name = "FILE", default_value = admin_client::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Print the endpoint's JSON as received instead of tables.
    #[arg(long)]
    pub json: bool,
}

impl AdminArgs {
    fn admin_url(&self) -> anyhow::Result<AdminUrl> {
        AdminUrl::locate(self.admin.as_deref(), &self.config)
    }
}

/// What a node serving traffic is told: `xlb run` and `xlb proxy` alike.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
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
    /// Where the connection tables and XDP links are pinned for a hitless restart (a
    /// directory per instance; on a BPF filesystem, mounted at /sys/fs/bpf if none is).
    #[arg(long, default_value = "/sys/fs/bpf/xlb")]
    pub bpf_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Overrides the config's DockerURL (e.g. a private engine's socket).
    #[arg(long)]
    pub docker_url: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// Interlock's config.toml; snapshots are served on its ListenAddr.
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// Overrides the config's DockerURL.
    #[arg(long)]
    pub docker_url: Option<String>,
    /// A file holding the token proxies must present (`Authorization: Bearer`); without one,
    /// snapshots are served on loopback only.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Which `[Extensions.<name>]` to build the route tables for.
    #[arg(long)]
    pub extension: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// A controller's address, `http://HOST:PORT` (its ListenAddr); repeat it for several:
    /// the proxy moves to the next when one fails.
    #[arg(long, required_unless_present = "controllers_on_managers")]
    pub controller: Vec<String>,
    /// The controllers are on the Swarm's managers, at the config's ListenAddr port: their
    /// addresses are read from this node's engine (DockerURL), as when the proxy runs as a
    /// Swarm service beside the controller's.
    #[arg(long, conflicts_with = "controller")]
    pub controllers_on_managers: bool,
    /// A file holding the controllers' token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl Cli {
    pub fn exec(self) -> anyhow::Result<()> {
        logging::init(if self.debug { "debug" } else { "info" });
        match self.command {
            Command::Run(args) => daemon::run(args),
            Command::Controller(args) => controller::run(args),
            Command::Proxy(args) => daemon::run_proxy(args),
            Command::CheckConfig { file } => {
                print!("{}", check_config::check(&file)?);
                Ok(())
            }
            Command::Status(args) => {
                print!("{}", admin_client::status(&args.admin_url()?, args.json)?);
                Ok(())
            }
            Command::Routes(args) => {
                print!("{}", admin_client::routes(&args.admin_url()?, args.json)?);
                Ok(())
            }
            Command::Completions { shell } => {
                let mut command = Cli::command();
                clap_complete::generate(shell, &mut command, "xlb", &mut std::io::stdout());
                Ok(())
            }
            Command::Manpage => {
                clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interlocks_debug_flag_is_accepted_before_the_subcommand_as_the_seed_runs_it() {
        // The seed: `interlock -D run -c /config.toml`.
        let cli =
            Cli::try_parse_from(["xlb", "-D", "run", "-c", "/config.toml", "--no-xdp"]).unwrap();
        assert!(cli.debug);
        assert!(matches!(cli.command, Command::Run(_)));
        let cli = Cli::try_parse_from(["xlb", "run", "-c", "/config.toml", "--no-xdp"]).unwrap();
        assert!(!cli.debug);
    }

    #[test]
    fn status_and_routes_default_to_the_installed_config() {
        let cli = Cli::try_parse_from(["xlb", "routes"]).unwrap();
        let Command::Routes(args) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(args.config, PathBuf::from("/etc/xlb/config.toml"));
        assert!(args.admin.is_none() && !args.json);
        let cli =
            Cli::try_parse_from(["xlb", "status", "--admin", "http://10.0.0.2:8080", "--json"])
                .unwrap();
        let Command::Status(args) = cli.command else {
            panic!("{:?}", cli.command);
        };
        assert_eq!(args.admin.as_deref(), Some("http://10.0.0.2:8080"));
        assert!(args.json);
    }

    #[test]
    fn the_cli_is_consistent_and_completions_name_every_subcommand() {
        Cli::command().debug_assert();
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "xlb",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        for subcommand in [
            "run",
            "controller",
            "proxy",
            "check-config",
            "status",
            "routes",
            "completions",
        ] {
            assert!(script.contains(subcommand), "{subcommand} missing");
        }
    }

    #[test]
    fn the_man_page_names_the_command_and_its_subcommands() {
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut page)
            .unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.starts_with(".ie"), "roff: {}", &page[..40]);
        assert!(page.contains(".TH xlb 1"), "{page}");
        for subcommand in ["run", "controller", "proxy", "check\\-config"] {
            assert!(
                page.contains(subcommand),
                "{subcommand} missing from the man page"
            );
        }
    }
}
