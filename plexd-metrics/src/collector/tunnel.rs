//! The `tunnel` group: per-peer tunnel health and packet loss.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{BoxError, CollectError, Collector, Cycle};
use crate::api::{MetricPoint, GROUP_TUNNEL};

/// One peer's tunnel health: the spec's `TunnelStats` and the extra keys this agent
/// measures. `rx_bytes` and `tx_bytes` are the device's own counters, cumulative as the Go
/// agent reports them; the extra packet counts are for the last collect interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunnelStats {
    /// The peer's public key (base64), or its configured name.
    pub peer_id: String,
    /// When the last handshake completed; Go's zero time (`0001-01-01T00:00:00Z`) when none
    /// ever did, as the Go agent reports it.
    pub last_handshake_time: DateTime<Utc>,
    /// Bytes received from the peer since the device started, as WireGuard counts them.
    pub rx_bytes: u64,
    /// Bytes sent to the peer since the device started, as WireGuard counts them.
    pub tx_bytes: u64,
    /// Whether a handshake has ever completed.
    pub handshake_succeeded: bool,
    /// Whether the last handshake is older than `metrics.wireguard.stale_after`, or never was.
    pub handshake_stale: bool,
    /// lost ÷ (received + lost) × 100 over the interval; -1 when loss is not measured.
    pub packet_loss_percent: f64,
    /// The peer's current endpoint (`addr:port`), empty when unknown.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// The WireGuard interface the peer belongs to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
    /// The peer's public key (base64) when `peer_id` is its configured name; empty when
    /// `peer_id` is the key itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
    /// Transport messages received from the peer (keepalives included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_packets: Option<u64>,
    /// Transport messages sent to the peer (keepalives included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_packets: Option<u64>,
    /// Transport messages the peer sent that never arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_packets: Option<u64>,
    /// Transport messages that arrived after a later one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_packets: Option<u64>,
    /// Transport messages that arrived twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_packets: Option<u64>,
    /// Transport messages WireGuard would reject: counters far ahead of the session that
    /// later messages showed forged. Counted in none of the figures above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect_packets: Option<u64>,
    /// Handshake initiations and responses sent to the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes_sent: Option<u64>,
    /// Handshake initiations and responses received from the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes_received: Option<u64>,
}

impl Default for TunnelStats {
    /// A peer that never shook hands, with loss not measured.
    fn default() -> Self {
        Self {
            peer_id: String::new(),
            last_handshake_time: no_handshake_time(),
            rx_bytes: 0,
            tx_bytes: 0,
            handshake_succeeded: false,
            handshake_stale: true,
            packet_loss_percent: -1.0,
            endpoint: String::new(),
            interface: String::new(),
            public_key: String::new(),
            rx_packets: None,
            tx_packets: None,
            lost_packets: None,
            late_packets: None,
            duplicate_packets: None,
            suspect_packets: None,
            handshakes_sent: None,
            handshakes_received: None,
        }
    }
}

/// Go's zero `time.Time`, which the Go agent (through wgctrl) reports for a peer that never
/// shook hands.
pub fn no_handshake_time() -> DateTime<Utc> {
    DateTime::<Utc>::from_naive_utc_and_offset(
        chrono::NaiveDate::from_ymd_opt(1, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("0001-01-01 is a valid date"),
        Utc,
    )
}

/// Reads every peer's tunnel health: the spec's `TunnelStatsReader`.
#[async_trait]
pub trait TunnelStatsReader: Send + Sync {
    /// Reads one [`TunnelStats`] per peer; an empty list when there are no peers.
    async fn read_tunnel_stats(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Vec<TunnelStats>, BoxError>;
}

/// Emits one `tunnel` point per peer from a [`TunnelStatsReader`].
pub struct TunnelCollector<R> {
    reader: R,
}

impl<R: TunnelStatsReader> TunnelCollector<R> {
    /// A collector over `reader`.
    pub fn new(reader: R) -> Self {
        Self { reader }
    }
}

#[async_trait]
impl<R: TunnelStatsReader> Collector for TunnelCollector<R> {
    fn group(&self) -> &'static str {
        GROUP_TUNNEL
    }

    async fn collect(
        &self,
        _: Cycle,
        cancel: &CancellationToken,
    ) -> Result<Vec<MetricPoint>, CollectError> {
        let stats = self
            .reader
            .read_tunnel_stats(cancel)
            .await
            .map_err(|e| CollectError::source(GROUP_TUNNEL, e))?;
        let now = Utc::now();
        stats
            .iter()
            .map(|s| MetricPoint::new(now, GROUP_TUNNEL, s.peer_id.clone(), s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CollectError::source(GROUP_TUNNEL, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    struct Fixed(Result<Vec<TunnelStats>, String>);

    #[async_trait]
    impl TunnelStatsReader for Fixed {
        async fn read_tunnel_stats(
            &self,
            _: &CancellationToken,
        ) -> Result<Vec<TunnelStats>, BoxError> {
            self.0.clone().map_err(Into::into)
        }
    }

    #[tokio::test]
    async fn one_point_per_peer_with_the_spec_keys() {
        let peer = TunnelStats {
            peer_id: "peer-abc-123".into(),
            last_handshake_time: Utc.with_ymd_and_hms(2026, 2, 12, 10, 29, 55).unwrap(),
            rx_bytes: 104_857_600,
            tx_bytes: 52_428_800,
            handshake_succeeded: true,
            handshake_stale: false,
            packet_loss_percent: 0.5,
            ..TunnelStats::default()
        };
        let other = TunnelStats {
            peer_id: "peer-xyz-789".into(),
            packet_loss_percent: -1.0,
            ..TunnelStats::default()
        };
        let c = TunnelCollector::new(Fixed(Ok(vec![peer, other])));
        let points = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].peer_id, "peer-abc-123");
        assert_eq!(points[0].group, "tunnel");
        assert_eq!(
            points[0].data.as_str(),
            r#"{"peer_id":"peer-abc-123","last_handshake_time":"2026-02-12T10:29:55Z","rx_bytes":104857600,"tx_bytes":52428800,"handshake_succeeded":true,"handshake_stale":false,"packet_loss_percent":0.5}"#
        );
        assert_eq!(points[1].data.to_value()["packet_loss_percent"], -1.0);
    }

    #[tokio::test]
    async fn no_peers_is_an_empty_list() {
        let c = TunnelCollector::new(Fixed(Ok(vec![])));
        assert!(c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn reader_error_is_prefixed_with_the_group() {
        let c = TunnelCollector::new(Fixed(Err("netlink: permission denied".into())));
        let err = c
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "metrics: tunnel: netlink: permission denied"
        );
    }
}
