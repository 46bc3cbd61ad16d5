//! `cargo xtask integration-test vm`: the agent against real kernel WireGuard and netem, in
//! QEMU, on Debian's 6.1 and 6.12 cloud kernels.
//!
//! The host has neither the WireGuard module nor netem, so the scenarios (the test target
//! `vm_kernel` of `plexd-metrics-tests`) run in a VM: the kernel package is fetched once and
//! cached under `target/vm`, an initramfs is built around the Rust `/init` of `vm-init`, and
//! the console is streamed until the init's result line. The same binaries boot on both
//! kernels; the 6.1 kernel attaches the TC programs through netlink and clsact, 6.12 through
//! TCX.
//!
//! Each kernel boots twice: once with the Rust init running `vm_kernel` itself, and once with
//! Debian's systemd as PID 1 running `vm_systemd`, whose scenarios start the agent from the
//! unit in `deploy/systemd` (see [`systemd`]). A filter after `--` boots only the VMs whose
//! scenario binary has tests it selects.

mod initramfs;
mod kernel;
mod qemu;
mod systemd;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vm_init::{AGENT_PATH, MODULE_LIST, TEST_DIR};

use crate::build_ebpf;
use crate::setup::{self, find_on_path, Need};
use crate::util::{target_dir, workspace_root, Tally};

pub use kernel::{Series, LINUX_6_1, LINUX_6_12};

/// How a VM boots, and which scenario binary it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum BootKind {
    /// The Rust init runs `vm_kernel` as PID 1's child.
    Init,
    /// systemd is PID 1 and its driver unit runs `vm_systemd`.
    Systemd,
}

impl BootKind {
    const ALL: [BootKind; 2] = [BootKind::Init, BootKind::Systemd];

    /// The scenarios' test target in `plexd-metrics-tests` (`test = false`: it needs the VM,
    /// so only this command runs it).
    fn test_target(self) -> &'static str {
        match self {
            BootKind::Init => "vm_kernel",
            BootKind::Systemd => systemd::TEST_TARGET,
        }
    }

    /// For file names and the report.
    fn name(self) -> &'static str {
        match self {
            BootKind::Init => "init",
            BootKind::Systemd => "systemd",
        }
    }
}

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
    /// How the VM booted: `init` or `systemd`.
    pub boot: &'static str,
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
    let unit = systemd::Systemd::find()?;
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

    // Only the boots with something to run: a filter may select one binary's tests alone.
    let mut boots = Vec::new();
    for kind in BootKind::ALL {
        let selected = selected_tests(&binaries.tests[&kind], &o.args)?;
        if selected > 0 {
            boots.push(kind);
        } else {
            eprintln!(
                "xtask vm: no {} scenario matches {:?}; no {} boot",
                kind.test_target(),
                o.args,
                kind.name()
            );
        }
    }
    if boots.is_empty() {
        bail!("no VM scenario matches {:?}", o.args);
    }

    let mut timings = Vec::new();
    let mut failures = Vec::new();
    for series in o.kernel.series() {
        for &kind in &boots {
            let kernel_started = Instant::now();
            match run_kernel(series, kind, o, &cache, &common, &unit, &init_args) {
                Ok(timing) => {
                    tally.add_counts(timing.passed, 0, 0);
                    timings.push(timing);
                }
                Err(e) => {
                    eprintln!("xtask vm [{} {}]: FAILED: {e:#}", series.label, kind.name());
                    println!(
                        "xtask vm [{} {}]: failed after {:.1} s (load average now {})",
                        series.label,
                        kind.name(),
                        kernel_started.elapsed().as_secs_f64(),
                        loadavg()
                    );
                    failures.push(format!("{} {}: {e:#}", series.label, kind.name()));
                }
            }
        }
    }
    let whole = started.elapsed();
    print_timings(&timings, whole);
    if !failures.is_empty() {
        tally.add_counts(0, failures.len() as u64, 0);
        bail!(
            "VM tests failed in {} boot(s):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok((timings, whole))
}

fn run_kernel(
    series: Series,
    kind: BootKind,
    o: &Options,
    cache: &Path,
    common: &Common,
    unit: &systemd::Systemd,
    init_args: &[String],
) -> Result<Timing> {
    let load_before = loadavg();
    let prepare_started = Instant::now();
    let kernel = kernel::prepare(series, cache)?;
    let dir = cache.join(series.label);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (archive, console_log) = match kind {
        BootKind::Init => (dir.join("initramfs.cpio"), dir.join("console.log")),
        BootKind::Systemd => (
            dir.join("initramfs-systemd.cpio"),
            dir.join("console-systemd.log"),
        ),
    };
    let mut fs = common.initramfs_with_modules(&kernel, kind)?;
    if kind == BootKind::Systemd {
        unit.add_to(&mut fs)?;
    }
    let size = fs.write(&archive)?;
    let prepare = prepare_started.elapsed();
    let label = match kind {
        BootKind::Init => series.label.to_owned(),
        BootKind::Systemd => format!("{} systemd", series.label),
    };
    eprintln!(
        "xtask vm [{label}]: {} ({}), initramfs {:.0} MiB, ready in {:.1} s",
        kernel.release,
        kernel.package,
        size as f64 / (1 << 20) as f64,
        prepare.as_secs_f64()
    );
    let outcome = qemu::boot(&qemu::Boot {
        label: &label,
        kernel: &kernel.vmlinuz,
        initramfs: &archive,
        init_args,
        cpus: o.cpus,
        // The initramfs stays in memory; the scenarios need little beside it.
        memory_mib: 1024 + (size >> 20) as u32,
        timeout: Duration::from_secs(o.timeout),
        console_log: &console_log,
    })?;
    if outcome.result.ignored > 0 {
        bail!(
            "{} test(s) in the VM are #[ignore]d; every test must run",
            outcome.result.ignored
        );
    }
    Ok(Timing {
        label: series.label,
        boot: kind.name(),
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
        "  {:<6} {:<7} {:<28} {:<15} {:>8} {:>9} {:>10} {:>8} {:>8} {:>6}  load",
        "kernel",
        "boot",
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
            "  {:<6} {:<7} {:<28} {:<15} {:>7.1}s {:>8} {:>9.1}s {:>7.1}s {:>7.1}s {:>6}  {} / {}",
            t.label,
            t.boot,
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
        "xtask vm: {} boot(s) in {:.1} s, builds included (budget: 600 s for both kernels)",
        timings.len(),
        whole.as_secs_f64()
    );
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The binaries built on the host: the init and the agent go into every VM, each scenario
/// binary into the VMs of its [`BootKind`].
struct Binaries {
    init: PathBuf,
    agent: PathBuf,
    tests: BTreeMap<BootKind, PathBuf>,
}

/// Builds the init, the agent and the scenario test binaries (debug profile, as `cargo xtask
/// test` builds the rest, so nothing is compiled twice).
fn build_binaries() -> Result<Binaries> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::util::cargo_build(
        false,
        &["plexd-metrics", "vm-init"],
        &["plexd-metrics", "vm-init"],
    )?;
    let mut build = Command::new(&cargo);
    build
        .current_dir(&root)
        .args(["test", "--package", "plexd-metrics-tests"]);
    for kind in BootKind::ALL {
        build.args(["--test", kind.test_target()]);
    }
    let out = build
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the VM scenarios failed: {}", out.status);
    }
    let messages = String::from_utf8_lossy(&out.stdout);
    let mut tests = BTreeMap::new();
    for kind in BootKind::ALL {
        let target = kind.test_target();
        let executable = test_executable(&messages, target).with_context(|| {
            format!("cargo reported no executable for the test target {target}")
        })?;
        tests.insert(kind, executable);
    }
    let debug = target_dir().join("debug");
    Ok(Binaries {
        init: debug.join("vm-init"),
        agent: debug.join("plexd-metrics"),
        tests,
    })
}

/// The executable of the test target `target` in cargo's JSON messages.
fn test_executable(messages: &str, target: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == target)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// How many tests of the scenario binary `executable` the libtest arguments `args` select,
/// asked of the binary itself on the host (`--list` runs no test).
fn selected_tests(executable: &Path, args: &[String]) -> Result<usize> {
    let out = Command::new(executable)
        .args(["--list", "--format", "terse"])
        .args(args)
        .output()
        .with_context(|| format!("cannot run {} --list", executable.display()))?;
    if !out.status.success() {
        bail!(
            "{} --list {args:?} failed ({}): {}",
            executable.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count())
}

/// What every kernel's initramfs shares, built once per run: the init, the agent, the tools,
/// and each boot's scenario binary.
struct Common {
    binaries: Vec<(PathBuf, PathBuf)>,
    tests: BTreeMap<BootKind, (PathBuf, PathBuf)>,
    host_programs: Vec<PathBuf>,
    host_dirs: Vec<PathBuf>,
}

/// Strips the debug info of the built binaries into `stage` (a debug build is mostly debug
/// info, and every byte of the initramfs is copied and unpacked under emulation).
fn common_initramfs(b: &Binaries, stage: &Path) -> Result<Common> {
    let strip = |source: &Path, dest: PathBuf| -> Result<(PathBuf, PathBuf)> {
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
        Ok((staged, dest))
    };
    let binaries = vec![
        strip(&b.init, PathBuf::from("/init"))?,
        strip(&b.agent, PathBuf::from(AGENT_PATH))?,
    ];
    let mut tests = BTreeMap::new();
    for (&kind, executable) in &b.tests {
        // The target's name without cargo's hash.
        let dest = Path::new(TEST_DIR).join(kind.test_target());
        tests.insert(kind, strip(executable, dest)?);
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
        tests,
        host_programs,
        host_dirs,
    })
}

impl Common {
    fn initramfs_with_modules(
        &self,
        kernel: &kernel::Kernel,
        kind: BootKind,
    ) -> Result<initramfs::Initramfs> {
        let mut fs = initramfs::Initramfs::new();
        let binaries = self.binaries.iter().chain(self.tests.get(&kind));
        for (staged, dest) in binaries.clone() {
            fs.file(dest, staged, 0o755);
        }
        // The binaries are dynamically linked against the host's glibc: bring its libraries.
        for (staged, _) in binaries {
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
            test_executable(messages, "vm_kernel"),
            Some(PathBuf::from("/t/debug/deps/vm_kernel-0123"))
        );
        assert_eq!(test_executable(messages, "vm_systemd"), None);
        assert_eq!(test_executable("{}", "vm_kernel"), None);
    }
}
