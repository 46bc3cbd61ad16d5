//! `cargo xtask bench`'s queue part: what the durable delivery queue (`metrics.queue.dir`)
//! costs a node, on a real disk (a directory under /var/tmp; /tmp may be tmpfs).
//!
//! 1. Durability per collect cycle: `DeliveryQueue::collected` of one cycle's points (100 and
//!    10,000 tunnel points, the largest kind) on a durable queue, beside the same call on an
//!    in-memory queue, one cycle per side and round, alternating. At these sizes a cycle
//!    completes a batch, so `collected` seals it at once: that is the time to make the cycle
//!    durable. Between cycles each queue delivers as with a healthy control plane. A pass
//!    after the rounds does the steps of a seal apart (encode, write, fdatasync), to say
//!    where the time goes.
//! 2. Bytes written per day by a node with 100 peers at the default intervals (collect 15 s,
//!    report 60 s, batch_size 100): 40 collect cycles of 100 tunnel, 100 latency, one system
//!    and one agent point through a durable queue with a healthy control plane (everything
//!    delivered after each seal), the bytes counted by the kernel (`write_bytes` of
//!    /proc/self/io), scaled to 5,760 cycles a day.
//! 3. Start-up with 256 MiB queued: a directory filled through `DeliveryQueue` as an agent
//!    with 100 peers fills it during an outage, then the agent binary started on it, timed
//!    from spawn until the test control plane receives its first request, then killed with
//!    SIGKILL so that the directory stays full for the next round.
//!
//! Usage: bench_queue [--quick]. `PLEXD_METRICS_BIN` names the agent binary.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chrono::{TimeDelta, Utc};
use plexd_metrics::accounting::host::{DiskIo, InterfaceCounters};
use plexd_metrics::api::{MetricPoint, GROUP_AGENT, GROUP_LATENCY, GROUP_SYSTEM, GROUP_TUNNEL};
use plexd_metrics::collector::{AgentStats, LatencyResult, SystemStats, TunnelStats};
use plexd_metrics::config::{
    DEFAULT_QUEUE_MAX_BYTES, DEFAULT_QUEUE_MAX_MEMORY_BYTES, DEFAULT_QUEUE_MAX_POINTS,
};
use plexd_metrics::queue::record::{encode, Kind};
use plexd_metrics::queue::{DeliveryQueue, QueueLimits};
use plexd_metrics_tests::bench::{
    alternate, emit, median, mib, ms, thousands, thread_cpu, Figures, Goal, Row, Side, Spread,
};
use plexd_metrics_tests::control_plane::{TempDir, TestControlPlane};
use plexd_metrics_tests::{agent_binary, unique_name};
use uuid::Uuid;

/// Where the queue directories go: a disk, where /tmp may be tmpfs.
const DISK_DIR: &str = "/var/tmp";
/// The default `metrics.batch_size`.
const BATCH_SIZE: usize = 100;
/// Collect cycles per report at the default intervals (60 s / 15 s).
const CYCLES_PER_REPORT: usize = 4;
/// The default `metrics.collect_interval`, in seconds.
const COLLECT_INTERVAL_S: f64 = 15.0;
/// Collect cycles in a day: 5,760.
const CYCLES_PER_DAY: f64 = 86_400.0 / COLLECT_INTERVAL_S;
/// The node of parts 2 and 3.
const PEERS: usize = 100;
/// Collect cycles of one run of part 2 (ten report intervals).
const DAY_CYCLES: usize = 40;
/// Part 1's sizes, in points per collect cycle.
const SIZES: [usize; 2] = [100, 10_000];
/// Part 1's goal for `collected` at 10,000 points, in ms.
const COLLECT_GOAL_MS: f64 = 5.0;
/// Part 2's goal, generous: the order of magnitude a node's disk should not notice.
const DAY_GOAL_MIB: f64 = 2048.0;
/// Part 3: bytes of log the directory is filled with.
const FILL_BYTES: u64 = 256 << 20;
/// Part 3: `metrics.queue.max_bytes`, above the fill so that nothing is trimmed.
const FILL_MAX_BYTES: u64 = 300 << 20;
/// Part 3's goal: spawn to first request, in ms.
const STARTUP_GOAL_MS: f64 = 1000.0;
/// Part 3: how long to wait for the first request before failing.
const FIRST_REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// The bearer token the test control plane requires.
const TOKEN: &str = "bench-queue-token";

/// The queue's bounds as the agent's defaults set them, with a directory bound of
/// `max_bytes`.
fn limits(max_bytes: u64) -> QueueLimits {
    QueueLimits {
        batch_size: BATCH_SIZE,
        max_points: usize::try_from(DEFAULT_QUEUE_MAX_POINTS).expect("a positive default"),
        max_bytes,
        max_memory_bytes: DEFAULT_QUEUE_MAX_MEMORY_BYTES as usize,
    }
}

/// Runs part 2, then prints the rows of parts 1, 2 and 3 in order.
fn main() {
    let quick = std::env::args().skip(1).any(|a| a == "--quick");
    let (collect_rounds, breakdown_cycles, day_runs, startup_rounds) =
        if quick { (8, 4, 1, 1) } else { (40, 12, 3, 3) };
    let disk = Mount::of(Path::new(DISK_DIR));
    eprintln!(
        "bench_queue: queue directories under {DISK_DIR}: {}",
        disk.describe()
    );

    // Part 2 runs first: part 1's row at 100 points carries its seal figures.
    eprintln!("bench_queue: {day_runs} × {DAY_CYCLES} collect cycles of {PEERS} peers");
    let days: Vec<DayRun> = (0..day_runs).map(|_| DayRun::measure(&disk)).collect();

    for points in SIZES {
        eprintln!("bench_queue: collected() of {points} points, {collect_rounds} rounds");
        let row = durability(points, collect_rounds, breakdown_cycles, &disk);
        let row = if points == PEERS {
            let per_seal: Vec<f64> = days.iter().flat_map(|d| d.seal_ms.clone()).collect();
            let per_report: Vec<f64> = days.iter().flat_map(|d| d.report_seal_ms.clone()).collect();
            let seal = Spread::of(&per_seal);
            let report = Spread::of(&per_report);
            row.note(format!(
                "queue: collected() with its seal at {PEERS} peers ({} points a cycle complete a batch, so each cycle is sealed at once: {} batch records appended to the log, one fdatasync): {:.2} ms a cycle ({:.2}–{:.2}), {:.2} ms per report interval of {CYCLES_PER_REPORT} cycles ({:.2}–{:.2})",
                cycle_points(PEERS),
                cycle_points(PEERS).div_ceil(BATCH_SIZE),
                seal.median, seal.min, seal.max, report.median, report.min, report.max
            ))
        } else {
            row
        };
        emit(&row).expect("write the row");
    }
    emit(&day_row(&days, &disk)).expect("write the row");

    eprintln!("bench_queue: start-up with {} MiB queued", FILL_BYTES >> 20);
    emit(&startup(startup_rounds)).expect("write the row");
}

/// Points of one collect cycle of a node with `peers` peers.
fn cycle_points(peers: usize) -> usize {
    2 * peers + 2
}

/// Whether the Manager seals after a collect cycle: once a batch is full, and at each report
/// tick (every fourth cycle at the default intervals).
fn seals_after(queue: &DeliveryQueue, cycle: usize) -> bool {
    queue.buffered() >= BATCH_SIZE || (cycle + 1).is_multiple_of(CYCLES_PER_REPORT)
}

/// Hands every batch to a control plane that takes them all, as a healthy one does between
/// two seals.
fn deliver(queue: &mut DeliveryQueue) {
    while let Some((key, points)) = queue.head() {
        std::hint::black_box((key, points));
        queue.pop();
    }
}

// ---------------------------------------------------------------------------------------
// Part 1: durability per collect cycle.

/// Rounds of one cycle each on a durable and an in-memory queue; the row compares the time
/// of `collected`.
fn durability(points: usize, rounds: usize, breakdown_cycles: usize, disk: &Mount) -> Row {
    let dir = Scratch::new("collect");
    let mut durable = DeliveryQueue::open(dir.path(), limits(DEFAULT_QUEUE_MAX_BYTES))
        .expect("open the durable queue");
    assert!(
        durable.is_durable(),
        "the queue uses {}",
        dir.path().display()
    );
    let mut memory = DeliveryQueue::in_memory(limits(DEFAULT_QUEUE_MAX_BYTES));
    let node = Node::new(points);
    let mut cycles = [0usize; 2];
    let mut durable_walls = Vec::new();
    let mut seals = Vec::new();
    let rounds = alternate(rounds, |side| {
        let (queue, cycle) = match side {
            Side::Agent => (&mut durable, &mut cycles[0]),
            Side::Baseline => (&mut memory, &mut cycles[1]),
        };
        let batch = node.tunnel(*cycle);
        let (start, start_cpu) = (Instant::now(), thread_cpu());
        queue.collected(batch, false);
        let (wall, cpu) = (start.elapsed(), thread_cpu().saturating_sub(start_cpu));
        let mut figures = Figures::from([("ms", ms(wall)), ("cpu_ms", ms(cpu))]);
        if seals_after(queue, *cycle) {
            let start = Instant::now();
            queue.seal(false);
            let seal = ms(start.elapsed());
            figures.insert("seal_ms", seal);
            if side == Side::Agent {
                seals.push(seal);
            }
        }
        // A healthy control plane takes each batch as soon as it is sealed, as the Manager
        // sends it: the next cycle finds the queue empty.
        deliver(queue);
        if side == Side::Agent {
            durable_walls.push(ms(wall));
        }
        *cycle += 1;
        figures
    });
    drop(durable);
    let steps = AppendSteps::measure(&node, breakdown_cycles, dir.path());

    let mut record = Vec::new();
    seal_records(&mut record, &node.tunnel(0));
    let record_bytes = record.len();
    let goal = Goal::Below(COLLECT_GOAL_MS);
    let cpu = median(&rounds.agent("cpu_ms"));
    let wall = Spread::of(&durable_walls);
    let mut sorted = durable_walls.clone();
    sorted.sort_by(f64::total_cmp);
    let p95 = sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)];
    let seal = Spread::of(&seals);
    Row::compare(
        format!("queue-collect-{points}"),
        format!(
            "durability per collect cycle, {} points: collected()",
            thousands(points)
        ),
        (
            &format!(
                "durable queue on {}: the cycle sealed and appended to the log + fdatasync",
                disk.fstype
            ),
            "in-memory queue: buffer append",
        ),
        "ms",
        &rounds,
        "ms",
        goal,
    )
    .note(format!(
        "queue-collect-{points}: {DISK_DIR} is {}; the seal of {} tunnel points is {:.2} MiB",
        disk.describe(),
        thousands(points),
        mib(record_bytes as u64)
    ))
    .note(format!(
        "queue-collect-{points}: durable collected() {:.3} ms median, p95 {p95:.3}, max {:.3} ms wall; {cpu:.3} ms of it on the CPU (the rest waits for the disk)",
        wall.median, wall.max
    ))
    .note(format!(
        "queue-collect-{points}: its steps done apart on the same points and disk ({} cycles, medians): encode the records into a reused buffer {:.3} ms, write(2) them {:.3} ms, fdatasync {:.3} ms",
        breakdown_cycles, steps.encode_ms, steps.write_ms, steps.sync_ms
    ))
    .note(format!(
        "queue-collect-{points}: seal at the report tick (untimed above; nothing left to seal at these sizes, {} batches a cycle): {:.2} ms median ({:.2}–{:.2})",
        points.div_ceil(BATCH_SIZE),
        seal.median,
        seal.min,
        seal.max
    ))
}

/// Appends one cycle's points to `out` as the seal encodes them: a batch record per
/// `BATCH_SIZE` points.
fn seal_records(out: &mut Vec<u8>, points: &[MetricPoint]) {
    for (i, chunk) in points.chunks(BATCH_SIZE).enumerate() {
        encode(
            out,
            Kind::Batch,
            (i * BATCH_SIZE) as u64,
            Uuid::nil(),
            chunk,
        );
    }
}

/// The steps of a seal done one by one on a file of their own, each timed and without the
/// overlap of encoding and writeback: where the time of a durable `collected` goes.
struct AppendSteps {
    encode_ms: f64,
    write_ms: f64,
    sync_ms: f64,
}

impl AppendSteps {
    /// `cycles` seals of `node`'s tunnel points, each written to an emptied file in `dir`;
    /// the medians of each step.
    fn measure(node: &Node, cycles: usize, dir: &Path) -> Self {
        let path = dir.join("steps.log");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the steps' file");
        let (mut encode, mut write, mut sync) = (Vec::new(), Vec::new(), Vec::new());
        // Reused between cycles, as the queue's own buffer is.
        let mut record = Vec::new();
        for cycle in 0..cycles {
            file.set_len(0).expect("truncate");
            file.sync_data().expect("fdatasync");
            let points = node.tunnel(cycle);
            record.clear();
            let start = Instant::now();
            seal_records(&mut record, &points);
            encode.push(ms(start.elapsed()));
            let start = Instant::now();
            file.write_all_at(&record, 0).expect("write the record");
            write.push(ms(start.elapsed()));
            let start = Instant::now();
            file.sync_data().expect("fdatasync");
            sync.push(ms(start.elapsed()));
        }
        drop(file);
        let _ = std::fs::remove_file(&path);
        Self {
            encode_ms: median(&encode),
            write_ms: median(&write),
            sync_ms: median(&sync),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Part 2: bytes written per day.

/// One run of [`DAY_CYCLES`] collect cycles of a node with [`PEERS`] peers through a durable
/// queue whose control plane takes every batch.
struct DayRun {
    /// The kernel's counts for this process over the cycles.
    io: ProcIo,
    /// Bytes the directory's block device wrote over the cycles (for every process, and the
    /// file system's own journal), and over an idle window as long right after.
    device_bytes: Option<(u64, u64)>,
    /// Bytes of the points records appended (cycles that did not complete a batch), and of
    /// the batch records of the seals.
    /// seal.
    journal_bytes: u64,
    /// Bytes of the batch records written.
    batch_bytes: u64,
    /// Time of each seal, in ms.
    seal_ms: Vec<f64>,
    /// Time of the seals of each report interval, summed, in ms.
    report_seal_ms: Vec<f64>,
    /// How long the cycles took.
    window: Duration,
}

impl DayRun {
    /// Runs the cycles in a fresh directory under [`DISK_DIR`], which `disk` holds.
    fn measure(disk: &Mount) -> Self {
        let dir = Scratch::new("day");
        let mut queue = DeliveryQueue::open(dir.path(), limits(DEFAULT_QUEUE_MAX_BYTES))
            .expect("open the durable queue");
        assert!(queue.is_durable());
        let node = Node::new(PEERS);
        // Made before the window, so that it holds the queue's work only.
        let cycles: Vec<Vec<MetricPoint>> = (0..DAY_CYCLES).map(|c| node.cycle(c)).collect();
        let (mut journal_bytes, mut batch_bytes) = (0, 0);
        let (mut seal_ms, mut report_seal_ms) = (Vec::new(), Vec::new());
        let mut this_report = 0.0;

        let started = Instant::now();
        let io_before = ProcIo::now();
        let device_before = disk.device_written();
        for (cycle, points) in cycles.into_iter().enumerate() {
            // The log only grows between deliveries: its growth is what the cycle wrote.
            let before = queue.spooled_bytes();
            let start = Instant::now();
            queue.collected(points, false);
            let sealed_now = queue.buffered() == 0;
            if sealed_now || seals_after(&queue, cycle) {
                queue.seal(false);
                let took = ms(start.elapsed());
                seal_ms.push(took);
                this_report += took;
                batch_bytes += queue.spooled_bytes() - before;
                deliver(&mut queue);
            } else {
                journal_bytes += queue.spooled_bytes() - before;
            }
            if (cycle + 1).is_multiple_of(CYCLES_PER_REPORT) {
                report_seal_ms.push(this_report);
                this_report = 0.0;
            }
        }
        let io = ProcIo::now().since(io_before);
        let device_after = disk.device_written();
        let window = started.elapsed();
        drop(queue);
        // As long again without the queue: what the rest of the machine writes meanwhile.
        let idle_before = disk.device_written();
        std::thread::sleep(window);
        let idle_after = disk.device_written();
        let device_bytes = match (device_before, device_after, idle_before, idle_after) {
            (Some(a), Some(b), Some(c), Some(d)) => Some((b - a, d - c)),
            _ => None,
        };
        Self {
            io,
            device_bytes,
            journal_bytes,
            batch_bytes,
            seal_ms,
            report_seal_ms,
            window,
        }
    }
}

/// The row of part 2: MiB per day from `write_bytes`, with the other counts as notes.
fn day_row(days: &[DayRun], disk: &Mount) -> Row {
    let per_day = |bytes: u64| mib(bytes) / DAY_CYCLES as f64 * CYCLES_PER_DAY;
    let written: Vec<f64> = days
        .iter()
        .map(|d| per_day(d.io.write_bytes.saturating_sub(d.io.cancelled_write_bytes)))
        .collect();
    let first = &days[0];
    let per_cycle = |bytes: u64| bytes as f64 / DAY_CYCLES as f64;
    let kib = |bytes: f64| bytes / 1024.0;
    let wchar = median(
        &days
            .iter()
            .map(|d| per_cycle(d.io.wchar))
            .collect::<Vec<_>>(),
    );
    let write_bytes = median(
        &days
            .iter()
            .map(|d| per_cycle(d.io.write_bytes))
            .collect::<Vec<_>>(),
    );
    let files = per_cycle(first.journal_bytes + first.batch_bytes);
    let batches = per_cycle(first.batch_bytes);
    let journal = per_cycle(first.journal_bytes);
    // During an outage the directory grows by every record, points and batches alike.
    let outage_hours = DEFAULT_QUEUE_MAX_BYTES as f64 / files * COLLECT_INTERVAL_S / 3600.0;
    let mut row = Row::alone(
        "queue-bytes-per-day",
        format!("bytes written per day, durable queue, {PEERS} peers"),
        &format!(
            "{PEERS} peers, collect {COLLECT_INTERVAL_S} s, report 60 s, batch_size {BATCH_SIZE}: write_bytes of /proc/self/io over {DAY_CYCLES} cycles × {CYCLES_PER_DAY}"
        ),
        "MiB/day",
        &written,
        Goal::Below(DAY_GOAL_MIB),
    )
    .note(format!(
        "queue-bytes-per-day: per collect cycle of {} points: {:.1} KiB written to storage (write_bytes, whole pages), {:.1} KiB passed to write(2) (wchar); log growth: {:.1} KiB = points records {:.1} KiB + batch records {:.1} KiB; {:.2} MiB/day by wchar",
        cycle_points(PEERS),
        kib(write_bytes),
        kib(wchar),
        kib(files),
        kib(journal),
        kib(batches),
        mib(wchar as u64) * CYCLES_PER_DAY
    ))
    .note(format!(
        "queue-bytes-per-day: during an outage the directory grows by {:.1} KiB a cycle ({:.1} MiB an hour): {} MiB (the default max_bytes) lasts {outage_hours:.1} hours",
        kib(files),
        mib(files as u64) * 3600.0 / COLLECT_INTERVAL_S,
        DEFAULT_QUEUE_MAX_BYTES >> 20
    ));
    if let Some((busy, idle)) = first.device_bytes {
        row = row.note(format!(
            "queue-bytes-per-day: the device under {DISK_DIR} ({}) wrote {:.2} MiB during the {} cycles ({:.0} ms; every process's writes and the file system's own journal), {:.2} MiB in an idle window as long after them: {:.0} MiB/day at the device",
            disk.source,
            mib(busy),
            DAY_CYCLES,
            ms(first.window),
            mib(idle),
            per_day(busy.saturating_sub(idle))
        ));
    }
    row
}

/// The write counters of /proc/self/io.
#[derive(Clone, Copy, Debug)]
struct ProcIo {
    /// Bytes passed to write(2) and its kin.
    wchar: u64,
    /// Bytes this process caused to be sent to the storage layer (counted per page
    /// dirtied).
    write_bytes: u64,
    /// Dirty page-cache bytes this process truncated before they were written.
    cancelled_write_bytes: u64,
}

impl ProcIo {
    /// The counts now.
    fn now() -> Self {
        let mut text = String::new();
        File::open("/proc/self/io")
            .and_then(|mut f| f.read_to_string(&mut text))
            .expect("read /proc/self/io (task I/O accounting)");
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/self/io: {text}"))
        };
        Self {
            wchar: field("wchar"),
            write_bytes: field("write_bytes"),
            cancelled_write_bytes: field("cancelled_write_bytes"),
        }
    }

    /// What was counted between `before` and `self`.
    fn since(self, before: Self) -> Self {
        Self {
            wchar: self.wchar - before.wchar,
            write_bytes: self.write_bytes - before.write_bytes,
            cancelled_write_bytes: self.cancelled_write_bytes - before.cancelled_write_bytes,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Part 3: start-up with 256 MiB queued.

/// Fills a directory with [`FILL_BYTES`] of log, then starts the agent on it
/// `rounds` times and times its first request.
fn startup(rounds: usize) -> Row {
    let dir = Scratch::new("startup");
    let fill = Fill::run(dir.path());
    eprintln!(
        "bench_queue: filled {} with {} segments, {:.1} MiB, in {:.1} s",
        dir.path().display(),
        fill.files,
        mib(fill.bytes),
        fill.took.as_secs_f64()
    );

    let control_plane = TestControlPlane::http();
    control_plane.require_token(TOKEN);
    let conf = TempDir::new("bench-queue");
    let token = conf.write("token", format!("{TOKEN}\n"));
    let config = conf.write(
        "config.yaml",
        format!(
            "node_id: bench-queue\ncontrol_plane:\n  url: {}\n  token_file: {}\nmetrics:\n  queue:\n    dir: {}\n    max_bytes: {}MiB\n  ebpf: {{ enabled: false }}\n  latency: {{ enabled: false }}\n  wireguard: {{ enabled: false }}\n  health: {{ enabled: false }}\n",
            control_plane.url(),
            token.display(),
            dir.path().display(),
            FILL_MAX_BYTES >> 20
        ),
    );
    let mut samples = Vec::new();
    let mut first_points = Vec::new();
    for round in 0..rounds {
        // What an earlier round's agent sent after the timed request.
        while control_plane.try_next().is_some() {}
        let log = conf.path().join(format!("agent-{round}.log"));
        let spawned_at = Utc::now();
        let start = Instant::now();
        let agent = Agent::start(&config, &log);
        let first = control_plane.next_blocking(FIRST_REQUEST_DEADLINE);
        let took = start.elapsed();
        drop(agent);
        assert!(
            first.path.ends_with("/metrics") && first.accepted(),
            "the first request is an accepted metrics batch: {} {} answered {}",
            first.method,
            first.path,
            first.status
        );
        assert!(first.key().is_some(), "the batch carries its key");
        let points = first.points();
        assert!(
            !points.is_empty() && points.iter().all(|p| p.timestamp < spawned_at),
            "the first batch comes from the directory (points collected before the start)"
        );
        eprintln!(
            "  round {round}: first request after {:.1} ms, {} points",
            ms(took),
            points.len()
        );
        samples.push(ms(took));
        first_points.push(points.len());
    }
    Row::alone(
        "queue-startup-256mib",
        format!(
            "start-up to the first request, {} MiB queued",
            FILL_BYTES >> 20
        ),
        &format!(
            "agent binary on a directory of {} segments (warm page cache), SIGKILLed after the first request",
            thousands(fill.files)
        ),
        "ms",
        &samples,
        Goal::Below(STARTUP_GOAL_MS),
    )
    .note(format!(
        "queue-startup-256mib: {} segments, {:.1} MiB by size ({:.1} MiB of disk blocks), written as {} collect cycles of {PEERS} peers in {:.1} s; first batches sent: {:?} points",
        thousands(fill.files),
        mib(fill.bytes),
        mib(fill.blocks),
        thousands(fill.cycles),
        fill.took.as_secs_f64(),
        first_points
    ))
}

/// A directory filled through `DeliveryQueue` as an agent with [`PEERS`] peers fills it while
/// its control plane is away: a seal whenever a batch is full, nothing delivered.
struct Fill {
    /// Batch files in the directory.
    files: usize,
    /// Their sizes, summed.
    bytes: u64,
    /// The disk blocks they take, in bytes.
    blocks: u64,
    /// Collect cycles it took.
    cycles: usize,
    /// Time to fill it.
    took: Duration,
}

impl Fill {
    /// Fills `dir` with at least [`FILL_BYTES`] of log.
    fn run(dir: &Path) -> Self {
        let start = Instant::now();
        let mut queue =
            DeliveryQueue::open(dir, limits(FILL_MAX_BYTES)).expect("open the durable queue");
        assert!(queue.is_durable());
        let node = Node::new(PEERS);
        let mut cycle = 0;
        while queue.spooled_bytes() < FILL_BYTES {
            queue.collected(node.cycle(cycle), false);
            if seals_after(&queue, cycle) {
                assert_eq!(queue.seal(false), 0, "nothing dropped below max_bytes");
            }
            cycle += 1;
        }
        queue.seal(false);
        drop(queue);
        let took = start.elapsed();
        let (mut files, mut bytes, mut blocks) = (0, 0, 0);
        for entry in std::fs::read_dir(dir).expect("list the directory") {
            let entry = entry.expect("list the directory");
            let meta = entry.metadata().expect("stat a segment");
            if entry.file_name().to_string_lossy().ends_with(".log") {
                files += 1;
                bytes += meta.len();
                blocks += meta.blocks() * 512;
            }
        }
        Self {
            files,
            bytes,
            blocks,
            cycles: cycle,
            took,
        }
    }
}

/// The agent binary, killed with SIGKILL when dropped; its log is shown when that happens
/// because the benchmark failed.
struct Agent {
    /// The agent process itself (no wrapper in between, so SIGKILL reaches it).
    child: Child,
    /// Its stderr.
    log: PathBuf,
}

impl Agent {
    /// Starts the agent with `config`, its stderr going to `log`.
    fn start(config: &Path, log: &Path) -> Self {
        let stderr = File::create(log).expect("create the agent's log");
        let child = Command::new(agent_binary())
            .args(["--log-format", "json", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", agent_binary().display()));
        Self {
            child,
            log: log.to_owned(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("the agent's log:\n{log}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Points, directories, file systems.

/// A node's peers; each collect cycle makes their points anew, with the figures moving on.
struct Node {
    /// The peers, in the order the collectors list them.
    peers: Vec<Peer>,
}

/// One peer of a [`Node`].
struct Peer {
    /// A WireGuard public key, base64, as the tunnel and latency groups name peers.
    id: String,
    /// Its current endpoint, `addr:port`.
    endpoint: String,
}

impl Node {
    /// A node with `peers` peers under fresh random keys.
    fn new(peers: usize) -> Self {
        let peers = (0..peers)
            .map(|i| {
                let mut key = [0u8; 32];
                key[..16].copy_from_slice(Uuid::new_v4().as_bytes());
                key[16..].copy_from_slice(Uuid::new_v4().as_bytes());
                Peer {
                    id: STANDARD.encode(key),
                    endpoint: format!("198.51.{}.{}:51820", i / 250 % 256, i % 250 + 1),
                }
            })
            .collect();
        Self { peers }
    }

    /// One collect cycle: a tunnel and a latency point per peer, a system and an agent
    /// point.
    fn cycle(&self, cycle: usize) -> Vec<MetricPoint> {
        let mut points = self.tunnel(cycle);
        points.extend(self.latency(cycle));
        points.push(system(cycle));
        points.push(agent(cycle));
        points
    }

    /// The tunnel group's points, as with the kernel programs on (every count present).
    fn tunnel(&self, cycle: usize) -> Vec<MetricPoint> {
        let now = Utc::now();
        let c = cycle as u64;
        self.peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                let n = i as u64;
                let lost = if i % 10 == 0 { 3 } else { 0 };
                let received = 1_480 + n % 97 + c % 13;
                let stats = TunnelStats {
                    peer_id: peer.id.clone(),
                    last_handshake_time: now - TimeDelta::seconds(7 + (i as i64 * 13 % 110)),
                    rx_bytes: 1_843_226_112 + n * 7_919 + c * 212_480,
                    tx_bytes: 976_311_040 + n * 6_007 + c * 164_864,
                    handshake_succeeded: true,
                    handshake_stale: false,
                    packet_loss_percent: lost as f64 / (received + lost) as f64 * 100.0,
                    endpoint: peer.endpoint.clone(),
                    interface: "wg0".to_owned(),
                    public_key: peer.id.clone(),
                    rx_packets: Some(received),
                    tx_packets: Some(1_211 + n % 89 + c % 7),
                    lost_packets: Some(lost),
                    late_packets: Some(u64::from(i % 25 == 0)),
                    duplicate_packets: Some(0),
                    suspect_packets: Some(0),
                    handshakes_sent: Some(u64::from(i % 8 == c as usize % 8)),
                    handshakes_received: Some(u64::from(i % 8 == c as usize % 8)),
                };
                MetricPoint::new(now, GROUP_TUNNEL, peer.id.clone(), &stats)
                    .expect("a tunnel point")
            })
            .collect()
    }

    /// The latency group's points; the last cycle before a report carries the interval's
    /// percentiles.
    fn latency(&self, cycle: usize) -> Vec<MetricPoint> {
        let now = Utc::now();
        let last = (cycle + 1).is_multiple_of(CYCLES_PER_REPORT);
        self.peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                let base = 1_200_000 + (i as i64 * 37_711 % 9_000_000);
                let result = LatencyResult {
                    peer_id: peer.id.clone(),
                    rtt_nano: base + 41_233,
                    rtt_min_nano: base,
                    rtt_max_nano: base + 187_406,
                    rtt_jitter_nano: 63_119,
                    probes_sent: 3,
                    probes_received: 3,
                    rtt_p50_nano: last.then_some(base + 45_871),
                    rtt_p99_nano: last.then_some(base + 402_337),
                    rtt_samples_nano: vec![base + 41_233, base, base + 187_406],
                };
                MetricPoint::new(now, GROUP_LATENCY, peer.id.clone(), &result)
                    .expect("a latency point")
            })
            .collect()
    }
}

/// The system group's point of collect cycle `cycle`.
fn system(cycle: usize) -> MetricPoint {
    let c = cycle as u64;
    let stats = SystemStats {
        cpu_usage_percent: 12.734_177_215_189_873,
        memory_used_bytes: 3_421_896_704 + c * 4_096,
        memory_total_bytes: 16_765_734_912,
        disk_used_bytes: 48_117_694_464 + c * 65_536,
        disk_total_bytes: 254_356_226_048,
        network_rx_bytes: 918_277_452_011 + c * 3_112_040,
        network_tx_bytes: 702_113_980_554 + c * 2_660_118,
        load_avg_1: 0.87,
        load_avg_5: 0.64,
        load_avg_15: 0.55,
        cpu_count: 4,
        cpu_cores_usage_percent: [10.1, 14.9, 12.5, 13.4]
            .iter()
            .enumerate()
            .map(|(i, u)| (format!("cpu{i}"), *u))
            .collect(),
        memory_available_bytes: 13_343_838_208 - c * 4_096,
        swap_total_bytes: 2_147_479_552,
        swap_used_bytes: 0,
        disk_free_bytes: 193_275_273_216 - c * 65_536,
        disks: [(
            "nvme0n1".to_owned(),
            DiskIo::from_sectors(
                1_203_118 + c * 3,
                96_249_440 + c * 24,
                3_311_570 + c * 40,
                402_113_856 + c * 128,
            ),
        )]
        .into(),
        network_rx_packets: 712_004_117 + c * 2_400,
        network_tx_packets: 601_223_902 + c * 2_050,
        network_rx_errors: 0,
        network_tx_errors: 0,
        network_rx_dropped: 1_204,
        network_tx_dropped: 0,
        interfaces: [
            ("eth0", 911_277_452_011, 701_113_980_554),
            ("wg0", 7_000_000_000, 1_000_000_000),
        ]
        .into_iter()
        .map(|(name, rx, tx)| {
            let counters = InterfaceCounters {
                rx_bytes: rx + c * 1_556_020,
                tx_bytes: tx + c * 1_330_059,
                ..InterfaceCounters::default()
            };
            (name.to_owned(), counters)
        })
        .collect(),
    };
    MetricPoint::new(Utc::now(), GROUP_SYSTEM, "", &stats).expect("a system point")
}

/// The agent group's point of collect cycle `cycle`, as on a healthy node with the kernel
/// programs attached and a durable queue.
fn agent(cycle: usize) -> MetricPoint {
    let c = cycle as u64;
    let stats = AgentStats {
        goroutine_count: 14,
        heap_alloc_bytes: 6_291_456 + c * 512,
        heap_sys_bytes: 18_874_368,
        gc_pause_total_ns: 0,
        gc_num_gc: 0,
        uptime_seconds: 86_415.0 + c as f64 * COLLECT_INTERVAL_S,
        reconnect_count: 0,
        ebpf_programs_attached: Some(2),
        ebpf_ingress_packets: Some(41_228_113 + c * 150_222),
        ebpf_ingress_bytes: Some(38_119_726_340 + c * 212_480_000),
        ebpf_egress_packets: Some(33_906_571 + c * 121_100),
        ebpf_egress_bytes: Some(20_008_115_922 + c * 164_864_000),
        dropped_points: Some(0),
        queued_points: Some(0),
        rejected_points: Some(0),
        spooled_points: Some(0),
        spooled_bytes: Some(8),
        corrupt_batches: Some(0),
        destinations: Default::default(),
        abandoned_collections: Default::default(),
    };
    MetricPoint::new(Utc::now(), GROUP_AGENT, "", &stats).expect("an agent point")
}

/// A fresh directory under [`DISK_DIR`], removed with its content on drop.
struct Scratch(PathBuf);

impl Scratch {
    /// A fresh directory whose name starts with `plexd-bench-queue-{name}-`.
    fn new(name: &str) -> Self {
        let dir = Path::new(DISK_DIR).join(unique_name(&format!("plexd-bench-queue-{name}-")));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Self(dir)
    }

    /// The directory.
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mount holding a path, from /proc/self/mountinfo.
struct Mount {
    /// File system type, e.g. `ext4`.
    fstype: String,
    /// What is mounted, e.g. `/dev/vda`.
    source: String,
    /// Where.
    mount_point: PathBuf,
    /// `major:minor` of its device.
    device: String,
}

impl Mount {
    /// The mount whose mount point is the longest prefix of `path` (the last one mounted
    /// there when several are).
    fn of(path: &Path) -> Self {
        let path = path
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        info.lines()
            .filter_map(|line| {
                // id parent major:minor root mount-point options [optional…] - type source …
                let (left, right) = line.split_once(" - ")?;
                let left: Vec<&str> = left.split(' ').collect();
                let mut right = right.split(' ');
                Some(Self {
                    device: left.get(2)?.to_string(),
                    mount_point: PathBuf::from(left.get(4)?.replace("\\040", " ")),
                    fstype: right.next()?.to_owned(),
                    source: right.next().unwrap_or("").to_owned(),
                })
            })
            .filter(|m| path.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.as_os_str().len())
            .unwrap_or_else(|| panic!("no mount holds {}", path.display()))
    }

    /// Type, source, mount point and the device's write cache, for a note.
    fn describe(&self) -> String {
        let cache = self
            .write_cache()
            .map_or_else(String::new, |c| format!(", device write cache: {c}"));
        format!(
            "{} on {}, mounted at {}{cache}",
            self.fstype,
            self.source,
            self.mount_point.display()
        )
    }

    /// The device's `write_cache` ("write back": an fdatasync waits for its flush too).
    fn write_cache(&self) -> Option<String> {
        let dev = Path::new("/sys/dev/block").join(&self.device);
        // A partition's queue settings are its disk's.
        [
            dev.join("queue/write_cache"),
            dev.join("../queue/write_cache"),
        ]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|c| c.trim().to_owned())
    }

    /// Bytes its block device has written since boot (sectors of 512 bytes), when it is one.
    fn device_written(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/sys/dev/block/{}/stat", self.device)).ok()?;
        let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
        Some(sectors * 512)
    }
}
