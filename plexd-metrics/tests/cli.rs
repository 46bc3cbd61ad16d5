//! The agent binary as a user meets it: flags, exit codes, stdout and stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use plexd_metrics::api::MetricPoint;

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plexd-metrics"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PLEXD_METRICS_CONFIG")
        .output()
        .expect("start the agent binary")
}

/// A config file in a fresh temporary directory, removed when dropped.
struct TempConfig {
    dir: PathBuf,
}

impl TempConfig {
    fn new(name: &str, yaml: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("plexd-metrics-cli-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.yaml"), yaml).unwrap();
        Self { dir }
    }
    fn path(&self) -> String {
        self.dir.join("config.yaml").display().to_string()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs `--check-config` on `yaml` and returns the error lines, asserting exit code 2 and
/// that nothing reached stdout.
fn rejected(name: &str, yaml: &str) -> Vec<String> {
    let cfg = TempConfig::new(name, yaml);
    let out = agent(&["--check-config", "--config", &cfg.path()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "stdout must stay clean");
    stderr_lines(&out)
}

#[test]
fn once_prints_one_valid_batch_on_stdout() {
    let cfg = TempConfig::new("once", "metrics: { ebpf: { enabled: false } }\n");
    let out = agent(&["--once", "--config", &cfg.path()]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one batch, one line: {stdout}");
    let batch: Vec<MetricPoint> = serde_json::from_str(&stdout).expect("a JSON array of points");
    let groups: Vec<&str> = batch.iter().map(|p| p.group.as_str()).collect();
    assert!(
        groups.contains(&"system") && groups.contains(&"agent"),
        "{groups:?}"
    );

    let raw: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for point in raw.as_array().unwrap() {
        assert!(
            point.get("peer_id").is_none(),
            "no peer_id on host-wide points: {point}"
        );
        let ts = point["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z'), "UTC: {ts}");
        chrono::DateTime::parse_from_rfc3339(ts).expect("RFC 3339");
    }
    let data = |group: &str| {
        batch
            .iter()
            .find(|p| p.group == group)
            .unwrap()
            .data
            .to_value()
    };
    let system = data("system");
    assert!(system["memory_total_bytes"].as_u64().unwrap() > 0);
    assert!(system["disk_total_bytes"].as_u64().unwrap() > 0);
    let agent_point = data("agent");
    assert!(
        agent_point["heap_alloc_bytes"].as_u64().unwrap() > 0,
        "the binary installs the counting allocator"
    );
    assert!(
        agent_point.get("ebpf_programs_attached").is_none(),
        "eBPF is off"
    );
}

#[test]
fn logs_can_be_json_and_never_reach_stdout() {
    let cfg = TempConfig::new("json-logs", "metrics: { ebpf: { enabled: false } }\n");
    let out = agent(&[
        "--once",
        "--log-level",
        "trace",
        "--log-format",
        "json",
        "--config",
        &cfg.path(),
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str::<Vec<MetricPoint>>(&stdout).expect("stdout holds only the batch");
    for line in stderr_lines(&out) {
        serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

#[test]
fn check_config_accepts_a_valid_file_and_no_file() {
    let cfg = TempConfig::new(
        "valid",
        "node_id: n1\nmetrics: { collect_interval: 5s, report_interval: 10s }\n",
    );
    let out = agent(&["--check-config", "--config", &cfg.path()]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(agent(&["--check-config"]).status.success());
}

#[test]
fn check_config_says_which_queue_is_in_use() {
    let out = agent(&["--check-config"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        "configuration is valid\nqueue: in memory (at most 10000 points; set metrics.queue.dir to keep them across restarts)\n"
    );
    let cfg = TempConfig::new(
        "durable",
        "metrics: { queue: { dir: /var/lib/plexd-metrics, max_bytes: 64MiB } }\n",
    );
    let out = agent(&["--check-config", "--config", &cfg.path()]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "configuration is valid\nqueue: durable, in /var/lib/plexd-metrics (at most 64.0 MiB; the oldest batches go beyond it)\n"
    );
}

#[test]
fn every_broken_rule_is_printed_and_exit_code_is_2() {
    let lines = rejected(
        "rules",
        "metrics: { collect_interval: 1s, report_interval: 2s, batch_size: 0 }\n",
    );
    assert_eq!(
        lines,
        [
            "error: metrics: config: CollectInterval must be at least 5s",
            "error: metrics: config: ReportInterval must be at least 10s",
            "error: metrics: config: BatchSize must be > 0",
        ]
    );
}

#[test]
fn bad_input_gives_one_clear_line_and_exit_code_2() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "yaml",
            "metrics: [\n",
            &["invalid config file", "config.yaml"],
        ),
        (
            "unknown-key",
            "metrics: { colect_interval: 5s }\n",
            &["unknown field `colect_interval`"],
        ),
        (
            "duration",
            "metrics: { report_interval: soon }\n",
            &["metrics.report_interval", "invalid duration \"soon\""],
        ),
        (
            "min",
            "metrics: { collect_interval: 4s }\n",
            &["CollectInterval must be at least 5s"],
        ),
        (
            "proc-root",
            "metrics: { system: { proc_root: /nonexistent/proc } }\n",
            &["system.proc_root", "/nonexistent/proc"],
        ),
        (
            "mount",
            "metrics: { system: { mount_point: /nonexistent/mnt } }\n",
            &["system.mount_point", "/nonexistent/mnt"],
        ),
    ];
    for (name, yaml, wanted) in cases {
        let lines = rejected(name, yaml);
        assert_eq!(lines.len(), 1, "{name}: {lines:?}");
        for w in *wanted {
            assert!(lines[0].contains(w), "{name}: {:?} lacks {w:?}", lines[0]);
        }
    }
}

#[test]
fn a_missing_config_file_is_named() {
    let out = agent(&["--once", "--config", "/nonexistent/plexd-metrics.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let lines = stderr_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("error: cannot read config file /nonexistent/plexd-metrics.yaml: "),
        "{lines:?}"
    );
}

#[test]
fn an_unreadable_config_is_named() {
    // A directory cannot be read as a file, even by root.
    let dir = TempConfig::new("dir", "");
    let out = agent(&[
        "--check-config",
        "--config",
        Path::new(&dir.path()).parent().unwrap().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_lines(&out)[0].starts_with("error: cannot read config file "));
}

#[test]
fn help_explains_the_flags() {
    let out = agent(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--once",
        "--check-config",
        "--log-level",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn a_taken_health_port_stops_the_agent_at_start_with_exit_code_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = TempConfig::new(
        "health-taken",
        &format!(
            "metrics:\n  ebpf: {{ enabled: false }}\n  latency: {{ enabled: false }}\n  health: {{ listen: '{addr}' }}\n"
        ),
    );
    let out = agent(&["--log-level", "error", "--config", &cfg.path()]);
    assert_eq!(out.status.code(), Some(2), "{:?}", stderr_lines(&out));
    let lines = stderr_lines(&out);
    let line = lines
        .iter()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        line.starts_with(&format!(
            "error: metrics: health: cannot listen on {addr}: "
        )) && line.ends_with(
            "; set metrics.health.listen to a free address of this host, or \
                 metrics.health.enabled: false"
        ),
        "{line}"
    );
    assert!(out.stdout.is_empty(), "nothing was collected");
}
