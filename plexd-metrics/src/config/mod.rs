//! The agent's configuration: one YAML file, one struct, the spec's defaults and rules.
//!
//! This module holds the schema and its defaults, each stated once in a `Default` impl (the
//! documented block in `docs/configuration.md` is tested against them), and the entry points
//! that load it. `env` applies the `PLEXD_METRICS_*` variables over the file, `validate`
//! checks the rules and turns a config into typed [`Settings`], the only form the agent runs
//! from, and `peer_names` reads the peer names a config may point to.
//!
//! Loading and validation report every problem at once, each on its own line, so that a user
//! fixes a file in one pass. The metrics rules carry the Go agent's exact texts.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod env;
mod peer_names;
#[cfg(test)]
mod properties;
mod settings;
#[cfg(test)]
mod testing;
mod tls;
mod validate;

pub use env::{EnvKey, CLI_ENV_VARIABLES, ENV_PREFIX};
pub use peer_names::{read_peer_names_file, PeerNames};
pub use settings::{MetricsSettings, Settings};
pub use tls::{
    ParsedTls, TlsOptions, TlsVersion, DEFAULT_TLS_MAX_VERSION, DEFAULT_TLS_MIN_VERSION,
};
pub(crate) use validate::is_loopback;
pub use validate::{
    MAX_LATENCY_PROBES, MAX_PEERS_LIMIT, MAX_SESSIONS_LIMIT, MIN_COLLECT_INTERVAL,
    MIN_QUEUE_MAX_BYTES, MIN_REPORT_INTERVAL, REMOTE_WRITE_RESERVED_HEADERS,
};

/// Default bound of one HTTP request to the control plane.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound of one remote-write request: as Prometheus' own `remote_timeout`.
pub const DEFAULT_REMOTE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound of the retry queue, in points.
pub const DEFAULT_QUEUE_MAX_POINTS: i64 = 10_000;
/// Default bound of the durable queue's directory. While the control plane is away, a node
/// with 100 peers at the default intervals adds about 17 MiB an hour
/// (`cargo xtask bench --only queue`): 256 MiB rides out half a day of outage at that size
/// and days for a small node, while staying a small share of the disk that holds
/// `/var/lib` on a node. A larger mesh that must ride out longer raises it.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Default bound of the memory the queued points take. The default 10,000 points of a
/// node's own groups take a few MiB; points of application endpoints (`metrics.apps`) can
/// take hundreds of KiB each, and this keeps an outage from growing the agent past the
/// DaemonSet's 256 MiB memory limit.
pub const DEFAULT_QUEUE_MAX_MEMORY_BYTES: u64 = 64 * 1024 * 1024;
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
    /// The name the server's certificate must be valid for, instead of the URL's host
    /// (e.g. when the URL names an IP address); empty means the URL's host.
    pub server_name: String,
    /// The oldest TLS version offered: `TLS1.2` or `TLS1.3`.
    pub min_version: String,
    /// The newest TLS version offered: `TLS1.2` or `TLS1.3`.
    pub max_version: String,
    /// The cipher suites offered, by their IANA (and Go) names; empty means rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// Resume TLS sessions; false makes every new connection a full handshake.
    pub session_tickets: bool,
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
            server_name: String::new(),
            min_version: DEFAULT_TLS_MIN_VERSION.to_owned(),
            max_version: DEFAULT_TLS_MAX_VERSION.to_owned(),
            cipher_suites: Vec::new(),
            session_tickets: true,
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

/// Gives each HTTP client section the method that collects its TLS keys, which the sections
/// declare one by one because serde cannot flatten into a struct that denies unknown keys.
macro_rules! tls_options {
    ($($section:ty),+) => {$(
        impl $section {
            /// This section's TLS keys, for [`TlsOptions::parse`].
            pub fn tls_options(&self) -> TlsOptions {
                TlsOptions {
                    server_name: self.server_name.clone(),
                    min_version: self.min_version.clone(),
                    max_version: self.max_version.clone(),
                    cipher_suites: self.cipher_suites.clone(),
                    session_tickets: self.session_tickets,
                }
            }
        }
    )+};
}
tls_options!(ControlPlaneConfig, LocalEndpointConfig, RemoteWriteConfig);

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
    /// The Prometheus exposition (`/metrics`).
    pub prometheus: PrometheusConfig,
    /// Prometheus remote write: a destination beside (or instead of) the control plane.
    pub remote_write: RemoteWriteConfig,
    /// NVIDIA GPUs through NVML.
    pub gpu: GpuConfig,
    /// Application endpoints fetched every cycle, one `app` point each.
    pub apps: Vec<AppConfig>,
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
            prometheus: PrometheusConfig::default(),
            remote_write: RemoteWriteConfig::default(),
            gpu: GpuConfig::default(),
            apps: Vec::new(),
        }
    }
}

/// Default bound of one fetch of an application endpoint (`metrics.apps[].timeout`).
pub const DEFAULT_APP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of `metrics.apps[].max_metrics`: a large service's page, while one point stays
/// well under a megabyte.
pub const DEFAULT_APP_MAX_METRICS: u32 = 10_000;

/// One application endpoint of `metrics.apps`: a URL answering JSON or the Prometheus text
/// format, fetched at every collect cycle.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// The `name` of the endpoint's points (letters, digits, `_`, `-` and `.`; unique).
    pub name: String,
    /// `http` or `https` URL, e.g. `http://127.0.0.1:8080/metrics`.
    pub url: String,
    /// File holding a bearer token sent with each fetch; read again whenever it changes.
    /// Plain `http` with a token only to a loopback address.
    pub token_file: Option<PathBuf>,
    /// PEM file with CA certificates trusted in addition to the system's and Mozilla's roots.
    pub ca_file: Option<PathBuf>,
    /// Bound of one fetch, from connecting to the end of the body; shorter than
    /// `metrics.collect_interval`.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub timeout: Duration,
    /// Most metrics kept from one answer; the rest are counted in the point's `truncated`.
    /// Every one is a key of a point that waits in the queue and goes to the control plane.
    pub max_metrics: u32,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            url: String::new(),
            token_file: None,
            ca_file: None,
            timeout: DEFAULT_APP_TIMEOUT,
            max_metrics: DEFAULT_APP_MAX_METRICS,
        }
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
    /// Most bytes the points held in memory may take; beyond it the oldest are dropped and
    /// counted, as beyond `max_points`. A size like `max_bytes`.
    #[serde(serialize_with = "byte_size_text")]
    pub max_memory_bytes: bytesize::ByteSize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_points: DEFAULT_QUEUE_MAX_POINTS,
            dir: None,
            max_bytes: bytesize::ByteSize::b(DEFAULT_QUEUE_MAX_BYTES),
            max_memory_bytes: bytesize::ByteSize::b(DEFAULT_QUEUE_MAX_MEMORY_BYTES),
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

/// The Prometheus exposition: `/metrics` in the text format, or OpenMetrics when the
/// scraper asks for it. Off unless `listen` is set: the plexd spec sends every point to the
/// control plane, and a port a node opens should be one its operator chose.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrometheusConfig {
    /// `IP:PORT` to serve `/metrics` on, e.g. `0.0.0.0:9103`; empty turns it off. Text, so
    /// that validation can say what is wrong with it.
    pub listen: String,
    /// A file holding the bearer token scrapers must send; without it `/metrics` is open to
    /// whoever reaches the port.
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain to serve HTTPS with (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// Prometheus remote write 1.0 to a receiver: Prometheus
/// (`--web.enable-remote-write-receiver`), Grafana Mimir, Thanos Receive, VictoriaMetrics.
/// Off unless `url` is set.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteWriteConfig {
    /// The receiver's write endpoint, e.g. `https://mimir.example/api/v1/push`; empty turns
    /// remote write off.
    pub url: String,
    /// File holding a bearer token; read again whenever it changes. Not with `username`.
    pub token_file: Option<PathBuf>,
    /// Basic auth user name, with `password_file`.
    pub username: String,
    /// File holding the basic auth password; read again whenever it changes.
    pub password_file: Option<PathBuf>,
    /// Extra request headers, e.g. `X-Scope-OrgID` for a Mimir tenant. Not for secrets
    /// (`token_file` and `password_file` are): a config dump shows them.
    pub headers: BTreeMap<String, String>,
    /// PEM file with CA certificates trusted in addition to the system's and Mozilla's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Accept any server certificate. Only for testing; the agent warns at start.
    pub tls_insecure_skip_verify: bool,
    /// The name the server's certificate must be valid for, instead of the URL's host
    /// (e.g. when the URL names an IP address); empty means the URL's host.
    pub server_name: String,
    /// The oldest TLS version offered: `TLS1.2` or `TLS1.3`.
    pub min_version: String,
    /// The newest TLS version offered: `TLS1.2` or `TLS1.3`.
    pub max_version: String,
    /// The cipher suites offered, by their IANA (and Go) names; empty means rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// Resume TLS sessions; false makes every new connection a full handshake.
    pub session_tickets: bool,
    /// Bound of one request, from connecting to the end of the response.
    #[serde(deserialize_with = "duration", serialize_with = "duration_text")]
    pub timeout: Duration,
    /// Labels added to every series that has no label of that name itself. `node` is added
    /// with the value of `node_id` when `node_id` is set and this map has no `node`.
    pub external_labels: BTreeMap<String, String>,
}

impl Default for RemoteWriteConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            token_file: None,
            username: String::new(),
            password_file: None,
            headers: BTreeMap::new(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_insecure_skip_verify: false,
            server_name: String::new(),
            min_version: DEFAULT_TLS_MIN_VERSION.to_owned(),
            max_version: DEFAULT_TLS_MAX_VERSION.to_owned(),
            cipher_suites: Vec::new(),
            session_tickets: true,
            timeout: DEFAULT_REMOTE_WRITE_TIMEOUT,
            external_labels: BTreeMap::new(),
        }
    }
}

impl RemoteWriteConfig {
    /// Whether points are written to a remote-write receiver.
    pub fn is_configured(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// The external labels the agent writes with: `external_labels`, and `node="<node_id>"`
    /// when `node_id` is set and `external_labels` has no `node`. Sorted by name.
    pub fn labels_for(&self, node_id: &str) -> Vec<(String, String)> {
        let mut labels = self.external_labels.clone();
        let node_id = node_id.trim();
        if !node_id.is_empty() {
            labels
                .entry("node".to_owned())
                .or_insert_with(|| node_id.to_owned());
        }
        labels.into_iter().collect()
    }
}

/// The spec's `LocalEndpointConfig`: an HTTPS endpoint that receives every batch too.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
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
    /// The name the server's certificate must be valid for, instead of the URL's host
    /// (e.g. when the URL names an IP address); empty means the URL's host.
    pub server_name: String,
    /// The oldest TLS version offered: `TLS1.2` or `TLS1.3`.
    pub min_version: String,
    /// The newest TLS version offered: `TLS1.2` or `TLS1.3`.
    pub max_version: String,
    /// The cipher suites offered, by their IANA (and Go) names; empty means rustls' defaults.
    pub cipher_suites: Vec<String>,
    /// Resume TLS sessions; false makes every new connection a full handshake.
    pub session_tickets: bool,
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
            .field("server_name", &self.server_name)
            .field("min_version", &self.min_version)
            .field("max_version", &self.max_version)
            .field("cipher_suites", &self.cipher_suites)
            .field("session_tickets", &self.session_tickets)
            .finish()
    }
}

impl Default for LocalEndpointConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            secret_key: String::new(),
            tls_insecure_skip_verify: false,
            ca_file: None,
            server_name: String::new(),
            min_version: DEFAULT_TLS_MIN_VERSION.to_owned(),
            max_version: DEFAULT_TLS_MAX_VERSION.to_owned(),
            cipher_suites: Vec::new(),
            session_tickets: true,
        }
    }
}

impl LocalEndpointConfig {
    /// Whether a local endpoint is set up.
    pub fn is_configured(&self) -> bool {
        !self.url.is_empty()
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
    /// The sysfs to read, for which block devices are whole disks; `/host/sys` when the
    /// host's is mounted into a container. Unreadable, disks are told by their names.
    pub sys_root: PathBuf,
    /// The block devices whose I/O is reported, as `/proc/diskstats` names them; empty
    /// reports the whole disks but loop and RAM devices.
    pub disk_devices: Vec<String>,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            mount_point: PathBuf::from("/"),
            net_interface: String::new(),
            sys_root: PathBuf::from("/sys"),
            disk_devices: Vec::new(),
        }
    }
}

/// The `gpu` group: NVIDIA GPUs read through NVML. Off by default: most mesh nodes have no
/// GPU, and on those the group would only add a warning.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// Report one `gpu` point per GPU each cycle. Without NVML or without a GPU the agent
    /// warns once at start and runs without the group.
    pub enabled: bool,
    /// Where NVML is; unset: `libnvidia-ml.so.1` on the loader's search path.
    pub library: Option<PathBuf>,
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

/// WireGuard's customary port, the default of `metrics.ebpf.listen_ports`.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;

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

/// `text` with its control characters escaped as Rust writes them (`\n`, `\u{1b}`).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl ConfigError {
    /// Each problem as its own line, for printing one per line. Problems quote what the
    /// user wrote (paths, values), which may hold line breaks or other control characters:
    /// those are escaped, so that one problem stays one line.
    pub fn lines(&self) -> Vec<String> {
        let problems = match self {
            Self::Invalid(problems) | Self::Environment(problems) => problems.clone(),
            other => vec![other.to_string()],
        };
        problems.iter().map(|p| one_line(p)).collect()
    }
}

impl Config {
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
            Some(path) => {
                crate::small_file::read_text_at_most(path, crate::small_file::MAX_CONFIG_BYTES)
                    .map_err(|source| ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    })?
            }
            None => String::new(),
        };
        let overrides = env::overrides(vars)?;
        let parsed = if overrides.is_empty() {
            // Straight from the text, so that errors keep their line and column.
            Self::parse(&text)
        } else {
            env::parse_with_overrides(&text, &overrides)
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
}

/// The parser's message with the path of the key it is about, as the user wrote it.
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
    use super::testing::*;
    use super::*;

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
    fn secret_key_is_redacted_in_debug_output() {
        let cfg =
            Config::parse("metrics: { local_endpoint: { url: 'https://x', secret_key: hunter2 } }")
                .unwrap();
        let dump = format!("{cfg:?}");
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("[redacted]"), "{dump}");
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

    /// The first YAML block of `docs/configuration.md`, which states every key's default.
    fn documented_defaults() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let doc = std::fs::read_to_string(&path).expect("docs/configuration.md");
        let start = doc.find("```yaml\n").expect("a YAML block") + "```yaml\n".len();
        let len = doc[start..].find("```").expect("the end of the YAML block");
        doc[start..start + len].to_owned()
    }

    #[test]
    fn the_documented_block_holds_every_key_with_its_default() {
        let block = documented_defaults();
        let documented = Config::parse(&block)
            .unwrap_or_else(|e| panic!("docs/configuration.md's YAML block: {e}"));
        assert_eq!(
            documented,
            Config::default(),
            "docs/configuration.md's YAML block states other defaults than the code, which \
             are:\n{}",
            serde_yaml_ng::to_string(&Config::default()).unwrap()
        );
        // Parsing fills in a key the block leaves out, so each one is looked for too.
        let written: serde_yaml_ng::Value = serde_yaml_ng::from_str(&block).unwrap();
        for key in Config::env_keys() {
            let found = key
                .path
                .iter()
                .try_fold(&written, |node, segment| node.get(segment.as_str()));
            assert!(
                found.is_some(),
                "docs/configuration.md's YAML block leaves out {}",
                key.path.join(".")
            );
        }
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
