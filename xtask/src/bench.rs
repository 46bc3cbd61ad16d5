//! `cargo xtask bench`: the performance targets of the issues, each measured beside a
//! baseline in the same run, since these machines are shared and only ratios are stable.

mod latency;

use anyhow::Result;

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {
    /// Smaller sizes, for a quick look (the figures then say little about the targets).
    #[arg(long)]
    quick: bool,
}

/// Runs every benchmark.
pub fn run(o: &Options) -> Result<()> {
    latency::run(o.quick)
}
