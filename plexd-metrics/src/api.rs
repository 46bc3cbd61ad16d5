//! The wire format of the control plane's metrics API (`POST /v1/nodes/{node_id}/metrics`).
//!
//! Field names, their order and the timestamp format are those of the Go agent, so that a
//! control plane written for it accepts these batches unchanged.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::{self, DeserializeOwned};
use serde::{ser, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Group of [`crate::collector::SystemCollector`]: CPU, memory, disk, network, load average.
pub const GROUP_SYSTEM: &str = "system";
/// Group of the tunnel collector: per-peer tunnel health and packet loss.
pub const GROUP_TUNNEL: &str = "tunnel";
/// Group of the latency collector: per-peer round-trip time.
pub const GROUP_LATENCY: &str = "latency";
/// Group of [`crate::collector::AgentStatsCollector`]: the agent's own health.
pub const GROUP_AGENT: &str = "agent";
/// Group of [`crate::collector::GpuCollector`]: one point per NVIDIA GPU.
pub const GROUP_GPU: &str = "gpu";
/// Group of [`crate::collector::AppsCollector`]: application endpoints (`metrics.apps`).
pub const GROUP_APP: &str = "app";

/// One measurement of one group, optionally about one peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// When the point was collected; serialised as RFC 3339 in UTC.
    #[serde(serialize_with = "rfc3339_utc")]
    pub timestamp: DateTime<Utc>,
    /// One of the `GROUP_*` constants.
    pub group: String,
    /// The peer the point is about; omitted from the JSON when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer_id: String,
    /// The group's payload, a JSON object.
    pub data: PointData,
}

/// A batch as posted to the control plane: a JSON array of points.
pub type MetricBatch = Vec<MetricPoint>;

impl MetricPoint {
    /// Builds a point stamped `timestamp` whose data is `payload` serialised to a JSON object.
    pub fn new<T: Serialize + ?Sized>(
        timestamp: DateTime<Utc>,
        group: &str,
        peer_id: impl Into<String>,
        payload: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            timestamp,
            group: group.to_owned(),
            peer_id: peer_id.into(),
            data: PointData::new(payload)?,
        })
    }
}

/// A point's payload: a JSON object, kept as the text it serialises to.
///
/// Points wait in the buffer and the retry queue until the control plane takes them, and a
/// batch is encoded at least once per attempt. Serialised once when the point is made, a
/// payload is one allocation of its JSON text instead of a tree of maps and strings (for a
/// tunnel point about a quarter of the memory, and one allocation instead of some 40), and
/// encoding a batch copies that text instead of walking the tree. Read it with
/// [`PointData::to_value`] or [`PointData::decode`].
#[derive(Clone)]
pub struct PointData(Box<RawValue>);

impl PointData {
    /// Serialises `payload`; fails unless it serialises to a JSON object, the only form the
    /// API accepts for `data`.
    pub fn new<T: Serialize + ?Sized>(payload: &T) -> Result<Self, serde_json::Error> {
        Self::object(serde_json::value::to_raw_value(payload)?)
    }

    fn object(raw: Box<RawValue>) -> Result<Self, serde_json::Error> {
        // Serialised or parsed, the text has no leading whitespace: an object opens with `{`.
        if raw.get().starts_with('{') {
            Ok(Self(raw))
        } else {
            Err(ser::Error::custom(format_args!(
                "point data must be a JSON object, not {}",
                raw.get()
            )))
        }
    }

    /// Takes JSON text that must be an object, such as [`PointData::as_str`] gave (points read
    /// back from the durable queue); the text is checked, not re-encoded.
    pub fn from_text(text: String) -> Result<Self, serde_json::Error> {
        Self::object(RawValue::from_string(text)?)
    }

    /// The JSON text of the object.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The object parsed into a [`serde_json::Value`], to look inside it.
    pub fn to_value(&self) -> serde_json::Value {
        self.decode()
            .expect("point data is valid JSON: it was serialised or parsed as such")
    }

    /// The object deserialised into `T`, such as the collector's struct it was made from.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }
}

/// Equal when the JSON texts are: the agent serialises equal payloads alike.
impl PartialEq for PointData {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Debug for PointData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON text, as it goes on the wire.
impl fmt::Display for PointData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for PointData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// Through serde_json's deserializers only, which alone can hand over a value's raw text.
impl<'de> Deserialize<'de> for PointData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::object(Box::<RawValue>::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// Go's `time.Time` marshals as RFC 3339 with as many fractional digits as needed; this
/// writes 0, 3, 6 or 9 digits and a `Z`, which every RFC 3339 parser reads the same way.
fn rfc3339_utc<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0; RFC3339_MAX];
    match write_rfc3339(t, &mut buf) {
        Some(len) => s.serialize_str(std::str::from_utf8(&buf[..len]).expect("ASCII digits")),
        None => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
    }
}

/// `2026-02-12T10:30:00.123456789Z`.
const RFC3339_MAX: usize = 30;

/// Writes what `to_rfc3339_opts(SecondsFormat::AutoSi, true)` writes, into `buf` and
/// without an allocation: every point of every batch and every durable record carries a
/// timestamp, and chrono's formatter was most of the time of encoding one. `None` for what
/// chrono spells otherwise (years outside 0..=9999, leap seconds), which the caller hands to
/// chrono.
fn write_rfc3339(t: &DateTime<Utc>, buf: &mut [u8; RFC3339_MAX]) -> Option<usize> {
    use chrono::{Datelike, Timelike};
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let nanos = t.nanosecond();
    if nanos >= 1_000_000_000 {
        return None;
    }
    let mut digits = |at: usize, value: u32, width: usize| {
        let mut v = value;
        for i in (0..width).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    digits(0, year, 4);
    digits(5, t.month(), 2);
    digits(8, t.day(), 2);
    digits(11, t.hour(), 2);
    digits(14, t.minute(), 2);
    digits(17, t.second(), 2);
    let (fraction, width) = match nanos {
        0 => (0, 0),
        n if n % 1_000_000 == 0 => (n / 1_000_000, 3),
        n if n % 1_000 == 0 => (n / 1_000, 6),
        n => (n, 9),
    };
    let mut len = 19;
    if width > 0 {
        digits(20, fraction, width);
        buf[19] = b'.';
        len += 1 + width;
    }
    for (at, sep) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        buf[at] = sep;
    }
    buf[len] = b'Z';
    Some(len + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn point_serialises_like_the_api_contract() {
        let ts = Utc.with_ymd_and_hms(2026, 2, 12, 10, 30, 0).unwrap();
        let p = MetricPoint::new(ts, GROUP_SYSTEM, "", &json!({"load_avg_1": 1.5})).unwrap();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"timestamp":"2026-02-12T10:30:00Z","group":"system","data":{"load_avg_1":1.5}}"#
        );
    }

    #[test]
    fn peer_id_is_kept_when_set_and_fractions_survive() {
        let ts = Utc.timestamp_opt(1_770_892_200, 123_000_000).unwrap();
        let p = MetricPoint::new(ts, GROUP_TUNNEL, "peer-abc-123", &json!({})).unwrap();
        let v: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(v["peer_id"], "peer-abc-123");
        assert_eq!(v["timestamp"], "2026-02-12T10:30:00.123Z");
        let back: MetricPoint = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
        let text = serde_json::to_string(&p).unwrap();
        let back: MetricPoint = serde_json::from_str(&text).unwrap();
        assert_eq!(back, p);
    }

    /// The wire bytes are those the points made of a `serde_json::Value` tree gave, floats,
    /// escapes, nesting and field order included.
    #[test]
    fn data_serialises_as_its_value_tree_did() {
        #[derive(Serialize)]
        struct Payload {
            ratio: f64,
            whole: f64,
            big: u64,
            negative: i64,
            name: &'static str,
            nested: serde_json::Value,
            absent: Option<u8>,
        }
        let payload = Payload {
            ratio: 0.1 + 0.2,
            whole: -1.0,
            big: u64::MAX,
            negative: i64::MIN,
            name: "q\"uote\\ tab\t é \u{1}",
            nested: json!({"z": [1, 2.5, null], "a": {}}),
            absent: None,
        };
        let point = MetricPoint::new(Utc::now(), GROUP_AGENT, "p", &payload).unwrap();
        let tree = serde_json::to_value(&payload).unwrap();
        assert_eq!(point.data.as_str(), serde_json::to_string(&tree).unwrap());
        assert_eq!(point.data.to_value(), tree);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4_000))]
        /// The hand-written timestamp is chrono's, byte for byte, over the years chrono
        /// writes with four digits and every precision of fraction.
        #[test]
        fn timestamps_are_written_as_chrono_writes_them(
            secs in -62_167_219_200i64..253_402_300_800,
            nanos in 0u32..1_000_000_000,
            precision in 0usize..4,
        ) {
            let nanos = match precision {
                0 => 0,
                1 => nanos / 1_000_000 * 1_000_000,
                2 => nanos / 1_000 * 1_000,
                _ => nanos,
            };
            let t = Utc.timestamp_opt(secs, nanos).unwrap();
            let mut buf = [0; RFC3339_MAX];
            let len = write_rfc3339(&t, &mut buf).expect("a four-digit year");
            proptest::prop_assert_eq!(
                std::str::from_utf8(&buf[..len]).unwrap(),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
        }
    }

    #[test]
    fn timestamps_chrono_spells_otherwise_are_left_to_chrono() {
        let mut buf = [0; RFC3339_MAX];
        let far = Utc.with_ymd_and_hms(12026, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(write_rfc3339(&far, &mut buf), None);
        let p = MetricPoint::new(far, GROUP_SYSTEM, "", &json!({})).unwrap();
        assert!(serde_json::to_string(&p)
            .unwrap()
            .contains("\"+12026-01-01T00:00:00Z\""));
        let leap = Utc.timestamp_opt(1_483_228_799, 1_500_000_000).unwrap();
        assert_eq!(write_rfc3339(&leap, &mut buf), None);
    }

    #[test]
    fn data_that_is_not_an_object_is_refused() {
        for payload in [json!(1), json!([{"a": 1}]), json!("{}"), json!(null)] {
            let err = PointData::new(&payload).unwrap_err();
            assert!(
                err.to_string().contains("must be a JSON object"),
                "{payload}: {err}"
            );
        }
        let err = serde_json::from_str::<MetricPoint>(
            r#"{"timestamp":"2026-02-12T10:30:00Z","group":"system","data":[1]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("must be a JSON object"), "{err}");
    }

    #[test]
    fn decode_gives_back_the_struct_it_was_made_from() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Stats {
            a: u64,
            b: String,
        }
        let stats = Stats {
            a: 7,
            b: "x".into(),
        };
        let data = PointData::new(&stats).unwrap();
        assert_eq!(data.decode::<Stats>().unwrap(), stats);
        assert_eq!(data.to_string(), r#"{"a":7,"b":"x"}"#);
        assert!(data.decode::<Vec<u64>>().is_err());
    }
}
