//! `cargo xtask integration-test vm`: the agent against real kernel WireGuard and netem, in
//! QEMU, on Debian's 6.1 and 6.12 cloud kernels.
//!
//! The host has neither the WireGuard module nor netem, so the scenarios (the test target
//! `vm_kernel` of `plexd-metrics-tests`) run in a VM: the kernel package is fetched once and
//! cached under `target/vm`, an initramfs is built around the Rust `/init` of `vm-init`, and
//! the console is streamed until the init's result line. The same binaries boot on both
//! kernels; the 6.1 kernel attaches the TC programs through netlink and clsact, 6.12 through
//! TCX.

mod initramfs;
mod kernel;
mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vm_init::{AGENT_PATH, MODULE_LIST, TEST_DIR};

use crate::build_ebpf;
use crate::setup::{self, find_on_path, Need};
use crate::util::{workspace_root, Tally};

pub use kernel::{Series, LINUX_6_1, LINUX_6_12};

/// The scenarios' test target in `plexd-metrics-tests` (`test = false`: it needs the VM's
/// kernel, so only this command runs it).
const TEST_TARGET: &str = "vm_kernel";
/// Tools the scenarios drive, taken from the host with their libraries.
const TOOLS: &[&str] = &["ip", "tc", "wg", "ping"];
/// netem's delay distribution tables, where Debian's iproute2 keeps them.
const TC_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu/tc";

/// Which kernels to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    /// Debian 12's 6.1 (netlink/clsact attachment).
    #[value(name = "6.1")]
    V6_1,
    /// 6.12 (TCX attachment).
    #[value(name = "6.12")]
    V6_12,
    /// Both, one after the other.
    All,
}

impl KernelChoice {
    fn series(self) -> Vec<Series> {
        match self {
            KernelChoice::V6_1 => vec![LINUX_6_1],
            KernelChoice::V6_12 => vec![LINUX_6_12],
            KernelChoice::All => vec![LINUX_6_1, LINUX_6_12],
        }
    }
}

/// Options of `cargo xtask integration-test vm`.
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// The kernel(s) to boot.
    #[arg(long, value_enum, default_value = "all")]
    pub kernel: KernelChoice,
    /// Bound on one VM's run, boot to power-off, in seconds.
    #[arg(long, default_value_t = 420)]
    pub timeout: u64,
    /// Virtual CPUs of the VM (TCG runs one host thread per CPU).
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Arguments for the scenario test binary inside the VM (after `--`), e.g. a test name.
    #[arg(last = true)]
    pub args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kernel: KernelChoice::All,
            timeout: 420,
            cpus: 2,
            args: Vec::new(),
        }
    }
}

/// Timings of one kernel's run, for the closing table.
pub struct Timing {
    /// The kernel series (`6.1`, `6.12`).
    pub label: &'static str,
    release: String,
    attach: &'static str,
    prepare: Duration,
    to_init: Option<Duration>,
    guest_boot: f64,
    tests: f64,
    /// Host time from starting QEMU to its exit.
    pub total: Duration,
    passed: u64,
    load_before: String,
    load_after: String,
}

/// Runs the VM tests on the chosen kernels; their test counts are added to `tally`.
pub fn run(o: &Options, tally: &mut Tally) -> Result<()> {
    run_timed(o, tally).map(drop)
}

/// [`run`], returning each kernel's timings and the whole run's wall time (builds included).
pub fn run_timed(o: &Options, tally: &mut Tally) -> Result<(Vec<Timing>, Duration)> {
    setup::ensure(&[Need::Testbed, Need::Vm])?;
    let started = Instant::now();
    build_ebpf::build(false)?;
    let binaries = build_binaries()?;
    let root = workspace_root();
    let cache = root.join("target").join("vm");
    let stage = cache.join("stage");
    std::fs::create_dir_all(&stage)
        .with_context(|| format!("cannot create {}", stage.display()))?;
    let common = common_initramfs(&binaries, &stage)?;
    eprintln!(
        "xtask vm: binaries built and staged in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut init_args = vec![
        // One scenario at a time: with an instruction-counted clock the guest runs on one
        // host thread anyway and its idle waits cost nothing, while scenarios side by side
        // would take each other's CPU time, which the guest's clock counts (a verifier run
        // beside the latency scenario adds milliseconds to its round trips).
        "--test-threads=1".to_owned(),
        // The scenarios print their measured figures (`vm-figure: ...`) for the report.
        "--show-output".to_owned(),
    ];
    init_args.extend(o.args.iter().cloned());

    let mut timings = Vec::new();
    let mut failures = Vec::new();
    for series in o.kernel.series() {
        let kernel_started = Instant::now();
        match run_kernel(series, o, &cache, &common, &init_args) {
            Ok(timing) => {
                tally.add_counts(timing.passed, 0, 0);
                timings.push(timing);
            }
            Err(e) => {
                eprintln!("xtask vm [{}]: FAILED: {e:#}", series.label);
                println!(
                    "xtask vm [{}]: failed after {:.1} s (load average now {})",
                    series.label,
                    kernel_started.elapsed().as_secs_f64(),
                    loadavg()
                );
                failures.push(format!("{}: {e:#}", series.label));
            }
        }
    }
    let whole = started.elapsed();
    print_timings(&timings, whole);
    if !failures.is_empty() {
        tally.add_counts(0, failures.len() as u64, 0);
        bail!(
            "VM tests failed on {} kernel(s):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok((timings, whole))
}

fn run_kernel(
    series: Series,
    o: &Options,
    cache: &Path,
    common: &Common,
    init_args: &[String],
) -> Result<Timing> {
    let load_before = loadavg();
    let prepare_started = Instant::now();
    let kernel = kernel::prepare(series, cache)?;
    let dir = cache.join(series.label);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let archive = dir.join("initramfs.cpio");
    let size = common.initramfs_with_modules(&kernel)?.write(&archive)?;
    let prepare = prepare_started.elapsed();
    eprintln!(
        "xtask vm [{}]: {} ({}), initramfs {:.0} MiB, ready in {:.1} s",
        series.label,
        kernel.release,
        kernel.package,
        size as f64 / (1 << 20) as f64,
        prepare.as_secs_f64()
    );
    let outcome = qemu::boot(&qemu::Boot {
        label: series.label,
        kernel: &kernel.vmlinuz,
        initramfs: &archive,
        init_args,
        cpus: o.cpus,
        // The initramfs stays in memory; the scenarios need little beside it.
        memory_mib: 1024 + (size >> 20) as u32,
        timeout: Duration::from_secs(o.timeout),
        console_log: &dir.join("console.log"),
    })?;
    if outcome.result.ignored > 0 {
        bail!(
            "{} test(s) in the VM are #[ignore]d; every test must run",
            outcome.result.ignored
        );
    }
    Ok(Timing {
        label: series.label,
        release: outcome.result.kernel.clone(),
        attach: series.attach,
        prepare,
        to_init: outcome.to_init,
        guest_boot: outcome.result.boot_seconds,
        tests: outcome.result.test_seconds,
        total: outcome.total,
        passed: outcome.result.passed,
        load_before,
        load_after: loadavg(),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn print_timings(timings: &[Timing], whole: Duration) {
    if timings.is_empty() {
        return;
    }
    println!(
        "xtask vm: timings (host has {} CPUs; load average before/after each run)",
        cpus()
    );
    println!(
        "  {:<6} {:<28} {:<15} {:>8} {:>9} {:>10} {:>8} {:>8} {:>6}  load",
        "kernel",
        "release",
        "attach",
        "prepare",
        "to init",
        "guest boot",
        "tests",
        "VM total",
        "passed"
    );
    for t in timings {
        println!(
            "  {:<6} {:<28} {:<15} {:>7.1}s {:>8} {:>9.1}s {:>7.1}s {:>7.1}s {:>6}  {} / {}",
            t.label,
            t.release,
            t.attach,
            t.prepare.as_secs_f64(),
            t.to_init
                .map_or_else(|| "?".into(), |d| format!("{:.1}s", d.as_secs_f64())),
            t.guest_boot,
            t.tests,
            t.total.as_secs_f64(),
            t.passed,
            t.load_before,
            t.load_after
        );
    }
    println!(
        "xtask vm: {} kernel(s) in {:.1} s, builds included (budget: 600 s for both)",
        timings.len(),
        whole.as_secs_f64()
    );
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The binaries built on the host that go into every VM.
struct Binaries {
    init: PathBuf,
    agent: PathBuf,
    tests: PathBuf,
}

/// Builds the init, the agent and the scenario test binary (debug profile, as `cargo xtask
/// test` builds the rest, so nothing is compiled twice).
fn build_binaries() -> Result<Binaries> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::util::cargo_build(
        false,
        &["plexd-metrics", "vm-init"],
        &["plexd-metrics", "vm-init"],
    )?;
    let out = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "test",
            "--package",
            "plexd-metrics-tests",
            "--test",
            TEST_TARGET,
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the VM scenarios ({TEST_TARGET}) failed: {}",
            out.status
        );
    }
    let tests = test_executable(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
        format!("cargo reported no executable for the test target {TEST_TARGET}")
    })?;
    let debug = root.join("target").join("debug");
    Ok(Binaries {
        init: debug.join("vm-init"),
        agent: debug.join("plexd-metrics"),
        tests,
    })
}

/// The executable of [`TEST_TARGET`] in cargo's JSON messages.
fn test_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == TEST_TARGET)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// What every kernel's initramfs shares: built once per run.
struct Common {
    binaries: Vec<(PathBuf, PathBuf)>,
    host_programs: Vec<PathBuf>,
    host_dirs: Vec<PathBuf>,
}

/// Strips the debug info of the built binaries into `stage` (a debug build is mostly debug
/// info, and every byte of the initramfs is copied and unpacked under emulation).
fn common_initramfs(b: &Binaries, stage: &Path) -> Result<Common> {
    let test_name = b
        .tests
        .file_name()
        .and_then(|n| n.to_str())
        .map_or(TEST_TARGET.to_owned(), |n| {
            n.split('-').next().unwrap_or(n).to_owned()
        });
    let mut binaries = Vec::new();
    for (source, dest) in [
        (&b.init, PathBuf::from("/init")),
        (&b.agent, PathBuf::from(AGENT_PATH)),
        (&b.tests, Path::new(TEST_DIR).join(&test_name)),
    ] {
        let staged = stage.join(dest.file_name().context("binary name")?);
        let status = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(source)
            .arg(&staged)
            .status()
            .context("cannot run objcopy (package binutils)")?;
        if !status.success() {
            bail!(
                "objcopy --strip-debug {} failed: {status}",
                source.display()
            );
        }
        binaries.push((staged, dest));
    }
    let mut host_programs = Vec::new();
    for tool in TOOLS {
        host_programs.push(
            find_on_path(tool)
                .or_else(|| {
                    ["/usr/sbin", "/sbin"]
                        .iter()
                        .map(|d| Path::new(d).join(tool))
                        .find(|p| p.is_file())
                })
                .with_context(|| format!("{tool} is not installed; run `cargo xtask setup`"))?,
        );
    }
    let host_dirs = [TC_LIB_DIR]
        .iter()
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .collect();
    Ok(Common {
        binaries,
        host_programs,
        host_dirs,
    })
}

impl Common {
    fn initramfs_with_modules(&self, kernel: &kernel::Kernel) -> Result<initramfs::Initramfs> {
        let mut fs = initramfs::Initramfs::new();
        for (staged, dest) in &self.binaries {
            fs.file(dest, staged, 0o755);
        }
        // The binaries are dynamically linked against the host's glibc: bring its libraries.
        for (staged, _) in &self.binaries {
            fs.host_libraries_of(staged)?;
        }
        for program in &self.host_programs {
            fs.host_program(program)?;
        }
        for dir in &self.host_dirs {
            fs.host_dir_files(dir)?;
        }
        let module_dir = Path::new("/usr/lib/modules").join(&kernel.release);
        let mut list = String::new();
        for module in &kernel.modules {
            let dest = module_dir.join(module.file_name().context("module file name")?);
            fs.file(&dest, module, 0o644);
            list.push_str(&dest.display().to_string());
            list.push('\n');
        }
        fs.bytes(Path::new(MODULE_LIST), list.into_bytes(), 0o644);
        Ok(fs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_executable_comes_from_cargos_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"plexd_metrics_tests"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"vm_kernel"},"executable":"/t/debug/deps/vm_kernel-0123"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            test_executable(messages),
            Some(PathBuf::from("/t/debug/deps/vm_kernel-0123"))
        );
        assert_eq!(test_executable("{}"), None);
    }
}
