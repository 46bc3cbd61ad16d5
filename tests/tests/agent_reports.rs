//! The agent binary reporting to a real control plane over TLS, through a failure and an
//! outage: every point it collected arrives exactly once and in order. No privileges needed
//! (eBPF is off); it takes about a minute of real time because the agent's intervals cannot
//! go below 5 s / 10 s.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::agent::json_log_events;
use plexd_metrics_tests::agent_binary;
use plexd_metrics_tests::control_plane::{Behaviour, Recorded, TempDir, TestControlPlane};

/// Longest wait for one log line or one request; retries are at most 10 s apart.
const DEADLINE: Duration = Duration::from_secs(40);

struct Agent {
    child: Child,
    logs: mpsc::Receiver<serde_json::Value>,
    /// Points per collect cycle, as logged.
    collected: Vec<u64>,
}

impl Agent {
    fn start(config: &std::path::Path, env: &[(&str, String)]) -> Self {
        let mut child = Command::new(agent_binary())
            .args([
                "--log-level",
                "plexd_metrics=debug,info",
                "--log-format",
                "json",
            ])
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let logs = json_log_events(&mut child);
        Self {
            child,
            logs,
            collected: Vec::new(),
        }
    }

    fn note(&mut self, event: &serde_json::Value) {
        assert_ne!(
            event["level"], "ERROR",
            "the agent logged an error: {event}"
        );
        if event["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("plexd_metrics"))
        {
            assert_eq!(event["component"], "metrics", "{event}");
        }
        if event["message"] == "collect cycle done" {
            self.collected.push(event["points"].as_u64().unwrap());
        }
    }

    /// Waits for the `n`th further event whose message is `message`.
    fn wait_for(&mut self, message: &str, n: usize) -> serde_json::Value {
        let mut seen = 0;
        loop {
            let event = self
                .logs
                .recv_timeout(DEADLINE)
                .unwrap_or_else(|e| panic!("no {message:?} log line from the agent: {e}"));
            self.note(&event);
            if event["message"] == message {
                seen += 1;
                if seen == n {
                    return event;
                }
            }
        }
    }

    /// Sends SIGTERM, waits for a clean exit and reads the rest of the log.
    fn stop(&mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let status =
            plexd_metrics_tests::wait_within(&mut self.child, plexd_metrics_tests::EXIT_DEADLINE);
        assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
        while let Ok(event) = self.logs.recv_timeout(DEADLINE) {
            self.note(&event);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Accepted batches, in arrival order.
#[derive(Default)]
struct Received {
    batches: Vec<Vec<MetricPoint>>,
    keys: HashSet<String>,
    failed: usize,
}

impl Received {
    fn add(&mut self, r: Recorded) {
        assert_eq!(r.path, "/v1/nodes/node-e2e/metrics");
        assert!(!r.duplicate, "a batch was delivered twice");
        if r.accepted() {
            let points = r.points();
            assert!(points.len() <= 100, "batch_size");
            assert!(self.keys.insert(r.key().unwrap().to_owned()));
            self.batches.push(points);
        } else {
            self.failed += 1;
        }
    }
}

#[test]
fn every_collected_point_arrives_once_in_order_across_an_outage() {
    let server = TestControlPlane::https();
    server.require_token("e2e-token");
    let dir = TempDir::new("e2e");
    let token = dir.write("token", "e2e-token\n");
    let ca = dir.write("ca.pem", server.ca_pem());
    let config = dir.write(
        "config.yaml",
        format!(
            "node_id: node-e2e\ncontrol_plane:\n  token_file: {}\n  ca_file: {}\nmetrics:\n  collect_interval: 5s\n  report_interval: 10s\n  ebpf: {{ enabled: false }}\n  health: {{ listen: '127.0.0.1:0' }}\n",
            token.display(),
            ca.display()
        ),
    );
    // The URL comes from the environment, as a DaemonSet would set it.
    let mut agent = Agent::start(
        &config,
        &[("PLEXD_METRICS_CONTROL_PLANE_URL", server.url())],
    );
    agent.wait_for("reporting to the control plane", 1);

    let mut received = Received::default();
    received.add(server.next_blocking(DEADLINE));
    assert_eq!(received.batches.len(), 1, "the first report is accepted");

    // The control plane fails: two refused attempts, then it is gone altogether.
    server.set_default(Behaviour::Status(503, "maintenance".into()));
    while received.failed < 2 {
        received.add(server.next_blocking(DEADLINE));
    }
    server.go_away();
    // Two of these are the refused attempts above; the rest hit a closed port.
    agent.wait_for("metrics report failed", 4);
    let outage_cycle = agent.collected.len();
    server.come_back();
    server.set_default(Behaviour::Accept);
    let recovered = agent.wait_for("metrics delivery recovered", 1);
    assert!(
        recovered["reconnect_count"].as_u64().unwrap() >= 1,
        "{recovered}"
    );
    assert!(
        agent.collected.len() >= outage_cycle,
        "cycles went on during the outage"
    );
    // One more cycle after the recovery, then a clean stop: the shutdown flush delivers
    // what is left.
    agent.wait_for("collect cycle done", 1);
    agent.stop();
    while let Some(r) = server.try_next() {
        received.add(r);
    }

    let points: Vec<MetricPoint> = received.batches.concat();
    let collected: u64 = agent.collected.iter().sum();
    assert_eq!(
        points.len() as u64,
        collected,
        "every collected point arrived ({} cycles)",
        agent.collected.len()
    );
    let mut seen = HashSet::new();
    for p in &points {
        assert!(seen.insert((p.group.clone(), p.timestamp)), "twice: {p:?}");
    }
    for group in ["system", "agent"] {
        let stamps: Vec<_> = points
            .iter()
            .filter(|p| p.group == group)
            .map(|p| p.timestamp)
            .collect();
        assert!(
            stamps.windows(2).all(|w| w[0] < w[1]),
            "{group} points in collection order"
        );
    }
    let agent_points: Vec<&MetricPoint> = points.iter().filter(|p| p.group == "agent").collect();
    assert!(
        agent_points
            .iter()
            .any(|p| p.data.to_value()["queued_points"].as_u64().unwrap() > 0),
        "the outage shows in queued_points"
    );
    assert!(agent_points
        .iter()
        .map(|p| p.data.to_value())
        .all(|d| d["dropped_points"] == 0 && d["rejected_points"] == 0));
    assert!(
        agent_points.last().unwrap().data.to_value()["reconnect_count"]
            .as_u64()
            .unwrap()
            >= 1,
        "the recovery is counted"
    );
}

#[test]
fn check_config_reports_env_errors_and_prints_no_secret() {
    let dir = TempDir::new("check");
    let token = dir.write("token", "very-secret-token");
    let nsk = dir.write("nsk", "not a key but still secret");
    let config = dir.write(
        "config.yaml",
        format!(
            "node_id: n1\ncontrol_plane:\n  url: https://cp.example\n  token_file: {}\n  node_secret_key_file: {}\nmetrics:\n  local_endpoint: {{ url: 'https://metrics.local/ingest', secret_key: 'name-of-secret' }}\n",
            token.display(),
            nsk.display()
        ),
    );
    let out = Command::new(agent_binary())
        .args(["--check-config", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env("PLEXD_METRICS_CONTROL_PLANE_TOKNE_FILE", "/typo")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        ["error: environment: PLEXD_METRICS_CONTROL_PLANE_TOKNE_FILE names no config key; the variables are PLEXD_METRICS_<KEY PATH> such as PLEXD_METRICS_CONTROL_PLANE_URL (see docs/configuration.md)"]
    );

    let out = Command::new(agent_binary())
        .args(["--check-config", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("node_secret_key_file"), "{all}");
    assert!(
        all.contains(&nsk.display().to_string()),
        "names the file: {all}"
    );
    for secret in ["very-secret-token", "not a key but still secret"] {
        assert!(!all.contains(secret), "{all}");
    }
}
