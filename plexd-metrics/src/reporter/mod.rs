//! Where batches go: the spec's `MetricReporter` and its implementations.

mod stdout;

pub use stdout::StdoutReporter;

use async_trait::async_trait;

use crate::api::MetricPoint;
use crate::collector::BoxError;

/// Delivers one batch of points for a node: the spec's `MetricReporter`.
#[async_trait]
pub trait MetricReporter: Send + Sync {
    /// Sends `batch` on behalf of `node_id`. An error means the batch was not accepted.
    async fn report_metrics(&self, node_id: &str, batch: &[MetricPoint]) -> Result<(), BoxError>;
}
