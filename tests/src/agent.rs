//! The agent binary driven from a test: started in a namespace, synchronised on its JSON log
//! lines (never on sleeps), stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use plexd_metrics::api::MetricPoint;

use crate::{agent_binary, unique_name, NetNs};

/// Bound on waiting for the agent's log lines; the first collect comes after 5 s.
pub const LOG_DEADLINE: Duration = Duration::from_secs(30);

/// The JSON log events of `child`'s piped stderr, parsed line by line on a thread of their
/// own, so that a test can wait for one with a deadline. A line that is not JSON fails the
/// test: the agent must log nothing else.
pub fn json_log_events(child: &mut Child) -> mpsc::Receiver<serde_json::Value> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, logs) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let event = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("stderr line is not a JSON log event ({e}): {line}"));
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    logs
}

/// The agent running in a namespace, its stderr forwarded line by line.
pub struct RunningAgent {
    /// The agent process (`ip netns exec` execs it, so this is the agent itself).
    pub child: Child,
    logs: mpsc::Receiver<serde_json::Value>,
    /// The log events read so far, shown when a wait fails.
    seen: std::cell::RefCell<Vec<String>>,
    /// How long [`RunningAgent::wait_for`] waits for one line.
    deadline: Duration,
}

impl RunningAgent {
    /// Starts the agent in `ns` with `config`, logging JSON at debug level to a pipe.
    pub fn start(ns: &NetNs, config: &std::path::Path) -> Self {
        Self::start_with_stdout(ns, config, Stdio::piped())
    }

    /// Like [`RunningAgent::start`], with the agent's stdout (its batches, when it reports
    /// to stdout) going to `stdout`: [`Stdio::null`] for a long run that nobody reads, which
    /// would otherwise block on a full pipe.
    pub fn start_with_stdout(ns: &NetNs, config: &std::path::Path, stdout: Stdio) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(agent_binary())
            .args(["--log-level", "debug", "--log-format", "json", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let logs = json_log_events(&mut child);
        Self {
            child,
            logs,
            seen: Default::default(),
            deadline: LOG_DEADLINE,
        }
    }

    /// Waits up to `deadline` for each log line instead of [`LOG_DEADLINE`] (an emulated
    /// machine verifies the kernel programs much more slowly).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Consumes the log events already read (failing on an error event among them), so that
    /// the next [`RunningAgent::wait_for`] sees only what the agent logs from about now on.
    /// A line on its way through the pipe may still count as new: wait for one event more
    /// than needed when it matters.
    pub fn skip_pending(&self) {
        while let Ok(event) = self.logs.try_recv() {
            self.seen.borrow_mut().push(event.to_string());
            assert_ne!(
                event["level"],
                "ERROR",
                "agent logged an error: {event}; its log so far:\n{}",
                self.seen.borrow().join("\n")
            );
        }
    }

    /// Waits for a log event whose message is `message`; fails on an error event.
    pub fn wait_for(&self, message: &str) -> serde_json::Value {
        loop {
            let event = self.logs.recv_timeout(self.deadline).unwrap_or_else(|e| {
                panic!(
                    "no {message:?} log line from the agent: {e}; its log so far:\n{}",
                    self.seen.borrow().join("\n")
                )
            });
            self.seen.borrow_mut().push(event.to_string());
            assert_ne!(
                event["level"],
                "ERROR",
                "agent logged an error: {event}; its log so far:\n{}",
                self.seen.borrow().join("\n")
            );
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

impl RunningAgent {
    /// Sends SIGTERM, waits for the exit and returns the exit code and everything the agent
    /// wrote to stdout (its batches, one JSON array per line; empty when stdout was not a
    /// pipe).
    pub fn stop(mut self) -> (Option<i32>, String) {
        use std::io::Read as _;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        let status = crate::wait_within(&mut self.child, crate::EXIT_DEADLINE);
        let mut stdout = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut stdout).expect("read stdout");
        }
        (status.code(), stdout)
    }

    /// Sends SIGTERM, waits for the exit and returns the exit code and the agent's whole
    /// log, one JSON event per entry, up to the end of its stderr.
    pub fn stop_with_log(mut self) -> (Option<i32>, Vec<String>) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        let status = crate::wait_within(&mut self.child, crate::EXIT_DEADLINE);
        let deadline = std::time::Instant::now() + LOG_DEADLINE;
        let mut log = std::mem::take(&mut *self.seen.borrow_mut());
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(event) => log.push(event.to_string()),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the agent's stderr stayed open {LOG_DEADLINE:?} after it exited")
                }
            }
        }
        (status.code(), log)
    }
}

/// What `plexd-metrics --once` left behind: its one batch and its log.
pub struct OnceRun {
    /// The batch it printed to stdout.
    pub batch: Vec<MetricPoint>,
    /// Its log, one JSON event per line.
    pub stderr: String,
}

/// Runs `plexd-metrics --once` in `ns` with the YAML `config` and fails the test unless it
/// exits 0 with one JSON batch on stdout.
pub fn run_once(ns: &NetNs, config: &str) -> OnceRun {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]).arg(agent_binary());
    once(cmd, config)
}

/// [`run_once`] in the test's own namespaces, without privileges.
pub fn run_once_here(config: &str) -> OnceRun {
    once(Command::new(agent_binary()), config)
}

/// Runs `agent` (the binary, or a command that runs it) with `--once` and `config`.
fn once(mut agent: Command, config: &str) -> OnceRun {
    let path = std::env::temp_dir().join(format!("{}.yaml", unique_name("plexd-once-")));
    std::fs::write(&path, config).expect("write the config");
    let out = crate::output_within(
        agent
            .args(["--once", "--log-format", "json", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG"),
        crate::EXIT_DEADLINE,
    );
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "agent --once failed ({}): {stderr}",
        out.status
    );
    let batch = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON batch ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    OnceRun { batch, stderr }
}
