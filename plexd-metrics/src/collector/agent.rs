//! The `agent` group: the agent's own health, with the Go agent's JSON keys.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{BoxError, CollectError, Collector, Cycle};
use crate::api::{MetricPoint, GROUP_AGENT};
use crate::memory;

/// Counts how often a connection was re-established after failing: the spec's
/// `ReconnectCounter`.
pub trait ReconnectCounter: Send + Sync {
    /// Recoveries since the agent started.
    fn reconnect_count(&self) -> u64;
}

/// The delivery side's figures, reported in the `agent` group so that an operator sees a
/// backlog or lost points in the data itself.
pub trait DeliveryCounters: Send + Sync {
    /// Reads the current figures.
    fn delivery_totals(&self) -> DeliveryTotals;
}

/// Points the reporting side holds back or lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryTotals {
    /// Points waiting in the retry queue right now.
    pub queued_points: u64,
    /// Points dropped since start because the retry queue was full.
    pub dropped_points: u64,
    /// Points the control plane refused (4xx other than 408/429) since start.
    pub rejected_points: u64,
    /// Points in `metrics.queue.dir` right now (batches and journal); 0 without it.
    pub spooled_points: u64,
    /// Bytes in `metrics.queue.dir` right now; 0 without it.
    pub spooled_bytes: u64,
    /// Damaged or foreign files found in `metrics.queue.dir` since start.
    pub corrupt_batches: u64,
}

/// How often each group's collector ran past its cycle and was abandoned.
pub trait AbandonedCollections: Send + Sync {
    /// Abandoned collections since start, by group; groups never abandoned are absent.
    fn abandoned_collections(&self) -> BTreeMap<&'static str, u64>;
}

/// Totals of the agent's kernel programs, reported beside the agent's own figures.
pub trait KernelCounters: Send + Sync {
    /// Reads the current totals.
    fn read(&self) -> Result<KernelTotals, BoxError>;
}

/// What the kernel programs have seen since they were attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelTotals {
    /// TC programs currently attached.
    pub programs_attached: u64,
    /// Packets seen on ingress hooks.
    pub ingress_packets: u64,
    /// Bytes seen on ingress hooks.
    pub ingress_bytes: u64,
    /// Packets seen on egress hooks.
    pub egress_packets: u64,
    /// Bytes seen on egress hooks.
    pub egress_bytes: u64,
}

/// The agent's health, as the spec's `AgentStats`, plus the kernel programs' totals.
///
/// The key names are Go's because control planes parse them. Rust has no goroutines and no
/// garbage collector: `goroutine_count` counts live tokio tasks, and the `gc_*` fields are
/// always 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Live tokio tasks.
    pub goroutine_count: u64,
    /// Bytes currently allocated on the heap.
    pub heap_alloc_bytes: u64,
    /// Resident memory the agent holds from the operating system.
    pub heap_sys_bytes: u64,
    /// Always 0: there is no garbage collector.
    pub gc_pause_total_ns: u64,
    /// Always 0: there is no garbage collector.
    pub gc_num_gc: u32,
    /// Seconds since the agent started.
    pub uptime_seconds: f64,
    /// Recoveries after failed connections.
    pub reconnect_count: u64,
    /// Kernel programs attached; absent when eBPF is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_programs_attached: Option<u64>,
    /// Packets the ingress programs saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_ingress_packets: Option<u64>,
    /// Bytes the ingress programs saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_ingress_bytes: Option<u64>,
    /// Packets the egress programs saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_egress_packets: Option<u64>,
    /// Bytes the egress programs saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_egress_bytes: Option<u64>,
    /// Points dropped because the retry queue was full; absent without a delivery side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_points: Option<u64>,
    /// Points waiting in the retry queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_points: Option<u64>,
    /// Points the control plane refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_points: Option<u64>,
    /// Points kept in the durable queue's directory (0 when the queue is in memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spooled_points: Option<u64>,
    /// Bytes the durable queue's directory holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spooled_bytes: Option<u64>,
    /// Damaged or foreign files the durable queue set aside or skipped since start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt_batches: Option<u64>,
    /// The delivery figures of each destination besides the primary one (whose figures are
    /// the keys above), by name: `remote_write` beside a control plane.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub destinations: BTreeMap<String, DestinationFigures>,
    /// Collections abandoned since start because they ran past their cycle, by group; absent
    /// until one is.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub abandoned_collections: BTreeMap<String, u64>,
}

/// The delivery figures of one destination besides the primary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationFigures {
    /// Points waiting for it.
    pub queued_points: u64,
    /// Points dropped because its queue was full, since start.
    pub dropped_points: u64,
    /// Points it refused, since start.
    pub rejected_points: u64,
    /// Recoveries after failed deliveries to it.
    pub reconnect_count: u64,
}

/// A destination's figures, as [`AgentStatsCollector::with_destination`] takes them.
pub trait DestinationCounters: DeliveryCounters + ReconnectCounter {}

impl<T: DeliveryCounters + ReconnectCounter> DestinationCounters for T {}

/// Emits one `agent` point per cycle.
pub struct AgentStatsCollector {
    started: Instant,
    reconnects: Option<Arc<dyn ReconnectCounter>>,
    kernel: Option<Arc<dyn KernelCounters>>,
    delivery: Option<Arc<dyn DeliveryCounters>>,
    destinations: Vec<(&'static str, Arc<dyn DestinationCounters>)>,
    abandoned: Option<Arc<dyn AbandonedCollections>>,
}

impl AgentStatsCollector {
    /// A collector for an agent that started at `started`. Without a reconnect counter,
    /// `reconnect_count` is 0; without kernel counters the `ebpf_*` keys are left out.
    pub fn new(
        started: Instant,
        reconnects: Option<Arc<dyn ReconnectCounter>>,
        kernel: Option<Arc<dyn KernelCounters>>,
    ) -> Self {
        Self {
            started,
            reconnects,
            kernel,
            delivery: None,
            destinations: Vec::new(),
            abandoned: None,
        }
    }

    /// Adds the figures of destination `name` besides the primary (under `destinations`).
    pub fn with_destination(
        mut self,
        name: &'static str,
        counters: Arc<dyn DestinationCounters>,
    ) -> Self {
        self.destinations.push((name, counters));
        self
    }

    /// Adds `dropped_points`, `queued_points`, `rejected_points`, `spooled_points`,
    /// `spooled_bytes` and `corrupt_batches` from `delivery`.
    pub fn with_delivery(mut self, delivery: Arc<dyn DeliveryCounters>) -> Self {
        self.delivery = Some(delivery);
        self
    }

    /// Adds `abandoned_collections` from `abandoned`.
    pub fn with_abandoned(mut self, abandoned: Arc<dyn AbandonedCollections>) -> Self {
        self.abandoned = Some(abandoned);
        self
    }

    fn stats(&self) -> Result<AgentStats, BoxError> {
        let tasks = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_alive_tasks() as u64)
            .unwrap_or(0);
        let mut stats = AgentStats {
            goroutine_count: tasks,
            heap_alloc_bytes: memory::heap_allocated_bytes(),
            heap_sys_bytes: memory::resident_bytes().unwrap_or(0),
            gc_pause_total_ns: 0,
            gc_num_gc: 0,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            reconnect_count: self.reconnects.as_ref().map_or(0, |r| r.reconnect_count()),
            ..AgentStats::default()
        };
        if let Some(kernel) = &self.kernel {
            let t = kernel.read()?;
            stats.ebpf_programs_attached = Some(t.programs_attached);
            stats.ebpf_ingress_packets = Some(t.ingress_packets);
            stats.ebpf_ingress_bytes = Some(t.ingress_bytes);
            stats.ebpf_egress_packets = Some(t.egress_packets);
            stats.ebpf_egress_bytes = Some(t.egress_bytes);
        }
        if let Some(delivery) = &self.delivery {
            let d = delivery.delivery_totals();
            stats.dropped_points = Some(d.dropped_points);
            stats.queued_points = Some(d.queued_points);
            stats.rejected_points = Some(d.rejected_points);
            stats.spooled_points = Some(d.spooled_points);
            stats.spooled_bytes = Some(d.spooled_bytes);
            stats.corrupt_batches = Some(d.corrupt_batches);
        }
        for (name, counters) in &self.destinations {
            let d = counters.delivery_totals();
            stats.destinations.insert(
                (*name).to_owned(),
                DestinationFigures {
                    queued_points: d.queued_points,
                    dropped_points: d.dropped_points,
                    rejected_points: d.rejected_points,
                    reconnect_count: counters.reconnect_count(),
                },
            );
        }
        if let Some(abandoned) = &self.abandoned {
            stats.abandoned_collections = abandoned
                .abandoned_collections()
                .into_iter()
                .map(|(group, n)| (group.to_owned(), n))
                .collect();
        }
        Ok(stats)
    }
}

#[async_trait]
impl Collector for AgentStatsCollector {
    fn group(&self) -> &'static str {
        GROUP_AGENT
    }

    async fn collect(
        &self,
        _: Cycle,
        _: &CancellationToken,
    ) -> Result<Vec<MetricPoint>, CollectError> {
        let stats = self
            .stats()
            .map_err(|e| CollectError::source(GROUP_AGENT, e))?;
        let point = MetricPoint::new(Utc::now(), GROUP_AGENT, "", &stats)
            .map_err(|e| CollectError::source(GROUP_AGENT, e))?;
        Ok(vec![point])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Reconnects(u64);
    impl ReconnectCounter for Reconnects {
        fn reconnect_count(&self) -> u64 {
            self.0
        }
    }

    struct Kernel(Result<KernelTotals, String>);
    impl KernelCounters for Kernel {
        fn read(&self) -> Result<KernelTotals, BoxError> {
            self.0.clone().map_err(Into::into)
        }
    }

    #[tokio::test]
    async fn spec_keys_and_values() {
        let started = Instant::now() - Duration::from_secs(3600);
        let c = AgentStatsCollector::new(started, Some(Arc::new(Reconnects(3))), None);
        // Collect from a spawned task, so that at least that one task is alive.
        let points =
            tokio::spawn(
                async move { c.collect(Cycle::default(), &CancellationToken::new()).await },
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(points.len(), 1);
        let d = points[0].data.to_value();
        let keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "goroutine_count",
                "heap_alloc_bytes",
                "heap_sys_bytes",
                "gc_pause_total_ns",
                "gc_num_gc",
                "uptime_seconds",
                "reconnect_count"
            ]
        );
        assert_eq!(d["reconnect_count"], 3);
        assert_eq!(d["gc_num_gc"], 0);
        assert!(d["uptime_seconds"].as_f64().unwrap() >= 3600.0);
        assert!(
            d["goroutine_count"].as_u64().unwrap() >= 1,
            "this test runs in a task"
        );
        assert!(
            d["heap_sys_bytes"].as_u64().unwrap() > 0,
            "resident memory is read from /proc/self"
        );
    }

    struct Delivery;
    impl DeliveryCounters for Delivery {
        fn delivery_totals(&self) -> DeliveryTotals {
            DeliveryTotals {
                queued_points: 40,
                dropped_points: 12,
                rejected_points: 3,
                spooled_points: 30,
                spooled_bytes: 4096,
                corrupt_batches: 2,
            }
        }
    }

    #[tokio::test]
    async fn delivery_figures_are_extra_keys() {
        let c =
            AgentStatsCollector::new(Instant::now(), None, None).with_delivery(Arc::new(Delivery));
        let d = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap()[0]
            .data
            .to_value();
        assert_eq!(d["queued_points"], 40);
        assert_eq!(d["dropped_points"], 12);
        assert_eq!(d["rejected_points"], 3);
        assert_eq!(d["spooled_points"], 30);
        assert_eq!(d["spooled_bytes"], 4096);
        assert_eq!(d["corrupt_batches"], 2);
    }

    #[tokio::test]
    async fn no_reconnect_counter_means_zero() {
        let c = AgentStatsCollector::new(Instant::now(), None, None);
        let points = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(points[0].data.to_value()["reconnect_count"], 0);
    }

    #[tokio::test]
    async fn kernel_totals_are_added_and_their_failure_fails_the_cycle() {
        let totals = KernelTotals {
            programs_attached: 2,
            ingress_packets: 10,
            ingress_bytes: 1000,
            egress_packets: 7,
            egress_bytes: 700,
        };
        let c = AgentStatsCollector::new(Instant::now(), None, Some(Arc::new(Kernel(Ok(totals)))));
        let d = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap()[0]
            .data
            .to_value();
        assert_eq!(d["ebpf_programs_attached"], 2);
        assert_eq!(d["ebpf_ingress_packets"], 10);
        assert_eq!(d["ebpf_egress_bytes"], 700);

        let c = AgentStatsCollector::new(
            Instant::now(),
            None,
            Some(Arc::new(Kernel(Err("map gone".into())))),
        );
        let err = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "metrics: agent: map gone");
    }
}
