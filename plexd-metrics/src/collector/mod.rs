//! Collectors turn what the sources read into [`MetricPoint`]s, one group each.
//!
//! Collectors never touch the outside world themselves: every source sits behind a trait
//! (the spec's `SystemReader`, `TunnelStatsReader`, `Pinger`, ...) so that collectors and the
//! [`crate::manager::Manager`] are tested with fakes and without privileges.

mod agent;
mod apps;
mod gpu;
mod latency;
mod system;
mod tunnel;

pub use agent::{
    AbandonedCollections, AgentStats, AgentStatsCollector, DeliveryCounters, DeliveryTotals,
    DestinationCounters, DestinationFigures, KernelCounters, KernelTotals, ReconnectCounter,
};
pub use apps::{AppFetcher, AppResponse, AppStats, AppsCollector};
pub use gpu::{GpuCollector, GpuReader, GpuStats};
pub use latency::{LatencyCollector, LatencyResult, LatencySettings, PeerLister, Pinger};
pub use system::{SystemCollector, SystemReader, SystemStats};
pub use tunnel::{no_handshake_time, TunnelCollector, TunnelStats, TunnelStatsReader};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::api::MetricPoint;

/// Any error a source may return; collectors wrap it with their group's prefix.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a collector produced no (or only some) points this cycle.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// The source behind the collector failed; the text is `metrics: <group>: <cause>`.
    #[error("metrics: {group}: {source}")]
    Source {
        /// The collector's group.
        group: &'static str,
        /// What the source reported.
        source: BoxError,
    },
    /// The cycle was cancelled; `partial` holds what was collected before that.
    #[error("metrics: {group}: collection cancelled")]
    Cancelled {
        /// The collector's group.
        group: &'static str,
        /// Points collected before the cancellation; the Manager keeps them.
        partial: Vec<MetricPoint>,
    },
}

impl CollectError {
    /// Wraps a source's error with the collector's group, as the spec's `metrics: <group>: %w`.
    pub fn source(group: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Source {
            group,
            source: source.into(),
        }
    }
}

/// What the Manager tells every collector about the cycle it is running, from its own
/// schedule: collectors never guess the Manager's timing from the clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cycle {
    /// A report comes before the next cycle: this cycle's points are the last of the
    /// report interval, so summaries over the whole interval belong in them.
    pub ends_report_interval: bool,
}

/// One group's collection: the spec's `Collector` interface.
#[async_trait]
pub trait Collector: Send + Sync {
    /// The group this collector's points carry, for logs.
    fn group(&self) -> &'static str;

    /// Collects the points of `cycle`. Long collections watch `cancel` and return
    /// [`CollectError::Cancelled`] with what they have when it fires.
    async fn collect(
        &self,
        cycle: Cycle,
        cancel: &CancellationToken,
    ) -> Result<Vec<MetricPoint>, CollectError>;
}
