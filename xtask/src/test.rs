//! `cargo xtask test`: every test this machine can run.
//!
//! Unit tests of both workspaces, then the privileged integration tests in `tests/` as root,
//! then the VM tests on two kernels (`cargo xtask integration-test vm`).
//! A privileged test that would skip itself fails instead (PLEXD_METRICS_REQUIRE_PRIVILEGED),
//! so a green run means they really ran.

use std::process::Command;

use anyhow::{bail, Result};

use crate::build_ebpf;
use crate::run::which;
use crate::setup::{self, Need};
use crate::util::{is_root, workspace_root, Tally};
use crate::vm;

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Options {
    /// Arguments passed to every `cargo test` invocation's test binaries (after `--`),
    /// e.g. a test name filter.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Runs the unit tests, then the privileged tests.
pub fn run(o: &Options) -> Result<()> {
    // The privileged tests drive ip, tc, bpftool and the WireGuard tools; the deployment
    // tests kubernetes-validate and systemd-analyze; the alert rules' and dashboard's tests
    // promtool and prometheus.
    setup::ensure(&[Need::Testbed, Need::Deploy, Need::Prometheus])?;
    // The agent embeds the kernel object, and the privileged tests load it.
    build_ebpf::build(false)?;
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut unit = Command::new(&cargo);
    unit.current_dir(&root)
        .args(["test", "--workspace", "--exclude", "plexd-metrics-tests"]);
    if !o.args.is_empty() {
        unit.arg("--").args(&o.args);
    }
    let mut tally = Tally::default();
    tally.run(&mut unit)?;

    build_ebpf::test_host(&mut tally)?;

    let mut privileged = if is_root() {
        Command::new(&cargo)
    } else if which("sudo") {
        eprintln!("xtask: not root; running the privileged tests through sudo");
        let mut c = Command::new("sudo");
        c.args([
            "--preserve-env=PATH,CARGO_HOME,RUSTUP_HOME,RUST_LOG,PLEXD_METRICS_KUBERNETES_VALIDATE",
            "env",
            "PLEXD_METRICS_REQUIRE_PRIVILEGED=1",
        ])
        .arg(&cargo);
        c
    } else {
        bail!("the privileged tests need root (CAP_BPF, CAP_NET_ADMIN) and sudo is not installed; run as root");
    };
    privileged
        .current_dir(&root)
        .env("PLEXD_METRICS_REQUIRE_PRIVILEGED", "1")
        // Built by the unit-test run above (the CLI tests use it).
        .env(
            "PLEXD_METRICS_BIN",
            crate::util::target_dir().join("debug/plexd-metrics"),
        )
        .env(
            "PLEXD_METRICS_KUBERNETES_VALIDATE",
            setup::kubernetes_validate(),
        )
        .args(["test", "--package", "plexd-metrics-tests"]);
    if !o.args.is_empty() {
        privileged.arg("--").args(&o.args);
    }
    tally.run(&mut privileged)?;
    // Kernel WireGuard and netem exist only in the VM's kernels; it runs as root too (QEMU
    // needs no privilege, but the kernel packages are fetched with apt).
    // Both kernels: 6.1 attaches through netlink and clsact, 6.12 through TCX, and each has
    // its own verifier.
    vm::run(&vm::Options::default(), &mut tally)?;
    if tally.ignored() > 0 {
        bail!(
            "{} test(s) are #[ignore]d; every test must run",
            tally.ignored()
        );
    }
    eprintln!("xtask: all tests passed, privileged tests included");
    println!("xtask: {}", tally.summary());
    Ok(())
}
