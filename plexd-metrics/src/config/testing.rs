//! What the config's tests share: files to point keys at, and the ways to load a config.

use std::path::PathBuf;

use super::{Config, ConfigError};

/// The problems validation finds in `yaml`, one a line; none when it passes.
pub(super) fn problems(yaml: &str) -> Vec<String> {
    let cfg = Config::parse(yaml).expect("parses");
    match cfg.validate() {
        Ok(_) => vec![],
        Err(e) => e.lines(),
    }
}

/// A temporary directory with a token file, removed on drop.
pub(super) struct Files(pub(super) PathBuf);
impl Files {
    pub(super) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("plexd-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "t0k3n\n").unwrap();
        std::fs::write(dir.join("nsk"), format!("{}\n", "ab".repeat(32))).unwrap();
        Self(dir)
    }
    pub(super) fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loads `yaml` (from a file, when given) with `vars` as the environment.
pub(super) fn with_env(yaml: Option<&str>, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
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

/// Two WireGuard public keys.
pub(super) const KEY: &str = "WEAuaVuhdyscyTCXVfBDJR6nf9zxD75jmJzq6OeitcA=";
pub(super) const OTHER_KEY: &str = "Zi4U/VlFVvUiYEcDNANRJYkDtk81VTdj8ZQmqypRXFg=";
