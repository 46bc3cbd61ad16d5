//! `cargo xtask setup`: installs what building and testing plexd-metrics needs.
//!
//! Idempotent: it looks first and installs only what is missing, saying what and how. The
//! other commands call [`ensure`] so that a fresh Debian machine needs nothing but the README's
//! one command.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

use crate::util::{is_root, run_cmd};

/// Options of `cargo xtask setup`.
#[derive(clap::Args)]
pub struct Options {
    /// Only report what is missing; fail if anything is.
    #[arg(long)]
    check: bool,
    /// Only these groups (repeatable), e.g. `--only prometheus`; every group by default.
    #[arg(long, value_enum)]
    only: Vec<Need>,
}

/// A group of prerequisites, so that a command installs only what it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Need {
    /// Building the kernel programs on the Debian route: Debian's Rust with a prebuilt `core`
    /// for BPF, LLVM 22, and bpf-linker built against it.
    EbpfBuild,
    /// Running the agent and the privileged tests: WireGuard, iproute2 (`ip`, `tc`), nftables,
    /// ping, fping, bpftool, openssl.
    Testbed,
    /// Checking the deployment files: `kubernetes-validate` (PyPI, with the Kubernetes
    /// schemas bundled, in a venv under `target/tools`) and `systemd-analyze`.
    Deploy,
    /// Building the container image: buildah.
    Image,
    /// The VM tests: QEMU, objcopy to strip the binaries for the initramfs, and systemd for
    /// the boot with systemd as PID 1.
    Vm,
    /// The baselines of `cargo xtask bench`: Prometheus' node_exporter (Debian) and
    /// `prometheus_wireguard_exporter` (crates.io, pinned, under `target/tools`).
    Bench,
    /// The Prometheus ecosystem's receivers and checkers: `prometheus` (which brings
    /// `promtool`, for the alert rules' unit tests and the dashboard's queries) and
    /// `victoria-metrics`. The tests start their own servers on loopback; setup starts none
    /// of the packages' services.
    Prometheus,
}

/// Debian packages for building the kernel programs (see TESTBED.md).
const EBPF_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
];
/// Debian packages for the testbed and the agent's own needs (openssl: the TLS server and
/// the certificates of `tests/tests/tls.rs`; golang-go: the Go control plane of
/// `tests/tests/go_control_plane.rs`, which judges the wire contract).
const TESTBED_PACKAGES: &[&str] = &[
    "wireguard-go",
    "wireguard-tools",
    "iproute2",
    "nftables",
    "iputils-ping",
    "fping",
    "bpftool",
    "openssl",
    "golang-go",
];
/// Debian packages for the VM tests (`cargo xtask integration-test vm`): systemd's files go
/// into the initramfs of the boot that runs the agent's unit under systemd as PID 1.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "binutils", "systemd"];
/// Where the VM packages come from when the base suite's versions conflict with installed
/// packages (see [`install_packages`]).
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/plexd-metrics-backports.sources";
/// Debian packages for checking the deployment files (the validator's venv, systemd-analyze).
const DEPLOY_PACKAGES: &[&str] = &["python3-venv", "systemd"];
/// Debian packages the benchmarks compare the agent with.
const BENCH_PACKAGES: &[&str] = &["prometheus-node-exporter"];
/// Debian packages of the Prometheus receivers and `promtool`.
const PROMETHEUS_PACKAGES: &[&str] = &["prometheus", "victoria-metrics"];
/// Debian's hook that `invoke-rc.d` and `deb-systemd-invoke` ask before starting a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
/// The per-peer WireGuard exporter the tunnel benchmark compares with, pinned so that runs
/// compare with the same baseline.
const WIREGUARD_EXPORTER: &str = "prometheus_wireguard_exporter";
const WIREGUARD_EXPORTER_VERSION: &str = "3.6.6";
/// Debian packages for `cargo xtask image`.
const IMAGE_PACKAGES: &[&str] = &["buildah"];
/// The validator release, whose bundled schemas reach Kubernetes 1.37.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The bpf-linker release that builds against LLVM 22 with these compilers.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Commands the testbed packages provide, checked instead of packages where dpkg is absent.
const TESTBED_COMMANDS: &[&str] = &[
    "wireguard-go",
    "wg",
    "ip",
    "tc",
    "nft",
    "ping",
    "fping",
    "bpftool",
    "openssl",
    "go",
];

impl Need {
    fn packages(self) -> &'static [&'static str] {
        match self {
            Need::EbpfBuild => EBPF_PACKAGES,
            Need::Testbed => TESTBED_PACKAGES,
            Need::Vm => VM_PACKAGES,
            Need::Deploy => DEPLOY_PACKAGES,
            Need::Image => IMAGE_PACKAGES,
            Need::Bench => BENCH_PACKAGES,
            Need::Prometheus => PROMETHEUS_PACKAGES,
        }
    }

    fn needs_bpf_linker(self) -> bool {
        self == Need::EbpfBuild
    }
}

/// Installs everything, or with `--check` reports what is missing.
pub fn run(o: &Options) -> Result<()> {
    let needs = if o.only.is_empty() {
        <Need as clap::ValueEnum>::value_variants().to_vec()
    } else {
        o.only.clone()
    };
    if o.check {
        let missing = missing(&needs)?;
        if missing.is_empty() {
            eprintln!("xtask setup: nothing missing");
            return Ok(());
        }
        bail!("missing: {}; run `cargo xtask setup`", missing.describe());
    }
    install(&needs)
}

/// Installs what `needs` lacks, if anything. Cheap when everything is there: one
/// `dpkg-query` and a look at PATH.
pub fn ensure(needs: &[Need]) -> Result<()> {
    install(needs)
}

/// Where bpf-linker is, on PATH or in cargo's bin directory (which a fresh login may not have
/// on PATH yet).
pub fn bpf_linker() -> Option<PathBuf> {
    find_on_path("bpf-linker").or_else(|| {
        let candidate = cargo_home()?.join("bin").join("bpf-linker");
        candidate.is_file().then_some(candidate)
    })
}

/// Whether `program` is an executable file in one of PATH's directories.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Where `kubernetes-validate` lives once installed.
pub fn kubernetes_validate() -> PathBuf {
    venv().join("bin/kubernetes-validate")
}

/// Where `cargo install --root` puts the cargo-installed tools: `target/tools/<name>`, whose
/// `bin/<name>` is the binary. The benchmarks find them there.
pub fn tools_dir() -> PathBuf {
    crate::util::workspace_root().join("target/tools")
}

/// The installed `prometheus_wireguard_exporter`.
fn wireguard_exporter() -> PathBuf {
    tools_dir()
        .join(WIREGUARD_EXPORTER)
        .join("bin")
        .join(WIREGUARD_EXPORTER)
}

/// Builds the pinned exporter from crates.io into `target/tools`, with its own lock file.
fn install_wireguard_exporter() -> Result<()> {
    let root = tools_dir().join(WIREGUARD_EXPORTER);
    eprintln!(
        "xtask setup: building {WIREGUARD_EXPORTER} {WIREGUARD_EXPORTER_VERSION} from crates.io \
         into {}",
        root.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_cmd(
        Command::new(cargo)
            .env_remove("CARGO_TARGET_DIR")
            .args(["install", WIREGUARD_EXPORTER, "--version"])
            .arg(WIREGUARD_EXPORTER_VERSION)
            .args(["--locked", "--root"])
            .arg(&root),
    )?;
    if !wireguard_exporter().is_file() {
        bail!(
            "{} is missing after installing {WIREGUARD_EXPORTER}",
            wireguard_exporter().display()
        );
    }
    Ok(())
}

fn venv() -> PathBuf {
    crate::util::workspace_root().join("target/tools/venv")
}

/// Makes the venv and installs the validator into it. A venv, because Debian's pip refuses
/// to install into the system's Python; Debian's own Python, because the venv module is
/// packaged for it.
fn install_kubernetes_validate() -> Result<()> {
    let venv = venv();
    eprintln!(
        "xtask setup: installing {KUBERNETES_VALIDATE} from PyPI into {}",
        venv.display()
    );
    run_cmd(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )?;
    run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(KUBERNETES_VALIDATE),
    )?;
    if !kubernetes_validate().is_file() {
        bail!(
            "{} is missing after installing {KUBERNETES_VALIDATE}",
            kubernetes_validate().display()
        );
    }
    Ok(())
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
}

#[derive(Debug, Default)]
struct Missing {
    packages: Vec<&'static str>,
    /// Only filled where dpkg is absent, which cannot tell packages.
    commands: Vec<&'static str>,
    bpf_linker: bool,
    kubernetes_validate: bool,
    wireguard_exporter: bool,
}

impl Missing {
    fn is_empty(&self) -> bool {
        self.packages.is_empty()
            && self.commands.is_empty()
            && !self.bpf_linker
            && !self.kubernetes_validate
            && !self.wireguard_exporter
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.packages.is_empty() {
            parts.push(format!("Debian packages {}", self.packages.join(" ")));
        }
        if !self.commands.is_empty() {
            parts.push(format!("commands {}", self.commands.join(" ")));
        }
        if self.bpf_linker {
            parts.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
        }
        if self.kubernetes_validate {
            parts.push(KUBERNETES_VALIDATE.to_owned());
        }
        if self.wireguard_exporter {
            parts.push(format!("{WIREGUARD_EXPORTER} {WIREGUARD_EXPORTER_VERSION}"));
        }
        parts.join(", ")
    }
}

fn missing(needs: &[Need]) -> Result<Missing> {
    let wanted: Vec<&'static str> = needs.iter().flat_map(|n| n.packages()).copied().collect();
    let (packages, commands) = if find_on_path("dpkg-query").is_some() {
        (missing_packages(&wanted)?, Vec::new())
    } else if needs.contains(&Need::Testbed) {
        let absent = TESTBED_COMMANDS
            .iter()
            .copied()
            .filter(|c| find_on_path(c).is_none());
        (Vec::new(), absent.collect())
    } else {
        (Vec::new(), Vec::new())
    };
    Ok(Missing {
        packages,
        commands,
        bpf_linker: needs.iter().any(|n| n.needs_bpf_linker()) && bpf_linker().is_none(),
        kubernetes_validate: needs.contains(&Need::Deploy) && !kubernetes_validate().is_file(),
        wireguard_exporter: needs.contains(&Need::Bench) && !wireguard_exporter().is_file(),
    })
}

/// Debian packages of `wanted` that are not installed, per dpkg's own database.
fn missing_packages(wanted: &[&'static str]) -> Result<Vec<&'static str>> {
    // dpkg-query exits non-zero when any name is unknown to it, but still reports the others;
    // so its status is ignored and absence from the output means "not installed".
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
        .args(wanted)
        .output()
        .context("cannot run dpkg-query")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_suffix(" installed"))
        .map(|name| name.split(':').next().unwrap_or(name))
        .collect();
    Ok(wanted
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

fn install(needs: &[Need]) -> Result<()> {
    let missing = missing(needs)?;
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: missing {}", missing.describe());
    if find_on_path("apt-get").is_none() || !missing.commands.is_empty() {
        print_manual_steps(needs);
        bail!(
            "cannot install {} on a system without apt-get; follow the steps above",
            missing.describe()
        );
    }
    if !missing.packages.is_empty() {
        eprintln!(
            "xtask setup: installing Debian packages: {}",
            missing.packages.join(" ")
        );
        apt_get(&["update"], true)?;
        install_packages(&missing.packages)?;
    }
    if missing.bpf_linker {
        install_bpf_linker()?;
    }
    if missing.kubernetes_validate {
        install_kubernetes_validate()?;
    }
    if missing.wireguard_exporter {
        install_wireguard_exporter()?;
    }
    eprintln!("xtask setup: installed {}", missing.describe());
    Ok(())
}

/// While it lives, Debian's maintainer scripts start no service: the packages installed here
/// (prometheus, victoria-metrics, node_exporter) each come with one, which would hold the
/// ports and disks of a shared machine for nothing, since the tests start their own servers.
/// It writes a `policy-rc.d` that denies every action (exit 101, the documented "forbidden"
/// answer, which both `invoke-rc.d` and `deb-systemd-invoke` obey) and removes it on drop;
/// a `policy-rc.d` that is already there (container images ship one) is left as it is.
struct NoServiceStarts {
    written: bool,
}

impl NoServiceStarts {
    fn new() -> Result<Self> {
        let path = std::path::Path::new(POLICY_RC_D);
        if path.exists() || !is_root() {
            // Through sudo the file cannot be written here; apt-get then runs as it would by
            // hand, and the tests still use servers of their own on free ports.
            return Ok(NoServiceStarts { written: false });
        }
        std::fs::write(
            path,
            "#!/bin/sh\n# Written by `cargo xtask setup` (plexd-metrics) for the time of one \
             install: no service starts.\nexit 101\n",
        )
        .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {POLICY_RC_D} executable"))?;
        Ok(NoServiceStarts { written: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.written {
            if let Err(e) = std::fs::remove_file(POLICY_RC_D) {
                eprintln!("xtask setup: cannot remove {POLICY_RC_D}: {e}; remove it by hand");
            }
        }
    }
}

/// Installs Debian packages without ever removing one, and without starting their services.
///
/// A machine may carry a newer build of a package's siblings than its base suite has (such a
/// machine here has qemu-utils from bookworm-backports, which the base suite's
/// qemu-system-x86 would remove). When the base suite cannot install without removals, the
/// release's backports suite is added (and said so) and the packages come from there.
fn install_packages(packages: &[&str]) -> Result<()> {
    let _no_services = NoServiceStarts::new()?;
    let install = |suite: Option<&str>| {
        let mut args = vec!["install", "-y", "--no-install-recommends", "--no-remove"];
        if let Some(suite) = suite {
            args.extend(["-t", suite]);
        }
        args.extend(packages);
        apt_get(&args, false)
    };
    let Err(first) = install(None) else {
        return Ok(());
    };
    let Some(codename) = os_codename() else {
        return Err(first);
    };
    let backports = format!("{codename}-backports");
    eprintln!(
        "xtask setup: installing from {codename} alone would remove packages ({first:#}); \
         trying {backports}"
    );
    if !std::path::Path::new(BACKPORTS_SOURCE).exists() {
        eprintln!("xtask setup: adding the {backports} suite to apt's sources: {BACKPORTS_SOURCE}");
        std::fs::write(
            BACKPORTS_SOURCE,
            format!(
                "# Added by `cargo xtask setup` (plexd-metrics): packages that must match newer\n\
                 # builds already installed. Backports are never installed unless asked for.\n\
                 Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {backports}\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )
        .with_context(|| format!("cannot write {BACKPORTS_SOURCE}"))?;
        apt_get(&["update"], false)?;
    }
    install(Some(&backports)).with_context(|| {
        format!(
            "cannot install {} from {codename} or {backports}",
            packages.join(" ")
        )
    })
}

/// The Debian release's code name (`bookworm`), from /etc/os-release.
fn os_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

/// Runs apt-get non-interactively, through sudo when not root. `update` runs at most once per
/// xtask invocation, however many commands ask for it.
fn apt_get(args: &[&str], is_update: bool) -> Result<()> {
    static UPDATED: AtomicBool = AtomicBool::new(false);
    if is_update && UPDATED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let mut cmd = if is_root() {
        Command::new("apt-get")
    } else if find_on_path("sudo").is_some() {
        eprintln!("xtask setup: not root; using sudo for apt-get");
        let mut c = Command::new("sudo");
        // sudo drops the environment; `env` carries the one variable apt needs.
        c.args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        c
    } else {
        bail!(
            "installing Debian packages needs root, and sudo is not installed; \
             run `cargo xtask setup` as root"
        );
    };
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
    run_cmd(&mut cmd)
}

fn install_bpf_linker() -> Result<()> {
    if !PathBuf::from(LLVM_PREFIX).join("bin/llvm-config").is_file() {
        bail!("bpf-linker needs LLVM 22 in {LLVM_PREFIX}; install the Debian package llvm-22-dev first");
    }
    eprintln!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 \
         (about 4 minutes on 2 cores) into {}",
        cargo_home().map_or_else(|| "~/.cargo".into(), |h| h.display().to_string())
    );
    // The host cargo, not the one building an eBPF crate: bpf-linker is an ordinary host tool.
    // --locked uses bpf-linker's own lock file, the versions its release was tested with.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.env("LLVM_PREFIX", LLVM_PREFIX)
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]);
    run_cmd(&mut cmd)?;
    if bpf_linker().is_none() {
        bail!("bpf-linker was installed but is neither on PATH nor in cargo's bin directory");
    }
    Ok(())
}

fn print_manual_steps(needs: &[Need]) {
    eprintln!("\nThis system has no apt-get. Install by hand:\n");
    if needs.contains(&Need::EbpfBuild) {
        eprintln!(
            "  # kernel programs (the usual aya route):\n\
             \x20 rustup toolchain install nightly --component rust-src\n\
             \x20 cargo install bpf-linker\n"
        );
    }
    if needs.contains(&Need::Testbed) {
        eprintln!(
            "  # testbed: wireguard-go, wg (wireguard-tools), ip and tc (iproute2), nft (nftables),\n\
             \x20 # ping, fping and bpftool from your distribution, e.g. on Fedora:\n\
             \x20 dnf install wireguard-tools wireguard-go iproute nftables iputils fping bpftool\n"
        );
    }
    if needs.contains(&Need::Bench) {
        eprintln!(
            "  # benchmarks: Prometheus' node_exporter at /usr/bin/prometheus-node-exporter\n\
             \x20 # (Debian's path; link yours there), e.g. on Fedora:\n\
             \x20 dnf install golang-github-prometheus-node-exporter\n"
        );
    }
    if needs.contains(&Need::Prometheus) {
        eprintln!(
            "  # Prometheus receivers: prometheus, promtool and victoria-metrics on PATH, from your\n\
             \x20 # distribution or the projects' releases, e.g. on Fedora:\n\
             \x20 dnf install golang-github-prometheus  # victoria-metrics: its release binary\n"
        );
    }
    if needs.contains(&Need::Vm) {
        eprintln!(
            "  # VM tests: QEMU for x86-64, objcopy (binutils), apt-get and dpkg-deb for the kernels\n\
             \x20 dnf install qemu-system-x86 binutils\n"
        );
    }
}
