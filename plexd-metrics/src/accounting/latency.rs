//! Summaries of round trips: one peer's cycle ([`LatencyResult::from_samples`]) and its
//! percentiles over a report interval ([`IntervalPercentiles`]).

use std::collections::HashMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// One peer's round trips in one cycle: the spec's `LatencyResult` and this agent's extras.
/// Every time is in nanoseconds; -1 means "not measured" (no reply, or too few replies).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyResult {
    /// The peer's public key (base64) or name.
    pub peer_id: String,
    /// Median of this cycle's answered probes; -1 when none was answered.
    pub rtt_nano: i64,
    /// Fastest answered probe of the cycle.
    pub rtt_min_nano: i64,
    /// Slowest answered probe of the cycle.
    pub rtt_max_nano: i64,
    /// Mean absolute difference between consecutive answered probes; -1 with fewer than two.
    pub rtt_jitter_nano: i64,
    /// Probes tried this cycle.
    pub probes_sent: u32,
    /// Probes answered this cycle.
    pub probes_received: u32,
    /// Median over the report interval; only in the last point before each report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p50_nano: Option<i64>,
    /// 99th percentile over the report interval; only in the last point before each report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_p99_nano: Option<i64>,
    /// Every answered probe's round trip, in the order they were sent: what a histogram of
    /// round trips (the Prometheus exposition's) is built from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rtt_samples_nano: Vec<i64>,
}

impl LatencyResult {
    /// Summarises one peer's cycle from the round-trip times of its answered probes, in the
    /// order they were sent.
    pub fn from_samples(peer_id: impl Into<String>, sent: u32, rtts: &[Duration]) -> Self {
        let nanos: Vec<i64> = rtts.iter().map(|d| duration_nanos(*d)).collect();
        let jitter = if nanos.len() >= 2 {
            let total: i64 = nanos.windows(2).map(|w| (w[1] - w[0]).abs()).sum();
            total / (nanos.len() as i64 - 1)
        } else {
            -1
        };
        let mut sorted = nanos.clone();
        sorted.sort_unstable();
        Self {
            peer_id: peer_id.into(),
            rtt_nano: median(&sorted).unwrap_or(-1),
            rtt_min_nano: sorted.first().copied().unwrap_or(-1),
            rtt_max_nano: sorted.last().copied().unwrap_or(-1),
            rtt_jitter_nano: jitter,
            probes_sent: sent,
            probes_received: u32::try_from(nanos.len()).unwrap_or(u32::MAX),
            rtt_p50_nano: None,
            rtt_p99_nano: None,
            rtt_samples_nano: nanos,
        }
    }
}

/// The median of sorted values; with an even count, the mean of the middle two.
fn median(sorted: &[i64]) -> Option<i64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2),
    }
}

fn duration_nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Round trips over one report interval, per peer.
#[derive(Default)]
pub struct IntervalPercentiles {
    per_peer: HashMap<String, Histogram<u32>>,
}

impl IntervalPercentiles {
    /// Adds one cycle's answered round trips of `peer_id`.
    pub fn record(&mut self, peer_id: &str, rtts: &[Duration]) {
        if rtts.is_empty() && !self.per_peer.contains_key(peer_id) {
            return;
        }
        let histogram = self
            .per_peer
            .entry(peer_id.to_owned())
            .or_insert_with(new_histogram);
        for rtt in rtts {
            // Auto-resizing, so recording never fails for a positive value.
            let _ = histogram.record(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1));
        }
    }

    /// p50 and p99 of `peer_id` over the interval (-1 when it had no answered probe).
    pub fn take(&mut self, peer_id: &str) -> (i64, i64) {
        match self.per_peer.get_mut(peer_id) {
            Some(h) if !h.is_empty() => {
                // The middle of the value's bucket rather than its top: unbiased within the
                // histogram's 1 % resolution.
                let q = |q: f64| {
                    i64::try_from(h.median_equivalent(h.value_at_quantile(q))).unwrap_or(i64::MAX)
                };
                let out = (q(0.5), q(0.99));
                h.reset();
                out
            }
            _ => (-1, -1),
        }
    }

    /// Forgets peers that are gone, so that a churning mesh does not grow the map.
    pub fn retain(&mut self, peers: &[String]) {
        if self.per_peer.len() > peers.len() {
            let current: std::collections::HashSet<&str> =
                peers.iter().map(String::as_str).collect();
            self.per_peer.retain(|k, _| current.contains(k.as_str()));
        }
    }
}

/// Nanoseconds with two significant digits (1 % resolution) from 1 µs up; the counts array
/// grows only as far as the largest value seen, which keeps a mesh of LAN peers small.
fn new_histogram() -> Histogram<u32> {
    let mut h = Histogram::new_with_bounds(1_000, 2_000, 2).expect("static bounds are valid");
    h.auto(true);
    h
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn summary_of_samples() {
        let r = LatencyResult::from_samples("p", 4, &[ms(10), ms(30), ms(20), ms(40)]);
        assert_eq!(r.rtt_nano, 25_000_000, "mean of the middle two");
        assert_eq!(r.rtt_min_nano, 10_000_000);
        assert_eq!(r.rtt_max_nano, 40_000_000);
        // |30-10| + |20-30| + |40-20| = 50 over 3 gaps.
        assert_eq!(r.rtt_jitter_nano, 16_666_666);
        assert_eq!((r.probes_sent, r.probes_received), (4, 4));

        let r = LatencyResult::from_samples("p", 3, &[ms(7), ms(1), ms(3)]);
        assert_eq!(r.rtt_nano, 3_000_000);

        let one = LatencyResult::from_samples("p", 3, &[ms(5)]);
        assert_eq!((one.rtt_nano, one.rtt_jitter_nano), (5_000_000, -1));
        assert_eq!((one.probes_sent, one.probes_received), (3, 1));

        let none = LatencyResult::from_samples("p", 3, &[]);
        assert_eq!(
            (
                none.rtt_nano,
                none.rtt_min_nano,
                none.rtt_max_nano,
                none.rtt_jitter_nano
            ),
            (-1, -1, -1, -1)
        );
    }

    #[test]
    fn spec_keys_serialise_first_and_percentiles_only_when_set() {
        let r = LatencyResult::from_samples("peer-abc-123", 1, &[ms(15)]);
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"peer_id":"peer-abc-123","rtt_nano":15000000,"rtt_min_nano":15000000,"rtt_max_nano":15000000,"rtt_jitter_nano":-1,"probes_sent":1,"probes_received":1,"rtt_samples_nano":[15000000]}"#
        );
    }

    #[test]
    fn percentiles_cover_the_interval_and_start_again() {
        let mut p = IntervalPercentiles::default();
        let rtts: Vec<Duration> = (1..=100).map(ms).collect();
        p.record("a", &rtts[..50]);
        p.record("a", &rtts[50..]);
        let (p50, p99) = p.take("a");
        // Within the histogram's 1 % resolution of iputils' nearest-rank figures.
        assert!((p50 - 50_000_000).abs() <= 500_000, "{p50}");
        assert!((p99 - 99_000_000).abs() <= 990_000, "{p99}");
        assert_eq!(
            p.take("a"),
            (-1, -1),
            "taken: the next interval starts empty"
        );
        assert_eq!(p.take("never"), (-1, -1));
        p.retain(&[]);
        assert!(p.per_peer.is_empty());
    }

    #[test]
    fn histograms_of_departed_peers_are_dropped() {
        let mut p = IntervalPercentiles::default();
        p.record("a", &[ms(1)]);
        p.record("b", &[ms(2)]);
        p.record("never-answered", &[]);
        assert_eq!(p.per_peer.len(), 2, "no histogram without a sample");
        p.retain(&["b".to_owned()]);
        assert_eq!(p.per_peer.keys().collect::<Vec<_>>(), ["b"]);
        let (p50, p99) = p.take("b");
        assert_eq!(p50, p99);
        assert!((p50 - 2_000_000).abs() <= 20_000, "within 1 %: {p50}");
        assert_eq!(p.take("b"), (-1, -1), "taking resets the interval");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        #[test]
        fn a_summary_is_ordered_and_counts_what_was_answered(
            rtts in proptest::collection::vec(0u64..10_000_000_000, 0..20),
            extra in 0u32..5,
        ) {
            let rtts: Vec<Duration> = rtts.into_iter().map(Duration::from_nanos).collect();
            let sent = rtts.len() as u32 + extra;
            let r = LatencyResult::from_samples("p", sent, &rtts);
            prop_assert_eq!(r.probes_received as usize, rtts.len());
            prop_assert_eq!(r.probes_sent, sent);
            if rtts.is_empty() {
                prop_assert_eq!((r.rtt_nano, r.rtt_min_nano, r.rtt_max_nano), (-1, -1, -1));
            } else {
                prop_assert!(r.rtt_min_nano <= r.rtt_nano && r.rtt_nano <= r.rtt_max_nano);
                prop_assert!(r.rtt_jitter_nano <= r.rtt_max_nano - r.rtt_min_nano);
            }
        }
    }
}
