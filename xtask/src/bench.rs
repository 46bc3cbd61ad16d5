//! `cargo xtask bench`: the performance goals of the issues, each printed beside a baseline
//! measured in the same run (these machines are shared, so only ratios and same-run
//! comparisons mean something).

mod kernel;
mod latency;
mod tunnel;
mod vm;

use anyhow::{bail, Result};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {
    /// Smaller sizes, for a quick look while developing (the figures then say little about
    /// the goals).
    #[arg(long)]
    quick: bool,
}

/// Runs every benchmark, all of them even when one fails, and fails if any did.
pub fn run(o: &Options) -> Result<()> {
    let results = [
        ("kernel", kernel::run(o.quick)),
        ("tunnel", tunnel::run()),
        ("latency", latency::run(o.quick)),
        ("vm", vm::run()),
    ];
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!("benchmarks failed:\n{}", failed.join("\n"));
    }
    Ok(())
}
