//! `cargo xtask`: the project's build, run and test entry points.

mod bench;
mod build_ebpf;
mod image;
mod run;
mod setup;
mod test;
mod util;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test plexd-metrics")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the project needs (Debian packages, bpf-linker); idempotent.
    Setup(setup::Options),
    /// Build the kernel programs and place the object where the agent embeds it.
    BuildEbpf(build_ebpf::Options),
    /// Build both sides and run the agent as root.
    Run(run::Options),
    /// Run every test this machine can run, privileged ones included.
    Test(test::Options),
    /// Measure the performance goals, each beside a baseline from the same run.
    Bench(bench::Options),
    /// Build the agent's container image from scratch with buildah (as root).
    Image(image::Options),
    /// Integration tests that need more than this machine's kernel.
    IntegrationTest {
        #[command(subcommand)]
        suite: IntegrationSuite,
    },
}

#[derive(Subcommand)]
enum IntegrationSuite {
    /// Kernel WireGuard and netem in QEMU, on Debian's 6.1 and 6.12 cloud kernels.
    Vm(vm::Options),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup(o) => setup::run(&o),
        Command::BuildEbpf(o) => build_ebpf::run(&o),
        Command::Run(o) => run::run(&o),
        Command::Test(o) => test::run(&o),
        Command::Bench(o) => bench::run(&o),
        Command::Image(o) => image::run(&o),
        Command::IntegrationTest {
            suite: IntegrationSuite::Vm(o),
        } => {
            let mut tally = util::Tally::default();
            vm::run(&o, &mut tally)?;
            println!("xtask: {}", tally.summary());
            Ok(())
        }
    }
}
