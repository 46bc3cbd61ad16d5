//! The agent binary with its kernel programs, as an operator runs it: attached inside a
//! network namespace, counting exactly the traffic that crosses its interface, flushing its
//! buffer on SIGTERM and leaving nothing attached behind it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::{
    agent_binary, ours, quiet_namespaces, require_privileges, tc_state, NetNs, UdpFlow, VethPair,
};

const PACKETS: u64 = 25;
const PAYLOAD: usize = 64;
/// What TC sees of each datagram: Ethernet (14) + IPv4 (20) + UDP (8) + payload.
const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;
const PORT: u16 = 40_001;
/// Bound on waiting for the agent's log lines; the first collect comes after 5 s.
const LOG_DEADLINE: Duration = Duration::from_secs(30);

/// The agent running in a namespace, its stderr forwarded line by line.
struct RunningAgent {
    child: Child,
    logs: mpsc::Receiver<serde_json::Value>,
}

impl RunningAgent {
    fn start(ns: &NetNs, config: &std::path::Path) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(agent_binary())
            .args(["--log-level", "debug", "--log-format", "json", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("stderr line is not a JSON log event ({e}): {line}")
                });
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Self { child, logs }
    }

    /// Waits for a log event whose message is `message`; fails on an error event.
    fn wait_for(&self, message: &str) -> serde_json::Value {
        loop {
            let event = self
                .logs
                .recv_timeout(LOG_DEADLINE)
                .unwrap_or_else(|e| panic!("no {message:?} log line from the agent: {e}"));
            assert_ne!(event["level"], "ERROR", "agent logged an error: {event}");
            if event["message"] == message {
                return event;
            }
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        // Only matters when an assertion failed before the agent was stopped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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

    let mut agent = RunningAgent::start(&sender_ns, &config);
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("send SIGTERM");
    let status = agent.child.wait().expect("wait for the agent");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");

    let mut stdout = String::new();
    std::io::Read::read_to_string(
        &mut agent.child.stdout.take().expect("piped stdout"),
        &mut stdout,
    )
    .expect("read stdout");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one flushed batch: {stdout}");
    let batch: Vec<MetricPoint> = serde_json::from_str(lines[0]).expect("a JSON batch");
    let mut groups: Vec<&str> = batch.iter().map(|p| p.group.as_str()).collect();
    groups.sort();
    assert_eq!(groups, ["agent", "system"]);

    let agent_point = &batch.iter().find(|p| p.group == "agent").unwrap().data;
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
