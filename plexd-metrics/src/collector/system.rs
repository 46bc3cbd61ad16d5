//! The `system` group: host CPU, memory, disk, network and load.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{BoxError, CollectError, Collector, Cycle};
use crate::accounting::host::{DiskIo, InterfaceCounters};
use crate::api::{MetricPoint, GROUP_SYSTEM};

/// The host's resource usage: the spec's ten JSON keys, then extra ones.
///
/// The extra keys default when absent, so that a point written by an agent without them
/// (one waiting in a durable queue across an upgrade) still reads back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemStats {
    /// Share of CPU time not idle between two samples, 0–100.
    pub cpu_usage_percent: f64,
    /// `MemTotal - MemAvailable`, in bytes.
    pub memory_used_bytes: u64,
    /// `MemTotal`, in bytes.
    pub memory_total_bytes: u64,
    /// Used bytes of the filesystem at the configured mount point.
    pub disk_used_bytes: u64,
    /// Size in bytes of the filesystem at the configured mount point.
    pub disk_total_bytes: u64,
    /// Received bytes, summed over interfaces other than `lo`, or of the configured one.
    pub network_rx_bytes: u64,
    /// Transmitted bytes, summed like `network_rx_bytes`.
    pub network_tx_bytes: u64,
    /// One-minute load average.
    pub load_avg_1: f64,
    /// Five-minute load average.
    pub load_avg_5: f64,
    /// Fifteen-minute load average.
    pub load_avg_15: f64,

    /// CPUs online: the per-CPU lines of `stat`.
    #[serde(default)]
    pub cpu_count: u64,
    /// Each online CPU's share of time not idle between the same two samples as
    /// `cpu_usage_percent`, 0–100, by the kernel's name for it (`cpu0`, `cpu1`, ...).
    #[serde(default)]
    pub cpu_cores_usage_percent: BTreeMap<String, f64>,
    /// `MemAvailable`, in bytes: what can be allocated without swapping.
    #[serde(default)]
    pub memory_available_bytes: u64,
    /// `SwapTotal`, in bytes.
    #[serde(default)]
    pub swap_total_bytes: u64,
    /// `SwapTotal - SwapFree`, in bytes.
    #[serde(default)]
    pub swap_used_bytes: u64,
    /// Bytes of the filesystem at the configured mount point available to unprivileged
    /// users (`statvfs`'s `f_bavail`, `df`'s Avail): free space less the part reserved for
    /// root, so `disk_used_bytes + disk_free_bytes` may fall short of `disk_total_bytes`.
    #[serde(default)]
    pub disk_free_bytes: u64,
    /// I/O of each block device since boot, cumulative as the kernel counts it, by device
    /// name: the whole disks, or `metrics.system.disk_devices` when set.
    #[serde(default)]
    pub disks: BTreeMap<String, DiskIo>,
    /// Received packets, cumulative, summed like `network_rx_bytes`.
    #[serde(default)]
    pub network_rx_packets: u64,
    /// Transmitted packets, cumulative, summed like `network_rx_bytes`.
    #[serde(default)]
    pub network_tx_packets: u64,
    /// Receive errors, cumulative, summed like `network_rx_bytes`.
    #[serde(default)]
    pub network_rx_errors: u64,
    /// Transmit errors, cumulative, summed like `network_rx_bytes`.
    #[serde(default)]
    pub network_tx_errors: u64,
    /// Received packets dropped, cumulative, summed like `network_rx_bytes`.
    #[serde(default)]
    pub network_rx_dropped: u64,
    /// Packets dropped on transmit, cumulative, summed like `network_rx_bytes`.
    #[serde(default)]
    pub network_tx_dropped: u64,
    /// The counters of each interface the `network_*` sums cover, by name, cumulative.
    #[serde(default)]
    pub interfaces: BTreeMap<String, InterfaceCounters>,
}

/// Reads [`SystemStats`] from the host: the spec's `SystemReader`.
#[async_trait]
pub trait SystemReader: Send + Sync {
    /// Reads the host's current stats.
    async fn read_stats(&self, cancel: &CancellationToken) -> Result<SystemStats, BoxError>;
}

/// Emits one `system` point per cycle from a [`SystemReader`].
pub struct SystemCollector<R> {
    reader: R,
}

impl<R: SystemReader> SystemCollector<R> {
    /// A collector over `reader`.
    pub fn new(reader: R) -> Self {
        Self { reader }
    }
}

#[async_trait]
impl<R: SystemReader> Collector for SystemCollector<R> {
    fn group(&self) -> &'static str {
        GROUP_SYSTEM
    }

    async fn collect(
        &self,
        _: Cycle,
        cancel: &CancellationToken,
    ) -> Result<Vec<MetricPoint>, CollectError> {
        let stats = self
            .reader
            .read_stats(cancel)
            .await
            .map_err(|e| CollectError::source(GROUP_SYSTEM, e))?;
        let point = MetricPoint::new(Utc::now(), GROUP_SYSTEM, "", &stats)
            .map_err(|e| CollectError::source(GROUP_SYSTEM, e))?;
        Ok(vec![point])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<SystemStats, String>);

    #[async_trait]
    impl SystemReader for Fixed {
        async fn read_stats(&self, _: &CancellationToken) -> Result<SystemStats, BoxError> {
            self.0.clone().map_err(Into::into)
        }
    }

    #[tokio::test]
    async fn one_point_with_every_field() {
        let stats = SystemStats {
            cpu_usage_percent: 42.5,
            memory_used_bytes: 2,
            memory_total_bytes: 8,
            disk_used_bytes: 5,
            disk_total_bytes: 10,
            network_rx_bytes: 1,
            network_tx_bytes: 3,
            load_avg_1: 1.5,
            load_avg_5: 1.2,
            load_avg_15: 0.9,
            cpu_count: 2,
            cpu_cores_usage_percent: [("cpu0".to_owned(), 40.0), ("cpu1".to_owned(), 45.0)].into(),
            memory_available_bytes: 6,
            swap_total_bytes: 4,
            swap_used_bytes: 1,
            disk_free_bytes: 4,
            disks: [("sda".to_owned(), DiskIo::from_sectors(1, 2, 3, 4))].into(),
            network_rx_packets: 7,
            network_tx_packets: 8,
            network_rx_errors: 9,
            network_tx_errors: 10,
            network_rx_dropped: 11,
            network_tx_dropped: 12,
            interfaces: [(
                "eth0".to_owned(),
                InterfaceCounters {
                    rx_bytes: 1,
                    tx_bytes: 3,
                    ..InterfaceCounters::default()
                },
            )]
            .into(),
        };
        let c = SystemCollector::new(Fixed(Ok(stats.clone())));
        let points = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].group, "system");
        assert!(points[0].peer_id.is_empty());
        let keys: Vec<_> = points[0]
            .data
            .to_value()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys.len(), 10 + 14, "{keys:?}");
        let back: SystemStats = points[0].data.decode().unwrap();
        assert_eq!(back, stats);
    }

    #[test]
    fn a_point_with_the_spec_s_keys_alone_reads_back() {
        let spec = serde_json::json!({
            "cpu_usage_percent": 1.0, "memory_used_bytes": 2, "memory_total_bytes": 3,
            "disk_used_bytes": 4, "disk_total_bytes": 5, "network_rx_bytes": 6,
            "network_tx_bytes": 7, "load_avg_1": 0.5, "load_avg_5": 0.25, "load_avg_15": 0.125,
        });
        let stats: SystemStats = serde_json::from_value(spec).unwrap();
        assert_eq!(stats.network_tx_bytes, 7);
        assert!(stats.disks.is_empty() && stats.interfaces.is_empty());
        // Without the spec's keys it is not a system point.
        assert!(serde_json::from_value::<SystemStats>(serde_json::json!({})).is_err());
    }

    #[tokio::test]
    async fn reader_error_is_prefixed_with_the_group() {
        let c = SystemCollector::new(Fixed(Err("read /proc/stat: gone".into())));
        let err = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "metrics: system: read /proc/stat: gone");
    }
}
