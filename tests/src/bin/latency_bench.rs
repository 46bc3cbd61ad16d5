//! `cargo xtask bench` (latency part): the agent's pinger against fping on the same targets.
//!
//! Sets up a pinger namespace and a target namespace with N addresses that answer at once,
//! runs one collect cycle of the latency collector (3 probes per target, the default 15 s
//! collect interval and 1 s timeout) and then `fping -C 3` on the same targets, paced to
//! take about as long. Reports wall time, CPU time (user + system) of each, and the heap the
//! pinger holds. Needs root.
//!
//! Usage: latency_bench [--targets N] [--collect-interval SECS]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexd_metrics::collector::{Collector, LatencyCollector, LatencySettings};
use plexd_metrics::config::MetricsConfig;
use plexd_metrics::source::icmp::{IcmpOptions, IcmpPinger, SocketChoice};
use plexd_metrics::source::peers::{MeshPeers, MeshPinger};
use plexd_metrics_tests::targets::TargetNet;
use tokio_util::sync::CancellationToken;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// User + system CPU time of `who` (RUSAGE_SELF or RUSAGE_CHILDREN).
fn cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes one rusage into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(who, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn main() -> std::process::ExitCode {
    let mut targets = 10_000usize;
    let mut collect_secs = 15u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--targets" => targets = value.parse().expect("--targets N"),
            "--collect-interval" => collect_secs = value.parse().expect("--collect-interval SECS"),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the latency benchmark needs root (network namespaces, raw sockets)"
    );

    let net = TargetNet::new(targets, 0).expect("set up the target namespace");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cfg = MetricsConfig {
        collect_interval: Duration::from_secs(collect_secs),
        report_interval: Duration::from_secs(collect_secs * 4),
        ..MetricsConfig::default()
    };
    let settings = LatencySettings::from_config(&cfg);
    let named: BTreeMap<String, IpAddr> = net
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("peer-{i:05}"), *a))
        .collect();

    let base = live();
    let options = IcmpOptions {
        interface: Some(net.link.clone()),
        socket: SocketChoice::Auto,
    };
    let icmp = net
        .pinger
        .run(|| {
            let _entered = rt.enter();
            IcmpPinger::open(&options)
        })
        .expect("enter the pinger namespace")
        .expect("open the pinger");
    let kind = icmp.socket_kind(false);
    let peers = Arc::new(MeshPeers::new(None, named));
    let pinger = Arc::new(MeshPinger::new(peers.clone(), icmp));
    let collector = Arc::new(LatencyCollector::new(
        pinger.clone(),
        peers.clone(),
        settings,
    ));

    let cpu_before = cpu(libc::RUSAGE_SELF);
    let wall = Instant::now();
    // On a worker thread, as the agent runs its Manager.
    let points = rt
        .block_on(rt.spawn({
            let collector = collector.clone();
            async move { collector.collect(&CancellationToken::new()).await }
        }))
        .expect("collect task")
        .expect("collect");
    let agent_wall = wall.elapsed();
    let agent_cpu = cpu(libc::RUSAGE_SELF) - cpu_before;
    let peak_in_cycle = PEAK.load(Ordering::Relaxed) - base;
    let complete = points
        .iter()
        .filter(|p| p.data["probes_received"] == 3)
        .count();
    drop(points);
    let with_histograms = live() - base;
    drop(collector);
    let pinger_held = live() - base;
    let stats = pinger.icmp().stats();

    // fping on the same targets, 3 probes each, paced to spread them over the same time.
    let list = std::env::temp_dir().join(format!("plexd-latency-bench-{}.txt", std::process::id()));
    let text: String = net.addresses.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(&list, text).expect("write target list");
    let interval_ms = settings.spread.as_secs_f64() * 1e3 / (3 * targets) as f64;
    let ns = std::fs::File::open(net.pinger.path()).expect("open namespace");
    let children_before = cpu(libc::RUSAGE_CHILDREN);
    let wall = Instant::now();
    let mut fping = Command::new("fping");
    fping
        .args(["-C", "3", "-q", "-t", "1000", "-p", "1000", "-I", &net.link])
        .args(["-i", &format!("{interval_ms:.3}"), "-f"])
        .arg(&list)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setns is a single system call, allowed between fork and exec.
    unsafe {
        use std::os::fd::AsFd;
        let fd = ns.as_fd().try_clone_to_owned().expect("dup namespace fd");
        fping.pre_exec(move || {
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    let out = fping.output().expect("run fping");
    let fping_wall = wall.elapsed();
    let fping_cpu = cpu(libc::RUSAGE_CHILDREN) - children_before;
    let _ = std::fs::remove_file(&list);
    let fping_complete = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(" : ") && !l.contains('-'))
        .count();

    let ratio = agent_cpu.as_secs_f64() / fping_cpu.as_secs_f64().max(1e-9);
    println!("latency benchmark: {targets} targets, 3 probes each, collect interval {collect_secs} s, socket {kind:?}");
    println!(
        "  {:<34} {:>10} {:>10} {:>12}",
        "", "wall", "CPU", "all 3 answered"
    );
    println!(
        "  {:<34} {:>9.2}s {:>9.3}s {:>12}",
        "plexd-metrics latency collector",
        agent_wall.as_secs_f64(),
        agent_cpu.as_secs_f64(),
        complete
    );
    println!(
        "  {:<34} {:>9.2}s {:>9.3}s {:>12}",
        format!("fping -C 3 -i {interval_ms:.3} (baseline)"),
        fping_wall.as_secs_f64(),
        fping_cpu.as_secs_f64(),
        fping_complete
    );
    println!("  CPU ratio agent/fping: {ratio:.2} (target <= 1.00)");
    println!(
        "  cycle within the collect interval: {} ({:.2} s of {collect_secs} s)",
        if agent_wall < cfg.collect_interval {
            "yes"
        } else {
            "NO"
        },
        agent_wall.as_secs_f64()
    );
    println!(
        "  heap held by the pinger (sockets, address book, probe table): {:.2} MiB (target < 4 MiB)",
        mib(pinger_held)
    );
    println!(
        "  heap of the report interval's histograms: {:.2} MiB; peak during the cycle (points included): {:.2} MiB",
        mib(with_histograms.saturating_sub(pinger_held)),
        mib(peak_in_cycle)
    );
    println!(
        "  receive loop: {} replies, {} late or duplicate, {} stray",
        stats.replies, stats.late_or_duplicate, stats.stray
    );
    let ok = complete == targets
        && agent_wall < cfg.collect_interval
        && ratio <= 1.0
        && pinger_held < 4 << 20;
    println!("  result: {}", if ok { "PASS" } else { "FAIL" });
    // Returned rather than exited, so the namespaces are deleted on the way out.
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
