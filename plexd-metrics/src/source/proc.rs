//! `LinuxSystemReader`: the `system` group's figures from /proc, /sys and statfs.
//!
//! Every /proc file is read under a configurable root rather than `/proc`, and `/sys/block`
//! under a configurable sys root, so an agent in a container reports the host (its /proc
//! mounted at, say, `/host/proc`) and tests read a fake root of fixture files. Parsing is
//! left to `procfs`; this module picks fields out of the parsed files and hands them to
//! [`crate::accounting::host`] for the arithmetic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use procfs::net::{DeviceStatus, InterfaceDeviceStatus};
use procfs::{
    DiskStats, ExplicitSystemInfo, FromRead, FromReadSI, KernelStats, LoadAverage, Meminfo,
};
use tokio_util::sync::CancellationToken;

use crate::accounting::host::{
    cores_usage, cpu_usage, sum_interfaces, CpuTimes, DiskIo, DiskSelection, InterfaceCounters,
};
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

/// Reads [`SystemStats`] from a Linux host's procfs, its sysfs's list of block devices and
/// `statvfs` on a mount point.
///
/// Cheap to clone; clones share their configuration.
#[derive(Clone, Debug)]
pub struct LinuxSystemReader {
    // Behind an `Arc` because each read moves a handle into blocking tasks.
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    proc_root: PathBuf,
    mount_point: PathBuf,
    net_interface: Option<String>,
    sys_root: PathBuf,
    disk_devices: Vec<String>,
}

/// Where sysfs is mounted unless [`LinuxSystemReader::with_disks`] says otherwise.
const DEFAULT_SYS_ROOT: &str = "/sys";

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
                sys_root: PathBuf::from(DEFAULT_SYS_ROOT),
                disk_devices: Vec::new(),
            }),
        }
    }

    /// The same reader with disk I/O figures of `devices` (names as in `diskstats`) or,
    /// when that is empty, of the whole disks listed in `block` under `sys_root` (normally
    /// `/sys`, `/host/sys` in a container). Without it: the whole disks under `/sys`.
    pub fn with_disks(mut self, sys_root: impl Into<PathBuf>, devices: Vec<String>) -> Self {
        let config = Arc::make_mut(&mut self.config);
        config.sys_root = sys_root.into();
        config.disk_devices = devices;
        self
    }

    /// Startup validation: the proc root is a directory with a readable, parseable `stat`, and
    /// `statvfs` works on the mount point. Catches a mistyped or unmounted path once, with a
    /// message naming it, instead of as a failed `system` cycle every interval.
    ///
    /// The network interface is not checked: it may legitimately appear later (a WireGuard
    /// interface created after the agent starts), and until then each cycle's error names it.
    ///
    /// An unreadable `block` directory under the sys root is not an error, since the disk
    /// figures can do without it, but it is logged once here: disks are then told from
    /// partitions by their names alone.
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
        if self.config.disk_devices.is_empty() {
            let block = self.config.sys_root.join("block");
            if let Err(error) = std::fs::read_dir(&block) {
                tracing::warn!(
                    component = "metrics",
                    path = %block.display(),
                    %error,
                    "cannot list whole disks; telling them from partitions by name (set metrics.system.sys_root to where the host's /sys is mounted)"
                );
            }
        }
        Ok(())
    }

    async fn read(&self, cancel: &CancellationToken) -> Result<SystemStats, ProcError> {
        let stat = self.config.proc_root.join("stat");
        let cpu =
            sample_cpu_usage(move || read_cpu_times(&stat), CPU_SAMPLE_INTERVAL, cancel).await?;
        let config = Arc::clone(&self.config);
        let mut stats = run_blocking(cancel, move || config.snapshot()).await?;
        stats.cpu_usage_percent = cpu.total;
        stats.cpu_count = cpu.count;
        stats.cpu_cores_usage_percent = cpu.cores;
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
        let disk = disk_usage(&self.mount_point)?;
        let interfaces = read_network(
            &self.proc_root.join("net/dev"),
            self.net_interface.as_deref(),
        )?;
        let net = sum_interfaces(interfaces.values());
        let [load_avg_1, load_avg_5, load_avg_15] = read_load(&self.proc_root.join("loadavg"))?;
        let disks = self.read_disks()?;
        Ok(SystemStats {
            cpu_usage_percent: 0.0,
            memory_used_bytes: memory.used,
            memory_total_bytes: memory.total,
            disk_used_bytes: disk.used,
            disk_total_bytes: disk.total,
            network_rx_bytes: net.rx_bytes,
            network_tx_bytes: net.tx_bytes,
            load_avg_1,
            load_avg_5,
            load_avg_15,
            cpu_count: 0,
            cpu_cores_usage_percent: BTreeMap::new(),
            memory_available_bytes: memory.available,
            swap_total_bytes: memory.swap_total,
            swap_used_bytes: memory.swap_used,
            disk_free_bytes: disk.available,
            disks,
            network_rx_packets: net.rx_packets,
            network_tx_packets: net.tx_packets,
            network_rx_errors: net.rx_errors,
            network_tx_errors: net.tx_errors,
            network_rx_dropped: net.rx_dropped,
            network_tx_dropped: net.tx_dropped,
            interfaces,
        })
    }

    /// The I/O figures of the selected block devices. The whole disks are those listed in
    /// `block` under the sys root; when it cannot be listed (no sysfs in a container),
    /// names are judged by their shape, as [`check`](LinuxSystemReader::check) logged.
    fn read_disks(&self) -> Result<BTreeMap<String, DiskIo>, ProcError> {
        let whole: Option<HashSet<String>>;
        let selection = if self.disk_devices.is_empty() {
            whole = list_dir(&self.sys_root.join("block"));
            DiskSelection::WholeDisks(whole.as_ref())
        } else {
            DiskSelection::Named(&self.disk_devices)
        };
        read_disk_io(&self.proc_root.join("diskstats"), selection)
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
) -> Result<CpuUsage, ProcError>
where
    F: Fn() -> Result<CpuSample, ProcError> + Clone + Send + 'static,
{
    let first = run_blocking(cancel, read.clone()).await?;
    tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(ProcError::Cancelled),
        () = tokio::time::sleep(interval) => {}
    }
    let second = run_blocking(cancel, read).await?;
    Ok(CpuUsage {
        total: cpu_usage(&first.total, &second.total),
        cores: cores_usage(&first.cores, &second.cores),
        count: second.cores.len() as u64,
    })
}

/// The CPU lines of one `stat` sample: the aggregate and each online CPU's by its name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct CpuSample {
    total: CpuTimes,
    cores: Vec<(String, CpuTimes)>,
}

/// What two samples tell: the busy shares, overall and per CPU, and the CPUs online at the
/// second one.
#[derive(Clone, Debug, PartialEq)]
struct CpuUsage {
    total: f64,
    cores: BTreeMap<String, f64>,
    count: u64,
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

fn read_cpu_times(path: &Path) -> Result<CpuSample, ProcError> {
    // procfs keeps the per-CPU lines in order but drops their names, which are needed
    // because an offline CPU has no line: they are taken from the same lines, picked by
    // the same test procfs applies.
    let (stats, names) = parse_file(path, |bytes| {
        let stats = KernelStats::from_read(bytes, &STAT_SYSTEM_INFO)?;
        Ok((stats, cpu_line_names(bytes)))
    })?;
    if names.len() != stats.cpu_time.len() {
        return Err(ProcError::Parse {
            path: path.to_owned(),
            reason: format!(
                "{} per-CPU lines but {} parsed",
                names.len(),
                stats.cpu_time.len()
            ),
        });
    }
    Ok(CpuSample {
        total: CpuTimes::from(&stats.total),
        cores: names
            .into_iter()
            .zip(stats.cpu_time.iter().map(CpuTimes::from))
            .collect(),
    })
}

/// The names (`cpu0`, `cpu1`, ...) of the per-CPU lines of a `stat` file, in order.
fn cpu_line_names(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The memory and swap figures, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Memory {
    used: u64,
    total: u64,
    available: u64,
    swap_total: u64,
    swap_used: u64,
}

/// `MemTotal - MemAvailable`: the spec's figure, and what `free` calls used; swap used is
/// `SwapTotal - SwapFree`, as `free` has it. procfs has already turned the file's kB (really
/// KiB) into bytes.
fn memory_from(meminfo: &Meminfo) -> Option<Memory> {
    let available = meminfo.mem_available?;
    Some(Memory {
        used: meminfo.mem_total.saturating_sub(available),
        total: meminfo.mem_total,
        available,
        swap_total: meminfo.swap_total,
        swap_used: meminfo.swap_total.saturating_sub(meminfo.swap_free),
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

/// The counters of `interface` alone when given, else of every interface but loopback: the
/// set the spec's network figures are summed over. `path` only names the file in the error.
fn network_interfaces(
    devices: &HashMap<String, DeviceStatus>,
    interface: Option<&str>,
    path: &Path,
) -> Result<BTreeMap<String, InterfaceCounters>, ProcError> {
    match interface {
        Some(name) => devices
            .get(name)
            .map(|dev| BTreeMap::from([(dev.name.clone(), counters(dev))]))
            .ok_or_else(|| ProcError::InterfaceNotFound {
                name: name.to_owned(),
                path: path.to_owned(),
            }),
        None => Ok(devices
            .values()
            .filter(|dev| dev.name != LOOPBACK)
            .map(|dev| (dev.name.clone(), counters(dev)))
            .collect()),
    }
}

/// The counters of one `net/dev` line that the `system` group reports.
fn counters(dev: &DeviceStatus) -> InterfaceCounters {
    InterfaceCounters {
        rx_bytes: dev.recv_bytes,
        tx_bytes: dev.sent_bytes,
        rx_packets: dev.recv_packets,
        tx_packets: dev.sent_packets,
        rx_errors: dev.recv_errs,
        tx_errors: dev.sent_errs,
        rx_dropped: dev.recv_drop,
        tx_dropped: dev.sent_drop,
    }
}

fn read_network(
    path: &Path,
    interface: Option<&str>,
) -> Result<BTreeMap<String, InterfaceCounters>, ProcError> {
    let devices: InterfaceDeviceStatus =
        parse_file(path, |bytes| InterfaceDeviceStatus::from_read(bytes))?;
    network_interfaces(&devices.0, interface, path)
}

/// The I/O figures of the devices of `diskstats` at `path` that `selection` includes.
///
/// A kernel built without a block layer has no `diskstats`: that is no disks rather than a
/// failed cycle, which would lose the other figures too.
fn read_disk_io(
    path: &Path,
    selection: DiskSelection<'_>,
) -> Result<BTreeMap<String, DiskIo>, ProcError> {
    let stats: DiskStats = match parse_file(path, |bytes| DiskStats::from_read(bytes)) {
        Err(ProcError::Read { error, .. }) if error.kind() == io::ErrorKind::NotFound => {
            return Ok(BTreeMap::new())
        }
        other => other?,
    };
    Ok(stats
        .0
        .into_iter()
        .filter(|d| selection.includes(&d.name))
        .map(|d| {
            let io = DiskIo::from_sectors(d.reads, d.sectors_read, d.writes, d.sectors_written);
            (d.name, io)
        })
        .collect())
}

/// The names in directory `path`, or `None` when it cannot be listed.
fn list_dir(path: &Path) -> Option<HashSet<String>> {
    let entries = std::fs::read_dir(path).ok()?;
    Some(
        entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
    )
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

/// The sizes of a filesystem, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DiskSpace {
    used: u64,
    total: u64,
    /// Free to unprivileged users: what `df` shows as Avail.
    available: u64,
}

/// The sizes of a filesystem of `blocks` blocks, `free` of them free and `available` of
/// those free to unprivileged users, each `fragment_size` bytes.
fn disk_bytes(blocks: u64, free: u64, available: u64, fragment_size: u64) -> DiskSpace {
    DiskSpace {
        used: blocks.saturating_sub(free).saturating_mul(fragment_size),
        total: blocks.saturating_mul(fragment_size),
        available: available.saturating_mul(fragment_size),
    }
}

fn disk_usage(mount_point: &Path) -> Result<DiskSpace, ProcError> {
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
        widen(st.blocks_available()),
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

    fn sys_root() -> PathBuf {
        testdata().join("sys")
    }

    async fn read_root(root: &Path, interface: Option<&str>) -> Result<SystemStats, ProcError> {
        LinuxSystemReader::new(root, "/", interface.map(str::to_owned))
            .with_disks(sys_root(), Vec::new())
            .read(&CancellationToken::new())
            .await
    }

    // Expected figures below are worked out by hand from the fixture files:
    // meminfo: MemTotal 8192000 kB, MemAvailable 6144000 kB, SwapTotal 2097148 kB,
    // SwapFree 1048576 kB (×1024 for bytes).
    // net/dev: eth0 rx 1048576 tx 524288, wg0 rx 200000 tx 100000, lo 5000000 both ways.
    // loadavg: 1.50 1.20 0.90.
    const MEM_TOTAL: u64 = 8_388_608_000;
    const MEM_USED: u64 = 2_097_152_000; // (8192000 - 6144000) × 1024
    const MEM_AVAILABLE: u64 = 6_291_456_000; // 6144000 × 1024
    const SWAP_TOTAL: u64 = 2_147_479_552; // 2097148 × 1024
    const SWAP_USED: u64 = 1_073_737_728; // (2097148 - 1048576) × 1024

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
        assert_eq!(stats.memory_available_bytes, MEM_AVAILABLE);
        assert_eq!(stats.swap_total_bytes, SWAP_TOTAL);
        assert_eq!(stats.swap_used_bytes, SWAP_USED);
        // Two per-CPU lines, unchanged between the samples.
        assert_eq!(stats.cpu_count, 2);
        assert_eq!(
            stats.cpu_cores_usage_percent,
            BTreeMap::from([("cpu0".to_owned(), 0.0), ("cpu1".to_owned(), 0.0)])
        );
        // net/dev: eth0 errs 3/5 drop 4/6, wg0 errs 1/0 drop 2/7; lo left out.
        assert_eq!(
            (stats.network_rx_packets, stats.network_tx_packets),
            (2300, 1750)
        );
        assert_eq!((stats.network_rx_errors, stats.network_tx_errors), (4, 5));
        assert_eq!(
            (stats.network_rx_dropped, stats.network_tx_dropped),
            (6, 13)
        );
        assert_eq!(stats.interfaces.keys().collect::<Vec<_>>(), ["eth0", "wg0"]);
        assert_eq!(
            stats.interfaces["wg0"],
            InterfaceCounters {
                rx_bytes: 200_000,
                tx_bytes: 100_000,
                rx_packets: 300,
                tx_packets: 250,
                rx_errors: 1,
                tx_errors: 0,
                rx_dropped: 2,
                tx_dropped: 7,
            }
        );
        // diskstats: the whole disks of the fake /sys/block (sda, nvme0n1, dm-0; loop0 and
        // zram0 are memory-backed), sectors ×512.
        assert_eq!(
            stats.disks.keys().collect::<Vec<_>>(),
            ["dm-0", "nvme0n1", "sda"]
        );
        assert_eq!(
            stats.disks["sda"],
            DiskIo {
                read_bytes: 400_000 * 512,
                write_bytes: 200_000 * 512,
                reads: 5000,
                writes: 2500,
            }
        );
        assert_eq!(stats.disks["nvme0n1"].write_bytes, 24_000 * 512);

        // The disk figures are the real root filesystem's: check them against statvfs.
        let st = nix::sys::statvfs::statvfs("/").unwrap();
        let frsize = widen(st.fragment_size());
        assert_eq!(stats.disk_total_bytes, widen(st.blocks()) * frsize);
        assert!(stats.disk_total_bytes > 0);
        assert!(stats.disk_used_bytes <= stats.disk_total_bytes);
        assert!(stats.disk_free_bytes <= stats.disk_total_bytes - stats.disk_used_bytes);
    }

    #[tokio::test]
    async fn configured_disk_devices_are_taken_as_named() {
        let stats = LinuxSystemReader::new(fixture_root(), "/", None)
            .with_disks(
                sys_root(),
                vec!["sda1".into(), "loop0".into(), "sdz".into()],
            )
            .read(&CancellationToken::new())
            .await
            .unwrap();
        // sdz is not in diskstats (a disk removed, say): left out, not an error.
        assert_eq!(stats.disks.keys().collect::<Vec<_>>(), ["loop0", "sda1"]);
        assert_eq!(stats.disks["loop0"].read_bytes, 2400 * 512);
    }

    #[tokio::test]
    async fn without_sys_block_partitions_are_told_by_name() {
        let stats = LinuxSystemReader::new(fixture_root(), "/", None)
            .with_disks(testdata().join("no-such-sys"), Vec::new())
            .read(&CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            stats.disks.keys().collect::<Vec<_>>(),
            ["dm-0", "nvme0n1", "sda"]
        );
    }

    #[tokio::test]
    async fn no_diskstats_means_no_disks() {
        let root = TempRoot::new();
        std::fs::remove_file(root.0.join("diskstats")).unwrap();
        let stats = read_root(&root.0, None).await.unwrap();
        assert!(stats.disks.is_empty());
        assert_eq!(stats.memory_total_bytes, MEM_TOTAL);
    }

    #[tokio::test]
    async fn junk_in_any_new_file_is_an_error_naming_it_never_a_panic() {
        // Bytes that are not text, a line cut short, and nothing at all.
        let junk: [&[u8]; 3] = [b"\xff\xfe cpu0 \xc3\x28 1 2\n", b"cpu0 1\n", b""];
        for file in ["stat", "diskstats", "meminfo", "net/dev"] {
            for bytes in junk {
                let root = TempRoot::new();
                // net/dev's first two lines are headers that the parser skips.
                let header: &[u8] = if file == "net/dev" { b"h\nh\n" } else { b"" };
                std::fs::write(root.0.join(file), [header, bytes].concat()).unwrap();
                let Err(err) = read_root(&root.0, None).await else {
                    // No devices listed at all: a host without block devices, or a
                    // network namespace without interfaces.
                    assert!(
                        bytes.is_empty() && file != "stat" && file != "meminfo",
                        "{file} accepted {bytes:?}"
                    );
                    continue;
                };
                let path = root.0.join(file);
                assert!(
                    err.to_string()
                        .starts_with(&format!("parse {}: ", path.display())),
                    "{file}: {err}"
                );
            }
        }
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
            prev.total,
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
        assert_eq!(cpu_usage(&prev.total, &now.total), 45.0);
    }

    // The per-CPU lines of stat → stat.later, by hand:
    // cpu0: user +12, system +5, idle +25, iowait +2, irq +1, softirq +1, steal +3: 49 ticks,
    //       27 idle, 22 busy.
    // cpu1: user +13, system +5, idle +25, iowait +3, irq +1, softirq +2, steal +2: 51 ticks,
    //       28 idle, 23 busy.
    #[test]
    fn per_cpu_usage_between_two_fixture_samples() {
        let prev = read_cpu_times(&fixture_root().join("stat")).unwrap();
        let now = read_cpu_times(&fixture_root().join("stat.later")).unwrap();
        let names: Vec<&str> = now.cores.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["cpu0", "cpu1"]);
        let usage = cores_usage(&prev.cores, &now.cores);
        assert_eq!(usage["cpu0"], 22.0 / 49.0 * 100.0);
        assert_eq!(usage["cpu1"], 23.0 / 51.0 * 100.0);
    }

    #[test]
    fn cpu_names_follow_the_lines_procfs_parses() {
        let stat = b"cpu  1 2 3 4\ncpu0 1 2 3 4\ncpu3 1 2 3 4\nctxt 1\nbtime 1\nprocesses 1\n";
        assert_eq!(cpu_line_names(stat), ["cpu0", "cpu3"]);
        assert!(cpu_line_names(b"").is_empty());
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
        assert_eq!(usage.total, 45.0);
        assert_eq!(usage.count, 2);
        assert_eq!(usage.cores.len(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn cancelled_sampling_stops_at_the_sleep() {
        let cancel = CancellationToken::new();
        let read = || Ok(CpuSample::default());
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

    #[test]
    fn network_interfaces_skip_loopback() {
        let path = fixture_root().join("net/dev");
        let devices = InterfaceDeviceStatus::from_read(&std::fs::read(&path).unwrap()[..])
            .unwrap()
            .0;
        let all = network_interfaces(&devices, None, &path).unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["eth0", "wg0"]);
        let sum = sum_interfaces(all.values());
        assert_eq!((sum.rx_bytes, sum.tx_bytes), (1_248_576, 624_288));
        let eth0 = network_interfaces(&devices, Some("eth0"), &path).unwrap();
        assert_eq!(eth0.keys().collect::<Vec<_>>(), ["eth0"]);
        assert_eq!(
            (eth0["eth0"].rx_bytes, eth0["eth0"].tx_bytes),
            (1_048_576, 524_288)
        );
        assert!(matches!(
            network_interfaces(&devices, Some("eth9"), &path),
            Err(ProcError::InterfaceNotFound { .. })
        ));
        assert!(network_interfaces(&HashMap::new(), None, &path)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn disk_bytes_math() {
        assert_eq!(
            disk_bytes(1000, 250, 200, 4096),
            DiskSpace {
                used: 750 * 4096,
                total: 1000 * 4096,
                available: 200 * 4096
            }
        );
        // A free count above the block count (a racing or odd filesystem) is not negative.
        assert_eq!(disk_bytes(10, 20, 20, 4096).used, 0);
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
                total: MEM_TOTAL,
                available: MEM_AVAILABLE,
                swap_total: SWAP_TOTAL,
                swap_used: SWAP_USED,
            })
        );
    }
}
