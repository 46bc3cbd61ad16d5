//! The host figures of the `system` group that take arithmetic or a choice: CPU usage between
//! two samples, of the whole machine and of each core; which block devices count as disks;
//! and the network counters of a set of interfaces, summed.
//!
//! [`crate::source::proc`] reads the files and hands the parsed values over.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// The time one CPU (or all of them, for the aggregate line) spent in each state, in ticks.
///
/// `guest` and `guest_nice` are left out: the kernel already counts them in `user` and
/// `nice`, and adding them again would count guest time twice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// Normal processes in user mode.
    pub user: u64,
    /// Niced processes in user mode.
    pub nice: u64,
    /// Kernel mode.
    pub system: u64,
    /// Idle.
    pub idle: u64,
    /// Idle while waiting for I/O.
    pub iowait: u64,
    /// Servicing interrupts.
    pub irq: u64,
    /// Servicing softirqs.
    pub softirq: u64,
    /// Taken by the hypervisor for other guests.
    pub steal: u64,
}

impl CpuTimes {
    fn total(&self) -> u64 {
        [
            self.user,
            self.nice,
            self.system,
            self.idle,
            self.iowait,
            self.irq,
            self.softirq,
            self.steal,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }

    /// Time waiting on I/O counts as idle: the CPU was free to run something else.
    fn idle_all(&self) -> u64 {
        self.idle.saturating_add(self.iowait)
    }

    fn busy(&self) -> u64 {
        self.total().saturating_sub(self.idle_all())
    }
}

/// Percentage of the ticks between `prev` and `now` that were busy, in [0, 100].
///
/// No elapsed ticks, or counters that went backwards (a fixture swap, a hypervisor resetting
/// them, a core taken offline and back), give 0 rather than a division by zero or a wrapped,
/// enormous figure. `iowait` alone may legitimately decrease (see proc(5)); that can push the
/// share above 100, hence the clamp.
pub fn cpu_usage(prev: &CpuTimes, now: &CpuTimes) -> f64 {
    let total = match now.total().checked_sub(prev.total()) {
        Some(0) | None => return 0.0,
        Some(total) => total,
    };
    let busy = now.busy().saturating_sub(prev.busy());
    (busy as f64 / total as f64 * 100.0).clamp(0.0, 100.0)
}

/// The usage of each core named in both samples, by its kernel name (`cpu0`, ...).
///
/// Matched by name rather than position: an offline core has no line, so the n-th line
/// is not always `cpu<n>`, and a core going offline between the samples must not shift the
/// others. A core in one sample only has no figure.
pub fn cores_usage(
    prev: &[(String, CpuTimes)],
    now: &[(String, CpuTimes)],
) -> BTreeMap<String, f64> {
    let before: BTreeMap<&str, &CpuTimes> =
        prev.iter().map(|(name, t)| (name.as_str(), t)).collect();
    now.iter()
        .filter_map(|(name, t)| {
            let p = before.get(name.as_str())?;
            Some((name.clone(), cpu_usage(p, t)))
        })
        .collect()
}

/// What `/proc/diskstats` counts for one block device, as reported: cumulative since boot
/// (or since the device appeared), as the kernel keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIo {
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
}

/// `/proc/diskstats` counts sectors of 512 bytes whatever the device's own sector size.
pub const DISKSTATS_SECTOR: u64 = 512;

impl DiskIo {
    /// The figures of a device that completed `reads` and `writes`, transferring
    /// `sectors_read` and `sectors_written` sectors of [`DISKSTATS_SECTOR`] bytes.
    pub fn from_sectors(reads: u64, sectors_read: u64, writes: u64, sectors_written: u64) -> Self {
        Self {
            read_bytes: sectors_read.saturating_mul(DISKSTATS_SECTOR),
            write_bytes: sectors_written.saturating_mul(DISKSTATS_SECTOR),
            reads,
            writes,
        }
    }
}

/// Which block devices of `/proc/diskstats` the `disks` figures cover.
#[derive(Clone, Copy, Debug)]
pub enum DiskSelection<'a> {
    /// Exactly these names (`metrics.system.disk_devices`), whatever they are.
    Named(&'a [String]),
    /// The whole disks: the names listed in `/sys/block`, when it could be read (`None`
    /// otherwise, and the names are judged by their shape), less loop and RAM devices.
    WholeDisks(Option<&'a HashSet<String>>),
}

impl DiskSelection<'_> {
    /// Whether the device called `name` is reported.
    pub fn includes(&self, name: &str) -> bool {
        match self {
            Self::Named(names) => names.iter().any(|n| n == name),
            Self::WholeDisks(_) if is_memory_backed(name) => false,
            Self::WholeDisks(Some(block)) => block.contains(name),
            Self::WholeDisks(None) => !looks_like_partition(name),
        }
    }
}

/// Loop devices (files seen as disks: their I/O is the underlying disk's again) and RAM
/// disks, compressed (`zram`) or not: no disk is behind them.
fn is_memory_backed(name: &str) -> bool {
    ["loop", "ram", "zram"].iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Whether `name` has the shape of a partition's, for when `/sys/block` cannot be read:
/// `sda1`, `vdb2`, `xvda1`, `hda3` (a drive letter, then a number), or `nvme0n1p1`,
/// `mmcblk0p2`, `md127p1` (a number, `p`, a number). Whole disks such as `nvme0n1`,
/// `mmcblk0`, `dm-0` or `md0` do not match.
pub fn looks_like_partition(name: &str) -> bool {
    let digits = name.bytes().rev().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return false;
    }
    let stem = &name[..name.len() - digits];
    if let Some(before_p) = stem.strip_suffix('p') {
        if before_p.ends_with(|c: char| c.is_ascii_digit()) {
            return true;
        }
    }
    ["sd", "vd", "xvd", "hd"].iter().any(|prefix| {
        stem.strip_prefix(prefix).is_some_and(|letters| {
            !letters.is_empty() && letters.bytes().all(|b| b.is_ascii_lowercase())
        })
    })
}

/// The counters of one network interface as `/proc/net/dev` reports them: cumulative since
/// the interface was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceCounters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Receive errors the driver reported.
    pub rx_errors: u64,
    /// Transmit errors the driver reported.
    pub tx_errors: u64,
    /// Received packets dropped (the kernel's count includes those the device missed).
    pub rx_dropped: u64,
    /// Packets dropped on the way out.
    pub tx_dropped: u64,
}

impl InterfaceCounters {
    /// Each counter of `self` plus the same of `other`. Saturating: a wrapped sum would look
    /// like a traffic spike downstream.
    pub fn saturating_add(self, other: Self) -> Self {
        Self {
            rx_bytes: self.rx_bytes.saturating_add(other.rx_bytes),
            tx_bytes: self.tx_bytes.saturating_add(other.tx_bytes),
            rx_packets: self.rx_packets.saturating_add(other.rx_packets),
            tx_packets: self.tx_packets.saturating_add(other.tx_packets),
            rx_errors: self.rx_errors.saturating_add(other.rx_errors),
            tx_errors: self.tx_errors.saturating_add(other.tx_errors),
            rx_dropped: self.rx_dropped.saturating_add(other.rx_dropped),
            tx_dropped: self.tx_dropped.saturating_add(other.tx_dropped),
        }
    }
}

/// The counters of `interfaces`, summed.
pub fn sum_interfaces<'a>(
    interfaces: impl IntoIterator<Item = &'a InterfaceCounters>,
) -> InterfaceCounters {
    interfaces
        .into_iter()
        .fold(InterfaceCounters::default(), |sum, c| {
            sum.saturating_add(*c)
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn times(busy: u64, idle: u64) -> CpuTimes {
        CpuTimes {
            user: busy,
            idle,
            ..CpuTimes::default()
        }
    }

    #[test]
    fn cpu_usage_edge_cases() {
        let a = times(100, 900);
        // No ticks elapsed.
        assert_eq!(cpu_usage(&a, &a), 0.0);
        // Counters went backwards: zero, not a wrapped or negative figure.
        assert_eq!(cpu_usage(&times(200, 1800), &a), 0.0);
        // Fully busy and fully idle.
        assert_eq!(cpu_usage(&a, &times(150, 900)), 100.0);
        assert_eq!(cpu_usage(&a, &times(100, 950)), 0.0);
        // iowait counts as idle: 10 busy ticks of 50.
        let mut b = times(110, 930);
        b.iowait = 10;
        assert_eq!(cpu_usage(&a, &b), 20.0);
        // iowait decreasing (allowed by the kernel) cannot push past 100.
        let mut c = a;
        c.iowait = 50;
        let mut d = times(120, 900);
        d.iowait = 40;
        assert_eq!(cpu_usage(&c, &d), 100.0);
        // Counters near u64::MAX do not overflow.
        let huge = times(u64::MAX, u64::MAX);
        assert_eq!(cpu_usage(&huge, &huge), 0.0);
    }

    #[test]
    fn cores_are_matched_by_name_not_position() {
        let prev = [
            ("cpu0".to_owned(), times(100, 100)),
            ("cpu1".to_owned(), times(100, 100)),
            ("cpu3".to_owned(), times(100, 100)),
        ];
        // cpu1 went offline between the samples: cpu3 is second now, and keeps its figure.
        let now = [
            ("cpu0".to_owned(), times(150, 150)),
            ("cpu3".to_owned(), times(200, 100)),
            ("cpu4".to_owned(), times(1, 1)),
        ];
        let usage = cores_usage(&prev, &now);
        assert_eq!(
            usage.into_iter().collect::<Vec<_>>(),
            [("cpu0".to_owned(), 50.0), ("cpu3".to_owned(), 100.0)]
        );
    }

    #[test]
    fn sectors_are_512_bytes() {
        assert_eq!(
            DiskIo::from_sectors(3, 8, 1, 2),
            DiskIo {
                read_bytes: 4096,
                write_bytes: 1024,
                reads: 3,
                writes: 1
            }
        );
        assert_eq!(DiskIo::from_sectors(0, u64::MAX, 0, 0).read_bytes, u64::MAX);
    }

    #[test]
    fn whole_disks_from_sys_block() {
        let block: HashSet<String> = ["sda", "nvme0n1", "loop0", "zram0", "dm-0"]
            .map(String::from)
            .into();
        let sel = DiskSelection::WholeDisks(Some(&block));
        let picked: Vec<&str> = [
            "sda",
            "sda1",
            "nvme0n1",
            "nvme0n1p1",
            "loop0",
            "zram0",
            "dm-0",
            "sdb",
        ]
        .into_iter()
        .filter(|n| sel.includes(n))
        .collect();
        assert_eq!(picked, ["sda", "nvme0n1", "dm-0"]);
    }

    #[test]
    fn without_sys_block_names_are_judged_by_shape() {
        let sel = DiskSelection::WholeDisks(None);
        for whole in [
            "sda", "vdb", "xvdaa", "nvme0n1", "mmcblk0", "md0", "dm-3", "sr0", "nbd0",
        ] {
            assert!(sel.includes(whole), "{whole}");
        }
        for part in [
            "sda1",
            "vdb15",
            "xvda1",
            "hda2",
            "nvme0n1p1",
            "mmcblk0p2",
            "md127p1",
        ] {
            assert!(!sel.includes(part), "{part}");
        }
        for memory in ["loop0", "loop12", "ram0", "zram1"] {
            assert!(!sel.includes(memory), "{memory}");
        }
    }

    #[test]
    fn named_devices_are_taken_as_they_are() {
        let names = ["sda1".to_owned(), "loop0".to_owned()];
        let sel = DiskSelection::Named(&names);
        assert!(sel.includes("sda1"));
        assert!(sel.includes("loop0"));
        assert!(!sel.includes("sda"));
    }

    #[test]
    fn interfaces_sum_each_counter_and_saturate() {
        let a = InterfaceCounters {
            rx_bytes: 10,
            tx_bytes: 20,
            rx_packets: 1,
            tx_packets: 2,
            rx_errors: 3,
            tx_errors: 4,
            rx_dropped: 5,
            tx_dropped: 6,
        };
        let b = InterfaceCounters {
            rx_bytes: u64::MAX,
            ..a
        };
        let sum = sum_interfaces([&a, &b]);
        assert_eq!(sum.rx_bytes, u64::MAX);
        assert_eq!((sum.tx_bytes, sum.rx_packets, sum.tx_dropped), (40, 2, 12));
        assert_eq!(sum_interfaces([]), InterfaceCounters::default());
    }

    /// The times of the states in [`CpuTimes`]'s field order.
    fn at(t: [u64; 8]) -> CpuTimes {
        CpuTimes {
            user: t[0],
            nice: t[1],
            system: t[2],
            idle: t[3],
            iowait: t[4],
            irq: t[5],
            softirq: t[6],
            steal: t[7],
        }
    }

    fn cpu_times() -> impl Strategy<Value = CpuTimes> {
        prop::array::uniform8(any::<u64>()).prop_map(at)
    }

    /// Counters of a real core: each state grows by up to a few thousand ticks from a
    /// start that may be anywhere, including near the top of the range.
    fn advancing() -> impl Strategy<Value = (CpuTimes, CpuTimes)> {
        (
            prop::array::uniform8(0u64..1 << 40),
            prop::array::uniform8(0u64..5000),
        )
            .prop_map(|(start, step)| {
                let mut later = start;
                for (l, s) in later.iter_mut().zip(step) {
                    *l += s;
                }
                (at(start), at(later))
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn usage_is_a_percentage_whatever_the_counters(prev in cpu_times(), now in cpu_times()) {
            let u = cpu_usage(&prev, &now);
            prop_assert!((0.0..=100.0).contains(&u), "{u}");
        }

        /// For counters that only grow, the figure is the busy share of the elapsed ticks,
        /// worked out here in exact integer arithmetic.
        #[test]
        fn usage_of_growing_counters_is_the_busy_share((prev, now) in advancing()) {
            let elapsed: u64 = [
                now.user - prev.user, now.nice - prev.nice, now.system - prev.system,
                now.idle - prev.idle, now.iowait - prev.iowait, now.irq - prev.irq,
                now.softirq - prev.softirq, now.steal - prev.steal,
            ].iter().sum();
            let idle = (now.idle - prev.idle) + (now.iowait - prev.iowait);
            let expected = if elapsed == 0 { 0.0 } else { (elapsed - idle) as f64 * 100.0 / elapsed as f64 };
            prop_assert!((cpu_usage(&prev, &now) - expected).abs() < 1e-9);
        }

        /// Each core's figure is a percentage, a counter reset included (a core whose
        /// counters restarted from zero reads as 0, not as a huge figure).
        #[test]
        fn every_core_is_a_percentage(
            cores in prop::collection::vec((0u8..16, cpu_times(), cpu_times()), 0..12),
            reset in any::<bool>(),
        ) {
            let prev: Vec<(String, CpuTimes)> =
                cores.iter().map(|(i, p, _)| (format!("cpu{i}"), *p)).collect();
            let now: Vec<(String, CpuTimes)> = cores
                .iter()
                .map(|(i, _, n)| (format!("cpu{i}"), if reset { CpuTimes::default() } else { *n }))
                .collect();
            let usage = cores_usage(&prev, &now);
            prop_assert!(usage.len() <= now.len());
            for (name, u) in &usage {
                prop_assert!((0.0..=100.0).contains(u), "{name}: {u}");
                if reset {
                    prop_assert_eq!(*u, 0.0);
                }
            }
        }

        #[test]
        fn disk_selection_never_panics(
            name in "\\PC{0,24}",
            listed in prop::collection::hash_set("[a-z0-9-]{1,10}", 0..6),
        ) {
            let _ = looks_like_partition(&name);
            let in_sys = DiskSelection::WholeDisks(Some(&listed)).includes(&name);
            // What /sys/block does not list is never taken for a whole disk.
            prop_assert!(!in_sys || listed.contains(&name));
            let _ = DiskSelection::WholeDisks(None).includes(&name);
        }

        /// A partition's name is a whole disk's name and a number: the shape rule tells the
        /// two apart for the usual drivers.
        #[test]
        fn shape_rule_separates_disks_from_their_partitions(
            kind in 0usize..4,
            letters in "[a-z]{1,2}",
            disk in 0u32..64,
            part in 1u32..128,
        ) {
            let (whole, partition) = match kind {
                0 => (format!("sd{letters}"), format!("sd{letters}{part}")),
                1 => (format!("xvd{letters}"), format!("xvd{letters}{part}")),
                2 => (format!("nvme{disk}n1"), format!("nvme{disk}n1p{part}")),
                _ => (format!("mmcblk{disk}"), format!("mmcblk{disk}p{part}")),
            };
            prop_assert!(!looks_like_partition(&whole), "{whole}");
            prop_assert!(looks_like_partition(&partition), "{partition}");
        }
    }
}
