//! The systemd boot: Debian's systemd (the host's installed `systemd` package, which `cargo
//! xtask setup` installs for the VM tests) as PID 1 of the VM, the agent's unit copied byte
//! for byte from `deploy/systemd` into `/etc/systemd/system`, the agent at the path its
//! `ExecStart=` names, and a driver unit that runs the `vm_systemd` scenarios.
//!
//! Only what the boot uses goes in: PID 1, journald (the agent's log is read back with
//! `journalctl`), `systemctl`, `journalctl`, their libraries, and the package's unit files
//! without its `.wants` links: nothing starts that the boot does not ask for (no udev, no
//! getty on the serial console, no tmpfiles), so the console carries the tests' output and
//! no unit fails for lack of its program.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use vm_init::{AGENT_PATH, DRIVER_UNIT, SYSTEMD_BOOT};

use super::initramfs::Initramfs;
use crate::util::workspace_root;

/// The scenarios of the systemd boot (`tests/tests/vm_systemd.rs`).
pub const TEST_TARGET: &str = "vm_systemd";
/// The Debian package the files come from.
const PACKAGE: &str = "systemd";
/// PID 1.
const SYSTEMD: &str = "/lib/systemd/systemd";
/// The programs the boot and the scenarios run, with their libraries.
const PROGRAMS: &[&str] = &[
    SYSTEMD,
    "/lib/systemd/systemd-journald",
    "/bin/systemctl",
    "/bin/journalctl",
];
/// Where the package keeps its units.
const UNIT_DIR: &str = "/lib/systemd/system";
/// Where the administrator's units go, and the agent's with them.
const ETC_UNITS: &str = "/etc/systemd/system";
/// The agent's unit, relative to the workspace root.
const AGENT_UNIT: &str = "deploy/systemd/plexd-metrics.service";
/// Units enabled as Debian's package enables them (its `.wants` links, which are left out
/// with the rest): journald and its sockets.
const ENABLED: &[(&str, &str)] = &[
    ("sysinit.target.wants", "systemd-journald.service"),
    ("sockets.target.wants", "systemd-journald.socket"),
    ("sockets.target.wants", "systemd-journald-dev-log.socket"),
];

/// The driver: the init binary again, not as PID 1 this time, with the console as its
/// output. It powers the machine off itself after its result line; if it cannot start or
/// dies before, `FailureAction=` does, so the host learns at once and not at its timeout.
const DRIVER: &str = "\
[Unit]
Description=plexd-metrics VM scenarios: run the test binaries, print the result, power off
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/init
StandardInput=null
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/console

[Install]
WantedBy=multi-user.target
";

/// systemd's own console output: failures only, so that the tests' lines are not buried in
/// status lines, and what goes wrong in the boot still shows.
const MANAGER_CONF: &str = "[Manager]\nShowStatus=error\n";

/// What the systemd boot adds to an initramfs.
pub struct Systemd {
    /// The package's unit files and aliases, at their host paths.
    unit_files: Vec<PathBuf>,
    /// The agent's unit in the workspace.
    agent_unit: PathBuf,
    /// The program its `ExecStart=` runs.
    exec_start: PathBuf,
}

impl Systemd {
    /// Finds the installed package's files and the agent unit's program.
    pub fn find() -> Result<Self> {
        let out = Command::new("dpkg")
            .args(["-L", PACKAGE])
            .output()
            .context("cannot run dpkg")?;
        if !out.status.success() {
            bail!(
                "the {PACKAGE} package is not installed ({}); run `cargo xtask setup`",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let unit_files = package_units(&String::from_utf8_lossy(&out.stdout));
        if !unit_files.iter().any(|p| p.ends_with("multi-user.target")) {
            bail!("dpkg -L {PACKAGE} lists no multi-user.target in {UNIT_DIR}");
        }
        let agent_unit = workspace_root().join(AGENT_UNIT);
        let text = std::fs::read_to_string(&agent_unit)
            .with_context(|| format!("cannot read {}", agent_unit.display()))?;
        let exec_start = exec_start(&text)
            .with_context(|| format!("no absolute ExecStart= program in {AGENT_UNIT}"))?;
        Ok(Self {
            unit_files,
            agent_unit,
            exec_start,
        })
    }

    /// Adds systemd, the units and the marker that makes the init exec systemd.
    pub fn add_to(&self, fs: &mut Initramfs) -> Result<()> {
        for program in PROGRAMS {
            fs.host_program(Path::new(program))?;
        }
        for unit in &self.unit_files {
            fs.host_path(unit)?;
        }
        let etc = Path::new(ETC_UNITS);
        let name = self.agent_unit.file_name().context("unit file name")?;
        fs.file(&etc.join(name), &self.agent_unit, 0o644);
        fs.symlink(&self.exec_start, Path::new(AGENT_PATH));
        fs.bytes(&etc.join(DRIVER_UNIT), DRIVER.as_bytes().to_vec(), 0o644);
        fs.symlink(
            &etc.join("multi-user.target.wants").join(DRIVER_UNIT),
            &etc.join(DRIVER_UNIT),
        );
        fs.symlink(
            &etc.join("default.target"),
            &Path::new(UNIT_DIR).join("multi-user.target"),
        );
        for (wants, unit) in ENABLED {
            fs.symlink(&etc.join(wants).join(unit), &Path::new(UNIT_DIR).join(unit));
        }
        fs.bytes(
            Path::new("/etc/systemd/system.conf.d/plexd-vm.conf"),
            MANAGER_CONF.as_bytes().to_vec(),
            0o644,
        );
        // What systemd reads at start: the OS it boots, a machine ID (without one it would
        // treat the boot as a first boot), and the users and groups its units name.
        fs.host_path(Path::new("/etc/os-release"))?;
        fs.bytes(
            Path::new("/etc/machine-id"),
            b"9a1c3f1e5b7d4e2f8a6c0b1d2e3f4a5b\n".to_vec(),
            0o444,
        );
        fs.bytes(
            Path::new("/etc/passwd"),
            b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
            0o644,
        );
        fs.bytes(
            Path::new("/etc/group"),
            b"root:x:0:\nsystemd-journal:x:101:\n".to_vec(),
            0o644,
        );
        // StateDirectory= is made under /var/lib; PrivateTmp= needs /var/tmp.
        fs.dir(Path::new("/var/lib"));
        fs.dir(Path::new("/var/tmp"));
        fs.bytes(
            Path::new(SYSTEMD_BOOT),
            format!("{SYSTEMD}\n").into_bytes(),
            0o644,
        );
        Ok(())
    }
}

/// The entries directly in [`UNIT_DIR`] of `dpkg -L` output: unit files and their aliases,
/// not the `.wants` and `.d` directories below it.
fn package_units(listing: &str) -> Vec<PathBuf> {
    listing
        .lines()
        .filter_map(|l| l.strip_prefix(UNIT_DIR)?.strip_prefix('/'))
        .filter(|name| !name.is_empty() && !name.contains('/') && name.contains('.'))
        .filter(|name| !name.ends_with(".wants") && !name.ends_with(".d"))
        .map(|name| Path::new(UNIT_DIR).join(name))
        .collect()
}

/// The program of a unit's `ExecStart=`, without systemd's prefixes (`-`, `@`, `:`, `+`,
/// `!`); `None` unless it is an absolute path.
fn exec_start(unit: &str) -> Option<PathBuf> {
    let command = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("ExecStart="))?;
    let program = command
        .trim_start_matches(['-', '@', ':', '+', '!'])
        .split_whitespace()
        .next()?;
    program.starts_with('/').then(|| PathBuf::from(program))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_the_files_directly_in_the_unit_directory() {
        let listing = "/.\n/lib/systemd/system\n/lib/systemd/system/basic.target\n\
                       /lib/systemd/system/sockets.target.wants\n\
                       /lib/systemd/system/sockets.target.wants/systemd-journald.socket\n\
                       /lib/systemd/system/user@.service.d\n\
                       /lib/systemd/system/user@.service.d/timeout.conf\n\
                       /lib/systemd/systemd\n/lib/systemd/system/default.target\n";
        assert_eq!(
            package_units(listing),
            [
                PathBuf::from("/lib/systemd/system/basic.target"),
                PathBuf::from("/lib/systemd/system/default.target")
            ]
        );
    }

    #[test]
    fn the_program_comes_from_exec_start() {
        assert_eq!(
            exec_start(
                "[Service]\nType=exec\nExecStart=/usr/local/bin/plexd-metrics --config /x\n"
            ),
            Some(PathBuf::from("/usr/local/bin/plexd-metrics"))
        );
        assert_eq!(
            exec_start("ExecStart=-/bin/true"),
            Some(PathBuf::from("/bin/true"))
        );
        assert_eq!(exec_start("ExecStart=true"), None);
        assert_eq!(exec_start("[Service]\n"), None);
    }

    #[test]
    fn the_agent_unit_names_an_absolute_program() {
        let text = std::fs::read_to_string(workspace_root().join(AGENT_UNIT)).unwrap();
        assert!(exec_start(&text).is_some());
    }
}
