//! The VM's initramfs: a newc cpio archive (uncompressed: the kernel unpacks it fastest, and
//! under TCG every cycle counts) with the Rust `/init`, the agent, the test binaries, the
//! tools the tests drive (`ip`, `tc`, `wg`, `ping`) with the shared libraries `ldd` names,
//! and the kernel modules.
//!
//! Host files keep their paths, and the host's symbolic links on the way to them (Debian's
//! merged /usr: `/lib -> usr/lib`, ...) are recreated, so the dynamic loader finds every
//! library where the binaries were linked to look.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// What goes into the archive, by path inside the guest.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<PathBuf, Entry>,
}

#[derive(Debug)]
enum Entry {
    Dir,
    File { source: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
    Symlink(PathBuf),
    CharDevice { major: u32, minor: u32 },
}

impl Initramfs {
    /// An archive with the directories every Linux userland expects and `/dev/console`, which
    /// the kernel opens as the init's standard streams.
    pub fn new() -> Self {
        let mut fs = Self::default();
        for dir in ["/dev", "/proc", "/sys", "/tmp", "/run", "/root", "/etc"] {
            fs.dir(Path::new(dir));
        }
        fs.entries.insert(
            PathBuf::from("/dev/console"),
            Entry::CharDevice { major: 5, minor: 1 },
        );
        fs
    }

    /// Adds a directory and its parents.
    pub fn dir(&mut self, path: &Path) {
        for ancestor in path.ancestors() {
            if ancestor == Path::new("/") || ancestor.as_os_str().is_empty() {
                break;
            }
            self.entries
                .entry(ancestor.to_path_buf())
                .or_insert(Entry::Dir);
        }
    }

    /// Adds host file `source` as `dest`, executable when `mode` says so.
    pub fn file(&mut self, dest: &Path, source: &Path, mode: u32) {
        if let Some(parent) = dest.parent() {
            self.dir(parent);
        }
        self.entries.insert(
            dest.to_path_buf(),
            Entry::File {
                source: source.to_path_buf(),
                mode,
            },
        );
    }

    /// Adds a file with the given content.
    pub fn bytes(&mut self, dest: &Path, data: Vec<u8>, mode: u32) {
        if let Some(parent) = dest.parent() {
            self.dir(parent);
        }
        self.entries
            .insert(dest.to_path_buf(), Entry::Bytes { data, mode });
    }

    /// Adds a symbolic link `path` pointing at `target`.
    pub fn symlink(&mut self, path: &Path, target: &Path) {
        if let Some(parent) = path.parent() {
            self.dir(parent);
        }
        self.entries
            .insert(path.to_path_buf(), Entry::Symlink(target.to_path_buf()));
    }

    /// Adds a host executable at its own path with every shared library it needs.
    pub fn host_program(&mut self, path: &Path) -> Result<()> {
        self.host_path(path)?;
        for lib in shared_libraries(path)? {
            self.host_path(&lib)?;
        }
        Ok(())
    }

    /// Adds the shared libraries a binary needs (not the binary itself) at their host paths.
    pub fn host_libraries_of(&mut self, program: &Path) -> Result<()> {
        for lib in shared_libraries(program)? {
            self.host_path(&lib)?;
        }
        Ok(())
    }

    /// Adds every file of a host directory at its own path (not recursively).
    pub fn host_dir_files(&mut self, dir: &Path) -> Result<()> {
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_file() {
                self.host_path(&path)?;
            }
        }
        Ok(())
    }

    /// Adds a host file at its own path, recreating every symbolic link on the way to it.
    pub fn host_path(&mut self, path: &Path) -> Result<()> {
        self.host_path_depth(path, 0)
    }

    fn host_path_depth(&mut self, path: &Path, depth: usize) -> Result<()> {
        if depth > 40 {
            bail!("too many symbolic links resolving {}", path.display());
        }
        let mut current = PathBuf::from("/");
        let components: Vec<Component<'_>> = path.components().collect();
        for (i, component) in components.iter().enumerate() {
            let Component::Normal(part) = component else {
                continue;
            };
            let next = current.join(part);
            let meta = std::fs::symlink_metadata(&next)
                .with_context(|| format!("cannot stat {}", next.display()))?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&next)
                    .with_context(|| format!("cannot read link {}", next.display()))?;
                if let Some(parent) = next.parent() {
                    self.dir(parent);
                }
                self.entries
                    .insert(next.clone(), Entry::Symlink(target.clone()));
                let mut resolved = lexical(&current.join(&target));
                for rest in &components[i + 1..] {
                    resolved.push(rest);
                }
                return self.host_path_depth(&lexical(&resolved), depth + 1);
            }
            if i + 1 == components.len() {
                if meta.is_dir() {
                    self.dir(&next);
                } else {
                    use std::os::unix::fs::PermissionsExt as _;
                    let mode = meta.permissions().mode() & 0o7777;
                    self.file(&next, &next, mode);
                }
            }
            current = next;
        }
        Ok(())
    }

    /// Writes the archive to `out` and returns its size in bytes.
    pub fn write(&self, out: &Path) -> Result<u64> {
        let file = std::fs::File::create(out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        // BTreeMap order puts every directory before what it contains.
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let name = path
                .strip_prefix("/")
                .unwrap_or(path)
                .to_str()
                .with_context(|| format!("{} is not UTF-8", path.display()))?;
            let builder = cpio::newc::Builder::new(name)
                .ino(ino as u32 + 1)
                .uid(0)
                .gid(0);
            match entry {
                Entry::Dir => {
                    builder.mode(0o040_755).write(&mut w, 0).finish()?;
                }
                Entry::CharDevice { major, minor } => {
                    builder
                        .mode(0o020_600)
                        .rdev_major(*major)
                        .rdev_minor(*minor)
                        .write(&mut w, 0)
                        .finish()?;
                }
                Entry::Symlink(target) => {
                    let target = target.as_os_str().as_encoded_bytes();
                    let mut writer = builder.mode(0o120_777).write(&mut w, target.len() as u32);
                    writer.write_all(target)?;
                    writer.finish()?;
                }
                Entry::Bytes { data, mode } => {
                    let mut writer = builder
                        .mode(0o100_000 | mode)
                        .write(&mut w, size(data.len())?);
                    writer.write_all(data)?;
                    writer.finish()?;
                }
                Entry::File { source, mode } => {
                    let data = std::fs::read(source)
                        .with_context(|| format!("cannot read {}", source.display()))?;
                    let mut writer = builder
                        .mode(0o100_000 | mode)
                        .write(&mut w, size(data.len())?);
                    writer.write_all(&data)?;
                    writer.finish()?;
                }
            }
        }
        cpio::newc::trailer(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        Ok(file.metadata()?.len())
    }
}

fn size(len: usize) -> Result<u32> {
    u32::try_from(len).context("a file of 4 GiB or more cannot go into a newc archive")
}

/// `..` and `.` removed without looking at the file system (the caller resolves links itself).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            _ => {}
        }
    }
    out
}

/// The shared libraries `ldd` says `program` loads, the dynamic loader included; none for a
/// static program.
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("cannot run ldd (package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text).with_context(|| format!("libraries of {}", program.display()))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("=> not found") {
            bail!("a library is missing on this machine: {line}");
        }
        // `name => /path (0x...)` or `/path/ld.so (0x...)`; the vDSO has no file.
        let path = match line.split_once("=> ") {
            Some((_, rest)) => rest,
            None => line,
        };
        let path = path.split(" (").next().unwrap_or(path).trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f2)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let missing = "\tlibfoo.so.1 => not found\n";
        assert!(parse_ldd(missing).is_err());
    }

    #[test]
    fn lexical_paths_drop_dots() {
        assert_eq!(
            lexical(Path::new("/usr/lib64/../lib/./x86_64-linux-gnu/ld.so")),
            PathBuf::from("/usr/lib/x86_64-linux-gnu/ld.so")
        );
    }

    #[test]
    fn the_archive_reads_back_with_links_and_parents() {
        let dir = std::env::temp_dir().join(format!("xtask-initramfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut fs = Initramfs::new();
        fs.bytes(
            Path::new("/etc/plexd-vm/modules"),
            b"/a.ko\n".to_vec(),
            0o644,
        );
        fs.host_program(Path::new("/bin/sh"))
            .expect("the host's sh");
        let out = dir.join("test.cpio");
        fs.write(&out).unwrap();

        let mut names = Vec::new();
        let mut reader = std::fs::File::open(&out).unwrap();
        loop {
            let entry = cpio::NewcReader::new(reader).unwrap();
            if entry.entry().is_trailer() {
                break;
            }
            names.push((entry.entry().name().to_owned(), entry.entry().mode()));
            reader = entry.finish().unwrap();
        }
        let find = |n: &str| names.iter().find(|(name, _)| name == n).map(|(_, m)| *m);
        assert_eq!(find("etc/plexd-vm/modules"), Some(0o100_644));
        assert_eq!(find("etc/plexd-vm"), Some(0o040_755));
        assert_eq!(find("dev/console"), Some(0o020_600));
        // On merged-/usr Debian /bin is a link; either way sh itself ends up in the archive.
        if std::fs::symlink_metadata("/bin")
            .unwrap()
            .file_type()
            .is_symlink()
        {
            assert_eq!(find("bin"), Some(0o120_777));
        }
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        assert!(
            find(sh.strip_prefix("/").unwrap().to_str().unwrap()).is_some(),
            "{names:?}"
        );
        assert!(
            names.iter().any(|(n, _)| n.contains("libc.so")),
            "{names:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
