//! Environment overrides: every config key can be set by a `PLEXD_METRICS_<PATH>` variable,
//! which wins over the file. The variables come from the schema itself, so a new key gets
//! its variable without code here.

use std::ffi::OsString;

use super::{path_error, Config, ConfigError};

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "PLEXD_METRICS_";
/// Variables with [`ENV_PREFIX`] that are command-line flags, not config keys.
pub const CLI_ENV_VARIABLES: [&str; 3] = [
    "PLEXD_METRICS_CONFIG",
    "PLEXD_METRICS_LOG_LEVEL",
    "PLEXD_METRICS_LOG_FORMAT",
];

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
}

/// Parses YAML `text` with `overrides` set over it. A value of the wrong type is an error
/// naming the key and the variable that set it.
pub(super) fn parse_with_overrides(
    text: &str,
    overrides: &[(EnvKey, String)],
) -> Result<Config, String> {
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
        // The error may be inside the value a variable set (`metrics.apps[0]`), not at it.
        let at = e.path().to_string();
        let set_by = overrides
            .iter()
            .find(|(key, _)| {
                let key = key.path.join(".");
                at.strip_prefix(&key)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            })
            .map(|(key, _)| key.variable.clone());
        let message = path_error(e);
        match set_by {
            Some(variable) => format!("{message} (set by {variable})"),
            None => message,
        }
    })
}

/// The `PLEXD_METRICS_*` variables of `vars` that set config keys, with their values.
pub(super) fn overrides<K, V>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;
    use std::time::Duration;

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
}
