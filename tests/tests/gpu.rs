//! The `gpu` group from the agent binary. Without NVML or a GPU (this machine and CI) the
//! agent must say so once and report every other group; on a host with NVIDIA GPUs its
//! figures are compared with `nvidia-smi`, an independent reader of the same driver.

use std::process::Command;

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::agent::{run_once_here, OnceRun};
use serde_json::Value;

/// What `plexd-metrics --once` printed: its batch and its JSON log events.
struct Once {
    batch: Vec<MetricPoint>,
    events: Vec<Value>,
}

/// Runs the agent once with only the system, agent and gpu groups (nothing that needs the
/// network or privileges).
fn run_once(gpu: &str) -> Once {
    let yaml = format!(
        "metrics:\n  ebpf: {{enabled: false}}\n  wireguard: {{enabled: false}}\n  \
         latency: {{enabled: false}}\n  health: {{enabled: false}}\n  gpu: {gpu}\n"
    );
    let OnceRun { batch, stderr } = run_once_here(&yaml);
    let events = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("log line {l:?}: {e}")))
        .collect();
    Once { batch, events }
}

/// The log events at `level` whose message mentions the gpu group.
fn gpu_messages<'a>(events: &'a [Value], level: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e["level"] == level)
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains("gpu group") || m.contains("NVIDIA GPUs"))
        .collect()
}

fn groups(batch: &[MetricPoint]) -> Vec<&str> {
    let mut groups: Vec<&str> = batch.iter().map(|p| p.group.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// `nvidia-smi`'s view of every GPU: index, uuid, name and total memory in MiB.
fn nvidia_smi() -> Option<Vec<(u32, String, String, u64)>> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,uuid,name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).expect("nvidia-smi prints UTF-8");
    Some(
        text.lines()
            .map(|line| {
                let f: Vec<&str> = line.split(',').map(str::trim).collect();
                (
                    f[0].parse().unwrap(),
                    f[1].to_owned(),
                    f[2].to_owned(),
                    f[3].parse().unwrap(),
                )
            })
            .collect(),
    )
}

#[test]
fn gpus_are_reported_or_their_absence_is_said_once() {
    let run = run_once("{enabled: true}");
    let gpus: Vec<&MetricPoint> = run.batch.iter().filter(|p| p.group == "gpu").collect();
    if gpus.is_empty() {
        let warnings = gpu_messages(&run.events, "WARN");
        assert_eq!(warnings.len(), 1, "{:#?}", run.events);
        assert!(
            warnings[0].starts_with("the gpu group is off: ")
                && warnings[0].contains("NVML")
                && warnings[0].contains("metrics.gpu.library"),
            "{}",
            warnings[0]
        );
        assert_eq!(groups(&run.batch), ["agent", "system"]);
        eprintln!(
            "NOTE: no NVIDIA GPU is visible here ({}); the agent's figures were not compared \
             with nvidia-smi",
            warnings[0]
        );
        return;
    }
    assert!(
        gpu_messages(&run.events, "WARN").is_empty(),
        "{:#?}",
        run.events
    );
    let Some(smi) = nvidia_smi() else {
        eprintln!(
            "NOTE: NVML reported {} GPUs but nvidia-smi is not available; their figures were \
             not compared",
            gpus.len()
        );
        return;
    };
    assert_eq!(gpus.len(), smi.len(), "one point per GPU nvidia-smi lists");
    for (index, uuid, name, memory_mib) in smi {
        let point = gpus
            .iter()
            .find(|p| p.data.to_value()["index"] == index)
            .unwrap_or_else(|| panic!("no point for GPU {index}"));
        let data = point.data.to_value();
        assert!(point.peer_id.is_empty());
        assert_eq!(data["uuid"], uuid);
        assert_eq!(data["name"], name);
        let total = data["memory_total_bytes"].as_u64().unwrap();
        assert_eq!(total >> 20, memory_mib, "{data}");
    }
}

#[test]
fn a_library_that_is_not_nvml_is_named_and_the_agent_runs_on() {
    // The C library is on every host, loads, and has none of NVML's functions.
    let run = run_once("{enabled: true, library: libc.so.6}");
    let warnings = gpu_messages(&run.events, "WARN");
    assert_eq!(warnings.len(), 1, "{:#?}", run.events);
    assert!(
        warnings[0].starts_with("the gpu group is off: libc.so.6 is not the NVML library"),
        "{}",
        warnings[0]
    );
    assert_eq!(groups(&run.batch), ["agent", "system"]);
}

#[test]
fn the_group_is_off_by_default_without_a_word() {
    let run = run_once("{}");
    assert!(gpu_messages(&run.events, "WARN").is_empty());
    assert!(gpu_messages(&run.events, "INFO").is_empty());
    assert_eq!(groups(&run.batch), ["agent", "system"]);
}
