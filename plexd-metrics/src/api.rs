//! The wire format of the control plane's metrics API (`POST /v1/nodes/{node_id}/metrics`).
//!
//! Field names, their order and the timestamp format are those of the Go agent, so that a
//! control plane written for it accepts these batches unchanged.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};

/// Group of [`crate::collector::SystemCollector`]: CPU, memory, disk, network, load average.
pub const GROUP_SYSTEM: &str = "system";
/// Group of the tunnel collector: per-peer tunnel health and packet loss.
pub const GROUP_TUNNEL: &str = "tunnel";
/// Group of the latency collector: per-peer round-trip time.
pub const GROUP_LATENCY: &str = "latency";
/// Group of [`crate::collector::AgentStatsCollector`]: the agent's own health.
pub const GROUP_AGENT: &str = "agent";

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
    /// The group's payload, always a JSON object.
    pub data: serde_json::Value,
}

/// A batch as posted to the control plane: a JSON array of points.
pub type MetricBatch = Vec<MetricPoint>;

impl MetricPoint {
    /// Builds a point stamped `timestamp` whose data is `payload` serialised to a JSON object.
    pub fn new<T: Serialize>(
        timestamp: DateTime<Utc>,
        group: &str,
        peer_id: impl Into<String>,
        payload: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            timestamp,
            group: group.to_owned(),
            peer_id: peer_id.into(),
            data: serde_json::to_value(payload)?,
        })
    }
}

/// Go's `time.Time` marshals as RFC 3339 with as many fractional digits as needed; this
/// writes 0, 3, 6 or 9 digits and a `Z`, which every RFC 3339 parser reads the same way.
fn rfc3339_utc<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn point_serialises_like_the_api_contract() {
        let ts = Utc.with_ymd_and_hms(2026, 2, 12, 10, 30, 0).unwrap();
        let p = MetricPoint::new(
            ts,
            GROUP_SYSTEM,
            "",
            &serde_json::json!({"load_avg_1": 1.5}),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"timestamp":"2026-02-12T10:30:00Z","group":"system","data":{"load_avg_1":1.5}}"#
        );
    }

    #[test]
    fn peer_id_is_kept_when_set_and_fractions_survive() {
        let ts = Utc.timestamp_opt(1_770_892_200, 123_000_000).unwrap();
        let p = MetricPoint::new(ts, GROUP_TUNNEL, "peer-abc-123", &serde_json::json!({})).unwrap();
        let v: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(v["peer_id"], "peer-abc-123");
        assert_eq!(v["timestamp"], "2026-02-12T10:30:00.123Z");
        let back: MetricPoint = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }
}
