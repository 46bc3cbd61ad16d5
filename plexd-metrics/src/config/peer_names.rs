//! `metrics.wireguard.peer_names`: names to report instead of public keys, in the config or
//! in a file of their own, and the rules they keep.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    let limit = crate::small_file::MAX_CONFIG_BYTES;
    let text = crate::small_file::read_text_at_most(path, limit).map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::*;
    use crate::config::Config;

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
}
