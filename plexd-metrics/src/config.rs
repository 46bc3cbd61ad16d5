//! The agent's configuration: one YAML file, one struct, the spec's defaults and rules.
//!
//! Loading and validation report every problem at once, each on its own line, so that a user
//! fixes a file in one pass. The metrics rules carry the Go agent's exact texts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Shortest collect interval the spec allows.
pub const MIN_COLLECT_INTERVAL: Duration = Duration::from_secs(5);
/// Shortest report interval the spec allows.
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Everything the agent reads from its config file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
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
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlPlaneConfig {
    /// Base URL, e.g. `https://cp.example:8443`; empty means the stdout sink.
    pub url: String,
    /// File holding the bearer token.
    pub token_file: Option<PathBuf>,
}

/// Collection and reporting: the spec's `metrics.Config`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Whether metrics are collected at all.
    pub enabled: bool,
    /// Time between collection cycles (at least 5s).
    #[serde(deserialize_with = "duration")]
    pub collect_interval: Duration,
    /// Time between reports (at least 10s, and not shorter than `collect_interval`).
    #[serde(deserialize_with = "duration")]
    pub report_interval: Duration,
    /// Most points in one report; reaching it triggers a report before the tick.
    /// Signed so that a negative value meets the spec's rule instead of a type error.
    pub batch_size: i64,
    /// Optional second destination for every batch.
    pub local_endpoint: LocalEndpointConfig,
    /// Where the `system` group reads from.
    pub system: SystemConfig,
    /// The kernel programs.
    pub ebpf: EbpfConfig,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            collect_interval: Duration::from_secs(15),
            report_interval: Duration::from_secs(60),
            batch_size: 100,
            local_endpoint: LocalEndpointConfig::default(),
            system: SystemConfig::default(),
            ebpf: EbpfConfig::default(),
        }
    }
}

impl MetricsConfig {
    /// `batch_size` as a count; only meaningful after [`Config::validate`] passed.
    pub fn batch_limit(&self) -> usize {
        usize::try_from(self.batch_size).unwrap_or(1).max(1)
    }
}

/// The spec's `LocalEndpointConfig`: an HTTPS endpoint that receives every batch too.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalEndpointConfig {
    /// HTTPS URL; empty means not configured.
    pub url: String,
    /// Name of the secret holding the endpoint's bearer token.
    pub secret_key: String,
    /// Skip certificate verification for this endpoint only.
    pub tls_insecure_skip_verify: bool,
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
            .finish()
    }
}

/// Where the `system` group reads the host's figures.
#[derive(Clone, Debug, PartialEq, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Deserialize)]
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
    #[serde(deserialize_with = "duration")]
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

/// WireGuard's customary port, the default of `metrics.ebpf.listen_ports`.
pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Upper bound of `metrics.ebpf.max_peers`: keeps a mistyped value from asking the kernel
/// for gigabytes of per-CPU memory.
pub const MAX_PEERS_LIMIT: u32 = 1 << 20;
/// Upper bound of `metrics.ebpf.max_sessions`, for the same reason.
pub const MAX_SESSIONS_LIMIT: u32 = 1 << 22;

/// `metrics.ebpf.attach_mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
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
    /// The values break one or more rules; every broken rule is listed.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl ConfigError {
    /// Each problem as its own line, for printing one per line.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Invalid(problems) => problems.clone(),
            other => vec![other.to_string()],
        }
    }
}

impl Config {
    /// Reads and parses `path`; without a path, every setting takes its default.
    /// Does not validate: call [`Config::validate`].
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses YAML text. An empty document means all defaults.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        // serde_yaml_ng names the key only for some errors; serde_path_to_error names it for
        // all of them (a bad duration inside a nested map included).
        serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text)).map_err(|e| {
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
        })
    }

    /// Checks every rule and returns all broken ones. Paths that the sources need are
    /// checked here too, so that a bad one stops the agent before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if !self.control_plane.url.is_empty() {
            if self.node_id.trim().is_empty() {
                problems
                    .push("config: node_id is required when control_plane.url is set".to_owned());
            }
            if let Err(e) = url::Url::parse(&self.control_plane.url) {
                problems.push(format!(
                    "config: control_plane: invalid URL {:?}: {e}",
                    self.control_plane.url
                ));
            }
        }
        // As in the spec, a disabled pipeline is not validated at all.
        if self.metrics.enabled {
            self.metrics.validate_into(&mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
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
        self.local_endpoint.validate_into(problems);
        self.system.validate_into(problems);
        self.ebpf.validate_into(self.collect_interval, problems);
    }
}

impl EbpfConfig {
    fn validate_into(&self, collect_interval: Duration, problems: &mut Vec<String>) {
        for name in &self.interfaces {
            // IFNAMSIZ is 16 including the terminating NUL.
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
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

    #[test]
    fn the_issue_example_parses() {
        let cfg = Config::parse(
            r#"
node_id: node-1
control_plane:
  url: https://cp.example:8443
  token_file: /etc/plexd/token
metrics:
  enabled: true
  collect_interval: 15s
  report_interval: 1m
  batch_size: 100
  local_endpoint: { url: "", secret_key: "", tls_insecure_skip_verify: false }
  system: { proc_root: /proc, mount_point: /, net_interface: "" }
"#,
        )
        .unwrap();
        assert_eq!(cfg.node_id, "node-1");
        assert_eq!(cfg.metrics.report_interval, Duration::from_secs(60));
        assert_eq!(
            cfg.control_plane.token_file.as_deref(),
            Some(Path::new("/etc/plexd/token"))
        );
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

    #[test]
    fn local_endpoint_rules_have_the_spec_texts() {
        assert_eq!(
            problems("metrics: { local_endpoint: { url: 'not a url', secret_key: k } }"),
            [r#"metrics: config: local_endpoint: invalid URL "not a url""#]
        );
        assert_eq!(
            problems("metrics: { local_endpoint: { url: 'http://metrics.local:9090/ingest', secret_key: k } }"),
            [r#"metrics: config: local_endpoint: URL must be HTTPS, got "http""#]
        );
        assert_eq!(
            problems("metrics: { local_endpoint: { url: 'https://metrics.local:9090/ingest' } }"),
            ["metrics: config: local_endpoint: SecretKey is required when URL is set"]
        );
        assert!(problems(
            "metrics: { local_endpoint: { url: 'https://metrics.local:9090/ingest', secret_key: local-metrics-token } }"
        )
        .is_empty());
        // The zero value means "not configured" and is valid.
        assert!(problems("metrics: { local_endpoint: { url: '', secret_key: '' } }").is_empty());
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
    fn control_plane_needs_a_node_id_and_a_url_that_parses() {
        assert_eq!(
            problems("control_plane: { url: 'https://cp.example' }"),
            ["config: node_id is required when control_plane.url is set"]
        );
        let p = problems("node_id: n1\ncontrol_plane: { url: 'cp.example' }");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with(r#"config: control_plane: invalid URL "cp.example""#),
            "{p:?}"
        );
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
