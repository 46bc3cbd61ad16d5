//! The DaemonSet's pod, simulated on this machine from the manifests themselves.
//!
//! [`PodSpec`] reads `deploy/kubernetes/daemonset.yaml` and `configmap.yaml`; [`SimulatedPod`]
//! then runs the agent binary the way a container runtime would run that pod:
//!
//! - a root filesystem holding only the agent and the shared libraries it loads (what the
//!   container image holds), mounted read-only;
//! - the pod's volumes at their `mountPath`s: the host's `/proc`, `/`, `/sys/fs/bpf` and
//!   WireGuard socket directory, the ConfigMap's files and the Secret's files, read-only
//!   where the manifest says so;
//! - uid 0 with exactly the capabilities the manifest adds (bounding, permitted and effective
//!   set; nothing inheritable or ambient) and `no_new_privs`;
//! - the network namespace of the node it runs on (`hostNetwork: true`), and the
//!   environment the manifest sets, `fieldRef`s resolved.
//!
//! The mounts live in a private mount namespace (`unshare --mount`) that ends with the agent,
//! so nothing is mounted on the host. `setpriv` (util-linux) drops the capabilities; it is
//! copied into the root filesystem with its libraries because the drop has to happen after
//! the `chroot`, which itself needs a capability the pod does not have.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::control_plane::TempDir;
use crate::NetNs;

/// Where the image keeps the agent (and the Containerfile puts it).
pub const AGENT_PATH: &str = "/usr/local/bin/plexd-metrics";
const SETPRIV: &str = "/usr/bin/setpriv";

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .join("deploy")
}

/// Reads a YAML file as JSON values, one per document.
pub fn read_yaml(path: &Path) -> Vec<Value> {
    use serde::Deserialize;
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
        })
        .collect()
}

/// One `volumeMounts` entry with the volume it mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The volume's name.
    pub name: String,
    /// Where the container sees it.
    pub path: String,
    /// `readOnly: true`.
    pub read_only: bool,
    /// A host path of `type: DirectoryOrCreate`.
    pub create: bool,
    /// What is mounted there.
    pub source: VolumeSource,
}

/// The kinds of volume the DaemonSet uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSource {
    /// A directory of the node.
    HostPath(String),
    /// The files of a ConfigMap.
    ConfigMap(String),
    /// The files of a Secret.
    Secret(String),
}

/// The agent container of the DaemonSet and the ConfigMap it mounts.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// The DaemonSet document.
    pub daemonset: Value,
    /// The ConfigMap document.
    pub configmap: Value,
}

impl PodSpec {
    /// Reads `deploy/kubernetes/daemonset.yaml` and `configmap.yaml`.
    pub fn from_manifests() -> Self {
        let dir = deploy_dir().join("kubernetes");
        let one = |name: &str| {
            let mut docs = read_yaml(&dir.join(name));
            assert_eq!(docs.len(), 1, "{name} holds one document");
            docs.remove(0)
        };
        Self {
            daemonset: one("daemonset.yaml"),
            configmap: one("configmap.yaml"),
        }
    }

    /// The pod template's spec.
    pub fn pod(&self) -> &Value {
        &self.daemonset["spec"]["template"]["spec"]
    }

    /// The agent's container (the pod's only one).
    pub fn container(&self) -> &Value {
        let containers = self.pod()["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 1, "the pod runs the agent alone");
        &containers[0]
    }

    /// The capabilities the container adds, as the manifest spells them (`BPF`, ...).
    pub fn capabilities(&self) -> Vec<String> {
        strings(&self.container()["securityContext"]["capabilities"]["add"])
    }

    /// The container's arguments.
    pub fn args(&self) -> Vec<String> {
        strings(&self.container()["args"])
    }

    /// The environment, with `fieldRef`s resolved from `fields` (e.g. `spec.nodeName`).
    pub fn env(&self, fields: &BTreeMap<&str, &str>) -> Vec<(String, String)> {
        self.container()["env"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let name = e["name"].as_str().expect("env name").to_owned();
                let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                    (Value::String(v), _) => v.clone(),
                    (_, Value::String(field)) => fields
                        .get(field.as_str())
                        .unwrap_or_else(|| panic!("no value for the field {field}"))
                        .to_string(),
                    _ => panic!("env {name}: only value and fieldRef are simulated"),
                };
                (name, value)
            })
            .collect()
    }

    /// The container's mounts, each with its volume.
    pub fn mounts(&self) -> Vec<Mount> {
        let volumes = self.pod()["volumes"].as_array().expect("volumes");
        self.container()["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .map(|m| {
                let name = m["name"].as_str().expect("mount name").to_owned();
                let volume = volumes
                    .iter()
                    .find(|v| v["name"] == name.as_str())
                    .unwrap_or_else(|| panic!("no volume {name}"));
                let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
                    VolumeSource::HostPath(path.to_owned())
                } else if let Some(cm) = volume["configMap"]["name"].as_str() {
                    VolumeSource::ConfigMap(cm.to_owned())
                } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
                    VolumeSource::Secret(secret.to_owned())
                } else {
                    panic!("volume {name}: only hostPath, configMap and secret are simulated")
                };
                Mount {
                    name,
                    path: m["mountPath"].as_str().expect("mountPath").to_owned(),
                    read_only: m["readOnly"].as_bool().unwrap_or(false),
                    create: volume["hostPath"]["type"] == "DirectoryOrCreate",
                    source,
                }
            })
            .collect()
    }

    /// The ConfigMap's files.
    pub fn configmap_files(&self) -> BTreeMap<String, String> {
        self.configmap["data"]
            .as_object()
            .expect("ConfigMap data")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("text data").to_owned()))
            .collect()
    }

    /// The container port named `name`.
    pub fn port(&self, name: &str) -> u16 {
        self.container()["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no port named {name}")) as u16
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// A root filesystem with the agent, and the pod's volumes beside it, ready to run.
pub struct SimulatedPod {
    spec: PodSpec,
    // Taken (and leaked) by `drop` when it is not safe to remove.
    dir: Option<TempDir>,
}

impl SimulatedPod {
    /// Builds the root filesystem around `agent` and writes the ConfigMap's files and
    /// `secret_files` where the volumes will find them.
    pub fn new(spec: PodSpec, agent: &Path, secret_files: &[(&str, &[u8])]) -> io::Result<Self> {
        let dir = TempDir::new("pod");
        let rootfs = dir.path().join("rootfs");
        install(agent, &rootfs.join(AGENT_PATH.trim_start_matches('/')))?;
        install(
            Path::new(SETPRIV),
            &rootfs.join(SETPRIV.trim_start_matches('/')),
        )?;
        for lib in shared_libraries(&[agent, Path::new(SETPRIV)])? {
            install(&lib, &rootfs.join(lib.strip_prefix("/").unwrap_or(&lib)))?;
        }
        // What a runtime mounts into every container, and the pod's mount points.
        for point in ["proc", "sys", "dev"] {
            std::fs::create_dir_all(rootfs.join(point))?;
        }
        for mount in spec.mounts() {
            std::fs::create_dir_all(rootfs.join(mount.path.trim_start_matches('/')))?;
            match &mount.source {
                VolumeSource::ConfigMap(_) => {
                    let files = dir.path().join("volumes").join(&mount.name);
                    std::fs::create_dir_all(&files)?;
                    for (name, text) in spec.configmap_files() {
                        std::fs::write(files.join(name), text)?;
                    }
                }
                VolumeSource::Secret(_) => {
                    let files = dir.path().join("volumes").join(&mount.name);
                    std::fs::create_dir_all(&files)?;
                    for (name, bytes) in secret_files {
                        let path = files.join(name);
                        std::fs::write(&path, bytes)?;
                        // The manifest's defaultMode.
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))?;
                    }
                }
                VolumeSource::HostPath(_) => {}
            }
        }
        Ok(Self {
            spec,
            dir: Some(dir),
        })
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }

    /// Where this pod keeps the node's writable `DirectoryOrCreate` host path `path` (on
    /// the host).
    pub fn host_state(&self, path: &str) -> PathBuf {
        self.dir().join("host").join(path.trim_start_matches('/'))
    }

    /// The root filesystem's directory (on the host).
    pub fn rootfs(&self) -> PathBuf {
        self.dir().join("rootfs")
    }

    /// The command that runs the pod's agent in `ns` with `capabilities` (manifest spelling)
    /// and `env`, with `args` after the manifest's arguments. stdout and stderr are piped.
    pub fn command(
        &self,
        ns: &NetNs,
        capabilities: &[String],
        env: &[(String, String)],
        args: &[&str],
    ) -> Command {
        let root = self.rootfs();
        let root = root.to_str().expect("UTF-8 temp path");
        let mut script = vec![
            // The root is a mount of its own, so that it can be made read-only alone.
            format!("mount --bind {root} {root}"),
            format!("mount --rbind /proc {root}/proc"),
            format!("mount --rbind /sys {root}/sys"),
            format!("mount -o remount,bind,ro {root}/sys"),
            format!("mount -t tmpfs -o mode=0755,nosuid tmpfs {root}/dev"),
        ];
        for dev in ["null", "zero", "random", "urandom"] {
            script.push(format!(
                "touch {root}/dev/{dev} && mount --bind /dev/{dev} {root}/dev/{dev}"
            ));
        }
        for mount in self.spec.mounts() {
            let source = match &mount.source {
                // The node's state (the durable queue): a directory of this pod's own, so
                // that a test never writes into the real host's /var/lib, and two tests'
                // agents do not share one queue.
                VolumeSource::HostPath(path) if !mount.read_only && mount.create => {
                    let dir = self.host_state(path);
                    script.push(format!("mkdir -p {}", dir.display()));
                    dir.to_str().expect("UTF-8 temp path").to_owned()
                }
                VolumeSource::HostPath(path) => {
                    // DirectoryOrCreate, as the kubelet would.
                    script.push(format!("mkdir -p {path}"));
                    path.clone()
                }
                VolumeSource::ConfigMap(_) | VolumeSource::Secret(_) => {
                    let files = self.dir().join("volumes").join(&mount.name);
                    files.to_str().expect("UTF-8 temp path").to_owned()
                }
            };
            let target = format!("{root}{}", mount.path);
            script.push(format!("mount --bind {source} {target}"));
            if mount.read_only {
                script.push(format!("mount -o remount,bind,ro {target}"));
            }
        }
        script.push(format!("mount -o remount,bind,ro {root}"));
        let bounding = std::iter::once("-all".to_owned())
            .chain(
                capabilities
                    .iter()
                    .map(|c| format!("+{}", c.to_lowercase())),
            )
            .collect::<Vec<_>>()
            .join(",");
        script.push(format!(
            "exec nsenter --net={} -- chroot {root} {SETPRIV} --bounding-set {bounding} \
             --inh-caps -all --ambient-caps -all --no-new-privs -- {AGENT_PATH} \"$@\"",
            ns.path().display()
        ));

        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-euc"])
            .arg(script.join("\n"))
            .arg("pod")
            .args(self.spec.args())
            .args(args)
            // A container starts with the image's environment and the pod's, nothing else.
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

impl Drop for SimulatedPod {
    fn drop(&mut self) {
        // The mounts were private to the agent's mount namespace, so the mount points are
        // plain empty directories here; a non-empty one means something is mounted after
        // all (the host's root!), and then nothing may be removed.
        let rootfs = self.rootfs();
        for mount in self.spec.mounts() {
            let point = rootfs.join(mount.path.trim_start_matches('/'));
            let has_entries = std::fs::read_dir(&point).is_ok_and(|mut d| d.next().is_some());
            if has_entries {
                eprintln!(
                    "warning: {} is not empty; leaving {} in place",
                    point.display(),
                    self.dir().display()
                );
                std::mem::forget(self.dir.take());
                return;
            }
        }
    }
}

/// Copies `from` to `to`, creating directories, keeping the mode.
fn install(from: &Path, to: &Path) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("copy {}: {e}", from.display())))
}

/// The shared libraries `binaries` load, as `ldd` resolves them (the dynamic loader
/// included).
pub fn shared_libraries(binaries: &[&Path]) -> io::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for binary in binaries {
        let out = Command::new("ldd").arg(binary).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "ldd {}: {}",
                binary.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux... (0x...)";
        // the vDSO has no path.
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = line
                .split("=>")
                .last()
                .and_then(|s| s.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(path) = path {
                let path = PathBuf::from(path);
                if !libs.contains(&path) {
                    libs.push(path);
                }
            }
        }
    }
    Ok(libs)
}
