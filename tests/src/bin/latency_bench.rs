//! `cargo xtask bench` (latency part): the agent's pinger against fping on the same targets.
//!
//! For each target count: a pinger namespace and a target namespace with N addresses that
//! answer at once; each round runs one collect cycle of the latency collector (3 probes per
//! target, the default 15 s collect interval and 1 s timeout) and `fping -C 3` on the same
//! targets, paced to take about as long, alternating which goes first. Reports CPU time
//! (user + system) and wall time of each, the median round-trip time each measured, and the
//! heap the pinger holds. Needs root.
//!
//! Usage: latency_bench [--targets N[,N...]] [--collect-interval SECS] [--rounds N]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexd_metrics_tests::bench::{alternate, emit, median, thousands, Figures, Goal, Row, Side};

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

fn main() {
    let mut sizes = vec![1_000usize, 10_000];
    let mut collect_secs = 15u64;
    let mut rounds = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--targets" => {
                sizes = value
                    .split(',')
                    .map(|n| n.parse().expect("--targets N[,N...]"))
                    .collect()
            }
            "--collect-interval" => collect_secs = value.parse().expect("--collect-interval SECS"),
            "--rounds" => rounds = value.parse().expect("--rounds N"),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the latency benchmark needs root (network namespaces, raw sockets)"
    );
    // A goal not met is the report's to show (each row says met or not), not a failure.
    for targets in sizes {
        compare(targets, collect_secs, rounds);
    }
}

/// What one fping run measured.
struct Fping {
    /// Targets that answered all three probes.
    complete: usize,
    /// Per target, the median of its three round-trip times, in milliseconds.
    medians_ms: Vec<f64>,
}

/// Parses `fping -C 3 -q` output: `addr : 0.05 0.04 -` per target, on stderr.
fn parse_fping(text: &str) -> Fping {
    let mut out = Fping {
        complete: 0,
        medians_ms: Vec::new(),
    };
    for line in text.lines() {
        let Some((_, values)) = line.split_once(" : ") else {
            continue;
        };
        let rtts: Vec<f64> = values
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if rtts.len() == 3 {
            out.complete += 1;
        }
        if !rtts.is_empty() {
            out.medians_ms.push(median(&rtts));
        }
    }
    out
}

/// Alternates the collector and fping on `targets` targets over `rounds` rounds and emits
/// the report row, whose checks include every goal of the pinger.
fn compare(targets: usize, collect_secs: u64, rounds: usize) {
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

    // fping on the same targets, 3 probes each, paced to spread them over the same time.
    let list = std::env::temp_dir().join(format!("plexd-latency-bench-{}.txt", std::process::id()));
    let text: String = net.addresses.iter().map(|a| format!("{a}\n")).collect();
    std::fs::write(&list, text).expect("write target list");
    let interval_ms = settings.spread.as_secs_f64() * 1e3 / (3 * targets) as f64;
    let ns = std::fs::File::open(net.pinger.path()).expect("open namespace");
    let mut peak_in_cycle = 0;
    let mut all_in_time = true;

    eprintln!("latency_bench: {targets} targets, {rounds} rounds, collect interval {collect_secs} s, socket {kind:?}");
    let rounds = alternate(rounds, |side| match side {
        Side::Agent => {
            PEAK.store(live(), Ordering::Relaxed);
            let cpu_before = cpu(libc::RUSAGE_SELF);
            let wall = Instant::now();
            // On a worker thread, as the agent runs its Manager.
            let points = rt
                .block_on(rt.spawn({
                    let collector = collector.clone();
                    async move {
                        collector
                            .collect(
                                plexd_metrics::collector::Cycle::default(),
                                &CancellationToken::new(),
                            )
                            .await
                    }
                }))
                .expect("collect task")
                .expect("collect");
            let wall = wall.elapsed();
            let cpu = cpu(libc::RUSAGE_SELF) - cpu_before;
            peak_in_cycle = peak_in_cycle.max(PEAK.load(Ordering::Relaxed) - base);
            all_in_time &= wall < cfg.collect_interval;
            let complete = points
                .iter()
                .filter(|p| p.data.to_value()["probes_received"] == 3)
                .count();
            let rtts: Vec<f64> = points
                .iter()
                .filter_map(|p| p.data.to_value()["rtt_nano"].as_i64())
                .filter(|&n| n >= 0)
                .map(|n| n as f64 / 1e6)
                .collect();
            Figures::from([
                ("cpu_s", cpu.as_secs_f64()),
                ("wall_s", wall.as_secs_f64()),
                ("complete", complete as f64),
                ("median_rtt_ms", median(&rtts)),
            ])
        }
        Side::Baseline => {
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
            let wall = wall.elapsed();
            let cpu = cpu(libc::RUSAGE_CHILDREN) - children_before;
            let parsed = parse_fping(&String::from_utf8_lossy(&out.stderr));
            Figures::from([
                ("cpu_s", cpu.as_secs_f64()),
                ("wall_s", wall.as_secs_f64()),
                ("complete", parsed.complete as f64),
                ("median_rtt_ms", median(&parsed.medians_ms)),
            ])
        }
    });
    let _ = std::fs::remove_file(&list);
    drop(collector);
    let pinger_held = live() - base;
    let stats = pinger.icmp().stats();

    let (agent_rtt, fping_rtt) = (
        median(&rounds.agent("median_rtt_ms")),
        median(&rounds.baseline("median_rtt_ms")),
    );
    let apart = (agent_rtt - fping_rtt).abs() / fping_rtt;
    let all_answered = rounds
        .agent("complete")
        .iter()
        .all(|&c| c as usize == targets);
    let row = Row::compare(
        format!("latency-{targets}"),
        format!("ICMP latency, {} targets, 3 probes each (CPU)", thousands(targets)),
        ("one latency-group collect", "fping -C 3, same targets, same pace"),
        "s",
        &rounds,
        "cpu_s",
        Goal::RatioAtMost(1.0),
    )
    .check(
        format!(
            "median RTT agent {agent_rtt:.3} ms, fping {fping_rtt:.3} ms: {:.1} % apart (goal ≤ 10 %)",
            apart * 100.0
        ),
        apart <= 0.10,
    )
    .check(
        format!("every target answered all 3 probes in every agent round (fping: {:.0} of {targets})", median(&rounds.baseline("complete"))),
        all_answered,
    )
    .check(
        format!("every cycle within the {collect_secs} s collect interval"),
        all_in_time,
    )
    .note(format!(
        "latency-{targets}: heap held by the pinger {:.2} MiB (goal < 4 MiB), peak during a cycle {:.2} MiB; \
         {} replies, {} late or duplicate, {} stray",
        mib(pinger_held),
        mib(peak_in_cycle),
        stats.replies,
        stats.late_or_duplicate,
        stats.stray
    ));
    emit(&row).expect("write the row");
}
