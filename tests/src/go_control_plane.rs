//! A control plane written in Go (`tests/go/controlplane/main.go`): the spec's Go types and
//! Go's standard library decode what the agent sends, and Go's AES-256-GCM encrypts the
//! local endpoint's secret. The independent judge of the wire contract: a Rust decoder
//! would share the agent's assumptions.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::Deserialize;

use crate::NetNs;

/// What the Go server said about one request.
#[derive(Clone, Debug, Deserialize)]
pub struct GoReport {
    /// `control_plane`, `secret` or `local_endpoint`.
    pub kind: String,
    /// The request's path.
    pub path: String,
    /// Points in the batch.
    pub points: usize,
    /// Points per group.
    pub groups: std::collections::BTreeMap<String, usize>,
    /// Everything Go could not take as the spec's types say, one line each.
    pub problems: Vec<String>,
}

/// The secrets and names the Go server is started with.
pub struct GoSecrets<'a> {
    /// The agent's `node_id`.
    pub node_id: &'a str,
    /// The bearer token of `control_plane.token_file`.
    pub token: &'a str,
    /// The node secret key.
    pub node_key: [u8; 32],
    /// `metrics.local_endpoint.secret_key`.
    pub secret_name: &'a str,
    /// The local endpoint's token, which the server hands out encrypted.
    pub secret: &'a str,
    /// The basic auth remote write must send at `/api/v1/write`: user and password.
    pub remote_write: (&'a str, &'a str),
}

/// The Go server, running in a network namespace until dropped.
pub struct GoControlPlane {
    child: Child,
    reports: mpsc::Receiver<String>,
    /// The control plane's address (plain HTTP, loopback).
    pub control_plane: SocketAddr,
    /// The local endpoint's address (HTTPS with the certificate it was given).
    pub local_endpoint: SocketAddr,
}

/// Builds the Go program (Debian's `golang-go`, installed by `cargo xtask setup`) and
/// returns the binary. Go's build cache lives under the workspace's `target`.
pub fn build() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../target"));
    let out = target.join("go/plexd-test-control-plane");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg("main.go")
        .current_dir(root.join("go/controlplane"))
        .env("GOCACHE", target.join("go/cache"))
        .env("GOPATH", target.join("go/path"))
        .env("GO111MODULE", "off")
        .output()
        .expect("run `go build` (Debian's golang-go; `cargo xtask setup` installs it)");
    assert!(
        built.status.success(),
        "go build failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    out
}

impl GoControlPlane {
    /// Starts the server in `ns` with `secrets`, its local endpoint serving `cert`/`key`.
    pub fn start(ns: &NetNs, secrets: &GoSecrets<'_>, cert: &Path, key: &Path) -> Self {
        let binary = build();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(&binary)
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .args(["-node", secrets.node_id, "-token", secrets.token])
            .args(["-node-key", &hex::encode(secrets.node_key)])
            .args([
                "-secret-name",
                secrets.secret_name,
                "-secret",
                secrets.secret,
            ])
            .args(["-write-user", secrets.remote_write.0])
            .args(["-write-password", secrets.remote_write.1])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Go control plane");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, reports) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = reports
            .recv_timeout(Duration::from_secs(30))
            .expect("the Go control plane says where it listens within 30 s");
        let addresses: serde_json::Value =
            serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first:?}: {e}"));
        let addr = |name: &str| {
            addresses[name]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("{first}"))
        };
        Self {
            control_plane: addr("control_plane"),
            local_endpoint: addr("local_endpoint"),
            child,
            reports,
        }
    }

    /// The next request's report, within `deadline`.
    pub fn next(&self, deadline: Duration) -> GoReport {
        let line = self.reports.recv_timeout(deadline).unwrap_or_else(|e| {
            panic!("no request reached the Go control plane within {deadline:?}: {e}")
        });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

impl Drop for GoControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
