//! `cargo xtask bench`: the tunnel group beside `prometheus_wireguard_exporter`, the
//! per-peer WireGuard exporter users install with `cargo install`.
//!
//! For 100, 1,000 and 10,000 peers: a wireguard-go device with that many peers in a
//! namespace; the exporter runs there for that one device (`-i`), and each round times one
//! scrape of it (it runs `wg show <dev> dump` and renders the text) beside one collect of the
//! agent's tunnel group over the same device, in this process (UAPI read, parse, points).
//! Both sides read the same device state; the tunnel group's packet counters come from the
//! kernel programs, which the kernel benchmark measures, so here it reads the device alone,
//! as the exporter does.
//!
//! Usage: bench_wireguard_exporter [--quick]. Needs root.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use plexd_metrics::collector::{Collector, TunnelCollector};
use plexd_metrics::config::PeerNames;
use plexd_metrics::source::tunnel::WireGuardTunnelReader;
use plexd_metrics::source::wireguard::SystemDevices;
use plexd_metrics_tests::bench::{
    alternate, emit, free_port, http_get, median, ms, process_cpu, thousands, thread_cpu, tool,
    wait_for_listener, Figures, Goal, Row, Side,
};
use plexd_metrics_tests::wireguard::{many_peers, WireGuardGo, SOCKET_DIR};
use plexd_metrics_tests::{unique_name, NetNs};
use tokio_util::sync::CancellationToken;

/// The exporter's binary name, as `cargo install` puts it.
const EXPORTER: &str = "prometheus_wireguard_exporter";
/// A metric the exporter writes once per peer.
const PER_PEER_METRIC: &str = "wireguard_sent_bytes_total{";

fn main() -> ExitCode {
    let quick = std::env::args().skip(1).any(|a| a == "--quick");
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench_wireguard_exporter needs root (network namespaces, wireguard-go)");
        return ExitCode::from(2);
    }
    let exporter_bin = match tool(EXPORTER) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("bench_wireguard_exporter: {e}");
            return ExitCode::from(2);
        }
    };
    let sizes: &[(usize, usize)] = if quick {
        &[(100, 7), (1_000, 5)]
    } else {
        &[(100, 21), (1_000, 15), (10_000, 9)]
    };
    for &(peers, rounds) in sizes {
        let row = compare(&exporter_bin, peers, rounds);
        emit(&row).expect("write the row");
    }
    ExitCode::SUCCESS
}

fn compare(exporter_bin: &std::path::Path, peers: usize, rounds: usize) -> Row {
    eprintln!("bench_wireguard_exporter: {peers} peers, {rounds} rounds");
    let ns = NetNs::new("pbw").expect("namespace");
    let wg = WireGuardGo::start(&ns, &unique_name("wgw")).expect("wireguard-go");
    let (conf, _) = many_peers(51_830, peers);
    wg.setconf(&conf).expect("wg setconf");

    let port = ns.run(free_port).expect("namespace").expect("free port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let exporter = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(exporter_bin)
            .args(["-l", "127.0.0.1", "-p", &port.to_string(), "-i", &wg.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the exporter"),
    );
    let pid = exporter.0.id();

    let devices = Arc::new(SystemDevices::new(vec![wg.name.clone()], SOCKET_DIR));
    let collector = TunnelCollector::new(WireGuardTunnelReader::new(
        devices,
        None,
        PeerNames::default(),
        Duration::from_secs(180),
    ));
    let rounds = ns
        .run(|| {
            wait_for_listener(addr, Duration::from_secs(30)).expect("the exporter listens");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let cancel = CancellationToken::new();
            let collect = || {
                rt.block_on(collector.collect(plexd_metrics::collector::Cycle::default(), &cancel))
                    .expect("collect")
            };
            let scrape = || {
                let body = http_get(addr, "/metrics").expect("scrape the exporter");
                String::from_utf8_lossy(&body)
                    .matches(PER_PEER_METRIC)
                    .count()
            };
            // Both once before measuring, checking that both see every peer.
            assert_eq!(collect().len(), peers, "one tunnel point per peer");
            assert_eq!(scrape(), peers, "the exporter reports every peer");
            alternate(rounds, |side| {
                let start = Instant::now();
                let cpu = match side {
                    Side::Agent => {
                        let cpu = thread_cpu();
                        collect();
                        thread_cpu() - cpu
                    }
                    Side::Baseline => {
                        // The exporter's own threads; `wg`, its child, is not counted here.
                        let cpu = process_cpu(pid).expect("the exporter's CPU");
                        scrape();
                        process_cpu(pid).expect("the exporter's CPU") - cpu
                    }
                };
                Figures::from([("wall_ms", ms(start.elapsed())), ("cpu_ms", ms(cpu))])
            })
        })
        .expect("enter the namespace");
    drop(exporter);
    drop(wg);
    Row::compare(
        format!("wireguard-{peers}"),
        format!("per-peer WireGuard metrics, {} peers (time)", thousands(peers)),
        (
            "one tunnel-group collect",
            "one prometheus_wireguard_exporter scrape",
        ),
        "ms",
        &rounds,
        "wall_ms",
        Goal::RatioAtMost(0.5),
    )
    .note(format!(
        "wireguard-{peers}: CPU agent {:.3} ms, exporter process {:.3} ms (plus its `wg show dump` child, not counted)",
        median(&rounds.agent("cpu_ms")),
        median(&rounds.baseline("cpu_ms"))
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
