//! The contract between `cargo xtask integration-test vm` and the VM's `/init`: where the
//! initramfs keeps things, and the one result line the init prints on the serial console.
//!
//! Both sides use this crate, so the host never parses a format the guest does not write.

#![warn(missing_docs)]

use std::fmt;

/// Text file in the initramfs listing the kernel modules to load, one path a line, in load
/// order (dependencies first).
pub const MODULE_LIST: &str = "/etc/plexd-vm/modules";
/// Directory in the initramfs whose executables are the test binaries, run in name order.
pub const TEST_DIR: &str = "/tests";
/// Where the agent binary is in the initramfs (`PLEXD_METRICS_BIN` of the tests).
pub const AGENT_PATH: &str = "/usr/bin/plexd-metrics";
/// Present only in the initramfs of a systemd boot: the path of the systemd binary that the
/// init, once it has mounted and loaded the modules, execs as PID 1. The test binaries then
/// run under [`DRIVER_UNIT`], which starts the same init again, as an ordinary process.
pub const SYSTEMD_BOOT: &str = "/etc/plexd-vm/systemd";
/// Where the init of a systemd boot leaves its arguments (one a line) for [`DRIVER_UNIT`]:
/// systemd does not hand the kernel command line's `--` arguments to its services.
pub const TEST_ARGS: &str = "/etc/plexd-vm/test-args";
/// The unit of a systemd boot that runs the test binaries and powers the machine off.
pub const DRIVER_UNIT: &str = "plexd-vm-driver.service";
/// The first word of the result line; nothing else on the console starts with it.
pub const RESULT_MARKER: &str = "PLEXD-VM-RESULT";
/// Printed by the init as soon as it runs, so the host can time the boot.
pub const STARTED_MARKER: &str = "PLEXD-VM-INIT";

/// What one VM run found: the init's summary of every test binary it ran.
#[derive(Clone, Debug, PartialEq)]
pub struct VmResult {
    /// Every test binary ran and none failed.
    pub ok: bool,
    /// Tests passed, summed over the binaries' `test result:` lines.
    pub passed: u64,
    /// Tests failed.
    pub failed: u64,
    /// Tests marked `#[ignore]` (the project allows none; the host fails on any).
    pub ignored: u64,
    /// `uname -r` of the guest.
    pub kernel: String,
    /// Seconds from the kernel's start to the init's first instruction (`/proc/uptime`).
    pub boot_seconds: f64,
    /// Seconds the test binaries ran.
    pub test_seconds: f64,
    /// Why the run failed when it failed for another reason than failed tests (a mount, a
    /// module, a binary that crashed); empty otherwise.
    pub reason: String,
}

impl fmt::Display for VmResult {
    /// One line: `PLEXD-VM-RESULT ok passed=N failed=N ignored=N kernel=K boot_s=B tests_s=T
    /// reason=...`; the reason is last because it may contain spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{RESULT_MARKER} {} passed={} failed={} ignored={} kernel={} boot_s={:.2} tests_s={:.2} reason={}",
            if self.ok { "ok" } else { "failed" },
            self.passed,
            self.failed,
            self.ignored,
            self.kernel,
            self.boot_seconds,
            self.test_seconds,
            // One line, whatever the reason's text.
            self.reason.replace(['\n', '\r'], " ")
        )
    }
}

impl VmResult {
    /// Reads a result line back; `None` for any other console line (or a garbled one: the
    /// host then fails for lack of a result, with the log tail).
    pub fn parse(line: &str) -> Option<Self> {
        // The console may prefix kernel messages or carriage returns; the marker anchors it.
        let rest = &line[line.find(RESULT_MARKER)? + RESULT_MARKER.len()..];
        let (fields, reason) = rest.split_once(" reason=")?;
        let mut words = fields.split_whitespace();
        let ok = match words.next()? {
            "ok" => true,
            "failed" => false,
            _ => return None,
        };
        let mut result = Self {
            ok,
            passed: 0,
            failed: 0,
            ignored: 0,
            kernel: String::new(),
            boot_seconds: 0.0,
            test_seconds: 0.0,
            reason: reason.trim_end().to_owned(),
        };
        for word in words {
            let (key, value) = word.split_once('=')?;
            match key {
                "passed" => result.passed = value.parse().ok()?,
                "failed" => result.failed = value.parse().ok()?,
                "ignored" => result.ignored = value.parse().ok()?,
                "kernel" => result.kernel = value.to_owned(),
                "boot_s" => result.boot_seconds = value.parse().ok()?,
                "tests_s" => result.test_seconds = value.parse().ok()?,
                _ => return None,
            }
        }
        Some(result)
    }
}

/// Test counts of one libtest `test result:` line (`passed`, `failed`, `ignored`).
pub fn libtest_counts(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    for part in rest.split([';', '.']) {
        let mut words = part.split_whitespace();
        if let (Some(n), Some(what)) = (words.next(), words.next()) {
            if let Ok(n) = n.parse::<u64>() {
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    Some((passed, failed, ignored))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmResult {
        VmResult {
            ok: false,
            passed: 5,
            failed: 2,
            ignored: 0,
            kernel: "6.1.0-56-cloud-amd64".into(),
            boot_seconds: 2.5,
            test_seconds: 81.25,
            reason: "vm_kernel exited with signal 11\nsecond line".into(),
        }
    }

    #[test]
    fn a_result_line_reads_back_as_written() {
        let line = sample().to_string();
        assert!(!line.contains('\n'), "{line}");
        let back = VmResult::parse(&format!("\r[   12.5] {line}\r")).expect("parses");
        assert_eq!(
            back,
            VmResult {
                reason: "vm_kernel exited with signal 11 second line".into(),
                ..sample()
            }
        );
        let ok = VmResult {
            ok: true,
            failed: 0,
            reason: String::new(),
            ..sample()
        };
        assert_eq!(VmResult::parse(&ok.to_string()), Some(ok));
    }

    #[test]
    fn other_console_lines_are_not_results() {
        assert_eq!(VmResult::parse("test result: ok. 3 passed; 0 failed"), None);
        assert_eq!(VmResult::parse("PLEXD-VM-RESULT maybe reason="), None);
        assert_eq!(
            VmResult::parse("PLEXD-VM-RESULT ok passed=x reason="),
            None,
            "a garbled count"
        );
    }

    #[test]
    fn libtest_lines_give_their_counts() {
        assert_eq!(
            libtest_counts("test result: FAILED. 3 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s"),
            Some((3, 2, 1))
        );
        assert_eq!(libtest_counts("running 3 tests"), None);
    }
}
