//! The release agent's resident memory and CPU time per collect cycle: the DaemonSet's
//! resource figures, beside the agent with only its own and the host's groups.

use std::process::Command;

use anyhow::{bail, Result};

use crate::run::which;
use crate::setup::{self, Need};
use crate::util::{is_root, run_cmd, workspace_root};

/// Builds the release agent and the benchmark, and runs it as root.
pub fn run() -> Result<()> {
    setup::ensure(&[Need::Testbed])?;
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_cmd(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "plexd-metrics",
        "--package",
        "plexd-metrics-tests",
        "--bin",
        "plexd-metrics",
        "--bin",
        "bench_footprint",
    ]))?;
    let binary = root.join("target/release/bench_footprint");
    let agent = root.join("target/release/plexd-metrics");
    let mut bench = if is_root() {
        Command::new(&binary)
    } else if which("sudo") {
        let mut c = Command::new("sudo");
        c.arg(&binary);
        c
    } else {
        bail!("the footprint benchmark needs root (network namespaces, wireguard-go) and sudo is not installed");
    };
    run_cmd(bench.env("PLEXD_METRICS_BIN", agent))
}
