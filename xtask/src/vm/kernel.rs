//! Debian's cloud kernels for the VM: the newest package of a series from the configured
//! mirror, downloaded once into `target/vm/debs`, unpacked once into `target/vm/kernels`,
//! and the modules the scenarios need resolved with their dependencies and decompressed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{is_root, run_cmd};

/// A kernel series the VM tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    /// How the command line and the report name it: `6.1`, `6.12`.
    pub label: &'static str,
    /// Package names start with this ...
    prefix: &'static str,
    /// ... and end with this.
    suffix: &'static str,
    /// How aya attaches the TC programs there (for the report).
    pub attach: &'static str,
}

/// Debian 12's LTS kernel: TC programs attach through netlink with a clsact qdisc.
pub const LINUX_6_1: Series = Series {
    label: "6.1",
    prefix: "linux-image-6.1.",
    suffix: "-cloud-amd64-unsigned",
    attach: "netlink/clsact",
};
/// The newer LTS kernel Debian 12 ships in its security suite: TCX links (kernel >= 6.6).
pub const LINUX_6_12: Series = Series {
    label: "6.12",
    prefix: "linux-image-6.12.",
    suffix: "-cloud-amd64-unsigned",
    attach: "TCX",
};

/// Modules the scenarios use: kernel WireGuard, veth pairs, netem (behind a prio qdisc with a
/// u32 filter, so that only transport messages are dropped), and the clsact qdisc with
/// cls_bpf that TC programs use on kernels without TCX. Their dependencies (udp_tunnel,
/// ip6_udp_tunnel, the crypto libraries) are found from each module's `depends=`.
pub const MODULES: &[&str] = &[
    "wireguard",
    "veth",
    "sch_netem",
    "sch_prio",
    "cls_u32",
    "sch_ingress",
    "cls_bpf",
];

/// An unpacked kernel: its image and the modules to load, decompressed, in load order.
#[derive(Debug)]
pub struct Kernel {
    /// The Debian package it came from.
    pub package: String,
    /// `uname -r` of the kernel.
    pub release: String,
    /// The bzImage QEMU boots.
    pub vmlinuz: PathBuf,
    /// Decompressed modules, dependencies first.
    pub modules: Vec<PathBuf>,
}

/// Fetches (or finds in the cache) the newest kernel of `series` and prepares it.
pub fn prepare(series: Series, cache: &Path) -> Result<Kernel> {
    let deb = fetch(series, &cache.join("debs"))?;
    let package = package_name(&deb);
    let dir = cache.join("kernels").join(&package);
    unpack(&deb, &dir)?;
    let modules_root = single_dir(&dir.join("lib/modules"))?;
    let release = modules_root
        .file_name()
        .and_then(|n| n.to_str())
        .context("kernel release directory name")?
        .to_owned();
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.is_file() {
        bail!("{} has no boot/vmlinuz-{release}", deb.display());
    }
    let modules = decompressed_modules(&modules_root, &dir.join("initramfs-modules"))?;
    Ok(Kernel {
        package,
        release,
        vmlinuz,
        modules,
    })
}

/// The package file of the newest kernel of `series`, downloaded unless already cached.
///
/// Without a usable package list (none of the series in it, or a download that fails because
/// the list is stale) the lists are updated once and the lookup tried again; if the mirror
/// cannot be reached at all, the newest cached package of the series is used, with a warning.
fn fetch(series: Series, debs: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(debs).with_context(|| format!("cannot create {}", debs.display()))?;
    let attempt = |updated: bool| -> Result<PathBuf> {
        let name = newest_package(series)?.with_context(|| {
            format!(
                "no {}*{} package in apt's lists{}",
                series.prefix,
                series.suffix,
                if updated {
                    ""
                } else {
                    " (they may be old: `apt-get update`)"
                }
            )
        })?;
        if let Some(cached) = cached_deb(debs, |n| n == name) {
            return Ok(cached);
        }
        eprintln!("xtask vm: downloading {name} into {}", debs.display());
        run_cmd(
            Command::new("apt-get")
                .current_dir(debs)
                .args(["download", "-q", &name]),
        )?;
        cached_deb(debs, |n| n == name)
            .with_context(|| format!("apt-get download {name} left no .deb in {}", debs.display()))
    };
    let first = attempt(false);
    let error = match first {
        Ok(deb) => return Ok(deb),
        Err(e) => e,
    };
    if is_root() {
        eprintln!("xtask vm: {error:#}; updating apt's package lists and trying again");
        let updated = run_cmd(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["update", "-q"]),
        )
        .and_then(|()| attempt(true));
        match updated {
            Ok(deb) => return Ok(deb),
            Err(e) => eprintln!("xtask vm: {e:#}"),
        }
    }
    let fallback = newest_cached(series, debs);
    match fallback {
        Some(deb) => {
            eprintln!(
                "xtask vm: warning: cannot get the newest {} kernel from the mirror; using the cached {}",
                series.label,
                deb.display()
            );
            Ok(deb)
        }
        None => Err(error.context(format!(
            "cannot get a {} cloud kernel, and none is cached in {}",
            series.label,
            debs.display()
        ))),
    }
}

/// The newest package of the series in apt's lists (`apt-cache pkgnames`, no network).
fn newest_package(series: Series) -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["pkgnames", series.prefix])
        .output()
        .context("cannot run apt-cache")?;
    let names = String::from_utf8_lossy(&out.stdout);
    Ok(names
        .lines()
        .filter_map(|n| version_key(series, n.trim()).map(|k| (k, n.trim().to_owned())))
        .max()
        .map(|(_, name)| name))
}

/// The numbers between the series prefix and the flavour suffix, in order: `6.1.0-56` gives
/// `[0, 56]`, `6.12.117+deb12` gives `[117, 12]`. Debian raises them with every upload.
fn version_key(series: Series, name: &str) -> Option<Vec<u64>> {
    let middle = name
        .strip_prefix(series.prefix)?
        .strip_suffix(series.suffix)?;
    let key: Vec<u64> = middle
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect::<Option<_>>()?;
    (!key.is_empty() && middle.starts_with(|c: char| c.is_ascii_digit())).then_some(key)
}

fn package_name(deb: &Path) -> String {
    let file = deb.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    file.split('_').next().unwrap_or(file).to_owned()
}

fn cached_deb(debs: &Path, wanted: impl Fn(&str) -> bool) -> Option<PathBuf> {
    std::fs::read_dir(debs)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .find(|p| wanted(&package_name(p)))
}

fn newest_cached(series: Series, debs: &Path) -> Option<PathBuf> {
    std::fs::read_dir(debs)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .filter_map(|p| version_key(series, &package_name(&p)).map(|k| (k, p)))
        .max()
        .map(|(_, p)| p)
}

/// Unpacks the package's files into `dir`, once: a finished unpack leaves a stamp.
fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    let stamp = dir.join(".unpacked");
    if stamp.is_file() {
        return Ok(());
    }
    if dir.exists() {
        // A half-finished unpack of an interrupted run.
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    std::fs::write(&stamp, "").with_context(|| format!("cannot write {}", stamp.display()))
}

fn single_dir(parent: &Path) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(parent)
        .with_context(|| format!("cannot list {}", parent.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    if dirs.len() != 1 {
        bail!(
            "expected one kernel release in {}, found {dirs:?}",
            parent.display()
        );
    }
    Ok(dirs.remove(0))
}

/// Resolves [`MODULES`] with their dependencies under `modules_root` and writes them
/// decompressed into `out` (once; a stamp names the modules written). Returns them in load
/// order.
fn decompressed_modules(modules_root: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let stamp = out.join(".modules");
    let wanted = MODULES.join(" ");
    let order_file = out.join("order");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        let order = std::fs::read_to_string(&order_file)
            .with_context(|| format!("cannot read {}", order_file.display()))?;
        return Ok(order.lines().map(|n| out.join(format!("{n}.ko"))).collect());
    }
    let available = module_files(modules_root)?;
    let builtin = builtin_modules(modules_root);
    let mut images: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut order = Vec::new();
    let mut visiting = BTreeSet::new();
    for name in MODULES {
        visit(
            &normalize(name),
            &available,
            &builtin,
            &mut images,
            &mut order,
            &mut visiting,
        )?;
    }
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, image) in &images {
        let path = out.join(format!("{name}.ko"));
        std::fs::write(&path, image).with_context(|| format!("cannot write {}", path.display()))?;
    }
    std::fs::write(&order_file, order.join("\n"))
        .with_context(|| format!("cannot write {}", order_file.display()))?;
    std::fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(order.iter().map(|n| out.join(format!("{n}.ko"))).collect())
}

/// Depth-first: a module's dependencies are pushed to `order` before it.
fn visit(
    name: &str,
    available: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    images: &mut BTreeMap<String, Vec<u8>>,
    order: &mut Vec<String>,
    visiting: &mut BTreeSet<String>,
) -> Result<()> {
    if images.contains_key(name) || builtin.contains(name) {
        return Ok(());
    }
    if !visiting.insert(name.to_owned()) {
        bail!("module {name} depends on itself through its dependencies");
    }
    let Some(path) = available.get(name) else {
        bail!("the kernel has no module {name}, and it is not built in");
    };
    let image = read_module(path)?;
    for dep in depends(&image).with_context(|| format!("module {}", path.display()))? {
        visit(
            &normalize(&dep),
            available,
            builtin,
            images,
            order,
            visiting,
        )?;
    }
    images.insert(name.to_owned(), image);
    order.push(name.to_owned());
    Ok(())
}

/// Module names use `_` and `-` interchangeably; the kernel treats them as one.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Every module file under the release directory, by normalized name.
fn module_files(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![root.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Some(stem) = file
                .strip_suffix(".ko.xz")
                .or_else(|| file.strip_suffix(".ko"))
            {
                found.insert(normalize(stem), path.clone());
            }
        }
    }
    Ok(found)
}

/// Modules compiled into the kernel image (`modules.builtin`): nothing to load for them.
fn builtin_modules(root: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Path::new(l).file_name()?.to_str()?.strip_suffix(".ko"))
        .map(normalize)
        .collect()
}

/// The module's ELF image, decompressed if it is `.ko.xz` (the kernel's `finit_module` on
/// 6.1 takes uncompressed images only).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "xz") {
        let mut image = Vec::with_capacity(raw.len() * 4);
        lzma_rs::xz_decompress(&mut raw.as_slice(), &mut image)
            .map_err(|e| anyhow::anyhow!("cannot decompress {}: {e:?}", path.display()))?;
        Ok(image)
    } else {
        Ok(raw)
    }
}

/// The `depends=` entry of the module's `.modinfo` section (comma-separated names).
fn depends(image: &[u8]) -> Result<Vec<String>> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(image).context("not an ELF module")?;
    let section = file
        .section_by_name(".modinfo")
        .context("no .modinfo section")?;
    let data = section.data().context("unreadable .modinfo section")?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| String::from_utf8_lossy(d).into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_of_a_series_sorts_by_its_numbers() {
        assert_eq!(
            version_key(LINUX_6_1, "linux-image-6.1.0-56-cloud-amd64-unsigned"),
            Some(vec![0, 56])
        );
        assert!(
            version_key(LINUX_6_1, "linux-image-6.1.0-9-cloud-amd64-unsigned")
                < version_key(LINUX_6_1, "linux-image-6.1.0-56-cloud-amd64-unsigned")
        );
        assert_eq!(
            version_key(
                LINUX_6_12,
                "linux-image-6.12.117+deb12-cloud-amd64-unsigned"
            ),
            Some(vec![117, 12])
        );
        // Other flavours and series are not candidates.
        assert_eq!(
            version_key(LINUX_6_1, "linux-image-6.12.117+deb12-cloud-amd64-unsigned"),
            None
        );
        assert_eq!(
            version_key(LINUX_6_1, "linux-image-6.1.0-56-cloud-amd64-unsigned-dbg"),
            None
        );
        assert_eq!(
            version_key(LINUX_6_12, "linux-image-6.12.117+deb12-amd64-unsigned"),
            None
        );
    }

    #[test]
    fn module_names_treat_dash_and_underscore_alike() {
        assert_eq!(normalize("ip6-udp_tunnel"), "ip6_udp_tunnel");
    }
}
