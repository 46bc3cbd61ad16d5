//! The `system` group's host figures from the agent binary (`--once`, in the test's own
//! namespaces, no privileges), each checked against another tool reading the same kernel:
//! `getconf`, sysfs's list of online CPUs, `free`, `df`, `ip`, `lsblk` and
//! `/sys/block/<disk>/stat`.
//!
//! The counters move while the test runs (this machine is shared), so each is read by the
//! other tool before the agent runs and again after it: the agent's figure must lie between.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::agent::{run_once_here, OnceRun};
use serde_json::Value;

/// A filesystem that nobody writes to while the test runs, so that `df` before and after the
/// agent agree and its free bytes can be compared exactly.
const QUIET_MOUNT: &str = "/dev";

/// How long to retry for a run during which `df` saw no change.
const DEADLINE: Duration = Duration::from_secs(30);

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn number(text: &str) -> u64 {
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("not a number ({e}): {text:?}"))
}

/// What the other tools say at one moment.
struct Snapshot {
    /// `ip -s -s -j link`, by interface name.
    links: BTreeMap<String, Value>,
    /// `/sys/block/<disk>/stat` fields, by disk.
    disk_stat: BTreeMap<String, Vec<u64>>,
    /// `df`'s Avail of [`QUIET_MOUNT`].
    df_avail: u64,
}

impl Snapshot {
    fn take(disks: &BTreeSet<String>) -> Self {
        let links: Vec<Value> =
            serde_json::from_str(&run("ip", &["-s", "-s", "-j", "link"])).expect("ip's JSON");
        let links = links
            .into_iter()
            .map(|l| (l["ifname"].as_str().expect("ifname").to_owned(), l))
            .collect();
        let disk_stat = disks
            .iter()
            .map(|d| {
                let stat = std::fs::read_to_string(format!("/sys/block/{d}/stat"))
                    .unwrap_or_else(|e| panic!("/sys/block/{d}/stat: {e}"));
                (d.clone(), stat.split_whitespace().map(number).collect())
            })
            .collect();
        let df = run("df", &["-B1", "--output=avail", QUIET_MOUNT]);
        let df_avail = number(df.lines().nth(1).expect("df's figure"));
        Self {
            links,
            disk_stat,
            df_avail,
        }
    }
}

/// The agent's figures of each interface, with what `ip` calls them: `/proc/net/dev`'s
/// receive drops include the packets the device missed, which `ip` lists apart.
fn ip_counters(link: &Value) -> [(&'static str, u64); 8] {
    let s = &link["stats64"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    [
        ("rx_bytes", n(&s["rx"]["bytes"])),
        ("tx_bytes", n(&s["tx"]["bytes"])),
        ("rx_packets", n(&s["rx"]["packets"])),
        ("tx_packets", n(&s["tx"]["packets"])),
        ("rx_errors", n(&s["rx"]["errors"])),
        ("tx_errors", n(&s["tx"]["errors"])),
        (
            "rx_dropped",
            n(&s["rx"]["dropped"]) + n(&s["rx"]["missed_errors"]),
        ),
        ("tx_dropped", n(&s["tx"]["dropped"])),
    ]
}

/// The kernel's names of the online CPUs, from sysfs's ranges (`0-3,6`).
fn online_cpus() -> BTreeSet<String> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("online CPUs");
    online
        .trim()
        .split(',')
        .flat_map(|range| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            number(first)..=number(last)
        })
        .map(|n| format!("cpu{n}"))
        .collect()
}

/// Whole disks as `lsblk` lists them (`-d`: no partitions or holders) and every device
/// `lsblk` calls a partition.
fn lsblk() -> (BTreeSet<String>, BTreeSet<String>) {
    let of_type = |args: &[&str], wanted: &str| -> BTreeSet<String> {
        run("lsblk", args)
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (name, kind) = (f.next()?, f.next()?);
                (kind == wanted).then(|| name.to_owned())
            })
            .collect()
    };
    (
        of_type(&["-d", "-n", "-o", "KNAME,TYPE"], "disk"),
        of_type(&["-n", "-o", "KNAME,TYPE"], "part"),
    )
}

/// Runs the agent once between two snapshots, until one run where `df` saw no change.
fn bracketed_run(disks: &BTreeSet<String>) -> (Snapshot, Value, Snapshot) {
    let config = format!(
        "metrics:\n  ebpf: {{ enabled: false }}\n  wireguard: {{ enabled: false }}\n  \
         system: {{ mount_point: {QUIET_MOUNT} }}\n"
    );
    let start = Instant::now();
    loop {
        let before = Snapshot::take(disks);
        let OnceRun { batch, stderr } = run_once_here(&config);
        let after = Snapshot::take(disks);
        let system: &MetricPoint = batch
            .iter()
            .find(|p| p.group == "system")
            .unwrap_or_else(|| panic!("no system point; log: {stderr}"));
        if before.df_avail == after.df_avail {
            return (before, system.data.to_value(), after);
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{QUIET_MOUNT} kept changing for {DEADLINE:?}"
        );
    }
}

#[test]
fn host_figures_agree_with_other_tools() {
    let (whole_disks, partitions) = lsblk();
    // The disks to compare: lsblk's whole disks but the compressed RAM ones, which the agent
    // leaves out on purpose.
    let disks: BTreeSet<String> = whole_disks
        .iter()
        .filter(|d| !d.starts_with("zram") && !d.starts_with("ram"))
        .cloned()
        .collect();
    let (before, data, after) = bracketed_run(&disks);

    // CPUs: as many as getconf counts online, named as sysfs lists them, each a percentage.
    let online = number(&run("getconf", &["_NPROCESSORS_ONLN"]));
    assert_eq!(data["cpu_count"], online, "{data}");
    let cores = data["cpu_cores_usage_percent"]
        .as_object()
        .expect("cpu_cores_usage_percent");
    assert_eq!(
        cores.keys().cloned().collect::<BTreeSet<_>>(),
        online_cpus()
    );
    for (cpu, usage) in cores {
        let usage = usage.as_f64().expect("a number");
        assert!((0.0..=100.0).contains(&usage), "{cpu}: {usage}");
    }

    // Memory: free's totals (these do not move).
    let free = run("free", &["-b"]);
    let row = |name: &str| -> Vec<u64> {
        free.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {free}"))
            .split_whitespace()
            .skip(1)
            .map(number)
            .collect()
    };
    assert_eq!(data["memory_total_bytes"], row("Mem:")[0], "{data}");
    assert_eq!(data["swap_total_bytes"], row("Swap:")[0], "{data}");
    let swap_used = data["swap_used_bytes"].as_u64().unwrap();
    assert!(swap_used <= row("Swap:")[0], "{data}");
    let available = data["memory_available_bytes"].as_u64().unwrap();
    assert!(
        available > 0 && available <= data["memory_total_bytes"].as_u64().unwrap(),
        "{data}"
    );

    // Disk free: df's Avail, unchanged from before the agent ran to after.
    assert_eq!(data["disk_free_bytes"], before.df_avail, "{data}");

    // Interfaces: every one ip lists but lo, each counter between ip's two readings.
    let interfaces = data["interfaces"].as_object().expect("interfaces");
    let expected: BTreeSet<&String> = before.links.keys().filter(|n| *n != "lo").collect();
    assert_eq!(
        interfaces.keys().collect::<BTreeSet<_>>(),
        expected,
        "{data}"
    );
    for (name, figures) in interfaces {
        let low = ip_counters(&before.links[name]);
        let high = ip_counters(&after.links[name]);
        for ((key, lo), (_, hi)) in low.into_iter().zip(high) {
            let got = figures[key]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}.{key}"));
            assert!(
                (lo..=hi).contains(&got),
                "{name}.{key}: {got} not in ip's {lo}..={hi}"
            );
        }
    }
    // The sums cover the same interfaces.
    for (sum, key) in [
        ("network_rx_packets", "rx_packets"),
        ("network_tx_errors", "tx_errors"),
        ("network_rx_dropped", "rx_dropped"),
    ] {
        let total: u64 = interfaces.values().map(|f| f[key].as_u64().unwrap()).sum();
        assert_eq!(data[sum], total, "{sum}");
    }

    // Disks: lsblk's whole disks are there, no partition is, and each counter lies between
    // two readings of the disk's own stat file (sectors of 512 bytes).
    let reported = data["disks"].as_object().expect("disks");
    for disk in &disks {
        assert!(reported.contains_key(disk), "{disk} missing: {data}");
    }
    for name in reported.keys() {
        assert!(!partitions.contains(name), "partition {name} reported");
    }
    for disk in &disks {
        let (lo, hi) = (&before.disk_stat[disk], &after.disk_stat[disk]);
        for (key, field, unit) in [
            ("reads", 0, 1),
            ("read_bytes", 2, 512),
            ("writes", 4, 1),
            ("write_bytes", 6, 512),
        ] {
            let got = reported[disk][key].as_u64().unwrap();
            let range = lo[field] * unit..=hi[field] * unit;
            assert!(range.contains(&got), "{disk}.{key}: {got} not in {range:?}");
        }
    }
}
