//! NVIDIA GPUs through NVML, the driver's management library.
//!
//! `nvml-wrapper` opens the library with `dlopen` when the agent asks for GPUs, not at link
//! time: one binary and one image serve nodes with and without a GPU, and a node without
//! one only gets a warning when `metrics.gpu.enabled` is set.

use std::ffi::OsStr;
use std::path::Path;

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use crate::collector::{BoxError, GpuReader, GpuStats};

/// The library NVML is looked up as when `metrics.gpu.library` is not set: the name the
/// NVIDIA driver installs, found on the loader's search path.
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// The GPUs of this host, read through an initialised NVML.
pub struct NvmlGpus {
    nvml: Nvml,
}

impl NvmlGpus {
    /// Loads NVML from `library` (or [`DEFAULT_NVML_LIBRARY`]) and checks that it sees at
    /// least one GPU. The error says why the group cannot run, in words for the log.
    pub fn open(library: Option<&Path>) -> Result<(Self, u32), String> {
        let path = library.map_or(OsStr::new(DEFAULT_NVML_LIBRARY), Path::as_os_str);
        let shown = Path::new(path).display();
        let nvml = Nvml::builder().lib_path(path).init().map_err(|e| match e {
            NvmlError::LibloadingError(e) => format!(
                "cannot load the NVML library {shown}: {e}; install the NVIDIA driver, or \
                     set metrics.gpu.library to where libnvidia-ml.so is"
            ),
            NvmlError::FailedToLoadSymbol(e) => format!(
                "{shown} is not the NVML library ({e}); set metrics.gpu.library to \
                     libnvidia-ml.so"
            ),
            NvmlError::DriverNotLoaded => {
                format!("NVML ({shown}) loaded, but the NVIDIA kernel driver is not running")
            }
            NvmlError::NoPermission => format!(
                "NVML ({shown}) may not talk to the NVIDIA driver: no permission to open \
                     /dev/nvidia*"
            ),
            other => format!("NVML ({shown}) failed to start: {other}"),
        })?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML ({shown}) cannot count the GPUs: {e}"))?;
        if count == 0 {
            return Err(format!("NVML ({shown}) found no NVIDIA GPU on this host"));
        }
        Ok((Self { nvml }, count))
    }
}

impl GpuReader for NvmlGpus {
    fn read_gpus(&self) -> Result<Vec<GpuStats>, BoxError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| format!("NVML cannot count the GPUs: {e}"))?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            // A device that cannot be opened (fallen off the bus, say) is left out: the
            // others are still worth reporting, and its absence shows in the data.
            let Ok(device) = self.nvml.device_by_index(index) else {
                continue;
            };
            let utilization = device.utilization_rates().ok();
            let memory = device.memory_info().ok();
            gpus.push(GpuStats {
                index,
                name: device.name().unwrap_or_default(),
                uuid: device.uuid().unwrap_or_default(),
                utilization_percent: utilization.as_ref().map(|u| u.gpu),
                memory_utilization_percent: utilization.as_ref().map(|u| u.memory),
                memory_total_bytes: memory.as_ref().map(|m| m.total),
                memory_used_bytes: memory.as_ref().map(|m| m.used),
                memory_free_bytes: memory.as_ref().map(|m| m.free),
                temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
                power_usage_milliwatts: device.power_usage().ok(),
                fan_speed_percent: device.fan_speed(0).ok(),
                clock_sm_mhz: device.clock_info(Clock::SM).ok(),
                clock_memory_mhz: device.clock_info(Clock::Memory).ok(),
            });
        }
        Ok(gpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_says_what_to_install_or_set() {
        let err = NvmlGpus::open(Some(Path::new("/nonexistent/libnvidia-ml.so.1")))
            .err()
            .unwrap();
        assert!(
            err.starts_with("cannot load the NVML library /nonexistent/libnvidia-ml.so.1: "),
            "{err}"
        );
        assert!(err.contains("set metrics.gpu.library"), "{err}");
    }

    #[test]
    fn a_library_that_is_not_nvml_is_named() {
        // The C library loads, but has none of NVML's functions.
        let err = NvmlGpus::open(Some(Path::new("libc.so.6"))).err().unwrap();
        assert!(
            err.starts_with("libc.so.6 is not the NVML library ("),
            "{err}"
        );
    }
}
