//! The durable queue (`metrics.queue.dir`) as an operator meets it: the agent binary against
//! the test control plane, killed and restarted while the control plane is away, with damaged
//! files in its directory, on a full or read-only file system, and beside a second agent.
//!
//! The truth each test compares with is its own: the moments it started and killed each run
//! (on its clock, at moments drawn from a printed seed), the batches it wrote itself through
//! the queue's format, the bytes it left on the file system.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use plexd_metrics::api::MetricPoint;
use plexd_metrics::queue::{record, DeliveryQueue, QueueLimits};
use plexd_metrics_tests::agent::json_log_events;
use plexd_metrics_tests::control_plane::{Recorded, TempDir, TestControlPlane};
use plexd_metrics_tests::prometheus_server::{free_port, Prometheus};
use plexd_metrics_tests::{agent_binary, health_probe, require_privileges};

/// Longest wait for one log line or one request.
const DEADLINE: Duration = Duration::from_secs(40);
/// The agent's collect interval in these tests (the smallest the config allows).
const COLLECT: Duration = Duration::from_secs(5);

/// The agent binary with a JSON log on a pipe, whose events are kept for the assertions.
struct Agent {
    child: Child,
    logs: mpsc::Receiver<serde_json::Value>,
    events: Vec<serde_json::Value>,
    started: SystemTime,
}

impl Agent {
    fn start(config: &Path) -> Self {
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
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let started = SystemTime::now();
        let logs = json_log_events(&mut child);
        Self {
            child,
            logs,
            events: Vec::new(),
            started,
        }
    }

    /// Waits for the next event whose message is `message` and for which `when` holds.
    fn wait_until(
        &mut self,
        message: &str,
        when: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let event = self.logs.recv_timeout(left).unwrap_or_else(|e| {
                panic!(
                    "no {message:?} log line from the agent within {DEADLINE:?}: {e}; its log:\n{}",
                    self.log_text()
                )
            });
            self.events.push(event.clone());
            if event["message"] == message && when(&event) {
                return event;
            }
        }
    }

    fn wait_for(&mut self, message: &str) -> serde_json::Value {
        self.wait_until(message, |_| true)
    }

    /// The event whose message is `message`, if it was read already, else the next one.
    fn seen_or_next(&mut self, message: &str) -> serde_json::Value {
        match self.events.iter().find(|e| e["message"] == message) {
            Some(event) => event.clone(),
            None => self.wait_for(message),
        }
    }

    fn log_text(&self) -> String {
        self.events
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The events at `level` so far.
    fn at_level(&self, level: &str) -> Vec<&serde_json::Value> {
        self.events.iter().filter(|e| e["level"] == level).collect()
    }

    /// SIGKILL: no flush, no cleanup. Returns when the process is gone.
    fn kill(mut self) -> SystemTime {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait for the agent");
        SystemTime::now()
    }

    /// SIGTERM; waits for the exit and the rest of the log. Returns the exit code and how
    /// long the stop took.
    fn terminate(&mut self) -> (Option<i32>, Duration) {
        let asked = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let status =
            plexd_metrics_tests::wait_within(&mut self.child, plexd_metrics_tests::EXIT_DEADLINE);
        let took = asked.elapsed();
        while let Ok(event) = self.logs.recv_timeout(DEADLINE) {
            self.events.push(event);
        }
        (status.code(), took)
    }

    /// The health endpoint's address, from its log line.
    fn health(&mut self) -> SocketAddr {
        let event = self.wait_for("health endpoint listening (/healthz, /readyz)");
        event["addr"]
            .as_str()
            .expect("addr")
            .parse()
            .expect("an address")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on the health endpoint: the status and the JSON body.
fn probe(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    health_probe(addr, path, DEADLINE)
}

/// A config for the agent with only the system and agent groups (no privileges needed),
/// reporting to `server` with the durable queue in `queue`.
fn config(dir: &TempDir, server: &TestControlPlane, queue: &Path, extra: &str) -> PathBuf {
    let token = dir.write("token", "durable-token\n");
    dir.write(
        "config.yaml",
        format!(
            "node_id: node-durable\ncontrol_plane:\n  url: {}\n  token_file: {}\nmetrics:\n  \
             collect_interval: 5s\n  report_interval: 10s\n  batch_size: 3\n  queue:\n    dir: {}\n  \
             ebpf: {{ enabled: false }}\n  latency: {{ enabled: false }}\n  \
             wireguard: {{ enabled: false }}\n{extra}",
            server.url(),
            token.display(),
            queue.display(),
        ),
    )
}

const HEALTH: &str = "  health: { listen: '127.0.0.1:0' }\n";
const NO_HEALTH: &str = "  health: { enabled: false }\n";

/// Every request that reached `server`, accepted or not.
fn requests(server: &TestControlPlane) -> Vec<Recorded> {
    std::iter::from_fn(|| server.try_next()).collect()
}

/// The accepted batches in the order they first arrived, each once by its key; a key that
/// comes again must carry the same points.
fn unique_batches(requests: &[Recorded]) -> Vec<(String, Vec<MetricPoint>)> {
    let mut by_key: HashMap<String, Vec<MetricPoint>> = HashMap::new();
    let mut out = Vec::new();
    for r in requests.iter().filter(|r| r.accepted()) {
        let key = r.key().expect("an Idempotency-Key").to_owned();
        let points = r.points();
        match by_key.get(&key) {
            Some(before) => assert_eq!(before, &points, "key {key} came again with other points"),
            None => {
                by_key.insert(key.clone(), points.clone());
                out.push((key, points));
            }
        }
    }
    out
}

fn seed() -> u64 {
    let seed = std::env::var("PLEXD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_nanos() as u64
        });
    // Straight to stderr: libtest shows it with a failure, and a rerun takes it.
    eprintln!("durable_queue: seed {seed} (PLEXD_TEST_SEED={seed} replays these moments)");
    seed
}

#[test]
fn kills_and_restarts_during_an_outage_lose_and_repeat_nothing() {
    let mut rng = fastrand::Rng::with_seed(seed());
    let server = TestControlPlane::http();
    server.go_away();
    let dir = TempDir::new("durable-kill");
    let queue = dir.path().join("queue");
    std::fs::create_dir(&queue).unwrap();
    let config = config(&dir, &server, &queue, NO_HEALTH);
    // Each run: when it started and when it stopped.
    let mut runs: Vec<(SystemTime, SystemTime)> = Vec::new();

    // Killed four times while the control plane is away, each after a life it did not choose.
    for _ in 0..4 {
        let mut agent = Agent::start(&config);
        agent.wait_for("durable queue opened; what it holds is sent first");
        let started = agent.started;
        std::thread::sleep(Duration::from_millis(rng.u64(6_000..=24_000)));
        runs.push((started, agent.kill()));
    }
    // Then a SIGTERM during the outage: a short try, the rest left on disk.
    let mut agent = Agent::start(&config);
    agent.wait_for("collect cycle done");
    std::thread::sleep(Duration::from_millis(rng.u64(0..=6_000)));
    let (code, took) = agent.terminate();
    assert_eq!(code, Some(0), "{}", agent.log_text());
    assert!(took < Duration::from_secs(8), "the stop took {took:?}");
    let stayed = agent
        .events
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("shutting down with points not yet delivered")
        })
        .unwrap_or_else(|| panic!("no word of what stayed on disk: {}", agent.log_text()));
    assert!(stayed["points"].as_u64().unwrap() > 0, "{stayed}");
    runs.push((agent.started, SystemTime::now()));
    assert!(requests(&server).is_empty(), "the control plane was away");

    // It comes back; one more kill while the backlog drains, then a run that drains it all.
    server.come_back();
    let mut agent = Agent::start(&config);
    agent.wait_for("batch accepted");
    std::thread::sleep(Duration::from_millis(rng.u64(0..=1_500)));
    runs.push((agent.started, agent.kill()));
    let mut agent = Agent::start(&config);
    agent.wait_until("batch accepted", |e| e["queued_points"] == 0);
    let (code, _) = agent.terminate();
    assert_eq!(code, Some(0));
    runs.push((agent.started, SystemTime::now()));
    assert!(agent.at_level("ERROR").is_empty(), "{}", agent.log_text());

    let batches = unique_batches(&requests(&server));
    let system: Vec<DateTime<Utc>> = batches
        .iter()
        .flat_map(|(_, points)| points.iter())
        .filter(|p| p.group == "system")
        .map(|p| p.timestamp)
        .collect();
    assert!(
        system.windows(2).all(|w| w[0] < w[1]),
        "every point once, in order: {system:?}"
    );
    // Each run's cycles, on the test's clock: the first within a collect interval (and the
    // agent's start-up) of its start, then one every interval without a gap, up to the last
    // cycle that was complete when the run stopped: a kill loses at most the cycle it cut.
    let slack = Duration::from_millis(1_500);
    for (i, (start, end)) in runs.iter().enumerate() {
        let (start, end): (DateTime<Utc>, DateTime<Utc>) = ((*start).into(), (*end).into());
        let mine: Vec<_> = system
            .iter()
            .filter(|t| **t >= start && **t <= end)
            .collect();
        let life = (end - start).to_std().unwrap();
        let ticks = (life.as_millis() / COLLECT.as_millis()) as usize;
        if ticks < 2 {
            continue;
        }
        assert!(
            mine.len() + 2 >= ticks && mine.len() <= ticks,
            "run {i} lived {life:?}: {} cycles delivered, {ticks} ticks",
            mine.len()
        );
        let first = (*mine[0] - start).to_std().unwrap();
        assert!(
            first <= COLLECT + slack,
            "run {i}: first cycle after {first:?}"
        );
        for w in mine.windows(2) {
            let gap = (*w[1] - *w[0]).to_std().unwrap();
            assert!(
                gap <= COLLECT + slack,
                "run {i}: a cycle is missing ({gap:?} between two)"
            );
        }
        // The cycle after the last one delivered would have made its point a collect
        // interval later: had that been before the stop, it was complete and on disk.
        let last = (end - *mine[mine.len() - 1]).to_std().unwrap();
        assert!(
            last <= COLLECT + Duration::from_secs(1),
            "run {i}: the last cycle delivered was {last:?} before the stop"
        );
    }
    let damaged: Vec<_> = std::fs::read_dir(&queue)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".corrupt"))
        .collect();
    assert!(damaged.is_empty(), "nothing was damaged: {damaged:?}");
}

fn numbered(range: std::ops::RangeInclusive<u64>) -> Vec<MetricPoint> {
    range
        .map(|n| MetricPoint::new(Utc::now(), "system", "", &serde_json::json!({"n": n})).unwrap())
        .collect()
}

fn ns(points: &[MetricPoint]) -> Vec<u64> {
    points
        .iter()
        .filter_map(|p| p.data.to_value()["n"].as_u64())
        .collect()
}

fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

#[test]
fn damaged_records_and_foreign_files_are_skipped_counted_and_the_rest_delivered() {
    let server = TestControlPlane::http();
    let dir = TempDir::new("durable-damage");
    let queue = dir.path().join("queue");
    std::fs::create_dir(&queue).unwrap();
    // Six batches of one point, then two points collected after them, written through the
    // queue's own format as two earlier runs would have left them.
    let limits = |batch_size| QueueLimits {
        batch_size,
        max_points: 100,
        max_bytes: 1 << 30,
        max_memory_bytes: 1 << 30,
    };
    let mut earlier = DeliveryQueue::open(&queue, limits(1)).expect("open");
    earlier.collected(numbered(1..=6), false);
    drop(earlier);
    let mut earlier = DeliveryQueue::open(&queue, limits(10)).expect("open");
    earlier.collected(numbered(7..=8), false);
    drop(earlier);
    let segments = files(&queue, ".log");
    assert_eq!(segments.len(), 2);
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    let (found, damage) = record::scan(&bytes);
    assert!(damage.is_none());
    let keys: Vec<String> = found.iter().map(|(_, h)| h.key.to_string()).collect();
    assert_eq!(keys.len(), 6);
    // A flipped bit in the second batch, zeros over the fourth's points; the last append of
    // the second segment cut short by a crash; a segment of zeros; someone else's file.
    bytes[found[1].0 + record::HEADER + 3] ^= 0x04;
    let (at, h) = found[3];
    bytes[at + record::HEADER..at + h.record_len() as usize].fill(0);
    std::fs::write(&segments[0], bytes).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segments[1])
        .unwrap()
        .write_all(b"PXMR\x01\x00\x01")
        .unwrap();
    std::fs::write(queue.join(format!("{:020}.log", 5000)), [0; 512]).unwrap();
    std::fs::write(queue.join("README.txt"), "the operator's notes").unwrap();

    let config = config(&dir, &server, &queue, HEALTH);
    let mut agent = Agent::start(&config);
    let health = agent.health();
    // The intact batches first, in order, under the keys they were sealed with.
    for (i, n) in [(0, 1), (2, 3), (4, 5), (5, 6)] {
        let r = server.next_blocking(DEADLINE);
        assert!(r.accepted());
        assert_eq!(r.key(), Some(keys[i].as_str()));
        assert_eq!(ns(&r.points()), [n]);
    }
    // Then the two collected points, sealed at the first report tick with the new ones.
    let r = server.next_blocking(DEADLINE);
    assert_eq!(ns(&r.points())[..2], [7, 8]);
    let agent_point = r
        .points()
        .into_iter()
        .chain(server.next_blocking(DEADLINE).points())
        .find(|p| p.group == "agent")
        .expect("an agent point");
    let figures = agent_point.data.to_value();
    assert_eq!(
        figures["corrupt_batches"], 5,
        "two damaged batches, the cut append, the segment of zeros, the foreign file: {figures}"
    );
    assert_eq!(files(&queue, ".corrupt").len(), 1, "the segment of zeros");
    assert!(queue.join("README.txt").exists(), "not the agent's to move");
    let (status, body) = probe(health, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["queue"]["kind"], "disk");
    assert_eq!(body["checks"]["queue"]["corrupt_batches"], 5);
    let (code, _) = agent.terminate();
    assert_eq!(code, Some(0));
    assert!(agent.at_level("ERROR").is_empty(), "{}", agent.log_text());
    let warnings: Vec<_> = agent
        .at_level("WARN")
        .into_iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("durable queue")
        })
        .collect();
    assert_eq!(
        warnings.len(),
        3,
        "one at start, one per damaged batch: {warnings:#?}"
    );
}

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct SmallFs {
    path: PathBuf,
    _dir: TempDir,
}

impl SmallFs {
    fn mount(name: &str, options: &str) -> Self {
        let dir = TempDir::new(name);
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Self { path, _dir: dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Fills the file system under `dir` with one file until it is full, and returns that file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 4096];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("fill {}: {e}", path.display()),
        }
    }
    path
}

#[test]
fn a_full_disk_keeps_the_agent_delivering_from_memory_until_it_has_room_again() {
    if !require_privileges() {
        return;
    }
    let fs = SmallFs::mount("durable-full", "size=256k,mode=0700");
    let filler = fill(&fs.path);
    let server = TestControlPlane::http();
    let dir = TempDir::new("durable-full-cfg");
    let config = config(&dir, &server, &fs.path, HEALTH);
    let mut agent = Agent::start(&config);
    let health = agent.health();
    // The first collect cycle finds the disk full.
    let error = agent.wait_for(
        "durable queue unavailable; points are kept in memory (bounded by metrics.queue.max_points) until the directory works again",
    );
    let text = error["error"].as_str().unwrap();
    assert!(
        text.contains(&fs.path.display().to_string())
            && text.contains("No space left on device")
            && text.contains("free space"),
        "names the directory, the cause and the fix: {text}"
    );
    let (status, body) = probe(health, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("the durable queue is unavailable"),
        "{body}"
    );
    // Delivery goes on from memory.
    let r = server.next_blocking(DEADLINE);
    assert!(r.accepted() && r.points().iter().any(|p| p.group == "system"));

    // Room again: within the retry interval and a report, batches go to the directory.
    std::fs::remove_file(&filler).unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let back = loop {
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the queue never used the directory again: {}",
            agent.log_text()
        );
        let (status, body) = probe(health, "/readyz");
        if status == 200 {
            break body;
        }
        // Each report tick is a chance for the retry; wait for the next one.
        agent.wait_for("collect cycle done");
    };
    assert_eq!(back["checks"]["queue"]["kind"], "disk", "{back}");
    agent.seen_or_next("durable queue usable again; new batches go to the directory");
    // Durable again: with the control plane away, what is collected waits on disk.
    server.go_away();
    agent.wait_for("metrics report failed");
    agent.wait_for("collect cycle done");
    let logged: u64 = files(&fs.path, ".log")
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let (_, body) = probe(health, "/readyz");
    assert!(
        logged > 0 && body["checks"]["queue"]["spooled_points"].as_u64() > Some(0),
        "points are on disk again: {logged} bytes of log, {body}"
    );
    let (code, _) = agent.terminate();
    assert_eq!(code, Some(0));
    assert_eq!(
        agent.at_level("ERROR").len(),
        1,
        "one error for the whole episode: {}",
        agent.log_text()
    );
}

#[test]
fn a_read_only_directory_is_one_error_and_delivery_from_memory() {
    if !require_privileges() {
        return;
    }
    let fs = SmallFs::mount("durable-ro", "size=64k,ro");
    let server = TestControlPlane::http();
    let dir = TempDir::new("durable-ro-cfg");
    let config = config(&dir, &server, &fs.path, HEALTH);
    let mut agent = Agent::start(&config);
    let error = agent.wait_for(
        "durable queue unavailable; points are kept in memory (bounded by metrics.queue.max_points) until the directory works again",
    );
    let text = error["error"].as_str().unwrap();
    assert!(
        text.contains(&fs.path.display().to_string())
            && text.contains("Read-only file system")
            && text.contains("writable"),
        "{text}"
    );
    let health = agent.health();
    let (status, body) = probe(health, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["queue"]["ok"], false, "{body}");
    let r = server.next_blocking(DEADLINE);
    assert!(r.accepted());
    let (code, _) = agent.terminate();
    assert_eq!(code, Some(0));
    assert_eq!(agent.at_level("ERROR").len(), 1, "{}", agent.log_text());
}

#[test]
fn a_second_agent_on_the_same_directory_refuses_to_start() {
    let server = TestControlPlane::http();
    let dir = TempDir::new("durable-two");
    let queue = dir.path().join("queue");
    std::fs::create_dir(&queue).unwrap();
    let config = config(&dir, &server, &queue, NO_HEALTH);
    let mut first = Agent::start(&config);
    first.wait_for("durable queue opened; what it holds is sent first");

    let second = Command::new(agent_binary())
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the second agent");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(second.wait_with_output());
    });
    let out = rx
        .recv_timeout(DEADLINE)
        .expect("the second agent exits at once")
        .expect("its output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: metrics.queue.dir {} is in use by another plexd-metrics (pid {}); give each agent a directory of its own",
            queue.display(),
            first.child.id()
        )),
        "{stderr}"
    );
    // The first goes on undisturbed.
    first.wait_for("collect cycle done");
    let (code, _) = first.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn remote_write_beside_the_control_plane_keeps_its_own_queue_across_a_kill() {
    let server = TestControlPlane::http();
    let dir = TempDir::new("durable-remote-write");
    let queue = dir.path().join("queue");
    std::fs::create_dir(&queue).unwrap();
    // Prometheus' address is chosen now; it runs only after the agent was killed.
    let receiver = free_port();
    let config = config(
        &dir,
        &server,
        &queue,
        &format!("{NO_HEALTH}  remote_write: {{ url: 'http://{receiver}/api/v1/write' }}\n"),
    );

    let mut agent = Agent::start(&config);
    // The control plane takes batches while remote write fails and keeps its points.
    for _ in 0..2 {
        agent.wait_until("metrics report failed", |e| {
            e["destination"] == "remote_write"
        });
    }
    let accepted = server.next_blocking(DEADLINE);
    assert!(accepted.accepted(), "the control plane is not held back");
    let own = queue.join("remote_write");
    assert!(
        !files(&own, ".log").is_empty(),
        "remote write's queue is on disk in {}",
        own.display()
    );
    agent.kill();

    let mut again = Agent::start(&config);
    again.wait_for("durable queue opened; what it holds is sent first");
    let prometheus = Prometheus::start_on(
        TempDir::new("durable-remote-write-prometheus"),
        receiver,
        &["--web.enable-remote-write-receiver"],
    );
    // The first run's samples arrive too: its uptime, then the second run's from zero, is a
    // drop that only both runs' samples together make.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let answer = prometheus.query("resets(plexd_agent_uptime_seconds[1h])", now);
        let resets = answer["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok());
        if resets.is_some_and(|r| r >= 1.0) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the first run's samples never arrived: {answer}; agent log:\n{}",
            again.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, _) = again.terminate();
    assert_eq!(code, Some(0), "{}", again.log_text());
}
