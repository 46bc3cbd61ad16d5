//! Every metric family the Prometheus side exposes and writes: its name, help text and
//! kind, in one place that the exposition, remote write, the dashboard's tests and
//! `docs/prometheus.md` all follow.
//!
//! Names follow Prometheus' conventions: a `plexd_` prefix, the subsystem (`peer`, `node`,
//! `agent`), base units in the name (`_bytes`, `_seconds`, `_ratio`) and `_total` on
//! counters. A counter's name here is without `_total`: the OpenMetrics encoder adds it to
//! the samples, and the text format and remote write add it to the name.

/// What kind of family a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only grows, from the agent's start (or the device's, for WireGuard's byte counters).
    Counter,
    /// A value now.
    Gauge,
    /// Observations in buckets, with their sum and count.
    Histogram,
}

/// One metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyDef {
    /// The name, without `_total` for counters.
    pub name: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
}

impl FamilyDef {
    /// The name samples carry in the text format and in remote write: counters end in
    /// `_total`.
    pub fn sample_name(&self) -> String {
        match self.kind {
            Kind::Counter => format!("{}_total", self.name),
            _ => self.name.to_owned(),
        }
    }
}

const fn counter(name: &'static str, help: &'static str) -> FamilyDef {
    FamilyDef {
        name,
        help,
        kind: Kind::Counter,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> FamilyDef {
    FamilyDef {
        name,
        help,
        kind: Kind::Gauge,
    }
}

/// Labels of every per-peer family.
pub const PEER_LABELS: [&str; 3] = ["interface", "public_key", "peer"];

/// Bytes received from the peer, as WireGuard counts them.
pub const PEER_RECEIVE_BYTES: FamilyDef = counter(
    "plexd_peer_receive_bytes",
    "Bytes received from the peer through the tunnel, as WireGuard counts them.",
);
/// Bytes sent to the peer, as WireGuard counts them.
pub const PEER_TRANSMIT_BYTES: FamilyDef = counter(
    "plexd_peer_transmit_bytes",
    "Bytes sent to the peer through the tunnel, as WireGuard counts them.",
);
/// Transport messages received, counted by the kernel programs.
pub const PEER_RECEIVE_PACKETS: FamilyDef = counter(
    "plexd_peer_receive_packets",
    "WireGuard transport messages received from the peer (keepalives included).",
);
/// Transport messages sent, counted by the kernel programs.
pub const PEER_TRANSMIT_PACKETS: FamilyDef = counter(
    "plexd_peer_transmit_packets",
    "WireGuard transport messages sent to the peer (keepalives included).",
);
/// Messages the peer sent that never arrived, read from WireGuard's counters.
pub const PEER_LOST_PACKETS: FamilyDef = counter(
    "plexd_peer_lost_packets",
    "Transport messages the peer sent that never arrived, read from WireGuard's nonce counters.",
);
/// Messages that arrived after a later one.
pub const PEER_LATE_PACKETS: FamilyDef = counter(
    "plexd_peer_late_packets",
    "Transport messages from the peer that arrived after a later one.",
);
/// Messages that arrived twice.
pub const PEER_DUPLICATE_PACKETS: FamilyDef = counter(
    "plexd_peer_duplicate_packets",
    "Transport messages from the peer that arrived twice.",
);
/// Messages WireGuard would reject, held apart from the figures above.
pub const PEER_SUSPECT_PACKETS: FamilyDef = counter(
    "plexd_peer_suspect_packets",
    "Transport messages to the peer's sessions that later messages showed forged (counters far ahead); in no other packet family.",
);
/// Handshake messages sent.
pub const PEER_HANDSHAKES_SENT: FamilyDef = counter(
    "plexd_peer_handshakes_sent",
    "Handshake initiations and responses sent to the peer.",
);
/// Handshake messages received.
pub const PEER_HANDSHAKES_RECEIVED: FamilyDef = counter(
    "plexd_peer_handshakes_received",
    "Handshake initiations and responses received from the peer.",
);
/// ICMP probes sent.
pub const PEER_PROBES_SENT: FamilyDef = counter(
    "plexd_peer_probes_sent",
    "ICMP echo requests sent to the peer's mesh address.",
);
/// ICMP probes answered.
pub const PEER_PROBES_RECEIVED: FamilyDef = counter(
    "plexd_peer_probes_received",
    "ICMP echo requests to the peer that were answered.",
);
/// When the last handshake completed.
pub const PEER_LAST_HANDSHAKE: FamilyDef = gauge(
    "plexd_peer_last_handshake_timestamp_seconds",
    "When the last handshake with the peer completed, in seconds since the Unix epoch; 0 if none ever did.",
);
/// 1 while the last handshake is fresh.
pub const PEER_UP: FamilyDef = gauge(
    "plexd_peer_up",
    "1 when the last handshake with the peer is fresh (within metrics.wireguard.stale_after), else 0.",
);
/// The peer's endpoint, as a label.
pub const PEER_INFO: FamilyDef = gauge(
    "plexd_peer_info",
    "Always 1; the endpoint label is where the peer's packets come from now.",
);
/// ICMP round trips.
pub const PEER_RTT: FamilyDef = FamilyDef {
    name: "plexd_peer_rtt_seconds",
    help: "Round trips of ICMP echo probes to the peer's mesh address.",
    kind: Kind::Histogram,
};
/// The upper bounds of the round-trip histogram's buckets, in seconds: from a LAN's half a
/// millisecond to a congested intercontinental path, about two per decade.
pub const RTT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// CPU in use.
pub const NODE_CPU: FamilyDef = gauge(
    "plexd_node_cpu_usage_ratio",
    "Share of CPU time in use over the collect's sample, 0 to 1.",
);
/// Memory in use.
pub const NODE_MEMORY_USED: FamilyDef = gauge(
    "plexd_node_memory_used_bytes",
    "Memory in use: MemTotal less MemAvailable.",
);
/// Memory in all.
pub const NODE_MEMORY_TOTAL: FamilyDef =
    gauge("plexd_node_memory_total_bytes", "Memory in all (MemTotal).");
/// Disk in use.
pub const NODE_DISK_USED: FamilyDef = gauge(
    "plexd_node_disk_used_bytes",
    "Bytes in use on the file system of metrics.system.mount_point.",
);
/// Disk in all.
pub const NODE_DISK_TOTAL: FamilyDef = gauge(
    "plexd_node_disk_total_bytes",
    "Size of the file system of metrics.system.mount_point.",
);
/// Bytes received on the node's interface(s).
pub const NODE_NETWORK_RECEIVE: FamilyDef = counter(
    "plexd_node_network_receive_bytes",
    "Bytes received on metrics.system.net_interface (all but lo when unset).",
);
/// Bytes sent on the node's interface(s).
pub const NODE_NETWORK_TRANSMIT: FamilyDef = counter(
    "plexd_node_network_transmit_bytes",
    "Bytes sent on metrics.system.net_interface (all but lo when unset).",
);
/// Load averages.
pub const NODE_LOAD1: FamilyDef = gauge("plexd_node_load1", "1-minute load average.");
/// Load averages.
pub const NODE_LOAD5: FamilyDef = gauge("plexd_node_load5", "5-minute load average.");
/// Load averages.
pub const NODE_LOAD15: FamilyDef = gauge("plexd_node_load15", "15-minute load average.");
/// CPUs online.
pub const NODE_CPUS: FamilyDef = gauge("plexd_node_cpus", "CPUs online.");
/// CPU in use, per CPU.
pub const NODE_CPU_CORE: FamilyDef = gauge(
    "plexd_node_cpu_core_usage_ratio",
    "Share of the CPU's time in use over the collect's sample, 0 to 1.",
);
/// Memory available.
pub const NODE_MEMORY_AVAILABLE: FamilyDef = gauge(
    "plexd_node_memory_available_bytes",
    "Memory available without swapping (MemAvailable).",
);
/// Swap in all.
pub const NODE_SWAP_TOTAL: FamilyDef = gauge(
    "plexd_node_swap_total_bytes",
    "Swap space in all (SwapTotal).",
);
/// Swap in use.
pub const NODE_SWAP_USED: FamilyDef = gauge(
    "plexd_node_swap_used_bytes",
    "Swap space in use: SwapTotal less SwapFree.",
);
/// Disk free.
pub const NODE_DISK_FREE: FamilyDef = gauge(
    "plexd_node_disk_free_bytes",
    "Bytes available to unprivileged users on the file system of metrics.system.mount_point (df's Avail).",
);
/// Bytes read per block device.
pub const NODE_DISK_READ_BYTES: FamilyDef = counter(
    "plexd_node_disk_read_bytes",
    "Bytes read from the block device since boot.",
);
/// Bytes written per block device.
pub const NODE_DISK_WRITTEN_BYTES: FamilyDef = counter(
    "plexd_node_disk_written_bytes",
    "Bytes written to the block device since boot.",
);
/// Reads per block device.
pub const NODE_DISK_READS: FamilyDef = counter(
    "plexd_node_disk_reads_completed",
    "Reads the block device completed since boot.",
);
/// Writes per block device.
pub const NODE_DISK_WRITES: FamilyDef = counter(
    "plexd_node_disk_writes_completed",
    "Writes the block device completed since boot.",
);
/// Bytes received per interface.
pub const NODE_INTERFACE_RECEIVE_BYTES: FamilyDef = counter(
    "plexd_node_interface_receive_bytes",
    "Bytes received on the interface.",
);
/// Bytes sent per interface.
pub const NODE_INTERFACE_TRANSMIT_BYTES: FamilyDef = counter(
    "plexd_node_interface_transmit_bytes",
    "Bytes sent on the interface.",
);
/// Packets received per interface.
pub const NODE_INTERFACE_RECEIVE_PACKETS: FamilyDef = counter(
    "plexd_node_interface_receive_packets",
    "Packets received on the interface.",
);
/// Packets sent per interface.
pub const NODE_INTERFACE_TRANSMIT_PACKETS: FamilyDef = counter(
    "plexd_node_interface_transmit_packets",
    "Packets sent on the interface.",
);
/// Receive errors per interface.
pub const NODE_INTERFACE_RECEIVE_ERRORS: FamilyDef = counter(
    "plexd_node_interface_receive_errors",
    "Receive errors the interface's driver reported.",
);
/// Transmit errors per interface.
pub const NODE_INTERFACE_TRANSMIT_ERRORS: FamilyDef = counter(
    "plexd_node_interface_transmit_errors",
    "Transmit errors the interface's driver reported.",
);
/// Received packets dropped per interface.
pub const NODE_INTERFACE_RECEIVE_DROPPED: FamilyDef = counter(
    "plexd_node_interface_receive_dropped",
    "Received packets dropped on the interface (missed by the device included).",
);
/// Packets dropped on transmit per interface.
pub const NODE_INTERFACE_TRANSMIT_DROPPED: FamilyDef = counter(
    "plexd_node_interface_transmit_dropped",
    "Packets dropped on their way out of the interface.",
);

/// The agent's version.
pub const AGENT_BUILD_INFO: FamilyDef = gauge(
    "plexd_agent_build_info",
    "Always 1; the version label is the agent's.",
);
/// Seconds since the agent started.
pub const AGENT_UPTIME: FamilyDef = gauge(
    "plexd_agent_uptime_seconds",
    "Seconds since the agent started.",
);
/// Live tasks.
pub const AGENT_TASKS: FamilyDef = gauge("plexd_agent_tasks", "Live tokio tasks of the agent.");
/// Heap in use.
pub const AGENT_HEAP: FamilyDef = gauge(
    "plexd_agent_heap_bytes",
    "Bytes the agent has allocated now.",
);
/// Resident memory.
pub const AGENT_RESIDENT: FamilyDef = gauge(
    "plexd_agent_resident_memory_bytes",
    "The agent's resident memory.",
);
/// Points waiting per destination.
pub const AGENT_QUEUED: FamilyDef = gauge(
    "plexd_agent_queued_points",
    "Points waiting to be delivered to the destination.",
);
/// Points dropped per destination.
pub const AGENT_DROPPED: FamilyDef = counter(
    "plexd_agent_dropped_points",
    "Points dropped because the queue was full.",
);
/// Points refused per destination.
pub const AGENT_REJECTED: FamilyDef = counter(
    "plexd_agent_rejected_points",
    "Points the destination refused (4xx other than 408 and 429); they are not retried.",
);
/// Recoveries after failed deliveries.
pub const AGENT_RECONNECTS: FamilyDef = counter(
    "plexd_agent_reconnects",
    "Deliveries that succeeded after failed ones.",
);
/// Points in the durable queue.
pub const AGENT_SPOOLED_POINTS: FamilyDef = gauge(
    "plexd_agent_spooled_points",
    "Points in metrics.queue.dir now; 0 without a durable queue.",
);
/// Bytes in the durable queue.
pub const AGENT_SPOOLED_BYTES: FamilyDef = gauge(
    "plexd_agent_spooled_bytes",
    "Bytes in metrics.queue.dir now; 0 without a durable queue.",
);
/// Damaged records found.
pub const AGENT_CORRUPT: FamilyDef = counter(
    "plexd_agent_corrupt_batches",
    "Damaged records and foreign files found in metrics.queue.dir.",
);
/// Programs attached.
pub const AGENT_EBPF_PROGRAMS: FamilyDef = gauge(
    "plexd_agent_ebpf_programs_attached",
    "TC programs of the agent attached now.",
);
/// Packets the programs saw.
pub const AGENT_EBPF_PACKETS: FamilyDef = counter(
    "plexd_agent_ebpf_packets",
    "Packets the kernel programs saw on the underlay, per direction.",
);
/// Bytes the programs saw.
pub const AGENT_EBPF_BYTES: FamilyDef = counter(
    "plexd_agent_ebpf_bytes",
    "Bytes the kernel programs saw on the underlay, per direction.",
);
/// Collections that ran past their cycle.
pub const AGENT_ABANDONED: FamilyDef = counter(
    "plexd_agent_collections_abandoned",
    "Collections abandoned because they ran past their cycle, per group.",
);

/// A GPU's identity.
pub const GPU_INFO: FamilyDef = gauge(
    "plexd_gpu_info",
    "An NVIDIA GPU the agent reads through NVML, with its product name; always 1.",
);
/// GPU busy share.
pub const GPU_UTILIZATION: FamilyDef = gauge(
    "plexd_gpu_utilization_ratio",
    "Share of NVML's last sample period in which a kernel ran on the GPU, 0 to 1.",
);
/// GPU memory busy share.
pub const GPU_MEMORY_UTILIZATION: FamilyDef = gauge(
    "plexd_gpu_memory_utilization_ratio",
    "Share of NVML's last sample period in which device memory was read or written, 0 to 1.",
);
/// GPU memory size.
pub const GPU_MEMORY_TOTAL: FamilyDef =
    gauge("plexd_gpu_memory_total_bytes", "Device memory of the GPU.");
/// GPU memory allocated.
pub const GPU_MEMORY_USED: FamilyDef =
    gauge("plexd_gpu_memory_used_bytes", "Device memory allocated.");
/// GPU memory free.
pub const GPU_MEMORY_FREE: FamilyDef = gauge(
    "plexd_gpu_memory_free_bytes",
    "Device memory not allocated.",
);
/// GPU temperature.
pub const GPU_TEMPERATURE: FamilyDef = gauge(
    "plexd_gpu_temperature_celsius",
    "Core temperature of the GPU.",
);
/// GPU power draw.
pub const GPU_POWER: FamilyDef = gauge("plexd_gpu_power_watts", "Power draw of the GPU board.");
/// GPU fan.
pub const GPU_FAN: FamilyDef = gauge(
    "plexd_gpu_fan_speed_ratio",
    "Speed the GPU's first fan is driven at, as a share of its maximum.",
);
/// SM clock.
pub const GPU_CLOCK_SM: FamilyDef = gauge(
    "plexd_gpu_clock_sm_hertz",
    "Current clock of the GPU's streaming multiprocessors.",
);
/// Memory clock.
pub const GPU_CLOCK_MEMORY: FamilyDef = gauge(
    "plexd_gpu_clock_memory_hertz",
    "Current memory clock of the GPU.",
);

/// Whether an application endpoint answered (`app` group).
pub const APP_UP: FamilyDef = gauge(
    "plexd_app_up",
    "1 when the application endpoint (metrics.apps) answered a 2xx with a readable body within its timeout in the last cycle, else 0.",
);
/// How long the last fetch of an application endpoint took.
pub const APP_SCRAPE_DURATION: FamilyDef = gauge(
    "plexd_app_scrape_duration_seconds",
    "Seconds the last fetch of the application endpoint (metrics.apps) took, to the end of its body or to its failure.",
);

/// Every family, in the order they are written.
pub const ALL: [FamilyDef; 73] = [
    PEER_RECEIVE_BYTES,
    PEER_TRANSMIT_BYTES,
    PEER_RECEIVE_PACKETS,
    PEER_TRANSMIT_PACKETS,
    PEER_LOST_PACKETS,
    PEER_LATE_PACKETS,
    PEER_DUPLICATE_PACKETS,
    PEER_SUSPECT_PACKETS,
    PEER_HANDSHAKES_SENT,
    PEER_HANDSHAKES_RECEIVED,
    PEER_PROBES_SENT,
    PEER_PROBES_RECEIVED,
    PEER_LAST_HANDSHAKE,
    PEER_UP,
    PEER_INFO,
    PEER_RTT,
    NODE_CPU,
    NODE_MEMORY_USED,
    NODE_MEMORY_TOTAL,
    NODE_DISK_USED,
    NODE_DISK_TOTAL,
    NODE_NETWORK_RECEIVE,
    NODE_NETWORK_TRANSMIT,
    NODE_LOAD1,
    NODE_LOAD5,
    NODE_LOAD15,
    NODE_CPUS,
    NODE_CPU_CORE,
    NODE_MEMORY_AVAILABLE,
    NODE_SWAP_TOTAL,
    NODE_SWAP_USED,
    NODE_DISK_FREE,
    NODE_DISK_READ_BYTES,
    NODE_DISK_WRITTEN_BYTES,
    NODE_DISK_READS,
    NODE_DISK_WRITES,
    NODE_INTERFACE_RECEIVE_BYTES,
    NODE_INTERFACE_TRANSMIT_BYTES,
    NODE_INTERFACE_RECEIVE_PACKETS,
    NODE_INTERFACE_TRANSMIT_PACKETS,
    NODE_INTERFACE_RECEIVE_ERRORS,
    NODE_INTERFACE_TRANSMIT_ERRORS,
    NODE_INTERFACE_RECEIVE_DROPPED,
    NODE_INTERFACE_TRANSMIT_DROPPED,
    AGENT_BUILD_INFO,
    AGENT_UPTIME,
    AGENT_TASKS,
    AGENT_HEAP,
    AGENT_RESIDENT,
    AGENT_QUEUED,
    AGENT_DROPPED,
    AGENT_REJECTED,
    AGENT_RECONNECTS,
    AGENT_SPOOLED_POINTS,
    AGENT_SPOOLED_BYTES,
    AGENT_CORRUPT,
    AGENT_EBPF_PROGRAMS,
    AGENT_EBPF_PACKETS,
    AGENT_EBPF_BYTES,
    AGENT_ABANDONED,
    GPU_INFO,
    GPU_UTILIZATION,
    GPU_MEMORY_UTILIZATION,
    GPU_MEMORY_TOTAL,
    GPU_MEMORY_USED,
    GPU_MEMORY_FREE,
    GPU_TEMPERATURE,
    GPU_POWER,
    GPU_FAN,
    GPU_CLOCK_SM,
    GPU_CLOCK_MEMORY,
    APP_UP,
    APP_SCRAPE_DURATION,
];
