//! The agent binary running in a network namespace as an operator runs it: stdout sink,
//! JSON logs on stderr, stopped with SIGTERM. Its batches and log events are read on threads
//! of their own and handed over through channels, so a test waits on what the agent says,
//! never on a clock.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use plexd_metrics::api::MetricPoint;

use crate::{agent_binary, unique_name, NetNs};

/// A running agent; killed on drop if the test did not stop it.
pub struct AgentProcess {
    child: Child,
    logs: mpsc::Receiver<serde_json::Value>,
    batches: mpsc::Receiver<Vec<MetricPoint>>,
    config: PathBuf,
    /// Every log event seen so far, for failure messages.
    seen: Vec<serde_json::Value>,
}

impl AgentProcess {
    /// Starts the agent in `ns` with `config` (YAML) at debug level.
    pub fn start(ns: &NetNs, config: &str) -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("{}.yaml", unique_name("agent")));
        std::fs::write(&path, config)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(agent_binary())
            .args(["--log-level", "debug", "--log-format", "json", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().expect("piped stderr");
        let stdout = child.stdout.take().expect("piped stdout");
        let (log_tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line, "level": "RAW" }));
                if log_tx.send(event).is_err() {
                    break;
                }
            }
        });
        let (batch_tx, batches) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let batch: Vec<MetricPoint> = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout line is not a batch ({e}): {line}"));
                if batch_tx.send(batch).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            logs,
            batches,
            config: path,
            seen: Vec::new(),
        })
    }

    /// Waits up to `deadline` for a log event whose message is `message` and returns it.
    /// Fails on an error event before it (the scenarios expect none), and when the agent
    /// exits or the deadline passes first.
    pub fn wait_for(&mut self, message: &str, deadline: Duration) -> serde_json::Value {
        let until = std::time::Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let event = match self.logs.recv_timeout(left) {
                Ok(event) => event,
                Err(e) => panic!(
                    "no {message:?} from the agent within {deadline:?} ({e}); its log:\n{}",
                    self.log_text()
                ),
            };
            self.seen.push(event.clone());
            assert_ne!(
                event["level"],
                "ERROR",
                "the agent logged an error; its log:\n{}",
                self.log_text()
            );
            if event["message"] == message {
                return event;
            }
        }
    }

    /// Every log event seen so far, one per line.
    pub fn log_text(&self) -> String {
        self.seen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the agent with SIGTERM (it flushes its buffer first) and returns every batch it
    /// printed, in order. Fails if it does not exit with 0.
    pub fn stop(mut self) -> Vec<Vec<MetricPoint>> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM to the agent");
        let status = self.child.wait().expect("wait for the agent");
        // The reader threads end with the pipes; collect what they handed over.
        let rest: Vec<serde_json::Value> = self.logs.iter().collect();
        self.seen.extend(rest);
        assert_eq!(
            status.code(),
            Some(0),
            "agent exit status after SIGTERM; its log:\n{}",
            self.log_text()
        );
        self.batches.iter().collect()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // Only matters when an assertion failed before the agent was stopped.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}
