//! The tunnel group's collect for 10,000 peers (goal: under 20 ms), beside `wg show dump`.

use std::process::Command;

use anyhow::{bail, Result};

use crate::run::which;
use crate::setup::{self, Need};
use crate::util::{is_root, run_cmd, workspace_root};

/// Builds the benchmark in release mode and runs it as root.
pub fn run() -> Result<()> {
    // wireguard-go and wg make the device under test.
    setup::ensure(&[Need::Testbed])?;
    let root = workspace_root();
    run_cmd(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args([
                "build",
                "--release",
                "--package",
                "plexd-metrics-tests",
                "--bin",
                "bench_tunnel",
            ]),
    )?;
    let binary = root.join("target/release/bench_tunnel");
    let mut bench = if is_root() {
        Command::new(&binary)
    } else if which("sudo") {
        let mut c = Command::new("sudo");
        c.arg(&binary);
        c
    } else {
        bail!("the tunnel benchmark needs root (a network namespace, wireguard-go) and sudo is not installed");
    };
    run_cmd(&mut bench)
}
