//! `cargo xtask bench`: the performance goals of the issues, each printed beside a baseline
//! measured in the same run (these machines are shared, so only ratios and same-run
//! comparisons mean something).

mod tunnel;

use anyhow::Result;

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {}

/// Runs every benchmark; fails when a goal is missed.
pub fn run(_o: &Options) -> Result<()> {
    tunnel::run()
}
