//! The `xlb` command line (skeleton).

#[derive(Debug, clap::Parser)]
#[command(name = "xlb", version)]
pub struct Cli {}

impl Cli {
    pub fn exec(self) -> anyhow::Result<()> {
        Ok(())
    }
}
