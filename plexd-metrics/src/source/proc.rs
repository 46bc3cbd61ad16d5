//! `LinuxSystemReader`: the `system` group's figures from /proc and statfs.
//!
//! Every /proc file is read under a configurable root rather than `/proc`, so an agent in a
//! container reports the host (its /proc mounted at, say, `/host/proc`) and tests read a fake
//! root of fixture files. Parsing is left to `procfs`; this module only picks fields out of
//! the parsed files and does the arithmetic, in pure functions that are tested on their own.

use std::collections::HashMap;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use procfs::net::{DeviceStatus, InterfaceDeviceStatus};
use procfs::{ExplicitSystemInfo, FromRead, FromReadSI, KernelStats, LoadAverage, Meminfo};
use tokio_util::sync::CancellationToken;

use crate::collector::{BoxError, SystemReader, SystemStats};

/// How far apart the two `stat` samples are: the spec's 100 ms, long enough for a few ticks
/// (at the usual 100 Hz) on every CPU, short enough not to delay the cycle.
const CPU_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// The loopback interface, left out of the network sums: its traffic never leaves the host.
const LOOPBACK: &str = "lo";

/// `KernelStats` wants system info only to convert ticks to time, which is never asked for
/// here (usage is a ratio of ticks), so these values never reach a result.
const STAT_SYSTEM_INFO: ExplicitSystemInfo = ExplicitSystemInfo {
    boot_time_secs: 0,
    ticks_per_second: 100,
    page_size: 4096,
    is_little_endian: cfg!(target_endian = "little"),
};

/// Why the host's stats could not be read. Each message names the file or path involved, so
/// that a log line alone tells which mount or file is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The configured proc root is missing or is not a directory.
    #[error("proc root {}: {reason}", path.display())]
    ProcRoot {
        /// The configured proc root.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read.
    // The I/O error is part of the message rather than a `source`, so that printing the
    // error chain does not repeat it.
    #[error("read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it reported.
        error: io::Error,
    },
    /// A file was read but its contents were not what the kernel writes.
    #[error("parse {}: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong with its contents.
        reason: String,
    },
    /// The configured network interface is not listed in `net/dev`.
    #[error("interface {name} not found in {}", path.display())]
    InterfaceNotFound {
        /// The configured interface.
        name: String,
        /// The `net/dev` file that was searched.
        path: PathBuf,
    },
    /// `statvfs` failed on the configured mount point.
    #[error("statfs {}: {error}", path.display())]
    Statfs {
        /// The configured mount point.
        path: PathBuf,
        /// What `statvfs` reported.
        error: nix::Error,
    },
    /// The read was cancelled before it finished.
    #[error("read cancelled")]
    Cancelled,
    /// The blocking task doing the reads ended without a result.
    #[error("read task failed: {0}")]
    Task(String),
}

/// Reads [`SystemStats`] from a Linux host's procfs and from `statvfs` on a mount point.
///
/// Cheap to clone; clones share their configuration.
#[derive(Clone, Debug)]
pub struct LinuxSystemReader {
    // Behind an `Arc` because each read moves a handle into blocking tasks.
    config: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    proc_root: PathBuf,
    mount_point: PathBuf,
    net_interface: Option<String>,
}

impl LinuxSystemReader {
    /// A reader of the procfs mounted at `proc_root` (normally `/proc`, `/host/proc` in a
    /// container), with disk figures for the filesystem holding `mount_point`, and network
    /// figures of `net_interface` only or, when it is `None` (or empty, the spec's "unset"),
    /// summed over every interface but `lo`.
    ///
    /// Nothing is touched until [`check`](Self::check) or a read.
    pub fn new(
        proc_root: impl Into<PathBuf>,
        mount_point: impl Into<PathBuf>,
        net_interface: Option<String>,
    ) -> Self {
        Self {
            config: Arc::new(Config {
                proc_root: proc_root.into(),
                mount_point: mount_point.into(),
                net_interface: net_interface.filter(|name| !name.is_empty()),
            }),
        }
    }

    /// Startup validation: the proc root is a directory with a readable, parseable `stat`, and
    /// `statvfs` works on the mount point. Catches a mistyped or unmounted path once, with a
    /// message naming it, instead of as a failed `system` cycle every interval.
    ///
    /// The network interface is not checked: it may legitimately appear later (a WireGuard
    /// interface created after the agent starts), and until then each cycle's error names it.
    pub fn check(&self) -> Result<(), ProcError> {
        let root = &self.config.proc_root;
        match std::fs::metadata(root) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(ProcError::ProcRoot {
                    path: root.clone(),
                    reason: "not a directory".into(),
                })
            }
            Err(error) => {
                return Err(ProcError::ProcRoot {
                    path: root.clone(),
                    reason: error.to_string(),
                })
            }
        }
        read_cpu_times(&root.join("stat"))?;
        disk_usage(&self.config.mount_point)?;
        Ok(())
    }

    async fn read(&self, cancel: &CancellationToken) -> Result<SystemStats, ProcError> {
        let stat = self.config.proc_root.join("stat");
        let cpu =
            sample_cpu_usage(move || read_cpu_times(&stat), CPU_SAMPLE_INTERVAL, cancel).await?;
        let config = Arc::clone(&self.config);
        let mut stats = run_blocking(cancel, move || config.snapshot()).await?;
        stats.cpu_usage_percent = cpu;
        Ok(stats)
    }
}

#[async_trait]
impl SystemReader for LinuxSystemReader {
    async fn read_stats(&self, cancel: &CancellationToken) -> Result<SystemStats, BoxError> {
        Ok(self.read(cancel).await?)
    }
}

impl Config {
    /// Everything but the CPU figure, which needs two samples.
    fn snapshot(&self) -> Result<SystemStats, ProcError> {
        let memory = read_memory(&self.proc_root.join("meminfo"))?;
        let (disk_used_bytes, disk_total_bytes) = disk_usage(&self.mount_point)?;
        let (network_rx_bytes, network_tx_bytes) = read_network(
            &self.proc_root.join("net/dev"),
            self.net_interface.as_deref(),
        )?;
        let [load_avg_1, load_avg_5, load_avg_15] = read_load(&self.proc_root.join("loadavg"))?;
        Ok(SystemStats {
            cpu_usage_percent: 0.0,
            memory_used_bytes: memory.used,
            memory_total_bytes: memory.total,
            disk_used_bytes,
            disk_total_bytes,
            network_rx_bytes,
            network_tx_bytes,
            load_avg_1,
            load_avg_5,
            load_avg_15,
        })
    }
}

/// Runs `f` on the blocking pool, giving up (with [`ProcError::Cancelled`]) when `cancel`
/// fires.
///
/// The procfs files are tiny and generated in memory, but `statvfs` on a network filesystem
/// can hang for as long as the server is unreachable; on the blocking pool that stalls
/// neither the runtime's workers nor, thanks to the cancellation, the agent's shutdown. A
/// task abandoned that way finishes (or hangs) on its own; its result is dropped.
async fn run_blocking<T, F>(cancel: &CancellationToken, f: F) -> Result<T, ProcError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ProcError> + Send + 'static,
{
    let task = tokio::task::spawn_blocking(f);
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(ProcError::Cancelled),
        joined = task => joined.map_err(|e| ProcError::Task(e.to_string()))?,
    }
}

/// Two samples from `read`, `interval` apart, and the busy share of the time between them.
///
/// Generic over the sampler so tests can feed a sequence of fixture files through the same
/// path the reader uses, instead of waiting for a real /proc/stat to change.
async fn sample_cpu_usage<F>(
    read: F,
    interval: Duration,
    cancel: &CancellationToken,
) -> Result<f64, ProcError>
where
    F: Fn() -> Result<CpuTimes, ProcError> + Clone + Send + 'static,
{
    let first = run_blocking(cancel, read.clone()).await?;
    tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(ProcError::Cancelled),
        () = tokio::time::sleep(interval) => {}
    }
    let second = run_blocking(cancel, read).await?;
    Ok(cpu_usage(&first, &second))
}

/// The aggregate `cpu` line of `/proc/stat`, in ticks.
///
/// `guest` and `guest_nice` are left out: the kernel already counts them in `user` and
/// `nice`, and adding them again would count guest time twice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CpuTimes {
    user: u64,
    nice: u64,
    system: u64,
    idle: u64,
    iowait: u64,
    irq: u64,
    softirq: u64,
    steal: u64,
}

impl CpuTimes {
    fn total(&self) -> u64 {
        [
            self.user,
            self.nice,
            self.system,
            self.idle,
            self.iowait,
            self.irq,
            self.softirq,
            self.steal,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }

    /// Time waiting on I/O counts as idle: the CPU was free to run something else.
    fn idle_all(&self) -> u64 {
        self.idle.saturating_add(self.iowait)
    }

    fn busy(&self) -> u64 {
        self.total().saturating_sub(self.idle_all())
    }
}

impl From<&procfs::CpuTime> for CpuTimes {
    fn from(t: &procfs::CpuTime) -> Self {
        // The optional fields are absent only on kernels older than 2.6.11, where they
        // were not counted at all.
        Self {
            user: t.user,
            nice: t.nice,
            system: t.system,
            idle: t.idle,
            iowait: t.iowait.unwrap_or(0),
            irq: t.irq.unwrap_or(0),
            softirq: t.softirq.unwrap_or(0),
            steal: t.steal.unwrap_or(0),
        }
    }
}

/// Percentage of the ticks between `prev` and `now` that were busy, in [0, 100].
///
/// No elapsed ticks, or counters that went backwards (a fixture swap, a hypervisor resetting
/// them), give 0 rather than a division by zero or a wrapped, enormous figure. `iowait` alone
/// may legitimately decrease (see proc(5)); that can push the share above 100, hence the clamp.
fn cpu_usage(prev: &CpuTimes, now: &CpuTimes) -> f64 {
    let total = match now.total().checked_sub(prev.total()) {
        Some(0) | None => return 0.0,
        Some(total) => total,
    };
    let busy = now.busy().saturating_sub(prev.busy());
    (busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0)
}

fn read_cpu_times(path: &Path) -> Result<CpuTimes, ProcError> {
    let stats: KernelStats = parse_file(path, |bytes| {
        KernelStats::from_read(bytes, &STAT_SYSTEM_INFO)
    })?;
    Ok(CpuTimes::from(&stats.total))
}

/// Used and total memory, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Memory {
    used: u64,
    total: u64,
}

/// `MemTotal - MemAvailable`: the spec's figure, and what `free` calls used. procfs has
/// already turned the file's kB (really KiB) into bytes.
fn memory_from(meminfo: &Meminfo) -> Option<Memory> {
    let available = meminfo.mem_available?;
    Some(Memory {
        used: meminfo.mem_total.saturating_sub(available),
        total: meminfo.mem_total,
    })
}

fn read_memory(path: &Path) -> Result<Memory, ProcError> {
    let meminfo: Meminfo = parse_file(path, |bytes| Meminfo::from_read(bytes))?;
    // MemAvailable exists since Linux 3.14; guessing it from MemFree would report page cache
    // as used, so an older kernel gets an explicit error instead of a misleading figure.
    memory_from(&meminfo).ok_or_else(|| ProcError::Parse {
        path: path.to_owned(),
        reason: "no MemAvailable (needs Linux 3.14 or later)".into(),
    })
}

/// Received and transmitted bytes: of `interface` alone when given, else summed over every
/// interface but loopback. `path` only names the file in the error.
fn network_totals(
    devices: &HashMap<String, DeviceStatus>,
    interface: Option<&str>,
    path: &Path,
) -> Result<(u64, u64), ProcError> {
    match interface {
        Some(name) => devices
            .get(name)
            .map(|dev| (dev.recv_bytes, dev.sent_bytes))
            .ok_or_else(|| ProcError::InterfaceNotFound {
                name: name.to_owned(),
                path: path.to_owned(),
            }),
        // Saturating: a wrapped sum would look like a traffic spike downstream.
        None => {
            Ok(devices
                .values()
                .filter(|dev| dev.name != LOOPBACK)
                .fold((0, 0), |(rx, tx), dev| {
                    (
                        rx.saturating_add(dev.recv_bytes),
                        tx.saturating_add(dev.sent_bytes),
                    )
                }))
        }
    }
}

fn read_network(path: &Path, interface: Option<&str>) -> Result<(u64, u64), ProcError> {
    let devices: InterfaceDeviceStatus =
        parse_file(path, |bytes| InterfaceDeviceStatus::from_read(bytes))?;
    network_totals(&devices.0, interface, path)
}

/// procfs parses load averages into `f32`; widened directly, the file's `1.20` would be
/// reported as `1.2000000476837158`. An `f32`'s `Display` is the shortest text that reads
/// back as the same `f32`, which for the kernel's two-decimal figures is the file's own
/// text, so going through it gives the `f64` the file meant.
fn widen_load(value: f32) -> f64 {
    value
        .to_string()
        .parse()
        .unwrap_or_else(|_| f64::from(value))
}

fn read_load(path: &Path) -> Result<[f64; 3], ProcError> {
    let load: LoadAverage = parse_file(path, |bytes| LoadAverage::from_read(bytes))?;
    Ok([load.one, load.five, load.fifteen].map(widen_load))
}

/// Used and total bytes of a filesystem of `blocks` blocks, `free` of them free, each
/// `fragment_size` bytes.
fn disk_bytes(blocks: u64, free: u64, fragment_size: u64) -> (u64, u64) {
    (
        blocks.saturating_sub(free).saturating_mul(fragment_size),
        blocks.saturating_mul(fragment_size),
    )
}

fn disk_usage(mount_point: &Path) -> Result<(u64, u64), ProcError> {
    let st = nix::sys::statvfs::statvfs(mount_point).map_err(|error| ProcError::Statfs {
        path: mount_point.to_owned(),
        error,
    })?;
    // The block counts are in units of the fragment size (f_frsize), per POSIX statvfs. The
    // spec multiplies by Go's Statfs_t.Bsize, the preferred I/O size; the two are equal on
    // the usual Linux filesystems, but f_frsize is the one that is right by definition.
    Ok(disk_bytes(
        widen(st.blocks()),
        widen(st.blocks_free()),
        widen(st.fragment_size()),
    ))
}

/// The `statvfs` fields are `c_ulong`/`fsblkcnt_t`, 32 bits on some targets; a generic
/// widening avoids a cast that is a no-op (and a lint) on 64-bit ones.
fn widen<T: Into<u64>>(value: T) -> u64 {
    value.into()
}

/// Reads `path` whole and parses it, keeping the two failures apart so the message says
/// whether the file was unreadable or malformed.
fn parse_file<T>(
    path: &Path,
    parse: impl FnOnce(&[u8]) -> procfs::ProcResult<T>,
) -> Result<T, ProcError> {
    let bytes = std::fs::read(path).map_err(|error| ProcError::Read {
        path: path.to_owned(),
        error,
    })?;
    // Some procfs parsers slice strings by byte offsets and panic on unexpected (non-ASCII)
    // input; a garbled file must fail this cycle, not take down the caller.
    match catch_unwind(AssertUnwindSafe(|| parse(&bytes))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(ProcError::Parse {
            path: path.to_owned(),
            reason: describe(error),
        }),
        Err(_) => Err(ProcError::Parse {
            path: path.to_owned(),
            reason: "malformed contents (the parser panicked)".into(),
        }),
    }
}

/// procfs reports malformed input as an "internal error" with a request to report a procfs
/// bug, which would mislead whoever reads our log: keep only the part about the input.
fn describe(error: procfs::ProcError) -> String {
    const UNWRAP_PREFIX: &str = "Internal Unwrap Error: ";
    match error {
        procfs::ProcError::InternalError(internal) => {
            // Errors from procfs's helpers arrive wrapped in further internal errors, each
            // adding the prefix and the plea; the innermost message is the informative one.
            let msg = internal.msg;
            let msg = msg
                .rsplit_once(UNWRAP_PREFIX)
                .map_or(msg.as_str(), |(_, inner)| inner);
            // `NoneError` is how procfs says a required field or column was absent.
            match msg.strip_suffix("NoneError") {
                Some("") => "a field is missing".to_owned(),
                Some(context) => format!("{}: missing", context.trim_end_matches(": ")),
                None => msg.to_owned(),
            }
        }
        procfs::ProcError::Incomplete(_) => "incomplete contents".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn testdata() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src/source/testdata")
    }

    fn fixture_root() -> PathBuf {
        testdata().join("proc")
    }

    /// A writable copy of the fixture root, removed on drop, for tests that break one file.
    struct TempRoot(PathBuf);

    impl TempRoot {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "plexd-metrics-proc-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            // Constructed first so that a failed copy is still cleaned up.
            let root = Self(dir);
            copy_dir(&fixture_root(), &root.0);
            root
        }

        fn replace(&self, name: &str, malformed: &str) {
            std::fs::copy(
                testdata().join("malformed").join(malformed),
                self.0.join(name),
            )
            .unwrap();
        }
    }

    impl Drop for TempRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    async fn read_root(root: &Path, interface: Option<&str>) -> Result<SystemStats, ProcError> {
        LinuxSystemReader::new(root, "/", interface.map(str::to_owned))
            .read(&CancellationToken::new())
            .await
    }

    // Expected figures below are worked out by hand from the fixture files:
    // meminfo: MemTotal 8192000 kB, MemAvailable 6144000 kB (×1024 for bytes).
    // net/dev: eth0 rx 1048576 tx 524288, wg0 rx 200000 tx 100000, lo 5000000 both ways.
    // loadavg: 1.50 1.20 0.90.
    const MEM_TOTAL: u64 = 8_388_608_000;
    const MEM_USED: u64 = 2_097_152_000; // (8192000 - 6144000) × 1024

    #[tokio::test]
    async fn reads_a_whole_fake_proc_root() {
        let stats = read_root(&fixture_root(), None).await.unwrap();
        // Both samples come from the same unchanged stat file: no ticks elapsed.
        assert_eq!(stats.cpu_usage_percent, 0.0);
        assert_eq!(stats.memory_total_bytes, MEM_TOTAL);
        assert_eq!(stats.memory_used_bytes, MEM_USED);
        assert_eq!(stats.network_rx_bytes, 1_248_576); // eth0 + wg0, not lo
        assert_eq!(stats.network_tx_bytes, 624_288);
        assert_eq!(stats.load_avg_1, 1.5);
        assert_eq!(stats.load_avg_5, 1.2);
        assert_eq!(stats.load_avg_15, 0.9);

        // The disk figures are the real root filesystem's: check them against statvfs.
        let st = nix::sys::statvfs::statvfs("/").unwrap();
        let frsize = widen(st.fragment_size());
        assert_eq!(stats.disk_total_bytes, widen(st.blocks()) * frsize);
        assert!(stats.disk_total_bytes > 0);
        assert!(stats.disk_used_bytes <= stats.disk_total_bytes);
    }

    #[tokio::test]
    async fn json_has_the_file_s_load_figures() {
        let stats = read_root(&fixture_root(), None).await.unwrap();
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["load_avg_5"].to_string(), "1.2");
        assert_eq!(json["load_avg_15"].to_string(), "0.9");
    }

    #[tokio::test]
    async fn selected_interface_only() {
        let stats = read_root(&fixture_root(), Some("wg0")).await.unwrap();
        assert_eq!(
            (stats.network_rx_bytes, stats.network_tx_bytes),
            (200_000, 100_000)
        );
        // Loopback is excluded from the sum, not from explicit selection.
        let stats = read_root(&fixture_root(), Some("lo")).await.unwrap();
        assert_eq!(
            (stats.network_rx_bytes, stats.network_tx_bytes),
            (5_000_000, 5_000_000)
        );
    }

    #[tokio::test]
    async fn empty_interface_means_all() {
        let stats = read_root(&fixture_root(), Some("")).await.unwrap();
        assert_eq!(stats.network_rx_bytes, 1_248_576);
    }

    #[tokio::test]
    async fn missing_interface_is_named() {
        let err = read_root(&fixture_root(), Some("eth9")).await.unwrap_err();
        let dev = fixture_root().join("net/dev");
        assert_eq!(
            err.to_string(),
            format!("interface eth9 not found in {}", dev.display())
        );
    }

    #[tokio::test]
    async fn read_stats_fails_on_a_missing_file() {
        let root = TempRoot::new();
        std::fs::remove_file(root.0.join("meminfo")).unwrap();
        let reader = LinuxSystemReader::new(&root.0, "/", None);
        let err = reader
            .read_stats(&CancellationToken::new())
            .await
            .unwrap_err()
            .to_string();
        let path = root.0.join("meminfo");
        assert!(
            err.starts_with(&format!("read {}: No such file", path.display())),
            "{err}"
        );
    }

    #[tokio::test]
    async fn malformed_meminfo_names_the_file() {
        let root = TempRoot::new();
        root.replace("meminfo", "meminfo");
        let err = read_root(&root.0, None).await.unwrap_err().to_string();
        let prefix = format!("parse {}: ", root.0.join("meminfo").display());
        assert!(err.starts_with(&prefix), "{err}");
        assert!(err.contains("lots"), "{err}");
        assert!(!err.contains("procfs bug"), "{err}");
    }

    #[tokio::test]
    async fn meminfo_that_panics_the_parser_is_an_error() {
        let root = TempRoot::new();
        root.replace("meminfo", "meminfo-panics");
        let err = read_root(&root.0, None).await.unwrap_err().to_string();
        let prefix = format!("parse {}: ", root.0.join("meminfo").display());
        assert!(err.starts_with(&prefix), "{err}");
    }

    #[tokio::test]
    async fn meminfo_without_mem_available_is_an_error() {
        let root = TempRoot::new();
        root.replace("meminfo", "meminfo-no-available");
        let err = read_root(&root.0, None).await.unwrap_err().to_string();
        let path = root.0.join("meminfo");
        assert_eq!(
            err,
            format!(
                "parse {}: no MemAvailable (needs Linux 3.14 or later)",
                path.display()
            )
        );
    }

    #[tokio::test]
    async fn malformed_loadavg_names_the_file() {
        let root = TempRoot::new();
        root.replace("loadavg", "loadavg");
        let err = read_root(&root.0, None).await.unwrap_err().to_string();
        let prefix = format!("parse {}: ", root.0.join("loadavg").display());
        assert!(err.starts_with(&prefix), "{err}");
    }

    #[tokio::test]
    async fn malformed_net_dev_names_the_file() {
        let root = TempRoot::new();
        root.replace("net/dev", "net-dev");
        let err = read_root(&root.0, None).await.unwrap_err().to_string();
        let path = root.0.join("net/dev");
        assert_eq!(err, format!("parse {}: a field is missing", path.display()));
    }

    #[test]
    fn check_accepts_the_fixture_root() {
        LinuxSystemReader::new(fixture_root(), "/", None)
            .check()
            .unwrap();
    }

    #[test]
    fn check_names_a_missing_proc_root() {
        let root = testdata().join("no-such-proc");
        let err = LinuxSystemReader::new(&root, "/", None)
            .check()
            .unwrap_err();
        assert!(matches!(err, ProcError::ProcRoot { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("proc root {}: ", root.display())),
            "{err}"
        );
    }

    #[test]
    fn check_rejects_a_root_without_stat() {
        // A directory, but not a procfs.
        let err = LinuxSystemReader::new(testdata().join("malformed"), "/", None)
            .check()
            .unwrap_err();
        let stat = testdata().join("malformed/stat");
        assert!(
            err.to_string()
                .starts_with(&format!("read {}: ", stat.display())),
            "{err}"
        );
    }

    #[test]
    fn check_names_a_missing_mount_point() {
        let mount = testdata().join("no-such-mount");
        let err = LinuxSystemReader::new(fixture_root(), &mount, None)
            .check()
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("statfs {}: ", mount.display())),
            "{err}"
        );
    }

    // stat → stat.later, by hand: user +25, system +10, idle +50, iowait +5, irq +2,
    // softirq +3, steal +5 (guest +7 is inside user's +25). Total +100, idle+iowait +55,
    // so 45 busy ticks of 100.
    #[test]
    fn cpu_usage_between_two_fixture_samples() {
        let prev = read_cpu_times(&fixture_root().join("stat")).unwrap();
        let now = read_cpu_times(&fixture_root().join("stat.later")).unwrap();
        assert_eq!(
            prev,
            CpuTimes {
                user: 10000,
                nice: 500,
                system: 3000,
                idle: 80000,
                iowait: 1500,
                irq: 200,
                softirq: 300,
                steal: 0,
            }
        );
        assert_eq!(cpu_usage(&prev, &now), 45.0);
    }

    #[tokio::test]
    async fn sampler_reads_twice_and_computes_usage() {
        let files = Arc::new([
            fixture_root().join("stat"),
            fixture_root().join("stat.later"),
        ]);
        let calls = Arc::new(AtomicUsize::new(0));
        let read = {
            let calls = Arc::clone(&calls);
            move || {
                let i = calls.fetch_add(1, Ordering::SeqCst);
                read_cpu_times(&files[i.min(1)])
            }
        };
        let usage = sample_cpu_usage(read, CPU_SAMPLE_INTERVAL, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(usage, 45.0);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn cancelled_sampling_stops_at_the_sleep() {
        let cancel = CancellationToken::new();
        let read = || Ok(CpuTimes::default());
        let waiting = sample_cpu_usage(read, Duration::from_secs(3600), &cancel);
        let canceller = {
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                cancel.cancel();
            }
        };
        let (result, ()) = tokio::join!(waiting, canceller);
        assert!(matches!(result, Err(ProcError::Cancelled)), "{result:?}");
    }

    #[tokio::test]
    async fn read_stats_on_a_cancelled_token_is_an_error() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = LinuxSystemReader::new(fixture_root(), "/", None)
            .read_stats(&cancel)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "read cancelled");
    }

    fn times(busy: u64, idle: u64) -> CpuTimes {
        CpuTimes {
            user: busy,
            idle,
            ..CpuTimes::default()
        }
    }

    #[test]
    fn cpu_usage_edge_cases() {
        let a = times(100, 900);
        // No ticks elapsed.
        assert_eq!(cpu_usage(&a, &a), 0.0);
        // Counters went backwards: zero, not a wrapped or negative figure.
        assert_eq!(cpu_usage(&times(200, 1800), &a), 0.0);
        // Fully busy and fully idle.
        assert_eq!(cpu_usage(&a, &times(150, 900)), 100.0);
        assert_eq!(cpu_usage(&a, &times(100, 950)), 0.0);
        // iowait counts as idle.
        let mut b = times(110, 930);
        b.iowait = 10;
        assert_eq!(cpu_usage(&a, &b), 20.0); // 10 busy of 50
                                             // iowait decreasing (allowed by the kernel) cannot push past 100.
        let mut c = a;
        c.iowait = 50;
        let mut d = times(120, 900);
        d.iowait = 40;
        assert_eq!(cpu_usage(&c, &d), 100.0);
        // Counters near u64::MAX do not overflow.
        let huge = times(u64::MAX, u64::MAX);
        assert_eq!(cpu_usage(&huge, &huge), 0.0);
    }

    #[test]
    fn network_totals_skip_loopback() {
        let path = fixture_root().join("net/dev");
        let devices = InterfaceDeviceStatus::from_read(&std::fs::read(&path).unwrap()[..])
            .unwrap()
            .0;
        assert_eq!(
            network_totals(&devices, None, &path).unwrap(),
            (1_248_576, 624_288)
        );
        assert_eq!(
            network_totals(&devices, Some("eth0"), &path).unwrap(),
            (1_048_576, 524_288)
        );
        assert!(matches!(
            network_totals(&devices, Some("eth9"), &path),
            Err(ProcError::InterfaceNotFound { .. })
        ));
        assert_eq!(
            network_totals(&HashMap::new(), None, &path).unwrap(),
            (0, 0)
        );
    }

    #[test]
    fn disk_bytes_math() {
        assert_eq!(disk_bytes(1000, 250, 4096), (750 * 4096, 1000 * 4096));
        // A free count above the block count (a racing or odd filesystem) is not negative.
        assert_eq!(disk_bytes(10, 20, 4096), (0, 40960));
    }

    #[test]
    fn load_is_widened_to_the_file_s_decimal() {
        assert_eq!(widen_load(1.2), 1.2);
        assert_eq!(widen_load(0.9), 0.9);
        assert_eq!(widen_load(0.0), 0.0);
        assert_eq!(widen_load(123.45), 123.45);
    }

    #[test]
    fn memory_figures() {
        let meminfo =
            Meminfo::from_read(&std::fs::read(fixture_root().join("meminfo")).unwrap()[..])
                .unwrap();
        assert_eq!(
            memory_from(&meminfo),
            Some(Memory {
                used: MEM_USED,
                total: MEM_TOTAL
            })
        );
    }
}
