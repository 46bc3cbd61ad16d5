//! `cargo xtask image`: the agent's container image, built from scratch with buildah.
//!
//! No base image is pulled: the image holds the agent, the shared libraries `ldd` says it
//! loads, and nothing else (no shell, no package manager). It is committed to buildah's local
//! storage and written as an OCI archive that `podman load`, `skopeo copy` or `ctr import`
//! take. Before anything is committed, the staged root filesystem is checked by running the
//! agent's `--version` inside it with `chroot`, so a missing library fails here and not on
//! a node.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build_ebpf;
use crate::setup::{self, Need};
use crate::util::{build_agent, is_root, workspace_root};

/// Where the agent lives in the image (the DaemonSet and the Containerfile agree).
const AGENT_PATH: &str = "usr/local/bin/plexd-metrics";

/// Options of `cargo xtask image`.
#[derive(clap::Args)]
pub struct Options {
    /// Name and tag in buildah's local storage.
    #[arg(long, default_value = concat!("localhost/plexd-metrics:", env!("CARGO_PKG_VERSION")))]
    tag: String,
    /// Where to write the OCI archive [default: target/image/plexd-metrics.oci.tar].
    #[arg(long, value_name = "PATH")]
    archive: Option<PathBuf>,
    /// Package the debug build instead of the release build (quicker, larger).
    #[arg(long)]
    debug: bool,
}

/// Builds the agent (with its kernel programs) and the image around it.
pub fn run(o: &Options) -> Result<()> {
    if !is_root() {
        bail!("cargo xtask image runs buildah with root's container storage; run it as root");
    }
    setup::ensure(&[Need::Image])?;
    build_ebpf::build(false)?;
    let root = workspace_root();
    let agent = build_agent(!o.debug)?;

    let staging = root.join("target/image/rootfs");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).context("clear target/image/rootfs")?;
    }
    install(&agent, &staging.join(AGENT_PATH))?;
    let libraries = shared_libraries(&agent)?;
    for lib in libraries.iter().chain(&nvml_libraries(&libraries)) {
        install(lib, &staging.join(lib.strip_prefix("/").unwrap_or(lib)))?;
    }
    check_rootfs(&staging)?;

    let archive = o
        .archive
        .clone()
        .unwrap_or_else(|| root.join("target/image/plexd-metrics.oci.tar"));
    let container = buildah(&["from", "scratch"])?;
    let committed = (|| -> Result<()> {
        buildah(&["copy", &container, path_str(&staging)?, "/"])?;
        let version = env!("CARGO_PKG_VERSION");
        let entrypoint = format!("[\"/{AGENT_PATH}\"]");
        buildah(&[
            "config",
            "--entrypoint",
            &entrypoint,
            "--cmd",
            "[\"--config\", \"/etc/plexd-metrics/config.yaml\", \"--log-format\", \"json\"]",
            // uid 0 with every capability but the DaemonSet's dropped: Kubernetes grants
            // added capabilities to uid 0 only (see deploy/kubernetes/daemonset.yaml).
            "--user",
            "0:0",
            "--label",
            "org.opencontainers.image.title=plexd-metrics",
            "--label",
            &format!("org.opencontainers.image.version={version}"),
            "--label",
            "org.opencontainers.image.source=https://github.com/plexsphere/plexd-metrics",
            "--label",
            "org.opencontainers.image.licenses=Apache-2.0",
            &container,
        ])?;
        buildah(&["commit", "--format", "oci", &container, &o.tag])?;
        if let Some(parent) = archive.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if archive.exists() {
            std::fs::remove_file(&archive)?;
        }
        buildah(&[
            "push",
            &o.tag,
            &format!("oci-archive:{}:{}", path_str(&archive)?, o.tag),
        ])?;
        Ok(())
    })();
    let removed = buildah(&["rm", &container]);
    committed?;
    removed?;
    let size = std::fs::metadata(&archive)?.len();
    eprintln!(
        "xtask image: {} ({} build, {:.1} MiB) in buildah's storage and at {}",
        o.tag,
        if o.debug { "debug" } else { "release" },
        size as f64 / (1024.0 * 1024.0),
        archive.display()
    );
    Ok(())
}

/// Runs buildah and returns its stdout, or fails with its stderr (which says why, e.g. a
/// storage driver or user namespace problem).
fn buildah(args: &[&str]) -> Result<String> {
    eprintln!("xtask: running buildah {}", args.join(" "));
    let out = Command::new("buildah")
        .args(args)
        .output()
        .context("cannot start buildah (Debian package buildah; `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "buildah {} failed ({}): {}\nWithout a working buildah, build the image from \
             deploy/container/Containerfile with podman or docker.",
            args.first().unwrap_or(&""),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs the staged agent inside the staged root filesystem: proof that it needs nothing else.
fn check_rootfs(staging: &Path) -> Result<()> {
    let out = Command::new("/usr/sbin/chroot")
        .arg(staging)
        .arg(format!("/{AGENT_PATH}"))
        .arg("--version")
        .env_clear()
        .output()
        .context("run chroot")?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !said.starts_with("plexd-metrics ") {
        bail!(
            "the agent does not run in the image's root filesystem ({}): {}{}",
            out.status,
            said,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "xtask image: {} runs in the bare root filesystem",
        said.trim()
    );
    Ok(())
}

/// The shared libraries `binary` loads, as `ldd` resolves them, the dynamic loader included.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)".
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// C libraries that NVIDIA's `libnvidia-ml.so.1` links and the agent itself does not. The
/// NVIDIA container runtime adds NVML to a GPU node's container, but not these glibc
/// libraries (stubs since glibc 2.34, a few KiB each): without them the `gpu` group could
/// not load NVML from this image.
const NVML_NEEDS: [&str; 3] = ["libdl.so.2", "libpthread.so.0", "librt.so.1"];

/// [`NVML_NEEDS`], from the directory of the C library among `libraries`.
fn nvml_libraries(libraries: &[PathBuf]) -> Vec<PathBuf> {
    let Some(dir) = libraries
        .iter()
        .find(|l| l.file_name().is_some_and(|n| n == "libc.so.6"))
        .and_then(|libc| libc.parent())
    else {
        return Vec::new();
    };
    NVML_NEEDS
        .iter()
        .map(|name| dir.join(name))
        .filter(|path| path.exists())
        .collect()
}

/// Copies `from` (following symlinks, as the loader would) to `to`, keeping its mode.
fn install(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copy {}", from.display()))?;
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}
