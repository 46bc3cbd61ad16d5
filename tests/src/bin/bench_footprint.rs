//! `cargo xtask bench`'s footprint part: the agent binary's resident memory and CPU time per
//! collect cycle, the figures behind the DaemonSet's resource requests and limits.
//!
//! Three runs of the same binary, in one go: the baseline (only the `system` and `agent`
//! groups: the agent's floor), a node of a three-node wireguard-go mesh with every group on
//! (kernel programs, tunnel, latency: the usual node), and a wireguard-go device with 10,000
//! peers (tunnel and latency at the size the other benchmarks use).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plexd_metrics_tests::mesh::Mesh;
use plexd_metrics_tests::wireguard::{many_peers, WireGuardGo};
use plexd_metrics_tests::{agent_binary, unique_name, NetNs};

/// Collect cycles measured per run (after the first, which warms up).
const CYCLES: u64 = 4;
const PEERS: usize = 10_000;

struct Figures {
    peak_rss: u64,
    rss: u64,
    cpu_per_cycle: Duration,
}

/// Runs the agent in `ns` with `config` for `CYCLES` + 1 collect cycles of 5 s and reads its
/// figures from /proc before stopping it.
fn measure(ns: &NetNs, config: &str) -> Figures {
    let dir = std::env::temp_dir().join(unique_name("plexd-footprint-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).expect("write config");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(agent_binary())
        .args([
            "--log-level",
            "plexd_metrics=debug,warn",
            "--log-format",
            "json",
        ])
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let proc = format!("/proc/{}", child.id());
    // Nanoseconds on a CPU, summed over the threads: schedstat's first field. (utime and
    // stime count 10 ms ticks, too coarse for the baseline.)
    let cpu = || -> Duration {
        let tasks = std::fs::read_dir(format!("{proc}/task")).expect("task list");
        Duration::from_nanos(
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
                .filter_map(|s| s.split(' ').next()?.parse::<u64>().ok())
                .sum(),
        )
    };
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut cycles = 0;
    let mut start_cpu = Duration::ZERO;
    let started = Instant::now();
    for line in stderr.lines().map_while(Result::ok) {
        if !line.contains("collect cycle done") {
            continue;
        }
        cycles += 1;
        if cycles == 1 {
            start_cpu = cpu();
        }
        if cycles == CYCLES + 1 || started.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    assert_eq!(cycles, CYCLES + 1, "the agent ran {CYCLES} + 1 cycles");
    let used = cpu() - start_cpu;
    let status = std::fs::read_to_string(format!("{proc}/status")).unwrap();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in {status}"))
    };
    let figures = Figures {
        peak_rss: kib("VmHWM:") * 1024,
        rss: kib("VmRSS:") * 1024,
        cpu_per_cycle: used / CYCLES as u32,
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    figures
}

const INTERVALS: &str =
    "  collect_interval: 5s\n  report_interval: 10s\n  health: { listen: '127.0.0.1:0' }\n";

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench-footprint: needs root (network namespaces, wireguard-go, eBPF)");
        std::process::exit(2);
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let print = |name: &str, f: &Figures| {
        println!(
            "  {name:<34} {:>8.1} MiB {:>8.1} MiB {:>10.1} ms",
            mib(f.peak_rss),
            mib(f.rss),
            f.cpu_per_cycle.as_secs_f64() * 1000.0
        );
    };
    println!(
        "footprint: agent {} ({CYCLES} cycles of 5 s each)",
        agent_binary().display()
    );
    println!(
        "  {:<34} {:>12} {:>12} {:>13}",
        "run", "peak RSS", "RSS", "CPU / cycle"
    );

    let mesh = Mesh::new(3, Some(1)).expect("build the mesh");
    let node = &mesh.nodes[0];
    let baseline = measure(
        &node.ns,
        &format!(
            "metrics:\n{INTERVALS}  ebpf: {{ enabled: false }}\n  wireguard: {{ enabled: false }}\n  latency: {{ enabled: false }}\n"
        ),
    );
    print("baseline: system + agent groups", &baseline);
    let full = measure(&node.ns, &format!("metrics:\n{INTERVALS}"));
    print("mesh node: every group, 2 peers", &full);

    let ns = NetNs::new("pbf").expect("namespace");
    let wg = WireGuardGo::start(&ns, &unique_name("wgf")).expect("wireguard-go");
    let (conf, _) = many_peers(51_990, PEERS);
    wg.setconf(&conf).expect("wg setconf");
    ns.ip(&["addr", "add", "10.99.0.1/8", "dev", &wg.name])
        .expect("address");
    ns.ip(&["link", "set", &wg.name, "up"]).expect("link up");
    let large = measure(
        &ns,
        &format!(
            "metrics:\n{INTERVALS}  batch_size: 20000\n  queue: {{ max_points: 100000 }}\n  ebpf: {{ enabled: false }}\n"
        ),
    );
    print(&format!("{PEERS} peers: tunnel + latency"), &large);
    println!(
        "  mesh node / baseline: {:.2}x peak RSS; {PEERS} peers / baseline: {:.2}x",
        full.peak_rss as f64 / baseline.peak_rss as f64,
        large.peak_rss as f64 / baseline.peak_rss as f64
    );
}
