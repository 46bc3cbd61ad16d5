//! Peer names: public key → the name reported as `peer_id`, shared by the tunnel and
//! latency groups so that both name a peer the same way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tracing::{info, warn};

use crate::config::{read_peer_names_file, PeerNames};

/// Public key to name, shared between reads.
pub type Names = Arc<BTreeMap<String, String>>;

/// The peer names in force: the config's map, or the file's, read again when it changed.
pub struct PeerNamer {
    file: Option<PathBuf>,
    /// The file's modification time when it was last read, and the names then in force.
    cached: Mutex<(Option<SystemTime>, Names)>,
}

impl PeerNamer {
    /// Names from the config: a map, or a file read now and again whenever it changes.
    pub fn new(names: PeerNames) -> Self {
        match names {
            PeerNames::Map(map) => Self {
                file: None,
                cached: Mutex::new((None, Arc::new(map))),
            },
            PeerNames::File(path) => {
                let namer = Self {
                    file: Some(path),
                    cached: Mutex::new((None, Arc::new(BTreeMap::new()))),
                };
                namer.current();
                namer
            }
        }
    }

    /// The names in force, reading the file again first if it changed.
    pub fn current(&self) -> Names {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.file else {
            return Arc::clone(&cached.1);
        };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != cached.0 {
            match read_peer_names_file(path) {
                Ok(map) => {
                    info!(component = "metrics", file = %path.display(), peers = map.len(), "peer names loaded");
                    *cached = (modified, Arc::new(map));
                }
                Err(problems) => {
                    // Remember the bad version so that it is reported once, not every cycle.
                    cached.0 = modified;
                    warn!(component = "metrics", error = %problems.join("; "), "peer names file not used; keeping the names loaded before");
                }
            }
        }
        Arc::clone(&cached.1)
    }
}
