//! The deployment files: every Kubernetes manifest validates against the Kubernetes schemas
//! (offline, with `kubernetes-validate`), the kustomization applies all of them, the
//! DaemonSet agrees with the config it mounts, and the systemd unit passes
//! `systemd-analyze verify` and keeps its sandbox. No privileges needed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use plexd_metrics::config::Config;
use plexd_metrics_tests::agent_binary;
use plexd_metrics_tests::control_plane::TempDir;
use plexd_metrics_tests::pod::{deploy_dir, read_yaml, PodSpec, VolumeSource, AGENT_PATH};

/// The oldest Kubernetes release the manifests are for, and the newest whose schemas
/// `kubernetes-validate` ships.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// `kubernetes-validate` from the venv `cargo xtask setup` makes (`cargo xtask test` says
/// where), else from PATH.
fn kubernetes_validate() -> PathBuf {
    let tool = std::env::var_os("PLEXD_METRICS_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("kubernetes-validate"));
    let found = Command::new(&tool).arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{} not found: run `cargo xtask setup` (it installs it into target/tools/venv) or \
         `cargo xtask test`",
        tool.display()
    );
    tool
}

/// The manifests in `deploy/kubernetes`, the kustomization aside.
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    files
}

fn validate(tool: &Path, version: &str, file: &Path) -> (bool, String) {
    let out = Command::new(tool)
        .args(["--strict", "--kubernetes-version", version])
        .arg(file)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It exits 0 for a kind it has no schema for, with a warning: that is no validation.
    (
        out.status.success() && text.contains(" passed for resource "),
        text,
    )
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let tool = kubernetes_validate();
    let files = manifests();
    assert!(files.len() >= 5, "{files:?}");
    for version in KUBERNETES_VERSIONS {
        for file in &files {
            let (ok, text) = validate(&tool, version, file);
            assert!(ok, "{} against {version}: {text}", file.display());
        }
    }
}

#[test]
fn the_validator_rejects_what_the_schemas_forbid() {
    // The check above means something only if a wrong manifest fails it.
    let tool = kubernetes_validate();
    let dir = TempDir::new("k8s-invalid");
    let text = std::fs::read_to_string(deploy_dir().join("kubernetes/daemonset.yaml")).unwrap();
    for (what, broken) in [
        (
            "an unknown field",
            text.replace(
                "hostNetwork: true",
                "hostNetwork: true\n      hostNetworking: true",
            ),
        ),
        (
            "a wrong type",
            text.replace(
                "readOnlyRootFilesystem: true",
                "readOnlyRootFilesystem: yes-please",
            ),
        ),
    ] {
        assert_ne!(broken, text, "{what}: the replacement applied");
        let file = dir.write("daemonset.yaml", &broken);
        let (ok, output) = validate(&tool, KUBERNETES_VERSIONS[1], &file);
        assert!(!ok, "{what} passed: {output}");
    }
}

#[test]
fn the_kustomization_applies_every_manifest_but_the_example_secret() {
    let dir = deploy_dir().join("kubernetes");
    let kustomization = read_yaml(&dir.join("kustomization.yaml")).remove(0);
    assert_eq!(kustomization["kind"], "Kustomization");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file").to_owned())
        .collect();
    let present: BTreeSet<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".example.yaml"))
        .collect();
    assert_eq!(listed, present);
    let namespace = kustomization["namespace"].as_str().expect("namespace");
    for file in manifests() {
        for doc in read_yaml(&file) {
            let ns = match doc["kind"].as_str() {
                Some("Namespace") => &doc["metadata"]["name"],
                _ => &doc["metadata"]["namespace"],
            };
            assert_eq!(ns, namespace, "{}", file.display());
        }
    }
    let image = &kustomization["images"][0]["name"];
    let spec = PodSpec::from_manifests();
    let container_image = spec.container()["image"].as_str().unwrap();
    assert!(
        container_image.starts_with(&format!("{}:", image.as_str().unwrap())),
        "the kustomization pins the DaemonSet's image: {container_image}"
    );
}

/// Where `spec` mounts `source`.
fn mount_of(spec: &PodSpec, source: &VolumeSource) -> plexd_metrics_tests::pod::Mount {
    spec.mounts()
        .into_iter()
        .find(|m| &m.source == source)
        .unwrap_or_else(|| panic!("nothing mounts {source:?}"))
}

#[test]
fn the_daemonset_and_its_config_agree() {
    let spec = PodSpec::from_manifests();
    let files = spec.configmap_files();
    let cfg = Config::parse(&files["config.yaml"]).expect("the ConfigMap's config parses");

    // The agent reads the config where the ConfigMap is mounted.
    let args = spec.args();
    let config_arg = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| args[i + 1].clone())
        .expect("--config");
    let config_mount = mount_of(
        &spec,
        &VolumeSource::ConfigMap("plexd-metrics-config".into()),
    );
    assert_eq!(config_arg, format!("{}/config.yaml", config_mount.path));
    assert_eq!(
        spec.configmap["metadata"]["name"], "plexd-metrics-config",
        "the volume names this ConfigMap"
    );

    // The host's /proc, root and WireGuard sockets, read-only, where the config looks.
    for (host, configured) in [
        ("/proc", cfg.metrics.system.proc_root.clone()),
        ("/", cfg.metrics.system.mount_point.clone()),
        (
            "/var/run/wireguard",
            cfg.metrics.wireguard.socket_dir.clone(),
        ),
    ] {
        let mount = mount_of(&spec, &VolumeSource::HostPath(host.into()));
        assert_eq!(Path::new(&mount.path), configured, "host {host}");
        assert!(mount.read_only, "host {host} is mounted read-only");
    }
    let bpffs = mount_of(&spec, &VolumeSource::HostPath("/sys/fs/bpf".into()));
    assert_eq!(bpffs.path, "/sys/fs/bpf");
    // The durable queue: the node's directory, writable, created by the kubelet, where the
    // config puts the queue (the only writable path besides bpffs).
    let queue = mount_of(
        &spec,
        &VolumeSource::HostPath("/var/lib/plexd-metrics".into()),
    );
    assert!(!queue.read_only && queue.create, "{queue:?}");
    assert_eq!(
        cfg.metrics.queue.dir.as_deref(),
        Some(Path::new(&queue.path))
    );

    // The token comes from the Secret's mount.
    let secret = mount_of(
        &spec,
        &VolumeSource::Secret("plexd-metrics-credentials".into()),
    );
    let token = cfg.control_plane.token_file.expect("token_file");
    assert_eq!(token.parent(), Some(Path::new(&secret.path)));
    let example = read_yaml(&deploy_dir().join("kubernetes/secret.example.yaml")).remove(0);
    assert!(example["stringData"]
        .get(token.file_name().unwrap().to_str().unwrap())
        .is_some());

    // node_id from the node's name.
    let env = spec.container()["env"].as_array().expect("env");
    let node_id = env
        .iter()
        .find(|e| e["name"] == "PLEXD_METRICS_NODE_ID")
        .expect("PLEXD_METRICS_NODE_ID");
    assert_eq!(
        node_id["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );

    // Probes at the port the agent listens on, on every address (hostNetwork).
    // Parsed here rather than validated: the config's files exist only in the pod.
    let listen: SocketAddr = cfg
        .metrics
        .health
        .listen
        .trim()
        .parse()
        .expect("health.listen");
    assert!(listen.ip().is_unspecified(), "{listen}");
    assert_eq!(spec.port("health"), listen.port());
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &spec.container()[probe]["httpGet"];
        assert_eq!(get["path"], path);
        assert_eq!(get["port"], "health");
    }

    // Least privilege.
    let security = &spec.container()["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        spec.capabilities(),
        ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"]
    );
    let pod = spec.pod();
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap()
            > plexd_metrics::manager::DURABLE_SHUTDOWN_FLUSH_TIMEOUT.as_secs(),
        "the flush at shutdown fits in the grace period"
    );
    assert_eq!(
        spec.daemonset["spec"]["updateStrategy"]["type"],
        "RollingUpdate"
    );
    let resources = &spec.container()["resources"];
    for key in ["requests", "limits"] {
        assert!(
            resources[key]["memory"].is_string(),
            "{key}.memory: {resources}"
        );
    }
    assert!(resources["requests"]["cpu"].is_string(), "{resources}");
}

#[test]
fn the_systemd_unit_verifies_and_keeps_its_sandbox() {
    let unit = deploy_dir().join("systemd/plexd-metrics.service");
    let text = std::fs::read_to_string(&unit).expect("the unit");
    assert!(text.contains(&format!("ExecStart={AGENT_PATH} ")), "{text}");
    // `verify` wants ExecStart's program to exist: the copy runs this build's agent.
    let dir = TempDir::new("unit");
    let copy = dir.write(
        "plexd-metrics.service",
        text.replace(AGENT_PATH, agent_binary().to_str().unwrap()),
    );
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze (Debian package systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 on unknown keys and only warns: any output is a finding.
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    // The exposure score of systemd's own audit, which every hardening key lowers.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager", "--threshold=30"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze security");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exposure above 3.0: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in [
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW\n",
        "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW\n",
        "NoNewPrivileges=yes\n",
        "ProtectSystem=strict\n",
        // The durable queue in the service's own state directory, /var/lib/plexd-metrics.
        "StateDirectory=plexd-metrics\n",
        "Environment=PLEXD_METRICS_METRICS_QUEUE_DIR=%S/plexd-metrics\n",
    ] {
        assert!(text.contains(key), "{key}");
    }
    assert!(
        plexd_metrics::config::Config::env_keys()
            .iter()
            .any(|k| k.variable == "PLEXD_METRICS_METRICS_QUEUE_DIR"),
        "the unit's variable names a config key"
    );
}

#[test]
fn the_systemd_check_catches_a_misspelt_key() {
    let text = std::fs::read_to_string(deploy_dir().join("systemd/plexd-metrics.service"))
        .expect("the unit")
        .replace("NoNewPrivileges=", "NoNewPrivilege=")
        .replace(AGENT_PATH, agent_binary().to_str().unwrap());
    let dir = TempDir::new("unit-bad");
    let copy = dir.write("plexd-metrics.service", text);
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Unknown key 'NoNewPrivilege'"), "{said}");
}
