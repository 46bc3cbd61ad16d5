//! `cargo xtask bench`: the performance goals of the issues, each printed beside a baseline
//! measured in the same run (these machines are shared, so only ratios and same-run
//! comparisons mean something).

mod footprint;
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
    /// Run only this benchmark: kernel, tunnel, latency, footprint or vm.
    #[arg(long, value_name = "NAME")]
    only: Option<String>,
}

/// Runs every benchmark, all of them even when one fails, and fails if any did.
pub fn run(o: &Options) -> Result<()> {
    let benches: [(&str, &dyn Fn() -> Result<()>); 5] = [
        ("kernel", &|| kernel::run(o.quick)),
        ("tunnel", &tunnel::run),
        ("latency", &|| latency::run(o.quick)),
        ("footprint", &footprint::run),
        ("vm", &vm::run),
    ];
    if let Some(only) = &o.only {
        if !benches.iter().any(|(name, _)| name == only) {
            bail!("no benchmark named {only}; there are kernel, tunnel, latency, footprint and vm");
        }
    }
    let failed: Vec<String> = benches
        .into_iter()
        .filter(|(name, _)| o.only.as_deref().is_none_or(|only| only == *name))
        .map(|(name, bench)| (name, bench()))
        .filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!("benchmarks failed:\n{}", failed.join("\n"));
    }
    Ok(())
}
