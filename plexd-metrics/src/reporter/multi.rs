//! The spec's `MultiReporter`: every batch to the control plane and to the local endpoint.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tracing::warn;
use uuid::Uuid;

use super::MetricReporter;
use crate::api::MetricPoint;
use crate::collector::BoxError;

/// Most batches that may wait for the local endpoint at once. A local endpoint that falls
/// further behind (it hangs until its timeout on every batch) misses batches, with a
/// warning, instead of holding an ever-growing pile of them in memory.
pub const LOCAL_BACKLOG: usize = 16;
/// Keys of batches already handed to the local endpoint that are remembered, so that the
/// control plane's retries of a batch do not send it to the local endpoint again.
const REMEMBERED_KEYS: usize = 1024;

/// Sends each batch to a primary reporter (the control plane) and a local one.
///
/// Both deliveries start at once. The result is the primary's alone, returned as soon as the
/// primary has answered: the Manager keeps or drops the batch on it, so a slow or hanging
/// local endpoint must neither delay it nor make it retry. The local delivery goes on in its
/// own task; local deliveries run one after another in batch order, their failures are
/// logged, and [`MetricReporter::close`] waits for the last one at shutdown.
pub struct MultiReporter {
    platform: Arc<dyn MetricReporter>,
    local: Arc<dyn MetricReporter>,
    last_local: Mutex<Option<JoinHandle<()>>>,
    local_backlog: Arc<AtomicUsize>,
    local_keys: Mutex<VecDeque<Uuid>>,
}

impl MultiReporter {
    /// Dispatches to `platform`, whose errors are returned, and to `local`, whose errors are
    /// logged.
    pub fn new(platform: Arc<dyn MetricReporter>, local: Arc<dyn MetricReporter>) -> Self {
        Self {
            platform,
            local,
            last_local: Mutex::new(None),
            local_backlog: Arc::new(AtomicUsize::new(0)),
            local_keys: Mutex::new(VecDeque::new()),
        }
    }

    /// Whether the batch with `key` goes to the local endpoint: only on its first attempt.
    fn first_attempt(&self, key: Uuid) -> bool {
        let mut keys = self.local_keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.contains(&key) {
            return false;
        }
        if keys.len() == REMEMBERED_KEYS {
            keys.pop_front();
        }
        keys.push_back(key);
        true
    }

    fn start_local(&self, node_id: &str, batch: &[MetricPoint]) {
        let behind = self.local_backlog.load(Ordering::SeqCst);
        if behind >= LOCAL_BACKLOG {
            warn!(
                component = "metrics",
                error = %format!("the local endpoint is {behind} batches behind; this batch of {} points is not sent to it", batch.len()),
                "local metrics report failed"
            );
            return;
        }
        self.local_backlog.fetch_add(1, Ordering::SeqCst);
        let mut last = self.last_local.lock().unwrap_or_else(|p| p.into_inner());
        let previous = last.take();
        let (local, backlog) = (self.local.clone(), self.local_backlog.clone());
        let (node_id, batch) = (node_id.to_owned(), batch.to_vec());
        *last = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            if let Err(e) = local.report_metrics(&node_id, &batch).await {
                warn!(component = "metrics", error = %e, "local metrics report failed");
            }
            backlog.fetch_sub(1, Ordering::SeqCst);
        }));
    }
}

#[async_trait]
impl MetricReporter for MultiReporter {
    async fn report_metrics(&self, node_id: &str, batch: &[MetricPoint]) -> Result<(), BoxError> {
        self.start_local(node_id, batch);
        self.platform.report_metrics(node_id, batch).await
    }

    async fn report_batch(
        &self,
        node_id: &str,
        key: Uuid,
        batch: &[MetricPoint],
    ) -> Result<(), BoxError> {
        if self.first_attempt(key) {
            self.start_local(node_id, batch);
        }
        self.platform.report_batch(node_id, key, batch).await
    }

    async fn close(&self) {
        let last = self
            .last_local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(last) = last {
            let _ = last.await;
        }
        self.platform.close().await;
        self.local.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::{mpsc, Semaphore};

    /// Records batch sizes; fails when told to; waits for a permit when gated.
    struct Fake {
        fail: bool,
        gate: Semaphore,
        seen: mpsc::UnboundedSender<usize>,
    }

    fn fake(fail: bool, open: bool) -> (Arc<Fake>, mpsc::UnboundedReceiver<usize>) {
        let (seen, rx) = mpsc::unbounded_channel();
        let gate = Semaphore::new(if open { 1000 } else { 0 });
        (Arc::new(Fake { fail, gate, seen }), rx)
    }

    #[async_trait]
    impl MetricReporter for Fake {
        async fn report_metrics(&self, _: &str, batch: &[MetricPoint]) -> Result<(), BoxError> {
            let _permit = self.gate.acquire().await?;
            self.seen.send(batch.len())?;
            if self.fail {
                Err("refused".into())
            } else {
                Ok(())
            }
        }
    }

    fn points(n: usize) -> Vec<MetricPoint> {
        (0..n)
            .map(|i| {
                MetricPoint::new(
                    chrono::Utc::now(),
                    "agent",
                    "",
                    &serde_json::json!({"i": i}),
                )
                .unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn only_the_platform_error_is_returned() {
        for (platform_fails, local_fails) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            let (platform, mut p_rx) = fake(platform_fails, true);
            let (local, mut l_rx) = fake(local_fails, true);
            let multi = MultiReporter::new(platform, local);
            let result = multi.report_metrics("n", &points(3)).await;
            assert_eq!(
                result.is_err(),
                platform_fails,
                "{platform_fails} {local_fails}"
            );
            multi.close().await;
            assert_eq!(p_rx.recv().await, Some(3));
            assert_eq!(
                l_rx.recv().await,
                Some(3),
                "the local endpoint got the batch too"
            );
        }
    }

    #[tokio::test]
    async fn a_hanging_local_endpoint_does_not_hold_the_platform_result() {
        let (platform, mut p_rx) = fake(false, true);
        let (local, mut l_rx) = fake(false, false);
        let multi = MultiReporter::new(platform, local.clone());
        for n in 1..=3 {
            multi.report_metrics("n", &points(n)).await.unwrap();
            assert_eq!(p_rx.recv().await, Some(n));
        }
        assert!(
            l_rx.try_recv().is_err(),
            "the local endpoint has answered nothing yet"
        );
        local.gate.add_permits(1000);
        multi.close().await;
        let local_order: Vec<usize> = std::iter::from_fn(|| l_rx.try_recv().ok()).collect();
        assert_eq!(local_order, [1, 2, 3], "in order, and all awaited by close");
    }

    #[tokio::test]
    async fn retries_of_a_batch_go_to_the_local_endpoint_once() {
        let (platform, mut p_rx) = fake(true, true);
        let (local, mut l_rx) = fake(false, true);
        let multi = MultiReporter::new(platform, local);
        let key = Uuid::new_v4();
        for _ in 0..3 {
            assert!(multi.report_batch("n", key, &points(2)).await.is_err());
        }
        multi
            .report_batch("n", Uuid::new_v4(), &points(5))
            .await
            .ok();
        multi.close().await;
        assert_eq!(std::iter::from_fn(|| p_rx.try_recv().ok()).count(), 4);
        let local_got: Vec<usize> = std::iter::from_fn(|| l_rx.try_recv().ok()).collect();
        assert_eq!(local_got, [2, 5]);
    }

    #[tokio::test]
    async fn a_local_endpoint_too_far_behind_misses_batches_but_the_platform_does_not() {
        let (platform, mut p_rx) = fake(false, true);
        let (local, mut l_rx) = fake(false, false);
        let multi = MultiReporter::new(platform, local.clone());
        for _ in 0..LOCAL_BACKLOG + 3 {
            multi.report_metrics("n", &points(1)).await.unwrap();
        }
        let platform_got = std::iter::from_fn(|| p_rx.try_recv().ok()).count();
        assert_eq!(platform_got, LOCAL_BACKLOG + 3);
        local.gate.add_permits(1000);
        multi.close().await;
        assert_eq!(
            std::iter::from_fn(|| l_rx.try_recv().ok()).count(),
            LOCAL_BACKLOG
        );
    }
}
