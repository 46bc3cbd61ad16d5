//! The agent against kernel WireGuard and netem. These scenarios need the WireGuard and
//! netem modules, which only the VM's kernels have: `cargo xtask integration-test vm` boots
//! Debian's 6.1 and 6.12 cloud kernels and runs this binary in each (the target has
//! `test = false`, so a plain `cargo test` leaves it out).
//!
//! The ground truth is the kernel's own: `wg show dump` (generic netlink) for handshakes and
//! byte counters, netem's qdisc counters for the packets it dropped, netem's configured delay
//! for round trips, and TC's own view of what is attached.

use std::collections::BTreeMap;

use plexd_metrics::api::MetricPoint;
use plexd_metrics::collector::{LatencyResult, TunnelStats};
use plexd_metrics::source::ebpf::UnderlayProbe;
use plexd_metrics_common::{PROG_EGRESS, PROG_INGRESS};
use plexd_metrics_tests::agent::{run_once, RunningAgent};
use plexd_metrics_tests::kernel_mesh::{KernelMesh, Netem};
use plexd_metrics_tests::wireguard::{parse_dump, DumpPeer};
use plexd_metrics_tests::{kernel_name, ours, require_privileges, tc_state, unique_name, NetNs};

/// Bound on one log line of the agent, in the guest's (instruction-counted) time: loading the
/// kernel programs is the slowest step, and the 6.1 verifier takes tens of seconds over them.
const AGENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(180);
/// The delay netem adds to every packet of the delayed link, and its jitter: none, so that
/// every round trip through that link is the delay plus what the direct link takes, and a
/// figure off by a fraction of a millisecond shows.
const DELAY_MS: f64 = 20.0;
const JITTER: &str = "0ms";
/// How far a round-trip median may be from the delay netem adds (beyond the direct link's).
const RTT_TOLERANCE_MS: f64 = 0.5;

/// Whether this kernel attaches TC programs with TCX links (6.6 and later), as aya decides.
fn kernel_has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

/// Starts the agent in `ns` with `config` (YAML).
fn start_agent(ns: &NetNs, config: &str) -> RunningAgent {
    let path = std::env::temp_dir().join(format!("{}.yaml", unique_name("agent")));
    std::fs::write(&path, config).expect("write the agent's config");
    RunningAgent::start(ns, &path).with_deadline(AGENT_DEADLINE)
}

/// Stops the agent with SIGTERM (it flushes its buffer first) and returns its batches.
fn stop_agent(agent: RunningAgent) -> Vec<Vec<MetricPoint>> {
    let (code, stdout) = agent.stop();
    assert_eq!(code, Some(0), "the agent's exit after SIGTERM");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a batch ({e}): {l}")))
        .collect()
}

fn points<'a>(
    batches: &'a [Vec<MetricPoint>],
    group: &'a str,
) -> impl Iterator<Item = &'a MetricPoint> {
    batches.iter().flatten().filter(move |p| p.group == group)
}

/// The tunnel points of one peer, in the order the agent collected them.
fn tunnel_of(batches: &[Vec<MetricPoint>], peer: &str) -> Vec<TunnelStats> {
    points(batches, "tunnel")
        .filter(|p| p.peer_id == peer)
        .map(|p| p.data.decode().expect("tunnel point data"))
        .collect()
}

fn dump_peer<'a>(dump: &'a [DumpPeer], key: &str) -> &'a DumpPeer {
    dump.iter()
        .find(|p| p.public_key == key)
        .unwrap_or_else(|| panic!("peer {key} not in wg show dump: {dump:?}"))
}

/// Runs the agent once (`--once`) in node 0 between two identical `wg show dump`s, so that
/// both sides saw the same device state; tries again if traffic moved it in between.
fn once_between_dumps(mesh: &KernelMesh, config: &str) -> (Vec<MetricPoint>, Vec<DumpPeer>) {
    let node = &mesh.nodes[0];
    for _ in 0..5 {
        let before = node.dump().expect("wg show dump");
        let run = run_once(&node.ns, config);
        let after = node.dump().expect("wg show dump");
        if before == after {
            return (run.batch, parse_dump(&after));
        }
    }
    panic!("the device state kept changing around the agent's collect");
}

/// Kernel WireGuard read over generic netlink by the agent binary: one tunnel point per
/// peer whose handshake time, byte counters and endpoint are those `wg show dump` reports,
/// and loss -1 because no kernel programs measure it.
#[test]
fn tunnel_group_agrees_with_netlink_and_reports_loss_unmeasured_without_ebpf() {
    if !require_privileges() {
        return;
    }
    let mesh = KernelMesh::new(3).expect("build the kernel WireGuard mesh");
    assert_eq!(mesh.ping(0, 1, 10, "0.05").expect("ping"), 10);
    // Node 2 stays silent: a peer that never shook hands.
    let config = format!(
        "metrics:\n  ebpf:\n    enabled: false\n  latency:\n    enabled: false\n  wireguard:\n    peer_names:\n      {}: node-1\n",
        mesh.nodes[1].keys.public
    );
    let (batch, dump) = once_between_dumps(&mesh, &config);
    let tunnel: BTreeMap<&str, TunnelStats> = batch
        .iter()
        .filter(|p| p.group == "tunnel")
        .map(|p| (p.peer_id.as_str(), p.data.decode().expect("tunnel data")))
        .collect();
    let names = [
        ("node-1", mesh.nodes[1].keys.public.as_str()),
        (
            mesh.nodes[2].keys.public.as_str(),
            mesh.nodes[2].keys.public.as_str(),
        ),
    ];
    assert_eq!(tunnel.len(), 2, "one point per peer: {batch:#?}");
    for (id, key) in names {
        let point = tunnel
            .get(id)
            .unwrap_or_else(|| panic!("no point for {id}: {tunnel:#?}"));
        let expected = dump_peer(&dump, key);
        assert_eq!(point.peer_id, id);
        assert_eq!(
            (point.rx_bytes, point.tx_bytes),
            (expected.rx_bytes, expected.tx_bytes),
            "byte counters of {id}"
        );
        let handshake = u64::try_from(point.last_handshake_time.timestamp()).unwrap_or(0);
        assert_eq!(
            handshake, expected.latest_handshake,
            "last handshake of {id}"
        );
        assert_eq!(point.handshake_succeeded, expected.latest_handshake != 0);
        assert_eq!(point.endpoint, expected.endpoint, "endpoint of {id}");
        assert_eq!(
            point.packet_loss_percent, -1.0,
            "loss is not measured without eBPF"
        );
        assert_eq!(point.lost_packets, None);
        assert_eq!(point.rx_packets, None);
    }
    let node1 = &tunnel["node-1"];
    assert!(
        node1.handshake_succeeded && !node1.handshake_stale,
        "{node1:?}"
    );
    // Ten echoes and their replies, 128 bytes each inside WireGuard, and the handshake.
    assert!(
        node1.rx_bytes >= 10 * 128 && node1.tx_bytes >= 10 * 128,
        "{node1:?}"
    );
    let silent = &tunnel[names[1].0];
    assert!(
        !silent.handshake_succeeded && silent.handshake_stale,
        "{silent:?}"
    );
    assert_eq!(silent.rx_bytes, 0);
}

/// The kernel programs on a kernel WireGuard node's underlay veth: the kernel's verifier
/// accepts them, they attach the way this kernel supports (TCX links from 6.6, cls_bpf
/// filters on a clsact qdisc before), and dropping the probe leaves nothing behind.
#[test]
fn kernel_programs_pass_the_verifier_and_attach_as_this_kernel_allows() {
    if !require_privileges() {
        return;
    }
    let mesh = KernelMesh::new(2).expect("build the kernel WireGuard mesh");
    let dev = mesh.dev_of(0, 1).to_owned();
    let started = std::time::Instant::now();
    let probe = mesh.nodes[0]
        .ns
        .run(|| UnderlayProbe::attach(std::slice::from_ref(&dev)))
        .expect("enter namespace");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let probe = match probe {
        Ok(probe) => probe,
        Err(e) => {
            // The verifier's log is long; its closing lines say why (size, complexity, ...).
            let text = e.to_string();
            let lines: Vec<&str> = text.lines().collect();
            panic!(
                "the {} verifier rejects the kernel programs after {:.1} s: {}\n...\n{}",
                release.trim(),
                started.elapsed().as_secs_f64(),
                lines.first().unwrap_or(&""),
                lines[lines.len().saturating_sub(6)..].join("\n")
            );
        }
    };
    println!(
        "vm-figure: verifier accepted the kernel programs on {} in {:.1} s (guest time)",
        release.trim(),
        started.elapsed().as_secs_f64()
    );
    let state = tc_state(&mesh.nodes[0].ns, &dev);
    assert_eq!(ours(&state), 2, "both programs on {dev}: {state:?}");
    if kernel_has_tcx() {
        let mut names = state.tcx_programs.clone();
        names.sort();
        let mut expected = vec![kernel_name(PROG_EGRESS), kernel_name(PROG_INGRESS)];
        expected.sort();
        assert_eq!(names, expected, "TCX links on this kernel: {state:?}");
        assert!(!state.clsact, "no clsact qdisc with TCX: {state:?}");
    } else {
        assert!(
            state.tcx_programs.is_empty(),
            "no TCX before 6.6: {state:?}"
        );
        assert!(state.clsact, "netlink attachment needs clsact: {state:?}");
        let filters = state
            .filters
            .iter()
            .filter(|l| l.contains("direct-action"))
            .count();
        assert_eq!(filters, 2, "one cls_bpf filter per direction: {state:?}");
    }
    assert_eq!(probe.programs_attached(), 2);
    // In the namespace it attached in: netlink attachments (before 6.6) are found by
    // interface there, unlike TCX links, which their file descriptors name anywhere.
    mesh.nodes[0]
        .ns
        .run(move || probe.detach())
        .expect("enter namespace")
        .expect("detach the kernel programs");
    let after = tc_state(&mesh.nodes[0].ns, &dev);
    assert_eq!(ours(&after), 0, "programs left attached: {after:?}");
    assert!(!after.clsact, "no qdisc left behind: {after:?}");
}

/// ICMP probes through kernel WireGuard to two peers, one of whose links netem delays by
/// 20 ms ± 2 ms: the delayed peer's round-trip medians are the delay netem adds, and exceed
/// the other peer's by it (which shows the delay is netem's and not the tunnel's own).
#[test]
fn rtt_medians_follow_the_netem_delay() {
    if !require_privileges() {
        return;
    }
    let mesh = KernelMesh::new(3).expect("build the kernel WireGuard mesh");
    assert_eq!(mesh.ping(0, 1, 3, "0.05").expect("handshake"), 3);
    assert_eq!(mesh.ping(0, 2, 3, "0.05").expect("handshake"), 3);
    // On node 1's side of its link to node 0: the replies to node 0's probes are delayed.
    let _delay = Netem::delay(
        &mesh.nodes[1].ns,
        mesh.dev_of(1, 0),
        &format!("{DELAY_MS}ms"),
        JITTER,
    )
    .expect("add netem delay");
    // Without the kernel programs: round trips are the latency group's own measurement.
    let config = format!(
        "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  ebpf:\n    enabled: false\n  latency:\n    probes: 20\n  wireguard:\n    peer_names:\n      {}: delayed\n      {}: direct\n",
        mesh.nodes[1].keys.public, mesh.nodes[2].keys.public
    );
    let agent = start_agent(&mesh.nodes[0].ns, &config);
    const CYCLES: usize = 3;
    for _ in 0..CYCLES {
        agent.wait_for("collect cycle done");
    }
    let batches = stop_agent(agent);

    let latency_of = |peer: &str| -> Vec<LatencyResult> {
        points(&batches, "latency")
            .filter(|p| p.peer_id == peer)
            .map(|p| p.data.decode().expect("latency data"))
            .collect()
    };
    let (delayed, direct) = (latency_of("delayed"), latency_of("direct"));
    assert_eq!(delayed.len(), CYCLES, "one point per cycle: {delayed:#?}");
    assert_eq!(direct.len(), CYCLES, "one point per cycle: {direct:#?}");
    let ms = |nanos: i64| nanos as f64 / 1e6;
    for point in delayed.iter().chain(&direct) {
        assert!(
            point.probes_sent > 0 && point.probes_received * 10 >= point.probes_sent * 9,
            "probes answered: {point:?}"
        );
    }
    let mut added: Vec<f64> = Vec::new();
    for (d, b) in delayed.iter().zip(&direct) {
        assert!(
            ms(d.rtt_min_nano) >= DELAY_MS - RTT_TOLERANCE_MS,
            "no reply comes back faster than netem lets it: {d:?}"
        );
        added.push(ms(d.rtt_nano) - ms(b.rtt_nano));
    }
    added.sort_by(f64::total_cmp);
    let median_added = added[CYCLES / 2];
    let middle = |points: &[LatencyResult]| {
        let mut medians: Vec<f64> = points.iter().map(|p| ms(p.rtt_nano)).collect();
        medians.sort_by(f64::total_cmp);
        medians[medians.len() / 2]
    };
    println!(
        "vm-figure: rtt median {:.2} ms through the link netem delays by {DELAY_MS} ms (jitter {JITTER}), \
         {:.2} ms through the other: {median_added:.2} ms added (per cycle: {added:.2?})",
        middle(&delayed),
        middle(&direct),
    );
    // Every cycle's median, not only their middle one: what the delayed link adds over the
    // direct one in the same cycle.
    for (d, b) in delayed.iter().zip(&direct) {
        let added = ms(d.rtt_nano) - ms(b.rtt_nano);
        assert!(
            (added - DELAY_MS).abs() <= RTT_TOLERANCE_MS,
            "round-trip median {added:.2} ms above the direct link's, netem delays by \
             {DELAY_MS} ms: delayed {d:?}, direct {b:?}"
        );
    }
    assert!(
        (median_added - DELAY_MS).abs() <= RTT_TOLERANCE_MS,
        "netem adds {DELAY_MS} ms (jitter {JITTER}), the agent's medians differ by {added:.2?} ms; \
         delayed peer {delayed:#?}, direct peer {direct:#?}"
    );
    // The report interval's p50 (on the last point before a report).
    let p50 = |points: &[LatencyResult]| points.iter().find_map(|p| p.rtt_p50_nano).map(ms);
    let (Some(p50_delayed), Some(p50_direct)) = (p50(&delayed), p50(&direct)) else {
        panic!("a report interval's p50 for both peers: {delayed:#?} {direct:#?}");
    };
    assert!(
        (p50_delayed - p50_direct - DELAY_MS).abs() <= RTT_TOLERANCE_MS,
        "p50 over a report interval: {p50_delayed:.2} ms delayed, {p50_direct:.2} ms direct"
    );

    for peer in ["delayed", "direct"] {
        let tunnel = tunnel_of(&batches, peer);
        assert_eq!(tunnel.len(), CYCLES, "tunnel points for {peer}");
        assert!(tunnel.iter().all(|t| t.handshake_succeeded), "{tunnel:#?}");
    }
}

/// Passive loss against netem's own count: three nodes, node 0 running the agent with its
/// kernel programs, and netem on the other two nodes' links to it dropping 1 % and 5 % of the
/// WireGuard transport messages they send (handshakes pass). After a steady ping flood, the
/// loss stops and a few more echoes reveal the holes at the end; then, per peer, the agent's
/// `lost_packets` add up to netem's drop count, its `rx_packets` to what netem let through,
/// and its `packet_loss_percent` is netem's drop rate within 0.2 percentage points.
#[test]
fn lost_packets_equal_netems_drops_on_each_link() {
    if !require_privileges() {
        return;
    }
    const PINGS: u32 = 2000;
    const LINKS: [(usize, &str, f64); 2] = [(1, "lossy-1", 1.0), (2, "lossy-5", 5.0)];
    let mesh = KernelMesh::new(3).expect("build the kernel WireGuard mesh");
    for (node, _, _) in LINKS {
        assert_eq!(mesh.ping(0, node, 3, "0.05").expect("handshake"), 3);
    }
    // No latency probes: after the flood nothing but the tests' echoes may cross the links,
    // so that the agent's last collect and netem's counters cover the same packets.
    let config = format!(
        "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  latency:\n    enabled: false\n  wireguard:\n    peer_names:\n      {}: {}\n      {}: {}\n",
        mesh.nodes[1].keys.public, LINKS[0].1, mesh.nodes[2].keys.public, LINKS[1].1
    );
    let agent = start_agent(&mesh.nodes[0].ns, &config);
    agent.wait_for("kernel programs attached");
    // Netem counts from here, losing nothing yet. The sessions began before the programs
    // were attached, so each window starts at the first counter they see: a message netem
    // dropped before that one would be invisible. A few echoes before the loss starts give
    // every window its start.
    let netems: Vec<Netem<'_>> = LINKS
        .iter()
        .map(|&(node, _, _)| {
            Netem::transport_loss(
                &mesh.nodes[node].ns,
                mesh.dev_of(node, 0),
                mesh.nodes[0].listen_port,
                0.0,
            )
            .expect("add netem")
        })
        .collect();
    for (netem, &(node, _, percent)) in netems.iter().zip(&LINKS) {
        assert_eq!(mesh.ping(0, node, 3, "0.05").expect("ping"), 3);
        netem.set_loss(percent).expect("start the loss");
    }

    std::thread::scope(|scope| {
        let floods: Vec<_> = LINKS
            .iter()
            .map(|&(node, _, _)| {
                let mesh = &mesh;
                scope.spawn(move || mesh.ping(0, node, PINGS, "0.01").expect("ping flood"))
            })
            .collect();
        for flood in floods {
            assert!(flood.join().expect("ping thread") > 0);
        }
    });
    for (netem, &(node, _, _)) in netems.iter().zip(&LINKS) {
        netem.set_loss(0.0).expect("stop the loss");
        // Holes are seen only once a later message arrives.
        assert_eq!(mesh.ping(0, node, 10, "0.01").expect("ping"), 10);
    }
    let truth: Vec<_> = netems
        .iter()
        .map(|n| n.stats().expect("netem counters"))
        .collect();
    // A hole is settled as lost by the collect at least reorder_timeout (1 s) after it
    // opened: two whole cycles after the traffic cover the last ones. The cycles logged
    // during the flood are skipped, and the first one after may have begun before its end.
    agent.skip_pending();
    for _ in 0..3 {
        agent.wait_for("collect cycle done");
    }
    let batches = stop_agent(agent);

    for (&(_, peer, percent), netem) in LINKS.iter().zip(&truth) {
        let points = tunnel_of(&batches, peer);
        assert!(!points.is_empty(), "tunnel points for {peer}");
        assert!(
            netem.dropped > 0,
            "{peer}: netem dropped nothing: {netem:?}"
        );

        let (mut lost, mut received, mut weighted) = (0u64, 0u64, 0.0);
        for point in &points {
            let (Some(l), Some(r)) = (point.lost_packets, point.rx_packets) else {
                panic!("{peer}: the kernel programs count this peer: {point:?}");
            };
            assert!(
                point.packet_loss_percent >= 0.0,
                "{peer}: loss measured: {point:?}"
            );
            lost += l;
            received += r;
            weighted += point.packet_loss_percent * (l + r) as f64;
        }
        let agent_percent = weighted / (lost + received) as f64;
        // One line per interval: what each collect reported.
        let intervals: Vec<String> = points
            .iter()
            .map(|p| {
                format!(
                    "rx {:?} lost {:?} late {:?} dup {:?} loss {:.3} %",
                    p.rx_packets,
                    p.lost_packets,
                    p.late_packets,
                    p.duplicate_packets,
                    p.packet_loss_percent
                )
            })
            .collect();
        let intervals = intervals.join("\n");
        let netem_percent = netem.dropped as f64 * 100.0 / (netem.dropped + netem.sent) as f64;
        println!(
            "vm-figure: {peer} (netem loss {percent} %): lost_packets {lost} vs netem drops {}, \
             rx_packets {received} vs netem sent {}, packet_loss_percent {agent_percent:.3} vs \
             netem {netem_percent:.3}",
            netem.dropped, netem.sent
        );
        assert!(
            netem.dropped > 0,
            "{peer}: netem dropped nothing: {netem:?}"
        );
        assert_eq!(
            lost, netem.dropped,
            "{peer}: lost_packets vs netem's drops; per interval:\n{intervals}"
        );
        assert_eq!(
            received, netem.sent,
            "{peer}: rx_packets vs the transport messages netem let through; per interval:\n{intervals}"
        );
        assert!(
            (agent_percent - netem_percent).abs() <= 0.2,
            "{peer}: packet_loss_percent {agent_percent:.3} vs netem's {netem_percent:.3}"
        );
    }
}
