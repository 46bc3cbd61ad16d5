//! The kernel programs' benchmark: ns per packet beside a counter-only program, and reading
//! the maps at 10,000 peers (see `tests/src/bin/plexd-metrics-bench.rs` for what is measured).

use std::process::Command;

use anyhow::{bail, Result};

use crate::build_ebpf;
use crate::run::which;
use crate::setup::{self, Need};
use crate::util::{is_root, run_cmd, workspace_root};

/// Builds the kernel programs and the benchmark (release), then runs it as root.
pub fn run(quick: bool) -> Result<()> {
    setup::ensure(&[Need::Testbed])?;
    build_ebpf::build(false)?;
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_cmd(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "plexd-metrics-tests",
        "--bin",
        "plexd-metrics-bench",
    ]))?;
    let binary = root.join("target/release/plexd-metrics-bench");
    // Network namespaces, TC attachments and kernel.bpf_stats_enabled need root.
    let mut bench = if is_root() {
        Command::new(&binary)
    } else if which("sudo") {
        eprintln!("xtask: not root; running the benchmark through sudo");
        let mut c = Command::new("sudo");
        c.arg(&binary);
        c
    } else {
        bail!("the benchmark needs root (network namespaces, eBPF) and sudo is not installed; run as root");
    };
    if quick {
        bench.arg("--quick");
    }
    run_cmd(&mut bench)
}
