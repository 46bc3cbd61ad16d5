//! Validation: every rule of the spec and of this agent, checked at once, and the typed
//! [`Settings`] a config that keeps them all turns into.
//!
//! Paths that the sources need are checked here too, so that a bad one stops the agent
//! before anything starts.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::Duration;

use super::{
    AppConfig, Config, ConfigError, ControlPlaneConfig, EbpfConfig, HealthConfig, LatencyConfig,
    LocalEndpointConfig, MetricsConfig, MetricsSettings, PrometheusConfig, RemoteWriteConfig,
    Settings, SystemConfig, TlsOptions, WireGuardConfig,
};
use crate::secret::NodeSecretKey;

/// Shortest collect interval the spec allows.
pub const MIN_COLLECT_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest report interval the spec allows.
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The smallest `metrics.queue.max_bytes`: room for a few batches of the largest kind.
pub const MIN_QUEUE_MAX_BYTES: u64 = 1024 * 1024;

/// Most ICMP probes per peer and cycle `metrics.latency.probes` accepts.
pub const MAX_LATENCY_PROBES: u32 = 100;

/// Upper bound of `metrics.ebpf.max_peers`: keeps a mistyped value from asking the kernel
/// for gigabytes of per-CPU memory.
pub const MAX_PEERS_LIMIT: u32 = 1 << 20;
/// Upper bound of `metrics.ebpf.max_sessions`, for the same reason.
pub const MAX_SESSIONS_LIMIT: u32 = 1 << 22;

/// A section broke at least one rule; its problems are in the list it was given.
struct Broken;

impl Config {
    /// Checks every rule and returns all broken ones, or the settings the agent runs from.
    /// As in the spec, a disabled pipeline (`metrics.enabled: false`) is not validated at all.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        if self.control_plane.is_configured() {
            if self.node_id.trim().is_empty() {
                problems
                    .push("config: node_id is required when control_plane.url is set".to_owned());
            }
            self.control_plane.validate_into(&mut problems);
        }
        let metrics = self.metrics.enabled.then(|| {
            let metrics = self.metrics.validate_into(&mut problems);
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
            metrics
        });
        match metrics.transpose() {
            Ok(metrics) if problems.is_empty() => Ok(Settings {
                config: self.clone(),
                metrics,
            }),
            _ => Err(ConfigError::Invalid(problems)),
        }
    }
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
            Some(path) => check_secret_file("config: control_plane.token_file", path, problems),
        }
        check_readable(
            "config: control_plane",
            [
                ("ca_file", &self.ca_file),
                ("cert_file", &self.cert_file),
                ("key_file", &self.key_file),
            ],
            problems,
        );
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(
                "config: control_plane: cert_file and key_file must be set together".to_owned(),
            );
        }
        check_tls("config: control_plane", self.tls_options(), problems);
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

/// A file holding a token or password: readable and not blank. `key` prefixes the messages.
fn check_secret_file(key: &str, path: &std::path::Path, problems: &mut Vec<String>) {
    match crate::small_file::read_text_at_most(path, crate::small_file::MAX_SECRET_BYTES) {
        Err(e) => problems.push(format!("{key}: cannot read {}: {e}", path.display())),
        Ok(text) if text.trim().is_empty() => {
            problems.push(format!("{key}: {} is empty", path.display()))
        }
        Ok(_) => {}
    }
}

/// Files a section names (CA, certificate, key) that must be readable; `section` prefixes
/// each key in the messages.
fn check_readable<const N: usize>(
    section: &str,
    files: [(&str, &Option<std::path::PathBuf>); N],
    problems: &mut Vec<String>,
) {
    for (key, file) in files {
        if let Some(path) = file {
            if let Err(e) = std::fs::File::open(path) {
                problems.push(format!(
                    "{section}.{key}: cannot read {}: {e}",
                    path.display()
                ));
            }
        }
    }
}

/// A section's TLS keys (versions, cipher suites, server name); `section` prefixes each key
/// in the messages.
fn check_tls(section: &str, options: TlsOptions, problems: &mut Vec<String>) {
    if let Err(found) = options.parse(section) {
        problems.extend(found);
    }
}

/// Plain http is allowed to this host only: a token in clear text never leaves the machine.
pub(crate) fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

impl MetricsConfig {
    fn validate_into(&self, problems: &mut Vec<String>) -> Result<MetricsSettings, Broken> {
        let before = problems.len();
        if self.collect_interval < MIN_COLLECT_INTERVAL {
            problems.push("metrics: config: CollectInterval must be at least 5s".to_owned());
        }
        if self.report_interval < MIN_REPORT_INTERVAL {
            problems.push("metrics: config: ReportInterval must be at least 10s".to_owned());
        }
        if self.report_interval < self.collect_interval {
            problems.push("metrics: config: ReportInterval must be >= CollectInterval".to_owned());
        }
        let batch_limit = count(self.batch_size);
        if batch_limit.is_none() {
            problems.push("metrics: config: BatchSize must be > 0".to_owned());
        }
        let queue_max_points = count(self.queue.max_points);
        if queue_max_points.is_none() {
            problems.push("metrics: config: queue.max_points must be > 0".to_owned());
        } else if self.batch_size > 0 && self.queue.max_points < self.batch_size {
            // A batch that cannot fit in the queue could never be retried whole.
            problems.push("metrics: config: queue.max_points must be >= BatchSize".to_owned());
        }
        for (key, size) in [
            ("max_bytes", self.queue.max_bytes),
            ("max_memory_bytes", self.queue.max_memory_bytes),
        ] {
            if size.as_u64() < MIN_QUEUE_MAX_BYTES {
                problems.push(format!(
                    "metrics: config: queue.{key} must be at least 1MiB, got {}",
                    size.as_u64()
                ));
            }
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
        let latency_targets = self.latency.validate_into(self.collect_interval, problems);
        let health_listen = self.health.validate_into(problems);
        let prometheus_listen = self.prometheus.validate_into(problems);
        self.remote_write.validate_into(problems);
        if self.wireguard.enabled {
            self.wireguard.validate_into(problems);
        }
        self.ebpf.validate_into(self.collect_interval, problems);
        validate_apps(&self.apps, self.collect_interval, problems);
        match (
            batch_limit,
            queue_max_points,
            health_listen,
            latency_targets,
            prometheus_listen,
        ) {
            (
                Some(batch_limit),
                Some(queue_max_points),
                Ok(health_listen),
                Ok(latency_targets),
                Ok(prometheus_listen),
            ) if problems.len() == before => Ok(MetricsSettings {
                batch_limit,
                queue_max_points,
                health_listen,
                latency_targets,
                prometheus_listen,
            }),
            _ => Err(Broken),
        }
    }
}

/// A count the config writes as a signed number (so that a negative one meets its rule
/// instead of a type error): `None` unless it is positive.
fn count(value: i64) -> Option<NonZeroUsize> {
    if value <= 0 {
        return None;
    }
    // Positive and wider than the platform's counts: as many as there can be.
    NonZeroUsize::new(usize::try_from(value).unwrap_or(usize::MAX))
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
        check_tls(
            "metrics: config: local_endpoint",
            self.tls_options(),
            problems,
        );
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
        for name in &self.disk_devices {
            if !valid_block_device_name(name) {
                problems.push(format!(
                    "metrics: config: system.disk_devices: invalid device name {name:?}; write the names /proc/diskstats lists, such as sda or nvme0n1"
                ));
            }
        }
    }
}

/// A name as the kernel gives a block device in `/proc/diskstats`: one path component (the
/// kernel writes `!` where a driver's name has a `/`), without blanks, which would split
/// the line.
fn valid_block_device_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl HealthConfig {
    /// The address to listen on; `None` when the endpoint is off.
    fn validate_into(&self, problems: &mut Vec<String>) -> Result<Option<SocketAddr>, Broken> {
        if !self.enabled {
            return Ok(None);
        }
        match self.listen.trim().parse() {
            Ok(addr) => Ok(Some(addr)),
            Err(_) => {
                problems.push(format!(
                    "metrics: config: health.listen: invalid address {:?}; write IP:PORT such as \
                     127.0.0.1:9102 (0.0.0.0:9102 to answer probes from other hosts), or set \
                     metrics.health.enabled: false",
                    self.listen
                ));
                Err(Broken)
            }
        }
    }
}

impl PrometheusConfig {
    /// The address to serve `/metrics` on; `None` when the exposition is off.
    fn validate_into(&self, problems: &mut Vec<String>) -> Result<Option<SocketAddr>, Broken> {
        let before = problems.len();
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(
                "metrics: config: prometheus.cert_file and prometheus.key_file go together: set \
                 both to serve /metrics over HTTPS, or neither"
                    .to_owned(),
            );
        }
        let listen = self.listen.trim();
        let addr = if listen.is_empty() {
            let set = [&self.token_file, &self.cert_file, &self.key_file];
            if set.iter().any(|f| f.is_some()) {
                problems.push(
                    "metrics: config: prometheus.token_file, cert_file and key_file need \
                     prometheus.listen (e.g. 0.0.0.0:9103), which turns /metrics on"
                        .to_owned(),
                );
            }
            None
        } else {
            match listen.parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    problems.push(format!(
                        "metrics: config: prometheus.listen: invalid address {:?}; write IP:PORT \
                         such as 0.0.0.0:9103, or leave it empty to turn /metrics off",
                        self.listen
                    ));
                    None
                }
            }
        };
        if problems.len() == before {
            Ok(addr)
        } else {
            Err(Broken)
        }
    }
}

/// Headers `metrics.remote_write.headers` may not set: the agent sets them (the protocol's,
/// the credentials of `token_file` or `username`), or HTTP itself does. Prometheus refuses
/// the same ones in its `remote_write.headers`.
pub const REMOTE_WRITE_RESERVED_HEADERS: [&str; 13] = [
    "authorization",
    "content-type",
    "content-encoding",
    "content-length",
    "x-prometheus-remote-write-version",
    "user-agent",
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "proxy-authenticate",
    "proxy-authorization",
    "www-authenticate",
];

impl RemoteWriteConfig {
    fn validate_into(&self, problems: &mut Vec<String>) {
        const P: &str = "metrics: config: remote_write";
        if !self.is_configured() {
            let set: Vec<&str> = [
                ("token_file", self.token_file.is_some()),
                ("username", !self.username.is_empty()),
                ("password_file", self.password_file.is_some()),
                ("headers", !self.headers.is_empty()),
                ("ca_file", self.ca_file.is_some()),
                ("cert_file", self.cert_file.is_some()),
                ("key_file", self.key_file.is_some()),
                ("external_labels", !self.external_labels.is_empty()),
            ]
            .into_iter()
            .filter_map(|(key, set)| set.then_some(key))
            .collect();
            if !set.is_empty() {
                problems.push(format!(
                    "{P}: {} set without remote_write.url; set the receiver's write URL (e.g. \
                     https://prometheus.example/api/v1/write) or remove them",
                    set.join(", ")
                ));
            }
            return;
        }
        match url::Url::parse(self.url.trim()) {
            Err(e) => problems.push(format!(
                "{P}.url: invalid URL {:?}: {e}; write the receiver's write endpoint, e.g. \
                 https://prometheus.example/api/v1/write",
                self.url
            )),
            Ok(u) => {
                if !u.username().is_empty() || u.password().is_some() {
                    // Never echo the URL here: it carries a credential.
                    problems.push(format!(
                        "{P}.url must not carry credentials; use remote_write.username and \
                         password_file, or token_file"
                    ));
                } else if !matches!(u.scheme(), "http" | "https") {
                    problems.push(format!(
                        "{P}.url must be http or https, got {:?}",
                        u.scheme()
                    ));
                } else if u.host_str().is_none_or(str::is_empty) {
                    problems.push(format!("{P}.url has no host: {:?}", self.url));
                }
            }
        }
        let basic = !self.username.is_empty() || self.password_file.is_some();
        if self.token_file.is_some() && basic {
            problems.push(format!(
                "{P}: token_file (bearer) and username/password_file (basic auth) exclude each \
                 other; keep the one the receiver expects"
            ));
        }
        if self.username.is_empty() != self.password_file.is_none() {
            problems.push(format!(
                "{P}: username and password_file go together (basic auth); set both or neither"
            ));
        }
        for (key, file) in [
            ("token_file", &self.token_file),
            ("password_file", &self.password_file),
        ] {
            if let Some(path) = file {
                check_secret_file(&format!("{P}.{key}"), path, problems);
            }
        }
        check_readable(
            P,
            [
                ("ca_file", &self.ca_file),
                ("cert_file", &self.cert_file),
                ("key_file", &self.key_file),
            ],
            problems,
        );
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(format!(
                "{P}: cert_file and key_file go together (mutual TLS); set both or neither"
            ));
        }
        check_tls(P, self.tls_options(), problems);
        for (name, value) in &self.headers {
            if REMOTE_WRITE_RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                problems.push(format!(
                    "{P}.headers: {name:?} is set by the agent; use token_file or \
                     username/password_file for credentials"
                ));
            } else if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                problems.push(format!("{P}.headers: {name:?} is not an HTTP header name"));
            } else if reqwest::header::HeaderValue::from_str(value).is_err() {
                problems.push(format!(
                    "{P}.headers: the value of {name:?} holds characters an HTTP header cannot carry"
                ));
            }
        }
        if self.timeout.is_zero() {
            problems.push(format!("{P}.timeout must be > 0"));
        }
        if self.external_labels.len() > crate::prometheus::remote_write::MAX_EXTERNAL_LABELS {
            problems.push(format!(
                "{P}.external_labels: {} labels, at most {} are written with each series",
                self.external_labels.len(),
                crate::prometheus::remote_write::MAX_EXTERNAL_LABELS
            ));
        }
        for (name, value) in &self.external_labels {
            if !valid_label_name(name) || name.starts_with("__") {
                problems.push(format!(
                    "{P}.external_labels: {name:?} is not a label name: letters, digits and \
                     _, not starting with a digit or with __"
                ));
            } else if value.is_empty() {
                problems.push(format!(
                    "{P}.external_labels: {name:?} has an empty value, which Prometheus reads \
                     as no label; remove it or give it a value"
                ));
            }
        }
    }
}

/// A Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl LatencyConfig {
    /// The targets with their addresses parsed; `None` when the group is off.
    fn validate_into(
        &self,
        collect_interval: Duration,
        problems: &mut Vec<String>,
    ) -> Result<Option<BTreeMap<String, IpAddr>>, Broken> {
        if !self.enabled {
            return Ok(None);
        }
        let before = problems.len();
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
        let mut targets = BTreeMap::new();
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
                Ok(ip) => {
                    targets.insert(peer.clone(), ip);
                }
                Err(_) => problems.push(format!(
                    "metrics: config: latency: targets: {peer:?}: invalid address {address:?}; \
                     write an IPv4 or IPv6 address such as 10.100.0.2 or fd00::2"
                )),
            }
        }
        if problems.len() == before {
            Ok(Some(targets))
        } else {
            Err(Broken)
        }
    }
}

/// IFNAMSIZ is 16 including the terminating NUL; the kernel also refuses `/` and whitespace.
fn valid_interface_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && !name.contains(['/', ' ', '\t', '\n', ':'])
}

/// Longest `metrics.apps[].name`: it is a label value and a log field.
pub const MAX_APP_NAME: usize = 64;

/// Largest `metrics.apps[].max_metrics`: ten times the default, a point of several MB.
pub const MAX_APP_METRICS: u32 = 100_000;

/// `metrics.apps`: each entry's name (a label value: unique, short, of a safe alphabet), URL,
/// token and CA files and timeout.
fn validate_apps(apps: &[AppConfig], collect_interval: Duration, problems: &mut Vec<String>) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, app) in apps.iter().enumerate() {
        let p = format!("metrics: config: apps[{i}]");
        if app.name.is_empty() {
            problems.push(format!(
                "{p}.name is required: it names the endpoint's points"
            ));
        } else if app.name.len() > MAX_APP_NAME
            || !app
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            problems.push(format!(
                "{p}.name: {:?} is not a name: up to {MAX_APP_NAME} letters, digits, _, - and .",
                app.name
            ));
        } else if !seen.insert(app.name.as_str()) {
            problems.push(format!(
                "{p}.name: {:?} is already the name of another entry; names must be unique",
                app.name
            ));
        }
        match url::Url::parse(app.url.trim()) {
            Err(e) => problems.push(format!(
                "{p}.url: invalid URL {:?}: {e}; write e.g. http://127.0.0.1:8080/metrics",
                app.url
            )),
            Ok(u) => {
                if !u.username().is_empty() || u.password().is_some() {
                    // Never echo the URL here: it carries a credential.
                    problems.push(format!(
                        "{p}.url must not carry credentials; put a bearer token in its token_file"
                    ));
                } else if !matches!(u.scheme(), "http" | "https") {
                    problems.push(format!(
                        "{p}.url must be http or https, got {:?}",
                        u.scheme()
                    ));
                } else if u.host_str().is_none_or(str::is_empty) {
                    problems.push(format!("{p}.url has no host: {:?}", app.url));
                } else if u.scheme() == "http" && app.token_file.is_some() && !is_loopback(&u) {
                    problems.push(format!(
                        "{p}.url: plain http to {:?} would carry the token_file's token in clear \
                         text; use https, or a loopback address",
                        u.host_str().unwrap_or_default()
                    ));
                } else if u.scheme() == "http" && app.ca_file.is_some() {
                    problems.push(format!(
                        "{p}.ca_file is set but the URL is plain http; use https or remove it"
                    ));
                }
            }
        }
        if let Some(path) = &app.token_file {
            check_secret_file(&format!("{p}.token_file"), path, problems);
        }
        check_readable(&p, [("ca_file", &app.ca_file)], problems);
        if app.max_metrics == 0 || app.max_metrics > MAX_APP_METRICS {
            problems.push(format!(
                "{p}.max_metrics must be between 1 and {MAX_APP_METRICS}, got {}",
                app.max_metrics
            ));
        }
        if app.timeout.is_zero() {
            problems.push(format!("{p}.timeout must be > 0"));
        } else if app.timeout >= collect_interval {
            // The next cycle's fetch must not start while this one may still be waiting.
            problems.push(format!(
                "{p}.timeout ({}) must be shorter than CollectInterval ({})",
                humantime::format_duration(app.timeout),
                humantime::format_duration(collect_interval)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;

    #[test]
    fn remote_write_is_off_by_default_and_a_full_example_passes() {
        let rw = Config::default().metrics.remote_write;
        assert!(!rw.is_configured());
        assert_eq!(rw.timeout, Duration::from_secs(30));
        let files = Files::new("rw-ok");
        std::fs::write(files.0.join("ca.pem"), "x").unwrap();
        let cfg = Config::parse(&format!(
            "node_id: n1\nmetrics:\n  remote_write:\n    url: https://mimir.example/api/v1/push\n    \
             username: agent\n    password_file: {}\n    headers: {{ X-Scope-OrgID: tenant-1 }}\n    \
             ca_file: {}\n    timeout: 5s\n    external_labels: {{ cluster: eu-1 }}\n",
            files.path("token"),
            files.path("ca.pem")
        ))
        .unwrap();
        cfg.validate().unwrap();
        let rw = &cfg.metrics.remote_write;
        assert_eq!(rw.timeout, Duration::from_secs(5));
        assert_eq!(
            rw.labels_for(&cfg.node_id),
            [
                ("cluster".to_owned(), "eu-1".to_owned()),
                ("node".to_owned(), "n1".to_owned())
            ]
        );
        // A node label of the user's wins over node_id; no node_id, no node label.
        let mut own = rw.clone();
        own.external_labels.insert("node".into(), "mine".into());
        assert_eq!(
            own.labels_for("n1")[1],
            ("node".to_owned(), "mine".to_owned())
        );
        assert_eq!(rw.labels_for("").len(), 1);
        // Plain http to any host: in-cluster receivers often have no TLS.
        assert!(problems(
            "metrics: { remote_write: { url: 'http://vm.monitoring:8428/api/v1/write' } }"
        )
        .is_empty());
    }

    #[test]
    fn each_client_section_checks_its_tls_keys_under_its_own_name() {
        let files = Files::new("tls-keys");
        let token = files.path("token");
        let nsk = files.path("nsk");
        let bad = "min_version: TLS1.0, max_version: tls13, cipher_suites: [TLS_NOPE], \
                   server_name: 'a b'";
        let found = problems(&format!(
            "node_id: n\ncontrol_plane: {{ url: 'https://cp.example', token_file: {token}, \
             node_secret_key_file: {nsk}, {bad} }}\nmetrics:\n  local_endpoint: {{ url: \
             'https://le.example', secret_key: k, max_version: '1.2', min_version: '1.3' }}\n  \
             remote_write: {{ url: 'https://rw.example', cipher_suites: \
             [TLS_AES_128_GCM_SHA256] }}\n"
        ));
        let expected = [
            "config: control_plane.server_name: \"a b\" is neither a DNS name nor an IP address; write the name the server's certificate carries, e.g. cp.example",
            "config: control_plane.min_version: \"TLS1.0\" (TLS 1.0) is refused: rustls",
            "config: control_plane.cipher_suites: \"TLS_NOPE\" is not a cipher suite rustls implements (its suites are AEADs with forward secrecy); the supported ones are TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, ",
            "metrics: config: local_endpoint: min_version TLS1.3 is newer than max_version TLS1.2; no version is left to offer",
            "metrics: config: remote_write.cipher_suites names no TLS1.2 suite, so TLS1.2 could not be used; add one of TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, ",
        ];
        assert_eq!(found.len(), expected.len(), "{found:#?}");
        for (problem, start) in found.iter().zip(expected) {
            assert!(problem.starts_with(start), "{problem}");
        }
        assert!(found[1].contains("RFC 8996"), "{found:?}");
    }

    #[test]
    fn remote_write_rules_name_the_key_and_what_to_set() {
        let files = Files::new("rw-bad");
        let token = files.path("token");
        let rw = |body: &str| problems(&format!("metrics: {{ remote_write: {{ {body} }} }}"));
        assert_eq!(
            rw(&format!("token_file: {token}, external_labels: {{ a: b }}")),
            ["metrics: config: remote_write: token_file, external_labels set without remote_write.url; set the receiver's write URL (e.g. https://prometheus.example/api/v1/write) or remove them"]
        );
        assert_eq!(
            rw("url: 'ftp://x/'"),
            [r#"metrics: config: remote_write.url must be http or https, got "ftp""#]
        );
        assert!(rw("url: 'not a url'")[0]
            .starts_with(r#"metrics: config: remote_write.url: invalid URL "not a url": "#));
        let p = rw("url: 'https://user:hunter2@x/'");
        assert_eq!(p, ["metrics: config: remote_write.url must not carry credentials; use remote_write.username and password_file, or token_file"]);
        assert!(!p[0].contains("hunter2"));
        assert_eq!(
            rw(&format!("url: 'https://x/', token_file: {token}, username: u, password_file: {token}")),
            ["metrics: config: remote_write: token_file (bearer) and username/password_file (basic auth) exclude each other; keep the one the receiver expects"]
        );
        assert_eq!(
            rw("url: 'https://x/', username: u"),
            ["metrics: config: remote_write: username and password_file go together (basic auth); set both or neither"]
        );
        let p = rw("url: 'https://x/', token_file: /nonexistent/t, cert_file: /nonexistent/c");
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].starts_with(
                "metrics: config: remote_write.token_file: cannot read /nonexistent/t: "
            ),
            "{p:?}"
        );
        assert!(
            p[1].starts_with(
                "metrics: config: remote_write.cert_file: cannot read /nonexistent/c: "
            ),
            "{p:?}"
        );
        assert_eq!(p[2], "metrics: config: remote_write: cert_file and key_file go together (mutual TLS); set both or neither");
        assert_eq!(
            rw("url: 'https://x/', headers: { Authorization: 'Bearer x', 'bad name': v, X-Ok: \"a\\nb\" }, timeout: 0s"),
            [
                r#"metrics: config: remote_write.headers: "Authorization" is set by the agent; use token_file or username/password_file for credentials"#,
                r#"metrics: config: remote_write.headers: the value of "X-Ok" holds characters an HTTP header cannot carry"#,
                r#"metrics: config: remote_write.headers: "bad name" is not an HTTP header name"#,
                "metrics: config: remote_write.timeout must be > 0",
            ]
        );
        assert_eq!(
            rw("url: 'https://x/', external_labels: { 1x: a, __x: b, ok: '' }"),
            [
                r#"metrics: config: remote_write.external_labels: "1x" is not a label name: letters, digits and _, not starting with a digit or with __"#,
                r#"metrics: config: remote_write.external_labels: "__x" is not a label name: letters, digits and _, not starting with a digit or with __"#,
                r#"metrics: config: remote_write.external_labels: "ok" has an empty value, which Prometheus reads as no label; remove it or give it a value"#,
            ]
        );
        // Content-Type and Content-Encoding are the protocol's, in any spelling.
        assert_eq!(
            rw("url: 'https://x/', headers: { content-type: a, CONTENT-ENCODING: b }").len(),
            2
        );
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
    fn disk_device_names_are_checked() {
        assert!(
            problems("metrics: { system: { disk_devices: [sda, nvme0n1, 'cciss!c0d0'] } }")
                .is_empty()
        );
        assert_eq!(
            problems("metrics: { system: { disk_devices: ['', 'sda 1', ../sda] } }"),
            [
                r#"metrics: config: system.disk_devices: invalid device name ""; write the names /proc/diskstats lists, such as sda or nvme0n1"#,
                r#"metrics: config: system.disk_devices: invalid device name "sda 1"; write the names /proc/diskstats lists, such as sda or nvme0n1"#,
                r#"metrics: config: system.disk_devices: invalid device name "../sda"; write the names /proc/diskstats lists, such as sda or nvme0n1"#,
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
    fn apps_parse_with_a_default_timeout_and_their_rules_name_the_entry() {
        let files = Files::new("apps");
        let token = files.path("token");
        let cfg = Config::parse(&format!(
            "metrics:\n  apps:\n    - {{ name: api, url: 'http://127.0.0.1:8080/metrics', token_file: {token} }}\n    - {{ name: db.primary-1, url: 'https://db.example/stats', timeout: 2s }}\n"
        ))
        .unwrap();
        let apps = &cfg.metrics.apps;
        assert_eq!(apps.len(), 2);
        assert_eq!(apps[0].timeout, crate::config::DEFAULT_APP_TIMEOUT);
        assert_eq!(apps[1].timeout, Duration::from_secs(2));
        cfg.validate().unwrap();

        let yaml = format!(
            r#"
metrics:
  apps:
    - {{ name: "", url: "http://127.0.0.1/m" }}
    - {{ name: "has space", url: "ftp://x/m" }}
    - {{ name: a, url: "not a url" }}
    - {{ name: a, url: "http://app.example/m", token_file: {token} }}
    - {{ name: b, url: "https://user:pw@app.example/m" }}
    - {{ name: c, url: "http://app.example/m", ca_file: /nonexistent/ca.pem, timeout: 0s }}
    - {{ name: d, url: "http://localhost:9/m", token_file: {token}, timeout: 15s }}
    - {{ name: e, url: "http://localhost:9/m", max_metrics: 0 }}
"#
        );
        assert_eq!(
            problems(&yaml),
            [
                "metrics: config: apps[0].name is required: it names the endpoint's points",
                "metrics: config: apps[1].name: \"has space\" is not a name: up to 64 letters, digits, _, - and .",
                "metrics: config: apps[1].url must be http or https, got \"ftp\"",
                "metrics: config: apps[2].url: invalid URL \"not a url\": relative URL without a base; write e.g. http://127.0.0.1:8080/metrics",
                "metrics: config: apps[3].name: \"a\" is already the name of another entry; names must be unique",
                "metrics: config: apps[3].url: plain http to \"app.example\" would carry the token_file's token in clear text; use https, or a loopback address",
                "metrics: config: apps[4].url must not carry credentials; put a bearer token in its token_file",
                "metrics: config: apps[5].ca_file is set but the URL is plain http; use https or remove it",
                "metrics: config: apps[5].ca_file: cannot read /nonexistent/ca.pem: No such file or directory (os error 2)",
                "metrics: config: apps[5].timeout must be > 0",
                "metrics: config: apps[6].timeout (15s) must be shorter than CollectInterval (15s)",
                "metrics: config: apps[7].max_metrics must be between 1 and 100000, got 0",
            ]
        );
        // Plain http without a token goes anywhere: nothing secret travels.
        assert!(problems(
            "metrics: { apps: [ { name: x, url: 'http://10.0.0.7:9100/metrics' } ] }"
        )
        .is_empty());
        // Nothing is checked with metrics off.
        assert!(problems("metrics: { enabled: false, apps: [ { name: '' } ] }").is_empty());
        let e =
            Config::parse("metrics: { apps: [ { name: a, url: x, timout: 1s } ] }").unwrap_err();
        assert!(
            e.contains("metrics.apps[0]") && e.contains("unknown field `timout`"),
            "{e}"
        );
    }

    #[test]
    fn apps_come_from_the_environment_as_one_yaml_flow_list() {
        let cfg = with_env(
            Some("metrics: { apps: [ { name: old, url: 'http://127.0.0.1/m' } ] }\n"),
            &[(
                "PLEXD_METRICS_METRICS_APPS",
                "[{name: api, url: 'http://127.0.0.1:8080/metrics', timeout: 2s}, {name: b, url: 'https://b.example/s'}]",
            )],
        )
        .unwrap();
        let names: Vec<&str> = cfg.metrics.apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["api", "b"], "the variable replaces the file's list");
        assert_eq!(cfg.metrics.apps[0].timeout, Duration::from_secs(2));
        // Anything else is an error naming the key and the variable, not a panic.
        for bad in ["api", "api,http://x", "[oops", "{name: a}"] {
            let e = with_env(None, &[("PLEXD_METRICS_METRICS_APPS", bad)]).unwrap_err();
            let text = e.to_string();
            assert!(text.contains("metrics.apps"), "{bad}: {text}");
            assert!(
                text.ends_with("(set by PLEXD_METRICS_METRICS_APPS)"),
                "{bad}: {text}"
            );
        }
        let e = with_env(None, &[("PLEXD_METRICS_METRICS_APPS_0_URL", "http://x")]).unwrap_err();
        assert!(e.to_string().contains("names no config key"), "{e}");
    }
}
