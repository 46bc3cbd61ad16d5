//! The Prometheus view of the agent's points: cumulative series folded from what each
//! collect cycle produced, one mapping for the exposition and for remote write.
//!
//! Points carry per-interval figures (the plexd wire's); Prometheus wants counters that only
//! grow. [`SeriesBook`] adds each interval to a per-peer total kept since the agent started
//! (Prometheus' `rate()` and `increase()` take a restart as a counter reset), takes the
//! figures that are cumulative already (WireGuard's byte counters, `/proc/net/dev`) as they
//! are, and forgets a peer one cycle after it left its device.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use super::names::{self, FamilyDef, RTT_BUCKETS};
use crate::api::{
    MetricPoint, GROUP_AGENT, GROUP_APP, GROUP_GPU, GROUP_LATENCY, GROUP_SYSTEM, GROUP_TUNNEL,
};
use crate::collector::{AgentStats, GpuStats, LatencyResult, SystemStats, TunnelStats};

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
    /// When a point last spoke of the peer (ms since the epoch).
    seen_ms: i64,
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
    suspect_packets: u64,
    handshakes_sent: u64,
    handshakes_received: u64,
    last_handshake_seconds: f64,
    up: bool,
}

/// What the book keeps of one latency target.
#[derive(Clone, Debug, Default)]
struct ProbeSeries {
    /// When a point last spoke of the target (ms since the epoch).
    seen_ms: i64,
    sent: u64,
    received: u64,
    buckets: [u64; RTT_BUCKETS.len()],
    count: u64,
    sum_seconds: f64,
}

/// What the book keeps of one application endpoint: the figures about the fetch, not the
/// endpoint's own metrics (which Prometheus scrapes from the application itself).
#[derive(Clone, Debug, Default)]
struct AppSeries {
    /// When a point last spoke of the endpoint (ms since the epoch).
    seen_ms: i64,
    up: bool,
    scrape_duration_seconds: f64,
}

/// The part of an `app` point the book reads; the rest (its `metrics`) is skipped, not
/// built into a map.
#[derive(serde::Deserialize)]
struct AppPoint {
    name: String,
    up: bool,
    scrape_duration_seconds: f64,
}

/// The agent's cumulative Prometheus series, folded from its points cycle by cycle.
#[derive(Debug)]
pub struct SeriesBook {
    version: &'static str,
    /// The `destination` label of the delivery figures the `agent` group carries.
    destination: &'static str,
    peers: BTreeMap<PeerKey, PeerSeries>,
    /// Each peer's key by its name (`peer` label), for the latency targets' labels.
    peer_by_name: HashMap<String, PeerKey>,
    probes: BTreeMap<String, ProbeSeries>,
    /// Application endpoints by name.
    apps: BTreeMap<String, AppSeries>,
    system: Option<SystemStats>,
    /// Each GPU by its index.
    gpus: BTreeMap<u32, GpuSeries>,
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
            peer_by_name: HashMap::new(),
            probes: BTreeMap::new(),
            apps: BTreeMap::new(),
            system: None,
            gpus: BTreeMap::new(),
            agent: None,
            unreadable: 0,
        }
    }

    /// Points this book could not decode so far.
    pub fn unreadable(&self) -> u64 {
        self.unreadable
    }

    /// Folds one point into the book and hands each series it changed to `visit`, with its
    /// value after it and labels borrowed from the book: what remote write sends, stamped
    /// with the point's time, without a copy of a label. Returns whether the point could be
    /// read.
    pub fn visit_point(&mut self, point: &MetricPoint, visit: &mut Visit<'_>) -> bool {
        match self.fold(point) {
            Some(Entity::Peer(key)) => {
                visit_peer(&key, &self.peers[&key], visit);
                true
            }
            Some(Entity::Probe(target)) => {
                let key = self.peer_by_name.get(&target);
                visit_probe(key, &target, &self.probes[&target], visit);
                true
            }
            Some(Entity::System) => {
                if let Some(system) = &self.system {
                    visit_system(system, visit);
                }
                true
            }
            Some(Entity::Agent) => {
                self.visit_agent(visit);
                true
            }
            Some(Entity::Gpu(index)) => {
                visit_gpu(&self.gpus[&index], visit);
                true
            }
            Some(Entity::App(name)) => {
                visit_app(&name, &self.apps[&name], visit);
                true
            }
            None => false,
        }
    }

    /// Like [`SeriesBook::visit_point`], with the series returned as owned samples.
    pub fn fold_point(&mut self, point: &MetricPoint) -> Vec<(FamilyDef, Sample)> {
        let mut out = Vec::new();
        self.visit_point(point, &mut |def, labels, value| {
            out.push((*def, owned(labels, value)));
        });
        out
    }

    /// Takes in the points of one collect cycle. A group with points in the cycle replaces
    /// what it said before: a peer missing from the cycle's `tunnel` points has left its
    /// device, a target missing from its `latency` points is no longer probed.
    pub fn observe_cycle(&mut self, points: &[MetricPoint]) {
        let mut peers_now = BTreeSet::new();
        let mut probes_now = BTreeSet::new();
        let mut gpus_now = BTreeSet::new();
        let mut apps_now = BTreeSet::new();
        let (mut tunnel_seen, mut latency_seen) = (false, false);
        for point in points {
            match self.fold(point) {
                Some(Entity::Peer(key)) => {
                    tunnel_seen = true;
                    peers_now.insert(key);
                }
                Some(Entity::Probe(target)) => {
                    latency_seen = true;
                    probes_now.insert(target);
                }
                Some(Entity::Gpu(index)) => {
                    gpus_now.insert(index);
                }
                Some(Entity::App(name)) => {
                    apps_now.insert(name);
                }
                _ => {}
            }
        }
        // The app group has a point for every configured endpoint in every cycle, so an
        // endpoint missing from a cycle's points is no longer configured.
        if !apps_now.is_empty() {
            self.apps.retain(|name, _| apps_now.contains(name));
        }
        if tunnel_seen {
            self.peers.retain(|k, _| peers_now.contains(k));
            self.peer_by_name.retain(|_, k| peers_now.contains(k));
        }
        if latency_seen {
            self.probes.retain(|t, _| probes_now.contains(t));
        }
        if !gpus_now.is_empty() {
            self.gpus.retain(|i, _| gpus_now.contains(i));
        }
    }

    /// Forgets the peers and targets no point spoke of since `cutoff_ms` (ms since the
    /// epoch): a book fed point by point (remote write) sees no cycle end to tell who left,
    /// and would otherwise keep every peer a churning mesh ever had. One that comes back
    /// counts from zero, which Prometheus reads as a counter reset.
    pub fn forget_before(&mut self, cutoff_ms: i64) {
        self.peers.retain(|_, s| s.seen_ms >= cutoff_ms);
        let peers = &self.peers;
        self.peer_by_name.retain(|_, k| peers.contains_key(k));
        self.probes.retain(|_, s| s.seen_ms >= cutoff_ms);
        self.gpus.retain(|_, s| s.seen_ms >= cutoff_ms);
        self.apps.retain(|_, s| s.seen_ms >= cutoff_ms);
    }

    /// Folds one point; says which entity it was about, `None` when it could not be read.
    fn fold(&mut self, point: &MetricPoint) -> Option<Entity> {
        let entity = match point.group.as_str() {
            GROUP_TUNNEL => point.data.decode::<TunnelStats>().ok().map(|stats| {
                let key = PeerKey {
                    interface: stats.interface.clone(),
                    public_key: if stats.public_key.is_empty() {
                        stats.peer_id.clone()
                    } else {
                        stats.public_key.clone()
                    },
                };
                let series = self.peers.entry(key.clone()).or_default();
                if series.peer != stats.peer_id {
                    self.peer_by_name.remove(&series.peer);
                    self.peer_by_name.insert(stats.peer_id.clone(), key.clone());
                }
                fold_tunnel(series, &stats);
                series.seen_ms = point.timestamp.timestamp_millis();
                Entity::Peer(key)
            }),
            GROUP_LATENCY => point.data.decode::<LatencyResult>().ok().map(|result| {
                let series = self.probes.entry(result.peer_id.clone()).or_default();
                fold_latency(series, &result);
                series.seen_ms = point.timestamp.timestamp_millis();
                Entity::Probe(result.peer_id)
            }),
            GROUP_SYSTEM => point.data.decode::<SystemStats>().ok().map(|stats| {
                self.system = Some(stats);
                Entity::System
            }),
            GROUP_AGENT => point.data.decode::<AgentStats>().ok().map(|stats| {
                self.agent = Some(stats);
                Entity::Agent
            }),
            GROUP_GPU => point.data.decode::<GpuStats>().ok().map(|stats| {
                let index = stats.index;
                let series = GpuSeries {
                    index: index.to_string(),
                    stats,
                    seen_ms: point.timestamp.timestamp_millis(),
                };
                self.gpus.insert(index, series);
                Entity::Gpu(index)
            }),
            GROUP_APP => point.data.decode::<AppPoint>().ok().map(|app| {
                let series = AppSeries {
                    seen_ms: point.timestamp.timestamp_millis(),
                    up: app.up,
                    scrape_duration_seconds: app.scrape_duration_seconds,
                };
                self.apps.insert(app.name.clone(), series);
                Entity::App(app.name)
            }),
            _ => None,
        };
        if entity.is_none() {
            self.unreadable += 1;
        }
        entity
    }

    fn visit_agent(&self, visit: &mut Visit<'_>) {
        visit(
            &names::AGENT_BUILD_INFO,
            &[("version", self.version)],
            Value::Number(1.0),
        );
        if let Some(a) = &self.agent {
            visit_agent(a, self.destination, visit);
        }
    }

    /// Every family with its series now, in [`names::ALL`]'s order; families without a
    /// series are left out.
    pub fn families(&self) -> Vec<Family> {
        let mut families: Vec<Family> = names::ALL
            .iter()
            .map(|def| Family {
                def: *def,
                samples: Vec::new(),
            })
            .collect();
        // A lookup by name per sample, not a walk of every name: a rendering at ten
        // thousand peers places some 130,000 samples.
        let index: HashMap<&str, usize> = names::ALL
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name, i))
            .collect();
        let mut collect = |def: &FamilyDef, labels: &Labels<'_>, value: Value| {
            let i = index[def.name];
            families[i].samples.push(owned(labels, value));
        };
        for (key, series) in &self.peers {
            visit_peer(key, series, &mut collect);
        }
        for (target, series) in &self.probes {
            visit_probe(self.peer_by_name.get(target), target, series, &mut collect);
        }
        if let Some(system) = &self.system {
            visit_system(system, &mut collect);
        }
        for gpu in self.gpus.values() {
            visit_gpu(gpu, &mut collect);
        }
        self.visit_agent(&mut collect);
        for (name, series) in &self.apps {
            visit_app(name, series, &mut collect);
        }
        families.retain(|f| !f.samples.is_empty());
        families
    }
}

/// The labels of one series, borrowed from the book.
pub type Labels<'a> = [(&'static str, &'a str)];

/// What receives each series of an entity: its family, labels and value.
pub type Visit<'v> = dyn FnMut(&FamilyDef, &Labels<'_>, Value) + 'v;

fn owned(labels: &Labels<'_>, value: Value) -> Sample {
    Sample {
        labels: labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        value,
    }
}

/// What a point was about.
enum Entity {
    Peer(PeerKey),
    Probe(String),
    System,
    Agent,
    Gpu(u32),
    App(String),
}

/// One GPU's last state, with its index as label text.
#[derive(Debug)]
struct GpuSeries {
    index: String,
    stats: GpuStats,
    seen_ms: i64,
}

fn visit_gpu(g: &GpuSeries, visit: &mut Visit<'_>) {
    let s = &g.stats;
    let labels = [("gpu", g.index.as_str()), ("uuid", s.uuid.as_str())];
    let info = [
        ("gpu", g.index.as_str()),
        ("uuid", s.uuid.as_str()),
        ("name", s.name.as_str()),
    ];
    visit(&names::GPU_INFO, &info, Value::Number(1.0));
    let percent = |v: Option<u32>| v.map(|v| f64::from(v) / 100.0);
    let bytes = |v: Option<u64>| v.map(|v| v as f64);
    let mhz = |v: Option<u32>| v.map(|v| f64::from(v) * 1e6);
    for (def, v) in [
        (&names::GPU_UTILIZATION, percent(s.utilization_percent)),
        (
            &names::GPU_MEMORY_UTILIZATION,
            percent(s.memory_utilization_percent),
        ),
        (&names::GPU_MEMORY_TOTAL, bytes(s.memory_total_bytes)),
        (&names::GPU_MEMORY_USED, bytes(s.memory_used_bytes)),
        (&names::GPU_MEMORY_FREE, bytes(s.memory_free_bytes)),
        (
            &names::GPU_TEMPERATURE,
            s.temperature_celsius.map(f64::from),
        ),
        (
            &names::GPU_POWER,
            s.power_usage_milliwatts.map(|mw| f64::from(mw) / 1000.0),
        ),
        (&names::GPU_FAN, percent(s.fan_speed_percent)),
        (&names::GPU_CLOCK_SM, mhz(s.clock_sm_mhz)),
        (&names::GPU_CLOCK_MEMORY, mhz(s.clock_memory_mhz)),
    ] {
        if let Some(v) = v {
            visit(def, &labels, Value::Number(v));
        }
    }
}

fn visit_app(name: &str, s: &AppSeries, visit: &mut Visit<'_>) {
    let labels = [("app", name)];
    visit(
        &names::APP_UP,
        &labels,
        Value::Number(if s.up { 1.0 } else { 0.0 }),
    );
    visit(
        &names::APP_SCRAPE_DURATION,
        &labels,
        Value::Number(s.scrape_duration_seconds),
    );
}

fn visit_peer(key: &PeerKey, s: &PeerSeries, visit: &mut Visit<'_>) {
    let labels = [
        ("interface", key.interface.as_str()),
        ("public_key", key.public_key.as_str()),
        ("peer", s.peer.as_str()),
    ];
    let mut number = |def: &FamilyDef, v: f64| visit(def, &labels, Value::Number(v));
    number(&names::PEER_RECEIVE_BYTES, s.receive_bytes as f64);
    number(&names::PEER_TRANSMIT_BYTES, s.transmit_bytes as f64);
    // Without the kernel programs the packet families have no series for the peer, rather
    // than a misleading 0.
    if s.measured {
        for (def, v) in [
            (&names::PEER_RECEIVE_PACKETS, s.receive_packets),
            (&names::PEER_TRANSMIT_PACKETS, s.transmit_packets),
            (&names::PEER_LOST_PACKETS, s.lost_packets),
            (&names::PEER_LATE_PACKETS, s.late_packets),
            (&names::PEER_DUPLICATE_PACKETS, s.duplicate_packets),
            (&names::PEER_SUSPECT_PACKETS, s.suspect_packets),
            (&names::PEER_HANDSHAKES_SENT, s.handshakes_sent),
            (&names::PEER_HANDSHAKES_RECEIVED, s.handshakes_received),
        ] {
            number(def, v as f64);
        }
    }
    number(&names::PEER_LAST_HANDSHAKE, s.last_handshake_seconds);
    number(&names::PEER_UP, if s.up { 1.0 } else { 0.0 });
    let info = [
        labels[0],
        labels[1],
        labels[2],
        ("endpoint", s.endpoint.as_str()),
    ];
    visit(&names::PEER_INFO, &info, Value::Number(1.0));
}

/// A latency target's series, with the labels of the peer of that name when there is one.
fn visit_probe(key: Option<&PeerKey>, target: &str, s: &ProbeSeries, visit: &mut Visit<'_>) {
    let labels = [
        ("interface", key.map_or("", |k| k.interface.as_str())),
        ("public_key", key.map_or("", |k| k.public_key.as_str())),
        ("peer", target),
    ];
    visit(
        &names::PEER_PROBES_SENT,
        &labels,
        Value::Number(s.sent as f64),
    );
    visit(
        &names::PEER_PROBES_RECEIVED,
        &labels,
        Value::Number(s.received as f64),
    );
    visit(
        &names::PEER_RTT,
        &labels,
        Value::Histogram {
            buckets: s.buckets,
            count: s.count,
            sum: s.sum_seconds,
        },
    );
}

fn visit_system(s: &SystemStats, visit: &mut Visit<'_>) {
    for (def, v) in [
        (&names::NODE_CPU, s.cpu_usage_percent / 100.0),
        (&names::NODE_MEMORY_USED, s.memory_used_bytes as f64),
        (&names::NODE_MEMORY_TOTAL, s.memory_total_bytes as f64),
        (&names::NODE_DISK_USED, s.disk_used_bytes as f64),
        (&names::NODE_DISK_TOTAL, s.disk_total_bytes as f64),
        (&names::NODE_NETWORK_RECEIVE, s.network_rx_bytes as f64),
        (&names::NODE_NETWORK_TRANSMIT, s.network_tx_bytes as f64),
        (&names::NODE_LOAD1, s.load_avg_1),
        (&names::NODE_LOAD5, s.load_avg_5),
        (&names::NODE_LOAD15, s.load_avg_15),
        (&names::NODE_CPUS, s.cpu_count as f64),
        (
            &names::NODE_MEMORY_AVAILABLE,
            s.memory_available_bytes as f64,
        ),
        (&names::NODE_SWAP_TOTAL, s.swap_total_bytes as f64),
        (&names::NODE_SWAP_USED, s.swap_used_bytes as f64),
        (&names::NODE_DISK_FREE, s.disk_free_bytes as f64),
    ] {
        visit(def, &[], Value::Number(v));
    }
    for (name, usage) in &s.cpu_cores_usage_percent {
        // node_exporter's label is the CPU's number: `cpu="0"`, not `cpu="cpu0"`.
        let cpu = name.strip_prefix("cpu").unwrap_or(name);
        visit(
            &names::NODE_CPU_CORE,
            &[("cpu", cpu)],
            Value::Number(usage / 100.0),
        );
    }
    for (device, io) in &s.disks {
        let labels = [("device", device.as_str())];
        for (def, v) in [
            (&names::NODE_DISK_READ_BYTES, io.read_bytes),
            (&names::NODE_DISK_WRITTEN_BYTES, io.write_bytes),
            (&names::NODE_DISK_READS, io.reads),
            (&names::NODE_DISK_WRITES, io.writes),
        ] {
            visit(def, &labels, Value::Number(v as f64));
        }
    }
    for (interface, c) in &s.interfaces {
        let labels = [("interface", interface.as_str())];
        for (def, v) in [
            (&names::NODE_INTERFACE_RECEIVE_BYTES, c.rx_bytes),
            (&names::NODE_INTERFACE_TRANSMIT_BYTES, c.tx_bytes),
            (&names::NODE_INTERFACE_RECEIVE_PACKETS, c.rx_packets),
            (&names::NODE_INTERFACE_TRANSMIT_PACKETS, c.tx_packets),
            (&names::NODE_INTERFACE_RECEIVE_ERRORS, c.rx_errors),
            (&names::NODE_INTERFACE_TRANSMIT_ERRORS, c.tx_errors),
            (&names::NODE_INTERFACE_RECEIVE_DROPPED, c.rx_dropped),
            (&names::NODE_INTERFACE_TRANSMIT_DROPPED, c.tx_dropped),
        ] {
            visit(def, &labels, Value::Number(v as f64));
        }
    }
}

fn visit_agent(a: &AgentStats, destination: &str, visit: &mut Visit<'_>) {
    let dest = [("destination", destination)];
    let mut number = |def: &FamilyDef, labels: &Labels<'_>, v: f64| {
        visit(def, labels, Value::Number(v));
    };
    number(&names::AGENT_UPTIME, &[], a.uptime_seconds);
    number(&names::AGENT_TASKS, &[], a.goroutine_count as f64);
    number(&names::AGENT_HEAP, &[], a.heap_alloc_bytes as f64);
    number(&names::AGENT_RESIDENT, &[], a.heap_sys_bytes as f64);
    number(&names::AGENT_RECONNECTS, &dest, a.reconnect_count as f64);
    let (ingress, egress) = ([("direction", "ingress")], [("direction", "egress")]);
    let optional: [(&FamilyDef, &Labels<'_>, Option<u64>); 11] = [
        (&names::AGENT_QUEUED, &dest, a.queued_points),
        (&names::AGENT_DROPPED, &dest, a.dropped_points),
        (&names::AGENT_REJECTED, &dest, a.rejected_points),
        (&names::AGENT_SPOOLED_POINTS, &[], a.spooled_points),
        (&names::AGENT_SPOOLED_BYTES, &[], a.spooled_bytes),
        (&names::AGENT_CORRUPT, &[], a.corrupt_batches),
        (&names::AGENT_EBPF_PROGRAMS, &[], a.ebpf_programs_attached),
        (&names::AGENT_EBPF_PACKETS, &ingress, a.ebpf_ingress_packets),
        (&names::AGENT_EBPF_PACKETS, &egress, a.ebpf_egress_packets),
        (&names::AGENT_EBPF_BYTES, &ingress, a.ebpf_ingress_bytes),
        (&names::AGENT_EBPF_BYTES, &egress, a.ebpf_egress_bytes),
    ];
    for (def, labels, v) in optional {
        if let Some(v) = v {
            number(def, labels, v as f64);
        }
    }
    for (name, d) in &a.destinations {
        let dest = [("destination", name.as_str())];
        number(&names::AGENT_QUEUED, &dest, d.queued_points as f64);
        number(&names::AGENT_DROPPED, &dest, d.dropped_points as f64);
        number(&names::AGENT_REJECTED, &dest, d.rejected_points as f64);
        number(&names::AGENT_RECONNECTS, &dest, d.reconnect_count as f64);
    }
    for (group, n) in &a.abandoned_collections {
        number(
            &names::AGENT_ABANDONED,
            &[("group", group.as_str())],
            *n as f64,
        );
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
    add(&mut series.suspect_packets, stats.suspect_packets);
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
    fn each_destination_has_its_delivery_figures() {
        use crate::collector::DestinationFigures;
        let mut book = SeriesBook::new("1", "control_plane");
        let mut stats = AgentStats {
            queued_points: Some(3),
            ..AgentStats::default()
        };
        stats.destinations.insert(
            "remote_write".into(),
            DestinationFigures {
                queued_points: 40,
                ..DestinationFigures::default()
            },
        );
        book.observe_cycle(&[MetricPoint::new(Utc::now(), GROUP_AGENT, "", &stats).unwrap()]);
        let f = book.families();
        let queued = f
            .iter()
            .find(|f| f.def.name == "plexd_agent_queued_points")
            .unwrap();
        let by_destination: Vec<(String, Value)> = queued
            .samples
            .iter()
            .map(|s| (s.labels[0].1.clone(), s.value.clone()))
            .collect();
        assert_eq!(
            by_destination,
            [
                ("control_plane".to_owned(), Value::Number(3.0)),
                ("remote_write".to_owned(), Value::Number(40.0))
            ]
        );
    }

    /// The number of family `name` in the series whose labels include `label`.
    fn labelled(families: &[Family], name: &str, label: (&str, &str)) -> Option<f64> {
        let family = families.iter().find(|f| f.def.name == name)?;
        family
            .samples
            .iter()
            .find(|s| s.labels.iter().any(|(k, v)| *k == label.0 && v == label.1))
            .map(|s| match s.value {
                Value::Number(v) => v,
                Value::Histogram { count, .. } => count as f64,
            })
    }

    #[test]
    fn gpus_are_series_in_base_units_and_a_gpu_that_left_is_dropped() {
        let gpu = |index: u32, fan: Option<u32>| GpuStats {
            index,
            name: "NVIDIA L4".into(),
            uuid: format!("GPU-{index}"),
            utilization_percent: Some(45),
            memory_total_bytes: Some(24 << 30),
            power_usage_milliwatts: Some(72_500),
            fan_speed_percent: fan,
            clock_sm_mhz: Some(2_040),
            ..GpuStats::default()
        };
        let point = |g: &GpuStats| MetricPoint::new(Utc::now(), GROUP_GPU, "", g).unwrap();
        let mut book = SeriesBook::new("1", "stdout");
        book.observe_cycle(&[point(&gpu(0, Some(40))), point(&gpu(1, None))]);
        let f = book.families();
        let first = ("uuid", "GPU-0");
        assert_eq!(
            labelled(&f, "plexd_gpu_utilization_ratio", first),
            Some(0.45)
        );
        assert_eq!(labelled(&f, "plexd_gpu_power_watts", first), Some(72.5));
        assert_eq!(
            labelled(&f, "plexd_gpu_clock_sm_hertz", first),
            Some(2.04e9)
        );
        assert_eq!(labelled(&f, "plexd_gpu_fan_speed_ratio", first), Some(0.4));
        assert_eq!(
            labelled(&f, "plexd_gpu_info", ("name", "NVIDIA L4")),
            Some(1.0)
        );
        let second = ("uuid", "GPU-1");
        assert_eq!(labelled(&f, "plexd_gpu_fan_speed_ratio", second), None);
        assert_eq!(labelled(&f, "plexd_gpu_temperature_celsius", first), None);

        book.observe_cycle(&[point(&gpu(0, Some(40)))]);
        let f = book.families();
        assert_eq!(labelled(&f, "plexd_gpu_utilization_ratio", second), None);
        assert_eq!(
            labelled(&f, "plexd_gpu_utilization_ratio", first),
            Some(0.45)
        );
    }

    #[test]
    fn abandoned_collections_are_counted_per_group() {
        let mut book = SeriesBook::new("1", "stdout");
        let mut stats = AgentStats::default();
        stats.abandoned_collections.insert("tunnel".into(), 3);
        book.observe_cycle(&[MetricPoint::new(Utc::now(), GROUP_AGENT, "", &stats).unwrap()]);
        let f = book.families();
        let name = "plexd_agent_collections_abandoned";
        assert_eq!(labelled(&f, name, ("group", "tunnel")), Some(3.0));
    }

    #[test]
    fn host_figures_have_a_series_per_cpu_disk_and_interface() {
        use crate::accounting::host::{DiskIo, InterfaceCounters};
        let mut book = SeriesBook::new("1", "stdout");
        let stats = SystemStats {
            cpu_count: 2,
            cpu_cores_usage_percent: [("cpu0".to_owned(), 25.0), ("cpu1".to_owned(), 50.0)].into(),
            swap_used_bytes: 4096,
            disks: [("sda".to_owned(), DiskIo::from_sectors(3, 8, 1, 2))].into(),
            interfaces: [
                (
                    "eth0".to_owned(),
                    InterfaceCounters {
                        rx_dropped: 7,
                        ..InterfaceCounters::default()
                    },
                ),
                ("wg0".to_owned(), InterfaceCounters::default()),
            ]
            .into(),
            ..SystemStats::default()
        };
        book.observe_cycle(&[MetricPoint::new(Utc::now(), GROUP_SYSTEM, "", &stats).unwrap()]);
        let f = book.families();
        let samples = |name: &str| -> Vec<(Vec<(&'static str, String)>, Value)> {
            f.iter()
                .find(|f| f.def.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
                .samples
                .iter()
                .map(|s| (s.labels.clone(), s.value.clone()))
                .collect()
        };
        assert_eq!(
            samples("plexd_node_cpu_core_usage_ratio"),
            [
                (vec![("cpu", "0".to_owned())], Value::Number(0.25)),
                (vec![("cpu", "1".to_owned())], Value::Number(0.5)),
            ]
        );
        assert_eq!(samples("plexd_node_cpus"), [(vec![], Value::Number(2.0))]);
        assert_eq!(
            samples("plexd_node_swap_used_bytes"),
            [(vec![], Value::Number(4096.0))]
        );
        assert_eq!(
            samples("plexd_node_disk_read_bytes"),
            [(vec![("device", "sda".to_owned())], Value::Number(4096.0))]
        );
        assert_eq!(
            samples("plexd_node_disk_writes_completed"),
            [(vec![("device", "sda".to_owned())], Value::Number(1.0))]
        );
        assert_eq!(
            samples("plexd_node_interface_receive_dropped"),
            [
                (vec![("interface", "eth0".to_owned())], Value::Number(7.0)),
                (vec![("interface", "wg0".to_owned())], Value::Number(0.0)),
            ]
        );
        for def in names::ALL
            .iter()
            .filter(|d| d.name.starts_with("plexd_node_"))
        {
            assert!(
                f.iter().any(|f| f.def == *def),
                "{} has no series",
                def.name
            );
        }
    }

    #[test]
    fn peers_no_point_spoke_of_are_forgotten() {
        let mut book = SeriesBook::new("1", "remote_write");
        let old = tunnel("gone", "KG", 1, 1, 1);
        let cutoff = old.timestamp.timestamp_millis() + 1;
        book.fold_point(&old);
        let mut fresh = tunnel("here", "KH", 1, 1, 1);
        fresh.timestamp += chrono::TimeDelta::milliseconds(5);
        book.fold_point(&fresh);
        book.forget_before(cutoff);
        let f = book.families();
        assert_eq!(value(&f, "plexd_peer_up", "gone"), None);
        assert_eq!(value(&f, "plexd_peer_up", "here"), Some(0.0));
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

    #[test]
    fn app_points_give_up_and_scrape_duration_per_endpoint_and_leave_with_their_entry() {
        use crate::collector::AppStats;
        let app = |name: &str, up: bool, seconds: f64| {
            let stats = AppStats {
                name: name.to_owned(),
                up,
                scrape_duration_seconds: seconds,
                metrics: serde_json::Map::from_iter([("requests".to_owned(), 7.into())]),
                truncated: 0,
                error: (!up).then(|| "http://x: answered 503".to_owned()),
            };
            MetricPoint::new(Utc::now(), GROUP_APP, "", &stats).unwrap()
        };
        let mut book = SeriesBook::new("1", "stdout");
        book.observe_cycle(&[app("api", true, 0.25), app("db", false, 5.0)]);
        let series = |book: &SeriesBook, family: &str| -> Vec<(String, Value)> {
            book.families()
                .iter()
                .filter(|f| f.def.name == family)
                .flat_map(|f| f.samples.iter())
                .map(|s| {
                    assert_eq!(s.labels.len(), 1);
                    assert_eq!(s.labels[0].0, "app");
                    (s.labels[0].1.clone(), s.value.clone())
                })
                .collect()
        };
        assert_eq!(
            series(&book, "plexd_app_up"),
            [
                ("api".to_owned(), Value::Number(1.0)),
                ("db".to_owned(), Value::Number(0.0))
            ]
        );
        assert_eq!(
            series(&book, "plexd_app_scrape_duration_seconds"),
            [
                ("api".to_owned(), Value::Number(0.25)),
                ("db".to_owned(), Value::Number(5.0))
            ]
        );
        // The endpoints' own metrics are not re-exported.
        assert!(book
            .families()
            .iter()
            .all(|f| !f.def.name.contains("requests")));
        // An entry removed from the config has no point in the next cycle.
        book.observe_cycle(&[app("api", true, 0.5)]);
        assert_eq!(series(&book, "plexd_app_up").len(), 1);
        // Point by point (remote write): the series changed by one point.
        let changed = book.fold_point(&app("db", true, 1.0));
        let names: Vec<&str> = changed.iter().map(|(d, _)| d.name).collect();
        assert_eq!(names, ["plexd_app_up", "plexd_app_scrape_duration_seconds"]);
        assert_eq!(book.unreadable(), 0);
    }
}
