//! `cargo xtask build-ebpf`: builds the kernel programs and puts the object where the agent's
//! build script embeds it (`target/ebpf/plexd-metrics-ebpf.o`).
//!
//! Two routes lead to a BPF object, and the machine decides which:
//!
//! - **Debian**: `/usr/bin/rustc` (package rustc-web) ships a prebuilt `core` for
//!   `bpfel-unknown-none`; `RUSTC_BOOTSTRAP=1` unlocks the unstable bits aya-ebpf uses.
//! - **nightly**: rustup's nightly with `rust-src`, building `core` with `-Z build-std`.
//!
//! Both link with bpf-linker. With neither route, [`crate::setup::ensure`] installs the
//! Debian one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::setup::{self, Need};
use crate::util::{run_cmd, workspace_root, Tally};

const TARGET: &str = "bpfel-unknown-none";
const CRATE: &str = "plexd-metrics-ebpf";

/// Options of `cargo xtask build-ebpf`.
#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile (both profiles are optimised; release keeps more
    /// debug info for BTF).
    #[arg(long)]
    release: bool,
}

/// Builds the object and reports where it is.
pub fn run(o: &Options) -> Result<()> {
    let object = build(o.release)?;
    eprintln!("xtask: eBPF object at {}", object.display());
    Ok(())
}

/// How this machine builds for BPF.
#[derive(Debug)]
enum Route {
    /// Debian's compiler, whose sysroot has `core` for the BPF targets.
    Debian { rustc: PathBuf, cargo: PathBuf },
    /// rustup's nightly with rust-src, building `core` from source.
    Nightly,
}

/// Builds the kernel programs, installing the toolchain first if the machine has none, and
/// returns the path of the object the agent embeds.
pub fn build(release: bool) -> Result<PathBuf> {
    let (route, linker) = match (route(), setup::bpf_linker()) {
        (Some(route), Some(linker)) => (route, linker),
        _ => {
            setup::ensure(&[Need::EbpfBuild])?;
            match (route(), setup::bpf_linker()) {
                (Some(route), Some(linker)) => (route, linker),
                (None, _) => bail!(
                    "no compiler can build for {TARGET}: /usr/bin/rustc has no {TARGET} in its \
                     sysroot (Debian package libstd-rust-web-dev-bpf) and rustup's nightly has no \
                     rust-src (`rustup toolchain install nightly --component rust-src`)"
                ),
                (_, None) => bail!("bpf-linker is not installed: run `cargo xtask setup`"),
            }
        }
    };

    let root = workspace_root();
    let crate_dir = root.join(CRATE);
    let mut cmd = match &route {
        Route::Debian { rustc, cargo } => {
            let mut c = Command::new(cargo);
            c.env("RUSTC", rustc)
                .env("RUSTC_BOOTSTRAP", "1")
                .arg("build");
            c
        }
        Route::Nightly => {
            let mut c = Command::new("rustup");
            c.args(["run", "nightly", "cargo", "build", "-Z", "build-std=core"]);
            c
        }
    };
    clean_env(&mut cmd);
    // The eBPF crate's own target dir, wherever the outer build puts its output.
    let target_dir = crate_dir.join("target");
    cmd.current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", &target_dir)
        // An absolute path, because ~/.cargo/bin may not be on a fresh shell's PATH.
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .args(["--target", TARGET]);
    if release {
        cmd.arg("--release");
    }
    eprintln!(
        "xtask: building the kernel programs ({route:?} route, linker {})",
        linker.display()
    );
    run_cmd(&mut cmd)?;

    let built = target_dir
        .join(TARGET)
        .join(if release { "release" } else { "debug" })
        .join(CRATE);
    check_object(&built)?;
    let dest = root.join("target").join("ebpf").join(format!("{CRATE}.o"));
    install_object(&built, &dest)?;
    Ok(dest)
}

/// Runs the host-side unit tests of the eBPF crate's pure parts (its library), with the
/// host's ordinary toolchain.
pub fn test_host(tally: &mut Tally) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let crate_dir = workspace_root().join(CRATE);
    let mut cmd = Command::new(cargo);
    clean_env(&mut cmd);
    // Apart from the BPF build's directory: the two use different compilers, and sharing
    // would rebuild the build scripts and proc-macros each time one follows the other.
    cmd.current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", crate_dir.join("target").join("host"))
        .args(["test", "--lib"]);
    tally.run(&mut cmd)
}

/// The route this machine has, Debian's preferred: it needs no rust-src download.
fn route() -> Option<Route> {
    let rustc = PathBuf::from("/usr/bin/rustc");
    let cargo = PathBuf::from("/usr/bin/cargo");
    if rustc.is_file() && cargo.is_file() {
        if let Some(sysroot) = sysroot(Command::new(&rustc)) {
            if sysroot.join("lib/rustlib").join(TARGET).is_dir() {
                return Some(Route::Debian { rustc, cargo });
            }
        }
    }
    if setup::find_on_path("rustup").is_some() {
        let mut nightly = Command::new("rustup");
        nightly.args(["run", "nightly", "rustc"]);
        if let Some(sysroot) = sysroot(nightly) {
            if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
                return Some(Route::Nightly);
            }
        }
    }
    None
}

fn sysroot(mut rustc: Command) -> Option<PathBuf> {
    clean_env(&mut rustc);
    let out = rustc.args(["--print", "sysroot"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(PathBuf::from(text.trim()))
}

/// Removes what the outer `cargo xtask` leaks into the environment and would steer the inner
/// build to the wrong compiler, flags or output: rustup's toolchain choice, wrappers,
/// RUSTFLAGS (which would override the BPF target's rustflags), and cargo's per-package and
/// build variables. Registry, network and terminal settings stay.
fn clean_env(cmd: &mut Command) {
    const KEEP_PREFIXES: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
        "CARGO_TERM_",
    ];
    const REMOVE: &[&str] = &[
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_BOOTSTRAP",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTUP_TOOLCHAIN",
    ];
    for (key, _) in std::env::vars_os() {
        let Some(name) = key.to_str() else { continue };
        let cargo_var =
            name.starts_with("CARGO_") && !KEEP_PREFIXES.iter().any(|p| name.starts_with(p));
        if cargo_var || REMOVE.contains(&name) {
            cmd.env_remove(&key);
        }
    }
}

/// Checks that `path` is a BPF ELF object with BTF: without BTF the kernel still loads it,
/// but tools and verifier messages lose the types, which this project relies on.
fn check_object(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    const EM_BPF: u16 = 247;
    let machine = bytes.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
    if !bytes.starts_with(b"\x7fELF") || machine != Some(EM_BPF) {
        bail!("{} is not a BPF ELF object", path.display());
    }
    if !section_names(&bytes).iter().any(|n| n == b".BTF") {
        bail!(
            "{} has no .BTF section; the build must pass `-C link-arg=--btf` to bpf-linker \
             (see {CRATE}/.cargo/config.toml)",
            path.display()
        );
    }
    Ok(())
}

/// Section names of a little-endian ELF64 file; empty if the headers do not parse.
///
/// A search for the bytes ".BTF" would not do: the string table shares suffixes, so
/// ".rel.BTF" alone contains it.
fn section_names(elf: &[u8]) -> Vec<&[u8]> {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok())
    };
    let names = || -> Option<Vec<&[u8]>> {
        let (shoff, shentsize, shnum, shstrndx) =
            (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
        let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
        let strtab = header(shstrndx)?;
        let (str_off, str_size) = (u64_at(strtab + 0x18)?, u64_at(strtab + 0x20)?);
        let table = elf.get(str_off..str_off.checked_add(str_size)?)?;
        (0..shnum)
            .map(|i| {
                let name = table.get(u32_at(header(i)?)?..)?;
                Some(&name[..name.iter().position(|&b| b == 0)?])
            })
            .collect()
    };
    names().unwrap_or_default()
}

/// Copies the object unless the destination already has the same bytes: the agent's build
/// script reruns on the file's modification time, and an unchanged object should not
/// rebuild the agent.
fn install_object(from: &Path, to: &Path) -> Result<()> {
    let new = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    if std::fs::read(to).is_ok_and(|old| old == new) {
        return Ok(());
    }
    let dir = to.parent().context("object path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Written aside and renamed, so that a concurrent agent build never embeds half a file.
    let tmp = dir.join(format!(
        ".{}.tmp",
        to.file_name().and_then(OsStr::to_str).unwrap_or(CRATE)
    ));
    std::fs::write(&tmp, &new).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, to)
        .with_context(|| format!("cannot move the object to {}", to.display()))?;
    Ok(())
}
