//! Small helpers shared by the xtask commands.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The host workspace's root directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where cargo puts the host workspace's build output: `CARGO_TARGET_DIR` when set (a relative
/// one from the workspace root, where the xtask commands run cargo), else `target` there.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// Runs `cmd`, echoing it first, and fails with its exit status if it does not succeed.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}

/// `cargo build` of `bins` from `packages` of the host workspace, debug or release.
pub fn cargo_build(release: bool, packages: &[&str], bins: &[&str]) -> Result<()> {
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.current_dir(workspace_root()).arg("build");
    if release {
        build.arg("--release");
    }
    for package in packages {
        build.args(["--package", package]);
    }
    for bin in bins {
        build.args(["--bin", bin]);
    }
    run_cmd(&mut build)
}

/// Builds the agent binary (debug, or release when `release`), which embeds the kernel
/// programs built before, and returns its path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    cargo_build(release, &["plexd-metrics"], &["plexd-metrics"])?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir().join(profile).join("plexd-metrics"))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Test counts summed over several `cargo test` runs.
#[derive(Debug, Default)]
pub struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Runs a `cargo test` command, echoing its output, and adds up its `test result:` lines.
    pub fn run(&mut self, cmd: &mut Command) -> Result<()> {
        use std::io::{BufRead, BufReader};
        use std::process::Stdio;

        eprintln!("xtask: running {cmd:?}");
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
        let stdout = child.stdout.take().context("piped stdout")?;
        for line in BufReader::new(stdout).lines() {
            let line = line.context("read test output")?;
            println!("{line}");
            self.add(&line);
        }
        let status = child.wait().context("wait for cargo test")?;
        if !status.success() {
            bail!("{:?} failed: {status}", cmd.get_program());
        }
        Ok(())
    }

    /// Adds counts that did not come from a `cargo test` run here (the VM's tests).
    pub fn add_counts(&mut self, passed: u64, failed: u64, ignored: u64) {
        self.passed += passed;
        self.failed += failed;
        self.ignored += ignored;
    }

    fn add(&mut self, line: &str) {
        if let Some((passed, failed, ignored)) = vm_init::libtest_counts(line) {
            self.add_counts(passed, failed, ignored);
        }
    }

    /// The closing line: `N passed, N failed`, as test-report readers expect.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }

    /// Tests marked `#[ignore]`; the project allows none.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }
}

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn adds_up_libtest_result_lines() {
        let mut t = Tally::default();
        t.add("test result: ok. 66 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.83s");
        t.add("test result: FAILED. 3 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s");
        t.add("running 3 tests");
        assert_eq!(t.summary(), "69 passed, 2 failed");
        assert_eq!(t.ignored(), 1);
    }
}
