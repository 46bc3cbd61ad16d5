//! (being written)
use anyhow::Result;

/// Options of this command.
#[derive(clap::Args)]
pub struct Options {}

/// Runs the command.
pub fn run(_: &Options) -> Result<()> {
    anyhow::bail!("not yet")
}
