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

use prost::Message as _;

use super::names::{FamilyDef, Kind, RTT_BUCKETS};
use super::series::{SeriesBook, Value};
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
/// Labels with an empty value are left out, as Prometheus treats them as absent.
///
/// Each sample is a `TimeSeries` of its own, in the order the points were collected, as
/// Prometheus' own sender writes them: a series that several cycles of the batch touch
/// appears once per cycle, each time later than the last.
///
/// Points the book cannot read add nothing (the book counts them).
pub fn encode(
    book: &mut SeriesBook,
    points: &[MetricPoint],
    external: &[(String, String)],
) -> Vec<u8> {
    let mut raw = Vec::with_capacity(points.len() * 2048);
    for point in points {
        let timestamp = point.timestamp.timestamp_millis();
        book.visit_point(point, &mut |def, labels, value| {
            write_series(&mut raw, def, labels, &value, external, timestamp);
        });
    }
    compress(&raw)
}

/// The request's bytes are written straight from the book's labels: building the prost
/// messages first costs an owned string per label of every series and as much again to free
/// them, several times the writing itself at ten thousand peers.
fn write_series(
    out: &mut Vec<u8>,
    def: &FamilyDef,
    labels: &[(&'static str, &str)],
    value: &Value,
    external: &[(String, String)],
    timestamp: i64,
) {
    match (value, def.kind) {
        (Value::Number(v), Kind::Counter) => {
            let name = [def.name, "_total"];
            write_time_series(out, &name, labels, None, external, *v, timestamp);
        }
        (Value::Number(v), _) => {
            write_time_series(out, &[def.name], labels, None, external, *v, timestamp);
        }
        (
            Value::Histogram {
                buckets,
                count,
                sum,
            },
            _,
        ) => {
            let bucket = [def.name, "_bucket"];
            for (le, n) in RTT_LE.iter().zip(buckets) {
                let extra = Some(("le", *le));
                write_time_series(out, &bucket, labels, extra, external, *n as f64, timestamp);
            }
            let inf = Some(("le", "+Inf"));
            write_time_series(
                out,
                &bucket,
                labels,
                inf,
                external,
                *count as f64,
                timestamp,
            );
            let sum_name = [def.name, "_sum"];
            write_time_series(out, &sum_name, labels, None, external, *sum, timestamp);
            let count_name = [def.name, "_count"];
            write_time_series(
                out,
                &count_name,
                labels,
                None,
                external,
                *count as f64,
                timestamp,
            );
        }
    }
}

/// The `le` of each of [`RTT_BUCKETS`], as [`format_le`] writes them (a test checks).
const RTT_LE: [&str; RTT_BUCKETS.len()] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
];

/// Protobuf field keys: (field number << 3) | wire type.
const KEY_TIMESERIES: u8 = 1 << 3 | 2;
const KEY_LABELS: u8 = 1 << 3 | 2;
const KEY_SAMPLES: u8 = 2 << 3 | 2;
const KEY_LABEL_NAME: u8 = 1 << 3 | 2;
const KEY_LABEL_VALUE: u8 = 2 << 3 | 2;
const KEY_SAMPLE_VALUE: u8 = 1 << 3 | 1;
const KEY_SAMPLE_TIMESTAMP: u8 = 2 << 3;

/// Writes one `TimeSeries` (field 1 of the request) with one sample. `name` is the metric
/// name in parts (the family's and a suffix), written without joining them.
fn write_time_series(
    out: &mut Vec<u8>,
    name: &[&str],
    labels: &[(&'static str, &str)],
    extra: Option<(&'static str, &str)>,
    external: &[(String, String)],
    value: f64,
    timestamp: i64,
) {
    // `__name__`, the family's labels (four at most), one extra and the external ones, on
    // the stack: a heap list per series would cost more than writing it.
    let mut list = LabelList {
        all: [("", Part::Text("")); MAX_LABELS],
        n: 0,
    };
    list.push("__name__", Part::Name(name));
    for (k, v) in labels {
        list.push(k, Part::Text(v));
    }
    if let Some((k, v)) = extra {
        list.push(k, Part::Text(v));
    }
    for (k, v) in external {
        list.push(k.as_str(), Part::Text(v.as_str()));
    }
    let all = &mut list.all[..list.n];
    all.sort_unstable_by(|a, b| a.0.cmp(b.0));

    let label_len = |k: &str, v: &Part<'_>| field_len(k.len()) + field_len(v.len());
    let labels_len: usize = all.iter().map(|(k, v)| field_len(label_len(k, v))).sum();
    let timestamp_len = if timestamp == 0 {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(timestamp as u64)
    };
    let sample_len = 9 + timestamp_len;
    let series_len = labels_len + field_len(sample_len);

    out.push(KEY_TIMESERIES);
    prost::encoding::encode_varint(series_len as u64, out);
    for (k, v) in all.iter() {
        out.push(KEY_LABELS);
        prost::encoding::encode_varint(label_len(k, v) as u64, out);
        out.push(KEY_LABEL_NAME);
        prost::encoding::encode_varint(k.len() as u64, out);
        out.extend_from_slice(k.as_bytes());
        out.push(KEY_LABEL_VALUE);
        prost::encoding::encode_varint(v.len() as u64, out);
        v.write(out);
    }
    out.push(KEY_SAMPLES);
    prost::encoding::encode_varint(sample_len as u64, out);
    out.push(KEY_SAMPLE_VALUE);
    out.extend_from_slice(&value.to_le_bytes());
    if timestamp != 0 {
        out.push(KEY_SAMPLE_TIMESTAMP);
        prost::encoding::encode_varint(timestamp as u64, out);
    }
}

/// A length-delimited field of `len` bytes: key, length, bytes.
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// External labels a series can carry besides its own (`metrics.remote_write.external_labels`
/// is refused beyond this, and `node` may be added to it).
pub const MAX_EXTERNAL_LABELS: usize = 9;

/// Labels a series can have: `__name__`, four of the family's, one extra (`le`), the
/// external ones and `node`.
const MAX_LABELS: usize = 1 + 4 + 1 + MAX_EXTERNAL_LABELS + 1;

/// A series' labels while they are written.
struct LabelList<'a> {
    all: [(&'a str, Part<'a>); MAX_LABELS],
    n: usize,
}

impl<'a> LabelList<'a> {
    /// Adds a label unless its value is empty or one of that name is there already (the
    /// series' own labels come before the external ones, and win).
    fn push(&mut self, name: &'a str, value: Part<'a>) {
        let taken = self.all[..self.n].iter().any(|(k, _)| *k == name);
        if value.len() > 0 && !taken && self.n < MAX_LABELS {
            self.all[self.n] = (name, value);
            self.n += 1;
        }
    }
}

/// A label value: text, or the metric name in parts.
#[derive(Clone, Copy)]
enum Part<'a> {
    Text(&'a str),
    Name(&'a [&'a str]),
}

impl Part<'_> {
    fn len(&self) -> usize {
        match self {
            Part::Text(t) => t.len(),
            Part::Name(parts) => parts.iter().map(|p| p.len()).sum(),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Part::Text(t) => out.extend_from_slice(t.as_bytes()),
            Part::Name(parts) => {
                for p in *parts {
                    out.extend_from_slice(p.as_bytes());
                }
            }
        }
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

    fn label(name: &str, value: String) -> Label {
        Label {
            name: name.to_owned(),
            value,
        }
    }

    /// The series `name{peer}` with the samples of every `TimeSeries` that carries it, in
    /// the order they were written.
    fn find(req: &WriteRequest, name: &str, peer: &str) -> TimeSeries {
        let mut all = req
            .timeseries
            .iter()
            .filter(|s| s.label("__name__") == Some(name) && s.label("peer") == Some(peer));
        let mut merged = all
            .next()
            .unwrap_or_else(|| panic!("no series {name}{{peer={peer:?}}}"))
            .clone();
        for s in all {
            assert_eq!(s.labels, merged.labels);
            merged.samples.extend(s.samples.iter().cloned());
        }
        merged
    }

    fn values(s: &TimeSeries) -> Vec<(i64, f64)> {
        s.samples.iter().map(|s| (s.timestamp, s.value)).collect()
    }

    #[test]
    fn decodes_to_sorted_labels_cumulative_counters_in_collect_order() {
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
        assert_eq!(values(&lost), [(t0, 2.0), (t0 + 15_000, 5.0)]);
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
        assert_eq!(values(&bytes), [(t0, 1_000.0), (t0 + 15_000, 1_500.0)]);
        let info = find(&req, "plexd_peer_info", "db");
        assert_eq!(info.label("endpoint"), Some("192.0.2.1:51820"));
        assert_eq!(values(&find(&req, "plexd_peer_up", "db")), [(t0, 1.0)]);

        // The next batch continues the totals.
        let req = decode(&encode(
            &mut book,
            &[tunnel(30_000, "gw", "K1", 4, 10, 1_600)],
            &external(),
        ))
        .unwrap();
        assert_eq!(
            values(&find(&req, "plexd_peer_lost_packets_total", "gw")),
            [(t0 + 30_000, 9.0)]
        );
        assert_eq!(
            values(&find(&req, "plexd_peer_receive_packets_total", "gw")),
            [(t0 + 30_000, 160.0)]
        );
        // Only what the batch changed is written.
        assert!(req.timeseries.iter().all(|s| s.label("peer") != Some("db")));
    }

    #[test]
    fn the_bucket_bounds_are_written_as_prometheus_writes_them() {
        let formatted: Vec<String> = RTT_BUCKETS.iter().map(|b| format_le(*b)).collect();
        assert_eq!(formatted, RTT_LE);
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
    fn node_and_agent_groups() {
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
            MetricPoint::new(at(1), GROUP_SYSTEM, "", &system(2.0)).unwrap(),
            MetricPoint::new(at(5), GROUP_AGENT, "", &agent).unwrap(),
        ];
        let req = decode(&encode(&mut book, &batch, &[])).unwrap();
        let one = |name: &str| {
            req.timeseries
                .iter()
                .find(|s| s.label("__name__") == Some(name))
                .unwrap_or_else(|| panic!("no {name}"))
        };
        let load: Vec<(i64, f64)> = req
            .timeseries
            .iter()
            .filter(|s| s.label("__name__") == Some("plexd_node_load1"))
            .flat_map(values)
            .collect();
        let t0 = at(0).timestamp_millis();
        assert_eq!(load, [(t0, 1.0), (t0 + 1, 2.0)]);
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
