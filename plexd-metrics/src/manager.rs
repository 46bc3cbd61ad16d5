//! The spec's `Manager`: a collect ticker and a report ticker around one buffer, and a
//! retry queue so that no batch the control plane did not accept is lost.
//!
//! Both tickers, the buffer, the queue and the one request in flight live in one task, as in
//! the Go agent, so nothing here needs a lock. A tick that is late because a collection ran
//! long is skipped rather than bunched up, like Go's `time.Ticker`.
//!
//! The spec drops a batch whose report failed; this Manager keeps it. A failed batch stays
//! at the head of the queue with its idempotency key and is sent again after an exponential
//! backoff with jitter, before any newer batch, so the control plane sees points in order.
//! A batch the control plane refuses (4xx other than 408/429) is dropped and counted. The
//! queue ([`crate::queue`]) holds at most `metrics.queue.max_points` in memory, or
//! `metrics.queue.max_bytes` in `metrics.queue.dir`; beyond that the oldest points go, counted.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_util::future::{join_all, BoxFuture};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::{interval_at, sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::api::MetricPoint;
use crate::collector::{
    AbandonedCollections, BoxError, CollectError, Collector, Cycle, DeliveryCounters,
    DeliveryTotals, ReconnectCounter,
};
use crate::config::Settings;
use crate::prometheus::exposition::PointsTap;
use crate::queue::{DeliveryQueue, QueueLimits, QueueState};
use crate::reporter::{classify, Failure, MetricReporter};

/// How long the flush at shutdown may take before the agent gives up on it, with the queue
/// in memory (whatever is not sent by then is lost).
pub const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// The same with a durable queue: what is not sent stays on disk for the next start, so a
/// stop need not wait for a destination that is away.
pub const DURABLE_SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait before the first retry of a failed batch; it doubles with every further failure.
pub const RETRY_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait a server's `Retry-After` can impose.
pub const RETRY_AFTER_LIMIT: Duration = Duration::from_secs(5 * 60);

/// How [`Manager::run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Metrics are disabled in the config; nothing ran.
    Disabled,
    /// The cancellation token fired; the buffer was flushed on a best-effort basis.
    Cancelled,
}

/// The delivery figures of a running Manager, shared with the `agent` group's collector
/// and the readiness check.
#[derive(Debug)]
pub struct DeliveryStats {
    queued: AtomicU64,
    memory: AtomicU64,
    dropped: AtomicU64,
    /// Whether the last seal dropped points; cleared by an accepted report.
    dropping: AtomicBool,
    rejected: AtomicU64,
    reconnects: AtomicU64,
    last_report: AtomicU8,
    spooled_points: AtomicU64,
    spooled_bytes: AtomicU64,
    corrupt: AtomicU64,
    queue: Mutex<QueueState>,
}

impl Default for DeliveryStats {
    fn default() -> Self {
        Self {
            queued: AtomicU64::new(0),
            memory: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            dropping: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            last_report: AtomicU8::new(0),
            spooled_points: AtomicU64::new(0),
            spooled_bytes: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            queue: Mutex::new(QueueState::Memory),
        }
    }
}

/// How the most recent report attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LastReport {
    /// No report was attempted yet.
    None,
    /// The reporter accepted the batch.
    Accepted,
    /// The attempt failed and the batch stays queued for a retry.
    Failed,
    /// The control plane refused the batch (4xx); it was dropped.
    Rejected,
}

impl LastReport {
    /// The word used in the health endpoint's answers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Accepted => "accepted",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
        }
    }
}

impl DeliveryStats {
    /// Where the queue keeps its batches now.
    pub fn queue_state(&self) -> QueueState {
        self.queue.lock().expect("not poisoned").clone()
    }

    /// Points held in memory by batches without a file: what `metrics.queue.max_points`
    /// bounds.
    pub fn memory_points(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }

    /// Whether the last seal had to drop the oldest points.
    pub fn dropping(&self) -> bool {
        self.dropping.load(Ordering::Relaxed)
    }

    /// Copies the queue's figures, for the `agent` group and readiness.
    fn publish(&self, queue: &DeliveryQueue) {
        self.queued
            .store(queue.queued_points() as u64, Ordering::Relaxed);
        self.memory
            .store(queue.memory_points() as u64, Ordering::Relaxed);
        self.spooled_points
            .store(queue.spooled_points(), Ordering::Relaxed);
        self.spooled_bytes
            .store(queue.spooled_bytes(), Ordering::Relaxed);
        self.corrupt
            .store(queue.corrupt_batches(), Ordering::Relaxed);
        let state = queue.state();
        let mut current = self.queue.lock().expect("not poisoned");
        if *current != state {
            *current = state;
        }
    }

    /// How the most recent report attempt ended.
    pub fn last_report(&self) -> LastReport {
        match self.last_report.load(Ordering::Relaxed) {
            1 => LastReport::Accepted,
            2 => LastReport::Failed,
            3 => LastReport::Rejected,
            _ => LastReport::None,
        }
    }

    fn set_last_report(&self, outcome: LastReport) {
        let code = match outcome {
            LastReport::None => 0,
            LastReport::Accepted => 1,
            LastReport::Failed => 2,
            LastReport::Rejected => 3,
        };
        self.last_report.store(code, Ordering::Relaxed);
    }
}

/// When the Manager's two tickers last fired: the liveness check's evidence that the loop
/// is turning. Written by the Manager's task, read by the health endpoint, without a lock.
#[derive(Debug)]
pub struct Heartbeat {
    // Tick times are kept as milliseconds after this instant, so that they fit in atomics.
    base: Instant,
    collect_ms: AtomicU64,
    report_ms: AtomicU64,
}

/// Marks a ticker that has not fired since the loop started (or a loop that has not started).
const NEVER: u64 = u64::MAX;

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            collect_ms: AtomicU64::new(NEVER),
            report_ms: AtomicU64::new(NEVER),
        }
    }
}

impl Heartbeat {
    /// When the collect ticker last fired, or the loop started; `None` before it started.
    pub fn last_collect(&self) -> Option<Instant> {
        self.read(&self.collect_ms)
    }

    /// When the report ticker last fired, or the loop started; `None` before it started.
    pub fn last_report(&self) -> Option<Instant> {
        self.read(&self.report_ms)
    }

    fn read(&self, slot: &AtomicU64) -> Option<Instant> {
        match slot.load(Ordering::Relaxed) {
            NEVER => None,
            ms => Some(self.base + Duration::from_millis(ms)),
        }
    }

    fn collect_fired(&self) {
        self.beat(&self.collect_ms);
    }

    fn report_fired(&self) {
        self.beat(&self.report_ms);
    }

    fn beat(&self, slot: &AtomicU64) {
        let ms = Instant::now()
            .saturating_duration_since(self.base)
            .as_millis();
        slot.store(u64::try_from(ms).unwrap_or(NEVER - 1), Ordering::Relaxed);
    }
}

impl DeliveryCounters for DeliveryStats {
    fn delivery_totals(&self) -> DeliveryTotals {
        DeliveryTotals {
            queued_points: self.queued.load(Ordering::Relaxed),
            dropped_points: self.dropped.load(Ordering::Relaxed),
            rejected_points: self.rejected.load(Ordering::Relaxed),
            spooled_points: self.spooled_points.load(Ordering::Relaxed),
            spooled_bytes: self.spooled_bytes.load(Ordering::Relaxed),
            corrupt_batches: self.corrupt.load(Ordering::Relaxed),
        }
    }
}

/// A recovery is the first accepted report after one or more failed ones.
impl ReconnectCounter for DeliveryStats {
    fn reconnect_count(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// The wait before retry number `failures` (1 for the first): doubling from
/// [`RETRY_INITIAL_BACKOFF`] up to `cap`, then a random point in its upper half, so that
/// many agents that lost the control plane at once do not come back in step. A server's
/// `Retry-After` is honoured when it asks for longer, up to [`RETRY_AFTER_LIMIT`].
fn backoff(
    failures: u32,
    retry_after: Option<Duration>,
    cap: Duration,
    rng: &mut fastrand::Rng,
) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    let full = RETRY_INITIAL_BACKOFF
        .saturating_mul(1 << doublings)
        .min(cap.max(RETRY_INITIAL_BACKOFF));
    let half = full / 2;
    let jittered = half + half.mul_f64(rng.f64());
    match retry_after {
        Some(asked) => jittered.max(asked.min(RETRY_AFTER_LIMIT)),
        None => jittered,
    }
}

/// What the Manager runs by: its two intervals and the bounds of its queue.
#[derive(Clone, Copy, Debug)]
pub struct ManagerOptions {
    /// Time between collection cycles.
    pub collect_interval: Duration,
    /// Time between reports; also the cap of the retry backoff (a server's `Retry-After` may
    /// ask for longer).
    pub report_interval: Duration,
    /// The bounds of the queue, in memory or durable.
    pub limits: QueueLimits,
}

impl ManagerOptions {
    /// What `settings` ask for; `None` when metrics are disabled.
    pub fn from_settings(settings: &Settings) -> Option<Self> {
        let metrics = settings.metrics.as_ref()?;
        let cfg = &settings.config.metrics;
        Some(Self {
            collect_interval: cfg.collect_interval,
            report_interval: cfg.report_interval,
            limits: QueueLimits {
                batch_size: metrics.batch_limit.get(),
                max_points: metrics.queue_max_points.get(),
                max_bytes: cfg.queue.max_bytes.as_u64(),
                max_memory_bytes: usize::try_from(cfg.queue.max_memory_bytes.as_u64())
                    .unwrap_or(usize::MAX),
            },
        })
    }
}

/// Runs the collectors on the collect interval and hands their points to each destination.
pub struct Manager {
    /// `None` when metrics are disabled: [`Manager::run`] returns at once.
    options: Option<ManagerOptions>,
    collectors: Vec<Arc<dyn Collector>>,
    node_id: String,
    heartbeat: Arc<Heartbeat>,
    /// The first is the primary destination (the control plane, or stdout): its figures
    /// are the `agent` group's and readiness'.
    destinations: Vec<Destination>,
    /// Where each cycle's points go besides the queues: the Prometheus exposition.
    tap: Option<PointsTap>,
    /// Collections abandoned because they ran past their cycle.
    collection: Arc<CollectionStats>,
}

/// A destination before the loop runs: its reporter, its figures and, when given, its
/// queue (taken by [`Manager::run`]; one in memory when none was given).
struct Destination {
    name: &'static str,
    reporter: Arc<dyn MetricReporter>,
    stats: Arc<DeliveryStats>,
    queue: Mutex<Option<DeliveryQueue>>,
}

impl Manager {
    /// A manager for `collectors`, reporting through `reporter` on behalf of `node_id`, on
    /// the schedule of `options`; without options (metrics disabled) it only collects when
    /// asked ([`Manager::collect_once`]).
    pub fn new(
        options: Option<ManagerOptions>,
        collectors: Vec<Arc<dyn Collector>>,
        reporter: Arc<dyn MetricReporter>,
        node_id: impl Into<String>,
    ) -> Self {
        Self {
            options,
            collectors,
            node_id: node_id.into(),
            heartbeat: Arc::default(),
            destinations: vec![Destination {
                name: PRIMARY,
                reporter,
                stats: Arc::default(),
                queue: Mutex::new(None),
            }],
            tap: None,
            collection: Arc::default(),
        }
    }

    /// Counts abandoned collections into `stats` (which the `agent` collector reads).
    pub fn with_collection_stats(mut self, stats: Arc<CollectionStats>) -> Self {
        self.collection = stats;
        self
    }

    /// Names the primary destination in logs (`control_plane` unless said otherwise).
    pub fn with_primary_name(mut self, name: &'static str) -> Self {
        self.destinations[0].name = name;
        self
    }

    /// Queues the primary destination's batches through `queue` (a durable one, say)
    /// instead of one in memory. Its state is published at once, so that readiness tells it
    /// before the loop starts.
    pub fn with_queue(self, queue: DeliveryQueue) -> Self {
        let primary = &self.destinations[0];
        primary.stats.publish(&queue);
        *primary.queue.lock().expect("not poisoned") = Some(queue);
        self
    }

    /// Adds a destination with a queue of its own (`None`: in memory), whose figures go to
    /// `stats`: it gets every point, in order, and its delivery neither waits for nor holds
    /// back the others'.
    pub fn add_destination(
        &mut self,
        name: &'static str,
        reporter: Arc<dyn MetricReporter>,
        queue: Option<DeliveryQueue>,
        stats: Arc<DeliveryStats>,
    ) {
        if let Some(queue) = &queue {
            stats.publish(queue);
        }
        self.destinations.push(Destination {
            name,
            reporter,
            stats,
            queue: Mutex::new(queue),
        });
    }

    /// Hands a copy of every cycle's points to `tap` (the Prometheus exposition), which
    /// never makes the loop wait.
    pub fn set_points_tap(&mut self, tap: PointsTap) {
        self.tap = Some(tap);
    }

    /// Records the tickers' firing times in `heartbeat` (which the liveness check reads).
    pub fn with_heartbeat(mut self, heartbeat: Arc<Heartbeat>) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Publishes the primary destination's delivery figures into `stats` (which the
    /// `agent` collector and readiness read).
    pub fn with_delivery_stats(mut self, stats: Arc<DeliveryStats>) -> Self {
        self.destinations[0].stats = stats;
        self
    }

    /// Collects and reports until `cancel` fires, then flushes what is buffered.
    pub async fn run(&self, cancel: CancellationToken) -> RunOutcome {
        let Some(options) = self.options else {
            info!(component = "metrics", "metrics disabled");
            return RunOutcome::Disabled;
        };
        // Like Go's time.NewTicker, the first tick comes one interval after the start.
        let start = Instant::now();
        let mut collect = interval_at(start + options.collect_interval, options.collect_interval);
        let mut report = interval_at(start + options.report_interval, options.report_interval);
        collect.set_missed_tick_behavior(MissedTickBehavior::Skip);
        report.set_missed_tick_behavior(MissedTickBehavior::Skip);
        // The start counts as a beat of both, so that the loop is alive before its first tick.
        self.heartbeat.collect_fired();
        self.heartbeat.report_fired();

        let mut rng = fastrand::Rng::new();
        let mut lanes: Vec<Lane> = self
            .destinations
            .iter()
            .map(|d| {
                let queue = d
                    .queue
                    .lock()
                    .expect("not poisoned")
                    .take()
                    .unwrap_or_else(|| DeliveryQueue::in_memory(options.limits));
                d.stats.publish(&queue);
                Lane {
                    name: d.name,
                    reporter: d.reporter.clone(),
                    stats: d.stats.clone(),
                    queue,
                    in_flight: None,
                    retry: None,
                    failures: 0,
                }
            })
            .collect();
        let mut cycle = RunningCycle::default();
        loop {
            for lane in &mut lanes {
                lane.send_head(&self.node_id);
            }
            // Biased: cancellation first; then a finished request, so the next batch goes
            // out at once; when both tickers fire together, the points just collected go out
            // with the report instead of waiting a whole report interval.
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                event = next_event(&mut lanes) => match event {
                    LaneEvent::Answered(i, result) => {
                        let lane = &mut lanes[i];
                        if let Some(after) = lane.settle(result) {
                            let wait = backoff(lane.failures, after, options.report_interval, &mut rng);
                            debug!(component = "metrics", destination = lane.name, retry_in = ?wait, failures = lane.failures, "retry scheduled");
                            lane.retry = Some(Box::pin(sleep_until(Instant::now() + wait)));
                        }
                    }
                    LaneEvent::RetryDue => {}
                },
                Some((group, result)) = cycle.next(), if cycle.is_running() => {
                    let points = cycle.finished(group, result);
                    self.deliver(points, &mut lanes);
                    if !cycle.is_running() {
                        self.cycle_done(&mut cycle, &mut lanes);
                    }
                }
                due = collect.tick() => {
                    self.heartbeat.collect_fired();
                    if cycle.is_running() {
                        cycle.abandon(&self.collection);
                        self.cycle_done(&mut cycle, &mut lanes);
                    }
                    cycle.start(
                        &self.collectors,
                        Cycle {
                            ends_report_interval: ends_report_interval(
                                due.saturating_duration_since(start),
                                options.collect_interval,
                                options.report_interval,
                            ),
                        },
                        &cancel,
                    );
                }
                _ = report.tick() => {
                    self.heartbeat.report_fired();
                    // A report due while a cycle runs waits for its points, as it would
                    // behind a collection that ran in the loop; never past the next tick.
                    if cycle.is_running() {
                        cycle.report_due = true;
                    } else {
                        for lane in &mut lanes {
                            lane.enqueue();
                        }
                    }
                }
            }
        }
        // The cancellation reached the collectors still running too: what they return
        // promptly goes out with the flush.
        if cycle.is_running() {
            let drained = tokio::time::timeout(CANCELLED_COLLECT_GRACE, async {
                while let Some((group, result)) = cycle.next().await {
                    let points = cycle.finished(group, result);
                    self.deliver(points, &mut lanes);
                }
            })
            .await;
            if drained.is_err() {
                cycle.abandon(&self.collection);
            }
        }
        join_all(lanes.into_iter().map(|lane| lane.flush(&self.node_id))).await;
        RunOutcome::Cancelled
    }

    /// Hands one collector's points to the exposition and to every lane. A buffer that
    /// reaches batch_size is sealed at once, before the tick.
    fn deliver(&self, points: Vec<MetricPoint>, lanes: &mut [Lane]) {
        if points.is_empty() {
            return;
        }
        if let Some(tap) = &self.tap {
            tap.collected(&points);
        }
        // Every lane but the last gets a copy; the last takes the points.
        let mut points = Some(points);
        let count = lanes.len();
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mine = if i + 1 == count {
                points.take().unwrap_or_default()
            } else {
                points.clone().unwrap_or_default()
            };
            let dropped = lane.queue.collected(mine, lane.in_flight.is_some());
            lane.count_dropped(dropped);
            lane.stats.publish(&lane.queue);
        }
    }

    /// Ends a cycle whose collectors all finished or were abandoned: a report that came due
    /// meanwhile goes out now.
    fn cycle_done(&self, cycle: &mut RunningCycle, lanes: &mut [Lane]) {
        debug!(
            component = "metrics",
            points = cycle.points,
            buffered = lanes[0].queue.buffered(),
            "collect cycle done"
        );
        if std::mem::take(&mut cycle.report_due) {
            for lane in lanes.iter_mut() {
                lane.enqueue();
            }
        }
        // The cycle's temporary allocations are gone by now.
        crate::memory::release_free_memory();
    }

    /// Runs every collector once, side by side, and returns their points. A failing
    /// collector is logged and skipped; a cancelled one contributes what it had.
    pub async fn collect_once(&self, cycle: Cycle, cancel: &CancellationToken) -> Vec<MetricPoint> {
        let results = join_all(self.collectors.iter().map(|c| c.collect(cycle, cancel))).await;
        results.into_iter().flat_map(points_of).collect()
    }
}

/// How long collectors still running at shutdown may take to hand in what they have.
const CANCELLED_COLLECT_GRACE: Duration = Duration::from_secs(1);

/// One collector's work in a cycle: its group and what it returned.
type Collecting = BoxFuture<'static, (&'static str, Result<Vec<MetricPoint>, CollectError>)>;

/// The collectors of the cycle in progress. The loop polls them beside its tickers and
/// lanes, so a slow source holds back neither the report tick, the other groups, nor the
/// heartbeat that liveness reads; one still running at the next tick is abandoned.
#[derive(Default)]
struct RunningCycle {
    collecting: FuturesUnordered<Collecting>,
    /// The groups that have not finished yet, to name what is abandoned.
    pending: Vec<&'static str>,
    /// Points delivered in this cycle so far.
    points: usize,
    /// A report tick fired while the cycle ran.
    report_due: bool,
}

impl RunningCycle {
    fn is_running(&self) -> bool {
        !self.collecting.is_empty()
    }

    /// Starts every collector on `cycle`.
    fn start(
        &mut self,
        collectors: &[Arc<dyn Collector>],
        cycle: Cycle,
        cancel: &CancellationToken,
    ) {
        self.points = 0;
        for collector in collectors {
            let (collector, cancel) = (collector.clone(), cancel.clone());
            let group = collector.group();
            self.pending.push(group);
            self.collecting.push(Box::pin(async move {
                (group, collector.collect(cycle, &cancel).await)
            }));
        }
    }

    /// The next collector to finish.
    fn next(
        &mut self,
    ) -> impl Future<Output = Option<(&'static str, Result<Vec<MetricPoint>, CollectError>)>> + '_
    {
        self.collecting.next()
    }

    /// Records that `group` finished with `result`; returns its points.
    fn finished(
        &mut self,
        group: &'static str,
        result: Result<Vec<MetricPoint>, CollectError>,
    ) -> Vec<MetricPoint> {
        if let Some(i) = self.pending.iter().position(|g| *g == group) {
            self.pending.swap_remove(i);
        }
        let points = points_of(result);
        self.points += points.len();
        points
    }

    /// Drops the collectors still running, with a warning and a count for each.
    fn abandon(&mut self, stats: &CollectionStats) {
        self.collecting = FuturesUnordered::new();
        for group in self.pending.drain(..) {
            let total = stats.abandoned(group);
            warn!(
                component = "metrics",
                group,
                abandoned_total = total,
                "collector still running when its cycle ended; abandoned it for this cycle"
            );
        }
    }
}

/// A collector's points: all of them, what it had when cancelled, none when it failed.
fn points_of(result: Result<Vec<MetricPoint>, CollectError>) -> Vec<MetricPoint> {
    match result {
        Ok(points) => points,
        Err(CollectError::Cancelled { group, partial }) => {
            warn!(
                component = "metrics",
                group, "collection cancelled; keeping partial results"
            );
            partial
        }
        Err(e) => {
            warn!(component = "metrics", error = %e, "collector failed");
            Vec::new()
        }
    }
}

/// How often each group's collector was abandoned, shared with the `agent` group.
#[derive(Debug, Default)]
pub struct CollectionStats {
    abandoned: Mutex<BTreeMap<&'static str, u64>>,
}

impl CollectionStats {
    /// Counts one abandoned collection of `group`; returns its total.
    fn abandoned(&self, group: &'static str) -> u64 {
        let mut counts = self.abandoned.lock().expect("not poisoned");
        let n = counts.entry(group).or_default();
        *n += 1;
        *n
    }
}

impl AbandonedCollections for CollectionStats {
    fn abandoned_collections(&self) -> BTreeMap<&'static str, u64> {
        self.abandoned.lock().expect("not poisoned").clone()
    }
}

/// The name of the primary destination unless the agent says otherwise.
const PRIMARY: &str = "control_plane";

/// One destination while the loop runs: its queue, its request in flight and its retry
/// schedule. A slow or absent destination holds back only its own lane.
struct Lane {
    name: &'static str,
    reporter: Arc<dyn MetricReporter>,
    stats: Arc<DeliveryStats>,
    queue: DeliveryQueue,
    in_flight: Option<BoxFuture<'static, Result<(), BoxError>>>,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
    failures: u32,
}

/// What happened on some lane.
enum LaneEvent {
    /// Lane `.0`'s request finished.
    Answered(usize, Result<(), BoxError>),
    /// A lane's retry is due.
    RetryDue,
}

/// The next request that finishes or retry that comes due, on any lane.
fn next_event(lanes: &mut [Lane]) -> impl Future<Output = LaneEvent> + '_ {
    std::future::poll_fn(move |cx| {
        for (i, lane) in lanes.iter_mut().enumerate() {
            if let Some(request) = lane.in_flight.as_mut() {
                if let Poll::Ready(result) = request.as_mut().poll(cx) {
                    lane.in_flight = None;
                    return Poll::Ready(LaneEvent::Answered(i, result));
                }
            }
            if let Some(retry) = lane.retry.as_mut() {
                if retry.as_mut().poll(cx).is_ready() {
                    lane.retry = None;
                    return Poll::Ready(LaneEvent::RetryDue);
                }
            }
        }
        Poll::Pending
    })
}

impl Lane {
    /// Starts a request for the head batch, unless one is in flight or a retry is pending.
    fn send_head(&mut self, node_id: &str) {
        if self.in_flight.is_none() && self.retry.is_none() {
            self.in_flight = self
                .queue
                .head()
                .map(|(key, points)| self.send(node_id, key, points));
        }
    }

    /// Best effort at shutdown: the request in flight, then each queued batch once, in
    /// order, stopping at the first failure, within [`SHUTDOWN_FLUSH_TIMEOUT`] (or, with a
    /// durable queue, [`DURABLE_SHUTDOWN_FLUSH_TIMEOUT`], since what is left stays on disk).
    async fn flush(mut self, node_id: &str) {
        self.enqueue();
        let in_flight = self.in_flight.take();
        let limit = if self.queue.is_durable() {
            DURABLE_SHUTDOWN_FLUSH_TIMEOUT
        } else {
            SHUTDOWN_FLUSH_TIMEOUT
        };
        let deadline = Instant::now() + limit;
        self.failures = 0;
        let sent = tokio::time::timeout_at(deadline, async {
            if let Some(request) = in_flight {
                let result = request.await;
                if self.settle(result).is_some() {
                    return;
                }
            }
            while let Some((key, points)) = self.queue.head() {
                let result = self.send(node_id, key, points).await;
                if self.settle(result).is_some() {
                    return;
                }
            }
        })
        .await;
        let queue = &self.queue;
        if sent.is_err() && !queue.is_durable() {
            warn!(component = "metrics", destination = self.name, timeout = ?limit, "final metrics flush timed out");
        }
        if !queue.is_empty() {
            match queue.state() {
                QueueState::Disk(dir) => info!(
                    component = "metrics",
                    destination = self.name,
                    points = queue.queued_points(),
                    bytes = queue.spooled_bytes(),
                    dir = %dir.display(),
                    "shutting down with points not yet delivered; they stay in the durable queue and are sent first at the next start"
                ),
                _ => warn!(
                    component = "metrics",
                    destination = self.name,
                    points = queue.queued_points(),
                    "shutting down with points the destination has not accepted; they are lost"
                ),
            }
        }
        // Whatever time is left goes to the reporter's own background work.
        if tokio::time::timeout_at(deadline, self.reporter.close())
            .await
            .is_err()
        {
            warn!(
                component = "metrics",
                destination = self.name,
                "reporter did not finish its background deliveries before shutdown"
            );
        }
    }

    /// A request for the head batch, owning what it needs so that it can be polled from
    /// the loop while the tickers go on.
    fn send(
        &self,
        node_id: &str,
        key: Uuid,
        points: Arc<Vec<MetricPoint>>,
    ) -> BoxFuture<'static, Result<(), BoxError>> {
        let reporter = self.reporter.clone();
        let node_id = node_id.to_owned();
        Box::pin(async move { reporter.report_batch(&node_id, key, &points).await })
    }

    /// Applies the head batch's result to the queue and the counters. Returns `Some` with the
    /// server's requested wait when the batch stays for a retry.
    fn settle(&mut self, result: Result<(), BoxError>) -> Option<Option<Duration>> {
        let (queue, stats, name) = (&mut self.queue, &self.stats, self.name);
        let outcome = match result {
            Ok(()) => {
                stats.set_last_report(LastReport::Accepted);
                stats.dropping.store(false, Ordering::Relaxed);
                let sent = queue.pop();
                if self.failures > 0 {
                    let n = stats.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
                    info!(
                        component = "metrics",
                        destination = name,
                        failed_attempts = self.failures,
                        reconnect_count = n,
                        queued_points = queue.queued_points(),
                        "metrics delivery recovered"
                    );
                }
                debug!(
                    component = "metrics",
                    destination = name,
                    points = sent,
                    queued_points = queue.queued_points(),
                    "batch accepted"
                );
                self.failures = 0;
                None
            }
            Err(e) => match classify(&e) {
                Failure::Rejected => {
                    stats.set_last_report(LastReport::Rejected);
                    let n = queue.pop();
                    stats.rejected.fetch_add(n as u64, Ordering::Relaxed);
                    warn!(
                        component = "metrics",
                        destination = name,
                        error = %e,
                        points = n,
                        "metrics batch rejected by the destination; not retried"
                    );
                    None
                }
                Failure::Retry { after } => {
                    stats.set_last_report(LastReport::Failed);
                    self.failures += 1;
                    warn!(
                        component = "metrics",
                        destination = name,
                        error = %e,
                        points = queue.head_points(),
                        queued_points = queue.queued_points(),
                        failures = self.failures,
                        "metrics report failed"
                    );
                    Some(after)
                }
            },
        };
        stats.publish(queue);
        outcome
    }

    /// Seals the buffer into batches and trims the queue, counting what the trim dropped.
    fn enqueue(&mut self) {
        let dropped = self.queue.seal(self.in_flight.is_some());
        self.count_dropped(dropped);
        self.stats.publish(&self.queue);
    }

    fn count_dropped(&self, dropped: usize) {
        if dropped > 0 {
            self.stats.dropping.store(true, Ordering::Relaxed);
            let total = self
                .stats
                .dropped
                .fetch_add(dropped as u64, Ordering::Relaxed)
                + dropped as u64;
            warn!(
                component = "metrics",
                destination = self.name,
                dropped,
                dropped_total = total,
                max_points = self.queue.limits().max_points,
                max_memory_bytes = self.queue.limits().max_memory_bytes,
                max_bytes = self.queue.limits().max_bytes,
                "retry queue full; dropped the oldest points (raise metrics.queue.max_points or max_memory_bytes, or metrics.queue.max_bytes with metrics.queue.dir, to keep more)"
            );
        }
    }
}

/// Whether the collect tick due `since_start` after the loop began is the last before a
/// report. Collect ticks fall at `n·collect` and report ticks at `k·report` (k ≥ 1) from
/// the start, whatever ticks were skipped; a report takes the points of every cycle that
/// began before it (the loop runs a due collection before a due report), so cycle `n` is the
/// last before a report when one falls in `[n·collect, (n+1)·collect)`.
fn ends_report_interval(since_start: Duration, collect: Duration, report: Duration) -> bool {
    let collect = collect.as_nanos().max(1);
    let report = report.as_nanos().max(1);
    // The tick's own deadline, so exact; rounded all the same.
    let n = (since_start.as_nanos() + collect / 2) / collect;
    if n == 0 {
        return false;
    }
    let reports_before = |t: u128| (t - 1) / report;
    reports_before((n + 1) * collect) > reports_before(n * collect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reporter::ReportError;
    use async_trait::async_trait;
    use std::collections::VecDeque;
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

    #[test]
    fn the_last_cycle_before_each_report_is_found() {
        let last = |collect: u64, report: u64| -> Vec<u64> {
            (0..=135)
                .step_by(collect as usize)
                .filter(|t| {
                    ends_report_interval(
                        Duration::from_secs(*t),
                        Duration::from_secs(collect),
                        Duration::from_secs(report),
                    )
                })
                .collect()
        };
        // The spec's defaults: reports at 60, 120: the cycles at 60 and 120 carry them.
        assert_eq!(last(15, 60), [60, 120]);
        // Not a multiple: reports at 40, 80, 120 take the cycles of 30, 75 and 120.
        assert_eq!(last(15, 40), [30, 75, 120]);
        // Equal intervals: every cycle but the start.
        assert_eq!(last(15, 15), [15, 30, 45, 60, 75, 90, 105, 120, 135]);
    }

    /// Records the cycles it is told about.
    struct CycleRecorder(std::sync::Mutex<Vec<bool>>);

    #[async_trait]
    impl Collector for CycleRecorder {
        fn group(&self) -> &'static str {
            "recorder"
        }
        async fn collect(
            &self,
            cycle: Cycle,
            _: &CancellationToken,
        ) -> Result<Vec<MetricPoint>, CollectError> {
            self.0.lock().unwrap().push(cycle.ends_report_interval);
            Ok(Vec::new())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn collectors_are_told_which_cycle_ends_a_report_interval() {
        let recorder = Arc::new(CycleRecorder(std::sync::Mutex::new(Vec::new())));
        let h = start(cfg(10, 30, 100), vec![recorder.clone()], 0);
        tokio::time::sleep(Duration::from_secs(65)).await;
        h.cancel.cancel();
        h.task.await.unwrap();
        // Cycles at 10 … 60 s; reports at 30 and 60 s.
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [false, false, true, false, false, true]
        );
    }

    #[async_trait]
    impl Collector for Counting {
        fn group(&self) -> &'static str {
            self.group
        }
        async fn collect(
            &self,
            _: Cycle,
            _: &CancellationToken,
        ) -> Result<Vec<MetricPoint>, CollectError> {
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
        async fn collect(
            &self,
            _: Cycle,
            _: &CancellationToken,
        ) -> Result<Vec<MetricPoint>, CollectError> {
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

    /// What the fake control plane answers to one request.
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Accept,
        Unavailable,
        Status(u16, Option<u64>),
    }

    /// One request as the fake control plane saw it.
    #[derive(Clone, Debug)]
    struct Attempt {
        at: Duration,
        key: Uuid,
        batch: Vec<MetricPoint>,
        accepted: bool,
    }

    /// Records each batch with the virtual time it arrived at, and answers from a script
    /// (then accepts).
    struct Recorder {
        tx: mpsc::UnboundedSender<(Duration, Vec<MetricPoint>)>,
        attempts: mpsc::UnboundedSender<Attempt>,
        start: Instant,
        script: Mutex<VecDeque<Answer>>,
    }

    #[async_trait]
    impl MetricReporter for Recorder {
        async fn report_metrics(&self, _: &str, _: &[MetricPoint]) -> Result<(), BoxError> {
            unreachable!("the Manager always passes the batch's key")
        }

        async fn report_batch(
            &self,
            node_id: &str,
            key: Uuid,
            batch: &[MetricPoint],
        ) -> Result<(), BoxError> {
            assert_eq!(node_id, "node-1");
            let at = self.start.elapsed();
            self.tx.send((at, batch.to_vec())).unwrap();
            let answer = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Answer::Accept);
            let _ = self.attempts.send(Attempt {
                at,
                key,
                batch: batch.to_vec(),
                accepted: matches!(answer, Answer::Accept),
            });
            match answer {
                Answer::Accept => Ok(()),
                Answer::Unavailable => Err("control plane unavailable".into()),
                Answer::Status(code, retry_after) => Err(Box::new(ReportError::Status {
                    what: "control plane",
                    url: "https://cp.test/v1/nodes/node-1/metrics".into(),
                    status: reqwest::StatusCode::from_u16(code).unwrap(),
                    body: "no".into(),
                    retry_after: retry_after.map(Duration::from_secs),
                })),
            }
        }
    }

    struct Harness {
        batches: mpsc::UnboundedReceiver<(Duration, Vec<MetricPoint>)>,
        attempts: mpsc::UnboundedReceiver<Attempt>,
        stats: Arc<DeliveryStats>,
        collection: Arc<CollectionStats>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<RunOutcome>,
    }

    /// The intervals in seconds and the batch size, with the default queue bounds.
    fn cfg(collect: u64, report: u64, batch: usize) -> ManagerOptions {
        ManagerOptions {
            collect_interval: Duration::from_secs(collect),
            report_interval: Duration::from_secs(report),
            limits: QueueLimits {
                batch_size: batch,
                max_points: crate::config::DEFAULT_QUEUE_MAX_POINTS as usize,
                max_bytes: crate::config::DEFAULT_QUEUE_MAX_BYTES,
                max_memory_bytes: crate::config::DEFAULT_QUEUE_MAX_MEMORY_BYTES as usize,
            },
        }
    }

    fn start(
        cfg: impl Into<Option<ManagerOptions>>,
        collectors: Vec<Arc<dyn Collector>>,
        failures: u32,
    ) -> Harness {
        start_scripted(
            cfg,
            collectors,
            vec![Answer::Unavailable; failures as usize],
        )
    }

    fn start_scripted(
        cfg: impl Into<Option<ManagerOptions>>,
        collectors: Vec<Arc<dyn Collector>>,
        script: Vec<Answer>,
    ) -> Harness {
        let (tx, batches) = mpsc::unbounded_channel();
        let (attempts_tx, attempts) = mpsc::unbounded_channel();
        let reporter = Arc::new(Recorder {
            tx,
            attempts: attempts_tx,
            start: Instant::now(),
            script: Mutex::new(script.into()),
        });
        let stats = Arc::new(DeliveryStats::default());
        let collection = Arc::new(CollectionStats::default());
        let manager = Manager::new(cfg.into(), collectors, reporter, "node-1")
            .with_delivery_stats(stats.clone())
            .with_collection_stats(collection.clone());
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { manager.run(cancel).await }
        });
        Harness {
            batches,
            attempts,
            stats,
            collection,
            cancel,
            task,
        }
    }

    fn seqs(batch: &[MetricPoint]) -> Vec<(String, u64)> {
        batch
            .iter()
            .map(|p| {
                (
                    p.group.clone(),
                    p.data.to_value()["n"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_returns_at_once_without_collecting() {
        let c = Counting::new("system");
        let mut h = start(None, vec![c.clone()], 0);
        assert_eq!((&mut h.task).await.unwrap(), RunOutcome::Disabled);
        assert_eq!(c.calls.load(Ordering::SeqCst), 0);
        assert!(h.batches.recv().await.is_none(), "no report was made");
    }

    /// Takes `takes` of virtual time per call (forever when `None`), then returns one point.
    struct Slow {
        group: &'static str,
        takes: Option<Duration>,
    }

    #[async_trait]
    impl Collector for Slow {
        fn group(&self) -> &'static str {
            self.group
        }
        async fn collect(
            &self,
            _: Cycle,
            _: &CancellationToken,
        ) -> Result<Vec<MetricPoint>, CollectError> {
            match self.takes {
                Some(takes) => tokio::time::sleep(takes).await,
                None => std::future::pending().await,
            }
            let point = serde_json::json!({});
            Ok(vec![MetricPoint::new(
                chrono::Utc::now(),
                self.group,
                "",
                &point,
            )
            .unwrap()])
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_collector_past_its_cycle_is_abandoned_counted_and_holds_back_no_other_group() {
        let system = Counting::new("system");
        let hung = Arc::new(Slow {
            group: "app",
            takes: None,
        });
        let mut h = start(cfg(5, 10, 100), vec![system.clone(), hung], 0);
        // The report at 10 s waits for the cycle that started then, which is abandoned at
        // 15 s; the next one goes at 25 s for the same reason.
        let (at, batch) = h.batches.recv().await.unwrap();
        assert_eq!(at, Duration::from_secs(15));
        assert_eq!(seqs(&batch), [("system".into(), 1), ("system".into(), 2)]);
        let (at, batch) = h.batches.recv().await.unwrap();
        assert_eq!(at, Duration::from_secs(25));
        assert_eq!(seqs(&batch), [("system".into(), 3), ("system".into(), 4)]);
        // Cycles at 5, 10, 15 and 20 s ran past their end.
        assert_eq!(
            h.collection.abandoned_collections(),
            BTreeMap::from([("app", 4)])
        );
        h.cancel.cancel();
        assert_eq!(h.task.await.unwrap(), RunOutcome::Cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_due_during_a_cycle_takes_that_cycle_s_points() {
        let slow = Arc::new(Slow {
            group: "latency",
            takes: Some(Duration::from_secs(3)),
        });
        let mut h = start(cfg(5, 10, 100), vec![slow], 0);
        let (at, batch) = h.batches.recv().await.unwrap();
        assert_eq!(
            at,
            Duration::from_secs(13),
            "the report waited for the cycle"
        );
        assert_eq!(batch.len(), 2, "the cycles of 5 and 10 s");
        assert!(h.collection.abandoned_collections().is_empty());
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

    fn ns(batch: &[MetricPoint]) -> Vec<u64> {
        batch
            .iter()
            .map(|p| p.data.to_value()["n"].as_u64().unwrap())
            .collect()
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_is_retried_with_its_key_and_backoff_before_newer_points() {
        let c = Counting::new("system");
        let mut h = start(cfg(5, 10, 100), vec![c], 3);
        let first = h.attempts.recv().await.unwrap();
        assert_eq!((first.at, ns(&first.batch)), (secs(10.0), vec![1, 2]));
        let mut previous = first.at;
        // Three failures: waits drawn from [0.5, 1], [1, 2] and [2, 4] seconds.
        for (lo, hi) in [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0)] {
            let retry = h.attempts.recv().await.unwrap();
            let waited = retry.at - previous;
            assert!(
                waited >= secs(lo) && waited <= secs(hi),
                "{waited:?} not in [{lo}, {hi}]"
            );
            assert_eq!(retry.key, first.key, "the key is kept across retries");
            assert_eq!(ns(&retry.batch), [1, 2], "the same points, not newer ones");
            previous = retry.at;
        }
        // The retried batch went out before t=17; the report at 20 carries only new points.
        let next = h.attempts.recv().await.unwrap();
        assert_eq!((next.at, ns(&next.batch)), (secs(20.0), vec![3, 4]));
        assert_ne!(next.key, first.key);
        assert_eq!(h.stats.reconnect_count(), 1, "one recovery after failures");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_with_jitter_and_is_capped_at_the_report_interval() {
        let c = Counting::new("system");
        let mut h = start(cfg(5, 10, 100), vec![c], 12);
        let mut at = h.attempts.recv().await.unwrap().at;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let next = h.attempts.recv().await.unwrap().at;
            waits.push(next - at);
            at = next;
        }
        for (i, wait) in waits.iter().enumerate() {
            let full = secs(2f64.powi(i as i32).min(10.0));
            assert!(
                *wait >= full / 2 && *wait <= full,
                "wait {i} is {wait:?}, full backoff {full:?}"
            );
        }
        assert!(
            waits
                .iter()
                .enumerate()
                .any(|(i, w)| *w != secs(2f64.powi(i as i32).min(10.0))),
            "jitter varies the waits: {waits:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_of_many_intervals_loses_nothing_and_keeps_order() {
        let c = Counting::new("system");
        // About two minutes of failures: a dozen report intervals.
        let mut h = start(cfg(5, 10, 4), vec![c], 18);
        let mut delivered = Vec::new();
        let mut keys = std::collections::HashSet::new();
        let mut saw_backlog = false;
        while delivered.len() < 60 {
            let a = h.attempts.recv().await.unwrap();
            saw_backlog |= h.stats.delivery_totals().queued_points > 4;
            if a.accepted {
                assert!(keys.insert(a.key), "each accepted batch once");
                assert!(a.batch.len() <= 4, "batches never exceed batch_size");
                delivered.extend(ns(&a.batch));
            }
        }
        assert_eq!(delivered, (1..=delivered.len() as u64).collect::<Vec<_>>());
        assert!(saw_backlog, "the outage built up a queue");
        assert_eq!(h.stats.reconnect_count(), 1);
        assert_eq!(h.stats.delivery_totals().dropped_points, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_that_is_away_holds_back_only_itself() {
        // The primary accepts everything; the second destination is away for about two
        // minutes, then takes everything it missed, in order.
        let (tx, _second) = mpsc::unbounded_channel();
        let (attempts_tx, mut second_attempts) = mpsc::unbounded_channel();
        let reporter = Arc::new(Recorder {
            tx,
            attempts: attempts_tx,
            start: Instant::now(),
            script: Mutex::new(vec![Answer::Unavailable; 18].into()),
        });
        let stats = Arc::new(DeliveryStats::default());
        let (primary_tx, mut primary) = mpsc::unbounded_channel();
        let (primary_attempts, _keep) = mpsc::unbounded_channel();
        let mut manager = Manager::new(
            Some(cfg(5, 10, 4)),
            vec![Counting::new("system") as Arc<dyn Collector>],
            Arc::new(Recorder {
                tx: primary_tx,
                attempts: primary_attempts,
                start: Instant::now(),
                script: Mutex::new(VecDeque::new()),
            }),
            "node-1",
        );
        manager.add_destination("remote_write", reporter, None, stats.clone());
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { manager.run(cancel).await }
        });
        // While the second destination is away, the primary's batches come on schedule.
        for report in 1..=8u64 {
            let (at, batch) = primary.recv().await.unwrap();
            assert_eq!(at, Duration::from_secs(10 * report), "{batch:?}");
        }
        let mut delivered = Vec::new();
        while delivered.len() < 40 {
            let a = second_attempts.recv().await.unwrap();
            if a.accepted {
                delivered.extend(ns(&a.batch));
            }
        }
        assert_eq!(delivered, (1..=delivered.len() as u64).collect::<Vec<_>>());
        assert_eq!(stats.reconnect_count(), 1);
        assert_eq!(stats.delivery_totals().dropped_points, 0);
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_the_oldest_points_and_counts_them() {
        let c = Counting::new("system");
        let mut config = cfg(5, 10, 2);
        config.limits.max_points = 6;
        // Fail long enough for 20 points to be collected (t = 100 s).
        let script = vec![Answer::Unavailable; 13];
        let mut h = start_scripted(config, vec![c], script);
        let mut delivered = Vec::new();
        loop {
            let a = h.attempts.recv().await.unwrap();
            assert!(h.stats.delivery_totals().queued_points <= 6, "bounded");
            if a.accepted {
                delivered.extend(ns(&a.batch));
                if h.stats.delivery_totals().queued_points == 0 {
                    break;
                }
            }
        }
        let dropped = h.stats.delivery_totals().dropped_points;
        assert!(dropped > 0);
        let newest = *delivered.last().unwrap();
        assert_eq!(
            delivered,
            ((dropped + 1)..=newest).collect::<Vec<_>>(),
            "the oldest {dropped} went, the rest arrived in order"
        );
    }

    #[test]
    fn a_long_retry_after_wins_over_the_cap_up_to_its_limit() {
        let mut rng = fastrand::Rng::with_seed(7);
        let cap = Duration::from_secs(10);
        let asked = backoff(1, Some(Duration::from_secs(120)), cap, &mut rng);
        assert_eq!(asked, Duration::from_secs(120));
        let limited = backoff(1, Some(Duration::from_secs(3600)), cap, &mut rng);
        assert_eq!(limited, RETRY_AFTER_LIMIT);
        let huge = backoff(u32::MAX, None, cap, &mut rng);
        assert!(huge <= cap && huge >= cap / 2, "{huge:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_batch_is_dropped_counted_and_not_retried() {
        let c = Counting::new("system");
        let mut h = start_scripted(
            cfg(5, 10, 100),
            vec![c],
            vec![Answer::Status(422, None), Answer::Status(400, None)],
        );
        let first = h.attempts.recv().await.unwrap();
        let second = h.attempts.recv().await.unwrap();
        let third = h.attempts.recv().await.unwrap();
        assert_eq!(
            [first.at, second.at, third.at],
            [secs(10.0), secs(20.0), secs(30.0)],
            "no retries in between"
        );
        assert_eq!(ns(&third.batch), [5, 6]);
        assert_eq!(h.stats.delivery_totals().rejected_points, 4);
        assert_eq!(h.stats.reconnect_count(), 0, "a refusal is no outage");
    }

    #[tokio::test(start_paused = true)]
    async fn request_timeout_and_too_many_requests_are_retried_after_the_servers_wait() {
        let c = Counting::new("system");
        let mut h = start_scripted(
            cfg(5, 10, 100),
            vec![c],
            vec![Answer::Status(408, None), Answer::Status(429, Some(30))],
        );
        let first = h.attempts.recv().await.unwrap();
        let second = h.attempts.recv().await.unwrap();
        assert_eq!(second.key, first.key);
        assert!(second.at - first.at <= secs(1.0));
        let third = h.attempts.recv().await.unwrap();
        assert_eq!(third.key, first.key);
        assert!(third.at - second.at >= secs(30.0), "Retry-After honoured");
        assert!(third.accepted);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_tries_the_queue_once_in_order() {
        let c = Counting::new("system");
        let mut h = start(cfg(5, 10, 100), vec![c], 1);
        let failed = h.attempts.recv().await.unwrap();
        assert!(!failed.accepted);
        h.cancel.cancel();
        assert_eq!(h.task.await.unwrap(), RunOutcome::Cancelled);
        let flushed = h.attempts.recv().await.unwrap();
        assert_eq!(flushed.key, failed.key, "the failed batch first");
        assert_eq!(ns(&flushed.batch), [1, 2]);
        assert!(flushed.accepted);
        assert!(
            h.attempts.recv().await.is_none(),
            "nothing else was buffered"
        );
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
