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

/// The prometheus-scrape component's directory.
fn scrape_component() -> PathBuf {
    deploy_dir().join("kubernetes/components/prometheus-scrape")
}

/// A strategic merge patch as kustomize applies it, for what the component's patch holds:
/// maps merge key by key, and lists of named entries (containers, env) merge by `name`,
/// container ports by `containerPort`; anything else replaces.
fn strategic_merge(base: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                match base.get_mut(key) {
                    Some(existing) => strategic_merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(base), Value::Array(patch)) => {
            for item in patch {
                let key = ["name", "containerPort"]
                    .into_iter()
                    .find(|k| item.get(k).is_some())
                    .expect("a list entry with a merge key");
                match base.iter_mut().find(|b| b.get(key) == item.get(key)) {
                    Some(existing) => strategic_merge(existing, item),
                    None => base.insert(0, item.clone()),
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

#[test]
fn the_prometheus_scrape_component_patches_the_daemonset_into_a_valid_one() {
    let dir = scrape_component();
    let kustomization = read_yaml(&dir.join("kustomization.yaml")).remove(0);
    assert_eq!(kustomization["kind"], "Component");
    assert_eq!(
        kustomization["apiVersion"],
        "kustomize.config.k8s.io/v1alpha1"
    );
    let listed: BTreeSet<String> = kustomization["patches"]
        .as_array()
        .expect("patches")
        .iter()
        .map(|p| p["path"].as_str().expect("a patch file").to_owned())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("the component")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, present,
        "every file of the component is a listed patch"
    );

    // Apply each patch to the base resource it names, then validate what comes out.
    let tool = kubernetes_validate();
    let spec = PodSpec::from_manifests();
    let mut daemonset = spec.daemonset.clone();
    for file in &listed {
        let patch = read_yaml(&dir.join(file)).remove(0);
        assert_eq!(patch["kind"], "DaemonSet", "{file}");
        assert_eq!(patch["metadata"]["name"], daemonset["metadata"]["name"]);
        assert_eq!(
            patch["metadata"]["namespace"],
            daemonset["metadata"]["namespace"]
        );
        strategic_merge(&mut daemonset, &patch);
    }
    // The YAML 1.2 reader keeps the base's octal `defaultMode: 0400` as the text "0400";
    // Kubernetes reads YAML 1.1, where it is the number 256.
    for volume in daemonset["spec"]["template"]["spec"]["volumes"]
        .as_array_mut()
        .expect("volumes")
    {
        if let Some(secret) = volume.get_mut("secret") {
            if let Some(mode) = secret["defaultMode"].as_str() {
                let mode = u64::from_str_radix(mode, 8).expect("an octal mode");
                secret["defaultMode"] = mode.into();
            }
        }
    }
    let temp = TempDir::new("k8s-scrape");
    let patched = temp.write(
        "daemonset.yaml",
        serde_yaml_ng::to_string(&daemonset).expect("YAML"),
    );
    for version in KUBERNETES_VERSIONS {
        let (ok, text) = validate(&tool, version, &patched);
        assert!(ok, "the patched DaemonSet against {version}: {text}");
    }

    // The annotations the scrape job keeps, the port they name, and the agent listening there.
    let annotations = &daemonset["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let ports = container["ports"].as_array().expect("ports");
    let metrics = ports
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    let port = metrics["containerPort"].as_u64().expect("containerPort");
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert!(
        ports.iter().any(|p| p["name"] == "health"),
        "the base's port stays"
    );
    let env = container["env"].as_array().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "PLEXD_METRICS_NODE_ID"),
        "the base's environment stays"
    );
    // metrics.prometheus.listen, by its variable (the ConfigMap embeds the config as one
    // string, which a patch could only replace whole).
    let path = ["metrics", "prometheus", "listen"];
    let variable = format!(
        "{}{}",
        plexd_metrics::config::ENV_PREFIX,
        path.join("_").to_uppercase()
    );
    let listen = env
        .iter()
        .find(|e| e["name"] == variable.as_str())
        .unwrap_or_else(|| panic!("{variable} in {env:?}"));
    let listen: SocketAddr = listen["value"]
        .as_str()
        .expect("a value")
        .parse()
        .expect("a socket address");
    assert!(listen.ip().is_unspecified(), "{listen}");
    assert_eq!(u64::from(listen.port()), port);
    // The variable sets a key of the agent's config.
    assert!(
        Config::env_keys().iter().any(|k| k.variable == variable),
        "{variable} sets no config key"
    );
}
