//! The benchmarks behind `cargo xtask bench`: each figure beside a baseline measured in the
//! same run, on the same machine, so that ratios hold on a noisy shared host.
//!
//! 1. Nanoseconds per packet of the ingress program on WireGuard transport messages, from
//!    the kernel's own `run_time_ns / run_cnt` (`kernel.bpf_stats_enabled=1`), beside the
//!    counter-only program attached to the same hook and fed the same packets.
//! 2. Milliseconds per `read_endpoints` with 10,000 peers (one session each), beside a plain
//!    walk of the per-endpoint map.
//!
//! Needs root. `--quick` runs fewer packets and reads.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aya::maps::{Map, MapData, MapInfo, PerCpuHashMap};
use aya::programs::{SchedClassifier, TcAttachType};
use plexd_metrics::source::counters::EndpointCounterSource as _;
use plexd_metrics::source::ebpf::{embedded_object, ProbeOptions};
use plexd_metrics_common::{
    EndpointKey, EndpointStats, MAP_ENDPOINTS, PROG_COUNT_ONLY, PROG_INGRESS,
};
use plexd_metrics_tests::bench::{
    emit, endpoints_on, median, one_session_each, Figures, Goal, Rounds, Row,
};
use plexd_metrics_tests::wg::transport;
use plexd_metrics_tests::{attach_probe, quiet_namespaces, NetNs, VethPair};

const WG_PORT: u16 = 51820;
const PEER_PORT: u16 = 40200;
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns `kernel.bpf_stats_enabled` on and restores the previous value when dropped.
struct BpfStats {
    previous: String,
    // Also holds a BPF_ENABLE_STATS reference: a concurrent run that resets the sysctl
    // cannot switch the accounting off under this one.
    _reference: Option<std::os::fd::OwnedFd>,
}

impl BpfStats {
    fn enable() -> Self {
        let previous = std::fs::read_to_string(STATS_SYSCTL)
            .expect("read kernel.bpf_stats_enabled")
            .trim()
            .to_owned();
        std::fs::write(STATS_SYSCTL, "1").expect("set kernel.bpf_stats_enabled=1");
        let reference = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        Self {
            previous,
            _reference: reference,
        }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.previous) {
            eprintln!(
                "warning: cannot restore kernel.bpf_stats_enabled={}: {e}",
                self.previous
            );
        }
    }
}

/// Run time and count of the TC programs on `dev`'s ingress, by name.
fn ingress_stats(ns: &NetNs, dev: &str) -> Vec<(String, Duration, u64)> {
    ns.run(|| {
        let (_, programs) =
            SchedClassifier::query_tcx(dev, TcAttachType::Ingress).expect("query TCX programs");
        programs
            .iter()
            .map(|p| {
                (
                    p.name_as_str().unwrap_or("?").to_owned(),
                    p.run_time(),
                    p.run_count(),
                )
            })
            .collect()
    })
    .expect("enter namespace")
}

fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

struct PacketCost {
    ours_ns: f64,
    baseline_ns: f64,
    packets: u64,
}

/// One round: both programs on the hook in the given order, `packets` transport messages.
fn packet_round(packets: u64, baseline_first: bool) -> PacketCost {
    let (peer_ns, wg_ns) = quiet_namespaces();
    let veth = VethPair::new(&peer_ns, &wg_ns).expect("create veth pair");
    let dev = veth.b.name.clone();
    let mut baseline = aya::Ebpf::load(embedded_object()).expect("load the object");
    let attach_baseline = |baseline: &mut aya::Ebpf| {
        wg_ns
            .run(|| {
                let p: &mut SchedClassifier = baseline
                    .program_mut(PROG_COUNT_ONLY)
                    .expect("count-only program")
                    .try_into()
                    .expect("a classifier");
                p.load().expect("load the count-only program");
                p.attach(&dev, TcAttachType::Ingress)
                    .expect("attach the count-only program");
            })
            .expect("enter namespace");
    };
    if baseline_first {
        attach_baseline(&mut baseline);
    }
    let probe = attach_probe(&wg_ns, &dev, &ProbeOptions::default(), &[WG_PORT]);
    if !baseline_first {
        attach_baseline(&mut baseline);
    }
    let to = SocketAddr::from((veth.b.addr, WG_PORT));
    // Bound, so that the node answers with nothing; never read, as only TC's cost matters.
    let _sink = wg_ns
        .run(move || UdpSocket::bind(to))
        .expect("enter namespace")
        .expect("bind");
    let from = SocketAddr::from((veth.a.addr, PEER_PORT));
    let sender = peer_ns
        .run(move || UdpSocket::bind(from))
        .expect("enter namespace")
        .expect("bind");
    let messages: Vec<Vec<u8>> = (0..1_024).map(|c| transport(1, c, 64)).collect();
    let send = |range: std::ops::Range<u64>| {
        for c in range {
            let mut m = messages[(c % 1_024) as usize].clone();
            m[8..16].copy_from_slice(&c.to_le_bytes());
            sender.send_to(&m, to).expect("send");
        }
    };
    // Warm up caches and create the session and endpoint entries.
    send(0..1_000);
    let before = ingress_stats(&wg_ns, &dev);
    send(1_000..1_000 + packets);
    let after = ingress_stats(&wg_ns, &dev);
    let per_packet = |name: &str| -> (f64, u64) {
        let find = |stats: &[(String, Duration, u64)]| {
            stats
                .iter()
                .find(|(n, _, _)| n == kernel_name(name))
                .map(|(_, t, c)| (*t, *c))
                .unwrap_or_else(|| panic!("{name} not attached"))
        };
        let ((t0, c0), (t1, c1)) = (find(&before), find(&after));
        let runs = c1 - c0;
        ((t1 - t0).as_nanos() as f64 / runs as f64, runs)
    };
    let (ours_ns, ours_runs) = per_packet(PROG_INGRESS);
    let (baseline_ns, baseline_runs) = per_packet(PROG_COUNT_ONLY);
    assert_eq!(
        ours_runs, baseline_runs,
        "both programs saw the same packets"
    );
    let c = probe.read_endpoints().expect("read");
    let counted = c.endpoints.get(&from).map_or(0, |e| e.rx_packets);
    assert_eq!(
        counted,
        1_000 + packets,
        "every message was parsed as WireGuard"
    );
    drop(probe);
    PacketCost {
        ours_ns,
        baseline_ns,
        packets: ours_runs,
    }
}

struct ReadCost {
    peers: usize,
    read_ms: f64,
    walk_ms: f64,
}

/// Fills the maps with `peers` endpoints of one session each (with a hole, so that every
/// session has something to settle), then times the agent's read and a plain map walk.
fn read_round(peers: usize, reads: usize) -> ReadCost {
    let (peer_ns, wg_ns) = quiet_namespaces();
    let veth = VethPair::new(&peer_ns, &wg_ns).expect("create veth pair");
    let dev = veth.b.name.clone();
    let probe = attach_probe(&wg_ns, &dev, &ProbeOptions::default(), &[WG_PORT]);
    let endpoints = endpoints_on(&veth, peers);
    one_session_each(&peer_ns, &wg_ns, &veth, &probe, &endpoints, WG_PORT);
    let snapshot = probe.read_endpoints().expect("read");
    assert_eq!(
        snapshot.endpoints.len(),
        peers,
        "every peer has an entry; probe stats {:?}",
        probe.probe_stats()
    );

    // The same map, opened by id, walked the plainest way aya offers.
    let map_id = wg_ns
        .run(|| {
            let (_, programs) = SchedClassifier::query_tcx(&dev, TcAttachType::Ingress)
                .expect("query TCX programs");
            let ids = programs[0].map_ids().expect("map ids").expect("has maps");
            ids.into_iter()
                .find(|&id| {
                    MapInfo::from_id(id)
                        .ok()
                        .and_then(|m| m.name_as_str().map(|n| n == MAP_ENDPOINTS))
                        .unwrap_or(false)
                })
                .expect("the endpoint map")
        })
        .expect("enter namespace");
    let map = Map::from_map_data(MapData::from_id(map_id).expect("open the map")).expect("a map");
    let endpoints: PerCpuHashMap<_, EndpointKey, EndpointStats> =
        PerCpuHashMap::try_from(map).expect("a per-CPU hash");

    let mut walks = Vec::new();
    let mut read_times = Vec::new();
    for _ in 0..reads {
        let t = Instant::now();
        let mut seen = 0usize;
        for item in endpoints.iter() {
            let (_, per_cpu) = item.expect("walk");
            seen += usize::from(per_cpu.iter().any(|s| s.last_seen_ns > 0));
        }
        walks.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(seen, peers);

        let t = Instant::now();
        let snapshot = probe.read_endpoints().expect("read");
        read_times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(snapshot.endpoints.len(), peers);
    }
    ReadCost {
        peers,
        read_ms: median(&read_times),
        walk_ms: median(&walks),
    }
}

fn main() -> ExitCode {
    let quick = std::env::args().skip(1).any(|a| a == "--quick");
    // For profiling the kernel side alone.
    let packets_only = std::env::args().skip(1).any(|a| a == "--packets-only");
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "plexd-metrics-bench needs root (network namespaces, eBPF); run `cargo xtask bench`"
        );
        return ExitCode::from(2);
    }
    let (packets, rounds, reads) = if quick {
        (20_000, 2, 5)
    } else {
        (200_000, 4, 21)
    };

    let stats = BpfStats::enable();
    // Both programs see the same packets in each round, so every round is an A/B pair.
    let mut pairs = Rounds::default();
    let mut ours = Vec::new();
    let mut baseline = Vec::new();
    let mut ratios = Vec::new();
    let mut measured = 0;
    for round in 0..rounds {
        // Alternate which program runs first: the first one pays for cold packet data.
        let cost = packet_round(packets, round % 2 == 0);
        eprintln!(
            "round {round}: ingress {:.1} ns, count-only {:.1} ns over {} packets",
            cost.ours_ns, cost.baseline_ns, cost.packets
        );
        measured += cost.packets;
        ratios.push(cost.ours_ns / cost.baseline_ns);
        pairs.agent.push(Figures::from([("ns", cost.ours_ns)]));
        pairs
            .baseline
            .push(Figures::from([("ns", cost.baseline_ns)]));
        ours.push(cost.ours_ns);
        baseline.push(cost.baseline_ns);
    }
    drop(stats);
    let row = Row::compare(
        "kernel",
        "per-packet kernel cost (WireGuard transport messages)",
        (
            "ingress program, run_time_ns / run_cnt",
            "counter-only TC program, same hook and packets",
        ),
        "ns",
        &pairs,
        "ns",
        Goal::RatioAtMost(2.0),
    )
    .note(format!(
        "kernel: {measured} packets over {rounds} rounds, order of attachment alternating"
    ));
    emit(&row).expect("write the row");
    if packets_only {
        println!(
            "ingress {:.1} ns, count-only {:.1} ns, ratio {:.2}",
            median(&ours),
            median(&baseline),
            median(&ratios)
        );
        return ExitCode::SUCCESS;
    }
    let read = read_round(10_000, reads);

    let ours = median(&ours);
    let baseline = median(&baseline);
    let ratio = median(&ratios);
    println!();
    println!(
        "plexd-metrics benchmarks ({}; {measured} packets, {} reads)",
        if quick { "quick" } else { "full" },
        reads
    );
    println!(
        "{:<44} {:>12} {:>24} {:>8}  goal",
        "benchmark", "measured", "baseline (same run)", "ratio"
    );
    println!(
        "{:<44} {:>9.1} ns {:>13.1} ns count-only {:>7.2}x  {}",
        "TC ingress per WireGuard transport message",
        ours,
        baseline,
        ratio,
        if ratio <= 2.0 {
            "<= 2x: met"
        } else {
            "<= 2x: NOT met"
        }
    );
    println!(
        "{:<44} {:>9.2} ms {:>13.2} ms map walk   {:>7.2}x  {}",
        format!("read_endpoints, {} peers", read.peers),
        read.read_ms,
        read.walk_ms,
        read.read_ms / read.walk_ms,
        if read.read_ms < 20.0 {
            "< 20 ms: met"
        } else {
            "< 20 ms: NOT met"
        }
    );
    ExitCode::SUCCESS
}
