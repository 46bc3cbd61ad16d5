//! The latency pinger against fping: 10,000 targets answering at once in a network namespace,
//! 3 probes each within one default collect interval, CPU time compared with fping's for the
//! same targets and probe count, and the heap the pinger holds.

use std::process::Command;

use anyhow::{bail, Result};

use crate::setup::{self, Need};
use crate::util::{is_root, run_cmd, workspace_root};

/// Builds the benchmark binary (release) and runs it as root.
pub fn run(quick: bool) -> Result<()> {
    // fping is the baseline; ip sets up the namespaces.
    setup::ensure(&[Need::Testbed])?;
    if !is_root() {
        bail!("the latency benchmark needs root (network namespaces, raw sockets); run it as root");
    }
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_cmd(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "plexd-metrics-tests",
        "--bin",
        "latency_bench",
    ]))?;
    let mut bench = Command::new(root.join("target/release/latency_bench"));
    if quick {
        bench.args(["--targets", "1000", "--collect-interval", "5"]);
    }
    run_cmd(&mut bench)
}
