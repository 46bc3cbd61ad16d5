//! `cargo xtask bench`: the agent beside Prometheus' node_exporter (the Debian package), the
//! tool a node would otherwise run for its system metrics.
//!
//! 1. Resident memory in steady state: the agent binary with its default configuration
//!    (every group on, the kernel programs attached to the underlay) on a node with a
//!    wireguard-go device of 1,000 peers, after its fourth collect cycle (two reports done);
//!    node_exporter with its default collectors in the same namespace after as many scrapes.
//!    VmRSS and VmHWM from `/proc/PID/status`.
//! 2. CPU time of one collect of the `system` group (in this process, on the calling
//!    thread) beside the CPU time node_exporter spends answering one scrape (its threads'
//!    `schedstat` before and after).
//!
//! Usage: bench_node_exporter [--quick]. Needs root.

use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use plexd_metrics::collector::{Collector, SystemCollector};
use plexd_metrics::source::proc::LinuxSystemReader;
use plexd_metrics_tests::agent::RunningAgent;
use plexd_metrics_tests::bench::{
    alternate, emit, free_port, http_get, median, mib, ms, process_cpu, process_cpu_self,
    status_bytes, wait_for_listener, Figures, Goal, Row, Side,
};
use plexd_metrics_tests::wireguard::{many_peers, WireGuardGo};
use plexd_metrics_tests::{unique_name, NetNs, VethPair};
use tokio_util::sync::CancellationToken;

/// The Debian package's binary.
const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
const PEERS: usize = 1_000;
/// Collect cycles (5 s each) before the agent counts as settled: two reports have gone out.
const SETTLE_CYCLES: usize = 4;

/// node_exporter serving on a free port of `ns`, stopped on drop.
struct NodeExporter {
    child: Child,
    addr: SocketAddr,
}

impl NodeExporter {
    fn start(ns: &NetNs) -> std::io::Result<Self> {
        let port = ns.run(free_port)??;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), NODE_EXPORTER])
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let exporter = Self { child, addr };
        ns.run(|| wait_for_listener(addr, Duration::from_secs(30)))??;
        Ok(exporter)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One scrape from inside `ns`; returns the body's size.
    fn scrape(&self, ns: &NetNs) -> std::io::Result<usize> {
        let addr = self.addr;
        let body = ns.run(move || http_get(addr, "/metrics"))??;
        Ok(body.len())
    }
}

impl Drop for NodeExporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Memory figures of process `pid`, in MiB: resident, its peak, and the resident split into
/// anonymous memory (heap, stacks) and file pages (the binary's code and data).
fn memory(pid: u32) -> Figures {
    let get = |key| mib(status_bytes(pid, key).unwrap_or_else(|e| panic!("{key}: {e}")));
    Figures::from([
        ("rss_mib", get("VmRSS")),
        ("hwm_mib", get("VmHWM")),
        ("anon_mib", get("RssAnon")),
        ("file_mib", get("RssFile")),
    ])
}

/// The agent with `config` in `ns`, settled; its memory figures.
fn agent_memory(ns: &NetNs, config: &std::path::Path, programs: bool) -> Figures {
    let agent = RunningAgent::start_with_stdout(ns, config, Stdio::null());
    if programs {
        // As on a real node, with the default config: the programs on the underlay.
        agent.wait_for("kernel programs attached");
    }
    for _ in 0..SETTLE_CYCLES {
        agent.wait_for("collect cycle done");
    }
    let figures = memory(agent.child.id());
    let (code, _) = agent.stop();
    assert_eq!(code, Some(0), "the agent exits cleanly on SIGTERM");
    figures
}

fn main() -> ExitCode {
    let quick = std::env::args().skip(1).any(|a| a == "--quick");
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench_node_exporter needs root (network namespaces, wireguard-go, eBPF)");
        return ExitCode::from(2);
    }
    let (memory_rounds, cpu_rounds) = if quick { (1, 11) } else { (3, 31) };

    // A node: a wireguard-go device with 1,000 peers whose endpoints are reached through an
    // underlay veth, where the agent attaches its kernel programs.
    let node = NetNs::new("pbn").expect("namespace");
    let underlay = NetNs::new("pbu").expect("namespace");
    let veth = VethPair::new(&node, &underlay).expect("veth pair");
    node.ip(&["route", "add", "192.0.2.0/24", "dev", &veth.a.name])
        .expect("route to the endpoints");
    let wg = WireGuardGo::start(&node, &unique_name("wgn")).expect("wireguard-go");
    let (conf, _) = many_peers(51_820, PEERS);
    wg.setconf(&conf).expect("wg setconf");
    node.ip(&["addr", "add", "10.99.0.1/8", "dev", &wg.name])
        .expect("address");
    node.ip(&["link", "set", &wg.name, "up"]).expect("link up");

    let dir = std::env::temp_dir().join(unique_name("plexd-bench-ne-"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("config.yaml");
    // The defaults but for the intervals, at the shortest the agent allows, so that steady
    // state (reports done, buffers at their size) comes in seconds rather than minutes.
    std::fs::write(
        &config,
        "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n",
    )
    .expect("write config");

    eprintln!("bench_node_exporter: resident memory, {memory_rounds} rounds");
    let rounds = alternate(memory_rounds, |side| match side {
        Side::Agent => agent_memory(&node, &config, true),
        Side::Baseline => {
            let exporter = NodeExporter::start(&node).expect("start node_exporter");
            for _ in 0..SETTLE_CYCLES {
                exporter.scrape(&node).expect("scrape node_exporter");
            }
            memory(exporter.pid())
        }
    });
    // Once more without the kernel programs, to show what they weigh.
    std::fs::write(
        &config,
        "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  ebpf: { enabled: false }\n",
    )
    .expect("write config");
    let without = agent_memory(&node, &config, false);
    let _ = std::fs::remove_dir_all(&dir);
    let rss = Row::compare(
        "memory",
        "resident memory, steady state (VmRSS)",
        (
            "agent, default config, 1,000 WireGuard peers",
            "prometheus-node-exporter, default collectors",
        ),
        "MiB",
        &rounds,
        "rss_mib",
        Goal::RatioAtMost(0.5),
    );
    let hwm = (
        median(&rounds.agent("hwm_mib")),
        median(&rounds.baseline("hwm_mib")),
    );
    let rss = rss
        .note(format!(
            "memory: peak (VmHWM) agent {:.1} MiB, node_exporter {:.1} MiB",
            hwm.0, hwm.1
        ))
        .note(format!(
            "memory: resident split, anonymous + file pages: agent {:.1} + {:.1} MiB, \
             node_exporter {:.1} + {:.1} MiB",
            median(&rounds.agent("anon_mib")),
            median(&rounds.agent("file_mib")),
            median(&rounds.baseline("anon_mib")),
            median(&rounds.baseline("file_mib")),
        ))
        .note(format!(
            "memory: the same agent with the kernel programs off (`ebpf: {{ enabled: false }}`): \
             {:.1} MiB resident ({:.1} anonymous), one run",
            without["rss_mib"], without["anon_mib"]
        ));
    emit(&rss).expect("write the row");

    eprintln!("bench_node_exporter: CPU per collect / scrape, {cpu_rounds} rounds");
    let exporter = NodeExporter::start(&node).expect("start node_exporter");
    // Both in the node's namespace, so that both read the same interfaces.
    let (rounds, body) = node
        .run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let collector = SystemCollector::new(LinuxSystemReader::new("/proc", "/", None));
            let cancel = CancellationToken::new();
            let collect = || {
                let points = rt
                    .block_on(
                        collector.collect(plexd_metrics::collector::Cycle::default(), &cancel),
                    )
                    .expect("collect");
                assert_eq!(points.len(), 1);
            };
            // The first collect has no earlier CPU sample; the first scrape warms up too.
            collect();
            let mut body = http_get(exporter.addr, "/metrics").expect("scrape").len();
            let rounds = alternate(cpu_rounds, |side| {
                let (wall, cpu) = match side {
                    Side::Agent => {
                        // The reads run on the blocking pool's threads: the whole
                        // process's CPU time counts them, the calling thread's would not.
                        let (start, cpu) = (Instant::now(), process_cpu_self());
                        collect();
                        (start.elapsed(), process_cpu_self() - cpu)
                    }
                    Side::Baseline => {
                        let before = process_cpu(exporter.pid()).expect("node_exporter CPU");
                        let start = Instant::now();
                        body = http_get(exporter.addr, "/metrics").expect("scrape").len();
                        let wall = start.elapsed();
                        (
                            wall,
                            process_cpu(exporter.pid()).expect("node_exporter CPU") - before,
                        )
                    }
                };
                Figures::from([("cpu_ms", ms(cpu)), ("wall_ms", ms(wall))])
            });
            (rounds, body)
        })
        .expect("enter the namespace");
    drop(exporter);
    let cpu = Row::compare(
        "system-cpu",
        "CPU time per collection, system metrics",
        (
            "one collect of the system group",
            "one node_exporter scrape",
        ),
        "ms",
        &rounds,
        "cpu_ms",
        Goal::RatioAtMost(0.5),
    )
    .note(format!(
        "system-cpu: wall agent {:.3} ms, node_exporter {:.3} ms; node_exporter answers {} KiB, \
         the agent one point",
        median(&rounds.agent("wall_ms")),
        median(&rounds.baseline("wall_ms")),
        body / 1024
    ));
    emit(&cpu).expect("write the row");
    drop(wg);
    ExitCode::SUCCESS
}
