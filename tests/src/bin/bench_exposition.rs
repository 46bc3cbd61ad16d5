//! `cargo xtask bench`: one scrape of the agent's `/metrics` beside one scrape of
//! `prometheus_wireguard_exporter`, on the same wireguard-go device, in the same run.
//!
//! The agent runs as it would on a node (the release binary, the tunnel group on, the
//! kernel programs and the latency group off so that only the device is read, as the
//! exporter reads it); each round scrapes one side and counts the CPU its process spent
//! (the exporter's `wg show dump` child not counted, which favours the exporter). The goal is
//! the CPU per scrape: the agent renders once per collect cycle and a scrape copies that,
//! where the exporter reads and renders the device on every scrape.
//!
//! Usage: bench_exposition [--quick]. Needs root.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use plexd_metrics_tests::bench::{
    alternate, emit, free_port, http_get, median, ms, process_cpu, thousands, tool,
    wait_for_listener, Figures, Goal, Row, Side,
};
use plexd_metrics_tests::wireguard::{many_peers, WireGuardGo};
use plexd_metrics_tests::{agent_binary, unique_name, NetNs};

const EXPORTER: &str = "prometheus_wireguard_exporter";
/// A series each side writes once per peer.
const EXPORTER_PER_PEER: &str = "wireguard_sent_bytes_total{";
const AGENT_PER_PEER: &str = "plexd_peer_transmit_bytes_total{";

fn main() -> ExitCode {
    let quick = std::env::args().skip(1).any(|a| a == "--quick");
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench_exposition needs root (network namespaces, wireguard-go)");
        return ExitCode::from(2);
    }
    let exporter = match tool(EXPORTER) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("bench_exposition: {e}");
            return ExitCode::from(2);
        }
    };
    let sizes: &[(usize, usize)] = if quick {
        &[(1_000, 7)]
    } else {
        &[(1_000, 15), (10_000, 11)]
    };
    for &(peers, rounds) in sizes {
        emit(&compare(&exporter, peers, rounds)).expect("write the row");
    }
    ExitCode::SUCCESS
}

fn compare(exporter_bin: &std::path::Path, peers: usize, rounds: usize) -> Row {
    eprintln!("bench_exposition: {peers} peers, {rounds} rounds");
    let ns = NetNs::new("pbe").expect("namespace");
    let wg = WireGuardGo::start(&ns, &unique_name("wge")).expect("wireguard-go");
    let (conf, _) = many_peers(51_840, peers);
    wg.setconf(&conf).expect("wg setconf");

    let port = |ns: &NetNs| ns.run(free_port).expect("namespace").expect("free port");
    let exporter_addr = SocketAddr::from(([127, 0, 0, 1], port(&ns)));
    let exporter = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(exporter_bin)
            .args([
                "-l",
                "127.0.0.1",
                "-p",
                &exporter_addr.port().to_string(),
                "-i",
                &wg.name,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the exporter"),
    );

    let agent_addr = SocketAddr::from(([127, 0, 0, 1], port(&ns)));
    let dir = std::env::temp_dir().join(format!("plexd-bench-exposition-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  collect_interval: 5s\n  report_interval: 60s\n  ebpf: {{ enabled: false }}\n  \
             latency: {{ enabled: false }}\n  health: {{ enabled: false }}\n  \
             wireguard: {{ interfaces: [{}] }}\n  prometheus: {{ listen: '{agent_addr}' }}\n",
            wg.name
        ),
    )
    .expect("config");
    let agent = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(agent_binary())
            .args(["--log-level", "warn", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent"),
    );
    let (exporter_pid, agent_pid) = (exporter.0.id(), agent.0.id());

    let rounds = ns
        .run(|| {
            wait_for_listener(exporter_addr, Duration::from_secs(30))
                .expect("the exporter listens");
            wait_for_listener(agent_addr, Duration::from_secs(30)).expect("the agent listens");
            let count = |addr: SocketAddr, series: &str| {
                let body = http_get(addr, "/metrics").expect("scrape");
                String::from_utf8_lossy(&body).matches(series).count()
            };
            // The agent's first rendering comes with its first collect cycle.
            let until = Instant::now() + Duration::from_secs(60);
            while count(agent_addr, AGENT_PER_PEER) != peers {
                assert!(
                    Instant::now() < until,
                    "the agent never rendered {peers} peers"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            assert_eq!(count(exporter_addr, EXPORTER_PER_PEER), peers);
            alternate(rounds, |side| {
                let (addr, pid) = match side {
                    Side::Agent => (agent_addr, agent_pid),
                    Side::Baseline => (exporter_addr, exporter_pid),
                };
                let start = Instant::now();
                let cpu = process_cpu(pid).expect("CPU");
                let body = http_get(addr, "/metrics").expect("scrape");
                let cpu = process_cpu(pid).expect("CPU") - cpu;
                assert!(!body.is_empty());
                Figures::from([("wall_ms", ms(start.elapsed())), ("cpu_ms", ms(cpu))])
            })
        })
        .expect("enter the namespace");
    drop(agent);
    drop(exporter);
    drop(wg);
    let _ = std::fs::remove_dir_all(&dir);
    Row::compare(
        format!("exposition-{peers}"),
        format!("/metrics scrape, {} peers (CPU)", thousands(peers)),
        (
            "one scrape of the agent's /metrics",
            "one prometheus_wireguard_exporter scrape",
        ),
        "ms",
        &rounds,
        "cpu_ms",
        Goal::RatioAtMost(0.25),
    )
    .note(format!(
        "exposition-{peers}: wall agent {:.2} ms, exporter {:.2} ms",
        median(&rounds.agent("wall_ms")),
        median(&rounds.baseline("wall_ms"))
    ))
}

/// Kills and reaps a child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
