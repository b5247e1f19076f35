use clap::Parser;

fn main() -> anyhow::Result<()> {
    xlb::cli::Cli::parse().exec()
}
