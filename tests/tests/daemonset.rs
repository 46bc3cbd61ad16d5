//! The agent binary under the exact constraints of `deploy/kubernetes/daemonset.yaml`, on a
//! wireguard-go mesh node: the manifest's capabilities and nothing else, a read-only root
//! filesystem holding only the agent and its libraries, the host's /proc at /host/proc, the
//! ConfigMap's config, the Secret's token, the node's network. See `plexd_metrics_tests::pod`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Child;
use std::sync::mpsc;
use std::time::Duration;

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::control_plane::TestControlPlane;
use plexd_metrics_tests::mesh::Mesh;
use plexd_metrics_tests::pod::{PodSpec, SimulatedPod};
use plexd_metrics_tests::{agent_binary, health_probe, ours, require_privileges, tc_state, NetNs};
use serde_json::Value;

/// Bound on waiting for one log line or one report (the report interval is 10 s here).
const DEADLINE: Duration = Duration::from_secs(40);
const TOKEN: &str = "pod-token-1";
const NODE_NAME: &str = "sim-node-1";

/// What the agent wrote to stderr: JSON log events, or plain text from the steps before it
/// (mount, chroot, setpriv), which a failing setup prints.
#[derive(Debug)]
enum Line {
    Event(Value),
    // Only ever printed, in a failure's message.
    #[allow(dead_code)]
    Text(String),
}

struct RunningPod {
    child: Child,
    lines: mpsc::Receiver<Line>,
    seen: Vec<Line>,
}

impl RunningPod {
    fn start(mut cmd: std::process::Command) -> Self {
        let mut child = cmd.spawn().expect("start the pod");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let parsed = serde_json::from_str(&line).map_or(Line::Text(line), Line::Event);
                if tx.send(parsed).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next log event whose message is `message`.
    fn wait_for(&mut self, message: &str) -> Value {
        loop {
            let line = self.lines.recv_timeout(DEADLINE).unwrap_or_else(|e| {
                panic!(
                    "no {message:?} from the agent ({e}); so far: {:#?}",
                    self.seen
                )
            });
            let found = matches!(&line, Line::Event(e) if e["message"] == message);
            let event = match &line {
                Line::Event(e) => e.clone(),
                Line::Text(_) => Value::Null,
            };
            self.seen.push(line);
            if found {
                return event;
            }
        }
    }

    /// Checks, from the kernel's view of the running agent, that it has exactly
    /// `capabilities` and sees a read-only root and a read-only /host/proc.
    fn assert_confined(&self, capabilities: &[String]) {
        // unshare, sh, nsenter, chroot and setpriv each exec the next: the agent kept the pid.
        let proc = std::path::PathBuf::from(format!("/proc/{}", self.child.id()));
        let status = std::fs::read_to_string(proc.join("status")).expect("status");
        assert!(status.contains("Name:\tplexd-metrics"), "{status}");
        let mask = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .unwrap_or_else(|| panic!("no {key} in {status}"))
        };
        let wanted = capabilities.iter().fold(0u64, |m, c| {
            m | 1
                << match c.as_str() {
                    "NET_ADMIN" => 12,
                    "NET_RAW" => 13,
                    "PERFMON" => 38,
                    "BPF" => 39,
                    other => panic!("unexpected capability {other}"),
                }
        });
        assert_eq!(mask("CapEff:"), wanted, "effective set");
        assert_eq!(mask("CapBnd:"), wanted, "bounding set");
        assert_eq!(mask("CapInh:") | mask("CapAmb:"), 0);
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        // Mount points as the agent sees them, after the chroot.
        let mountinfo = std::fs::read_to_string(proc.join("mountinfo")).expect("mountinfo");
        let options = |point: &str| {
            mountinfo
                .lines()
                .rev()
                .map(|l| l.split(' ').collect::<Vec<_>>())
                .find(|f| f.len() > 5 && f[4] == point)
                .map(|f| f[5].to_owned())
                .unwrap_or_else(|| panic!("{point} not mounted: {mountinfo}"))
        };
        for point in [
            "/",
            "/host/proc",
            "/host/sys",
            "/host/root",
            "/etc/plexd-metrics",
        ] {
            assert!(
                options(point).starts_with("ro"),
                "{point}: {}",
                options(point)
            );
        }
    }

    /// Stops the agent with SIGTERM (as the kubelet does) and returns its exit status and
    /// every event it logged.
    fn terminate(mut self) -> (std::process::ExitStatus, Vec<Line>) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        let status =
            plexd_metrics_tests::wait_within(&mut self.child, plexd_metrics_tests::EXIT_DEADLINE);
        // The reader thread ends with the pipe.
        while let Ok(line) = self.lines.recv_timeout(DEADLINE) {
            self.seen.push(line);
        }
        (status, std::mem::take(&mut self.seen))
    }
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn errors(lines: &[Line]) -> Vec<&Value> {
    lines
        .iter()
        .filter_map(|l| match l {
            Line::Event(e) if e["level"] == "ERROR" => Some(e),
            _ => None,
        })
        .collect()
}

/// `GET path` at `addr` from inside `ns`, as the kubelet's probe: status and JSON body.
fn probe(ns: &NetNs, addr: SocketAddr, path: &str) -> (u16, Value) {
    ns.run(|| health_probe(addr, path, Duration::from_secs(5)))
        .expect("enter the namespace")
}

/// The pod's environment from the manifest, plus what a test has to change: the control
/// plane's address and CA, and shorter intervals so that a report comes within seconds.
fn environment(spec: &PodSpec, cp: Option<&TestControlPlane>) -> Vec<(String, String)> {
    let fields = BTreeMap::from([("spec.nodeName", NODE_NAME)]);
    let mut env = spec.env(&fields);
    let set = |k: &str, v: &str| (format!("PLEXD_METRICS_{k}"), v.to_owned());
    env.push(set("METRICS_COLLECT_INTERVAL", "5s"));
    env.push(set("METRICS_REPORT_INTERVAL", "10s"));
    if let Some(cp) = cp {
        env.push(set("CONTROL_PLANE_URL", &cp.url()));
        env.push(set(
            "CONTROL_PLANE_CA_FILE",
            "/var/run/secrets/plexd/ca.pem",
        ));
    }
    env
}

#[test]
fn under_the_daemonsets_constraints_the_agent_attaches_collects_reports_and_is_healthy() {
    if !require_privileges() {
        return;
    }
    let spec = PodSpec::from_manifests();
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let node = &mesh.nodes[0];
    mesh.handshake(0, 1).expect("handshake");
    assert_eq!(mesh.ping(0, 1, 3).expect("ping"), 3, "the tunnel is up");
    // In the node's namespace, where the agent reaches it at 127.0.0.1.
    let cp = node
        .ns
        .run(TestControlPlane::https)
        .expect("enter namespace");
    cp.require_token(TOKEN);
    let pod = SimulatedPod::new(
        spec.clone(),
        &agent_binary(),
        &[
            ("token", TOKEN.as_bytes()),
            ("ca.pem", cp.ca_pem().as_bytes()),
        ],
    )
    .expect("build the pod's root filesystem");

    let caps = spec.capabilities();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"]);
    let mut agent =
        RunningPod::start(pod.command(&node.ns, &caps, &environment(&spec, Some(&cp)), &[]));
    let attached = agent.wait_for("kernel programs attached");
    assert_eq!(
        attached["interfaces"],
        format!("[\"{}\"]", node.underlay_dev),
        "the underlay was found through the host's /proc at /host/proc"
    );
    assert_eq!(ours(&tc_state(&node.ns, &node.underlay_dev)), 2);
    agent.wait_for("health endpoint listening (/healthz, /readyz)");
    agent.assert_confined(&caps);

    // The kubelet probes the pod's address (the node's, with hostNetwork) at the named port.
    let health = SocketAddr::new(node.underlay.into(), spec.port("health"));
    let (status, body) = probe(&node.ns, health, "/healthz");
    assert_eq!(status, 200, "{body}");
    let (status, body) = probe(&node.ns, health, "/readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["ebpf"]["state"], "attached");
    // The durable queue in the node's /var/lib/plexd-metrics, writable under a read-only root.
    assert_eq!(body["checks"]["queue"]["kind"], "disk", "{body}");
    assert_eq!(body["checks"]["queue"]["dir"], "/var/lib/plexd-metrics");

    // A report with every group, for this node, with the Secret's token.
    let peer = &mesh.nodes[1].keys.public;
    let points: Vec<MetricPoint> = loop {
        let request = cp.next_blocking(DEADLINE);
        assert_eq!(
            request.path,
            format!("/v1/nodes/{NODE_NAME}/metrics"),
            "node_id is spec.nodeName"
        );
        assert!(request.accepted(), "status {}", request.status);
        let points = request.points();
        if points.iter().any(|p| p.group == "tunnel") {
            break points;
        }
    };
    let tunnel = points
        .iter()
        .find(|p| p.group == "tunnel" && &p.peer_id == peer)
        .expect("node 1's peer, read through the UAPI socket at /host/run/wireguard");
    assert_eq!(
        tunnel.data.to_value()["handshake_succeeded"],
        true,
        "{}",
        tunnel.data
    );
    let latency = points
        .iter()
        .find(|p| p.group == "latency" && &p.peer_id == peer)
        .expect("a latency point (raw ICMP with NET_RAW)");
    assert!(
        latency.data.to_value()["rtt_nano"].as_i64().unwrap() > 0,
        "{}",
        latency.data
    );
    assert_eq!(
        plexd_metrics_tests::undocumented_keys(&points),
        Vec::<String>::new(),
        "every key the agent sends is in docs/metrics.md"
    );
    let agent_point = points.iter().find(|p| p.group == "agent").expect("agent");
    assert_eq!(agent_point.data.to_value()["ebpf_programs_attached"], 2);
    // mount_point is the host's root, bind-mounted at /host/root.
    let root = nix::sys::statfs::statfs("/").expect("statfs /");
    let system = points.iter().find(|p| p.group == "system").expect("system");
    assert_eq!(
        system.data.to_value()["disk_total_bytes"],
        root.blocks() * root.block_size() as u64,
        "{}",
        system.data
    );
    // Whole disks are those of the node's /sys/block, read at /host/sys.
    let block: Vec<String> = std::fs::read_dir("/sys/block")
        .expect("/sys/block")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let disks = system.data.to_value()["disks"].clone();
    for disk in disks.as_object().expect("disks").keys() {
        assert!(block.contains(disk), "{disk} is not in /sys/block: {disks}");
    }

    let (status, lines) = agent.terminate();
    assert!(status.success(), "{status}; {lines:#?}");
    assert!(errors(&lines).is_empty(), "{:#?}", errors(&lines));
    assert!(
        !lines.iter().any(|l| matches!(l, Line::Text(_))),
        "nothing but log events: {lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| matches!(l, Line::Event(e)
            if e["message"].as_str().is_some_and(|m| m.starts_with("cannot list whole disks")))),
        "/host/sys/block was listed: {lines:#?}"
    );
    assert_eq!(
        ours(&tc_state(&node.ns, &node.underlay_dev)),
        0,
        "detached on SIGTERM"
    );
}

#[test]
fn without_net_admin_the_agent_says_why_once_runs_on_and_is_not_ready() {
    if !require_privileges() {
        return;
    }
    let spec = PodSpec::from_manifests();
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let node = &mesh.nodes[0];
    let pod = SimulatedPod::new(
        spec.clone(),
        &agent_binary(),
        &[("token", TOKEN.as_bytes())],
    )
    .expect("build the pod's root filesystem");
    let caps: Vec<String> = spec
        .capabilities()
        .into_iter()
        .filter(|c| c != "NET_ADMIN")
        .collect();
    let mut agent = RunningPod::start(pod.command(&node.ns, &caps, &environment(&spec, None), &[]));
    agent.wait_for("health endpoint listening (/healthz, /readyz)");
    let health = SocketAddr::new(node.underlay.into(), spec.port("health"));
    let (status, body) = probe(&node.ns, health, "/readyz");
    assert_eq!(status, 503, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the kernel programs are not attached: ")
            && reason.contains("permission denied")
            && reason.contains("CAP_NET_ADMIN"),
        "{reason}"
    );
    assert_eq!(
        probe(&node.ns, health, "/healthz").0,
        200,
        "alive all the same"
    );

    let (status, lines) = agent.terminate();
    assert!(status.success(), "{status}");
    let errors = errors(&lines);
    assert_eq!(errors.len(), 1, "one error: {errors:#?}");
    assert_eq!(
        errors[0]["message"],
        "kernel programs not attached; running without eBPF (set metrics.ebpf.enabled: false to silence this)"
    );
}

#[test]
fn each_other_missing_capability_gives_one_clear_error_and_the_rest_is_collected() {
    if !require_privileges() {
        return;
    }
    let spec = PodSpec::from_manifests();
    let mesh = Mesh::new(2, None).expect("build the mesh");
    let node = &mesh.nodes[0];
    mesh.handshake(0, 1).expect("handshake");
    let pod = SimulatedPod::new(
        spec.clone(),
        &agent_binary(),
        &[("token", TOKEN.as_bytes())],
    )
    .expect("build the pod's root filesystem");
    for (missing, message, names) in [
        (
            "BPF",
            "kernel programs not attached; running without eBPF (set metrics.ebpf.enabled: false to silence this)",
            "CAP_BPF",
        ),
        (
            "NET_RAW",
            "latency not measured (set metrics.latency.enabled: false to silence this)",
            "CAP_NET_RAW",
        ),
    ] {
        let caps: Vec<String> = spec
            .capabilities()
            .into_iter()
            .filter(|c| c != missing)
            .collect();
        let out = pod
            .command(&node.ns, &caps, &environment(&spec, None), &["--once"])
            .output()
            .expect("run the agent once");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "without {missing}: {stderr}");
        let events: Vec<Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a log event: {l}")))
            .collect();
        let errors: Vec<&Value> = events.iter().filter(|e| e["level"] == "ERROR").collect();
        assert_eq!(errors.len(), 1, "without {missing}: {errors:#?}");
        assert_eq!(errors[0]["message"], message);
        let error = errors[0]["error"].as_str().unwrap();
        assert!(error.contains(names), "without {missing}: {error}");

        let batch: Vec<MetricPoint> = serde_json::from_slice(&out.stdout).expect("a batch");
        for group in ["system", "agent", "tunnel"] {
            assert!(
                batch.iter().any(|p| p.group == group),
                "without {missing}, {group} is still collected"
            );
        }
    }
}
