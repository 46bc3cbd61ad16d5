//! `/init` of the integration-test VM (PID 1 of a kernel booted by `cargo xtask
//! integration-test vm`).
//!
//! It mounts what the agent and the tests expect (proc, sys, devtmpfs, tmpfs, bpffs, cgroup2,
//! debugfs), loads the kernel modules the initramfs carries, runs every test binary in
//! [`TEST_DIR`] with the arguments the host put after `--` on the kernel command line, prints
//! one [`VmResult`] line and powers the machine off. It never returns: PID 1 exiting would
//! panic the kernel, and the host would learn less than from the result line.
//!
//! In a systemd boot (the initramfs has [`SYSTEMD_BOOT`]) it mounts and loads the modules as
//! usual, then execs systemd as PID 1; systemd starts [`vm_init::DRIVER_UNIT`], which runs this
//! program again, not as PID 1: it runs the test binaries, prints the result line and powers
//! off, as the init does in an ordinary boot.
//!
//! System calls go through `libc` directly: nix has wrappers, but enabling its `mount`, `kmod`
//! and `reboot` features here would change nix's feature set for the whole workspace and
//! rebuild every crate that uses it.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use vm_init::{
    libtest_counts, VmResult, AGENT_PATH, MODULE_LIST, STARTED_MARKER, SYSTEMD_BOOT, TEST_ARGS,
    TEST_DIR,
};

/// A step that stops the run: what failed, in words for the result line.
type Failure = String;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 {
        as_init(&args)
    } else {
        as_driver()
    }
}

/// PID 1: mounts, loads the modules, then runs the tests itself or, in a systemd boot, hands
/// PID 1 over to systemd.
fn as_init(args: &[String]) -> ! {
    let mut result = start_result();
    say(&format!(
        "{STARTED_MARKER} kernel {} reached userspace after {:.2} s",
        result.kernel, result.boot_seconds
    ));
    let outcome = prepare().and_then(|()| match std::fs::read_to_string(SYSTEMD_BOOT) {
        Ok(systemd) => Err(exec_systemd(systemd.trim(), args)),
        Err(_) => run_tests(args, &mut result),
    });
    finish(result, outcome)
}

/// Started by [`vm_init::DRIVER_UNIT`] in a systemd boot: runs the tests with the arguments PID 1 left
/// behind. `boot_s` of the result is then the time until systemd started this unit.
fn as_driver() -> ! {
    let mut result = start_result();
    say(&format!(
        "vm-init: started by systemd after {:.2} s",
        result.boot_seconds
    ));
    let outcome = std::fs::read_to_string(TEST_ARGS)
        .map_err(|e| format!("cannot read {TEST_ARGS}: {e}"))
        .and_then(|text| {
            let args: Vec<String> = text.lines().map(str::to_owned).collect();
            run_tests(&args, &mut result)
        });
    finish(result, outcome)
}

fn start_result() -> VmResult {
    VmResult {
        ok: false,
        passed: 0,
        failed: 0,
        ignored: 0,
        kernel: kernel_release(),
        boot_seconds: uptime(),
        test_seconds: 0.0,
        reason: String::new(),
    }
}

/// Prints the result line and powers off.
fn finish(mut result: VmResult, outcome: Result<(), Failure>) -> ! {
    match outcome {
        Ok(()) => result.ok = result.failed == 0 && result.passed > 0,
        Err(reason) => result.reason = reason,
    }
    if result.passed == 0 && result.failed == 0 && result.reason.is_empty() {
        result.reason = "no test ran".into();
    }
    say(&result.to_string());
    power_off();
}

/// Leaves the test arguments for [`vm_init::DRIVER_UNIT`] and execs systemd as PID 1; returns only
/// when that fails, saying why.
fn exec_systemd(systemd: &str, args: &[String]) -> Failure {
    let text: String = args.iter().map(|a| format!("{a}\n")).collect();
    if let Err(e) = std::fs::write(TEST_ARGS, text) {
        return format!("cannot write {TEST_ARGS}: {e}");
    }
    say(&format!("vm-init: handing PID 1 over to {systemd}"));
    let e = Command::new(systemd).exec();
    format!("cannot exec {systemd}: {e}")
}

/// Writes a line to the console at once (stdout is the console; nothing buffers it).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn uptime() -> f64 {
    // /proc is not mounted yet at the very start; read it after mounting when it fails.
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .or_else(|| {
            mount("proc", "/proc", "proc", "").ok()?;
            std::fs::read_to_string("/proc/uptime").ok()
        })
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it and returns 0 on success.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Mounts the file systems and loads the modules.
fn prepare() -> Result<(), Failure> {
    // (source, target, type, options); proc may already be mounted by `uptime`.
    const MOUNTS: &[(&str, &str, &str, &str)] = &[
        ("sysfs", "/sys", "sysfs", ""),
        ("devtmpfs", "/dev", "devtmpfs", "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", "mode=1777"),
        ("tmpfs", "/run", "tmpfs", "mode=0755"),
        ("bpffs", "/sys/fs/bpf", "bpf", "mode=0700"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", ""),
        ("debugfs", "/sys/kernel/debug", "debugfs", ""),
    ];
    if !Path::new("/proc/self").exists() {
        mount("proc", "/proc", "proc", "")?;
    }
    for &(source, target, fstype, options) in MOUNTS {
        mount(source, target, fstype, options)?;
    }
    // wireguard-go and some tools still use /var/run.
    let _ = std::fs::create_dir_all("/var");
    let _ = std::os::unix::fs::symlink("/run", "/var/run");
    load_modules()
}

fn mount(source: &str, target: &str, fstype: &str, options: &str) -> Result<(), Failure> {
    std::fs::create_dir_all(target).map_err(|e| format!("cannot create {target}: {e}"))?;
    let c = |s: &str| CString::new(s).expect("no NUL in mount arguments");
    let (source_c, target_c, fstype_c, options_c) = (c(source), c(target), c(fstype), c(options));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            0,
            options_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Loads the modules of [`MODULE_LIST`] in order. The host wrote them decompressed, with
/// their dependencies before them; one that is already there (built in, or loaded as a
/// dependency) is fine.
fn load_modules() -> Result<(), Failure> {
    let list = std::fs::read_to_string(MODULE_LIST)
        .map_err(|e| format!("cannot read {MODULE_LIST}: {e}"))?;
    let mut loaded = Vec::new();
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let params = CString::default();
        // SAFETY: a valid file descriptor and NUL-terminated (empty) parameters.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                params.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("cannot load module {path}: {e}"));
            }
        }
        loaded.push(
            Path::new(path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    say(&format!("vm-init: modules loaded: {}", loaded.join(" ")));
    Ok(())
}

/// Runs every test binary, adding up their libtest result lines into `result`.
fn run_tests(args: &[String], result: &mut VmResult) -> Result<(), Failure> {
    let mut binaries: Vec<PathBuf> = std::fs::read_dir(TEST_DIR)
        .map_err(|e| format!("cannot list {TEST_DIR}: {e}"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect();
    binaries.sort();
    if binaries.is_empty() {
        return Err(format!("no test binary in {TEST_DIR}"));
    }
    let started = Instant::now();
    let outcome = binaries
        .iter()
        .try_for_each(|binary| run_test_binary(binary, args, result));
    result.test_seconds = started.elapsed().as_secs_f64();
    outcome
}

fn run_test_binary(binary: &Path, args: &[String], result: &mut VmResult) -> Result<(), Failure> {
    let name = binary.file_name().map_or_else(
        || binary.display().to_string(),
        |n| String::from_utf8_lossy(n.as_bytes()).into_owned(),
    );
    say(&format!("vm-init: running {name} {}", args.join(" ")));
    let mut child = Command::new(binary)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("TMPDIR", "/tmp")
        .env("RUST_BACKTRACE", "1")
        // The tests must run, never skip (see plexd_metrics_tests::require_privileges).
        .env("PLEXD_METRICS_REQUIRE_PRIVILEGED", "1")
        .env("PLEXD_METRICS_BIN", AGENT_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut counted = false;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        say(&line);
        if let Some((passed, failed, ignored)) = libtest_counts(&line) {
            result.passed += passed;
            result.failed += failed;
            result.ignored += ignored;
            counted = true;
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for {name}: {e}"))?;
    // A failed test makes libtest exit 101 after its result line; anything else without one
    // (a crash, a signal) is a failure of its own.
    if !counted {
        return Err(match status.signal() {
            Some(signal) => format!("{name} was killed by signal {signal} before its result"),
            None => format!("{name} exited with {status} without a test result line"),
        });
    }
    Ok(())
}

fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only reached if the kernel refused; the host's timeout ends the VM then.
    say(&format!(
        "vm-init: power off failed: {}",
        std::io::Error::last_os_error()
    ));
    loop {
        std::thread::park();
    }
}
