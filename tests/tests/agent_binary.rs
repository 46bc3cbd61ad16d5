//! The agent binary with its kernel programs, as an operator runs it: attached inside a
//! network namespace, counting exactly the traffic that crosses its interface, flushing its
//! buffer on SIGTERM and leaving nothing attached behind it.

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::agent::RunningAgent;
use plexd_metrics_tests::{
    ours, quiet_namespaces, require_privileges, tc_state, UdpFlow, VethPair,
};

const PACKETS: u64 = 25;
const PAYLOAD: usize = 64;
/// What TC sees of each datagram: Ethernet (14) + IPv4 (20) + UDP (8) + payload.
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;
const PORT: u16 = 40_001;
#[test]
fn agent_counts_attaches_flushes_on_sigterm_and_detaches() {
    if !require_privileges() {
        return;
    }
    let (sender_ns, receiver_ns) = quiet_namespaces();
    let veth = VethPair::new(&sender_ns, &receiver_ns).expect("create veth pair");
    let dev = veth.a.name.clone();

    let dir = std::env::temp_dir().join(format!("plexd-metrics-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "metrics:\n  collect_interval: 5s\n  report_interval: 10s\n  ebpf:\n    interfaces: [{dev}]\n"
        ),
    )
    .expect("write config");

    let flow = UdpFlow::new(&sender_ns, &receiver_ns, &veth, PORT);

    let agent = RunningAgent::start(&sender_ns, &config);
    let attached = agent.wait_for("kernel programs attached");
    assert!(
        attached["interfaces"]
            .as_str()
            .unwrap_or_default()
            .contains(&dev),
        "{attached}"
    );
    assert_eq!(
        ours(&tc_state(&sender_ns, &dev)),
        2,
        "both programs on {dev}"
    );

    flow.send_and_receive(PACKETS, PAYLOAD);

    // The first collect comes 5 s after the start, the first report 10 s after it: stopping
    // between the two leaves exactly one cycle in the buffer for the shutdown flush.
    let cycle = agent.wait_for("collect cycle done");
    assert_eq!(cycle["buffered"], 2, "{cycle}");
    let (code, stdout) = agent.stop();
    assert_eq!(code, Some(0), "exit status after SIGTERM");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one flushed batch: {stdout}");
    let batch: Vec<MetricPoint> = serde_json::from_str(lines[0]).expect("a JSON batch");
    let mut groups: Vec<&str> = batch.iter().map(|p| p.group.as_str()).collect();
    groups.sort();
    assert_eq!(groups, ["agent", "system"]);

    let agent_point = batch
        .iter()
        .find(|p| p.group == "agent")
        .unwrap()
        .data
        .to_value();
    assert_eq!(agent_point["ebpf_programs_attached"], 2);
    assert_eq!(agent_point["ebpf_egress_packets"], PACKETS, "{agent_point}");
    assert_eq!(
        agent_point["ebpf_egress_bytes"],
        PACKETS * FRAME,
        "{agent_point}"
    );
    assert_eq!(
        agent_point["ebpf_ingress_packets"], 0,
        "nothing came back: {agent_point}"
    );

    let after = tc_state(&sender_ns, &dev);
    assert_eq!(
        ours(&after),
        0,
        "programs left attached after exit: {after:?}"
    );
    assert!(!after.clsact, "no qdisc left behind: {after:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
