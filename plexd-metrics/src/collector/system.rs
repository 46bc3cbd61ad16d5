//! The `system` group: host CPU, memory, disk, network and load.

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{BoxError, CollectError, Collector, Cycle};
use crate::api::{MetricPoint, GROUP_SYSTEM};

/// The host's resource usage, with the spec's JSON keys.
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
        assert_eq!(keys.len(), 10, "{keys:?}");
        let back: SystemStats = points[0].data.decode().unwrap();
        assert_eq!(back, stats);
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
