//! The VM tests' budget: both kernels in under 10 minutes on a 2-core machine.
//!
//! The baseline, measured in the same run, is each kernel's fixed cost: the same VM booted
//! with only the quickest scenario (the netlink read), so that what the scenarios themselves
//! cost shows beside what booting under emulation costs.

use std::time::Duration;

use anyhow::Result;

use crate::util::Tally;
use crate::vm::{self, KernelChoice};

/// The budget for both kernels.
const BUDGET: Duration = Duration::from_secs(600);
/// The quickest scenario: one `--once` run of the agent against a netlink dump.
const QUICK_SCENARIO: &str = "tunnel_group_agrees_with_netlink";

/// Runs the baseline and the full suite, and prints both beside the budget.
pub fn run() -> Result<()> {
    let mut tally = Tally::default();
    let quick = vm::Options {
        args: vec![QUICK_SCENARIO.to_owned()],
        ..vm::Options::default()
    };
    let (baseline, _) = vm::run_timed(&quick, &mut tally)?;
    let full = vm::run_timed(
        &vm::Options {
            kernel: KernelChoice::All,
            ..vm::Options::default()
        },
        &mut tally,
    );
    println!("bench vm: wall time per kernel (QEMU start to exit), host load as printed above");
    println!(
        "  {:<6} {:>14} {:>14}",
        "kernel", "one scenario", "all scenarios"
    );
    let (full_timings, whole) = match &full {
        Ok((t, whole)) => (t.as_slice(), Some(*whole)),
        Err(_) => (&[][..], None),
    };
    for b in &baseline {
        // Every boot of the kernel: the Rust init's and systemd's.
        let boots: Vec<_> = full_timings.iter().filter(|t| t.label == b.label).collect();
        let all = if boots.is_empty() {
            "failed".to_owned()
        } else {
            let total: f64 = boots.iter().map(|t| t.total.as_secs_f64()).sum();
            format!("{total:.1} s")
        };
        println!(
            "  {:<6} {:>12.1} s {:>14}",
            b.label,
            b.total.as_secs_f64(),
            all
        );
    }
    if let Some(whole) = whole {
        println!(
            "bench vm: both kernels, builds included: {:.1} s of the {} s budget ({:.0} %)",
            whole.as_secs_f64(),
            BUDGET.as_secs(),
            whole.as_secs_f64() * 100.0 / BUDGET.as_secs_f64()
        );
    }
    full.map(drop)
}
