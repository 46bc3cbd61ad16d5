//! The agent's configuration: one YAML file, one struct, the spec's defaults and rules.
//!
//! Loading and validation report every problem at once, each on its own line, so that a user
//! fixes a file in one pass. The metrics rules carry the Go agent's exact texts.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::secret::NodeSecretKey;

/// Shortest collect interval the spec allows.
pub const MIN_COLLECT_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest report interval the spec allows.
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// Default bound of one HTTP request to the control plane.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound of the retry queue, in points.
pub const DEFAULT_QUEUE_MAX_POINTS: i64 = 10_000;
/// Default bound of the durable queue's directory. While the control plane is away, a node
/// with 100 peers at the default intervals adds about 17 MiB an hour
/// (`cargo xtask bench --only queue`): 256 MiB rides out half a day of outage at that size
/// and days for a small node, while staying a small share of the disk that holds
/// `/var/lib` on a node. A larger mesh that must ride out longer raises it.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// The smallest `metrics.queue.max_bytes`: room for a few batches of the largest kind.
pub const MIN_QUEUE_MAX_BYTES: u64 = 1024 * 1024;
/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "PLEXD_METRICS_";
/// Variables with [`ENV_PREFIX`] that are command-line flags, not config keys.
pub const CLI_ENV_VARIABLES: [&str; 3] = [
    "PLEXD_METRICS_CONFIG",
    "PLEXD_METRICS_LOG_LEVEL",
    "PLEXD_METRICS_LOG_FORMAT",
];
/// Most ICMP probes per peer and cycle `metrics.latency.probes` accepts.
pub const MAX_LATENCY_PROBES: u32 = 100;
/// Where the health endpoint listens unless `metrics.health.listen` says otherwise: this
/// host only, so that a systemd service does not open a port to the network by default.
pub const DEFAULT_HEALTH_LISTEN: &str = "127.0.0.1:9102";

/// Everything the agent reads from its config file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's identity in the control plane; required when a control plane is set.
    pub node_id: String,
    /// Where batches are reported; with an empty URL they go to stdout.
    pub control_plane: ControlPlaneConfig,
    /// The spec's metrics `Config`, plus the sources' settings.
    pub metrics: MetricsConfig,
}

/// The control plane the agent reports to.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Base URL, e.g. `https://cp.example:8443`; empty means the stdout sink. Plain `http`
    /// only to a loopback address.
    pub url: String,
    /// File holding the bearer token; read again whenever it changes, so tokens can rotate.
    pub token_file: Option<PathBuf>,
    /// PEM file with CA certificates trusted in addition to the system's and Mozilla's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate. Only for testing; the agent warns at start.
    pub tls_insecure_skip_verify: bool,
    /// File with this node's 32-byte secret key (hex or base64), which decrypts the local
    /// endpoint's credential.
    pub node_secret_key_file: Option<PathBuf>,
    /// Bound of one request, from connecting to the end of the response.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub timeout: Duration,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            token_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_insecure_skip_verify: false,
            node_secret_key_file: None,
            timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl ControlPlaneConfig {
    /// Whether batches go to a control plane (and not to stdout).
    pub fn is_configured(&self) -> bool {
        !self.url.is_empty()
    }
}

/// Collection and reporting: the spec's `metrics.Config`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether metrics are collected at all.
    pub enabled: bool,
    /// Time between collection cycles (at least 5s).
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub collect_interval: Duration,
    /// Time between reports (at least 10s, and not shorter than `collect_interval`).
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub report_interval: Duration,
    /// Most points in one report; reaching it triggers a report before the tick.
    /// Signed so that a negative value meets the spec's rule instead of a type error.
    pub batch_size: i64,
    /// Optional second destination for every batch.
    pub local_endpoint: LocalEndpointConfig,
    /// Batches waiting for the control plane to accept them.
    pub queue: QueueConfig,
    /// Where the `system` group reads from.
    pub system: SystemConfig,
    /// The kernel programs.
    pub ebpf: EbpfConfig,
    /// ICMP round-trip times to the mesh peers.
    pub latency: LatencyConfig,
    /// Where the `tunnel` group reads the WireGuard devices.
    pub wireguard: WireGuardConfig,
    /// The liveness and readiness endpoint.
    pub health: HealthConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            collect_interval: Duration::from_secs(15),
            report_interval: Duration::from_secs(60),
            batch_size: 100,
            local_endpoint: LocalEndpointConfig::default(),
            queue: QueueConfig::default(),
            system: SystemConfig::default(),
            ebpf: EbpfConfig::default(),
            latency: LatencyConfig::default(),
            wireguard: WireGuardConfig::default(),
            health: HealthConfig::default(),
        }
    }
}

impl MetricsConfig {
    /// `batch_size` as a count; only meaningful after [`Config::validate`] passed.
    pub fn batch_limit(&self) -> usize {
        usize::try_from(self.batch_size).unwrap_or(1).max(1)
    }
}

/// The retry queue: batches the control plane has not accepted yet.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Most points kept in memory for retry; beyond it the oldest are dropped and counted.
    /// Signed so that a negative value gets a rule's message instead of a type error.
    pub max_points: i64,
    /// A directory that makes the queue durable: points are synced to it as they are
    /// collected and survive crashes and restarts. Without it the queue is in memory.
    pub dir: Option<PathBuf>,
    /// Most bytes the directory holds; beyond it the oldest batches are dropped and counted.
    /// An integer of bytes or a size with a unit, e.g. `256MiB`.
    #[serde(serialize_with = "byte_size_text")]
    pub max_bytes: bytesize::ByteSize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_points: DEFAULT_QUEUE_MAX_POINTS,
            dir: None,
            max_bytes: bytesize::ByteSize::b(DEFAULT_QUEUE_MAX_BYTES),
        }
    }
}

/// Sizes print as `256MiB`, which reads back the same.
fn byte_size_text<S: Serializer>(size: &bytesize::ByteSize, s: S) -> Result<S::Ok, S::Error> {
    let bytes = size.as_u64();
    let text = match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => b.to_string(),
    };
    s.serialize_str(&text)
}

impl QueueConfig {
    /// `max_points` as a count; only meaningful after [`Config::validate`] passed.
    pub fn limit(&self) -> usize {
        usize::try_from(self.max_points).unwrap_or(1).max(1)
    }
}

/// The HTTP endpoint that answers liveness (`/healthz`) and readiness (`/readyz`) probes.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Serve the endpoint at all.
    pub enabled: bool,
    /// `IP:PORT` to listen on; `0.0.0.0:9102` makes it reachable for a kubelet's probes.
    /// Port 0 takes any free port (the agent logs which). Text, so that validation can say
    /// what is wrong with it.
    pub listen: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: DEFAULT_HEALTH_LISTEN.to_owned(),
        }
    }
}

impl HealthConfig {
    /// The address to listen on; only `None` when [`Config::validate`] would fail.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.trim().parse().ok()
    }

    fn validate_into(&self, problems: &mut Vec<String>) {
        if self.enabled && self.listen_addr().is_none() {
            problems.push(format!(
                "metrics: config: health.listen: invalid address {:?}; write IP:PORT such as \
                 127.0.0.1:9102 (0.0.0.0:9102 to answer probes from other hosts), or set \
                 metrics.health.enabled: false",
                self.listen
            ));
        }
    }
}

/// The spec's `LocalEndpointConfig`: an HTTPS endpoint that receives every batch too.
#[derive(Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalEndpointConfig {
    /// HTTPS URL; empty means not configured.
    pub url: String,
    /// Name of the secret holding the endpoint's bearer token.
    #[serde(serialize_with = "redacted")]
    pub secret_key: String,
    /// Skip certificate verification for this endpoint only.
    pub tls_insecure_skip_verify: bool,
    /// PEM file with CA certificates trusted for this endpoint only (an addition to the
    /// spec, so that a private endpoint can be verified instead of skipping verification).
    pub ca_file: Option<PathBuf>,
}

// The secret key never appears in logs or config dumps.
impl fmt::Debug for LocalEndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalEndpointConfig")
            .field("url", &self.url)
            .field(
                "secret_key",
                &if self.secret_key.is_empty() {
                    ""
                } else {
                    "[redacted]"
                },
            )
            .field("tls_insecure_skip_verify", &self.tls_insecure_skip_verify)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Where the `system` group reads the host's figures.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemConfig {
    /// The proc filesystem to read; `/host/proc` when the host's is mounted into a container.
    pub proc_root: PathBuf,
    /// The filesystem whose usage is reported.
    pub mount_point: PathBuf,
    /// Only this interface's bytes; empty sums every interface but `lo`.
    pub net_interface: String,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            mount_point: PathBuf::from("/"),
            net_interface: String::new(),
        }
    }
}

/// The kernel programs on the underlay interfaces.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EbpfConfig {
    /// Attach the TC programs; when off, nothing is loaded into the kernel.
    pub enabled: bool,
    /// Interfaces to attach to; empty means those of the default routes.
    pub interfaces: Vec<String>,
    /// How the programs hook into TC.
    pub attach_mode: AttachModeConfig,
    /// UDP ports WireGuard listens on; traffic to or from them is parsed as WireGuard.
    pub listen_ports: Vec<u16>,
    /// How long a gap in a session's counters may stay open before it counts as lost.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub reorder_timeout: Duration,
    /// Remote endpoints the kernel keeps counters for; more are counted as overflows.
    pub max_peers: u32,
    /// WireGuard sessions the kernel keeps loss windows for; more are counted as overflows.
    pub max_sessions: u32,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: Vec::new(),
            attach_mode: AttachModeConfig::Auto,
            listen_ports: vec![DEFAULT_LISTEN_PORT],
            reorder_timeout: Duration::from_secs(1),
            max_peers: 16_384,
            max_sessions: 65_536,
        }
    }
}

/// The `latency` group: ICMP echo to every peer's mesh address.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LatencyConfig {
    /// Measure round-trip times at all.
    pub enabled: bool,
    /// The mesh interface the probes are bound to (e.g. `wg0`); empty leaves the choice to the
    /// routing table.
    pub interface: String,
    /// Probes per peer and collect cycle, spread over the cycle; the median is reported.
    pub probes: u32,
    /// How long one probe waits for its reply.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub timeout: Duration,
    /// Explicit mesh addresses: a peer's public key (base64) or name → its IPv4 or IPv6
    /// address. Kept as text so that validation can name every bad entry at once.
    pub targets: BTreeMap<String, String>,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interface: String::new(),
            probes: 3,
            timeout: Duration::from_secs(1),
            targets: BTreeMap::new(),
        }
    }
}

/// The WireGuard devices whose peers the `tunnel` group reports.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireGuardConfig {
    /// Report the `tunnel` group at all.
    pub enabled: bool,
    /// Interfaces to read; empty means every WireGuard device of the network namespace,
    /// kernel and userspace.
    pub interfaces: Vec<String>,
    /// A handshake older than this is stale (WireGuard rekeys every 2 minutes while traffic
    /// flows, so a healthy tunnel never gets there).
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub stale_after: Duration,
    /// Names to report instead of public keys.
    pub peer_names: PeerNames,
    /// Where userspace implementations (wireguard-go, boringtun) keep their UAPI sockets.
    pub socket_dir: PathBuf,
}

impl Default for WireGuardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: Vec::new(),
            stale_after: Duration::from_secs(180),
            peer_names: PeerNames::default(),
            socket_dir: PathBuf::from(crate::source::wireguard::DEFAULT_SOCKET_DIR),
        }
    }
}

impl LatencyConfig {
    /// The targets with their addresses parsed; entries that do not parse are left out (they
    /// cannot be there after [`Config::validate`] passed).
    pub fn parsed_targets(&self) -> BTreeMap<String, IpAddr> {
        self.targets
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.trim().parse().ok()?)))
            .collect()
    }

    fn validate_into(&self, collect_interval: Duration, problems: &mut Vec<String>) {
        if !self.enabled {
            return;
        }
        if !self.interface.is_empty() && !valid_interface_name(&self.interface) {
            problems.push(format!(
                "metrics: config: latency: invalid interface name {:?}",
                self.interface
            ));
        }
        if self.probes == 0 || self.probes > MAX_LATENCY_PROBES {
            problems.push(format!(
                "metrics: config: latency: probes must be between 1 and {MAX_LATENCY_PROBES}, got {}",
                self.probes
            ));
        }
        if self.timeout.is_zero() {
            problems.push("metrics: config: latency: timeout must be greater than 0".to_owned());
        } else if collect_interval >= MIN_COLLECT_INTERVAL && self.timeout > collect_interval / 2 {
            // The probes of one cycle are spread over the first part of the cycle and the last
            // one still needs its timeout before the next cycle starts. (A collect interval
            // that is itself wrong has its own message; this one would only add noise.)
            problems.push(format!(
                "metrics: config: latency: timeout ({}) must be at most half of CollectInterval ({})",
                humantime::format_duration(self.timeout),
                humantime::format_duration(collect_interval)
            ));
        }
        for (peer, address) in &self.targets {
            if peer.trim().is_empty() {
                problems.push(
                    "metrics: config: latency: targets: an entry has an empty peer key or name"
                        .to_owned(),
                );
                continue;
            }
            match address.trim().parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() || ip.is_multicast() => problems.push(format!(
                    "metrics: config: latency: targets: {peer:?}: {address:?} is not a unicast address"
                )),
                Ok(_) => {}
                Err(_) => problems.push(format!(
                    "metrics: config: latency: targets: {peer:?}: invalid address {address:?}; \
                     write an IPv4 or IPv6 address such as 10.100.0.2 or fd00::2"
                )),
            }
        }
    }
}

/// IFNAMSIZ is 16 including the terminating NUL; the kernel also refuses `/` and whitespace.
fn valid_interface_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && !name.contains(['/', ' ', '\t', '\n', ':'])
}

/// Peer names, written in the config or kept in a file of their own (which another tool may
/// rewrite while the agent runs: it is read again when it changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerNames {
    /// Public key (base64) to name.
    Map(BTreeMap<String, String>),
    /// A YAML (or JSON) file holding such a map.
    File(PathBuf),
}

impl Default for PeerNames {
    fn default() -> Self {
        Self::Map(BTreeMap::new())
    }
}

impl<'de> Deserialize<'de> for PeerNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PeerNames;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of public key to name, or the path of a file holding one")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PeerNames, E> {
                Ok(PeerNames::File(PathBuf::from(v)))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<PeerNames, E> {
                Ok(PeerNames::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<PeerNames, A::Error> {
                BTreeMap::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(PeerNames::Map)
            }
        }
        d.deserialize_any(Visitor)
    }
}

// Written back as it was given: a map, or the file's path (for the environment's key list).
impl Serialize for PeerNames {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Map(map) => map.serialize(s),
            Self::File(path) => path.serialize(s),
        }
    }
}

impl PeerNames {
    /// The names: the map itself, or the file's map, read and checked now.
    pub fn load(&self) -> Result<BTreeMap<String, String>, Vec<String>> {
        match self {
            Self::Map(map) => check_peer_names(map).map(|()| map.clone()),
            Self::File(path) => read_peer_names_file(path),
        }
    }
}

/// Reads a peer names file: a YAML (or JSON) map of public key to name. An empty file
/// names no one.
pub fn read_peer_names_file(path: &Path) -> Result<BTreeMap<String, String>, Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![format!(
            "metrics: config: wireguard.peer_names: cannot read {}: {e}",
            path.display()
        )]
    })?;
    if text.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let map: BTreeMap<String, String> = serde_yaml_ng::from_str(&text).map_err(|e| {
        vec![format!(
            "metrics: config: wireguard.peer_names: {} is not a map of public key to name: {e}",
            path.display()
        )]
    })?;
    check_peer_names(&map).map(|()| map)
}

/// Every key must be a WireGuard public key and every name non-empty and used once, so that
/// a `peer_id` always means one peer.
fn check_peer_names(map: &BTreeMap<String, String>) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, name) in map {
        if !crate::source::wireguard::is_base64_key(key) {
            problems.push(format!(
                "metrics: config: wireguard.peer_names: {key:?} is not a WireGuard public key \
                 (44 characters of base64, as `wg show` prints it)"
            ));
        }
        if name.trim().is_empty() {
            problems.push(format!(
                "metrics: config: wireguard.peer_names: the name of {key} is empty"
            ));
        } else if let Some(other) = seen.insert(name, key) {
            problems.push(format!(
                "metrics: config: wireguard.peer_names: {name:?} names both {other} and {key}"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// WireGuard's customary port, the default of `metrics.ebpf.listen_ports`.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Upper bound of `metrics.ebpf.max_peers`: keeps a mistyped value from asking the kernel
/// for gigabytes of per-CPU memory.
pub const MAX_PEERS_LIMIT: u32 = 1 << 20;
/// Upper bound of `metrics.ebpf.max_sessions`, for the same reason.
pub const MAX_SESSIONS_LIMIT: u32 = 1 << 22;

/// `metrics.ebpf.attach_mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachModeConfig {
    /// TCX links on kernels from 6.6 on, netlink filters on a `clsact` qdisc before.
    #[default]
    Auto,
    /// Always netlink filters on a `clsact` qdisc.
    Netlink,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named on the command line.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema (unknown key, bad type, bad duration).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file named on the command line.
        path: PathBuf,
        /// The parser's message, naming the key and position.
        message: String,
    },
    /// A `PLEXD_METRICS_*` variable names no config key or holds a value of the wrong type;
    /// every such variable is listed.
    #[error("{}", .0.join("\n"))]
    Environment(Vec<String>),
    /// The values break one or more rules; every broken rule is listed.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// Each problem as its own line, for printing one per line.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Invalid(problems) | Self::Environment(problems) => problems.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// How an environment variable's text becomes a config value, decided by the key's default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LeafKind {
    /// Strings, paths and durations: the text as it is (so `node_id=123` stays a string).
    Text,
    /// Booleans and numbers: read as a YAML scalar.
    Scalar,
    /// Lists: YAML flow syntax (`[a, b]`) or comma-separated.
    List,
    /// Maps keyed by the user (peer names, latency targets): YAML flow syntax (`{a: b}`).
    Map,
}

/// One config key that an environment variable can set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvKey {
    /// The variable, e.g. `PLEXD_METRICS_CONTROL_PLANE_URL`.
    pub variable: String,
    /// The key's path, e.g. `["control_plane", "url"]`.
    pub path: Vec<String>,
    kind: LeafKind,
}

impl Config {
    /// Every config key with the environment variable that sets it, derived from the
    /// schema itself so that a new key gets its variable without further code.
    pub fn env_keys() -> Vec<EnvKey> {
        fn walk(value: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<EnvKey>) {
            let kind = match value {
                // A map that is empty by default is keyed by the user, not by the schema.
                serde_json::Value::Object(map) if map.is_empty() => LeafKind::Map,
                serde_json::Value::Object(map) => {
                    for (key, child) in map {
                        path.push(key.clone());
                        walk(child, path, out);
                        path.pop();
                    }
                    return;
                }
                serde_json::Value::Bool(_) | serde_json::Value::Number(_) => LeafKind::Scalar,
                serde_json::Value::Array(_) => LeafKind::List,
                // Optional keys (null by default) are all paths today.
                serde_json::Value::String(_) | serde_json::Value::Null => LeafKind::Text,
            };
            out.push(EnvKey {
                variable: format!("{ENV_PREFIX}{}", path.join("_").to_uppercase()),
                path: path.clone(),
                kind,
            });
        }
        let schema = serde_json::to_value(Self::default()).expect("the config serialises");
        let mut out = Vec::new();
        walk(&schema, &mut Vec::new(), &mut out);
        out
    }

    /// Reads and parses `path`; without a path, every setting takes its default.
    /// Does not validate: call [`Config::validate`].
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, std::iter::empty::<(OsString, OsString)>())
    }

    /// Like [`Config::load`], then applies `PLEXD_METRICS_<PATH>` variables from `vars`
    /// (the process environment in the binary) over the file's values. A variable that looks
    /// like a config key but names none is an error naming it.
    pub fn load_with_env<K, V>(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ConfigError>
    where
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let overrides = env_overrides(vars)?;
        let parsed = if overrides.is_empty() {
            // Straight from the text, so that errors keep their line and column.
            Self::parse(&text)
        } else {
            Self::parse_with_overrides(&text, &overrides)
        };
        parsed.map_err(|message| match path {
            Some(path) => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            None => ConfigError::Environment(vec![message]),
        })
    }

    /// Parses YAML text. An empty document means all defaults.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        // serde_yaml_ng names the key only for some errors; serde_path_to_error names it for
        // all of them (a bad duration inside a nested map included).
        serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text))
            .map_err(path_error)
    }

    fn parse_with_overrides(text: &str, overrides: &[(EnvKey, String)]) -> Result<Self, String> {
        use serde_yaml_ng::{Mapping, Value};
        let mut doc: Value = if text.trim().is_empty() {
            Value::Mapping(Mapping::new())
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?
        };
        if doc.is_null() {
            doc = Value::Mapping(Mapping::new());
        }
        for (key, text) in overrides {
            let value = match key.kind {
                LeafKind::Text => Value::String(text.clone()),
                LeafKind::Scalar => {
                    serde_yaml_ng::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                }
                // A map can only be written in YAML flow syntax (`{peer: 10.0.0.1}`); anything
                // else reaches the deserializer as text, which names the key it expected a map for.
                LeafKind::Map => {
                    serde_yaml_ng::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                }
                LeafKind::List if text.trim_start().starts_with('[') => {
                    serde_yaml_ng::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                }
                LeafKind::List => Value::Sequence(
                    text.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.to_owned()))
                        .collect(),
                ),
            };
            let mut node = &mut doc;
            for (i, segment) in key.path.iter().enumerate() {
                if node.is_null() {
                    *node = Value::Mapping(Mapping::new());
                }
                // A non-map in the file where a section belongs: leave it for the
                // deserializer, which names the key and the type it expected.
                let Value::Mapping(map) = node else { break };
                let segment = Value::String(segment.clone());
                if i + 1 == key.path.len() {
                    map.insert(segment, value);
                    break;
                }
                node = map.entry(segment).or_insert(Value::Null);
            }
        }
        serde_path_to_error::deserialize(doc).map_err(|e| {
            let set_by = overrides
                .iter()
                .find(|(key, _)| key.path.join(".") == e.path().to_string())
                .map(|(key, _)| key.variable.clone());
            let message = path_error(e);
            match set_by {
                Some(variable) => format!("{message} (set by {variable})"),
                None => message,
            }
        })
    }

    /// Checks every rule and returns all broken ones. Paths that the sources need are
    /// checked here too, so that a bad one stops the agent before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.control_plane.is_configured() {
            if self.node_id.trim().is_empty() {
                problems
                    .push("config: node_id is required when control_plane.url is set".to_owned());
            }
            self.control_plane.validate_into(&mut problems);
        }
        // As in the spec, a disabled pipeline is not validated at all.
        if self.metrics.enabled {
            self.metrics.validate_into(&mut problems);
            if self.metrics.local_endpoint.is_configured() {
                // The endpoint's credential is a secret fetched from the control plane and
                // decrypted with the node's key: both must be there.
                if !self.control_plane.is_configured() {
                    problems.push(
                        "metrics: config: local_endpoint: control_plane.url is required (the endpoint's credential is fetched from the control plane)"
                            .to_owned(),
                    );
                } else if self.control_plane.node_secret_key_file.is_none() {
                    problems.push(
                        "metrics: config: local_endpoint: control_plane.node_secret_key_file is required (it decrypts the endpoint's credential)"
                            .to_owned(),
                    );
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// The `PLEXD_METRICS_*` variables of `vars` that set config keys, with their values.
fn env_overrides<K, V>(
    vars: impl IntoIterator<Item = (K, V)>,
) -> Result<Vec<(EnvKey, String)>, ConfigError>
where
    K: Into<OsString>,
    V: Into<OsString>,
{
    let keys = Config::env_keys();
    // Top-level keys (`NODE_ID`, `CONTROL_PLANE`, `METRICS`): a variable starting with one
    // of them is meant for the config, so a typo in the rest is an error, not a silent no-op.
    let sections: Vec<String> = keys
        .iter()
        .map(|k| k.path[0].to_uppercase())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut overrides = Vec::new();
    let mut problems = Vec::new();
    for (name, value) in vars {
        let (name, value) = (name.into(), value.into());
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if CLI_ENV_VARIABLES.contains(&name) {
            continue;
        }
        match keys.iter().find(|k| k.variable == name) {
            Some(key) => match value.into_string() {
                Ok(text) => overrides.push((key.clone(), text)),
                Err(_) => problems.push(format!("environment: {name} is not valid UTF-8")),
            },
            None if sections
                .iter()
                .any(|s| rest == s || rest.starts_with(&format!("{s}_"))) =>
            {
                problems.push(format!(
                    "environment: {name} names no config key; the variables are {ENV_PREFIX}<KEY PATH> such as {ENV_PREFIX}CONTROL_PLANE_URL (see docs/configuration.md)"
                ));
            }
            None => {}
        }
    }
    if problems.is_empty() {
        // Stable order, so that two variables for one key cannot race each other.
        overrides.sort_by(|a, b| a.0.variable.cmp(&b.0.variable));
        Ok(overrides)
    } else {
        Err(ConfigError::Environment(problems))
    }
}

fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    let inner = e.into_inner().to_string();
    if path == "." {
        return inner;
    }
    // serde_yaml_ng sometimes prefixes a partial path of its own; keep only ours.
    let parts: Vec<&str> = path.split('.').collect();
    let message = (1..=parts.len())
        .rev()
        .find_map(|n| inner.strip_prefix(&format!("{}: ", parts[..n].join("."))))
        .unwrap_or(&inner);
    format!("{path}: {message}")
}

impl ControlPlaneConfig {
    fn validate_into(&self, problems: &mut Vec<String>) {
        match url::Url::parse(&self.url) {
            Err(e) => problems.push(format!(
                "config: control_plane: invalid URL {:?}: {e}",
                self.url
            )),
            Ok(u) => {
                if !u.username().is_empty() || u.password().is_some() {
                    // Never echo the URL here: it carries a credential.
                    problems.push(
                        "config: control_plane: URL must not carry credentials; put the token in control_plane.token_file"
                            .to_owned(),
                    );
                } else if u.query().is_some() || u.fragment().is_some() {
                    problems.push(format!(
                        "config: control_plane: URL must be a base URL without query or fragment, got {:?}",
                        self.url
                    ));
                }
                match u.scheme() {
                    "https" => {}
                    "http" if is_loopback(&u) => {}
                    "http" => problems.push(format!(
                        "config: control_plane: URL must be HTTPS (plain http only to a loopback address), got {:?}",
                        u.host_str().unwrap_or_default()
                    )),
                    other => problems.push(format!(
                        "config: control_plane: URL must be HTTPS, got {other:?}"
                    )),
                }
            }
        }
        match &self.token_file {
            None => problems.push(
                "config: control_plane.token_file is required when control_plane.url is set"
                    .to_owned(),
            ),
            Some(path) => match std::fs::read_to_string(path) {
                Err(e) => problems.push(format!(
                    "config: control_plane.token_file: cannot read {}: {e}",
                    path.display()
                )),
                Ok(text) if text.trim().is_empty() => problems.push(format!(
                    "config: control_plane.token_file: {} is empty",
                    path.display()
                )),
                Ok(_) => {}
            },
        }
        for (key, file) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(path) = file {
                if let Err(e) = std::fs::File::open(path) {
                    problems.push(format!(
                        "config: control_plane.{key}: cannot read {}: {e}",
                        path.display()
                    ));
                }
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(
                "config: control_plane: cert_file and key_file must be set together".to_owned(),
            );
        }
        if let Some(path) = &self.node_secret_key_file {
            if let Err(e) = NodeSecretKey::load(path) {
                problems.push(format!("config: control_plane.node_secret_key_file: {e}"));
            }
        }
        if self.timeout.is_zero() {
            problems.push("config: control_plane.timeout must be > 0".to_owned());
        }
    }
}

/// Plain http is allowed to this host only: a token in clear text never leaves the machine.
fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl MetricsConfig {
    fn validate_into(&self, problems: &mut Vec<String>) {
        if self.collect_interval < MIN_COLLECT_INTERVAL {
            problems.push("metrics: config: CollectInterval must be at least 5s".to_owned());
        }
        if self.report_interval < MIN_REPORT_INTERVAL {
            problems.push("metrics: config: ReportInterval must be at least 10s".to_owned());
        }
        if self.report_interval < self.collect_interval {
            problems.push("metrics: config: ReportInterval must be >= CollectInterval".to_owned());
        }
        if self.batch_size <= 0 {
            problems.push("metrics: config: BatchSize must be > 0".to_owned());
        }
        if self.queue.max_points <= 0 {
            problems.push("metrics: config: queue.max_points must be > 0".to_owned());
        } else if self.batch_size > 0 && self.queue.max_points < self.batch_size {
            // A batch that cannot fit in the queue could never be retried whole.
            problems.push("metrics: config: queue.max_points must be >= BatchSize".to_owned());
        }
        if self.queue.max_bytes.as_u64() < MIN_QUEUE_MAX_BYTES {
            problems.push(format!(
                "metrics: config: queue.max_bytes must be at least 1MiB, got {}",
                self.queue.max_bytes.as_u64()
            ));
        }
        if let Some(dir) = &self.queue.dir {
            if dir.as_os_str().is_empty() || !dir.is_absolute() {
                problems.push(format!(
                    "metrics: config: queue.dir must be an absolute path, got {:?}",
                    dir.display().to_string()
                ));
            }
        }
        self.local_endpoint.validate_into(problems);
        self.system.validate_into(problems);
        self.latency.validate_into(self.collect_interval, problems);
        self.health.validate_into(problems);
        if self.wireguard.enabled {
            self.wireguard.validate_into(problems);
        }
        self.ebpf.validate_into(self.collect_interval, problems);
    }
}

impl EbpfConfig {
    fn validate_into(&self, collect_interval: Duration, problems: &mut Vec<String>) {
        for name in &self.interfaces {
            if !valid_interface_name(name) {
                problems.push(format!(
                    "metrics: config: ebpf: invalid interface name {name:?}"
                ));
            }
        }
        if !self.enabled {
            return;
        }
        if self.listen_ports.is_empty() {
            problems
                .push("metrics: config: ebpf.listen_ports must name at least one port".to_owned());
        }
        if self.listen_ports.contains(&0) {
            problems.push("metrics: config: ebpf.listen_ports: 0 is not a port".to_owned());
        }
        if self.reorder_timeout.is_zero() {
            problems.push("metrics: config: ebpf.reorder_timeout must be > 0".to_owned());
        } else if self.reorder_timeout > collect_interval {
            // A gap is settled by the collect after the one it happened in only if the
            // timeout has passed by then.
            problems.push(
                "metrics: config: ebpf.reorder_timeout must be <= CollectInterval".to_owned(),
            );
        }
        for (key, value, limit) in [
            ("max_peers", self.max_peers, MAX_PEERS_LIMIT),
            ("max_sessions", self.max_sessions, MAX_SESSIONS_LIMIT),
        ] {
            if value == 0 || value > limit {
                problems.push(format!(
                    "metrics: config: ebpf.{key} must be between 1 and {limit}, got {value}"
                ));
            }
        }
    }
}

impl WireGuardConfig {
    fn validate_into(&self, problems: &mut Vec<String>) {
        for name in &self.interfaces {
            if !valid_interface_name(name) {
                problems.push(format!(
                    "metrics: config: wireguard: invalid interface name {name:?}"
                ));
            }
        }
        if self.stale_after.is_zero() {
            problems.push("metrics: config: wireguard.stale_after must be > 0".to_owned());
        }
        if let Err(found) = self.peer_names.load() {
            problems.extend(found);
        }
    }
}

impl LocalEndpointConfig {
    /// Whether a local endpoint is set up.
    pub fn is_configured(&self) -> bool {
        !self.url.is_empty()
    }

    fn validate_into(&self, problems: &mut Vec<String>) {
        if !self.is_configured() {
            return;
        }
        match url::Url::parse(&self.url) {
            Err(_) => problems.push(format!(
                "metrics: config: local_endpoint: invalid URL {:?}",
                self.url
            )),
            Ok(u) if u.scheme() != "https" => problems.push(format!(
                "metrics: config: local_endpoint: URL must be HTTPS, got {:?}",
                u.scheme()
            )),
            Ok(_) => {}
        }
        if self.secret_key.is_empty() {
            problems.push(
                "metrics: config: local_endpoint: SecretKey is required when URL is set".to_owned(),
            );
        }
        if let Some(path) = &self.ca_file {
            if let Err(e) = std::fs::File::open(path) {
                problems.push(format!(
                    "metrics: config: local_endpoint.ca_file: cannot read {}: {e}",
                    path.display()
                ));
            }
        }
    }
}

impl SystemConfig {
    fn validate_into(&self, problems: &mut Vec<String>) {
        if !self.proc_root.join("stat").is_file() {
            problems.push(format!(
                "metrics: config: system.proc_root: {} is not a proc filesystem (no stat file)",
                self.proc_root.display()
            ));
        }
        if !self.mount_point.is_dir() {
            problems.push(format!(
                "metrics: config: system.mount_point: {} is not a directory",
                self.mount_point.display()
            ));
        }
    }
}

/// Durations are written as in Go and humantime: `15s`, `1m`, `1m30s`, `500ms`.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} ({e}); write it like 15s, 1m or 1m30s"
        ))
    })
}

/// Secrets are never written out, not even by a config dump.
fn redacted<S: Serializer>(value: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if value.is_empty() { "" } else { "[redacted]" })
}

/// The inverse of [`duration`], so that a dumped config reads back the same.
fn duration_text<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let cfg = Config::parse(yaml).expect("parses");
        match cfg.validate() {
            Ok(()) => vec![],
            Err(e) => e.lines(),
        }
    }

    #[test]
    fn defaults_are_the_specs() {
        let cfg = Config::load(None).unwrap();
        assert!(cfg.metrics.enabled);
        assert_eq!(cfg.metrics.collect_interval, Duration::from_secs(15));
        assert_eq!(cfg.metrics.report_interval, Duration::from_secs(60));
        assert_eq!(cfg.metrics.batch_size, 100);
        assert!(!cfg.metrics.local_endpoint.is_configured());
        assert_eq!(cfg.metrics.system.proc_root, Path::new("/proc"));
        assert_eq!(cfg.metrics.system.mount_point, Path::new("/"));
        assert!(cfg.metrics.ebpf.enabled);
        cfg.validate().expect("defaults are valid on Linux");
        assert_eq!(Config::parse("").unwrap(), cfg);
        assert_eq!(Config::parse("metrics: {}\n").unwrap(), cfg);
    }

    /// A temporary directory with a token file, removed on drop.
    struct Files(PathBuf);
    impl Files {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("plexd-config-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("token"), "t0k3n\n").unwrap();
            std::fs::write(dir.join("nsk"), format!("{}\n", "ab".repeat(32))).unwrap();
            Self(dir)
        }
        fn path(&self, name: &str) -> String {
            self.0.join(name).display().to_string()
        }
    }
    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_issue_example_parses() {
        let files = Files::new("issue");
        let cfg = Config::parse(&format!(
            r#"
node_id: node-1
control_plane:
  url: https://cp.example:8443
  token_file: {}
metrics:
  enabled: true
  collect_interval: 15s
  report_interval: 1m
  batch_size: 100
  local_endpoint: {{ url: "", secret_key: "", tls_insecure_skip_verify: false }}
  system: {{ proc_root: /proc, mount_point: /, net_interface: "" }}
"#,
            files.path("token")
        ))
        .unwrap();
        assert_eq!(cfg.node_id, "node-1");
        assert_eq!(cfg.metrics.report_interval, Duration::from_secs(60));
        assert_eq!(
            cfg.control_plane.token_file.as_deref(),
            Some(files.0.join("token").as_path())
        );
        assert_eq!(cfg.control_plane.timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(cfg.metrics.queue.max_points, 10_000);
        cfg.validate().unwrap();
    }

    #[test]
    fn each_interval_rule_has_the_spec_text() {
        assert_eq!(
            problems("metrics: { collect_interval: 4s }"),
            ["metrics: config: CollectInterval must be at least 5s"]
        );
        assert_eq!(
            problems("metrics: { collect_interval: 5s, report_interval: 9s }"),
            ["metrics: config: ReportInterval must be at least 10s"]
        );
        assert_eq!(
            problems("metrics: { collect_interval: 30s, report_interval: 20s }"),
            ["metrics: config: ReportInterval must be >= CollectInterval"]
        );
        assert!(problems("metrics: { collect_interval: 5s, report_interval: 10s }").is_empty());
        assert!(problems("metrics: { collect_interval: 20s, report_interval: 20s }").is_empty());
    }

    #[test]
    fn batch_size_must_be_positive() {
        for bad in ["0", "-1"] {
            assert_eq!(
                problems(&format!("metrics: {{ batch_size: {bad} }}")),
                ["metrics: config: BatchSize must be > 0"]
            );
        }
        assert!(problems("metrics: { batch_size: 1 }").is_empty());
    }

    #[test]
    fn all_problems_are_reported_together() {
        let p = problems("metrics: { collect_interval: 1s, report_interval: 2s, batch_size: 0 }");
        assert_eq!(
            p,
            [
                "metrics: config: CollectInterval must be at least 5s",
                "metrics: config: ReportInterval must be at least 10s",
                "metrics: config: BatchSize must be > 0",
            ]
        );
    }

    #[test]
    fn disabled_metrics_skip_validation_entirely() {
        assert!(problems(
            "metrics: { enabled: false, collect_interval: 1s, batch_size: 0, local_endpoint: { url: 'http://x' } }"
        )
        .is_empty());
    }

    /// Problems other than the local endpoint's need for a control plane.
    fn spec_problems(yaml: &str) -> Vec<String> {
        problems(yaml)
            .into_iter()
            .filter(|p| !p.starts_with("metrics: config: local_endpoint: control_plane."))
            .collect()
    }

    #[test]
    fn local_endpoint_rules_have_the_spec_texts() {
        assert_eq!(
            spec_problems("metrics: { local_endpoint: { url: 'not a url', secret_key: k } }"),
            [r#"metrics: config: local_endpoint: invalid URL "not a url""#]
        );
        assert_eq!(
            spec_problems("metrics: { local_endpoint: { url: 'http://metrics.local:9090/ingest', secret_key: k } }"),
            [r#"metrics: config: local_endpoint: URL must be HTTPS, got "http""#]
        );
        assert_eq!(
            spec_problems(
                "metrics: { local_endpoint: { url: 'https://metrics.local:9090/ingest' } }"
            ),
            ["metrics: config: local_endpoint: SecretKey is required when URL is set"]
        );
        assert!(spec_problems(
            "metrics: { local_endpoint: { url: 'https://metrics.local:9090/ingest', secret_key: local-metrics-token } }"
        )
        .is_empty());
        // The zero value means "not configured" and is valid.
        assert!(
            spec_problems("metrics: { local_endpoint: { url: '', secret_key: '' } }").is_empty()
        );
    }

    #[test]
    fn secret_key_is_redacted_in_debug_output() {
        let cfg =
            Config::parse("metrics: { local_endpoint: { url: 'https://x', secret_key: hunter2 } }")
                .unwrap();
        let dump = format!("{cfg:?}");
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("[redacted]"), "{dump}");
    }

    #[test]
    fn control_plane_needs_a_node_id_a_url_that_parses_and_a_token() {
        let files = Files::new("cp-basics");
        let token = files.path("token");
        assert_eq!(
            problems(&format!(
                "control_plane: {{ url: 'https://cp.example', token_file: {token} }}"
            )),
            ["config: node_id is required when control_plane.url is set"]
        );
        let p = problems(&format!(
            "node_id: n1\ncontrol_plane: {{ url: 'cp.example', token_file: {token} }}"
        ));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with(r#"config: control_plane: invalid URL "cp.example""#),
            "{p:?}"
        );
        assert_eq!(
            problems("node_id: n1\ncontrol_plane: { url: 'https://cp.example' }"),
            ["config: control_plane.token_file is required when control_plane.url is set"]
        );
        let p = problems("node_id: n1\ncontrol_plane: { url: 'https://cp.example', token_file: /nonexistent/token }");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("config: control_plane.token_file: cannot read /nonexistent/token: "),
            "{p:?}"
        );
        std::fs::write(files.0.join("empty"), " \n").unwrap();
        assert_eq!(
            problems(&format!(
                "node_id: n1\ncontrol_plane: {{ url: 'https://cp.example', token_file: {} }}",
                files.path("empty")
            )),
            [format!(
                "config: control_plane.token_file: {} is empty",
                files.path("empty")
            )]
        );
    }

    #[test]
    fn plain_http_only_to_loopback_and_no_credentials_in_the_url() {
        let files = Files::new("cp-scheme");
        let cp = |url: &str| {
            problems(&format!(
                "node_id: n1\ncontrol_plane: {{ url: '{url}', token_file: {} }}",
                files.path("token")
            ))
        };
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.8.0.1",
            "http://[::1]:9000/base",
            "http://localhost:1234",
            "https://cp.example:8443/api",
        ] {
            assert!(cp(ok).is_empty(), "{ok}: {:?}", cp(ok));
        }
        assert_eq!(
            cp("http://cp.example"),
            [
                r#"config: control_plane: URL must be HTTPS (plain http only to a loopback address), got "cp.example""#
            ]
        );
        assert_eq!(
            cp("ftp://cp.example"),
            [r#"config: control_plane: URL must be HTTPS, got "ftp""#]
        );
        let p = cp("https://user:hunter2@cp.example");
        assert_eq!(
            p,
            ["config: control_plane: URL must not carry credentials; put the token in control_plane.token_file"]
        );
        assert_eq!(
            cp("https://cp.example/?a=b"),
            [
                r#"config: control_plane: URL must be a base URL without query or fragment, got "https://cp.example/?a=b""#
            ]
        );
    }

    #[test]
    fn tls_files_secret_key_and_timeout_are_checked() {
        let files = Files::new("cp-tls");
        let base = format!(
            "node_id: n1\ncontrol_plane: {{ url: 'https://cp', token_file: {}",
            files.path("token")
        );
        assert_eq!(
            problems(&format!("{base}, cert_file: {} }}", files.path("token"))),
            ["config: control_plane: cert_file and key_file must be set together"]
        );
        let p = problems(&format!("{base}, ca_file: /nonexistent/ca.pem }}"));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("config: control_plane.ca_file: cannot read /nonexistent/ca.pem: "),
            "{p:?}"
        );
        std::fs::write(files.0.join("bad-nsk"), "secret-but-not-a-key").unwrap();
        let p = problems(&format!(
            "{base}, node_secret_key_file: {} }}",
            files.path("bad-nsk")
        ));
        assert_eq!(
            p,
            [format!(
                "config: control_plane.node_secret_key_file: {} does not hold a node secret key: expected 32 bytes written as 64 hex digits or as base64",
                files.path("bad-nsk")
            )]
        );
        assert!(problems(&format!(
            "{base}, node_secret_key_file: {} }}",
            files.path("nsk")
        ))
        .is_empty());
        assert_eq!(
            problems(&format!("{base}, timeout: 0s }}")),
            ["config: control_plane.timeout must be > 0"]
        );
        let cfg = Config::parse(&format!("{base}, timeout: 2500ms }}")).unwrap();
        assert_eq!(cfg.control_plane.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn a_local_endpoint_needs_the_control_plane_and_the_node_key() {
        let files = Files::new("local-needs");
        let local =
            "metrics: { local_endpoint: { url: 'https://metrics.local/ingest', secret_key: k } }";
        assert_eq!(
            problems(local),
            ["metrics: config: local_endpoint: control_plane.url is required (the endpoint's credential is fetched from the control plane)"]
        );
        let cp = format!(
            "node_id: n1\ncontrol_plane: {{ url: 'https://cp', token_file: {} }}\n",
            files.path("token")
        );
        assert_eq!(
            problems(&format!("{cp}{local}")),
            ["metrics: config: local_endpoint: control_plane.node_secret_key_file is required (it decrypts the endpoint's credential)"]
        );
        let cp = format!(
            "node_id: n1\ncontrol_plane: {{ url: 'https://cp', token_file: {}, node_secret_key_file: {} }}\n",
            files.path("token"),
            files.path("nsk")
        );
        assert!(problems(&format!("{cp}{local}")).is_empty());
    }

    #[test]
    fn the_queue_bound_must_hold_a_batch() {
        assert_eq!(
            problems("metrics: { queue: { max_points: 0 } }"),
            ["metrics: config: queue.max_points must be > 0"]
        );
        assert_eq!(
            problems("metrics: { batch_size: 100, queue: { max_points: 99 } }"),
            ["metrics: config: queue.max_points must be >= BatchSize"]
        );
        assert!(problems("metrics: { batch_size: 100, queue: { max_points: 100 } }").is_empty());
    }

    #[test]
    fn the_durable_queue_takes_an_absolute_dir_and_a_size_with_or_without_a_unit() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.metrics.queue.dir, None, "in memory unless asked");
        assert_eq!(cfg.metrics.queue.max_bytes.as_u64(), 256 << 20);
        for (text, bytes) in [
            ("64MiB", 64u64 << 20),
            ("1 GiB", 1 << 30),
            ("2000000", 2_000_000),
        ] {
            let cfg = Config::parse(&format!(
                "metrics: {{ queue: {{ dir: /var/lib/plexd-metrics, max_bytes: {text} }} }}"
            ))
            .unwrap();
            assert_eq!(cfg.metrics.queue.max_bytes.as_u64(), bytes, "{text}");
            assert_eq!(
                cfg.metrics.queue.dir.as_deref(),
                Some(Path::new("/var/lib/plexd-metrics"))
            );
            assert!(cfg.validate().is_ok());
        }
        assert_eq!(
            problems("metrics: { queue: { dir: spool, max_bytes: 1000 } }"),
            [
                "metrics: config: queue.max_bytes must be at least 1MiB, got 1000",
                "metrics: config: queue.dir must be an absolute path, got \"spool\""
            ]
        );
        let err = Config::parse("metrics: { queue: { max_bytes: lots } }").unwrap_err();
        assert!(err.starts_with("metrics.queue.max_bytes: "), "{err}");
        let cfg = with_env(
            None,
            &[
                ("PLEXD_METRICS_METRICS_QUEUE_DIR", "/srv/q"),
                ("PLEXD_METRICS_METRICS_QUEUE_MAX_BYTES", "512MiB"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.metrics.queue.dir.as_deref(), Some(Path::new("/srv/q")));
        assert_eq!(cfg.metrics.queue.max_bytes.as_u64(), 512 << 20);
        let cfg = with_env(
            None,
            &[("PLEXD_METRICS_METRICS_QUEUE_MAX_BYTES", "3145728")],
        )
        .unwrap();
        assert_eq!(cfg.metrics.queue.max_bytes.as_u64(), 3 << 20);
    }

    fn with_env(yaml: Option<&str>, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let files = yaml.map(|y| {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let f = Files::new(&format!("env-{n}"));
            std::fs::write(f.0.join("config.yaml"), y).unwrap();
            f
        });
        let path = files.as_ref().map(|f| f.0.join("config.yaml"));
        Config::load_with_env(
            path.as_deref(),
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn map_keys_take_yaml_flow_maps_from_the_environment() {
        let cfg = with_env(
            None,
            &[(
                "PLEXD_METRICS_METRICS_LATENCY_TARGETS",
                "{peer-1: 10.100.0.2, peer-2: 'fd00::2'}",
            )],
        )
        .unwrap();
        let targets = &cfg.metrics.latency.targets;
        assert_eq!(targets.len(), 2);
        assert_eq!(targets["peer-1"], "10.100.0.2");
        assert_eq!(targets["peer-2"], "fd00::2");
        let e = with_env(None, &[("PLEXD_METRICS_METRICS_LATENCY_TARGETS", "peer-1")]).unwrap_err();
        assert!(e.to_string().contains("metrics.latency.targets"), "{e}");
    }

    #[test]
    fn every_key_has_a_variable() {
        let names: Vec<String> = Config::env_keys().into_iter().map(|k| k.variable).collect();
        for want in [
            "PLEXD_METRICS_NODE_ID",
            "PLEXD_METRICS_CONTROL_PLANE_URL",
            "PLEXD_METRICS_CONTROL_PLANE_TOKEN_FILE",
            "PLEXD_METRICS_CONTROL_PLANE_TIMEOUT",
            "PLEXD_METRICS_CONTROL_PLANE_NODE_SECRET_KEY_FILE",
            "PLEXD_METRICS_METRICS_BATCH_SIZE",
            "PLEXD_METRICS_METRICS_QUEUE_MAX_POINTS",
            "PLEXD_METRICS_METRICS_LOCAL_ENDPOINT_SECRET_KEY",
            "PLEXD_METRICS_METRICS_EBPF_INTERFACES",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        // One variable per leaf: sections themselves have none.
        assert!(!names.iter().any(|n| n == "PLEXD_METRICS_METRICS"));
    }

    #[test]
    fn variables_override_the_file_with_the_keys_types() {
        let cfg = with_env(
            Some("node_id: from-file\nmetrics: { batch_size: 5, collect_interval: 30s, report_interval: 1m }\n"),
            &[
                ("PLEXD_METRICS_NODE_ID", "123"),
                ("PLEXD_METRICS_CONTROL_PLANE_URL", "https://cp.example"),
                ("PLEXD_METRICS_METRICS_BATCH_SIZE", "200"),
                ("PLEXD_METRICS_METRICS_ENABLED", "true"),
                ("PLEXD_METRICS_METRICS_COLLECT_INTERVAL", "5s"),
                ("PLEXD_METRICS_METRICS_EBPF_INTERFACES", "eth0, wg0"),
                ("PLEXD_METRICS_CONTROL_PLANE_TLS_INSECURE_SKIP_VERIFY", "false"),
                // Not config keys: left alone.
                ("PLEXD_METRICS_CONFIG", "/x.yaml"),
                ("PLEXD_METRICS_LOG_LEVEL", "debug"),
                ("PLEXD_METRICS_BIN", "/bin/agent"),
                ("HOME", "/root"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.node_id, "123", "text keys stay text");
        assert_eq!(cfg.control_plane.url, "https://cp.example");
        assert_eq!(cfg.metrics.batch_size, 200);
        assert_eq!(cfg.metrics.collect_interval, Duration::from_secs(5));
        assert_eq!(
            cfg.metrics.report_interval,
            Duration::from_secs(60),
            "from the file"
        );
        assert_eq!(cfg.metrics.ebpf.interfaces, ["eth0", "wg0"]);
        let cfg = with_env(None, &[("PLEXD_METRICS_METRICS_EBPF_INTERFACES", "[a, b]")]).unwrap();
        assert_eq!(cfg.metrics.ebpf.interfaces, ["a", "b"]);
    }

    #[test]
    fn unknown_or_mistyped_variables_are_named() {
        let e = with_env(
            None,
            &[
                ("PLEXD_METRICS_CONTROL_PLANE_TOKEN", "x"),
                ("PLEXD_METRICS_METRICS_BATCHSIZE", "1"),
            ],
        )
        .unwrap_err();
        let lines = e.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines.iter().any(|l| l
                .starts_with("environment: PLEXD_METRICS_CONTROL_PLANE_TOKEN names no config key")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l
                .starts_with("environment: PLEXD_METRICS_METRICS_BATCHSIZE names no config key")),
            "{lines:?}"
        );

        let e = with_env(
            Some("metrics: {}\n"),
            &[("PLEXD_METRICS_METRICS_BATCH_SIZE", "many")],
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("metrics.batch_size"), "{text}");
        assert!(
            text.ends_with("(set by PLEXD_METRICS_METRICS_BATCH_SIZE)"),
            "{text}"
        );
        let e = with_env(None, &[("PLEXD_METRICS_METRICS_REPORT_INTERVAL", "soon")]).unwrap_err();
        assert!(e.to_string().contains("invalid duration \"soon\""), "{e}");
    }

    #[test]
    fn a_dump_holds_no_secret() {
        let cfg =
            Config::parse("metrics: { local_endpoint: { url: 'https://x', secret_key: hunter2 } }")
                .unwrap();
        let dump = serde_json::to_string(&cfg).unwrap();
        assert!(!dump.contains("hunter2"), "{dump}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("metrics: { colect_interval: 15s }").unwrap_err();
        assert!(e.contains("unknown field `colect_interval`"), "{e}");
        let e = Config::parse("nodeid: x").unwrap_err();
        assert!(e.contains("unknown field `nodeid`"), "{e}");
    }

    #[test]
    fn bad_durations_name_the_key_and_the_value() {
        for bad in ["fast", "15", "-5s"] {
            let e =
                Config::parse(&format!("metrics: {{ collect_interval: '{bad}' }}")).unwrap_err();
            assert!(e.contains("metrics.collect_interval"), "{e}");
            assert!(e.contains(&format!("invalid duration {bad:?}")), "{e}");
        }
        let cfg =
            Config::parse("metrics: { collect_interval: 1m30s, report_interval: 2m }").unwrap();
        assert_eq!(cfg.metrics.collect_interval, Duration::from_secs(90));
    }

    #[test]
    fn invalid_yaml_is_a_parse_error() {
        assert!(Config::parse("metrics: [").is_err());
        assert!(Config::parse("metrics: { batch_size: many }")
            .unwrap_err()
            .contains("batch_size"));
    }

    #[test]
    fn absent_proc_root_and_mount_point_are_named() {
        let p = problems(
            "metrics: { system: { proc_root: /nonexistent/proc, mount_point: /nonexistent/mnt } }",
        );
        assert_eq!(
            p,
            [
                "metrics: config: system.proc_root: /nonexistent/proc is not a proc filesystem (no stat file)",
                "metrics: config: system.mount_point: /nonexistent/mnt is not a directory",
            ]
        );
    }

    #[test]
    fn interface_names_are_checked() {
        assert_eq!(
            problems("metrics: { ebpf: { interfaces: [eth0, 'a-name-that-is-too-long'] } }"),
            [r#"metrics: config: ebpf: invalid interface name "a-name-that-is-too-long""#]
        );
    }

    #[test]
    fn health_defaults_to_this_host_and_takes_any_socket_address() {
        let health = Config::parse("").unwrap().metrics.health;
        assert!(health.enabled);
        assert_eq!(
            health.listen_addr(),
            Some("127.0.0.1:9102".parse().unwrap())
        );
        let cfg = Config::parse("metrics: { health: { listen: '[::]:0' } }").unwrap();
        assert_eq!(
            cfg.metrics.health.listen_addr(),
            Some("[::]:0".parse().unwrap())
        );
        cfg.validate().unwrap();
        let env = with_env(
            None,
            &[("PLEXD_METRICS_METRICS_HEALTH_LISTEN", "0.0.0.0:9102")],
        );
        assert_eq!(env.unwrap().metrics.health.listen, "0.0.0.0:9102");
    }

    #[test]
    fn a_bad_health_address_says_what_to_write_unless_health_is_off() {
        for bad in ["localhost:9102", "9102", "0.0.0.0", ""] {
            assert_eq!(
                problems(&format!("metrics: {{ health: {{ listen: '{bad}' }} }}")),
                [format!(
                    "metrics: config: health.listen: invalid address {bad:?}; write IP:PORT such as \
                     127.0.0.1:9102 (0.0.0.0:9102 to answer probes from other hosts), or set \
                     metrics.health.enabled: false"
                )],
            );
        }
        assert!(problems("metrics: { health: { enabled: false, listen: nope } }").is_empty());
        assert_eq!(
            Config::parse("metrics: { health: { port: 9102 } }").unwrap_err(),
            "metrics.health.port: unknown field `port`, expected `enabled` or `listen` at line 1 column 22"
        );
    }

    const KEY: &str = "WEAuaVuhdyscyTCXVfBDJR6nf9zxD75jmJzq6OeitcA=";
    const OTHER_KEY: &str = "Zi4U/VlFVvUiYEcDNANRJYkDtk81VTdj8ZQmqypRXFg=";

    #[test]
    fn wireguard_defaults() {
        let wg = Config::parse("").unwrap().metrics.wireguard;
        assert!(wg.enabled);
        assert!(wg.interfaces.is_empty());
        assert_eq!(wg.stale_after, Duration::from_secs(180));
        assert_eq!(wg.peer_names, PeerNames::Map(BTreeMap::new()));
        assert_eq!(wg.socket_dir, Path::new("/var/run/wireguard"));
    }

    #[test]
    fn wireguard_keys_parse() {
        let cfg = Config::parse(&format!(
            "metrics:\n  wireguard:\n    interfaces: [wg0, wg1]\n    stale_after: 5m\n    socket_dir: /host/run/wireguard\n    peer_names:\n      {KEY}: gateway-1\n"
        ))
        .unwrap();
        let wg = &cfg.metrics.wireguard;
        assert_eq!(wg.interfaces, ["wg0", "wg1"]);
        assert_eq!(wg.stale_after, Duration::from_secs(300));
        assert_eq!(wg.socket_dir, Path::new("/host/run/wireguard"));
        assert_eq!(
            wg.peer_names.load().unwrap(),
            BTreeMap::from([(KEY.to_owned(), "gateway-1".to_owned())])
        );
        cfg.validate().unwrap();
    }

    #[test]
    fn wireguard_rules_have_clear_texts() {
        assert_eq!(
            problems("metrics: { wireguard: { stale_after: 0s, interfaces: ['wg 0'] } }"),
            [
                r#"metrics: config: wireguard: invalid interface name "wg 0""#,
                "metrics: config: wireguard.stale_after must be > 0",
            ]
        );
        assert_eq!(
            problems(&format!(
                "metrics: {{ wireguard: {{ peer_names: {{ not-a-key: a, {KEY}: '', {OTHER_KEY}: b }} }} }}"
            )),
            [
                format!("metrics: config: wireguard.peer_names: the name of {KEY} is empty"),
                r#"metrics: config: wireguard.peer_names: "not-a-key" is not a WireGuard public key (44 characters of base64, as `wg show` prints it)"#.to_owned(),
            ]
        );
        assert_eq!(
            problems(&format!(
                "metrics: {{ wireguard: {{ peer_names: {{ {KEY}: gw, {OTHER_KEY}: gw }} }} }}"
            )),
            [format!(
                r#"metrics: config: wireguard.peer_names: "gw" names both {KEY} and {OTHER_KEY}"#
            )]
        );
        // A disabled tunnel group is not validated.
        assert!(problems("metrics: { wireguard: { enabled: false, stale_after: 0s } }").is_empty());
    }

    #[test]
    fn peer_names_may_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("plexd-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("names.json");
        std::fs::write(&file, format!(r#"{{"{KEY}": "gateway-1"}}"#)).unwrap();
        let cfg = Config::parse(&format!(
            "metrics: {{ wireguard: {{ peer_names: {} }} }}",
            file.display()
        ))
        .unwrap();
        assert_eq!(
            cfg.metrics.wireguard.peer_names,
            PeerNames::File(file.clone())
        );
        cfg.validate().unwrap();
        assert_eq!(
            cfg.metrics.wireguard.peer_names.load().unwrap()[KEY],
            "gateway-1"
        );

        std::fs::write(&file, "[just, a, list]").unwrap();
        let p = problems(&format!(
            "metrics: {{ wireguard: {{ peer_names: {} }} }}",
            file.display()
        ));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with(&format!(
                "metrics: config: wireguard.peer_names: {} is not a map of public key to name: ",
                file.display()
            )),
            "{p:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let p = problems(&format!(
            "metrics: {{ wireguard: {{ peer_names: {} }} }}",
            file.display()
        ));
        assert!(
            p[0].starts_with(&format!(
                "metrics: config: wireguard.peer_names: cannot read {}: ",
                file.display()
            )),
            "{p:?}"
        );
    }

    #[test]
    fn peer_names_of_another_shape_are_explained() {
        let e = Config::parse("metrics: { wireguard: { peer_names: [a, b] } }").unwrap_err();
        assert!(e.contains("metrics.wireguard.peer_names"), "{e}");
        assert!(
            e.contains("a map of public key to name, or the path of a file holding one"),
            "{e}"
        );
    }

    #[test]
    fn latency_defaults_and_a_full_example() {
        let d = Config::default().metrics.latency;
        assert!(d.enabled);
        assert_eq!(d.probes, 3);
        assert_eq!(d.timeout, Duration::from_secs(1));
        assert!(d.interface.is_empty());
        assert!(d.targets.is_empty());

        let cfg = Config::parse(
            r#"
metrics:
  latency:
    enabled: true
    interface: wg0
    probes: 5
    timeout: 500ms
    targets:
      "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=": 10.100.0.2
      peer-b: " fd00::2 "
"#,
        )
        .unwrap();
        cfg.validate().unwrap();
        let l = &cfg.metrics.latency;
        assert_eq!((l.interface.as_str(), l.probes), ("wg0", 5));
        assert_eq!(l.timeout, Duration::from_millis(500));
        let t = l.parsed_targets();
        assert_eq!(
            t["xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="],
            "10.100.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(t["peer-b"], "fd00::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn latency_rules_name_the_key_and_what_to_write() {
        assert_eq!(
            problems("metrics: { latency: { probes: 0 } }"),
            ["metrics: config: latency: probes must be between 1 and 100, got 0"]
        );
        assert_eq!(
            problems("metrics: { latency: { probes: 101 } }"),
            ["metrics: config: latency: probes must be between 1 and 100, got 101"]
        );
        assert!(problems("metrics: { latency: { probes: 100 } }").is_empty());
        assert_eq!(
            problems("metrics: { latency: { timeout: 0s } }"),
            ["metrics: config: latency: timeout must be greater than 0"]
        );
        assert_eq!(
            problems("metrics: { latency: { timeout: 8s } }"),
            ["metrics: config: latency: timeout (8s) must be at most half of CollectInterval (15s)"]
        );
        assert!(problems("metrics: { latency: { timeout: 7500ms } }").is_empty());
        assert_eq!(
            problems("metrics: { latency: { interface: 'wg0/x' } }"),
            [r#"metrics: config: latency: invalid interface name "wg0/x""#]
        );
        assert_eq!(
            problems("metrics: { latency: { targets: { peer-a: 10.0.0.300, peer-b: '0.0.0.0', peer-c: 'ff02::1', peer-d: 10.0.0.1 } } }"),
            [
                r#"metrics: config: latency: targets: "peer-a": invalid address "10.0.0.300"; write an IPv4 or IPv6 address such as 10.100.0.2 or fd00::2"#,
                r#"metrics: config: latency: targets: "peer-b": "0.0.0.0" is not a unicast address"#,
                r#"metrics: config: latency: targets: "peer-c": "ff02::1" is not a unicast address"#,
            ]
        );
        assert_eq!(
            problems("metrics: { latency: { targets: { '': 10.0.0.1 } } }"),
            ["metrics: config: latency: targets: an entry has an empty peer key or name"]
        );
    }

    #[test]
    fn disabled_latency_is_not_validated_and_unknown_latency_keys_are_named() {
        assert!(
            problems("metrics: { latency: { enabled: false, probes: 0, timeout: 0s } }").is_empty()
        );
        let e = Config::parse("metrics: { latency: { probe: 3 } }").unwrap_err();
        assert!(e.contains("unknown field `probe`"), "{e}");
        let e = Config::parse("metrics: { latency: { timeout: soon } }").unwrap_err();
        assert!(e.contains("metrics.latency.timeout"), "{e}");
    }

    #[test]
    fn ebpf_defaults() {
        let e = Config::default().metrics.ebpf;
        assert_eq!(e.attach_mode, AttachModeConfig::Auto);
        assert_eq!(e.listen_ports, [51820]);
        assert_eq!(e.reorder_timeout, Duration::from_secs(1));
        assert_eq!((e.max_peers, e.max_sessions), (16_384, 65_536));
    }

    #[test]
    fn ebpf_keys_parse() {
        let cfg = Config::parse(
            "metrics: { ebpf: { attach_mode: netlink, listen_ports: [51820, 51821], \
             reorder_timeout: 250ms, max_peers: 100, max_sessions: 400 } }",
        )
        .unwrap();
        let e = &cfg.metrics.ebpf;
        assert_eq!(e.attach_mode, AttachModeConfig::Netlink);
        assert_eq!(e.listen_ports, [51820, 51821]);
        assert_eq!(e.reorder_timeout, Duration::from_millis(250));
        assert_eq!((e.max_peers, e.max_sessions), (100, 400));
        cfg.validate().unwrap();
    }

    #[test]
    fn ebpf_bad_values_are_named() {
        let e = Config::parse("metrics: { ebpf: { attach_mode: xdp } }").unwrap_err();
        assert!(e.contains("metrics.ebpf.attach_mode"), "{e}");
        let e = Config::parse("metrics: { ebpf: { listen_ports: [70000] } }").unwrap_err();
        assert!(e.contains("metrics.ebpf.listen_ports"), "{e}");
        let e = Config::parse("metrics: { ebpf: { max_peers: -1 } }").unwrap_err();
        assert!(e.contains("metrics.ebpf.max_peers"), "{e}");
        let e = Config::parse("metrics: { ebpf: { reorder_timeout: soon } }").unwrap_err();
        assert!(e.contains("metrics.ebpf.reorder_timeout"), "{e}");
    }

    #[test]
    fn ebpf_rules() {
        assert_eq!(
            problems("metrics: { ebpf: { listen_ports: [] } }"),
            ["metrics: config: ebpf.listen_ports must name at least one port"]
        );
        assert_eq!(
            problems("metrics: { ebpf: { listen_ports: [51820, 0] } }"),
            ["metrics: config: ebpf.listen_ports: 0 is not a port"]
        );
        assert_eq!(
            problems("metrics: { ebpf: { reorder_timeout: 0s } }"),
            ["metrics: config: ebpf.reorder_timeout must be > 0"]
        );
        assert_eq!(
            problems("metrics: { collect_interval: 5s, ebpf: { reorder_timeout: 6s } }"),
            ["metrics: config: ebpf.reorder_timeout must be <= CollectInterval"]
        );
        assert!(
            problems("metrics: { collect_interval: 5s, ebpf: { reorder_timeout: 5s } }").is_empty()
        );
        assert_eq!(
            problems("metrics: { ebpf: { max_peers: 0, max_sessions: 5000000 } }"),
            [
                "metrics: config: ebpf.max_peers must be between 1 and 1048576, got 0",
                "metrics: config: ebpf.max_sessions must be between 1 and 4194304, got 5000000",
            ]
        );
        // Nothing of the programs is checked when they are off.
        assert!(
            problems("metrics: { ebpf: { enabled: false, listen_ports: [], max_peers: 0 } }")
                .is_empty()
        );
    }

    #[test]
    fn file_errors_name_the_file() {
        let e = Config::load(Some(Path::new("/nonexistent/plexd.yaml"))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read config file /nonexistent/plexd.yaml: "),
            "{e}"
        );
    }
}
