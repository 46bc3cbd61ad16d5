//! The Prometheus view of the agent's points: cumulative series folded from what each
//! collect cycle produced, one mapping for the exposition and for remote write.
//!
//! Points carry per-interval figures (the plexd wire's); Prometheus wants counters that only
//! grow. [`SeriesBook`] adds each interval to a per-peer total kept since the agent started
//! (Prometheus' `rate()` and `increase()` take a restart as a counter reset), takes the
//! figures that are cumulative already (WireGuard's byte counters, `/proc/net/dev`) as they
//! are, and forgets a peer one cycle after it left its device.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::names::{self, FamilyDef, RTT_BUCKETS};
use crate::api::{MetricPoint, GROUP_AGENT, GROUP_LATENCY, GROUP_SYSTEM, GROUP_TUNNEL};
use crate::collector::{AgentStats, LatencyResult, SystemStats, TunnelStats};

/// A sample's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A counter's or a gauge's value.
    Number(f64),
    /// A histogram over [`RTT_BUCKETS`].
    Histogram {
        /// Observations at or below each bucket's bound, cumulative as Prometheus counts
        /// them; the `+Inf` bucket is `count`.
        buckets: [u64; RTT_BUCKETS.len()],
        /// Observations in all.
        count: u64,
        /// Their sum, in seconds.
        sum: f64,
    },
}

/// One series of a family: its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Label names and values, in the order they are written.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: Value,
}

/// A family and its series, as one snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// Name, help and kind.
    pub def: FamilyDef,
    /// Its series; a family without any is left out of a snapshot.
    pub samples: Vec<Sample>,
}

/// A peer of a WireGuard device, as its labels name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct PeerKey {
    interface: String,
    public_key: String,
}

/// What the book keeps of one peer.
#[derive(Clone, Debug, Default)]
struct PeerSeries {
    peer: String,
    endpoint: String,
    receive_bytes: u64,
    transmit_bytes: u64,
    /// Whether the kernel programs measure this peer: without them the packet families have
    /// no series for it, rather than a misleading 0.
    measured: bool,
    receive_packets: u64,
    transmit_packets: u64,
    lost_packets: u64,
    late_packets: u64,
    duplicate_packets: u64,
    handshakes_sent: u64,
    handshakes_received: u64,
    last_handshake_seconds: f64,
    up: bool,
}

/// What the book keeps of one latency target.
#[derive(Clone, Debug, Default)]
struct ProbeSeries {
    sent: u64,
    received: u64,
    buckets: [u64; RTT_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

/// The agent's cumulative Prometheus series, folded from its points cycle by cycle.
#[derive(Debug)]
pub struct SeriesBook {
    version: &'static str,
    /// The `destination` label of the delivery figures the `agent` group carries.
    destination: &'static str,
    peers: BTreeMap<PeerKey, PeerSeries>,
    probes: BTreeMap<String, ProbeSeries>,
    system: Option<SystemStats>,
    agent: Option<AgentStats>,
    /// Points of a group this book could not read (a newer agent's data in a durable
    /// queue, say); counted, not fatal.
    unreadable: u64,
}

impl SeriesBook {
    /// An empty book of agent `version`, whose delivery figures are `destination`'s.
    pub fn new(version: &'static str, destination: &'static str) -> Self {
        Self {
            version,
            destination,
            peers: BTreeMap::new(),
            probes: BTreeMap::new(),
            system: None,
            agent: None,
            unreadable: 0,
        }
    }

    /// Points this book could not decode so far.
    pub fn unreadable(&self) -> u64 {
        self.unreadable
    }

    /// Takes in the points of one collect cycle. A group with points in the cycle replaces
    /// what it said before: a peer missing from the cycle's `tunnel` points has left its
    /// device, a target missing from its `latency` points is no longer probed.
    pub fn observe_cycle(&mut self, points: &[MetricPoint]) {
        let mut tunnel_seen = false;
        let mut latency_seen = false;
        let mut peers_now = BTreeMap::new();
        let mut probes_now = BTreeMap::new();
        for point in points {
            match point.group.as_str() {
                GROUP_TUNNEL => match point.data.decode::<TunnelStats>() {
                    Ok(stats) => {
                        tunnel_seen = true;
                        let key = PeerKey {
                            interface: stats.interface.clone(),
                            public_key: if stats.public_key.is_empty() {
                                stats.peer_id.clone()
                            } else {
                                stats.public_key.clone()
                            },
                        };
                        let mut series = self.peers.remove(&key).unwrap_or_default();
                        fold_tunnel(&mut series, &stats);
                        peers_now.insert(key, series);
                    }
                    Err(_) => self.unreadable += 1,
                },
                GROUP_LATENCY => match point.data.decode::<LatencyResult>() {
                    Ok(result) => {
                        latency_seen = true;
                        let mut series = self.probes.remove(&result.peer_id).unwrap_or_default();
                        fold_latency(&mut series, &result);
                        probes_now.insert(result.peer_id, series);
                    }
                    Err(_) => self.unreadable += 1,
                },
                GROUP_SYSTEM => match point.data.decode::<SystemStats>() {
                    Ok(stats) => self.system = Some(stats),
                    Err(_) => self.unreadable += 1,
                },
                GROUP_AGENT => match point.data.decode::<AgentStats>() {
                    Ok(stats) => self.agent = Some(stats),
                    Err(_) => self.unreadable += 1,
                },
                _ => self.unreadable += 1,
            }
        }
        if tunnel_seen {
            self.peers = peers_now;
        } else {
            self.peers.append(&mut peers_now);
        }
        if latency_seen {
            self.probes = probes_now;
        } else {
            self.probes.append(&mut probes_now);
        }
    }

    /// Every family with its series now, in [`names::ALL`]'s order.
    pub fn families(&self) -> Vec<Family> {
        let mut out = Vec::with_capacity(names::ALL.len());
        let peer_labels = |key: &PeerKey, s: &PeerSeries| -> Vec<(&'static str, String)> {
            vec![
                ("interface", key.interface.clone()),
                ("public_key", key.public_key.clone()),
                ("peer", s.peer.clone()),
            ]
        };
        let per_peer = |def: FamilyDef, value: &dyn Fn(&PeerSeries) -> Option<f64>| Family {
            def,
            samples: self
                .peers
                .iter()
                .filter_map(|(k, s)| {
                    value(s).map(|v| Sample {
                        labels: peer_labels(k, s),
                        value: Value::Number(v),
                    })
                })
                .collect(),
        };
        let measured =
            |v: fn(&PeerSeries) -> u64| move |s: &PeerSeries| s.measured.then(|| v(s) as f64);
        out.push(per_peer(names::PEER_RECEIVE_BYTES, &|s| {
            Some(s.receive_bytes as f64)
        }));
        out.push(per_peer(names::PEER_TRANSMIT_BYTES, &|s| {
            Some(s.transmit_bytes as f64)
        }));
        out.push(per_peer(
            names::PEER_RECEIVE_PACKETS,
            &measured(|s| s.receive_packets),
        ));
        out.push(per_peer(
            names::PEER_TRANSMIT_PACKETS,
            &measured(|s| s.transmit_packets),
        ));
        out.push(per_peer(
            names::PEER_LOST_PACKETS,
            &measured(|s| s.lost_packets),
        ));
        out.push(per_peer(
            names::PEER_LATE_PACKETS,
            &measured(|s| s.late_packets),
        ));
        out.push(per_peer(
            names::PEER_DUPLICATE_PACKETS,
            &measured(|s| s.duplicate_packets),
        ));
        out.push(per_peer(
            names::PEER_HANDSHAKES_SENT,
            &measured(|s| s.handshakes_sent),
        ));
        out.push(per_peer(
            names::PEER_HANDSHAKES_RECEIVED,
            &measured(|s| s.handshakes_received),
        ));
        // Latency targets carry the labels of the peer of that name, when there is one.
        let by_name: BTreeMap<&str, &PeerKey> = self
            .peers
            .iter()
            .map(|(k, s)| (s.peer.as_str(), k))
            .collect();
        let probe_labels = |target: &str| -> Vec<(&'static str, String)> {
            let key = by_name.get(target);
            vec![
                (
                    "interface",
                    key.map(|k| k.interface.clone()).unwrap_or_default(),
                ),
                (
                    "public_key",
                    key.map(|k| k.public_key.clone()).unwrap_or_default(),
                ),
                ("peer", target.to_owned()),
            ]
        };
        let per_target = |def: FamilyDef, value: &dyn Fn(&ProbeSeries) -> Value| Family {
            def,
            samples: self
                .probes
                .iter()
                .map(|(t, s)| Sample {
                    labels: probe_labels(t),
                    value: value(s),
                })
                .collect(),
        };
        out.push(per_target(names::PEER_PROBES_SENT, &|s| {
            Value::Number(s.sent as f64)
        }));
        out.push(per_target(names::PEER_PROBES_RECEIVED, &|s| {
            Value::Number(s.received as f64)
        }));
        out.push(per_peer(names::PEER_LAST_HANDSHAKE, &|s| {
            Some(s.last_handshake_seconds)
        }));
        out.push(per_peer(names::PEER_UP, &|s| {
            Some(if s.up { 1.0 } else { 0.0 })
        }));
        out.push(Family {
            def: names::PEER_INFO,
            samples: self
                .peers
                .iter()
                .map(|(k, s)| {
                    let mut labels = peer_labels(k, s);
                    labels.push(("endpoint", s.endpoint.clone()));
                    Sample {
                        labels,
                        value: Value::Number(1.0),
                    }
                })
                .collect(),
        });
        out.push(per_target(names::PEER_RTT, &|s| Value::Histogram {
            buckets: s.buckets,
            count: s.count,
            sum: s.sum_seconds,
        }));

        let single = |def: FamilyDef, labels: Vec<(&'static str, String)>, v: Option<f64>| Family {
            def,
            samples: v
                .map(|v| Sample {
                    labels,
                    value: Value::Number(v),
                })
                .into_iter()
                .collect(),
        };
        let sys = self.system.as_ref();
        let s = |f: fn(&SystemStats) -> f64| sys.map(f);
        out.push(single(
            names::NODE_CPU,
            vec![],
            s(|s| s.cpu_usage_percent / 100.0),
        ));
        out.push(single(
            names::NODE_MEMORY_USED,
            vec![],
            s(|s| s.memory_used_bytes as f64),
        ));
        out.push(single(
            names::NODE_MEMORY_TOTAL,
            vec![],
            s(|s| s.memory_total_bytes as f64),
        ));
        out.push(single(
            names::NODE_DISK_USED,
            vec![],
            s(|s| s.disk_used_bytes as f64),
        ));
        out.push(single(
            names::NODE_DISK_TOTAL,
            vec![],
            s(|s| s.disk_total_bytes as f64),
        ));
        out.push(single(
            names::NODE_NETWORK_RECEIVE,
            vec![],
            s(|s| s.network_rx_bytes as f64),
        ));
        out.push(single(
            names::NODE_NETWORK_TRANSMIT,
            vec![],
            s(|s| s.network_tx_bytes as f64),
        ));
        out.push(single(names::NODE_LOAD1, vec![], s(|s| s.load_avg_1)));
        out.push(single(names::NODE_LOAD5, vec![], s(|s| s.load_avg_5)));
        out.push(single(names::NODE_LOAD15, vec![], s(|s| s.load_avg_15)));

        out.push(single(
            names::AGENT_BUILD_INFO,
            vec![("version", self.version.to_owned())],
            Some(1.0),
        ));
        let agent = self.agent.as_ref();
        let a = |f: fn(&AgentStats) -> Option<f64>| agent.and_then(f);
        let dest = || vec![("destination", self.destination.to_owned())];
        out.push(single(
            names::AGENT_UPTIME,
            vec![],
            a(|a| Some(a.uptime_seconds)),
        ));
        out.push(single(
            names::AGENT_TASKS,
            vec![],
            a(|a| Some(a.goroutine_count as f64)),
        ));
        out.push(single(
            names::AGENT_HEAP,
            vec![],
            a(|a| Some(a.heap_alloc_bytes as f64)),
        ));
        out.push(single(
            names::AGENT_RESIDENT,
            vec![],
            a(|a| Some(a.heap_sys_bytes as f64)),
        ));
        out.push(single(
            names::AGENT_QUEUED,
            dest(),
            a(|a| n(a.queued_points)),
        ));
        out.push(single(
            names::AGENT_DROPPED,
            dest(),
            a(|a| n(a.dropped_points)),
        ));
        out.push(single(
            names::AGENT_REJECTED,
            dest(),
            a(|a| n(a.rejected_points)),
        ));
        out.push(single(
            names::AGENT_RECONNECTS,
            dest(),
            a(|a| Some(a.reconnect_count as f64)),
        ));
        out.push(single(
            names::AGENT_SPOOLED_POINTS,
            vec![],
            a(|a| n(a.spooled_points)),
        ));
        out.push(single(
            names::AGENT_SPOOLED_BYTES,
            vec![],
            a(|a| n(a.spooled_bytes)),
        ));
        out.push(single(
            names::AGENT_CORRUPT,
            vec![],
            a(|a| n(a.corrupt_batches)),
        ));
        out.push(single(
            names::AGENT_EBPF_PROGRAMS,
            vec![],
            a(|a| n(a.ebpf_programs_attached)),
        ));
        let direction = |d: &str| vec![("direction", d.to_owned())];
        let per_direction =
            |def: FamilyDef,
             ingress: fn(&AgentStats) -> Option<u64>,
             egress: fn(&AgentStats) -> Option<u64>| Family {
                def,
                samples: [("ingress", ingress), ("egress", egress)]
                    .into_iter()
                    .filter_map(|(d, f)| {
                        agent.and_then(f).map(|v| Sample {
                            labels: direction(d),
                            value: Value::Number(v as f64),
                        })
                    })
                    .collect(),
            };
        out.push(per_direction(
            names::AGENT_EBPF_PACKETS,
            |a| a.ebpf_ingress_packets,
            |a| a.ebpf_egress_packets,
        ));
        out.push(per_direction(
            names::AGENT_EBPF_BYTES,
            |a| a.ebpf_ingress_bytes,
            |a| a.ebpf_egress_bytes,
        ));
        debug_assert!(out.iter().map(|f| f.def).eq(names::ALL));
        out.retain(|f| !f.samples.is_empty());
        out
    }
}

fn fold_tunnel(series: &mut PeerSeries, stats: &TunnelStats) {
    series.peer = stats.peer_id.clone();
    series.endpoint = stats.endpoint.clone();
    series.receive_bytes = stats.rx_bytes;
    series.transmit_bytes = stats.tx_bytes;
    series.last_handshake_seconds = handshake_seconds(stats.last_handshake_time);
    series.up = stats.handshake_succeeded && !stats.handshake_stale;
    if stats.rx_packets.is_some() {
        series.measured = true;
    }
    let add = |total: &mut u64, interval: Option<u64>| {
        *total = total.saturating_add(interval.unwrap_or(0));
    };
    add(&mut series.receive_packets, stats.rx_packets);
    add(&mut series.transmit_packets, stats.tx_packets);
    add(&mut series.lost_packets, stats.lost_packets);
    add(&mut series.late_packets, stats.late_packets);
    add(&mut series.duplicate_packets, stats.duplicate_packets);
    add(&mut series.handshakes_sent, stats.handshakes_sent);
    add(&mut series.handshakes_received, stats.handshakes_received);
}

fn fold_latency(series: &mut ProbeSeries, result: &LatencyResult) {
    series.sent = series.sent.saturating_add(u64::from(result.probes_sent));
    series.received = series
        .received
        .saturating_add(u64::from(result.probes_received));
    for &nanos in &result.rtt_samples_nano {
        let seconds = nanos.max(0) as f64 / 1e9;
        series.count += 1;
        series.sum_seconds += seconds;
        for (bucket, bound) in series.buckets.iter_mut().zip(RTT_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }
}

fn n(v: Option<u64>) -> Option<f64> {
    v.map(|v| v as f64)
}

/// Seconds since the epoch; 0 for Go's zero time, which stands for "never".
fn handshake_seconds(t: DateTime<Utc>) -> f64 {
    let seconds = t.timestamp();
    if seconds <= 0 {
        return 0.0;
    }
    seconds as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MetricPoint;

    fn tunnel(peer: &str, key: &str, lost: u64, rx: u64, rx_bytes: u64) -> MetricPoint {
        let stats = TunnelStats {
            peer_id: peer.to_owned(),
            interface: "wg0".into(),
            public_key: key.to_owned(),
            endpoint: "192.0.2.1:51820".into(),
            rx_bytes,
            rx_packets: Some(rx),
            lost_packets: Some(lost),
            ..TunnelStats::default()
        };
        MetricPoint::new(Utc::now(), GROUP_TUNNEL, peer, &stats).unwrap()
    }

    fn value(families: &[Family], name: &str, peer: &str) -> Option<f64> {
        families
            .iter()
            .find(|f| f.def.name == name)?
            .samples
            .iter()
            .find(|s| s.labels.iter().any(|(k, v)| *k == "peer" && v == peer))
            .map(|s| match s.value {
                Value::Number(v) => v,
                Value::Histogram { count, .. } => count as f64,
            })
    }

    #[test]
    fn intervals_add_up_and_cumulative_figures_pass_through() {
        let mut book = SeriesBook::new("1.2.3", "control_plane");
        book.observe_cycle(&[tunnel("gw", "K1", 2, 100, 1_000)]);
        book.observe_cycle(&[tunnel("gw", "K1", 3, 50, 1_500)]);
        let f = book.families();
        assert_eq!(value(&f, "plexd_peer_lost_packets", "gw"), Some(5.0));
        assert_eq!(value(&f, "plexd_peer_receive_packets", "gw"), Some(150.0));
        // WireGuard's byte counter is cumulative already: the latest value, not a sum.
        assert_eq!(value(&f, "plexd_peer_receive_bytes", "gw"), Some(1_500.0));
        assert_eq!(value(&f, "plexd_agent_build_info", ""), None);
        let info = f
            .iter()
            .find(|f| f.def.name == "plexd_agent_build_info")
            .unwrap();
        assert_eq!(info.samples[0].labels, [("version", "1.2.3".to_owned())]);
    }

    #[test]
    fn a_peer_that_left_its_device_is_forgotten_and_a_failed_cycle_keeps_all() {
        let mut book = SeriesBook::new("1", "stdout");
        book.observe_cycle(&[tunnel("a", "KA", 1, 1, 1), tunnel("b", "KB", 1, 1, 1)]);
        // A cycle whose tunnel read failed has no tunnel points: nothing is forgotten.
        book.observe_cycle(&[]);
        assert!(value(&book.families(), "plexd_peer_up", "b").is_some());
        book.observe_cycle(&[tunnel("a", "KA", 1, 1, 1)]);
        let f = book.families();
        assert_eq!(value(&f, "plexd_peer_lost_packets", "a"), Some(2.0));
        assert_eq!(value(&f, "plexd_peer_up", "b"), None);
    }

    #[test]
    fn without_kernel_programs_packet_families_have_no_series() {
        let mut book = SeriesBook::new("1", "stdout");
        let stats = TunnelStats {
            peer_id: "gw".into(),
            public_key: "K".into(),
            ..TunnelStats::default()
        };
        book.observe_cycle(&[MetricPoint::new(Utc::now(), GROUP_TUNNEL, "gw", &stats).unwrap()]);
        let f = book.families();
        assert_eq!(value(&f, "plexd_peer_lost_packets", "gw"), None);
        assert_eq!(value(&f, "plexd_peer_up", "gw"), Some(0.0));
        assert_eq!(
            value(&f, "plexd_peer_last_handshake_timestamp_seconds", "gw"),
            Some(0.0)
        );
    }

    #[test]
    fn round_trips_fill_the_histogram_and_take_the_peer_labels() {
        let mut book = SeriesBook::new("1", "stdout");
        let ms = |n: u64| std::time::Duration::from_micros(n);
        let result = LatencyResult::from_samples("gw", 3, &[ms(700), ms(3_000)]);
        let latency = MetricPoint::new(Utc::now(), GROUP_LATENCY, "gw", &result).unwrap();
        book.observe_cycle(&[tunnel("gw", "K1", 0, 1, 1), latency]);
        let f = book.families();
        let rtt = f
            .iter()
            .find(|f| f.def.name == "plexd_peer_rtt_seconds")
            .unwrap();
        let sample = &rtt.samples[0];
        assert_eq!(sample.labels[1], ("public_key", "K1".to_owned()));
        let Value::Histogram {
            buckets,
            count,
            sum,
        } = &sample.value
        else {
            panic!("not a histogram");
        };
        // 0.7 ms is above 0.5 ms and within 1 ms; 3 ms is within 5 ms.
        assert_eq!(&buckets[..4], &[0, 1, 1, 2]);
        assert_eq!((*count, buckets[11]), (2, 2));
        assert!((sum - 0.0037).abs() < 1e-9);
        assert_eq!(value(&f, "plexd_peer_probes_sent", "gw"), Some(3.0));
        assert_eq!(value(&f, "plexd_peer_probes_received", "gw"), Some(2.0));
    }

    #[test]
    fn points_it_cannot_read_are_counted() {
        let mut book = SeriesBook::new("1", "stdout");
        let odd = MetricPoint::new(
            Utc::now(),
            GROUP_TUNNEL,
            "x",
            &serde_json::json!({"rx_bytes": "many"}),
        )
        .unwrap();
        book.observe_cycle(&[odd]);
        assert_eq!(book.unreadable(), 1);
    }
}
