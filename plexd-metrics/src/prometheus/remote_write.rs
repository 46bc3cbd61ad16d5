//! Prometheus remote write 1.0: the request body a receiver (Prometheus, Mimir, Thanos,
//! VictoriaMetrics) takes at its write endpoint, built from the agent's points.
//!
//! The four messages of `prometheus.WriteRequest` are derived with prost here rather than
//! taken from a crate: the Rust remote-write crates either build from the `prometheus`
//! crate's registry and bring their own HTTP stack (`prometheus-reqwest-remote-write`), speak
//! remote write 2.0's symbol table (`promwrite`, young), or are server-side and no longer
//! released (`prom-remote-api`, last in 2023). Four messages of two fields each are less
//! than any of them would cost, and need no `protoc` at build time.
//!
//! The body is the protobuf compressed with snappy's *block* format (not its framed
//! format), as the specification requires.

use std::collections::HashMap;

use prost::Message as _;

use super::names::{FamilyDef, Kind, RTT_BUCKETS};
use super::series::{Sample as SeriesSample, SeriesBook, Value};
use crate::api::MetricPoint;

/// `prometheus.WriteRequest`: the whole body, before compression.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// Every series of the request with its samples.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`: one series' labels and its samples, oldest first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Labels sorted by name, `__name__` among them.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Samples in time order.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct Label {
    /// Label name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Label value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// The value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The remote-write body of `points`: each point folded into `book` in order, each series
/// the point changed written with its value after it, stamped with the point's time.
///
/// Counters are `_total`; the round-trip histogram is written as its `_bucket` (with `le`),
/// `_sum` and `_count` series. `external` labels are added to every series that has no label
/// of that name already: as in Prometheus' own `external_labels`, a series' own label wins.
/// Samples of one series are merged into one `TimeSeries` in time order; two samples of one
/// series at the same millisecond keep the later-folded value, since a receiver refuses a
/// second value at a timestamp it holds.
///
/// Points the book cannot read add nothing (the book counts them).
pub fn encode(
    book: &mut SeriesBook,
    points: &[MetricPoint],
    external: &[(String, String)],
) -> Vec<u8> {
    let request = write_request(book, points, external);
    compress(&request.encode_to_vec())
}

/// What [`encode`] compresses: the request of `points`, folding them into `book`.
pub fn write_request(
    book: &mut SeriesBook,
    points: &[MetricPoint],
    external: &[(String, String)],
) -> WriteRequest {
    let mut series: Vec<TimeSeries> = Vec::new();
    // Labels (sorted, `__name__` included) → the series' index in `series`.
    let mut index: HashMap<Vec<Label>, usize> = HashMap::new();
    for point in points {
        let timestamp = point.timestamp.timestamp_millis();
        for (def, sample) in book.fold_point(point) {
            for (labels, value) in flatten(&def, &sample, external) {
                let at = *index.entry(labels).or_insert_with_key(|labels| {
                    series.push(TimeSeries {
                        labels: labels.clone(),
                        samples: Vec::new(),
                    });
                    series.len() - 1
                });
                series[at].samples.push(Sample { value, timestamp });
            }
        }
    }
    for s in &mut series {
        in_time_order(&mut s.samples);
    }
    WriteRequest { timeseries: series }
}

/// Sorts samples by time, keeping the later-pushed one of two at the same millisecond.
fn in_time_order(samples: &mut Vec<Sample>) {
    // Points arrive in collect order, so this is almost always sorted already; the stable
    // sort keeps the fold order of equal timestamps.
    if !samples.is_sorted_by_key(|s| s.timestamp) {
        samples.sort_by_key(|s| s.timestamp);
    }
    let mut kept: Vec<Sample> = Vec::with_capacity(samples.len());
    for s in samples.drain(..) {
        match kept.last_mut() {
            Some(last) if last.timestamp == s.timestamp => *last = s,
            _ => kept.push(s),
        }
    }
    *samples = kept;
}

/// One family's sample as the remote-write series it becomes: one for a number, the
/// buckets, sum and count for a histogram. Each with its labels sorted by name.
fn flatten(
    def: &FamilyDef,
    sample: &SeriesSample,
    external: &[(String, String)],
) -> Vec<(Vec<Label>, f64)> {
    let labels = |name: String, extra: Option<(&str, String)>| {
        let mut out: Vec<Label> = Vec::with_capacity(sample.labels.len() + external.len() + 2);
        out.push(label("__name__", name));
        out.extend(sample.labels.iter().map(|(k, v)| label(k, v.clone())));
        if let Some((k, v)) = extra {
            out.push(label(k, v));
        }
        for (k, v) in external {
            if !out.iter().any(|l| l.name == *k) {
                out.push(label(k, v.clone()));
            }
        }
        out.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        out
    };
    match (&sample.value, def.kind) {
        (Value::Number(v), _) => vec![(labels(def.sample_name(), None), *v)],
        (
            Value::Histogram {
                buckets,
                count,
                sum,
            },
            _,
        ) => {
            let bucket = format!("{}_bucket", def.name);
            let mut out: Vec<(Vec<Label>, f64)> = RTT_BUCKETS
                .iter()
                .zip(buckets)
                .map(|(bound, n)| {
                    (
                        labels(bucket.clone(), Some(("le", format_le(*bound)))),
                        *n as f64,
                    )
                })
                .collect();
            out.push((
                labels(bucket, Some(("le", format_le(f64::INFINITY)))),
                *count as f64,
            ));
            out.push((labels(format!("{}_sum", def.name), None), *sum));
            out.push((labels(format!("{}_count", def.name), None), *count as f64));
            debug_assert_eq!(def.kind, Kind::Histogram);
            out
        }
    }
}

fn label(name: &str, value: String) -> Label {
    Label {
        name: name.to_owned(),
        value,
    }
}

/// A bucket bound as Prometheus writes `le`: the shortest decimal that reads back the same
/// (`0.0005`, `1`, `2.5`), and `+Inf`.
pub fn format_le(bound: f64) -> String {
    if bound == f64::INFINITY {
        "+Inf".to_owned()
    } else {
        // Rust's Display is the shortest round-tripping decimal without an exponent, as Go's
        // FormatFloat(b, 'g', -1, 64) writes the bounds of RTT_BUCKETS.
        bound.to_string()
    }
}

/// Snappy's block format, which remote write requires (not the framed one).
fn compress(raw: &[u8]) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(raw)
        .expect("snappy compresses any input under 4 GiB, far beyond a batch")
}

/// The request a remote-write body holds: snappy block decompression and protobuf decoding,
/// the receiver's side of [`encode`], for tests and tools.
pub fn decode(body: &[u8]) -> Result<WriteRequest, String> {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("not snappy block format: {e}"))?;
    WriteRequest::decode(raw.as_slice()).map_err(|e| format!("not a prometheus.WriteRequest: {e}"))
}

impl TimeSeries {
    /// The value of label `name`, if the series has one.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{GROUP_AGENT, GROUP_LATENCY, GROUP_SYSTEM, GROUP_TUNNEL};
    use crate::collector::{AgentStats, LatencyResult, SystemStats, TunnelStats};
    use chrono::{DateTime, TimeZone, Utc};
    use proptest::prelude::*;
    use std::time::Duration;

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_700_000_000_000 + ms).unwrap()
    }

    fn tunnel(ms: i64, peer: &str, key: &str, lost: u64, rx: u64, rx_bytes: u64) -> MetricPoint {
        let stats = TunnelStats {
            peer_id: peer.to_owned(),
            interface: "wg0".into(),
            public_key: key.to_owned(),
            endpoint: "192.0.2.1:51820".into(),
            rx_bytes,
            rx_packets: Some(rx),
            lost_packets: Some(lost),
            handshake_succeeded: true,
            handshake_stale: false,
            ..TunnelStats::default()
        };
        MetricPoint::new(at(ms), GROUP_TUNNEL, peer, &stats).unwrap()
    }

    fn external() -> Vec<(String, String)> {
        vec![
            ("node".to_owned(), "node-1".to_owned()),
            // The series' own label of this name wins.
            ("peer".to_owned(), "not-this".to_owned()),
        ]
    }

    fn find<'a>(req: &'a WriteRequest, name: &str, peer: &str) -> &'a TimeSeries {
        req.timeseries
            .iter()
            .find(|s| s.label("__name__") == Some(name) && s.label("peer") == Some(peer))
            .unwrap_or_else(|| panic!("no series {name}{{peer={peer:?}}}"))
    }

    fn values(s: &TimeSeries) -> Vec<(i64, f64)> {
        s.samples.iter().map(|s| (s.timestamp, s.value)).collect()
    }

    #[test]
    fn decodes_to_sorted_labels_cumulative_counters_and_merged_series() {
        let mut book = SeriesBook::new("1.2.3", "remote_write");
        let batch = [
            tunnel(0, "gw", "K1", 2, 100, 1_000),
            tunnel(0, "db", "K2", 0, 7, 70),
            tunnel(15_000, "gw", "K1", 3, 50, 1_500),
        ];
        let body = encode(&mut book, &batch, &external());
        let req = decode(&body).unwrap();
        for s in &req.timeseries {
            let names: Vec<&str> = s.labels.iter().map(|l| l.name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(names, sorted, "labels sorted by name");
            assert_eq!(s.label("node"), Some("node-1"));
            assert!(s
                .samples
                .windows(2)
                .all(|w| w[0].timestamp < w[1].timestamp));
        }
        let lost = find(&req, "plexd_peer_lost_packets_total", "gw");
        let t0 = at(0).timestamp_millis();
        assert_eq!(values(lost), [(t0, 2.0), (t0 + 15_000, 5.0)]);
        assert_eq!(
            lost.labels,
            [
                label("__name__", "plexd_peer_lost_packets_total".into()),
                label("interface", "wg0".into()),
                label("node", "node-1".into()),
                label("peer", "gw".into()),
                label("public_key", "K1".into()),
            ]
        );
        // WireGuard's byte counter is cumulative already: passed through.
        let bytes = find(&req, "plexd_peer_receive_bytes_total", "gw");
        assert_eq!(values(bytes), [(t0, 1_000.0), (t0 + 15_000, 1_500.0)]);
        let info = find(&req, "plexd_peer_info", "db");
        assert_eq!(info.label("endpoint"), Some("192.0.2.1:51820"));
        assert_eq!(values(find(&req, "plexd_peer_up", "db")), [(t0, 1.0)]);

        // The next batch continues the totals.
        let req = decode(&encode(
            &mut book,
            &[tunnel(30_000, "gw", "K1", 4, 10, 1_600)],
            &external(),
        ))
        .unwrap();
        assert_eq!(
            values(find(&req, "plexd_peer_lost_packets_total", "gw")),
            [(t0 + 30_000, 9.0)]
        );
        assert_eq!(
            values(find(&req, "plexd_peer_receive_packets_total", "gw")),
            [(t0 + 30_000, 160.0)]
        );
        // Only what the batch changed is written.
        assert!(req.timeseries.iter().all(|s| s.label("peer") != Some("db")));
    }

    #[test]
    fn the_histogram_is_buckets_with_le_sum_and_count() {
        let mut book = SeriesBook::new("1", "remote_write");
        let us = Duration::from_micros;
        let result = LatencyResult::from_samples("gw", 3, &[us(700), us(3_000)]);
        let point = MetricPoint::new(at(0), GROUP_LATENCY, "gw", &result).unwrap();
        let req = decode(&encode(&mut book, &[point], &[])).unwrap();
        let buckets: Vec<(String, f64)> = req
            .timeseries
            .iter()
            .filter(|s| s.label("__name__") == Some("plexd_peer_rtt_seconds_bucket"))
            .map(|s| (s.label("le").unwrap().to_owned(), s.samples[0].value))
            .collect();
        let want: Vec<(String, f64)> = [
            ("0.0005", 0.0),
            ("0.001", 1.0),
            ("0.0025", 1.0),
            ("0.005", 2.0),
            ("0.01", 2.0),
            ("0.025", 2.0),
            ("0.05", 2.0),
            ("0.1", 2.0),
            ("0.25", 2.0),
            ("0.5", 2.0),
            ("1", 2.0),
            ("2.5", 2.0),
            ("+Inf", 2.0),
        ]
        .iter()
        .map(|(le, v)| ((*le).to_owned(), *v))
        .collect();
        assert_eq!(buckets, want);
        let sum = find(&req, "plexd_peer_rtt_seconds_sum", "gw").samples[0].value;
        assert!((sum - 0.0037).abs() < 1e-12, "{sum}");
        assert_eq!(
            find(&req, "plexd_peer_rtt_seconds_count", "gw").samples[0].value,
            2.0
        );
        assert_eq!(
            find(&req, "plexd_peer_probes_sent_total", "gw").samples[0].value,
            3.0
        );
    }

    #[test]
    fn node_and_agent_groups_and_equal_timestamps() {
        let mut book = SeriesBook::new("9.9.9", "remote_write");
        let system = |load: f64| SystemStats {
            load_avg_1: load,
            cpu_usage_percent: 50.0,
            ..SystemStats::default()
        };
        let agent = AgentStats {
            uptime_seconds: 12.0,
            dropped_points: Some(3),
            ..AgentStats::default()
        };
        let batch = [
            MetricPoint::new(at(0), GROUP_SYSTEM, "", &system(1.0)).unwrap(),
            // Same millisecond: the later value is kept, once.
            MetricPoint::new(at(0), GROUP_SYSTEM, "", &system(2.0)).unwrap(),
            MetricPoint::new(at(5), GROUP_AGENT, "", &agent).unwrap(),
        ];
        let req = decode(&encode(&mut book, &batch, &[])).unwrap();
        let one = |name: &str| {
            req.timeseries
                .iter()
                .find(|s| s.label("__name__") == Some(name))
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(
            values(one("plexd_node_load1")),
            [(at(0).timestamp_millis(), 2.0)]
        );
        assert_eq!(one("plexd_node_cpu_usage_ratio").samples[0].value, 0.5);
        let dropped = one("plexd_agent_dropped_points_total");
        assert_eq!(dropped.label("destination"), Some("remote_write"));
        assert_eq!(dropped.samples[0].value, 3.0);
        assert_eq!(
            one("plexd_agent_build_info").label("version"),
            Some("9.9.9")
        );
    }

    #[test]
    fn le_is_written_as_prometheus_writes_it() {
        let all: Vec<String> = RTT_BUCKETS.iter().map(|b| format_le(*b)).collect();
        assert_eq!(
            all,
            [
                "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
                "0.5", "1", "2.5"
            ]
        );
        assert_eq!(format_le(f64::INFINITY), "+Inf");
    }

    #[test]
    fn an_empty_batch_is_an_empty_request_and_junk_is_refused_by_decode() {
        let mut book = SeriesBook::new("1", "remote_write");
        assert_eq!(
            decode(&encode(&mut book, &[], &[])).unwrap(),
            WriteRequest::default()
        );
        assert!(decode(b"not snappy").is_err());
    }

    fn any_point() -> impl Strategy<Value = MetricPoint> {
        let group = prop_oneof![
            Just(GROUP_TUNNEL),
            Just(GROUP_LATENCY),
            Just(GROUP_SYSTEM),
            Just(GROUP_AGENT),
            Just("other"),
        ];
        let tunnel = (
            "[a-c]{0,2}",
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(peer, bytes, rx, lost)| {
                serde_json::to_value(TunnelStats {
                    peer_id: peer,
                    rx_bytes: bytes,
                    rx_packets: rx,
                    lost_packets: lost,
                    ..TunnelStats::default()
                })
                .unwrap()
            });
        let latency = (
            "[a-c]{0,2}",
            any::<u32>(),
            proptest::collection::vec(any::<i64>(), 0..4),
        )
            .prop_map(|(peer, sent, rtts)| {
                let mut r = LatencyResult::from_samples(peer, sent, &[]);
                r.rtt_samples_nano = rtts;
                serde_json::to_value(r).unwrap()
            });
        let system = (any::<f64>(), any::<u64>()).prop_map(|(load, rx)| {
            serde_json::json!({ "load_avg_1": load, "network_rx_bytes": rx, "cpu_usage_percent": load })
        });
        let junk = prop_oneof![
            Just(serde_json::json!({})),
            Just(serde_json::json!({"rx_bytes": "many"})),
            Just(serde_json::json!({"peer_id": [1, 2], "rx_bytes": -1})),
            any::<i64>().prop_map(|n| serde_json::json!({"rx_packets": n, "load_avg_1": n})),
        ];
        let data = prop_oneof![tunnel, latency, system, junk];
        (group, data, -100_000_000_000_000i64..100_000_000_000_000i64).prop_map(
            |(group, data, ms)| MetricPoint {
                timestamp: Utc
                    .timestamp_millis_opt(ms)
                    .single()
                    .unwrap_or_else(Utc::now),
                group: group.to_owned(),
                peer_id: String::new(),
                data: crate::api::PointData::new(&data).unwrap(),
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_points_encode_without_panic_and_decode(
            batches in proptest::collection::vec(proptest::collection::vec(any_point(), 0..12), 1..4)
        ) {
            let mut book = SeriesBook::new("1", "remote_write");
            for batch in &batches {
                let req = decode(&encode(&mut book, batch, &external())).unwrap();
                for s in &req.timeseries {
                    prop_assert!(!s.samples.is_empty());
                    prop_assert!(s.samples.windows(2).all(|w| w[0].timestamp < w[1].timestamp));
                    prop_assert!(s.labels.windows(2).all(|w| w[0].name < w[1].name));
                }
            }
        }
    }
}
