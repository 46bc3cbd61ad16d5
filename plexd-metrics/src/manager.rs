//! The spec's `Manager`: a collect ticker and a report ticker around one buffer.
//!
//! Both tickers run in one task, as in the Go agent, so the buffer needs no lock: it is a
//! local of the loop. A tick that is late because a collection or a report ran long is
//! skipped rather than bunched up, like Go's `time.Ticker`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::{interval_at, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::MetricPoint;
use crate::collector::{CollectError, Collector};
use crate::config::MetricsConfig;
use crate::reporter::MetricReporter;

/// How long the flush at shutdown may take before the agent gives up on it.
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// How [`Manager::run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Metrics are disabled in the config; nothing ran.
    Disabled,
    /// The cancellation token fired; the buffer was flushed on a best-effort basis.
    Cancelled,
}

/// Runs the collectors on the collect interval and hands their points to the reporter.
pub struct Manager {
    cfg: MetricsConfig,
    collectors: Vec<Arc<dyn Collector>>,
    reporter: Arc<dyn MetricReporter>,
    node_id: String,
}

impl Manager {
    /// A manager for `collectors`, reporting through `reporter` on behalf of `node_id`.
    /// `cfg` must have passed validation.
    pub fn new(
        cfg: MetricsConfig,
        collectors: Vec<Arc<dyn Collector>>,
        reporter: Arc<dyn MetricReporter>,
        node_id: impl Into<String>,
    ) -> Self {
        Self {
            cfg,
            collectors,
            reporter,
            node_id: node_id.into(),
        }
    }

    /// Collects and reports until `cancel` fires, then flushes what is buffered.
    pub async fn run(&self, cancel: CancellationToken) -> RunOutcome {
        if !self.cfg.enabled {
            info!(component = "metrics", "metrics disabled");
            return RunOutcome::Disabled;
        }
        // Like Go's time.NewTicker, the first tick comes one interval after the start.
        let start = Instant::now();
        let mut collect = interval_at(start + self.cfg.collect_interval, self.cfg.collect_interval);
        let mut report = interval_at(start + self.cfg.report_interval, self.cfg.report_interval);
        collect.set_missed_tick_behavior(MissedTickBehavior::Skip);
        report.set_missed_tick_behavior(MissedTickBehavior::Skip);

        let mut buffer: Vec<MetricPoint> = Vec::new();
        loop {
            // Biased: when both tickers fire at once, the points just collected go out with
            // the report instead of waiting a whole report interval.
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                _ = collect.tick() => {
                    let points = self.collect_once(&cancel).await;
                    debug!(component = "metrics", points = points.len(), buffered = buffer.len() + points.len(), "collect cycle done");
                    buffer.extend(points);
                    if buffer.len() >= self.cfg.batch_limit() {
                        self.report(std::mem::take(&mut buffer)).await;
                    }
                }
                _ = report.tick() => self.report(std::mem::take(&mut buffer)).await,
            }
        }

        // Best effort: the run's own token has fired, so the flush gets a deadline instead.
        if !buffer.is_empty()
            && tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, self.report(buffer))
                .await
                .is_err()
        {
            warn!(
                component = "metrics",
                timeout = ?SHUTDOWN_FLUSH_TIMEOUT,
                "final metrics flush timed out; buffered points were dropped"
            );
        }
        RunOutcome::Cancelled
    }

    /// Runs every collector once, side by side, and returns their points. A failing
    /// collector is logged and skipped; a cancelled one contributes what it had.
    pub async fn collect_once(&self, cancel: &CancellationToken) -> Vec<MetricPoint> {
        let results = join_all(self.collectors.iter().map(|c| c.collect(cancel))).await;
        let mut points = Vec::new();
        for result in results {
            match result {
                Ok(p) => points.extend(p),
                Err(CollectError::Cancelled { group, partial }) => {
                    warn!(
                        component = "metrics",
                        group, "collection cancelled; keeping partial results"
                    );
                    points.extend(partial);
                }
                Err(e) => warn!(component = "metrics", error = %e, "collector failed"),
            }
        }
        points
    }

    /// Sends `points` in batches of at most `batch_size`. A failed batch is logged and
    /// dropped, as the spec's error table says.
    async fn report(&self, points: Vec<MetricPoint>) {
        for batch in points.chunks(self.cfg.batch_limit()) {
            if let Err(e) = self.reporter.report_metrics(&self.node_id, batch).await {
                warn!(component = "metrics", error = %e, points = batch.len(), "metrics report failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::BoxError;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use tokio::sync::mpsc;

    /// Returns one point per call whose data is the call's sequence number, or fails.
    struct Counting {
        group: &'static str,
        calls: AtomicU64,
        fail: bool,
        per_call: usize,
    }

    impl Counting {
        fn new(group: &'static str) -> Arc<Self> {
            Self::with(group, false, 1)
        }
        fn with(group: &'static str, fail: bool, per_call: usize) -> Arc<Self> {
            Arc::new(Self {
                group,
                calls: AtomicU64::new(0),
                fail,
                per_call,
            })
        }
    }

    #[async_trait]
    impl Collector for Counting {
        fn group(&self) -> &'static str {
            self.group
        }
        async fn collect(&self, _: &CancellationToken) -> Result<Vec<MetricPoint>, CollectError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail {
                return Err(CollectError::source(self.group, "broken"));
            }
            Ok((0..self.per_call)
                .map(|i| {
                    MetricPoint::new(
                        chrono::Utc::now(),
                        self.group,
                        "",
                        &serde_json::json!({"n": n, "i": i}),
                    )
                    .unwrap()
                })
                .collect())
        }
    }

    /// Returns its partial points as cancelled.
    struct Cancelled;
    #[async_trait]
    impl Collector for Cancelled {
        fn group(&self) -> &'static str {
            "latency"
        }
        async fn collect(&self, _: &CancellationToken) -> Result<Vec<MetricPoint>, CollectError> {
            let p = MetricPoint::new(
                chrono::Utc::now(),
                "latency",
                "peer-1",
                &serde_json::json!({}),
            )
            .unwrap();
            Err(CollectError::Cancelled {
                group: "latency",
                partial: vec![p],
            })
        }
    }

    /// Records each batch with the virtual time it arrived at, and can fail the first few.
    struct Recorder {
        tx: mpsc::UnboundedSender<(Duration, Vec<MetricPoint>)>,
        start: Instant,
        failures_left: Mutex<u32>,
    }

    #[async_trait]
    impl MetricReporter for Recorder {
        async fn report_metrics(
            &self,
            node_id: &str,
            batch: &[MetricPoint],
        ) -> Result<(), BoxError> {
            assert_eq!(node_id, "node-1");
            self.tx
                .send((self.start.elapsed(), batch.to_vec()))
                .unwrap();
            let mut left = self.failures_left.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err("control plane unavailable".into());
            }
            Ok(())
        }
    }

    struct Harness {
        batches: mpsc::UnboundedReceiver<(Duration, Vec<MetricPoint>)>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<RunOutcome>,
    }

    fn cfg(collect: u64, report: u64, batch: i64) -> MetricsConfig {
        MetricsConfig {
            collect_interval: Duration::from_secs(collect),
            report_interval: Duration::from_secs(report),
            batch_size: batch,
            ..MetricsConfig::default()
        }
    }

    fn start(cfg: MetricsConfig, collectors: Vec<Arc<dyn Collector>>, failures: u32) -> Harness {
        let (tx, batches) = mpsc::unbounded_channel();
        let reporter = Arc::new(Recorder {
            tx,
            start: Instant::now(),
            failures_left: Mutex::new(failures),
        });
        let manager = Manager::new(cfg, collectors, reporter, "node-1");
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { manager.run(cancel).await }
        });
        Harness {
            batches,
            cancel,
            task,
        }
    }

    fn seqs(batch: &[MetricPoint]) -> Vec<(String, u64)> {
        batch
            .iter()
            .map(|p| (p.group.clone(), p.data["n"].as_u64().unwrap_or(0)))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_returns_at_once_without_collecting() {
        let c = Counting::new("system");
        let mut h = start(
            MetricsConfig {
                enabled: false,
                ..cfg(15, 60, 100)
            },
            vec![c.clone()],
            0,
        );
        assert_eq!((&mut h.task).await.unwrap(), RunOutcome::Disabled);
        assert_eq!(c.calls.load(Ordering::SeqCst), 0);
        assert!(h.batches.recv().await.is_none(), "no report was made");
    }

    #[tokio::test(start_paused = true)]
    async fn report_tick_sends_what_the_collect_ticks_buffered() {
        let (sys, agent) = (Counting::new("system"), Counting::new("agent"));
        let mut h = start(cfg(15, 60, 100), vec![sys.clone(), agent.clone()], 0);

        let (at, batch) = h.batches.recv().await.unwrap();
        assert_eq!(at, Duration::from_secs(60));
        let mut got = seqs(&batch);
        got.sort();
        let want: Vec<_> = (1..=4)
            .flat_map(|n| [("agent".to_owned(), n), ("system".to_owned(), n)])
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(got, want, "four collect ticks, both collectors each time");

        let (at, batch) = h.batches.recv().await.unwrap();
        assert_eq!(at, Duration::from_secs(120));
        assert_eq!(batch.len(), 8, "the buffer was swapped, not accumulated");
        h.cancel.cancel();
        assert_eq!(h.task.await.unwrap(), RunOutcome::Cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_collector_does_not_stop_the_others() {
        let (bad, good) = (Counting::with("tunnel", true, 1), Counting::new("system"));
        let mut h = start(cfg(15, 30, 100), vec![bad.clone(), good.clone()], 0);
        let (_, batch) = h.batches.recv().await.unwrap();
        assert_eq!(seqs(&batch), [("system".into(), 1), ("system".into(), 2)]);
        assert_eq!(
            bad.calls.load(Ordering::SeqCst),
            2,
            "the failing collector is retried each cycle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_all_collectors_fail_the_report_tick_is_a_no_op() {
        let bad = Counting::with("system", true, 1);
        let mut h = start(cfg(5, 10, 100), vec![bad.clone()], 0);
        // Let virtual time pass seven collect ticks and three report ticks, then stop:
        // nothing may have been reported.
        tokio::time::sleep(Duration::from_secs(37)).await;
        h.cancel.cancel();
        assert_eq!(h.task.await.unwrap(), RunOutcome::Cancelled);
        assert_eq!(bad.calls.load(Ordering::SeqCst), 7);
        assert!(h.batches.recv().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_report_clears_the_buffer_and_the_next_cycle_goes_on() {
        let c = Counting::new("system");
        let mut h = start(cfg(15, 30, 100), vec![c], 1);
        let (at, first) = h.batches.recv().await.unwrap();
        assert_eq!(
            (at, seqs(&first)),
            (
                Duration::from_secs(30),
                vec![("system".into(), 1), ("system".into(), 2)]
            )
        );
        let (at, second) = h.batches.recv().await.unwrap();
        assert_eq!(at, Duration::from_secs(60));
        assert_eq!(seqs(&second), [("system".into(), 3), ("system".into(), 4)]);
    }

    #[tokio::test(start_paused = true)]
    async fn reaching_batch_size_reports_before_the_tick() {
        let c = Counting::with("tunnel", false, 3);
        let mut h = start(cfg(5, 60, 6), vec![c], 0);
        let (at, batch) = h.batches.recv().await.unwrap();
        assert_eq!(
            at,
            Duration::from_secs(10),
            "the second collect filled the batch"
        );
        assert_eq!(batch.len(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_never_exceed_batch_size() {
        let c = Counting::with("tunnel", false, 5);
        let mut h = start(cfg(5, 10, 4), vec![c], 0);
        let sizes = [
            h.batches.recv().await.unwrap().1.len(),
            h.batches.recv().await.unwrap().1.len(),
        ];
        assert_eq!(
            sizes,
            [4, 1],
            "five points go out as a full batch and a remainder"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_flushes_the_buffer_and_returns_cancelled() {
        let c = Counting::new("system");
        let mut h = start(cfg(5, 60, 100), vec![c], 0);
        tokio::time::sleep(Duration::from_secs(16)).await;
        h.cancel.cancel();
        assert_eq!(h.task.await.unwrap(), RunOutcome::Cancelled);
        let (at, batch) = h.batches.recv().await.unwrap();
        assert_eq!(at, Duration::from_secs(16));
        assert_eq!(
            seqs(&batch),
            [
                ("system".into(), 1),
                ("system".into(), 2),
                ("system".into(), 3)
            ]
        );
        assert!(h.batches.recv().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn partial_results_of_a_cancelled_collector_are_kept() {
        let mut h = start(cfg(5, 10, 100), vec![Arc::new(Cancelled)], 0);
        let (_, batch) = h.batches.recv().await.unwrap();
        assert_eq!(batch.len(), 2);
        assert!(batch.iter().all(|p| p.peer_id == "peer-1"));
    }
}
