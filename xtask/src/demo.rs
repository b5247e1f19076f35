//! `cargo xtask demo` (to come with the testbed).

#[derive(Debug, clap::Args)]
pub struct Options {}

pub fn run(_options: &Options) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
