//! `cargo xtask run`: build both sides and run the agent as root.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build_ebpf;
use crate::util::{build_agent, is_root, run_cmd, workspace_root};

/// Options of `cargo xtask run`.
#[derive(clap::Args)]
pub struct Options {
    /// Build in release mode.
    #[arg(long)]
    release: bool,
    /// Build a throw-away mesh of three wireguard-go nodes in network namespaces (one link
    /// lossy), run the agent in one of them and show its tunnel group live; Ctrl-C removes
    /// everything.
    #[arg(long, conflicts_with = "args")]
    demo: bool,
    /// Arguments for the agent (after `--`). Without any, the agent runs with
    /// examples/dev.yaml: short intervals, stdout sink, eBPF on the default route's interface.
    #[arg(last = true)]
    args: Vec<String>,
}

/// Builds the kernel programs and the agent, then replaces this process with the agent.
pub fn run(o: &Options) -> Result<()> {
    build_ebpf::build(o.release)?;
    let root = workspace_root();
    let binary = build_agent(o.release)?;
    if o.demo {
        return demo(o.release, &binary);
    }
    let mut args = o.args.clone();
    if args.is_empty() {
        let dev = root.join("examples/dev.yaml");
        eprintln!(
            "xtask: no agent arguments given; using --config {} (collect every 5s, report every 10s to stdout)",
            dev.display()
        );
        args = vec!["--config".into(), dev.display().to_string()];
    }

    // The agent needs CAP_BPF and CAP_NET_ADMIN to attach its programs.
    let mut agent = if is_root() {
        Command::new(&binary)
    } else if which("sudo") {
        eprintln!("xtask: not root; running the agent through sudo");
        let mut c = Command::new("sudo");
        c.arg("--preserve-env=RUST_LOG").arg(&binary);
        c
    } else {
        bail!(
            "the agent needs root (CAP_BPF, CAP_NET_ADMIN) and sudo is not installed; run as root"
        );
    };
    agent.args(&args);
    eprintln!("xtask: running {agent:?}");
    // exec, so that Ctrl-C and SIGTERM reach the agent directly and its exit code is ours.
    let err = agent.exec();
    Err(err).with_context(|| format!("cannot start {}", binary.display()))
}

/// Builds the demo next to the agent and replaces this process with it.
fn demo(release: bool, agent: &std::path::Path) -> Result<()> {
    crate::setup::ensure(&[crate::setup::Need::Testbed])?;
    let root = workspace_root();
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .current_dir(&root)
        .args(["build", "--package", "plexd-metrics-tests", "--bin", "demo"]);
    if release {
        build.arg("--release");
    }
    run_cmd(&mut build)?;
    let demo = agent.with_file_name("demo");
    let mut cmd = if is_root() {
        Command::new(&demo)
    } else if which("sudo") {
        eprintln!("xtask: not root; running the demo through sudo");
        let mut c = Command::new("sudo");
        c.arg(&demo);
        c
    } else {
        bail!("the demo needs root (network namespaces, wireguard-go, eBPF) and sudo is not installed; run as root");
    };
    cmd.arg("--agent").arg(agent);
    eprintln!("xtask: running {cmd:?}");
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot start {}", demo.display()))
}

/// Whether `program` is on PATH.
pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}
