//! `cargo xtask bench`: what the kernel programs cost the underlay, as packets per second.
//!
//! Two namespaces joined by a veth pair stand for two nodes; WireGuard transport messages
//! go from one node's WireGuard port to the other's. Each round measures the rate with the
//! agent's programs attached on both ends (as when both nodes run the agent: the sender's
//! egress program and the receiver's ingress program see every packet) and without any,
//! on the same veth pair, alternating. The rate is datagrams received per second of wall
//! time, sent in bursts that the receiver drains, so none is lost in a socket buffer; the
//! rate per second of CPU time is noted beside it.
//!
//! Usage: bench_packet_rate [--quick]. Needs root.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use plexd_metrics::source::counters::EndpointCounterSource as _;
use plexd_metrics::source::ebpf::{ProbeOptions, UnderlayProbe};
use plexd_metrics_tests::bench::{
    alternate, emit, median, thread_cpu, Figures, Goal, Row, Side, Spread,
};
use plexd_metrics_tests::wg::transport;
use plexd_metrics_tests::{attach_probe, quiet_namespaces, NetNs};

const NODE_PORT: u16 = 51_820;
const PEER_PORT: u16 = 51_821;
/// Datagrams per burst: well within the receiver's default socket buffer.
const BURST: u64 = 64;
/// Plaintext bytes per message: a small packet, where per-packet costs weigh most.
const PAYLOAD: usize = 64;

fn attach(ns: &NetNs, dev: &str, port: u16) -> UnderlayProbe {
    attach_probe(ns, dev, &ProbeOptions::default(), &[port])
}

fn main() -> ExitCode {
    let quick = std::env::args().skip(1).any(|a| a == "--quick");
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench_packet_rate needs root (network namespaces, eBPF)");
        return ExitCode::from(2);
    }
    // Many short rounds rather than a few long ones: the load of a shared machine shifts
    // within seconds, and short alternating rounds spread it over both sides.
    let (rounds, window) = if quick {
        (6, Duration::from_millis(300))
    } else {
        (20, Duration::from_millis(500))
    };
    let (peer_ns, node_ns) = quiet_namespaces();
    let veth = plexd_metrics_tests::VethPair::new(&peer_ns, &node_ns).expect("veth pair");
    let to = SocketAddr::from((veth.b.addr, NODE_PORT));
    let from = SocketAddr::from((veth.a.addr, PEER_PORT));
    let receiver = node_ns
        .run(move || UdpSocket::bind(to))
        .expect("enter namespace")
        .expect("bind the receiver");
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("receive timeout");
    let sender = peer_ns
        .run(move || UdpSocket::bind(from))
        .expect("enter namespace")
        .expect("bind the sender");
    let mut counter = 0u64;
    let mut message = transport(1, 0, PAYLOAD);
    let mut buf = vec![0u8; message.len() + 1];
    // Sends bursts for `window`; returns datagrams received per second of wall time and per
    // second of this thread's CPU time, and how many. The thread's CPU time covers the whole
    // path (send, both TC hooks, the veth, the receiver's stack: softirq work done on the
    // way out of `send_to` is charged to it) and not the time other tasks held the CPU.
    let mut rate = |window: Duration| -> (f64, f64, u64) {
        let (start, cpu) = (Instant::now(), thread_cpu());
        let mut received = 0u64;
        while start.elapsed() < window {
            for _ in 0..BURST {
                counter += 1;
                message[8..16].copy_from_slice(&counter.to_le_bytes());
                sender.send_to(&message, to).expect("send");
            }
            for _ in 0..BURST {
                receiver.recv_from(&mut buf).expect("a datagram arrives");
            }
            received += BURST;
        }
        let cpu = (thread_cpu() - cpu).as_secs_f64();
        (
            received as f64 / start.elapsed().as_secs_f64(),
            received as f64 / cpu,
            received,
        )
    };
    // Warm-up: neighbour entries, socket buffers, caches.
    rate(window / 4);

    eprintln!("bench_packet_rate: {rounds} rounds of {window:?} each side");
    let rounds = alternate(rounds, |side| {
        let (pps, pps_cpu, _) = match side {
            Side::Baseline => rate(window),
            Side::Agent => {
                let node = attach(&node_ns, &veth.b.name, NODE_PORT);
                let peer = attach(&peer_ns, &veth.a.name, PEER_PORT);
                let (pps, pps_cpu, sent) = rate(window);
                // The programs did see and parse every message as WireGuard.
                let seen = node.read_endpoints().expect("read counters");
                let counted = seen.endpoints.get(&from).map_or(0, |e| e.rx_packets);
                assert_eq!(counted, sent, "the ingress program counted every message");
                drop((node, peer));
                (pps, pps_cpu, sent)
            }
        };
        Figures::from([("pps", pps), ("pps_cpu", pps_cpu)])
    });
    let row = Row::compare(
        "packet-rate",
        "packet rate through the underlay (UDP, 64-byte WireGuard payloads)",
        (
            "veth with the programs attached (both ends)",
            "the same veth without them",
        ),
        "packets/s",
        &rounds,
        "pps",
        Goal::RatioAtLeast(0.97),
    );
    let per_cpu: Vec<f64> = rounds
        .agent("pps_cpu")
        .iter()
        .zip(rounds.baseline("pps_cpu"))
        .map(|(a, b)| a / b)
        .collect();
    let per_cpu = Spread::of(&per_cpu);
    let row = row.note(format!(
        "packet-rate: per second of the sending thread's CPU time instead of wall time \
         (steadier under load): {:.0} vs {:.0} packets/s, ratio {:.2}× ({:.2}–{:.2})",
        median(&rounds.agent("pps_cpu")),
        median(&rounds.baseline("pps_cpu")),
        per_cpu.median,
        per_cpu.min,
        per_cpu.max
    ));
    emit(&row).expect("write the row");
    ExitCode::SUCCESS
}
