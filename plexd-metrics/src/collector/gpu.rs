//! The `gpu` group: one point per NVIDIA GPU, with the figures metricsd reports.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{BoxError, CollectError, Collector, Cycle};
use crate::api::{MetricPoint, GROUP_GPU};

/// One GPU's state. A figure the device or its driver does not report (a fan on a passively
/// cooled card, power on some boards) is left out of the point rather than sent as 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuStats {
    /// The driver's index of the device, 0 for the first.
    pub index: u32,
    /// The product name, e.g. `NVIDIA A100-SXM4-40GB`.
    pub name: String,
    /// The device's UUID (`GPU-…`), stable across reboots and index changes.
    pub uuid: String,
    /// Share of the last sample period in which a kernel ran on the GPU, 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    /// Share of the last sample period in which device memory was read or written, 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_utilization_percent: Option<u32>,
    /// Device memory, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    /// Device memory allocated, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    /// Device memory free, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_free_bytes: Option<u64>,
    /// Core temperature, in degrees Celsius.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<u32>,
    /// Power draw of the board, in milliwatts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_usage_milliwatts: Option<u32>,
    /// Speed the first fan is driven at, as a share of its maximum, 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_speed_percent: Option<u32>,
    /// Current clock of the streaming multiprocessors, in MHz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_sm_mhz: Option<u32>,
    /// Current memory clock, in MHz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_memory_mhz: Option<u32>,
}

/// Reads every GPU's [`GpuStats`]. Blocking: the collector calls it off the runtime.
pub trait GpuReader: Send + Sync {
    /// The state of every GPU now.
    fn read_gpus(&self) -> Result<Vec<GpuStats>, BoxError>;
}

/// Emits one `gpu` point per device per cycle.
pub struct GpuCollector {
    reader: Arc<dyn GpuReader>,
}

impl GpuCollector {
    /// A collector over `reader`.
    pub fn new(reader: Arc<dyn GpuReader>) -> Self {
        Self { reader }
    }
}

#[async_trait]
impl Collector for GpuCollector {
    fn group(&self) -> &'static str {
        GROUP_GPU
    }

    async fn collect(
        &self,
        _: Cycle,
        _: &CancellationToken,
    ) -> Result<Vec<MetricPoint>, CollectError> {
        // NVML answers from the driver, usually in microseconds, but a GPU that has fallen
        // off the bus can keep a call waiting; the Manager abandons a cycle that runs long.
        let reader = self.reader.clone();
        let gpus = tokio::task::spawn_blocking(move || reader.read_gpus())
            .await
            .map_err(|e| CollectError::source(GROUP_GPU, e))?
            .map_err(|e| CollectError::source(GROUP_GPU, e))?;
        let now = Utc::now();
        gpus.iter()
            .map(|gpu| {
                MetricPoint::new(now, GROUP_GPU, "", gpu)
                    .map_err(|e| CollectError::source(GROUP_GPU, e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<Vec<GpuStats>, String>);

    impl GpuReader for Fixed {
        fn read_gpus(&self) -> Result<Vec<GpuStats>, BoxError> {
            self.0.clone().map_err(Into::into)
        }
    }

    fn collect(reader: Fixed) -> Result<Vec<MetricPoint>, CollectError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(
            GpuCollector::new(Arc::new(reader))
                .collect(Cycle::default(), &CancellationToken::new()),
        )
    }

    #[test]
    fn one_point_per_gpu_without_the_figures_a_device_lacks() {
        let full = GpuStats {
            index: 0,
            name: "NVIDIA A2".into(),
            uuid: "GPU-0".into(),
            utilization_percent: Some(37),
            memory_utilization_percent: Some(12),
            memory_total_bytes: Some(16 << 30),
            memory_used_bytes: Some(1 << 30),
            memory_free_bytes: Some(15 << 30),
            temperature_celsius: Some(51),
            power_usage_milliwatts: Some(35_120),
            fan_speed_percent: Some(30),
            clock_sm_mhz: Some(1_770),
            clock_memory_mhz: Some(6_251),
        };
        let passive = GpuStats {
            index: 1,
            name: "NVIDIA A2".into(),
            uuid: "GPU-1".into(),
            fan_speed_percent: None,
            ..full.clone()
        };
        let points = collect(Fixed(Ok(vec![full.clone(), passive.clone()]))).unwrap();
        assert_eq!(points.len(), 2);
        assert!(points
            .iter()
            .all(|p| p.group == "gpu" && p.peer_id.is_empty()));
        let first = points[0].data.to_value();
        assert_eq!(first.as_object().unwrap().len(), 13, "{first}");
        let second = points[1].data.to_value();
        assert!(second.get("fan_speed_percent").is_none(), "{second}");
        assert_eq!(points[0].data.decode::<GpuStats>().unwrap(), full);
        assert_eq!(points[1].data.decode::<GpuStats>().unwrap(), passive);
    }

    #[test]
    fn a_reader_error_names_the_group() {
        let err = collect(Fixed(Err("NVML: GPU is lost".into()))).unwrap_err();
        assert_eq!(err.to_string(), "metrics: gpu: NVML: GPU is lost");
    }
}
