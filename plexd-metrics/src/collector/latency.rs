//! The `latency` group: per-peer round-trip times over the mesh.
//!
//! Each cycle every peer gets `probes` pings, and the probes of all peers are spread evenly
//! over the first part of the collect interval: a steady trickle instead of a burst, which
//! neither floods a large mesh nor measures the agent's own queueing. Each point carries the
//! cycle's median, minimum, maximum and jitter; the last point before a report also carries
//! the median and 99th percentile over the whole report interval.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{BoxError, CollectError, Collector, Cycle};
use crate::accounting::latency::IntervalPercentiles;
pub use crate::accounting::latency::LatencyResult;
use crate::api::{MetricPoint, GROUP_LATENCY};
use crate::config::MetricsConfig;

/// Measures one round trip to a peer: the spec's `Pinger`.
#[async_trait]
pub trait Pinger: Send + Sync {
    /// Sends one echo request to `peer_id`'s mesh address and returns the round-trip time.
    /// Fails as soon as the peer is known to be unreachable; the caller bounds the wait.
    async fn ping(&self, peer_id: &str) -> Result<Duration, BoxError>;

    /// Runs once before each cycle's probes, so that a pinger that cannot probe at all (no
    /// socket, no interface) fails the cycle once instead of every peer on its own.
    async fn prepare(&self) -> Result<(), BoxError> {
        Ok(())
    }
}

/// Lists the peers to measure: the spec's `PeerLister`.
///
/// Unlike the spec's in-memory index, the list is read from the WireGuard device, which can
/// fail; a failure fails the cycle with the lister's error.
#[async_trait]
pub trait PeerLister: Send + Sync {
    /// The peers to probe this cycle, each once.
    async fn peer_ids(&self, cancel: &CancellationToken) -> Result<Vec<String>, BoxError>;
}

#[async_trait]
impl<T: Pinger + ?Sized> Pinger for Arc<T> {
    async fn ping(&self, peer_id: &str) -> Result<Duration, BoxError> {
        (**self).ping(peer_id).await
    }
    async fn prepare(&self) -> Result<(), BoxError> {
        (**self).prepare().await
    }
}

#[async_trait]
impl<T: PeerLister + ?Sized> PeerLister for Arc<T> {
    async fn peer_ids(&self, cancel: &CancellationToken) -> Result<Vec<String>, BoxError> {
        (**self).peer_ids(cancel).await
    }
}

/// How the collector probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencySettings {
    /// Probes per peer and cycle (at least 1).
    pub probes: u32,
    /// How long one probe waits for its reply.
    pub timeout: Duration,
    /// The part of the cycle over which the probes are spread; the last probe is sent at its
    /// end, so a cycle takes at most `spread + timeout`.
    pub spread: Duration,
    /// The Manager's collect interval.
    pub collect_interval: Duration,
}

impl LatencySettings {
    /// Settings for a validated config. Probes are spread over three quarters of the collect
    /// interval less one timeout, so that the slowest last probe still ends a quarter of an
    /// interval before the next cycle (validation keeps the timeout under half an interval).
    pub fn from_config(cfg: &MetricsConfig) -> Self {
        let budget = cfg.collect_interval * 3 / 4;
        Self {
            probes: cfg.latency.probes.max(1),
            timeout: cfg.latency.timeout,
            spread: budget.saturating_sub(cfg.latency.timeout),
            collect_interval: cfg.collect_interval,
        }
    }
}

/// Emits one `latency` point per peer from a [`Pinger`] and a [`PeerLister`].
pub struct LatencyCollector<P, L> {
    pinger: P,
    lister: L,
    settings: LatencySettings,
    percentiles: Mutex<IntervalPercentiles>,
}

impl<P: Pinger, L: PeerLister> LatencyCollector<P, L> {
    /// A collector probing the peers `lister` names through `pinger`. Build it right before
    /// the Manager starts: it counts report intervals from now.
    pub fn new(pinger: P, lister: L, settings: LatencySettings) -> Self {
        Self {
            pinger,
            lister,
            settings,
            percentiles: Mutex::new(IntervalPercentiles::default()),
        }
    }

    /// When peer `i` of `peers` sends probe `j`: all peers' first probes, then all second
    /// probes, and so on, at a constant rate over the spread.
    fn send_offset(&self, i: usize, j: usize, peers: usize) -> Duration {
        let total = (peers * self.settings.probes as usize) as u128;
        let k = (j * peers + i) as u128;
        let nanos = self.settings.spread.as_nanos() * k / total.max(1);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn results(
        &self,
        peers: &[String],
        rtts: &[Vec<Duration>],
        sent: &[u32],
        complete: impl Fn(usize) -> bool,
        add_percentiles: bool,
    ) -> Result<Vec<MetricPoint>, CollectError> {
        let now = Utc::now();
        let mut percentiles = self
            .percentiles
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut points = Vec::with_capacity(peers.len());
        for (i, peer) in peers.iter().enumerate() {
            if !complete(i) {
                continue;
            }
            let mut result = LatencyResult::from_samples(peer.as_str(), sent[i], &rtts[i]);
            percentiles.record(peer, &rtts[i]);
            if add_percentiles {
                let (p50, p99) = percentiles.take(peer);
                result.rtt_p50_nano = Some(p50);
                result.rtt_p99_nano = Some(p99);
            }
            points.push(
                MetricPoint::new(now, GROUP_LATENCY, peer.as_str(), &result)
                    .map_err(|e| CollectError::source(GROUP_LATENCY, e))?,
            );
        }
        percentiles.retain(peers);
        Ok(points)
    }
}

#[async_trait]
impl<P: Pinger, L: PeerLister> Collector for LatencyCollector<P, L> {
    fn group(&self) -> &'static str {
        GROUP_LATENCY
    }

    async fn collect(
        &self,
        cycle: Cycle,
        cancel: &CancellationToken,
    ) -> Result<Vec<MetricPoint>, CollectError> {
        let started = Instant::now();
        let add_percentiles = cycle.ends_report_interval;
        let peers = self
            .lister
            .peer_ids(cancel)
            .await
            .map_err(|e| CollectError::source(GROUP_LATENCY, e))?;
        if peers.is_empty() {
            return Ok(Vec::new());
        }
        self.pinger
            .prepare()
            .await
            .map_err(|e| CollectError::source(GROUP_LATENCY, e))?;

        let probes = self.settings.probes as usize;
        let total = peers.len() * probes;
        let mut rtts: Vec<Vec<Duration>> = vec![Vec::new(); peers.len()];
        let mut sent = vec![0u32; peers.len()];
        let mut done = vec![0u32; peers.len()];
        let mut last_error: Vec<Option<BoxError>> = Vec::new();
        last_error.resize_with(peers.len(), || None);

        let timeout = self.settings.timeout;
        let mut in_flight = FuturesUnordered::new();
        let mut next = 0usize;
        let tick = send_tick(self.settings.spread, total);
        loop {
            let now = Instant::now();
            while next < total {
                let (j, i) = (next / peers.len(), next % peers.len());
                if started + self.send_offset(i, j, peers.len()) > now {
                    break;
                }
                let peer = peers[i].as_str();
                let pinger = &self.pinger;
                sent[i] += 1;
                in_flight.push(async move {
                    let outcome = match tokio::time::timeout(timeout, pinger.ping(peer)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no reply within {timeout:?}").into()),
                    };
                    (i, outcome)
                });
                next += 1;
            }
            if next == total && in_flight.is_empty() {
                break;
            }
            let wake = (next < total).then(|| {
                let due = self.send_offset(next % peers.len(), next / peers.len(), peers.len());
                started + round_up(due, tick)
            });
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    // Peers whose probes all finished are reported; the others were not
                    // measured, which is not the same as unreachable.
                    let partial = self.results(&peers, &rtts, &sent, |i| done[i] as usize == probes, false)?;
                    debug!(component = "metrics", peers = partial.len(), "latency cycle cancelled");
                    return Err(CollectError::Cancelled { group: GROUP_LATENCY, partial });
                }
                Some((i, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                    done[i] += 1;
                    match outcome {
                        Ok(rtt) => rtts[i].push(rtt),
                        Err(e) => last_error[i] = Some(e),
                    }
                }
                () = sleep_until(wake), if wake.is_some() => {}
            }
        }

        for (i, peer) in peers.iter().enumerate() {
            if rtts[i].is_empty() {
                let error = last_error[i]
                    .as_ref()
                    .map_or_else(|| "no probe answered".to_owned(), ToString::to_string);
                warn!(component = "metrics", peer_id = %peer, error = %error, "latency ping failed");
            }
        }
        self.results(&peers, &rtts, &sent, |_| true, add_percentiles)
    }
}

/// Probes due within the same tick go out together: a mesh then costs one wake-up per tick
/// instead of one per probe, and the spread is still even at the scale of the cycle. The
/// tick holds about [`PROBES_PER_TICK`] probes, within these bounds: the wake-up, not the
/// send, is what a probe costs when each has its own.
const SEND_TICK_MIN: Duration = Duration::from_millis(4);
const SEND_TICK_MAX: Duration = Duration::from_millis(100);
const PROBES_PER_TICK: u32 = 8;

/// The tick for `total` probes spread over `spread`.
fn send_tick(spread: Duration, total: usize) -> Duration {
    let total = u32::try_from(total.max(1)).unwrap_or(u32::MAX);
    (spread / total * PROBES_PER_TICK).clamp(SEND_TICK_MIN, SEND_TICK_MAX)
}

fn round_up(d: Duration, tick: Duration) -> Duration {
    let tick_ns = tick.as_nanos().max(1);
    let ticks = d.as_nanos().div_ceil(tick_ns);
    Duration::from_nanos(u64::try_from(ticks * tick_ns).unwrap_or(u64::MAX))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_send_tick_holds_a_few_probes_within_bounds() {
        // 1,000 peers, 3 probes each, over the default 15 s interval's spread.
        assert_eq!(send_tick(ms(10_250), 3_000), ms(10_250) / 3_000 * 8);
        assert_eq!(send_tick(ms(10_250), 30_000), SEND_TICK_MIN);
        assert_eq!(send_tick(ms(10_250), 3), SEND_TICK_MAX);
        assert_eq!(send_tick(ms(10_250), 0), SEND_TICK_MAX);
    }

    /// Answers from a table: a fixed RTT per peer (after that much virtual time), an error,
    /// or never. Counts calls and records when each was made.
    struct Fake {
        rtts: HashMap<&'static str, Result<Duration, &'static str>>,
        calls: AtomicUsize,
        sends: Mutex<Vec<(String, Duration)>>,
        origin: Instant,
        prepare_error: Option<&'static str>,
    }

    impl Fake {
        fn new(rtts: &[(&'static str, Result<Duration, &'static str>)]) -> Arc<Self> {
            Arc::new(Self {
                rtts: rtts.iter().cloned().collect(),
                calls: AtomicUsize::new(0),
                sends: Mutex::new(Vec::new()),
                origin: Instant::now(),
                prepare_error: None,
            })
        }
    }

    #[async_trait]
    impl Pinger for Fake {
        async fn ping(&self, peer_id: &str) -> Result<Duration, BoxError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.sends
                .lock()
                .unwrap()
                .push((peer_id.to_owned(), self.origin.elapsed()));
            match self.rtts.get(peer_id) {
                Some(Ok(rtt)) => {
                    tokio::time::sleep(*rtt).await;
                    Ok(*rtt)
                }
                Some(Err(e)) => Err((*e).into()),
                None => std::future::pending().await,
            }
        }
        async fn prepare(&self) -> Result<(), BoxError> {
            self.prepare_error.map_or(Ok(()), |e| Err(e.into()))
        }
    }

    struct Peers(Result<Vec<&'static str>, &'static str>);

    #[async_trait]
    impl PeerLister for Peers {
        async fn peer_ids(&self, _: &CancellationToken) -> Result<Vec<String>, BoxError> {
            self.0
                .clone()
                .map(|v| v.into_iter().map(str::to_owned).collect())
                .map_err(Into::into)
        }
    }

    fn settings(probes: u32) -> LatencySettings {
        LatencySettings {
            probes,
            timeout: Duration::from_secs(1),
            spread: Duration::from_secs(6),
            collect_interval: Duration::from_secs(10),
        }
    }

    fn by_peer(points: &[MetricPoint]) -> HashMap<String, serde_json::Value> {
        points
            .iter()
            .map(|p| (p.peer_id.clone(), p.data.to_value()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn one_point_per_peer_and_a_failed_peer_is_minus_one() {
        let pinger = Fake::new(&[
            ("peer-abc-123", Ok(ms(15))),
            ("peer-xyz-789", Err("destination host unreachable")),
            ("silent", Err("unused")),
        ]);
        let c = LatencyCollector::new(
            pinger.clone(),
            Peers(Ok(vec!["peer-abc-123", "peer-xyz-789", "never"])),
            settings(3),
        );
        let start = Instant::now();
        let points = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(points.len(), 3);
        assert!(points.iter().all(|p| p.group == "latency"));
        let d = by_peer(&points);
        assert_eq!(d["peer-abc-123"]["rtt_nano"], 15_000_000);
        assert_eq!(d["peer-abc-123"]["peer_id"], "peer-abc-123");
        assert_eq!(d["peer-abc-123"]["probes_received"], 3);
        assert_eq!(d["peer-abc-123"]["rtt_jitter_nano"], 0);
        assert_eq!(d["peer-xyz-789"]["rtt_nano"], -1);
        assert_eq!(d["peer-xyz-789"]["probes_sent"], 3);
        assert_eq!(d["peer-xyz-789"]["probes_received"], 0);
        assert_eq!(d["never"]["rtt_nano"], -1, "timed out");
        assert_eq!(pinger.calls.load(Ordering::SeqCst), 9);
        // The last probe goes out at the end of the spread; a silent peer's last probe then
        // waits one timeout.
        let took = start.elapsed();
        assert!(took <= ms(6_000) + ms(1_000), "{took:?}");
        assert!(took >= ms(5_000), "probes were spread: {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn probes_are_spread_evenly_over_the_spread() {
        let pinger = Fake::new(&[("a", Ok(ms(1))), ("b", Ok(ms(1)))]);
        let c = LatencyCollector::new(pinger.clone(), Peers(Ok(vec!["a", "b"])), settings(3));
        c.collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap();
        let sends = pinger.sends.lock().unwrap().clone();
        let want: Vec<(String, Duration)> = [
            ("a", 0),
            ("b", 1_000),
            ("a", 2_000),
            ("b", 3_000),
            ("a", 4_000),
            ("b", 5_000),
        ]
        .iter()
        .map(|(p, t)| ((*p).to_owned(), ms(*t)))
        .collect();
        assert_eq!(sends, want);
    }

    #[tokio::test(start_paused = true)]
    async fn no_peers_is_an_empty_list_and_lister_or_prepare_errors_fail_the_cycle() {
        let pinger = Fake::new(&[]);
        let c = LatencyCollector::new(pinger.clone(), Peers(Ok(vec![])), settings(3));
        assert!(c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap()
            .is_empty());
        assert_eq!(pinger.calls.load(Ordering::SeqCst), 0);

        let c = LatencyCollector::new(pinger, Peers(Err("wg0: no such device")), settings(3));
        let e = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "metrics: latency: wg0: no such device");

        let pinger = Arc::new(Fake {
            prepare_error: Some("cannot open an ICMP socket"),
            ..Arc::into_inner(Fake::new(&[])).unwrap()
        });
        let c = LatencyCollector::new(pinger.clone(), Peers(Ok(vec!["a"])), settings(3));
        let e = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "metrics: latency: cannot open an ICMP socket"
        );
        assert_eq!(pinger.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_returns_the_peers_already_measured() {
        // With one probe each and a 6 s spread, "a" is probed at 0 s, "b" at 2 s, "c" at 4 s.
        let pinger = Fake::new(&[("a", Ok(ms(10))), ("b", Ok(ms(10))), ("c", Ok(ms(10)))]);
        let c = LatencyCollector::new(pinger, Peers(Ok(vec!["a", "b", "c"])), settings(1));
        let cancel = CancellationToken::new();
        let stop = {
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep(ms(3_000)).await;
                cancel.cancel();
            }
        };
        let (result, ()) = tokio::join!(c.collect(Cycle::default(), &cancel), stop);
        match result {
            Err(CollectError::Cancelled { group, partial }) => {
                assert_eq!(group, "latency");
                let ids: Vec<&str> = partial.iter().map(|p| p.peer_id.as_str()).collect();
                assert_eq!(ids, ["a", "b"]);
            }
            other => panic!("expected a cancellation, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn percentiles_cover_the_report_interval_and_come_before_each_report() {
        // Collect every 10 s, report every 30 s: the Manager marks the cycles at 30 s and
        // 60 s as the last of their report intervals.
        let pinger = Arc::new(Stepping {
            next: AtomicUsize::new(0),
        });
        let c = LatencyCollector::new(pinger, Peers(Ok(vec!["a"])), settings(1));
        let start = Instant::now();
        let mut seen = Vec::new();
        for cycle in 1..=6u64 {
            tokio::time::sleep_until(start + Duration::from_secs(10 * cycle)).await;
            let cycle = Cycle {
                ends_report_interval: cycle % 3 == 0,
            };
            let points = c.collect(cycle, &CancellationToken::new()).await.unwrap();
            let d = points[0].data.to_value();
            // To the histogram's resolution (1 %), in whole milliseconds.
            let in_ms = |k: &str| d[k].as_i64().map(|n| (n as f64 / 1e6).round() as i64);
            seen.push((in_ms("rtt_p50_nano"), in_ms("rtt_p99_nano")));
        }
        // Cycle n answers in n ms: the first interval saw 1, 2, 3 ms; the second 4, 5, 6 ms.
        assert_eq!(
            seen,
            [
                (None, None),
                (None, None),
                (Some(2), Some(3)),
                (None, None),
                (None, None),
                (Some(5), Some(6)),
            ]
        );
    }

    /// Answers the n-th ping after n milliseconds.
    struct Stepping {
        next: AtomicUsize,
    }

    #[async_trait]
    impl Pinger for Stepping {
        async fn ping(&self, _: &str) -> Result<Duration, BoxError> {
            let n = self.next.fetch_add(1, Ordering::SeqCst) as u64 + 1;
            Ok(ms(n))
        }
    }

    #[test]
    fn settings_from_the_default_config_leave_a_quarter_cycle() {
        let s = LatencySettings::from_config(&MetricsConfig::default());
        assert_eq!(s.probes, 3);
        assert_eq!(s.timeout, Duration::from_secs(1));
        assert_eq!(s.spread, ms(10_250));
        assert!(s.spread + s.timeout < s.collect_interval);
    }
}
