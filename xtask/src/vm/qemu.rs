//! Boots a kernel with QEMU (TCG: KVM fails on these machines), streams its serial console,
//! and turns what it printed into a [`VmResult`] or an error with the console's tail.
//!
//! The guest's clock runs on instruction counts (`-icount shift=0,sleep=off`: one nanosecond
//! per instruction, idle time skipped). Under plain TCG the guest's time is the host's, and
//! a timer that fires in an idle guest waits for the host to schedule QEMU's thread: on a
//! shared, loaded 2-core machine that added milliseconds to every delayed round trip, and
//! took as much wall time as the scenarios' collect intervals. With icount the guest sees the
//! delays netem makes as netem makes them, and the waits between collect cycles cost no wall
//! time; the boot is slower (instruction counting disables some of TCG's shortcuts).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vm_init::{VmResult, RESULT_MARKER, STARTED_MARKER};

/// Lines of the console shown when a run fails.
const TAIL_LINES: usize = 80;

/// How to boot one VM.
pub struct Boot<'a> {
    /// Short name for the console prefix and messages (`6.12`).
    pub label: &'a str,
    /// The bzImage.
    pub kernel: &'a Path,
    /// The initramfs archive.
    pub initramfs: &'a Path,
    /// Arguments handed to the init (after `--` on the kernel command line).
    pub init_args: &'a [String],
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB (the initramfs lives in it).
    pub memory_mib: u32,
    /// The whole run's bound, boot to power-off.
    pub timeout: Duration,
    /// Where the whole console goes, for reading after the run.
    pub console_log: &'a Path,
}

/// What a finished VM run gave.
#[derive(Debug)]
pub struct Outcome {
    /// The init's result line.
    pub result: VmResult,
    /// Host time from starting QEMU to the init's first line.
    pub to_init: Option<Duration>,
    /// Host time from starting QEMU to its exit.
    pub total: Duration,
}

/// Boots the VM and waits for it to power off, printing its console as it goes.
///
/// Fails, with the console's last lines, when the kernel panics, the init prints no result
/// line, or the run outlasts its timeout (QEMU is then killed).
pub fn boot(b: &Boot<'_>) -> Result<Outcome> {
    let mut append = String::from(
        // panic=-1 and -no-reboot: a panic ends QEMU at once instead of hanging the run.
        "console=ttyS0 panic=-1 oops=panic loglevel=4 printk.time=1 \
         mitigations=off random.trust_cpu=on",
    );
    if !b.init_args.is_empty() {
        append.push_str(" -- ");
        append.push_str(&b.init_args.join(" "));
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-icount", "shift=0,sleep=off"])
        .args(["-cpu", "max", "-machine", "q35"])
        .args(["-smp", &b.cpus.to_string(), "-m", &b.memory_mib.to_string()])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-nic", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(b.kernel)
        .arg("-initrd")
        .arg(b.initramfs)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("xtask vm [{}]: running {cmd:?}", b.label);
    let started = Instant::now();
    let mut child = cmd.spawn().context(
        "cannot start qemu-system-x86_64 (Debian package qemu-system-x86; `cargo xtask setup`)",
    )?;

    // Both streams are read on threads of their own, so a timeout can be noticed while QEMU
    // prints nothing; the lines arrive here in order per stream.
    let (tx, lines) = mpsc::channel::<(bool, String)>();
    let mut readers = Vec::new();
    for (is_console, stream) in [
        (
            true,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
        (
            false,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
    ] {
        let stream = stream.context("piped QEMU output")?;
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&raw);
                        let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                        if tx.send((is_console, line)).is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);

    let mut log = std::fs::File::create(b.console_log)
        .with_context(|| format!("cannot create {}", b.console_log.display()))?;
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    let mut result = None;
    let mut to_init = None;
    let mut panic_line = None;
    let deadline = started + b.timeout;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((is_console, line)) => {
                let shown = if is_console {
                    line.clone()
                } else {
                    format!("qemu: {line}")
                };
                let _ = writeln!(log, "{shown}");
                println!("[vm {}] {shown}", b.label);
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(shown);
                if line.contains(STARTED_MARKER) && to_init.is_none() {
                    to_init = Some(started.elapsed());
                }
                if line.contains(RESULT_MARKER) {
                    result = VmResult::parse(&line);
                }
                if line.contains("Kernel panic") && panic_line.is_none() {
                    panic_line = Some(line);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                // Only QEMU, which this run started, by its own handle.
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("wait for QEMU")?;
    for reader in readers {
        let _ = reader.join();
    }
    let total = started.elapsed();
    let tail_text = || tail.iter().cloned().collect::<Vec<_>>().join("\n");
    if timed_out {
        bail!(
            "the {} VM did not finish within {:?} and was stopped; the console's last lines:\n{}\n(whole console: {})",
            b.label,
            b.timeout,
            tail_text(),
            b.console_log.display()
        );
    }
    if let Some(panic) = panic_line {
        bail!(
            "the {} kernel panicked ({panic}); the console's last lines:\n{}\n(whole console: {})",
            b.label,
            tail_text(),
            b.console_log.display()
        );
    }
    let Some(result) = result else {
        bail!(
            "the {} VM ended ({status}) without a {RESULT_MARKER} line; the console's last lines:\n{}\n(whole console: {})",
            b.label,
            tail_text(),
            b.console_log.display()
        );
    };
    if !result.ok {
        bail!(
            "the {} VM's tests failed ({} passed, {} failed{}); the console's last lines:\n{}\n(whole console: {})",
            b.label,
            result.passed,
            result.failed,
            if result.reason.is_empty() {
                String::new()
            } else {
                format!("; {}", result.reason)
            },
            tail_text(),
            b.console_log.display()
        );
    }
    Ok(Outcome {
        result,
        to_init,
        total,
    })
}
